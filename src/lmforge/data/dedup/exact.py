"""Exact deduplication: one document per normalised-content hash.

Three phases, each resumable:

1. hash (one task per shard, in parallel): xxh3-64 of each document's normalised text,
   saved with the document's corpus position (shard index << 32 | index in shard) to
   `work_dir/hashes/<shard>.npy`;
2. merge (one process): sort all (hash, position) pairs and keep, per hash, the smallest
   position: the first occurrence in corpus order, i.e. in the order the inputs are listed
   — which makes the kept set independent of how many workers ran or in which order the
   shards finished. Saved to `work_dir/keep.npy` (16 bytes per distinct text);
3. filter (one task per shard): a document is kept iff it is the recorded first occurrence
   of its hash; output shards keep their input names.

Normalisation (`normalize`): "none" hashes the raw text; "whitespace" strips and collapses
runs of whitespace; "lower" also applies Unicode NFKC and case folding (default);
"alnum" additionally drops everything but letters and digits (catches copies that differ
only in punctuation).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import xxhash

from lmforge.data.corpus_io import iter_shard
from lmforge.data.dedup.common import Drop, merge_results, save_npy, write_filtered
from lmforge.data.document import Document
from lmforge.data.executor import Executor
from lmforge.data.passes import CorpusPass, PassResult
from lmforge.data.step import StepStats

_WS = re.compile(r"\s+")
_NON_ALNUM = re.compile(r"[\W_]+")


@dataclass
class ExactDedupConfig:
    enabled: bool = True
    normalize: Literal["none", "whitespace", "lower", "alnum"] = "lower"


def normalize_text(text: str, mode: str) -> str:
    if mode == "none":
        return text
    if mode in ("lower", "alnum"):
        text = unicodedata.normalize("NFKC", text).casefold()
    if mode == "alnum":
        return _NON_ALNUM.sub(" ", text).strip()
    return _WS.sub(" ", text).strip()


def content_hash(text: str, mode: str) -> int:
    return xxhash.xxh3_64_intdigest(normalize_text(text, mode).encode("utf-8", "surrogatepass"))


def _hash_task(task: dict) -> dict:
    rows = [
        (content_hash(d.text, task["normalize"]), (task["index"] << 32) | i)
        for i, d in enumerate(iter_shard(task["shard"]))
    ]
    arr = np.array(rows, dtype=np.uint64).reshape(-1, 2)
    save_npy(Path(task["out"]), arr)
    return {"docs": int(arr.shape[0])}


def _merge(hash_files: list[Path], out: Path) -> dict:
    parts = [np.load(p, allow_pickle=False) for p in hash_files]
    allr = np.concatenate(parts) if parts else np.zeros((0, 2), np.uint64)
    order = np.lexsort((allr[:, 1], allr[:, 0]))  # by hash, then position
    s = allr[order]
    first = np.ones(len(s), dtype=bool)
    first[1:] = s[1:, 0] != s[:-1, 0]
    keep = np.ascontiguousarray(s[first])
    save_npy(out, keep)
    return {"docs": int(len(s)), "distinct": int(len(keep))}


def _filter_task(task: dict) -> dict:
    keep = np.load(task["keep"], mmap_mode="r", allow_pickle=False)
    mine = np.load(task["hashes"], allow_pickle=False)
    if len(mine):
        idx = np.searchsorted(keep[:, 0], mine[:, 0])
        kept = np.asarray(keep[idx, 1]) == mine[:, 1]
    else:
        kept = np.zeros(0, dtype=bool)

    def decide(i: int, d: Document) -> Document | Drop:
        return d if kept[i] else Drop("duplicate", d)

    return write_filtered(enumerate(iter_shard(task["shard"])), task["out"], decide, StepStats("exact_dedup"), task["sample_removed"])


class ExactDedupPass(CorpusPass):
    name = "exact_dedup"

    def __init__(self, cfg: ExactDedupConfig | None = None):
        self.cfg = cfg or ExactDedupConfig()

    def run(self, in_shards, out_dir, work_dir, executor: Executor, seed: int, sample_removed: int) -> PassResult:
        import time

        t0 = time.perf_counter()
        out_dir, work_dir = Path(out_dir), Path(work_dir)
        in_shards = [Path(p) for p in in_shards]
        ids = [p.name.split(".")[0] for p in in_shards]
        hash_files = [work_dir / "hashes" / f"{i}.npy" for i in ids]
        executor.map(
            _hash_task,
            [{"shard": str(p), "index": k, "out": str(h), "normalize": self.cfg.normalize} for k, (p, h) in enumerate(zip(in_shards, hash_files))],
            ids, work_dir / "markers" / "hash", desc="exact dedup: hash",
        )
        keep = work_dir / "keep.npy"
        from lmforge.rundir import atomic_write_json, read_json

        info = read_json(work_dir / "merge.json")
        if info is None or not keep.exists():
            info = _merge(hash_files, keep)
            atomic_write_json(work_dir / "merge.json", info)
        outs = [out_dir / p.name for p in in_shards]
        results = executor.map(
            _filter_task,
            [{"shard": str(p), "hashes": str(h), "keep": str(keep), "out": str(o), "sample_removed": sample_removed}
             for p, h, o in zip(in_shards, hash_files, outs)],
            ids, work_dir / "markers" / "filter", desc="exact dedup: filter",
        )
        stats, removed = merge_results(self.name, results, sample_removed)
        # the per-task times add up the filter phase; report this pass's wall time instead
        stats.time_s = time.perf_counter() - t0
        stats.counters["distinct_texts"] = info["distinct"]
        return PassResult(outs, stats, removed, {"normalize": self.cfg.normalize, **info})
