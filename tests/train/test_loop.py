"""End-to-end pretraining on real text: metrics, checkpoints, resume after kill -9, corrupt
checkpoints, divergence, gradient accumulation, the recipe stage and the CLI."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config import to_dict
from lmforge.errors import ConfigError, InputError
from lmforge.train import checkpoint as ck
from lmforge.train.loop import TrainingDiverged, train
from lmforge.train.metrics import read_metrics

from .conftest import micro_cfg


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(path) if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference(tokenized, tmp_path_factory):
    """One uninterrupted 24-step run shared by several tests."""
    tokens, tokdir = tokenized
    out = tmp_path_factory.mktemp("ref")
    res = train(micro_cfg(max_steps=24, checkpoint_every=8, keep_last=2, eval_every=12), tokens, out, tokdir)
    return res


def test_training_learns_and_writes_metrics_checkpoints_plot(reference):
    res = reference
    recs = read_metrics(res.metrics_path)
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, 25))
    assert train_recs[-1]["loss"] < train_recs[0]["loss"] - 0.3  # it learns
    for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens"):
        assert k in train_recs[-1]
    assert train_recs[-1]["tokens"] == 24 * 4 * 32
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [12, 24]
    assert 0 < evals[-1]["val_bpb"] < evals[-1]["val_loss"] / 0.69  # bits/byte < bits/token (tokens hold >1 byte)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    samples = [r for r in recs if r["kind"] == "samples"]
    assert samples and all(isinstance(s["completion"], str) for s in samples[-1]["samples"])
    assert [p.name for p in ck.list_checkpoints(res.out_dir)] == ["step_000016", "step_000024"]
    assert res.checkpoint.name == "step_000024" and ck.verify(res.checkpoint) is None
    state = json.loads((res.checkpoint / "state.json").read_text())
    assert state["data"]["pos"] == 24 * 4 and set(state["checksums"]) >= {"model.safetensors", "optimizer.pt", "tokenizer.json"}
    assert res.plot_path.stat().st_size > 10_000 and res.plot_path.read_bytes()[:4] == b"\x89PNG"


def test_resume_after_kill_9_continues_the_same_loss_curve(tokenized, tmp_path):
    """A real subprocess is killed with SIGKILL mid-run; the resumed run's losses equal an
    uninterrupted run's bit for bit."""
    tokens, tokdir = tokenized
    steps = 60
    cfg = micro_cfg(max_steps=steps, checkpoint_every=5, keep_last=2, eval_every=0, sample_prompts=[])
    conf = tmp_path / "train.toml"
    import tomli_w

    conf.write_text(tomli_w.dumps({"pretrain": to_dict(cfg)}))
    out = tmp_path / "killed"
    env = dict(os.environ, LMFORGE_PROGRESS="0", OMP_NUM_THREADS="1")  # same thread count as this process
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "train", "--tokens", str(tokens), "--tokenizer", str(tokdir),
                             "--out", str(out), "--config", str(conf)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "step_000005" / "state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the training subprocess made no checkpoint in time"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = max(_losses(out / "metrics.jsonl"))
    assert killed_at < steps, "the run finished before it was killed"
    resumed = train(cfg, tokens, out, tokdir)
    assert resumed.resumed_from is not None and 5 <= resumed.resumed_from < steps
    ref = train(cfg, tokens, tmp_path / "ref", tokdir)
    got, want = _losses(out / "metrics.jsonl"), _losses(tmp_path / "ref" / "metrics.jsonl")
    assert sorted(got) == list(range(1, steps + 1))
    assert got == want  # bit-identical on CPU
    a, b = ck.load_weights(resumed.checkpoint), ck.load_weights(ref.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupt_latest_checkpoint_falls_back_to_previous(reference, tokenized, tmp_path):
    tokens, tokdir = tokenized
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference.out_dir, out)
    f = out / "step_000024" / "optimizer.pt"
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated
    res = train(micro_cfg(max_steps=24, checkpoint_every=8, keep_last=2, eval_every=12), tokens, out, tokdir)
    assert res.resumed_from == 16
    assert _losses(out / "metrics.jsonl") == _losses(reference.metrics_path)  # same curve from step 16 on
    assert ck.verify(out / "step_000024") is None  # rewritten intact


def test_resume_refuses_a_different_config(reference, tokenized, tmp_path):
    tokens, tokdir = tokenized
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference.out_dir, out)
    with pytest.raises(ConfigError, match="different training config.*lr"):
        train(micro_cfg(max_steps=30, checkpoint_every=8, eval_every=12, lr=0.01), tokens, out, tokdir)
    # extending the run is allowed and continues from the last checkpoint
    res = train(micro_cfg(max_steps=26, checkpoint_every=8, keep_last=2, eval_every=0, sample_prompts=[]), tokens, out, tokdir)
    assert res.resumed_from == 24 and res.steps == 26


def test_nan_loss_stops_with_step_and_keeps_last_good_checkpoint(tokenized, tmp_path, monkeypatch):
    tokens, tokdir = tokenized
    from lmforge.model import transformer as T

    orig = T.Transformer.forward
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        logits, loss = orig(self, *a, **kw)
        if loss is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 13:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(T.Transformer, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss nan at step 13.*step_000010.*lower pretrain\.lr"):
        train(micro_cfg(max_steps=20, checkpoint_every=10, eval_every=0, sample_prompts=[]), tokens, tmp_path, tokdir)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_000010"]
    assert ck.verify(tmp_path / "step_000010") is None


def test_gradient_accumulation_matches_the_full_batch(tokenized, tmp_path):
    tokens, _ = tokenized
    kw = dict(max_steps=3, eval_every=0, checkpoint_every=0, sample_prompts=[], optimizer="adamw", grad_clip=0.0)
    full = train(micro_cfg(batch_size=4, grad_accum=1, **kw), tokens, tmp_path / "a")
    accum = train(micro_cfg(batch_size=2, grad_accum=2, **kw), tokens, tmp_path / "b")
    la, lb = _losses(full.metrics_path), _losses(accum.metrics_path)
    assert la.keys() == lb.keys()
    for s in la:
        assert lb[s] == pytest.approx(la[s], rel=1e-4)


def test_activation_checkpointing_and_separator_packing(tokenized, tmp_path):
    tokens, _ = tokenized
    kw = dict(max_steps=3, eval_every=0, checkpoint_every=0, sample_prompts=[])
    plain = _losses(train(micro_cfg(**kw), tokens, tmp_path / "a").metrics_path)
    recompute = _losses(train(micro_cfg(activation_checkpointing=True, **kw), tokens, tmp_path / "b").metrics_path)
    assert recompute == pytest.approx(plain, rel=1e-5)
    # short documents: every window holds several, so blocking attention across them matters
    import numpy as np

    from lmforge.train.data import write_token_shards

    rng = np.random.default_rng(0)
    short = write_token_shards(tmp_path / "short", {"train": [list(rng.integers(3, 512, 9)) for _ in range(300)]}, 512)
    masked = _losses(train(micro_cfg(**kw), short, tmp_path / "c").metrics_path)
    sep = _losses(train(micro_cfg(packing="separator", **kw), short, tmp_path / "d").metrics_path)
    assert all(sep[s] != masked[s] for s in (1, 2, 3))
    assert all(math.isfinite(v) for v in sep.values())


def test_vocab_mismatch_and_too_long_sequence_fail_clearly(tokenized, tmp_path):
    tokens, _ = tokenized
    with pytest.raises(ConfigError, match="vocab_size"):
        train(micro_cfg(model={"vocab_size": 256}), tokens, tmp_path)
    with pytest.raises(ConfigError, match="longer than the model's context"):
        train(micro_cfg(seq_len=64, model={"max_seq_len": 32}), tokens, tmp_path)
    # a shard with an id beyond index.json's vocabulary
    import shutil

    bad = tmp_path / "tokens"
    shutil.copytree(tokens, bad)
    idx = json.loads((bad / "index.json").read_text())
    idx["vocab_size"] = 300
    (bad / "index.json").write_text(json.dumps(idx))
    with pytest.raises(InputError, match="token id .* different tokenizer"):
        train(micro_cfg(), bad, tmp_path / "o")


def test_recipe_stage_and_cli(tokenized, tmp_path, capsys):
    """The pretrain stage in a recipe writes checkpoints/<run>/ and a report section; the CLI
    generates from the checkpoint and reports user errors in one line."""
    import shutil

    tokens, tokdir = tokenized
    rd = tmp_path / "runs" / "t"
    shutil.copytree(tokens, rd / "tokens")
    shutil.copytree(tokdir, rd / "tokenizer")
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        '[run]\nname = "t"\ndir = "runs"\nstages = ["pretrain"]\nseed = 5\n'
        '[pretrain]\nseq_len = 32\nbatch_size = 4\nmax_steps = 6\nlog_every = 2\neval_every = 3\ncheckpoint_every = 3\n'
        'sample_tokens = 6\nmodel = { preset = "tiny", d_model = 32, n_layers = 1, n_heads = 2, n_kv_heads = 1 }\n'
    )
    assert main(["train", str(recipe), "--run-dir", str(rd), "--pretrain.warmup_steps", "1"]) == 0
    report = (rd / "report.md").read_text()
    assert "validation bits per byte" in report and "![loss curve](checkpoints/t/loss.png)" in report
    assert "Sample generations" in report and (rd / "checkpoints" / "t" / "loss.png").is_file()
    manifest = json.loads((rd / "checkpoints" / "manifest.json").read_text())
    assert manifest["counts"]["steps"] == 6 and manifest["counts"]["checkpoint"] == "checkpoints/t/step_000006"
    capsys.readouterr()
    assert main(["generate", str(rd / "checkpoints" / "t"), "--prompt", "The ", "--max-new-tokens", "5", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["prompt"] == "The " and isinstance(line["completion"], str)
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["train", "--tokens", str(tokens), "--pretrain.optimizer", "sgd"]) == 2
    assert "pretrain.optimizer" in capsys.readouterr().err
