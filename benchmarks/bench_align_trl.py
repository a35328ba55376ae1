"""Alignment speed against TRL: lmforge `run_rm` / `run_dpo` / `run_rl` vs TRL `RewardTrainer` /
`DPOTrainer` / `GRPOTrainer` / `RLOOTrainer`, the same work in the same run.

Needs the `posttrain-bench` extra (trl, datasets, accelerate): `pip install -e '.[dev,posttrain-bench]'`.

    python benchmarks/bench_align_trl.py                  # the demo's SFT model, rm + dpo + grpo + rloo
    python benchmarks/bench_align_trl.py --quick          # smoke run: a few steps of each
    python benchmarks/bench_align_trl.py --stages dpo --steps 40 --base runs/x/sft/x

What is the same on both sides
- threads: `torch.set_num_threads(--threads)` (default 1: the machine is shared) for the whole process,
  both sides; the two sides alternate (`--rounds`, which one goes first swaps every round);
- the model: the lmforge chat model (`--base`, default the demo's SFT model) and its HF export
  (`lmforge.model.hf.export_hf` with the chat template), fp32, the same weights, HF attention `sdpa`;
- the optimisation: AdamW (betas 0.9/0.95, eps 1e-8, no weight decay), gradient clipping at 1.0, a
  constant learning rate with no warmup, one micro-batch per optimizer step, `--warmup + --steps` steps.

What each stage runs
- rm: lmforge `run_rm` (the `lmforge rm` stage: a scalar head on the final hidden state of the last
  response token, Bradley-Terry loss) vs TRL `RewardTrainer` on `AutoModelForSequenceClassification`
  (`num_labels=1`) of the export. The data is lmforge's built-in GCIDE pairs, rendered once by lmforge
  and handed to TRL pre-tokenized (`chosen_ids` / `rejected_ids`) in lmforge's batch order (a sequential
  sampler), so both sides see the same pairs in the same batches (chosen rows then rejected rows,
  right-padded, on both). The head starts at zero on both sides (TRL's `score` has no bias; lmforge's
  bias gets no gradient from a pairwise loss), so the step-1 loss is ln 2 on both. Before training, a
  random head (the same vector on both sides) is put on each model and the first batch scored: the
  rewards agree, i.e. TRL's head reads the last non-pad token as lmforge's reads the last response token.
- dpo: lmforge `run_dpo` (sigmoid loss, `--beta`, reference log-probs precomputed once before training)
  vs TRL `DPOTrainer` (`loss_type="sigmoid"`, the same beta, `precompute_ref_log_probs=True`, no
  `max_length` truncation). TRL takes the same pairs as conversations in lmforge's batch order and
  tokenizes them with the exported chat template; its prompt + completion ids are checked equal to
  lmforge's (printed). The precompute is outside the timer on both sides. Step-1 loss: ln 2 on both.
- grpo / rloo: lmforge `run_rl(algorithm="grpo" | "rloo")` vs TRL `GRPOTrainer` / `RLOOTrainer`. The same
  training prompts of the built-in which-word task in the same order (TRL: `shuffle_dataset=False`, the
  dataset listed in lmforge's prompt order), `--prompts` prompts x `--group` (G, `num_generations`)
  completions per step, at most `--max-new` new tokens, temperature 1.0, no top-k / top-p, the same
  reward function (`lmforge.posttrain.rewards.choice_reward`, passed to TRL's `reward_funcs`), no KL
  (`kl_coef = 0` / `beta = 0`: no reference model on either side), one optimizer step per generation
  (`steps_per_generation = 1`, `num_iterations = 1`), clip 0.2. GRPO: group-normalised advantages
  (std + 1e-4) on both, token-mean loss (TRL's `loss_type="dapo"` = lmforge's `loss_agg="token"` with one
  micro-batch). RLOO: leave-one-out baseline on both; TRL's RLOO loss is per sequence (summed token
  log-probs), lmforge's per token (same advantages, a different normalisation of the gradient).
  lmforge generates with its engine (KV cache, the G samples of a prompt share one prefill); TRL with
  `transformers`' `generate` on CPU. Rewards differ draw by draw (different random streams), so the
  mean rollout reward over the run is compared, not step by step.

What the timer covers: the training steps only, generation included for RL. Model loading, export,
data building, reference precompute and each trainer's set-up are outside it, and so are lmforge's
final checkpoint write and end-of-run eval (its trainer excludes them). lmforge: each step's wall time
from its metrics.jsonl (`log_every = 1`: each record's `steps_per_s` is one step's 1/dt; for RL the
step includes the rollout: generation, rewards, old log-probs). TRL: the wall time between consecutive
`on_step_end` callbacks (for RL: generation, rewards, advantages, forward, backward, optimizer, logging).
The first `--warmup` steps are left out on both sides. The speed is the median over the timed steps of
(the step's work) / (its wall time): pairs/s and tokens/s (the pairs' tokens, padding excluded, the same
on both sides) for rm and dpo; samples/s (completions, generation included) for grpo and rloo. Each side
runs `--rounds` times, alternating which goes first, and its best round counts; the load average is
printed. Losses printed are the first round's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft_trl import load_hf  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE = REPO / "runs" / "demo" / "sft" / "demo"
STAGES = ("rm", "dpo", "grpo", "rloo")
GOAL = 1.5
LN2 = math.log(2.0)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=str(DEFAULT_BASE), help="lmforge chat model (run, sft dir, step dir)")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma list of " + ", ".join(STAGES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both sides (default 1)")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per side and stage")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    ap.add_argument("--pairs", type=int, default=400, help="built-in preference pairs (rm, dpo)")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per step (rm, dpo)")
    ap.add_argument("--lr", type=float, default=1e-4, help="rm and dpo learning rate")
    ap.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    ap.add_argument("--prompts", type=int, default=4, help="RL prompts per step")
    ap.add_argument("--group", type=int, default=8, help="RL completions per prompt (G)")
    ap.add_argument("--max-new", type=int, default=12, help="RL max new tokens per completion")
    ap.add_argument("--rl-lr", type=float, default=3e-4)
    ap.add_argument("--rounds", type=int, default=2, help="runs per side, alternating which goes first; best kept")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--workdir", default="", help="where exports and outputs go (default: a temporary directory)")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps after 1 warmup, 1 round, 120 pairs")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.rounds, a.pairs = 3, 1, 1, 120
    if a.steps < 1 or a.warmup < 0 or a.threads < 1 or a.rounds < 1 or a.group < 2:
        ap.error("--steps, --threads and --rounds must be >= 1, --warmup >= 0, --group >= 2")
    a.stages = [s.strip() for s in a.stages.split(",") if s.strip()]
    if not a.stages or any(s not in STAGES for s in a.stages):
        ap.error("--stages takes " + ", ".join(STAGES))
    return a


COMMON = dict(optimizer="adamw", schedule="constant", warmup_steps=0, grad_clip=1.0, betas=[0.9, 0.95], eps=1e-8,
              weight_decay=0.0, checkpoint_every=0, eval_every=0, log_every=1, resume=False, device="cpu",
              precision="fp32", peak_flops=1.0)


def trl_common(out_dir: Path, n_steps: int, lr: float, seed: int) -> dict:
    return dict(output_dir=str(out_dir), max_steps=n_steps, gradient_accumulation_steps=1, learning_rate=lr,
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_strategy="no",
                report_to="none", seed=seed, data_seed=seed, dataloader_num_workers=0, use_cpu=True, bf16=False,
                fp16=False, disable_tqdm=True)


# ---- shared TRL plumbing -------------------------------------------------------------------------


def step_timer():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        """Wall-clock marks at the start of training and at the end of every optimizer step."""

        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

    return Timer()


def in_order(trainer_cls):
    """`trainer_cls` reading its dataset in order and recording each training step's loss."""
    from torch.utils.data import SequentialSampler

    class InOrder(trainer_cls):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if model.training:
                self.step_losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    return InOrder


def run_trainer(trainer, timer) -> dict:
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()
    step_s = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"step_s": step_s, "logs": logs}


def lmforge_records(metrics_path: Path) -> list[dict]:
    recs = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    return [r for r in recs if r.get("kind") == "train"]


def median_rate(work: list[float], step_s: list[float], warmup: int) -> float:
    dt = step_s[warmup:]
    return statistics.median(w / d for w, d in zip(work[warmup : warmup + len(dt)], dt))


# ---- preference data (rm, dpo): lmforge's pairs, in lmforge's batch order --------------------------


def pref_config(cls, args, n_steps: int, **over):
    cfg = cls(pairs=args.pairs, heldout=0.1, sampled=0.0, seq_len=0, batch_size=args.batch_size, overflow="drop",
              eval_batch_size=32, max_steps=n_steps, lr=args.lr, **COMMON, **over)
    cfg.validate()
    return cfg


def pref_data(cfg, tok, seq_len: int, seed: int, n_steps: int):
    """(raw pairs, rendered examples, per-step example indices) exactly as `prepare_pairs` and
    `PairBatches` give them to `run_rm` / `run_dpo` (checked against `next_batch()`)."""
    from lmforge.posttrain.pref_data import PairBatches, build_default_pairs, render_pairs
    from lmforge.posttrain.sft import BUNDLED_DICTIONARY

    dpaths = sorted(BUNDLED_DICTIONARY.glob("*.jsonl*"))
    raw, _held, _ = build_default_pairs(dpaths, seed=seed, n=cfg.pairs, holdout=cfg.heldout, model=None, tokenizer=tok,
                                        sampled=cfg.sampled)
    examples, _ = render_pairs(tok, raw, seq_len, cfg.overflow)
    b = PairBatches(examples, cfg.batch_size, seed, tok.pad_id)
    steps = []
    for _ in range(n_steps):
        batch = b.next_batch()
        steps.append([int(i) for i in batch.index])
    return raw, examples, steps, b.fingerprint


def pair_tokens(examples, steps) -> list[int]:
    return [sum(len(examples[i].chosen_ids) + len(examples[i].rejected_ids) for i in s) for s in steps]


# ---- rm ----------------------------------------------------------------------------------------


def rm_head_check(base: Path, hf_dir: Path, examples, idx: list[int], pad_id: int, seed: int) -> float:
    """max |reward diff| between lmforge's RewardModel and TRL's sequence-classification model with the
    same random head, on one batch: 0 (to float precision) when both read the same token."""
    from lmforge.infer import load_model_and_tokenizer
    from lmforge.posttrain.pref_data import collate_pairs
    from lmforge.posttrain.rm import RewardModel, pair_rewards
    from transformers import AutoModelForSequenceClassification

    g = torch.Generator().manual_seed(seed)
    backbone, tok, _ = load_model_and_tokenizer(base)
    w = torch.randn(1, backbone.cfg.d_model, generator=g)
    rm = RewardModel(backbone, tokenizer=tok).eval()
    with torch.no_grad():
        rm.head.weight.copy_(w)
        batch = collate_pairs([examples[i] for i in idx], pad_id, idx)
        ours = torch.cat(pair_rewards(rm, batch))
        hf = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), num_labels=1, dtype=torch.float32,
                                                                attn_implementation="sdpa").eval()
        hf.config.pad_token_id = pad_id
        hf.score.weight.copy_(w)
        theirs = hf(input_ids=batch.ids, attention_mask=(torch.arange(batch.ids.shape[1]) < batch.lengths[:, None]).long()
                    ).logits.squeeze(-1)
    return float((ours - theirs).abs().max())


def run_rm_lmforge(cfg, base: Path, out: Path, seed: int) -> dict:
    from lmforge.posttrain.rm import run_rm

    res = run_rm(cfg, out, base=base, seed=seed)
    recs = lmforge_records(res.metrics_path)
    state = json.loads((res.checkpoint / "state.json").read_text())
    return {"losses": [r["loss"] for r in recs], "step_s": [1.0 / r["steps_per_s"] for r in recs],
            "fingerprint": state["train_config"]["data_fingerprint"], "accuracy": [r.get("accuracy") for r in recs]}


def run_rm_trl(cfg, hf_dir: Path, examples, steps, out: Path, seed: int, pad_id: int) -> dict:
    import datasets
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    model = AutoModelForSequenceClassification.from_pretrained(str(hf_dir), num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    with torch.no_grad():
        model.score.weight.zero_()  # lmforge's head starts at zero too: step-1 loss ln 2
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    if tok.pad_token_id != pad_id:
        raise SystemExit(f"internal: HF pad id {tok.pad_token_id} != lmforge's {pad_id}")
    rows = [{"chosen_ids": examples[i].chosen_ids, "rejected_ids": examples[i].rejected_ids} for s in steps for i in s]
    args = RewardConfig(**trl_common(out, len(steps), cfg.lr, seed), per_device_train_batch_size=cfg.batch_size,
                        max_length=None, center_rewards_coefficient=None)
    timer = step_timer()
    trainer = in_order(RewardTrainer)(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                      processing_class=tok, callbacks=[timer])
    trainer.step_losses = []
    got = run_trainer(trainer, timer)
    return {"losses": trainer.step_losses, "step_s": got["step_s"], "accuracy": [h.get("accuracy") for h in got["logs"]]}


# ---- dpo ---------------------------------------------------------------------------------------


def run_dpo_lmforge(cfg, base: Path, out: Path, seed: int) -> dict:
    from lmforge.posttrain.dpo import run_dpo

    res = run_dpo(cfg, out, base=base, seed=seed)
    recs = lmforge_records(res.metrics_path)
    state = json.loads((res.checkpoint / "state.json").read_text())
    return {"losses": [r["loss"] for r in recs], "step_s": [1.0 / r["steps_per_s"] for r in recs],
            "fingerprint": state["train_config"]["data_fingerprint"], "accuracy": [r.get("accuracy") for r in recs]}


def run_dpo_trl(cfg, hf_dir: Path, raw, examples, steps, out: Path, seed: int) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    def conv(p):
        prompt = p["prompt"] if isinstance(p["prompt"], list) else [{"role": "user", "content": p["prompt"]}]
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}]}

    order = [i for s in steps for i in s]
    rows = [conv(raw[int(examples[i].source)]) for i in order]
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    args = TrlDPOConfig(**trl_common(out, len(steps), cfg.lr, seed), per_device_train_batch_size=cfg.batch_size,
                        beta=cfg.beta, loss_type=["sigmoid"], precompute_ref_log_probs=True,
                        precompute_ref_batch_size=32, max_length=None, padding_free=False)
    timer = step_timer()
    trainer = in_order(DPOTrainer)(model=load_hf(hf_dir), args=args, train_dataset=datasets.Dataset.from_list(rows),
                                   processing_class=tok, callbacks=[timer])
    prepared = trainer.train_dataset
    same = sum(list(r["prompt_ids"]) + list(r["chosen_ids"]) == examples[i].chosen_ids
               and list(r["prompt_ids"]) + list(r["rejected_ids"]) == examples[i].rejected_ids
               for r, i in zip(prepared, order))
    trainer.step_losses = []
    got = run_trainer(trainer, timer)
    return {"losses": trainer.step_losses, "step_s": got["step_s"], "same_ids": (same, len(order)),
            "accuracy": [h.get("rewards/accuracies") for h in got["logs"]]}


# ---- rl (grpo, rloo) ---------------------------------------------------------------------------


def rl_config(args, algorithm: str, n_steps: int):
    from lmforge.posttrain.rl import RLConfig

    cfg = RLConfig(algorithm=algorithm, reward="choice", prompts=2000, heldout=0.1, eval_prompts=0,
                   prompts_per_step=args.prompts, group_size=args.group, temperature=1.0, top_k=0, top_p=1.0,
                   max_new_tokens=args.max_new, gen_batch=args.prompts * args.group, ppo_epochs=1, minibatches=1,
                   clip_eps=0.2, kl_coef=0.0, scale_rewards=True, std_eps=1e-4, loss_agg="token", stall_steps=0,
                   max_steps=n_steps, lr=args.rl_lr, **COMMON)
    cfg.validate()
    return cfg


def rl_prompts(cfg, tok, seed: int, n_steps: int, ctx: int) -> list[dict]:
    """The prompt records lmforge's RolloutSource takes, step after step (its seeded per-epoch order)."""
    from lmforge.posttrain.rl import _mix, load_prompts, prepare_prompts

    train, _held, _ = load_prompts(cfg, seed)
    ps, _ = prepare_prompts(tok, train, ctx)
    out, epoch, pos, order = [], 0, 0, None
    while len(out) < n_steps * cfg.prompts_per_step:
        if order is None:
            order = list(range(len(ps.ids)))
            random.Random(_mix(seed, epoch, 0, 3)).shuffle(order)
        if pos >= len(order):
            epoch, pos, order = epoch + 1, 0, None
            continue
        out.append(ps.records[order[pos]])
        pos += 1
    return out


def which_word_reward(prompts, completions, answer, options, **_kw) -> list[float]:
    """lmforge's built-in reward (rewards.choice_reward) in TRL's reward-function convention."""
    from lmforge.posttrain.rewards import choice_reward

    out = []
    for p, c, a, o in zip(prompts, completions, answer, options):
        text = c[-1]["content"] if isinstance(c, list) else c
        out.append(choice_reward(p, text, answer=a, options=o))
    return out


def run_rl_lmforge(cfg, base: Path, out: Path, seed: int) -> dict:
    from lmforge.posttrain.rl import run_rl

    res = run_rl(cfg, out, base=base, seed=seed)
    recs = lmforge_records(res.metrics_path)
    return {"losses": [r["loss"] for r in recs], "step_s": [1.0 / r["steps_per_s"] for r in recs],
            "reward": [r["reward_mean"] for r in recs], "gen_s": [r.get("gen_s", 0.0) for r in recs],
            "response_len": [r.get("response_len", 0.0) for r in recs]}


def run_rl_trl(cfg, hf_dir: Path, records: list[dict], out: Path, seed: int) -> dict:
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    rows = [{"prompt": r["messages"], "answer": r["meta"]["answer"], "options": r["meta"]["options"]} for r in records]
    P, G = cfg.prompts_per_step, cfg.group_size
    common = dict(**trl_common(out, cfg.max_steps, cfg.lr, seed), per_device_train_batch_size=P * G, num_generations=G,
                  steps_per_generation=1, max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature,
                  top_p=1.0, top_k=0, beta=0.0, num_iterations=1, epsilon=cfg.clip_eps, shuffle_dataset=False,
                  use_vllm=False, log_completions=False)
    if cfg.algorithm == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        targs, cls = GRPOConfig(**common, loss_type="dapo", scale_rewards="group"), GRPOTrainer
    else:
        from trl import RLOOConfig, RLOOTrainer

        targs, cls = RLOOConfig(**common, normalize_advantages=False), RLOOTrainer
    timer = step_timer()
    trainer = cls(model=load_hf(hf_dir), reward_funcs=[which_word_reward], args=targs,
                  train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, callbacks=[timer])
    got = run_trainer(trainer, timer)
    logs = got["logs"]
    return {"losses": [h["loss"] for h in logs], "step_s": got["step_s"], "reward": [h.get("reward") for h in logs],
            "response_len": [h.get("completions/mean_length") for h in logs]}


# ---- the benchmark -----------------------------------------------------------------------------


def alternate(args, name: str, run_ours, run_theirs, work_fn) -> dict:
    """Run both sides `args.rounds` times, alternating which goes first; per-round rates."""
    runs: dict[str, list[dict]] = {"lmforge": [], "trl": []}
    for rnd in range(args.rounds):
        for side in (("lmforge", "trl") if rnd % 2 == 0 else ("trl", "lmforge")):
            got = (run_ours if side == "lmforge" else run_theirs)(rnd)
            n = args.warmup + args.steps
            if len(got["step_s"]) != n:
                raise SystemExit(f"internal: {name} {side}: {len(got['step_s'])} step times for {n} steps")
            got["rate"] = median_rate(work_fn(got), got["step_s"], args.warmup)
            got["median_step_s"] = statistics.median(got["step_s"][args.warmup:])
            runs[side].append(got)
            print(f"  [{name}] round {rnd + 1} {side}: {got['rate']:,.1f}/s, median step {got['median_step_s'] * 1e3:.0f} ms "
                  f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    return runs


def best(runs: list[dict]) -> dict:
    return max(runs, key=lambda r: r["rate"])


def _result(*a, **k):
    """The RESULT line run_all.py collects (benchmarks/_bench.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench import result

    return result(*a, **k)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    import trl

    from lmforge.infer import load_model_and_tokenizer
    from lmforge.model.hf import export_hf
    from lmforge.model.io import resolve_model
    from lmforge.posttrain.dpo import DPOConfig
    from lmforge.posttrain.rm import RMConfig
    from lmforge.tokenizer.chat import chat_template_jinja

    transformers.logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()
    os.environ.setdefault("TQDM_DISABLE", "1")
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_align_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    ref = resolve_model(args.base)
    model, tok, ref = load_model_and_tokenizer(ref.path)
    ctx, n_params = model.cfg.max_seq_len, model.cfg.num_params()
    del model
    hf_dir = work / "hf"
    if not hf_dir.exists():
        export_hf(ref.path, hf_dir, tokenizer=ref.tokenizer, chat_template=chat_template_jinja())
    n_steps = args.warmup + args.steps
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"torch threads {torch.get_num_threads()} (both sides)")
    print(f"model {ref.path} ({n_params:,} parameters, context {ctx}); {n_steps} steps per run ({args.warmup} untimed), "
          f"{args.rounds} alternating round(s); constant lr, AdamW, clip 1.0")
    table: list[dict] = []
    results: dict = {"config": vars(args), "rows": table}

    for stage in ("rm", "dpo"):
        if stage not in args.stages:
            continue
        cfg = pref_config(RMConfig if stage == "rm" else DPOConfig, args, n_steps,
                          **({"beta": args.beta, "loss": "sigmoid", "reference": "precomputed", "sample_prompts": []}
                             if stage == "dpo" else {}))
        raw, examples, steps, fp = pref_data(cfg, tok, ctx, args.seed, n_steps)
        toks = pair_tokens(examples, steps)
        print(f"\n[{stage}] {len(examples)} training pairs, {args.batch_size} pairs per step, "
              f"{statistics.fmean(toks):.0f} pair tokens per step" + (f", beta {args.beta}" if stage == "dpo" else ""))
        if stage == "rm":
            d = rm_head_check(ref.path, hf_dir, examples, steps[0], tok.pad_id, args.seed)
            print(f"  head position check (same random head, first batch): max |reward diff| {d:.2e} "
                  f"({'same token' if d < 1e-3 else 'MISMATCH'})")
            results["rm_head_check"] = d
            ours_fn = lambda r: run_rm_lmforge(cfg, ref.path, work / f"lmforge_rm_{r}", args.seed)  # noqa: E731
            theirs_fn = lambda r: run_rm_trl(cfg, hf_dir, examples, steps, work / f"trl_rm_{r}", args.seed, tok.pad_id)  # noqa: E731
        else:
            ours_fn = lambda r: run_dpo_lmforge(cfg, ref.path, work / f"lmforge_dpo_{r}", args.seed)  # noqa: E731
            theirs_fn = lambda r: run_dpo_trl(cfg, hf_dir, raw, examples, steps, work / f"trl_dpo_{r}", args.seed)  # noqa: E731
        runs = alternate(args, stage, ours_fn, theirs_fn, lambda _g: toks)
        for got in runs["lmforge"]:
            if got["fingerprint"] != fp:
                raise SystemExit(f"internal: lmforge {stage} trained on other data ({got['fingerprint']} vs {fp})")
        o, t = runs["lmforge"][0], runs["trl"][0]
        if stage == "dpo":
            s, n = t["same_ids"]
            print(f"  TRL tokenization of the same pairs (exported chat template): {s}/{n} rows with lmforge's ids")
        diffs = [abs(x - y) for x, y in zip(o["losses"], t["losses"])]
        bo, bt = best(runs["lmforge"]), best(runs["trl"])
        pairs_rate = lambda g: g["rate"] / statistics.fmean(toks) * args.batch_size  # noqa: E731
        note = (f"step-1 loss {o['losses'][0]:.6f} / {t['losses'][0]:.6f} (ln 2 = {LN2:.6f}); last {o['losses'][-1]:.4f} / "
                f"{t['losses'][-1]:.4f}; max |diff| {max(diffs):.1e}")
        print(f"  {note}")
        table.append({"stage": stage, "unit": "tokens/s", "lmforge": bo["rate"], "trl": bt["rate"], "ratio": bo["rate"] / bt["rate"],
                      "pairs_per_s": (pairs_rate(bo), pairs_rate(bt)), "note": note,
                      "rounds": {k: [g["rate"] for g in v] for k, v in runs.items()},
                      "losses": {"lmforge": o["losses"], "trl": t["losses"]}})

    for stage in ("grpo", "rloo"):
        if stage not in args.stages:
            continue
        cfg = rl_config(args, stage, n_steps)
        records = rl_prompts(cfg, tok, args.seed, n_steps, ctx)
        per_step = [float(args.prompts * args.group)] * n_steps
        print(f"\n[{stage}] {args.prompts} prompts x G {args.group} = {args.prompts * args.group} samples per step, "
              f"at most {args.max_new} new tokens, temperature 1.0, no KL, reward choice_reward")
        ours_fn = lambda r: run_rl_lmforge(cfg, ref.path, work / f"lmforge_{stage}_{r}", args.seed)  # noqa: E731
        theirs_fn = lambda r: run_rl_trl(cfg, hf_dir, records, work / f"trl_{stage}_{r}", args.seed)  # noqa: E731
        runs = alternate(args, stage, ours_fn, theirs_fn, lambda _g: per_step)
        o, t = runs["lmforge"][0], runs["trl"][0]
        bo, bt = best(runs["lmforge"]), best(runs["trl"])
        rm_, rt = statistics.fmean(o["reward"]), statistics.fmean(x for x in t["reward"] if x is not None)
        lo = statistics.fmean(o["response_len"])
        lt = statistics.fmean(x for x in t["response_len"] if x is not None)
        gen_share = statistics.median(g / s for g, s in zip(bo["gen_s"][args.warmup:], bo["step_s"][args.warmup:]))
        note = (f"mean rollout reward {rm_:.3f} / {rt:.3f}; mean completion length {lo:.1f} / {lt:.1f} tokens "
                f"(lmforge counts the stop token); lmforge generation {gen_share:.0%} of a step")
        print(f"  {note}")
        table.append({"stage": stage, "unit": "samples/s", "lmforge": bo["rate"], "trl": bt["rate"], "ratio": bo["rate"] / bt["rate"],
                      "note": note, "rounds": {k: [g["rate"] for g in v] for k, v in runs.items()},
                      "reward": {"lmforge": o["reward"], "trl": t["reward"]}})

    print(f"\nAlignment speed vs TRL ({args.steps} timed steps after {args.warmup}, median step, best of {args.rounds} "
          f"alternating rounds per side; {args.threads} torch thread(s) both sides)")
    print("| stage | unit | lmforge | TRL | ratio | goal >= 1.5x | loss / reward agreement |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        met = "met" if r["ratio"] >= GOAL else "**not met**"
        extra = (f" ({r['pairs_per_s'][0]:,.1f} / {r['pairs_per_s'][1]:,.1f} pairs/s)" if "pairs_per_s" in r else "")
        print(f"| {r['stage']} | {r['unit']}{extra} | {r['lmforge']:,.1f} | {r['trl']:,.1f} | **{r['ratio']:.2f}x** | {met} | "
              f"{r['note']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if table:
        _result("align_trl", min(r["ratio"] for r in table), GOAL,
                "alignment speed, lmforge / TRL on the same data; headline = the lowest of "
                + ", ".join(f"{r['stage']} {r['ratio']:.2f}x" for r in table),
                **{r["stage"]: round(r["ratio"], 3) for r in table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
