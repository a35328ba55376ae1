"""CLI: `lmforge eval`, `lmforge export hf`, `lmforge ablate`, `lmforge scale`."""

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

    e = sub.add_parser("export", help="export a checkpoint to another format")
    esub = e.add_subparsers(dest="format", metavar="FORMAT")
    h = esub.add_parser("hf", help="Hugging Face transformers checkpoint (Llama, or Qwen3 when the model uses QK-norm)")
    h.add_argument("checkpoint", help="model directory with model.safetensors + config.json (e.g. checkpoints/demo/step_000200)")
    h.add_argument("out", help="output directory")
    h.add_argument("--tokenizer", help="tokenizer directory (default: found next to / above the checkpoint)")
    h.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    h.add_argument("--check", action="store_true", help="load the export with transformers and compare logits")
    h.set_defaults(func=_cmd_export_hf)
    e.set_defaults(func=lambda a: (e.print_help(), 1)[1])

    a = sub.add_parser("ablate", help="data-quality ablation: train one small model per corpus x seed, rank tasks by signal")
    a.add_argument("config", nargs="?", help="TOML file with an [ablate] section (override keys with --ablate.KEY VALUE)")
    a.set_defaults(func=_cmd_ablate)

    s = sub.add_parser("scale", help="scaling laws: IsoFLOP grid of tiny models, or fits from existing runs' metrics.jsonl")
    s.add_argument("--tokens", help="tokens/ directory to train the grid on (e.g. runs/demo/tokens)")
    s.add_argument("--runs", nargs="+", help="fit from existing runs instead: checkpoint directories with metrics.jsonl")
    s.add_argument("--widths", help="comma-separated d_model values of the grid (default 32,48,64,96,128)")
    s.add_argument("--budgets", help="comma-separated training FLOP budgets (default 3e11,1e12,3e12)")
    s.add_argument("--target", type=float, help="extrapolate to this many FLOPs (default 1e21)")
    s.add_argument("--out", help="output directory (default runs/scale)")
    s.add_argument("--config", help="TOML file with a [scale] section (keys of lmforge.plan.scaling.ScaleConfig)")
    s.set_defaults(func=_cmd_scale)


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


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from lmforge.errors import InputError
    from lmforge.eval import harness
    from lmforge.eval.export_hf import compare_logits, export_hf

    ck = Path(args.checkpoint)
    if not (ck / "model.safetensors").is_file():
        found = harness.find_checkpoints(ck, "latest")
        ck = found[-1][1]
    tok = Path(args.tokenizer) if args.tokenizer else harness.guess_tokenizer(ck)
    if args.tokenizer and tok is not None and not tok.exists():
        raise InputError(f"--tokenizer {tok} not found")
    out = export_hf(ck, args.out, tok, args.dtype)
    print(f"exported {ck} -> {out}" + ("" if tok else " (no tokenizer found: pass --tokenizer to include one)"))
    if args.check:
        diff = compare_logits(ck, out)
        print(f"max |logit difference| lmforge vs transformers: {diff:.3g}")
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from lmforge.eval.ablate import load_config, run_ablation

    cfg, base = load_config(args.config, args.overrides)
    res = run_ablation(cfg, base)
    out = (base / cfg.out) if not Path(cfg.out).is_absolute() else Path(cfg.out)
    print((out / "ablation.md").read_text())
    print(f"results: {out}/ablation.json, ablation.md, ablation_curves.png, ablation_signal.png ({len(res['tasks'])} task metrics)")
    return 0


def _floats(text: str, name: str) -> list[float]:
    from lmforge.errors import ConfigError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{name}: expected comma-separated numbers, got {text!r}") from None


def _cmd_scale(args: argparse.Namespace) -> int:
    from lmforge import config as cfgmod
    from lmforge.errors import ConfigError
    from lmforge.plan import scaling

    raw: dict = {}
    if args.config:
        doc = cfgmod.load_toml(args.config)
        raw = dict(doc.get("scale", {}))
    cfgmod.apply_overrides(raw, {k.removeprefix("scale."): v for k, v in (o.split("=", 1) for o in args.overrides) if k.startswith("scale.")})
    bad = [o for o in args.overrides if not o.startswith("scale.")]
    if bad:
        raise ConfigError(f"lmforge scale takes --scale.KEY overrides only, got --{bad[0]}")
    if args.tokens:
        raw["tokens"] = args.tokens
    if args.widths:
        raw["widths"] = [int(w) for w in _floats(args.widths, "--widths")]
    if args.budgets:
        raw["budgets"] = _floats(args.budgets, "--budgets")
    if args.target:
        raw["target_flops"] = args.target
    if args.out:
        raw["out"] = args.out
    if args.runs:
        raw.setdefault("tokens", "-")  # not used when fitting existing runs
        cfg = cfgmod.build(scaling.ScaleConfig, raw, "scale")
        budgets = raw.get("budgets") if args.budgets else None
        points = scaling.points_from_runs([Path(r) for r in args.runs], budgets)
    else:
        cfg = cfgmod.build(scaling.ScaleConfig, raw, "scale")
        points = scaling.run_grid(cfg)
    res = scaling.fit_scaling(points, cfg.target_flops)
    j, png, md = scaling.save_fit(res, points, Path(cfg.out))
    print(scaling.format_fit(res))
    print(f"\nresults: {j}, {png}, {md}")
    return 0
