"""Heuristic filters: lmforge vs datatrove on the same real documents, in the same run.

Input (built once, cached under benchmarks/out/): the pages of
../shared/corpus/web/python-docs.warc.gz extracted with trafilatura (as FineWeb's pipeline
does), plus English and other-language manpages, dictionary entries and fortunes.

Each document goes through the four FineWeb filters in pipeline order (Gopher repetition,
Gopher quality, C4 with FineWeb's settings, FineWeb quality), once with datatrove's classes
and once with lmforge's; every filter sees every document (the decision of one does not
hide documents from the next), C4 works on a copy since it rewrites text. The time of each
filter call is measured; both sides run in one process on one core.

    python benchmarks/bench_filters.py [--web N] [--manpages N] [--dictionary N] [--fortunes N] [--words | --words-only]

Prints documents/s per core for each filter and side, the speed ratio, and the decision
agreement per filter; writes the disagreements to benchmarks/out/filters_disagreements.jsonl
and a bar chart to benchmarks/out/filters_speed.png.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
CORPUS = HERE.parents[1] / "shared" / "corpus"


def extracted_web(path: Path = CORPUS / "web" / "python-docs.warc.gz") -> list[dict]:
    """Python docs pages as extracted text (trafilatura, precision mode), cached as JSONL."""
    cache = OUT / "python-docs.extracted.jsonl"
    if not cache.exists():
        import trafilatura
        from warcio.archiveiterator import ArchiveIterator

        OUT.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        with open(path, "rb") as f, open(tmp, "w") as w:
            for rec in ArchiveIterator(f):
                if rec.rec_type != "response":
                    continue
                url = rec.rec_headers.get_header("WARC-Target-URI")
                html = rec.content_stream().read().decode("utf-8", "replace")
                text = trafilatura.extract(html, favor_precision=True, include_comments=False, deduplicate=True)
                if text:
                    w.write(json.dumps({"id": url, "text": text, "metadata": {"url": url, "source": "web"}}) + "\n")
        tmp.rename(cache)
    with open(cache) as f:
        return [json.loads(line) for line in f]


def jsonl(path: Path, n: int, source: str, keep=lambda r: True) -> list[dict]:
    with gzip.open(path, "rt") as f:
        rows = (json.loads(line) for line in f)
        return [
            {"id": f"{source}/{r['id']}", "text": r["text"], "metadata": {"source": source}}
            for r in itertools.islice(filter(keep, rows), n)
        ]


def load_docs(args) -> list[dict]:
    docs = extracted_web()[: args.web]
    docs += jsonl(CORPUS / "multilingual" / "manpages.jsonl.gz", args.manpages, "manpages-en", lambda r: r["lang"] == "en")
    docs += jsonl(CORPUS / "multilingual" / "manpages.jsonl.gz", args.manpages // 4, "manpages-other", lambda r: r["lang"] != "en")
    docs += jsonl(CORPUS / "dictionary" / "gcide.jsonl.gz", args.dictionary, "dictionary")
    docs += jsonl(CORPUS / "multilingual" / "fortunes.jsonl.gz", args.fortunes, "fortunes")
    return docs


def word_agreement(docs: list[dict]) -> None:
    """Share of whitespace chunks (by occurrence) that lmforge splits into exactly the same
    tokens as the spaCy English tokenizer datatrove uses, with the most frequent differences."""
    from collections import Counter

    import spacy

    from lmforge.data.filters.text import split_words

    tok = spacy.blank("en").tokenizer
    chunks = Counter(c for d in docs for c in d["text"].split())
    diff = Counter()
    for c, k in chunks.items():
        if [t.text for t in tok(c)] != split_words(c):
            diff[c] = k
    total = sum(chunks.values())
    print(f"\nword splitting: {1 - sum(diff.values()) / total:.3%} of {total} chunks ({len(chunks)} distinct) split as spaCy does")
    print("most frequent differences:", ", ".join(f"{c!r} x{k}" for c, k in diff.most_common(8)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--web", type=int, default=10_000, help="python-docs pages (all: 516 extracted)")
    ap.add_argument("--manpages", type=int, default=400, help="English manpages (plus a quarter as many others)")
    ap.add_argument("--dictionary", type=int, default=1500)
    ap.add_argument("--fortunes", type=int, default=1500)
    ap.add_argument("--words", action="store_true", help="also compare word splitting with spaCy's English tokenizer, chunk by chunk")
    ap.add_argument("--words-only", action="store_true", help="only the word-splitting comparison")
    args = ap.parse_args()
    if args.words_only:
        word_agreement(load_docs(args))
        return 0

    from datatrove.data import Document as DTDoc
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter

    from lmforge.data.document import Document
    from lmforge.data.filters import C4Filter, FineWebFilter, GopherQualityFilter as LQ, GopherRepetitionFilter as LR

    docs = load_docs(args)
    names = ["gopher_repetition", "gopher_quality", "c4", "fineweb"]
    dt = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(filter_no_terminal_punct=False), FineWebQualityFilter()]
    lm = [LR(), LQ(), C4Filter(), FineWebFilter()]
    # datatrove's reasons -> lmforge's (the same rules, one renamed for clarity)
    rename = {"gopher_enough_stop_words": "gopher_few_stop_words"}

    t_dt = [0.0] * 4
    t_lm = [0.0] * 4
    agree = [0] * 4
    c4_text_same = 0
    c4_both_kept = 0
    disagreements = []
    total_chars = sum(len(d["text"]) for d in docs)
    print(f"{len(docs)} documents, {total_chars / 1e6:.1f} M characters", file=sys.stderr)
    for k, d in enumerate(docs):
        res_dt, res_lm = [], []
        c4_out = [None, None]
        for i in range(4):
            doc = DTDoc(text=d["text"], id=d["id"], metadata=dict(d["metadata"]))
            t0 = time.perf_counter()
            r = dt[i].filter(doc)
            t_dt[i] += time.perf_counter() - t0
            r = None if r is True else rename.get(r[1], r[1]) if isinstance(r, tuple) else "dropped"
            res_dt.append(r)
            if i == 2:
                c4_out[0] = doc.text
        for i in range(4):
            doc = Document(d["id"], d["text"], dict(d["metadata"]))
            t0 = time.perf_counter()
            r = lm[i].decide(doc)
            t_lm[i] += time.perf_counter() - t0
            res_lm.append(r)
            if i == 2:
                c4_out[1] = doc.text
        for i in range(4):
            if (res_dt[i] is None) == (res_lm[i] is None):
                agree[i] += 1
            else:
                disagreements.append({"filter": names[i], "id": d["id"], "datatrove": res_dt[i], "lmforge": res_lm[i]})
        if res_dt[2] is None and res_lm[2] is None:
            c4_both_kept += 1
            c4_text_same += c4_out[0] == c4_out[1]
        if (k + 1) % 500 == 0:
            print(f"  {k + 1}/{len(docs)}", file=sys.stderr)

    n = len(docs)
    rows = []
    print()
    print(f"{'filter':<20}{'datatrove docs/s':>18}{'lmforge docs/s':>16}{'speed-up':>10}{'same decision':>16}")
    for i, name in enumerate(names):
        a, b = n / t_dt[i], n / t_lm[i]
        rows.append((name, a, b, b / a, agree[i] / n))
        print(f"{name:<20}{a:>18.1f}{b:>16.1f}{b / a:>9.1f}x{agree[i] / n:>15.2%}")
    a, b = n / sum(t_dt), n / sum(t_lm)
    print(f"{'all four':<20}{a:>18.1f}{b:>16.1f}{b / a:>9.1f}x")
    print(f"\nC4: identical rewritten text on {c4_text_same}/{c4_both_kept} documents both sides keep")
    if args.words:
        word_agreement(docs)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "filters_disagreements.jsonl", "w") as f:
        for r in disagreements:
            f.write(json.dumps(r) + "\n")
    print(f"{len(disagreements)} disagreements -> {OUT / 'filters_disagreements.jsonl'}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.5))
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r[1] for r in rows], 0.4, label="datatrove")
        ax.bar([i + 0.2 for i in x], [r[2] for r in rows], 0.4, label="lmforge")
        ax.set_xticks(list(x), [f"{r[0]}\n{r[3]:.0f}x, {r[4]:.1%} agree" for r in rows], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("documents/s (one core)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / "filters_speed.png", dpi=120)
        print(f"plot -> {OUT / 'filters_speed.png'}")
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
