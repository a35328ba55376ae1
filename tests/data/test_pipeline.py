"""The pipeline: determinism across workers, exact dedup, skips, stats, removed samples, resume."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmforge import config as C
from lmforge.data import pipeline as P
from lmforge.data.config import DataConfig
from lmforge.data.corpus_io import iter_corpus, write_shard
from lmforge.data.dedup.exact import ExactDedupConfig, ExactDedupPass, normalize_text
from lmforge.data.document import Document
from lmforge.data.executor import LocalExecutor
from lmforge.data.step import Filter
from lmforge.data.writers import iter_parquet_corpus
from lmforge.errors import ConfigError

ALL_OFF = {"extract": {"enabled": False}, "langid": {"enabled": False}, "filters": {"enabled": False},
           "quality": {"enabled": False}, "pii": {"enabled": False}, "dedup": {"minhash": {"enabled": False}}}
ALL_OFF_TOML = "\n".join(f"[{k}]\nenabled = false" for k in ALL_OFF if k != "dedup") + "\n[dedup.minhash]\nenabled = false\n"


def make_inputs(root: Path) -> None:
    """Three small JSONL inputs with exact and near-exact duplicates across and within files."""
    root.mkdir(parents=True, exist_ok=True)
    a = [{"id": f"a{i}", "text": f"Document number {i} about topic {i % 7}.", "url": f"https://site{i % 3}.example/{i}"} for i in range(40)]
    a.append({"id": "a-dup", "text": "Document number 3 about topic 3."})  # duplicate inside a file
    b = [{"id": f"b{i}", "text": f"document   NUMBER {i} about topic {i % 7}."} for i in range(0, 60, 2)]  # case/space copies of a
    c = [{"id": f"c{i}", "text": f"Unique text {i} from c."} for i in range(25)] + [{"id": "cbad", "text": 5}]
    with gzip.open(root / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in a)
    (root / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b) + "{not json\n")
    (root / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in c))


def cfg_for(root: Path, **kw) -> DataConfig:
    raw = {"inputs": [{"path": str(root / "a.jsonl.gz"), "source": "a"}, {"path": str(root / "b.jsonl"), "source": "b"},
                      {"path": str(root / "c.jsonl"), "source": "c"}],
           "shard_docs": 20, "outputs": ["jsonl.zst", "parquet"], **ALL_OFF}
    C.apply_overrides(raw, kw)
    return C.build(DataConfig, raw, "data")


def shard_bytes(out: Path) -> dict[str, bytes]:
    files = sorted(out.glob("shard_*.jsonl.zst")) + sorted((out / "parquet").glob("*.parquet"))
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in files}


def test_pipeline_output_is_identical_for_any_worker_count(tmp_path):
    make_inputs(tmp_path / "in")
    r1 = P.run_pipeline(cfg_for(tmp_path / "in"), tmp_path / "o1", ".", workers=1)
    P.run_pipeline(cfg_for(tmp_path / "in", **{"executor.tasks": 0}), tmp_path / "o2", ".", workers=2)
    b1, b2 = shard_bytes(tmp_path / "o1"), shard_bytes(tmp_path / "o2")
    assert b1 == b2 and len([k for k in b1 if k.endswith(".zst")]) == 4
    docs = list(iter_corpus(tmp_path / "o1"))
    # 41 + 30 + 25 read; a-dup and the 20 lower/space copies from b with an even i < 40 removed
    assert len(docs) == 41 + 30 + 25 - 1 - 20
    assert [d.id for d in docs] == [d.id for d in iter_parquet_corpus(tmp_path / "o1" / "parquet")]
    assert len({d.id for d in docs}) == len(docs)
    st = r1.stats
    assert [s["name"] for s in st["steps"]] == ["read", "exact_dedup"]
    assert st["steps"][0]["dropped"] == {"corrupt:bad_json": 1, "corrupt:no_text": 1}
    assert st["steps"][1]["dropped"] == {"duplicate": 21}
    assert st["totals"]["docs_out"] == len(docs) and st["totals"]["corrupt_records"] == 2
    assert st["sources"]["b"] == {"docs_read": 30, "docs_out": 10, "tokens_out": 60, "chars_out": sum(len(d.text) for d in docs if d.metadata["source"] == "b")}
    top = {d["domain"]: d for d in st["top_domains"]}
    assert top["site0.example"]["docs"] == 14 and "(b)" in top
    assert not (tmp_path / "o1" / ".work").exists()
    removed = [json.loads(x) for x in (tmp_path / "o1" / "removed" / "exact_dedup.jsonl").read_text().splitlines()]
    assert len(removed) == 20 and {r["reason"] for r in removed} == {"duplicate"}


def test_exact_dedup_keeps_first_occurrence_in_input_order(tmp_path):
    s0 = [Document("x/0", "Hello  World"), Document("x/1", "other"), Document("x/2", "hello world")]
    s1 = [Document("y/0", "HELLO WORLD"), Document("y/1", "other"), Document("y/2", "new")]
    write_shard(tmp_path / "00000.jsonl.zst", s0)
    write_shard(tmp_path / "00001.jsonl.zst", s1)
    ins = [tmp_path / "00000.jsonl.zst", tmp_path / "00001.jsonl.zst"]
    outs = {}
    for mode, workers in [("lower", 1), ("lower", 2), ("whitespace", 1), ("none", 1)]:
        res = ExactDedupPass(ExactDedupConfig(normalize=mode)).run(
            ins, tmp_path / f"out_{mode}_{workers}", tmp_path / f"work_{mode}_{workers}", LocalExecutor(workers), 0, 5)
        outs[(mode, workers)] = [[d.id for d in iter_corpus_file(p)] for p in res.shards]
        if mode == "lower":
            assert res.stats.dropped["duplicate"] == 3 and res.stats.counters["distinct_texts"] == 3
    assert outs[("lower", 1)] == outs[("lower", 2)] == [["x/0", "x/1"], ["y/2"]]
    assert outs[("whitespace", 1)] == [["x/0", "x/1", "x/2"], ["y/0", "y/2"]]
    assert outs[("none", 1)] == [["x/0", "x/1", "x/2"], ["y/0", "y/2"]]
    assert normalize_text("Ａ  b\n", "lower") == "a b" and normalize_text("a, b!", "alnum") == "a b"


def iter_corpus_file(p):
    from lmforge.data.corpus_io import iter_shard

    return iter_shard(p)


class DropMarked(Filter):
    name = "drop_marked"

    def decide(self, doc):
        return "marked" if "topic 3" in doc.text else None


def test_steps_skips_stats_and_removed_samples(tmp_path, monkeypatch):
    make_inputs(tmp_path / "in")
    monkeypatch.setattr(P, "build_stream_steps", lambda cfg, seed, resolve=None: [("filters", DropMarked(sample_removed=cfg.sample_removed))])
    raw_cfg = cfg_for(tmp_path / "in", sample_removed=3)
    raw_cfg.inputs[2]["skip"] = ["drop_marked"]
    res = P.run_pipeline(raw_cfg, tmp_path / "o", ".", workers=1)
    names = [s["name"] for s in res.stats["steps"]]
    assert names == ["read", "drop_marked", "exact_dedup"]
    dm = res.stats["steps"][1]
    assert dm["dropped"] == {"marked": 6 + 1 + 4}  # a: i%7==3 (6) + a-dup, b: 4 copies; c skipped the step
    assert dm["docs_in"] == 41 + 30
    rem = [json.loads(x) for x in (tmp_path / "o" / "removed" / "drop_marked.jsonl").read_text().splitlines()]
    assert len(rem) == 3 and all(r["reason"] == "marked" and "topic 3" in r["text"] for r in rem)
    bad = cfg_for(tmp_path / "in")
    bad.inputs[0]["skip"] = ["lnagid"]
    with pytest.raises(ConfigError, match="skip = 'lnagid' is not a pipeline step"):
        P.run_pipeline(bad, tmp_path / "o2", ".", workers=1)


def test_config_change_discards_stale_work_and_stale_shards(tmp_path):
    make_inputs(tmp_path / "in")
    c = cfg_for(tmp_path / "in", keep_work=True, shard_docs=10)
    P.run_pipeline(c, tmp_path / "o", ".")
    assert len(list((tmp_path / "o").glob("shard_*.jsonl.zst"))) == 8
    assert (tmp_path / "o" / ".work" / "markers" / "stream").is_dir()
    c2 = cfg_for(tmp_path / "in", shard_docs=50, outputs=["jsonl.zst"])
    P.run_pipeline(c2, tmp_path / "o", ".")
    assert sorted(p.name for p in (tmp_path / "o").glob("shard_*")) == ["shard_00000.jsonl.zst", "shard_00001.jsonl.zst"]
    assert not (tmp_path / "o" / "parquet").exists()


def test_plan_tasks_and_output_shards():
    from lmforge.data.readers import InputFile

    files = [InputFile("a", "s", "jsonl", "a", size=100), InputFile("b", "s", "jsonl", "b", size=10)]
    assert P.plan_tasks(files, 0) == [(0, 0, 1), (1, 0, 1)]
    assert P.plan_tasks(files, 4) == [(0, 0, 3), (0, 1, 3), (0, 2, 3), (1, 0, 1)]
    plans = P.plan_output_shards([3, 0, 4], ["p", "q", "r"], 5)
    assert plans == [[("p", 0, 3), ("r", 0, 2)], [("r", 2, 2)]]


def test_sliced_large_file_gives_same_documents(tmp_path):
    make_inputs(tmp_path / "in")
    P.run_pipeline(cfg_for(tmp_path / "in"), tmp_path / "o1", ".")
    P.run_pipeline(cfg_for(tmp_path / "in", **{"executor.tasks": 6}), tmp_path / "o2", ".", workers=1)
    a = sorted(d.id for d in iter_corpus(tmp_path / "o1"))
    b = sorted(d.id for d in iter_corpus(tmp_path / "o2"))
    assert a == b


def test_killed_run_resumes_to_identical_output(tmp_path):
    """SIGKILL the whole `lmforge data run` process group mid-run, rerun, compare with a clean run."""
    root = tmp_path / "in"
    root.mkdir()
    for k in range(10):
        (root / f"part{k}.jsonl").write_text("".join(json.dumps({"text": f"file {k} line {i} " + "word " * 30}) + "\n" for i in range(300)))
    toml = tmp_path / "data.toml"
    toml.write_text(f'inputs = [{{ path = "in/*.jsonl", source = "p" }}]\nshard_docs = 700\n{ALL_OFF_TOML}')
    env = dict(os.environ, LMFORGE_PROGRESS="0")
    cmd = [sys.executable, "-m", "lmforge", "data", "run", str(toml), "--workers", "2"]
    from lmforge.cli import main

    assert main(["data", "run", str(toml), "--workers", "1", "--run-dir", str(tmp_path / "clean")]) == 0  # reference, in-process
    killed_mid_run = False
    markers = tmp_path / "killed" / "corpus" / ".work" / "markers"
    for _ in range(3):
        proc = subprocess.Popen(cmd + ["--run-dir", str(tmp_path / "killed")], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if any(markers.rglob("*.json")):
                break
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if not (tmp_path / "killed" / "corpus" / "manifest.json").exists():
            killed_mid_run = True
            break
    assert killed_mid_run, "the run always finished before it could be killed"
    done_before = sorted(p.name for p in markers.rglob("*.json"))
    assert done_before  # some tasks were complete when killed
    r = subprocess.run(cmd + ["--run-dir", str(tmp_path / "killed")], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "already complete, resuming" in r.stderr
    assert shard_bytes(tmp_path / "killed" / "corpus") == shard_bytes(tmp_path / "clean" / "corpus")
    assert len(shard_bytes(tmp_path / "clean" / "corpus")) == 5
