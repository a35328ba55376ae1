"""The recipe's eval stage: evaluate the run's checkpoints on the configured tasks.

Reads checkpoints/<run>/step_N/ (pretrain stage), tokenizer/ (tokenizer stage), corpus/ (data
stage; held-out documents for perplexity and cloze) and tokens/val (validation documents).
Writes eval/<checkpoint>/<task>.json, eval/summary.json, eval/eval.png and the report section.
A (checkpoint, task) result already on disk is kept, so a killed stage resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import InputError
from lmforge.eval import builtin, harness
from lmforge.eval.config import EvalConfig
from lmforge.recipe import StageContext, StageResult


def resolve_docs(cfg: EvalConfig, resolve, corpus_dir: Path | None) -> list[Path]:
    if cfg.docs:
        paths = [resolve(p) for p in cfg.docs]
        for p in paths:
            if not p.exists():
                raise InputError(f"eval.docs: {p} not found")
        return paths
    if corpus_dir is not None and any(corpus_dir.glob("*.jsonl.zst")):
        return [corpus_dir]
    return builtin.default_doc_paths()


def run_evaluation(cfg: EvalConfig, *, checkpoints: list[tuple[str, Path]], tok_dir: Path, docs: list[Path],
                   out: Path, seed: int, tokens_dir: Path | None = None, resume: bool = True) -> tuple[dict, str]:
    """Evaluate and return (summary, markdown report). Shared by the stage and `lmforge eval`."""
    tok = harness.load_tok(tok_dir)
    tasks = harness.build_tasks(
        cfg.tasks, docs=docs, dictionary=Path(cfg.dictionary) if cfg.dictionary else None, limit=cfg.limit, seed=seed,
        heldout_per_mille=cfg.heldout_per_mille, docs_per_source=cfg.docs_per_source,
    )
    if tokens_dir is not None and cfg.val_docs and "perplexity" in cfg.tasks:
        val = builtin.val_token_docs(tokens_dir, tok, cfg.val_docs)
        for t in tasks:
            if isinstance(t, tuple) and val:
                t[1]["val"] = val
    summary = harness.evaluate_checkpoints(
        checkpoints, tok, tasks, out, device=cfg.device, batch_tokens=cfg.batch_tokens, bootstrap=cfg.bootstrap,
        seed=seed, resume=resume,
    )
    lines = [
        f"Checkpoints: {len(checkpoints)}; tasks: {', '.join(cfg.tasks)}; held-out documents from "
        f"{', '.join(str(d) for d in docs)}. Values are mean ± bootstrap standard error "
        "(bpb = bits per UTF-8 byte, lower is better; acc* = accuracy, higher is better).",
        "",
        harness.summary_table(summary),
    ]
    last = summary.get(checkpoints[-1][0], {})
    randoms = {t: r["random"] for t, r in last.items() if r.get("random")}
    if randoms:
        lines += ["", "Random-guess baselines: " + ", ".join(f"{k} {v:.3f}" for k, v in randoms.items())]
    if cfg.plots:
        png = harness.plot_summary(summary, out / "eval.png")
        if png:
            lines += ["", f"![evaluation over checkpoints]({out.name}/eval.png)"]
    return summary, "\n".join(lines) + "\n"


def run_stage(ctx: StageContext) -> StageResult:
    cfg: EvalConfig = ctx.cfg
    ck_dir = ctx.resolve(cfg.checkpoint_dir) if cfg.checkpoint_dir else ctx.run_dir.checkpoints
    checkpoints = harness.find_checkpoints(ck_dir, cfg.checkpoints)
    tok_dir = ctx.resolve(cfg.tokenizer) if cfg.tokenizer else ctx.run_dir.tokenizer
    docs = resolve_docs(cfg, ctx.resolve, ctx.run_dir.corpus)
    seed = ctx.seed if cfg.seed is None else cfg.seed
    summary, report = run_evaluation(cfg, checkpoints=checkpoints, tok_dir=tok_dir, docs=docs, out=ctx.out, seed=seed,
                                     tokens_dir=ctx.run_dir.tokens, resume=not ctx.force)
    last = summary.get(checkpoints[-1][0], {})
    counts = {"checkpoints": len(checkpoints), "tasks": len(cfg.tasks)}
    for task, r in last.items():
        m, v = harness.headline(task, r)
        counts[f"{task}_{m}"] = round(v, 4)
    return StageResult(counts=counts, report=report)
