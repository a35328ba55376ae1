"""Full-text search (SQLite FTS5): index built on demand, cached, rebuilt when shards change."""

import argparse
import gzip
import json
import os
from pathlib import Path

import pytest

from lmforge.data.corpus_io import write_shard
from lmforge.data.document import Document
from lmforge.data.quality.commands import register
from lmforge.data.search import build_index, index_path, index_stats, search
from lmforge.errors import InputError

SAMPLE = Path(__file__).resolve().parents[2] / "src" / "lmforge" / "sample"


@pytest.fixture
def run_dir(tmp_path):
    with gzip.open(SAMPLE / "dictionary" / "gcide-sample.jsonl.gz", "rt") as f:
        rows = [json.loads(l) for l in f][:1500]
    docs = [Document(r["id"], r["text"], {"source": "dictionary"}) for r in rows]
    docs.append(Document("web-1", "The asyncio event loop runs coroutines.", {"source": "web", "url": "https://docs.python.org/3.11/library/asyncio.html"}))
    write_shard(tmp_path / "run" / "corpus" / "shard_00000.jsonl.zst", docs[:800])
    write_shard(tmp_path / "run" / "corpus" / "shard_00001.jsonl.zst", docs[800:])
    return tmp_path / "run"


def test_search_finds_ranked_documents_with_snippets(run_dir):
    hits = search(run_dir, "model", limit=5)
    assert 1 <= len(hits) <= 5
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    assert all("[model" in h["snippet"].lower() for h in hits)
    assert hits[0]["score"] >= hits[-1]["score"]
    web = search(run_dir, "asyncio")
    assert web[0]["id"] == "web-1" and web[0]["url"].endswith("asyncio.html") and web[0]["shard"] == "shard_00001.jsonl.zst"
    assert search(run_dir, "source:web coroutines")[0]["id"] == "web-1"
    assert search(run_dir / "corpus", '"event loop"')[0]["id"] == "web-1"  # a corpus dir works too
    assert search(run_dir, "zzzyzzyva") == []


def test_index_is_cached_and_rebuilt_when_shards_change(run_dir):
    p = build_index(run_dir)
    assert p == index_path(run_dir / "corpus") and p.parent.name == ".search"
    st = index_stats(run_dir)
    assert st["documents"] == 1501
    mtime = p.stat().st_mtime_ns
    search(run_dir, "model")
    assert p.stat().st_mtime_ns == mtime  # reused
    shard = run_dir / "corpus" / "shard_00001.jsonl.zst"
    write_shard(shard, [Document("new", "a freshly added platypus")])
    os.utime(shard, (1, 1))  # make sure the fingerprint moves even within the same second
    assert search(run_dir, "platypus")[0]["id"] == "new"
    assert index_stats(run_dir)["documents"] == 801


def test_bad_queries(run_dir):
    hits = search(run_dir, 'model "')
    assert hits  # retried as the plain word
    with pytest.raises(InputError, match="empty search query"):
        search(run_dir, "  ")
    with pytest.raises(InputError, match="no words"):
        search(run_dir, '"(')
    with pytest.raises(InputError, match="no corpus shards"):
        search(run_dir.parent, "x")


def test_cli(run_dir, capsys):
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    args = p.parse_args(["search", str(run_dir), "asyncio", "--limit", "2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "web-1" in out and "docs.python.org" in out
    args = p.parse_args(["search", str(run_dir), "asyncio", "--json", "--rebuild"])
    args.func(args)
    first = json.loads(capsys.readouterr().out.splitlines()[0])
    assert first["id"] == "web-1"


def test_reachable_from_the_lmforge_command(run_dir, capsys, tmp_path):
    from lmforge.cli import main

    assert main(["data", "search", str(run_dir), "asyncio", "--limit", "1"]) == 0
    assert "web-1" in capsys.readouterr().out
    assert main(["data", "search", str(tmp_path / "missing"), "x"]) == 2
    assert "corpus not found" in capsys.readouterr().err
    assert main(["data", "train-quality", "--kind", "perplexity", "--out", str(tmp_path / "m.npz")]) == 2
    assert "--good" in capsys.readouterr().err
