"""Memory and disk per million documents of each dedup method; suffix-array build rate.

    python benchmarks/bench_dedup_memory.py [--sizes 20000,40000] [--substring-mb 8,24]

Every method runs in a fresh child process (one worker, tasks in-process) on the first N
entries of ../shared/corpus/dictionary/gcide.jsonl.gz (prepared as 10,000-document shards
before the child starts), at two sizes; the peak resident memory (VmHWM) and the work
directory's size on disk are measured. The per-million figures are the slope between the
two sizes (so the interpreter's fixed ~100 MB does not count) times one million. The
substring pass runs on the first K MB of the same entries and reports the suffix array +
LCP build rate and peak memory per corpus byte. A child that imports everything and runs
nothing gives the baseline. Writes benchmarks/out/dedup_memory.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
CORPUS = HERE.parents[1] / "shared" / "corpus"
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("LMFORGE_PROGRESS", "0")

METHODS = ["exact", "minhash", "bloom", "lines", "decontam"]


def peak_rss() -> int:
    """VmHWM of this process (ru_maxrss would carry the parent's peak over fork + exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def disk_usage(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def child(method: str, shard_dir: Path, work: Path, eval_file: str) -> None:
    from lmforge.data.dedup import build_passes
    from lmforge.config import build
    from lmforge.data.dedup import DedupConfig
    from lmforge.data.executor import LocalExecutor

    shards = sorted(shard_dir.glob("*.jsonl.zst"))
    t0 = time.perf_counter()
    extra = {}
    if method != "baseline":
        raw = {m: {"enabled": m == method} for m in ["exact", "lines", "minhash", "bloom", "substring"]}
        raw["decontam"] = {"eval_files": [eval_file] if method == "decontam" else []}
        if method == "substring":
            raw["substring"]["max_bytes"] = 2**31 - 2
        (p,) = build_passes(build(DedupConfig, raw, "dedup"))
        r = p.run(shards, work / "out", work / "work", LocalExecutor(1), 0, 5)
        extra = {k: v for k, v in r.extra.items() if isinstance(v, (int, float, str))}
    wall = time.perf_counter() - t0
    print(json.dumps({"peak_rss": peak_rss(), "wall_s": wall,
                      "work_disk": disk_usage(work / "work"), "extra": extra}))


def prepare(n: int, root: Path, docs: list[dict]) -> Path:
    from lmforge.data.corpus_io import write_shard
    from lmforge.data.document import Document

    d = root / f"n{n}"
    if not d.exists():
        for k in range(0, n, 10000):
            write_shard(d / f"part_{k // 10000:04d}.jsonl.zst", [Document(x["id"], x["text"]) for x in docs[k : min(n, k + 10000)]])
    return d


def run_child(method: str, shard_dir: Path, work: Path, eval_file: str) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    out = subprocess.run([sys.executable, __file__, "--child", method, str(shard_dir), str(work), eval_file],
                         capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)
    return res


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="20000,40000", help="two corpus sizes (documents)")
    ap.add_argument("--substring-mb", default="8,24", help="two corpus sizes for the substring pass (MB of text)")
    args = ap.parse_args()
    n1, n2 = (int(x) for x in args.sizes.split(","))
    m1, m2 = (float(x) for x in args.substring_mb.split(","))
    docs = []
    with gzip.open(CORPUS / "dictionary" / "gcide.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            docs.append({"id": r["id"], "text": r["text"]})
    tmp = Path(tempfile.mkdtemp(prefix="bench_mem_"))
    results: dict = {"sizes": [n1, n2], "methods": {}}
    try:
        ev = tmp / "eval.jsonl"
        with open(ev, "w") as f:  # 2,000 evaluation items: dictionary entries from the far end of the file
            for x in docs[-2000:]:
                f.write(json.dumps({"text": x["text"]}) + "\n")
        d1, d2 = prepare(n1, tmp, docs), prepare(n2, tmp, docs)
        base = run_child("baseline", d1, tmp / "w", str(ev))
        results["baseline_rss"] = base["peak_rss"]
        print(f"baseline (interpreter + imports): {base['peak_rss'] / 2**20:.0f} MB peak RSS")
        print(f"\n{'method':<10}{'RSS@' + str(n1):>12}{'RSS@' + str(n2):>12}{'RAM MB/1M docs':>16}{'disk MB/1M docs':>17}{'docs/s':>9}")
        for m in METHODS:
            a, b = run_child(m, d1, tmp / "w", str(ev)), run_child(m, d2, tmp / "w", str(ev))
            ram = max(0.0, (b["peak_rss"] - a["peak_rss"]) / (n2 - n1) * 1e6 / 2**20)
            disk = max(0.0, (b["work_disk"] - a["work_disk"]) / (n2 - n1) * 1e6 / 2**20)
            results["methods"][m] = {"rss": [a["peak_rss"], b["peak_rss"]], "ram_mb_per_million": ram, "disk_mb_per_million": disk,
                                     "docs_per_s": n2 / b["wall_s"], "extra": b["extra"]}
            print(f"{m:<10}{a['peak_rss'] / 2**20:>10.0f}MB{b['peak_rss'] / 2**20:>10.0f}MB{ram:>16,.0f}{disk:>17,.0f}{n2 / b['wall_s']:>9,.0f}")
        # substring: by corpus bytes
        print("\nsubstring (suffix array over the corpus bytes):")
        print(f"{'corpus MB':>10}{'docs':>9}{'peak RSS MB':>13}{'SA+LCP s':>10}{'MB/s':>7}{'RSS bytes/byte':>16}")
        rows = []
        for mb in (m1, m2):
            n, size = 0, 0
            while n < len(docs) and size < mb * 1e6:
                size += len(docs[n]["text"].encode()) + 1
                n += 1
            d = prepare(n, tmp, docs)
            r = run_child("substring", d, tmp / "w", str(ev))
            sa_s = r["extra"]["suffix_array_s"]
            rows.append({"mb": size / 1e6, "docs": n, "peak_rss": r["peak_rss"], "sa_s": sa_s, "mb_per_s": size / 1e6 / sa_s})
            print(f"{size / 1e6:>10.1f}{n:>9,}{r['peak_rss'] / 2**20:>13.0f}{sa_s:>10.2f}{size / 1e6 / sa_s:>7.2f}"
                  f"{(r['peak_rss'] - base['peak_rss']) / size:>16.1f}")
        slope = (rows[1]["peak_rss"] - rows[0]["peak_rss"]) / ((rows[1]["mb"] - rows[0]["mb"]) * 1e6)
        results["substring"] = {"runs": rows, "rss_bytes_per_corpus_byte": slope}
        avail = 3 * 2**30
        slope = max(slope, 1e-9)
        print(f"   marginal memory: {slope:.1f} bytes per corpus byte -> about {avail / slope / 1e6:,.0f} MB of text "
              f"fits a 3 GiB process on this machine")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "dedup_memory.json").write_text(json.dumps(results, indent=2))
    print(f"\nwrote {OUT / 'dedup_memory.json'}")


if __name__ == "__main__":
    main()
