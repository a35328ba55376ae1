"""Context parallelism on CPU/gloo at world size 2: the sequence split across ranks gives the
same losses and gradients as one process on the whole sequence."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "helpers" / "dist_cp_check.py"


def _run(mode, tmp_path, nproc):
    out = tmp_path / f"{mode}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(WORKER), mode, str(out)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER), mode, str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_context_parallel_matches_full_sequence(tmp_path):
    full = _run("single", tmp_path, 1)
    cp = _run("cp", tmp_path, 2)
    assert cp["grad0"] == pytest.approx(full["grad0"], rel=1e-4)
    assert cp["losses"] == pytest.approx(full["losses"], rel=1e-4)
