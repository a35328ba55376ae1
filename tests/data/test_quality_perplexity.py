"""Kneser-Ney n-gram perplexity: normalisation, training on real text, threshold and bucket filtering."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import xxhash

from lmforge.config import build
from lmforge.data.document import Document
from lmforge.data.quality import QualityConfig, build_quality_steps
from lmforge.data.quality import perplexity as P
from lmforge.data.quality.common import words
from lmforge.errors import ConfigError, InputError

SAMPLE = Path(__file__).resolve().parents[2] / "src" / "lmforge" / "sample"


def _dictionary():
    with gzip.open(SAMPLE / "dictionary" / "gcide-sample.jsonl.gz", "rt") as f:
        return [json.loads(l)["text"] for l in f]


def _manpages(lang="en"):
    with gzip.open(SAMPLE / "multilingual" / "manpages-sample.jsonl.gz", "rt") as f:
        return [r["text"] for r in map(json.loads, f) if r["lang"] == lang]


@pytest.fixture(scope="module")
def dict_model(tmp_path_factory):
    texts = _dictionary()
    path = tmp_path_factory.mktemp("kn") / "dict5.npz"
    info = P.train_kn(texts[:2500], path, order=5, calibrate=texts[5000:5300])
    return path, info


def _ids(tokens, bos=True):
    ids = ([int(P._BOS)] if bos else []) + [xxhash.xxh64_intdigest(t.encode("utf-8")) for t in tokens]
    return np.array(ids, dtype=np.uint64)


def test_conditional_distributions_sum_to_one(tmp_path):
    texts = ["the cat sat on the mat\nthe dog sat on the log", "a cat and a dog\nthe cat ate the rat"] * 2
    P.train_kn(texts, tmp_path / "m.npz", order=3)
    m = P.load_kn(tmp_path / "m.npz")
    vocab = sorted({w for t in texts for w in words(t)})
    for ctx in ([], ["the"], ["the", "cat"], ["sat", "on"], ["never", "seen"]):
        base = P.seq_logprob(m, _ids(ctx))[0]
        total = sum(np.exp(P.seq_logprob(m, _ids(ctx + [w]))[0] - base) for w in vocab)
        total += np.exp(P.seq_logprob(m, np.append(_ids(ctx), P._EOS).astype(np.uint64))[0] - base)
        total += np.exp(P.seq_logprob(m, _ids(ctx + ["<an unseen word>"]))[0] - base)  # <unk> mass
        assert total == pytest.approx(1.0, abs=1e-4), ctx


def test_seen_continuations_beat_unseen(tmp_path):
    P.train_kn(["the cat sat on the mat"] * 5 + ["a dog ran"], tmp_path / "m.npz", order=3)
    m = P.load_kn(tmp_path / "m.npz")
    seen = P.seq_logprob(m, _ids(["the", "cat", "sat"]))[0]
    unseen = P.seq_logprob(m, _ids(["the", "cat", "ran"]))[0]
    assert seen > unseen


def test_in_domain_text_has_lower_perplexity(dict_model):
    m = P.load_kn(dict_model[0])
    held_out = P.perplexities(m, _dictionary()[5600:5700])
    man = P.perplexities(m, _manpages("en")[:40])
    german = P.perplexities(m, _manpages("de")[:20])
    assert np.median(held_out) < np.median(man) < np.median(german)
    info = dict_model[1]
    assert info["order"] == 5 and info["ngrams"]["5"] > 1000
    assert 0 < info["cutoffs"][0] < info["cutoffs"][1]
    assert json.loads(Path(str(dict_model[0]) + ".json").read_text())["cutoffs"] == info["cutoffs"]


def test_threshold_filter(dict_model):
    cfg = build(P.PerplexityConfig, {"enabled": True, "model": str(dict_model[0]), "max_perplexity": 400.0}, "data.quality.perplexity")
    f = P.PerplexityFilter(cfg, dict_model[0])
    docs = [Document(f"d{i}", t) for i, t in enumerate(_dictionary()[5600:5650])] + [Document(f"m{i}", t) for i, t in enumerate(_manpages("de")[:20])]
    kept = list(f(iter(docs)))
    assert all("perplexity" in d.metadata and d.metadata["perplexity_bucket"] in P.BUCKETS for d in docs)
    assert sum(d.id.startswith("d") for d in kept) >= 40
    assert sum(d.id.startswith("m") for d in kept) <= 2
    assert f.stats.dropped["perplexity_too_high"] == len(docs) - len(kept)


def test_bucket_filter_keeps_head_and_middle(dict_model):
    cfg = build(P.PerplexityConfig, {"enabled": True, "model": "x", "mode": "bucket", "keep_buckets": ["head"]}, "q")
    f = P.PerplexityFilter(cfg, dict_model[0])
    docs = [Document(f"d{i}", t) for i, t in enumerate(_dictionary()[5600:5750])]
    kept = list(f(iter(docs)))
    assert 0 < len(kept) < len(docs)
    assert all(d.metadata["perplexity_bucket"] == "head" for d in kept)
    assert all(d.metadata["perplexity"] <= f.cutoffs()[0] for d in kept)


def test_config_and_input_errors(tmp_path):
    with pytest.raises(ConfigError, match="keep_buckets"):
        build(QualityConfig, {"perplexity": {"keep_buckets": ["top"]}}, "data.quality")
    with pytest.raises(ConfigError, match="'data.quality.perplexity.mode'"):
        build(QualityConfig, {"perplexity": {"mode": "median"}}, "data.quality")
    with pytest.raises(ConfigError, match="cutoffs"):
        build(QualityConfig, {"perplexity": {"cutoffs": [50.0, 10.0]}}, "data.quality")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not an n-gram model"):
        P.load_kn(bad)
    with pytest.raises(InputError, match="no text"):
        P.train_kn(["", "   "], tmp_path / "m.npz")
    cfg = build(QualityConfig, {"enabled": True, "perplexity": {"enabled": True, "model": "nope.npz"}}, "data.quality")
    with pytest.raises(InputError, match="model not found"):
        build_quality_steps(cfg, 0, 5, resolve=lambda p: tmp_path / p)


def test_empty_document_scores_infinite(dict_model):
    m = P.load_kn(dict_model[0])
    assert np.isinf(P.perplexities(m, ["", "  \n "])).all()
