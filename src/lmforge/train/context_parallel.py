"""Context (sequence) parallelism, all-gather flavour (as Llama 3 trained long contexts):
each rank holds a contiguous chunk of every sequence, computes queries for its own tokens and
attends to the keys/values of the whole sequence, gathered with an autograd-aware all-gather
(its backward returns each rank's share of the key/value gradients, summed over ranks). RoPE positions and the
causal mask are offset by the chunk's start. Works on any backend (gloo on CPU, nccl on GPU);
torch's experimental ring-attention `context_parallel` is the GPU alternative.

The single-process model is untouched: `cp_forward` runs the same modules with the chunked
attention, and `cp_sync_grads` averages parameter gradients over the context-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.model.transformer import Transformer, run_layers


class _GatherSeq(torch.autograd.Function):
    """All-gather along the sequence dim (2); backward sums every rank's gradient for the gathered
    tensor and returns this rank's slice (an all-reduce of contiguous buffers: correct on every
    backend, where gloo's all-to-all path of torch.distributed.nn mishandles strided gradients)."""

    @staticmethod
    def forward(ctx, t, group):
        t = t.contiguous()
        ctx.group, ctx.n = group, t.shape[2]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t, group=group)
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        r = dist.get_rank(ctx.group)
        return grad[:, :, r * ctx.n : (r + 1) * ctx.n].contiguous(), None


def _gather_seq(t: torch.Tensor, group) -> torch.Tensor:
    return _GatherSeq.apply(t, group)


def _chunk_mask(T: int, S: int, offset: int, doc_ids: torch.Tensor | None, device) -> torch.Tensor:
    """Causal mask of this rank's queries (positions offset .. offset+T) over all S keys; with
    `doc_ids` (B, S) of the whole sequence, also restricted to the query's own document."""
    qpos = offset + torch.arange(T, device=device)
    mask = torch.arange(S, device=device)[None, :] <= qpos[:, None]
    if doc_ids is None:
        return mask
    same = doc_ids[:, offset : offset + T, None] == doc_ids[:, None, :]
    return (same & mask)[:, None]


def gather_kv_attend(group):
    """The attention core for context parallelism: this rank's queries attend to the keys/values
    of the whole sequence, all-gathered across the group (the model's own layers run unchanged,
    with this as their `attend` hook)."""

    def attend(q, k, v, mask):
        k, v = _gather_seq(k, group), _gather_seq(v, group)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])

    return attend


def cp_forward(model: Transformer, idx: torch.Tensor, targets: torch.Tensor | None = None, group=None,
               doc_ids: torch.Tensor | None = None):
    """Forward on this rank's chunk `idx` (B, T_local) of sequences split evenly across the group.
    `doc_ids` (B, T_local * world): document ids of the whole sequences (doc_mask packing).
    Returns (local logits, loss) where loss is the mean over the whole sequence (identical on every rank)."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    T = idx.shape[1]
    offset = rank * T
    if offset + T > model.cfg.max_seq_len or world * T > model.cfg.max_seq_len:
        raise ConfigError(f"sequence of {world * T} tokens is longer than the model's context ({model.cfg.max_seq_len})")
    if model.cfg.moe_experts:
        raise ConfigError("context parallelism is not supported for mixture-of-experts models")
    cos, sin = model.rope_cos[offset : offset + T], model.rope_sin[offset : offset + T]
    mask = _chunk_mask(T, world * T, offset, doc_ids, idx.device)
    x = run_layers(model.layers, model.tok_emb(idx), cos, sin, mask, attend=gather_kv_attend(group))
    logits = model.lm_head(model.norm(x))
    if targets is None:
        return logits, None
    local = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
    # equal chunks: the sequence mean is the mean of the chunk means; the reported value is global,
    # the gradient flows through this rank's term and is combined by cp_sync_grads
    with torch.no_grad():
        total = local.detach().clone()
        dist.all_reduce(total, group=group)
        total /= world
    return logits, local + (total - local.detach())


def cp_sync_grads(model: Transformer, group=None) -> None:
    """Average parameter gradients over the context-parallel group (each rank back-propagated its
    chunk's loss, including the key/value paths into the other ranks' chunks)."""
    world = dist.get_world_size(group)
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad /= world


def cp_chunk(t: torch.Tensor | None, rank: int, world: int) -> torch.Tensor | None:
    """This rank's contiguous slice of the sequence dimension (1) of a (B, T) batch tensor."""
    if t is None:
        return None
    T = t.shape[1]
    if T % world:
        raise ConfigError(f"pretrain.seq_len = {T} must be divisible by parallel.cp = {world}")
    n = T // world
    return t[:, rank * n : (rank + 1) * n]


def cp_train_step(model: Transformer, batches, group, rank: int, world: int) -> torch.Tensor:
    """Forward and backward of one optimizer step's micro-batches on this rank's sequence chunk.
    Returns the step's mean loss over the whole sequences (detached, the same on every rank of the
    group). Gradients are left for the caller to average over all ranks (context x data parallel)."""
    total = None
    for b in batches:
        _, loss = cp_forward(model, cp_chunk(b.x, rank, world), cp_chunk(b.y, rank, world), group=group, doc_ids=b.doc_ids)
        (loss / len(batches)).backward()
        total = loss.detach() / len(batches) if total is None else total + loss.detach() / len(batches)
    return total
