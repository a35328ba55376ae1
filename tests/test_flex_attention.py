"""FlexAttention document masking (lmforge.model.flex) against the dense boolean document mask.

On CPU torch's FlexAttention has a forward pass only, so CPU checks the block mask (its predicate
and its tile structure) and the forward values through torch's reference implementation; the
compiled kernels, the backward pass and the absence of host syncs are checked on CUDA."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask

from lmforge.model import flex as FX


def _doc_ids(B: int, T: int, p_start: float, seed: int) -> torch.Tensor:
    """Document ids as the batch loader makes them: a cumulative count of document starts. Row 0
    is one document, the last row starts a document at every token (the two extremes)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, T, generator=g) < p_start
    starts[0] = False
    starts[-1] = True
    return starts.long().cumsum(1)


def _dense(doc_ids: torch.Tensor) -> torch.Tensor:
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return causal & (doc_ids[:, :, None] == doc_ids[:, None, :])  # (B, T, T)


def _tiles(dense: torch.Tensor, bs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all) of the dense mask per bs x bs tile; padding past T counts as masked."""
    B, T, _ = dense.shape
    n = -(-T // bs)
    pad = torch.zeros(B, n * bs, n * bs, dtype=torch.bool)
    pad[:, :T, :T] = dense
    t = pad.view(B, n, bs, n, bs).permute(0, 1, 3, 2, 4).reshape(B, n, n, bs * bs)
    return t.any(-1), t.all(-1)


def _ordered_to_dense(num: torch.Tensor, idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Dense (..., rows, n_cols) tile map from BlockMask's per-row count + column indices."""
    out = torch.zeros(*num.shape, n_cols, dtype=torch.bool)
    for pos in itertools.product(*(range(s) for s in num.shape)):
        out[pos][idx[pos][: num[pos]].long()] = True
    return out


@pytest.mark.parametrize("T,bs", [(256, 128), (200, 32), (96, 16)])
def test_block_mask_predicate_and_tiles_equal_the_dense_document_mask(T, bs):
    doc = _doc_ids(3, T, 0.03, seed=T)
    bm = FX.document_block_mask(doc, block_size=bs)
    dense = _dense(doc)
    # the element-wise predicate the kernel applies inside partial tiles
    assert torch.equal(create_mask(bm.mask_mod, 3, 1, T, T, device="cpu")[:, 0], dense)
    # the tile structure: a tile is visited iff it holds an allowed pair, and skips the predicate
    # (a "full" tile) only if every pair in it is allowed
    any_t, all_t = _tiles(dense, bs)
    assert torch.equal(bm.to_dense()[:, 0].bool(), any_t)
    n = any_t.shape[-1]
    full = _ordered_to_dense(bm.full_kv_num_blocks[:, 0], bm.full_kv_indices[:, 0], n)
    assert torch.equal(full, all_t)
    assert bm.seq_lengths == (T, T) and bm.BLOCK_SIZE == (bs, bs)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("hq,hkv,T", [(4, 2, 256), (4, 4, 200), (6, 1, 160)])
def test_flex_forward_equals_sdpa_with_the_dense_mask(hq, hkv, T):
    torch.manual_seed(hq * T)
    B, D = 3, 16
    doc = _doc_ids(B, T, 0.02, seed=hkv)
    q, k, v = torch.randn(B, hq, T, D), torch.randn(B, hkv, T, D), torch.randn(B, hkv, T, D)
    bm = FX.document_block_mask(doc)
    with torch.no_grad():
        out = FX.flex_document_attention(q, k, v, bm, compiled=False)  # torch's reference implementation on CPU
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=_dense(doc)[:, None], enable_gqa=hq != hkv)
    assert out.shape == (B, hq, T, D)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_mask_and_attention_inside_one_compiled_graph():
    """How the model uses the module under torch.compile: the block mask built inside the compiled
    forward and attention through it, one graph (fullgraph: no graph break), and a new batch's
    document ids reuse that graph (no recompilation). Forward only: CPU (~5-15 s to compile)."""
    B, hq, hkv, T, D = 2, 4, 2, 256, 16

    def attend(q, k, v, doc):
        return FX.flex_document_attention(q, k, v, FX.document_block_mask(doc))

    fn = torch.compile(attend, fullgraph=True, dynamic=False)
    for seed in range(2):
        torch.manual_seed(seed)
        doc = _doc_ids(B, T, 0.02, seed=seed + 10)
        q, k, v = torch.randn(B, hq, T, D), torch.randn(B, hkv, T, D), torch.randn(B, hkv, T, D)
        with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=seed > 0):
            out = fn(q, k, v, doc)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=_dense(doc)[:, None], enable_gqa=True)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_shape_errors_and_cpu_availability():
    with pytest.raises(ValueError, match="batch, seq"):
        FX.document_block_mask(torch.zeros(8, dtype=torch.long))
    q, kv = torch.randn(1, 3, 16, 8), torch.randn(1, 2, 16, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        FX.flex_document_attention(q, kv, kv, FX.document_block_mask(torch.zeros(1, 16, dtype=torch.long)))
    # no backward pass on CPU in torch's FlexAttention: training there keeps the dense-mask SDPA path
    assert not FX.flex_available("cpu") and not FX.flex_available(torch.device("cpu"))


@pytest.mark.skipif(not (torch.cuda.is_available() and FX.flex_available("cuda")),
                    reason="compiled FlexAttention kernels need CUDA + Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_flex_forward_backward_on_cuda_without_host_sync(dtype):
    torch.manual_seed(0)
    B, hq, hkv, T, D = 2, 8, 2, 512, 64
    doc = _doc_ids(B, T, 0.01, seed=1).cuda()
    FX.document_block_mask(doc)  # compiles the construction (the compiler may sync; later calls may not)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device->host sync in mask building raises
    try:
        bm = FX.document_block_mask(doc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    q = torch.randn(B, hq, T, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(B, hkv, T, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(B, hkv, T, D, device="cuda", dtype=dtype, requires_grad=True)
    go = torch.randn(B, hq, T, D, device="cuda", dtype=dtype)
    out = FX.flex_document_attention(q, k, v, bm)
    grads = torch.autograd.grad(out, (q, k, v), go)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=_dense(doc.cpu()).cuda()[:, None], enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), go.float())
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.float(), ref, **tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, **tol)
