"""Tokenizer stage: byte-level BPE training (HF `tokenizers`), corpus -> shuffled train/val
token shards, vocabulary inspection — and the one tokenizer runtime every stage uses.

Public entries for other stages: `Tokenizer` (`Tokenizer.from_file(path)`: tiktoken for lmforge's
byte-level BPE, HF `tokenizers` for any other tokenizer.json, same methods either way) and
`load_tokenizer(path)` (the same constructor).
"""

from __future__ import annotations

from lmforge.tokenizer.runtime import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
