"""Heuristic quality filters (Gopher, C4, FineWeb, URL block-list), FineWeb defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FiltersConfig:
    enabled: bool = True
