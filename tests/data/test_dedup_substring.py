"""Exact substring dedup with a suffix array."""

import numpy as np
import pytest

from lmforge.data.corpus_io import iter_shard, write_shard
from lmforge.data.dedup.substring import SubstringConfig, SubstringDedupPass, repeated_spans
from lmforge.data.document import Document
from lmforge.data.executor import LocalExecutor
from lmforge.errors import InputError


def spans(b: bytes, n: int) -> list[list[int]]:
    return repeated_spans(np.frombuffer(bytearray(b), np.uint8), n).tolist()


def test_repeated_spans_keep_the_first_occurrence():
    rep = b"the quick brown fox jumps"  # 25 bytes
    buf = b"AAAA" + rep + b"BBBB\xff" + b"CC" + rep + b"DD"
    s = spans(buf, 10)
    start2 = buf.index(rep, 10)
    assert s == [[start2, start2 + len(rep)]]
    assert spans(buf, 26) == []  # shorter than the threshold
    # a repeat that would only match across the separator is ignored
    assert spans(b"abcdefgh\xffabcdefgh", 9) == []
    assert spans(b"", 5) == [] and spans(b"xyz", 5) == []


def test_pass_cuts_later_copies_only(tmp_path, sample_dir):
    boiler = "This page was generated automatically from the archive; do not edit by hand. "
    docs = [Document("a", "Entry one. " + boiler + "Details about one."),
            Document("b", "Entry two: " + boiler + "Other notes, two."),
            Document("c", boiler.strip())]
    write_shard(tmp_path / "s0.jsonl.zst", docs[:2])
    write_shard(tmp_path / "s1.jsonl.zst", docs[2:])
    write_shard(tmp_path / "s2.jsonl.zst", [])
    r = SubstringDedupPass(SubstringConfig(enabled=True, min_bytes=30)).run(
        sorted(tmp_path.glob("*.zst")), tmp_path / "o", tmp_path / "w", LocalExecutor(1), 0, 5)
    out = {d.id: d.text for s in r.shards for d in iter_shard(s)}
    assert out["a"] == docs[0].text
    assert boiler.strip() not in out["b"] and out["b"].startswith("Entry two:") and out["b"].endswith("Other notes, two.")
    assert "c" not in out and r.stats.dropped["only_repeated_substrings"] == 1
    assert out["b"] == "Entry two:Other notes, two."  # " This page ... hand. " (leading space too) was seen in a
    assert r.extra["spans"] == 2 and r.stats.counters["docs_changed"] == 2


def test_unicode_cut_and_size_limit(tmp_path):
    rep = "ünïcödé text repeated here, long enough to count as a duplicate"
    write_shard(tmp_path / "s.jsonl.zst", [Document("a", "α " + rep), Document("b", "β " + rep + " ω")])
    r = SubstringDedupPass(SubstringConfig(enabled=True, min_bytes=20)).run(
        [tmp_path / "s.jsonl.zst"], tmp_path / "o", tmp_path / "w", LocalExecutor(1), 0, 5)
    out = {d.id: d.text for d in iter_shard(r.shards[0])}
    assert out["a"] == "α " + rep
    assert out["b"].startswith("β") and out["b"].endswith("ω") and len(out["b"]) < 10
    with pytest.raises(InputError, match="max_bytes"):
        SubstringDedupPass(SubstringConfig(enabled=True, max_bytes=50)).run(
            [tmp_path / "s.jsonl.zst"], tmp_path / "o2", tmp_path / "w2", LocalExecutor(1), 0, 5)


def test_matches_brute_force_on_random_strings():
    import random

    rng = random.Random(0)
    for _ in range(120):
        n, w = rng.randint(1, 60), rng.randint(2, 6)
        b = bytes(rng.choice(b"ab\xff") for _ in range(n))
        got = np.zeros(n, bool)
        for s, e in spans(b, w):
            got[s:e] = True
        want = np.zeros(n, bool)
        for i in range(n - w + 1):
            win = b[i : i + w]
            if 0xFF not in win and b.find(win) < i:  # seen at an earlier position
                want[i : i + w] = True
        assert (got == want).all(), (b, w)
