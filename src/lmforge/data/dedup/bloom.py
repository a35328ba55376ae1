"""Bloom-filter near-duplicate removal: one streaming pass, memory fixed in advance.

Documents are read once, in corpus order (shards by name, then position). For each one,
its distinct word n-gram shingles (the same shingles as MinHash) are looked up in a Bloom
filter; if at least `threshold` of them are already there, the document is a near-duplicate
of what came before (its text is mostly contained in earlier documents) and is dropped;
otherwise its shingles are added and it is kept. Documents with fewer than `min_shingles`
shingles are never dropped (too little evidence).

The filter holds m = -n ln(p) / ln(2)^2 bits for n expected shingles at false-positive rate
p, with k = (m/n) ln 2 probe positions per shingle (double hashing of the 64-bit shingle
hash). n defaults to an exact count of the corpus's shingles (a parallel pre-pass); set
`expected_items` to skip it. A false positive can only make a shingle look seen, so the
filter errs towards removal: with p = 0.001 and threshold 0.8, a unique document of 50
shingles would need 40 false hits.

Unlike MinHash this is a containment test against everything seen before, not a pairwise
Jaccard: a document assembled from pieces of several earlier ones is removed too. It is
sequential by nature (the decision depends on what came before), so it runs as one task;
after every shard it saves the filter and a marker, so a killed run resumes at the next shard.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.data.dedup.common import Drop, check_shards, filter_records, iter_records, merge_results
from lmforge.data.dedup.shingles import batch_shingles, mix64, text_batches
from lmforge.data.document import Document
from lmforge.data.passes import CorpusPass, PassResult
from lmforge.data.step import RemovedSample, StepStats
from lmforge.errors import ConfigError
from lmforge.log import logger, progress
from lmforge.rundir import atomic_file, atomic_write_json, fingerprint, read_json

U64 = np.uint64


@dataclass
class BloomConfig:
    enabled: bool = False
    ngram: int = 5
    threshold: float = 0.8  # fraction of a document's shingles already seen -> duplicate
    fp_rate: float = 0.001  # Bloom filter false-positive rate at `expected_items`
    expected_items: int = 0  # shingles the filter must hold; 0 = count them first
    min_shingles: int = 10  # documents with fewer distinct shingles are always kept

    def validate(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"bloom.threshold must be in (0, 1], got {self.threshold}")
        if not 0.0 < self.fp_rate < 0.5:
            raise ConfigError(f"bloom.fp_rate must be in (0, 0.5), got {self.fp_rate}")
        if self.expected_items < 0:
            raise ConfigError("bloom.expected_items must be >= 0")
        if self.ngram < 1 or self.min_shingles < 1:
            raise ConfigError("bloom.ngram and bloom.min_shingles must be >= 1")


def bloom_size(n: int, p: float) -> tuple[int, int]:
    """(bits m, probes k) for n items at false-positive rate p (m rounded up to 64)."""
    n = max(1, n)
    m = math.ceil(-n * math.log(p) / math.log(2) ** 2)
    m = ((m + 63) // 64) * 64
    k = max(1, round(m / n * math.log(2)))
    return m, k


class BloomFilter:
    """A bit array of m bits with k probes per 64-bit item (h1 + i*h2 mod m), vectorised."""

    def __init__(self, m: int, k: int, bits: np.ndarray | None = None):
        self.m, self.k = int(m), int(k)
        self.bits = np.zeros(self.m // 8, dtype=np.uint8) if bits is None else bits
        self._i = np.arange(self.k, dtype=U64)

    def _probes(self, h: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            h2 = mix64(h.copy()) | U64(1)
            return (h[:, None] + self._i[None, :] * h2[:, None]) % U64(self.m)

    def contains(self, h: np.ndarray) -> np.ndarray:
        """Per item: are all its k bits set?"""
        if len(h) == 0:
            return np.zeros(0, bool)
        p = self._probes(h)
        got = (self.bits[p >> U64(3)] >> (p & U64(7)).astype(np.uint8)) & 1
        return got.all(axis=1)

    def add(self, h: np.ndarray) -> None:
        if len(h) == 0:
            return
        p = self._probes(h).ravel()
        np.bitwise_or.at(self.bits, p >> U64(3), (np.uint8(1) << (p & U64(7)).astype(np.uint8)))

    def fill_ratio(self) -> float:
        return float(np.unpackbits(self.bits).mean()) if len(self.bits) else 0.0

    def save(self, path: Path) -> None:
        with atomic_file(path, "wb") as f:
            np.savez(f, bits=self.bits, mk=np.array([self.m, self.k], dtype=np.int64))

    @classmethod
    def load(cls, path: Path) -> "BloomFilter":
        z = np.load(path)
        m, k = z["mk"].tolist()
        return cls(m, k, z["bits"].copy())


def _count_task(task: dict) -> dict:
    recs = [d.text if d is not None else "" for _, d in iter_records(task["path"])]
    n = 0
    for i, j in text_batches(recs):
        n += len(batch_shingles(recs[i:j], task["ngram"])[0])
    return {"shingles": n}


class BloomDedupPass(CorpusPass):
    name = "bloom"

    def __init__(self, cfg: BloomConfig | None = None):
        self.cfg = cfg or BloomConfig()

    def run(self, in_shards, out_dir, work_dir, executor, seed, sample_removed) -> PassResult:
        from lmforge.data.corpus_io import write_shard

        t0 = time.perf_counter()
        c = self.cfg
        shards = check_shards(in_shards)
        wd = Path(work_dir) / f"bloom-{fingerprint([c.ngram, c.threshold, c.fp_rate, c.expected_items, c.min_shingles, [p.name for p in shards]])}"
        wd.mkdir(parents=True, exist_ok=True)
        n = c.expected_items
        if n == 0:
            res = executor.map(_count_task, [{"path": str(p), "ngram": c.ngram} for p in shards], [p.name for p in shards],
                               wd / "count" / ".markers", desc="bloom: count shingles")
            n = sum(r["shingles"] for r in res)
        m, k = bloom_size(n, c.fp_rate)
        done = read_json(wd / "progress.json", {"done": [], "results": [], "filter": ""})
        bf = BloomFilter.load(wd / done["filter"]) if done["done"] else BloomFilter(m, k)
        if done["done"]:
            logger.info("bloom: %d/%d shards already done, resuming", len(done["done"]), len(shards))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        outs = [Path(out_dir) / p.name for p in shards]
        for p, out in progress(list(zip(shards, outs)), desc="bloom dedup", unit="shard"):
            if p.name in done["done"]:
                continue
            st, rs = StepStats(self.name), RemovedSample(sample_removed)
            write_shard(out, self._filter(p, bf, st, rs))
            # the filter after this shard goes to a new file; progress.json then points at it, so a
            # kill between the two leaves the previous (consistent) state in force
            old = done["filter"]
            done["filter"] = f"filter_{len(done['done']) + 1:05d}.npz"
            bf.save(wd / done["filter"])
            done["done"].append(p.name)
            done["results"].append({"stats": st.to_dict(), "removed": rs.to_dict()})
            atomic_write_json(wd / "progress.json", done)
            if old:
                (wd / old).unlink(missing_ok=True)
        stats, removed = merge_results(self.name, done["results"], sample_removed)
        stats.time_s = time.perf_counter() - t0
        extra = {"expected_items": n, "bits": m, "probes": k, "memory_bytes": m // 8, "fp_rate": c.fp_rate,
                 "fill_ratio": round(bf.fill_ratio(), 4), "threshold": c.threshold}
        return PassResult(outs, stats, removed, extra)

    def _filter(self, path: Path, bf: BloomFilter, st: StepStats, rs: RemovedSample):
        """The kept documents of one shard, in order; each kept document's shingles join the filter."""
        c = self.cfg
        recs = list(iter_records(path))
        texts = [d.text if d is not None else "" for _, d in recs]
        batch: dict = {}  # the shingles of the text batch holding the record being decided

        def records():
            for i, j in text_batches(texts):
                batch["hs"], batch["offs"] = batch_shingles(texts[i:j], c.ngram)
                batch["i"] = i
                for t in range(i, j):
                    yield t, recs[t][1]

        def decide(t: int, doc: Document) -> Document | Drop:
            k = t - batch["i"]
            h = np.unique(batch["hs"][batch["offs"][k] : batch["offs"][k + 1]])
            if len(h) >= c.min_shingles:
                seen = bf.contains(h)
                frac = float(seen.mean())
                if frac >= c.threshold:
                    return Drop("near_duplicate", Document(doc.id, doc.text, dict(doc.metadata, bloom_seen=round(frac, 3))))
                bf.add(h[~seen])
            else:
                st.counters["short_docs_kept"] += 1
                bf.add(h)
            return doc

        return filter_records(records(), decide, st, rs)
