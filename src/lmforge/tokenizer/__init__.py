"""Tokenizer stage: byte-level BPE training (HF `tokenizers`), fast identical-id encoding
(tiktoken), corpus -> shuffled train/val token shards, and vocabulary inspection.

Public entry for other stages: `load_tokenizer(tokenizer_dir)`.
"""

from __future__ import annotations


def load_tokenizer(tokenizer_dir):
    """Load `<tokenizer_dir>/tokenizer.json`: encode / encode_batch / decode, vocab_size, bos_id, eos_id, pad_id, special_tokens."""
    from lmforge.tokenizer.encode import load_tokenizer as _load

    return _load(tokenizer_dir)


__all__ = ["load_tokenizer"]
