"""What the dedup passes share: reading shard records, the per-document keep/drop writer,
merging per-task results, saving arrays, and splitting the 64-bit key space.

Every pass ends the same way: read a shard's records, decide per document whether it is
kept (maybe rewritten) or dropped for a reason, count documents and characters in and out
and drops per reason (`StepStats`), keep a sample of what was dropped (`RemovedSample`) and
write the kept documents. `filter_records` is that loop, once; a pass supplies only its
decision (`decide(position, doc)` returning the document to keep or a `Drop`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import zstandard

from lmforge.data.document import Document
from lmforge.data.step import RemovedSample, StepStats
from lmforge.errors import InputError
from lmforge.log import log_once
from lmforge.rundir import atomic_file

CORRUPT = "corrupt_record"  # drop reason of a shard line that is not a document


def iter_records(path: str | Path) -> Iterator[tuple[int, Document | None]]:
    """(position, Document) for every non-empty line of a .jsonl.zst shard; a corrupt line
    yields (position, None) and is logged once with its location."""
    with open(path, "rb") as raw:
        r = zstandard.ZstdDecompressor().stream_reader(raw)
        pos = 0
        for lineno, line in enumerate(io.TextIOWrapper(r, encoding="utf-8", errors="replace"), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                doc = Document(id=str(d["id"]), text=d["text"], metadata=d.get("metadata") or {})
                if not isinstance(doc.text, str):
                    raise TypeError("text is not a string")
            except (ValueError, KeyError, TypeError) as e:
                log_once(f"corrupt:{path}", f"{path}:{lineno}: corrupt record skipped ({e}); further ones in this file are counted only")
                doc = None
            yield pos, doc
            pos += 1


def check_shards(in_shards: list[Path]) -> list[Path]:
    """The input shards in name order (so decisions never depend on the order given)."""
    shards = sorted((Path(p) for p in in_shards), key=lambda p: p.name)
    names = [p.name for p in shards]
    if len(set(names)) != len(names):
        raise InputError("dedup: input shards must have distinct file names")
    for p in shards:
        if not p.is_file():
            raise InputError(f"dedup: input shard not found: {p}")
    return shards


@dataclass
class Drop:
    """A decision to drop a document: the reason it is counted under, and the document the
    removed sample records (the original, or a copy with metadata explaining the drop)."""

    reason: str
    doc: Document


Decide = Callable[[int, Document], "Document | Drop"]


def filter_records(records: Iterable[tuple[int, Document | None]], decide: Decide, st: StepStats, rs: RemovedSample) -> Iterator[Document]:
    """The kept documents of `records` ((position, document or None for a corrupt record)).

    Counts every record into `st` (a corrupt one is dropped as "corrupt_record"), asks
    `decide(position, doc)` about every readable one, and counts/samples a `Drop` into
    `st`/`rs` or yields the returned (possibly rewritten) document. Lazy: `decide` is called
    for a record only when the next document is pulled."""
    for pos, doc in records:
        st.docs_in += 1
        if doc is None:
            st.dropped[CORRUPT] += 1
            continue
        st.chars_in += len(doc.text)
        out = decide(pos, doc)
        if isinstance(out, Drop):
            st.dropped[out.reason] += 1
            rs.add(out.reason, out.doc)
            continue
        st.docs_out += 1
        st.chars_out += len(out.text)
        yield out


def write_filtered(records: Iterable[tuple[int, Document | None]], out_path: str | Path, decide: Decide, st: StepStats, sample_removed: int) -> dict:
    """Write the documents `decide` keeps to the shard `out_path` (atomically), counting into
    `st` (which `decide` may add pass-specific counters to). Returns the task result
    {"stats", "removed"} as JSON, what `merge_results` reads."""
    from lmforge.data.corpus_io import write_shard

    rs = RemovedSample(sample_removed)
    write_shard(out_path, filter_records(records, decide, st, rs))
    return {"stats": st.to_dict(), "removed": rs.to_dict()}


def write_without(in_path: Path, out_path: Path, drop: dict[int, str], name: str, sample_removed: int, extra_meta: dict[int, dict] | None = None) -> dict:
    """Copy a shard to `out_path` (atomically) without the positions in `drop` (position ->
    reason), adding `extra_meta[position]` to a dropped document's sampled metadata; corrupt
    records are dropped and counted. Returns {"stats", "removed"} as JSON."""

    def decide(pos: int, doc: Document) -> Document | Drop:
        reason = drop.get(pos)
        if reason is None:
            return doc
        if extra_meta and pos in extra_meta:
            doc.metadata = dict(doc.metadata, **extra_meta[pos])
        return Drop(reason, doc)

    return write_filtered(iter_records(in_path), out_path, decide, StepStats(name), sample_removed)


def merge_results(name: str, results: list[dict], sample_removed: int) -> tuple[StepStats, dict]:
    """One pass's StepStats and removed sample from its per-task {"stats", "removed"} results."""
    st = StepStats(name)
    rs = RemovedSample(sample_removed)
    for r in results:
        st.merge(StepStats.from_dict(r["stats"]))
        rs.merge(r["removed"])
    return st, rs.to_dict()


def save_npy(path: Path, arr: np.ndarray) -> None:
    """Write an array as .npy atomically (no pickles)."""
    with atomic_file(path, "wb") as f:
        np.save(f, arr, allow_pickle=False)


def key_bounds(part: int, parts: int) -> tuple[int, int]:
    """[lo, hi) of the `part`-th of `parts` equal ranges of the 64-bit key space."""
    lo = (part * 2**64) // parts
    hi = ((part + 1) * 2**64) // parts
    return lo, hi
