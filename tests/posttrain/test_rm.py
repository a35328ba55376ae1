"""Reward model: Bradley–Terry training on the shared trainer learns an easy preference (loss
down, held-out accuracy up), the checkpoint is the backbone + reward_head.safetensors, the scorer
returns a float per conversation; full and LoRA backbones; bad config named."""

import math

import pytest
import torch

from lmforge import config as cfgmod
from lmforge.errors import ConfigError, InputError
from lmforge.model.io import load_checkpoint
from lmforge.posttrain.rm import RMConfig, bt_loss, load_reward_model, pair_accuracy, run_rm
from lmforge.rundir import read_json
from lmforge.train import checkpoint as ck
from tests.posttrain.pref_helpers import easy_pairs, make_base, write_jsonl


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory, chat_tok):
    return make_base(tmp_path_factory.mktemp("rmbase") / "sft" / "t", chat_tok)


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("rmdata")
    return write_jsonl(d / "train.jsonl", easy_pairs(64, seed=1)), write_jsonl(d / "held.jsonl", easy_pairs(24, seed=2, start=500))


def _cfg(data, **kw) -> RMConfig:
    base = dict(max_steps=12, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=6, eval_every=6, log_every=1, device="cpu",
                data=[str(data[0])], eval_data=[str(data[1])])
    base.update(kw)
    return cfgmod.build(RMConfig, base, "rm")


def test_bradley_terry_loss_and_accuracy():
    r_c, r_r = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])
    assert math.isclose(float(bt_loss(torch.zeros(4), torch.zeros(4))), math.log(2), rel_tol=1e-6)
    want = -torch.nn.functional.logsigmoid(r_c - r_r).mean()
    assert torch.allclose(bt_loss(r_c, r_r), want)
    assert torch.allclose(bt_loss(r_c, r_r, margin=0.5), -torch.nn.functional.logsigmoid(r_c - r_r - 0.5).mean())
    assert torch.allclose(bt_loss(r_c, r_r, center=0.1), want + 0.1 * ((r_c + r_r) ** 2).mean())
    assert float(pair_accuracy(r_c - r_r)) == pytest.approx(0.5)  # one win, one tie (half), one loss


def test_reward_model_learns_an_easy_preference_and_scores(tmp_path, chat_base, easy_data):
    res = run_rm(_cfg(easy_data), tmp_path / "rm", base=chat_base, seed=1)
    lines = [r for r in ck_metrics(tmp_path / "rm") if r["kind"] == "train"]
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the zero head: ln 2 at step 0
    assert lines[-1]["loss"] < 0.3 < lines[0]["loss"]
    assert res.heldout_accuracy_before == pytest.approx(0.5) and res.heldout_accuracy > 0.9
    step = res.checkpoint
    assert ck.verify(step) is None and (step / "reward_head.safetensors").is_file()
    state = read_json(step / "state.json")
    assert state["stage"] == "rm" and state["chat_template"].startswith("lmforge-chat") and "reward_head.safetensors" in state["checksums"]
    plain, _ = load_checkpoint(step)  # model.safetensors is the plain backbone
    assert plain.cfg.d_model == 64
    assert (tmp_path / "rm" / "data" / "heldout_pairs.jsonl").read_text().count("\n") == 24
    rm = load_reward_model(tmp_path / "rm")
    good = [{"role": "user", "content": "Tell me about item 900."}, {"role": "assistant", "content": "Yes, certainly."}]
    bad = [{"role": "user", "content": "Tell me about item 900."}, {"role": "assistant", "content": "pepper orbit glass"}]
    scores = rm.score([good, bad, good], batch_size=2)
    assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    assert scores[0] > scores[1] and scores[0] == pytest.approx(scores[2], abs=1e-5)
    with pytest.raises(InputError, match="assistant"):
        rm.score([good[:1]])
    with pytest.raises(InputError, match="not a reward model"):
        load_reward_model(chat_base)


def test_lora_reward_model_saves_adapters_merged_backbone_and_resumes(tmp_path, chat_base, easy_data):
    import shutil

    cfg = _cfg(easy_data, max_steps=8, checkpoint_every=4, keep_last=5, lora={"r": 4, "targets": ["wq", "wv"]})
    res = run_rm(cfg, tmp_path / "a", base=chat_base, seed=2)
    step = res.checkpoint
    assert (step / "adapter.safetensors").is_file() and res.trainable_params < 10_000
    plain = ck.load_weights(step)
    base = ck.load_weights(chat_base / "step_000010")
    assert not any("lora" in k or k.startswith(("backbone.", "head.")) for k in plain)
    changed = {k for k in plain if not torch.equal(plain[k], base[k])}
    assert changed and all(k.split(".")[-2] in ("wq", "wv") for k in changed)
    # an interruption after the step-4 checkpoint: the rerun resumes there and ends with the same weights
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "step_000008")
    (tmp_path / "b" / "latest").write_text("step_000004")
    again = run_rm(cfg, tmp_path / "b", base=chat_base, seed=2)
    assert again.resumed_from == 4
    from safetensors.torch import load_file

    for f in ("model.safetensors", "reward_head.safetensors", "adapter.safetensors"):
        a, b = load_file(again.checkpoint / f), load_file(step / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_config_errors_name_the_key(easy_data):
    with pytest.raises(ConfigError, match="rm.optimizer"):
        _cfg(easy_data, optimizer="muon")
    with pytest.raises(ConfigError, match="rm.margin"):
        _cfg(easy_data, margin=-1.0)
    with pytest.raises(ConfigError, match="heldout"):
        _cfg(easy_data, heldout=1.5)


def ck_metrics(out):
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
