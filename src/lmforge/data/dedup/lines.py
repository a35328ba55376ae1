"""Line- or paragraph-level exact dedup across the corpus (the CCNet approach).

A line (or paragraph) that occurs, after normalisation, in at least `min_docs` different
documents is boilerplate (navigation, footers, licence headers, "[1913 Webster]" tags) and is
removed from every document (`keep_first = false`, CCNet's rule) or from every document
but the first one in corpus order (`keep_first = true`). Documents left with fewer than
`min_doc_chars` characters are dropped.

Phases (resumable executor tasks):
1. hash (per shard): xxh3-64 of each normalised unit, once per document; writes the
   (hash, document) pairs sorted by hash;
2. count (per hash range): merges the sorted arrays of every shard for one range of hash
   values, keeps the hashes seen in >= min_docs documents with their first document;
   memory is bounded by one range;
3. rewrite (per shard): drops the duplicated units and writes the shard.

Cost: 16 bytes per distinct (unit, document) on disk; one hash range in memory at a time.
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import xxhash

from lmforge.data.dedup.common import Drop, check_shards, iter_records, key_bounds, merge_results, save_npy, write_filtered
from lmforge.data.document import Document
from lmforge.data.passes import CorpusPass, PassResult
from lmforge.data.step import StepStats
from lmforge.errors import ConfigError
from lmforge.rundir import fingerprint

U64 = np.uint64
_PARA = re.compile(r"(\n[ \t\r\f\v]*\n\s*)")
_DIGIT = re.compile(r"\d")
_PUNCT = re.compile(r"[^\w\s]+")
_SPACE = re.compile(r"\s+")


@dataclass
class LinesConfig:
    enabled: bool = False
    unit: Literal["line", "paragraph"] = "line"
    min_docs: int = 2  # a unit seen in this many documents is a duplicate
    keep_first: bool = False  # false: remove every occurrence (CCNet); true: keep the first document's
    min_chars: int = 1  # units shorter than this (after normalisation) are never removed
    min_doc_chars: int = 1  # documents left shorter than this are dropped
    skip_sources: list[str] = field(default_factory=list)  # metadata.source values left untouched (e.g. code)
    key_ranges: int = 4  # count tasks (bounds memory)

    def validate(self) -> None:
        if self.min_docs < 2:
            raise ConfigError("lines.min_docs must be >= 2")
        if self.key_ranges < 1 or self.key_ranges > 256:
            raise ConfigError("lines.key_ranges must be in [1, 256]")
        if self.min_chars < 0 or self.min_doc_chars < 0:
            raise ConfigError("lines.min_chars and lines.min_doc_chars must be >= 0")


def normalize_unit(s: str) -> str:
    """CCNet-style: lower case, accents and punctuation removed, digits -> 0, spaces collapsed."""
    s = unicodedata.normalize("NFD", s.lower())
    s = "".join(c for c in s if not unicodedata.combining(c))
    s = _PUNCT.sub(" ", _DIGIT.sub("0", s))
    return _SPACE.sub(" ", s).strip()


def split_units(text: str, unit: str) -> list[tuple[str, str]]:
    """(unit, separator that follows it) pairs that join back to `text`."""
    if unit == "line":
        out = []
        for ln in text.splitlines(keepends=True):
            body = ln.rstrip("\r\n")
            out.append((body, ln[len(body):]))
        return out
    parts = _PARA.split(text)
    return [(parts[i], parts[i + 1] if i + 1 < len(parts) else "") for i in range(0, len(parts), 2)]


def unit_hashes(text: str, unit: str, min_chars: int) -> list[int | None]:
    """Hash per unit (None: blank or too short to consider)."""
    out = []
    for body, _ in split_units(text, unit):
        n = normalize_unit(body)
        out.append(xxhash.xxh3_64_intdigest(n.encode("utf-8", "surrogatepass")) if n and len(n) >= min_chars else None)
    return out


def _skip(doc: Document, skip: list[str]) -> bool:
    return bool(skip) and doc.metadata.get("source") in skip


def _hash_task(task: dict) -> dict:
    c = task["cfg"]
    hs, refs = [], []
    base = task["index"] << 32
    for pos, doc in iter_records(task["path"]):
        if doc is None or _skip(doc, c["skip_sources"]):
            continue
        mine = {h for h in unit_hashes(doc.text, c["unit"], c["min_chars"]) if h is not None}
        hs.extend(mine)
        refs.extend([base | pos] * len(mine))
    h = np.array(hs, dtype=U64)
    r = np.array(refs, dtype=U64)
    order = np.lexsort((r, h))
    save_npy(Path(task["out"]), np.stack([h[order], r[order]], axis=1) if len(h) else np.zeros((0, 2), U64))
    return {"units": len(hs)}


def _count_task(task: dict) -> dict:
    lo, hi = key_bounds(task["part"], task["parts"])
    hs, rs = [], []
    for f in task["hash_files"]:
        arr = np.load(f, mmap_mode="r")
        if len(arr) == 0:
            continue
        i0 = int(np.searchsorted(arr[:, 0], U64(lo)))
        i1 = len(arr) if hi >= 2**64 else int(np.searchsorted(arr[:, 0], U64(hi)))
        hs.append(np.array(arr[i0:i1, 0]))
        rs.append(np.array(arr[i0:i1, 1]))
    if hs:
        h, r = np.concatenate(hs), np.concatenate(rs)
        order = np.lexsort((r, h))
        h, r = h[order], r[order]
        uniq, start, count = np.unique(h, return_index=True, return_counts=True)
        dup = count >= task["min_docs"]
        out = np.stack([uniq[dup], r[start[dup]]], axis=1)  # hash, first document (smallest ref)
    else:
        out = np.zeros((0, 2), U64)
    save_npy(Path(task["out"]), out)
    return {"duplicated_units": int(len(out))}


def _rewrite_task(task: dict) -> dict:
    c = task["cfg"]
    dups = [np.load(f, mmap_mode="r") for f in task["dup_files"]]
    bounds = [key_bounds(i, len(dups)) for i in range(len(dups))]
    base = task["index"] << 32
    st = StepStats("lines")

    def first_of(h: int) -> int | None:
        for (lo, hi), d in zip(bounds, dups):
            if lo <= h < hi:
                if len(d) == 0:
                    return None
                i = int(np.searchsorted(d[:, 0], U64(h)))
                return int(d[i, 1]) if i < len(d) and int(d[i, 0]) == h else None
        return None

    def decide(pos: int, doc: Document) -> Document | Drop:
        if _skip(doc, c["skip_sources"]):
            return doc
        units = split_units(doc.text, c["unit"])
        keep, removed_units = [], 0
        for (body, sep), h in zip(units, unit_hashes(doc.text, c["unit"], c["min_chars"])):
            f = first_of(h) if h is not None else None
            if f is not None and not (c["keep_first"] and f == (base | pos)):
                removed_units += 1
                continue
            keep.append(body + sep)
        if not removed_units:
            return doc
        st.counters["units_removed"] += removed_units
        st.counters["docs_changed"] += 1
        new = "".join(keep)
        st.counters["chars_removed"] += len(doc.text) - len(new)
        if len(new.strip()) < max(1, c["min_doc_chars"]):
            return Drop("only_duplicate_lines", doc)
        return Document(doc.id, new, doc.metadata)

    return write_filtered(iter_records(task["path"]), task["out"], decide, st, task["sample"])


class LineDedupPass(CorpusPass):
    name = "lines"

    def __init__(self, cfg: LinesConfig | None = None):
        self.cfg = cfg or LinesConfig()

    def run(self, in_shards, out_dir, work_dir, executor, seed, sample_removed) -> PassResult:
        t0 = time.perf_counter()
        c = self.cfg
        shards = check_shards(in_shards)
        cd = {"unit": c.unit, "min_chars": c.min_chars, "min_docs": c.min_docs, "keep_first": c.keep_first,
              "min_doc_chars": c.min_doc_chars, "skip_sources": list(c.skip_sources)}
        wd = Path(work_dir) / f"lines-{fingerprint([cd, [p.name for p in shards], c.key_ranges])}"
        hfiles = [str(wd / "hash" / f"{p.name}.npy") for p in shards]
        info = executor.map(_hash_task, [{"path": str(p), "index": i, "cfg": cd, "out": hfiles[i]} for i, p in enumerate(shards)],
                            [p.name for p in shards], wd / "hash" / ".markers", desc="lines: hash")
        dfiles = [str(wd / "dups" / f"r{k:03d}.npy") for k in range(c.key_ranges)]
        cnt = executor.map(_count_task, [{"part": k, "parts": c.key_ranges, "hash_files": hfiles, "min_docs": c.min_docs, "out": dfiles[k]}
                                         for k in range(c.key_ranges)], [f"r{k:03d}" for k in range(c.key_ranges)],
                           wd / "dups" / ".markers", desc="lines: count")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        outs = [Path(out_dir) / p.name for p in shards]
        res = executor.map(_rewrite_task, [{"path": str(p), "index": i, "cfg": cd, "dup_files": dfiles, "out": str(outs[i]), "sample": sample_removed}
                                           for i, p in enumerate(shards)], [p.name for p in shards], wd / "rewrite" / ".markers", desc="lines: rewrite")
        stats, removed = merge_results(self.name, res, sample_removed)
        stats.time_s = time.perf_counter() - t0
        extra = {"unit": c.unit, "units_hashed": sum(i["units"] for i in info),
                 "duplicated_units": sum(x["duplicated_units"] for x in cnt), "keep_first": c.keep_first}
        return PassResult(outs, stats, removed, extra)
