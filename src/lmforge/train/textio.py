"""The tokenizer as training uses it: bytes per token (for bits per byte), prompts and samples.

Everything goes through the one tokenizer runtime (`lmforge.tokenizer.Tokenizer`). Bits per byte
needs the number of UTF-8 bytes each target token stands for: `Tokenizer.token_byte_lengths()`
(special tokens count 0 bytes and are left out of the bits-per-byte sums).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import InputError
from lmforge.tokenizer import Tokenizer


def load_tokenizer(path: str | Path | None) -> Tokenizer | None:
    """The tokenizer of a tokenizer directory or tokenizer.json, or None if there is none."""
    if path is None:
        return None
    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        return None
    return Tokenizer.from_file(f)


def token_byte_lengths(tok: Tokenizer, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes per token id for a model vocabulary of `vocab_size` (0 for special tokens and
    ids the tokenizer does not have)."""
    out = np.zeros(vocab_size, dtype=np.int64)
    lens = tok.token_byte_lengths()
    n = min(vocab_size, len(lens))
    out[:n] = lens[:n]
    return out


def bytes_per_token_from_stats(tokenizer_dir: str | Path | None) -> float | None:
    """Average bytes per token from tokenizer/stats.json (fallback when there is no tokenizer.json)."""
    if tokenizer_dir is None:
        return None
    p = Path(tokenizer_dir) / "stats.json"
    if not p.is_file():
        return None
    try:
        s = json.loads(p.read_text())
    except json.JSONDecodeError:
        return None
    for k in ("bytes_per_token", "bytes_per_token_total"):
        v = s.get(k)
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
        if isinstance(v, dict):
            for kk in ("all", "total", "overall"):
                if isinstance(v.get(kk), (int, float)) and v[kk] > 0:
                    return float(v[kk])
    return None


def special_id(tok: Tokenizer | None, name: str, default: int | None = None) -> int | None:
    return tok.special_tokens.get(name, default) if tok is not None else default


@torch.no_grad()
def generate_samples(model, tok, prompts: list[str], max_new_tokens: int, *, bos_id: int, eos_id: int | None,
                     temperature: float = 0.8, top_k: int = 50, seed: int = 0, device=None) -> list[dict]:
    """Sample a continuation of each prompt (own RNG: the training RNG is left untouched)."""
    device = device or next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    out = []
    try:
        for prompt in prompts:
            ids = [bos_id] + tok.encode(prompt, add_special_tokens=False).ids
            room = model.cfg.max_seq_len - len(ids)
            if room <= 0:
                raise InputError(f"prompt of {len(ids)} tokens does not fit the model's context ({model.cfg.max_seq_len})")
            x = torch.tensor([ids], device=device)
            y = model.generate(x, min(max_new_tokens, room), temperature=temperature, top_k=top_k, eos_id=eos_id, generator=g)
            new = [t for t in y[0, len(ids):].tolist() if t != eos_id]
            out.append({"prompt": prompt, "completion": tok.decode(new, skip_special_tokens=True)})
    finally:
        model.train(was_training)
    return out
