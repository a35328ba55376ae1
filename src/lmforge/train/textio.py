"""The tokenizer as training uses it: bytes per token (for bits per byte), prompts and samples.

Everything goes through the one tokenizer runtime (`lmforge.tokenizer.Tokenizer`). Bits per byte
needs the number of UTF-8 bytes each target token stands for: `Tokenizer.token_byte_lengths()`
(special tokens count 0 bytes and are left out of the bits-per-byte sums).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

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


def generate_samples(model, tok, prompts: list[str], max_new_tokens: int, *, bos_id: int, eos_id: int | None,
                     temperature: float = 0.8, top_k: int = 50, seed: int = 0, device=None) -> list[dict]:
    """Sample a continuation of each prompt, all prompts in one batch through the generation engine
    (its own seeded generator: the training RNG is left untouched)."""
    from lmforge.infer.engine import SamplingParams, generate

    ids = [[bos_id] + tok.encode(prompt) for prompt in prompts]
    ctx = model.cfg.max_seq_len
    for p in ids:
        if len(p) >= ctx:
            raise InputError(f"prompt of {len(p)} tokens does not fit the model's context ({ctx})")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k or 0, seed=seed,
                            stop_token_ids=[eos_id] if eos_id is not None else [])
    outs = generate(model, ids, params)
    return [{"prompt": p, "completion": tok.decode(o.token_ids, skip_special=True)} for p, o in zip(prompts, outs)]
