"""Fixtures for the pretraining tests: real text from the bundled sample (GCIDE dictionary
entries), a small byte-level BPE tokenizer trained on it, and token shards in the tokenizer
stage's format (tokens/index.json + train/val shards)."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from lmforge.train.config import TrainConfig
from lmforge.train.data import write_token_shards

# One thread: these models are tiny, the test machine is shared, and the kill -9 test compares
# this process's losses bit for bit with a subprocess started with OMP_NUM_THREADS=1.
torch.set_num_threads(1)

SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]


def sample_texts(sample_dir: Path, limit_chars: int = 400_000) -> list[str]:
    out, n = [], 0
    with gzip.open(sample_dir / "dictionary" / "gcide-sample.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)["text"]
            out.append(t)
            n += len(t)
            if n >= limit_chars:
                break
    return out


def make_tokenized(root: Path, texts: list[str], vocab: int = 512) -> tuple[Path, Path]:
    """Train a byte-level BPE on `texts`, write tokenizer/tokenizer.json and tokens/ (90/10 split)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tdir = root / "tokenizer"
    tdir.mkdir(parents=True, exist_ok=True)
    tok.save(str(tdir / "tokenizer.json"))
    docs = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    n_val = max(1, len(docs) // 10)
    write_token_shards(root / "tokens", {"train": docs[n_val:], "val": docs[:n_val]}, vocab_size=tok.get_vocab_size(),
                       bos_id=tok.token_to_id("<|bos|>"), eos_id=tok.token_to_id("<|eos|>"), shard_tokens=40_000)
    return root / "tokens", tdir


@pytest.fixture(scope="session")
def tokenized(tmp_path_factory) -> tuple[Path, Path]:
    """(tokens_dir, tokenizer_dir) made from ~400 KB of real dictionary text."""
    sample = Path(__file__).resolve().parents[2] / "src" / "lmforge" / "sample"
    return make_tokenized(tmp_path_factory.mktemp("tok"), sample_texts(sample))


def micro_cfg(**over) -> TrainConfig:
    """A model small enough that a step takes milliseconds on 2 cores."""
    from lmforge.config import build

    base = {
        "model": {"preset": "tiny", "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1},
        "seq_len": 32, "batch_size": 4, "max_steps": 20, "warmup_steps": 2, "log_every": 1,
        "eval_every": 10, "eval_batches": 2, "checkpoint_every": 10, "sample_tokens": 8, "seed": 7,
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return build(TrainConfig, base, "pretrain")
