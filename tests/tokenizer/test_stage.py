"""The tokenizer stage through the recipe runner and the CLI: artifacts, stats, report, resume, errors."""

from __future__ import annotations

import json

import numpy as np

from lmforge.cli import main
from lmforge.recipe import run_recipe
from lmforge.rundir import read_json
from lmforge.tokenizer import load_tokenizer


def _recipe(tmp_path, corpus, extra=""):
    p = tmp_path / "recipe.toml"
    p.write_text(f"""
[run]
name = "tok"
dir = "{tmp_path / 'runs'}"
stages = ["tokenizer"]
seed = 11
workers = 1

[tokenizer]
corpus = "{corpus}"
vocab_size = 600
reserved_tokens = 4
shard_tokens = 200000
val_fraction = 0.02
{extra or "train_bytes = 1000000"}
""")
    return p


def test_stage_writes_the_contract(tmp_path, sample_corpus_dir):
    rd = run_recipe(_recipe(tmp_path, sample_corpus_dir))
    tokdir, tokens = rd.tokenizer, rd.tokens
    for f in ("tokenizer.json", "special_tokens.json", "stats.json", "tokenizer.png", "manifest.json", "report.md"):
        assert (tokdir / f).is_file(), f
    tok = load_tokenizer(tokdir)
    assert tok.vocab_size == 600 and len(tok.special_tokens) == 11
    index = read_json(tokens / "index.json")
    assert index["dtype"] == "uint16" and index["bos_id"] == tok.bos_id and index["vocab_size"] == 600
    assert len(index["train"]) > 1 and len(index["val"]) == 1
    for sh in index["train"] + index["val"]:
        arr = np.fromfile(tokens / sh["path"], dtype="<u2")
        assert arr[0] == tok.bos_id and (arr == tok.bos_id).sum() == sh["docs"] and arr.max() < 600

    stats = read_json(tokdir / "stats.json")
    assert set(stats["sources"]) == {"code", "dictionary", "fortunes", "manpages"}
    assert all(1.0 < v["bytes_per_token"] < 6.0 for v in stats["sources"].values())
    assert stats["basis"] == "corpus" and stats["training"]["docs"] > 0
    assert len(stats["longest_tokens"]) == 20 and len(stats["least_frequent_tokens"]) == 20
    assert [t["id"] for t in stats["last_learned_tokens"]] == list(range(599, 579, -1))  # the last merges
    assert "Last learned tokens" in rd.report.read_text()
    lengths = [t["bytes"] for t in stats["longest_tokens"]]
    assert lengths == sorted(lengths, reverse=True)
    counts = [t["count"] for t in stats["least_frequent_tokens"]]
    assert counts == sorted(counts) and counts[0] <= stats["most_frequent_tokens"][-1]["count"]

    report = rd.report.read_text()
    assert "## tokenizer" in report and "bytes/token" in report and "| dictionary |" in report
    assert "tokenizer/tokenizer.png" in report and "Least frequent learned tokens" in report
    manifest = read_json(tokdir / "manifest.json")
    assert manifest["counts"]["train_tokens"] == index["totals"]["train_tokens"]

    # a rerun with the same recipe is skipped: the outputs are untouched
    before = (tokens / "index.json").stat().st_mtime_ns
    run_recipe(_recipe(tmp_path, sample_corpus_dir))
    assert (tokens / "index.json").stat().st_mtime_ns == before


def test_stage_without_encoding_reports_on_the_sample(tmp_path, sample_corpus_dir):
    rd = run_recipe(_recipe(tmp_path, sample_corpus_dir, "encode = false\ndigits = \"single\"\ntrain_bytes = 300000"))
    stats = read_json(rd.tokenizer / "stats.json")
    assert stats["basis"] == "sample" and not rd.tokens.exists()
    assert stats["profile"]["digit_tokens"] == 10  # single-digit pre-tokenization: only 0-9
    assert stats["training"]["bytes"] <= 300000


def test_cli_train_encode_inspect(tmp_path, sample_corpus_dir, capsys):
    tok, tokens = tmp_path / "tok", tmp_path / "tokens"
    assert main(["tokenizer", "train", str(sample_corpus_dir), str(tok), "--vocab-size", "512", "--train-bytes", "500000",
                 "--tokenizer.reserved_tokens", "2", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "512 ids" in out and "dictionary" in out
    assert main(["tokenizer", "encode", str(sample_corpus_dir), str(tok), str(tokens), "--val-fraction", "0.1", "--seed", "3"]) == 0
    assert "bytes/token" in capsys.readouterr().out
    assert read_json(tokens / "index.json")["totals"]["val_docs"] > 0
    assert main(["tokenizer", "inspect", str(tok), "--text", "hello  world 2024", "--ids"]) == 0
    out = capsys.readouterr().out
    ids = json.loads(out.strip().splitlines()[-1])
    assert load_tokenizer(tok).decode(ids) == "hello  world 2024"
    assert main(["tokenizer", "inspect", str(tok)]) == 0
    assert "Longest tokens" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, sample_corpus_dir, capsys):
    assert main(["tokenizer", "train", str(tmp_path / "missing"), str(tmp_path / "t")]) == 2
    assert "corpus directory not found" in capsys.readouterr().err
    assert main(["tokenizer", "train", str(sample_corpus_dir), str(tmp_path / "t"), "--tokenizer.vocab_sise", "9"]) == 2
    assert "tokenizer.vocab_sise" in capsys.readouterr().err
    assert main(["tokenizer", "train", str(sample_corpus_dir), str(tmp_path / "t"), "--vocab-size", "50"]) == 2
    assert "too small" in capsys.readouterr().err
    assert main(["tokenizer", "inspect", str(tmp_path)]) == 2
    assert "tokenizer not found" in capsys.readouterr().err


def test_demo_recipe_tokenizer_section(tmp_path, sample_corpus_dir):
    """The bundled demo lists the tokenizer stage; its [tokenizer] settings run (here on a prepared corpus)."""
    from lmforge.recipe import DEMO_RECIPE, load_recipe

    raw, _ = load_recipe(DEMO_RECIPE)
    assert "tokenizer" in raw["run"]["stages"] and raw["tokenizer"]["vocab_size"] == 4096
    rd = run_recipe(DEMO_RECIPE, overrides=[f"tokenizer.corpus={sample_corpus_dir}", "tokenizer.train_bytes=600000", "run.workers=1"],
                    run_dir=tmp_path / "demo", only=["tokenizer"])
    index = read_json(rd.tokens / "index.json")
    assert index["vocab_size"] == load_tokenizer(rd.tokenizer).vocab_size and index["totals"]["val_docs"] > 0
