"""Benchmark of the ML quality filters against their peers, on real data, in one run.

    python benchmarks/bench_quality.py [--pages 200] [--docs 3000] [--embed-docs 300] [--only fasttext,embedding,...]

Parts (each prints a side-by-side table with the ratio lmforge / peer):
- fasttext: a good/bad set made from the Python-docs crawl (web/python-docs.warc.gz): main
  content chunks extracted by lmforge's trafilatura step are "good", the page text outside
  the main content (navigation, sidebars, footers) is "bad". Held-out accuracy of the
  lmforge-trained classifier; scoring throughput of lmforge's filter vs datatrove's
  FastTextClassifierFilter with the same model (keep_labels=("good", 0.5), newlines as
  spaces) on the same manual pages. Each timer covers making the documents and running the
  filter over them; the model is loaded before it on both sides. lmforge's filter prepares
  the text as the classifier was trained (lower case, tokenized, one line) and scores it;
  datatrove has no preparation step. Same work (the headline): datatrove scoring the text
  lmforge prepares (timed in its worker) + that preparation (timed here, one_line per
  document), against lmforge's filter; the decisions are then identical or the count
  differing is printed. Beside it: datatrove on the raw text (its documented path; its
  decisions differ, printed).
- embedding: logistic head (scipy L-BFGS, lmforge) vs scikit-learn LogisticRegression on the
  same MiniLM embeddings of that set; filter throughput vs sentence-transformers encode alone.
- perplexity: lmforge's modified Kneser-Ney 5-gram (numpy) vs NLTK's KneserNeyInterpolated,
  trained on the same dictionary entries; train time, scoring throughput, rank correlation.
- toxicity: precision/recall on the hand-reviewed fortunes (benchmarks/data/
  fortunes_toxicity_review.json) and throughput on all 76k fortunes, vs datatrove's
  C4BadWordsFilter given the same word lists (its download pointed at local files; stems
  without their '*'), each fortune's language as the document's. Timers cover one pass of
  the filter over every fortune (datatrove: Document construction included); the word lists
  are loaded and compiled before it on both sides.
datatrove runs in the peers' environment (.venv-peers, scripts/setup_bench.sh) in one worker
process (benchmarks/peers/worker.py `fasttext_classifier`, `c4_badwords`), timed inside it;
writing its input files and reading its answers are outside the timers. scikit-learn,
NLTK, sentence-transformers and DuckDB run in this process.
- topics: numpy k-means vs scikit-learn KMeans on the same embeddings (time, inertia, ARI).
- search: SQLite FTS5 (index build + queries) vs DuckDB ILIKE scans on the same documents.

    python benchmarks/bench_quality.py --quick   # fasttext + toxicity only, 60 pages, 300 docs

Last line: `RESULT {json}`: headline = fastText filter docs/s, lmforge / datatrove, same work
(goal 1.0), with every other part's figures beside it.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LMFORGE_PROGRESS", "0")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "corpus"
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from lmforge.data.document import Document  # noqa: E402

RESULTS: dict = {}
_PEER = None


def peer():
    """The peers' worker (started on first use, closed at the end of main)."""
    global _PEER
    if _PEER is None:
        from peer_env import Peer

        _PEER = Peer()
        print(_PEER.describe())
    return _PEER


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def table(title: str, rows: list[tuple], headers=("metric", "lmforge", "peer", "ratio lmforge/peer")) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for r in rows:
        cells = []
        for c in r:
            cells.append(f"{c:,.3f}" if isinstance(c, float) else str(c))
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def ratio(a, b):
    return round(a / b, 2) if b else float("nan")


def jsonl_gz(path: Path, n: int | None = None) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(l) for l in itertools.islice(f, n)]


# ------------------------------------------------------------------ data


def boilerplate_set(pages: int, cache: str = "") -> tuple[list[str], list[str]]:
    """(good, bad) chunks from the Python-docs crawl: main content vs the rest of the page."""
    if cache and Path(cache).is_file():
        d = json.loads(Path(cache).read_text())
        if d.get("pages") == pages:
            return d["good"], d["bad"]
    import lxml.html

    from lmforge.data.extract import extract_text
    from lmforge.data.readers import InputSpec, ReadStats, expand_inputs, read_file

    files = expand_inputs([InputSpec(path=str(SHARED / "web" / "python-docs.warc.gz"), source="web")], lambda p: Path(p))
    good, bad = [], []
    n = 0
    for d in itertools.chain.from_iterable(read_file(f, ReadStats()) for f in files):
        if n >= pages:
            break
        html = d.text
        try:
            main = extract_text(html)
            tree = lxml.html.fromstring(html)
        except Exception:  # a page the parser cannot read is simply not used
            continue
        n += 1
        for bad_el in tree.xpath("//script|//style"):
            bad_el.drop_tree()
        main_lines = [l.strip() for l in main.splitlines() if l.strip()]
        main_set = set(main_lines)
        full_lines = [re.sub(r"\s+", " ", l).strip() for l in tree.text_content().splitlines()]
        rest = [l for l in full_lines if len(l) > 2 and l not in main_set]
        for chunks, lines in ((good, main_lines), (bad, rest)):
            for i in range(0, len(lines), 6):
                c = "\n".join(lines[i : i + 6])
                if len(c) >= 40:
                    chunks.append(c)
    if cache:
        Path(cache).write_text(json.dumps({"pages": pages, "good": good, "bad": bad}))
    return good, bad


# ------------------------------------------------------------------ parts


def part_fasttext(args, data) -> None:
    from lmforge.data.quality.fasttext_clf import FastTextConfig, FastTextQualityFilter, train_fasttext

    good, bad = data
    tmp = Path(args.tmp)
    model = tmp / "ft_quality.bin"
    t0 = time.perf_counter()
    m = train_fasttext(good, bad, model, seed=0)
    train_s = time.perf_counter() - t0
    h = m["heldout"]
    print(f"\ngood/bad set: {len(good)} main-content chunks, {len(bad)} boilerplate chunks from {args.pages} crawled pages; "
          f"train {m['train']}, held-out {m['valid']}")
    RESULTS["fasttext_heldout"] = h
    # throughput on real documents: English manual pages + dictionary entries
    docs = [r["text"] for r in jsonl_gz(SHARED / "multilingual" / "manpages.jsonl.gz", args.docs)]
    chars = sum(len(t) for t in docs)
    from lmforge.data.quality.common import one_line
    from lmforge.data.quality.fasttext_clf import load_fasttext

    f = FastTextQualityFilter(FastTextConfig(enabled=True, model=str(model), threshold=0.5, max_chars=10**9), model)
    load_fasttext(model)  # load outside the timer (datatrove's worker does the same)
    t0 = time.perf_counter()
    ours = list(f(Document(str(i), t, {}) for i, t in enumerate(docs)))
    ours_s = time.perf_counter() - t0
    ours_ids = {d.id for d in ours}

    raw = write_jsonl(tmp / "ft_raw.jsonl", ({"id": i, "text": t} for i, t in enumerate(docs)))
    r = peer().call("fasttext_classifier", model_path=str(model), docs_path=str(raw), threshold=0.5, newline_replacement=" ")
    peer_s, peer_ids = r["s"], set(r["kept_ids"])
    kept_peer = len(peer_ids)
    t0 = time.perf_counter()
    prepared = [one_line(t) for t in docs]
    prep_s = time.perf_counter() - t0
    tok = write_jsonl(tmp / "ft_tok.jsonl", ({"id": i, "text": t} for i, t in enumerate(prepared)))
    r = peer().call("fasttext_classifier", model_path=str(model), docs_path=str(tok), threshold=0.5, newline_replacement=" ")
    peer_tok_ids, peer_tok_s = set(r["kept_ids"]), r["s"]
    kept_peer_tok = len(peer_tok_ids)
    same_work = prep_s + peer_tok_s  # lmforge's text preparation (this process) + datatrove scoring the prepared text
    table("fastText quality classifier (bigrams)", [
        ("held-out accuracy", h["accuracy"], "-", "-"),
        ("held-out precision / recall of 'bad'", f"{h['precision_bad']:.3f} / {h['recall_bad']:.3f}", "-", "-"),
        ("train time (s)", train_s, "-", "-"),
        (f"score {len(docs)} manual pages: docs/s, same work (peer: lmforge's preparation + datatrove scoring its text)",
         len(docs) / ours_s, len(docs) / same_work, ratio(same_work, ours_s)),
        ("  of which preparing the text (lower case, tokenize, one line) s / datatrove scoring s", prep_s, peer_tok_s, "-"),
        (f"score {len(docs)} manual pages: docs/s, peer on raw text (its documented path; other decisions)",
         len(docs) / ours_s, len(docs) / peer_s, ratio(peer_s, ours_s)),
        ("MB/s, peer on raw text", chars / ours_s / 1e6, chars / peer_s / 1e6, ratio(peer_s, ours_s)),
        ("documents kept (P(good) >= 0.5), peer on raw text", len(ours), kept_peer, "-"),
        ("documents kept, peer given lmforge's tokenized text", len(ours), kept_peer_tok, "-"),
        ("same keep/drop decision, peer on raw text", f"{len(docs) - len(ours_ids ^ peer_ids)}/{len(docs)}", "-", "-"),
        ("same keep/drop decision, peer on lmforge's text", f"{len(docs) - len(ours_ids ^ peer_tok_ids)}/{len(docs)}", "-", "-"),
    ])
    RESULTS["fasttext"] = {"docs_s": len(docs) / ours_s, "peer_docs_s": len(docs) / peer_s, "ratio": ratio(same_work, ours_s),
                           "ratio_peer_raw_text": ratio(peer_s, ours_s), "prep_s": prep_s, "peer_scoring_prepared_s": peer_tok_s,
                           "same_decision_raw": (len(docs) - len(ours_ids ^ peer_ids)) / len(docs),
                           "same_decision_same_text": (len(docs) - len(ours_ids ^ peer_tok_ids)) / len(docs)}


def part_embedding(args, data) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    from lmforge.data.quality import embedding as E
    from lmforge.data.quality.fasttext_clf import binary_metrics, split_examples

    good, bad = data
    train, valid = split_examples(good, bad, 0.2, 0, True, 2000, args.embed_docs // 2, prep=lambda t: t.strip())
    E.get_encoder()  # load once, outside the timings
    texts = [t for _, t in train + valid]
    t0 = time.perf_counter()
    emb = E.embed(texts, 32, 2000)
    emb_s = time.perf_counter() - t0
    xt, xv = emb[: len(train)], emb[len(train):]
    yt = np.array([lab == "good" for lab, _ in train], float)
    truth = [lab for lab, _ in valid]
    t0 = time.perf_counter()
    w, b = E.fit_logistic(xt.astype(np.float64), yt, 1e-3)
    ours_fit = time.perf_counter() - t0
    ours_acc = binary_metrics(truth, ["good" if s >= 0.5 else "bad" for s in E.head_scores(xv, w, b, "logistic")])["accuracy"]
    t0 = time.perf_counter()
    clf = LogisticRegression(C=1.0 / (1e-3 * len(xt)), max_iter=1000).fit(xt, yt)
    peer_fit = time.perf_counter() - t0
    peer_acc = binary_metrics(truth, ["good" if p >= 0.5 else "bad" for p in clf.predict_proba(xv)[:, 1]])["accuracy"]

    # filter throughput vs the encoder alone (sentence-transformers), same texts, same batch size
    head = Path(args.tmp) / "head.safetensors"
    E.save_head(head, w, b, {"kind": "embedding", "head": "logistic"})
    docs = [Document(str(i), t) for i, t in enumerate(texts)]
    f = E.EmbeddingQualityFilter(E.EmbeddingConfig(enabled=True, head=str(head), batch_size=32, max_chars=2000), head)
    t0 = time.perf_counter()
    list(f(iter(docs)))
    ours_s = time.perf_counter() - t0
    enc = E.get_encoder()
    t0 = time.perf_counter()
    enc.encode([t[:2000] for t in texts], batch_size=32, normalize_embeddings=True, show_progress_bar=False)
    peer_s = time.perf_counter() - t0
    table("Embedding quality scorer (all-MiniLM-L6-v2 + linear head)", [
        (f"held-out accuracy ({len(valid)} chunks)", ours_acc, peer_acc, ratio(ours_acc, peer_acc)),
        ("head fit time (s), peer = scikit-learn LogisticRegression", ours_fit, peer_fit, ratio(ours_fit, peer_fit)),
        (f"filter docs/s ({len(texts)} chunks), peer = encoder alone", len(texts) / ours_s, len(texts) / peer_s, ratio(peer_s, ours_s)),
    ])
    RESULTS["embedding"] = {"acc": ours_acc, "peer_acc": peer_acc, "docs_s": len(texts) / ours_s, "embed_s": emb_s}
    return emb


def part_perplexity(args) -> None:
    from nltk.lm import KneserNeyInterpolated
    from nltk.lm.preprocessing import pad_both_ends, padded_everygram_pipeline
    from nltk.util import ngrams
    from scipy.stats import spearmanr

    from lmforge.data.quality import perplexity as P
    from lmforge.data.quality.common import words

    rows = jsonl_gz(SHARED / "dictionary" / "gcide.jsonl.gz", 25_000)
    ref, held = [r["text"] for r in rows[:20_000]], [r["text"] for r in rows[20_000:]]
    model = Path(args.tmp) / "kn5.npz"
    t0 = time.perf_counter()
    info = P.train_kn(ref, model, order=5, calibrate=held[:1000])
    ours_train = time.perf_counter() - t0
    m = P.load_kn(model)
    man = [r["text"] for r in jsonl_gz(SHARED / "multilingual" / "manpages.jsonl.gz", args.docs)]
    chars = sum(len(t) for t in man)
    t0 = time.perf_counter()
    ppl_man = P.perplexities(m, man)
    score_s = time.perf_counter() - t0
    ppl_held = P.perplexities(m, held[:1000])
    print(f"\nKneser-Ney 5-gram on {info['train_tokens']:,} dictionary tokens ({info['ngrams']}); median perplexity: held-out dictionary "
          f"{np.median(ppl_held):.1f}, manual pages {np.median(ppl_man):.1f}")

    # peer: NLTK on a slice small enough for it (pure Python), same tokens and sentences, order 3
    # both models get the same closed vocabulary: words seen once in the slice become one unknown-word token
    from collections import Counter

    small_ref = ref[: args.nltk_docs]
    test = held[1000 : 1000 + max(10, args.nltk_docs // 10)]
    freq = Counter(w for t in small_ref for w in words(t))

    def closed(t):
        return "\n".join(" ".join(w if freq[w] >= 2 else "zzunk" for w in words(l)) for l in t.splitlines() if words(l))

    small_ref, test = [closed(t) for t in small_ref], [closed(t) for t in test]
    sents = [l.split() for t in small_ref for l in t.splitlines()]
    t0 = time.perf_counter()
    P.train_kn(small_ref, Path(args.tmp) / "kn3.npz", order=3, calibrate=[])
    ours_small_train = time.perf_counter() - t0
    ms = P.load_kn(Path(args.tmp) / "kn3.npz")
    t0 = time.perf_counter()
    train, vocab = padded_everygram_pipeline(3, sents)
    nltk_lm = KneserNeyInterpolated(3)
    nltk_lm.fit(train, vocab)
    peer_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_small = P.perplexities(ms, test)
    ours_score = time.perf_counter() - t0
    t0 = time.perf_counter()
    peer_ppl = []
    for t in test:
        grams = [g for l in t.splitlines() for g in ngrams(pad_both_ends(l.split(), n=3), 3)]
        peer_ppl.append(nltk_lm.perplexity(grams) if grams else float("inf"))
    peer_score = time.perf_counter() - t0
    peer_ppl = np.array(peer_ppl)
    ok = np.isfinite(peer_ppl) & np.isfinite(ours_small)
    rho = spearmanr(ours_small[ok], peer_ppl[ok]).statistic if ok.sum() > 2 else float("nan")
    table("Perplexity: Kneser-Ney n-gram model", [
        (f"5-gram train on {len(ref):,} entries (s)", ours_train, "-", "-"),
        (f"5-gram score {len(man)} manual pages: docs/s", len(man) / score_s, "-", "-"),
        ("5-gram scoring MB/s", chars / score_s / 1e6, "-", "-"),
        (f"3-gram train on {len(small_ref)} entries (s), peer NLTK", ours_small_train, peer_train, ratio(ours_small_train, peer_train)),
        (f"3-gram score {len(test)} entries: docs/s, peer NLTK", len(test) / ours_score, len(test) / peer_score, ratio(peer_score, ours_score)),
        (f"Spearman rank corr. of perplexities (n={int(ok.sum())} entries, shared closed vocabulary)", float(rho), "-", "-"),
    ])
    RESULTS["perplexity"] = {"docs_s": len(man) / score_s, "spearman_vs_nltk": float(rho), "peer_oov_inf": int((~np.isfinite(peer_ppl)).sum())}


def part_toxicity(args) -> None:
    from lmforge.data.quality.toxicity import LANGUAGES, ToxicityConfig, ToxicityFilter, load_entries

    rows = jsonl_gz(SHARED / "multilingual" / "fortunes.jsonl.gz")
    review = json.loads((REPO / "benchmarks" / "data" / "fortunes_toxicity_review.json").read_text())
    text = {r["id"]: r["text"] for r in rows}
    f = ToxicityFilter(ToxicityConfig())

    def flagged(i):
        return bool(f.hits(text[i]))

    # precision on stratum C (random flagged docs outside the four review files), recall on A+B
    def pr(flag_fn):
        c = review["C"]
        fc = [i for i in c if flag_fn(i)]
        prec = sum(c[i] for i in fc) / len(fc) if fc else float("nan")
        a, b = review["A"], review["B"]
        w_b = review["stratum_B_size"] / len(b)
        pos = sum(a.values()) + w_b * sum(b.values())
        hit = sum(a[i] for i in a if flag_fn(i)) + w_b * sum(b[i] for i in b if flag_fn(i))
        prec_a = sum(a[i] for i in a if flag_fn(i)) / max(1, sum(1 for i in a if flag_fn(i)))
        return prec, prec_a, hit / pos if pos else float("nan")

    ours_p, ours_pa, ours_r = pr(flagged)
    t0 = time.perf_counter()
    n_ours = sum(1 for r in rows if f.hits(r["text"]))
    ours_s = time.perf_counter() - t0

    # peer: datatrove's C4 bad-words filter with the same lists (exact words; stems without '*'), per document language
    tmp = Path(args.tmp) / "badwords"
    tmp.mkdir(exist_ok=True)
    for lang in LANGUAGES:
        (tmp / lang).write_text("\n".join(e.rstrip("*") for e in load_entries([lang])) + "\n")
    src = write_jsonl(Path(args.tmp) / "fortunes.jsonl", ({"id": r["id"], "text": r["text"], "lang": r["lang"]} for r in rows))
    res = peer().call("c4_badwords", rows_path=str(src), lists_dir=str(tmp))
    peer_flagged, peer_s = set(res["flagged_ids"]), res["s"]
    n_peer = len(peer_flagged)
    peer_p, peer_pa, peer_r = pr(lambda i: i in peer_flagged)
    table("Toxicity / adult-content filter on fortunes (76k quotes; hand review as ground truth)", [
        ("precision (60 random flagged docs, stratum C)", ours_p, peer_p, ratio(ours_p, peer_p)),
        ("precision (review files, stratum A)", ours_pa, peer_pa, ratio(ours_pa, peer_pa)),
        ("recall, estimated (review files, strata A+B)", ours_r, peer_r, ratio(ours_r, peer_r)),
        ("documents flagged (of 76,269)", n_ours, n_peer, ratio(n_ours, n_peer)),
        ("docs/s", len(rows) / ours_s, len(rows) / peer_s, ratio(peer_s, ours_s)),
    ])
    print("(different lists in effect: lmforge matches stems ('word*') as prefixes, datatrove only whole words)")
    RESULTS["toxicity"] = {"precision": ours_p, "recall": ours_r, "docs_s": len(rows) / ours_s, "peer_precision": peer_p,
                           "peer_recall": peer_r, "speed_ratio": ratio(peer_s, ours_s)}


def part_topics(args, emb: np.ndarray | None) -> None:
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    from lmforge.data.quality.topics import kmeans

    if emb is None:
        from lmforge.data.quality.embedding import embed

        rows = jsonl_gz(SHARED / "multilingual" / "manpages.jsonl.gz", args.embed_docs)
        emb = embed([r["text"] for r in rows], 32, 1000)
    k = 12
    t0 = time.perf_counter()
    _, lab, inertia = kmeans(emb, k, seed=0, n_init=3)
    ours_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    km = KMeans(k, n_init=3, random_state=0).fit(emb)
    peer_s = time.perf_counter() - t0
    table(f"Topic clustering: k-means, k={k}, {len(emb)} MiniLM embeddings", [
        ("time (s), 3 restarts each, peer = scikit-learn KMeans", ours_s, peer_s, ratio(ours_s, peer_s)),
        ("inertia (lower is better)", inertia, float(km.inertia_), ratio(inertia, float(km.inertia_))),
        ("adjusted Rand index between the two", float(adjusted_rand_score(lab, km.labels_)), "-", "-"),
    ])


def part_search(args) -> None:
    import duckdb

    from lmforge.data.corpus_io import write_shard
    from lmforge.data.search import build_index, search

    rows = jsonl_gz(SHARED / "dictionary" / "gcide.jsonl.gz", 50_000)
    cdir = Path(args.tmp) / "search_run" / "corpus"
    write_shard(cdir / "shard_00000.jsonl.zst", (Document(r["id"], r["text"], {"source": "dictionary"}) for r in rows))
    queries = ["ship", "astronomy", "musical instrument", "river", "poison", "grammar", "horse", "cloth", "geometry", "church"]
    t0 = time.perf_counter()
    build_index(cdir, rebuild=True)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for q in queries:
        search(cdir, q, limit=10)
    ours_q = (time.perf_counter() - t0) / len(queries)
    con = duckdb.connect()
    t0 = time.perf_counter()
    con.execute("CREATE TABLE docs(id VARCHAR, text VARCHAR)")
    con.executemany("INSERT INTO docs VALUES (?, ?)", [(r["id"], r["text"]) for r in rows])
    peer_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    for q in queries:
        con.execute("SELECT id FROM docs WHERE text ILIKE ? LIMIT 10", (f"%{q}%",)).fetchall()
    peer_q = (time.perf_counter() - t0) / len(queries)
    table(f"Full-text search over {len(rows):,} dictionary entries", [
        ("index build / load (s), peer = DuckDB table load", build_s, peer_build, ratio(build_s, peer_build)),
        ("query latency (ms), ranked top 10 vs unranked ILIKE scan", ours_q * 1000, peer_q * 1000, ratio(ours_q, peer_q)),
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=200, help="crawled pages for the good/bad set")
    ap.add_argument("--docs", type=int, default=1000, help="manual pages scored for throughput")
    ap.add_argument("--embed-docs", type=int, default=300, help="chunks embedded for the embedding and topic parts")
    ap.add_argument("--nltk-docs", type=int, default=200, help="dictionary entries for the NLTK comparison (NLTK's KN is very slow)")
    ap.add_argument("--only", default="", help="comma-separated parts: fasttext,embedding,perplexity,toxicity,topics,search")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--cache", default="", help="JSON file caching the extracted good/bad set between runs")
    ap.add_argument("--build-cache", default="", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="fasttext and toxicity only, 60 pages, 300 manual pages")
    args = ap.parse_args()
    if args.quick:
        args.only = args.only or "fasttext,toxicity"
        args.pages, args.docs = min(args.pages, 60), min(args.docs, 300)
    if args.build_cache:
        boilerplate_set(args.pages, args.build_cache)
        return 0
    if not SHARED.is_dir():
        print(f"needs the shared corpus at {SHARED}")
        return 2
    only = set(filter(None, args.only.split(","))) or {"fasttext", "embedding", "perplexity", "toxicity", "topics", "search"}
    random.seed(0)
    load0 = os.getloadavg()
    try:
        run_parts(args, only)
    finally:
        if _PEER is not None:
            _PEER.close()
    load1 = os.getloadavg()
    print(f"\nload average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} "
          "(2 cores shared; speed figures under load are noisy)")
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2, default=float))
    ft = RESULTS.get("fasttext")
    head = ft["ratio"] if ft else None
    print("RESULT " + json.dumps({
        "bench": "quality", "headline": head, "goal": 1.0, "met": bool(head is not None and head >= 1.0),
        "what": "fastText quality filter docs/s on manual pages, lmforge / datatrove FastTextClassifierFilter "
                "(same model, same prepared text; preparation timed on both sides)",
        "parts": sorted(only), **{k: v for k, v in RESULTS.items()},
        "load_before": round(load0[0], 2), "load_after": round(load1[0], 2)}, default=float))
    return 0


def run_parts(args, only: set) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        print(f"# lmforge quality benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs)")
        data = None
        if only & {"fasttext", "embedding", "topics"}:
            # extract in a child process: fastText training diverged ("Encountered NaN") when it
            # ran in the same process right after HTML extraction
            import subprocess

            cache = args.cache or str(Path(tmp) / "goodbad.json")
            if not (Path(cache).is_file() and json.loads(Path(cache).read_text()).get("pages") == args.pages):
                subprocess.run([sys.executable, __file__, "--build-cache", cache, "--pages", str(args.pages)], check=True)
            data = boilerplate_set(args.pages, cache)
        if "fasttext" in only:
            part_fasttext(args, data)
        emb = part_embedding(args, data) if "embedding" in only else None
        if "perplexity" in only:
            part_perplexity(args)
        if "toxicity" in only:
            part_toxicity(args)
        if "topics" in only:
            part_topics(args, emb)
        if "search" in only:
            part_search(args)


if __name__ == "__main__":
    raise SystemExit(main())
