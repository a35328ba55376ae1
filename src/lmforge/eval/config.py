"""Configuration of the evaluation stage: `[eval]` in a recipe, also the options of `lmforge eval`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.errors import ConfigError


@dataclass
class EvalConfig:
    # built-in task names (perplexity, dictionary, cloze, cloze_gen) or paths of task .toml specs
    tasks: list[str] = field(default_factory=lambda: ["perplexity", "dictionary", "cloze"])
    checkpoints: str = "all"  # "latest", "all", or comma-separated steps ("100,200")
    checkpoint_dir: str = ""  # "" = the run's checkpoints/ (every run under it)
    tokenizer: str = ""  # "" = the run's tokenizer/
    docs: list[str] = field(default_factory=list)  # corpus dirs / JSONL files for perplexity and cloze; [] = the run's corpus/ (CLI: the bundled sample)
    dictionary: str = ""  # GCIDE JSONL for the dictionary task; "" = the bundled sample's
    limit: int = 200  # examples per multiple-choice task (generative: half)
    heldout_per_mille: int = 50  # documents whose id hashes into the last N of 1000 buckets are held out
    docs_per_source: int = 20  # held-out documents per source for perplexity and cloze
    val_docs: int = 50  # documents of tokens/val scored as the "val" source (0 = off; only in a run)
    batch_tokens: int = 8192  # tokens per multiple-choice forward (rows x row length)
    bootstrap: int = 1000  # bootstrap resamples for standard errors (0 = off)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int | None = None  # None = the recipe's run.seed
    plots: bool = True

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("eval.tasks is empty: name at least one task")
        for k in ("limit", "docs_per_source", "batch_tokens"):
            if getattr(self, k) < 1:
                raise ConfigError(f"eval.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("bootstrap", "val_docs"):
            if getattr(self, k) < 0:
                raise ConfigError(f"eval.{k} must be >= 0, got {getattr(self, k)}")
        if not 1 <= self.heldout_per_mille <= 1000:
            raise ConfigError(f"eval.heldout_per_mille must be in [1, 1000], got {self.heldout_per_mille}")
        c = self.checkpoints
        if c not in ("latest", "all") and not all(p.strip().isdigit() for p in c.split(",")):
            raise ConfigError(f"eval.checkpoints = {c!r}: use 'latest', 'all' or comma-separated step numbers")
