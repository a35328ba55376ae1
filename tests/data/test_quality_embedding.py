"""Embedding quality scorer: MiniLM sentence embeddings (loaded once per session) + linear head."""

import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
import zstandard

from lmforge.config import build
from lmforge.data.document import Document
from lmforge.data.quality import QualityConfig, build_quality_steps
from lmforge.data.quality import embedding as E
from lmforge.errors import ConfigError, InputError

SAMPLE = Path(__file__).resolve().parents[2] / "src" / "lmforge" / "sample"


def dictionary(n):
    with gzip.open(SAMPLE / "dictionary" / "gcide-sample.jsonl.gz", "rt") as f:
        return [t for t in (json.loads(l)["text"] for l in f) if len(t) > 200][:n]


def fortunes(n):
    with open(SAMPLE / "multilingual" / "fortunes-sample.jsonl.zst", "rb") as raw:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8").read().splitlines()
    return [r["text"] for r in map(json.loads, lines) if r["lang"] == "en"][:n]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    path = tmp_path_factory.mktemp("emb") / "head.safetensors"
    info = E.train_embedding_head(dictionary(50), fortunes(50), path, valid_fraction=0.2, seed=0, batch_size=32, max_chars=300)
    return path, info


def test_embeddings_are_normalised_and_meaningful():
    x = E.embed(["The cat sat on the mat.", "A kitten rested on the rug.", "Quarterly revenue exceeded forecasts."])
    assert x.shape == (3, 384) and x.dtype == np.float32
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-4)
    assert x[0] @ x[1] > x[0] @ x[2]
    assert E.embed([]).shape == (0, 384)


def test_logistic_head_learns_and_reports(head):
    path, info = head
    assert path.is_file() and info["head"] == "logistic"
    assert info["heldout"]["accuracy"] >= 0.8
    w, b, kind = E.load_head(path)
    assert w.shape == (384,) and kind == "logistic"


def test_filter_scores_in_batches(head):
    cfg = build(E.EmbeddingConfig, {"enabled": True, "head": str(head[0]), "threshold": 0.5, "batch_size": 8, "max_chars": 300}, "e")
    f = E.EmbeddingQualityFilter(cfg, head[0])
    docs = [Document(f"g{i}", t) for i, t in enumerate(dictionary(62)[50:])] + [Document(f"b{i}", t) for i, t in enumerate(fortunes(62)[50:])]
    kept = list(f(iter(docs)))
    assert all(0.0 <= d.metadata["embedding_quality"] <= 1.0 for d in docs)
    assert sum(d.id.startswith("g") for d in kept) >= 10 and sum(d.id.startswith("b") for d in kept) <= 2
    assert f.stats.docs_in == 24 and f.stats.dropped["embedding_low_quality"] == 24 - len(kept)


def test_ridge_head_on_numeric_scores(tmp_path):
    # FineWeb-Edu style: numeric annotations instead of classes (here: 3 for dictionary prose, 0 for quips)
    scored = [(t, 3.0) for t in dictionary(30)] + [(t, 0.0) for t in fortunes(30)]
    info = E.train_embedding_head(None, None, tmp_path / "edu.safetensors", scored=scored, valid_fraction=0.25, max_chars=300)
    assert info["head"] == "ridge" and info["heldout"]["mae"] < 1.2
    w, b, kind = E.load_head(tmp_path / "edu.safetensors")
    s = E.head_scores(E.embed(dictionary(35)[30:] + fortunes(35)[30:], max_chars=300), w, b, kind)
    assert s[:5].mean() > s[5:].mean() + 1.0


def test_quality_steps_and_errors(head, tmp_path):
    cfg = build(QualityConfig, {"enabled": True, "embedding": {"enabled": True, "head": head[0].name}}, "data.quality")
    (step,) = build_quality_steps(cfg, 0, 5, resolve=lambda p: head[0].parent / p)
    assert step.name == "embedding_quality"
    with pytest.raises(ConfigError, match="batch_size"):
        build(QualityConfig, {"embedding": {"batch_size": 0}}, "data.quality")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not an embedding head"):
        E.load_head(tmp_path / "bad.safetensors")
    with pytest.raises(InputError, match="no sentence-transformers model"):
        E.get_encoder(tmp_path)
