"""CLI: `lmforge rl`.

    lmforge rl RECIPE.toml [--run-dir DIR] [--rl.key VALUE ...]       the recipe's [rl] section
    lmforge rl --base MODEL --out DIR [--data prompts.jsonl ...] [--reward SPEC] [--algorithm grpo|rloo|reinforce|ppo]
               [--rl.key VALUE ...]

MODEL is anything the checkpoint reader takes (a run directory, an sft/ directory, a step
directory, an HF folder). Without --data the built-in which-word task and its exact-answer reward
are used. SPEC: "exact", "module:function", "path/to/file.py:function" or "rm:PATH".

Registration (cli.py): `from lmforge.posttrain import rl_commands; rl_commands.register(sub)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("rl", help="on-policy RL (GRPO, RLOO, REINFORCE, PPO) with a reward function or a reward "
                                  "model: a recipe's [rl] stage, or --base/--out")
    s.add_argument("recipe", nargs="?", help="recipe TOML whose [rl] section to run (with its run directory)")
    s.add_argument("--run-dir", help="run directory (default: the recipe's)")
    s.add_argument("--base", help="policy to start from (run directory, checkpoint, step directory or HF folder)")
    s.add_argument("--out", help="output directory for checkpoints and metrics (with --base)")
    s.add_argument("--data", action="append", default=[], help="prompt JSONL file (repeatable); default: the built-in task")
    s.add_argument("--reward", help="reward: exact | module:function | file.py:function | rm:PATH (default: exact)")
    s.add_argument("--algorithm", choices=["grpo", "rloo", "reinforce", "ppo"], help="default: grpo")
    s.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the base model's)")
    s.add_argument("--seed", type=int, default=1234)
    s.set_defaults(func=_cmd_rl)


def _cmd_rl(args: argparse.Namespace) -> int:
    from lmforge.errors import ConfigError

    overrides = list(getattr(args, "overrides", []) or [])
    if args.recipe:
        from lmforge.recipe import load_recipe, run_recipe

        if args.reward:
            overrides.append(f"rl.reward={args.reward}")
        if args.algorithm:
            overrides.append(f"rl.algorithm={args.algorithm}")
        raw, _ = load_recipe(args.recipe, overrides)
        if "rl" not in raw.get("run", {}).get("stages", []):
            raise ConfigError(f"{args.recipe}: run.stages does not list 'rl'")
        rd = run_recipe(args.recipe, overrides=overrides, run_dir=args.run_dir, only=["rl"])
        print(f"report: {rd.report}")
        return 0
    if not (args.base and args.out):
        raise ConfigError("lmforge rl: give a recipe, or --base MODEL and --out DIR")
    from lmforge import config as cfgmod
    from lmforge.posttrain.rl import RLConfig, run_rl

    bad = [o for o in overrides if not o.startswith("rl.")]
    if bad:
        raise ConfigError(f"lmforge rl --base: only --rl.KEY overrides apply here, got --{bad[0].split('=')[0]}")
    section: dict = {}
    cfgmod.apply_overrides(section, [o[len("rl."):] for o in overrides])
    if args.data:
        section["data"] = args.data
    if args.reward:
        section["reward"] = args.reward
    if args.algorithm:
        section["algorithm"] = args.algorithm
    cfg = cfgmod.build(RLConfig, section, "rl")
    res = run_rl(cfg, Path(args.out), base=args.base, seed=args.seed, tokenizer=args.tokenizer)
    rec = res.last_record
    print(f"rl ({res.algorithm}): {res.steps} steps, {res.rollouts} rollouts, last reward {_f(rec.get('reward_mean'), 3)}, "
          f"held-out accuracy {_f(res.accuracy_before, 3)} -> {_f(res.accuracy_after, 3)}, checkpoint {res.checkpoint}")
    return 0


def _f(v, nd: int = 4) -> str:
    return "-" if v is None else f"{v:.{nd}f}"
