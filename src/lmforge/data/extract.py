"""HTML -> main text (trafilatura), with a per-document time limit."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ExtractConfig:
    enabled: bool = True
    timeout_s: float = 1.0
