"""MinHash LSH near-duplicate removal, written for this project (numpy, per-shard tasks).

Stages, each a set of resumable executor tasks whose outputs live on disk under the work dir:

1. signatures (one task per shard): normalise text (lower case, words split at ASCII
   punctuation and spaces), hash words and word n-grams (default 5) to 64 bits
   (`batch_shingles`), and compute `bands * rows` MinHash values per document, vectorised
   over blocks of many documents (`signatures`: x -> a*x + b mod 2**32 with odd a, a
   bijection, on the folded shingle hashes; min per document). Writes the signatures
   (memmap-able .npy, 4 bytes per value) and per band a sorted (band key, document) array.
2. buckets (one task per band and key range): merge the sorted band arrays of every shard
   (and of a reference index, if given) by key range; documents sharing a key are candidate
   pairs. Memory is bounded by one key range, not by the corpus.
3. verify (optional): candidate pairs are checked by exact Jaccard of their shingle sets
   (recomputed from the shard texts for the documents involved), or by the fraction of equal
   MinHash values (`estimate`), or not at all.
4. cluster: connected components of the verified pairs (scipy's union-find equivalent),
   then, by default, "star" clusters inside each component: documents in a deterministic
   priority order (longest text first, ties by corpus position; or corpus order), each
   removed for the first kept document it is verified-similar to, else kept. So no document
   is removed for one it does not resemble (components alone would chain A~B~C). Never
   depends on processing order. Cluster-size histogram in the stats; each removed
   document's metadata names its keeper (`duplicate_of`: "shard#position").
5. filter (one task per shard): write each shard without its removed documents.

An index (`build_index`, `lmforge data dedup index`) is the signature stage's output for a
reference corpus plus the shingle sets of its documents; a corpus deduplicated against it
adds the index's band arrays to every bucket task, and its documents always win.

Documents with fewer than `min_shingles` distinct shingles are left out of LSH: their
signatures carry too little information to estimate similarity (exact dedup handles exact
copies of short texts).

Shingling lives in `dedup/shingles.py` and record reading, the per-shard "drop these
positions" writer and result merging in `dedup/common.py`, shared with the other passes;
they are imported here under their old names too (`batch_shingles`, `words`, ...).
"""

from __future__ import annotations

import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lmforge.data.dedup.common import check_shards, iter_records, key_bounds, merge_results, save_npy, write_without
from lmforge.data.dedup.shingles import P, batch_shingles, mix64, shingle_hashes, text_batches, words
from lmforge.data.executor import Executor
from lmforge.data.passes import CorpusPass, PassResult
from lmforge.errors import ConfigError, InputError
from lmforge.log import logger
from lmforge.rundir import atomic_file, atomic_write_json, fingerprint, read_json

U64 = np.uint64
_EMPTY = np.zeros(0, dtype=U64)
MAXU64 = np.iinfo(np.uint64).max

# the shared helpers, importable from here as before
__all__ = ["MinhashConfig", "MinhashDedupPass", "batch_shingles", "build_index", "check_shards", "iter_records", "load_index",
           "merge_results", "permutations", "shingle_hashes", "signatures", "text_batches", "words", "write_without"]


# --------------------------------------------------------------------------- signatures

def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(a, b) of the hash permutations x -> a*x + b (mod 2**32), a odd."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**31, size=num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)
    return a, b


def fold32(h: np.ndarray) -> np.ndarray:
    return (h ^ (h >> U64(32))).astype(np.uint32)


MAXU32 = np.iinfo(np.uint32).max


def signatures(hashes: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """MinHash signatures (documents x permutations, uint32) of a batch from `batch_shingles`.

    Each 64-bit shingle hash is folded to 32 bits and put through every permutation
    x -> a*x + b (mod 2**32; a bijection for odd a) in a (permutations x shingles) block of
    about `chunk` shingles; a min-reduction over each document's columns gives its
    signature. A document without shingles gets all-ones (max) values."""
    nd, p = len(offsets) - 1, len(a)
    out = np.full((nd, p), MAXU32, dtype=np.uint32)
    if nd == 0 or len(hashes) == 0:
        return out
    x = fold32(hashes)
    counts = np.diff(offsets)
    buf = np.empty((p, chunk), dtype=np.uint32)
    a2, b2 = a[:, None], b[:, None]
    i = 0
    with np.errstate(over="ignore"):
        while i < nd:
            if counts[i] == 0:
                i += 1
                continue
            if counts[i] >= chunk:  # one long document, in pieces
                acc = np.full(p, MAXU32, dtype=np.uint32)
                for s in range(offsets[i], offsets[i + 1], chunk):
                    part = x[s : min(s + chunk, offsets[i + 1])]
                    m = buf[:, : len(part)]
                    np.multiply(a2, part[None, :], out=m)
                    m += b2
                    np.minimum(acc, m.min(axis=1), out=acc)
                out[i] = acc
                i += 1
                continue
            # documents i..j-1 fit in one block (so none of them is a long one)
            j = max(i + 1, int(np.searchsorted(offsets, offsets[i] + chunk, side="right")) - 1)
            sel = np.arange(i, j)
            sel = sel[counts[sel] > 0]
            lo, hi = offsets[i], offsets[j]
            part = x[lo:hi]
            m = buf[:, : len(part)]
            np.multiply(a2, part[None, :], out=m)
            m += b2
            out[sel] = np.minimum.reduceat(m, offsets[sel] - lo, axis=1).T
            i = j
    return out


def band_keys(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64 keys: one hash of each band's `rows` values (band index mixed in)."""
    n = sig.shape[0]
    s = sig[:, : bands * rows].reshape(n, bands, rows)
    with np.errstate(over="ignore"):
        k = np.broadcast_to(np.arange(1, bands + 1, dtype=U64) * U64(0x9E3779B97F4A7C15), (n, bands)).copy()
        for r in range(rows):
            k ^= s[:, :, r]
            mix64(k)
            k *= P
    return k


# --------------------------------------------------------------------------- config

@dataclass
class MinhashConfig:
    enabled: bool = True
    ngram: int = 5  # words per shingle
    bands: int = 14
    rows: int = 8  # bands * rows MinHash values per document (FineWeb: 14 x 8 = 112)
    seed: int = 1  # seed of the hash permutations (must match an index's)
    min_shingles: int = 10  # documents with fewer distinct shingles are left out of LSH
    verify: Literal["exact", "estimate", "none"] = "exact"  # check candidate pairs
    threshold: float = 0.8  # Jaccard a verified pair must reach
    keep: Literal["longest", "first"] = "longest"  # which document of a cluster survives
    clustering: Literal["star", "components"] = "star"  # see MinhashDedupPass._cluster
    index: str = ""  # directory of an index (`lmforge data dedup index`) to dedup against
    key_ranges: int = 4  # bucket tasks per band (bounds memory: one key range at a time)
    batch_shingles: int = 4096  # shingles per vectorised signature block

    def validate(self) -> None:
        if self.ngram < 1:
            raise ConfigError("minhash.ngram must be >= 1")
        if self.bands < 1 or self.rows < 1:
            raise ConfigError("minhash.bands and minhash.rows must be >= 1")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"minhash.threshold must be in (0, 1], got {self.threshold}")
        if self.min_shingles < 1:
            raise ConfigError("minhash.min_shingles must be >= 1")
        if self.key_ranges < 1 or self.key_ranges > 256:
            raise ConfigError("minhash.key_ranges must be in [1, 256]")
        if self.batch_shingles < 16:
            raise ConfigError("minhash.batch_shingles must be >= 16")

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    def params(self) -> dict:
        """What an index must share with a corpus to be comparable."""
        return {"ngram": self.ngram, "bands": self.bands, "rows": self.rows, "seed": self.seed, "min_shingles": self.min_shingles}


# --------------------------------------------------------------------------- stage 1: signatures

def _sig_task(task: dict) -> dict:
    """Signatures + sorted band arrays for one shard."""
    path, out, p = Path(task["path"]), Path(task["out"]), task["params"]
    a, b = permutations(p["bands"] * p["rows"], p["seed"])
    recs = list(iter_records(path))
    texts = [d.text if d is not None else "" for _, d in recs]
    lengths = [len(t) for t in texts]
    sigs, nsh = [], []
    for s0, s1 in text_batches(texts):  # bounded memory per batch
        h, offs = batch_shingles(texts[s0:s1], p["ngram"])
        cnt = np.diff(offs)
        for i in np.flatnonzero((cnt > 0) & (cnt < 4 * p["min_shingles"])):  # distinct count matters near the limit
            cnt[i] = len(np.unique(h[offs[i] : offs[i + 1]]))
        nsh.extend(cnt.tolist())
        sigs.append(signatures(h, offs, a, b, task.get("batch", 4096)))
    sig = np.concatenate(sigs) if sigs else np.zeros((0, len(a)), np.uint32)
    keys = band_keys(sig, p["bands"], p["rows"])
    ok = [d is not None and c >= p["min_shingles"] for (_, d), c in zip(recs, nsh)]
    ok = np.array(ok, dtype=bool)
    pos = np.nonzero(ok)[0].astype(np.uint32)
    out.mkdir(parents=True, exist_ok=True)
    save_npy(out / "sig.npy", sig)
    save_npy(out / "meta.npy", np.stack([np.array(lengths, dtype=np.int64), np.array(nsh, dtype=np.int64), ok.astype(np.int64)], axis=1) if lengths else np.zeros((0, 3), np.int64))
    for band in range(p["bands"]):
        k = keys[pos, band]
        order = np.argsort(k, kind="stable")
        save_npy(out / f"band{band:03d}.npy", np.stack([k[order], pos[order].astype(U64)], axis=1) if len(pos) else np.zeros((0, 2), U64))
    return {"docs": len(lengths), "in_lsh": int(ok.sum()), "short": int((~ok).sum())}


# --------------------------------------------------------------------------- stage 2: buckets

def _bucket_task(task: dict) -> dict:
    """Candidate pairs of one band and key range across all shards (and the index)."""
    band, part, parts = task["band"], task["part"], task["parts"]
    lo, hi = key_bounds(part, parts)
    keys, refs = [], []
    for sid, d in enumerate(task["sig_dirs"]):  # sid < len(shards): corpus; beyond: index shards
        arr = np.load(Path(d) / f"band{band:03d}.npy", mmap_mode="r")
        if len(arr) == 0:
            continue
        k = arr[:, 0]
        i0 = int(np.searchsorted(k, U64(lo), side="left"))
        i1 = len(k) if hi >= 2**64 else int(np.searchsorted(k, U64(hi), side="left"))
        if i1 > i0:
            keys.append(np.array(k[i0:i1]))
            refs.append((U64(sid) << U64(32)) | np.array(arr[i0:i1, 1]))
    out = Path(task["out"])
    if keys:
        k = np.concatenate(keys)
        r = np.concatenate(refs)
        order = np.lexsort((r, k))
        k, r = k[order], r[order]
        same = k[1:] == k[:-1]
        # run heads: first element of each run of equal keys
        head_idx = np.maximum.accumulate(np.where(np.concatenate([[True], ~same]), np.arange(len(k)), 0))
        star = np.nonzero(same)[0] + 1  # every non-head element pairs with its run's head ...
        e_star = np.stack([r[head_idx[star]], r[star]], axis=1)
        chain = star[head_idx[star] != star - 1]  # ... and with its predecessor (if not the head)
        e_chain = np.stack([r[chain - 1], r[chain]], axis=1)
        edges = np.unique(np.concatenate([e_star, e_chain]), axis=0) if len(star) else np.zeros((0, 2), U64)
    else:
        edges = np.zeros((0, 2), U64)
    save_npy(out, edges)
    return {"pairs": int(len(edges))}


# --------------------------------------------------------------------------- stage 3: verify

def _shingle_task(task: dict) -> dict:
    """Distinct shingle hashes of the listed positions of one shard (for exact Jaccard)."""
    want = set(task["positions"])
    sets, pos_list = [], []
    if want:
        for pos, doc in iter_records(task["path"]):
            if pos in want and doc is not None:
                pos_list.append(pos)
                sets.append(np.unique(shingle_hashes(doc.text, task["ngram"])))
    offs = np.cumsum([0] + [len(s) for s in sets]).astype(np.int64)
    flat = np.concatenate(sets) if sets else _EMPTY
    with atomic_file(task["out"], "wb") as f:
        np.savez(f, pos=np.array(pos_list, dtype=np.int64), offs=offs, flat=flat)
    return {"docs": len(pos_list)}


def _jaccard(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) == 0 and len(y) == 0:
        return 1.0
    inter = len(np.intersect1d(x, y, assume_unique=True))
    return inter / (len(x) + len(y) - inter)


# --------------------------------------------------------------------------- the pass

class MinhashDedupPass(CorpusPass):
    name = "minhash"

    def __init__(self, cfg: MinhashConfig | None = None, resolve=None):
        self.cfg = cfg or MinhashConfig()
        self.resolve = resolve or (lambda p: Path(p).expanduser().resolve())

    # -- signatures (also used to build an index)
    def compute_signatures(self, shards: list[Path], sig_root: Path, executor: Executor) -> list[dict]:
        c = self.cfg
        tasks = [{"path": str(p), "out": str(sig_root / p.name), "params": c.params(), "batch": c.batch_shingles} for p in shards]
        return executor.map(_sig_task, tasks, [p.name for p in shards], sig_root / ".markers", desc="minhash signatures")

    def run(self, in_shards, out_dir, work_dir, executor, seed, sample_removed) -> PassResult:
        import time

        t0 = time.perf_counter()
        c = self.cfg
        self._sets = {}
        shards = check_shards(in_shards)
        out_dir = Path(out_dir)
        index = load_index(self.resolve(c.index), c) if c.index else None
        fp = fingerprint({"cfg": c.params(), "verify": c.verify, "t": c.threshold, "keep": c.keep, "clustering": c.clustering,
                          "index": str(self.resolve(c.index)) if c.index else "",
                          "shards": [p.name for p in shards]})
        wd = Path(work_dir) / f"minhash-{fp}"
        wd.mkdir(parents=True, exist_ok=True)

        # 1. signatures
        sig_info = self.compute_signatures(shards, wd / "sig", executor)
        sig_dirs = [str(wd / "sig" / p.name) for p in shards]
        index_dirs = index["sig_dirs"] if index else []
        n_corpus = len(sig_dirs)

        # 2. buckets
        btasks, bids = [], []
        for band in range(c.bands):
            for part in range(c.key_ranges):
                btasks.append({"band": band, "part": part, "parts": c.key_ranges, "sig_dirs": sig_dirs + index_dirs,
                               "out": str(wd / "edges" / f"b{band:03d}_p{part:03d}.npy")})
                bids.append(f"b{band:03d}_p{part:03d}")
        executor.map(_bucket_task, btasks, bids, wd / "edges" / ".markers", desc="minhash buckets")
        cand = [np.load(t["out"]) for t in btasks]
        edges = np.unique(np.concatenate(cand), axis=0) if cand else np.zeros((0, 2), U64)
        sid = (edges >> U64(32)).astype(np.int64)
        # pairs inside the index are not our business
        edges = edges[(sid[:, 0] < n_corpus) | (sid[:, 1] < n_corpus)] if len(edges) else edges
        n_candidates = len(edges)

        # 3. verify
        jac = None
        if len(edges) and c.verify == "exact":
            edges, jac = self._verify_exact(edges, shards, n_corpus, index_dirs, wd, executor)
        elif len(edges) and c.verify == "estimate":
            edges, jac = self._verify_estimate(edges, sig_dirs + index_dirs)

        # 4. cluster
        names = [p.name for p in shards] + [f"index:{Path(d).name}" for d in index_dirs]
        remove, clusters = self._cluster(edges, sig_dirs + index_dirs, n_corpus, names)
        plan = wd / "remove.json"
        if read_json(plan) is None:
            atomic_write_json(plan, {str(k): v for k, v in remove.items()})
        remove = {int(k): v for k, v in read_json(plan).items()}

        # 5. filter
        out_dir.mkdir(parents=True, exist_ok=True)
        ftasks = [{"path": str(p), "out": str(out_dir / p.name), "drop": remove.get(i, {}), "sample": sample_removed} for i, p in enumerate(shards)]
        results = executor.map(_filter_task, ftasks, [p.name for p in shards], wd / "filter" / ".markers", desc="minhash filter")
        stats, removed = merge_results(self.name, results, sample_removed)
        stats.time_s = time.perf_counter() - t0
        stats.counters["candidate_pairs"] = n_candidates
        stats.counters["verified_pairs"] = int(len(edges))
        stats.counters["short_docs_skipped"] = sum(s["short"] for s in sig_info)
        hist = Counter(clusters)
        extra = {
            "params": c.params() | {"verify": c.verify, "threshold": c.threshold, "keep": c.keep, "clustering": c.clustering},
            "candidate_pairs": n_candidates,
            "verified_pairs": int(len(edges)),
            "clusters": len(clusters),
            "components": getattr(self, "_components", 0),
            "cluster_sizes": {str(k): v for k, v in sorted(hist.items())},
        }
        if jac is not None and len(jac):
            extra["verified_jaccard_quantiles"] = [round(float(q), 3) for q in np.quantile(jac, [0, 0.1, 0.5, 0.9, 1])]
        return PassResult(shards=[out_dir / p.name for p in shards], stats=stats, removed=removed, extra=extra)

    # -- verification
    def _verify_exact(self, edges, shards, n_corpus, index_dirs, wd, executor):
        c = self.cfg
        refs = np.unique(edges.ravel())
        sids = (refs >> U64(32)).astype(np.int64)
        poss = (refs & U64(0xFFFFFFFF)).astype(np.int64)
        tasks, ids = [], []
        for i, p in enumerate(shards):
            tasks.append({"path": str(p), "positions": poss[sids == i].tolist(), "ngram": c.ngram, "out": str(wd / "shingles" / f"{p.name}.npz")})
            ids.append(p.name)
        executor.map(_shingle_task, tasks, ids, wd / "shingles" / ".markers", desc="minhash verify")
        sets: dict[int, np.ndarray] = {}
        for i, t in enumerate(tasks):
            z = np.load(t["out"])
            offs, flat = z["offs"], z["flat"]
            for j, pos in enumerate(z["pos"]):
                sets[(i << 32) | int(pos)] = flat[offs[j] : offs[j + 1]]
        # index documents: the shingle sets the index stored (an index without them: estimated Jaccard)
        for k, d in enumerate(index_dirs):
            f = Path(d) / "shingles.npz"
            want = set(poss[sids == n_corpus + k].tolist())
            if not want or not f.exists():
                continue
            z = np.load(f)
            offs, flat = z["offs"], z["flat"]
            for j, pos in enumerate(z["pos"].tolist()):
                if pos in want:
                    sets[((n_corpus + k) << 32) | pos] = flat[offs[j] : offs[j + 1]]
        sigs = [np.load(Path(d) / "sig.npy", mmap_mode="r") for d in [str(wd / "sig" / p.name) for p in shards] + index_dirs]
        keep, jac = np.zeros(len(edges), bool), np.zeros(len(edges))
        for e, (x, y) in enumerate(edges.tolist()):
            if x in sets and y in sets:
                j = _jaccard(sets[x], sets[y])
            elif (x >> 32) >= n_corpus or (y >> 32) >= n_corpus:
                j = float(np.mean(sigs[x >> 32][x & 0xFFFFFFFF] == sigs[y >> 32][y & 0xFFFFFFFF]))
            else:
                j = 0.0  # a record that could not be read again
            jac[e] = j
            keep[e] = j >= c.threshold
        self._sets = sets
        return edges[keep], jac

    def _verify_estimate(self, edges, all_dirs):
        sigs = [np.load(Path(d) / "sig.npy", mmap_mode="r") for d in all_dirs]
        ea, eb = edges[:, 0], edges[:, 1]
        jac = np.zeros(len(edges))
        sa, sb = (ea >> U64(32)).astype(np.int64), (eb >> U64(32)).astype(np.int64)
        pa, pb = (ea & U64(0xFFFFFFFF)).astype(np.int64), (eb & U64(0xFFFFFFFF)).astype(np.int64)
        for e in range(len(edges)):
            jac[e] = float(np.mean(sigs[sa[e]][pa[e]] == sigs[sb[e]][pb[e]]))
        keep = jac >= self.cfg.threshold
        return edges[keep], jac

    # -- clustering
    def _similarity(self, all_dirs):
        """Pair similarity for clustering: exact Jaccard where the shingle sets were loaded (verify =
        "exact"), else the share of equal MinHash values."""
        sets = getattr(self, "_sets", {})
        sigs = [np.load(Path(d) / "sig.npy", mmap_mode="r") for d in all_dirs]

        def sim(x: int, y: int) -> float:
            if x in sets and y in sets:
                return _jaccard(sets[x], sets[y])
            return _sig_agreement(sigs, x, y)

        return sim

    def _cluster(self, edges, all_dirs, n_corpus, names) -> tuple[dict[int, dict[int, list]], list[int]]:
        """Clusters of the verified pairs; per removed document [reason, "shard#position" of the
        document kept for it]. Also returns the cluster sizes (keeper + removed documents).

        `components`: connected components (union-find), one keeper each, the rest removed: a
        chain A~B~C removes C for A even when A and C are not alike. `star` (default): within
        each component, documents in priority order; one that is verified-similar to an
        already kept document is removed for it, else kept. So every removed document is a
        verified near-duplicate of its keeper, and a component may keep several documents."""
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        self._components = 0
        if len(edges) == 0:
            return {}, []
        nodes, inv = np.unique(edges.ravel(), return_inverse=True)
        inv = inv.reshape(-1, 2)
        g = coo_matrix((np.ones(len(inv), np.int8), (inv[:, 0], inv[:, 1])), shape=(len(nodes), len(nodes)))
        ncomp, label = connected_components(g, directed=False)
        sid = (nodes >> U64(32)).astype(np.int64)
        pos = (nodes & U64(0xFFFFFFFF)).astype(np.int64)
        in_index = sid >= n_corpus
        if self.cfg.keep == "longest":
            metas = {}
            length = np.zeros(len(nodes), np.int64)
            for k in np.unique(sid):
                m = metas.setdefault(int(k), np.load(Path(all_dirs[int(k)]) / "meta.npy", mmap_mode="r"))
                sel = sid == k
                length[sel] = m[pos[sel], 0]
            prio = -length
        else:
            prio = np.zeros(len(nodes), np.int64)
        # index documents always win (they are already in the reference corpus), then priority
        order = np.lexsort((nodes, prio, ~in_index, label))
        if self.cfg.clustering == "components":
            first = np.ones(len(order), bool)
            first[1:] = label[order][1:] != label[order][:-1]
            keep_of = np.full(len(nodes), -1, np.int64)
            heads = order[first]
            comp_head = np.zeros(ncomp, np.int64)
            comp_head[label[heads]] = heads
            keep_of[:] = comp_head[label]
            keep_of[heads] = -1
        else:
            # star clusters: walk each component in priority order; a document next to (verified
            # similar to) an already kept one goes, with that one as its keeper; otherwise it is kept
            from scipy.sparse import csr_matrix

            n = len(nodes)
            adj = csr_matrix((np.ones(2 * len(inv), np.int8), (np.concatenate([inv[:, 0], inv[:, 1]]), np.concatenate([inv[:, 1], inv[:, 0]]))), shape=(n, n))
            rank = np.empty(n, np.int64)
            rank[order] = np.arange(n)
            kept = np.zeros(n, bool)
            keep_of = np.full(n, -1, np.int64)
            ptr, ind = adj.indptr, adj.indices
            kept_in: dict[int, list[int]] = {}  # component -> its kept documents, in priority order
            sim = self._similarity(all_dirs)
            for i in order.tolist():
                if not in_index[i]:
                    nb = ind[ptr[i] : ptr[i + 1]]
                    nb = nb[kept[nb]]
                    if len(nb):
                        keep_of[i] = nb[np.argmin(rank[nb])]
                        continue
                    # LSH lists only some pairs of a bucket: compare with the component's keepers too
                    k = next((k for k in kept_in.get(label[i], []) if sim(int(nodes[i]), int(nodes[k])) >= self.cfg.threshold), -1)
                    if k >= 0:
                        keep_of[i] = k
                        continue
                kept[i] = True
                kept_in.setdefault(label[i], []).append(i)
        removed_idx = np.flatnonzero((keep_of >= 0) & ~in_index)
        sizes = np.bincount(keep_of[removed_idx], minlength=len(nodes))
        sizes = sizes[sizes > 0] + 1  # a keeper and the documents removed for it
        remove: dict[int, dict[int, list]] = {}
        for i in removed_idx.tolist():
            k = keep_of[i]
            reason = "near_duplicate_of_index" if in_index[k] else "near_duplicate"
            remove.setdefault(int(sid[i]), {})[int(pos[i])] = [reason, f"{names[sid[k]]}#{pos[k]}"]
        self._components = int(ncomp)
        return remove, sizes.tolist()


def _sig_agreement(sigs, x: int, y: int) -> float:
    return float(np.mean(sigs[x >> 32][x & 0xFFFFFFFF] == sigs[y >> 32][y & 0xFFFFFFFF]))


def _filter_task(task: dict) -> dict:
    drop = {int(k): v[0] for k, v in task["drop"].items()}
    meta = {int(k): {"duplicate_of": v[1]} for k, v in task["drop"].items()}
    return write_without(Path(task["path"]), Path(task["out"]), drop, "minhash", task["sample"], meta)


# --------------------------------------------------------------------------- index

INDEX_META = "index.json"


def build_index(corpus_shards: list[Path], index_dir: Path, cfg: MinhashConfig, executor: Executor) -> dict:
    """Signatures, sorted band arrays and shingle sets of a corpus, to dedup later datasets against.
    Disk: 4 bytes x bands*rows + 16 bytes x bands per document, plus 8 bytes per distinct shingle."""
    shards = check_shards(corpus_shards)
    if not shards:
        raise InputError("dedup index: no shards to index")
    index_dir = Path(index_dir)
    sig_root = index_dir / "sig"
    info = MinhashDedupPass(cfg).compute_signatures(shards, sig_root, executor)
    # the shingle sets of the documents in LSH, so pairs with index documents get the exact check
    tasks = []
    for p in shards:
        ok = np.load(sig_root / p.name / "meta.npy")[:, 2]
        tasks.append({"path": str(p), "positions": np.flatnonzero(ok).tolist(), "ngram": cfg.ngram, "out": str(sig_root / p.name / "shingles.npz")})
    executor.map(_shingle_task, tasks, [p.name for p in shards], sig_root / ".markers-shingles", desc="index shingles")
    shutil.rmtree(sig_root / ".markers-shingles", ignore_errors=True)
    meta = {"params": cfg.params(), "shards": [p.name for p in shards], "sources": [str(p) for p in shards],
            "docs": sum(i["docs"] for i in info), "in_lsh": sum(i["in_lsh"] for i in info)}
    atomic_write_json(index_dir / INDEX_META, meta)
    shutil.rmtree(sig_root / ".markers", ignore_errors=True)
    logger.info("dedup index: %d documents (%d in LSH) -> %s", meta["docs"], meta["in_lsh"], index_dir)
    return meta


def load_index(path: str | Path, cfg: MinhashConfig) -> dict:
    path = Path(path)
    meta = read_json(path / INDEX_META)
    if meta is None:
        raise InputError(f"dedup index not found or incomplete: {path} (no {INDEX_META}); build it with `lmforge data dedup index`")
    if meta["params"] != cfg.params():
        diff = [k for k in cfg.params() if meta["params"].get(k) != cfg.params()[k]]
        raise ConfigError(f"minhash.index {path}: built with different parameters ({', '.join(diff)}: {[meta['params'].get(k) for k in diff]}); "
                          "use the same ngram, bands, rows, seed and min_shingles")
    return {"meta": meta, "sig_dirs": [str(path / "sig" / n) for n in meta["shards"]]}
