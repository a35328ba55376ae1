"""Topic clustering: numpy k-means, tf-idf names, map and centroids; the topic filter."""

import argparse
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest
import zstandard

from lmforge.config import build
from lmforge.data.corpus_io import write_shard
from lmforge.data.document import Document
from lmforge.data.quality import QualityConfig, build_quality_steps
from lmforge.data.quality.commands import register
from lmforge.data.quality.topics import TopicConfig, TopicFilter, compute_topics, kmeans, load_centroids, top_terms
from lmforge.errors import ConfigError, InputError

SAMPLE = Path(__file__).resolve().parents[2] / "src" / "lmforge" / "sample"


def test_kmeans_recovers_separated_blobs():
    rng = np.random.default_rng(0)
    centers = np.array([[0, 0], [10, 0], [0, 10]], float)
    x = np.concatenate([c + rng.normal(size=(50, 2)) for c in centers])
    cent, labels, inertia = kmeans(x, 3, seed=1)
    for i in range(3):  # each blob is one cluster
        assert len(set(labels[i * 50:(i + 1) * 50])) == 1
    assert len(set(labels)) == 3
    assert np.allclose(sorted(cent.round().tolist()), sorted(centers.tolist()), atol=1)
    assert inertia < 150 * 3
    with pytest.raises(ConfigError, match="k must be"):
        kmeans(x, 500)
    # restarts keep the best of several seeds
    noisy = rng.normal(size=(200, 5))
    assert kmeans(noisy, 6, seed=0, n_init=4)[2] <= min(kmeans(noisy, 6, seed=s)[2] for s in range(4)) + 1e-6


def test_top_terms_name_clusters_by_distinctive_words():
    texts = ["the python code imports module"] * 5 + ["the poem about love and moon"] * 5
    labels = np.array([0] * 5 + [1] * 5)
    terms = top_terms(texts, labels, 2, n_terms=3)
    assert "the" not in terms[0] and set(terms[0]) <= {"python", "code", "imports", "module"}
    assert set(terms[1]) <= {"poem", "about", "love", "and", "moon"} and "the" not in terms[1]


def _docs():
    with gzip.open(SAMPLE / "dictionary" / "gcide-sample.jsonl.gz", "rt") as f:
        dic = [r for r in map(json.loads, f) if len(r["text"]) > 200][:20]
    with gzip.open(SAMPLE / "multilingual" / "manpages-sample.jsonl.gz", "rt") as f:
        man = [r for r in map(json.loads, f) if r["lang"] == "en"][:20]
    with open(SAMPLE / "multilingual" / "fortunes-sample.jsonl.zst", "rb") as raw:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8").read().splitlines()
    fort = [r for r in map(json.loads, lines) if r["lang"] == "ru"][:20]
    return ([Document(r["id"], r["text"], {"source": "dictionary"}) for r in dic]
            + [Document(r["id"], r["text"], {"source": "manpages"}) for r in man]
            + [Document(r["id"], r["text"], {"source": "fortunes"}) for r in fort])


@pytest.fixture(scope="module")
def topics(tmp_path_factory):
    run = tmp_path_factory.mktemp("topics") / "run"
    write_shard(run / "corpus" / "shard_00000.jsonl.zst", _docs())
    summary = compute_topics(run, k=3, sample=1000, seed=0, max_chars=300)
    return run, summary


def test_compute_topics_writes_everything(topics):
    run, summary = topics
    out = run / "corpus" / "topics"
    for name in ("topics.json", "centroids.safetensors", "topic_map.png", "assignments.jsonl"):
        assert (out / name).is_file(), name
    assert (out / "topic_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["sample"] == 60 and sum(c["size"] for c in summary["clusters"]) == 60
    # three real, very different sources: each cluster should be dominated by one source
    purity = [max(c["sources"].values()) / c["size"] for c in summary["clusters"]]
    assert min(purity) >= 0.8
    assert all(c["terms"] and c["examples"] for c in summary["clusters"])
    cent, names = load_centroids(out / "centroids.safetensors")
    assert cent.shape == (3, 384) and len(names) == 3
    assert len((out / "assignments.jsonl").read_text().splitlines()) == 60


def _cluster_of(summary, source):
    return next(c["id"] for c in summary["clusters"] if max(c["sources"], key=c["sources"].get) == source)


def test_topic_filter_keep_boost_tag(topics):
    run, summary = topics
    cpath = run / "corpus" / "topics" / "centroids.safetensors"
    man = _cluster_of(summary, "manpages")
    docs = _docs()[14:26]  # 6 dictionary entries, 6 manual pages
    keep = TopicFilter(build(TopicConfig, {"enabled": True, "centroids": str(cpath), "mode": "keep", "clusters": [man], "max_chars": 300}, "t"), cpath)
    kept = list(keep(iter([Document(d.id, d.text, dict(d.metadata)) for d in docs])))
    assert {d.metadata["source"] for d in kept} == {"manpages"} and len(kept) >= 5
    assert keep.stats.dropped["topic_not_selected"] == 12 - len(kept)

    boost = TopicFilter(TopicConfig(enabled=True, centroids="x", mode="boost", clusters=[man], boost=3, max_chars=300), cpath)
    out = list(boost(iter([Document(d.id, d.text, dict(d.metadata)) for d in docs])))
    copies = [d for d in out if "#boost" in d.id]
    assert len(copies) == 2 * len(kept) and boost.stats.counters["boost_copies"] == len(copies)

    tag = TopicFilter(TopicConfig(enabled=True, centroids="x", mode="tag", max_chars=300), cpath)
    out = list(tag(iter([Document(d.id, d.text, dict(d.metadata)) for d in docs])))
    assert len(out) == 12 and all(isinstance(d.metadata["topic"], int) and d.metadata["topic_name"] for d in out)


def test_config_errors(topics, tmp_path):
    run, _ = topics
    with pytest.raises(ConfigError, match="clusters must name"):
        build(QualityConfig, {"topic": {"enabled": True, "centroids": "c", "mode": "keep"}}, "data.quality")
    cfg = build(QualityConfig, {"enabled": True, "topic": {"enabled": True, "centroids": str(run / "corpus/topics/centroids.safetensors"), "mode": "keep", "clusters": [7]}}, "data.quality")
    with pytest.raises(ConfigError, match="cluster 7 does not exist"):
        build_quality_steps(cfg, 0, 5)
    with pytest.raises(InputError, match="centroids not found"):
        load_centroids(tmp_path / "none.safetensors")
    with pytest.raises(InputError, match="fewer than k"):
        compute_topics(run, k=200)


def test_topics_cli(topics, tmp_path, capsys):
    run, _ = topics
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["topics", str(run), "--k", "2", "--sample", "16", "--out", str(tmp_path / "t")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "| id | size |" in out and (tmp_path / "t" / "topic_map.png").is_file()
