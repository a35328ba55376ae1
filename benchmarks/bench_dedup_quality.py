"""Near-duplicate detection quality on real documents with controlled edits.

    python benchmarks/bench_dedup_quality.py [--per-condition 60] [--distractors 1000]

Base documents: English manual pages and long dictionary entries from ../shared/corpus
(at least 120 words, exact copies removed). For each edit condition a set of base documents
gets one edited copy:
  - word substitutions of 1, 2, 5, 10, 20, 30% of the words (random words from the pool),
  - word deletions of 1, 2, 5, 10, 20, 30%,
  - boilerplate added: a block of real text from one fixed manual page, 5, 10, 20, 30% of
    the document's length, appended as a footer (the same block for every such copy, so the
    copies also share it with each other: the false-positive trap).
Plus unedited distractor documents. Ground truth: the true Jaccard of word 5-gram shingle
sets for every pair of documents sharing any shingle (sparse product); a pair is a true
duplicate when its Jaccard >= 0.8.

Predicted pairs: every pair inside one cluster. Compared in the same run:
  - lmforge MinhashDedupPass defaults (14 x 8 bands, exact Jaccard check >= 0.8),
  - lmforge with the check off and plain connected components (what LSH alone gives),
  - datasketch MinHashLSH(14 x 8, 112 permutations) on the same word 5-gram shingles (lmforge's
    normalisation; each document's distinct-shingle count is checked equal to lmforge's), a
    pair per query hit, documents inserted in order. It runs in the peers' environment
    (.venv-peers, scripts/setup_bench.sh) by one worker process (benchmarks/peers/worker.py
    `datasketch_lsh_pairs`); signatures by `MinHash.bulk` (the same permutations as one
    `MinHash` per document).
Nothing is timed: this compares detection quality only (speed: bench_minhash.py).
Prints precision / recall on pairs with true Jaccard >= 0.8 and the detection rate per
condition; writes benchmarks/out/dedup_quality.json. Last line: `RESULT {json}`: headline =
F1 of lmforge's defaults / F1 of datasketch's LSH on those pairs (goal 1.0), with lmforge's
precision and recall against their own goals (P >= 0.98, R >= 0.90). The work differs there:
lmforge's defaults check each LSH candidate's exact Jaccard, datasketch has no such step; the
like-for-like comparison (LSH alone on both sides) is `lsh_only_f1_ratio` beside it (lmforge
counts every pair inside a connected component, datasketch only its query hits).

    python benchmarks/bench_dedup_quality.py --quick   # 15 copies per condition, 250 distractors
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
CORPUS = HERE.parents[1] / "shared" / "corpus"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("LMFORGE_PROGRESS", "0")

from lmforge.data.corpus_io import iter_shard, write_shard  # noqa: E402
from lmforge.data.dedup.minhash import MinhashConfig, MinhashDedupPass, batch_shingles, words  # noqa: E402
from lmforge.data.document import Document  # noqa: E402
from lmforge.data.executor import LocalExecutor  # noqa: E402

DS = "datasketch MinHashLSH 14x8"
SUBST = [0.01, 0.02, 0.05, 0.10, 0.20, 0.30]
DELETE = [0.01, 0.02, 0.05, 0.10, 0.20, 0.30]
BOILER = [0.05, 0.10, 0.20, 0.30]


def base_documents(n: int) -> tuple[list[str], str]:
    """Distinct real documents of >= 120 words, and one manual page used as boilerplate."""
    seen, out, boiler = set(), [], None
    with gzip.open(CORPUS / "multilingual" / "manpages.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            if r.get("lang") != "en":
                continue
            t = r["text"]
            if boiler is None and len(t.split()) > 3000:
                boiler = t
                continue
            if 120 <= len(t.split()) <= 4000 and t not in seen:
                seen.add(t)
                out.append(t)
            if len(out) >= n * 2 // 3:
                break
    with gzip.open(CORPUS / "dictionary" / "gcide.jsonl.gz", "rt") as f:
        for line in f:
            t = json.loads(line)["text"]
            if len(t.split()) >= 120 and t not in seen:
                seen.add(t)
                out.append(t)
            if len(out) >= n:
                break
    return out, boiler


def make_variant(text: str, kind: str, level: float, boiler_words: list[str], pool: list[str], rng: random.Random) -> str:
    w = text.split()
    k = max(1, round(len(w) * level))
    if kind == "subst":
        for i in rng.sample(range(len(w)), k):
            w[i] = rng.choice(pool)
        return " ".join(w)
    if kind == "delete":
        drop = set(rng.sample(range(len(w)), k))
        return " ".join(x for i, x in enumerate(w) if i not in drop)
    footer = " ".join(boiler_words[:k])
    return text + "\n\n" + footer


def true_pairs(texts: list[str], threshold: float) -> tuple[set, dict]:
    """Pairs with Jaccard >= threshold (exact, from 5-gram shingle sets) and J of every overlapping pair."""
    from scipy.sparse import csr_matrix

    sets = []
    for t in texts:
        h, _ = batch_shingles([t], 5)
        sets.append(np.unique(h))
    allh = np.unique(np.concatenate(sets))
    rows = np.concatenate([np.full(len(s), i) for i, s in enumerate(sets)])
    cols = np.concatenate([np.searchsorted(allh, s) for s in sets])
    x = csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(texts), len(allh)))
    inter = (x @ x.T).tocoo()
    sizes = np.array([len(s) for s in sets])
    jac = {}
    for i, j, v in zip(inter.row, inter.col, inter.data):
        if i < j:
            jac[(int(i), int(j))] = float(v) / (sizes[i] + sizes[j] - v)
    return {p for p, v in jac.items() if v >= threshold}, jac


def cluster_pairs(groups: list[list[int]]) -> set:
    out = set()
    for g in groups:
        g = sorted(g)
        for a in range(len(g)):
            for b in range(a + 1, len(g)):
                out.add((g[a], g[b]))
    return out


def lmforge_pairs(texts: list[str], tmp: Path, cfg: MinhashConfig) -> tuple[set, set, set]:
    """(all pairs inside a cluster, (removed, keeper) pairs, removed documents)."""
    shard = tmp / "in" / "q.jsonl.zst"
    if not shard.exists():
        write_shard(shard, [Document(str(i), t) for i, t in enumerate(texts)])
    w = tmp / f"run_{cfg.verify}"
    shutil.rmtree(w, ignore_errors=True)
    r = MinhashDedupPass(cfg).run([shard], w / "out", w / "work", LocalExecutor(1), 0, 10**9)
    pos_to_id = {}
    for k, d in enumerate(iter_shard(shard)):
        pos_to_id[f"{shard.name}#{k}"] = int(d.id)
    groups, direct = defaultdict(set), set()
    for recs in r.removed.values():
        for rec in recs:
            keeper = pos_to_id[rec["metadata"]["duplicate_of"]]
            groups[keeper].update([keeper, int(rec["id"])])
            direct.add((keeper, int(rec["id"])))
    removed = {int(rec["id"]) for recs in r.removed.values() for rec in recs}
    return cluster_pairs([list(g) for g in groups.values()]), direct, removed


def datasketch_pairs(texts: list[str], peer, tmp: Path) -> set:
    """datasketch MinHashLSH(14 x 8) query hits, from the peers' worker; checks that it shingled
    every document into as many distinct 5-grams as lmforge's word split gives."""
    path = tmp / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    r = peer.call("datasketch_lsh_pairs", texts_path=str(path), num_perm=112, bands=14, rows=8)
    ours = []
    for t in texts:
        w = words(t)
        ours.append(len({" ".join(w[k : k + 5]) for k in range(max(1, len(w) - 4))}) if w else 0)
    diff = sum(a != b for a, b in zip(ours, r["distinct_shingles"]))
    print(f"datasketch side: distinct 5-gram shingles per document equal to lmforge's word split on "
          f"{len(texts) - diff}/{len(texts)} documents")
    return {(int(a), int(b)) for a, b in r["pairs"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-condition", type=int, default=60)
    ap.add_argument("--distractors", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="15 copies per condition, 250 distractors")
    ap.add_argument("--skip-peers", action="store_true", help="lmforge only (no datasketch)")
    args = ap.parse_args()
    if args.quick:
        args.per_condition, args.distractors = 15, 250
    from peer_env import Peer, lmforge_versions

    load0 = os.getloadavg()
    print(f"load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    print(lmforge_versions("numpy", "xxhash"))
    rng = random.Random(args.seed)
    conds = [("subst", x) for x in SUBST] + [("delete", x) for x in DELETE] + [("boiler", x) for x in BOILER]
    need = len(conds) * args.per_condition + args.distractors
    bases, boiler = base_documents(need)
    if len(bases) < need:
        raise SystemExit(f"only {len(bases)} base documents available, need {need}")
    rng.shuffle(bases)
    pool = sorted({w for t in bases[:200] for w in t.split() if w.isalpha()})
    boiler_words = boiler.split()
    texts = list(bases[:need])
    planted = []  # (base index, variant index, kind, level)
    b = 0
    for kind, level in conds:
        for _ in range(args.per_condition):
            texts.append(make_variant(bases[b], kind, level, boiler_words, pool, rng))
            planted.append((b, len(texts) - 1, kind, level))
            b += 1
    order = list(range(len(texts)))
    rng.shuffle(order)  # variants are not always after their base
    inv = {old: new for new, old in enumerate(order)}
    texts = [texts[i] for i in order]
    planted = [(inv[a], inv[v], k, lv) for a, v, k, lv in planted]
    print(f"{len(texts):,} documents: {need - args.distractors:,} edited bases + their copies, {args.distractors:,} distractors")

    truth, jac = true_pairs(texts, 0.8)
    print(f"true pairs with Jaccard >= 0.8: {len(truth):,}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_quality_"))
    try:
        runs = {
            "lmforge defaults (exact check)": lmforge_pairs(texts, tmp, MinhashConfig()),
            "lmforge LSH only (verify=none)": lmforge_pairs(texts, tmp, MinhashConfig(verify="none", clustering="components")),
        }
        methods = {k: v[0] for k, v in runs.items()}
        direct = {k: v[1] for k, v in runs.items()}
        removed = {k: v[2] for k, v in runs.items()}
        if not args.skip_peers:
            with Peer() as peer:
                print(peer.describe())
                ds = datasketch_pairs(texts, peer, tmp)
            methods[DS] = ds
            direct[DS] = ds
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res = {"documents": len(texts), "true_pairs": len(truth), "methods": {}}
    print("\nprecision: share of predicted pairs whose true Jaccard >= 0.8, counting every pair inside a cluster")
    print("(strict: two copies removed for the same keeper are a pair too) and only (removed, keeper) pairs")
    print("(datasketch: its query hits); recall: share of true pairs that end up inside one cluster;")
    print("resolved: share of true pairs of which at least one document was removed (not both left in the output)")
    print(f"\n{'method':<34}{'pairs':>8}{'precision':>11}{'prec (removed,keeper)':>23}{'recall':>8}{'resolved':>10}")
    for name, pred in methods.items():
        pred = {tuple(sorted(p)) for p in pred}
        dpred = {tuple(sorted(p)) for p in direct[name]}
        tp = len(pred & truth)
        prec = tp / len(pred) if pred else 1.0
        dprec = len(dpred & truth) / len(dpred) if dpred else 1.0
        rec = tp / len(truth) if truth else 1.0
        rm = removed.get(name)
        resolved = sum(a in rm or b in rm for a, b in truth) / len(truth) if rm is not None and truth else None
        res["methods"][name] = {"pairs": len(pred), "precision": prec, "precision_removed_keeper": dprec, "recall": rec,
                                "resolved": resolved,
                                "false_positive_jaccard_max": max((jac.get(p, 0.0) for p in pred - truth), default=None)}
        print(f"{name:<34}{len(pred):>8,}{prec:>11.3f}{dprec:>23.3f}{rec:>8.3f}" + (f"{resolved:>10.3f}" if resolved is not None else f"{'-':>10}"))
    print("\ndetection of the planted copies per condition (mean true Jaccard; share detected):")
    print(f"{'edit':<10}{'level':>6}{'mean J':>8}" + "".join(f"{n.split(' (')[0][:22]:>24}" for n in methods))
    per = {}
    for kind, level in conds:
        rows = [(a, v) for a, v, k, lv in planted if k == kind and lv == level]
        js = [jac.get(tuple(sorted((a, v))), 0.0) for a, v in rows]
        det = {n: sum(tuple(sorted((a, v))) in {tuple(sorted(p)) for p in pred} for a, v in rows) / len(rows) for n, pred in methods.items()}
        per[f"{kind}:{level}"] = {"mean_jaccard": float(np.mean(js)), **det}
        print(f"{kind:<10}{level:>6.0%}{np.mean(js):>8.2f}" + "".join(f"{det[n]:>24.2f}" for n in methods))
    res["per_condition"] = per
    OUT.mkdir(exist_ok=True)
    (OUT / "dedup_quality.json").write_text(json.dumps(res, indent=2))
    print(f"\nwrote {OUT / 'dedup_quality.json'}")
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f}")

    def f1(m: dict) -> float:
        p, r = m["precision"], m["recall"]
        return 2 * p * r / (p + r) if p + r else 0.0

    lm = res["methods"]["lmforge defaults (exact check)"]
    lso = res["methods"]["lmforge LSH only (verify=none)"]
    ds_m = res["methods"].get(DS)
    head = f1(lm) / f1(ds_m) if ds_m and f1(ds_m) else None
    pr_ok = lm["precision"] >= 0.98 and lm["recall"] >= 0.90
    print("RESULT " + json.dumps({
        "bench": "dedup_quality", "headline": round(head, 3) if head else None, "goal": 1.0,
        "met": bool(head is not None and head >= 1.0 and pr_ok),
        "what": "near-duplicate F1 on pairs with true Jaccard >= 0.8, lmforge defaults / datasketch MinHashLSH 14x8 "
                "(goal also lmforge P >= 0.98, R >= 0.90)",
        "lmforge": {"precision": round(lm["precision"], 4), "recall": round(lm["recall"], 4), "f1": round(f1(lm), 4)},
        "datasketch": {"precision": round(ds_m["precision"], 4), "recall": round(ds_m["recall"], 4), "f1": round(f1(ds_m), 4)} if ds_m else None,
        "lmforge_lsh_only": {"precision": round(lso["precision"], 4), "recall": round(lso["recall"], 4), "f1": round(f1(lso), 4)},
        "lsh_only_f1_ratio": round(f1(lso) / f1(ds_m), 3) if ds_m and f1(ds_m) else None,
        "precision_recall_goal_met": pr_ok, "documents": len(texts), "true_pairs": len(truth),
        "load_before": round(load0[0], 2), "load_after": round(load1[0], 2)}))


if __name__ == "__main__":
    main()
