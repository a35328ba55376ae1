"""Recipe stage "rl": on-policy RL (GRPO / RLOO / REINFORCE / PPO, posttrain/rl.py) from the run's SFT
model (or `rl.base`), on the built-in which-word task (or `rl.data` with `rl.reward`); writes
run_dir/rl/<name>/ (step_*/, latest, metrics.jsonl, loss.png, reward.png, data/). `reward = "rm"`
scores with the run's own reward model (run_dir/rm/). Its report section: the set-up, held-out
task accuracy (greedy) before and after, the last rollout's reward, KL and response length, the
reward curve, sample answers.

Registration (recipe.STAGES):

    "rl": StageSpec("lmforge.posttrain.rl:RLConfig", "lmforge.posttrain.rl_stage:run_stage", "rl", ("sft",)),
"""

from __future__ import annotations

import dataclasses

from lmforge.errors import InputError
from lmforge.recipe import StageContext, StageResult
from lmforge.recipe import fmt as _fmt
from lmforge.recipe import rounded as _r


def run_stage(ctx: StageContext) -> StageResult:
    from lmforge.posttrain.rl import run_rl

    cfg = ctx.cfg
    if ctx.force:
        cfg = dataclasses.replace(cfg, resume=False)
    if cfg.reward.strip() == "rm":
        rm = ctx.run_dir / "rm"
        if not rm.exists():
            raise InputError(f"rl.reward = 'rm' but the run has no reward model in {rm}: run the rm stage first, or "
                             "give rl.reward = 'rm:PATH'")
        cfg = dataclasses.replace(cfg, reward=f"rm:{rm}")
    seed = cfg.seed if cfg.seed is not None else ctx.seed
    base = ctx.resolve(cfg.base) if cfg.base else ctx.run_dir / "sft"
    if not cfg.base and not base.exists():
        raise InputError(f"rl: no SFT model in {base}: run the sft stage first, or set rl.base")
    name = cfg.name or ctx.run.name
    res = run_rl(cfg, ctx.out / name, base=base, seed=seed, tokenizer=ctx.resolve(cfg.tokenizer) if cfg.tokenizer else None,
                 resolve=ctx.resolve)
    rel = lambda p: p.relative_to(ctx.run_dir.root).as_posix()  # noqa: E731
    rec = res.last_record
    counts = {
        "algorithm": res.algorithm, "steps": res.steps, "rollouts": res.rollouts,
        "train_prompts": res.data_stats.get("train_prompts"), "heldout_prompts": res.data_stats.get("heldout_prompts"),
        "accuracy_before": _r(res.accuracy_before), "accuracy_after": _r(res.accuracy_after),
        "reward_mean": _r(rec.get("reward_mean")), "kl": _r(rec.get("kl")), "reward_errors": res.reward_errors,
        "checkpoint": rel(res.checkpoint) if res.checkpoint else None,
    }
    return StageResult(counts=counts, report=report_markdown(res, cfg, rel))


def report_markdown(res, cfg, rel) -> str:
    """The stage's report section (paths relative to the run directory through `rel`)."""
    s, rec = res.data_stats, res.last_record
    algo = {"grpo": "GRPO (group-normalised advantages" + ("" if cfg.scale_rewards else ", no std scaling") + ")",
            "rloo": "RLOO (leave-one-out baseline)",
            "reinforce": f"REINFORCE ({'moving-average' if cfg.baseline == 'ema' else 'group-mean'} baseline)",
            "ppo": f"PPO (value head, GAE gamma {cfg.gamma:g} lambda {cfg.lam:g}, vf_coef {cfg.vf_coef:g})"}[res.algorithm]
    too_long = f", {s['too_long']} too long for the context" if s.get("too_long") else ""
    failed = (f" ({res.reward_errors} failed calls, scored as reward_on_error = {cfg.reward_on_error})"
              if res.reward_errors else "")
    kl = f"KL penalty {cfg.kl_coef:g} to the base model" if cfg.kl_coef > 0 else "no KL penalty"
    lines = [
        f"Policy from `{res.base}`; {algo}; {cfg.prompts_per_step} prompts x {cfg.group_size} samples per rollout "
        f"(temperature {cfg.temperature:g}, at most {cfg.max_new_tokens} new tokens), {cfg.ppo_epochs} epoch(s) x "
        f"{cfg.minibatches} minibatch(es) per rollout, clip {cfg.clip_eps:g}, {kl}; optimizer {cfg.optimizer} (lr {cfg.lr:g}).",
        "",
        f"Prompts: {s.get('source', '')}: {s.get('train_prompts', 0):,} for training, {s.get('heldout_prompts', 0):,} held out"
        f"{too_long}. Reward: `{res.reward}`{failed}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| held-out task accuracy before RL (greedy) | {_fmt(res.accuracy_before, 3)} |",
        f"| held-out task accuracy after RL (greedy) | {_fmt(res.accuracy_after, 3)} |",
        f"| steps / rollouts | {res.steps:,} / {res.rollouts:,} |",
        f"| last rollout reward (mean +- std) | {_fmt(rec.get('reward_mean'), 3)} +- {_fmt(rec.get('reward_std'), 3)} |",
        f"| KL to the reference (last step) | {_fmt(rec.get('kl'), 4)} |",
        f"| response length (tokens, last rollout) | {_fmt(rec.get('response_len'), 1)} |",
        f"| clip fraction (last step) | {_fmt(rec.get('clip_frac'), 3)} |",
    ]
    if res.algorithm == "ppo":
        lines.append(f"| value loss / explained variance (last step) | {_fmt(rec.get('value_loss'), 4)} / "
                     f"{_fmt(rec.get('explained_var'), 3)} |")
    lines += [f"| rollout samples/s (generation) | {_fmt(rec.get('samples_per_s'), 1)} |",
              f"| wall time | {res.wall_time_s:.1f} s |",
              f"| checkpoint | `{rel(res.checkpoint) if res.checkpoint else '-'}` |"]
    if res.resumed_from is not None:
        lines.append(f"| resumed from step | {res.resumed_from} |")
    if res.curve_path:
        lines += ["", f"![RL reward]({rel(res.curve_path)})"]
    if res.samples:
        what = ("Held-out answers after RL (greedy, through the chat template):" if res.accuracy_after is not None
                else "Answers from the last rollout:")
        lines += ["", what, ""]
        for smp in res.samples:
            ans = str(smp.get("completion", "")).replace("\n", " ⏎ ").replace("|", "\\|")
            want = f" (expected: {smp['answer']})" if smp.get("answer") else ""
            lines.append(f"- **{smp['prompt']}** → {ans}{want}")
    return "\n".join(lines) + "\n"


__all__ = ["run_stage", "report_markdown"]
