"""Peak memory of the full data pipeline at 2 workers: lmforge vs datatrove, same input, same run.

Each measurement runs in a fresh process tree; a sampler in this process adds up the resident
memory (VmRSS) of the tree's root and every descendant (pool workers, fork servers) every 50 ms
and keeps the peak, with the same code for both sides.
- lmforge: `python -m lmforge data run CONFIG --workers 2` in a new process (its interpreter,
  imports and the CLI are in the figure);
- datatrove: a new worker process in the peers' environment (.venv-peers,
  scripts/setup_bench.sh; benchmarks/peers/worker.py `datatrove_warc_pipeline`), started for
  this one measurement and closed after it; its interpreter, imports and executor pool are in
  the figure, and its idle RSS before the call (an interpreter with json loaded) is printed
  beside it. LocalPipelineExecutor(tasks=2, workers=2).
Wall seconds are measured around each side's run (lmforge: the CLI process; datatrove: the
executor inside the worker); they are printed for orientation, not as the comparison.
Inputs:

- `sample`: the bundled sample corpus (WARC + JSONL.gz + JSONL.zst + Parquet), through the
  demo recipe's `[data]` section (lmforge only: datatrove needs one reader per format);
- `warc`: ../shared/corpus/web/python-docs.warc.gz (530 HTML pages), through both tools:
  read -> HTML extraction (trafilatura) -> language ID (fastText lid.176) -> Gopher
  repetition + quality -> C4 -> FineWeb -> (lmforge only: exact + MinHash dedup, PII) -> write.

    python benchmarks/bench_data_memory.py [--inputs sample,warc] [--no-datatrove]
    python benchmarks/bench_data_memory.py --quick   # the WARC input only

The work differs: lmforge also runs exact + MinHash dedup and PII masking (its pipeline has
them on by default), so its figure covers more stages than datatrove's.
Prints a side-by-side table and the lmforge/datatrove ratios; writes
benchmarks/out/data_memory.json. Last line: `RESULT {json}`: headline = datatrove's peak RSS /
lmforge's (one task) on the WARC input, higher is better (goal 1.0: no more memory than datatrove).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
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


class TreeSampler:
    """Peak of tree_rss_kb(root) while the `with` block runs, sampled every 50 ms."""

    def __init__(self, root: int):
        self.root, self.peak, self.procs = root, 0, 0
        self.stop = threading.Event()
        self.th = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            kb, n = tree_rss_kb(self.root)
            if kb > self.peak:
                self.peak, self.procs = kb, n
            if self.stop.wait(0.05):
                return

    def __enter__(self) -> "TreeSampler":
        self.th.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.th.join()


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with TreeSampler(proc.pid) as s:
        out, err = proc.communicate()
    peak = {"kb": s.peak, "procs": s.procs}
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


def datatrove_run(src: Path, tmp: Path, workers: int) -> dict:
    """datatrove's pipeline in a fresh peers' worker, started for this measurement only."""
    from peer_env import Peer

    with Peer() as peer:
        idle = peer.call("rss")["tree_kb"]
        with TreeSampler(peer.proc.pid) as s:
            r = peer.call("datatrove_warc_pipeline", src=str(src), out=str(tmp / "dt_out"), logs=str(tmp / "dt_logs"), workers=workers)
        versions = peer.describe()
    return {"wall_s": round(r["wall_s"], 1), "peak_rss_mb": round(s.peak / 1024, 1), "procs_at_peak": s.procs,
            "idle_rss_mb": round(idle / 1024, 1), "docs_out": r["docs_out"], "docs_read": None, "versions": versions,
            "worker_self_maxrss_mb": round(r["self_maxrss_kb"] / 1024, 1),
            "children_maxrss_mb": round(r["children_maxrss_kb"] / 1024, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", default="sample,warc")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-datatrove", "--skip-peers", dest="no_datatrove", action="store_true")
    ap.add_argument("--quick", action="store_true", help="the WARC input only")
    args = ap.parse_args()
    if args.quick:
        args.inputs = "warc"
    load0 = os.getloadavg()
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
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
                r = datatrove_run(WARC, tmp, args.workers)
                print(r["versions"])
                rows.append(("python-docs.warc.gz", "datatrove", r))
    print(f"\nfull data pipeline, {args.workers} workers: peak RSS of the whole process tree (parent + workers)\n")
    print(f"{'input':<26}{'tool':<20}{'peak RSS MB':>12}{'procs':>7}{'wall s':>8}{'docs out':>10}")
    for inp, tool, r in rows:
        print(f"{inp:<26}{tool:<20}{r['peak_rss_mb']:>12.1f}{r['procs_at_peak']:>7}{r['wall_s']:>8.1f}{r['docs_out']:>10}")
    dt = {inp: r for inp, tool, r in rows if tool == "datatrove"}
    for inp, tool, r in rows:
        if tool.startswith("lmforge") and inp in dt:
            print(f"ratio {tool} / datatrove on {inp}: memory {r['peak_rss_mb'] / dt[inp]['peak_rss_mb']:.2f}x, "
                  f"wall time {r['wall_s'] / dt[inp]['wall_s']:.2f}x")
    for inp, r in dt.items():
        print(f"datatrove's worker before the call (interpreter + json, no datatrove imported yet): {r['idle_rss_mb']:.1f} MB of "
              f"its {r['peak_rss_mb']:.1f} MB; the worker's own peak RSS {r['worker_self_maxrss_mb']:.1f} MB (the rest: the "
              "executor's forkserver and pool processes)")
    out = REPO / "benchmarks" / "out" / "data_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([{"input": i, "tool": t, **{k: v for k, v in r.items() if k != "stdout"}} for i, t, r in rows], indent=2))
    print(f"\nwrote {out}")
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")
    lm = next((r for inp, tool, r in rows if tool == "lmforge" and inp in dt), None)
    d = next(iter(dt.values()), None)
    head = d["peak_rss_mb"] / lm["peak_rss_mb"] if d and lm else None
    print("RESULT " + json.dumps({
        "bench": "data_memory", "headline": round(head, 2) if head else None, "goal": 1.0, "met": bool(head is not None and head >= 1.0),
        "what": f"peak RSS of the whole process tree, python-docs.warc.gz at {args.workers} workers: datatrove / lmforge "
                "(lmforge also dedups and masks PII)",
        "peak_rss_mb": {f"{inp}: {tool}": r["peak_rss_mb"] for inp, tool, r in rows},
        "wall_s": {f"{inp}: {tool}": r["wall_s"] for inp, tool, r in rows},
        "docs_out": {f"{inp}: {tool}": r["docs_out"] for inp, tool, r in rows},
        "load_before": round(load0[0], 2), "load_after": round(load1[0], 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
