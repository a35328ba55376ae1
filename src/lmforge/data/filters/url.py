"""URL block-list filter: blocked domains, banned words and substrings in the URL.

A document is dropped (reason in brackets) when its `metadata["url"]`:
- has a host that is a blocked domain or a subdomain of one [`domain`],
- is listed in full in a blocked-URL file [`url`],
- contains a banned word as a whole word (URL lowercased, split on non-alphanumerics) [`banned_word`],
- contains at least `soft_word_threshold` distinct "soft" words [`soft_words`],
- contains a banned substring once non-alphanumerics are removed [`banned_subword`].

The lists come from `lmforge/data/resources/url_*.txt` (short lists written for lmforge;
turn them off with `use_builtin_lists = false`) plus any files the config names (one entry
per line, `#` comments). Documents without a URL are kept and counted (`no_url`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from lmforge.data.document import Document
from lmforge.data.filters.gopher import _check_keep
from lmforge.data.step import Filter
from lmforge.errors import ConfigError

RESOURCES = Path(__file__).resolve().parents[1] / "resources"
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


@dataclass
class URLConfig:
    enabled: bool = True
    keep_fraction: float = 0.0
    use_builtin_lists: bool = True  # lmforge's own short lists in lmforge/data/resources/
    domain_files: list[str] = field(default_factory=list)  # more blocked domains, one per line
    url_files: list[str] = field(default_factory=list)  # blocked full URLs, one per line
    banned_word_files: list[str] = field(default_factory=list)
    soft_word_files: list[str] = field(default_factory=list)
    banned_subword_files: list[str] = field(default_factory=list)
    extra_domains: list[str] = field(default_factory=list)  # inline additions
    extra_banned_words: list[str] = field(default_factory=list)
    soft_word_threshold: int = 2

    def validate(self) -> None:
        _check_keep(self.keep_fraction)
        if self.soft_word_threshold < 1:
            raise ValueError(f"soft_word_threshold must be >= 1, got {self.soft_word_threshold}")


def read_list(path: Path, key: str) -> list[str]:
    """Entries of a list file: stripped non-empty lines, `#` comments skipped."""
    if not path.is_file():
        raise ConfigError(f"{key}: list file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: cannot read list file {path}: {e}") from None
    return [s.strip() for s in lines if s.strip() and not s.lstrip().startswith("#")]


def _norm_word(w: str) -> str:
    return _NON_ALNUM.sub("", w.lower())


class URLFilter(Filter):
    name = "url"

    def __init__(self, cfg: URLConfig | None = None, seed: int = 0, sample_removed: int = 20, base_dir: Path | None = None):
        self.cfg = cfg = cfg or URLConfig()
        super().__init__(cfg.keep_fraction, seed, sample_removed)
        base = Path(base_dir) if base_dir else Path.cwd()

        def load(builtin: str | None, files: list[str], key: str) -> list[str]:
            out = read_list(RESOURCES / builtin, key) if builtin and cfg.use_builtin_lists else []
            for i, f in enumerate(files):
                p = Path(f).expanduser()
                out += read_list(p if p.is_absolute() else base / p, f"data.filters.url.{key}[{i}]")
            return out

        domains = load("url_block_domains.txt", cfg.domain_files, "domain_files") + list(cfg.extra_domains)
        self.domains = frozenset(d.lower().strip(".") for d in domains)
        self.urls = frozenset(load(None, cfg.url_files, "url_files"))
        words = load("url_banned_words.txt", cfg.banned_word_files, "banned_word_files") + list(cfg.extra_banned_words)
        self.banned = frozenset(filter(None, map(_norm_word, words)))
        self.soft = frozenset(filter(None, map(_norm_word, load("url_soft_words.txt", cfg.soft_word_files, "soft_word_files"))))
        subs = sorted(set(filter(None, map(_norm_word, load("url_banned_subwords.txt", cfg.banned_subword_files, "banned_subword_files")))))
        self.subwords = re.compile("|".join(map(re.escape, subs))) if subs else None

    def decide(self, doc: Document) -> str | None:
        url = doc.metadata.get("url")
        if not url or not isinstance(url, str):
            self.stats.counters["no_url"] += 1
            return None
        try:
            host = (urlsplit(url if "//" in url else "//" + url).hostname or "").rstrip(".")
        except ValueError:
            host = ""
        if host and self.domains:
            parts = host.split(".")
            for i in range(len(parts) - 1):
                if ".".join(parts[i:]) in self.domains:
                    return "domain"
        if url in self.urls:
            return "url"
        low = url.lower()
        words = set(_NON_ALNUM.split(low))
        if not self.banned.isdisjoint(words):
            return "banned_word"
        if len(self.soft.intersection(words)) >= self.cfg.soft_word_threshold:
            return "soft_words"
        if self.subwords is not None and self.subwords.search(_NON_ALNUM.sub("", low)):
            return "banned_subword"
        return None
