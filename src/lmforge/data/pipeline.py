"""The data pipeline: raw inputs -> curated corpus shards, in resumable phases.

1. stream (one task per input file, or per slice of a large file): read -> extract
   (HTML -> text) -> URL filter -> language ID -> heuristic filters -> quality steps,
   each step skipped for inputs whose `skip` names it (or its group); writes
   `corpus/.work/stream/<task>.jsonl.zst`;
2. corpus passes over all stream shards: exact dedup first, then the other dedup passes
   (`lmforge.data.dedup.build_passes`), each under `corpus/.work/passes/NN_<name>/`;
3. scrub (one task per shard): PII scrub, kept-token counts per domain and source;
4. write (one task per output shard): `corpus/shard_XXXXX.jsonl.zst` (+ `corpus/parquet/`),
   exactly `shard_docs` documents each (the last one fewer), then `stats.json`,
   `removed/<step>.jsonl`, `report.md`.

Every phase runs through an Executor with completion markers, so a killed run resumes at
the first unfinished task. Documents keep input order (inputs as listed, then record order
within a file) through every phase, and every keep/drop decision depends only on document
content, id and seed, so the output is byte-identical whatever the number of workers or the
order tasks finish in. (`executor.tasks` is part of the output definition: slicing a file
interleaves its records by index.)

A step is any `lmforge.data.step.Step`; `build_stream_steps`, `build_pii` and
`build_corpus_passes` turn the `[data]` config into the enabled ones.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from lmforge import config as cfgmod
from lmforge.data.config import DataConfig
from lmforge.data.corpus_io import iter_shard, write_shard
from lmforge.data.dedup import build_passes
from lmforge.data.dedup.exact import ExactDedupConfig, ExactDedupPass
from lmforge.data.executor import Executor, make_executor
from lmforge.data.extract import ExtractStep
from lmforge.data.filters import build_filters
from lmforge.data.langid import LangIdFilter
from lmforge.data.paths import resolve_under
from lmforge.data.pii import PIIScrubber
from lmforge.data.quality import build_quality_steps
from lmforge.data.readers import InputFile, ReadStats, expand_inputs, parse_inputs, read_file
from lmforge.data.step import RemovedSample, Step, StepStats, run_steps
from lmforge.data.writers import output_paths, write_output_shard
from lmforge.errors import ConfigError
from lmforge.log import logger
from lmforge.rundir import atomic_write_json, atomic_write_text, fingerprint, read_json

STEP_GROUPS = ("extract", "langid", "filters", "quality", "pii")
WORK = ".work"
TOP_PER_TASK = 5000  # domains kept per scrub task before merging (bounds marker size)


# --------------------------------------------------------------------------------------------
# building steps


def _enabled(sub: Any) -> bool:
    return bool(getattr(sub, "enabled", True))


def build_stream_steps(cfg: DataConfig, seed: int, resolve: Callable[[str], Path] | None = None) -> list[tuple[str, Step]]:
    """(group, step) pairs in pipeline order: extract, URL filters, langid, other filters, quality."""
    k = cfg.sample_removed
    steps: list[tuple[str, Step]] = []
    if _enabled(cfg.extract):
        steps.append(("extract", ExtractStep(cfg.extract, k)))
    filters: list[Step] = []
    if _enabled(cfg.filters):
        filters = list(build_filters(cfg.filters, seed, k, resolve(".") if resolve else None))  # list files resolve against the recipe
    steps += [("filters", s) for s in filters if "url" in s.name]
    if _enabled(cfg.langid):
        steps.append(("langid", LangIdFilter(cfg.langid, seed, k)))
    steps += [("filters", s) for s in filters if "url" not in s.name]
    if _enabled(cfg.quality):
        steps += [("quality", s) for s in build_quality_steps(cfg.quality, seed, k, resolve)]
    return steps


def build_pii(cfg: DataConfig) -> Step | None:
    return PIIScrubber(cfg.pii, cfg.sample_removed) if _enabled(cfg.pii) else None


def build_corpus_passes(cfg: DataConfig, resolve: Callable[[str], Path] | None = None) -> list:
    """Exact dedup first, then the dedup package's other passes."""
    if not _enabled(cfg.dedup):
        return []
    passes = list(build_passes(cfg.dedup, resolve))
    if not any(isinstance(p, ExactDedupPass) for p in passes):
        exact = getattr(cfg.dedup, "exact", None) or ExactDedupConfig()
        if _enabled(exact):
            passes.insert(0, ExactDedupPass(exact))
    return passes


def _skipped(step_name: str, group: str, skip: set[str]) -> bool:
    return step_name in skip or group in skip


def check_skips(files: list[InputFile], stream: list[tuple[str, Step]], pii: Step | None) -> None:
    known = set(STEP_GROUPS) | {s.name for _, s in stream} | ({pii.name} if pii else set())
    for f in files:
        for name in f.skip:
            if name not in known:
                raise ConfigError(
                    f"input {f.source!r}: skip = {name!r} is not a pipeline step; "
                    f"known steps and groups: {', '.join(sorted(known))} (dedup always sees the whole corpus)"
                )


# --------------------------------------------------------------------------------------------
# phase 1: stream


def plan_tasks(files: list[InputFile], n_tasks: int) -> list[tuple[int, int, int]]:
    """(file index, slice, slices) per task: one per file, the largest files split further
    until there are `n_tasks` tasks."""
    slices = [1] * len(files)
    extra = max(0, n_tasks - len(files))
    for _ in range(extra):
        j = max(range(len(files)), key=lambda i: (files[i].size / slices[i], -i))
        slices[j] += 1
    return [(i, s, slices[i]) for i in range(len(files)) for s in range(slices[i])]


def _timed(it, st: StepStats):
    """Add the time spent producing each item of `it` to `st.time_s`."""
    it = iter(it)
    while True:
        t0 = time.perf_counter()
        try:
            d = next(it)
        except StopIteration:
            st.time_s += time.perf_counter() - t0
            return
        st.time_s += time.perf_counter() - t0
        yield d


def _stream_task(task: dict) -> dict:
    cfg = cfgmod.build(DataConfig, task["cfg"], "data")
    f = InputFile(**task["file"])
    skip = set(f.skip)
    resolve = functools.partial(resolve_under, task["base_dir"])
    steps = [s for g, s in build_stream_steps(cfg, task["seed"], resolve) if not _skipped(s.name, g, skip)]
    rs = ReadStats()
    s, n = task["slice"], task["slices"]
    keep = None if n == 1 else (lambda i: i % n == s)
    docs = run_steps(_timed(read_file(f, rs, keep), rs.stats), steps)
    write_shard(task["out"], docs)
    return {
        "source": f.source,
        "stats": [rs.stats.to_dict()] + [st.stats.to_dict() for st in steps],
        "removed": {st.name: st.removed.to_dict() for st in steps},
    }


# --------------------------------------------------------------------------------------------
# phase 3: scrub


def _scrub_task(task: dict) -> dict:
    cfg = cfgmod.build(DataConfig, task["cfg"], "data")
    pii = build_pii(cfg)
    skip_sources = set(task["pii_skip_sources"])
    domains: dict[str, list[int]] = {}
    sources: dict[str, list[int]] = {}

    def scrub(docs):
        for d in docs:
            if pii is None or d.metadata.get("source") in skip_sources:
                yield d
            else:
                yield from pii([d])

    def account(docs):
        for d in docs:
            toks = len(d.text.split())
            key = d.metadata.get("domain") or f"({d.metadata.get('source', '?')})"
            a = domains.setdefault(key, [0, 0])
            a[0] += 1
            a[1] += toks
            b = sources.setdefault(str(d.metadata.get("source", "?")), [0, 0, 0])
            b[0] += 1
            b[1] += toks
            b[2] += len(d.text)
            yield d

    n, _ = write_shard(task["out"], account(scrub(iter_shard(task["shard"]))))
    top = sorted(domains.items(), key=lambda kv: (-kv[1][1], kv[0]))[:TOP_PER_TASK]
    return {
        "docs": n,
        "stats": pii.stats.to_dict() if pii else None,
        "removed": pii.removed.to_dict() if pii else {},
        "domains": dict(top),
        "sources": sources,
    }


# --------------------------------------------------------------------------------------------
# phase 4: write


def _write_task(task: dict) -> dict:
    """Output shard k: documents [start, start + count) of the concatenated scrubbed shards."""
    def docs():
        for path, skip, take in task["pieces"]:
            for i, d in enumerate(iter_shard(path)):
                if i < skip:
                    continue
                if i >= skip + take:
                    break
                yield d

    n, chars = write_output_shard(docs(), Path(task["out_dir"]), task["k"], task["formats"])
    return {"docs": n, "chars": chars}


def plan_output_shards(counts: list[int], paths: list[str], shard_docs: int) -> list[list[tuple[str, int, int]]]:
    """Cut the concatenation of shards (with `counts` docs each) into pieces of `shard_docs`."""
    total = sum(counts)
    plans = []
    for start in range(0, total, shard_docs):
        end = min(total, start + shard_docs)
        pieces, off = [], 0
        for p, c in zip(paths, counts):
            lo, hi = max(start, off), min(end, off + c)
            if lo < hi:
                pieces.append((p, lo - off, hi - lo))
            off += c
        plans.append(pieces)
    return plans


# --------------------------------------------------------------------------------------------
# driver


@dataclasses.dataclass
class PipelineResult:
    stats: dict
    shards: list[Path]


def _work_fingerprint(cfg: DataConfig, seed: int, files: list[InputFile]) -> str:
    c = cfgmod.to_dict(cfg)
    c["executor"] = {"tasks": cfg.executor.tasks}  # how many workers / which engine never changes the output
    c.pop("keep_work", None)
    stamp = [[f.path, os.path.getsize(f.path) if os.path.isfile(f.path) else 0, int(os.path.getmtime(f.path))] for f in files]
    return fingerprint({"config": c, "seed": seed, "files": stamp})


def _merge_stats(order: list[str], parts: list[list[dict]]) -> list[StepStats]:
    merged: dict[str, StepStats] = {}
    for lst in parts:
        for d in lst:
            s = StepStats.from_dict(d)
            if s.name in merged:
                merged[s.name].merge(s)
            else:
                merged[s.name] = s
    names = [n for n in order if n in merged] + [n for n in merged if n not in order]
    return [merged[n] for n in names]


def run_pipeline(
    cfg: DataConfig,
    out: Path,
    base_dir: str | Path = ".",
    seed: int = 1234,
    workers: int = 1,
    executor: Executor | None = None,
) -> PipelineResult:
    """Run the whole data pipeline into `out` (the corpus directory); resumable. Relative
    paths in `cfg` (inputs, model files) are taken under `base_dir` (the recipe's folder)."""
    t_start = time.time()
    out = Path(out)
    base = str(Path(base_dir).resolve())
    resolve = functools.partial(resolve_under, base)
    files = expand_inputs(parse_inputs(cfg.inputs), resolve)
    stream_steps = build_stream_steps(cfg, seed, resolve)
    pii = build_pii(cfg)
    check_skips(files, stream_steps, pii)
    passes = build_corpus_passes(cfg, resolve)

    work = out / WORK
    fp = _work_fingerprint(cfg, seed, files)
    if (read_json(work / "fingerprint.json") or {}).get("fingerprint") != fp:
        if work.exists():
            logger.info("data: configuration or inputs changed, discarding %s", work)
            shutil.rmtree(work)
    atomic_write_json(work / "fingerprint.json", {"fingerprint": fp})

    own_executor = executor is None
    ex = executor or make_executor(cfg.executor, cfg.executor.workers or workers)
    cfg_dict = cfgmod.to_dict(cfg)
    try:
        # 1. stream
        plan = plan_tasks(files, cfg.executor.tasks)
        tids = [f"{k:05d}" for k in range(len(plan))]
        stream_dir = work / "stream"
        tasks = [
            {"cfg": cfg_dict, "seed": seed, "base_dir": base, "file": dataclasses.asdict(files[i]), "slice": s, "slices": n,
             "out": str(stream_dir / f"{tid}.jsonl.zst")}
            for tid, (i, s, n) in zip(tids, plan)
        ]
        logger.info("data: %d input file(s), %d stream task(s), %d worker(s)", len(files), len(tasks), ex.workers)
        res = ex.map(_stream_task, tasks, tids, work / "markers" / "stream", desc="data: read+filter")
        order = ["read"] + [s.name for _, s in stream_steps]
        step_stats = _merge_stats(order, [r["stats"] for r in res])
        removed: dict[str, RemovedSample] = {}
        for r in res:
            for name, recs in r["removed"].items():
                removed.setdefault(name, RemovedSample(cfg.sample_removed)).merge(recs)
        read_by_source: Counter = Counter()
        for r in res:
            read_by_source[r["source"]] += r["stats"][0]["docs_out"]
        shards = [Path(t["out"]) for t in tasks]

        # 2. corpus passes
        extra: dict[str, Any] = {}
        for j, p in enumerate(passes):
            pdir = work / "passes" / f"{j:02d}_{p.name}"
            pr = p.run(shards, pdir / "out", pdir / "work", ex, seed, cfg.sample_removed)
            shards = list(pr.shards)
            step_stats.append(pr.stats)
            if pr.removed:
                removed.setdefault(pr.stats.name, RemovedSample(cfg.sample_removed)).merge(pr.removed)
            if pr.extra:
                extra[pr.stats.name] = pr.extra

        # 3. scrub
        pii_skip = sorted({f.source for f in files if pii is not None and _skipped(pii.name, "pii", set(f.skip))})
        scrub_dir = work / "scrub"
        sids = [f"{k:05d}" for k in range(len(shards))]
        stasks = [{"cfg": cfg_dict, "shard": str(p), "out": str(scrub_dir / f"{sid}.jsonl.zst"), "pii_skip_sources": pii_skip}
                  for sid, p in zip(sids, shards)]
        sres = ex.map(_scrub_task, stasks, sids, work / "markers" / "scrub", desc="data: pii+count")
        if pii is not None:
            step_stats += _merge_stats([pii.name], [[r["stats"]] for r in sres if r["stats"]])
            for r in sres:
                removed.setdefault(pii.name, RemovedSample(cfg.sample_removed)).merge(r["removed"])

        # 4. write
        counts = [r["docs"] for r in sres]
        plans = plan_output_shards(counts, [t["out"] for t in stasks], cfg.shard_docs)
        wids = [f"{k:05d}" for k in range(len(plans))]
        wtasks = [{"pieces": pl, "out_dir": str(out), "k": k, "formats": list(cfg.outputs)} for k, pl in enumerate(plans)]
        wres = ex.map(_write_task, wtasks, wids, work / "markers" / "write", desc="data: write shards")
    finally:
        if own_executor:
            ex.close()

    written = [p for k in range(len(plans)) for p in output_paths(out, k, cfg.outputs)]
    _remove_stale(out, set(written))
    stats = _final_stats(cfg, files, step_stats, sres, wres, read_by_source, extra, time.time() - t_start)
    _write_removed(out, removed)
    atomic_write_json(out / "stats.json", stats)
    if not cfg.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return PipelineResult(stats, sorted(p for p in written if p.name.endswith(".jsonl.zst")))


def _remove_stale(out: Path, keep: set[Path]) -> None:
    for p in list(out.glob("shard_*.jsonl.zst")) + list((out / "parquet").glob("shard_*.parquet")):
        if p not in keep:
            p.unlink()
    if (out / "parquet").is_dir() and not any((out / "parquet").iterdir()):
        (out / "parquet").rmdir()


def _write_removed(out: Path, removed: dict[str, RemovedSample]) -> None:
    rdir = out / "removed"
    names = set()
    for name, rs in sorted(removed.items()):
        recs = rs.to_dict()
        if not recs:
            continue
        lines = [json.dumps({"reason": reason, **rec}, ensure_ascii=False) for reason, lst in recs.items() for rec in lst]
        atomic_write_text(rdir / f"{name}.jsonl", "\n".join(lines) + "\n")
        names.add(f"{name}.jsonl")
    if rdir.is_dir():
        for p in rdir.glob("*.jsonl"):
            if p.name not in names:
                p.unlink()


def _final_stats(cfg, files, step_stats, sres, wres, read_by_source, extra, wall) -> dict:
    domains: dict[str, list[int]] = {}
    sources: dict[str, list[int]] = {}
    for r in sres:
        for k, (d, t) in r["domains"].items():
            a = domains.setdefault(k, [0, 0])
            a[0] += d
            a[1] += t
        for k, v in r["sources"].items():
            b = sources.setdefault(k, [0, 0, 0])
            for i in range(3):
                b[i] += v[i]
    top = sorted(domains.items(), key=lambda kv: (-kv[1][1], kv[0]))[: cfg.top_domains]
    read = step_stats[0] if step_stats and step_stats[0].name == "read" else StepStats("read")
    docs_out = sum(r["docs"] for r in wres)
    chars_out = sum(r["chars"] for r in wres)
    return {
        "steps": [s.to_dict() for s in step_stats],
        "totals": {
            "input_files": len(files),
            "records_seen": read.docs_in,
            "corrupt_records": sum(v for k, v in read.dropped.items() if k.startswith("corrupt:")),
            "docs_read": read.docs_out,
            "chars_read": read.chars_out,
            "docs_out": docs_out,
            "chars_out": chars_out,
            "tokens_out": sum(v[1] for v in sources.values()),
            "shards": len(wres),
            "wall_time_s": round(wall, 2),
        },
        "sources": {
            k: {"docs_read": read_by_source.get(k, 0), "docs_out": v[0], "tokens_out": v[1], "chars_out": v[2]}
            for k, v in sorted(sources.items())
        } | {k: {"docs_read": n, "docs_out": 0, "tokens_out": 0, "chars_out": 0} for k, n in read_by_source.items() if k not in sources},
        "top_domains": [{"domain": k, "docs": v[0], "tokens": v[1]} for k, v in top],
        "tokens_note": "tokens are whitespace-separated words of the kept (final) text",
        "passes": extra,
        "outputs": list(cfg.outputs),
    }
