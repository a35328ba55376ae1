"""Reading the data stage's corpus shards for the tokenizer: tolerant of corrupt records.

A line that is not valid JSON / UTF-8 or lacks `text` is counted, logged once with its
location (shard:line) and skipped; a truncated zstd stream ends that shard (counted too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import zstandard

from lmforge.data.corpus_io import list_shards
from lmforge.errors import InputError
from lmforge.log import log_once


@dataclass(slots=True)
class Doc:
    id: str
    text: str
    source: str


@dataclass
class ReadStats:
    docs: int = 0
    corrupt: int = 0


def corpus_shards(corpus_dir: str | Path) -> list[Path]:
    d = Path(corpus_dir)
    if not d.is_dir():
        raise InputError(f"corpus directory not found: {d} (run the data stage first, or set tokenizer.corpus)")
    shards = list_shards(d)
    if not shards:
        raise InputError(f"no corpus shards (*.jsonl.zst) in {d} (run the data stage first, or set tokenizer.corpus)")
    return shards


def _lines(path: Path) -> Iterator[bytes]:
    """Lines of a (multi-frame) zstd file; raises zstandard.ZstdError if the last frame is cut short."""
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    fed = False  # bytes given to the current frame's decompressor
    pending = b""
    with open(path, "rb") as raw:
        while chunk := raw.read(1 << 20):
            while chunk:
                fed = True
                pending += dobj.decompress(chunk)
                if dobj.eof:  # frame finished: the rest of the chunk starts the next frame
                    chunk = dobj.unused_data
                    dobj, fed = dctx.decompressobj(), False
                else:
                    chunk = b""
                *lines, pending = pending.split(b"\n")
                yield from lines
    if fed:
        raise zstandard.ZstdError("unexpected end of file (the last zstd frame is incomplete)")
    if pending:
        yield pending


def iter_docs(path: str | Path, stats: ReadStats | None = None) -> Iterator[Doc]:
    """Documents of one .jsonl.zst shard; corrupt lines are counted in `stats` and skipped."""
    stats = stats if stats is not None else ReadStats()
    path = Path(path)
    lineno = 0
    try:
        for line in _lines(path):
            lineno += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text = obj["text"]
                if not isinstance(text, str):
                    raise TypeError("text is not a string")
                meta = obj.get("metadata") or {}
                source = str(meta.get("source") or "unknown") if isinstance(meta, dict) else "unknown"
                doc = Doc(str(obj.get("id", f"{path.name}:{lineno}")), text, source)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                stats.corrupt += 1
                log_once(f"tok-corrupt:{path}", f"{path}:{lineno}: corrupt record skipped ({type(e).__name__}: {e}); further ones in this shard are counted silently")
                continue
            stats.docs += 1
            yield doc
    except zstandard.ZstdError as e:
        stats.corrupt += 1
        log_once(f"tok-zstd:{path}", f"{path}: truncated or corrupt zstd stream after line {lineno} ({e}); rest of shard skipped")
    except OSError as e:
        stats.corrupt += 1
        log_once(f"tok-io:{path}", f"{path}: cannot read ({e}); shard skipped")
