"""FineWeb's own quality rules (Penedo et al. 2024), applied after Gopher and C4.

A document is dropped when too few of its (non-blank) lines end in terminal punctuation
(`line_punct_ratio`), when most lines are short (`short_line_ratio`), when repeated lines
hold more than `char_duplicates_ratio` of its characters (`char_dup_ratio`), or when it is
mostly a list: too many line breaks per word (`list_ratio`).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.data.document import Document
from lmforge.data.filters.gopher import _check_keep, duplicates
from lmforge.data.filters.text import TERMINAL_PUNCTUATION, count_tokens
from lmforge.data.step import Filter


@dataclass
class FineWebConfig:
    enabled: bool = True
    keep_fraction: float = 0.0
    line_punct_thr: float = 0.12  # min fraction of lines ending in terminal punctuation
    line_punct_exclude_zero: bool = False  # true: documents with no such line at all pass this rule
    stop_chars: list[str] | None = None  # line endings that count as terminal punctuation; default: every Unicode sentence terminal
    short_line_thr: float = 0.67  # max fraction of short lines
    short_line_length: int = 30  # a line this long or shorter is short
    char_duplicates_ratio: float = 0.01  # max fraction of characters in repeated lines
    new_line_ratio: float = 0.3  # max line breaks per word

    def validate(self) -> None:
        _check_keep(self.keep_fraction)
        for key in ("line_punct_thr", "short_line_thr", "char_duplicates_ratio"):
            v = getattr(self, key)
            if not 0 <= v <= 1:
                raise ValueError(f"{key} must be in [0, 1], got {v}")
        if self.short_line_length < 0 or self.new_line_ratio < 0:
            raise ValueError("short_line_length and new_line_ratio must be >= 0")
        if self.stop_chars is not None and (not self.stop_chars or not all(self.stop_chars)):
            raise ValueError("stop_chars must be a non-empty list of non-empty strings")


class FineWebFilter(Filter):
    name = "fineweb"

    def __init__(self, cfg: FineWebConfig | None = None, seed: int = 0, sample_removed: int = 20):
        self.cfg = cfg = cfg or FineWebConfig()
        super().__init__(cfg.keep_fraction, seed, sample_removed)
        self.stop_chars = tuple(cfg.stop_chars) if cfg.stop_chars else tuple(sorted(TERMINAL_PUNCTUATION))
        # single characters (the default): a set lookup on the last character
        self.stop_set = frozenset(self.stop_chars) if all(len(s) == 1 for s in self.stop_chars) else None

    def decide(self, doc: Document) -> str | None:
        c = self.cfg
        text = doc.text
        lines = [ln for ln in text.split("\n") if ln.strip()]
        if not lines:
            return "empty"
        n = len(lines)
        if self.stop_set is not None:
            stop = self.stop_set
            ratio = sum(1 for ln in lines if ln[-1] in stop) / n
        else:
            ratio = sum(1 for ln in lines if ln.endswith(self.stop_chars)) / n
        if ratio < c.line_punct_thr and not (ratio == 0 and c.line_punct_exclude_zero):
            return "line_punct_ratio"
        if sum(1 for ln in lines if len(ln) <= c.short_line_length) / n > c.short_line_thr:
            return "short_line_ratio"
        if duplicates(lines)[1] / max(1, len(text) - text.count("\n")) > c.char_duplicates_ratio:
            return "char_dup_ratio"
        if text.count("\n") / max(1, count_tokens(text)) > c.new_line_ratio:
            return "list_ratio"
        return None
