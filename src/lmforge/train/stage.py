"""Recipe stage "pretrain": reads run_dir/tokens and run_dir/tokenizer, trains, and writes
run_dir/checkpoints/<name>/ (step_*/, latest, metrics.jsonl, loss.png); its report section
has the headline figures, the loss plot and sample generations."""

from __future__ import annotations

import dataclasses

from lmforge.recipe import StageContext, StageResult
from lmforge.recipe import fmt as _fmt
from lmforge.recipe import rounded as _r


def run_stage(ctx: StageContext) -> StageResult:
    from lmforge.train.loop import train

    cfg = ctx.cfg
    if cfg.seed is None:
        cfg = dataclasses.replace(cfg, seed=ctx.seed)
    if ctx.force:
        cfg = dataclasses.replace(cfg, resume=False)
    name = cfg.name or ctx.run.name
    out = ctx.out / name
    tokenizer_dir = ctx.run_dir.tokenizer
    res = train(cfg, ctx.run_dir.tokens, out, tokenizer_dir=tokenizer_dir if tokenizer_dir.is_dir() else None)
    counts = {
        "steps": res.steps,
        "tokens": res.tokens,
        "params": res.params,
        "final_loss": _r(res.final_loss),
        "val_loss": _r(res.val_loss),
        "val_bpb": _r(res.val_bpb),
        "tokens_per_s": _r(res.tokens_per_s, 1),
        "mfu": _r(res.mfu, 5),
        "checkpoint": str(res.checkpoint.relative_to(ctx.run_dir.root)) if res.checkpoint else None,
    }
    return StageResult(counts=counts, report=report_markdown(res, cfg, ctx, name))


def report_markdown(res, cfg, ctx: StageContext, name: str) -> str:
    rel = lambda p: p.relative_to(ctx.run_dir.root).as_posix()  # noqa: E731
    mc = res.model_config
    lines = [
        f"Model `{cfg.model.preset}`: {res.params / 1e6:.2f}M parameters ({mc['n_layers']} layers, d_model {mc['d_model']}, "
        f"{mc['n_heads']} heads / {mc['n_kv_heads']} kv heads, vocab {mc['vocab_size']}, context {mc['max_seq_len']}); "
        f"optimizer {cfg.optimizer}, schedule {cfg.schedule}, packing {cfg.packing}.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| steps | {res.steps:,} |",
        f"| tokens seen | {res.tokens:,} |",
        f"| final train loss | {_fmt(res.final_loss)} |",
        f"| validation loss | {_fmt(res.val_loss)} |",
        f"| validation bits per byte | {_fmt(res.val_bpb)} |",
        f"| throughput (last window) | {_fmt(res.tokens_per_s, 0)} tokens/s |",
        f"| MFU | {_fmt(100 * res.mfu if res.mfu is not None else None, 2)} % (peak: {res.peak_flops_source}) |",
        f"| wall time | {res.wall_time_s:.1f} s |",
        f"| checkpoint | `{rel(res.checkpoint) if res.checkpoint else '-'}` |",
    ]
    if res.resumed_from is not None:
        lines.append(f"| resumed from step | {res.resumed_from} |")
    if res.plot_path:
        lines += ["", f"![loss curve]({rel(res.plot_path)})"]
    if res.samples:
        lines += ["", "Sample generations (temperature "
                  f"{cfg.sample_temperature}, {cfg.sample_tokens} tokens):", ""]
        for s in res.samples:
            text = (s["prompt"] + s["completion"]).replace("\n", " ⏎ ").replace("|", "\\|")
            lines.append(f"- `{s['prompt']}` → {text}")
    lines += ["", f"Metrics: `{rel(res.metrics_path)}`"]
    return "\n".join(lines) + "\n"


