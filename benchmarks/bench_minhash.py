"""MinHash dedup: lmforge vs datasketch (signatures) and vs datatrove (end to end), same input, same run.

    python benchmarks/bench_minhash.py [--dict-docs 50000] [--sketch-docs 20000] [--skip-datatrove]

Inputs: the first N entries of ../shared/corpus/dictionary/gcide.jsonl.gz and all of
code/python-stdlib.jsonl.gz. Everything runs on one core (workers=1, tasks=1).

1. Signatures (documents/s per core, 112 permutations = 14 bands x 8 rows):
   - datasketch: `MinHash(num_perm=112).update_batch(shingles)` where the shingles are the very
     word 5-grams lmforge hashes (its normalised words joined by spaces, as bytes); building
     those strings is NOT counted for datasketch (in its favour);
   - lmforge: text -> normalised words -> 64-bit shingle hashes -> signatures, all counted.
2. End to end (signatures -> buckets -> clusters -> filter, reading and writing compressed JSONL):
   - datatrove: MinhashDedupSignature / MinhashDedupBuckets / MinhashDedupCluster /
     MinhashDedupFilter with LocalPipelineExecutor (tasks=1, workers=1; 14 bucket tasks), 64-bit hashes,
     uncompressed JSONL output (its fastest writer; lmforge writes .jsonl.zst);
   - lmforge: MinhashDedupPass with LocalExecutor(1), with the exact Jaccard check (default) and without.
3. The dictionary false-positive question: of the first 20,000 entries, how many each side flags,
   how many of those are byte-identical to an earlier entry, and the true Jaccard of the flagged pairs.

Prints side-by-side tables and ratios; writes benchmarks/out/minhash.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
CORPUS = HERE.parents[1] / "shared" / "corpus"
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("LMFORGE_PROGRESS", "0")

from lmforge.data.corpus_io import write_shard  # noqa: E402
from lmforge.data.dedup.minhash import (  # noqa: E402
    MinhashConfig, MinhashDedupPass, batch_shingles, permutations, signatures, text_batches, words,
)
from lmforge.data.document import Document  # noqa: E402
from lmforge.data.executor import LocalExecutor  # noqa: E402


def load(path: Path, n: int | None) -> list[dict]:
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            out.append({"id": str(r["id"]), "text": r["text"]})
            if n and len(out) >= n:
                break
    return out


def shingle_strings(text: str, n: int = 5) -> list[bytes]:
    w = words(text)
    if not w:
        return []
    if len(w) < n:
        return [" ".join(w).encode()]
    return [" ".join(w[i : i + n]).encode() for i in range(len(w) - n + 1)]


def lmforge_signatures(texts: list[str]) -> tuple[float, np.ndarray]:
    a, b = permutations(112, 1)
    batch_shingles(["warm up the tables"])
    t0 = time.perf_counter()
    sigs = []
    for i, j in text_batches(texts):
        h, offs = batch_shingles(texts[i:j], 5)
        sigs.append(signatures(h, offs, a, b))
    return time.perf_counter() - t0, np.concatenate(sigs)


def datasketch_signatures(texts: list[str]) -> tuple[float, list]:
    from datasketch import MinHash

    sh = [shingle_strings(t) for t in texts]  # not timed
    t0 = time.perf_counter()
    out = []
    for s in sh:
        m = MinHash(num_perm=112)
        m.update_batch(s)
        out.append(m)
    return time.perf_counter() - t0, out


def run_datatrove(jsonl_gz: Path, work: Path) -> tuple[float, int, dict]:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig as DTConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    import xxhash
    from loguru import logger as dt_logger

    import datatrove.utils.hashes.xxhash as dt_xx

    # datatrove 0.10 hands str to xxhash, which xxhash >= 4 refuses; encode first (xxhash 3 did
    # the same UTF-8 encoding internally, so the cost is unchanged)
    dt_xx.xxhash64 = lambda d: xxhash.xxh64_intdigest(d.encode("utf-8") if isinstance(d, str) else d)
    dt_xx.xxhash32 = lambda d: xxhash.xxh32_intdigest(d.encode("utf-8") if isinstance(d, str) else d)

    dt_logger.remove()  # datatrove's per-task log tables would drown the results
    cfg = DTConfig(hash_config=HashConfig(precision=64), num_buckets=14, hashes_per_bucket=8, n_grams=5)
    reader = lambda: JsonlReader(str(jsonl_gz.parent), glob_pattern=jsonl_gz.name)  # noqa: E731
    times = {}
    t0 = time.perf_counter()
    LocalPipelineExecutor(pipeline=[reader(), MinhashDedupSignature(output_folder=str(work / "sigs"), config=cfg)],
                          tasks=1, workers=1, logging_dir=str(work / "logs1")).run()
    times["signatures"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    LocalPipelineExecutor(pipeline=[MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=cfg)],
                          tasks=cfg.num_buckets, workers=1, logging_dir=str(work / "logs2")).run()
    times["buckets"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    LocalPipelineExecutor(pipeline=[MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=cfg)],
                          tasks=1, workers=1, logging_dir=str(work / "logs3")).run()
    times["clusters"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    LocalPipelineExecutor(pipeline=[reader(), MinhashDedupFilter(input_folder=str(work / "remove")),
                                    JsonlWriter(str(work / "out"), compression=None)],
                          tasks=1, workers=1, logging_dir=str(work / "logs4")).run()
    times["filter"] = time.perf_counter() - t3
    total = time.perf_counter() - t0
    kept = 0
    for f in (work / "out").glob("*.jsonl"):
        with open(f) as fh:
            kept += sum(1 for _ in fh)
    return total, kept, times


def run_lmforge(shard_dir: Path, work: Path, verify: str) -> tuple[float, int, dict]:
    shards = sorted(shard_dir.glob("*.jsonl.zst"))
    t0 = time.perf_counter()
    r = MinhashDedupPass(MinhashConfig(verify=verify)).run(shards, work / "out", work / "work", LocalExecutor(1), 0, 5)
    return time.perf_counter() - t0, r.stats.docs_out, r.extra


def jaccard(x: str, y: str) -> float:
    a, b = set(shingle_strings(x)), set(shingle_strings(y))
    return len(a & b) / max(1, len(a | b))


def false_positive_study(docs: list[dict], tmp: Path) -> dict:
    """First 20,000 dictionary entries: who flags what, and are the flagged ones real duplicates?"""
    from datasketch import MinHashLSH

    docs = docs[:20000]
    texts = [d["text"] for d in docs]
    _, mh = datasketch_signatures(texts)
    lsh = MinHashLSH(num_perm=112, params=(14, 8))
    flagged_ds, first_text = [], {}
    for i, m in enumerate(mh):
        if lsh.query(m):
            flagged_ds.append(i)
        lsh.insert(str(i), m)
    exact_dup = set()
    for i, t in enumerate(texts):
        if t in first_text:
            exact_dup.add(i)
        else:
            first_text[t] = i
    # lmforge, no exact check and min_shingles=1 (closest to plain LSH), then the defaults
    shard = tmp / "fp" / "in"
    write_shard(shard / "g.jsonl.zst", [Document(str(i), t) for i, t in enumerate(texts)])
    res = {}
    for name, cfg in [("lmforge LSH only (verify=none, min_shingles=1)", MinhashConfig(verify="none", min_shingles=1)),
                      ("lmforge defaults (exact check >= 0.8, min_shingles=10)", MinhashConfig())]:
        w = tmp / "fp" / name.split()[1]
        shutil.rmtree(w, ignore_errors=True)
        r = MinhashDedupPass(cfg).run([shard / "g.jsonl.zst"], w / "out", w / "work", LocalExecutor(1), 0, 100000)
        removed = [int(x["id"]) for x in r.removed.get("near_duplicate", [])]
        res[name] = {"removed": r.stats.dropped["near_duplicate"], "exact_copies_among_removed": sum(i in exact_dup for i in removed),
                     "verified_jaccard_quantiles": r.extra.get("verified_jaccard_quantiles")}
    # true Jaccard of what datasketch flagged: against its best earlier match among the LSH candidates
    lsh2 = MinHashLSH(num_perm=112, params=(14, 8))
    jac = []
    for i, m in enumerate(mh):
        cands = lsh2.query(m)
        if cands:
            jac.append(max(jaccard(texts[i], texts[int(c)]) for c in cands))
        lsh2.insert(str(i), m)
    jac = np.array(jac)
    res["datasketch MinHashLSH(14x8)"] = {
        "removed": len(flagged_ds), "exact_copies_among_removed": sum(i in exact_dup for i in flagged_ds),
        "best_match_jaccard_quantiles": [round(float(q), 3) for q in np.quantile(jac, [0, 0.1, 0.5, 0.9, 1])] if len(jac) else None,
        "below_0.8": int((jac < 0.8).sum()), "below_0.5": int((jac < 0.5).sum()),
    }
    res["exact_duplicates_in_20000"] = len(exact_dup)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dict-docs", type=int, default=50000, help="dictionary entries for the end-to-end run")
    ap.add_argument("--sketch-docs", type=int, default=20000, help="dictionary entries for the signature comparison")
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="signature runs per side (best is kept)")
    ap.add_argument("--skip-fp", action="store_true", help="skip the false-positive study")
    args = ap.parse_args()
    OUT.mkdir(exist_ok=True)
    gcide = load(CORPUS / "dictionary" / "gcide.jsonl.gz", max(args.dict_docs, args.sketch_docs, 20000))
    code = load(CORPUS / "code" / "python-stdlib.jsonl.gz", None)
    results: dict = {"signatures": {}, "end_to_end": {}}

    print("== MinHash signatures, 112 permutations, one core ==")
    print(f"{'input':<22}{'docs':>8}{'MB':>7}{'datasketch/s':>14}{'lmforge/s':>12}{'ratio':>8}{'ds MB/s':>9}{'lmf MB/s':>10}")
    for name, docs in [("dictionary (gcide)", gcide[: args.sketch_docs]), ("code (python stdlib)", code)]:
        texts = [d["text"] for d in docs]
        mb = sum(len(t.encode()) for t in texts) / 1e6
        # alternate the two sides and keep each one's best of --repeat runs (the machine is shared)
        t_ds = t_lf = float("inf")
        for _ in range(args.repeat):
            t_ds = min(t_ds, datasketch_signatures(texts)[0])
            t_lf = min(t_lf, lmforge_signatures(texts)[0])
        r = {"docs": len(texts), "mb": round(mb, 2), "datasketch_docs_s": len(texts) / t_ds, "lmforge_docs_s": len(texts) / t_lf,
             "ratio": t_ds / t_lf, "datasketch_mb_s": mb / t_ds, "lmforge_mb_s": mb / t_lf}
        results["signatures"][name] = r
        print(f"{name:<22}{len(texts):>8}{mb:>7.1f}{r['datasketch_docs_s']:>14,.0f}{r['lmforge_docs_s']:>12,.0f}{r['ratio']:>7.1f}x"
              f"{r['datasketch_mb_s']:>9.2f}{r['lmforge_mb_s']:>10.2f}")

    print("\n== End to end: signatures -> buckets -> clusters -> filter, one core ==")
    tmp = Path(tempfile.mkdtemp(prefix="bench_minhash_"))
    try:
        for name, docs in [(f"dictionary ({args.dict_docs:,})", gcide[: args.dict_docs]), ("code (python stdlib)", code)]:
            d = tmp / name.split()[0]
            (d / "dt_in").mkdir(parents=True)
            with gzip.open(d / "dt_in" / "input.jsonl.gz", "wt", encoding="utf-8") as f:
                for x in docs:
                    f.write(json.dumps(x) + "\n")
            for k in range(0, len(docs), 25000):
                write_shard(d / "lf_in" / f"part_{k // 25000:04d}.jsonl.zst", [Document(x["id"], x["text"]) for x in docs[k : k + 25000]])
            row = {"docs": len(docs)}
            if not args.skip_datatrove:
                import contextlib

                with open(OUT / "minhash_datatrove.log", "w") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
                    t, kept, parts = run_datatrove(d / "dt_in" / "input.jsonl.gz", d / "dt")
                row["datatrove"] = {"s": t, "kept": kept, "stages_s": parts}
            for verify in ("exact", "none"):
                t, kept, extra = run_lmforge(d / "lf_in", d / f"lf_{verify}", verify)
                row[f"lmforge_{verify}"] = {"s": t, "kept": kept, "candidate_pairs": extra["candidate_pairs"], "verified_pairs": extra["verified_pairs"]}
            results["end_to_end"][name] = row
            print(f"-- {name}: {len(docs):,} documents")
            print(f"   {'tool':<34}{'seconds':>9}{'docs/s':>10}{'kept':>9}{'ratio vs datatrove':>20}")
            base = row.get("datatrove", {}).get("s")
            for k in ("datatrove", "lmforge_exact", "lmforge_none"):
                if k not in row:
                    continue
                v = row[k]
                label = {"datatrove": "datatrove 4 stages", "lmforge_exact": "lmforge (exact Jaccard check)", "lmforge_none": "lmforge (no check)"}[k]
                ratio = f"{base / v['s']:.2f}x" if base else "-"
                print(f"   {label:<34}{v['s']:>9.2f}{len(docs) / v['s']:>10,.0f}{v['kept']:>9,}{ratio:>20}")
            if "datatrove" in row:
                print(f"   datatrove stage seconds: { {k: round(v, 2) for k, v in row['datatrove']['stages_s'].items()} }")
        if not args.skip_fp:
            print("\n== First 20,000 dictionary entries: what is flagged as a near-duplicate ==")
            fp = false_positive_study(gcide, tmp)
            results["false_positives"] = fp
            print(f"   byte-identical repeats of an earlier entry: {fp['exact_duplicates_in_20000']:,}")
            for k, v in fp.items():
                if isinstance(v, dict):
                    print(f"   {k:<58} removed {v['removed']:>6,}  of them exact copies {v['exact_copies_among_removed']:>6,}  "
                          + ", ".join(f"{a}={b}" for a, b in v.items() if a not in ("removed", "exact_copies_among_removed")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    (OUT / "minhash.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"\nwrote {OUT / 'minhash.json'}")


if __name__ == "__main__":
    main()
