"""C4 rules (Raffel et al. 2020): line cleaning plus a few whole-document rules.

Per line (the document is split on line breaks): drop lines with a word longer than
`max_word_length`, remove citation marks like `[1]` / `[edit]`, drop lines without terminal
punctuation (off in FineWeb's settings), lines with fewer than `min_words_per_line` words,
lines mentioning "javascript" and lines with cookie/terms-of-use boilerplate. The whole
document is dropped when a kept line contains "lorem ipsum" or a curly bracket, or when
the kept lines hold fewer than `min_num_sentences` sentences. A kept document's text
becomes its kept lines joined by newlines; per-line outcomes are counted in
`stats.counters` (`line_total`, `line_kept`, `line_dropped:<rule>`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from lmforge.data.document import Document
from lmforge.data.filters.gopher import _check_keep
from lmforge.data.filters.text import count_sentences
from lmforge.data.step import Filter

_CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_PHRASES = ["terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies"]


@dataclass
class C4Config:
    enabled: bool = True
    keep_fraction: float = 0.0
    split_paragraph: bool = True  # lines are the units (false: sentences)
    remove_citations: bool = True
    filter_no_terminal_punct: bool = False  # FineWeb turns C4's harshest rule off
    min_num_sentences: int = 5  # -1 turns the rule off
    min_words_per_line: int = 3  # -1 turns the rule off
    max_word_length: int = 1000  # -1 turns the rule off
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True
    policy_phrases: list[str] = field(default_factory=lambda: list(POLICY_PHRASES))

    def validate(self) -> None:
        _check_keep(self.keep_fraction)
        for key in ("min_num_sentences", "min_words_per_line", "max_word_length"):
            if getattr(self, key) < -1:
                raise ValueError(f"{key} must be >= -1 (-1 turns the rule off), got {getattr(self, key)}")


class C4Filter(Filter):
    """Rewrites the text of documents it keeps (only the kept lines remain)."""

    name = "c4"

    def __init__(self, cfg: C4Config | None = None, seed: int = 0, sample_removed: int = 20):
        self.cfg = cfg = cfg or C4Config()
        super().__init__(cfg.keep_fraction, seed, sample_removed)
        self.policy = [p.lower() for p in cfg.policy_phrases]

    def decide(self, doc: Document) -> str | None:
        c = self.cfg
        counters = self.stats.counters
        if c.split_paragraph:
            units = doc.text.splitlines()
        else:
            from lmforge.data.filters.text import split_sentences

            units = split_sentences(doc.text)
        need = c.min_num_sentences
        n_sent = 0
        kept: list[str] = []
        dropped: dict[str, int] = {}
        for line in units:
            line = line.strip()
            words = line.split()
            if c.max_word_length != -1 and any(len(w) > c.max_word_length for w in words):
                dropped["too_long_word"] = dropped.get("too_long_word", 0) + 1
                continue
            if c.remove_citations and "[" in line:
                line = _CITATION.sub("", line)
            if c.filter_no_terminal_punct and (not line.endswith(_END_PUNCTUATION) or line.endswith("...")):
                dropped["no_terminal_punct"] = dropped.get("no_terminal_punct", 0) + 1
                continue
            if len(words) < c.min_words_per_line:
                dropped["too_few_words"] = dropped.get("too_few_words", 0) + 1
                continue
            low = line.lower()
            if c.filter_lorem_ipsum and "lorem ipsum" in low:
                return "lorem_ipsum"
            if c.filter_javascript and "javascript" in low:
                dropped["javascript"] = dropped.get("javascript", 0) + 1
                continue
            if c.filter_curly_bracket and "{" in line:
                return "curly_bracket"
            if c.filter_policy and any(p in low for p in self.policy):
                dropped["policy"] = dropped.get("policy", 0) + 1
                continue
            if need != -1 and n_sent < need:
                n_sent += count_sentences(line, limit=need) if c.split_paragraph else 1
            kept.append(line)
        counters["line_total"] += len(units)
        counters["line_kept"] += len(kept)
        for k, v in dropped.items():
            counters[f"line_dropped:{k}"] += v
        if n_sent < need:
            return "too_few_sentences"
        doc.text = ("\n" if c.split_paragraph else " ").join(kept).strip()
        return None
