"""Recipe stages "rm" and "dpo": train a reward model, or align with DPO, starting from the run's
SFT model (or `<section>.base`), on the built-in dictionary pairs (or `<section>.data`); write
run_dir/rm/<name>/ and run_dir/dpo/<name>/ (step_*/, latest, metrics.jsonl, loss.png,
data/heldout_pairs.jsonl, data/stats.json; DPO also ref_logps.pt). Their report sections: the
data counts, held-out pair accuracy (RM) or held-out preference accuracy and reward margins before
and after (DPO), the loss plot.

Registration (recipe.STAGES):

    "rm": StageSpec("lmforge.posttrain.rm:RMConfig", "lmforge.posttrain.pref_stages:run_rm_stage", "rm", ("sft",)),
    "dpo": StageSpec("lmforge.posttrain.dpo:DPOConfig", "lmforge.posttrain.pref_stages:run_dpo_stage", "dpo", ("sft",)),
"""

from __future__ import annotations

import dataclasses

from lmforge.errors import InputError
from lmforge.recipe import StageContext, StageResult
from lmforge.recipe import fmt as _fmt
from lmforge.recipe import rounded as _r


def _base(ctx: StageContext, cfg, section: str):
    """`<section>.base` resolved, else the run's SFT model directory (resolve_model takes it)."""
    if cfg.base:
        return ctx.resolve(cfg.base)
    base = ctx.run_dir / "sft"
    if not base.exists():
        raise InputError(f"{section}: no SFT model in {base}: run the sft stage first, or set {section}.base")
    return base


def _prepare(ctx: StageContext, section: str):
    cfg = ctx.cfg
    if ctx.force:
        cfg = dataclasses.replace(cfg, resume=False)
    seed = cfg.seed if cfg.seed is not None else ctx.seed
    return cfg, seed, _base(ctx, cfg, section), cfg.name or ctx.run.name


def run_rm_stage(ctx: StageContext) -> StageResult:
    from lmforge.posttrain.rm import run_rm

    cfg, seed, base, name = _prepare(ctx, "rm")
    res = run_rm(cfg, ctx.out / name, base=base, seed=seed, tokenizer=ctx.resolve(cfg.tokenizer) if cfg.tokenizer else None,
                 resolve=ctx.resolve)
    rel = lambda p: p.relative_to(ctx.run_dir.root).as_posix()  # noqa: E731
    counts = {
        "steps": res.steps, "final_loss": _r(res.final_loss), "trainable_params": res.trainable_params,
        "pairs": res.data_stats.get("examples"), "heldout_pairs": res.data_stats.get("heldout_examples"),
        "heldout_accuracy": _r(res.heldout_accuracy), "checkpoint": rel(res.checkpoint) if res.checkpoint else None,
    }
    return StageResult(counts=counts, report=rm_report(res, cfg, rel))


def run_dpo_stage(ctx: StageContext) -> StageResult:
    from lmforge.posttrain.dpo import run_dpo

    cfg, seed, base, name = _prepare(ctx, "dpo")
    res = run_dpo(cfg, ctx.out / name, base=base, seed=seed, tokenizer=ctx.resolve(cfg.tokenizer) if cfg.tokenizer else None,
                  resolve=ctx.resolve)
    rel = lambda p: p.relative_to(ctx.run_dir.root).as_posix()  # noqa: E731
    counts = {
        "steps": res.steps, "first_loss": _r(res.first_loss), "final_loss": _r(res.final_loss),
        "trainable_params": res.trainable_params, "pairs": res.data_stats.get("examples"),
        "heldout_pairs": res.data_stats.get("heldout_examples"),
        "heldout_accuracy_before": _r(res.before.get("heldout_accuracy")), "heldout_accuracy": _r(res.after.get("heldout_accuracy")),
        "heldout_margin": _r(res.after.get("heldout_margin")), "checkpoint": rel(res.checkpoint) if res.checkpoint else None,
    }
    return StageResult(counts=counts, report=dpo_report(res, cfg, rel))


# ---- report sections ---------------------------------------------------------------------------


def _mode(cfg) -> str:
    if not cfg.lora.r:
        return "full fine-tuning"
    mode = f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha:g} on {', '.join(cfg.lora.targets)}"
    return (f"QLoRA ({cfg.lora.quantize} base), " + mode) if cfg.lora.quantize != "none" else mode


def _data_line(s: dict) -> str:
    kinds = ", ".join(f"{s[f'kind_{k}']:,} {k}" for k in ("other", "truncated", "sampled") if s.get(f"kind_{k}"))
    malformed = s.get("read_malformed", 0) + s.get("read_heldout_malformed", 0)
    identical = s.get("read_identical", 0) + s.get("identical", 0) + s.get("sampled_identical", 0)
    return (f"Data: {s.get('source', '')}{f' ({kinds})' if kinds else ''}. {s.get('examples', 0):,} training pairs, "
            f"{s.get('heldout_examples', 0):,} held out; {s.get('truncated', 0) + s.get('heldout_truncated', 0)} truncated, "
            f"{s.get('dropped', 0) + s.get('heldout_dropped', 0)} dropped as too long, {identical} identical and "
            f"{malformed} malformed pairs skipped.")


def _tail(res, rel, title: str) -> list[str]:
    lines = [f"| wall time | {res.wall_time_s:.1f} s |", f"| checkpoint | `{rel(res.checkpoint) if res.checkpoint else '-'}` |"]
    if res.resumed_from is not None:
        lines.append(f"| resumed from step | {res.resumed_from} |")
    if res.plot_path:
        lines += ["", f"![{title}]({rel(res.plot_path)})"]
    return lines


def rm_report(res, cfg, rel) -> str:
    lines = [
        f"Reward model on `{res.base}` (scalar head on the last response token's hidden state, Bradley–Terry loss"
        f"{f', margin {cfg.margin:g}' if cfg.margin else ''}{f', centering {cfg.center:g}' if cfg.center else ''}); "
        f"{_mode(cfg)}: {res.trainable_params:,} trainable of {res.total_params:,} parameters; lr {cfg.lr:g} ({cfg.schedule}).",
        "",
        _data_line(res.data_stats),
        "",
        "| figure | value |",
        "|---|---|",
        f"| steps | {res.steps:,} |",
        f"| final train loss | {_fmt(res.final_loss)} |",
        f"| train pair accuracy (last step) | {_fmt(res.train_accuracy, 3)} |",
        f"| held-out pair accuracy, before (zero head) | {_fmt(res.heldout_accuracy_before, 3)} |",
        f"| held-out pair accuracy, after | {_fmt(res.heldout_accuracy, 3)} |",
        f"| held-out mean reward margin (chosen - rejected) | {_fmt(res.heldout_margin, 3)} |",
        *_tail(res, rel, "reward model loss"),
    ]
    return "\n".join(lines) + "\n"


def dpo_report(res, cfg, rel) -> str:
    b, a = res.before, res.after
    loss = "DPO (sigmoid)" if cfg.loss == "sigmoid" else "IPO"
    lines = [
        f"{loss} with beta {cfg.beta:g} on `{res.base}`, {cfg.reference} reference log-probs"
        f"{' (reused from ref_logps.pt)' if res.reference_reused else ''}; {_mode(cfg)}: {res.trainable_params:,} trainable "
        f"of {res.total_params:,} parameters; lr {cfg.lr:g} ({cfg.schedule}).",
        "",
        _data_line(res.data_stats),
        "",
        "Held-out pairs: *preference accuracy* is the share with a higher implied reward beta * (log pi - log ref) for the "
        "chosen answer (a tie counts half, so the starting model reads 0.5); *log-prob preference* is the share where the "
        "model itself gives the chosen answer the higher log-probability.",
        "",
        "| figure | before (= reference) | after |",
        "|---|---|---|",
        f"| held-out preference accuracy | {_fmt(b.get('heldout_accuracy'), 3)} | {_fmt(a.get('heldout_accuracy'), 3)} |",
        f"| held-out log-prob preference | {_fmt(b.get('heldout_logp_accuracy'), 3)} | {_fmt(a.get('heldout_logp_accuracy'), 3)} |",
        f"| held-out reward margin | {_fmt(b.get('heldout_margin'), 3)} | {_fmt(a.get('heldout_margin'), 3)} |",
        f"| held-out loss | {_fmt(b.get('heldout_loss'))} | {_fmt(a.get('heldout_loss'))} |",
        "",
        "| figure | value |",
        "|---|---|",
        f"| steps | {res.steps:,} |",
        f"| train loss at step 1 (ln 2 = {0.6931:.4f} for DPO) | {_fmt(res.first_loss)} |",
        f"| final train loss | {_fmt(res.final_loss)} |",
        f"| train rewards chosen / rejected (last log) | {_fmt(res.train_record.get('rewards_chosen'), 3)} / "
        f"{_fmt(res.train_record.get('rewards_rejected'), 3)} |",
        *_tail(res, rel, f"{loss} loss"),
    ]
    if res.samples:
        lines += ["", "Sample answers (greedy, through the chat template):", ""]
        for smp in res.samples:
            ans = smp["completion"].replace("\n", " ⏎ ").replace("|", "\\|")
            lines.append(f"- **{smp['prompt']}** → {ans}")
    return "\n".join(lines) + "\n"


__all__ = ["run_rm_stage", "run_dpo_stage", "rm_report", "dpo_report"]
