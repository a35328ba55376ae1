"""Held-out effect of alignment over seeds: reward model, DPO, RL (GRPO) and PPO against GRPO.

    python benchmarks/bench_align_effect.py                 # 3 seeds from the demo's SFT model
    python benchmarks/bench_align_effect.py --quick         # smoke run: 1 seed, a few steps of each
    python benchmarks/bench_align_effect.py --seeds 1,2,3,4,5 --base runs/x/sft/x --json out.json

For each seed, from the same chat model (`--base`, default the demo's SFT model), with the stages'
defaults except the step counts below (demo scale):

- RM: `run_rm` on the built-in GCIDE preference pairs (`--pairs`, 10% held out by headword, the SFT
  split) for `--rm-steps` steps: held-out pair accuracy (r_chosen > r_rejected) before (the zero head:
  0.5) and after.
- DPO: `run_dpo` (sigmoid, beta 0.1, precomputed reference) on the same seed's pairs (the same set the
  RM was trained on) for `--dpo-steps` steps: held-out preference accuracy (the implicit reward
  beta * (log pi - log ref) of the chosen answer above the rejected one) and held-out log-prob accuracy
  (the policy itself giving the chosen answer the higher log-probability), before and after. Win rate:
  the DPO model's and the SFT model's greedy answers (at most `--answer-tokens` tokens) to the held-out
  pairs' prompts ("What does X mean?" for words neither SFT nor the RM nor DPO trained on), scored by
  the same seed's RM from the step above (trained on the same pairs): a win when the DPO answer scores
  higher, a tie (identical answers included) counts one half.
- RL: `run_rl(algorithm="grpo")` on the built-in which-word task (reward `choice`: 1 for the right word,
  partial credit up to 0.25) for `--rl-steps` steps of `prompts_per_step` x `group_size` samples:
  rollout reward (mean of the first and the last 10 steps' rollouts), held-out task accuracy (greedy,
  exact match, `--eval-prompts` held-out words) and held-out mean `choice` reward of the greedy answers,
  before and after.
- PPO against GRPO: `run_rl(algorithm="ppo")` (value head, GAE) on the same task, prompts, samples per
  step, steps and learning rate: the same figures.

Every figure is printed per seed and as mean +- std (sample std over the seeds). Nothing is timed here
(bench_align_trl.py compares speed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE = REPO / "runs" / "demo" / "sft" / "demo"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=str(DEFAULT_BASE), help="lmforge chat model (run, sft dir, step dir)")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    ap.add_argument("--pairs", type=int, default=1000, help="built-in preference pairs (train + held out)")
    ap.add_argument("--rm-steps", type=int, default=100)
    ap.add_argument("--dpo-steps", type=int, default=100)
    ap.add_argument("--rl-steps", type=int, default=60)
    ap.add_argument("--eval-prompts", type=int, default=100, help="held-out which-word prompts (RL accuracy)")
    ap.add_argument("--answer-tokens", type=int, default=48, help="max new tokens of the greedy answers (win rate)")
    ap.add_argument("--workdir", default="", help="outputs (default: a temporary directory)")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 6 steps each, 200 pairs, 20 eval prompts")
    a = ap.parse_args(argv)
    if a.quick:
        a.seeds, a.pairs, a.rm_steps, a.dpo_steps, a.rl_steps, a.eval_prompts = "1", 200, 6, 6, 6, 20
    a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    if not a.seeds or min(a.rm_steps, a.dpo_steps, a.rl_steps) < 1:
        ap.error("--seeds must name at least one seed and every --*-steps be >= 1")
    return a


FAST = dict(checkpoint_every=0, eval_every=0, log_every=1, resume=False, device="cpu", precision="fp32", peak_flops=1.0)


def run_rm_seed(args, base: Path, out: Path, seed: int) -> dict:
    from lmforge.posttrain.rm import RMConfig, run_rm

    cfg = RMConfig(pairs=args.pairs, max_steps=args.rm_steps, **FAST)
    cfg.validate()
    res = run_rm(cfg, out, base=base, seed=seed)
    return {"rm_acc_before": res.heldout_accuracy_before, "rm_acc_after": res.heldout_accuracy, "checkpoint": res.checkpoint,
            "rm_heldout_pairs": res.data_stats.get("heldout_examples")}


def greedy_answers(model_path: Path, prompts: list[list[dict]], max_tokens: int) -> list[str]:
    from lmforge.infer import load_model_and_tokenizer
    from lmforge.posttrain.sft import chat_samples

    model, tok, _ = load_model_and_tokenizer(model_path)
    model.eval()
    return [s["completion"].strip() for s in chat_samples(model, tok, prompts, max_tokens, temperature=0.0)]


def run_dpo_seed(args, base: Path, out: Path, seed: int, rm_checkpoint: Path) -> dict:
    from lmforge.posttrain.dpo import DPOConfig, run_dpo
    from lmforge.posttrain.pref_data import read_pref_jsonl
    from lmforge.posttrain.rm import load_reward_model

    cfg = DPOConfig(pairs=args.pairs, max_steps=args.dpo_steps, sample_prompts=[], **FAST)
    cfg.validate()
    res = run_dpo(cfg, out, base=base, seed=seed)
    held, _ = read_pref_jsonl([out / "data" / "heldout_pairs.jsonl"])
    prompts = [p["prompt"] for p in held]
    ours = greedy_answers(res.checkpoint, prompts, args.answer_tokens)
    sft = greedy_answers(base, prompts, args.answer_tokens)
    rm = load_reward_model(rm_checkpoint)
    r_dpo = rm.score([p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, ours)])
    r_sft = rm.score([p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, sft)])
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(r_dpo, r_sft)]
    return {"dpo_pref_acc_before": res.before.get("heldout_accuracy"), "dpo_pref_acc_after": res.after.get("heldout_accuracy"),
            "dpo_logp_acc_before": res.before.get("heldout_logp_accuracy"),
            "dpo_logp_acc_after": res.after.get("heldout_logp_accuracy"),
            "dpo_first_loss": res.first_loss, "dpo_win_rate": statistics.fmean(wins) if wins else None,
            "dpo_identical_answers": sum(a == b for a, b in zip(ours, sft)) / max(1, len(ours)), "win_prompts": len(prompts),
            "win_examples": [{"prompt": p[-1]["content"], "sft": b, "dpo": a, "r_sft": rb, "r_dpo": ra}
                             for p, a, b, ra, rb in list(zip(prompts, ours, sft, r_dpo, r_sft))[:3]]}


def run_rl_seed(args, base: Path, out: Path, seed: int, algorithm: str) -> dict:
    from lmforge.posttrain.rl import RLConfig, run_rl

    cfg = RLConfig(algorithm=algorithm, max_steps=args.rl_steps, eval_prompts=args.eval_prompts, stall_steps=0, **FAST)
    cfg.validate()
    res = run_rl(cfg, out, base=base, seed=seed)
    recs = [json.loads(line) for line in res.metrics_path.read_text().splitlines() if line.strip()]
    r = [x["reward_mean"] for x in recs if x.get("kind") == "train" and "reward_mean" in x]
    k = min(10, max(1, len(r) // 2))
    p = algorithm
    return {f"{p}_acc_before": res.accuracy_before, f"{p}_acc_after": res.accuracy_after,
            f"{p}_choice_before": heldout_choice_reward(cfg, base, seed), f"{p}_choice_after": heldout_choice_reward(cfg, res.checkpoint, seed),
            f"{p}_reward_first": statistics.fmean(r[:k]), f"{p}_reward_last": statistics.fmean(r[-k:]),
            f"{p}_kl_last": recs and next((x.get("kl") for x in reversed(recs) if x.get("kind") == "train"), None)}


def heldout_choice_reward(cfg, model_path: Path, seed: int) -> float | None:
    """Mean `choice` reward (1 right word, up to 0.25 partial credit) of greedy answers to the held-out
    which-word prompts: a finer held-out figure than exact-match accuracy for a model that rarely
    answers exactly."""
    from lmforge.infer import load_model_and_tokenizer
    from lmforge.posttrain.rewards import load_reward
    from lmforge.posttrain.rl import load_prompts, prepare_prompts, task_accuracy

    model, tok, _ = load_model_and_tokenizer(model_path)
    model.eval()
    _train, held, _ = load_prompts(cfg, seed)
    held_set, _ = prepare_prompts(tok, held[: cfg.eval_prompts], model.cfg.max_seq_len)
    score, _ = task_accuracy(model, tok, held_set, load_reward("choice", cfg.reward_on_error), cfg.eval_tokens, cfg.gen_batch)
    return score


ROWS = [
    ("RM held-out pair accuracy", "rm_acc_before", "rm_acc_after"),
    ("DPO held-out preference accuracy (implicit reward)", "dpo_pref_acc_before", "dpo_pref_acc_after"),
    ("DPO held-out log-prob accuracy (pi_c > pi_r)", "dpo_logp_acc_before", "dpo_logp_acc_after"),
    ("DPO win rate vs SFT (RM-scored, greedy, held-out prompts)", None, "dpo_win_rate"),
    ("GRPO rollout reward (first / last 10 steps)", "grpo_reward_first", "grpo_reward_last"),
    ("GRPO held-out task accuracy (greedy, exact)", "grpo_acc_before", "grpo_acc_after"),
    ("GRPO held-out choice reward (greedy)", "grpo_choice_before", "grpo_choice_after"),
    ("PPO rollout reward (first / last 10 steps)", "ppo_reward_first", "ppo_reward_last"),
    ("PPO held-out task accuracy (greedy, exact)", "ppo_acc_before", "ppo_acc_after"),
    ("PPO held-out choice reward (greedy)", "ppo_choice_before", "ppo_choice_after"),
]


def ms(vals: list) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.fmean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from lmforge.model.io import resolve_model

    base = resolve_model(args.base).path
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_align_effect_"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"base {base}; seeds {args.seeds}; RM {args.rm_steps} / DPO {args.dpo_steps} / RL {args.rl_steps} steps; "
          f"{args.pairs} pairs; torch threads {torch.get_num_threads()}", flush=True)
    per_seed: list[dict] = []
    for seed in args.seeds:
        t0 = time.time()
        row: dict = {"seed": seed}
        d = work / f"seed{seed}"
        rm = run_rm_seed(args, base, d / "rm", seed)
        row.update({k: v for k, v in rm.items() if k != "checkpoint"})
        row.update(run_dpo_seed(args, base, d / "dpo", seed, rm["checkpoint"]))
        row.update(run_rl_seed(args, base, d / "grpo", seed, "grpo"))
        row.update(run_rl_seed(args, base, d / "ppo", seed, "ppo"))
        row["wall_s"] = time.time() - t0
        per_seed.append(row)
        print(f"seed {seed} ({row['wall_s']:.0f} s): " + ", ".join(
            f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float) and k != "wall_s"), flush=True)
        for ex in row["win_examples"]:
            print(f"    {ex['prompt']!r}: SFT {ex['sft'][:60]!r} ({ex['r_sft']:.2f})  DPO {ex['dpo'][:60]!r} ({ex['r_dpo']:.2f})")

    print(f"\nAlignment effect, held out, {len(args.seeds)} seed(s) (mean ± std over seeds), from {base}")
    print("| figure | before (SFT model) | after |")
    print("|---|---|---|")
    for name, before, after in ROWS:
        b = ms([r.get(before) for r in per_seed]) if before else "0.5 (= SFT)"
        print(f"| {name} | {b} | {ms([r.get(after) for r in per_seed])} |")
    first = ", ".join(f"{r['dpo_first_loss']:.6f}" for r in per_seed)
    print(f"\nDPO step-1 loss per seed: {first}; identical DPO/SFT "
          f"greedy answers: {ms([r['dpo_identical_answers'] for r in per_seed])} of {per_seed[0]['win_prompts']} prompts; "
          f"RM held-out pairs {per_seed[0].get('rm_heldout_pairs')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "seeds": per_seed}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
