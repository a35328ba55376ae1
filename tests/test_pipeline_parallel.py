"""Pipeline parallelism on CPU/gloo at world size 2 (GPipe and 1F1B, 4 microbatches): same losses
and final weights as one process at the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.errors import ConfigError
from lmforge.train.pipeline_parallel import stage_bounds

WORKER = Path(__file__).parent / "helpers" / "dist_pp_check.py"


def _run(mode, tmp_path, nproc):
    out = tmp_path / f"{mode}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(WORKER), mode, str(out)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER), mode, str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_stage_bounds_cover_all_layers():
    assert [stage_bounds(10, 3, r) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    with pytest.raises(ConfigError):
        stage_bounds(2, 3, 0)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_matches_single_process(schedule, tmp_path):
    single = _run("single", tmp_path, 1)
    got = _run(schedule, tmp_path, 2)
    assert got["losses"] == pytest.approx(single["losses"], rel=1e-4)
    assert got["checksum"] == pytest.approx(single["checksum"], rel=1e-4)
