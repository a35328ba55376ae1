"""Heuristic quality filters (URL block-list, Gopher, C4, FineWeb), FineWeb defaults.

`build_filters(cfg, seed, sample_removed)` returns the enabled filters in FineWeb's order:
url, gopher_repetition, gopher_quality, c4, fineweb. Each is a `lmforge.data.step.Filter`
(C4 also rewrites the text of documents it keeps). Recipe sections:

    [data.filters]                    # enabled = false turns them all off
    [data.filters.gopher_quality]     # enabled, keep_fraction and every threshold
    min_doc_words = 50
    [data.filters.url]
    domain_files = ["blocked.txt"]    # relative to the recipe when the stage passes base_dir

`keep_fraction` (each filter) keeps a seeded, per-document random fraction of what that
filter would drop (stochastic removal); kept documents are marked in metadata["kept_despite"].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lmforge.data.filters.c4 import C4Config, C4Filter
from lmforge.data.filters.fineweb import FineWebConfig, FineWebFilter
from lmforge.data.filters.gopher import (
    GopherQualityConfig,
    GopherQualityFilter,
    GopherRepetitionConfig,
    GopherRepetitionFilter,
)
from lmforge.data.filters.url import URLConfig, URLFilter
from lmforge.data.step import Step

ORDER = ("url", "gopher_repetition", "gopher_quality", "c4", "fineweb")


@dataclass
class FiltersConfig:
    enabled: bool = True
    url: URLConfig = field(default_factory=URLConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)


def build_filters(cfg: FiltersConfig, seed: int = 0, sample_removed: int = 20, base_dir: str | Path | None = None) -> list[Step]:
    """The enabled filters in FineWeb's order. `base_dir` resolves relative list-file paths."""
    if not cfg.enabled:
        return []
    steps: list[Step] = []
    if cfg.url.enabled:
        steps.append(URLFilter(cfg.url, seed, sample_removed, base_dir=Path(base_dir) if base_dir else None))
    if cfg.gopher_repetition.enabled:
        steps.append(GopherRepetitionFilter(cfg.gopher_repetition, seed, sample_removed))
    if cfg.gopher_quality.enabled:
        steps.append(GopherQualityFilter(cfg.gopher_quality, seed, sample_removed))
    if cfg.c4.enabled:
        steps.append(C4Filter(cfg.c4, seed, sample_removed))
    if cfg.fineweb.enabled:
        steps.append(FineWebFilter(cfg.fineweb, seed, sample_removed))
    return steps


__all__ = [
    "ORDER", "FiltersConfig", "build_filters", "URLConfig", "URLFilter", "GopherRepetitionConfig",
    "GopherRepetitionFilter", "GopherQualityConfig", "GopherQualityFilter", "C4Config", "C4Filter",
    "FineWebConfig", "FineWebFilter",
]
