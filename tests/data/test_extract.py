"""HTML extraction: boilerplate gone and body kept on real pages, time limits, pass-through, CLI."""

import argparse
import json
import re
import threading
from pathlib import Path

import lxml.html
import pytest

from lmforge import config as C
from lmforge.data.document import Document
from lmforge.data.extract import ExtractConfig, ExtractionTimeout, ExtractStep, extract_text, register, time_limit
from lmforge.data.readers import ReadStats, expand_inputs, parse_inputs, read_file
from lmforge.errors import ConfigError

# Sphinx's sidebar, related-links bar and footer on every page of the Python docs
BOILERPLATE = ["Previous topic", "Next topic", "This Page", "Report a Bug", "Show Source", "Quick search", "Last updated on"]
PAGES = [  # small and mid-sized pages of the bundled crawl (prose, API reference, tables, code)
    "about.html", "c-api/list.html", "c-api/refcounting.html", "library/heapq.html", "library/queue.html",
    "library/reprlib.html", "library/timeit.html", "library/uuid.html", "tutorial/controlflow.html", "howto/cporting.html",
]


def _web_docs(sample_dir: Path) -> list[Document]:
    files = expand_inputs(parse_inputs([str(sample_dir / "web" / "python-docs-sample.warc.gz")]), Path)
    return list(read_file(files[0], ReadStats()))


@pytest.fixture(scope="module")
def pages(request) -> dict[str, tuple[str, Document]]:
    """url suffix -> (raw HTML, extracted document) for PAGES."""
    sample = Path(request.config.rootpath) / "src" / "lmforge" / "sample"
    docs = [d for d in _web_docs(sample) if d.metadata["url"].split("/3.11/", 1)[1] in PAGES]
    raw = {d.id: d.text for d in docs}
    step = ExtractStep(ExtractConfig(timeout_s=0))
    out = list(step(docs))
    assert step.stats.docs_in == len(PAGES) and step.stats.docs_out == len(PAGES), step.stats.to_dict()
    return {d.metadata["url"].split("/3.11/", 1)[1]: (raw[d.id], d) for d in out}


def _main_block(html: str) -> lxml.html.HtmlElement:
    return lxml.html.fromstring(html).xpath("//div[@role='main']")[0]


def test_navigation_and_footer_gone_body_kept(pages):
    for name, (html, doc) in pages.items():
        assert doc.metadata["format"] == "text"
        assert "<div" not in doc.text and "</a>" not in doc.text
        for phrase in BOILERPLATE:
            assert phrase in html, (name, phrase)  # the raw page has it ...
            assert phrase not in doc.text, (name, phrase)  # ... the extracted text does not
        main = _main_block(html)
        title = main.xpath("string(.//h1)").replace("¶", "").strip()
        assert title and title in doc.text, name
        paragraphs = [" ".join(p.text_content().split()) for p in main.iter("p")]
        paragraphs = [p for p in paragraphs if len(p) > 60]
        flat = " ".join(doc.text.split())
        found = sum(p[:60] in flat for p in paragraphs)
        assert found >= 0.8 * len(paragraphs), (name, found, len(paragraphs))


def test_code_blocks_and_headings_kept(pages):
    html, doc = pages["tutorial/controlflow.html"]
    main = _main_block(html)
    code = [pre.text_content() for pre in main.iter("pre")]
    assert len(code) > 10
    lines = [ln.strip() for block in code for ln in block.splitlines() if len(ln.strip()) > 15]
    kept = sum(ln in doc.text for ln in lines)
    assert kept >= 0.9 * len(lines), (kept, len(lines))
    for h in main.xpath(".//h2|.//h3"):
        assert h.text_content().replace("¶", "").strip() in doc.text
    assert doc.text.index("4.1. if Statements") < doc.text.index("4.2. for Statements")


def test_cookie_banner_and_nav_removed():
    html = """<html><head><title>t</title></head><body>
    <div id="cookie-banner" class="cookie-consent"><p>We use cookies to improve your experience. Accept all cookies?</p>
      <button>Accept</button></div>
    <nav><ul><li><a href="/">Home</a></li><li><a href="/blog">Blog</a></li><li><a href="/about">About us</a></li></ul></nav>
    <main><article><h1>Growing tomatoes on a balcony</h1>
      <p>Tomatoes need at least six hours of direct sunlight a day, so a south-facing balcony is ideal for them.</p>
      <p>Water them deeply twice a week rather than a little every day; shallow watering keeps the roots near the surface.</p>
      <pre>water_ml = 500 * plants</pre>
    </article></main>
    <footer><p>Copyright 2024 Example Gardens. All rights reserved.</p></footer></body></html>"""
    text = extract_text(html)
    assert "six hours of direct sunlight" in text and "Water them deeply" in text
    assert "Growing tomatoes" in text and "water_ml = 500 * plants" in text
    assert "cookies" not in text and "About us" not in text and "All rights reserved" not in text


def test_non_html_passes_through_untouched():
    docs = [
        Document("a", "plain text document", {"format": "text", "source": "x"}),
        Document("b", "<p>looks like html but is declared text</p>", {"source": "y"}),
    ]
    step = ExtractStep(ExtractConfig())
    out = list(step(docs))
    assert [(d.id, d.text, d.metadata) for d in out] == [
        ("a", "plain text document", {"format": "text", "source": "x"}),
        ("b", "<p>looks like html but is declared text</p>", {"source": "y"}),
    ]
    assert step.stats.counters["passed_through"] == 2 and not step.stats.dropped


def test_empty_pages_dropped_as_no_text_and_huge_as_too_large():
    docs = [
        Document("empty", "<html><body><div></div></body></html>", {"format": "html"}),
        Document("blank", "", {"format": "html"}),
        Document("big", "<html><body><p>" + "word " * 400 + "</p></body></html>", {"format": "html"}),
    ]
    step = ExtractStep(C.build(ExtractConfig, {"max_html_chars": 1000}, "extract"), sample_removed=5)
    assert list(step(docs)) == []
    assert step.stats.dropped == {"no_text": 2, "too_large": 1}
    assert {r["id"] for r in step.removed.to_dict()["no_text"]} == {"empty", "blank"}


def _timeout_mix(sample_dir: Path) -> list[Document]:
    web = _web_docs(sample_dir)
    big = sorted(web, key=lambda d: -len(d.text))[:3]  # each takes far longer than 5 ms to extract
    return [big[0], Document("t1", "plain text", {"format": "text"}), big[1], big[2], Document("t2", "more text", {"format": "text"})]


@pytest.mark.parametrize("clock", ["cpu", "wall"])
def test_timeouts_are_counted_not_fatal(sample_dir, clock):
    step = ExtractStep(ExtractConfig(timeout_s=0.005, timeout_clock=clock))
    out = list(step(_timeout_mix(sample_dir)))
    assert [d.id for d in out] == ["t1", "t2"]  # the run goes on after each timeout
    assert step.stats.dropped["timeout"] == 3
    assert step.stats.counters["html_pages"] == 3


def test_timeouts_off_the_main_thread(sample_dir):
    """In a worker thread the limit is a watchdog thread, not a signal."""
    result = {}

    def work():
        step = ExtractStep(ExtractConfig(timeout_s=0.005))
        result["ids"] = [d.id for d in step(_timeout_mix(sample_dir))]
        result["stats"] = step.stats
        with time_limit(0.5):  # a block that finishes in time leaves no pending exception behind
            sum(range(1000))
        result["after"] = "ok"

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert result["ids"] == ["t1", "t2"] and result["stats"].dropped["timeout"] == 3 and result["after"] == "ok"


def test_time_limit_raises_and_disarms():
    with pytest.raises(ExtractionTimeout):
        with time_limit(0.01):
            while True:
                pass
    with time_limit(0.2):
        pass
    x = 0
    for i in range(200000):  # the disarmed timer must not fire later
        x += i
    assert x > 0


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="timeout_s"):
        C.build(ExtractConfig, {"timeout_s": -1}, "data.extract")
    with pytest.raises(ConfigError, match="data.extract.timout_s"):
        C.build(ExtractConfig, {"timout_s": 1}, "data.extract")
    with pytest.raises(ConfigError, match="timeout_clock"):
        C.build(ExtractConfig, {"timeout_clock": "cpu-ish"}, "data.extract")


def test_pipeline_builds_the_step():
    from lmforge.data.config import DataConfig
    from lmforge.data.pipeline import build_stream_steps

    cfg = C.build(DataConfig, {"extract": {"timeout_s": 2.5}}, "data")
    steps = dict((s.name, s) for _, s in build_stream_steps(cfg, 0))
    assert isinstance(steps["extract"], ExtractStep) and steps["extract"].cfg.timeout_s == 2.5


def test_cli_extract(sample_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = tmp_path / "pages.jsonl"
    args = parser.parse_args(["extract", str(sample_dir / "web" / "python-docs-sample.warc.gz"), "--limit", "3", "-o", str(out)])
    assert args.func(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["metadata"]["format"] == "text" and r["metadata"]["url"] for r in rows)
    assert "About this documentation" in rows[0]["text"] or "About these documents" in rows[0]["text"]
    printed = capsys.readouterr().out
    stats = json.loads(printed[printed.rindex("\n{") + 1 :])
    assert stats["name"] == "extract" and stats["docs_out"] == 3


def test_cli_extract_missing_file(tmp_path):
    from lmforge.errors import InputError

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["extract", str(tmp_path / "nope.warc.gz")])
    with pytest.raises(InputError, match="not found"):
        args.func(args)


def test_shared_crawl_pages_extract(shared_corpus):
    """A slice of the full crawl: every page yields text, none keeps the sidebar."""
    files = expand_inputs(parse_inputs([str(shared_corpus / "web" / "python-docs.warc.gz")]), Path)
    docs = [d for i, d in enumerate(read_file(files[0], ReadStats())) if i % 50 == 7 and len(d.text) < 150_000]
    step = ExtractStep(ExtractConfig(timeout_s=0))
    out = list(step(docs))
    assert len(out) == len(docs) >= 5
    assert not any(re.search(r"Previous topic|Show Source|Quick search", d.text) for d in out)
