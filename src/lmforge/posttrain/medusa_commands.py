"""CLI: `lmforge medusa` (train Medusa heads on a frozen model).

    lmforge medusa MODEL --out DIR [--heads 3] [--steps N] [--tokens DIR | --data FILE ...]
                   [--targets data|model] [--self-distill N] [--layers 1] [--own-head] [--medusa.KEY VALUE ...]

MODEL is anything the checkpoint reader takes (a run directory, checkpoints directory, step
directory, HF folder). Training text: --tokens (token shards made with the model's tokenizer;
default: the model's run's tokens/) or --data (.txt / .jsonl[.gz|.zst] files or directories).
DIR gets checkpoints/ (resumable) and, at the end, medusa.json + medusa.safetensors, which
`lmforge generate MODEL --medusa DIR` reads.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("medusa", help="train Medusa heads (extra next-next-token heads) on a frozen model, for "
                                      "`generate --medusa`")
    s.add_argument("model", help="the model (run directory, checkpoint, step directory or HF folder)")
    s.add_argument("--out", required=True, help="output directory (checkpoints/, then medusa.json + medusa.safetensors)")
    s.add_argument("--heads", type=int, help="number of heads K (default 3): head k guesses the token k+1 places ahead")
    s.add_argument("--layers", type=int, help="residual blocks per head (default 1)")
    s.add_argument("--own-head", action="store_true", help="each head gets its own output layer instead of sharing the model's")
    s.add_argument("--steps", type=int, help="optimizer steps (default 300)")
    s.add_argument("--targets", choices=("data", "model"),
                   help="train on the text's tokens (default) or on the model's own greedy predictions (self-distillation)")
    s.add_argument("--self-distill", type=int, metavar="N",
                   help="train on N greedy continuations by the model itself of prompts from the text (self-distillation)")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--tokens", help="token shards directory (tokens/index.json); default: the model's run's tokens/")
    src.add_argument("--data", action="append", default=[], help="text file or directory (.txt, .jsonl[.gz|.zst]; repeatable)")
    s.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model's)")
    s.add_argument("--seed", type=int, default=1234)
    s.set_defaults(func=_cmd_medusa)


def _cmd_medusa(args: argparse.Namespace) -> int:
    from lmforge import config as cfgmod
    from lmforge.errors import ConfigError
    from lmforge.posttrain.medusa import MedusaTrainConfig, run_medusa

    bad = [o for o in args.overrides if not o.startswith("medusa.")]
    if bad:
        raise ConfigError(f"lmforge medusa: only --medusa.KEY overrides apply here, got --{bad[0].split('=')[0]}")
    section: dict = {}
    cfgmod.apply_overrides(section, [o[len("medusa."):] for o in args.overrides])
    for key, val in (("heads", args.heads), ("layers", args.layers), ("max_steps", args.steps), ("targets", args.targets),
                     ("self_distill", args.self_distill)):
        if val is not None:
            section[key] = val
    if args.own_head:
        section["own_head"] = True
    cfg = cfgmod.build(MedusaTrainConfig, section, "medusa")
    res = run_medusa(cfg, Path(args.out), base=args.model, tokens=args.tokens, data=args.data or None, seed=args.seed,
                     tokenizer=args.tokenizer)
    agree = ", ".join(f"head {k.rsplit('_', 1)[1]} {100 * v:.1f}%" for k, v in res.eval.items())
    loss = f"{res.final_loss:.4f}" if res.final_loss is not None else "-"
    print(f"medusa: {res.steps} steps, final loss {loss}" + (f"; agreement with the model's greedy token: {agree}" if agree else "")
          + f"; heads in {res.heads_dir}")
    return 0
