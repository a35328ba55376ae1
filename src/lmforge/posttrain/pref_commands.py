"""CLI: `lmforge rm` and `lmforge dpo`.

    lmforge rm  RECIPE.toml [--run-dir DIR] [--rm.key VALUE ...]      the recipe's [rm] section
    lmforge rm  --base MODEL --out DIR [--data pairs.jsonl ...] [--rm.key VALUE ...]
    lmforge dpo RECIPE.toml [--run-dir DIR] [--dpo.key VALUE ...]
    lmforge dpo --base MODEL --out DIR [--data pairs.jsonl ...] [--dpo.key VALUE ...]

MODEL is anything the checkpoint reader takes (a run directory, checkpoints directory, step
directory, HF folder), normally an SFT chat model. Without --data, the built-in dictionary
preference pairs are used. `register(sub)` adds both verbs to the `lmforge` parser.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = {
    "rm": "train a reward model on preference pairs (Bradley-Terry; full or LoRA): a recipe's [rm] stage, or --base/--out",
    "dpo": "align a chat model on preference pairs with DPO or IPO (full or LoRA): a recipe's [dpo] stage, or --base/--out",
}


def register(sub: argparse._SubParsersAction) -> None:
    for verb in ("rm", "dpo"):
        s = sub.add_parser(verb, help=HELP[verb])
        s.add_argument("recipe", nargs="?", help=f"recipe TOML whose [{verb}] section to run (with its run directory)")
        s.add_argument("--run-dir", help="run directory (default: the recipe's)")
        s.add_argument("--base", help="chat model to start from (run directory, checkpoint, step directory or HF folder)")
        s.add_argument("--out", help="output directory for checkpoints and metrics (with --base)")
        s.add_argument("--data", action="append", default=[], help="preference JSONL file (repeatable); default: the built-in pairs")
        s.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the base model's)")
        s.add_argument("--seed", type=int, default=1234)
        s.set_defaults(func=_cmd, verb=verb)


def _cmd(args: argparse.Namespace) -> int:
    from lmforge.errors import ConfigError

    verb = args.verb
    overrides = getattr(args, "overrides", [])
    if args.recipe:
        from lmforge.recipe import load_recipe, run_recipe

        raw, _ = load_recipe(args.recipe, overrides)
        if verb not in raw.get("run", {}).get("stages", []):
            raise ConfigError(f"{args.recipe}: run.stages does not list '{verb}'")
        rd = run_recipe(args.recipe, overrides=overrides, run_dir=args.run_dir, only=[verb])
        print(f"report: {rd.report}")
        return 0
    if not (args.base and args.out):
        raise ConfigError(f"lmforge {verb}: give a recipe, or --base MODEL and --out DIR")
    from lmforge import config as cfgmod

    bad = [o for o in overrides if not o.startswith(f"{verb}.")]
    if bad:
        raise ConfigError(f"lmforge {verb} --base: only --{verb}.KEY overrides apply here, got --{bad[0].split('=')[0]}")
    section: dict = {}
    cfgmod.apply_overrides(section, [o[len(verb) + 1 :] for o in overrides])
    if args.data:
        section["data"] = args.data
    if verb == "rm":
        from lmforge.posttrain.rm import RMConfig, run_rm

        cfg = cfgmod.build(RMConfig, section, "rm")
        res = run_rm(cfg, Path(args.out), base=args.base, seed=args.seed, tokenizer=args.tokenizer)
        print(f"rm: {res.steps} steps, final loss {_f(res.final_loss)}, held-out pair accuracy {_f(res.heldout_accuracy, 3)}, "
              f"checkpoint {res.checkpoint}")
        return 0
    from lmforge.posttrain.dpo import DPOConfig, run_dpo

    cfg = cfgmod.build(DPOConfig, section, "dpo")
    res = run_dpo(cfg, Path(args.out), base=args.base, seed=args.seed, tokenizer=args.tokenizer)
    print(f"dpo: {res.steps} steps, loss {_f(res.first_loss)} -> {_f(res.final_loss)}, held-out preference accuracy "
          f"{_f(res.before.get('heldout_accuracy'), 3)} -> {_f(res.after.get('heldout_accuracy'), 3)}, checkpoint {res.checkpoint}")
    return 0


def _f(v, nd: int = 4) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


__all__ = ["register"]
