"""Decontamination: drop training documents that share word 13-grams with evaluation data.

The evaluation data (JSONL, JSONL.gz/.zst or plain text files) is read once; every record's
text (the `fields` joined, or all its string values when none of them is present; for a
text file, each non-empty line) is cut into word n-grams (default 13, as GPT-3 did) with the
same normalisation and 64-bit hashing as MinHash. A training document that contains at
least `min_matches` of those n-grams is dropped, the matched evaluation file recorded in the
removed sample. Evaluation records shorter than n words cannot be checked and are counted.

Per-shard tasks run in parallel and resume; the n-gram set is a sorted uint64 array (8 bytes
per distinct evaluation n-gram) loaded by every task.
"""

from __future__ import annotations

import gzip
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.data.dedup.common import Drop, check_shards, iter_records, merge_results, save_npy, write_filtered
from lmforge.data.dedup.shingles import batch_shingles, text_batches, words
from lmforge.data.document import Document
from lmforge.data.passes import CorpusPass, PassResult
from lmforge.data.step import StepStats
from lmforge.errors import ConfigError, InputError
from lmforge.log import log_once
from lmforge.rundir import atomic_write_json, file_fingerprint, fingerprint, read_json

U64 = np.uint64


@dataclass
class DecontamConfig:
    enabled: bool = True  # runs when eval_files is not empty
    eval_files: list[str] = field(default_factory=list)  # JSONL / text files of evaluation data
    fields: list[str] = field(default_factory=lambda: ["text"])  # JSONL fields holding evaluation text
    ngram: int = 13
    min_matches: int = 1  # shared n-grams that make a document contaminated

    def validate(self) -> None:
        if self.ngram < 1:
            raise ConfigError("decontam.ngram must be >= 1")
        if self.min_matches < 1:
            raise ConfigError("decontam.min_matches must be >= 1")


def _open_text(path: Path):
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    if path.suffix in (".zst", ".zstd"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def eval_texts(path: Path, fields: list[str]) -> list[str]:
    """Texts of one evaluation file (JSONL records or plain-text lines)."""
    if not path.is_file():
        raise InputError(f"decontam: evaluation file not found: {path}")
    name = path.name.lower()
    is_jsonl = any(name.endswith(s) for s in (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".jsonl.zst", ".json.gz"))
    out = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not is_jsonl:
                out.append(line)
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                log_once(f"decontam:{path}", f"{path}:{lineno}: not JSON, skipped ({e}); further ones are skipped silently")
                continue
            if isinstance(rec, str):
                out.append(rec)
                continue
            if not isinstance(rec, dict):
                continue
            vals = [_flat(rec[k]) for k in fields if k in rec]
            if not vals:
                vals = [_flat(v) for v in rec.values() if isinstance(v, (str, list))]
            out.append("\n".join(v for v in vals if v))
    return out


def _flat(v) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        return "\n".join(_flat(x) for x in v)
    return ""


def build_ngram_set(files: list[Path], fields: list[str], n: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Sorted distinct n-gram hashes of the evaluation files, the file index of each, and counts."""
    hs, src = [], []
    info = {"records": 0, "too_short": 0, "files": [str(f) for f in files]}
    for fi, f in enumerate(files):
        texts = eval_texts(f, fields)
        info["records"] += len(texts)
        keep = []
        for t in texts:
            if len(words(t)) >= n:
                keep.append(t)
            else:
                info["too_short"] += 1
        for i, j in text_batches(keep):
            h, _ = batch_shingles(keep[i:j], n)
            hs.append(h)
            src.append(np.full(len(h), fi, np.int32))
    h = np.concatenate(hs) if hs else np.zeros(0, U64)
    s = np.concatenate(src) if src else np.zeros(0, np.int32)
    h, first = np.unique(h, return_index=True)
    info["ngrams"] = int(len(h))
    return h, s[first], info


def _task(task: dict) -> dict:
    table = np.load(task["table"])
    grams, src = table[0], table[1].astype(np.int64)
    files = task["files"]
    st = StepStats("decontam")
    n = task["ngram"]
    recs = list(iter_records(task["path"]))
    texts = [d.text if d is not None else "" for _, d in recs]
    batch: dict = {}  # n-gram hashes and hits of the text batch holding the record being decided

    def records():
        for i, j in text_batches(texts):
            h, offs = batch_shingles(texts[i:j], n)
            batch.update(i=i, h=h, offs=offs, nw=np.diff(offs), hit=np.isin(h, grams) if len(grams) else np.zeros(len(h), bool))
            for t in range(i, j):
                yield t, recs[t][1]

    def decide(t: int, doc: Document) -> Document | Drop:
        h, offs, k0 = batch["h"], batch["offs"], t - batch["i"]
        a, b = offs[k0], offs[k0 + 1]
        m = batch["hit"][a:b]
        k = int(m.sum()) if batch["nw"][k0] else 0
        if k and len(words(doc.text)) < n:
            k = 0  # a document shorter than n words has no real n-gram
        if k < task["min_matches"]:
            return doc
        matched = np.unique(h[a:b][m])
        which = src[np.searchsorted(grams, matched)]
        st.counters["matched_ngrams"] += k
        return Drop("contaminated", Document(doc.id, doc.text, dict(doc.metadata, contaminated_by=sorted({files[w] for w in which}), matched_ngrams=k)))

    return write_filtered(records(), task["out"], decide, st, task["sample"])


class DecontamPass(CorpusPass):
    name = "decontam"

    def __init__(self, cfg: DecontamConfig | None = None, resolve=None):
        self.cfg = cfg or DecontamConfig()
        self.resolve = resolve or (lambda p: Path(p).expanduser().resolve())

    def run(self, in_shards, out_dir, work_dir, executor, seed, sample_removed) -> PassResult:
        t0 = time.perf_counter()
        c = self.cfg
        shards = check_shards(in_shards)
        files = [Path(self.resolve(f)) for f in c.eval_files]
        for f in files:
            if not f.is_file():
                raise InputError(f"decontam: evaluation file not found: {f}")
        wd = Path(work_dir) / f"decontam-{fingerprint([c.ngram, c.min_matches, c.fields, file_fingerprint(files), [p.name for p in shards]])}"
        table = wd / "ngrams.npy"
        info = read_json(wd / "ngrams.json")
        if info is None or not table.exists():
            h, src, info = build_ngram_set(files, c.fields, c.ngram)
            save_npy(table, np.stack([h, src.astype(U64)]) if len(h) else np.zeros((2, 0), U64))
            atomic_write_json(wd / "ngrams.json", info)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        outs = [Path(out_dir) / p.name for p in shards]
        names = [f.name for f in files]
        res = executor.map(_task, [{"path": str(p), "out": str(o), "table": str(table), "files": names, "ngram": c.ngram,
                                    "min_matches": c.min_matches, "sample": sample_removed} for p, o in zip(shards, outs)],
                           [p.name for p in shards], wd / ".markers", desc="decontam")
        stats, removed = merge_results(self.name, res, sample_removed)
        stats.time_s = time.perf_counter() - t0
        return PassResult(outs, stats, removed, {"ngram": c.ngram, "min_matches": c.min_matches, **info})
