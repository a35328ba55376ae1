"""ML quality and content filters: fastText classifier, embedding scorer, perplexity, toxicity, topics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class QualityConfig:
    enabled: bool = False
