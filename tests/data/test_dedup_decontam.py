"""Decontamination against evaluation data by 13-gram overlap."""

import json

import pytest

from lmforge.data.corpus_io import iter_shard, write_shard
from lmforge.data.dedup.decontam import DecontamConfig, DecontamPass
from lmforge.data.document import Document
from lmforge.data.executor import LocalExecutor
from lmforge.errors import InputError

Q = "Which gas do plants absorb from the air during photosynthesis in order to build sugars and grow"


def test_documents_sharing_13grams_with_eval_are_dropped(tmp_path):
    ev = tmp_path / "eval.jsonl"
    ev.write_text(json.dumps({"question": Q, "answer": "carbon dioxide"}) + "\n" + json.dumps({"question": "too short"}) + "\nnot json\n")
    txt = tmp_path / "eval.txt"
    txt.write_text("the quick brown fox jumps over the lazy dog while thirteen words are counted here\n")
    docs = [Document("leak", "Quiz: " + Q.upper() + "? Answer below."),
            Document("clean", "Plants absorb carbon dioxide. " * 5),
            Document("leak2", "As we know, the quick brown fox jumps over the lazy dog while thirteen words are counted here."),
            Document("short", "which gas do plants absorb")]
    write_shard(tmp_path / "s.jsonl.zst", docs)
    write_shard(tmp_path / "e.jsonl.zst", [])
    cfg = DecontamConfig(eval_files=[str(ev), str(txt)], fields=["question"])
    r = DecontamPass(cfg).run([tmp_path / "s.jsonl.zst", tmp_path / "e.jsonl.zst"], tmp_path / "o", tmp_path / "w", LocalExecutor(1), 0, 5)
    kept = {d.id for s in r.shards for d in iter_shard(s)}
    assert kept == {"clean", "short"}
    assert r.stats.dropped["contaminated"] == 2
    assert r.extra["too_short"] == 1 and r.extra["records"] == 3
    by = {rec["id"]: rec["metadata"]["contaminated_by"] for rec in r.removed["contaminated"]}
    assert by == {"leak": ["eval.jsonl"], "leak2": ["eval.txt"]}


def test_missing_eval_file(tmp_path):
    write_shard(tmp_path / "s.jsonl.zst", [Document("a", "text")])
    with pytest.raises(InputError, match="evaluation file not found"):
        DecontamPass(DecontamConfig(eval_files=[str(tmp_path / "nope.jsonl")])).run(
            [tmp_path / "s.jsonl.zst"], tmp_path / "o", tmp_path / "w", LocalExecutor(1), 0, 5)
