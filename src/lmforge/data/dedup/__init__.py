"""Deduplication: exact (content hash), MinHash LSH, Bloom filter, substring, line-level, decontamination.

`[data.dedup]` composes one sub-section per method; `build_passes` turns it into the list of
corpus passes the data pipeline runs, in this order:

    exact -> decontam -> lines -> minhash -> bloom -> substring

Exact dedup is cheapest and shrinks the rest; decontamination removes documents that
overlap evaluation data before anything else picks survivors among their copies; line
dedup strips boilerplate lines before the near-duplicate methods compare documents (so
shared boilerplate cannot make documents look alike); substring dedup, the most expensive,
runs last on the smallest corpus. Every pass writes one output shard per input shard.
See docs/dedup.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lmforge.data.dedup.bloom import BloomConfig
from lmforge.data.dedup.decontam import DecontamConfig
from lmforge.data.dedup.exact import ExactDedupConfig
from lmforge.data.dedup.lines import LinesConfig
from lmforge.data.dedup.minhash import MinhashConfig
from lmforge.data.dedup.substring import SubstringConfig

ORDER = ("exact", "decontam", "lines", "minhash", "bloom", "substring")


@dataclass
class DedupConfig:
    enabled: bool = True
    exact: ExactDedupConfig = field(default_factory=ExactDedupConfig)  # on
    decontam: DecontamConfig = field(default_factory=DecontamConfig)  # off until eval_files are given
    lines: LinesConfig = field(default_factory=LinesConfig)  # off
    minhash: MinhashConfig = field(default_factory=MinhashConfig)  # on
    bloom: BloomConfig = field(default_factory=BloomConfig)  # off
    substring: SubstringConfig = field(default_factory=SubstringConfig)  # off


def build_passes(cfg: DedupConfig, resolve: Callable[[str], Path] | None = None) -> list:
    """The enabled dedup passes in ORDER (exact first). `resolve` maps relative paths in the
    config (minhash.index, decontam.eval_files) to absolute ones; default: the current directory."""
    from lmforge.data.dedup.bloom import BloomDedupPass
    from lmforge.data.dedup.decontam import DecontamPass
    from lmforge.data.dedup.exact import ExactDedupPass
    from lmforge.data.dedup.lines import LineDedupPass
    from lmforge.data.dedup.minhash import MinhashDedupPass
    from lmforge.data.dedup.substring import SubstringDedupPass

    if not cfg.enabled:
        return []
    res = resolve or (lambda p: Path(p).expanduser().resolve())
    make = {
        "exact": ExactDedupPass,
        "decontam": lambda c: DecontamPass(c, res),
        "lines": LineDedupPass,
        "minhash": lambda c: MinhashDedupPass(c, res),
        "bloom": BloomDedupPass,
        "substring": SubstringDedupPass,
    }
    passes = []
    for name in ORDER:
        sub = getattr(cfg, name)
        if getattr(sub, "enabled", False) and (name != "decontam" or sub.eval_files):
            passes.append(make[name](sub))
    return passes


__all__ = ["DedupConfig", "build_passes", "ORDER"]
