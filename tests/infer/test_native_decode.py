"""The whole-step CPU decode kernel (lmforge.infer.native_decode): the same logits and cache writes as
torch's decode step for every model shape it accepts (GQA, QK-norm, untied or int8 heads, odd widths),
on every instruction-set build and thread count; the engine uses it for one row and gives the same
tokens; everything it does not run is refused with a reason and decoded by torch instead."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lmforge.infer import cpu_kernels as CK
from lmforge.infer import engine as E
from lmforge.infer import native_decode as ND
from lmforge.infer.engine import SamplingParams, decode_step, generate
from lmforge.infer.quantize import quantize_model
from lmforge.model import Transformer, preset

needs_kernel = pytest.mark.usefixtures("int8_kernel")


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The native, AVX2 and plain x86-64 builds of the kernels' source (own cache directory)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64") or CK._compiler() is None:
        pytest.skip("the kernels are built with a C compiler on x86-64")
    d = tmp_path_factory.mktemp("kernels")
    return {march: CK.load(CK.build(march, d)) for march in ("native", "haswell", "x86-64")}


def _model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(preset("tiny", **{"vocab_size": 120, "max_seq_len": 96, **kw})).eval()
    with torch.no_grad():  # norms away from 1 so a wrong norm weight shows
        for p in m.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return m


@torch.no_grad()
def _both(m: Transformer, steps: int = 6, prompt_len: int = 9, slots: int = 40, seed: int = 1):
    """(torch's logits, the kernel's logits, torch's caches, the kernel's caches) over `steps` decode
    steps after a prefill, each side from the same prefilled cache."""
    g = torch.Generator().manual_seed(seed)
    m.setup_cache(1, slots)
    m(torch.randint(0, m.cfg.vocab_size, (1, prompt_len), generator=g), pos=0)
    start = [(c.k.clone(), c.v.clone()) for c in m.caches()]
    toks = torch.randint(0, m.cfg.vocab_size, (steps,), generator=g).tolist()
    ref = []
    for i, t in enumerate(toks):
        mask = torch.zeros(1, 1, 1, slots)
        mask[..., prompt_len + i + 1 :] = float("-inf")
        ref.append(decode_step(m, torch.tensor([[t]]), torch.tensor([[prompt_len + i]]), mask))
    ref_cache = [(c.k.clone(), c.v.clone()) for c in m.caches()]
    for c, (k, v) in zip(m.caches(), start):
        c.k.copy_(k)
        c.v.copy_(v)
    step = ND.native_step(m)
    assert step is not None, ND.why_not(m)
    got = [step(m, torch.tensor([[t]]), torch.tensor([[prompt_len + i]])) for i, t in enumerate(toks)]
    got_cache = [(c.k.clone(), c.v.clone()) for c in m.caches()]
    m.clear_cache()
    return torch.cat(ref), torch.cat(got), ref_cache, got_cache


SHAPES = [
    {},
    {"n_kv_heads": 2, "qk_norm": True, "tie_embeddings": False},
    {"d_model": 72, "n_heads": 3, "n_kv_heads": 1, "ffn_hidden": 100},  # widths not a multiple of 16; head_dim 24
    {"n_layers": 3, "d_model": 96, "n_heads": 4, "head_dim": 20},  # pruned-heads shape: n_heads * head_dim != d_model
]


@needs_kernel
@pytest.mark.parametrize("kw", SHAPES)
def test_fp32_step_equals_torch_step(kw):
    ref, got, ref_cache, got_cache = _both(_model(**kw))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for (rk, rv), (gk, gv) in zip(ref_cache, got_cache):  # the keys/values written to the cache
        torch.testing.assert_close(gk, rk, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gv, rv, rtol=1e-5, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("include_head", [True, False])
@pytest.mark.parametrize("kw", SHAPES[:3])
def test_int8_step_equals_torch_int8_step(kw, include_head):
    m = _model(**kw)
    quantize_model(m, "int8", include_head=include_head)
    ref, got, _, _ = _both(m)
    # the same int8 arithmetic per layer; an fp32 input differing in its last bit can round one
    # activation to the neighbouring 8-bit value, so allow a little more than float noise
    assert (got - ref).abs().max().item() <= 0.02 * ref.std().item()
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@needs_kernel
def test_thread_counts_and_long_contexts_give_bitwise_equal_logits():
    # big enough that GEMVs and (at ~250 cached tokens) attention are split over the pool's threads
    m = _model(d_model=256, n_heads=8, n_kv_heads=2, ffn_hidden=1024, n_layers=2, max_seq_len=320)
    out = {}
    for threads in (1, 2, 3):
        with CK.use_threads(threads):
            out[threads] = _both(m, steps=3, prompt_len=250, slots=300)[1]
    assert torch.equal(out[1], out[2]) and torch.equal(out[1], out[3])
    assert CK.int8_gemv_lib().lmf_workers() >= 1
    ref = _both(m, steps=3, prompt_len=250, slots=300)[0]
    torch.testing.assert_close(out[2], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("march", ["haswell", "x86-64"])
def test_avx2_and_plain_builds_give_the_same_step(march, builds, monkeypatch, int8_kernel):
    """The AVX2 kernels and the plain-C ones (no AVX2: not used by the library, which then keeps
    torch's paths, but they compile and compute the same)."""
    lib = builds[march]
    monkeypatch.setattr(ND, "int8_gemv_lib", lambda: lib)
    for quant in (None, "int8"):
        m = _model(**SHAPES[2])
        if quant:
            quantize_model(m, quant, include_head=True)
        ref, got, _, _ = _both(m, steps=3)
        if quant:
            assert (got - ref).abs().max().item() <= 0.02 * ref.std().item()
        else:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_engine_runs_rows_through_the_kernel_with_the_same_tokens(monkeypatch):
    made = []
    real = ND.native_step

    def spy(model):
        step = real(model)
        made.append(step is not None)
        return step

    monkeypatch.setattr(ND, "native_step", spy)
    p = SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[], logprobs=True)
    for kw in SHAPES[:2]:
        m = _model(**kw)
        made.clear()
        a = generate(m, [[3, 4, 5, 6]], p)[0]
        assert made == [True]
        monkeypatch.setenv("LMFORGE_NATIVE_DECODE", "0")
        b = generate(m, [[3, 4, 5, 6]], p)[0]
        monkeypatch.delenv("LMFORGE_NATIVE_DECODE")
        assert a.token_ids == b.token_ids and a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
        # sampling draws the same tokens from the same seed
        s = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=5, stop_token_ids=[])
        x = generate(m, [[3, 4, 5, 6]], s)[0]
        monkeypatch.setenv("LMFORGE_NATIVE_DECODE", "0")
        y = generate(m, [[3, 4, 5, 6]], s)[0]
        monkeypatch.delenv("LMFORGE_NATIVE_DECODE")
        assert x.token_ids == y.token_ids
    # a batch: every row through the kernel (its own position and cache row), the same tokens as
    # torch's batched step; past MAX_TOKENS rows, torch's step
    prompts = [[3, 4], [5, 6, 7, 8, 9], [1], [3, 4]]
    made.clear()
    many = generate(m, prompts, SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[], n=2))
    assert made == [True] and len(many) == 8
    monkeypatch.setenv("LMFORGE_NATIVE_DECODE", "0")
    ref = generate(m, prompts, SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[], n=2))
    monkeypatch.delenv("LMFORGE_NATIVE_DECODE")
    assert [o.token_ids for o in many] == [o.token_ids for o in ref]
    assert many[0].token_ids == many[6].token_ids == generate(m, [[3, 4]], p)[0].token_ids
    made.clear()
    generate(m, [[1, 2]] * (ND.MAX_TOKENS + 1), SamplingParams(max_new_tokens=2, temperature=0, stop_token_ids=[]),
             max_batch=ND.MAX_TOKENS + 1)
    assert made == []


@needs_kernel
def test_engine_gives_the_kernel_the_tuned_threads_and_torch_one():
    m = _model()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        p = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[])
        generate(m, [[1, 2, 3]], p, on_token=lambda *a: seen.append((torch.get_num_threads(), CK.kernel_threads())))
        assert E.LAST_TUNER[0].choices[:2] == [1, 2]  # the tuner probes the kernel's counts
        assert {t for t, _ in seen} == {1} and {k for _, k in seen} <= {1, 2}
        assert torch.get_num_threads() == 2 and CK.kernel_threads() == 1
    finally:
        torch.set_num_threads(before)


def _lora(m):
    from lmforge.posttrain.lora import apply_lora

    apply_lora(m)
    return m


def _nf4(m):
    quantize_model(m, "nf4")
    return m


def _hooked(m):
    m.layers[0].attn.wq.register_forward_hook(lambda mod, i, o: o)
    return m


def _column_major(m):
    from lmforge.model.transformer import decode_layout

    decode_layout(m)
    return m


class _Sub(Transformer):
    def forward(self, *a, **k):
        return super().forward(*a, **k)


@needs_kernel
@pytest.mark.parametrize("make,why", [
    (lambda: _model(moe_experts=2, moe_top_k=1), "mixture-of-experts"),
    (lambda: _nf4(_model()), "NF4Linear"),
    (lambda: _lora(_model()), "LoRA"),
    (lambda: _hooked(_model()), "hooks"),
    (lambda: _column_major(_model()), "row-major"),
    (lambda: _model().to(torch.bfloat16), "fp32"),
])
def test_models_the_kernel_does_not_run_are_refused_and_decoded_by_torch(make, why):
    m = make()
    m.setup_cache(1, 16)
    reason = ND.why_not(m)
    assert why.lower() in reason.lower() and ND.native_step(m) is None
    m.clear_cache()
    out = generate(m, [[1, 2, 3]], SamplingParams(max_new_tokens=3, temperature=0, stop_token_ids=[]))
    assert len(out[0].token_ids) == 3


@needs_kernel
def test_refusals_without_a_cache_for_a_subclass_and_when_turned_off(monkeypatch):
    m = _model()
    assert "KV cache" in ND.why_not(m)
    m.setup_cache(1, 16)
    assert ND.why_not(m) == ""
    monkeypatch.setenv("LMFORGE_NATIVE_DECODE", "0")
    assert "LMFORGE_NATIVE_DECODE" in ND.why_not(m)
    monkeypatch.delenv("LMFORGE_NATIVE_DECODE")
    sub = _Sub(m.cfg)
    sub.setup_cache(1, 16)
    assert "not lmforge's Transformer" in ND.why_not(sub)
    step = ND.native_step(m)
    with pytest.raises(IndexError, match="outside"):
        step(m, torch.tensor([[1]]), torch.tensor([[16]]))  # past the cache's slots
    with pytest.raises(IndexError, match="outside"):
        step(m, torch.tensor([[500]]), torch.tensor([[0]]))  # not in the vocabulary


def test_without_compiled_kernels_torch_decodes(monkeypatch):
    monkeypatch.setenv("LMFORGE_CPU_KERNELS", "0")
    CK.reset()
    try:
        m = _model()
        m.setup_cache(1, 16)
        assert "not available" in ND.why_not(m) and ND.native_step(m) is None
        m.clear_cache()
        out = generate(m, [[1, 2, 3]], SamplingParams(max_new_tokens=3, temperature=0, stop_token_ids=[]))
        assert len(out[0].token_ids) == 3
    finally:
        CK.reset()


def test_the_refusal_list_covers_modules_swapped_in():
    # every linear type the kernel takes is named in native_decode; a new swapped-in type is refused
    class Odd(nn.Linear):
        pass

    m = _model()
    m.layers[1].mlp.w2 = Odd(m.layers[1].mlp.w2.in_features, m.layers[1].mlp.w2.out_features, bias=False)
    m.setup_cache(1, 16)
    assert "layer 1 w2 is a Odd" in ND.why_not(m) or "compiled kernels not available" in ND.why_not(m)


@needs_kernel
@pytest.mark.parametrize("quant", [None, "int8"])
def test_server_engine_decodes_a_lone_sequence_through_the_kernel_over_its_paged_cache(quant, monkeypatch):
    from lmforge.infer.batching import BatchEngine

    m = _model(n_kv_heads=2, qk_norm=True)
    if quant:
        quantize_model(m, quant, include_head=True)
    base = list(range(1, 14))
    prompts = [base + [20, 21], base + [30], base[:9]]  # later prompts reuse the first one's full blocks
    p = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[], logprobs=True)

    def serve(**kw):
        e = BatchEngine(m, None, block_size=4, max_running=4, **kw)
        e.start()
        try:
            outs = [e.submit(q, p).result(timeout=60)[0] for q in prompts]  # one at a time: a lone sequence
            return outs, e._native, e.stats()
        finally:
            e.shutdown(drain=False)

    outs, native, st = serve()
    assert callable(native) and st["prefix_hits"] >= 2 and st["kv_blocks_used"] == 0
    monkeypatch.setenv("LMFORGE_NATIVE_DECODE", "0")
    ref, off, _ = serve()
    assert off is False
    for o, r in zip(outs, ref):
        # int8: an activation rounded to the neighbouring 8-bit value now and then (see the int8 test)
        assert o.token_ids == r.token_ids and o.logprobs == pytest.approx(r.logprobs, abs=2e-2 if quant else 1e-4)
    step = native
    with pytest.raises(ValueError, match="block table"):  # a paged cache without its table
        step(m, torch.tensor([[1]]), torch.tensor([[3]]))


@needs_kernel
@pytest.mark.parametrize("quant", [None, "int8"])
@pytest.mark.parametrize("kw", SHAPES[:3])
def test_a_chunk_of_tokens_computes_what_one_at_a_time_computes(kw, quant):
    """The multi-token call (speculative verification, a draft's catch-up) gives every token bitwise
    the logits, hidden state and cache entries of decoding the tokens one by one."""
    m = _model(**kw)
    if quant:
        quantize_model(m, quant, include_head=True)
    toks = torch.randint(0, m.cfg.vocab_size, (ND.MAX_TOKENS + 20,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        m.setup_cache(1, 96)
        m(torch.tensor([toks[:9]]), pos=0)
        start = [(c.k.clone(), c.v.clone()) for c in m.caches()]
        fwd = ND.native_forward(m)
        for n in (1, 3, 6, ND.MAX_TOKENS):
            for c, (k, v) in zip(m.caches(), start):
                c.k.copy_(k)
                c.v.copy_(v)
            chunk = toks[9 : 9 + n]
            h, z = fwd(chunk, 9, hidden=True, logits=n)
            after_chunk = [c.k.clone() for c in m.caches()]
            for c, (k, v) in zip(m.caches(), start):
                c.k.copy_(k)
                c.v.copy_(v)
            one = [fwd([t], 9 + i, hidden=True, logits=1) for i, t in enumerate(chunk)]
            assert torch.equal(h, torch.cat([o[0] for o in one])) and torch.equal(z, torch.cat([o[1] for o in one]))
            assert all(torch.equal(a, c.k) for a, c in zip(after_chunk, m.caches()))
        _, last = fwd(toks[9:13], 9, logits=2)  # only the last tokens through the head
        assert last.shape == (2, m.cfg.vocab_size)
        with pytest.raises(ValueError, match="1 to"):
            fwd(toks[: ND.MAX_TOKENS + 1], 0)
        with pytest.raises(IndexError, match="outside the cache"):
            fwd(toks[:4], 94)
    m.clear_cache()


def _dense_copy(m: Transformer) -> Transformer:
    """The model with every quantized linear replaced by a plain fp32 one holding its dequantized weight."""
    import copy

    from lmforge.infer.quantize import QuantizedLinear

    d = copy.deepcopy(m)
    for mod in list(d.modules()):
        for name, c in list(mod.named_children()):
            if isinstance(c, QuantizedLinear):
                lin = nn.Linear(c.in_features, c.out_features, bias=False)
                lin.weight.data = c.dequantize(torch.float32).contiguous()
                setattr(mod, name, lin)
    return d


@needs_kernel
@pytest.mark.parametrize("kw,group", [({}, 32), ({"d_model": 256, "n_heads": 4, "ffn_hidden": 768}, 128),
                                      ({"d_model": 256, "n_heads": 4, "ffn_hidden": 768, "n_kv_heads": 2}, 256),
                                      ({"d_model": 96, "n_heads": 4, "ffn_hidden": 192}, 32)])
def test_int4_step_is_the_dequantized_model_up_to_8bit_activations(kw, group):
    m = _model(**kw)
    quantize_model(m, "int4", group_size=group, include_head=True)
    got = _both(m)[1]
    dense = _both(_dense_copy(m))[1]  # the kernel on the dequantized weights, fp32 activations
    rel = ((got - dense).norm() / dense.norm()).item()
    q8 = _model(**kw)
    quantize_model(q8, "int8", include_head=True)
    rel8 = ((_both(q8)[1] - _both(_dense_copy(q8))[1]).norm() / dense.norm()).item()
    assert 0 < rel < max(0.03, 3 * rel8)  # the error class of 8-bit activations, as for int8
    # (each instruction-set path of the int4 GEMV against exact arithmetic: the test below)


@pytest.mark.parametrize("march", ["native", "x86-64"])
@pytest.mark.parametrize("k,n,group", [(256, 40, 32), (384, 13, 128), (512, 9, 256), (96, 7, 32), (640, 5, 64)])
def test_int4_gemv_matches_exact_arithmetic(march, k, n, group, builds):
    """The int4 x int8 GEMV (vectorised for K a multiple of 128 on AVX512-VNNI, plain C otherwise)
    against the same arithmetic in float64: x rounded to 8 bits with one scale, integer sums per
    group, the group's scale, the -8 offset and the zero term."""
    from lmforge.infer.quantize import int4_pack, int4_quantize

    lib = builds[march]
    g = torch.Generator().manual_seed(k + n)
    w = torch.randn(n, k, generator=g)
    codes, scales, zeros = int4_quantize(w, group)
    packed = int4_pack(codes).contiguous()
    x = torch.randn(k, generator=g)
    y = torch.empty(n)
    scratch, gs = torch.empty(k, dtype=torch.int8), torch.empty(2 * k // group)
    lib.lmf_int4_gemv(x.data_ptr(), k, group, packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(), n, y.data_ptr(),
                      scratch.data_ptr(), gs.data_ptr())
    sx = x.abs().max().double() / 127
    xq = torch.round(x.double() / sx)
    cg, xg = codes.double().view(n, -1, group), xq.view(-1, group)
    ref = sx * (scales.double() * ((cg * xg).sum(-1) - 8 * xg.sum(-1))).sum(-1) + (zeros.double() * x.double().view(-1, group).sum(-1)).sum(-1)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_int4_model_decodes_through_the_kernel():
    m = _model()
    quantize_model(m, "int4", group_size=32, include_head=True)
    m.setup_cache(1, 16)
    assert ND.why_not(m) == ""
    m.clear_cache()
    out = generate(m, [[1, 2, 3]], SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[]))
    assert len(out[0].token_ids) == 6


@needs_kernel
@pytest.mark.parametrize("n,k", [(9, 40), (1030, 768), (300, 2051)])
def test_f32_gemv_matches_torch_on_any_thread_count(n, k):
    lib = CK.int8_gemv_lib()
    g = torch.Generator().manual_seed(n)
    w, x = torch.randn(n, k, generator=g), torch.randn(k, generator=g)
    one = CK.f32_gemv(lib, x, w, 1)
    torch.testing.assert_close(one, (w @ x)[None], rtol=1e-5, atol=1e-4)
    assert torch.equal(one, CK.f32_gemv(lib, x, w, 2)) and torch.equal(one, CK.f32_gemv(lib, x, w, 3))


@needs_kernel
def test_server_engine_decodes_a_running_batch_through_the_kernel(monkeypatch):
    """Requests decoded together (rows of different lengths, prefix-shared blocks, some joining the
    running batch): every row through the kernel over its own block table, each row bitwise the
    arithmetic of decoding it alone, so the batch gives what one-at-a-time gives."""
    import threading

    from lmforge.infer.batching import BatchEngine

    m = _model(n_kv_heads=2)
    base = list(range(1, 14))
    prompts = [base + [20, 21], base + [30], base[:9], [5], list(range(40, 70))]
    p = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[], logprobs=True)

    def serve(together: bool):
        e = BatchEngine(m, None, block_size=4, max_running=8)
        e.start()
        try:
            if not together:
                return [e.submit(q, p).result(timeout=60)[0] for q in prompts], e
            first = threading.Event()
            reqs = [e.submit(q, p, on_event=lambda ev: first.set()) for q in prompts[:2]]
            assert first.wait(10)
            reqs += [e.submit(q, p) for q in prompts[2:]]
            return [r.result(timeout=60)[0] for r in reqs], e
        finally:
            e.shutdown(drain=False)

    alone, _ = serve(False)
    together, e = serve(True)
    assert callable(e._native) and e.stats()["kv_blocks_used"] == 0
    for a, b in zip(alone, together):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs  # bitwise: the same arithmetic per row
    monkeypatch.setenv("LMFORGE_NATIVE_DECODE", "0")
    ref, _ = serve(True)
    for a, r in zip(together, ref):
        assert a.token_ids == r.token_ids and a.logprobs == pytest.approx(r.logprobs, abs=1e-4)
