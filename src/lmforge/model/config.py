"""Model configuration, presets from a CPU-sized tiny model to 7B, and parameter/FLOP counts."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 = same as n_heads (multi-head); fewer = grouped-query attention
    ffn_hidden: int = 0  # 0 = 8/3 * d_model rounded up to `multiple_of` (SwiGLU)
    multiple_of: int = 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qk_norm: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.02
    # mixture of experts (0 = dense MLP): top-k router, load-balancing loss, no token dropping
    moe_experts: int = 0
    moe_top_k: int = 2
    moe_aux_loss_coef: float = 0.01
    # width of one attention head; 0 = d_model / n_heads. Explicit when heads were pruned
    # (lmforge prune --method heads): then n_heads * head_dim may differ from d_model
    head_dim: int = 0

    def __post_init__(self) -> None:
        if self.n_kv_heads == 0:
            self.n_kv_heads = self.n_heads
        if not self.head_dim and self.n_heads:
            self.head_dim = self.d_model // self.n_heads
        if self.ffn_hidden == 0:
            h = int(8 * self.d_model / 3)
            self.ffn_hidden = self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)

    @property
    def derived_head_dim(self) -> bool:
        """True when head_dim is d_model / n_heads (the default; not written to config.json)."""
        return self.n_heads > 0 and self.d_model % self.n_heads == 0 and self.head_dim == self.d_model // self.n_heads

    def validate(self) -> None:
        if self.head_dim <= 0:
            raise ValueError(f"head_dim must be > 0, got {self.head_dim}")
        if self.d_model % self.n_heads and self.head_dim == self.d_model // self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or head_dim set")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError("head dimension must be even for RoPE")
        if self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts:
            raise ValueError(f"moe_top_k must be in [1, moe_experts={self.moe_experts}]")

    def to_dict(self) -> dict:
        """The fields as saved in config.json; `head_dim` only when it is not d_model / n_heads."""
        d = dataclasses.asdict(self)
        if self.derived_head_dim:
            d.pop("head_dim")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # ---- sizes -------------------------------------------------------------------------
    def _mlp_params(self) -> int:
        return 3 * self.d_model * self.ffn_hidden

    def num_params(self, embeddings: bool = True, active: bool = False) -> int:
        """Parameter count. `active`: with MoE, count only the top-k experts a token uses."""
        d, L = self.d_model, self.n_layers
        attn = d * (self.n_heads * self.head_dim) * 2 + d * (self.n_kv_heads * self.head_dim) * 2
        if self.moe_experts:
            n_exp = self.moe_top_k if active else self.moe_experts
            mlp = n_exp * self._mlp_params() + d * self.moe_experts
        else:
            mlp = self._mlp_params()
        norms = 2 * d + (2 * self.head_dim if self.qk_norm else 0)
        body = L * (attn + mlp + norms) + d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return body + (emb if embeddings else (0 if self.tie_embeddings else self.vocab_size * d))

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 * (active non-embedding params incl. the
        output projection) + 12 * layers * d_model * seq (attention scores), as in PaLM/Chinchilla."""
        T = seq_len or self.max_seq_len
        n = self.num_params(embeddings=False, active=True) + (self.vocab_size * self.d_model if self.tie_embeddings else 0)
        return 6.0 * n + 12.0 * self.n_layers * self.d_model * T


PRESETS: dict[str, dict] = {
    # CPU demo size: trains in minutes on 2 cores
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256, vocab_size=4096),
    "small": dict(d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, max_seq_len=512, vocab_size=8192),
    # GPT-2 small shape (Llama-style blocks)
    "124m": dict(d_model=768, n_layers=12, n_heads=12, max_seq_len=1024, vocab_size=50304, ffn_hidden=2048, tie_embeddings=True),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, max_seq_len=2048, vocab_size=50304, ffn_hidden=2816),
    # Llama-3.2-1B-like shape
    "1b": dict(d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, max_seq_len=4096, vocab_size=128256, ffn_hidden=8192, rope_theta=500000.0),
    # Llama-2-7B shape
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, max_seq_len=4096, vocab_size=32000, ffn_hidden=11008, tie_embeddings=False),
    # small mixture of experts for tests/demos
    "tiny-moe": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256, vocab_size=4096, moe_experts=4, moe_top_k=2, ffn_hidden=256),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
    cfg = ModelConfig(**{**PRESETS[name], **overrides})
    cfg.validate()
    return cfg
