"""CLI: `lmforge plan` (memory, FLOPs, GPU-hours and Chinchilla-optimal tokens for a model shape),
`lmforge ablate` (data-quality ablation, implemented in lmforge.plan.ablate) and `lmforge scale`
(IsoFLOP scaling-law fits, lmforge.plan.scaling)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="memory / FLOPs / GPU-hours / Chinchilla estimate for a model preset")
    p.add_argument("--model", default="124m", help="model preset (tiny, small, 124m, 350m, 1b, 7b, tiny-moe)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a ModelConfig field, e.g. --set n_layers=24")
    p.add_argument("--seq", type=int, help="sequence length (default: the preset's context)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--tokens", type=float, help="training tokens (default: Chinchilla-optimal, 20 per parameter)")
    p.add_argument("--gpu", default="h100")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--compute", type=float, help="a FLOP budget: also print the compute-optimal N and D")
    p.add_argument("--no-fsdp", action="store_true", help="optimizer state replicated on every device")
    p.add_argument("--checkpointing", action="store_true", help="full activation checkpointing")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run)

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


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from lmforge.config import parse_value
    from lmforge.errors import ConfigError
    from lmforge.model.config import ModelConfig, preset
    from lmforge.plan.memory import format_plan, plan

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    over = {}
    for kv in args.set:
        if "=" not in kv:
            raise ConfigError(f"--set {kv!r} must look like KEY=VALUE")
        k, v = kv.split("=", 1)
        if k not in fields:
            raise ConfigError(f"--set: unknown model field {k!r}; fields: {', '.join(sorted(fields))}")
        over[k] = parse_value(v)
    try:
        cfg = preset(args.model, **over)
        if not 0 < args.mfu <= 1:
            raise ValueError(f"--mfu must be in (0, 1], got {args.mfu}")
        p = plan(cfg, seq_len=args.seq, micro_batch=args.micro_batch, tokens=args.tokens, gpu=args.gpu, gpus=args.gpus,
                 mfu=args.mfu, fsdp=not args.no_fsdp, checkpointing=args.checkpointing, compute_budget=args.compute)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.json:
        print(json.dumps(dataclasses.asdict(p), indent=2))
    else:
        print(format_plan(p, args.model, args.gpu, args.gpus, args.mfu))
    return 0


def _cmd_ablate(args: argparse.Namespace) -> int:
    from lmforge.plan.ablate import load_config, run_ablation

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
