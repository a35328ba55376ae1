"""Fixtures for the evaluation tests: a small byte-level BPE trained on bundled text and
small random models saved as checkpoints."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from lmforge.model import Transformer, preset
from lmforge.model.io import save_model

SAMPLE = Path(__file__).resolve().parents[2] / "src" / "lmforge" / "sample"


def train_tokenizer(out_dir: Path, vocab: int = 512) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [json.loads(l)["text"] for l in gzip.open(SAMPLE / "dictionary" / "gcide-sample.jsonl.gz", "rt")][:1500]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    return out_dir


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok"))


def make_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = preset("tiny", vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, **kw)
    return Transformer(cfg)


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory) -> Path:
    """checkpoints/run/step_000010 and step_000020 of a tiny random model."""
    root = tmp_path_factory.mktemp("ckpt") / "run"
    for step, seed in ((10, 0), (20, 1)):
        save_model(make_model(seed), root / f"step_{step:06d}")
    return root
