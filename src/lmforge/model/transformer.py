"""Decoder-only transformer, Llama-style: RMSNorm, RoPE, grouped-query attention through
`F.scaled_dot_product_attention` (Flash kernels on GPU; FlexAttention block masks for packed
documents on CUDA), SwiGLU MLP or a top-k mixture of experts, optional QK-norm and tied embeddings.

One layer loop (`run_layers`) serves every forward pass: the whole model, a pipeline stage, a
context-parallel chunk (which passes its own key/value-gathering `attend` hook) and KV-cache
decoding with per-row positions (the cache protocol is `KVCache.update`; the inference engine,
lmforge.infer.engine, owns caches and masks). `hidden_states` gives the final hidden states,
`token_logprobs` the per-token log-probs (reduction "none") from the fused head in one pass.

Modules swapped in from outside (LoRA, quantized linears) are always called as modules: the fast
paths below read `.weight` only of a plain `nn.Linear` (`plain_linear`).

RoPE uses the rotate-half layout (first half / second half of each head), the same as
Hugging Face's Llama, so weights export to that format without permutation.

Fast paths (each tested equal to the plain computation in tests/test_model_fast_paths.py):
- training with `targets` computes the output head and the cross-entropy together, block by block
  (`linear_cross_entropy`), without keeping the (tokens x vocab) logits, their log-softmax and
  its gradient alive; `forward` then returns (None, loss). Any device; off under torch.compile
  (which fuses the loss itself) and for sharded (DTensor) heads; `model.fused_loss = False`
  turns it off.
- eager fp32 on CPU (`_cpu_fast`): one GEMM for the query/key/value projections when the three
  weights are plain tensors (not tensor-parallel shards), RMSNorm and RoPE as hand-written
  autograd functions (a few passes over memory instead of autograd's composite ops), document
  masks as an additive float mask built once per forward (SDPA's CPU kernel would convert a
  boolean mask in every layer) and dropped when each row holds a single document.
- inference (no autograd) on CPU fp32: the RMSNorm and RoPE kernels as plain functions (no
  autograd.Function bookkeeping per call; also when the projections are swapped-in modules without
  hooks, such as quantized or LoRA layers, which are then called as modules), per-row RoPE tables (decoding) through the same
  kernel, SwiGLU in place, the three projections as three GEMMs on the weights as stored (the
  fused GEMM would copy the weights into one every call), and attention over only the first
  mask-width cache slots when the caller's mask is narrower than the cache (the engine's live
  prefix). `decode_layout(model)` (opt-in) stores linear weights column-major, which the batch-1
  GEMV streams faster on CPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.config import ModelConfig


def _cpu_fast(x: torch.Tensor) -> bool:
    """Eager fp32 on CPU without autocast: the hand-written kernels below are used there. On GPU
    (fused library kernels) and under torch.compile (which fuses the plain ops) they are not."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())


def _plain(*tensors: torch.Tensor) -> bool:
    """True when none of the tensors is a DTensor (tensor-parallel or FSDP shard) or other subclass."""
    return all(type(t) in (torch.Tensor, nn.Parameter) for t in tensors)


def _rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) per row, (..., 1)."""
    return torch.linalg.vecdot(x, x).unsqueeze(-1).div_(x.shape[-1]).add_(eps).rsqrt_()


class _RMSNormFn(torch.autograd.Function):
    """y = x * r * w with r = 1 / sqrt(mean(x^2) + eps) per row. Saves x * r (the normalised
    input) and r; backward: dx = r * (g w - xhat * mean(g w xhat)), dw = sum over rows of g xhat."""

    @staticmethod
    def forward(ctx, x, weight, eps: float):
        r = _rms_scale(x, eps)
        xhat = x * r
        ctx.save_for_backward(xhat, r, weight)
        return xhat * weight

    @staticmethod
    def backward(ctx, g):
        xhat, r, weight = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[1]:
            dw = (g * xhat).reshape(-1, xhat.shape[-1]).sum(0)
        if ctx.needs_input_grad[0]:
            gw = g * weight
            dot = torch.linalg.vecdot(gw, xhat).unsqueeze(-1).div_(xhat.shape[-1])
            dx = gw.addcmul_(xhat, dot, value=-1.0).mul_(r)
        return dx, dw, None


SMALL_NORM = 1 << 16  # elements: at most this many, inference RMSNorm on CPU calls F.rms_norm (3.6x slower at 8 x 512 rows)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _cpu_fast(x) and _plain(x, self.weight):
            if not torch.is_grad_enabled():  # the same values as _RMSNormFn, without autograd's bookkeeping
                if x.numel() <= SMALL_NORM:  # decode-sized: torch's one op beats the four here (~20 vs ~28 us)
                    return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
                return torch.mul(x, _rms_scale(x, self.eps)).mul_(self.weight)
            return _RMSNormFn.apply(x, self.weight, self.eps)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(head_dim: int, max_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(max_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, D); cos/sin: (T, D)
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    rot = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rot * sin).to(x.dtype)


def _rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin_h: torch.Tensor) -> torch.Tensor:
    """out1 = x1 c - x2 s, out2 = x2 c + x1 s (rotate-half); `sin_h` is the first half of the sin table."""
    h = x.shape[-1] // 2
    out = torch.mul(x, cos)
    out[..., :h].addcmul_(x[..., h:], sin_h, value=-1.0)
    out[..., h:].addcmul_(x[..., :h], sin_h)
    return out


class _RopeFn(torch.autograd.Function):
    """Rotate-half RoPE: out1 = x1 c - x2 s, out2 = x2 c + x1 s, as x * cos over the full width
    (both halves of a table row are equal) plus one multiply-add per half. The map is a rotation,
    so the backward is the inverse rotation of the gradient; nothing but the tables is saved."""

    @staticmethod
    def forward(ctx, x, cos, sin_h):
        ctx.save_for_backward(cos, sin_h)
        return _rope_rotate(x, cos, sin_h)

    @staticmethod
    def backward(ctx, g):
        cos, sin_h = ctx.saved_tensors
        h = g.shape[-1] // 2
        dx = torch.mul(g, cos)
        dx[..., :h].addcmul_(g[..., h:], sin_h)
        dx[..., h:].addcmul_(g[..., :h], sin_h, value=-1.0)
        return dx, None, None


def rope_bthd(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on a (B, T, heads, head_dim) tensor (or (B, T, 2, heads, head_dim): queries and keys at
    once) with (T, head_dim) tables, or (B, T, head_dim) tables of per-row positions (rotate-half
    layout, so the two halves of each table row are equal and only the first half of `sin` is read)."""
    if cos.dim() == 2:
        extra = (None,) * (x.dim() - 3)  # the heads axis, and a q/k axis when both are rotated at once
    else:
        extra = (slice(None),) + (None,) * (x.dim() - 3)
    c, s = cos[(slice(None),) + extra], sin[(slice(None),) + extra + (slice(0, x.shape[-1] // 2),)]
    if not torch.is_grad_enabled():
        return _rope_rotate(x, c, s)
    return _RopeFn.apply(x, c, s)


class KVCache(nn.Module):
    """Pre-allocated key/value cache for one layer: (B, n_kv_heads, max_len, head_dim).

    The cache protocol the model expects of `Attention.cache` (the inference engine in
    `lmforge.infer.engine` owns the caches and the masks):
    - `update(k, v, pos)` writes keys/values (b, heads, T, head_dim) for the first b rows and
      returns the keys/values that attention reads. `pos` is an int (every row writes slots
      pos .. pos+T-1; returns slots [0, pos+T)) or a (b, T) tensor of per-row slots (returns the
      whole max_len axis, static shapes for `torch.compile`; the caller's mask says which slots
      each query sees).
    """

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device), persistent=False)

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, T = k.shape[0], k.shape[2]
        if isinstance(pos, int):
            self.k[:b, :, pos : pos + T] = k
            self.v[:b, :, pos : pos + T] = v
            return self.k[:b, :, : pos + T], self.v[:b, :, : pos + T]
        idx = pos[:, None, :, None].expand(b, k.shape[1], T, k.shape[3])
        self.k[:b].scatter_(2, idx, k.to(self.k.dtype))
        self.v[:b].scatter_(2, idx, v.to(self.v.dtype))
        return self.k[:b], self.v[:b]


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """The attention core: softmax(q k^T / sqrt(d)) v over (B, heads, T, head_dim) tensors, keys and
    values with fewer (grouped) heads than the queries. `mask`: None (causal), a boolean / additive
    float mask broadcastable to (B, heads, T, S), or a FlexAttention BlockMask (document masking on
    GPU, lmforge.model.flex)."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        if q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        # queries are the last T of S positions (decoding after a cache prefix): query i sees keys <= S - T + i
        T, S = q.shape[2], k.shape[2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
    elif not isinstance(mask, torch.Tensor):  # a BlockMask
        from lmforge.model.flex import flex_document_attention

        return flex_document_attention(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * self.hd, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.hd, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.hd, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.norm_eps) if cfg.qk_norm else None
        self.cache: KVCache | None = None

    def project(self, x, cos, sin):
        """Queries, keys and values (B, heads, T, head_dim) with QK-norm and RoPE applied. `cos`/`sin`:
        (T, head_dim) tables, or (B, 1, T, head_dim) for per-row positions."""
        if _cpu_fast(x):
            fusable = self._fusable()
            if fusable or (not torch.is_grad_enabled() and self._hookless()):
                if cos.dim() == 4:  # per-row positions (decoding): (B, 1, T, head_dim) -> (B, T, head_dim)
                    cos, sin = cos[:, 0], sin[:, 0]
                if not torch.is_grad_enabled():
                    return self._project_inference(x, cos, sin, fusable)
                return self._project_fused(x, cos, sin)
        B, T, _ = x.shape
        # heads are derived from the weight shapes so a tensor-parallel shard works unchanged
        q = self.wq(x).view(B, T, -1, self.hd).transpose(1, 2)
        k = self.wk(x).view(B, T, -1, self.hd).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def _fusable(self) -> bool:
        """The three projections are plain `nn.Linear` modules (not a LoRA or quantized module swapped
        in from outside, no tensor-parallel hooks or DTensor weights): only then may their weights be
        read directly."""
        return all(plain_linear(m) for m in (self.wq, self.wk, self.wv))

    def _project_fused(self, x, cos, sin):
        """`project` with one GEMM against the concatenated weights and the RoPE kernel; the same
        values as the three separate projections."""
        B, T, _ = x.shape
        nq, nk = self.wq.weight.shape[0], self.wk.weight.shape[0]
        qkv = F.linear(x, torch.cat([self.wq.weight, self.wk.weight, self.wv.weight]))
        # split / unbind rather than slicing: their backward concatenates the pieces' gradients
        # instead of scattering each into a zero-filled full-size tensor
        if nq == nk and self.q_norm is None:  # queries and keys rotated by one call
            qk, v = qkv.split([nq + nk, nk], dim=-1)
            q, k = rope_bthd(qk.view(B, T, 2, -1, self.hd), cos, sin).unbind(2)
            v = v.view(B, T, -1, self.hd)
        else:
            q, k, v = (t.view(B, T, -1, self.hd) for t in qkv.split([nq, nk, nk], dim=-1))
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rope_bthd(q, cos, sin), rope_bthd(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _hookless(self) -> bool:
        """None of the three projections carries forward hooks (tensor parallelism's), so their outputs
        are plain local tensors whatever module was swapped in (LoRA, quantized)."""
        return not any(m._forward_hooks or m._forward_pre_hooks for m in (self.wq, self.wk, self.wv))

    def _project_inference(self, x, cos, sin, plain: bool = True):
        """`project` without autograd (CPU fp32): three GEMMs on the weights as they are (the fused
        GEMM would first copy the three weights into one, every call) and the RoPE kernel. `plain`
        False: the projections are modules swapped in from outside (quantized, LoRA), called as
        modules."""
        B, T, _ = x.shape
        if plain:
            q, k, v = F.linear(x, self.wq.weight), F.linear(x, self.wk.weight), F.linear(x, self.wv.weight)
        else:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        q, k, v = q.view(B, T, -1, self.hd), k.view(B, T, -1, self.hd), v.view(B, T, -1, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope_bthd(q, cos, sin), rope_bthd(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, cos, sin, mask=None, pos: int | torch.Tensor = 0, attend=None):
        """`pos`: where this chunk's keys/values go in `self.cache` (when one is set up). `attend`:
        the attention core (q, k, v, mask) -> y, `sdpa_attend` by default; context parallelism passes
        one that gathers keys/values across ranks. A mask narrower than the keys the cache returns
        limits attention to the first mask-width slots (the engine's decode passes the live prefix
        of its cache, rounded up, instead of every slot)."""
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(k, v, pos)
            if isinstance(mask, torch.Tensor) and isinstance(k, torch.Tensor) and mask.shape[-1] < k.shape[2]:
                k, v = k[:, :, : mask.shape[-1]], v[:, :, : mask.shape[-1]]
        y = (attend or sdpa_attend)(q, k, v, mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def plain_linear(m: nn.Module) -> bool:
    """A plain `nn.Linear` (exact type: a LoRA or quantized subclass does not count) without bias,
    forward hooks (tensor parallelism) or sharded weights. The model's fused fast paths read
    `.weight` directly, which is only right for these; every other module is called as a module."""
    return (type(m) is nn.Linear and m.bias is None and not (m._forward_hooks or m._forward_pre_hooks)
            and _plain(m.weight))


@torch.no_grad()
def decode_layout(model: nn.Module) -> int:
    """Store the weight of every plain `nn.Linear` of `model` column-major: the same (out, in)
    parameter, its elements laid out as the transposed matrix (strides (1, out)). `F.linear` then
    runs the batch-1 decode GEMV as a row-combination over the stored matrix, which streamed
    measurably faster on CPU here (~12% more bandwidth over the 124M shape's weights, ~9% per
    decode step at 1 thread) than the dot-product GEMV over row-major weights. Values are the same;
    results differ only by float summation order (~1e-6). Meant for a model loaded for inference:
    training works on such weights, but code that `.view`s a weight or its gradient needs
    `.contiguous()` first (saving does: lmforge.model.io copies to contiguous). Tied weights stay
    tied (the embedding gets the same layout). Returns the number of weights changed."""
    done = set()
    for m in model.modules():
        if plain_linear(m) and m.weight.dim() == 2 and m.weight.is_contiguous() and id(m.weight) not in done:
            m.weight.data = m.weight.data.t().contiguous().t()
            done.add(id(m.weight))
    return len(done)


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d, bias=False)  # down

    def forward(self, x):
        if not torch.is_grad_enabled():  # in place: no autograd graph needs the intermediates
            h = F.silu(self.w1(x), inplace=True)
            return self.w2(h.mul_(self.w3(x)))
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts, every token processed (no capacity limit, no dropping).
    Stores the Switch-style load-balancing loss of the last forward in `self.aux_loss`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k = cfg.moe_top_k
        self.n = cfg.moe_experts
        self.router = nn.Linear(cfg.d_model, cfg.moe_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(cfg.d_model, cfg.ffn_hidden) for _ in range(cfg.moe_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.router(x).float().softmax(dim=-1)  # (N, E)
        w, idx = probs.topk(self.k, dim=-1)  # (N, k)
        w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        flat = idx.flatten()
        order = flat.argsort()
        counts = torch.bincount(flat, minlength=self.n)
        tok = order // self.k
        gate = w.flatten()[order]
        start = 0
        for e, c in enumerate(counts.tolist()):
            if c:
                t = tok[start : start + c]
                out.index_add_(0, t, self.experts[e](x[t]) * gate[start : start + c, None])
            start += c
        # load balancing: fraction of routed tokens per expert x mean router probability per expert
        frac = counts.float() / flat.numel()
        self.aux_loss = self.n * (frac * probs.mean(dim=0)).sum()
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg) if cfg.moe_experts else SwiGLU(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x, cos, sin, mask=None, pos: int | torch.Tensor = 0, attend=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, pos, attend)
        return x + self.mlp(self.mlp_norm(x))


def run_layers(layers, x: torch.Tensor, cos, sin, mask=None, pos: int | torch.Tensor = 0, attend=None,
               checkpointing: bool = False) -> torch.Tensor:
    """The layer loop every forward pass runs: the whole model, one pipeline stage's layers, or
    a context-parallel chunk (with its key/value-gathering `attend`). `checkpointing`: recompute
    each layer's activations in the backward (activation checkpointing)."""
    for layer in layers:
        if checkpointing:
            x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, pos, attend, use_reentrant=False)
        else:
            x = layer(x, cos, sin, mask, pos, attend)
    return x


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Causal block-diagonal mask from per-token document ids (B, T) -> (B, 1, T, T) bool."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


def attention_mask(doc_ids: torch.Tensor | None, fast: bool) -> torch.Tensor | None:
    """The mask the layers get for `doc_ids`: None (plain causal attention) without document ids.
    With `fast` (CPU; the test reads document ids without a device sync): also None when every
    row holds one document (the mask would be the causal one), else the document mask as an
    additive float mask (0 / -inf), which SDPA's CPU kernel takes as is; else the boolean mask."""
    if doc_ids is None:
        return None
    if not fast:
        return document_mask(doc_ids)
    if bool((doc_ids == doc_ids[:, :1]).all()):
        return None
    bias = torch.zeros(doc_ids.shape[0], 1, doc_ids.shape[1], doc_ids.shape[1], device=doc_ids.device)
    return bias.masked_fill_(~document_mask(doc_ids), float("-inf"))


_CE_BLOCK_BYTES = 1 << 30  # fp32 logits of one block of rows in linear_cross_entropy
_CE_CPU_SUB_ROWS = 32  # rows per pass of the softmax on CPU: 32 x vocab floats stay in cache


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits = x @ weight.T against `targets`, rows equal to `ignore_index`
    left out. The gradient is formed in the forward, one block of rows at a time, while that
    block's logits are at hand: p = softmax(z) - onehot(target), scaled by 1 / (number of counted
    rows); dx = p @ weight, dweight = p.T @ x. The backward only multiplies them by the incoming
    gradient. Under autocast the three matmuls run in the autocast dtype (as F.linear would) and
    the softmax in fp32."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index: int, dtype, workspace):
        N, V = x.shape[0], weight.shape[0]
        cpu = x.device.type == "cpu"
        with torch.autocast(x.device.type, enabled=False):
            valid = targets != ignore_index
            n_valid = valid.sum()
            scale = (valid.to(torch.float32) / n_valid).unsqueeze(1)  # (N, 1): 1 / n, or 0 when left out
            tgt = torch.where(valid, targets, 0).unsqueeze(1)
            w = weight.to(dtype)
            xs = x.to(dtype)
            dx = torch.empty(N, x.shape[1], dtype=dtype, device=x.device)
            dw = None
            lse = torch.empty(N, dtype=torch.float32, device=x.device)
            picked = torch.empty(N, dtype=torch.float32, device=x.device)
            block = max(1, min(N, _CE_BLOCK_BYTES // (4 * V)))
            sub = _CE_CPU_SUB_ROWS if cpu else block
            buf = None
            if cpu and dtype == torch.float32 and workspace is not None:
                # a logits buffer kept from call to call: a fresh allocation this large is
                # mapped anew each time and page-faults on first touch (~25% of the matmul)
                buf = workspace.get("logits")
                if buf is None or buf.shape[0] < block or buf.shape[1] != V:
                    buf = workspace["logits"] = torch.empty(block, V, dtype=torch.float32)
            minus_one = torch.full((min(sub, N), 1), -1.0, device=x.device)
            for s in range(0, N, block):
                e = min(N, s + block)
                if buf is not None:
                    z = torch.mm(xs[s:e], w.t(), out=buf[: e - s])
                else:
                    z = torch.mm(xs[s:e], w.t()).float()  # (rows, V)
                for u in range(0, e - s, sub):
                    zc = z[u : u + sub]
                    rows = slice(s + u, s + u + zc.shape[0])
                    tc = tgt[rows]
                    torch.gather(zc, 1, tc, out=picked[rows, None])
                    top = zc.amax(1, keepdim=True)
                    total = zc.sub_(top).exp_().sum(1, keepdim=True)  # one exp pass for loss and softmax
                    zc.mul_(total.reciprocal())  # softmax
                    torch.add(total.log_().squeeze(1), top.squeeze(1), out=lse[rows])  # log-sum-exp
                    zc.scatter_add_(1, tc, minus_one[: zc.shape[0]])  # - onehot
                p = z.to(dtype)
                # row scales applied to the thin (rows x d) operands, not to the (rows x V) block
                torch.mm(p, w, out=dx[s:e]).mul_(scale[s:e])
                part = torch.mm(p.t(), xs[s:e] * scale[s:e].to(dtype))
                dw = part.float() if dw is None else dw.add_(part)
            loss = ((lse - picked) * valid).sum() / n_valid
        ctx.save_for_backward(dx.to(x.dtype), dw.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, g):
        dx, dw = ctx.saved_tensors
        return (dx * g if ctx.needs_input_grad[0] else None, dw * g if ctx.needs_input_grad[1] else None,
                None, None, None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         workspace: dict | None = None) -> torch.Tensor:
    """F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index) for x (N, d),
    weight (V, d), targets (N,), without materialising the whole (N, V) logits and their gradient
    (see _LinearCrossEntropy). Meant for training: it computes the gradients even if no backward
    follows. `workspace`: a dict the caller keeps between calls, where the CPU path keeps its
    logits buffer (one block of rows)."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return _LinearCrossEntropy.apply(x, weight, targets, ignore_index, dtype, workspace)


class _LinearLogprobs(torch.autograd.Function):
    """Per-row log-probabilities log softmax(x @ weight.T)[target] (0 where target == ignore_index),
    block by block, without keeping the (N, V) logits: the forward keeps only each row's
    log-sum-exp; the backward recomputes one block of logits at a time, with
    d logprob / d logits = onehot(target) - softmax. What DPO, RL and reward models need (per-token
    log-probs with `reduction="none"`), at the memory of the fused training loss."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index: int, dtype):
        N, V = x.shape[0], weight.shape[0]
        with torch.autocast(x.device.type, enabled=False):
            valid = targets != ignore_index
            tgt = torch.where(valid, targets, 0).unsqueeze(1)
            w, xs = weight.to(dtype), x.to(dtype)
            lse = torch.empty(N, dtype=torch.float32, device=x.device)
            picked = torch.empty(N, dtype=torch.float32, device=x.device)
            block = max(1, min(N, _CE_BLOCK_BYTES // (4 * V)))
            for s in range(0, N, block):
                z = torch.mm(xs[s : s + block], w.t()).float()
                picked[s : s + block] = z.gather(1, tgt[s : s + block]).squeeze(1)
                lse[s : s + block] = torch.logsumexp(z, dim=1)
            out = (picked - lse) * valid
        ctx.save_for_backward(x, weight, tgt, valid, lse)
        ctx.dtype, ctx.block = dtype, block
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, tgt, valid, lse = ctx.saved_tensors
        dtype, block = ctx.dtype, ctx.block
        with torch.autocast(x.device.type, enabled=False):
            w, xs = weight.to(dtype), x.to(dtype)
            gs = (g.float() * valid).unsqueeze(1)  # (N, 1)
            dx = torch.empty(x.shape[0], x.shape[1], dtype=dtype, device=x.device) if ctx.needs_input_grad[0] else None
            dw = None
            for s in range(0, x.shape[0], block):
                e = min(x.shape[0], s + block)
                z = torch.mm(xs[s:e], w.t()).float()
                p = z.sub_(lse[s:e, None]).exp_().neg_()  # - softmax
                p.scatter_add_(1, tgt[s:e], torch.ones(e - s, 1, device=x.device))  # + onehot
                p.mul_(gs[s:e])
                pd = p.to(dtype)
                if dx is not None:
                    torch.mm(pd, w, out=dx[s:e])
                if ctx.needs_input_grad[1]:
                    part = torch.mm(pd.t(), xs[s:e]).float()
                    dw = part if dw is None else dw.add_(part)
        return (dx.to(x.dtype) if dx is not None else None, dw.to(weight.dtype) if dw is not None else None,
                None, None, None)


def linear_logprobs(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """log_softmax(F.linear(x, weight).float(), -1).gather(targets) per row for x (N, d), 0 where
    `targets == ignore_index`, differentiable, without materialising the (N, V) logits."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    return _LinearLogprobs.apply(x, weight, targets, ignore_index, dtype)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False
        self.fused_loss = True  # training with targets: head + cross-entropy fused, logits not returned
        self.flex_attention = True  # document masks on CUDA through FlexAttention (lmforge.model.flex)
        self._loss_workspace: dict = {}  # linear_cross_entropy's CPU logits buffer, reused every step
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for all matrices; residual output projections scaled by
        1/sqrt(2 * n_layers) (GPT-2) so the residual stream's variance does not grow with depth."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def init_rope(self) -> None:
        """Recompute RoPE tables (after moving off the meta device)."""
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta, device=self.tok_emb.weight.device)
        self.rope_cos, self.rope_sin = cos, sin

    def rope(self, pos: int | torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables for T positions from `pos` (an int: (T, head_dim)), or for per-row positions
        `pos` (B, T) (gathered: (B, 1, T, head_dim))."""
        if isinstance(pos, int):
            if pos + T > self.cfg.max_seq_len:
                raise ValueError(f"sequence of {pos + T} tokens is longer than the model's context ({self.cfg.max_seq_len})")
            return self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        return self.rope_cos[pos].unsqueeze(1), self.rope_sin[pos].unsqueeze(1)

    def hidden_states(self, idx: torch.Tensor, doc_ids: torch.Tensor | None = None, pos: int | torch.Tensor = 0,
                      mask=None) -> torch.Tensor:
        """The final hidden states (B, T, d_model), after the last norm, before the output head: the
        input of the head, a reward model's scalar head or a value head. `doc_ids` (B, T) restricts
        attention to tokens of the same packed document. With a KV cache set up, `pos` is the cache
        position (an int, or per-row (B, T) positions with their `mask` (B, 1, T, S))."""
        B, T = idx.shape
        cos, sin = self.rope(pos, T)
        x = self.tok_emb(idx)
        if mask is None:
            mask = self._document_mask(doc_ids, x)
        x = run_layers(self.layers, x, cos, sin, mask, pos, checkpointing=self.gradient_checkpointing and self.training)
        return self.norm(x)

    def _document_mask(self, doc_ids: torch.Tensor | None, x: torch.Tensor):
        """The attention mask of packed documents for every layer, built once per forward: a
        FlexAttention block mask on CUDA (keeps fused flash-style kernels; `self.flex_attention`
        switches it off), else `attention_mask` (dense, or none for one document per row)."""
        if doc_ids is not None and self.flex_attention and x.device.type == "cuda":
            from lmforge.model.flex import document_block_mask, flex_available

            if flex_available(x.device):
                return document_block_mask(doc_ids)
        return attention_mask(doc_ids, _cpu_fast(x))

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        pos: int | torch.Tensor = 0,
        ignore_index: int = -100,
        mask=None,
    ):
        """idx (B, T) token ids. With `targets`, returns (logits, loss) where loss includes the MoE
        load-balancing term; else (logits, None). `doc_ids` (B, T) restricts attention to
        tokens of the same packed document. With `targets` and autograd on, the head and the loss
        are fused (see `linear_cross_entropy`) and logits come back as None, unless
        `self.fused_loss` is False. `pos`/`mask`: KV-cache decoding (see `hidden_states`)."""
        x = self.hidden_states(idx, doc_ids, pos, mask)
        if targets is not None and self._fuse_loss(x):
            logits = None
            loss = linear_cross_entropy(x.reshape(-1, x.shape[-1]), self.lm_head.weight, targets.reshape(-1), ignore_index,
                                        self._loss_workspace)
        else:
            logits = self.lm_head(x)
            if targets is None:
                return logits, None
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)
        if self.cfg.moe_experts:
            loss = loss + self.cfg.moe_aux_loss_coef * self.aux_loss()
        return logits, loss

    def token_logprobs(self, idx: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None,
                       ignore_index: int = -100, return_hidden: bool = False):
        """Per-token log-probabilities (B, T) of `targets` (0 where a target is `ignore_index`), the
        `reduction="none"` form of the training loss, differentiable, from one forward pass and
        without keeping the (B, T, vocab) logits when the head is a plain linear layer. With
        `return_hidden`, also the final hidden states (B, T, d_model) of the same pass (for a reward
        model's or a value head)."""
        h = self.hidden_states(idx, doc_ids)
        flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
        if plain_linear(self.lm_head):
            lp = linear_logprobs(flat_h, self.lm_head.weight, flat_t, ignore_index)
        else:  # a module swapped in from outside (LoRA, quantized): called as a module
            logits = self.lm_head(flat_h).float()
            valid = flat_t != ignore_index
            lp = logits.log_softmax(-1).gather(1, torch.where(valid, flat_t, 0)[:, None]).squeeze(1) * valid
        lp = lp.view(targets.shape)
        return (lp, h) if return_hidden else lp

    def _fuse_loss(self, x: torch.Tensor) -> bool:
        head = self.lm_head
        return (self.fused_loss and torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and plain_linear(head) and (x.requires_grad or head.weight.requires_grad) and _plain(x))

    def aux_loss(self) -> torch.Tensor:
        losses = [l.mlp.aux_loss for l in self.layers if isinstance(l.mlp, MoE)]
        return torch.stack(losses).mean() if losses else torch.zeros(())

    # ---- KV cache (the inference engine, lmforge.infer.engine, drives these) ------------------
    def setup_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Give every attention layer a pre-allocated `KVCache` of `batch` rows x `max_len` slots."""
        p = self.tok_emb.weight
        n = max_len or self.cfg.max_seq_len
        for l in self.layers:
            l.attn.cache = KVCache(batch, self.cfg.n_kv_heads, n, self.cfg.head_dim, dtype or p.dtype, p.device)

    def clear_cache(self) -> None:
        for l in self.layers:
            l.attn.cache = None

    def caches(self) -> list[KVCache]:
        return [l.attn.cache for l in self.layers]
