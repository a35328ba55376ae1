"""CLI: `lmforge rejection-sample` and `lmforge rounds`.

    lmforge rejection-sample MODEL --rm RM --out DIR [--prompts FILE|builtin ...] [--n 8] [--min-margin M]
                             [--rejection.key VALUE ...]
    lmforge rounds RECIPE.toml [--run-dir DIR] [--rounds.key VALUE ...]          the recipe's [rounds] section
    lmforge rounds --base MODEL --rm RM --out DIR [--prompts FILE ...] [--rounds N] [--train dpo|sft|rl]
                   [--n 8] [--rounds.key VALUE ...]

MODEL and RM are anything the checkpoint readers take (a run directory — for RM its rm/ —, a stage
directory, a step directory). Without --prompts (or with `--prompts builtin`) the built-in
dictionary questions are the prompts. `rejection-sample` writes DIR/sft.jsonl (best-of-n SFT data),
DIR/pairs.jsonl (DPO pairs), DIR/stats.json, DIR/samples.json, DIR/scored.jsonl; `rounds --out DIR`
writes DIR/round_N/... and DIR/latest (`lmforge generate DIR` loads the newest round's model).

Registration (cli.py): `from lmforge.posttrain import rounds_commands; rounds_commands.register(sub)`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("rejection-sample", help="best-of-n sampling scored by a reward model -> SFT data (best) and DPO "
                                                "pairs (best vs worst)")
    s.add_argument("model", help="the policy to sample from (run directory, stage directory, step directory or HF folder)")
    s.add_argument("--rm", required=True, help="the reward model (a run directory, its rm/ or a step directory)")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--prompts", action="append", default=[],
                   help="prompt or conversation JSONL (repeatable); 'builtin' (the default): the dictionary questions")
    s.add_argument("--n", type=int, help="samples per prompt (default 8)")
    s.add_argument("--min-margin", type=float, help="keep a pair only when best - worst reward > this (default 0)")
    s.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model's)")
    s.add_argument("--seed", type=int, default=1234)
    s.add_argument("--force", action="store_true", help="sample again even when DIR holds the finished output")
    s.set_defaults(func=_cmd_rejection)

    r = sub.add_parser("rounds", help="iterated rounds: rejection sampling with the current policy and a reward model, "
                                      "then DPO / SFT / RL from it: a recipe's [rounds] stage, or --base/--rm/--out")
    r.add_argument("recipe", nargs="?", help="recipe TOML whose [rounds] section to run (with its run directory)")
    r.add_argument("--run-dir", help="run directory (default: the recipe's)")
    r.add_argument("--base", help="the starting policy (with --rm and --out)")
    r.add_argument("--rm", help="the reward model (with --base)")
    r.add_argument("--out", help="output directory (with --base)")
    r.add_argument("--prompts", action="append", default=[], help="prompt JSONL (repeatable); default: the built-in questions")
    r.add_argument("--rounds", type=int, dest="n_rounds", help="number of rounds (default 2)")
    r.add_argument("--train", choices=["dpo", "sft", "rl"], help="what each round trains (default dpo)")
    r.add_argument("--n", type=int, help="samples per prompt (default 8)")
    r.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model's)")
    r.add_argument("--seed", type=int, default=1234)
    r.add_argument("--force", action="store_true", help="recompute every round")
    r.set_defaults(func=_cmd_rounds)


def _own_overrides(overrides: list[str], section: str, verb: str) -> list[str]:
    from lmforge.errors import ConfigError

    bad = [o for o in overrides if not o.startswith(f"{section}.")]
    if bad:
        raise ConfigError(f"lmforge {verb}: only --{section}.KEY overrides apply here, got --{bad[0].split('=')[0]}")
    return [o[len(section) + 1 :] for o in overrides]


def _prompt_files(values: list[str]) -> list[str]:
    return [v for v in values if v != "builtin"]


def _cmd_rejection(args: argparse.Namespace) -> int:
    from lmforge import config as cfgmod
    from lmforge.posttrain.rejection import RejectionConfig, rejection_sample

    section: dict = {}
    cfgmod.apply_overrides(section, _own_overrides(list(getattr(args, "overrides", []) or []), "rejection", "rejection-sample"))
    if args.prompts:
        section["prompts"] = _prompt_files(args.prompts)
    if args.n is not None:
        section["n"] = args.n
    if args.min_margin is not None:
        section["min_margin"] = args.min_margin
    cfg = cfgmod.build(RejectionConfig, section, "rejection")
    res = rejection_sample(cfg, Path(args.out), policy=args.model, reward_model=args.rm, seed=args.seed,
                           tokenizer=args.tokenizer, force=args.force)
    s = res.stats
    print(f"rejection-sample: {s['prompts']} prompts x {cfg.n}: mean reward {_f(s.get('mean_reward'))}, best-of-{cfg.n} "
          f"{_f(s.get('mean_best'))}, worst {_f(s.get('mean_worst'))}; {s['sft_examples']} SFT examples -> {res.sft_path}, "
          f"{s['pairs']} pairs ({s['dropped_margin']} within the margin) -> {res.pairs_path}"
          f"{' (reused)' if res.reused else ''}")
    return 0


def _cmd_rounds(args: argparse.Namespace) -> int:
    from lmforge.errors import ConfigError

    overrides = list(getattr(args, "overrides", []) or [])
    flags = {"rounds": args.n_rounds, "train": args.train, "n": args.n}
    if args.recipe:
        from lmforge.recipe import load_recipe, run_recipe

        if args.prompts:
            overrides.append(f"rounds.prompts={_toml_list(_prompt_files(args.prompts))}")
        overrides += [f"rounds.{k}={v}" for k, v in flags.items() if v is not None]
        raw, _ = load_recipe(args.recipe, overrides)
        if "rounds" not in raw.get("run", {}).get("stages", []):
            raise ConfigError(f"{args.recipe}: run.stages does not list 'rounds'")
        rd = run_recipe(args.recipe, overrides=overrides, run_dir=args.run_dir, only=["rounds"], force=args.force)
        print(f"report: {rd.report}")
        return 0
    if not (args.base and args.rm and args.out):
        raise ConfigError("lmforge rounds: give a recipe, or --base MODEL, --rm RM and --out DIR")
    from lmforge import config as cfgmod
    from lmforge.posttrain.rounds import RoundsConfig, run_rounds

    section: dict = {}
    cfgmod.apply_overrides(section, _own_overrides(overrides, "rounds", "rounds --base"))
    if args.prompts:
        section["prompts"] = _prompt_files(args.prompts)
    section.update({k: v for k, v in flags.items() if v is not None})
    if args.tokenizer:
        section["tokenizer"] = args.tokenizer
    cfg = cfgmod.build(RoundsConfig, section, "rounds")
    res = run_rounds(cfg, Path(args.out), base=args.base, reward_model=args.rm, seed=args.seed, force=args.force)
    for info in res.rounds:
        s = info["rejection"]
        print(f"round {info['round']}{' (done before)' if info.get('skipped') else ''}: best-of-{cfg.n} reward "
              f"{_f(s.get('mean_best'))}, policy's held-out reward {_f(s.get('heldout_greedy_reward'))}, "
              f"{s.get('pairs')} pairs -> {info['model']}")
    print(f"rounds: final model {res.final_model}, held-out reward {_f(res.final_heldout_reward)}")
    return 0


def _toml_list(items: list[str]) -> str:
    import json

    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def _f(v, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


__all__ = ["register"]
