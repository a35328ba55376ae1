"""HTML inspection report of a data run."""

import json

import pytest

from lmforge.data.corpus_io import write_shard
from lmforge.data.document import Document
from lmforge.data.report_html import write_inspection_html
from lmforge.data.step import StepStats
from lmforge.errors import InputError


@pytest.fixture
def corpus(tmp_path):
    c = tmp_path / "run" / "corpus"
    docs = [Document(f"w{i}", f"Page {i} about <b>sorting</b> lists. " * (i + 1), {"source": "web", "url": f"https://docs.python.org/3.11/p{i}.html"}) for i in range(30)]
    docs += [Document(f"d{i}", "Entry word, n. A definition. " * (i % 5 + 1), {"source": "dictionary"}) for i in range(20)]
    write_shard(c / "shard_00000.jsonl.zst", docs)
    st = StepStats("gopher_quality", docs_in=80, docs_out=50, chars_in=9000, chars_out=7000)
    st.dropped.update({"too_short": 20, "bullet_lines": 10})
    stats = {"steps": [StepStats("extract", 80, 80, 9000, 9000).to_dict(), st.to_dict()],
             "totals": {"docs_read": 80, "docs_out": 50}, "top_domains": [{"domain": "docs.python.org", "docs": 30, "tokens": 900}]}
    (c / "stats.json").write_text(json.dumps(stats))
    (c / "removed").mkdir()
    (c / "removed" / "gopher_quality.jsonl").write_text(
        json.dumps({"reason": "too_short", "id": "x1", "text": "tiny <script>alert(1)</script>", "metadata": {"source": "web"}}) + "\n"
        + "{corrupt line\n"
        + json.dumps({"reason": "bullet_lines", "id": "x2", "text": "- a\n- b", "metadata": {}}) + "\n")
    return c


def test_report_has_every_section(corpus, tmp_path):
    out = write_inspection_html(corpus.parent, tmp_path / "inspect.html")
    html = out.read_text()
    assert html.startswith("<!doctype html>")
    for needle in ("gopher_quality", "too_short: 20", "bullet_lines", "docs.python.org", "dictionary", "data:image/png;base64,", "not computed"):
        assert needle in html, needle
    assert "<script>alert(1)</script>" not in html and "&lt;script&gt;" in html  # escaped
    assert "x2" in html  # the corrupt line was skipped, the next record still read


def test_report_embeds_topic_map_when_present(corpus, tmp_path):
    t = corpus / "topics"
    t.mkdir()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.savefig(t / "topic_map.png")
    plt.close(fig)
    (t / "topics.json").write_text(json.dumps({"k": 2, "sample": 50, "map": "topic_map.png", "clusters": [
        {"id": 0, "size": 30, "share": 0.6, "terms": ["sorting", "lists"], "examples": [{"id": "w1", "text": "Page 1"}]},
        {"id": 1, "size": 20, "share": 0.4, "terms": ["entry", "definition"], "examples": []}]}))
    html = write_inspection_html(corpus, tmp_path / "i.html").read_text()
    assert "sorting, lists" in html and html.count("data:image/png;base64,") == 2


def test_missing_corpus(tmp_path):
    with pytest.raises(InputError, match="corpus not found"):
        write_inspection_html(tmp_path / "nope", tmp_path / "x.html")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="nothing to inspect"):
        write_inspection_html(tmp_path / "empty", tmp_path / "x.html")


def test_data_inspect_cli_uses_it(corpus, tmp_path):
    from lmforge.cli import main

    out = tmp_path / "cli.html"
    assert main(["data", "inspect", str(corpus.parent), "--html", str(out)]) == 0
    assert "gopher_quality" in out.read_text()
