"""Weight-only quantization swapped in from outside the model: quantization error, the int8 kernel
path against dequantize-and-matmul, the quantized model's forward and training forward against a
plain model holding the dequantized weights, and the safetensors round trip."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

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


@pytest.fixture
def exact_kernels(monkeypatch):
    """No bf16 kernel for decode-shaped calls: every matmul uses the dequantized weights exactly."""
    monkeypatch.setattr(Q.Int8Linear, "kernel_rows", 0)
    monkeypatch.setattr(Q.Int4Linear, "kernel_rows", 0)


@pytest.mark.parametrize("kind,bound", [("int8", 0.01), ("int4", 0.12), ("nf4", 0.1)])
def test_quantization_error_on_gaussian_weights(kind, bound, exact_kernels):
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
    # stored size: int8 ~1 byte per weight, NF4 ~0.5 byte + a 4-byte absmax per 64 weights, int4 0.5 byte
    # + a 4-byte scale and zero per 128 weights
    n = 256 * 192
    want = {"int8": n + 192 * 4, "nf4": n // 2 + n // 64 * 4, "int4": n // 2 + n // 128 * 8}[kind]
    assert q.weight_bytes == want


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
    monkeypatch.setattr(Q.Int8Linear, "kernel_rows", 0)  # the bf16 decode path is tested below
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


@pytest.mark.parametrize("kind", ["int8", "int4", "nf4"])
def test_quantized_model_forward_and_training_forward(kind, exact_kernels):
    m = _model()
    names = Q.quantize_model(m, kind, group_size=32)
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
    tied = _model()
    emb = tied.tok_emb.weight.detach().clone()
    assert Q.quantize_model(tied, "int8", targets=("lm_head",)) == ["lm_head"]  # a tied head: its own copy
    assert isinstance(tied.lm_head, Q.Int8Linear) and torch.equal(tied.tok_emb.weight, emb)
    torch.testing.assert_close(tied.lm_head.dequantize(), emb, atol=emb.abs().max().item() / 127, rtol=0)
    with pytest.raises(ConfigError, match="unknown quantization kind 'int3'"):
        Q.quantize_model(_model(), "int3")
    with pytest.raises(ConfigError, match="match no linear layer"):
        Q.quantize_model(_model(), "int8", targets=("nope",))


@pytest.mark.parametrize("kind,head", [("int8", False), ("int4", False), ("nf4", False), ("int8", True)])
def test_quantized_model_round_trips_through_safetensors(kind, head, tmp_path):
    m = _model()  # a tied head: with `head`, quantized as its own copy
    before = Q.model_bytes(m)
    Q.quantize_model(m, kind, group_size=64, include_head=head)
    assert ("lm_head" in Q.quantization_map(m)) == head
    after = Q.model_bytes(m)
    assert after < before * (0.5 if kind == "int8" else 0.4) * (1.5 if head else 1)
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


# ---- decode kernels (bf16 activations) --------------------------------------------------------

@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_decode_shaped_calls_use_the_bf16_kernel_within_bf16_error(kind):
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=True)
    nn.init.normal_(lin.weight, 0, 0.02)
    q = Q.KINDS[kind].from_linear(lin, **({"group_size": 64} if kind == "int4" else {}))
    w = q.dequantize()
    with torch.no_grad():
        for rows in (1, 4, q.kernel_rows, q.kernel_rows + 1, 40):
            x = torch.randn(rows, 256)
            y, want = q(x), x @ w.T + lin.bias
            assert y.dtype == torch.float32
            if rows > q.kernel_rows or not Q.cpu_has_bf16():
                torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-5)  # dequantize-and-matmul
            else:  # activations rounded to bf16 (8 bits of mantissa) before the kernel
                assert _rel(y, want) < 0.01
    kernel_used = Q.cpu_has_bf16() and (kind == "int8" or Q.int4_kernel_available("cpu"))
    if kind == "int8":
        with torch.no_grad():
            assert Q._int8_decode_kernel_ok(torch.randn(1, 256), q.kernel_rows) == Q.cpu_has_bf16()
            assert not Q._int8_decode_kernel_ok(torch.randn(1, 100), q.kernel_rows)  # width not a multiple of 16
    else:
        assert (q._kernel_cache is not None) == kernel_used
    # with autograd on (training through the module) the kernel is never used
    x = torch.randn(2, 256, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, x @ w.T + lin.bias, rtol=1e-4, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, -1), rtol=1e-4, atol=1e-5)


def test_int4_codes_packing_groups_and_dtype():
    torch.manual_seed(2)
    codes = torch.randint(0, 16, (6, 64), dtype=torch.int32)
    packed = Q.int4_pack(codes)
    assert packed.shape == (6, 32) and packed.dtype == torch.uint8
    assert torch.equal(Q.int4_unpack(packed), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) * 16 + int(codes[0, 1])  # even column in the high nibble
    # weights that are exactly on a group's grid come back exactly (the range holds 0, codes 0..15)
    scale = torch.rand(6, 2) * 0.01 + 0.001
    lo = -8 * scale
    w = (codes.view(6, 2, 32).float() * scale[..., None] + lo[..., None]).view(6, 64)
    w[:, 0], w[:, 32] = lo[:, 0], lo[:, 1]  # each group's minimum ...
    w[:, 1], w[:, 33] = lo[:, 0] + 15 * scale[:, 0], lo[:, 1] + 15 * scale[:, 1]  # ... and maximum present
    c, s, z = Q.int4_quantize(w, 32)
    torch.testing.assert_close(Q.int4_dequantize(Q.int4_pack(c), s, z, 32), w, rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="group size must be one of"):
        Q.int4_quantize(w, 48)
    with pytest.raises(ConfigError, match="not a multiple of 128"):
        Q.Int4Linear.from_linear(nn.Linear(64, 8), 128)
    m = _model()
    with pytest.raises(ConfigError, match=r"layers\.0\.attn\.wq has 64 input features"):
        Q.quantize_model(_model(d_model=64), "int4", group_size=128)
    Q.quantize_model(m, "int4", group_size=32)
    m.to(torch.bfloat16)
    mod = m.layers[0].mlp.w2
    assert mod.dtype == torch.bfloat16 and mod.dequantize().dtype == torch.bfloat16 and mod.packed.dtype == torch.uint8
    with torch.no_grad():
        assert m(torch.randint(0, 128, (1, 5)))[0].dtype == torch.bfloat16


# ---- GPTQ ------------------------------------------------------------------------------------

def _correlated_inputs(n=512, d=128, seed=0):
    """Calibration inputs with very unequal, correlated channels (what real activations look like)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)[None, :]
    return torch.randn(n, d, generator=g) @ mix.T * torch.logspace(0.5, -0.5, d)[None, :]


@pytest.mark.parametrize("kind,act_order", [("int4", False), ("int4", True), ("int8", False)])
def test_gptq_weight_beats_rounding_on_the_layer_outputs(kind, act_order):
    from lmforge.infer.gptq import gptq_quantize_weight, layer_error

    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.02
    X = _correlated_inputs()
    X[:, 5] = 0.0  # a dead input channel
    H = 2 * X.T.double() @ X.double() / X.shape[0]
    res = gptq_quantize_weight(w, H, kind, group_size=32, act_order=act_order)
    if kind == "int4":
        assert res["scales"].shape == res["zeros"].shape == (64, 4)
        assert int(res["codes"].min()) >= 0 and int(res["codes"].max()) <= 15
        deq = Q.int4_dequantize(Q.int4_pack(res["codes"]), res["scales"], res["zeros"], 32)
        rtn = Q.Int4Linear.from_linear(_lin(w), 32).dequantize()
    else:
        assert int(res["codes"].abs().max()) <= 127
        deq = res["codes"].float() * res["scale"][:, None]
        rtn = Q.Int8Linear.from_linear(_lin(w)).dequantize()
    torch.testing.assert_close(deq, res["dequantized"], rtol=0, atol=1e-6)  # the codes are what was measured
    assert torch.all(res["dequantized"][:, 5] == 0) or kind == "int4"  # int4: 0 lies on every group's grid
    assert layer_error(res["dequantized"], w, H) < 0.8 * layer_error(rtn, w, H)


def _lin(w):
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = nn.Parameter(w.clone())
    return lin


def _bytes_model_trained(steps=80):
    """A byte-level (vocab 256) 2-layer model trained on real dictionary text, and held-out windows."""
    import gzip
    import json

    from lmforge.infer.quantize_cmd import SAMPLE_DICTIONARY

    with gzip.open(SAMPLE_DICTIONARY, "rt", encoding="utf-8") as f:
        docs = [json.loads(line)["text"] for line in f][:400]
    data = torch.tensor(list("\n".join(docs).encode("utf-8")), dtype=torch.long)
    cut = int(len(data) * 0.8)
    train, held = data[:cut], data[cut:]
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=256, max_seq_len=64, d_model=64, n_layers=2, tie_embeddings=False))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(train) - 65, (16,), generator=g)
        batch = torch.stack([train[s : s + 65] for s in starts])
        loss = m(batch[:, :-1], batch[:, 1:])[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    calib = [train[s : s + 64].tolist() for s in range(0, 64 * 48, 64)]
    heldout = torch.stack([held[s : s + 65] for s in range(0, 65 * 64, 65)])
    return m, calib, heldout


def test_gptq_beats_round_to_nearest_int4_in_held_out_loss_on_a_trained_model(exact_kernels):
    from lmforge.infer.gptq import gptq_quantize_model

    torch.set_num_threads(1)
    m, calib, held = _bytes_model_trained()

    def loss(model):
        with torch.no_grad():
            return float(-model.token_logprobs(held[:, :-1], held[:, 1:]).mean())

    dense = loss(m)
    assert dense < 3.5  # it learned something (ln 256 = 5.5)
    rtn = copy.deepcopy(m)
    Q.quantize_model(rtn, "int4", group_size=32, include_head=True)
    gptq = copy.deepcopy(m)
    res = gptq_quantize_model(gptq, calib, "int4", group_size=32, include_head=True)
    assert sorted(res["modules"]) == sorted(Q.quantization_map(rtn))
    assert all(isinstance(gptq.get_submodule(n), Q.Int4Linear) for n in res["modules"])
    assert all(e[0] <= e[1] for e in res["error"].values())  # every layer: GPTQ's calibration error <= rounding's
    l_rtn, l_gptq = loss(rtn), loss(gptq)
    assert dense < l_gptq <= l_rtn, (dense, l_gptq, l_rtn)


def test_gptq_refuses_bad_calibration():
    from lmforge.infer.gptq import gptq_quantize_model

    with pytest.raises(InputError, match="no calibration sequences"):
        gptq_quantize_model(_model(), [], "int4", group_size=32)
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        gptq_quantize_model(_model(), [[1, 2, 500]], "int4", group_size=32)
    with pytest.raises(InputError, match="longer than the model's context"):
        gptq_quantize_model(_model(), [list(range(40))], "int4", group_size=32)
    with pytest.raises(ConfigError, match="GPTQ quantizes to"):
        gptq_quantize_model(_model(), [[1, 2]], "nf4")


def _int8_layer(out_features=96, in_features=64, bias=False):
    torch.manual_seed(1)
    lin = torch.nn.Linear(in_features, out_features, bias=bias)
    return Q.Int8Linear.from_linear(lin)


@pytest.fixture(params=["lmforge", "fbgemm"])
def dynamic_kernel(request, monkeypatch):
    """Each single-row int8 kernel in turn: lmforge's compiled one and torch's fbgemm (the fallback)."""
    from lmforge.infer import cpu_kernels as CK

    if request.param == "fbgemm":
        if not Q.fbgemm_available():
            pytest.skip("this torch build has no fbgemm (x86 quantized engine)")
        monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    CK.reset()
    if request.param == "lmforge" and CK.int8_gemv_lib() is None:
        pytest.skip(f"lmforge's int8 kernel is not available here: {CK.int8_gemv_status()}")
    calls = []
    if request.param == "lmforge":
        real = Q.int8_gemv
        monkeypatch.setattr(Q, "int8_gemv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    else:
        real = torch.ops.quantized.linear_dynamic
        monkeypatch.setattr(torch.ops.quantized, "linear_dynamic", lambda *a: calls.append(1) or real(*a), raising=False)
    yield calls
    CK.reset()


@pytest.mark.parametrize("bias", [False, True])
def test_int8_single_row_decode_runs_the_dynamic_kernel_close_to_weight_only(bias, monkeypatch, dynamic_kernel):
    q = _int8_layer(bias=bias)
    x = torch.randn(1, 1, 64)
    exact = F.linear(x, q.dequantize(), q.bias)
    calls = dynamic_kernel
    with torch.no_grad():
        monkeypatch.setenv("LMFORGE_INT8_DECODE", "dynamic")
        y = q(x)
        assert calls, "one fp32 row on CPU goes through the dynamic kernel"
        assert _rel(y, exact) < 0.02  # activations quantized to 8 bits on the fly
        calls.clear()
        y2 = q(torch.cat([x, x], dim=1))  # two rows: never one shared activation scale
        assert not calls
        torch.testing.assert_close(y2[:, 0], y2[:, 1])
        monkeypatch.setenv("LMFORGE_INT8_DECODE", "weight-only")
        y3 = q(x)
        assert not calls and _rel(y3, exact) < 0.01
        monkeypatch.setenv("LMFORGE_INT8_DECODE", "fast")
        with pytest.raises(ConfigError, match="LMFORGE_INT8_DECODE='fast'"):
            q(x)


def test_int8_dynamic_kernel_follows_reloaded_weights(dynamic_kernel):
    q = _int8_layer()
    x = torch.randn(1, 64)
    with torch.no_grad():
        q(x)  # packs the weight
        other = _int8_layer(out_features=96)
        other.weight.mul_(-1)
        q.load_state_dict(other.state_dict())
        torch.testing.assert_close(q(x), F.linear(x, other.dequantize()), rtol=0.02, atol=0.05)
