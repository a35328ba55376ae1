"""Line/paragraph-level dedup (CCNet style)."""

from lmforge.data.corpus_io import iter_shard, write_shard
from lmforge.data.dedup.lines import LineDedupPass, LinesConfig, normalize_unit, split_units
from lmforge.data.document import Document
from lmforge.data.executor import LocalExecutor


def _run(tmp_path, docs_by_shard, **kw):
    shards = []
    for i, docs in enumerate(docs_by_shard):
        p = tmp_path / "in" / f"s{i}.jsonl.zst"
        write_shard(p, docs)
        shards.append(p)
    r = LineDedupPass(LinesConfig(enabled=True, **kw)).run(shards, tmp_path / "o", tmp_path / "w", LocalExecutor(1), 0, 5)
    return r, {d.id: d.text for s in r.shards for d in iter_shard(s)}


def test_split_and_normalise_round_trip():
    t = "a line\r\nsecond\n\nthird para\n  \nlast"
    assert "".join(b + s for b, s in split_units(t, "line")) == t
    assert "".join(b + s for b, s in split_units(t, "paragraph")) == t
    assert [b for b, _ in split_units(t, "paragraph")] == ["a line\r\nsecond", "third para", "last"]
    assert normalize_unit("  Café, 1913 WEBSTER!! ") == "cafe 0000 webster"


def test_boilerplate_lines_removed_everywhere(tmp_path):
    docs = [
        [Document("a", "Home | About | Contact\nThe first real article text.\n[1913 Webster]\n"),
         Document("b", "Home | About | Contact\nAnother article, different.\n[1913 webster]")],
        [Document("c", "home about contact\nThird one.\n"), Document("d", "Home | About | Contact\n[1913 Webster]\n")],
        [],
    ]
    r, out = _run(tmp_path, docs)
    assert out["a"] == "The first real article text.\n"
    assert out["b"] == "Another article, different.\n"
    assert out["c"] == "Third one.\n"
    assert "d" not in out and r.stats.dropped["only_duplicate_lines"] == 1
    assert r.stats.counters["units_removed"] == 7 and r.extra["duplicated_units"] == 2


def test_keep_first_skip_sources_and_paragraphs(tmp_path):
    docs = [[Document("a", "shared line here\nunique a"), Document("b", "shared line here\nunique b"),
             Document("code", "shared line here\nx = 1", {"source": "code"})]]
    _, out = _run(tmp_path / "1", docs, keep_first=True, skip_sources=["code"])
    assert out == {"a": "shared line here\nunique a", "b": "unique b", "code": "shared line here\nx = 1"}
    paras = [[Document("p", "Intro para.\n\nShared footer paragraph\nover two lines."),
              Document("q", "Other intro.\n\nShared footer paragraph\nover two lines.")]]
    _, out = _run(tmp_path / "2", paras, unit="paragraph")
    assert out == {"p": "Intro para.\n\n", "q": "Other intro.\n\n"}


def test_single_and_identical_documents(tmp_path):
    _, out = _run(tmp_path / "1", [[Document("x", "only one\ndocument")]])
    assert out == {"x": "only one\ndocument"}
    r, out = _run(tmp_path / "2", [[Document(f"d{i}", "same\ntext") for i in range(3)]], keep_first=True)
    assert out == {"d0": "same\ntext"} and r.stats.dropped["only_duplicate_lines"] == 2
