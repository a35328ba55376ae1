"""`lmforge plan`: memory, FLOPs, GPU-hours and Chinchilla-optimal tokens for a model shape."""

from __future__ import annotations

import argparse
import json


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
