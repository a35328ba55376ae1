"""The per-document keep/drop writer every dedup pass ends with (lmforge.data.dedup.common)."""

import zstandard

from lmforge.data.corpus_io import iter_shard, write_shard
from lmforge.data.dedup.common import Drop, iter_records, key_bounds, merge_results, write_filtered, write_without
from lmforge.data.document import Document
from lmforge.data.step import StepStats


def _shard_with_a_corrupt_line(path):
    write_shard(path, [Document("a", "alpha one"), Document("b", "beta two"), Document("c", "gamma three")])
    lines = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 20).decode().splitlines()
    lines.insert(1, '{"id": "broken", "te')
    path.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))


def test_write_filtered_counts_keeps_rewrites_and_samples(tmp_path):
    src = tmp_path / "in.jsonl.zst"
    _shard_with_a_corrupt_line(src)
    assert [(p, d.id if d else None) for p, d in iter_records(src)] == [(0, "a"), (1, None), (2, "b"), (3, "c")]
    st = StepStats("demo")

    def decide(pos, doc):
        if doc.id == "b":
            st.counters["seen_b"] += 1
            return Drop("is_b", Document(doc.id, doc.text, dict(doc.metadata, why="b")))
        return Document(doc.id, doc.text.upper(), doc.metadata) if doc.id == "c" else doc

    res = write_filtered(iter_records(src), tmp_path / "out.jsonl.zst", decide, st, sample_removed=5)
    assert [(d.id, d.text) for d in iter_shard(tmp_path / "out.jsonl.zst")] == [("a", "alpha one"), ("c", "GAMMA THREE")]
    s = res["stats"]
    assert (s["docs_in"], s["docs_out"]) == (4, 2)
    assert s["chars_in"] == len("alpha one") + len("beta two") + len("gamma three") and s["chars_out"] == len("alpha one") + len("GAMMA THREE")
    assert s["dropped"] == {"corrupt_record": 1, "is_b": 1} and s["counters"] == {"seen_b": 1}
    assert [(r["id"], r["metadata"]["why"]) for r in res["removed"]["is_b"]] == [("b", "b")]

    res2 = write_without(src, tmp_path / "out2.jsonl.zst", {0: "dup", 3: "dup"}, "demo", 5, {3: {"duplicate_of": "x#0"}})
    assert [d.id for d in iter_shard(tmp_path / "out2.jsonl.zst")] == ["b"]
    stats, removed = merge_results("demo", [res, res2], 5)
    assert stats.docs_in == 8 and stats.docs_out == 3 and stats.dropped == {"corrupt_record": 2, "is_b": 1, "dup": 2}
    assert {r["id"] for r in removed["dup"]} == {"a", "c"}
    assert [r["metadata"].get("duplicate_of") for r in sorted(removed["dup"], key=lambda r: r["id"])] == [None, "x#0"]


def test_key_bounds_split_the_64_bit_space():
    parts = [key_bounds(i, 3) for i in range(3)]
    assert parts[0][0] == 0 and parts[-1][1] == 2**64
    assert all(parts[i][1] == parts[i + 1][0] for i in range(2))
