"""Perplexity filter (CCNet style): an n-gram language model with interpolated modified
Kneser-Ney smoothing, trained on a reference corpus; documents are scored by perplexity and
kept by a threshold or by head/middle/tail bucket.

Everything here is written in numpy (no kenlm): tokens are lowercased words and punctuation
(`common.words`), each non-empty line is a sentence wrapped in <s> ... </s>, and n-grams are
identified by 64-bit hashes (so no vocabulary is stored). Training:

1. hash every n-gram of order 1..N at every position (vectorised rolling hash + splitmix64);
2. counts: raw counts for order N and for n-grams that start with <s>; continuation counts
   (number of distinct left extensions) for the other lower-order n-grams;
3. three discounts D1, D2, D3+ per order from the count-of-counts (Chen & Goodman);
4. interpolated probabilities, lowest order first: p(w|h) = max(c - D, 0)/c(h) + gamma(h) p(w|h'),
   with the unigram interpolated with the uniform distribution (which also gives <unk>).

The model is stored in backoff form (like an ARPA file): log p of every seen n-gram and log
gamma of every seen context, as sorted hash arrays in one `.npz` (loaded with
allow_pickle=False). Scoring looks up the longest seen n-gram for every position with
`searchsorted` and adds the back-off weights of the longer contexts that were not seen.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

import numpy as np
import xxhash

from lmforge.data.document import Document
from lmforge.data.quality.common import ScoreFilter, words
from lmforge.errors import ConfigError, InputError
from lmforge.log import logger, progress
from lmforge.rundir import atomic_file, atomic_write_json

BUCKETS = ("head", "middle", "tail")
_U = np.uint64
_BOS = _U(xxhash.xxh64_intdigest(b"<s>"))
_EOS = _U(xxhash.xxh64_intdigest(b"</s>"))
_MUL = _U(0x9E3779B97F4A7C15)


@dataclass
class PerplexityConfig:
    enabled: bool = False
    model: str = ""  # .npz written by `lmforge data train-quality --kind perplexity`
    mode: Literal["threshold", "bucket"] = "threshold"
    max_perplexity: float = 1000.0  # mode=threshold: keep documents with perplexity <= this
    keep_buckets: list[str] = field(default_factory=lambda: ["head", "middle"])  # mode=bucket
    cutoffs: list[float] = field(default_factory=list)  # [head/middle, middle/tail] perplexities; [] = the model's
    keep_fraction: float = 0.0
    max_chars: int = 20_000

    def validate(self) -> None:
        bad = [b for b in self.keep_buckets if b not in BUCKETS]
        if bad:
            raise ValueError(f"keep_buckets: unknown bucket {bad[0]!r}; choose from {', '.join(BUCKETS)}")
        if self.cutoffs and (len(self.cutoffs) != 2 or self.cutoffs[0] > self.cutoffs[1]):
            raise ValueError(f"cutoffs must be two increasing perplexities, got {self.cutoffs}")
        if self.max_perplexity <= 0:
            raise ValueError(f"max_perplexity must be > 0, got {self.max_perplexity}")
        if not 0.0 <= self.keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in [0, 1], got {self.keep_fraction}")
        if self.enabled and not self.model:
            raise ValueError("perplexity.model is required when the perplexity filter is enabled (train one with `lmforge data train-quality --kind perplexity`)")


# ---------------------------------------------------------------- hashing


def _splitmix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _MUL
        z = (z ^ (z >> _U(30))) * _U(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U(27))) * _U(0x94D049BB133111EB)
        return z ^ (z >> _U(31))


def token_ids(text: str, max_chars: int = 0) -> np.ndarray:
    """<s> w1 .. wn </s> per non-empty line, as 64-bit token hashes."""
    if max_chars:
        text = text[:max_chars]
    ids: list[int] = []
    h = xxhash.xxh64_intdigest
    for line in text.splitlines():
        toks = words(line)
        if toks:
            ids.append(int(_BOS))
            ids.extend(h(t.encode("utf-8", "surrogatepass")) for t in toks)
            ids.append(int(_EOS))
    return np.array(ids, dtype=np.uint64)


def ngram_hashes(seq: np.ndarray, order: int) -> list[np.ndarray]:
    """H[k-1][i] = hash of seq[i:i+k] for k = 1..order (arrays of length len(seq)-k+1)."""
    out = [_splitmix(seq)]
    with np.errstate(over="ignore"):
        for k in range(2, order + 1):
            prev = out[-1]
            if len(prev) < 2:
                out.append(np.zeros(0, dtype=np.uint64))
                continue
            out.append(_splitmix(prev[:-1] * _MUL + seq[k - 1 :]))
    return out


def _sentence_start(seq: np.ndarray) -> np.ndarray:
    """For each position, the index of its sentence's <s>."""
    idx = np.arange(len(seq))
    starts = np.where(seq == _BOS, idx, 0)
    return np.maximum.accumulate(starts) if len(seq) else starts


# ---------------------------------------------------------------- training


def _discounts(counts: np.ndarray) -> np.ndarray:
    n = [int((counts == i).sum()) for i in (1, 2, 3, 4)]
    if min(n) == 0:
        return np.array([0.5, 1.0, 1.5])
    y = n[0] / (n[0] + 2 * n[1])
    d = np.array([1 - 2 * y * n[1] / n[0], 2 - 3 * y * n[2] / n[1], 3 - 4 * y * n[3] / n[2]])
    return np.clip(d, 0.05, np.array([1.0, 2.0, 3.0]))


def _group_sum(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uk, inv = np.unique(keys, return_inverse=True)
    return uk, np.bincount(inv, weights=values, minlength=len(uk))


def train_kn(texts: Iterable[str], out_path: str | Path, order: int = 5, max_tokens: int = 5_000_000,
             calibrate: list[str] | None = None, max_chars: int = 20_000) -> dict:
    """Train an interpolated modified Kneser-Ney model of `order` on `texts` (up to
    `max_tokens` tokens); write it to `out_path` (.npz). Bucket cutoffs are the 33rd/66th
    perplexity percentiles of the `calibrate` documents (default: the reference documents
    beyond the training budget, or the last 10% of them)."""
    if not 1 <= order <= 8:
        raise ConfigError(f"order must be between 1 and 8, got {order}")
    parts, n_tok, held = [], 0, []
    texts = list(texts)
    n_docs = len(texts)
    cut = n_docs - max(1, n_docs // 10) if calibrate is None and n_docs >= 10 else n_docs
    for i, t in enumerate(progress(texts, desc="tokenizing reference", unit="doc")):
        if i >= cut or n_tok >= max_tokens:
            held.append(t)
            continue
        ids = token_ids(t, max_chars)
        parts.append(ids)
        n_tok += len(ids)
    if not n_tok:
        raise InputError("the reference corpus has no text to train the n-gram model on")
    seq = np.concatenate(parts)
    arrays = build_kn_arrays(seq, order)
    arrays["order"] = np.array([order], dtype=np.int64)
    calib = calibrate if calibrate is not None else held
    ppl = perplexities(arrays, calib[:5000], max_chars) if calib else np.zeros(0)
    cutoffs = np.percentile(ppl, [33.3, 66.7]) if len(ppl) else np.array([0.0, 0.0])
    arrays["cutoffs"] = cutoffs.astype(np.float64)
    with atomic_file(out_path, "wb") as f:
        np.savez(f, **arrays)
    info = {
        "kind": "perplexity", "order": order, "train_tokens": int(len(seq)), "train_docs": len(parts),
        "ngrams": {str(k): int(len(arrays[f"k{k}_keys"])) for k in range(1, order + 1)},
        "calibration_docs": int(len(ppl)), "cutoffs": [round(float(c), 2) for c in cutoffs],
        "calibration_median_perplexity": round(float(np.median(ppl)), 2) if len(ppl) else None,
    }
    atomic_write_json(str(out_path) + ".json", info)
    logger.info("Kneser-Ney %d-gram model -> %s (%s tokens, cutoffs %s)", order, out_path, len(seq), info["cutoffs"])
    return info


def build_kn_arrays(seq: np.ndarray, order: int) -> dict[str, np.ndarray]:
    L = len(seq)
    H = ngram_hashes(seq, order)
    eos_cum = np.concatenate([[0], np.cumsum(seq == _EOS)])
    uniq: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # k -> (sorted unique keys, first positions)
    for k in range(1, order + 1):
        n = L - k + 1
        if n <= 0:
            uniq[k] = (np.zeros(0, np.uint64), np.zeros(0, np.int64))
            continue
        pos = np.arange(n)
        valid = (eos_cum[pos + k - 1] - eos_cum[pos]) == 0  # no </s> before the last token
        if k == 1:
            valid &= seq[:n] != _BOS  # <s> is never predicted
        keys, first = np.unique(H[k - 1][:n][valid], return_index=True)
        uniq[k] = (keys, pos[valid][first])
    raw_counts = {}
    for k in range(1, order + 1):
        n = L - k + 1
        pos = np.arange(max(n, 0))
        valid = (eos_cum[pos + k - 1] - eos_cum[pos]) == 0 if n > 0 else np.zeros(0, bool)
        if k == 1:
            valid &= seq[:n] != _BOS
        _, c = np.unique(H[k - 1][:n][valid], return_counts=True)
        raw_counts[k] = c.astype(np.float64)
    counts = {order: raw_counts[order]}
    for k in range(order - 1, 0, -1):
        keys, first = uniq[k]
        up_keys, up_first = uniq[k + 1]
        suffix = H[k - 1][up_first + 1]  # the k-gram after dropping the first token
        sk, sc = np.unique(suffix, return_counts=True)
        at = np.searchsorted(sk, keys).clip(0, max(len(sk) - 1, 0))
        cont = np.where((len(sk) > 0) & (sk[at] == keys) if len(sk) else np.zeros(len(keys), bool), sc[at] if len(sk) else 0, 0).astype(np.float64)
        starts_bos = seq[first] == _BOS
        counts[k] = np.where(starts_bos | (cont == 0), raw_counts[k], cont)
    out: dict[str, np.ndarray] = {}
    # order 1: interpolate with uniform over the vocabulary (+ <unk>)
    c1 = counts[1]
    d1 = _discounts(c1)
    total = c1.sum()
    disc = d1[np.minimum(c1, 3).astype(int) - 1]
    n_by = [(c1 == 1).sum(), (c1 == 2).sum(), (c1 >= 3).sum()]
    gamma0 = float((d1 * n_by).sum() / total)
    vocab = len(c1) + 1
    p1 = (c1 - disc) / total + gamma0 / vocab
    out["k1_keys"], out["k1_logp"] = uniq[1][0], np.log(p1).astype(np.float32)
    out["unk_logp"] = np.array([np.log(gamma0 / vocab)])
    prev_keys, prev_p = uniq[1][0], p1
    for k in range(2, order + 1):
        keys, first = uniq[k]
        c = counts[k]
        if not len(keys):
            out[f"k{k}_keys"], out[f"k{k}_logp"] = keys, np.zeros(0, np.float32)
            out[f"c{k}_keys"], out[f"c{k}_loggamma"] = keys, np.zeros(0, np.float32)
            continue
        d = _discounts(c)
        ctx = H[k - 2][first]
        suffix = H[k - 2][first + 1]
        bucket = np.minimum(c, 3).astype(int) - 1
        ck, csum = _group_sum(ctx, c)
        _, dsum = _group_sum(ctx, d[bucket])
        gamma = dsum / csum
        ci = np.searchsorted(ck, ctx)
        si = np.searchsorted(prev_keys, suffix).clip(0, len(prev_keys) - 1)
        lower = np.where(prev_keys[si] == suffix, prev_p[si], np.exp(out["unk_logp"][0]))
        p = (c - d[bucket]) / csum[ci] + gamma[ci] * lower
        out[f"k{k}_keys"], out[f"k{k}_logp"] = keys, np.log(p).astype(np.float32)
        out[f"c{k}_keys"], out[f"c{k}_loggamma"] = ck, np.log(gamma).astype(np.float32)
        prev_keys, prev_p = keys, p
    return out


# ---------------------------------------------------------------- scoring


def _lookup(keys: np.ndarray, values: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not len(keys):
        return np.zeros(len(q), bool), np.zeros(len(q), np.float32)
    i = np.searchsorted(keys, q).clip(0, len(keys) - 1)
    found = keys[i] == q
    return found, np.where(found, values[i], 0.0)


def seq_logprob(model: dict, seq: np.ndarray) -> tuple[float, int]:
    """(sum of natural-log probabilities, predicted tokens) of a <s>..</s> token sequence."""
    order = int(model["order"][0])
    L = len(seq)
    if L == 0:
        return 0.0, 0
    H = ngram_hashes(seq, order)
    start = _sentence_start(seq)
    j = np.nonzero(seq != _BOS)[0]  # predicted positions
    avail = np.minimum(order, j - start[j] + 1)  # longest n-gram ending at j inside its sentence
    best = np.ones(len(j), dtype=np.int64)  # order of the longest seen n-gram (1 = unigram or <unk>)
    found1, lp1 = _lookup(model["k1_keys"], model["k1_logp"], H[0][j])
    logp = np.where(found1, lp1, model["unk_logp"][0]).astype(np.float64)
    gam = np.zeros((order + 1, len(j)))
    for k in range(2, order + 1):
        ok = avail >= k
        s = np.where(ok, j - k + 1, 0)
        f, lp = _lookup(model[f"k{k}_keys"], model[f"k{k}_logp"], H[k - 1][np.minimum(s, len(H[k - 1]) - 1)] if len(H[k - 1]) else np.zeros(len(j), np.uint64))
        f &= ok
        logp = np.where(f, lp, logp)
        best = np.where(f, k, best)
        # back-off weight of the (k-1)-token context ending at j-1
        _, lg = _lookup(model[f"c{k}_keys"], model[f"c{k}_loggamma"], H[k - 2][np.where(ok, j - k + 1, 0)])
        gam[k] = np.where(ok, lg, 0.0)
    for k in range(2, order + 1):
        logp += np.where(k > best, gam[k], 0.0)
    return float(logp.sum()), int(len(j))


def perplexities(model: dict, texts: list[str], max_chars: int = 20_000) -> np.ndarray:
    out = np.empty(len(texts))
    for i, t in enumerate(texts):
        lp, n = seq_logprob(model, token_ids(t, max_chars))
        out[i] = float(np.exp(-lp / n)) if n else float("inf")
    return out


_MODELS: dict[str, dict] = {}


def load_kn(path: str | Path) -> dict:
    key = str(Path(path).resolve())
    if key not in _MODELS:
        if not Path(path).is_file():
            raise InputError(f"n-gram model not found: {path} (train one with `lmforge data train-quality --kind perplexity`)")
        try:
            with np.load(path, allow_pickle=False) as z:
                m = {k: z[k] for k in z.files}
            int(m["order"][0])
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{path}: not an n-gram model written by lmforge ({e})") from None
        _MODELS[key] = m
    return _MODELS[key]


def bucket_of(ppl: float, cutoffs) -> str:
    return "head" if ppl <= cutoffs[0] else ("middle" if ppl <= cutoffs[1] else "tail")


class PerplexityFilter(ScoreFilter):
    """Writes `metadata["perplexity"]` and `metadata["perplexity_bucket"]`; drops by threshold or bucket."""

    name = "perplexity"
    key = "perplexity"
    batch_size = 64

    def __init__(self, cfg: PerplexityConfig, model_path: Path, seed: int = 0, sample_removed: int = 20):
        super().__init__(cfg.keep_fraction, seed, sample_removed)
        self.cfg = cfg
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise InputError(f"[data.quality.perplexity] model not found: {self.model_path}")
        self.reason = "perplexity_too_high" if cfg.mode == "threshold" else "perplexity_bucket"

    def cutoffs(self):
        return self.cfg.cutoffs or [float(c) for c in load_kn(self.model_path)["cutoffs"]]

    def score_batch(self, docs: list[Document]) -> list[float]:
        ppl = perplexities(load_kn(self.model_path), [d.text for d in docs], self.cfg.max_chars)
        cut = self.cutoffs()
        for d, p in zip(docs, ppl):
            d.metadata["perplexity_bucket"] = bucket_of(p, cut)
        return [min(float(p), 1e12) for p in ppl]

    def passes(self, score: float, doc: Document) -> bool:
        if self.cfg.mode == "threshold":
            return score <= self.cfg.max_perplexity
        return doc.metadata["perplexity_bucket"] in self.cfg.keep_buckets
