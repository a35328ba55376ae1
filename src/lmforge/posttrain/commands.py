"""CLI: `lmforge sft`.

    lmforge sft RECIPE.toml [--run-dir DIR] [--sft.key VALUE ...]     the recipe's [sft] section
    lmforge sft --base MODEL --out DIR [--data chats.jsonl ...] [--sft.key VALUE ...]

MODEL is anything the checkpoint reader takes (a run directory, checkpoints directory, step
directory, HF folder). Without --data, the built-in dictionary + safety conversations are used.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sft", help="supervised fine-tuning on chat data (full, LoRA or QLoRA): a recipe's [sft] stage, or --base/--out")
    s.add_argument("recipe", nargs="?", help="recipe TOML whose [sft] section to run (with its run directory)")
    s.add_argument("--run-dir", help="run directory (default: the recipe's)")
    s.add_argument("--base", help="model to fine-tune (run directory, checkpoint, step directory or HF folder)")
    s.add_argument("--out", help="output directory for checkpoints and metrics (with --base)")
    s.add_argument("--data", action="append", default=[], help="chat JSONL file (repeatable); default: the built-in set")
    s.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the base model's)")
    s.add_argument("--seed", type=int, default=1234)
    s.set_defaults(func=_cmd_sft)


def _cmd_sft(args: argparse.Namespace) -> int:
    from lmforge.errors import ConfigError

    if args.recipe:
        from lmforge.recipe import run_recipe

        from lmforge.recipe import load_recipe

        raw, _ = load_recipe(args.recipe, args.overrides)
        if "sft" not in raw.get("run", {}).get("stages", []):
            raise ConfigError(f"{args.recipe}: run.stages does not list 'sft'")
        rd = run_recipe(args.recipe, overrides=args.overrides, run_dir=args.run_dir, only=["sft"])
        print(f"report: {rd.report}")
        return 0
    if not (args.base and args.out):
        raise ConfigError("lmforge sft: give a recipe, or --base MODEL and --out DIR")
    from lmforge import config as cfgmod
    from lmforge.posttrain.config import SFTConfig
    from lmforge.posttrain.sft import run_sft

    bad = [o for o in args.overrides if not o.startswith("sft.")]
    if bad:
        raise ConfigError(f"lmforge sft --base: only --sft.KEY overrides apply here, got --{bad[0].split('=')[0]}")
    section: dict = {}
    cfgmod.apply_overrides(section, [o[len("sft."):] for o in args.overrides])
    if args.data:
        section["data"] = args.data
    cfg = cfgmod.build(SFTConfig, section, "sft")
    res = run_sft(cfg, Path(args.out), base=args.base, seed=args.seed, tokenizer=args.tokenizer)
    print(f"sft: {res.steps} steps, final loss {res.final_loss:.4f}, checkpoint {res.checkpoint}")
    return 0
