"""Document-masked attention through FlexAttention: causal attention restricted to tokens of the
same packed document, without a dense (B, 1, T, T) mask.

Why: with `packing = "doc_mask"` the model used to hand SDPA a dense boolean mask. A dense mask
rules out SDPA's flash kernels (they take `is_causal` or nothing), so every layer fell back to the
memory-efficient/math kernels and read a T x T mask: -13% tokens/s for the 124M preset on an
H200 (issue 9). FlexAttention instead takes a *block mask*: the (T/128) x (T/128) tiles of the
attention matrix are sorted once per batch into empty (skipped), full (no per-element masking)
and partial (the `mask_mod` predicate is evaluated inside the fused kernel). A document mask is
mostly empty and full tiles, so the kernel does less work than causal flash attention, not more.

- `document_block_mask(doc_ids)`: the BlockMask for per-token document ids (B, T); build it once
  per batch and pass the same object to every layer.
- `flex_document_attention(q, k, v, block_mask)`: the attention core for (B, H, T, D) queries and
  (B, H_kv, T, D) keys/values (grouped-query attention without repeating keys/values).
- `flex_available(device)`: whether the fast path can train on `device` (CUDA with Triton; not
  CPU, where torch's FlexAttention has no backward pass).

`flex_attention` is only fast when compiled (eagerly it materialises the full score matrix), so
this module compiles it once, lazily, on first use; inside an outer `torch.compile` the compiled
wrapper is simply inlined. Nothing here reads a tensor value on the host (no `.item()`, no
`bool(tensor)`), so building the mask and attending never stall the GPU queue.
"""

from __future__ import annotations

import torch

try:  # FlexAttention exists from torch 2.5; lmforge declares torch >= 2.9, but stay importable regardless
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - only on a torch without FlexAttention
    BlockMask = create_block_mask = flex_attention = None

BLOCK_SIZE = 128  # FlexAttention's tile; the kernels are tuned for it


def flex_available(device: torch.device | str) -> bool:
    """True when document-masked training can use FlexAttention on `device`: a CUDA device, a torch
    with FlexAttention and Triton (which generates the fused kernels). False on CPU: torch's CPU
    FlexAttention runs the forward pass only ("does not support backward on CPU"), so CPU training
    keeps the dense-mask SDPA path."""
    if flex_attention is None:
        return False
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover
        return False
    return has_triton()


def document_mask_mod(doc_ids: torch.Tensor):
    """The element-wise predicate FlexAttention evaluates in partial tiles: query position q may
    attend key position kv of row b when kv <= q and both belong to the same document."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])

    return mask_mod


def document_block_mask(doc_ids: torch.Tensor, n_heads: int | None = None, block_size: int = BLOCK_SIZE) -> "BlockMask":
    """BlockMask for causal attention within documents, from per-token document ids (B, T) (any
    integers; equal ids = same document, as `lmforge.train.data` makes them with a cumulative sum
    over `<|bos|>`). `n_heads` None (the default) shares one mask across heads, which is all a
    document mask needs. Built on the ids' device with tensor ops only (no host sync); on CUDA the
    construction is compiled, so the (B, T, T) predicate is never materialised in memory."""
    if flex_attention is None:  # pragma: no cover
        raise RuntimeError("this torch has no FlexAttention (torch.nn.attention.flex_attention)")
    if doc_ids.dim() != 2:
        raise ValueError(f"doc_ids must be (batch, seq), got shape {tuple(doc_ids.shape)}")
    B, T = doc_ids.shape
    build = _compiled_create_block_mask() if doc_ids.is_cuda else create_block_mask
    return build(document_mask_mod(doc_ids), B, n_heads, T, T, device=doc_ids.device, BLOCK_SIZE=block_size)


def flex_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: "BlockMask",
                            compiled: bool = True) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v with the block mask of `document_block_mask`: q (B, Hq, T, D),
    k/v (B, Hkv, T, D) with Hq a multiple of Hkv (grouped-query attention: each key/value head
    serves Hq / Hkv query heads without being repeated in memory). Returns (B, Hq, T, D).
    `compiled=False` runs torch's reference implementation (materialises the scores; for tests)."""
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of key/value heads ({k.shape[1]})")
    fn = _compiled_flex_attention() if compiled else flex_attention
    return fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


_COMPILED: dict[str, object] = {}


def _compiled_flex_attention():
    """`flex_attention` compiled once for the process (static shapes: one kernel per shape, which
    training has one of), built on first use so importing the model never starts the compiler.
    Inside an outer torch.compile (a compiled model) the plain function is returned: the outer
    graph traces it into the same fused kernel, with no nested compile wrapper in the way."""
    if torch.compiler.is_compiling():
        return flex_attention
    if "flex" not in _COMPILED:
        _COMPILED["flex"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["flex"]


def _compiled_create_block_mask():
    """`create_block_mask` compiled (same rules as `_compiled_flex_attention`): the predicate is
    evaluated tile by tile in one fused kernel instead of as a (B, T, T) boolean tensor plus gathers
    (what the eager version does). A new batch's mask_mod is a new closure over new document ids:
    dynamo guards closures by their code, so this does not recompile per batch."""
    if torch.compiler.is_compiling():
        return create_block_mask
    if "block_mask" not in _COMPILED:
        _COMPILED["block_mask"] = torch.compile(create_block_mask, dynamic=False)
    return _COMPILED["block_mask"]


__all__ = ["BLOCK_SIZE", "document_block_mask", "document_mask_mod", "flex_available", "flex_document_attention"]
