"""The data stage: `[data]` of a recipe -> `run_dir/corpus/` (see docs/ARTIFACTS.md).

Runs `lmforge.data.pipeline.run_pipeline` into ctx.out; a killed run resumes through the
pipeline's task markers in `corpus/.work/`. Returns headline counts for the manifest and
the report section (step table, funnel plot, sources, top domains).
"""

from __future__ import annotations

from lmforge.data.pipeline import run_pipeline
from lmforge.data.stats import plot_funnel, report_section
from lmforge.errors import InputError
from lmforge.recipe import StageContext, StageResult


def run_stage(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    if not cfg.inputs:
        raise InputError("[data] inputs is empty: list the files to read (paths or globs, or tables {path=..., source=...})")
    res = run_pipeline(cfg, ctx.out, ctx.base_dir, seed=ctx.seed, workers=cfg.executor.workers or ctx.workers)
    plot = plot_funnel(res.stats, ctx.out / "funnel.png")
    rel = f"{ctx.out.name}/funnel.png" if plot else None
    t = res.stats["totals"]
    counts = {k: t[k] for k in ("docs_read", "docs_out", "tokens_out", "chars_out", "shards", "corrupt_records")}
    return StageResult(counts=counts, report=report_section(res.stats, rel))
