"""Decoder-only transformer, Llama-style: RMSNorm, RoPE, grouped-query attention through
`F.scaled_dot_product_attention` (Flash kernels on GPU), SwiGLU MLP or a top-k mixture of
experts, optional QK-norm and tied embeddings.

RoPE uses the rotate-half layout (first half / second half of each head), the same as
Hugging Face's Llama, so weights export to that format without permutation.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.model.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


class KVCache(nn.Module):
    """Pre-allocated key/value cache for one layer: (B, n_kv_heads, max_len, head_dim)."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(batch, n_kv_heads, max_len, head_dim, dtype=dtype, device=device), persistent=False)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.shape[2]
        self.k[:, :, pos : pos + T] = k
        self.v[:, :, pos : pos + T] = v
        return self.k[:, :, : pos + T], self.v[:, :, : pos + T]


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
        """Queries, keys and values (B, heads, T, head_dim) with QK-norm and RoPE applied."""
        B, T, _ = x.shape
        # heads are derived from the weight shapes so a tensor-parallel shard works unchanged
        q = self.wq(x).view(B, T, -1, self.hd).transpose(1, 2)
        k = self.wk(x).view(B, T, -1, self.hd).transpose(1, 2)
        v = self.wv(x).view(B, T, -1, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, mask=None, pos: int = 0):
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(pos, k, v)
        gqa = q.shape[1] != k.shape[1]
        if mask is None and self.cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            if mask is None:  # decoding with a cache: query i sees keys <= pos + i
                S = k.shape[2]
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d, bias=False)  # down

    def forward(self, x):
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

    def forward(self, x, cos, sin, mask=None, pos: int = 0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, pos)
        return x + self.mlp(self.mlp_norm(x))


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Causal block-diagonal mask from per-token document ids (B, T) -> (B, 1, T, T) bool."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same & causal)[:, None]


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

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        pos: int = 0,
        ignore_index: int = -100,
    ):
        """idx (B, T) token ids. With `targets`, returns (logits, loss) where loss includes the MoE
        load-balancing term; else (logits, None). `doc_ids` (B, T) restricts attention to
        tokens of the same packed document."""
        B, T = idx.shape
        if pos + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + T} tokens is longer than the model's context ({self.cfg.max_seq_len})")
        cos, sin = self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]
        mask = document_mask(doc_ids) if doc_ids is not None else None
        x = self.tok_emb(idx)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, pos, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, pos)
        x = self.norm(x)
        logits = self.lm_head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)
        if self.cfg.moe_experts:
            loss = loss + self.cfg.moe_aux_loss_coef * self.aux_loss()
        return logits, loss

    def aux_loss(self) -> torch.Tensor:
        losses = [l.mlp.aux_loss for l in self.layers if isinstance(l.mlp, MoE)]
        return torch.stack(losses).mean() if losses else torch.zeros(())

    # ---- inference helpers ---------------------------------------------------------------
    def setup_cache(self, batch: int, max_len: int | None = None) -> None:
        p = self.tok_emb.weight
        for l in self.layers:
            l.attn.cache = KVCache(batch, self.cfg.n_kv_heads, max_len or self.cfg.max_seq_len, self.cfg.head_dim, p.dtype, p.device)

    def clear_cache(self) -> None:
        for l in self.layers:
            l.attn.cache = None

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 eos_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations with a KV cache. idx (B, T) -> (B, T + new)."""
        self.eval()
        B, T = idx.shape
        total = min(T + max_new_tokens, self.cfg.max_seq_len)
        self.setup_cache(B, total)
        try:
            logits, _ = self(idx, pos=0)
            out = [idx]
            pos = T
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            for _ in range(total - T):
                nxt = sample_next(logits[:, -1], temperature, top_k, generator)
                if eos_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    done |= nxt == eos_id
                out.append(nxt[:, None])
                if (eos_id is not None and bool(done.all())) or pos >= total:
                    break
                logits, _ = self(nxt[:, None], pos=pos)
                pos += 1
            return torch.cat(out, dim=1)
        finally:
            self.clear_cache()


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, generator=None) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)
