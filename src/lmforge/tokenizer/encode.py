"""Corpus -> token shards, through the one tokenizer runtime (`lmforge.tokenizer.runtime`:
tiktoken with the ids of tokenizer.json for lmforge's BPE, HF `tokenizers` for a foreign file).

`encode_corpus` writes the trainer's input (docs/ARTIFACTS.md "tokenizer/ and tokens/"):
  1. every corpus shard is encoded (in parallel: one process per shard, threads inside) into
     `<work>/enc_XXXXX.bin` (uint32 ids, no bos) + `.docs.npy` (tokens, bytes, source per doc)
     + a `.json` marker written last — a killed job resumes with the shards not yet marked;
  2. a seeded permutation of all documents shuffles them globally; the first `val_fraction`
     go to val, the rest to train; each document is written as `<|bos|> ids...` into flat
     little-endian uint16/uint32 shards of about `shard_tokens`, inside a temporary directory
     that replaces `tokens/` only when complete (index.json included).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import InputError
from lmforge.log import logger, progress
from lmforge.rundir import atomic_dir, atomic_file, atomic_write_json, read_json
from lmforge.tokenizer.runtime import Tokenizer
from lmforge.tokenizer.runtime import tokenizer_file as _tokenizer_file

INDEX = "index.json"


def file_sha(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- phase 1: shard -> ids

DOC_DTYPE = np.dtype([("tokens", "<i8"), ("bytes", "<i8"), ("source", "<i4")])


@dataclass
class _Task:
    index: int
    shard: str
    tokenizer_file: str
    work_dir: str
    batch_docs: int
    threads: int
    key: dict
    backend: str = "auto"


def _marker(work: Path, i: int) -> Path:
    return work / f"enc_{i:05d}.json"


def _encode_shard(task: _Task) -> dict:
    """Encode one corpus shard into the work dir; returns its marker dict."""
    from lmforge.tokenizer.corpus import ReadStats, iter_docs

    tok = Tokenizer.from_file(task.tokenizer_file, backend=task.backend)
    work = Path(task.work_dir)
    stats = ReadStats()
    sources: dict[str, int] = {}
    docs: list[tuple[int, int, int]] = []
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    n_tokens = 0

    with atomic_file(work / f"enc_{task.index:05d}.bin") as out:
        def flush(texts: list[str], srcs: list[int]) -> None:
            nonlocal n_tokens
            ids = tok.encode_arrays(texts, num_threads=task.threads)  # uint32 arrays: no Python int per token
            lens = [len(x) for x in ids]
            total = sum(lens)
            arr = np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint32)
            out.write(arr.tobytes())
            counts[:] += np.bincount(arr, minlength=tok.vocab_size)[: tok.vocab_size]
            for t, n, s in zip(texts, lens, srcs):
                docs.append((n, len(t.encode("utf-8")), s))
            n_tokens += total

        texts: list[str] = []
        srcs: list[int] = []
        for doc in iter_docs(task.shard, stats):
            if not doc.text:
                continue
            texts.append(doc.text)
            srcs.append(sources.setdefault(doc.source, len(sources)))
            if len(texts) >= task.batch_docs:
                flush(texts, srcs)
                texts, srcs = [], []
        if texts:
            flush(texts, srcs)
    arr = np.array(docs, dtype=DOC_DTYPE) if docs else np.zeros(0, dtype=DOC_DTYPE)
    with atomic_file(work / f"enc_{task.index:05d}.docs.npy") as fh:
        np.save(fh, arr)
    with atomic_file(work / f"enc_{task.index:05d}.counts.npy") as fh:
        np.save(fh, counts)
    marker = dict(task.key, docs=len(docs), tokens=n_tokens, corrupt=stats.corrupt, sources=list(sources))
    atomic_write_json(_marker(work, task.index), marker)
    return marker


def _shard_key(shard: Path, tokenizer_sha: str) -> dict:
    st = shard.stat()
    return {"shard": str(shard), "size": st.st_size, "mtime": int(st.st_mtime), "tokenizer": tokenizer_sha}


def _encode_all(shards: list[Path], tokenizer_file: Path, work: Path, workers: int, batch_docs: int,
                backend: str = "auto") -> list[dict]:
    work.mkdir(parents=True, exist_ok=True)
    sha = file_sha(tokenizer_file)
    markers: dict[int, dict] = {}
    todo: list[_Task] = []
    procs = max(1, min(workers, len(shards)))
    threads = max(1, workers // procs)
    for i, s in enumerate(shards):
        key = _shard_key(s, sha)
        m = read_json(_marker(work, i))
        if m and all(m.get(k) == v for k, v in key.items()) and all((work / f"enc_{i:05d}{ext}").exists() for ext in (".bin", ".docs.npy", ".counts.npy")):
            markers[i] = m
        else:
            todo.append(_Task(i, str(s), str(tokenizer_file), str(work), batch_docs, threads, key, backend))
    if markers:
        logger.info("tokenizer: %d of %d corpus shards already encoded (resuming)", len(markers), len(shards))
    if todo:
        if procs > 1 and len(todo) > 1:
            import multiprocessing as mp

            with mp.get_context("spawn").Pool(min(procs, len(todo))) as pool:
                for m in progress(pool.imap_unordered(_encode_shard, todo), desc="tokenizer: encoding", total=len(todo), unit="shard"):
                    markers[shards.index(Path(m["shard"]))] = m
        else:
            for t in progress(todo, desc="tokenizer: encoding", unit="shard"):
                t.threads = max(1, workers)
                markers[t.index] = _encode_shard(t)
    return [markers[i] for i in range(len(shards))]


# ---------------------------------------------------------------- phase 2: shuffle + split + write


def _write_split(name: str, order: np.ndarray, table: dict, maps: list[np.memmap], out_dir: Path, dtype: np.dtype,
                 bos: int, shard_tokens: int) -> list[dict]:
    shards: list[dict] = []
    split_dir = out_dir / name
    split_dir.mkdir(parents=True, exist_ok=True)
    buf: list[np.ndarray] = []
    buf_tokens = 0
    buf_docs = 0
    bos_arr = np.array([bos], dtype=dtype)

    def close() -> None:
        nonlocal buf, buf_tokens, buf_docs
        rel = f"{name}/shard_{len(shards):05d}.bin"
        with atomic_file(out_dir / rel) as fh:
            for a in buf:
                fh.write(a.tobytes())
        shards.append({"path": rel, "tokens": int(buf_tokens), "docs": int(buf_docs)})
        buf, buf_tokens, buf_docs = [], 0, 0

    shard_of, start, length = table["shard"], table["start"], table["tokens"]
    for d in progress(order, desc=f"tokenizer: writing {name}", unit="doc", total=len(order)):
        s, a, n = shard_of[d], start[d], length[d]
        buf.append(bos_arr)
        buf.append(maps[s][a:a + n].astype(dtype, copy=False))
        buf_tokens += n + 1
        buf_docs += 1
        if buf_tokens >= shard_tokens:
            close()
    if buf_docs:
        close()
    return shards


def encode_corpus(
    shards: list[Path],
    tokenizer_dir: str | Path,
    tokens_dir: str | Path,
    work_dir: str | Path,
    *,
    val_fraction: float = 0.005,
    shard_tokens: int = 100_000_000,
    dtype: str = "auto",
    seed: int = 1234,
    workers: int = 1,
    batch_docs: int = 512,
    backend: str = "auto",
) -> dict:
    """Encode corpus shards into `tokens_dir` (train/ + val/ + index.json). Returns the index plus `counts`.
    `backend` picks the tokenizer runtime's backend (`Tokenizer.from_file`); the ids are the same."""
    t0 = time.time()
    tok_file = _tokenizer_file(tokenizer_dir)
    tok = Tokenizer.from_file(tok_file, backend=backend)
    if tok.bos_id is None:
        raise InputError(f"{tok_file}: no <|bos|> token (token shards put one before each document)")
    np_dtype = np.dtype("<u2") if (dtype == "uint16" or (dtype == "auto" and tok.vocab_size <= 65536)) else np.dtype("<u4")
    if np_dtype == np.dtype("<u2") and tok.vocab_size > 65536:
        raise InputError(f"dtype uint16 cannot hold a vocabulary of {tok.vocab_size} ids")
    work = Path(work_dir)
    markers = _encode_all(shards, tok_file, work, max(1, workers), batch_docs, backend)
    t_enc = time.time() - t0

    # global document table
    src_names: list[str] = []
    parts = {"shard": [], "start": [], "tokens": [], "bytes": [], "source": []}
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    maps: list[np.ndarray] = []
    for i, m in enumerate(markers):
        docs = np.load(work / f"enc_{i:05d}.docs.npy")
        counts += np.load(work / f"enc_{i:05d}.counts.npy")
        binf = work / f"enc_{i:05d}.bin"
        maps.append(np.memmap(binf, dtype="<u4", mode="r") if binf.stat().st_size else np.zeros(0, dtype="<u4"))
        for name in m["sources"]:
            if name not in src_names:
                src_names.append(name)
        remap = np.array([src_names.index(name) for name in m["sources"]] or [0], dtype=np.int32)  # shard-local -> global
        starts = np.concatenate([[0], np.cumsum(docs["tokens"])[:-1]]) if len(docs) else np.zeros(0, dtype=np.int64)
        parts["shard"].append(np.full(len(docs), i, dtype=np.int32))
        parts["start"].append(starts.astype(np.int64))
        parts["tokens"].append(docs["tokens"])
        parts["bytes"].append(docs["bytes"])
        parts["source"].append(remap[docs["source"]] if len(docs) else np.zeros(0, dtype=np.int32))
    table = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    n_docs = len(table["tokens"])
    if n_docs == 0:
        raise InputError(f"no documents with text in {len(shards)} corpus shard(s)")

    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_docs)
    n_val = int(round(n_docs * val_fraction))
    if val_fraction > 0 and n_docs >= 2:
        n_val = min(max(1, n_val), n_docs - 1)
    val_order, train_order = perm[:n_val], perm[n_val:]

    tokens_dir = Path(tokens_dir)
    for stale in tokens_dir.parent.glob(f".{tokens_dir.name}.tmp.*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed run
    index: dict = {}
    with atomic_dir(tokens_dir) as tmp:
        os.chmod(tmp, 0o755)  # a temp dir is created private; the token shards are ordinary outputs
        train = _write_split("train", train_order, table, maps, tmp, np_dtype, tok.bos_id, shard_tokens)
        val = _write_split("val", val_order, table, maps, tmp, np_dtype, tok.bos_id, shard_tokens) if n_val else []
        sources = {}
        for si, name in enumerate(src_names):
            sel = table["source"] == si
            nt, nb = int(table["tokens"][sel].sum()), int(table["bytes"][sel].sum())
            sources[name] = {"docs": int(sel.sum()), "bytes": nb, "tokens": nt, "bytes_per_token": round(nb / max(nt, 1), 4)}
        nb_all, nt_all = int(table["bytes"].sum()), int(table["tokens"].sum())
        index = {
            "dtype": "uint16" if np_dtype.itemsize == 2 else "uint32",
            "vocab_size": tok.vocab_size,
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "seed": seed,
            "val_fraction": val_fraction,
            "tokenizer": str(tok_file),
            "tokenizer_sha": file_sha(tok_file),
            "train": train,
            "val": val,
            "totals": {
                "docs": n_docs,
                "train_docs": int(len(train_order)),
                "val_docs": int(n_val),
                "train_tokens": sum(s["tokens"] for s in train),
                "val_tokens": sum(s["tokens"] for s in val),
                "bytes": nb_all,
                "text_tokens": nt_all,
                "bytes_per_token": round(nb_all / max(nt_all, 1), 4),
                "corrupt_records": sum(m.get("corrupt", 0) for m in markers),
            },
            "sources": sources,
            "encode_seconds": round(t_enc, 3),
            "encode_mb_per_s": round(nb_all / 1e6 / max(t_enc, 1e-9), 3),
        }
        atomic_write_json(tmp / INDEX, index)
    del maps
    shutil.rmtree(work, ignore_errors=True)
    logger.info("tokenizer: %d docs -> %d train + %d val tokens (%.2f bytes/token) in %.1fs",
                n_docs, index["totals"]["train_tokens"], index["totals"]["val_tokens"], index["totals"]["bytes_per_token"], time.time() - t0)
    return dict(index, counts=counts)


def read_tokens(tokens_dir: str | Path, split: str = "train") -> np.ndarray:
    """All tokens of a split as one array (for tests and small runs; the trainer memmaps the shards)."""
    d = Path(tokens_dir)
    index = read_json(d / INDEX)
    if not index:
        raise InputError(f"no {INDEX} in {d}")
    arrs = [np.fromfile(d / s["path"], dtype=np.dtype(index["dtype"]).newbyteorder("<")) for s in index[split]]
    return np.concatenate(arrs) if arrs else np.zeros(0, dtype=index["dtype"])
