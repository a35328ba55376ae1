"""DPO on the shared trainer: the step-0 loss is ln 2 (sigmoid) and 1/(4 beta^2) (IPO), training
improves held-out preference accuracy on an easy task, precomputed and live references agree,
reference log-probs are stored and reused on resume, an interrupted run resumes to the same
weights, LoRA saves adapters and a merged model, a NaN loss stops with TrainingDiverged."""

import math
import shutil

import pytest
import torch

from lmforge import config as cfgmod
from lmforge.errors import ConfigError
from lmforge.model.io import load_checkpoint
from lmforge.posttrain import dpo as D
from lmforge.posttrain.dpo import DPOConfig, preference_loss, run_dpo
from lmforge.rundir import read_json
from lmforge.train import checkpoint as ck
from lmforge.train.trainer import TrainingDiverged
from tests.posttrain.pref_helpers import easy_pairs, make_base, write_jsonl


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory, chat_tok):
    return make_base(tmp_path_factory.mktemp("dpobase") / "sft" / "t", chat_tok, seed=1)


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("dpodata")
    return write_jsonl(d / "train.jsonl", easy_pairs(48, seed=3)), write_jsonl(d / "held.jsonl", easy_pairs(16, seed=4, start=700))


def _cfg(data, **kw) -> DPOConfig:
    base = dict(max_steps=8, batch_size=8, lr=3e-3, warmup_steps=1, checkpoint_every=4, eval_every=8, log_every=1, device="cpu",
                sample_tokens=0, data=[str(data[0])], eval_data=[str(data[1])], beta=0.5)
    base.update(kw)
    return cfgmod.build(DPOConfig, base, "dpo")


def _metrics(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_preference_losses_match_their_formulas():
    pi = torch.tensor([-3.0, -5.0, -4.0, -2.0])  # chosen of 2 pairs, then rejected
    ref = torch.tensor([-4.0, -5.0, -4.0, -3.0])
    diff = torch.tensor([(-3.0 + 4) - (-4 + 4), (-5.0 + 5) - (-2 + 3)])
    loss, m = preference_loss(pi, ref, 2, beta=0.1)
    assert torch.allclose(loss, -torch.nn.functional.logsigmoid(0.1 * diff).mean())
    assert float(m["accuracy"]) == 0.5 and float(m["reward_margin"]) == pytest.approx(0.1 * diff.mean().item())
    loss, _ = preference_loss(pi, ref, 2, beta=0.1, kind="ipo")
    assert torch.allclose(loss, ((diff - 5.0) ** 2).mean())
    assert float(preference_loss(pi, pi, 2, beta=0.3)[0]) == pytest.approx(math.log(2))


def test_dpo_step0_is_ln2_and_improves_heldout_preference(tmp_path, chat_base, easy_data):
    res = run_dpo(_cfg(easy_data), tmp_path / "dpo", base=chat_base, seed=1)
    train = [r for r in _metrics(tmp_path / "dpo") if r["kind"] == "train"]
    assert res.first_loss == pytest.approx(math.log(2), abs=1e-5)  # policy = reference at step 0
    assert train[0]["accuracy"] == 0.5 and train[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert train[-1]["loss"] < train[0]["loss"]
    assert res.before["heldout_accuracy"] == 0.5 and res.before["heldout_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert res.after["heldout_accuracy"] > 0.9 and res.after["heldout_margin"] > 0
    assert res.after["heldout_logp_accuracy"] >= res.before["heldout_logp_accuracy"]
    state = read_json(res.checkpoint / "state.json")
    assert state["stage"] == "dpo" and state["chat_template"].startswith("lmforge-chat") and state["loss"] == "sigmoid"
    model, ref = load_checkpoint(tmp_path / "dpo")  # an ordinary checkpoint
    assert ref.step == 8 and (tmp_path / "dpo" / "ref_logps.pt").is_file()
    assert (tmp_path / "dpo" / "data" / "heldout_pairs.jsonl").read_text().count("\n") == 16


def test_ipo_step0_value_and_live_reference_agree_with_precomputed(tmp_path, chat_base, easy_data):
    beta = 0.5
    a = run_dpo(_cfg(easy_data, loss="ipo", max_steps=2, beta=beta), tmp_path / "pre", base=chat_base, seed=1)
    assert a.first_loss == pytest.approx(1 / (4 * beta**2), rel=1e-5)
    b = run_dpo(_cfg(easy_data, loss="ipo", max_steps=2, beta=beta, reference="live"), tmp_path / "live", base=chat_base, seed=1)
    assert b.first_loss == pytest.approx(a.first_loss, rel=1e-5)
    assert b.final_loss == pytest.approx(a.final_loss, rel=1e-3)


def test_interrupted_dpo_resumes_to_the_same_weights_without_recomputing_the_reference(tmp_path, chat_base, easy_data):
    cfg = _cfg(easy_data, keep_last=5)
    ref = run_dpo(cfg, tmp_path / "a", base=chat_base, seed=2)
    # what a kill after the step-4 checkpoint leaves behind
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "step_000008")
    (tmp_path / "b" / "latest").write_text("step_000004")
    stored = (tmp_path / "b" / "ref_logps.pt").stat().st_mtime_ns
    again = run_dpo(cfg, tmp_path / "b", base=chat_base, seed=2)
    assert again.resumed_from == 4 and again.reference_reused and not ref.reference_reused
    assert (tmp_path / "b" / "ref_logps.pt").stat().st_mtime_ns == stored  # read back, not recomputed
    a, b = ck.load_weights(again.checkpoint), ck.load_weights(ref.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_dpo_saves_adapters_and_a_merged_model(tmp_path, chat_base, easy_data):
    res = run_dpo(_cfg(easy_data, max_steps=4, lora={"r": 4, "alpha": 8, "targets": ["wq", "wv", "w2"]}, lr=1e-2),
                  tmp_path / "dpo", base=chat_base, seed=1)
    step = res.checkpoint
    assert (step / "adapter.safetensors").is_file() and ck.verify(step) is None
    assert res.trainable_params < res.total_params / 10
    plain, base = ck.load_weights(step), ck.load_weights(chat_base / "step_000010")
    assert not any("lora" in k for k in plain)
    changed = [k for k in plain if not torch.equal(plain[k], base[k])]
    assert changed and all(k.split(".")[-2] in ("wq", "wv", "w2") for k in changed)
    assert res.first_loss == pytest.approx(math.log(2), abs=1e-5)  # adapters start at zero: policy = reference
    load_checkpoint(step)  # plain weights load without LoRA code


def test_a_nan_loss_stops_with_the_step_named_and_keeps_the_last_checkpoint(tmp_path, chat_base, easy_data, monkeypatch):
    calls = {"n": 0}
    orig = D.preference_loss

    def nan_at_step_6(*a, **k):
        calls["n"] += a[0].requires_grad  # training steps only (not the held-out figures)
        loss, m = orig(*a, **k)
        return (loss * float("nan"), m) if calls["n"] == 6 else (loss, m)

    monkeypatch.setattr(D, "preference_loss", nan_at_step_6)
    with pytest.raises(TrainingDiverged, match="step 6") as e:
        run_dpo(_cfg(easy_data), tmp_path / "dpo", base=chat_base, seed=1)
    assert "step_000004" in str(e.value)
    assert [p.name for p in ck.list_checkpoints(tmp_path / "dpo")] == ["step_000004"]


def test_config_errors_name_the_key(easy_data):
    with pytest.raises(ConfigError, match="dpo.beta"):
        _cfg(easy_data, beta=0.0)
    with pytest.raises(ConfigError, match="dpo.loss"):
        _cfg(easy_data, loss="hinge")


def _ctx(run_root, name, cfg):
    from lmforge.recipe import RunConfig, StageContext
    from lmforge.rundir import RunDir

    return StageContext(name=name, cfg=cfg, run_dir=RunDir(run_root), out=run_root / name, run=RunConfig(name="t"),
                        base_dir=run_root, recipe={}, fingerprint="")


def test_recipe_stages_take_the_runs_sft_model_and_report(chat_base, easy_data):
    from lmforge.posttrain.pref_stages import run_dpo_stage, run_rm_stage
    from lmforge.posttrain.rm import RMConfig

    run_root = chat_base.parent.parent  # <run>/sft/t
    res = run_dpo_stage(_ctx(run_root, "dpo", _cfg(easy_data, max_steps=2, eval_every=2)))
    assert res.counts["steps"] == 2 and res.counts["heldout_accuracy_before"] == 0.5
    assert res.counts["checkpoint"].startswith("dpo/t/step_000002")
    assert "| held-out preference accuracy | 0.500 |" in res.report and "![DPO (sigmoid) loss](dpo/t/loss.png)" in res.report
    assert (run_root / "dpo" / "t" / "data" / "heldout_pairs.jsonl").is_file()
    rcfg = cfgmod.build(RMConfig, {"max_steps": 2, "data": [str(easy_data[0])], "eval_data": [str(easy_data[1])]}, "rm")
    res = run_rm_stage(_ctx(run_root, "rm", rcfg))
    assert res.counts["steps"] == 2 and res.counts["heldout_pairs"] == 16 and "held-out pair accuracy, after" in res.report
    from lmforge.errors import InputError
    from lmforge.posttrain.pref_stages import run_rm_stage as stage

    with pytest.raises(InputError, match="sft stage first"):
        stage(_ctx(run_root / "nowhere", "rm", rcfg))


def test_cli_dpo_and_rm_with_user_data(tmp_path, chat_base, easy_data, monkeypatch, capsys):
    from lmforge import cli

    if "lmforge.posttrain.pref_commands" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "lmforge.posttrain.pref_commands"])
    data = write_jsonl(tmp_path / "pairs.jsonl", [*easy_pairs(20, seed=5), "{broken", {"prompt": "x", "chosen": "a", "rejected": "a"}])
    rc = cli.main(["dpo", "--base", str(chat_base), "--out", str(tmp_path / "dpo"), "--data", str(data),
                   "--dpo.max_steps", "1", "--dpo.sample_tokens", "0", "--dpo.heldout", "0.2"])
    assert rc == 0 and "held-out preference accuracy 0.500" in capsys.readouterr().out
    stats = read_json(tmp_path / "dpo" / "data" / "stats.json")
    assert stats["read_malformed"] == 1 and stats["read_identical"] == 1 and stats["read_pairs"] == 20
    rc = cli.main(["rm", "--base", str(chat_base), "--out", str(tmp_path / "rm"), "--data", str(data), "--rm.max_steps", "1"])
    assert rc == 0 and (tmp_path / "rm" / "step_000001" / "reward_head.safetensors").is_file()
    assert cli.main(["dpo", "--base", str(chat_base), "--out", str(tmp_path / "o2"), "--dpo.beta", "abc"]) == 2
    assert "dpo.beta" in capsys.readouterr().err
    assert cli.main(["rm", "--out", str(tmp_path / "o3")]) == 2


def test_dpo_killed_with_sigkill_resumes_to_the_same_weights(tmp_path, chat_base, easy_data):
    """A real `lmforge dpo` subprocess is killed with SIGKILL after a checkpoint; the rerun resumes
    there and ends with the uninterrupted run's weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    over = dict(max_steps=40, checkpoint_every=4, keep_last=2, eval_every=0, log_every=2)
    args = [f"--dpo.{k}={v}" for k, v in over.items()] + [
        "--dpo.batch_size=8", "--dpo.lr=3e-3", "--dpo.warmup_steps=1", "--dpo.device=cpu", "--dpo.sample_tokens=0",
        "--dpo.beta=0.5", f"--dpo.eval_data=['{easy_data[1]}']"]
    out = tmp_path / "killed"
    env = dict(os.environ, LMFORGE_PROGRESS="0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "dpo", "--base", str(chat_base), "--out", str(out), "--seed", "2",
                             "--data", str(easy_data[0]), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "step_000004" / "state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the DPO subprocess made no checkpoint in time"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess's thread count: bit-exact comparison
    try:
        cfg = _cfg(easy_data, **over)
        again = run_dpo(cfg, out, base=chat_base, seed=2)
        ref = run_dpo(cfg, tmp_path / "ref", base=chat_base, seed=2)
    finally:
        torch.set_num_threads(n)
    assert again.resumed_from is not None and 4 <= again.resumed_from < 40
    a, b = ck.load_weights(again.checkpoint), ck.load_weights(ref.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
