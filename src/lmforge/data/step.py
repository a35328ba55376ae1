"""Pipeline steps: callables from an iterator of Documents to an iterator of Documents.

A `Step` counts documents and characters in/out and drops per reason (`StepStats`), and
keeps a deterministic sample of what it removed (`RemovedSample`: the k removed documents
with the smallest id-hash per reason, so the sample does not depend on shard order or the
number of workers and merges across tasks).

A `Filter` only decides keep/drop per document (`decide` returns a drop reason or None);
it supports stochastic removal: a seeded, per-document fraction of what it would drop is
kept anyway (marked in metadata["kept_despite"]).
"""

from __future__ import annotations

import heapq
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import xxhash

from lmforge.data.document import Document


def doc_uniform(doc_id: str, salt: str) -> float:
    """A deterministic uniform [0,1) number for (document, salt): same on every machine and run."""
    return xxhash.xxh64_intdigest(f"{salt}\x00{doc_id}".encode("utf-8", "surrogatepass")) / 2.0**64


@dataclass
class StepStats:
    name: str
    docs_in: int = 0
    docs_out: int = 0
    chars_in: int = 0
    chars_out: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason -> documents
    counters: Counter = field(default_factory=Counter)  # anything else worth counting
    time_s: float = 0.0

    def merge(self, other: "StepStats") -> "StepStats":
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.chars_in += other.chars_in
        self.chars_out += other.chars_out
        self.dropped.update(other.dropped)
        self.counters.update(other.counters)
        self.time_s += other.time_s
        return self

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "chars_in": self.chars_in,
            "chars_out": self.chars_out,
            "dropped": dict(sorted(self.dropped.items())),
            "counters": dict(sorted(self.counters.items())),
            "time_s": round(self.time_s, 4),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "StepStats":
        return cls(
            name=d["name"], docs_in=d["docs_in"], docs_out=d["docs_out"], chars_in=d["chars_in"],
            chars_out=d["chars_out"], dropped=Counter(d.get("dropped", {})), counters=Counter(d.get("counters", {})),
            time_s=d.get("time_s", 0.0),
        )


class RemovedSample:
    """Bottom-k (by id hash) removed documents per reason: order-independent and mergeable."""

    def __init__(self, k: int = 20, max_chars: int = 2000):
        self.k = k
        self.max_chars = max_chars
        self.heaps: dict[str, list] = {}

    def add(self, reason: str, doc: Document) -> None:
        if self.k <= 0:
            return
        h = -xxhash.xxh64_intdigest(doc.id.encode("utf-8", "surrogatepass"))  # max-heap on hash: pop the largest to keep the k smallest
        heap = self.heaps.setdefault(reason, [])
        if len(heap) < self.k:
            heapq.heappush(heap, (h, doc.id, self._rec(doc)))
        elif h > heap[0][0]:
            heapq.heapreplace(heap, (h, doc.id, self._rec(doc)))

    def _rec(self, doc: Document) -> dict:
        return {"id": doc.id, "text": doc.text[: self.max_chars], "metadata": doc.metadata}

    def merge(self, records: dict[str, list[dict]]) -> None:
        for reason, recs in records.items():
            for r in recs:
                self.add(reason, Document(r["id"], r["text"], r.get("metadata", {})))

    def to_dict(self) -> dict[str, list[dict]]:
        return {r: [rec for _, _, rec in sorted(h, key=lambda t: -t[0])] for r, h in sorted(self.heaps.items())}


class Step:
    """Base pipeline step. Subclasses override `process(docs)` (a generator) and use
    `self.drop(doc, reason)` / `self.stats` to account for what they remove."""

    name: str = "step"

    def __init__(self, sample_removed: int = 20):
        self.stats = StepStats(self.name)
        self.removed = RemovedSample(sample_removed)

    def process(self, docs: Iterable[Document]) -> Iterator[Document]:
        yield from docs

    def drop(self, doc: Document, reason: str) -> None:
        self.stats.dropped[reason] += 1
        self.removed.add(reason, doc)

    def __call__(self, docs: Iterable[Document]) -> Iterator[Document]:
        """Run `process`, counting documents/characters in and out and the time spent in this step alone."""
        st = self.stats
        upstream = 0.0

        def counted_in():
            nonlocal upstream
            it = iter(docs)
            while True:
                t0 = time.perf_counter()
                try:
                    d = next(it)
                except StopIteration:
                    upstream += time.perf_counter() - t0
                    return
                upstream += time.perf_counter() - t0
                st.docs_in += 1
                st.chars_in += len(d.text)
                yield d

        gen = self.process(counted_in())
        while True:
            t0, u0 = time.perf_counter(), upstream
            try:
                d = next(gen)
            except StopIteration:
                st.time_s += time.perf_counter() - t0 - (upstream - u0)
                return
            st.time_s += time.perf_counter() - t0 - (upstream - u0)
            st.docs_out += 1
            st.chars_out += len(d.text)
            yield d


class Filter(Step):
    """A keep/drop step. `decide(doc)` returns None to keep, or a short drop reason."""

    def __init__(self, keep_fraction: float = 0.0, seed: int = 0, sample_removed: int = 20):
        super().__init__(sample_removed)
        if not 0.0 <= keep_fraction <= 1.0:
            raise ValueError(f"{self.name}: keep_fraction must be in [0, 1], got {keep_fraction}")
        self.keep_fraction = keep_fraction
        self.salt = f"{seed}:{self.name}"

    def decide(self, doc: Document) -> str | None:  # pragma: no cover - overridden
        return None

    def process(self, docs: Iterable[Document]) -> Iterator[Document]:
        for doc in docs:
            reason = self.decide(doc)
            if reason is None:
                yield doc
            elif self.keep_fraction and doc_uniform(doc.id, self.salt) < self.keep_fraction:
                self.stats.counters[f"kept_despite:{reason}"] += 1
                doc.metadata.setdefault("kept_despite", []).append(f"{self.name}:{reason}")
                yield doc
            else:
                self.drop(doc, reason)


def run_steps(docs: Iterable[Document], steps: list[Step]) -> Iterator[Document]:
    """Chain steps lazily: the output of each is the input of the next."""
    for s in steps:
        docs = s(docs)
    return iter(docs)
