"""CLI: `lmforge train` (`lmforge generate` lives in lmforge.infer.commands).

    lmforge train RECIPE.toml [--run-dir DIR] [--pretrain.KEY VALUE ...]
        runs the recipe's pretrain stage (its tokens/ and tokenizer/ must exist in the run directory)
    lmforge train --tokens runs/x/tokens [--tokenizer runs/x/tokenizer] --out ckpts/ [--config FILE.toml] [--pretrain.KEY VALUE ...]
        trains directly on token shards; FILE.toml holds a [pretrain] section (or bare keys)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    t = sub.add_parser("train", help="pretrain a model on token shards (a recipe's pretrain stage, or --tokens DIR)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("recipe", nargs="?", help="recipe TOML whose [pretrain] stage to run")
    t.add_argument("--tokens", help="token directory (tokens/index.json + train/ val/ shards)")
    t.add_argument("--tokenizer", help="tokenizer directory (default: tokenizer/ next to --tokens, if present)")
    t.add_argument("--out", help="checkpoint directory (default: runs/train/checkpoints)")
    t.add_argument("--config", help="TOML file with a [pretrain] section (with --tokens)")
    t.add_argument("--run-dir", help="run directory (with RECIPE; default <run.dir>/<run.name>)")
    t.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and start over")
    t.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from lmforge.errors import ConfigError

    if args.recipe and args.tokens:
        raise ConfigError("give either a RECIPE or --tokens, not both")
    if not args.recipe and not args.tokens:
        raise ConfigError("lmforge train needs a RECIPE (runs its pretrain stage) or --tokens DIR")
    from lmforge.train import parallel as P

    try:
        rc = _train_recipe(args) if args.recipe else _train_tokens(args)
    except BaseException:
        P.destroy(wait=False)  # a failed rank must not wait for the others at a barrier
        raise
    P.destroy()  # under torchrun: every rank leaves together, process groups torn down before exit
    return rc


def _train_recipe(args) -> int:
    from lmforge.errors import ConfigError
    from lmforge.recipe import load_recipe, run_recipe

    raw, _ = load_recipe(args.recipe, list(args.overrides))
    if "pretrain" not in (raw.get("run", {}).get("stages") or []):
        raise ConfigError(f"recipe {args.recipe}: run.stages does not include 'pretrain'")
    rd = run_recipe(args.recipe, overrides=args.overrides, run_dir=args.run_dir, only=["pretrain"], force=args.fresh)
    print(f"report: {rd.report}")
    return 0


def _train_tokens(args) -> int:
    from lmforge import config as C
    from lmforge.errors import ConfigError
    from lmforge.train.config import TrainConfig
    from lmforge.train.loop import train

    section: dict = {}
    if args.config:
        raw = C.load_toml(args.config)
        section = raw.get("pretrain", raw) if isinstance(raw.get("pretrain"), dict) else raw
    ov = {}
    for o in args.overrides:
        k, _, v = o.partition("=")
        if not (k.startswith("pretrain.") or k.startswith("train.")):
            raise ConfigError(f"override --{k}: with --tokens only pretrain.* keys apply")
        ov[k.split(".", 1)[1]] = v
    C.apply_overrides(section, ov)
    if args.fresh:
        section["resume"] = False
    cfg = C.build(TrainConfig, section, "pretrain")
    tokens = Path(args.tokens)
    tokdir = Path(args.tokenizer) if args.tokenizer else tokens.parent / "tokenizer"
    if args.tokenizer and not tokdir.exists():
        raise ConfigError(f"--tokenizer {tokdir} does not exist")
    out = Path(args.out) if args.out else Path("runs") / "train" / "checkpoints"
    res = train(cfg, tokens, out, tokenizer_dir=tokdir if tokdir.exists() else None)
    print(json.dumps({
        "checkpoint": str(res.checkpoint) if res.checkpoint else None, "steps": res.steps, "tokens": res.tokens,
        "final_loss": res.final_loss, "val_loss": res.val_loss, "val_bpb": res.val_bpb,
        "tokens_per_s": res.tokens_per_s, "mfu": res.mfu, "metrics": str(res.metrics_path), "plot": str(res.plot_path),
    }, indent=2))
    return 0
