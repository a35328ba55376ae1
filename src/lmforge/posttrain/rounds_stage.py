"""Recipe stages "rejection" and "rounds".

"rejection": best-of-n sampling from the run's latest model before this stage (or
`rejection.policy`), scored by the run's reward model (or `rejection.reward_model`), into
run_dir/rejection/<name>/ (sft.jsonl, pairs.jsonl, scored.jsonl, samples.json, stats.json). Its
report section: the reward figures, the counts, sample best and worst answers.

"rounds": iterated rounds (posttrain/rounds.py) from the run's latest model before this stage (or
`rounds.base`) with the run's reward model (or `rounds.reward_model`), the recipe's [sft] / [dpo] /
[rl] / [rm] sections under the per-round overrides, into run_dir/rounds/ (round_N/..., latest,
final.json). Its report section: per round the samples' reward figures, the policy's greedy
held-out reward, the training's headline figure; the final policy's held-out reward.

Registration (recipe.STAGES):

    "rejection": StageSpec("lmforge.posttrain.rejection:RejectionConfig", "lmforge.posttrain.rounds_stage:run_rejection_stage", "rejection", ("sft", "rm")),
    "rounds": StageSpec("lmforge.posttrain.rounds:RoundsConfig", "lmforge.posttrain.rounds_stage:run_rounds_stage", "rounds", ("sft", "rm")),
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import InputError
from lmforge.recipe import StageContext, StageResult


def latest_model_before(ctx: StageContext, stage: str) -> Path:
    """The run's newest model from the model-producing stages listed before `stage` in run.stages
    (last first), else its sft/ directory. InputError when there is none."""
    from lmforge.model.io import MODEL_STAGES, resolve_model

    stages = list(ctx.run.stages)
    before = stages[: stages.index(stage)] if stage in stages else stages
    for s in reversed(before):
        d = ctx.run_dir / MODEL_STAGES[s] if s in MODEL_STAGES else None
        if d is not None and d.exists():
            try:
                resolve_model(d)
            except InputError:
                continue
            return d
    d = ctx.run_dir / "sft"
    if not d.exists():
        raise InputError(f"{stage}: no model to sample from in {d}: run the sft stage first, or set {stage}."
                         f"{'policy' if stage == 'rejection' else 'base'}")
    return d


def _reward_model(ctx: StageContext, path: str, section: str) -> Path:
    if path:
        return ctx.resolve(path)
    rm = ctx.run_dir / "rm"
    if not rm.exists():
        raise InputError(f"{section}: the run has no reward model in {rm}: run the rm stage first, or set "
                         f"{section}.reward_model")
    return rm


def run_rejection_stage(ctx: StageContext) -> StageResult:
    from lmforge.posttrain.rejection import rejection_sample

    cfg = ctx.cfg
    seed = cfg.seed if cfg.seed is not None else ctx.seed
    policy = ctx.resolve(cfg.policy) if cfg.policy else latest_model_before(ctx, "rejection")
    rm = _reward_model(ctx, cfg.reward_model, "rejection")
    out = ctx.out / (cfg.name or ctx.run.name)
    res = rejection_sample(cfg, out, policy=policy, reward_model=rm, seed=seed,
                           tokenizer=ctx.resolve(cfg.tokenizer) if cfg.tokenizer else None, resolve=ctx.resolve, force=ctx.force)
    rel = lambda p: _relpath(p, ctx.run_dir.root)  # noqa: E731
    s = res.stats
    counts = {k: _r(s.get(k)) for k in ("prompts", "samples", "mean_reward", "mean_best", "mean_worst", "sft_examples", "pairs",
                                        "dropped_margin", "identical", "heldout_greedy_reward")}
    counts.update(sft=rel(res.sft_path), pairs_file=rel(res.pairs_path))
    return StageResult(counts=counts, report=rejection_report(res, cfg, rel))


def run_rounds_stage(ctx: StageContext) -> StageResult:
    from lmforge.posttrain.rounds import run_rounds

    cfg = ctx.cfg
    seed = cfg.seed if cfg.seed is not None else ctx.seed
    base = ctx.resolve(cfg.base) if cfg.base else latest_model_before(ctx, "rounds")
    rm = _reward_model(ctx, cfg.reward_model, "rounds")
    sections = {k: ctx.recipe.get(k, {}) for k in ("sft", "dpo", "rl", "rm")}
    res = run_rounds(cfg, ctx.out, base=base, reward_model=rm, seed=seed, sections=sections, resolve=ctx.resolve,
                     force=ctx.force)
    rel = lambda p: _relpath(p, ctx.run_dir.root)  # noqa: E731
    counts = {
        "rounds": len(res.rounds), "train": res.train,
        "mean_best": [_r(i["rejection"].get("mean_best")) for i in res.rounds],
        "heldout_greedy_reward": [_r(i["rejection"].get("heldout_greedy_reward")) for i in res.rounds]
        + [_r(res.final_heldout_reward)],
        "skipped_rounds": sum(1 for i in res.rounds if i.get("skipped")),
        "final_model": rel(res.final_model) if res.final_model else None,
    }
    return StageResult(counts=counts, report=rounds_report(res, cfg, rel))


# ---- report sections ---------------------------------------------------------------------------


def _relpath(p, root: Path) -> str:
    try:
        return Path(p).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return str(p)


def _r(v, nd: int = 4):
    return round(float(v), nd) if isinstance(v, float) else v


def _fmt(v, nd: int = 3) -> str:
    return "-" if v is None else f"{v:,.{nd}f}"


def _cell(text) -> str:
    return str(text if text is not None else "-").replace("\n", " ⏎ ").replace("|", "\\|")


def rejection_report(res, cfg, rel) -> str:
    s = res.stats
    too_long = f" ({s['too_long']} too long for the context, skipped)" if s.get("too_long") else ""
    lines = [
        f"Best-of-{cfg.n} from `{res.policy}` (temperature {cfg.temperature:g}, at most {cfg.max_new_tokens} new tokens), "
        f"scored by the reward model `{res.reward_model.rsplit(':', 1)[0]}`; prompts: {s.get('source', '')}{too_long}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| prompts / samples | {s.get('prompts', 0):,} / {s.get('samples', 0):,} |",
        f"| mean reward of all samples | {_fmt(s.get('mean_reward'))} |",
        f"| mean best-of-{cfg.n} reward | {_fmt(s.get('mean_best'))} |",
        f"| mean worst-of-{cfg.n} reward | {_fmt(s.get('mean_worst'))} |",
        f"| held-out greedy answers' mean reward ({s.get('heldout_prompts', 0)} prompts) | {_fmt(s.get('heldout_greedy_reward'))} |",
        f"| SFT examples (best-of-n) | {s.get('sft_examples', 0):,} (`{rel(res.sft_path)}`) |",
        f"| DPO pairs kept | {s.get('pairs', 0):,} (`{rel(res.pairs_path)}`) |",
        f"| pairs dropped: margin <= {cfg.min_margin:g} / identical / no non-empty answer | "
        f"{s.get('dropped_margin', 0)} / {s.get('identical', 0)} / {s.get('no_answer', 0)} |",
        f"| empty samples / cut at max_new_tokens | {s.get('empty', 0)} / {s.get('length_stops', 0)} |",
    ]
    if s.get("nonfinite_scores"):
        lines.append(f"| non-finite scores (left out) | {s['nonfinite_scores']} |")
    if res.resumed_chunks:
        lines.append(f"| chunks read back from an interrupted run | {res.resumed_chunks} |")
    lines += _samples_lines(res.samples[:4])
    return "\n".join(lines) + "\n"


def _samples_lines(samples: list[dict]) -> list[str]:
    if not samples:
        return []
    out = ["", "Samples (best and worst of n, with their rewards):", ""]
    for smp in samples:
        out.append(f"- **{_cell(smp['prompt'])}** → best ({_fmt(smp.get('best_reward'))}): {_cell(smp.get('best'))}; "
                   f"worst ({_fmt(smp.get('worst_reward'))}): {_cell(smp.get('worst'))}")
    return out


def _train_cell(kind: str, t: dict) -> str:
    steps = t.get("steps")
    resumed = f", resumed at step {t['resumed_from']}" if t.get("resumed_from") is not None else ""
    if kind == "dpo":
        return (f"DPO {steps} steps on {t.get('pairs')} pairs: held-out preference accuracy "
                f"{_fmt(t.get('heldout_accuracy_before'))} → {_fmt(t.get('heldout_accuracy'))}{resumed}")
    if kind == "sft":
        return f"SFT {steps} steps on {t.get('examples')} examples: final loss {_fmt(t.get('final_loss'), 4)}{resumed}"
    return (f"RL {steps} steps: last rollout reward {_fmt(t.get('reward_mean'))}, held-out reward "
            f"{_fmt(t.get('heldout_reward_before'))} → {_fmt(t.get('heldout_reward'))}{resumed}")


def rounds_report(res, cfg, rel) -> str:
    what = {"dpo": "DPO on the best/worst pairs", "sft": "SFT on the best-of-n answers", "rl": "RL with the reward model"}[res.train]
    retrain = "; the reward model retrained from the current policy at the start of each round" if cfg.retrain_rm else ""
    loosely = " (scored by each round's own reward model, so rounds compare only loosely)" if cfg.retrain_rm else ""
    lines = [
        f"{len(res.rounds)} round(s) of rejection sampling (best-of-{cfg.n}) then {what}, each from the previous round's "
        f"policy{retrain}. Held-out reward: the mean reward-model score of the policy's greedy answers to the same held-out "
        f"prompts{loosely}.",
        "",
        "| round | samples | mean reward | best-of-n | worst-of-n | pairs / SFT examples | policy's held-out reward | training | model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for info in res.rounds:
        s = info.get("rejection", {})
        skipped = " (done before)" if info.get("skipped") else ""
        lines.append(
            f"| {info['round']}{skipped} | {s.get('samples', 0):,} | {_fmt(s.get('mean_reward'))} | {_fmt(s.get('mean_best'))} | "
            f"{_fmt(s.get('mean_worst'))} | {s.get('pairs', 0):,} / {s.get('sft_examples', 0):,} | "
            f"{_fmt(s.get('heldout_greedy_reward'))} | {_cell(_train_cell(res.train, info.get('train', {})))} | "
            f"`{rel(res.out_dir / info['model'])}` |")
    lines.append(f"| final | | | | | | {_fmt(res.final_heldout_reward)} | | `{rel(res.final_model) if res.final_model else '-'}` |")
    lines += ["", f"The newest round's model is named by `{rel(res.out_dir / 'latest')}`: `lmforge generate` (and every other "
                  f"consumer) loads it from the `{rel(res.out_dir)}` directory."]
    last = res.rounds[-1] if res.rounds else None
    if last is not None:
        from lmforge.rundir import read_json

        lines += _samples_lines((read_json(res.out_dir / f"round_{last['round']}" / "data" / "samples.json", []) or [])[:3])
    if res.final_answers:
        lines += ["", "The final policy's greedy held-out answers (reward):", ""]
        for a in res.final_answers[:4]:
            lines.append(f"- **{_cell(a['prompt'])}** → {_cell(a['completion'])} ({_fmt(a.get('reward'))})")
    return "\n".join(lines) + "\n"


__all__ = ["run_rejection_stage", "run_rounds_stage", "rejection_report", "rounds_report", "latest_model_before"]
