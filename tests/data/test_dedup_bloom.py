"""Bloom-filter streaming dedup: sizing, no false negatives, the pass, resume after a kill."""

import random

import numpy as np
import pytest

from lmforge.config import build
from lmforge.data.corpus_io import iter_shard, write_shard
from lmforge.data.dedup import DedupConfig
from lmforge.data.dedup.bloom import BloomConfig, BloomDedupPass, BloomFilter, bloom_size
from lmforge.data.document import Document
from lmforge.data.executor import LocalExecutor
from lmforge.errors import ConfigError
from tests.data.test_dedup_minhash import edit, real_texts


def test_size_follows_the_formula_and_no_false_negatives():
    m, k = bloom_size(100_000, 0.01)
    assert 958_000 <= m <= 959_000 + 64 and m % 64 == 0 and k == 7
    rng = np.random.default_rng(0)
    items = rng.integers(0, 2**63, size=20_000, dtype=np.uint64)
    bf = BloomFilter(*bloom_size(20_000, 0.01))
    bf.add(items)
    assert bf.contains(items).all()
    others = rng.integers(0, 2**63, size=20_000, dtype=np.uint64)
    fp = bf.contains(others).mean()
    assert fp < 0.03  # about the 1% it was sized for


def _corpus(tmp_path, sample_dir):
    rng = random.Random(0)
    texts = real_texts(sample_dir, 20)
    s0 = [Document(f"a{i}", t) for i, t in enumerate(texts[:10])]
    s1 = [Document(f"b{i}", t) for i, t in enumerate(texts[10:])] + [Document(f"c{i}", edit(texts[i], 0.02, rng)) for i in range(5)]
    d = tmp_path / "in"
    write_shard(d / "s0.jsonl.zst", s0)
    write_shard(d / "s1.jsonl.zst", s1)
    write_shard(d / "s2.jsonl.zst", [])
    return [d / "s0.jsonl.zst", d / "s1.jsonl.zst", d / "s2.jsonl.zst"]


def test_pass_drops_later_near_copies(tmp_path, sample_dir):
    shards = _corpus(tmp_path, sample_dir)
    r = BloomDedupPass(BloomConfig(enabled=True)).run(shards, tmp_path / "o", tmp_path / "w", LocalExecutor(1), 0, 5)
    kept = {d.id for s in r.shards for d in iter_shard(s)}
    assert kept == {f"a{i}" for i in range(10)} | {f"b{i}" for i in range(10)}
    assert r.stats.dropped["near_duplicate"] == 5
    assert r.extra["probes"] >= 1 and r.extra["memory_bytes"] * 8 == r.extra["bits"]
    assert all(rec["metadata"]["bloom_seen"] >= 0.8 for rec in r.removed["near_duplicate"])


def test_killed_run_resumes_with_the_same_result(tmp_path, sample_dir, monkeypatch):
    shards = _corpus(tmp_path, sample_dir)
    orig = BloomDedupPass._filter
    calls = {"n": 0}

    def dying(self, path, bf, st, rs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        yield from orig(self, path, bf, st, rs)

    monkeypatch.setattr(BloomDedupPass, "_filter", dying)
    with pytest.raises(KeyboardInterrupt):
        BloomDedupPass(BloomConfig(enabled=True)).run(shards, tmp_path / "o", tmp_path / "w", LocalExecutor(1), 0, 5)
    monkeypatch.setattr(BloomDedupPass, "_filter", orig)
    r = BloomDedupPass(BloomConfig(enabled=True)).run(shards, tmp_path / "o", tmp_path / "w", LocalExecutor(1), 0, 5)
    clean = BloomDedupPass(BloomConfig(enabled=True)).run(shards, tmp_path / "o2", tmp_path / "w2", LocalExecutor(1), 0, 5)
    ids = lambda res: [d.id for s in res.shards for d in iter_shard(s)]  # noqa: E731
    assert ids(r) == ids(clean)
    assert r.stats.to_dict()["dropped"] == clean.stats.to_dict()["dropped"]


def test_identical_documents_and_config_errors(tmp_path, sample_dir):
    t = real_texts(sample_dir, 1)[0]
    write_shard(tmp_path / "x.jsonl.zst", [Document(f"d{i}", t) for i in range(4)])
    r = BloomDedupPass(BloomConfig(enabled=True, expected_items=1000)).run([tmp_path / "x.jsonl.zst"], tmp_path / "o", tmp_path / "w", LocalExecutor(1), 0, 5)
    assert [d.id for d in iter_shard(r.shards[0])] == ["d0"]
    with pytest.raises(ConfigError, match="bloom.fp_rate"):
        build(DedupConfig, {"bloom": {"fp_rate": 0.9}}, "dedup")
