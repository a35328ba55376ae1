"""`lmforge train` under torchrun with pipeline parallelism (parallel.pp = 2, 1F1B over
microbatches, gradient accumulation) and context parallelism (parallel.cp = 2, doc_mask packing)
on CPU/gloo: the same losses, validation loss and final weights as one process with the same
config, and a pipeline run resumed from a mid-run checkpoint (merged per-stage optimizer states)
continues the same curve."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.train.checkpoint import load_weights

BASE = """
seq_len = 32
batch_size = 4
grad_accum = 2
max_steps = 6
warmup_steps = 2
log_every = 1
eval_every = 3
eval_batches = 2
checkpoint_every = 3
sample_tokens = 4
seed = 3
packing = "{packing}"

[model]
preset = "tiny"
d_model = 32
n_layers = 4
n_heads = 2
n_kv_heads = 1
tie_embeddings = false

[parallel]
pp_microbatches = 2
"""


def _train(tokens: Path, tokdir: Path, out: Path, packing: str, nproc: int = 1, *extra: str) -> None:
    cfg = out.parent / f"{out.name}.toml"
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg.write_text(BASE.format(packing=packing))
    args = ["train", "--tokens", str(tokens), "--tokenizer", str(tokdir), "--out", str(out), "--config", str(cfg), *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "lmforge", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "lmforge", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", LMFORGE_PROGRESS="0")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]


def _curve(out: Path) -> tuple[list[float], list[float]]:
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return ([r["loss"] for r in recs if r["kind"] == "train"], [r["val_loss"] for r in recs if r["kind"] == "eval"])


def _weights(out: Path) -> dict:
    return load_weights(sorted(out.glob("step_*"))[-1])


def _same_model(a: Path, b: Path) -> None:
    la, va = _curve(a)
    lb, vb = _curve(b)
    assert len(la) == len(lb) == 6 and len(va) == len(vb) == 2
    assert lb == pytest.approx(la, rel=1e-4, abs=1e-5)
    assert vb == pytest.approx(va, rel=1e-4, abs=1e-5)
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb)
    for k in wa:
        assert (wa[k] - wb[k]).abs().max().item() < 1e-4, k


def test_pipeline_parallel_train_matches_one_process_and_resumes(tokenized, tmp_path):
    tokens, tokdir = tokenized
    _train(tokens, tokdir, tmp_path / "single", "separator")
    _train(tokens, tokdir, tmp_path / "pp", "separator", 2, "--pretrain.parallel.pp", "2")
    _same_model(tmp_path / "single", tmp_path / "pp")
    # resume: drop the final checkpoint and its metrics, train steps 4-6 again from step 3
    shutil.rmtree(tmp_path / "pp" / "step_000006")
    (tmp_path / "pp" / "latest").unlink(missing_ok=True)
    _train(tokens, tokdir, tmp_path / "pp", "separator", 2, "--pretrain.parallel.pp", "2")
    _same_model(tmp_path / "single", tmp_path / "pp")


def test_context_parallel_train_matches_one_process(tokenized, tmp_path):
    tokens, tokdir = tokenized
    _train(tokens, tokdir, tmp_path / "single", "doc_mask")
    _train(tokens, tokdir, tmp_path / "cp", "doc_mask", 2, "--pretrain.parallel.cp", "2")
    _same_model(tmp_path / "single", tmp_path / "cp")


def test_pipeline_needs_separator_packing(tokenized, tmp_path):
    tokens, tokdir = tokenized
    cfg = tmp_path / "c.toml"
    cfg.write_text(BASE.format(packing="doc_mask"))
    env = dict(os.environ, OMP_NUM_THREADS="1", LMFORGE_PROGRESS="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmforge", "train",
           "--tokens", str(tokens), "--out", str(tmp_path / "o"), "--config", str(cfg), "--pretrain.parallel.pp", "2"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "lmforge: error: parallel.pp > 1 needs pretrain.packing = 'separator'" in r.stderr
    assert "lmforge/train/" not in r.stderr  # one clear message from each rank, no traceback of ours (torchrun prints its own)


def test_parallel_config_rejects_two_model_parallel_kinds():
    from lmforge.config import build
    from lmforge.errors import ConfigError
    from lmforge.train.config import TrainConfig

    with pytest.raises(ConfigError, match="one of tp, pp or cp"):
        build(TrainConfig, {"parallel": {"tp": 2, "pp": 2}}, "pretrain")
    with pytest.raises(ConfigError, match="parallel.cp must be >= 1"):
        build(TrainConfig, {"parallel": {"cp": 0}}, "pretrain")
