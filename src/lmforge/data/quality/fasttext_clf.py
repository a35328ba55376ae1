"""fastText quality classifier: word unigrams + bigrams (wordNgrams=2), trained from good and
bad examples; the filter keeps documents whose P(good) reaches a threshold.

Training uses the `fasttext` library (fasttext-wheel; with only fasttext-predict installed it
fails with a message naming the package), inference either build of it
(`lmforge.data.fasttext_compat`); this module prepares the
examples (lowercased word tokens on one line), splits a held-out set deterministically by
text hash, balances the classes, reports held-out accuracy/precision/recall, and writes the
model atomically with a `<model>.json` sidecar holding those metrics.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import xxhash

from lmforge.data import fasttext_compat
from lmforge.data.document import Document
from lmforge.data.quality.common import ScoreFilter, one_line
from lmforge.errors import ConfigError, InputError
from lmforge.log import logger
from lmforge.rundir import atomic_write_json, read_json

LABELS = ("good", "bad")


@dataclass
class FastTextConfig:
    enabled: bool = False
    model: str = ""  # path to a model written by `lmforge data train-quality --kind fasttext`
    threshold: float = 0.5  # keep documents with P(good) >= threshold
    keep_fraction: float = 0.0  # share of would-be-dropped documents kept anyway (seeded)
    max_chars: int = 10_000  # characters of each document the classifier reads

    def validate(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if not 0.0 <= self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in [0, 1], got {self.keep_fraction}")
        if self.enabled and not self.model:
            raise ValueError("fasttext.model is required when the fastText filter is enabled (train one with `lmforge data train-quality`)")


def _unit(text: str, salt: str) -> float:
    return xxhash.xxh64_intdigest(f"{salt}\x00{text}".encode("utf-8", "surrogatepass")) / 2.0**64


def split_examples(good: Iterable[str], bad: Iterable[str], valid_fraction: float, seed: int, balance: bool = True, max_chars: int = 10_000, max_per_class: int = 0, prep=None):
    """(train, valid) lists of (label, prepared text); held-out membership is a hash of the text,
    so the same example always lands on the same side. Empty texts and exact duplicates are
    skipped. `prep` prepares a text (default: one lowercased line of tokens, fastText's format)."""
    prep = prep or (lambda t: one_line(t, max_chars))
    data = {}
    for label, texts in (("good", good), ("bad", bad)):
        seen, rows = set(), []
        for t in texts:
            line = prep(t)
            if not line or line in seen:  # exact duplicates would leak between train and valid
                continue
            seen.add(line)
            rows.append(line)
        data[label] = rows
    if not data["good"] or not data["bad"]:
        raise InputError(f"need examples of both classes, got {len(data['good'])} good and {len(data['bad'])} bad")
    for label in data:  # deterministic order independent of input order
        data[label].sort(key=lambda s: _unit(s, f"{seed}:order"))
    if balance:
        n = min(len(v) for v in data.values())
        data = {k: v[:n] for k, v in data.items()}
    if max_per_class:
        data = {k: v[:max_per_class] for k, v in data.items()}
    train, valid = [], []
    for label, rows in data.items():
        for line in rows:
            (valid if _unit(line, f"{seed}:split") < valid_fraction else train).append((label, line))
    train.sort(key=lambda r: _unit(r[1], f"{seed}:shuffle"))
    return train, valid


def binary_metrics(truth: list[str], pred: list[str], positive: str = "bad") -> dict:
    tp = sum(t == positive and p == positive for t, p in zip(truth, pred))
    fp = sum(t != positive and p == positive for t, p in zip(truth, pred))
    fn = sum(t == positive and p != positive for t, p in zip(truth, pred))
    correct = sum(t == p for t, p in zip(truth, pred))
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {
        "n": len(truth),
        "accuracy": round(correct / len(truth), 4) if truth else 0.0,
        f"precision_{positive}": round(prec, 4),
        f"recall_{positive}": round(rec, 4),
        f"f1_{positive}": round(2 * prec * rec / (prec + rec), 4) if prec + rec else 0.0,
    }


def train_fasttext(
    good: Iterable[str],
    bad: Iterable[str],
    out_path: str | Path,
    *,
    valid_fraction: float = 0.1,
    seed: int = 0,
    epoch: int = 20,
    lr: float = 0.1,
    dim: int = 64,
    word_ngrams: int = 2,
    min_count: int = 2,
    balance: bool = True,
    max_chars: int = 10_000,
    max_per_class: int = 0,
) -> dict:
    """Train a good/bad fastText classifier; write it to `out_path` (+ `.json` metrics). Returns the metrics."""
    fasttext = fasttext_compat.training_module()
    if not 0.0 <= valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    train, valid = split_examples(good, bad, valid_fraction, seed, balance, max_chars, max_per_class)
    if not train:
        raise InputError("no training examples left after the held-out split")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_path.parent) as tmp:
        tf = Path(tmp) / "train.txt"
        with open(tf, "w", encoding="utf-8") as f:
            for label, line in train:
                f.write(f"__label__{label} {line}\n")
        try:
            model = fasttext.train_supervised(
                str(tf), epoch=epoch, lr=lr, dim=dim, wordNgrams=word_ngrams, minCount=min_count,
                loss="softmax", seed=seed, thread=1, verbose=0, bucket=200_000,
            )
        except RuntimeError as e:  # fastText diverged ("Encountered NaN")
            raise ConfigError(f"fastText training failed ({e}); lower the learning rate (--lr, now {lr})") from None
        tmp_model = Path(tmp) / "model.bin"
        model.save_model(str(tmp_model))
        os.replace(tmp_model, out_path)
    metrics = {
        "kind": "fasttext",
        "labels": list(LABELS),
        "params": {"epoch": epoch, "lr": lr, "dim": dim, "word_ngrams": word_ngrams, "min_count": min_count, "seed": seed, "balance": balance},
        "train": {"good": sum(r[0] == "good" for r in train), "bad": sum(r[0] == "bad" for r in train)},
        "valid": {"good": sum(r[0] == "good" for r in valid), "bad": sum(r[0] == "bad" for r in valid)},
    }
    if valid:
        probs = good_probability(model, [line for _, line in valid], preprocessed=True)
        pred = ["good" if p >= 0.5 else "bad" for p in probs]
        metrics["heldout"] = binary_metrics([lab for lab, _ in valid], pred)
    atomic_write_json(str(out_path) + ".json", metrics)
    logger.info("fastText classifier -> %s (%s)", out_path, metrics.get("heldout", "no held-out set"))
    return metrics


_MODELS: dict[str, object] = {}


def load_fasttext(path: str | Path):
    """Load (once per process) a fastText model; InputError if it is missing or unreadable."""
    key = str(Path(path).resolve())
    if key not in _MODELS:
        if not Path(path).is_file():
            raise InputError(f"fastText model not found: {path} (train one with `lmforge data train-quality --kind fasttext`)")
        _MODELS[key] = fasttext_compat.load(path)
    return _MODELS[key]


def good_probability(model, texts: list[str], preprocessed: bool = False, max_chars: int = 10_000) -> list[float]:
    """P(label good) for each text."""
    out = []
    for t in texts:
        line = t if preprocessed else one_line(t, max_chars)
        probs = {lab.removeprefix("__label__"): p for lab, p in fasttext_compat.predict(model, line, 2, "strict")}
        out.append(min(1.0, max(0.0, probs.get("good", 1.0 - probs.get("bad", 0.0)))))
    return out


def model_info(path: str | Path) -> dict:
    return read_json(str(path) + ".json", {}) or {}


class FastTextQualityFilter(ScoreFilter):
    """Writes `metadata["fasttext_quality"]` = P(good); drops documents below the threshold."""

    name = "fasttext_quality"
    key = "fasttext_quality"
    reason = "fasttext_low_quality"
    batch_size = 256

    def __init__(self, cfg: FastTextConfig, model_path: Path, seed: int = 0, sample_removed: int = 20):
        super().__init__(cfg.keep_fraction, seed, sample_removed)
        self.cfg = cfg
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise InputError(f"[data.quality.fasttext] model not found: {self.model_path}")

    def score_batch(self, docs: list[Document]) -> list[float]:
        return good_probability(load_fasttext(self.model_path), [d.text for d in docs], max_chars=self.cfg.max_chars)

    def passes(self, score: float, doc: Document) -> bool:
        return score >= self.cfg.threshold
