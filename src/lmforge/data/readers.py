"""Readers: raw input files -> Documents.

Formats (chosen by file name, or the input's `format`):

- WARC / WET: `.warc`, `.warc.gz` (one gzip member per record, as Common Crawl ships, or one
  gzip stream for the whole file). `response` records carrying HTML become documents with
  metadata format "html" (decoded with the HTTP charset, else the `<meta charset>`, else
  UTF-8 with replacement characters, which are counted); `conversion` records (WET) and
  plain-text responses become format "text". URL (WARC-Target-URI) and crawl date
  (WARC-Date) go to metadata.
- JSONL: `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (also `.json*`): the input's `text_key` field
  is the text, every other field goes to metadata (an `id` field is kept as `orig_id`).
- Parquet: read in record batches with pyarrow; same field rules as JSONL.
- A directory: every regular, non-hidden file under it matching the input's `pattern` is
  one text document.

Damage is never fatal: a truncated or corrupt record, bad UTF-8 or a malformed JSON line is
counted in `ReadStats.dropped` under its kind, logged with its location (`file:line` or
`file:offset`), and skipped; the rest of the file is still read where possible.

Document ids are `<source>/<file name>#<record index>`: stable across runs and machines and
unique as long as (source, file name) pairs are unique, which `expand_inputs` checks.
"""

from __future__ import annotations

import glob as globmod
import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal
from urllib.parse import urlsplit

from lmforge.config import build
from lmforge.data.document import Document
from lmforge.data.step import StepStats
from lmforge.errors import ConfigError, InputError
from lmforge.log import logger

Format = Literal["auto", "warc", "jsonl", "parquet", "text"]
MAX_LOGGED_PER_FILE = 10  # corrupt records logged one line each, then one summary line per file


@dataclass
class InputSpec:
    """One entry of `[data] inputs`: a path or glob plus how to read it."""

    path: str = ""
    source: str = ""  # name in metadata["source"] and stats; default: the path's parent directory name
    skip: list[str] = field(default_factory=list)  # pipeline steps (or groups) that do not apply
    format: Format = "auto"
    text_key: str = "text"  # JSONL / Parquet field holding the text
    pattern: str = "**/*"  # for directories of text files: which files to read

    def validate(self) -> None:
        if not self.path:
            raise ValueError("input needs a 'path'")


@dataclass
class InputFile:
    """One concrete file (or text directory) to read, with its input's settings."""

    path: str
    source: str
    format: str  # warc | jsonl | parquet | text
    name: str  # unique-per-source name used in document ids
    skip: list[str] = field(default_factory=list)
    text_key: str = "text"
    pattern: str = "**/*"
    size: int = 0


def parse_inputs(inputs: list[Any]) -> list[InputSpec]:
    """Validate `[data] inputs` (strings or tables) into InputSpecs; errors name the entry."""
    specs = []
    for i, item in enumerate(inputs):
        where = f"data.inputs[{i}]"
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise ConfigError(f"{where} must be a path string or a table {{path=..., source=...}}, got {item!r}")
        spec = build(InputSpec, item, where)
        if not spec.source:
            p = Path(spec.path)
            spec.source = p.parent.name if p.parent.name and "*" not in p.parent.name else p.name.split(".")[0]
        specs.append(spec)
    return specs


def detect_format(path: str) -> str:
    n = path.lower()
    if os.path.isdir(path):
        return "text"
    if re.search(r"\.(warc|wet|arc)(\.gz)?$", n):
        return "warc"
    if re.search(r"\.(jsonl|json|ndjson)(\.gz|\.zst|\.zstd)?$", n):
        return "jsonl"
    if n.endswith(".parquet"):
        return "parquet"
    if re.search(r"\.(txt|md|text)$", n):
        return "text"
    raise InputError(f"{path}: cannot tell the format from the name; set format = warc|jsonl|parquet|text for this input")


def expand_inputs(specs: list[InputSpec], resolve: Callable[[str], Path]) -> list[InputFile]:
    """Expand globs into concrete files in a stable order. A path matching nothing is an InputError."""
    files: list[InputFile] = []
    seen: dict[tuple[str, str], str] = {}
    for spec in specs:
        full = str(resolve(spec.path))
        paths = sorted(globmod.glob(full, recursive=True)) if globmod.has_magic(full) else [full]
        paths = [p for p in paths if os.path.exists(p)]
        if not paths:
            raise InputError(f"input {spec.path!r} (resolved to {full}) matches no file")
        for p in paths:
            fmt = spec.format if spec.format != "auto" else detect_format(p)
            name = os.path.basename(os.path.normpath(p))
            key = (spec.source, name)
            if key in seen:
                raise InputError(
                    f"inputs {seen[key]} and {p} have the same file name under source {spec.source!r}; "
                    "document ids would collide: give them different `source` names"
                )
            seen[key] = p
            size = os.path.getsize(p) if os.path.isfile(p) else 0
            files.append(InputFile(p, spec.source, fmt, name, list(spec.skip), spec.text_key, spec.pattern, size))
    return files


# --------------------------------------------------------------------------------------------
# damage accounting


class ReadStats:
    """Counts of documents read and records skipped; corrupt ones are logged with their location."""

    def __init__(self) -> None:
        self.stats = StepStats("read")
        self._logged: dict[str, int] = {}

    def doc(self, d: Document) -> Document:
        self.stats.docs_in += 1
        self.stats.docs_out += 1
        n = len(d.text)
        self.stats.chars_in += n
        self.stats.chars_out += n
        return d

    def bad(self, kind: str, location: str, detail: str = "") -> None:
        """A corrupt record: counted under `corrupt:<kind>`, logged with its location, skipped."""
        self.stats.docs_in += 1
        self.stats.dropped[f"corrupt:{kind}"] += 1
        file = location.rsplit(":", 1)[0]
        n = self._logged.get(file, 0)
        self._logged[file] = n + 1
        if n < MAX_LOGGED_PER_FILE:
            logger.warning("skipped corrupt record (%s) at %s%s", kind, location, f": {detail}" if detail else "")
        elif n == MAX_LOGGED_PER_FILE:
            logger.warning("%s: more corrupt records; further ones are only counted (see stats.json)", file)

    def count(self, key: str, n: int = 1) -> None:
        self.stats.counters[key] += n


def domain_of(url: str) -> str:
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return ""
    return host.lower().removeprefix("www.")


def _make_doc(f: InputFile, index: int, text: str, meta: dict) -> Document:
    meta["source"] = f.source
    url = meta.get("url")
    if isinstance(url, str) and url and "domain" not in meta:
        d = domain_of(url)
        if d:
            meta["domain"] = d
    meta.setdefault("format", "text")
    return Document(f"{f.source}/{f.name}#{index}", text, meta)


def read_file(f: InputFile, rs: ReadStats, keep: Callable[[int], bool] | None = None) -> Iterator[Document]:
    """Documents of one input file. `keep(record_index)` selects a slice of the records."""
    keep = keep or (lambda i: True)
    reader = {"warc": read_warc, "jsonl": read_jsonl, "parquet": read_parquet, "text": read_text_dir}[f.format]
    yield from reader(f, rs, keep)


# --------------------------------------------------------------------------------------------
# WARC


_GZIP_MAGIC = b"\x1f\x8b\x08"


class _GzipMembers:
    """Decompressed bytes of a (multi-member) gzip file, with recovery from damaged members.

    `read_chunk()` returns the next decompressed bytes, b"" at the end, or None when a member
    turned out damaged (then `error` holds (kind, compressed offset, message)): reading
    resumes at the next gzip header in the file. `member_offset(pos)` gives the compressed
    offset of the member holding decompressed position `pos`, for messages.
    """

    CHUNK = 1 << 20

    def __init__(self, fh):
        self.fh = fh
        self.cbuf = b""  # compressed bytes not yet consumed
        self.cpos = 0  # file offset of cbuf[0]
        self.dpos = 0  # decompressed bytes handed out so far
        self.members: list[tuple[int, int]] = []  # (decompressed start, compressed start), recent ones
        self.d = None
        self.eof = False
        self.error: tuple[str, int, str] | None = None

    def _more(self) -> bool:
        data = self.fh.read(self.CHUNK)
        if not data:
            return False
        self.cbuf += data
        return True

    def member_offset(self, pos: int) -> int:
        off = 0
        for dstart, cstart in self.members:
            if dstart <= pos:
                off = cstart
            else:
                break
        return off

    def forget_before(self, pos: int) -> None:
        while len(self.members) > 1 and self.members[1][0] <= pos:
            self.members.pop(0)

    def read_chunk(self) -> bytes | None:
        while not self.eof:
            if self.d is None:
                while len(self.cbuf) < 3 and self._more():
                    pass
                if not self.cbuf:
                    self.eof = True
                    return b""
                if not self.cbuf.startswith(_GZIP_MAGIC):
                    start = self.cpos
                    self._resync()
                    self.error = ("not_gzip", start, "bytes that are not a gzip member")
                    return None
                self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
                self.members.append((self.dpos, self.cpos))
            if not self.cbuf and not self._more():
                self.d = None
                self.eof = True
                self.error = ("truncated", self.members[-1][1], "file ends inside a gzip member")
                return None
            try:
                out = self.d.decompress(self.cbuf, self.CHUNK * 4)
            except zlib.error as e:
                start = self.members[-1][1]
                self.d = None
                self.cbuf, self.cpos = self.cbuf[1:], self.cpos + 1  # step past this member's header
                self._resync()
                self.error = ("corrupt_gzip", start, str(e))
                return None
            if self.d.eof:
                rest = self.d.unused_data
                self.d = None
            else:
                rest = self.d.unconsumed_tail
            used = len(self.cbuf) - len(rest)
            self.cbuf, self.cpos = self.cbuf[used:], self.cpos + used
            if out:
                self.dpos += len(out)
                return out
        return b""

    def _resync(self) -> None:
        """Skip to the next gzip header in the file (or its end)."""
        while True:
            i = self.cbuf.find(_GZIP_MAGIC)
            if i >= 0:
                self.cbuf, self.cpos = self.cbuf[i:], self.cpos + i
                return
            keep = self.cbuf[-2:]
            self.cpos += len(self.cbuf) - len(keep)
            self.cbuf = keep
            if not self._more():
                self.cbuf, self.cpos = b"", self.cpos + len(keep)
                return


_CHARSET_HTTP = re.compile(rb"charset\s*=\s*[\"']?([A-Za-z0-9_.:-]+)", re.I)
_CHARSET_META = re.compile(rb"<meta[^>]+charset\s*=\s*[\"']?\s*([A-Za-z0-9_.:-]+)", re.I)


def _decode_html(body: bytes, content_type: bytes, rs: ReadStats) -> str:
    m = _CHARSET_HTTP.search(content_type) or _CHARSET_META.search(body[:4096])
    enc = m.group(1).decode("ascii", "replace").lower() if m else "utf-8"
    try:
        return body.decode(enc)
    except LookupError:
        rs.count("unknown_charset")
        enc = "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        return body.decode(enc)
    except UnicodeDecodeError:
        rs.count("decoded_with_replacement")
        return body.decode(enc, errors="replace")


def _parse_headers(block: bytes) -> dict[str, bytes]:
    h = {}
    for line in block.split(b"\r\n" if b"\r\n" in block else b"\n"):
        k, sep, v = line.partition(b":")
        if sep:
            h[k.strip().decode("latin-1").lower()] = v.strip()
    return h


def _find_record_start(buf: bytes, frm: int = 0) -> int:
    i = buf.find(b"WARC/", frm)
    while i > 0 and buf[i - 1] != 0x0A:
        i = buf.find(b"WARC/", i + 1)
    return i


def _header_end(buf: bytes) -> tuple[int, int]:
    a, b = buf.find(b"\r\n\r\n"), buf.find(b"\n\n")
    if a >= 0 and (b < 0 or a < b):
        return a, 4
    return b, 2


def _warc_records(f: InputFile, rs: ReadStats) -> Iterator[tuple[int, str, dict[str, bytes], bytes]]:
    """Yield (record index, location, WARC headers, content block) for every intact record.

    Locations are `file:offset` with the compressed offset of the record's gzip member
    (plain .warc: the byte offset of the record)."""
    path = f.path
    with open(path, "rb") as fh:
        src = _GzipMembers(fh) if path.lower().endswith(".gz") else None
        read = src.read_chunk if src else (lambda: fh.read(1 << 20))
        buf = b""
        base = 0  # stream offset of buf[0]
        index = 0
        eof = False
        garbage_at = -1  # where unparseable bytes started, reported once when the next record shows up

        def where(pos: int) -> str:
            return f"{path}:{src.member_offset(pos) if src else pos}"

        def pull() -> None:
            """Read more; on a damaged gzip member drop any partial record (counted once)."""
            nonlocal buf, base, eof, garbage_at
            chunk = read()
            if chunk is None:
                kind, off, msg = src.error
                if buf.strip(b"\r\n"):
                    rs.bad(kind, where(base), msg)
                else:
                    rs.bad(kind, f"{path}:{off}", msg)
                base += len(buf)
                buf = b""
                garbage_at = -1
            elif not chunk:
                eof = True
            else:
                buf += chunk

        while True:
            # 1. the next record's header block
            while True:
                start = _find_record_start(buf)
                if start < 0:
                    junk = buf[:-5] if not eof else buf
                    if junk.strip(b"\r\n\x00 ") and garbage_at == -1:
                        garbage_at = base
                    buf, base = buf[len(junk):], base + len(junk)
                else:
                    if buf[:start].strip(b"\r\n\x00 ") and garbage_at == -1:
                        garbage_at = base
                    buf, base = buf[start:], base + start
                    if _header_end(buf)[0] >= 0:
                        break
                if eof:
                    break
                pull()
            if garbage_at >= 0:
                rs.bad("garbage", where(garbage_at), "bytes that are not a WARC record")
            garbage_at = -1
            if not buf.strip():
                return
            hend, sep = _header_end(buf)
            if hend < 0:
                rs.bad("truncated", where(base), "file ends inside WARC headers")
                return
            headers = _parse_headers(buf[:hend])
            rec_pos = base
            try:
                length = int(headers.get("content-length", b""))
            except ValueError:
                rs.bad("bad_header", where(rec_pos), "missing or bad Content-Length")
                buf, base = buf[hend + sep :], base + hend + sep
                garbage_at = -2  # what follows up to the next record belongs to this one: counted already
                index += 1
                continue
            # 2. its content block
            need = hend + sep + length
            while len(buf) < need and not eof:
                b0 = base
                pull()
                if base != b0:  # the member holding this record was damaged; already counted
                    break
            if base != rec_pos:
                index += 1
                continue
            if len(buf) < need:
                rs.bad("truncated", where(rec_pos), f"record needs {length} content bytes, the file ends first")
                return
            body = buf[hend + sep : need]
            buf, base = buf[need:], base + need
            if src:
                src.forget_before(base)
            yield index, where(rec_pos), headers, body
            index += 1


def _dechunk(data: bytes) -> bytes:
    out, i = [], 0
    while True:
        j = data.find(b"\r\n", i)
        if j < 0:
            raise ValueError("chunk size line missing")
        size = int(data[i:j].split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return b"".join(out)
        out.append(data[j + 2 : j + 2 + size])
        if len(out[-1]) < size:
            raise ValueError("chunk cut short")
        i = j + 2 + size + 2


def _http_decode(payload: bytes, http: dict[str, bytes]) -> bytes:
    """Undo `Transfer-Encoding: chunked` and `Content-Encoding: gzip/deflate` when a crawler
    stored the payload as sent (Common Crawl stores it decoded already)."""
    if b"chunked" in http.get("transfer-encoding", b"").lower():
        payload = _dechunk(payload)
    enc = http.get("content-encoding", b"").lower().strip()
    if enc in (b"gzip", b"x-gzip"):
        payload = zlib.decompress(payload, 16 + zlib.MAX_WBITS)
    elif enc == b"deflate":
        try:
            payload = zlib.decompress(payload)
        except zlib.error:
            payload = zlib.decompress(payload, -zlib.MAX_WBITS)
    return payload


def read_warc(f: InputFile, rs: ReadStats, keep: Callable[[int], bool]) -> Iterator[Document]:
    for index, loc, h, body in _warc_records(f, rs):
        if not keep(index):
            continue
        wtype = h.get("warc-type", b"").decode("latin-1").lower()
        meta: dict[str, Any] = {}
        if uri := h.get("warc-target-uri"):
            meta["url"] = uri.decode("utf-8", "replace").strip("<>")
        if date := h.get("warc-date"):
            meta["date"] = date.decode("latin-1")
        if rid := h.get("warc-record-id"):
            meta["warc_record_id"] = rid.decode("latin-1").strip("<>")
        if wtype == "response":
            if not h.get("content-type", b"").lower().startswith(b"application/http"):
                rs.count("skipped:non_http_response")
                continue
            hend = body.find(b"\r\n\r\n")
            sep = 4
            if hend < 0:
                hend, sep = body.find(b"\n\n"), 2
            if hend < 0:
                rs.bad("bad_http", loc, "no end of HTTP headers")
                continue
            status = body[: body.find(b"\n")].split()
            http = _parse_headers(body[:hend])
            payload = body[hend + sep :]
            if len(status) < 2 or status[1] != b"200":
                rs.count("skipped:http_status")
                continue
            ctype = http.get("content-type", b"text/html")
            low = ctype.lower()
            if b"html" in low:
                meta["format"] = "html"
            elif low.startswith(b"text/plain"):
                meta["format"] = "text"
            else:
                rs.count("skipped:content_type")
                continue
            try:
                payload = _http_decode(payload, http)
            except (ValueError, zlib.error) as e:
                rs.bad("bad_http", loc, f"cannot undo the HTTP transfer/content encoding: {e}")
                continue
            text = _decode_html(payload, ctype, rs)
        elif wtype == "conversion":  # WET: already plain text
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                rs.bad("bad_utf8", loc, "WET record is not UTF-8")
                continue
            meta["format"] = "text"
        else:
            rs.count(f"skipped:warc_{wtype or 'untyped'}")
            continue
        yield rs.doc(_make_doc(f, index, text, meta))


# --------------------------------------------------------------------------------------------
# JSONL


class _ZstdStream:
    """Decompressed bytes of a (multi-frame) .zst file; raises EOFError if the file ends
    inside a frame (zstandard's stream reader reports a cut file as a clean end)."""

    def __init__(self, raw):
        import zstandard

        self.raw = raw
        self.dctx = zstandard.ZstdDecompressor()
        self.d = None
        self.pending = b""
        self.started = False

    def read(self, n: int) -> bytes:
        while True:
            if self.pending:
                out, self.pending = self.pending[:n], self.pending[n:]
                return out
            data = self.raw.read(1 << 16)
            if not data:
                if self.d is not None and self.started:
                    raise EOFError("file ends inside a zstd frame")
                return b""
            while data:
                if self.d is None:
                    self.d, self.started = self.dctx.decompressobj(), False
                self.pending += self.d.decompress(data)
                self.started = True
                if self.d.eof:
                    data = self.d.unused_data
                    self.d = None
                else:
                    data = b""

    def close(self) -> None:
        pass


def _open_compressed(path: str):
    low = path.lower()
    raw = open(path, "rb")
    if low.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    if low.endswith((".zst", ".zstd")):
        return _ZstdStream(raw), raw
    return raw, raw


def _fields_to_doc(f: InputFile, index: int, rec: dict, rs: ReadStats, loc: str) -> Document | None:
    text = rec.get(f.text_key)
    if not isinstance(text, str):
        rs.bad("no_text", loc, f"field {f.text_key!r} missing or not a string")
        return None
    inner = rec.get("metadata")
    meta = dict(inner) if isinstance(inner, dict) else {}  # a record that is already a Document
    meta.pop("source", None)
    for k, v in rec.items():
        if k == f.text_key or (k == "metadata" and isinstance(v, dict)):
            continue
        meta[{"id": "orig_id", "source": "orig_source"}.get(k, k)] = v
    return _make_doc(f, index, text, meta)


def _lines(stream, on_damage: Callable[[int, str], None]) -> Iterator[bytes]:
    """Lines of a (decompressing) byte stream; a damaged/truncated stream ends with a call to
    `on_damage(next line number, message)` after every complete line before it was yielded."""
    import zstandard

    pending = b""
    lineno = 0
    while True:
        try:
            chunk = stream.read(1 << 16)
        except (EOFError, OSError, zlib.error, zstandard.ZstdError) as e:
            on_damage(lineno + 1, f"compressed stream ends or is damaged: {e}")
            return
        if not chunk:
            if pending:
                yield pending
            return
        pending += chunk
        parts = pending.split(b"\n")
        pending = parts.pop()
        for line in parts:
            lineno += 1
            yield line


def read_jsonl(f: InputFile, rs: ReadStats, keep: Callable[[int], bool]) -> Iterator[Document]:
    stream, raw = _open_compressed(f.path)
    try:
        lines = _lines(stream, lambda n, msg: rs.bad("truncated", f"{f.path}:{n}", msg))
        for lineno, line in enumerate(lines, 1):
            if not keep(lineno - 1) or not line.strip():
                continue
            loc = f"{f.path}:{lineno}"
            try:
                s = line.decode("utf-8")
            except UnicodeDecodeError as e:
                rs.bad("bad_utf8", loc, str(e))
                continue
            try:
                rec = json.loads(s)
            except json.JSONDecodeError as e:
                rs.bad("bad_json", loc, str(e))
                continue
            if not isinstance(rec, dict):
                rs.bad("bad_json", loc, "line is not a JSON object")
                continue
            d = _fields_to_doc(f, lineno - 1, rec, rs, loc)
            if d is not None:
                yield rs.doc(d)
    finally:
        stream.close()
        raw.close()


# --------------------------------------------------------------------------------------------
# Parquet


def read_parquet(f: InputFile, rs: ReadStats, keep: Callable[[int], bool], batch_size: int = 1024) -> Iterator[Document]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if os.path.getsize(f.path) == 0:
        return
    try:
        pf = pq.ParquetFile(f.path)
    except (pa.ArrowException, OSError) as e:
        rs.bad("corrupt_parquet", f"{f.path}:0", str(e))
        return
    if f.text_key not in pf.schema_arrow.names:
        raise InputError(f"{f.path}: no column {f.text_key!r} (columns: {', '.join(pf.schema_arrow.names)}); set text_key for this input")
    row = 0
    for rg in range(pf.num_row_groups):
        try:
            batches = list(pf.iter_batches(batch_size=batch_size, row_groups=[rg]))
        except (pa.ArrowException, OSError) as e:
            n = pf.metadata.row_group(rg).num_rows
            rs.bad("corrupt_parquet", f"{f.path}:row_group{rg}", f"{n} rows lost: {e}")
            row += n
            continue
        for batch in batches:
            for rec in batch.to_pylist():
                i = row
                row += 1
                if not keep(i):
                    continue
                d = _fields_to_doc(f, i, rec, rs, f"{f.path}:row{i}")
                if d is not None:
                    yield rs.doc(d)


# --------------------------------------------------------------------------------------------
# directories of text files


def read_text_dir(f: InputFile, rs: ReadStats, keep: Callable[[int], bool]) -> Iterator[Document]:
    root = Path(f.path)
    files = [root] if root.is_file() else sorted(
        p for p in root.glob(f.pattern) if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    for i, p in enumerate(files):
        if not keep(i):
            continue
        rel = p.name if root.is_file() else p.relative_to(root).as_posix()
        try:
            text = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            rs.bad("bad_utf8", f"{p}:{e.start}", "file is not UTF-8")
            continue
        except OSError as e:
            rs.bad("unreadable", f"{p}:0", str(e))
            continue
        meta = {"path": rel}
        d = _make_doc(f, i, text, meta)
        if not root.is_file():
            d.id = f"{f.source}/{f.name}/{rel}"
        yield rs.doc(d)
