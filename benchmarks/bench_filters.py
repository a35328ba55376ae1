"""Heuristic filters: lmforge vs datatrove on the same real documents, in the same run.

Input (built once, cached under benchmarks/out/): the pages of
../shared/corpus/web/python-docs.warc.gz extracted with trafilatura (precision mode, as
FineWeb's pipeline does), plus English and other-language manpages, dictionary entries and
fortunes.

Both sides run the four FineWeb filters in pipeline order on each document: Gopher
repetition -> Gopher quality -> C4 (FineWeb's settings: no terminal-punctuation rule) ->
FineWeb quality. A document dropped by a filter goes no further, and FineWeb gets C4's
rewritten text, as in both tools' pipelines.
- datatrove (in its own environment, .venv-peers, one long-lived worker process:
  benchmarks/peers/worker.py `filters`): `filter(doc)` of GopherRepetitionFilter,
  GopherQualityFilter, C4QualityFilter(filter_no_terminal_punct=False), FineWebQualityFilter;
- lmforge (this process): `decide(doc)` of GopherRepetitionFilter, GopherQualityFilter,
  C4Filter, FineWebFilter with their defaults.
Each side's timer wraps each filter call only (building the document object, reading the
input and comparing results are outside). One core per side; the input is cut into slices
and the sides take turns on each slice, in rotating order, so that both see the same load.

What is shared between filters, per side:
- datatrove caches its word split on the text (`split_into_parts`, an lru_cache of 5), so its
  Gopher quality (and FineWeb, when C4 left the text unchanged) reuses Gopher repetition's
  spaCy split; spaCy keeps its own per-chunk cache across documents.
- lmforge passes nothing from one filter to the next: Gopher repetition splits the words it
  hashes; Gopher quality and FineWeb count tokens from per-chunk statistics (a process-wide
  memo of distinct whitespace chunks, filled by whichever filter meets a chunk first; like
  spaCy's cache it persists across documents).
"pipeline" timings are the filters as the pipeline runs them (headline: all four). "alone"
timings run each filter in a pass of its own over the texts that reached it in the
pipeline, with datatrove's per-text split cache cleared before each call (outside the
timer), so each filter pays its own word split; the process-wide per-chunk caches of both
sides stay warm.

    python benchmarks/bench_filters.py [--web N] [--manpages N] [--dictionary N] [--fortunes N] [--slices 4]
    python benchmarks/bench_filters.py --words-only   # word splitting vs spaCy's English tokenizer, chunk by chunk

Prints docs/s per filter and side, the ratios, and the agreement (same filter drops the
document, or both keep it with byte-identical text); writes the disagreements to
benchmarks/out/filters_disagreements.jsonl. Last line: `RESULT {json}` (headline = all four
filters, pipeline order, lmforge docs/s over datatrove docs/s; goal 10).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
CORPUS = HERE.parents[1] / "shared" / "corpus"
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))


def extracted_web(path: Path = CORPUS / "web" / "python-docs.warc.gz") -> list[dict]:
    """Python docs pages as extracted text (trafilatura, precision mode), cached as JSONL."""
    cache = OUT / "python-docs.extracted.jsonl"
    if not cache.exists():
        import trafilatura

        from lmforge.data.readers import ReadStats, expand_inputs, parse_inputs, read_file

        OUT.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        with open(tmp, "w") as w:
            for d in (d for f in expand_inputs(parse_inputs([str(path)]), Path) for d in read_file(f, ReadStats())):
                if d.metadata.get("format") != "html":
                    continue
                url = d.metadata["url"]
                text = trafilatura.extract(d.text, favor_precision=True, include_comments=False, deduplicate=True)
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


def word_agreement(docs: list[dict], peer) -> None:
    """Share of whitespace chunks (by occurrence) that lmforge splits into exactly the same
    tokens as the spaCy English tokenizer datatrove uses, with the most frequent differences."""
    from collections import Counter

    from lmforge.data.filters.text import split_words

    chunks = Counter(c for d in docs for c in d["text"].split())
    distinct = list(chunks)
    with tempfile.TemporaryDirectory(prefix="bench_words_") as tmp:
        path = Path(tmp) / "chunks.json"
        path.write_text(json.dumps(distinct), encoding="utf-8")
        ref = peer.call("spacy_words", chunks_path=str(path))["tokens"]
    diff = Counter({c: chunks[c] for c, t in zip(distinct, ref) if t != split_words(c)})
    total = sum(chunks.values())
    print(f"\nword splitting: {1 - sum(diff.values()) / total:.3%} of {total} chunks ({len(chunks)} distinct) split as spaCy does")
    print("most frequent differences:", ", ".join(f"{c!r} x{k}" for c, k in diff.most_common(8)))


NAMES = ["gopher_repetition", "gopher_quality", "c4", "fineweb"]
# datatrove's reasons -> lmforge's (the same rules, one renamed for clarity)
RENAME = {"gopher_enough_stop_words": "gopher_few_stop_words"}


def lmforge_filters(docs: list[dict]) -> dict:
    """lmforge's side, the same protocol as the peer worker's `filters` (see the module docstring)."""
    from lmforge.data.document import Document
    from lmforge.data.filters import C4Filter, FineWebFilter, GopherQualityFilter, GopherRepetitionFilter

    fl = [GopherRepetitionFilter(), GopherQualityFilter(), C4Filter(), FineWebFilter()]
    t_pipe, seen = [0.0] * 4, [0] * 4
    inputs: list[list[str]] = [[], [], [], []]
    results = []
    perf = time.perf_counter
    for d in docs:
        doc = Document(d["id"], d["text"], dict(d["metadata"]))
        out = None
        for i, f in enumerate(fl):
            inputs[i].append(doc.text)
            t0 = perf()
            r = f.decide(doc)
            t_pipe[i] += perf() - t0
            seen[i] += 1
            if r is not None:
                out = [i, r]
                break
        results.append(out or [4, hashlib.sha1(doc.text.encode("utf-8", "surrogatepass")).hexdigest()])
    t_alone = [0.0] * 4
    for i, f in enumerate(fl):
        for text in inputs[i]:  # nothing per-document to clear on this side
            doc = Document("x", text, {})
            t0 = perf()
            f.decide(doc)
            t_alone[i] += perf() - t0
    return {"pipeline_s": t_pipe, "alone_s": t_alone, "seen": seen, "results": results}


def _add(total: dict | None, r: dict) -> dict:
    if total is None:
        return {k: list(v) for k, v in r.items()}
    for k in ("pipeline_s", "alone_s", "seen"):
        total[k] = [a + b for a, b in zip(total[k], r[k])]
    total["results"] += r["results"]
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--web", type=int, default=250, help="python-docs pages (all: 516 extracted)")
    ap.add_argument("--manpages", type=int, default=160, help="English manpages (plus a quarter as many others)")
    ap.add_argument("--dictionary", type=int, default=800)
    ap.add_argument("--fortunes", type=int, default=800)
    ap.add_argument("--slices", type=int, default=4, help="the sides take turns on this many slices of the input")
    ap.add_argument("--words-only", action="store_true", help="only compare word splitting with spaCy's English tokenizer, chunk by chunk")
    args = ap.parse_args()
    from peer_env import Peer, lmforge_versions

    docs = load_docs(args)
    if args.words_only:
        with Peer() as peer:
            print(peer.describe())
            word_agreement(docs, peer)
        return 0
    total_chars = sum(len(d["text"]) for d in docs)
    load0 = os.getloadavg()
    print(f"{len(docs)} documents, {total_chars / 1e6:.1f} M characters; load average before: {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}")
    k = max(1, args.slices)
    # interleave the sources: every slice gets the same mix
    slices = [docs[i::k] for i in range(k)]
    res: dict[str, dict | None] = {"datatrove": None, "lmforge": None}
    order: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_filters_") as tmp, Peer() as peer:
        print(peer.describe())
        print(lmforge_versions("numpy"))
        for i, part in enumerate(slices):
            path = Path(tmp) / f"slice{i}.jsonl"
            path.write_text("".join(json.dumps(d) + "\n" for d in part), encoding="utf-8")
            order += part
            sides = ["datatrove", "lmforge"] if i % 2 == 0 else ["lmforge", "datatrove"]
            for side in sides:
                r = peer.call("filters", docs_path=str(path)) if side == "datatrove" else lmforge_filters(part)
                res[side] = _add(res[side], r)
            print(f"  slice {i + 1}/{k} done", file=sys.stderr)
    load1 = os.getloadavg()
    dt, lm = res["datatrove"], res["lmforge"]
    assert dt is not None and lm is not None
    n = len(order)
    agree, same_drop_reason, disagreements = 0, 0, []
    kept_both = kept_same_text = 0
    for d, a, b in zip(order, dt["results"], lm["results"]):
        if a[0] == 4 and b[0] == 4:
            kept_both += 1
            kept_same_text += a[1] == b[1]
        if a[0] == b[0]:
            agree += 1
            same_drop_reason += a[0] == 4 or RENAME.get(a[1], a[1]) == b[1]
        else:
            disagreements.append({"id": d["id"], "datatrove": [NAMES[a[0]] if a[0] < 4 else "kept", a[1]],
                                  "lmforge": [NAMES[b[0]] if b[0] < 4 else "kept", b[1]]})

    print(f"\n{'filter':<19}{'docs in':>8}{'datatrove docs/s':>18}{'lmforge docs/s':>16}{'ratio':>8}"
          f"{'alone: datatrove':>18}{'lmforge':>9}{'ratio':>8}")
    per = {}
    for i, name in enumerate(NAMES):
        a, b = dt["seen"][i] / dt["pipeline_s"][i], lm["seen"][i] / lm["pipeline_s"][i]
        aa, bb = dt["seen"][i] / dt["alone_s"][i], lm["seen"][i] / lm["alone_s"][i]
        per[name] = {"pipeline": round(b / a, 2), "alone": round(bb / aa, 2)}
        print(f"{name:<19}{lm['seen'][i]:>8}{a:>18.1f}{b:>16.1f}{b / a:>7.1f}x{aa:>18.1f}{bb:>9.1f}{bb / aa:>7.1f}x")
    a, b = n / sum(dt["pipeline_s"]), n / sum(lm["pipeline_s"])
    aa, bb = n / sum(dt["alone_s"]), n / sum(lm["alone_s"])
    head = b / a
    print(f"{'all four':<19}{n:>8}{a:>18.1f}{b:>16.1f}{head:>7.1f}x{aa:>18.1f}{bb:>9.1f}{bb / aa:>7.1f}x")
    print("(docs/s of a filter = documents that reached it / seconds in its calls; 'all four' = all documents / "
          "seconds in all filter calls)")
    print(f"\nsame outcome (the same filter drops it, or both keep it): {agree}/{n} ({agree / n:.2%}); "
          f"same drop reason too: {same_drop_reason}/{n}")
    print(f"kept by both: {kept_both}, with byte-identical text after C4: {kept_same_text}")
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "filters_disagreements.jsonl", "w") as f:
        for r in disagreements:
            f.write(json.dumps(r) + "\n")
    print(f"{len(disagreements)} disagreements -> {OUT / 'filters_disagreements.jsonl'}")
    print(f"load average after: {load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} (2 cores; figures under load are noisy, the ratio is what to read)")
    print("RESULT " + json.dumps({"bench": "filters", "headline": round(head, 2), "goal": 10, "unit": "x docs/s, all four filters, pipeline order",
                                  "alone_all_four": round((bb / aa), 2), "per_filter": per, "docs": n,
                                  "same_outcome": round(agree / n, 4), "same_text_kept": [kept_same_text, kept_both],
                                  "load_before": round(load0[0], 2), "load_after": round(load1[0], 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
