"""A small real tokenizer for the post-training tests (trained on a slice of the bundled sample)."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def chat_tok(tmp_path_factory):
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.config import TokenizerConfig
    from lmforge.tokenizer.corpus import corpus_shards
    from lmforge.tokenizer.train_bpe import train_from_corpus
    from tests.conftest import SAMPLE
    from tests.tokenizer.conftest import sample_docs, write_corpus

    corpus = write_corpus(tmp_path_factory.mktemp("chat_corpus"), sample_docs(SAMPLE, limit=300))
    out: Path = tmp_path_factory.mktemp("chat_tok")
    train_from_corpus(corpus_shards(corpus), out, TokenizerConfig(vocab_size=512, train_bytes=200_000), seed=1)
    return Tokenizer.from_file(out)
