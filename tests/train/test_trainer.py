"""The trainer used directly, the way a post-training stage uses it: a caller-built model with
LoRA-style modules swapped in from outside and everything else frozen, a custom batch source and
a masked loss with extra metrics, merged weights in model.safetensors plus an adapter file and
extra state.json keys. Resume after an interruption reproduces the uninterrupted run bit for bit."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.config import build
from lmforge.errors import ConfigError
from lmforge.train import checkpoint as ck
from lmforge.train import trainer as T
from lmforge.train.config import TrainerConfig
from lmforge.train.metrics import read_metrics

from .conftest import micro_cfg

VOCAB, DIM = 16, 12


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (applied from outside the model)."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank) * 0.1)

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.T) @ self.lora_b.T


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.drop = nn.Dropout(0.2)  # consumes the torch RNG: resume must restore it
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.proj(self.emb(x)))))


def lora_model() -> Toy:
    torch.manual_seed(0)
    m = Toy()
    for p in m.parameters():
        p.requires_grad_(False)
    m.proj = LoRALinear(m.proj)
    return m


class Interrupted(Exception):
    pass


class ToyBatches:
    """Deterministic batches from (seed, position); `stop_at` simulates a kill mid-run."""

    def __init__(self, seed: int = 3, stop_at: int | None = None, nan_at: int | None = None):
        self.seed, self.pos, self.stop_at, self.nan_at = seed, 0, stop_at, nan_at

    def next_batch(self):
        if self.stop_at is not None and self.pos == self.stop_at:
            raise Interrupted
        g = torch.Generator().manual_seed(self.seed * 10_000 + self.pos)
        x = torch.randint(0, VOCAB, (4, 6), generator=g)
        b = SimpleNamespace(x=x, y=(3 * x + 1) % VOCAB, mask=torch.rand(4, 6, generator=g) > 0.3, index=self.pos,
                            poison=self.pos == self.nan_at)
        self.pos += 1
        return b

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, s):
        self.pos = s["pos"]


def masked_loss(model, b):
    per = F.cross_entropy(model(b.x).flatten(0, 1), b.y.flatten(), reduction="none")
    m = b.mask.flatten().float()
    loss = (per * m).sum() / m.sum()
    if b.poison:
        loss = loss * float("nan")
    return loss, {"mask_frac": m.mean(), "batch_index": float(b.index)}


def adapter_bytes(ts: T.TrainerState) -> dict[str, bytes]:
    from safetensors.torch import save

    return {"adapter.safetensors": save({k: v.detach().contiguous() for k, v in ts.model.named_parameters() if v.requires_grad})}


def merge(weights: dict) -> dict:
    """What model.safetensors holds: the LoRA update merged into the base weight."""
    w = dict(weights)
    a, b = w.pop("proj.lora_a"), w.pop("proj.lora_b")
    w["proj.weight"] = w.pop("proj.base.weight") + b @ a
    w["proj.bias"] = w.pop("proj.base.bias")
    return w


def restore_adapter(model, step_dir):
    from safetensors.torch import load_file

    with torch.no_grad():
        for k, v in load_file(str(step_dir / "adapter.safetensors")).items():
            model.get_parameter(k).copy_(v)


def run(out, cfg, batches, **kw):
    model = lora_model()
    rt = T.setup(cfg)
    res = T.fit(cfg, rt, model, batches, masked_loss, out, name="sft", extra_files=adapter_bytes, export_weights=merge,
                restore_weights=restore_adapter, extra_state={"chat_template": "<|user|>{x}"}, **kw)
    return model, res


def cfg_for(optimizer: str, **over) -> TrainerConfig:
    base = dict(max_steps=12, grad_accum=2, checkpoint_every=4, keep_last=5, log_every=1, eval_every=0, warmup_steps=2,
                optimizer=optimizer, lr=0.02, muon_lr=0.05, device="cpu")
    return TrainerConfig(**{**base, **over})


def _losses(path):
    return {r["step"]: r["loss"] for r in read_metrics(path) if r["kind"] == "train"}


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_lora_style_model_resumes_bit_for_bit_and_keeps_frozen_weights(tmp_path, optimizer):
    cfg = cfg_for(optimizer)
    frozen_before = {k: v.clone() for k, v in lora_model().state_dict().items() if "lora" not in k}
    ref_model, ref = run(tmp_path / "ref", cfg, ToyBatches())

    # killed in the middle of step 10 (its first micro-batch was read): checkpoints 4 and 8 exist
    with pytest.raises(Interrupted):
        run(tmp_path / "cut", cfg, ToyBatches(stop_at=2 * 9 + 1))
    assert [p.name for p in ck.list_checkpoints(tmp_path / "cut")] == ["step_000004", "step_000008"]
    model, res = run(tmp_path / "cut", cfg, ToyBatches())
    assert res.resumed_from == 8 and res.steps == 12

    # the same weights, losses and extra metrics as the uninterrupted run, bit for bit
    for (k, a), (_, b) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert torch.equal(a, b), k
    assert _losses(res.metrics_path) == _losses(ref.metrics_path) and len(_losses(ref.metrics_path)) == 12
    assert ref.final_loss < _losses(ref.metrics_path)[1]  # it learns

    # frozen parameters stayed frozen; only the LoRA matrices reached the optimizers
    for k, v in model.state_dict().items():
        if "lora" not in k:
            assert torch.equal(v, frozen_before[k]), k
    states = ck.load_optimizer_states(res.checkpoint)
    assert sum(len(g["params"]) for s in states for g in s["param_groups"]) == 2

    # checkpoint layout: merged weights, the adapter beside them (checksummed), extra state
    assert res.checkpoint.name == "step_000012" and ck.verify(res.checkpoint) is None
    merged = ck.load_weights(res.checkpoint)
    lora = model.proj
    assert set(merged) == {"emb.weight", "proj.weight", "proj.bias", "head.weight", "head.bias"}
    assert torch.equal(merged["proj.weight"], lora.base.weight + lora.lora_b @ lora.lora_a)
    state = json.loads((res.checkpoint / "state.json").read_text())
    assert "adapter.safetensors" in state["checksums"] and state["chat_template"] == "<|user|>{x}"
    assert state["data"] == {"pos": 24}
    adapter = res.checkpoint / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8] + b"\0" * 8)
    assert "adapter.safetensors does not match its checksum" in ck.verify(res.checkpoint)


def test_extra_metrics_are_averaged_over_micro_batches_and_logged(tmp_path):
    _, res = run(tmp_path, cfg_for("adamw", max_steps=4, log_every=2, checkpoint_every=0), ToyBatches())
    recs = [r for r in read_metrics(res.metrics_path) if r["kind"] == "train"]
    assert [r["step"] for r in recs] == [2, 4]
    for r in recs:
        assert r["batch_index"] == 2 * r["step"] - 1.5  # mean of micro-batches 2s-2 and 2s-1
        assert 0 < r["mask_frac"] < 1 and r["steps_per_s"] > 0
        assert {"loss", "lr", "grad_norm", "lr_factor"} <= set(r) and "tokens" not in r
    assert res.train_record["step"] == 4 and "mask_frac" in res.train_record
    assert (tmp_path / "loss.png").is_file()


def test_deferred_nan_check_names_the_step_and_saves_nothing_after_it(tmp_path):
    """The GPU mode (no host sync between log steps), exercised on CPU: a NaN loss at step 7 is
    reported at step 10 (the next log and checkpoint step), before that checkpoint is written."""
    cfg = cfg_for("adamw", max_steps=20, grad_accum=1, log_every=5, checkpoint_every=5)
    with pytest.raises(T.TrainingDiverged, match=r"loss nan at step 7: training stopped at step 10.*step_000005.*lower sft\.lr"):
        run(tmp_path, cfg, ToyBatches(nan_at=6), sync_every_step=False)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_000005"]
    assert ck.verify(tmp_path / "step_000005") is None
    assert list(_losses(tmp_path / "metrics.jsonl")) == [5]


def test_device_side_clipping_equals_the_host_path():
    for scale in (1.0, 100.0):  # below and above the threshold
        torch.manual_seed(1)
        ps = [nn.Parameter(torch.randn(5, 7)) for _ in range(3)]
        for p in ps:
            p.grad = torch.randn_like(p) * scale
        qs = [nn.Parameter(p.detach().clone()) for p in ps]
        for p, q in zip(ps, qs):
            q.grad = p.grad.clone()
        a = T.clip_grad_norm_(ps, 1.0, sync=True)
        b = T.clip_grad_norm_(qs, 1.0, sync=False)
        assert torch.equal(a, b)
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(ps, qs))


def test_trainer_config_and_user_errors(tmp_path):
    tc = micro_cfg(lr=0.005, grad_accum=3).trainer_config()
    assert isinstance(tc, TrainerConfig) and tc.lr == 0.005 and tc.grad_accum == 3 and tc.max_steps == 20
    assert build(TrainerConfig, {"lr": 1e-4, "optimizer": "adamw"}, "sft").optimizer == "adamw"
    with pytest.raises(ConfigError, match=r"\[sft\]: lr must be > 0"):
        build(TrainerConfig, {"lr": -1.0}, "sft")
    frozen = lora_model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    cfg = cfg_for("adamw")
    with pytest.raises(ConfigError, match="no trainable parameters"):
        T.fit(cfg, T.setup(cfg), frozen, ToyBatches(), masked_loss, tmp_path, name="sft")
