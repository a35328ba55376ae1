"""Corpus shards: `*.jsonl.zst`, one JSON object per line: {"id", "text", "metadata"}.

Written atomically (temp name + rename), read back as Documents. This is the format the
data stage writes to `corpus/` and every later stage reads.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterable, Iterator

import zstandard

from lmforge.data.document import Document
from lmforge.rundir import atomic_file

SHARD_GLOB = "*.jsonl.zst"


def write_shard(path: str | Path, docs: Iterable[Document], level: int = 3) -> tuple[int, int]:
    """Write documents to a .jsonl.zst shard atomically. Returns (documents, characters)."""
    n = chars = 0
    with atomic_file(path, "wb") as raw:
        cctx = zstandard.ZstdCompressor(level=level)
        with cctx.stream_writer(raw, closefd=False) as zw:
            w = io.TextIOWrapper(zw, encoding="utf-8", write_through=False)
            for d in docs:
                w.write(d.to_json())
                w.write("\n")
                n += 1
                chars += len(d.text)
            w.flush()
            w.detach()
    return n, chars


def iter_shard(path: str | Path) -> Iterator[Document]:
    with open(path, "rb") as raw:
        r = zstandard.ZstdDecompressor().stream_reader(raw)
        for line in io.TextIOWrapper(r, encoding="utf-8"):
            if line.strip():
                yield Document.from_dict(json.loads(line))


def list_shards(corpus_dir: str | Path) -> list[Path]:
    return sorted(Path(corpus_dir).glob(SHARD_GLOB))


def iter_corpus(corpus_dir: str | Path) -> Iterator[Document]:
    """All documents of a corpus directory, shard by shard in name order."""
    for p in list_shards(corpus_dir):
        yield from iter_shard(p)
