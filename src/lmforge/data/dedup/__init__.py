"""Deduplication: exact (content hash), MinHash LSH, Bloom filter, substring, line-level, decontamination."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DedupConfig:
    enabled: bool = True
