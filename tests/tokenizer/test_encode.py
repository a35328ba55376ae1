"""Corpus -> token shards: document boundaries, seeded global shuffle, val split, resume, corrupt records."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zstandard

from lmforge.data.corpus_io import write_shard
from lmforge.data.document import Document
from lmforge.errors import InputError
from lmforge.tokenizer import encode as encmod
from lmforge.tokenizer import load_tokenizer
from lmforge.tokenizer.corpus import corpus_shards, iter_docs
from lmforge.tokenizer.encode import encode_corpus, read_tokens

from .conftest import sample_docs, write_corpus


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, sample_dir_module):
    return write_corpus(tmp_path_factory.mktemp("small"), sample_docs(sample_dir_module, limit=150))


@pytest.fixture(scope="module")
def sample_dir_module():
    from tests.conftest import SAMPLE

    return SAMPLE


def _docs(arr: np.ndarray, bos: int) -> list[np.ndarray]:
    starts = np.flatnonzero(arr == bos)
    assert len(arr) == 0 or starts[0] == 0, "a shard must start with <|bos|>"
    return [arr[a + 1:b] for a, b in zip(starts, list(starts[1:]) + [len(arr)])]


def _encode(corpus, trained_dir, out, **kw):
    kw.setdefault("val_fraction", 0.1)
    kw.setdefault("workers", 1)
    return encode_corpus(corpus_shards(corpus), trained_dir, out / "tokens", out / "work", **kw)


def test_shards_hold_every_document_once_with_bos(small_corpus, trained_dir, tmp_path):
    tok = load_tokenizer(trained_dir)
    index = _encode(small_corpus, trained_dir, tmp_path, shard_tokens=20_000, seed=7)
    originals = sorted(d.text for s in corpus_shards(small_corpus) for d in iter_docs(s) if d.text)
    assert index["dtype"] == "uint16" and index["bos_id"] == tok.bos_id and index["vocab_size"] == tok.vocab_size
    decoded = []
    for split in ("train", "val"):
        for sh in index[split]:
            arr = np.fromfile(tmp_path / "tokens" / sh["path"], dtype="<u2")
            assert len(arr) == sh["tokens"]
            docs = _docs(arr, tok.bos_id)
            assert len(docs) == sh["docs"]
            decoded += [tok.decode(d.tolist()) for d in docs]
    assert sorted(decoded) == originals  # nothing lost, nothing doubled, boundaries exact
    t = index["totals"]
    assert len(index["train"]) > 1  # shard_tokens splits the output at document boundaries
    assert t["val_docs"] == round(len(originals) * 0.1) and t["train_docs"] + t["val_docs"] == len(originals)
    assert t["train_tokens"] + t["val_tokens"] == t["text_tokens"] + t["docs"]
    on_disk = json.loads((tmp_path / "tokens" / "index.json").read_text())
    assert on_disk["train"] == index["train"] and "counts" not in on_disk
    assert set(index["sources"]) == {"code", "dictionary", "fortunes", "manpages"}
    for v in index["sources"].values():
        assert v["bytes_per_token"] == pytest.approx(v["bytes"] / v["tokens"], abs=1e-3)
    assert index["counts"].sum() == t["text_tokens"]
    assert not (tmp_path / "work").exists()  # intermediate files removed once complete


def test_shuffle_is_global_and_seeded(small_corpus, trained_dir, tmp_path):
    tok = load_tokenizer(trained_dir)

    def order(seed, sub):
        idx = _encode(small_corpus, trained_dir, tmp_path / sub, seed=seed, val_fraction=0.0)
        return [tok.decode(d.tolist()) for d in _docs(read_tokens(tmp_path / sub / "tokens", "train"), tok.bos_id)], idx

    a, ia = order(1, "a")
    b, _ = order(1, "b")
    c, _ = order(2, "c")
    assert a == b and a != c and sorted(a) == sorted(c)
    assert ia["val"] == []
    inputs = [d.text for s in corpus_shards(small_corpus) for d in iter_docs(s) if d.text]
    assert a != inputs
    # sources are interleaved across the whole output, not left in input-shard blocks
    src_of = {d.text: d.source for s in corpus_shards(small_corpus) for d in iter_docs(s)}
    first_half = {src_of[t] for t in a[: len(a) // 2]}
    assert first_half == {"code", "dictionary", "fortunes", "manpages"}


def test_killed_run_resumes_without_reencoding(small_corpus, trained_dir, tmp_path, monkeypatch):
    full = _encode(small_corpus, trained_dir, tmp_path / "ref", seed=3)
    real_write = encmod._write_split

    def boom(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(encmod, "_write_split", boom)
    with pytest.raises(KeyboardInterrupt):
        _encode(small_corpus, trained_dir, tmp_path / "run", seed=3)
    assert not (tmp_path / "run" / "tokens").exists()  # no half-written output that looks finished
    markers = sorted((tmp_path / "run" / "work").glob("enc_*.json"))
    assert len(markers) == len(corpus_shards(small_corpus))
    markers[1].unlink()  # as if killed before this shard finished

    calls = []
    real_encode = encmod._encode_shard
    monkeypatch.setattr(encmod, "_write_split", real_write)
    monkeypatch.setattr(encmod, "_encode_shard", lambda t: calls.append(t.index) or real_encode(t))
    resumed = _encode(small_corpus, trained_dir, tmp_path / "run", seed=3)
    assert calls == [1]
    for split in ("train", "val"):
        assert np.array_equal(read_tokens(tmp_path / "run" / "tokens", split), read_tokens(tmp_path / "ref" / "tokens", split))
    assert resumed["totals"] == full["totals"]


def test_parallel_workers_give_identical_output(small_corpus, trained_dir, tmp_path):
    one = _encode(small_corpus, trained_dir, tmp_path / "one", seed=5, workers=1)
    two = _encode(small_corpus, trained_dir, tmp_path / "two", seed=5, workers=2)
    assert one["totals"] == two["totals"]
    assert np.array_equal(read_tokens(tmp_path / "one" / "tokens"), read_tokens(tmp_path / "two" / "tokens"))


def test_corrupt_records_are_counted_and_skipped(trained_dir, tmp_path):
    corpus = tmp_path / "corpus"
    good = [Document(f"d{i}", f"document number {i} with some text", {"source": "web"}) for i in range(20)]
    write_shard(corpus / "a.jsonl.zst", good)
    lines = [json.dumps({"id": "x1", "text": "fine line", "metadata": {"source": "web"}}), "{broken json", json.dumps({"id": "x2"}),
             json.dumps({"id": "x3", "text": "also fine", "metadata": {"source": "web"}})]
    (corpus / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    full = zstandard.ZstdCompressor().compress(b"".join(json.dumps({"id": f"t{i}", "text": "t" * 50}).encode() + b"\n" for i in range(500)))
    (corpus / "c.jsonl.zst").write_bytes(full[: len(full) // 2])  # truncated shard
    index = encode_corpus(corpus_shards(corpus), trained_dir, tmp_path / "tokens", tmp_path / "work", val_fraction=0.0)
    t = index["totals"]
    assert t["corrupt_records"] == 3  # bad JSON, missing text, truncated stream
    assert t["docs"] >= 22 and "web" in index["sources"]


def test_uint32_and_empty_corpus(trained_dir, tmp_path):
    corpus = tmp_path / "corpus"
    write_shard(corpus / "a.jsonl.zst", [Document("a", "hello world", {}), Document("b", "", {})])
    idx = encode_corpus(corpus_shards(corpus), trained_dir, tmp_path / "tokens", tmp_path / "w", dtype="uint32", val_fraction=0.5)
    assert idx["dtype"] == "uint32" and idx["totals"]["docs"] == 1 and idx["val"] == []  # one doc cannot be split
    assert idx["sources"] == {"unknown": {"docs": 1, "bytes": 11, "tokens": idx["totals"]["text_tokens"], "bytes_per_token": idx["sources"]["unknown"]["bytes_per_token"]}}
    arr = read_tokens(tmp_path / "tokens")
    assert arr.dtype == np.dtype("<u4") and arr[0] == 0
    write_shard(corpus / "a.jsonl.zst", [Document("b", "", {})])
    with pytest.raises(InputError, match="no documents"):
        encode_corpus(corpus_shards(corpus), trained_dir, tmp_path / "t2", tmp_path / "w2")


def test_hf_backend_writes_the_same_shards(small_corpus, trained_dir, tmp_path):
    """The `backend` switch (used by the tokenizer benchmark's peer side) changes the encoder only."""
    fast = _encode(small_corpus, trained_dir, tmp_path / "fast", seed=3)
    slow = _encode(small_corpus, trained_dir, tmp_path / "slow", seed=3, backend="tokenizers")
    assert fast["totals"] == slow["totals"] and fast["train"] == slow["train"]
    for split in ("train", "val"):
        assert np.array_equal(read_tokens(tmp_path / "fast" / "tokens", split), read_tokens(tmp_path / "slow" / "tokens", split))
    assert np.array_equal(fast["counts"], slow["counts"])
