"""`lmforge data dedup ...`: deduplicate a corpus outside a recipe, build and use a MinHash index.

    lmforge data dedup run INPUT... --output DIR [--methods exact,minhash,...] [--config DEDUP.toml]
                                    [--index INDEX_DIR] [--eval FILE ...] [--workers N] [--limit N]
    lmforge data dedup index INPUT... --index INDEX_DIR [--config DEDUP.toml] [--workers N] [--limit N]

INPUT is a corpus directory of `*.jsonl.zst` shards (what `lmforge data run` writes) or any
input the data readers understand (JSONL[.gz/.zst], Parquet, text directories). Options
`--dedup.<method>.<key> VALUE` override single config keys (e.g. `--dedup.minhash.threshold 0.7`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _config(args: argparse.Namespace):
    from lmforge.config import apply_overrides, build, load_toml
    from lmforge.data.dedup import ORDER, DedupConfig
    from lmforge.errors import ConfigError

    raw: dict = {}
    if args.config:
        raw = load_toml(args.config)
        if "data" in raw:
            raw = raw["data"].get("dedup", {})
        elif "dedup" in raw:
            raw = raw["dedup"]
    ov = {}
    for o in args.overrides:
        k, _, v = o.partition("=")
        if not k.startswith("dedup."):
            raise ConfigError(f"override --{k}: only --dedup.<method>.<key> options apply here")
        ov[k[len("dedup."):]] = v
    apply_overrides(raw, ov)
    if getattr(args, "methods", None):
        want = [m.strip() for m in args.methods.split(",") if m.strip()]
        for m in want:
            if m not in ORDER:
                raise ConfigError(f"--methods: unknown method {m!r}; choose from: {', '.join(ORDER)}")
        for m in ORDER:
            raw.setdefault(m, {})
            if isinstance(raw[m], dict):
                raw[m]["enabled"] = m in want
    if getattr(args, "index", None) and args.command_name == "run":
        raw.setdefault("minhash", {})["index"] = str(Path(args.index).resolve())
    if getattr(args, "eval", None):
        raw.setdefault("decontam", {})["eval_files"] = [str(Path(e).resolve()) for e in args.eval]
    return build(DedupConfig, raw, "dedup")


def input_shards(inputs: list[str], work: Path, limit: int = 0, shard_docs: int = 50_000) -> list[Path]:
    """Shards for the inputs: corpus directories as they are, other inputs read into shards under `work`."""
    from lmforge.data.corpus_io import list_shards, write_shard
    from lmforge.data.readers import ReadStats, expand_inputs, parse_inputs, read_file
    from lmforge.errors import InputError
    from lmforge.log import logger

    shards: list[Path] = []
    for k, inp in enumerate(inputs):
        p = Path(inp)
        if p.is_dir() and list_shards(p):
            shards.extend(list_shards(p))
            continue
        if not p.exists():
            raise InputError(f"input not found: {inp}")
        files = expand_inputs(parse_inputs([str(p.resolve())]), Path)
        rs = ReadStats()
        for fi, f in enumerate(files):
            docs = read_file(f, rs)
            part, batch = 0, []
            for n, d in enumerate(docs):
                if limit and n >= limit:
                    break
                batch.append(d)
                if len(batch) >= shard_docs:
                    shards.append(work / f"in{k:03d}_{fi:03d}_{part:05d}.jsonl.zst")
                    write_shard(shards[-1], batch)
                    part, batch = part + 1, []
            if batch:
                shards.append(work / f"in{k:03d}_{fi:03d}_{part:05d}.jsonl.zst")
                write_shard(shards[-1], batch)
        logger.info("read %s: %d documents (%d corrupt skipped)", inp, rs.stats.docs_out, sum(rs.stats.dropped.values()))
    if not shards:
        raise InputError("no documents in the inputs")
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        raise InputError("inputs hold shards with the same file name; give one corpus directory at a time")
    return shards


def run_dedup(shards: list[Path], out: Path, cfg, workers: int = 1, seed: int = 0, sample_removed: int = 20) -> dict:
    """Run the enabled passes over `shards` into `out` (shards, stats.json, removed/, plots)."""
    import json
    import shutil
    import time

    from lmforge.data.dedup import build_passes
    from lmforge.data.executor import LocalExecutor
    from lmforge.rundir import atomic_write_json, atomic_write_text

    from lmforge.config import to_dict
    from lmforge.rundir import file_fingerprint, fingerprint

    passes = build_passes(cfg)
    ex = LocalExecutor(workers)
    # intermediate state of a killed run is resumed only for the same inputs and config
    work = out / ".work" / fingerprint([to_dict(cfg), file_fingerprint(shards), seed])
    t0 = time.perf_counter()
    report: dict = {"inputs": [str(s) for s in shards], "passes": []}
    cur = list(shards)
    docs_in = None
    for j, p in enumerate(passes):
        pdir = work / f"{j:02d}_{p.name}"
        pr = p.run(cur, pdir / "out", pdir / "work", ex, seed, sample_removed)
        cur = list(pr.shards)
        docs_in = pr.stats.docs_in if docs_in is None else docs_in
        report["passes"].append({"stats": pr.stats.to_dict(), "extra": pr.extra})
        if pr.removed:
            lines = [json.dumps(dict(r, reason=reason), ensure_ascii=False) for reason, recs in pr.removed.items() for r in recs]
            atomic_write_text(out / "removed" / f"{p.name}.jsonl", "\n".join(lines) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    finals = []
    for s in cur:
        dst = out / s.name
        if s.resolve() != dst.resolve():
            shutil.copyfile(s, dst.with_name(f".{dst.name}.tmp"))
            dst.with_name(f".{dst.name}.tmp").replace(dst)
        finals.append(dst)
    last = report["passes"][-1]["stats"] if report["passes"] else None
    report["totals"] = {"docs_in": docs_in or 0, "docs_out": last["docs_out"] if last else None, "wall_s": round(time.perf_counter() - t0, 3),
                        "shards": [f.name for f in finals]}
    atomic_write_json(out / "stats.json", report)
    for pr in report["passes"]:
        if pr["stats"]["name"] == "minhash" and pr["extra"].get("cluster_sizes"):
            plot_cluster_sizes(pr["extra"]["cluster_sizes"], out / "minhash_clusters.png")
    shutil.rmtree(out / ".work" / work.name, ignore_errors=True)
    return report


def plot_cluster_sizes(hist: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.rundir import atomic_file

    xs = sorted(int(k) for k in hist)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(xs)), [hist[str(x)] for x in xs])
    ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=90 if len(xs) > 20 else 0, fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("cluster size (documents)")
    ax.set_ylabel("clusters")
    ax.set_title("MinHash near-duplicate clusters")
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def _print_report(report: dict) -> None:
    print(f"{'pass':<12}{'docs in':>12}{'docs out':>12}{'removed':>10}{'chars out':>14}{'time s':>9}")
    for p in report["passes"]:
        s = p["stats"]
        print(f"{s['name']:<12}{s['docs_in']:>12,}{s['docs_out']:>12,}{s['docs_in'] - s['docs_out']:>10,}{s['chars_out']:>14,}{s['time_s']:>9.2f}")
        for k, v in s["dropped"].items():
            print(f"    dropped {k}: {v:,}")
        ex = p["extra"]
        if s["name"] == "minhash":
            print(f"    candidate pairs {ex['candidate_pairs']:,}, verified {ex['verified_pairs']:,}, clusters {ex['clusters']:,}, "
                  f"cluster sizes {dict(list(ex['cluster_sizes'].items())[:10])}")


def _cmd_run(args: argparse.Namespace) -> int:
    import shutil

    from lmforge.errors import InputError

    args.command_name = "run"
    cfg = _config(args)
    out = Path(args.output)
    if out.exists() and any(out.glob("*.jsonl.zst")):
        if not args.force:
            raise InputError(f"{out} already holds shards; give --force to replace them")
        for old in out.glob("*.jsonl.zst"):
            old.unlink()
        shutil.rmtree(out / ".work", ignore_errors=True)
    tmp_in = out / ".work" / "input"
    shards = input_shards(args.inputs, tmp_in, args.limit, args.shard_docs)
    report = run_dedup(shards, out, cfg, args.workers or 1, args.seed, args.sample_removed)
    shutil.rmtree(tmp_in, ignore_errors=True)
    _print_report(report)
    print(f"output: {out} ({report['totals']['docs_out']:,} of {report['totals']['docs_in']:,} documents kept)")
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    import shutil

    from lmforge.data.dedup.minhash import build_index
    from lmforge.data.executor import LocalExecutor

    args.command_name = "index"
    cfg = _config(args)
    index = Path(args.index)
    src = index / "input"
    shards = input_shards(args.inputs, src, args.limit, args.shard_docs)
    meta = build_index(shards, index, cfg.minhash, LocalExecutor(args.workers or 1))
    shutil.rmtree(src, ignore_errors=True)  # the index keeps signatures only
    print(f"index: {index} ({meta['docs']:,} documents, {meta['in_lsh']:,} in LSH, params {meta['params']})")
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="corpus directories (*.jsonl.zst shards) or input files (JSONL, Parquet, text)")
    p.add_argument("--config", help="TOML with [dedup] (or [data.dedup], or bare dedup keys)")
    p.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--limit", type=int, default=0, help="read at most N documents per input file (0 = all)")
    p.add_argument("--shard-docs", type=int, default=50_000, help="documents per shard when reading non-shard inputs")


def register(data_sub) -> None:
    d = data_sub.add_parser("dedup", help="deduplicate a corpus (exact, MinHash, Bloom, lines, substring, decontamination)")
    sub = d.add_subparsers(dest="dedup_command", metavar="SUBCOMMAND")
    d.set_defaults(func=lambda a: (d.print_help(), 1)[1])

    r = sub.add_parser("run", help="deduplicate INPUTs into --output (shards, stats.json, removed/ samples, plots)")
    _common(r)
    r.add_argument("--output", "-o", required=True, help="output corpus directory")
    r.add_argument("--methods", help="comma-separated methods to enable (others off): exact,decontam,lines,minhash,bloom,substring "
                                     "(default: the config's; out of the box exact + minhash)")
    r.add_argument("--index", help="MinHash index to dedup against (from `lmforge data dedup index`)")
    r.add_argument("--eval", action="append", help="evaluation data file for decontamination (repeatable)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--sample-removed", type=int, default=20, help="removed documents kept per pass and reason")
    r.add_argument("--force", action="store_true", help="replace an existing output")
    r.set_defaults(func=_cmd_run)

    i = sub.add_parser("index", help="build a MinHash index of INPUTs to dedup later datasets against")
    _common(i)
    i.add_argument("--index", required=True, help="index directory to write")
    i.set_defaults(func=_cmd_index)
