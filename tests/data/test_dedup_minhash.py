"""MinHash LSH dedup: shingling, signatures, the pass end to end, resume, order independence, index."""

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import build
from lmforge.data.corpus_io import iter_shard, write_shard
from lmforge.data.dedup import DedupConfig, build_passes
from lmforge.data.dedup.exact import ExactDedupPass
from lmforge.data.dedup.minhash import (
    MinhashConfig, MinhashDedupPass, batch_shingles, build_index, permutations, shingle_hashes, signatures, words,
)
from lmforge.data.document import Document
from lmforge.data.executor import LocalExecutor
from lmforge.errors import ConfigError, InputError


def real_texts(sample_dir: Path, n: int, min_words: int = 60) -> list[str]:
    out = []
    with gzip.open(sample_dir / "dictionary" / "gcide-sample.jsonl.gz", "rt") as f:
        for line in f:
            t = json.loads(line)["text"]
            if len(t.split()) >= min_words and t not in out:
                out.append(t)
            if len(out) >= n:
                break
    return out


def edit(text: str, frac: float, rng: random.Random) -> str:
    w = text.split()
    for _ in range(max(1, int(len(w) * frac))):
        w[rng.randrange(len(w))] = rng.choice(["lorem", "ipsum", "dolor", "amet"])
    return " ".join(w)


def write(dirpath: Path, name: str, docs: list[Document]) -> Path:
    p = dirpath / name
    write_shard(p, docs)
    return p


def kept_ids(shards) -> set[str]:
    return {d.id for s in shards for d in iter_shard(s)}


@pytest.fixture
def corpus(tmp_path, sample_dir):
    """3 shards: 30 unique real entries, each of the first 10 with a lightly edited copy in another shard."""
    rng = random.Random(0)
    texts = real_texts(sample_dir, 30)
    a = [Document(f"a{i}", t) for i, t in enumerate(texts[:15])]
    b = [Document(f"b{i}", t) for i, t in enumerate(texts[15:])]
    c = [Document(f"c{i}", edit(texts[i], 0.02, rng)) for i in range(10)]
    d = tmp_path / "in"
    return [write(d, "s0.jsonl.zst", a), write(d, "s1.jsonl.zst", b), write(d, "s2.jsonl.zst", c)], texts


def test_words_and_shingles_are_deterministic_and_batch_equals_single():
    assert words("Hello, World! it's [1913 Webster]") == ["hello", "world", "it", "s", "1913", "webster"]
    texts = ["one two three four five six", "a b", "", "Über größe straße café au lait now"]
    h, offs = batch_shingles(texts, 5)
    assert list(np.diff(offs)) == [2, 1, 0, 3]
    for i, t in enumerate(texts):
        assert np.array_equal(h[offs[i] : offs[i + 1]], shingle_hashes(t, 5))
    # same text, same hashes; order of words matters
    assert np.array_equal(shingle_hashes("x y z w v"), shingle_hashes("X, y; z w v!"))
    assert not np.array_equal(shingle_hashes("x y z w v"), shingle_hashes("y x z w v"))


def test_signature_agreement_estimates_jaccard():
    rng = np.random.default_rng(0)
    a, b = permutations(256, 7)
    base = rng.integers(0, 2**63, size=400, dtype=np.uint64)
    for keep in (300, 200, 100):
        other = np.concatenate([base[:keep], rng.integers(0, 2**63, size=400 - keep, dtype=np.uint64)])
        true_j = keep / (800 - keep)
        sig = signatures(np.concatenate([base, other]), np.array([0, 400, 800]), a, b)
        est = float(np.mean(sig[0] == sig[1]))
        assert abs(est - true_j) < 0.1, (keep, est, true_j)
    # empty documents get the max signature and long documents are split in blocks consistently
    sig = signatures(np.concatenate([base, base]), np.array([0, 0, 400, 800]), a, b, chunk=64)
    assert (sig[0] == np.iinfo(np.uint32).max).all() and np.array_equal(sig[1], sig[2])


def test_pass_removes_edited_copies_and_reports(corpus, tmp_path):
    shards, texts = corpus
    r = MinhashDedupPass().run(shards, tmp_path / "out", tmp_path / "work", LocalExecutor(1), 0, 5)
    ids = kept_ids(r.shards)
    assert len(ids) == 30
    # keep = longest: per pair the longer text survives; every pair loses exactly one member
    for i in range(10):
        assert (f"a{i}" in ids) != (f"c{i}" in ids)
    assert r.stats.dropped["near_duplicate"] == 10
    assert r.extra["cluster_sizes"] == {"2": 10}
    assert r.extra["verified_pairs"] == 10 and r.extra["candidate_pairs"] >= 10
    assert len(r.removed["near_duplicate"]) == 5
    for rec in r.removed["near_duplicate"]:  # each removed document names the one kept for it
        shard, pos = rec["metadata"]["duplicate_of"].split("#")
        kept = list(iter_shard(Path(shards[0]).parent / shard))[int(pos)]
        assert kept.id in ids and kept.id[1:] == rec["id"][1:]
    assert [p.name for p in r.shards] == ["s0.jsonl.zst", "s1.jsonl.zst", "s2.jsonl.zst"]


def test_keep_first_and_shard_order_do_not_matter(corpus, tmp_path):
    shards, _ = corpus
    cfg = MinhashConfig(keep="first")
    r1 = MinhashDedupPass(cfg).run(shards, tmp_path / "o1", tmp_path / "w1", LocalExecutor(1), 0, 5)
    r2 = MinhashDedupPass(cfg).run(list(reversed(shards)), tmp_path / "o2", tmp_path / "w2", LocalExecutor(2), 0, 5)
    assert kept_ids(r1.shards) == kept_ids(r2.shards)
    assert not any(f"c{i}" in kept_ids(r1.shards) for i in range(10))  # first in corpus order wins


class CountingExecutor(LocalExecutor):
    """Counts tasks it really runs; optionally dies when a stage starts."""

    def __init__(self, die_at: str = ""):
        super().__init__(1)
        self.die_at, self.ran = die_at, {}

    def map(self, fn, tasks, task_ids, marker_dir, desc="tasks"):
        if self.die_at and desc == self.die_at:
            raise KeyboardInterrupt("killed")
        done, todo = self.pending(task_ids, Path(marker_dir))
        self.ran[desc] = len(todo)
        return super().map(fn, tasks, task_ids, marker_dir, desc)


def test_killed_between_stages_resumes(corpus, tmp_path):
    shards, _ = corpus
    with pytest.raises(KeyboardInterrupt):
        MinhashDedupPass().run(shards, tmp_path / "out", tmp_path / "work", CountingExecutor(die_at="minhash filter"), 0, 5)
    ex = CountingExecutor()
    r = MinhashDedupPass().run(shards, tmp_path / "out", tmp_path / "work", ex, 0, 5)
    assert ex.ran["minhash signatures"] == 0 and ex.ran["minhash buckets"] == 0 and ex.ran["minhash verify"] == 0
    assert ex.ran["minhash filter"] == 3
    clean = MinhashDedupPass().run(shards, tmp_path / "o2", tmp_path / "w2", LocalExecutor(1), 0, 5)
    assert kept_ids(r.shards) == kept_ids(clean.shards)


def test_empty_shard_single_doc_and_identical_docs(tmp_path, sample_dir):
    t = real_texts(sample_dir, 1)[0]
    d = tmp_path / "in"
    empty = write(d, "e.jsonl.zst", [])
    one = write(d, "one.jsonl.zst", [Document("x", t)])
    r = MinhashDedupPass().run([empty, one], tmp_path / "o1", tmp_path / "w1", LocalExecutor(1), 0, 5)
    assert kept_ids(r.shards) == {"x"} and r.extra["cluster_sizes"] == {}
    same = write(tmp_path / "in2", "same.jsonl.zst", [Document(f"d{i}", t) for i in range(7)])
    same2 = write(tmp_path / "in2", "same2.jsonl.zst", [Document(f"e{i}", t) for i in range(5)])
    r = MinhashDedupPass().run([same, same2], tmp_path / "o2", tmp_path / "w2", LocalExecutor(1), 0, 5)
    assert kept_ids(r.shards) == {"d0"}  # equal length: the first in corpus order
    assert r.extra["cluster_sizes"] == {"12": 1} and r.stats.dropped["near_duplicate"] == 11


def test_short_documents_stay_out_of_lsh(tmp_path):
    docs = [Document(f"s{i}", "see the entry for this word") for i in range(3)]
    p = write(tmp_path / "in", "s.jsonl.zst", docs)
    r = MinhashDedupPass().run([p], tmp_path / "o", tmp_path / "w", LocalExecutor(1), 0, 5)
    assert len(kept_ids(r.shards)) == 3 and r.stats.counters["short_docs_skipped"] == 3
    r = MinhashDedupPass(MinhashConfig(min_shingles=1)).run([p], tmp_path / "o2", tmp_path / "w2", LocalExecutor(1), 0, 5)
    assert len(kept_ids(r.shards)) == 1


def test_verify_modes(corpus, tmp_path):
    shards, _ = corpus
    for mode in ("estimate", "none"):
        r = MinhashDedupPass(MinhashConfig(verify=mode)).run(shards, tmp_path / f"o{mode}", tmp_path / f"w{mode}", LocalExecutor(1), 0, 5)
        assert r.stats.dropped["near_duplicate"] == 10
    # an impossible threshold keeps everything under exact verification
    r = MinhashDedupPass(MinhashConfig(threshold=1.0)).run(shards, tmp_path / "o1", tmp_path / "w1", LocalExecutor(1), 0, 5)
    assert r.stats.dropped["near_duplicate"] == 0 and r.extra["candidate_pairs"] >= 10


def test_corrupt_record_is_counted_and_skipped(corpus, tmp_path):
    import zstandard

    shards, _ = corpus
    bad = tmp_path / "in" / "s3.jsonl.zst"
    bad.write_bytes(zstandard.ZstdCompressor().compress(b'{"id": "ok", "text": "fine text here"}\n{not json\n'))
    r = MinhashDedupPass().run(shards + [bad], tmp_path / "o", tmp_path / "w", LocalExecutor(1), 0, 5)
    assert r.stats.dropped["corrupt_record"] == 1
    assert "ok" in kept_ids(r.shards)


def test_index_dedups_a_new_dataset(corpus, tmp_path, sample_dir):
    shards, texts = corpus
    cfg = MinhashConfig()
    meta = build_index(shards[:2], tmp_path / "index", cfg, LocalExecutor(1))
    assert meta["docs"] == 30
    rng = random.Random(1)
    new = [Document(f"n{i}", edit(texts[i], 0.02, rng)) for i in range(20, 25)]
    fresh = [Document(f"f{i}", t) for i, t in enumerate(real_texts(sample_dir, 40)[30:35])]
    p = write(tmp_path / "new", "n.jsonl.zst", new + fresh)
    r = MinhashDedupPass(MinhashConfig(index=str(tmp_path / "index"))).run([p], tmp_path / "o", tmp_path / "w", LocalExecutor(1), 0, 5)
    assert kept_ids(r.shards) == {d.id for d in fresh}
    assert r.stats.dropped["near_duplicate_of_index"] == 5
    with pytest.raises(ConfigError, match="different parameters"):
        MinhashDedupPass(MinhashConfig(index=str(tmp_path / "index"), bands=10)).run([p], tmp_path / "o2", tmp_path / "w2", LocalExecutor(1), 0, 5)
    with pytest.raises(InputError, match="index not found"):
        MinhashDedupPass(MinhashConfig(index=str(tmp_path / "nope"))).run([p], tmp_path / "o3", tmp_path / "w3", LocalExecutor(1), 0, 5)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="dedup.minhash.bandz"):
        build(DedupConfig, {"minhash": {"bandz": 3}}, "dedup")
    with pytest.raises(ConfigError, match="minhash.threshold"):
        build(DedupConfig, {"minhash": {"threshold": 1.5}}, "dedup")
    with pytest.raises(ConfigError, match="verify"):
        build(DedupConfig, {"minhash": {"verify": "maybe"}}, "dedup")


def test_build_passes_order():
    cfg = build(DedupConfig, {"lines": {"enabled": True}, "bloom": {"enabled": True}, "substring": {"enabled": True},
                              "decontam": {"eval_files": ["x.jsonl"]}}, "dedup")
    names = [p.name for p in build_passes(cfg)]
    assert names == ["exact_dedup", "decontam", "lines", "minhash", "bloom", "substring"]
    assert isinstance(build_passes(DedupConfig())[0], ExactDedupPass)
    assert [p.name for p in build_passes(DedupConfig())] == ["exact_dedup", "minhash"]
    assert build_passes(DedupConfig(enabled=False)) == []


def test_real_dictionary_duplicates(shared_corpus, tmp_path):
    """The first 3,000 GCIDE entries hold repeated entries (one per inflected headword)."""
    docs = []
    with gzip.open(shared_corpus / "dictionary" / "gcide.jsonl.gz", "rt") as f:
        for line, _ in zip(f, range(3000)):
            r = json.loads(line)
            docs.append(Document(r["id"], r["text"]))
    p = write(tmp_path / "in", "g.jsonl.zst", docs)
    r = MinhashDedupPass().run([p], tmp_path / "o", tmp_path / "w", LocalExecutor(1), 0, 5)
    removed = r.stats.dropped["near_duplicate"]
    assert removed > 100
    jq = r.extra["verified_jaccard_quantiles"]
    assert jq[0] >= 0.8  # exact check: every removed document is >= 0.8 Jaccard to its keeper


def test_star_clustering_does_not_chain(tmp_path, sample_dir):
    """A ~ B and B ~ C (Jaccard ~0.86) but A !~ C (~0.73): components remove C for A, star keeps C."""
    base = " ".join(" ".join(real_texts(sample_dir, 3)).split()[:200]).split()
    b, c = list(base), list(base)
    for i in (10, 40, 70):
        b[i] = c[i] = f"xx{i}"
    for i in (120, 150, 180):
        c[i] = f"yy{i}"
    docs = [Document("A", " ".join(base)), Document("B", " ".join(b)), Document("C", " ".join(c))]
    p = write(tmp_path / "in", "s.jsonl.zst", docs)
    star = MinhashDedupPass(MinhashConfig(keep="first")).run([p], tmp_path / "o1", tmp_path / "w1", LocalExecutor(1), 0, 5)
    comp = MinhashDedupPass(MinhashConfig(keep="first", clustering="components")).run([p], tmp_path / "o2", tmp_path / "w2", LocalExecutor(1), 0, 5)
    assert kept_ids(star.shards) == {"A", "C"} and star.extra["cluster_sizes"] == {"2": 1}
    assert kept_ids(comp.shards) == {"A"} and comp.extra["cluster_sizes"] == {"3": 1}
