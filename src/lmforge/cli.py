"""The `lmforge` command.

Top-level commands live here; each stage package adds its own sub-commands through a
`commands.py` module with `register(subparsers)`. Heavy imports happen inside handlers so
`lmforge --help` stays fast. Errors a user can cause print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmforge import __version__
from lmforge.config import split_cli_overrides
from lmforge.errors import LmforgeError

# Packages that contribute sub-commands (each has commands.py with register(subparsers)).
COMMAND_MODULES = [
    "lmforge.data.commands",
    "lmforge.tokenizer.commands",
    "lmforge.train.commands",
    "lmforge.plan.commands",
    "lmforge.eval.commands",
    "lmforge.infer.commands",
    "lmforge.posttrain.commands",
    "lmforge.posttrain.pref_commands",
    "lmforge.posttrain.rl_commands",
    "lmforge.posttrain.rounds_commands",
    "lmforge.posttrain.distill_commands",
    "lmforge.posttrain.medusa_commands",
    "lmforge.infer.compress_commands",
    "lmforge.serve.commands",
]


def _cmd_run(args: argparse.Namespace) -> int:
    from lmforge.recipe import run_recipe

    only = [s.strip() for s in args.stages.split(",")] if args.stages else None
    if args.workers:
        args.overrides.append(f"run.workers={args.workers}")
    rd = run_recipe(args.recipe, overrides=args.overrides, run_dir=args.run_dir, only=only, force=args.force)
    print(f"report: {rd.report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmforge",
        description="Train a language model from scratch: crawl -> corpus -> tokenizer -> pretraining -> evaluation -> SFT, reward model, DPO, RL.",
        epilog="Any --section.key VALUE option overrides a recipe value (e.g. --data.langid.threshold 0.5).",
    )
    p.add_argument("--version", action="version", version=f"lmforge {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser("run", help="run a recipe's stages in order (no argument: the bundled demo on the bundled sample)")
    r.add_argument("recipe", nargs="?", help="recipe TOML (default: the bundled demo recipe)")
    r.add_argument("--run-dir", help="run directory (default: <run.dir>/<run.name>)")
    r.add_argument("--stages", help="comma-separated subset of the recipe's stages to run")
    r.add_argument("--workers", type=int, help="worker processes (default: all cores)")
    r.add_argument("--force", action="store_true", help="rerun stages even if their manifest matches")
    r.set_defaults(func=_cmd_run)
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        rest, overrides = split_cli_overrides(argv)
        parser = build_parser()
        args = parser.parse_args(rest)
        args.overrides = overrides
        if not getattr(args, "func", None):
            parser.print_help()
            return 1
        return int(args.func(args) or 0)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
