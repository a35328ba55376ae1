"""Configuration of the data stage: `[data]` in a recipe.

Sub-sections belong to the modules that implement them (extract, langid, filters, pii,
dedup, quality); this file only composes them and holds inputs, outputs and the executor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.data.dedup import DedupConfig
from lmforge.data.extract import ExtractConfig
from lmforge.data.filters import FiltersConfig
from lmforge.data.langid import LangIdConfig
from lmforge.data.pii import PIIConfig
from lmforge.data.quality import QualityConfig


@dataclass
class ExecutorConfig:
    kind: Literal["local", "ray", "slurm"] = "local"
    workers: int = 0  # 0 = run.workers
    tasks: int = 0  # 0 = one task per input file
    ray_address: str = ""  # "" = start/attach a local Ray instance
    slurm_partition: str = ""
    slurm_time: str = "04:00:00"
    slurm_cpus_per_task: int = 2
    slurm_mem: str = "8G"


@dataclass
class DataConfig:
    # input files: paths or globs (relative to the recipe), or tables {path=..., source=..., ...}
    inputs: list[Any] = field(default_factory=list)
    outputs: list[Literal["jsonl.zst", "parquet"]] = field(default_factory=lambda: ["jsonl.zst"])
    shard_docs: int = 50_000  # documents per output shard
    sample_removed: int = 20  # removed documents kept per filter and reason, for inspection
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
