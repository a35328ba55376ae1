"""Toxicity / adult-content filter: multilingual word lists (en, de, es, it, ru, fr, pl, in
`resources/toxicity/`, written for this project) plus an optional fastText classifier
(trained with `lmforge data train-quality --kind fasttext`, clean texts as --good and toxic
ones as --bad). A document is flagged when it contains at least `min_hits` listed words, or
when the classifier's P(bad) reaches `classifier_threshold`. Like every filter, a seeded
`keep_fraction` of the flagged documents is kept anyway (default 5%: the model should see a
little of this language, tagged, rather than none).

Metadata written: `toxicity_hits` (listed words found), `toxicity_words` (up to five of
them) and, with a classifier, `toxicity_score`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from lmforge.data.document import Document
from lmforge.data.step import Filter
from lmforge.errors import ConfigError, InputError

LANGUAGES = ("en", "de", "es", "it", "ru", "fr", "pl")


@dataclass
class ToxicityConfig:
    enabled: bool = False
    languages: list[str] = field(default_factory=lambda: list(LANGUAGES))  # word lists applied to every document
    min_hits: int = 1  # listed words needed to flag a document
    keep_fraction: float = 0.05  # share of flagged documents kept anyway (seeded, tagged kept_despite)
    extra_words: list[str] = field(default_factory=list)  # more entries (same syntax as the lists: `stem*` or word)
    lists_dir: str = ""  # directory of <lang>.txt lists replacing the bundled ones
    classifier: str = ""  # optional fastText good/bad model; "" = word lists only
    classifier_threshold: float = 0.8  # flag when P(bad) >= this

    def validate(self) -> None:
        bad = [x for x in self.languages if x not in LANGUAGES] if not self.lists_dir else []
        if bad:
            raise ValueError(f"languages: no bundled word list for {bad[0]!r}; bundled: {', '.join(LANGUAGES)} (or set lists_dir)")
        if self.min_hits < 1:
            raise ValueError(f"min_hits must be >= 1, got {self.min_hits}")
        if not 0.0 <= self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in [0, 1], got {self.keep_fraction}")
        if not 0.0 <= self.classifier_threshold <= 1.0:
            raise ValueError(f"classifier_threshold must be in [0, 1], got {self.classifier_threshold}")


def read_list(text: str) -> list[str]:
    return [ln.split("#", 1)[0].strip().lower() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]


def load_entries(languages: list[str], lists_dir: str | Path = "", extra: list[str] | None = None) -> list[str]:
    entries: list[str] = []
    for lang in languages:
        if lists_dir:
            p = Path(lists_dir) / f"{lang}.txt"
            if not p.is_file():
                raise InputError(f"toxicity word list not found: {p}")
            entries += read_list(p.read_text(encoding="utf-8"))
        else:
            entries += read_list(resources.files("lmforge.data.quality").joinpath(f"resources/toxicity/{lang}.txt").read_text(encoding="utf-8"))
    entries += [e.strip().lower() for e in (extra or []) if e.strip()]
    if not entries:
        raise ConfigError("[data.quality.toxicity]: the word lists are empty")
    return entries


_TOKEN = re.compile(r"\w+", re.UNICODE)


class WordMatcher:
    """Whole-word and `stem*` matching by tokens: the text is lowercased and split into
    Unicode words once (in C), then each word is looked up in a set of whole words and its
    prefixes in a set of stems (one lookup per distinct stem length)."""

    def __init__(self, entries: list[str]):
        self.words = {e for e in entries if not e.endswith("*")}
        self.stems = {e[:-1] for e in entries if e.endswith("*")}
        self.lengths = sorted({len(s) for s in self.stems})

    def match(self, w: str) -> bool:
        if w in self.words:
            return True
        n = len(w)
        for k in self.lengths:
            if k > n:
                return False
            if w[:k] in self.stems:
                return True
        return False

    def hits(self, text: str) -> list[str]:
        toks = _TOKEN.findall(text.lower())
        found = [w for w in set(toks) if self.match(w)]
        if not found:
            return []
        found_set = set(found)
        return [w for w in toks if w in found_set]


class ToxicityFilter(Filter):
    name = "toxicity"

    def __init__(self, cfg: ToxicityConfig, classifier_path: Path | None = None, seed: int = 0, sample_removed: int = 20):
        super().__init__(cfg.keep_fraction, seed, sample_removed)
        self.cfg = cfg
        self.matcher = WordMatcher(load_entries(cfg.languages, cfg.lists_dir, cfg.extra_words))
        self.classifier_path = Path(classifier_path) if classifier_path else None
        if self.classifier_path and not self.classifier_path.is_file():
            raise InputError(f"[data.quality.toxicity] classifier not found: {self.classifier_path}")

    def hits(self, text: str) -> list[str]:
        return self.matcher.hits(text)

    def decide(self, doc: Document) -> str | None:
        found = self.hits(doc.text)
        doc.metadata["toxicity_hits"] = len(found)
        if found:
            doc.metadata["toxicity_words"] = sorted(set(found))[:5]
        flagged = None
        if len(found) >= self.cfg.min_hits:
            flagged = "toxic_words"
        if self.classifier_path is not None:
            from lmforge.data.quality.fasttext_clf import good_probability, load_fasttext

            p_bad = 1.0 - good_probability(load_fasttext(self.classifier_path), [doc.text])[0]
            doc.metadata["toxicity_score"] = round(p_bad, 5)
            if flagged is None and p_bad >= self.cfg.classifier_threshold:
                flagged = "toxic_classifier"
        return flagged


def flag_texts(texts: list[str], cfg: ToxicityConfig | None = None) -> list[bool]:
    """Whether each text would be flagged (before the stochastic keep): for evaluation."""
    f = ToxicityFilter(cfg or ToxicityConfig())
    return [f.decide(Document(str(i), t)) is not None for i, t in enumerate(texts)]
