"""Topic coverage: embed a sample of a corpus (all-MiniLM-L6-v2), cluster it with k-means
(k-means++ seeding, Lloyd iterations, written here in numpy), name each cluster by its top
tf-idf terms, report sizes and example documents, and draw a 2-D map (PCA projection,
matplotlib PNG).

`compute_topics(corpus, out_dir)` writes to `out_dir` (default `corpus/topics/`):
- `topics.json`: k, sample size, per cluster {id, name, terms, size, share, examples};
- `centroids.safetensors`: the k unit-norm centroids (the topic filter's input);
- `topic_map.png`: the PCA map; `assignments.jsonl`: document id -> cluster for the sample.

The topic filter (`[data.quality.topic]`) assigns every document to its nearest saved
centroid (cosine), writes `metadata["topic"]` / `metadata["topic_name"]`, and either keeps
only chosen clusters (`mode = "keep"`), repeats documents of chosen clusters `boost` times
(`mode = "boost"`; copies get ids `<id>#boost<i>`), or only tags (`mode = "tag"`).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np

from lmforge.data.corpus_io import iter_corpus, list_shards
from lmforge.data.document import Document
from lmforge.data.quality.common import ScoreFilter, words
from lmforge.data.step import doc_uniform
from lmforge.errors import ConfigError, InputError
from lmforge.log import logger
from lmforge.rundir import atomic_file, atomic_write_json, atomic_write_text


@dataclass
class TopicConfig:
    enabled: bool = False
    centroids: str = ""  # centroids.safetensors written by `lmforge data topics`
    mode: Literal["keep", "boost", "tag"] = "tag"
    clusters: list[int] = field(default_factory=list)  # chosen cluster ids (see topics.json)
    boost: int = 2  # mode=boost: copies of each chosen document (including the original)
    keep_fraction: float = 0.0  # mode=keep: share of unchosen documents kept anyway
    batch_size: int = 32
    max_chars: int = 2000

    def validate(self) -> None:
        if self.enabled and not self.centroids:
            raise ValueError("topic.centroids is required when the topic filter is enabled (compute them with `lmforge data topics`)")
        if self.mode in ("keep", "boost") and self.enabled and not self.clusters:
            raise ValueError(f"topic.clusters must name at least one cluster id for mode={self.mode!r}")
        if self.boost < 1:
            raise ValueError(f"boost must be >= 1, got {self.boost}")
        if not 0.0 <= self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in [0, 1], got {self.keep_fraction}")


# ---------------------------------------------------------------- k-means


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 100, tol: float = 1e-6, n_init: int = 1) -> tuple[np.ndarray, np.ndarray, float]:
    """k-means++ seeding + Lloyd iterations, best of `n_init` seeded restarts.
    Returns (centroids [k,d], labels [n], inertia)."""
    if n_init > 1:
        runs = [kmeans(x, k, seed + i, iters, tol) for i in range(n_init)]
        return min(runs, key=lambda r: r[2])
    n = len(x)
    if not 1 <= k <= n:
        raise ConfigError(f"k must be between 1 and the number of documents ({n}), got {k}")
    rng = np.random.default_rng(seed)
    x = x.astype(np.float64)
    sq = (x * x).sum(1)
    cent = np.empty((k, x.shape[1]))
    cent[0] = x[rng.integers(n)]
    d2 = np.maximum(sq - 2 * x @ cent[0] + cent[0] @ cent[0], 0)
    for i in range(1, k):
        total = d2.sum()
        j = rng.choice(n, p=d2 / total) if total > 0 else rng.integers(n)
        cent[i] = x[j]
        d2 = np.minimum(d2, np.maximum(sq - 2 * x @ cent[i] + cent[i] @ cent[i], 0))
    prev = np.inf
    for _ in range(iters):
        dist = sq[:, None] - 2 * x @ cent.T + (cent * cent).sum(1)[None, :]
        labels = dist.argmin(1)
        inertia = float(np.maximum(dist[np.arange(n), labels], 0).sum())
        for c in range(k):
            members = labels == c
            if members.any():
                cent[c] = x[members].mean(0)
            else:  # re-seed an empty cluster with the point farthest from its centroid
                far = int(dist[np.arange(n), labels].argmax())
                cent[c] = x[far]
        if prev - inertia <= tol * max(prev, 1.0):
            break
        prev = inertia
    dist = sq[:, None] - 2 * x @ cent.T + (cent * cent).sum(1)[None, :]
    labels = dist.argmin(1)
    return cent.astype(np.float32), labels, float(np.maximum(dist[np.arange(n), labels], 0).sum())


def top_terms(texts: list[str], labels: np.ndarray, k: int, n_terms: int = 6, min_len: int = 3) -> list[list[str]]:
    """Per cluster, the terms with the highest (share of the cluster's documents containing
    the term) x (inverse document frequency over the whole sample)."""
    doc_sets = []
    for t in texts:
        doc_sets.append({w for w in words(t[:5000]) if len(w) >= min_len and not w.isdigit() and any(ch.isalpha() for ch in w)})
    df = Counter()
    for s in doc_sets:
        df.update(s)
    n = len(texts)
    out = []
    for c in range(k):
        idx = np.nonzero(labels == c)[0]
        cdf = Counter()
        for i in idx:
            cdf.update(doc_sets[i])
        size = max(len(idx), 1)
        ranked = sorted(cdf, key=lambda w: (-(cdf[w] / size) * math.log(n / df[w]), w))
        out.append([w for w in ranked if cdf[w] >= min(2, size)][:n_terms])
    return out


def pca2(x: np.ndarray) -> np.ndarray:
    xc = x - x.mean(0)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[:2].T


def plot_map(xy: np.ndarray, labels: np.ndarray, names: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 7), dpi=100)
    k = len(names)
    cmap = plt.get_cmap("tab20" if k > 10 else "tab10")
    for c in range(k):
        m = labels == c
        if not m.any():
            continue
        ax.scatter(xy[m, 0], xy[m, 1], s=6, alpha=0.6, color=cmap(c % cmap.N), label=f"{c}: {names[c]}")
        cx, cy = xy[m].mean(0)
        ax.annotate(str(c), (cx, cy), fontsize=10, weight="bold", ha="center", va="center",
                    bbox=dict(boxstyle="round,pad=0.2", fc="white", alpha=0.8))
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)


def sample_corpus(docs: Iterable[Document], n: int, seed: int) -> list[Document]:
    """The n documents with the smallest seeded id hash (order-independent, one pass, bounded memory)."""
    import heapq

    heap: list[tuple[float, str, Document]] = []
    for d in docs:
        u = -doc_uniform(d.id, f"{seed}:topics")
        if len(heap) < n:
            heapq.heappush(heap, (u, d.id, d))
        elif u > heap[0][0]:
            heapq.heapreplace(heap, (u, d.id, d))
    return [d for _, _, d in sorted(heap, key=lambda t: (-t[0], t[1]))]


def corpus_dir_of(path: str | Path) -> Path:
    p = Path(path)
    d = p / "corpus" if (p / "corpus").is_dir() else p
    if not d.is_dir():
        raise InputError(f"corpus not found: {path}")
    if not list_shards(d):
        raise InputError(f"{d}: no corpus shards (*.jsonl.zst)")
    return d


def compute_topics(corpus: str | Path, out_dir: str | Path | None = None, k: int = 12, sample: int = 2000, seed: int = 0,
                   batch_size: int = 32, max_chars: int = 2000, n_terms: int = 6, n_examples: int = 3, model_dir: str = "",
                   n_init: int = 1) -> dict:
    """Cluster a sample of `corpus` into k topics; write topics.json, centroids, map, assignments."""
    from lmforge.data.quality.embedding import embed

    cdir = corpus_dir_of(corpus)
    out = Path(out_dir) if out_dir else cdir / "topics"
    if sample < 1:
        raise ConfigError(f"sample must be >= 1, got {sample}")
    docs = [d for d in sample_corpus(iter_corpus(cdir), sample, seed) if d.text.strip()]
    if len(docs) < k:
        raise InputError(f"{cdir}: {len(docs)} documents sampled, fewer than k={k} clusters")
    logger.info("topics: embedding %d documents", len(docs))
    x = embed([d.text for d in docs], batch_size, max_chars, model_dir, show_progress=True)
    cent, labels, inertia = kmeans(x, k, seed, n_init=n_init)
    cent_unit = cent / np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
    terms = top_terms([d.text for d in docs], labels, k, n_terms)
    names = [", ".join(t[:3]) or f"cluster {c}" for c, t in enumerate(terms)]
    clusters = []
    for c in range(k):
        idx = np.nonzero(labels == c)[0]
        near = idx[np.argsort(-(x[idx] @ cent_unit[c]))][:n_examples]
        srcs = Counter(docs[i].metadata.get("source", "?") for i in idx)
        clusters.append({
            "id": c, "name": names[c], "terms": terms[c], "size": int(len(idx)),
            "share": round(len(idx) / len(docs), 4), "sources": dict(srcs.most_common(5)),
            "examples": [{"id": docs[i].id, "text": docs[i].text[:300]} for i in near],
        })
    xy = pca2(x)
    out.mkdir(parents=True, exist_ok=True)
    plot_map(xy, labels, names, out / "topic_map.png", f"{len(docs)} documents, k={k} (PCA of MiniLM embeddings)")
    from safetensors.numpy import save

    with atomic_file(out / "centroids.safetensors", "wb") as f:
        f.write(save({"centroids": cent_unit.astype(np.float32)}, metadata={"names": json.dumps(names)}))
    atomic_write_text(out / "assignments.jsonl", "".join(json.dumps({"id": d.id, "topic": int(l)}) + "\n" for d, l in zip(docs, labels)))
    summary = {"corpus": str(cdir), "k": k, "sample": len(docs), "seed": seed, "inertia": round(inertia, 3),
               "clusters": sorted(clusters, key=lambda c: -c["size"]), "map": "topic_map.png",
               "centroids": "centroids.safetensors"}
    atomic_write_json(out / "topics.json", summary)
    return summary


def load_centroids(path: str | Path) -> tuple[np.ndarray, list[str]]:
    if not Path(path).is_file():
        raise InputError(f"topic centroids not found: {path} (compute them with `lmforge data topics`)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            cent = f.get_tensor("centroids")
            names = json.loads((f.metadata() or {}).get("names", "[]"))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise InputError(f"{path}: not a centroids file written by `lmforge data topics` ({e})") from None
    if len(names) != len(cent):
        names = [f"cluster {i}" for i in range(len(cent))]
    return cent, names


def topics_markdown(summary: dict) -> str:
    lines = [f"{summary['sample']} sampled documents in {summary['k']} clusters.\n", "| id | size | share | top terms | example |", "|---|---|---|---|---|"]
    for c in summary["clusters"]:
        ex = c["examples"][0]["text"][:80].replace("\n", " ").replace("|", "/") if c["examples"] else ""
        lines.append(f"| {c['id']} | {c['size']} | {c['share']:.1%} | {', '.join(c['terms'])} | {ex} |")
    return "\n".join(lines) + "\n"


class TopicFilter(ScoreFilter):
    name = "topic"
    key = "topic"
    reason = "topic_not_selected"

    def __init__(self, cfg: TopicConfig, centroids_path: Path, model_dir: str = "", seed: int = 0, sample_removed: int = 20):
        super().__init__(cfg.keep_fraction if cfg.mode == "keep" else 0.0, seed, sample_removed)
        self.cfg = cfg
        self.centroids_path = Path(centroids_path)
        self.model_dir = model_dir
        self.batch_size = cfg.batch_size * 8  # 8 encoder batches per scoring call (length-sorted, less padding)
        cent, self.names = load_centroids(self.centroids_path)
        self.cent = cent
        bad = [c for c in cfg.clusters if not 0 <= c < len(cent)]
        if bad:
            raise ConfigError(f"data.quality.topic.clusters: cluster {bad[0]} does not exist (the centroids have ids 0..{len(cent) - 1})")
        self.chosen = set(cfg.clusters)

    def score_batch(self, docs: list[Document]) -> list[float]:
        from lmforge.data.quality.embedding import embed

        emb = embed([d.text for d in docs], self.cfg.batch_size, self.cfg.max_chars, self.model_dir)
        sims = emb @ self.cent.T
        best = sims.argmax(1)
        for d, b, s in zip(docs, best, sims.max(1)):
            d.metadata["topic_name"] = self.names[int(b)]
            d.metadata["topic_similarity"] = round(float(s), 4)
        return [int(b) for b in best]

    def passes(self, score: float, doc: Document) -> bool:
        return self.cfg.mode != "keep" or int(score) in self.chosen

    def _flush(self, batch: list[Document]) -> Iterator[Document]:
        for doc, s in zip(batch, self.score_batch(batch)):
            doc.metadata[self.key] = int(s)
        for doc in super(ScoreFilter, self).process(batch):
            yield doc
            if self.cfg.mode == "boost" and doc.metadata[self.key] in self.chosen:
                for i in range(1, self.cfg.boost):
                    self.stats.counters["boost_copies"] += 1
                    yield Document(f"{doc.id}#boost{i}", doc.text, dict(doc.metadata, boost_copy=i))
