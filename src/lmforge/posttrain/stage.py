"""Recipe stage "sft": fine-tunes the run's latest pretrained model (or `sft.base`) on chat data and
writes run_dir/sft/<name>/ (step_*/, latest, metrics.jsonl, loss.png, data/); its report section
has the data counts, the headline figures, the loss plot and sample answers."""

from __future__ import annotations

import dataclasses

from lmforge.errors import InputError
from lmforge.recipe import StageContext, StageResult
from lmforge.recipe import fmt as _fmt
from lmforge.recipe import rounded as _r


def run_stage(ctx: StageContext) -> StageResult:
    from lmforge.posttrain.sft import run_sft

    cfg = ctx.cfg
    if ctx.force:
        cfg = dataclasses.replace(cfg, resume=False)
    seed = cfg.seed if cfg.seed is not None else ctx.seed
    base = ctx.resolve(cfg.base) if cfg.base else ctx.run_dir.checkpoints
    if not cfg.base and not base.exists():
        raise InputError(f"sft: no pretrained model in {base}: run the pretrain stage first, or set sft.base")
    name = cfg.name or ctx.run.name
    res = run_sft(cfg, ctx.out / name, base=base, seed=seed, tokenizer=ctx.resolve(cfg.tokenizer) if cfg.tokenizer else None,
                  resolve=ctx.resolve)
    rel = lambda p: p.relative_to(ctx.run_dir.root).as_posix()  # noqa: E731
    counts = {
        "steps": res.steps, "final_loss": _r(res.final_loss), "trainable_params": res.trainable_params,
        "examples": res.data_stats.get("examples"), "heldout": res.data_stats.get("heldout_conversations"),
        "tokens_per_s": _r(res.tokens_per_s, 1), "checkpoint": rel(res.checkpoint) if res.checkpoint else None,
    }
    return StageResult(counts=counts, report=report_markdown(res, cfg, rel))


def report_markdown(res, cfg, rel) -> str:
    s = res.data_stats
    mode = "full fine-tuning"
    if cfg.lora.r:
        mode = f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha:g} on {', '.join(cfg.lora.targets)}"
        if cfg.lora.quantize != "none":
            mode = f"QLoRA ({cfg.lora.quantize} base), " + mode
    lines = [
        f"Base model `{res.base}`; {mode}: {res.trainable_params:,} trainable of {res.total_params:,} parameters; "
        f"optimizer {cfg.optimizer} (lr {cfg.lr:g}, {cfg.schedule}), {cfg.init_optimizer} optimizer state, "
        f"packing {'on' if cfg.packing else 'off'}.",
        "",
        f"Data: {s.get('source', '')}. {s.get('task_conversations', 0):,} task conversations + "
        f"{s.get('safety_conversations', 0):,} from the safety set (ratio {cfg.safety_ratio:g}) -> "
        f"{s.get('examples', 0):,} examples, {s.get('supervised_tokens', 0):,} supervised of {s.get('tokens', 0):,} tokens; "
        f"{s.get('truncated', 0)} truncated, {s.get('dropped', 0)} dropped as too long, {s.get('no_target', 0)} with nothing "
        f"to learn, {s.get('invalid', 0) + s.get('read_malformed', 0)} malformed or invalid; {s.get('heldout_conversations', 0):,} conversations held out for the chat eval.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| steps | {res.steps:,} |",
        f"| final train loss (supervised tokens) | {_fmt(res.final_loss)} |",
        f"| throughput (last window) | {_fmt(res.tokens_per_s, 0)} tokens/s |",
        f"| supervised share of row tokens | {_fmt(100 * res.supervised_fraction if res.supervised_fraction is not None else None, 1)} % |",
        f"| wall time | {res.wall_time_s:.1f} s |",
        f"| checkpoint | `{rel(res.checkpoint) if res.checkpoint else '-'}` |",
    ]
    if res.resumed_from is not None:
        lines.append(f"| resumed from step | {res.resumed_from} |")
    if res.plot_path:
        lines += ["", f"![SFT loss]({rel(res.plot_path)})"]
    if res.samples:
        lines += ["", "Sample answers (greedy, through the chat template):", ""]
        for smp in res.samples:
            ans = smp["completion"].replace("\n", " ⏎ ").replace("|", "\\|")
            lines.append(f"- **{smp['prompt']}** → {ans}")
    return "\n".join(lines) + "\n"


