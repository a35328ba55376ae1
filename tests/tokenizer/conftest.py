"""Small real corpora for the tokenizer tests, written from the bundled sample in the data stage's format."""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import pytest
import zstandard

from lmforge.data.corpus_io import write_shard
from lmforge.data.document import Document


def _jsonl(path: Path):
    if path.suffix == ".gz":
        f = gzip.open(path, "rt", encoding="utf-8")
    else:
        f = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    with f:
        for line in f:
            yield json.loads(line)


def sample_docs(sample_dir: Path, limit: int = 10**9) -> dict[str, list[Document]]:
    """Documents per source from the bundled sample (dictionary, manpages, fortunes, code)."""
    import pyarrow.parquet as pq

    out: dict[str, list[Document]] = {}
    files = {
        "dictionary": sample_dir / "dictionary" / "gcide-sample.jsonl.gz",
        "manpages": sample_dir / "multilingual" / "manpages-sample.jsonl.gz",
        "fortunes": sample_dir / "multilingual" / "fortunes-sample.jsonl.zst",
    }
    for src, path in files.items():
        docs = []
        for i, r in enumerate(_jsonl(path)):
            if i >= limit:
                break
            docs.append(Document(f"{src}-{r['id']}", r["text"], {"source": src, "language": r.get("lang", "en")}))
        out[src] = docs
    table = pq.read_table(sample_dir / "code" / "python-stdlib-sample.parquet").to_pylist()
    out["code"] = [Document(f"code-{r['id']}", r["text"], {"source": "code"}) for r in table[:limit]]
    return out


def write_corpus(dst: Path, docs: dict[str, list[Document]]) -> Path:
    """One shard per source, like a data-stage corpus/ directory."""
    dst.mkdir(parents=True, exist_ok=True)
    for i, (src, ds) in enumerate(sorted(docs.items())):
        write_shard(dst / f"shard_{i:05d}.jsonl.zst", ds)
    return dst


@pytest.fixture(scope="session")
def sample_corpus_dir(tmp_path_factory) -> Path:
    from tests.conftest import SAMPLE

    return write_corpus(tmp_path_factory.mktemp("corpus"), sample_docs(SAMPLE, limit=1500))


@pytest.fixture(scope="session")
def trained_dir(tmp_path_factory, sample_corpus_dir) -> Path:
    """A 1024-id tokenizer trained on the sample corpus (shared by the read-only tests)."""
    from lmforge.tokenizer.config import TokenizerConfig
    from lmforge.tokenizer.corpus import corpus_shards
    from lmforge.tokenizer.train_bpe import train_from_corpus

    out = tmp_path_factory.mktemp("tok")
    train_from_corpus(corpus_shards(sample_corpus_dir), out, TokenizerConfig(vocab_size=1024, train_bytes=1_000_000), seed=1)
    return out
