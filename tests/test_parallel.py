"""Distributed training on CPU with gloo at world size 2: DDP, FSDP2 and tensor parallelism give
the same losses as one process at the same global batch (within float tolerance)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).parent / "helpers" / "dist_train_check.py"


def _run(mode: str, tmp_path: Path, nproc: int) -> dict:
    out = tmp_path / f"{mode}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), mode, str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER), mode, str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return _run("single", tmp_path_factory.mktemp("single"), 1)


@pytest.mark.parametrize("mode,nproc", [("ddp", 2), ("fsdp", 2), ("tp", 2), ("fsdp_tp", 4)])
def test_distributed_matches_single_process(mode, nproc, single, tmp_path):
    got = _run(mode, tmp_path, nproc)
    for (l1, g1), (l2, g2) in zip(single["losses"], got["losses"]):
        assert l2 == pytest.approx(l1, rel=1e-4, abs=1e-5)
        assert g2 == pytest.approx(g1, rel=1e-3, abs=1e-5)
    assert got["checksum"] == pytest.approx(single["checksum"], rel=1e-4)
    assert got["reload_checksum"] == pytest.approx(got["checksum"], rel=1e-6)  # sharded checkpoint round trip
