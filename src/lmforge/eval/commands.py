"""CLI: `lmforge eval` (export lives in lmforge.infer.commands; ablate and scale in lmforge.plan.commands)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate checkpoints: perplexity / bits per byte, multiple choice, generative tasks")
    p.add_argument("checkpoint", help="a model directory (model.safetensors), a run's checkpoints/<name>/ folder, or a run directory")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: found next to / above the checkpoint)")
    p.add_argument("--tasks", help="comma-separated built-in tasks (perplexity, dictionary, cloze, cloze_gen) or task .toml specs")
    p.add_argument("--checkpoints", help="latest | all | comma-separated steps (default: all)")
    p.add_argument("--docs", action="append", help="corpus dir or JSONL file for perplexity / cloze (repeatable; default: the run's corpus, else the bundled sample)")
    p.add_argument("--dictionary", help="GCIDE JSONL for the dictionary task (default: the bundled sample)")
    p.add_argument("--limit", type=int, help="examples per task (default 200)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="output directory (default: <run>/eval or ./eval)")
    p.add_argument("--force", action="store_true", help="recompute results that already exist")
    p.set_defaults(func=_cmd_eval)


def _eval_config(args: argparse.Namespace):
    from lmforge import config as cfgmod
    from lmforge.eval.config import EvalConfig

    raw: dict = {}
    if args.tasks:
        raw["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for k in ("checkpoints", "dictionary", "limit", "device", "docs"):
        v = getattr(args, k)
        if v is not None:
            raw[k] = v
    cfgmod.apply_overrides(raw, {k.removeprefix("eval."): v for k, v in (o.split("=", 1) for o in args.overrides)
                                 if k.startswith("eval.")})
    bad = [o for o in args.overrides if not o.startswith("eval.")]
    if bad:
        from lmforge.errors import ConfigError

        raise ConfigError(f"lmforge eval takes --eval.KEY overrides only, got --{bad[0]}")
    return cfgmod.build(EvalConfig, raw, "eval")


def _cmd_eval(args: argparse.Namespace) -> int:
    from lmforge.errors import InputError
    from lmforge.eval import harness
    from lmforge.eval.stage import resolve_docs, run_evaluation

    cfg = _eval_config(args)
    path = Path(args.checkpoint)
    run_dir = path if (path / "checkpoints").is_dir() else None
    ck_root = run_dir / "checkpoints" if run_dir else path
    checkpoints = harness.find_checkpoints(ck_root, cfg.checkpoints)
    tok_dir = Path(args.tokenizer) if args.tokenizer else harness.guess_tokenizer(checkpoints[0][1])
    if tok_dir is None:
        raise InputError(f"no tokenizer found next to or above {checkpoints[0][1]}; pass --tokenizer")
    corpus = run_dir / "corpus" if run_dir else None
    docs = resolve_docs(cfg, lambda p: Path(p), corpus)
    out = Path(args.out) if args.out else (run_dir / "eval" if run_dir else Path("eval"))
    summary, report = run_evaluation(cfg, checkpoints=checkpoints, tok_dir=tok_dir, docs=docs, out=out, seed=cfg.seed or 0,
                                     tokens_dir=run_dir / "tokens" if run_dir else None, resume=not args.force)
    print(harness.summary_table(summary))
    print(f"\nresults: {out}/<checkpoint>/<task>.json, {out}/summary.json")
    return 0
