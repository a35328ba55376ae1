"""Gopher heuristics (Rae et al. 2021, table A1): repetition and quality rules.

Both filters follow FineWeb's settings by default. A threshold set to 0 turns that rule
off. Drop reasons name the rule (`dup_para_frac`, `top_2_gram`, `gopher_short_doc`, ...).

Speed: the repetition filter splits words with `text.split_words`; its n-grams are 64-bit
hashes computed with numpy from the words' (cached) string hashes, and the sequential
duplicated-n-gram scan visits only the positions whose n-gram occurs more than once. The
quality filter needs only counts, so it never builds the word list: `text.token_stats`
counts the distinct whitespace chunks in C and sums their memoised per-chunk token
statistics with one numpy product (the same numbers `split_words` + `word_stats` give).
Nothing is cached from one filter to the next: each filter costs the same alone as in the
pipeline.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from lmforge.data.document import Document
from lmforge.data.filters.text import split_words, token_stats
from lmforge.data.step import Filter

_PARAGRAPH_SPLIT = re.compile(r"\n{2,}")
_LINE_SPLIT = re.compile(r"\n+")


def duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items equal to an earlier item, total characters of those items)."""
    counts = Counter(items)
    if len(counts) == len(items):
        return 0, 0
    return len(items) - len(counts), sum(len(x) * (k - 1) for x, k in counts.items() if k > 1)


# Random odd 64-bit multipliers: an n-gram's hash is sum(hash(word_j) * _MULT[j]) mod 2**64.
_MULT = np.random.default_rng(20240601).integers(1, 2**63, size=64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


class WordArrays:
    """Per-document arrays for n-gram statistics: word hashes and cumulative word lengths."""

    def __init__(self, words: list[str]):
        self.n = len(words)
        self.h = np.fromiter(map(hash, words), dtype=np.int64, count=self.n).view(np.uint64)
        self.cum = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, words), dtype=np.int64, count=self.n), out=self.cum[1:])

    def ngram_hashes(self, n: int) -> np.ndarray:
        m = self.n - n + 1
        out = self.h[:m] * _MULT[0]
        for j in range(1, n):
            out += self.h[j : j + m] * _MULT[j % len(_MULT)]
        return out

    def chars(self, starts: np.ndarray | int, n: int):
        """Characters of the n-grams starting at `starts` (words joined without spaces)."""
        return self.cum[starts + n] - self.cum[starts]


def top_ngram_chars(wa: WordArrays, n: int) -> int:
    """Characters covered by the most frequent word n-gram (words joined by spaces) times its
    count. Ties go to the n-gram that appears first."""
    m = wa.n - n + 1
    if m <= 0:
        return 0
    h = wa.ngram_hashes(n)
    order = np.argsort(h, kind="stable")  # equal hashes stay in position order
    sh = h[order]
    starts = np.flatnonzero(np.concatenate(([True], sh[1:] != sh[:-1])))
    counts = np.diff(np.append(starts, m))
    best = counts.max()
    i = int(order[starts[counts == best]].min())  # first position of each group; earliest wins
    return int(wa.chars(i, n) + n - 1) * int(best)


def _repeated_positions(h: np.ndarray) -> np.ndarray:
    """Sorted positions whose value occurs more than once in `h`."""
    order = np.argsort(h)
    sh = h[order]
    eq = sh[1:] == sh[:-1]
    if not eq.any():
        return order[:0]
    mask = np.zeros(len(h), dtype=bool)
    mask[1:] |= eq
    mask[:-1] |= eq
    return np.sort(order[mask])


def duplicated_ngram_chars(wa: WordArrays, n: int, stop_above: float = 0) -> int:
    """Characters (words joined without spaces) in n-grams that repeat an earlier n-gram, scanning
    left to right and jumping past each repeat (so overlapping repeats are not counted twice).
    Stops early once the count exceeds `stop_above` (if > 0)."""
    return _duplicated(wa, n, stop_above)[0]


def _duplicated(wa: WordArrays, n: int, stop_above: float = 0) -> tuple[int, bool]:
    """(duplicated characters, whether any n-gram occurs twice)."""
    if wa.n < n:
        return 0, False
    hashes = wa.ngram_hashes(n)
    multi = _repeated_positions(hashes)  # positions whose n-gram occurs more than once
    if not len(multi):
        return 0, False
    # Only those positions can be repeats or make later ones repeats: scan them in order.
    chars = wa.chars(multi, n).tolist()
    seen: set[int] = set()
    add = seen.add
    rep = 0
    next_free = 0
    for p, h, c in zip(multi.tolist(), hashes[multi].tolist(), chars):
        if p < next_free:
            continue  # inside the n-gram just counted
        if h in seen:
            rep += c
            if stop_above and rep > stop_above:
                return rep, True
            next_free = p + n
        else:
            add(h)
    return rep, True


@dataclass
class GopherRepetitionConfig:
    enabled: bool = True
    keep_fraction: float = 0.0  # keep this seeded fraction of what the filter would drop
    dup_line_frac: float = 0.3  # max fraction of lines that repeat an earlier line
    dup_para_frac: float = 0.3  # max fraction of paragraphs (split on blank lines) that repeat
    dup_line_char_frac: float = 0.2  # max fraction of characters in repeated lines
    dup_para_char_frac: float = 0.2  # max fraction of characters in repeated paragraphs
    # [n, max fraction of characters in the most frequent n-gram]
    top_n_grams: list[list[float]] = field(default_factory=lambda: [[2, 0.2], [3, 0.18], [4, 0.16]])
    # [n, max fraction of characters in repeated n-grams]
    dup_n_grams: list[list[float]] = field(
        default_factory=lambda: [[5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12], [9, 0.11], [10, 0.10]]
    )

    def validate(self) -> None:
        _check_keep(self.keep_fraction)
        for key in ("dup_line_frac", "dup_para_frac", "dup_line_char_frac", "dup_para_char_frac"):
            v = getattr(self, key)
            if not 0 <= v <= 1:
                raise ValueError(f"{key} must be in [0, 1] (0 turns the rule off), got {v}")
        for key in ("top_n_grams", "dup_n_grams"):
            for pair in getattr(self, key):
                if len(pair) != 2 or pair[0] < 1 or pair[0] != int(pair[0]) or not 0 <= pair[1] <= 1:
                    raise ValueError(f"{key} entries must be [n, fraction] with integer n >= 1 and fraction in [0, 1], got {pair}")


class GopherRepetitionFilter(Filter):
    name = "gopher_repetition"

    def __init__(self, cfg: GopherRepetitionConfig | None = None, seed: int = 0, sample_removed: int = 20):
        self.cfg = cfg = cfg or GopherRepetitionConfig()
        super().__init__(cfg.keep_fraction, seed, sample_removed)
        self.top = [(int(n), f) for n, f in cfg.top_n_grams if f]
        self.dup = [(int(n), f) for n, f in cfg.dup_n_grams if f]

    def decide(self, doc: Document) -> str | None:
        c = self.cfg
        text = doc.text
        if not text:
            return "empty"
        size = len(text)
        paragraphs = _PARAGRAPH_SPLIT.split(text.strip())
        n_dup, dup_chars = duplicates(paragraphs)
        if c.dup_para_frac and n_dup / len(paragraphs) > c.dup_para_frac:
            return "dup_para_frac"
        if c.dup_para_char_frac and dup_chars / size > c.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINE_SPLIT.split(text)
        n_dup, dup_chars = duplicates(lines)
        if c.dup_line_frac and n_dup / len(lines) > c.dup_line_frac:
            return "dup_line_frac"
        if c.dup_line_char_frac and dup_chars / size > c.dup_line_char_frac:
            return "dup_line_char_frac"
        wa = WordArrays(split_words(text))
        for n, frac in self.top:
            if wa.n >= n and top_ngram_chars(wa, n) / size > frac:
                return f"top_{n}_gram"
        no_repeat_from = None  # no n-gram of this length repeats, hence no longer one either
        for n, frac in self.dup:
            if no_repeat_from is not None and n >= no_repeat_from:
                continue
            rep, any_repeat = _duplicated(wa, n, stop_above=frac * size)
            if rep / size > frac:
                return f"duplicated_{n}_n_grams"
            if not any_repeat and (no_repeat_from is None or n < no_repeat_from):
                no_repeat_from = n
        return None


# line separators other than "\n" that str.splitlines() also breaks on
_ODD_LINE_BREAK = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_BULLET_LINE = re.compile(r"^[^\S\n]*[-•]", re.MULTILINE)
_ELLIPSIS_LINE = re.compile(r"(?:\.\.\.|…)[^\S\n]*$", re.MULTILINE)

STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]


@dataclass
class GopherQualityConfig:
    enabled: bool = True
    keep_fraction: float = 0.0
    min_doc_words: int = 50  # words that are not only punctuation
    max_doc_words: int = 100_000
    min_avg_word_length: float = 3
    max_avg_word_length: float = 10
    max_symbol_word_ratio: float = 0.1  # "#" or "..." per word
    max_bullet_lines_ratio: float = 0.9  # lines starting with "-" or a bullet
    max_ellipsis_lines_ratio: float = 0.3  # lines ending with "..." or an ellipsis
    min_alpha_words_ratio: float = 0.8  # words with at least one letter
    min_stop_words: int = 2  # distinct stop words that must occur
    stop_words: list[str] = field(default_factory=lambda: list(STOP_WORDS))

    def validate(self) -> None:
        _check_keep(self.keep_fraction)
        for key in ("min_doc_words", "max_doc_words", "min_stop_words", "min_avg_word_length", "max_avg_word_length"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0 (0 turns the rule off), got {getattr(self, key)}")
        for key in ("max_symbol_word_ratio", "max_bullet_lines_ratio", "max_ellipsis_lines_ratio", "min_alpha_words_ratio"):
            v = getattr(self, key)
            if not 0 <= v <= 1:
                raise ValueError(f"{key} must be in [0, 1] (0 turns the rule off), got {v}")


class GopherQualityFilter(Filter):
    name = "gopher_quality"

    def __init__(self, cfg: GopherQualityConfig | None = None, seed: int = 0, sample_removed: int = 20):
        self.cfg = cfg = cfg or GopherQualityConfig()
        super().__init__(cfg.keep_fraction, seed, sample_removed)
        self.stop_words = frozenset(cfg.stop_words)

    def decide(self, doc: Document) -> str | None:
        c = self.cfg
        text = doc.text
        ts = token_stats(text)
        n_words = ts.tokens
        n_sym, sym_chars, n_alpha = ts.symbols, ts.symbol_chars, ts.alpha
        n_real = n_words - n_sym
        if c.min_doc_words and n_real < c.min_doc_words:
            return "gopher_short_doc"
        if c.max_doc_words and n_real > c.max_doc_words:
            return "gopher_long_doc"
        if n_words == 0 or n_real == 0:
            return "gopher_short_doc"
        avg = (ts.chars - sym_chars) / n_real
        if c.min_avg_word_length and avg < c.min_avg_word_length:
            return "gopher_below_avg_threshold"
        if c.max_avg_word_length and avg > c.max_avg_word_length:
            return "gopher_above_avg_threshold"
        n_ellipsis = text.count("...") + text.count("…")
        if c.max_symbol_word_ratio:
            if text.count("#") / n_words > c.max_symbol_word_ratio:
                return "gopher_too_many_hashes"
            if n_ellipsis / n_words > c.max_symbol_word_ratio:
                return "gopher_too_many_ellipsis"
        if _ODD_LINE_BREAK.search(text) is None:  # only "\n" breaks lines: count with one regex each
            n_lines = text.count("\n") + (not text.endswith("\n")) or 1
            bullets = len(_BULLET_LINE.findall(text)) if c.max_bullet_lines_ratio else 0
            ends = len(_ELLIPSIS_LINE.findall(text)) if c.max_ellipsis_lines_ratio and n_ellipsis else 0
        else:
            lines = text.splitlines() or [""]
            n_lines = len(lines)
            bullets = sum(1 for s in lines if s.lstrip().startswith(("•", "-")))
            ends = sum(1 for s in lines if s.rstrip().endswith(("...", "…")))
        if c.max_bullet_lines_ratio and bullets / n_lines > c.max_bullet_lines_ratio:
            return "gopher_too_many_bullets"
        if c.max_ellipsis_lines_ratio and ends / n_lines > c.max_ellipsis_lines_ratio:
            return "gopher_too_many_end_ellipsis"
        if c.min_alpha_words_ratio:
            if n_alpha / n_words < c.min_alpha_words_ratio:
                return "gopher_below_alpha_threshold"
        if c.min_stop_words and not ts.has_tokens(self.stop_words, c.min_stop_words):
            return "gopher_few_stop_words"
        return None


def _check_keep(v: float) -> None:
    if not 0 <= v <= 1:
        raise ValueError(f"keep_fraction must be in [0, 1], got {v}")
