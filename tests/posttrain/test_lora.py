"""LoRA and QLoRA applied from outside the model: a fresh adapter leaves outputs unchanged, training
moves only the adapters, merge/unmerge, the merged (plain) state dict, adapter files, QLoRA over NF4
and int8 bases."""

import copy

import pytest
import torch

from lmforge.errors import ConfigError, InputError
from lmforge.infer.quantize import Int8Linear, NF4Linear, quantize_model
from lmforge.model import Transformer, preset
from lmforge.model.transformer import plain_linear
from lmforge.posttrain import lora as L

V, T = 128, 32


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=V, max_seq_len=T, **kw))


def _batch(seed=1, B=4, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, n + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def _logits(m, x):
    with torch.no_grad():
        return m(x)[0]


def _train(m, steps, lr=1e-2, seed=1):
    """AdamW on the trainable parameters, a tiny repeated batch; returns the losses."""
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    x, y = _batch(seed)
    m.train()
    losses = []
    for _ in range(steps):
        loss = m(x, y)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    m.eval()
    return losses


def _kick(m, seed=3):
    """Give every adapter's B non-zero values (as training would), so merging has something to fold."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in L.lora_modules(m).values():
            mod.lora_b.copy_(torch.randn(mod.lora_b.shape, generator=g) * 0.05)


def test_fresh_adapter_equals_the_base_and_freezes_everything_else():
    m = _model()
    base = copy.deepcopy(m).eval()
    names = L.apply_lora(m, L.LoraConfig(r=4, alpha=8))
    assert len(names) == 4 * 7 and all(isinstance(m.get_submodule(n), L.LoraLinear) for n in names)
    assert not plain_linear(m.layers[0].attn.wq) and plain_linear(m.lm_head)
    m.eval()
    x, _ = _batch()
    torch.testing.assert_close(_logits(m, x), _logits(base, x), rtol=1e-5, atol=1e-6)
    # exactly: in float64 the base model takes the same (unfused) path, and the adapter adds zeros
    assert torch.equal(_logits(m.double(), x), _logits(base.double(), x))
    m.float()
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "ab"}
    counts = L.trainable_parameters(m)
    per_layer = 4 * (128 + 128) + 4 * (128 + 64) * 2 + 4 * (128 + 128) + 4 * (128 + 384) * 3
    assert counts["trainable"] == 4 * per_layer
    assert counts["total"] == Transformer(preset("tiny", vocab_size=V, max_seq_len=T)).cfg.num_params() + counts["trainable"]
    assert 0 < counts["percent"] < 20


def test_training_changes_only_the_adapters():
    m = _model()
    L.apply_lora(m, L.LoraConfig(r=4, alpha=8, dropout=0.1))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    losses = _train(m, 5)
    assert losses[-1] < losses[0]
    for k, v in m.state_dict().items():
        changed = not torch.equal(v, before[k])
        assert changed == k.endswith(("lora_a", "lora_b")), k


def test_targets_all_linear_head_and_errors():
    m = _model(tie_embeddings=False)
    names = L.apply_lora(m, L.LoraConfig(targets=("all-linear",)))
    assert "lm_head" not in names and len(names) == 4 * 7
    m = _model(tie_embeddings=False)
    assert "lm_head" in L.apply_lora(m, L.LoraConfig(targets=("all-linear", "lm_head")))
    m = _model()
    assert L.apply_lora(m, L.LoraConfig(targets=("attn.wq",))) == [f"layers.{i}.attn.wq" for i in range(4)]
    with pytest.raises(ConfigError, match="already"):
        L.apply_lora(m, L.LoraConfig())
    with pytest.raises(ConfigError, match="match no linear layer"):
        L.apply_lora(_model(), L.LoraConfig(targets=("wz",)))
    with pytest.raises(ConfigError, match="tied"):
        L.apply_lora(_model(), L.LoraConfig(targets=("lm_head",)))
    with pytest.raises(ConfigError, match="lora.r"):
        L.LoraConfig(r=0)
    with pytest.raises(ConfigError, match="lora.dropout"):
        L.LoraConfig(dropout=1.0)


def test_merge_unmerge_and_merged_state_dict_into_a_plain_model():
    m = _model(tie_embeddings=False)
    L.apply_lora(m, L.LoraConfig(r=4, alpha=8, targets=("all-linear", "lm_head")))
    _kick(m)
    m.eval()
    x, _ = _batch()
    want = _logits(m, x)
    base = _logits(_model(tie_embeddings=False).eval(), x)
    assert not torch.allclose(want, base, atol=1e-3)  # the adapters do change the outputs
    sd = L.merged_state_dict(m)
    assert torch.equal(_logits(m, x), want)  # merged_state_dict leaves the model as it was
    plain = _model(tie_embeddings=False).eval()
    plain.load_state_dict(sd)  # strict: exactly a plain model's keys
    torch.testing.assert_close(_logits(plain, x), want, rtol=1e-4, atol=1e-5)
    assert L.merge(m) == list(L.lora_modules(m)) and len(L.lora_modules(m)) == 29
    assert all(mod.merged for mod in L.lora_modules(m).values())
    torch.testing.assert_close(_logits(m, x), want, rtol=1e-4, atol=1e-5)
    for k, v in L.merged_state_dict(m).items():  # merged or not: the same plain weights
        torch.testing.assert_close(v, sd[k], rtol=1e-5, atol=1e-6)
    assert len(L.unmerge(m)) == 29 and not any(mod.merged for mod in L.lora_modules(m).values())
    torch.testing.assert_close(_logits(m, x), want, rtol=1e-4, atol=1e-5)
    # unload: a plain model again, with the fast paths back
    L.merge(m, unload=True)
    assert not L.lora_modules(m) and m.layers[0].attn._fusable() and plain_linear(m.lm_head)
    torch.testing.assert_close(_logits(m, x), want, rtol=1e-4, atol=1e-5)


def test_merged_state_dict_of_a_tied_model_stores_the_head_once():
    m = _model()
    L.apply_lora(m)
    _kick(m)
    sd = L.merged_state_dict(m)
    assert "lm_head.weight" not in sd and "layers.0.attn.wq.weight" in sd
    plain = _model()
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    x, _ = _batch()
    torch.testing.assert_close(_logits(plain.eval(), x), _logits(m.eval(), x), rtol=1e-4, atol=1e-5)


def test_adapter_save_load_round_trip(tmp_path):
    cfg = L.LoraConfig(r=4, alpha=4, targets=("wq", "wv", "w2"))
    m = _model()
    L.apply_lora(m, cfg)
    _kick(m)
    m.eval()
    x, _ = _batch()
    path = L.save_adapter(m, tmp_path, cfg)
    assert path == tmp_path / "adapter.safetensors"
    assert set(L.adapter_state_dict(m)) == {f"layers.{i}.{w}.lora_{ab}" for i in range(4)
                                            for w in ("attn.wq", "attn.wv", "mlp.w2") for ab in "ab"}
    fresh = _model()
    assert L.load_adapter(fresh, tmp_path) == cfg
    assert torch.equal(_logits(fresh.eval(), x), _logits(m, x))
    # loading again into the same adapters replaces their values
    again = _model()
    L.apply_lora(again, cfg)
    L.load_adapter(again, path)
    assert torch.equal(_logits(again.eval(), x), _logits(m, x))
    # the bytes a checkpoint keeps as an extra file read back the same
    (tmp_path / "b.safetensors").write_bytes(L.adapter_bytes(m, cfg))
    assert L.read_adapter(tmp_path / "b.safetensors")[0] == cfg


def test_load_adapter_refuses_what_does_not_fit(tmp_path):
    cfg = L.LoraConfig(r=4, targets=("wq",))
    m = _model()
    L.apply_lora(m, cfg)
    L.save_adapter(m, tmp_path, cfg)
    with pytest.raises(InputError, match="no LoRA adapter"):
        L.load_adapter(_model(), tmp_path / "missing")
    other = Transformer(preset("tiny", vocab_size=V, max_seq_len=T, d_model=64))
    with pytest.raises(InputError, match=r"lora_a has shape \(4, 128\) but the model needs \(4, 64\)"):
        L.load_adapter(other, tmp_path)
    assert not L.lora_modules(other)  # checked before the model is touched
    fewer = Transformer(preset("tiny", vocab_size=V, max_seq_len=T, n_layers=2))
    with pytest.raises(InputError, match="do not match"):
        L.load_adapter(fewer, tmp_path)
    different = _model()
    L.apply_lora(different, L.LoraConfig(r=4, targets=("wk",)))
    with pytest.raises(InputError, match="do not match"):
        L.load_adapter(different, tmp_path)
    bad = tmp_path / "bad" / "adapter.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(InputError, match="cannot read"):
        L.load_adapter(_model(), bad.parent)


@pytest.mark.parametrize("kind,cls", [("nf4", NF4Linear), ("int8", Int8Linear)])
def test_qlora_trains_and_merges_to_a_plain_model(kind, cls):
    m = _model()
    names = L.qlora(m, kind, L.LoraConfig(r=8, alpha=16, targets=("wq", "wk", "wv", "wo", "w1", "w3")))
    assert isinstance(m.layers[0].attn.wq.base, cls)
    assert isinstance(m.layers[0].mlp.w2, cls)  # quantized, frozen, not adapted
    assert not any(p.requires_grad for n, p in m.named_parameters() if "lora_" not in n)
    counts = L.trainable_parameters(m)
    assert counts["total"] == m.cfg.num_params() + counts["trainable"]
    losses = _train(m, 20)
    assert losses[-1] < 0.8 * losses[0]
    x, _ = _batch(5)
    want = _logits(m, x)
    # the plain model from merged_state_dict computes what the QLoRA model does
    plain = _model()
    plain.load_state_dict(L.merged_state_dict(m), strict=False)
    torch.testing.assert_close(_logits(plain.eval(), x), want, rtol=1e-4, atol=1e-4)
    # merging a quantized base: plain nn.Linear modules (dequantized base + delta)
    assert L.merge(m) == names
    assert not L.lora_modules(m) and plain_linear(m.layers[0].attn.wq)
    assert isinstance(m.layers[0].mlp.w2, cls)
    torch.testing.assert_close(_logits(m, x), want, rtol=1e-4, atol=1e-4)


def test_quantizing_after_lora_quantizes_the_bases():
    m = _model()
    L.apply_lora(m, L.LoraConfig(targets=("wq",)))
    _kick(m)
    quantize_model(m, "int8", targets=("wq.base",))
    assert isinstance(m.layers[0].attn.wq.base, Int8Linear)
    x, _ = _batch()
    out = _logits(m.eval(), x)
    assert torch.isfinite(out).all()
    plain = _model()
    plain.load_state_dict(L.merged_state_dict(m), strict=False)
    torch.testing.assert_close(_logits(plain.eval(), x), out, rtol=1e-4, atol=1e-4)
