"""Weight-only quantization swapped in from outside the model: quantization error, the int8 kernel
path against dequantize-and-matmul, the quantized model's forward and training forward against a
plain model holding the dequantized weights, and the safetensors round trip."""

import copy

import pytest
import torch
import torch.nn as nn

from lmforge.errors import ConfigError, InputError
from lmforge.infer import quantize as Q
from lmforge.model import Transformer, preset
from lmforge.model.transformer import plain_linear


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=128, max_seq_len=32, **kw))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _dequantized_copy(m):
    """A plain model whose linear layers hold the quantized modules' dequantized weights."""
    ref = copy.deepcopy(m)
    for name, mod in list(ref.named_modules()):
        if isinstance(mod, Q.QuantizedLinear):
            parent, _, attr = name.rpartition(".")
            lin = nn.Linear(mod.in_features, mod.out_features, bias=False)
            lin.weight = nn.Parameter(mod.dequantize())
            setattr(ref.get_submodule(parent) if parent else ref, attr, lin)
    return ref


@pytest.mark.parametrize("kind,bound", [("int8", 0.01), ("nf4", 0.1)])
def test_quantization_error_on_gaussian_weights(kind, bound):
    torch.manual_seed(0)
    lin = nn.Linear(256, 192, bias=False)
    nn.init.normal_(lin.weight, 0, 0.02)
    q = Q.KINDS[kind].from_linear(lin)
    w = q.dequantize()
    assert w.shape == lin.weight.shape and w.dtype == torch.float32
    assert _rel(w, lin.weight.detach()) < bound
    x = torch.randn(5, 256)
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ w.T, rtol=1e-4, atol=1e-5)
    # stored size: int8 ~1 byte per weight, NF4 ~0.5 byte + a 4-byte absmax per 64 weights
    n = 256 * 192
    assert q.weight_bytes == (n + 192 * 4 if kind == "int8" else n // 2 + n // 64 * 4)


def test_nf4_codes_packing_and_padding():
    code = torch.tensor(Q.NF4_CODE)
    assert len(Q.NF4_CODE) == 16 and torch.all(code[1:] > code[:-1]) and code[7] == 0
    # values that are exactly code points times a block's absmax come back exactly
    torch.manual_seed(1)
    idx = torch.randint(0, 16, (3 * 50,))
    idx[::50] = 15  # each block of 50 holds +1.0 so its absmax is the scale
    w = (code[idx].view(3, 50) * torch.tensor([[0.5], [2.0], [0.1]]))
    packed, absmax = Q.nf4_quantize(w, block_size=50)
    assert packed.dtype == torch.uint8 and packed.numel() == 75 and absmax.numel() == 3
    torch.testing.assert_close(Q.nf4_dequantize(packed, absmax, (3, 50), 50), w)
    # a size that is not a multiple of the block: zero-padded, cut off again
    odd = torch.randn(7, 9)
    p, a = Q.nf4_quantize(odd, 64)
    assert p.numel() == 32 and a.numel() == 1
    assert _rel(Q.nf4_dequantize(p, a, (7, 9), 64), odd) < 0.15
    with pytest.raises(ConfigError, match="block size"):
        Q.nf4_quantize(odd, 7)


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_kernel_equals_dequantize_and_matmul(dtype, kernel, monkeypatch):
    monkeypatch.setattr(Q.Int8Linear, "use_kernel", kernel)  # BLAS by default; torch's int8 kernel when enabled
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=True)
    q = Q.Int8Linear.from_linear(lin).to(dtype)
    x = torch.randn(2, 3, 96, dtype=dtype)
    assert Q._int8_kernel_ok(x.reshape(-1, 96)) == kernel
    with torch.no_grad():
        y = q(x)
    want = x.float() @ q.dequantize(torch.float32).T + lin.bias.detach()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    torch.testing.assert_close(y.float(), want, **tol)
    assert y.dtype == dtype and y.shape == (2, 3, 40)
    # widths the bf16 kernel does not take go through dequantize-and-matmul
    assert not Q._int8_kernel_ok(torch.randn(2, 100, dtype=torch.bfloat16))
    assert Q._int8_kernel_ok(torch.randn(2, 100)) == kernel


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_model_forward_and_training_forward(kind):
    m = _model()
    names = Q.quantize_model(m, kind)
    # every linear layer but the (tied) head; embedding untouched; fast paths off for swapped modules
    assert len(names) == 4 * 7 and "lm_head" not in names
    assert isinstance(m.layers[0].attn.wq, Q.KINDS[kind]) and plain_linear(m.lm_head)
    assert not m.layers[0].attn._fusable()
    ref = _dequantized_copy(m)
    x = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], ref(x)[0], rtol=1e-4, atol=1e-4)
    # training forward: gradients flow through the frozen quantized weights to what trains
    m.train(), ref.train()
    la = m(x[:, :-1], x[:, 1:])[1]
    lb = ref(x[:, :-1], x[:, 1:])[1]
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
    la.backward(), lb.backward()
    torch.testing.assert_close(m.tok_emb.weight.grad, ref.tok_emb.weight.grad, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(m.layers[0].attn_norm.weight.grad, ref.layers[0].attn_norm.weight.grad,
                               rtol=1e-3, atol=1e-6)


def test_quantize_targets_head_and_errors():
    m = _model(tie_embeddings=False)
    assert Q.quantize_model(m, "int8", targets=("wq", "w2")) == [f"layers.{i}.{w}" for i in range(4)
                                                                for w in ("attn.wq", "mlp.w2")]
    m2 = _model(tie_embeddings=False)
    assert "lm_head" in Q.quantize_model(m2, "nf4", include_head=True)
    with pytest.raises(ConfigError, match="tied"):
        Q.quantize_model(_model(), "int8", targets=("lm_head",))
    with pytest.raises(ConfigError, match="unknown quantization kind 'int3'"):
        Q.quantize_model(_model(), "int3")
    with pytest.raises(ConfigError, match="match no linear layer"):
        Q.quantize_model(_model(), "int8", targets=("nope",))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_model_round_trips_through_safetensors(kind, tmp_path):
    m = _model()
    before = Q.model_bytes(m)
    Q.quantize_model(m, kind)
    after = Q.model_bytes(m)
    assert after < before * (0.5 if kind == "int8" else 0.4)
    path = Q.save_quantized(m, tmp_path / "q.safetensors")
    fresh = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)  # different values everywhere: all must come from the file
    assert Q.load_quantized(fresh, path) == list(Q.quantization_map(m))
    assert Q.quantization_map(fresh) == Q.quantization_map(m)
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x)[0], m(x)[0], rtol=0, atol=0)


def test_load_quantized_refuses_bad_files(tmp_path):
    with pytest.raises(InputError, match="no quantized model"):
        Q.load_quantized(_model(), tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="cannot read"):
        Q.load_quantized(_model(), bad)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(InputError, match="not a quantized model"):
        Q.load_quantized(_model(), plain)
    m = _model()
    Q.quantize_model(m, "int8")
    path = Q.save_quantized(m, tmp_path / "q.safetensors")
    other = Transformer(preset("tiny", vocab_size=128, max_seq_len=32, d_model=64))
    with pytest.raises(InputError, match="in the file"):
        Q.load_quantized(other, path)
