"""Toxicity / adult-content filter: multilingual word lists, stochastic keep, optional classifier."""

import io
import json
from pathlib import Path

import pytest
import zstandard

from lmforge.config import build
from lmforge.data.document import Document
from lmforge.data.quality import QualityConfig, build_quality_steps
from lmforge.data.quality.fasttext_clf import train_fasttext
from lmforge.data.quality.toxicity import LANGUAGES, ToxicityConfig, ToxicityFilter, flag_texts, load_entries
from lmforge.errors import ConfigError, InputError

SAMPLE = Path(__file__).resolve().parents[2] / "src" / "lmforge" / "sample"


def fortunes():
    with open(SAMPLE / "multilingual" / "fortunes-sample.jsonl.zst", "rb") as raw:
        lines = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8").read().splitlines()
    return [json.loads(l) for l in lines]


@pytest.mark.parametrize("lang,text", [
    ("en", "What the fuck is this?"),
    ("de", "So eine Scheiße, sagte er."),
    ("es", "¡Qué mierda de día!"),
    ("it", "Ma vaffanculo, va!"),
    ("ru", "Да пошёл ты на хуй."),
    ("fr", "Putain, quel temps."),
    ("pl", "Kurwa, znowu pada."),
])
def test_every_language_list_flags_its_obscenity(lang, text):
    assert load_entries([lang])
    assert flag_texts([text], ToxicityConfig(languages=[lang])) == [True]


def test_innocent_words_that_contain_listed_stems_are_not_flagged():
    clean = [
        "The cumulative effect of Dickens on Scunthorpe literature.",  # cum-, dick-, -cunt- inside words
        "Die Schwanzflosse des Wals; der Hurrikan zog ab.",
        "La trachée et la trachéite; la bitterness du café.",
        "Трахея и бронхи; оскорбление без мата.",
        "Il computer ha scoperto la cazzuola del muratore.",
        "Mi puta? No: mi computadora.",
    ]
    flags = flag_texts(clean)
    # 'cazzuola' (trowel) starts with the stem cazzo? no: the stem is 'cazzo*'; 'puta' is listed on purpose
    assert flags == [False, False, False, False, False, True]


def test_filter_counts_hits_and_keeps_a_seeded_fraction():
    rows = fortunes()
    docs = lambda: [Document(r["id"], r["text"], {"language": r["lang"]}) for r in rows]  # noqa: E731
    strict = ToxicityFilter(ToxicityConfig(keep_fraction=0.0), seed=1)
    kept_strict = list(strict(iter(docs())))
    flagged = strict.stats.dropped["toxic_words"]
    assert 5 <= flagged <= 0.2 * len(rows)  # some fortunes are offensive on purpose, most are not
    assert len(kept_strict) == len(rows) - flagged
    sample = strict.removed.to_dict()["toxic_words"]
    assert all(r["metadata"]["toxicity_hits"] >= 1 and r["metadata"]["toxicity_words"] for r in sample)

    soft = ToxicityFilter(ToxicityConfig(keep_fraction=0.5), seed=1)
    kept_soft = list(soft(iter(docs())))
    despite = [d for d in kept_soft if d.metadata.get("kept_despite")]
    assert 0 < len(despite) < flagged
    assert soft.stats.counters["kept_despite:toxic_words"] == len(despite)
    again = ToxicityFilter(ToxicityConfig(keep_fraction=0.5), seed=1)
    assert [d.id for d in again(iter(docs()))] == [d.id for d in kept_soft]  # deterministic


def test_min_hits_and_extra_words():
    text = "darn it, darn it all"
    assert flag_texts([text]) == [False]
    assert flag_texts([text], ToxicityConfig(extra_words=["darn"])) == [True]
    assert flag_texts([text], ToxicityConfig(extra_words=["darn"], min_hits=3)) == [False]


def test_custom_lists_dir(tmp_path):
    (tmp_path / "xx.txt").write_text("# my list\nblorp*\n")
    cfg = build(ToxicityConfig, {"languages": ["xx"], "lists_dir": str(tmp_path)}, "data.quality.toxicity")
    assert flag_texts(["BLORPING around", "fine text"], cfg) == [True, False]
    with pytest.raises(InputError, match="word list not found"):
        ToxicityFilter(ToxicityConfig(languages=["yy"], lists_dir=str(tmp_path)))


def test_config_errors():
    with pytest.raises(ConfigError, match="no bundled word list for 'xx'"):
        build(QualityConfig, {"toxicity": {"languages": ["en", "xx"]}}, "data.quality")
    with pytest.raises(ConfigError, match="min_hits"):
        build(QualityConfig, {"toxicity": {"min_hits": 0}}, "data.quality")
    assert set(LANGUAGES) == {"en", "de", "es", "it", "ru", "fr", "pl"}


def test_optional_classifier(tmp_path):
    rows = fortunes()
    texts = [r["text"] for r in rows]
    labels = flag_texts(texts)
    # a fastText classifier trained on word-list labels, then used through the filter's classifier path
    bad = [t for t, f in zip(texts, labels) if f]
    good = [t for t, f in zip(texts, labels) if not f][:300]
    model = tmp_path / "tox.bin"
    train_fasttext(good, bad, model, epoch=15, balance=False, valid_fraction=0.0, min_count=1)
    cfg = build(QualityConfig, {"enabled": True, "toxicity": {"enabled": True, "classifier": "tox.bin", "classifier_threshold": 0.5}}, "data.quality")
    (step,) = build_quality_steps(cfg, 0, 5, resolve=lambda p: tmp_path / p)
    docs = [Document(str(i), t) for i, t in enumerate(bad + good[:100])]
    list(step(iter(docs)))
    assert all(0.0 <= d.metadata["toxicity_score"] <= 1.0 for d in docs)
    flagged_scores = [d.metadata["toxicity_score"] for d in docs if d.metadata["toxicity_hits"]]
    clean_scores = [d.metadata["toxicity_score"] for d in docs if not d.metadata["toxicity_hits"]]
    assert sum(flagged_scores) / len(flagged_scores) > sum(clean_scores) / len(clean_scores)


def test_runs_inside_the_data_stage(tmp_path):
    """The recipe's [data.quality] section reaches the pipeline: stats, removed samples, metadata."""
    from lmforge.data.corpus_io import iter_corpus
    from lmforge.recipe import run_recipe

    rows = fortunes()
    flags = flag_texts([r["text"] for r in rows])
    rows = [r for r, fl in zip(rows, flags) if fl] + [r for r, fl in zip(rows, flags) if not fl][:100]
    with open(tmp_path / "fortunes.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({"text": r["text"], "lang": r["lang"]}, ensure_ascii=False) + "\n")
    (tmp_path / "recipe.toml").write_text(
        '[run]\nname = "q"\ndir = "runs"\nstages = ["data"]\nworkers = 1\n\n'
        '[data]\ninputs = [{ path = "fortunes.jsonl", source = "fortunes", skip = ["langid", "filters"] }]\n\n'
        '[data.quality]\nenabled = true\n\n[data.quality.toxicity]\nenabled = true\nkeep_fraction = 0.0\n'
    )
    rd = run_recipe(tmp_path / "recipe.toml", run_dir=tmp_path / "runs" / "q")
    stats = json.loads((rd.corpus / "stats.json").read_text())
    tox = next(s for s in stats["steps"] if s["name"] == "toxicity")
    assert tox["docs_in"] == len(rows) and tox["dropped"]["toxic_words"] == len(rows) - 100
    assert (rd.corpus / "removed" / "toxicity.jsonl").is_file()
    docs = list(iter_corpus(rd.corpus))
    assert docs and all(d.metadata["toxicity_hits"] == 0 for d in docs)
