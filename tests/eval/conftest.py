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


def write_corpus_jsonl(path: Path, source: str, start: int, n: int) -> Path:
    """n GCIDE entries of the bundled sample from `start` as a JSONL corpus file."""
    rows = [json.loads(l) for l in gzip.open(SAMPLE / "dictionary" / "gcide-sample.jsonl.gz", "rt")][start : start + n]
    path.write_text("".join(json.dumps({"id": r["id"], "text": r["text"], "metadata": {"source": source}}) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tokens_dir(tmp_path_factory, tok_dir) -> Path:
    from tokenizers import Tokenizer

    from lmforge.train.data import write_token_shards

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    texts = [json.loads(l)["text"] for l in gzip.open(SAMPLE / "dictionary" / "gcide-sample.jsonl.gz", "rt")][:1200]
    ids = [e.ids for e in tok.encode_batch(texts)]
    return write_token_shards(tmp_path_factory.mktemp("tokens"), {"train": ids[:1100], "val": ids[1100:]}, vocab_size=512, bos_id=0, eos_id=1)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """These tests train and score tiny models: one intra-op thread avoids contention overhead."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
