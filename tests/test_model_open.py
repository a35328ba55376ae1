"""The model stays open to modules applied from outside (LoRA-style subclasses of nn.Linear,
weight-only int8 modules): its fused fast paths apply only to plain nn.Linear, so swapped-in
modules are called, never bypassed. And the outputs post-training needs: per-token log-probs
(reduction="none") from the fused head, final hidden states from the same pass."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model import Transformer, preset
from lmforge.model import transformer as T


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=200, max_seq_len=64, **kw))


class LoraLinear(nn.Linear):
    """A LoRA-style subclass: y = x W^T + scale * (x A^T) B^T."""

    def __init__(self, base: nn.Linear, r: int = 4, scale: float = 0.5):
        super().__init__(base.in_features, base.out_features, bias=False)
        self.weight = base.weight
        self.lora_a = nn.Parameter(torch.randn(r, base.in_features) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, r) * 0.1)
        self.scale = scale

    def forward(self, x):
        return super().forward(x) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)

    def merged(self) -> torch.Tensor:
        return self.weight + self.scale * self.lora_b @ self.lora_a


class Int8Linear(nn.Module):
    """Weight-only int8, per output channel (not an nn.Linear: its `weight` is int8)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        w = base.weight.detach()
        self.register_buffer("scale", w.abs().amax(1, keepdim=True) / 127)
        self.register_buffer("weight", torch.round(w / self.scale).to(torch.int8))

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale


NAMES = [f"layers.{i}.attn.{w}" for i in range(4) for w in ("wq", "wk", "wv")] + ["lm_head"]


def _swap(m, make):
    """Replace the modules named in NAMES from outside, as LoRA or quantization would."""
    for name in NAMES:
        parent, _, attr = name.rpartition(".")
        owner = m.get_submodule(parent) if parent else m
        setattr(owner, attr, make(getattr(owner, attr)))


@pytest.mark.parametrize("kind", ["lora", "int8"])
def test_swapped_linear_modules_are_called_not_bypassed(kind):
    m = _model(tie_embeddings=False)
    ref = copy.deepcopy(m)
    _swap(m, LoraLinear if kind == "lora" else Int8Linear)
    with torch.no_grad():  # the reference: plain nn.Linear layers holding the effective weights
        for name in NAMES:
            mod = m.get_submodule(name)
            ref.get_submodule(name).weight.copy_(mod.merged() if kind == "lora" else mod.dequantized())
    assert not m.layers[0].attn._fusable() and ref.layers[0].attn._fusable()
    x = torch.randint(0, 200, (2, 20))
    torch.testing.assert_close(m(x)[0], ref(x)[0], rtol=1e-4, atol=1e-5)
    # training with targets: the swapped head is called (no fused head), the loss matches
    m.train(), ref.train()
    la = m(x[:, :-1], x[:, 1:])[1]
    lb = ref(x[:, :-1], x[:, 1:])[1]
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
    if kind == "lora":
        la.backward()
        assert m.layers[0].attn.wq.lora_a.grad is not None and m.lm_head.lora_b.grad is not None


def test_plain_linear_is_the_exact_type_only():
    assert T.plain_linear(nn.Linear(4, 4, bias=False))
    assert not T.plain_linear(nn.Linear(4, 4))  # a bias: not the fused form
    assert not T.plain_linear(LoraLinear(nn.Linear(4, 4, bias=False)))
    assert not T.plain_linear(Int8Linear(nn.Linear(4, 4, bias=False)))


@pytest.mark.parametrize("docs", [False, True])
def test_token_logprobs_equal_log_softmax_with_gradients(docs):
    m = _model()
    ref = copy.deepcopy(m)
    x = torch.randint(0, 200, (3, 25))
    tgt = x[:, 1:].clone()
    tgt[0, :5] = -100  # ignored positions: log-prob 0, no gradient
    doc = torch.tensor([[0] * 10 + [1] * 14] * 3) if docs else None
    lp, h = m.token_logprobs(x[:, :-1], tgt, doc_ids=doc, return_hidden=True)
    logits = ref(x[:, :-1], doc_ids=doc)[0].float()
    want = logits.log_softmax(-1).gather(2, tgt.clamp(min=0)[..., None]).squeeze(-1) * (tgt != -100)
    torch.testing.assert_close(lp, want, rtol=1e-4, atol=1e-5)
    assert h.shape == (3, 24, m.cfg.d_model)
    torch.testing.assert_close(m.lm_head(h), logits, rtol=1e-4, atol=1e-5)
    w = torch.randn(3, 24)
    ((lp * w).sum() + h.pow(2).mean()).backward()
    ((want * w).sum() + ref.hidden_states(x[:, :-1], doc).pow(2).mean()).backward()
    for (n, a), (_, b) in zip(m.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-6, msg=n)


def test_token_logprobs_blocks_and_bf16(monkeypatch):
    m = _model()
    x = torch.randint(0, 200, (2, 30))
    full = m.token_logprobs(x[:, :-1], x[:, 1:])
    monkeypatch.setattr(T, "_CE_BLOCK_BYTES", 200 * 4 * 7)  # blocks of 7 rows
    torch.testing.assert_close(m.token_logprobs(x[:, :-1], x[:, 1:]), full)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = m.token_logprobs(x[:, :-1], x[:, 1:])
    torch.testing.assert_close(lp.float(), full, rtol=0.05, atol=0.1)


def test_token_logprobs_with_a_swapped_head():
    m = _model(tie_embeddings=False)
    x = torch.randint(0, 200, (2, 12))
    want = m.token_logprobs(x[:, :-1], x[:, 1:])
    m.lm_head = LoraLinear(m.lm_head)
    nn.init.zeros_(m.lm_head.lora_b)  # LoRA starts at the base model
    torch.testing.assert_close(m.token_logprobs(x[:, :-1], x[:, 1:]), want, rtol=1e-5, atol=1e-6)
