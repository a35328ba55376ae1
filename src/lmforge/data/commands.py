"""`lmforge data ...`: run the data stage, run one Slurm array task, show stats, inspect removals.

    lmforge data run RECIPE_OR_DATA_TOML --run-dir DIR [--workers N] [--executor local|ray|slurm] [--force]
    lmforge data run-task SLURM_DIR [--index N]       (the per-task entry point of Slurm array jobs)
    lmforge data stats RUN_DIR                        (per-step counts, sources, top domains)
    lmforge data inspect RUN_DIR [--step NAME] [--n 5] [--html OUT.html]

Other modules add sub-commands through `register(data_subparsers)`: `lmforge.data.extract`
(`data extract`), `lmforge.data.dedup.commands`, `lmforge.data.quality.commands`.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

EXTENSIONS = ["lmforge.data.extract", "lmforge.data.langid", "lmforge.data.dedup.commands", "lmforge.data.quality.commands"]


def _recipe_for(path: str, run_dir: str | None, overrides: list[str]) -> tuple[str, list[str], str | None]:
    """A recipe path for `lmforge data run`: a full recipe is used as is; a bare `[data]`-only
    TOML (DataConfig keys at top level) is wrapped into a one-stage recipe next to the run."""
    import tomli_w

    from lmforge.config import load_toml
    from lmforge.errors import ConfigError
    from lmforge.rundir import atomic_write_text

    raw = load_toml(path)
    if "data" in raw or "run" in raw:
        return path, overrides, run_dir
    if not run_dir:
        raise ConfigError(f"{path} holds a bare data config (no [run] or [data] section): give --run-dir")
    base = Path(path).resolve().parent
    inputs = []
    for item in raw.get("inputs", []):
        item = {"path": item} if isinstance(item, str) else dict(item)
        if isinstance(item.get("path"), str):
            p = os.path.expanduser(item["path"])
            item["path"] = p if os.path.isabs(p) else str(base / p)
        inputs.append(item)
    raw = dict(raw, inputs=inputs)
    wrapped = {"run": {"name": Path(run_dir).name, "stages": ["data"]}, "data": raw}
    out = Path(run_dir) / "data-recipe.toml"
    atomic_write_text(out, tomli_w.dumps(wrapped))
    return str(out), overrides, run_dir


def _cmd_run(args: argparse.Namespace) -> int:
    from lmforge.recipe import run_recipe

    overrides = list(args.overrides)
    if args.workers:
        overrides.append(f"data.executor.workers={args.workers}")
    if args.executor:
        overrides.append(f"data.executor.kind={args.executor}")
    recipe, overrides, run_dir = _recipe_for(args.config, args.run_dir, overrides)
    rd = run_recipe(recipe, overrides=overrides, run_dir=run_dir, only=["data"], force=args.force)
    print(f"corpus: {rd.corpus}")
    return 0


def _cmd_run_task(args: argparse.Namespace) -> int:
    from lmforge.data.executor import run_slurm_task
    from lmforge.errors import InputError

    index = args.index
    if index is None:
        env = os.environ.get("SLURM_ARRAY_TASK_ID")
        if env is None:
            raise InputError("give --index N (or run inside a Slurm array job, which sets SLURM_ARRAY_TASK_ID)")
        index = int(env)
    tid = run_slurm_task(args.slurm_dir, index)
    print(f"task {tid} complete")
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    from lmforge.data import stats as S

    st = S.load_stats(args.run_dir)
    if args.json:
        import json

        print(json.dumps(st, indent=2))
        return 0
    t = st["totals"]
    print(f"{t['docs_out']:,} documents kept of {t['docs_read']:,} read ({t['tokens_out']:,} whitespace tokens), "
          f"{t['shards']} shard(s), {t['corrupt_records']:,} corrupt record(s) skipped\n")
    print(S.text_table(S.STEP_HEADER, S.step_rows(st)))
    if st.get("sources"):
        print()
        print(S.text_table(["source", "docs read", "docs out", "tokens out"], S.source_rows(st)))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from lmforge.data import stats as S

    c = S.corpus_dir(args.run_dir)
    if args.html:
        from lmforge.data.report_html import write_inspection_html

        write_inspection_html(c, Path(args.html))
        print(f"wrote {args.html}")
        return 0
    st = S.load_stats(c)
    removed = S.load_removed(c, args.step)
    for step, recs in removed.items():
        by_reason: dict[str, list[dict]] = {}
        for r in recs:
            by_reason.setdefault(r["reason"], []).append(r)
        print(f"== {step}: removed samples ({sum(len(v) for v in by_reason.values())} kept for inspection)")
        for reason, lst in by_reason.items():
            print(f"-- reason: {reason}")
            for r in lst[: args.n]:
                meta = r.get("metadata", {})
                where = meta.get("url") or meta.get("source", "")
                text = " ".join(r["text"].split())
                print(f"   [{r['id']}] {where}\n      {text[: args.chars]}{'...' if len(text) > args.chars else ''}")
        print()
    if args.step is None:
        print("top domains by kept tokens:")
        print(S.text_table(["domain", "docs", "tokens"], S.domain_rows(st, 20)))
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="data curation: run the pipeline, show stats, inspect what was removed")
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda a: (p.print_help(), 1)[1])

    r = sub.add_parser("run", help="run the data stage of a recipe (or of a bare [data] TOML)")
    r.add_argument("config", help="recipe TOML with a [data] section, or a TOML holding only data keys")
    r.add_argument("--run-dir", help="run directory (default: the recipe's <run.dir>/<run.name>)")
    r.add_argument("--workers", type=int, help="worker processes (default: run.workers or all cores)")
    r.add_argument("--executor", choices=["local", "ray", "slurm"], help="execution engine (default: [data.executor] kind)")
    r.add_argument("--force", action="store_true", help="rerun even if the stage's manifest matches")
    r.set_defaults(func=_cmd_run)

    t = sub.add_parser("run-task", help="run one task of a Slurm array phase (the sbatch script calls this)")
    t.add_argument("slurm_dir", help="the _slurm directory of a phase (holds tasks.pkl and job.sbatch)")
    t.add_argument("--index", type=int, help="array index (default: $SLURM_ARRAY_TASK_ID)")
    t.set_defaults(func=_cmd_run_task)

    s = sub.add_parser("stats", help="per-step document/character counts and drop reasons of a finished data stage")
    s.add_argument("run_dir", help="run directory (or its corpus/ directory)")
    s.add_argument("--json", action="store_true", help="print stats.json as is")
    s.set_defaults(func=_cmd_stats)

    i = sub.add_parser("inspect", help="samples of removed documents per step and reason, top domains")
    i.add_argument("run_dir", help="run directory (or its corpus/ directory)")
    i.add_argument("--step", help="only this step (e.g. langid, exact_dedup)")
    i.add_argument("--n", type=int, default=5, help="samples per reason (default 5)")
    i.add_argument("--chars", type=int, default=200, help="characters of text shown per sample (default 200)")
    i.add_argument("--html", metavar="OUT.html", help="write an HTML inspection page instead")
    i.set_defaults(func=_cmd_inspect)

    for mod in EXTENSIONS:
        importlib.import_module(mod).register(sub)
