"""Configuration of the data stage: `[data]` in a recipe.

Sub-sections belong to the modules that implement them (extract, langid, filters, pii,
dedup, quality); this file only composes them and holds inputs, outputs and the executor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge.data.dedup import DedupConfig
from lmforge.data.extract import ExtractConfig
from lmforge.data.filters import FiltersConfig
from lmforge.data.langid import LangIdConfig
from lmforge.data.paths import resolve_under
from lmforge.data.pii import PIIConfig
from lmforge.data.quality import QualityConfig


@dataclass
class ExecutorConfig:
    kind: Literal["local", "ray", "slurm"] = "local"
    workers: int = 0  # 0 = run.workers
    tasks: int = 0  # 0 = one task per input file; more = the largest files are split into slices
    ray_address: str = ""  # "" = start a local Ray instance for the run
    slurm_partition: str = ""
    slurm_time: str = "04:00:00"
    slurm_cpus_per_task: int = 2
    slurm_mem: str = "8G"
    slurm_submit: bool = True  # submit with `sbatch --wait` when sbatch is on PATH; else write the script and stop

    def validate(self) -> None:
        if self.workers < 0:
            raise ValueError(f"executor.workers must be >= 0, got {self.workers}")
        if self.tasks < 0:
            raise ValueError(f"executor.tasks must be >= 0, got {self.tasks}")


@dataclass
class DataConfig:
    # input files: paths or globs (relative to the recipe), or tables
    # {path=..., source=..., skip=[...], format="auto", text_key="text", pattern="**/*"}
    inputs: list[Any] = field(default_factory=list)
    outputs: list[Literal["jsonl.zst", "parquet"]] = field(default_factory=lambda: ["jsonl.zst"])
    shard_docs: int = 50_000  # documents per output shard
    sample_removed: int = 20  # removed documents kept per filter and reason, for inspection
    top_domains: int = 50  # domains listed in stats.json / the report, by kept tokens
    keep_work: bool = False  # keep corpus/.work (intermediate shards, markers) after a complete run
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    langid: LangIdConfig = field(default_factory=LangIdConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    def validate(self) -> None:
        if self.shard_docs < 1:
            raise ValueError(f"shard_docs must be >= 1, got {self.shard_docs}")
        if not self.outputs:
            raise ValueError("outputs must name at least one format: 'jsonl.zst', 'parquet'")
        if self.sample_removed < 0:
            raise ValueError(f"sample_removed must be >= 0, got {self.sample_removed}")
        from lmforge.data.readers import parse_inputs

        parse_inputs(self.inputs)  # raises ConfigError naming the bad entry

    def input_fingerprint(self, base: Path) -> str:
        """Fingerprint of the input files (path, size, mtime): the stage reruns when they change."""
        import functools

        from lmforge.data.readers import expand_inputs, parse_inputs
        from lmforge.rundir import file_fingerprint

        files = expand_inputs(parse_inputs(self.inputs), functools.partial(resolve_under, str(base)))
        paths = []
        for f in files:
            p = Path(f.path)
            paths.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
        return file_fingerprint(paths)
