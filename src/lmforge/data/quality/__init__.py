"""ML quality and content filters: fastText classifier, embedding scorer, perplexity, toxicity, topics.

`[data.quality]` in a recipe has one sub-section per step, each with `enabled` (and
`keep_fraction` where it drops). `build_quality_steps` turns the enabled ones into pipeline
steps, in this order: toxicity (cheapest), fastText, perplexity, embedding, topic.
Models are trained with `lmforge data train-quality`, topic centroids computed with
`lmforge data topics` (see docs/quality.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from lmforge.data.quality.embedding import EmbeddingConfig
from lmforge.data.quality.fasttext_clf import FastTextConfig
from lmforge.data.quality.perplexity import PerplexityConfig
from lmforge.data.quality.topics import TopicConfig
from lmforge.data.quality.toxicity import ToxicityConfig


@dataclass
class QualityConfig:
    enabled: bool = False  # master switch: false skips every sub-section
    fasttext: FastTextConfig = field(default_factory=FastTextConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    toxicity: ToxicityConfig = field(default_factory=ToxicityConfig)
    topic: TopicConfig = field(default_factory=TopicConfig)


def build_quality_steps(cfg: QualityConfig, seed: int, sample_removed: int, resolve: Callable[[str], Path] | None = None) -> list:
    """The enabled quality steps, ready to chain. `resolve` maps a model path from the recipe
    to a real path (pass StageContext.resolve so paths are relative to the recipe)."""
    if not cfg.enabled:
        return []
    res = resolve or (lambda p: Path(p))
    steps = []
    if cfg.toxicity.enabled:
        from lmforge.data.quality.toxicity import ToxicityFilter

        clf = res(cfg.toxicity.classifier) if cfg.toxicity.classifier else None
        steps.append(ToxicityFilter(cfg.toxicity, clf, seed, sample_removed))
    if cfg.fasttext.enabled:
        from lmforge.data.quality.fasttext_clf import FastTextQualityFilter

        steps.append(FastTextQualityFilter(cfg.fasttext, res(cfg.fasttext.model), seed, sample_removed))
    if cfg.perplexity.enabled:
        from lmforge.data.quality.perplexity import PerplexityFilter

        steps.append(PerplexityFilter(cfg.perplexity, res(cfg.perplexity.model), seed, sample_removed))
    if cfg.embedding.enabled:
        from lmforge.data.quality.embedding import EmbeddingQualityFilter

        md = res(cfg.embedding.model_dir) if cfg.embedding.model_dir else ""
        steps.append(EmbeddingQualityFilter(cfg.embedding, res(cfg.embedding.head), md, seed, sample_removed))
    if cfg.topic.enabled:
        from lmforge.data.quality.topics import TopicFilter

        steps.append(TopicFilter(cfg.topic, res(cfg.topic.centroids), "", seed, sample_removed))
    return steps


__all__ = ["QualityConfig", "build_quality_steps", "FastTextConfig", "EmbeddingConfig", "PerplexityConfig", "ToxicityConfig", "TopicConfig"]
