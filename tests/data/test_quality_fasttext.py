"""fastText quality classifier: training from files, held-out metrics, the filter step, the CLI."""

import argparse
import gzip
import io
import json
from pathlib import Path

import pytest
import zstandard

from lmforge.config import build
from lmforge.data.corpus_io import write_shard
from lmforge.data.document import Document
from lmforge.data.quality import QualityConfig, build_quality_steps
from lmforge.data.quality.commands import register
from lmforge.data.quality.common import expand_inputs, iter_texts, one_line
from lmforge.data.quality.fasttext_clf import FastTextConfig, FastTextQualityFilter, good_probability, load_fasttext, train_fasttext
from lmforge.data.step import run_steps
from lmforge.errors import ConfigError, InputError


def dictionary(sample_dir, n=600):
    with gzip.open(sample_dir / "dictionary" / "gcide-sample.jsonl.gz", "rt") as f:
        rows = [json.loads(l) for l in f]
    return [r["text"] for r in rows if len(r["text"]) > 150][:n]


def fortunes(sample_dir, n=600, lang="en"):
    with open(sample_dir / "multilingual" / "fortunes-sample.jsonl.zst", "rb") as raw:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8").read().splitlines()
    rows = [json.loads(l) for l in lines]
    return [r["text"] for r in rows if r["lang"] == lang][:n]


SAMPLE = Path(__file__).resolve().parents[2] / "src" / "lmforge" / "sample"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    sample_dir = SAMPLE
    # good = dictionary prose, bad = fortune-cookie one-liners: two real, clearly different kinds of text
    out = tmp_path_factory.mktemp("ft") / "quality.bin"
    metrics = train_fasttext(dictionary(sample_dir), fortunes(sample_dir), out, epoch=8, seed=1)
    return out, metrics


def test_tokenised_one_line():
    assert one_line("Hello,  World!\nSecond line") == "hello , world ! second line"


def test_training_reports_heldout_metrics_and_writes_sidecar(model):
    path, metrics = model
    assert path.is_file()
    side = json.loads(Path(str(path) + ".json").read_text())
    assert side["params"]["word_ngrams"] == 2
    assert side["train"]["good"] == side["train"]["bad"] or abs(side["train"]["good"] - side["train"]["bad"]) < 40  # balanced
    assert metrics["heldout"]["n"] > 20
    assert metrics["heldout"]["accuracy"] >= 0.85


def test_probabilities_separate_the_classes(model, sample_dir):
    m = load_fasttext(model[0])
    good = good_probability(m, dictionary(sample_dir, 900)[-100:])
    bad = good_probability(m, fortunes(sample_dir, 700)[-100:])
    assert all(0.0 <= p <= 1.0 for p in good + bad)
    assert sum(good) / len(good) > 0.7 > sum(bad) / len(bad)


def test_filter_writes_score_and_drops_below_threshold(model, sample_dir):
    cfg = build(FastTextConfig, {"enabled": True, "model": str(model[0]), "threshold": 0.5}, "data.quality.fasttext")
    f = FastTextQualityFilter(cfg, model[0], seed=3)
    docs = [Document(f"g{i}", t, {}) for i, t in enumerate(dictionary(sample_dir, 60))] + [
        Document(f"b{i}", t, {}) for i, t in enumerate(fortunes(sample_dir, 60))]
    kept = list(f(iter(docs)))
    assert all("fasttext_quality" in d.metadata for d in docs)
    kept_good = sum(d.id.startswith("g") for d in kept)
    kept_bad = sum(d.id.startswith("b") for d in kept)
    assert kept_good > 45 and kept_bad < 15
    assert f.stats.dropped["fasttext_low_quality"] == len(docs) - len(kept)
    assert f.removed.to_dict()["fasttext_low_quality"]


def test_keep_fraction_keeps_some_of_the_dropped(model, sample_dir):
    docs = lambda: [Document(f"b{i}", t, {}) for i, t in enumerate(fortunes(sample_dir, 200))]  # noqa: E731
    strict = list(FastTextQualityFilter(FastTextConfig(enabled=True, model="x", threshold=0.5), model[0])(iter(docs())))
    soft_f = FastTextQualityFilter(FastTextConfig(enabled=True, model="x", threshold=0.5, keep_fraction=0.5), model[0])
    soft = list(soft_f(iter(docs())))
    assert len(soft) > len(strict)
    assert any(d.metadata.get("kept_despite") for d in soft)


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="threshold"):
        build(QualityConfig, {"fasttext": {"threshold": 3.0}}, "data.quality")
    with pytest.raises(ConfigError, match="data.quality.fasttext.treshold"):
        build(QualityConfig, {"fasttext": {"treshold": 0.5}}, "data.quality")
    with pytest.raises(ConfigError, match="model is required"):
        build(QualityConfig, {"fasttext": {"enabled": True}}, "data.quality")
    cfg = build(QualityConfig, {"enabled": True, "fasttext": {"enabled": True, "model": "missing.bin"}}, "data.quality")
    with pytest.raises(InputError, match="model not found"):
        build_quality_steps(cfg, 0, 5, resolve=lambda p: tmp_path / p)


def test_build_quality_steps_resolves_paths(model):
    cfg = build(QualityConfig, {"enabled": True, "fasttext": {"enabled": True, "model": model[0].name, "threshold": 0.0}}, "data.quality")
    steps = build_quality_steps(cfg, 0, 5, resolve=lambda p: model[0].parent / p)
    assert [s.name for s in steps] == ["fasttext_quality"]
    assert build_quality_steps(build(QualityConfig, {"fasttext": {"enabled": True, "model": "x"}}, "q"), 0, 5) == []  # master switch off
    out = list(run_steps(iter([Document("a", "To plan or form after a pattern; to shape.")]), steps))
    assert "fasttext_quality" in out[0].metadata


def test_reading_inputs_counts_and_skips_corrupt_lines(tmp_path, caplog):
    corpus = tmp_path / "run" / "corpus"
    write_shard(corpus / "part-00000.jsonl.zst", [Document("a", "alpha text"), Document("b", "beta text")])
    removed = corpus / "removed"
    removed.mkdir()
    (removed / "gopher.jsonl").write_text('{"id": "x", "text": "removed one"}\nnot json\n{"id": "y"}\n{"text": "removed two"}\n')
    stats = {}
    assert list(iter_texts(expand_inputs([tmp_path / "run"]), stats)) == ["alpha text", "beta text"]
    texts = list(iter_texts(expand_inputs([str(removed / "*.jsonl")]), stats))
    assert texts == ["removed one", "removed two"] and stats["corrupt"] == 2
    assert list(iter_texts(expand_inputs([removed]))) == ["removed one", "removed two"]  # a directory of .jsonl
    with pytest.raises(InputError, match="not found"):
        expand_inputs([tmp_path / "nope.jsonl"])
    with pytest.raises(InputError, match="no files match"):
        expand_inputs([str(tmp_path / "*.parquet")])


def _parser():
    p = argparse.ArgumentParser()
    register(p.add_subparsers(dest="cmd"))
    return p


def test_cli_trains_from_a_corpus_and_removed_samples(tmp_path, sample_dir, capsys):
    good = tmp_path / "run" / "corpus"
    write_shard(good / "part-00000.jsonl.zst", [Document(f"d{i}", t, {}) for i, t in enumerate(dictionary(sample_dir, 300))])
    (good / "removed").mkdir()
    with open(good / "removed" / "filters.jsonl", "w") as f:
        for i, t in enumerate(fortunes(sample_dir, 300)):
            f.write(json.dumps({"id": f"f{i}", "text": t, "reason": "short"}) + "\n")
    out = tmp_path / "q.bin"
    args = _parser().parse_args(["train-quality", "--good", str(tmp_path / "run"), "--bad", str(good / "removed" / "filters.jsonl"),
                                 "--out", str(out), "--epoch", "5"])
    assert args.func(args) == 0
    assert out.is_file() and "heldout" in capsys.readouterr().out
    args = _parser().parse_args(["train-quality", "--good", str(tmp_path / "run"), "--out", str(out)])
    with pytest.raises(ConfigError, match="--bad"):
        args.func(args)


def test_classifier_with_the_predict_only_fasttext_build(model, sample_dir, tmp_path, predict_only_fasttext):
    texts = dictionary(sample_dir, 900)[-30:] + fortunes(sample_dir, 700)[-30:]
    expected = good_probability(load_fasttext(model[0]), texts)  # the installed (training) build
    PredictOnlyFastText = predict_only_fasttext()
    m = load_fasttext(model[0])
    assert isinstance(m, PredictOnlyFastText) and not hasattr(m, "save_model")
    assert good_probability(m, texts) == expected
    f = FastTextQualityFilter(FastTextConfig(enabled=True, model="x", threshold=0.5), model[0])
    kept = list(f(iter(Document(f"d{i}", t, {}) for i, t in enumerate(texts))))
    assert 0 < len(kept) < len(texts) and f.stats.dropped["fasttext_low_quality"] == len(texts) - len(kept)
    # training needs fasttext-wheel: one message naming it, nothing written
    with pytest.raises(InputError, match="needs the fasttext-wheel package.*pip install --force-reinstall fasttext-wheel"):
        train_fasttext(dictionary(sample_dir, 50), fortunes(sample_dir, 50), tmp_path / "q.bin", epoch=1)
    assert not (tmp_path / "q.bin").exists()
