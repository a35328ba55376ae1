"""Configuration of the tokenizer stage: `[tokenizer]` in a recipe."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmforge.errors import ConfigError

# Always present, in this order, at ids 0..6; `reserved_tokens` <|reserved_N|> follow.
BASE_SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

# the `digits` rule each llama.cpp pre-tokenizer's regex has built in
SPLIT_DIGITS = {"llama-bpe": "group3", "qwen2": "single"}


@dataclass
class TokenizerConfig:
    corpus: str = ""  # corpus directory of *.jsonl.zst shards; "" = the run's corpus/ (data stage output)
    vocab_size: int = 8192  # total ids, special tokens included
    digits: Literal["single", "group3"] = "group3"  # numbers: every digit alone (Llama) or runs of up to 3 (GPT-4)
    # the split regex: lmforge's own (a word keeps a preceding line break), or exactly one of llama.cpp's
    # built-in pre-tokenizers ("llama-bpe": digits "group3"; "qwen2": digits "single"), so that a GGUF
    # export tokenizes in llama.cpp exactly as here
    split: Literal["lmforge", "llama-bpe", "qwen2"] = "lmforge"
    train_bytes: int = 50_000_000  # UTF-8 bytes of text sampled across the whole corpus to train on
    max_doc_chars: int = 20_000  # longer documents are cut to this many characters in the training sample
    min_frequency: int = 2  # a pair must occur this often in the sample to become a merge
    reserved_tokens: int = 16  # <|reserved_0|> .. for later use (tools, chat roles) without resizing the model
    encode: bool = True  # also encode the corpus into tokens/ (train/val token shards)
    val_fraction: float = 0.005  # share of documents (after the seeded shuffle) held out for validation
    shard_tokens: int = 100_000_000  # tokens per output shard (shards end at a document boundary)
    dtype: Literal["auto", "uint16", "uint32"] = "auto"  # auto = uint16 when vocab_size <= 65536
    batch_docs: int = 512  # documents per encode batch
    inspect_top: int = 20  # how many longest / least frequent tokens the report lists

    def validate(self) -> None:
        n_special = len(BASE_SPECIAL_TOKENS) + self.reserved_tokens
        if self.reserved_tokens < 0:
            raise ConfigError(f"tokenizer.reserved_tokens = {self.reserved_tokens} must be >= 0")
        if self.vocab_size < 256 + n_special + 1:
            raise ConfigError(
                f"tokenizer.vocab_size = {self.vocab_size} is too small: needs > 256 byte tokens + {n_special} special tokens"
            )
        if self.vocab_size > 2**31 - 1:
            raise ConfigError(f"tokenizer.vocab_size = {self.vocab_size} is too large (max 2147483647)")
        if self.dtype == "uint16" and self.vocab_size > 65536:
            raise ConfigError(f"tokenizer.dtype = 'uint16' cannot hold vocab_size = {self.vocab_size} (max 65536); use 'uint32' or 'auto'")
        need = SPLIT_DIGITS.get(self.split)
        if need is not None and self.digits != need:
            raise ConfigError(
                f"tokenizer.split = {self.split!r} is llama.cpp's regex with digits = {need!r} "
                f"({'runs of up to 3 digits' if need == 'group3' else 'one token per digit'}), but tokenizer.digits = "
                f"{self.digits!r}: set digits = {need!r}, or split = "
                f"{next(k for k, v in SPLIT_DIGITS.items() if v == self.digits)!r}"
            )
        if self.train_bytes <= 0:
            raise ConfigError(f"tokenizer.train_bytes = {self.train_bytes} must be > 0")
        if self.max_doc_chars <= 0:
            raise ConfigError(f"tokenizer.max_doc_chars = {self.max_doc_chars} must be > 0")
        if self.min_frequency < 1:
            raise ConfigError(f"tokenizer.min_frequency = {self.min_frequency} must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"tokenizer.val_fraction = {self.val_fraction} must be in [0, 1)")
        if self.shard_tokens <= 0:
            raise ConfigError(f"tokenizer.shard_tokens = {self.shard_tokens} must be > 0")
        if self.batch_docs <= 0:
            raise ConfigError(f"tokenizer.batch_docs = {self.batch_docs} must be > 0")
        if self.inspect_top < 0:
            raise ConfigError(f"tokenizer.inspect_top = {self.inspect_top} must be >= 0")

    @property
    def special_tokens(self) -> list[str]:
        return list(BASE_SPECIAL_TOKENS) + [f"<|reserved_{i}|>" for i in range(self.reserved_tokens)]

    def token_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "uint16" if self.vocab_size <= 65536 else "uint32"

    def input_fingerprint(self, base: Path) -> str | None:
        """An explicit `corpus` directory is an input of its own: fingerprint its shards."""
        if not self.corpus:
            return None
        from lmforge.rundir import file_fingerprint

        p = Path(self.corpus).expanduser()
        p = p if p.is_absolute() else base / p
        return file_fingerprint(sorted(p.glob("*.jsonl.zst"))) if p.is_dir() else None
