"""Corpus passes: steps that must see the whole corpus (deduplication), run after the
per-shard streaming steps.

A pass reads the current shards (`corpus_io` .jsonl.zst), writes its output shards under
`out_dir` (normally one output shard per input shard, same file name, so later passes keep
the per-shard parallelism), and reports a `StepStats` plus removed-document samples. It
runs its per-shard work through an `Executor` with task markers under `work_dir`, so a
killed pass resumes at the first unfinished task; its outputs are written atomically.
Shards processed in any order must give the same kept set (decisions depend on document
ids and content, never on processing order).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.executor import Executor
from lmforge.data.step import StepStats


@dataclass
class PassResult:
    shards: list[Path]  # output shards, in name order
    stats: StepStats
    removed: dict[str, list[dict]] = field(default_factory=dict)  # reason -> sample records
    extra: dict = field(default_factory=dict)  # anything for stats.json (histograms, sizes)


class CorpusPass(abc.ABC):
    name: str = "pass"

    @abc.abstractmethod
    def run(self, in_shards: list[Path], out_dir: Path, work_dir: Path, executor: Executor, seed: int, sample_removed: int) -> PassResult:
        """Process all of `in_shards` into `out_dir`; intermediate state and markers go in `work_dir`."""
