"""The CPU fast paths of the model and of Muon give the same numbers as the straightforward
computation: fused head + cross-entropy, fused QKV projection, RMSNorm and RoPE kernels, the
float document mask, batched / Gram-space Newton-Schulz."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.model import Transformer, preset
from lmforge.model import transformer as T
from lmforge.train import optim as O


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=320, max_seq_len=64, **kw))


def _plain(monkeypatch):
    """Switch every fast path off: the reference computation."""
    monkeypatch.setattr(T, "_cpu_fast", lambda x: False)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a, b, rtol=1e-4, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


# ---- fused head + cross-entropy --------------------------------------------------------------
@pytest.mark.parametrize("block_bytes", [1 << 30, 320 * 4 * 7])  # one block; blocks of 7 rows
@pytest.mark.parametrize("workspace", [None, {}])
def test_linear_cross_entropy_matches_cross_entropy(monkeypatch, block_bytes, workspace):
    monkeypatch.setattr(T, "_CE_BLOCK_BYTES", block_bytes)
    torch.manual_seed(1)
    x = torch.randn(75, 24, requires_grad=True)  # 75 rows: partial blocks and softmax slices
    w = (torch.randn(320, 24) * 0.3).requires_grad_()
    t = torch.randint(0, 320, (75,))
    t[[3, 40, 41]] = -100
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    for _ in range(2):  # the second call reuses the workspace buffer
        x.grad = w.grad = x2.grad = w2.grad = None
        loss = T.linear_cross_entropy(x, w, t, workspace=workspace)
        (loss * 3.0).backward()
        ref = F.cross_entropy(F.linear(x2, w2), t)
        (ref * 3.0).backward()
        _close(loss, ref)
        _close(x.grad, x2.grad)
        _close(w.grad, w2.grad)
    assert x.grad[3].abs().max() == 0  # ignored rows get no gradient


def test_linear_cross_entropy_under_bf16_autocast():
    torch.manual_seed(2)
    x = torch.randn(64, 32, requires_grad=True)
    w = (torch.randn(320, 32) * 0.2).requires_grad_()
    t = torch.randint(0, 320, (64,))
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = T.linear_cross_entropy(x, w, t)
        ref = F.cross_entropy(F.linear(x2, w2).float(), t)
    loss.backward()
    ref.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    _close(loss, ref, rtol=1e-2, atol=1e-2)
    _close(x.grad, x2.grad, rtol=5e-2, atol=2e-3)
    _close(w.grad, w2.grad, rtol=5e-2, atol=2e-3)


def test_fused_loss_returns_no_logits_only_when_training_with_targets():
    m = _model()
    x = torch.randint(0, 320, (2, 33))
    logits, loss = m(x[:, :-1], x[:, 1:])
    assert logits is None and loss.requires_grad
    with torch.no_grad():
        logits, loss2 = m(x[:, :-1], x[:, 1:])
    assert logits.shape == (2, 32, 320)
    _close(loss2, loss.detach())
    m.fused_loss = False
    logits, loss3 = m(x[:, :-1], x[:, 1:])
    assert logits.shape == (2, 32, 320)
    _close(loss3, loss)


# ---- the whole model: fast paths against the plain computation --------------------------------
@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2}, {"qk_norm": True}, {"n_kv_heads": 1, "qk_norm": True},
                                {"tie_embeddings": False}, {"moe_experts": 4, "moe_top_k": 2}])
@pytest.mark.parametrize("docs", [False, True])
def test_training_step_equals_the_plain_computation(monkeypatch, kw, docs):
    fast = _model(**kw)
    plain = copy.deepcopy(fast)
    plain.fused_loss = False
    torch.manual_seed(3)
    x = torch.randint(0, 320, (3, 49))
    x[:, 0] = 0
    doc = torch.cumsum((torch.rand(3, 48) < 0.08).long(), 1) if docs else None
    if docs:
        doc[1] = 0  # a row holding one document next to rows holding several
    fl = fast(x[:, :-1], x[:, 1:], doc_ids=doc)[1]
    fl.backward()
    with monkeypatch.context() as mp:
        _plain(mp)
        pl = plain(x[:, :-1], x[:, 1:], doc_ids=doc)[1]
        pl.backward()
    _close(fl, pl)
    gf, gp = _grads(fast), _grads(plain)
    assert gf.keys() == gp.keys()
    for n in gp:
        _close(gf[n], gp[n], rtol=1e-4, atol=1e-6 * max(1.0, gp[n].abs().max().item()))


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2, "qk_norm": True}])
def test_inference_and_kv_cache_equal_the_plain_computation(monkeypatch, kw):
    m = _model(**kw).eval()
    x = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        full = m(x)[0]
        m.setup_cache(2, 32)
        step = torch.cat([m(x[:, :16], pos=0)[0], m(x[:, 16:], pos=16)[0]], 1)
        m.clear_cache()
        with monkeypatch.context() as mp:
            _plain(mp)
            ref = m(x)[0]
    _close(full, ref)
    _close(step, ref)


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 2, "qk_norm": True}])
@pytest.mark.parametrize("narrow", [False, True])
def test_per_row_decode_without_autograd_equals_the_plain_computation(monkeypatch, kw, narrow):
    """Decoding with per-row positions under no_grad (the RMSNorm / RoPE kernels as plain functions,
    per-row RoPE tables, in-place SwiGLU, an additive mask narrower than the cache) gives the
    logits of the plain full forward at each row's own position."""
    m = _model(**kw).eval()
    x = torch.randint(0, 320, (2, 12))
    lens = [7, 10]  # row r has lens[r] tokens in the cache and decodes token x[r, lens[r]]
    S, width = 32, (16 if narrow else 32)
    with torch.no_grad():
        m.setup_cache(2, S)
        m(x[:, :10], pos=0)  # prefill (row 0's slots 7..9 are overwritten / masked below)
        pos = torch.tensor(lens)[:, None]
        mask = torch.zeros(2, 1, 1, S).masked_fill_(torch.arange(S)[None, None, None, :] > pos[:, None, :, None],
                                                    float("-inf"))
        tok = x[torch.arange(2), torch.tensor(lens)][:, None]
        got = m(tok, pos=pos, mask=mask[..., :width])[0][:, -1]
        m.clear_cache()
        with monkeypatch.context() as mp:
            _plain(mp)
            ref = torch.stack([m(x[r : r + 1, : lens[r] + 1])[0][0, -1] for r in range(2)])
    _close(got, ref)


def test_only_single_document_batches_drop_the_mask():
    one = torch.zeros(2, 10, dtype=torch.long)
    assert T.attention_mask(one, fast=True) is None
    two = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    bias = T.attention_mask(two, fast=True)
    assert bias.dtype == torch.float32 and bias.shape == (2, 1, 10, 10)
    assert torch.equal(bias == 0, T.document_mask(two))
    assert T.attention_mask(two, fast=False).dtype == torch.bool
    assert T.attention_mask(None, fast=True) is None
    torch.manual_seed(4)
    q, k, v = (torch.randn(2, 3, 10, 8) for _ in range(3))
    _close(F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
           F.scaled_dot_product_attention(q, k, v, attn_mask=T.document_mask(two)))
    # one document per row: the causal mask, i.e. plain causal attention
    _close(F.scaled_dot_product_attention(q, k, v, is_causal=True),
           F.scaled_dot_product_attention(q, k, v, attn_mask=T.document_mask(one)))


# ---- kernels ---------------------------------------------------------------------------------
def test_rmsnorm_kernel_matches_rms_norm():
    torch.manual_seed(5)
    x = torch.randn(3, 7, 40, requires_grad=True)
    w = (1 + 0.1 * torch.randn(40)).requires_grad_()
    g = torch.randn(3, 7, 40)
    y = T._RMSNormFn.apply(x, w, 1e-5)
    y.backward(g)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = F.rms_norm(x2, (40,), w2, 1e-5)
    y2.backward(g)
    _close(y, y2)
    _close(x.grad, x2.grad)
    _close(w.grad, w2.grad)


@pytest.mark.parametrize("shape", [(1, 1, 40), (2, 5, 40), (300, 250, 40)])
def test_inference_rmsnorm_matches_rms_norm_at_every_size(shape):
    # no autograd: decode-sized inputs go through F.rms_norm, larger ones through the four-op kernel
    torch.manual_seed(7)
    norm = T.RMSNorm(40)
    with torch.no_grad():
        norm.weight.mul_(1 + 0.1 * torch.randn(40))
        x = torch.randn(*shape)
        assert (x.numel() <= T.SMALL_NORM) == (shape[0] < 300)
        _close(norm(x), F.rms_norm(x, (40,), norm.weight, 1e-5))


@pytest.mark.parametrize("qk_axis", [False, True])
def test_rope_kernel_matches_apply_rope(qk_axis):
    torch.manual_seed(6)
    B, L, H, D = 2, 12, 3, 16
    cos, sin = T.rope_tables(D, L, 10000.0)
    shape = (B, L, 2, H, D) if qk_axis else (B, L, H, D)
    base = torch.randn(*shape[:-1], D + 5)[..., :D]  # a strided view, as the slices of the QKV output are
    x = base.detach().clone().requires_grad_()
    x2 = base.detach().clone().requires_grad_()
    g = torch.randn(shape)
    y = T.rope_bthd(x, cos, sin)
    y.backward(g)
    # reference: (B, heads, L, D) layout through apply_rope
    perm = (0, 2, 3, 1, 4) if qk_axis else (0, 2, 1, 3)
    inv = (0, 3, 1, 2, 4) if qk_axis else (0, 2, 1, 3)
    y2 = T.apply_rope(x2.permute(perm), cos, sin).permute(inv)
    y2.backward(g)
    _close(y, y2)
    _close(x.grad, x2.grad)


def test_fused_projection_is_skipped_for_hooked_or_sharded_weights():
    m = _model()
    attn = m.layers[0].attn
    x = torch.randn(2, 8, m.cfg.d_model)
    cos, sin = m.rope_cos[:8], m.rope_sin[:8]
    assert attn._fusable()
    fused = attn.project(x, cos, sin)
    calls = []
    h = attn.wk.register_forward_pre_hook(lambda mod, args: calls.append(1))
    try:
        assert not attn._fusable()
        hooked = attn.project(x, cos, sin)  # the separate projections: the hook runs
    finally:
        h.remove()
    assert calls == [1]
    for a, b in zip(fused, hooked):
        _close(a, b)

    class Sub(torch.Tensor):
        pass

    assert not T._plain(torch.zeros(2).as_subclass(Sub))


# ---- Muon ------------------------------------------------------------------------------------
def _ns_plain(g, steps=5, eps=1e-7):
    """The Newton-Schulz iteration written out for one matrix (the straightforward version)."""
    a, b, c = O.NS_COEFFS
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(24, 24), (20, 56), (56, 20), (24, 40)])
def test_newton_schulz_batched_and_gram_space_equal_per_matrix(shape):
    torch.manual_seed(7)
    mats = torch.randn(3, *shape)
    mats[1] = torch.randn(shape[0], 2) @ torch.randn(2, shape[1]) + 1e-3 * torch.randn(shape)  # nearly rank 2
    out = O.newton_schulz(mats, steps=5)
    for i in range(3):
        ref = _ns_plain(mats[i])
        _close(out[i], ref, rtol=0, atol=2e-3 * ref.abs().max().item())
        _close(O.newton_schulz(mats[i], steps=5), ref, rtol=0, atol=2e-3 * ref.abs().max().item())


def test_gram_space_is_used_for_wide_matrices_only():
    assert O._gram_space_pays(256, 704, 5) and O._gram_space_pays(20, 56, 5)
    assert not O._gram_space_pays(256, 256, 5) and not O._gram_space_pays(24, 40, 5)


class _PlainMuon(torch.optim.Optimizer):
    """Muon written per matrix with the plain iteration: the reference for the batched optimizer."""

    def __init__(self, params, lr, momentum, nesterov, weight_decay):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                buf = st.setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                upd = p.grad + group["momentum"] * buf if group["nesterov"] else buf
                o = _ns_plain(upd)
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(o, alpha=-group["lr"] * max(1.0, p.shape[0] / p.shape[1]) ** 0.5)


@pytest.mark.parametrize("nesterov,wd", [(True, 0.0), (False, 0.1)])
def test_muon_update_equals_the_per_matrix_version(nesterov, wd):
    torch.manual_seed(8)
    shapes = [(32, 32), (32, 32), (32, 32), (88, 32), (88, 32), (32, 88), (16, 48)]
    ps = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = O.Muon(ps, lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=wd)
    ref = _PlainMuon(qs, lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=wd)
    for _ in range(3):
        before = [q.detach().clone() for q in qs]
        for p, q in zip(ps, qs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for p, q, b in zip(ps, qs, before):
            _close(p - b, q - b, rtol=0, atol=1e-3 * (q - b).abs().max().item())
            _close(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])


@pytest.mark.parametrize("tie", [False, True])
def test_decode_layout_keeps_values_outputs_ties_and_saving(tmp_path, tie):
    """`decode_layout` stores plain linear weights column-major: same parameters and values, the
    same logits up to summation order, greedy decoding unchanged, tied weights still tied, LoRA-style
    subclasses left alone, and the model still saves, loads and trains."""
    from lmforge.infer.engine import SamplingParams, generate
    from lmforge.model.io import load_model, save_model

    m = Transformer(preset("tiny", vocab_size=320, max_seq_len=64, tie_embeddings=tie)).eval()

    class Sub(torch.nn.Linear):
        pass

    m.layers[0].attn.wo.__class__ = Sub
    ref = copy.deepcopy(m)
    params = {n: p for n, p in m.named_parameters()}
    n = T.decode_layout(m)
    assert n == sum(1 for x in m.modules() if T.plain_linear(x))
    assert {k: v for k, v in m.named_parameters()} == params  # the same Parameter objects
    assert not m.layers[0].attn.wq.weight.is_contiguous() and m.layers[0].attn.wo.weight.is_contiguous()
    assert (m.lm_head.weight is m.tok_emb.weight) == tie
    for (k, a), b in zip(m.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    x = torch.randint(0, 320, (2, 20))
    with torch.no_grad():
        _close(m(x)[0], ref(x)[0])
    p = SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=())
    assert [c.token_ids for c in generate(m, [[1, 2, 3], [4, 5]], p)] == \
        [c.token_ids for c in generate(ref, [[1, 2, 3], [4, 5]], p)]
    save_model(m, tmp_path / "m")
    back = load_model(tmp_path / "m")
    for (k, a), b in zip(back.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k
    m.train()
    _, loss = m(x, targets=x)
    loss.backward()
    assert m.layers[0].attn.wq.weight.grad is not None and torch.isfinite(loss)
