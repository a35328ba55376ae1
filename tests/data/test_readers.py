"""Readers: every input format, metadata, ids, and damage of every kind counted and skipped."""

import gzip
import json
import logging

import pytest
import zstandard

from lmforge.data.readers import InputFile, ReadStats, detect_format, expand_inputs, parse_inputs, read_file
from lmforge.errors import ConfigError, InputError
from lmforge.log import logger


def warc_record(url: str, payload: bytes, *, wtype="response", ctype=b"text/html; charset=utf-8", status=b"200 OK", rid="1", extra=b"") -> bytes:
    if wtype == "response":
        block = b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\n" + extra + b"\r\n" + payload
        wct = b"application/http; msgtype=response"
    else:
        block, wct = payload, b"text/plain"
    head = (
        b"WARC/1.0\r\nWARC-Type: " + wtype.encode() + b"\r\nWARC-Record-ID: <urn:uuid:" + rid.encode() + b">\r\n"
        b"WARC-Date: 2024-03-01T00:00:00Z\r\nWARC-Target-URI: " + url.encode() + b"\r\nContent-Type: " + wct + b"\r\n"
        b"Content-Length: " + str(len(block)).encode() + b"\r\n\r\n"
    )
    return head + block + b"\r\n\r\n"


def gz_member(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def read_all(path, fmt=None, source="src", text_key="text"):
    f = InputFile(str(path), source, fmt or detect_format(str(path)), path.name, text_key=text_key)
    rs = ReadStats()
    return list(read_file(f, rs)), rs.stats


@pytest.fixture
def log_lines():
    lines = []

    class H(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    h = H()
    logger.addHandler(h)
    yield lines
    logger.removeHandler(h)


def test_sample_warc_metadata_and_ids(sample_dir):
    docs, st = read_all(sample_dir / "web" / "python-docs-sample.warc.gz", source="web")
    assert len(docs) == 90 and st.docs_out == 90 and not st.dropped
    d = docs[0]
    assert d.metadata["format"] == "html" and d.metadata["source"] == "web"
    assert d.metadata["url"].startswith("https://docs.python.org/3.11/")
    assert d.metadata["domain"] == "docs.python.org" and d.metadata["date"] == "2024-03-01T00:00:00Z"
    assert "<html" in d.text
    assert len({x.id for x in docs}) == 90 and d.id == "web/python-docs-sample.warc.gz#0"
    again, _ = read_all(sample_dir / "web" / "python-docs-sample.warc.gz", source="web")
    assert [x.id for x in again] == [x.id for x in docs]


def test_warc_gz_damage_is_counted_located_and_skipped(tmp_path, log_lines):
    good = [warc_record(f"https://a.example/{i}", f"<p>page {i}</p>".encode(), rid=str(i)) for i in range(4)]
    members = [gz_member(good[0]), gz_member(good[1])]
    bad = bytearray(gz_member(warc_record("https://a.example/x", b"<p>" + b"lost " * 200 + b"</p>")))
    bad[20:40] = b"\xff" * 20  # corrupt deflate data inside a valid gzip header
    garbage = b"this is not gzip at all" * 3
    truncated = gz_member(good[3])[:-30]
    data = members[0] + bytes(bad) + members[1] + garbage + gz_member(good[2]) + truncated
    p = tmp_path / "crawl.warc.gz"
    p.write_bytes(data)
    docs, st = read_all(p)
    assert [d.text.strip() for d in docs] == ["<p>page 0</p>", "<p>page 1</p>", "<p>page 2</p>"]
    assert st.dropped["corrupt:corrupt_gzip"] == 1
    assert st.dropped["corrupt:not_gzip"] == 1
    assert st.dropped["corrupt:truncated"] == 1
    off_bad = len(members[0])
    assert any(f"{p}:{off_bad}" in line for line in log_lines), log_lines
    assert all(str(p) in line for line in log_lines if "corrupt" in line)


def test_plain_warc_garbage_bad_header_truncation_and_wet(tmp_path):
    wet = warc_record("https://b.example/t", "plain text ü".encode(), wtype="conversion", rid="w")
    latin = warc_record("https://b.example/l", "caf\xe9".encode("latin-1"), ctype=b"text/html; charset=iso-8859-1")
    meta = warc_record("https://b.example/m", b'<meta charset="windows-1252"><p>\x93hi\x94</p>', ctype=b"text/html")
    broken_utf8 = warc_record("https://b.example/u", b"<p>ok \xff\xfe bad</p>")
    not_found = warc_record("https://b.example/404", b"nope", status=b"404 Not Found")
    image = warc_record("https://b.example/i.png", b"\x89PNG", ctype=b"image/png")
    request = warc_record("https://b.example/r", b"GET / HTTP/1.1\r\n\r\n", wtype="request")
    bad_len = b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: many\r\n\r\nxx\r\n\r\n"
    chunked = warc_record("https://b.example/ch", b"4\r\n<p>c\r\n6\r\nhunked\r\n0\r\n\r\n", extra=b"Transfer-Encoding: chunked\r\n")
    zipped = warc_record("https://b.example/gz", gzip.compress(b"<p>zipped</p>"), extra=b"Content-Encoding: gzip\r\n")
    bad_zip = warc_record("https://b.example/bz", b"not gzip", extra=b"Content-Encoding: gzip\r\n")
    cut = warc_record("https://b.example/cut", b"<p>" + b"x" * 500 + b"</p>")[:-300]
    data = b"junk before\r\n" + wet + latin + meta + bad_len + broken_utf8 + not_found + image + request + chunked + zipped + bad_zip + cut
    p = tmp_path / "c.warc"
    p.write_bytes(data)
    docs, st = read_all(p)
    by_url = {d.metadata["url"]: d for d in docs}
    assert by_url["https://b.example/t"].metadata["format"] == "text" and by_url["https://b.example/t"].text.startswith("plain text ü")
    assert "café" in by_url["https://b.example/l"].text
    assert "\u201chi\u201d" in by_url["https://b.example/m"].text
    assert "\ufffd" in by_url["https://b.example/u"].text
    assert by_url["https://b.example/ch"].text == "<p>chunked" and by_url["https://b.example/gz"].text == "<p>zipped</p>"
    assert set(by_url) == {"https://b.example/t", "https://b.example/l", "https://b.example/m", "https://b.example/u",
                           "https://b.example/ch", "https://b.example/gz"}
    assert st.counters["decoded_with_replacement"] == 1
    assert st.counters["skipped:http_status"] == 1 and st.counters["skipped:content_type"] == 1
    assert st.counters["skipped:warc_request"] == 1
    assert st.dropped["corrupt:garbage"] == 1 and st.dropped["corrupt:bad_header"] == 1 and st.dropped["corrupt:truncated"] == 1
    assert st.dropped["corrupt:bad_http"] == 1


def test_jsonl_damage_and_fields(tmp_path, log_lines):
    lines = [
        json.dumps({"id": "a", "body": "first", "lang": "en", "url": "https://www.Example.org/x"}).encode(),
        b'{"id": "b", "body": "half',
        b"\xff\xfe not utf8",
        b"[1, 2]",
        json.dumps({"id": "c", "other": "no body"}).encode(),
        b"",
        json.dumps({"id": "d", "body": "last"}).encode(),
    ]
    raw = b"\n".join(lines) + b"\n"
    for name, blob in [("x.jsonl", raw), ("x.jsonl.gz", gzip.compress(raw)), ("x.jsonl.zst", zstandard.ZstdCompressor().compress(raw))]:
        p = tmp_path / name
        p.write_bytes(blob)
        docs, st = read_all(p, text_key="body")
        assert [d.text for d in docs] == ["first", "last"]
        assert docs[0].metadata == {"orig_id": "a", "lang": "en", "url": "https://www.Example.org/x", "source": "src",
                                    "domain": "example.org", "format": "text"}
        assert docs[1].id == f"src/{name}#6"
        assert st.dropped == {"corrupt:bad_json": 2, "corrupt:bad_utf8": 1, "corrupt:no_text": 1}
    assert any(f"{tmp_path / 'x.jsonl'}:2" in line for line in log_lines)
    assert any(f"{tmp_path / 'x.jsonl'}:3" in line for line in log_lines)


def test_truncated_compressed_jsonl_keeps_what_was_read(tmp_path):
    raw = "".join(json.dumps({"text": f"doc {i} " + "w" * 50}) + "\n" for i in range(6000)).encode()
    for name, blob in [("t.jsonl.gz", gzip.compress(raw)), ("t.jsonl.zst", zstandard.ZstdCompressor().compress(raw))]:
        p = tmp_path / name
        p.write_bytes(blob[: len(blob) * 2 // 3])
        docs, st = read_all(p)
        assert 0 < len(docs) < 6000
        assert st.dropped["corrupt:truncated"] == 1
        assert [d.text.split()[1] for d in docs] == [str(i) for i in range(len(docs))]


def test_parquet_good_corrupt_and_missing_column(tmp_path, sample_dir):
    docs, st = read_all(sample_dir / "code" / "python-stdlib-sample.parquet", source="code")
    assert len(docs) == 60 and docs[0].metadata["lang"] == "python" and "path" in docs[0].metadata
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1" + b"\x00garbage" * 50)
    docs, st = read_all(bad)
    assert docs == [] and st.dropped["corrupt:corrupt_parquet"] == 1
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "nocol.parquet")
    with pytest.raises(InputError, match="no column 'text'"):
        read_all(tmp_path / "nocol.parquet")
    docs, _ = read_all(tmp_path / "nocol.parquet", text_key="content")
    assert [d.text for d in docs] == ["a", "b"]


def test_text_directory(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("alpha")
    (root / "sub" / "b.md").write_text("beta")
    (root / ".hidden.txt").write_text("no")
    (root / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    docs, st = read_all(root, fmt="text")
    assert [(d.text, d.metadata["path"]) for d in docs] == [("alpha", "a.txt"), ("beta", "sub/b.md")]
    assert st.dropped["corrupt:bad_utf8"] == 1
    assert docs[1].id == "src/texts/sub/b.md"


@pytest.mark.parametrize("name", ["e.warc.gz", "e.warc", "e.jsonl", "e.jsonl.gz", "e.jsonl.zst", "e.parquet"])
def test_empty_files_give_no_documents_and_no_errors(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"")
    docs, st = read_all(p)
    assert docs == [] and not st.dropped


def test_expand_inputs_errors_and_defaults(tmp_path):
    (tmp_path / "web").mkdir()
    (tmp_path / "web" / "a.jsonl").write_text("")
    (tmp_path / "web" / "b.jsonl").write_text("")
    specs = parse_inputs(["web/*.jsonl", {"path": "web/a.jsonl", "source": "again"}])
    files = expand_inputs(specs, lambda p: tmp_path / p)
    assert [(f.name, f.source, f.format) for f in files] == [("a.jsonl", "web", "jsonl"), ("b.jsonl", "web", "jsonl"), ("a.jsonl", "again", "jsonl")]
    with pytest.raises(InputError, match="matches no file"):
        expand_inputs(parse_inputs(["nope/*.warc.gz"]), lambda p: tmp_path / p)
    with pytest.raises(InputError, match="same file name"):
        expand_inputs(parse_inputs(["web/a.jsonl", "web/a.jsonl"]), lambda p: tmp_path / p)
    with pytest.raises(ConfigError, match=r"data\.inputs\[1\]\.sorce"):
        parse_inputs(["a.jsonl", {"path": "b.jsonl", "sorce": "x"}])
    with pytest.raises(ConfigError, match=r"data\.inputs\[0\]"):
        parse_inputs([3])
    (tmp_path / "odd.bin").write_text("")
    with pytest.raises(InputError, match="cannot tell the format"):
        expand_inputs(parse_inputs(["odd.bin"]), lambda p: tmp_path / p)
