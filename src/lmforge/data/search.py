"""Full-text search over a corpus: SQLite FTS5 (Python's stdlib sqlite3), BM25 ranking.

The index is built on first use and cached in `corpus/.search/index.sqlite`, keyed by a
fingerprint of the shards (path, size, mtime): when the shards change it is rebuilt. It is
written to a temporary file and renamed, so a killed build never leaves a half index.
Queries use FTS5 syntax (words, "exact phrases", AND/OR/NOT, prefix*, column filters like
`source:web`); a query that is not valid FTS5 is retried as plain words.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from lmforge.data.corpus_io import iter_shard, list_shards
from lmforge.errors import InputError
from lmforge.log import logger, progress
from lmforge.rundir import file_fingerprint

INDEX_DIR = ".search"
INDEX_NAME = "index.sqlite"
SCHEMA_VERSION = "1"


def corpus_dir(path: str | Path) -> Path:
    """A run directory (its corpus/) or a corpus directory."""
    p = Path(path)
    d = p / "corpus" if (p / "corpus").is_dir() else p
    if not d.is_dir():
        raise InputError(f"corpus not found: {path}")
    if not list_shards(d):
        raise InputError(f"{d}: no corpus shards (*.jsonl.zst) to search")
    return d


def _fingerprint(shards: list[Path]) -> str:
    return f"v{SCHEMA_VERSION}:" + file_fingerprint(shards)


def index_path(cdir: Path) -> Path:
    return cdir / INDEX_DIR / INDEX_NAME


def _stored_fingerprint(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
            row = con.execute("SELECT value FROM meta WHERE key='fingerprint'").fetchone()
            return row[0] if row else None
    except sqlite3.DatabaseError:
        return None


def build_index(corpus: str | Path, rebuild: bool = False) -> Path:
    """Build (or reuse) the FTS5 index of a corpus; returns its path."""
    cdir = corpus_dir(corpus)
    shards = list_shards(cdir)
    fp = _fingerprint(shards)
    path = index_path(cdir)
    if not rebuild and _stored_fingerprint(path) == fp:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    n = 0
    try:
        with contextlib.closing(sqlite3.connect(tmp)) as con:
            con.execute("PRAGMA journal_mode=OFF")
            con.execute("PRAGMA synchronous=OFF")
            con.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
            con.execute("CREATE VIRTUAL TABLE docs USING fts5(doc_id UNINDEXED, source, url UNINDEXED, shard UNINDEXED, text, tokenize='unicode61 remove_diacritics 2')")
            for shard in progress(shards, desc="indexing", unit="shard"):
                rows = ((d.id, str(d.metadata.get("source", "")), str(d.metadata.get("url", "")), shard.name, d.text) for d in iter_shard(shard))
                cur = con.executemany("INSERT INTO docs(doc_id, source, url, shard, text) VALUES (?,?,?,?,?)", rows)
                n += cur.rowcount if cur.rowcount > 0 else 0
            con.execute("INSERT INTO docs(docs) VALUES ('optimize')")
            con.executemany("INSERT INTO meta VALUES (?,?)", [("fingerprint", fp), ("documents", str(n))])
            con.commit()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    logger.info("search index: %d documents -> %s", n, path)
    return path


def _plain(query: str) -> str:
    """A query as quoted words (for input that is not valid FTS5 syntax)."""
    from lmforge.data.quality.common import words

    toks = [w for w in words(query) if any(ch.isalnum() for ch in w)]
    return " ".join('"' + w.replace('"', '""') + '"' for w in toks)


def search(corpus: str | Path, query: str, limit: int = 10, rebuild: bool = False, snippet_tokens: int = 24) -> list[dict]:
    """Top `limit` documents for `query` by BM25: dicts with rank, id, source, url, shard, score, snippet."""
    if not query.strip():
        raise InputError("empty search query")
    if limit < 1:
        raise InputError(f"--limit must be >= 1, got {limit}")
    path = build_index(corpus, rebuild)
    sql = (
        "SELECT doc_id, source, url, shard, bm25(docs) AS score, "
        f"snippet(docs, 4, '[', ']', ' … ', {int(snippet_tokens)}) FROM docs WHERE docs MATCH ? ORDER BY score LIMIT ?"
    )
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
        try:
            rows = con.execute(sql, (query, limit)).fetchall()
        except sqlite3.OperationalError:
            plain = _plain(query)
            if not plain:
                raise InputError(f"search query {query!r} has no words to look for") from None
            rows = con.execute(sql, (plain, limit)).fetchall()
    return [
        {"rank": i + 1, "id": r[0], "source": r[1], "url": r[2], "shard": r[3], "score": round(-r[4], 4), "snippet": " ".join(r[5].split())}
        for i, r in enumerate(rows)
    ]


def index_stats(corpus: str | Path) -> dict:
    path = index_path(corpus_dir(corpus))
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as con:
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    return {"path": str(path), "documents": int(meta.get("documents", 0)), "bytes": path.stat().st_size}
