"""The peers' own environment (.venv-peers, made by scripts/setup_bench.sh) and a worker in it.

datatrove pins trafilatura<1.12 and xxhash<4, lmforge needs trafilatura>=1.12, so the peers
(datatrove, datasketch, spaCy) live in their own virtual environment. A benchmark starts one
long-lived worker process there (`benchmarks/peers/worker.py`) and sends it requests; the
worker does the peer's work, times it inside its own process around the same stages that
lmforge's side times, and answers with JSON (figures, decisions, outputs). One process for the
whole run keeps the peer's caches (spaCy's, datatrove's) as warm as lmforge's in-process ones.

The interpreter is $LMFORGE_PEERS_PYTHON if set, else .venv-peers/bin/python at the repository root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "peers" / "worker.py"
LOG = Path(__file__).resolve().parent / "out" / "peer_worker.log"


def peer_python() -> Path:
    p = Path(os.environ.get("LMFORGE_PEERS_PYTHON") or ROOT / ".venv-peers" / "bin" / "python")
    if not p.exists():
        raise SystemExit(f"the peers' environment is missing ({p}): run `bash scripts/setup_bench.sh` first "
                         "(or set LMFORGE_PEERS_PYTHON), or pass --skip-peers")
    return p


class Peer:
    """A worker process in the peers' environment: `call(fn, **args)` -> dict."""

    def __init__(self, threads: int = 1):
        env = dict(os.environ)
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
            env[k] = str(threads)
        env.pop("PYTHONPATH", None)  # nothing of lmforge's environment leaks into the peer's
        LOG.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(LOG, "w")  # the peer's own logging (datatrove's tables, warnings), kept out of the results
        self.proc = subprocess.Popen([str(peer_python()), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env, cwd=str(ROOT), bufsize=1)
        self.versions = self.call("versions")

    def call(self, fn: str, **args) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"fn": fn, "args": args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the peer worker died during {fn!r} (exit code {self.proc.wait()}); see {LOG}")
        r = json.loads(line)
        if "error" in r:
            raise RuntimeError(f"peer worker, {fn}: {r['error']} (traceback in {LOG})")
        return r["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> str:
        return "peers (" + str(peer_python()) + "): " + ", ".join(f"{k} {v}" for k, v in self.versions.items())


def lmforge_versions(*packages: str) -> str:
    import importlib.metadata as m

    out = []
    for p in ("lmforge",) + packages:
        try:
            out.append(f"{p} {m.version(p)}")
        except m.PackageNotFoundError:
            out.append(f"{p} (not installed)")
    return f"lmforge side ({sys.executable}): " + ", ".join(out)
