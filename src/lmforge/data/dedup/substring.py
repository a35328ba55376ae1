"""Exact substring dedup (after Lee et al. 2022, "Deduplicating Training Data Makes Language
Models Better"): remove every span of at least `min_bytes` bytes that already occurred
earlier in the corpus.

The corpus's UTF-8 bytes are concatenated (documents separated by a 0xFF byte, which never
occurs in UTF-8) and a suffix array plus LCP array is built over them (libdivsufsort and
Kasai's algorithm via `pydivsufsort`). Suffixes whose first `min_bytes` bytes are equal form
one contiguous run of the suffix array (LCP >= min_bytes between neighbours); in each run
every window but the earliest (lowest corpus position) is marked. A byte is removed iff it
lies in a marked window, i.e. iff it belongs to an N-byte string seen before: the first
occurrence of any repeated span survives whole, later ones are cut out. Windows that cross
a document boundary are ignored. Cuts are made on bytes and the rest is decoded with partial
characters dropped; a document left with fewer than `min_doc_chars` characters is dropped.

Memory: the whole corpus is sorted in one process: about 13 bytes per corpus byte at the
peak (text 1, suffix array 4, LCP 4 and Kasai's rank array 4; int32 indices
up to 2 GiB of text); the whole pass, with its document table and the list of cut spans,
measured ~20 bytes per byte on the dictionary (many repeats).
`max_bytes` (default 128 MiB) turns a larger corpus into a clear error instead of an
out-of-memory kill: use line-level dedup (`lines`), or dedup parts of the corpus, for more.
The measured figure is in docs/dedup.md. The rewrite of the shards is parallel and resumable;
the found spans are saved before it starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.data.dedup.common import Drop, check_shards, iter_records, merge_results, write_filtered
from lmforge.data.document import Document
from lmforge.data.passes import CorpusPass, PassResult
from lmforge.data.step import StepStats
from lmforge.errors import ConfigError, InputError
from lmforge.log import logger
from lmforge.rundir import atomic_write_json, fingerprint, read_json

SEP = 0xFF
BYTES_PER_BYTE = 20  # peak memory of the whole pass per corpus byte, measured (see docs/dedup.md)


@dataclass
class SubstringConfig:
    enabled: bool = False
    min_bytes: int = 50  # shortest repeated span removed (Lee et al.: 50 tokens ~ 100+ bytes; 50 bytes here)
    min_doc_chars: int = 1  # documents left shorter than this are dropped
    max_bytes: int = 128 * 2**20  # refuse corpora larger than this (memory: ~20 bytes per byte)

    def validate(self) -> None:
        if self.min_bytes < 8:
            raise ConfigError(f"substring.min_bytes must be >= 8, got {self.min_bytes}")
        if self.max_bytes < 1 or self.max_bytes >= 2**31 - 1:
            raise ConfigError("substring.max_bytes must be in [1, 2**31 - 1)")
        if self.min_doc_chars < 0:
            raise ConfigError("substring.min_doc_chars must be >= 0")


def repeated_spans(buf: np.ndarray, min_bytes: int) -> np.ndarray:
    """Merged [start, end) byte ranges of `buf` (uint8) covered by an N-byte window that also
    occurs at a lower position; windows containing a SEP byte are ignored. Shape (k, 2) int64."""
    from pydivsufsort import divsufsort, kasai

    n = len(buf)
    if n < min_bytes + 1:
        return np.zeros((0, 2), np.int64)
    sa = divsufsort(buf)
    lcp = kasai(buf, sa)  # lcp[i] = common prefix of suffixes sa[i] and sa[i+1]
    link = lcp >= min_bytes  # link[i]: sa[i] and sa[i+1] share their first min_bytes bytes
    del lcp
    # only suffixes in a run of >= 2 matter (usually a small share): work on those alone
    member = link.copy()
    member[1:] |= link[:-1]
    idx = np.flatnonzero(member).astype(np.int32)  # int32 throughout: n < 2**31
    del member
    if len(idx) == 0:
        return np.zeros((0, 2), np.int64)
    starts_run = np.ones(len(idx), bool)
    inner = idx > 0
    starts_run[inner] = ~link[idx[inner] - 1]
    del link, inner
    pos = sa[idx]
    del sa, idx
    run_min = np.minimum.reduceat(pos, np.flatnonzero(starts_run))
    run_id = np.cumsum(starts_run, dtype=np.int32)
    run_id -= 1
    del starts_run
    marked = pos[pos != run_min[run_id]]
    del pos, run_min, run_id
    marked = marked[marked <= n - min_bytes]
    if len(marked) == 0:
        return np.zeros((0, 2), np.int64)
    seps = np.flatnonzero(buf == SEP)
    if len(seps):
        nxt = np.searchsorted(seps, marked)
        nxt_pos = np.where(nxt < len(seps), seps[np.minimum(nxt, len(seps) - 1)], n)
        marked = marked[nxt_pos >= marked + min_bytes]
    if len(marked) == 0:
        return np.zeros((0, 2), np.int64)
    marked.sort()
    ends = marked + min_bytes
    run_end = np.maximum.accumulate(ends)
    new = np.ones(len(marked), bool)
    new[1:] = marked[1:] > run_end[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, len(marked) - 1)
    return np.stack([marked[first], run_end[last]], axis=1).astype(np.int64)


def _load_corpus(shards: list[Path], max_bytes: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """The corpus bytes (documents joined by SEP) and per document (shard, pos, start, end)."""
    blob, where, off = bytearray(), [], 0  # writable: the suffix sorter wants a writable buffer
    for si, p in enumerate(shards):
        for pos, doc in iter_records(p):
            if doc is None:
                continue
            b = doc.text.encode("utf-8", "surrogatepass")
            if where:
                blob.append(SEP)
            where.append((si, pos, off, off + len(b)))
            blob += b
            off += len(b) + 1
            if off > max_bytes:
                raise InputError(f"substring dedup: the corpus exceeds substring.max_bytes = {max_bytes:,} bytes "
                                 f"(it needs ~{BYTES_PER_BYTE} bytes of memory per corpus byte); raise max_bytes if the "
                                 "memory is there, or use [data.dedup.lines] for larger corpora")
    return np.frombuffer(blob, dtype=np.uint8), where


def _rewrite_task(task: dict) -> dict:
    cuts = {int(k): v for k, v in task["cuts"].items()}  # pos -> [[s, e], ...] document-local byte ranges
    st = StepStats("substring")

    def decide(pos: int, doc: Document) -> Document | Drop:
        if pos not in cuts:
            return doc
        b = doc.text.encode("utf-8", "surrogatepass")
        keep, prev = [], 0
        for s, e in cuts[pos]:
            keep.append(b[prev:s])
            prev = e
        keep.append(b[prev:])
        new = b"".join(keep).decode("utf-8", "ignore")
        st.counters["docs_changed"] += 1
        st.counters["spans_removed"] += len(cuts[pos])
        st.counters["bytes_removed"] += len(b) - sum(len(k) for k in keep)
        if len(new.strip()) < max(1, task["min_doc_chars"]):
            return Drop("only_repeated_substrings", doc)
        return Document(doc.id, new, doc.metadata)

    return write_filtered(iter_records(task["path"]), task["out"], decide, st, task["sample"])


class SubstringDedupPass(CorpusPass):
    name = "substring"

    def __init__(self, cfg: SubstringConfig | None = None):
        self.cfg = cfg or SubstringConfig()

    def run(self, in_shards, out_dir, work_dir, executor, seed, sample_removed) -> PassResult:
        t0 = time.perf_counter()
        c = self.cfg
        shards = check_shards(in_shards)
        wd = Path(work_dir) / f"substring-{fingerprint([c.min_bytes, [p.name for p in shards]])}"
        plan_path = wd / "cuts.json"
        plan = read_json(plan_path)
        if plan is None:
            buf, where = _load_corpus(shards, c.max_bytes)
            ts = time.perf_counter()
            spans = repeated_spans(buf, c.min_bytes)
            build_s = time.perf_counter() - ts
            logger.info("substring: %.1f MB sorted in %.1fs, %d repeated span(s)", len(buf) / 1e6, build_s, len(spans))
            cuts: dict[int, dict[int, list]] = {}
            if len(where) and len(spans):
                dstart = np.array([w[2] for w in where], np.int64)
                for s, e in spans.tolist():
                    d = int(np.searchsorted(dstart, s, side="right")) - 1
                    si, pos, a, b = where[d]
                    cuts.setdefault(si, {}).setdefault(pos, []).append([s - a, min(e, b) - a])
            plan = {"cuts": {str(k): {str(p): v for p, v in d.items()} for k, d in cuts.items()},
                    "bytes": int(len(buf)), "spans": int(len(spans)), "sort_s": round(build_s, 3),
                    "removed_bytes": int(sum(e - s for s, e in spans.tolist()))}
            wd.mkdir(parents=True, exist_ok=True)
            atomic_write_json(plan_path, plan)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        outs = [Path(out_dir) / p.name for p in shards]
        res = executor.map(_rewrite_task, [{"path": str(p), "out": str(outs[i]), "cuts": plan["cuts"].get(str(i), {}),
                                            "min_doc_chars": c.min_doc_chars, "sample": sample_removed} for i, p in enumerate(shards)],
                           [p.name for p in shards], wd / "rewrite" / ".markers", desc="substring: rewrite")
        stats, removed = merge_results(self.name, res, sample_removed)
        stats.time_s = time.perf_counter() - t0
        mbps = plan["bytes"] / 1e6 / plan["sort_s"] if plan["sort_s"] else None
        extra = {"min_bytes": c.min_bytes, "corpus_bytes": plan["bytes"], "spans": plan["spans"], "removed_bytes": plan["removed_bytes"],
                 "suffix_array_s": plan["sort_s"], "suffix_array_mb_per_s": round(mbps, 2) if mbps else None,
                 "peak_memory_estimate_bytes": plan["bytes"] * BYTES_PER_BYTE}
        return PassResult(outs, stats, removed, extra)
