"""Medusa heads (Cai et al. 2024): K extra heads on a frozen model's last hidden state, head k
guessing the token k+1 places after the one the model's own head predicts, so one forward pass
of the model proposes K+1 tokens and the next pass verifies them.

    heads = load_heads("medusa_out/", model)          # medusa.json + medusa.safetensors, checksummed
    outs, stats = medusa_generate(model, heads, [prompt_ids], SamplingParams(temperature=0), tokenizer=tok)

The heads are a module applied from outside the model: they read `model.hidden_states` (the
final, normed hidden state that feeds the output head) and never change the model. Each head is
`layers` residual blocks x + SiLU(W x) (W zero-initialised, so an untrained head starts as the
model's own next-token head) followed by the model's frozen output head (shared, the default) or
a linear layer of its own (`own_head`, initialised from the model's).

Decoding (`medusa_generate`) is the top-1 chain: at every step the heads' guesses from the last
accepted position form one chain of up to K tokens that the model verifies in one forward pass
over its KV cache (lmforge.infer.speculative's loop, with the heads as the proposer). Greedy
verification accepts a guess while it equals the model's argmax, so greedy output is identical
to the model's own greedy output; with sampling the heads' (processed) distributions are the
proposal q of the standard rejection rule, so samples follow the model's distribution exactly.
A candidate tree (several chains verified at once with a tree attention mask) is not built: the
KV-cache protocol ties a token's RoPE position to its cache slot, and sibling tree nodes share a
position.

Files (`save_heads` / `load_heads`): `medusa.safetensors` (the heads' weights) and `medusa.json`
(format, head config, the base model it was trained on and the sha256 of the weights file; a
changed or corrupt file is refused with one line). Training: `lmforge medusa`
(lmforge.posttrain.medusa).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import ConfigError, InputError
from lmforge.infer.engine import Completion, SamplingParams, process_logits, sample
from lmforge.infer.speculative import Proposer, SpecStats, decode_with_proposer, fit_vocab

FORMAT = "lmforge-medusa"
WEIGHTS = "medusa.safetensors"
META = "medusa.json"


@dataclass
class MedusaConfig:
    heads: int = 3  # K: head k (1..K) guesses token t+1+k from the hidden state at t
    layers: int = 1  # residual blocks per head
    d_model: int = 0
    vocab_size: int = 0
    own_head: bool = False  # each head has its own output layer instead of sharing the model's frozen one

    def validate(self) -> None:
        if not 1 <= self.heads <= 16:
            raise ConfigError(f"medusa heads must be between 1 and 16, got {self.heads}")
        if not 1 <= self.layers <= 8:
            raise ConfigError(f"medusa layers per head must be between 1 and 8, got {self.layers}")
        if self.d_model < 1 or self.vocab_size < 1:
            raise ConfigError("medusa heads need the model's d_model and vocab_size")

    @classmethod
    def for_model(cls, model, heads: int = 3, layers: int = 1, own_head: bool = False) -> "MedusaConfig":
        cfg = cls(heads=heads, layers=layers, d_model=model.cfg.d_model, vocab_size=model.cfg.vocab_size, own_head=own_head)
        cfg.validate()
        return cfg


class ResBlock(nn.Module):
    """x + SiLU(W x + b); W and b start at zero, so the block starts as the identity."""

    def __init__(self, d: int):
        super().__init__()
        self.linear = nn.Linear(d, d)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.Module):
    def __init__(self, cfg: MedusaConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.blocks = nn.ModuleList(nn.Sequential(*(ResBlock(cfg.d_model) for _ in range(cfg.layers))) for _ in range(cfg.heads))
        self.out = (nn.ModuleList(nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) for _ in range(cfg.heads))
                    if cfg.own_head else None)

    @torch.no_grad()
    def init_from(self, model) -> "MedusaHeads":
        """Own output layers start as copies of the model's output head (no-op when shared)."""
        if self.out is not None:
            w = _head_weight(model)
            for lin in self.out:
                lin.weight.copy_(w)
        return self

    def head_logits(self, k: int, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """Logits of head k (0-based: guesses token t+2+k) from hidden states h (..., d)."""
        x = self.blocks[k](h)
        return self.out[k](x) if self.out is not None else lm_head(x)

    def forward(self, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """(K, ..., V) logits of every head from hidden states (..., d). `lm_head`: the model's
        output head (used by heads without their own)."""
        if self.out is None:  # shared head: one call for all heads
            return lm_head(torch.stack([blk(h) for blk in self.blocks]))
        return torch.stack([self.head_logits(k, h, lm_head) for k in range(self.cfg.heads)])


def _head_weight(model) -> torch.Tensor:
    head = model.lm_head
    if hasattr(head, "dequantize"):  # a quantized head (lmforge.infer.quantize)
        return head.dequantize(torch.float32)
    return head.weight.detach().float()


# ---- files ---------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def heads_bytes(heads: MedusaHeads) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}, metadata={"format": "pt"})


def save_heads(heads: MedusaHeads, directory: str | Path, base: dict | None = None, extra: dict | None = None) -> Path:
    """Write medusa.safetensors and medusa.json (config, base model, checksum) into `directory`."""
    from lmforge.rundir import atomic_write_bytes, atomic_write_json

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(d / WEIGHTS, heads_bytes(heads))
    meta = {"format": FORMAT, "version": 1, "config": asdict(heads.cfg), "base": base or {},
            "checksums": {WEIGHTS: _sha256(d / WEIGHTS)}, **(extra or {})}
    atomic_write_json(d / META, meta)
    return d


def read_meta(path: str | Path) -> tuple[Path, dict]:
    """(directory, medusa.json contents) for a heads directory or its medusa.json; one line when
    it is not one."""
    p = Path(path)
    d = p.parent if p.name == META else p
    f = d / META
    if not f.is_file():
        if not d.exists():
            raise InputError(f"Medusa heads {d} not found")
        raise InputError(f"{d} holds no Medusa heads ({META} missing): train them with `lmforge medusa MODEL --out DIR`")
    try:
        meta = json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{f} is not valid JSON ({e}): corrupt Medusa heads") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise InputError(f"{f} is not a Medusa heads file (format {meta.get('format') if isinstance(meta, dict) else None!r})")
    return d, meta


def load_heads(path: str | Path, model=None, device=None, verify: bool = True) -> MedusaHeads:
    """Medusa heads from a directory written by `save_heads` / `lmforge medusa`, checksum verified,
    checked against `model`'s width and vocabulary when given, on `device` (default: the model's)."""
    from lmforge.model.io import read_safetensors

    d, meta = read_meta(path)
    try:
        cfg = MedusaConfig(**meta["config"])
        cfg.validate()
    except (TypeError, KeyError, ConfigError) as e:
        raise InputError(f"{d / META}: bad head config ({e})") from None
    w = d / WEIGHTS
    if not w.is_file():
        raise InputError(f"no {WEIGHTS} in {d}")
    if verify:
        want = (meta.get("checksums") or {}).get(WEIGHTS)
        if want is None:
            raise InputError(f"{d / META} records no checksum for {WEIGHTS}")
        if _sha256(w) != want:
            raise InputError(f"{w}: checksum mismatch (the file is corrupt or was changed after training)")
    tensors, _ = read_safetensors(w, "Medusa head weights")
    heads = MedusaHeads(cfg)
    try:
        heads.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise InputError(f"{w} does not match its config ({str(e).splitlines()[0]})") from None
    if model is not None:
        check_compatible(heads, model, d)
        p = next(model.parameters())
        heads.to(device=device or p.device, dtype=p.dtype if p.is_floating_point() else None)
    elif device is not None:
        heads.to(device)
    return heads.eval()


def check_compatible(heads: MedusaHeads, model, where="the heads") -> None:
    c = heads.cfg
    if c.d_model != model.cfg.d_model:
        raise InputError(f"Medusa heads {where} were trained for hidden size {c.d_model}, the model has {model.cfg.d_model}")
    if c.vocab_size != model.cfg.vocab_size:
        raise InputError(f"Medusa heads {where} were trained for a vocabulary of {c.vocab_size}, the model has "
                         f"{model.cfg.vocab_size}")


# ---- decoding ------------------------------------------------------------------------------------

class MedusaProposer(Proposer):
    """Guesses = the heads' tokens from the model's hidden state at the last accepted position."""

    def __init__(self, model, heads: MedusaHeads):
        self.model, self.heads = model, heads
        self.logits: torch.Tensor | None = None  # (K, V) head logits for the next positions

    def _from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return fit_vocab(self.heads(h, self.model.lm_head).float()[:, 0], self.model.cfg.vocab_size)

    def begin(self, prompt, hidden):
        self.logits = self._from_hidden(hidden) if hidden is not None else None

    def max_guess(self, n: int) -> int:
        return self.heads.cfg.heads if self.logits is not None else 0

    def propose(self, seq, m, params, seen, g):
        if params.temperature == 0 and seen is None:  # greedy without a penalty: every head's argmax at once
            return self.logits[:m].argmax(-1).tolist(), None
        guesses: list[int] = []
        probs = []
        s = seen.clone() if seen is not None else None
        for i in range(m):
            z = process_logits(self.logits[i : i + 1], params, s[None] if s is not None else None)
            t = int(sample(z, params, g))
            guesses.append(t)
            if params.temperature > 0:
                probs.append(z.softmax(-1)[0])
            if s is not None:
                s[t] = True
        return guesses, (torch.stack(probs) if probs else None)

    def verified(self, n_before, m, accepted, hidden):
        self.logits = self._from_hidden(hidden[accepted : accepted + 1])


@torch.no_grad()
def medusa_generate(model, heads: MedusaHeads, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
                    tokenizer=None, *, k: int | None = None, on_token=None) -> tuple[list[Completion], SpecStats]:
    """Decode `prompts` with Medusa guesses (up to `k` <= the number of heads per step; default all),
    verified by `model`. Same output contract as `engine.generate`; batch 1."""
    check_compatible(heads, model)
    k = heads.cfg.heads if k is None else k
    if not isinstance(k, int) or not 1 <= k <= heads.cfg.heads:
        raise ConfigError(f"Medusa guesses per step must be between 1 and the number of heads ({heads.cfg.heads}), got {k!r}")
    was = heads.training
    heads.eval()
    try:
        return decode_with_proposer(model, lambda slots: MedusaProposer(model, heads), prompts, params, tokenizer, k=k,
                                    on_token=on_token)
    finally:
        heads.train(was)


__all__ = ["MedusaConfig", "MedusaHeads", "ResBlock", "save_heads", "load_heads", "read_meta", "heads_bytes",
           "medusa_generate", "MedusaProposer", "check_compatible", "FORMAT", "WEIGHTS", "META"]
