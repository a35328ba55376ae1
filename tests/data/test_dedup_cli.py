"""`lmforge data dedup run|index` on the bundled sample."""

import json

from lmforge.cli import main
from lmforge.data.corpus_io import iter_corpus


def test_run_all_methods_on_the_sample(tmp_path, sample_dir, capsys):
    ev = tmp_path / "eval.jsonl"
    # an evaluation item taken from the sample: its source entry must be dropped
    import gzip

    with gzip.open(sample_dir / "dictionary" / "gcide-sample.jsonl.gz", "rt") as f:
        recs = [json.loads(line) for _, line in zip(range(800), f)]
    item = next(r for r in recs[500:] if len(r["text"].split()) > 40)
    ev.write_text(json.dumps({"text": " ".join(item["text"].split()[:30])}) + "\n")
    out = tmp_path / "out"
    rc = main(["data", "dedup", "run", str(sample_dir / "dictionary" / "gcide-sample.jsonl.gz"), "-o", str(out),
               "--limit", "800", "--shard-docs", "300", "--methods", "exact,decontam,lines,minhash,bloom,substring",
               "--eval", str(ev), "--dedup.minhash.min_shingles", "5", "--dedup.lines.min_chars", "3"])
    assert rc == 0
    st = json.loads((out / "stats.json").read_text())
    names = [p["stats"]["name"] for p in st["passes"]]
    assert names == ["exact_dedup", "decontam", "lines", "minhash", "bloom", "substring"]
    assert st["passes"][0]["stats"]["dropped"]["duplicate"] > 0  # the dictionary repeats entries
    assert st["passes"][1]["stats"]["dropped"]["contaminated"] >= 1
    docs = list(iter_corpus(out))
    assert len(docs) == st["totals"]["docs_out"] > 0
    assert item["id"] not in {d.id for d in docs}
    assert (out / "removed" / "exact_dedup.jsonl").exists()
    assert not (out / ".work").exists() or not any((out / ".work").iterdir())
    assert "minhash" in capsys.readouterr().out


def test_index_then_dedup_against_it(tmp_path, sample_dir, capsys):
    src = sample_dir / "dictionary" / "gcide-sample.jsonl.gz"
    assert main(["data", "dedup", "index", str(src), "--index", str(tmp_path / "idx"), "--limit", "400"]) == 0
    assert (tmp_path / "idx" / "index.json").exists()
    # the same documents again: everything that is in LSH is a near-duplicate of the index
    assert main(["data", "dedup", "run", str(src), "-o", str(tmp_path / "o"), "--limit", "400", "--methods", "minhash",
                 "--index", str(tmp_path / "idx")]) == 0
    st = json.loads((tmp_path / "o" / "stats.json").read_text())
    mh = st["passes"][0]
    assert mh["stats"]["dropped"]["near_duplicate_of_index"] == json.loads((tmp_path / "idx" / "index.json").read_text())["in_lsh"]


def test_user_errors_exit_2(tmp_path, sample_dir, capsys):
    src = str(sample_dir / "dictionary" / "gcide-sample.jsonl.gz")
    assert main(["data", "dedup", "run", src, "-o", str(tmp_path / "o"), "--methods", "fuzzy"]) == 2
    assert "unknown method 'fuzzy'" in capsys.readouterr().err
    assert main(["data", "dedup", "run", str(tmp_path / "missing"), "-o", str(tmp_path / "o")]) == 2
    assert "input not found" in capsys.readouterr().err
    assert main(["data", "dedup", "run", src, "-o", str(tmp_path / "o"), "--dedup.minhash.rowz", "3"]) == 2
    assert "minhash.rowz" in capsys.readouterr().err
    assert main(["data", "dedup", "run", src, "-o", str(tmp_path / "o"), "--index", str(tmp_path / "noindex"), "--limit", "10"]) == 2
    assert "index not found" in capsys.readouterr().err


def test_config_file_and_cluster_plot(tmp_path, sample_dir):
    cfg = tmp_path / "dedup.toml"
    cfg.write_text('[dedup]\nexact = { enabled = false }\n[dedup.minhash]\nkeep = "first"\nmin_shingles = 3\n')
    out = tmp_path / "o"
    assert main(["data", "dedup", "run", str(sample_dir / "dictionary" / "gcide-sample.jsonl.gz"), "-o", str(out),
                 "--limit", "600", "--config", str(cfg)]) == 0
    st = json.loads((out / "stats.json").read_text())
    (mh,) = st["passes"]  # exact is off in the file, minhash (repeated dictionary entries) does the work
    assert mh["extra"]["params"]["keep"] == "first" and mh["stats"]["dropped"]["near_duplicate"] > 0
    assert (out / "minhash_clusters.png").stat().st_size > 1000
    assert main(["data", "dedup", "run", str(sample_dir / "dictionary" / "gcide-sample.jsonl.gz"), "-o", str(out), "--limit", "5"]) == 2
