"""The default chat set from GCIDE entries: clean definitions, truthful examples, a held-out
split by headword, conversations the chat data reader and renderer accept."""

import json

import pytest

from lmforge.errors import InputError
from lmforge.posttrain.chat_data import read_chat_jsonl, render_examples
from lmforge.posttrain.dictionary_chat import build_default_chat_set, is_heldout_word, parse_entry, read_entries
from tests.conftest import SAMPLE

DICT = sorted((SAMPLE / "dictionary").glob("*.jsonl.gz"))

MODEL = ('Model \\Mod"el\\, v. t. [imp. & p. p. {Modeled}or {Modelled}; p.\n   pr. & vb. n. {Modeling} or '
         '{Modelling}.] [Cf. F. modeler, It.\n   modellare.]\n   To plan or form after a pattern; to form in model; '
         'to form a\n   model or pattern for; to shape; to mold; to fashion; as, to\n   model a house or a government; '
         'to model an edifice according\n   to the plan delineated.\n   [1913 Webster]')
NEPHEL = ('Nephelodometer \\Neph`e*lo*dom"e*ter\\\n   (n[e^]f`[-e]*l[-o]*d[o^]m"[-e]*t[~e]r), n. [Gr. nefe`lh a\n'
          '   cloud + "odo`s way + -meter.] (Meteorol.)\n   An instrument for reckoning the distances or velocities of\n'
          '   clouds.\n   [1913 Webster]')
MOOR = ('Moor \\Moor\\, n. [OE. mor, AS. m[=o]r moor, morass; akin to D.\n   moer moor.]\n'
        '   1. An extensive waste covered with patches of heath, and\n      having a poor, light soil; a heath.\n'
        '      [1913 Webster]\n\n            In her girlish age she kept sheep on the moor.\n'
        '                                                  --Carew.\n      [1913 Webster]\n\n'
        '   2. A game preserve consisting of moorland.\n      [1913 Webster]')


def test_parse_entry_clean_definitions():
    e = parse_entry(MODEL, "Model")
    assert e.word == "model" and e.definition == "To plan or form after a pattern."
    assert e.example == 'The dictionary gives this example: "to model a house or a government."'
    e = parse_entry(NEPHEL, "Nephelodometer")
    assert e.definition == "An instrument for reckoning the distances or velocities of clouds." and e.example is None
    e = parse_entry(MOOR, "Moor")
    assert e.definition == "An extensive waste covered with patches of heath, and having a poor, light soil."
    assert e.example == 'Here is how Carew used it: "In her girlish age she kept sheep on the moor."'
    # an inflected form pointing at another headword's entry, and a cross-reference, are not used
    assert parse_entry(MODEL, "Modelled") is None
    assert parse_entry('Neckplate \\Neck"plate`\\, n.\n   See {Gorget}, 1 and 2.\n   [1913 Webster]', "Neckplate") is None


def test_sample_entries_are_clean():
    entries = read_entries(DICT)
    assert len(entries) > 1000
    assert len({e.word.lower() for e in entries}) == len(entries)
    for e in entries:
        d = e.definition
        assert d[0].isupper() and d.endswith(".") and 12 <= len(d) <= 161
        assert not any(c in d for c in '\\[]{}"`*|'), d
        if e.example:
            assert e.word.lower()[:4] in e.example.lower()


def test_default_chat_set_split_and_format(tmp_path, chat_tok):
    train, held = build_default_chat_set(DICT, seed=0, n=600, holdout=0.2)
    assert len(train) == 480 and len(held) == 120
    train_words = {w.lower() for c in train for w in c["meta"]["words"]}
    held_words = {w.lower() for c in held for w in c["meta"]["words"]}
    assert not train_words & held_words
    assert all(is_heldout_word(w, 0.2) for w in held_words) and not any(is_heldout_word(w, 0.2) for w in train_words)
    kinds = {c["meta"]["kind"] for c in train}
    assert kinds == {"define", "reverse", "example", "multi"}
    assert any(c["messages"][0]["role"] == "system" for c in train)
    for c in train + held:
        assert c["messages"][-1]["role"] == "assistant" and c["messages"][-1]["content"] == c["meta"]["reference"]
        if c["meta"]["kind"] == "reverse":
            assert c["messages"][-1]["content"] == c["meta"]["word"]
            assert c["meta"]["word"].lower() not in c["messages"][-2]["content"].lower()
    # deterministic for a seed, different phrasing/selection for another; the split does not move
    assert build_default_chat_set(DICT, seed=0, n=600, holdout=0.2) == (train, held)
    train2, held2 = build_default_chat_set(DICT, seed=1, n=600, holdout=0.2)
    assert train2 != train
    assert not {w.lower() for c in train2 for w in c["meta"]["words"]} & held_words
    # written as JSONL, the chat data reader and the renderer take them as they are
    f = tmp_path / "dict_chat.jsonl"
    f.write_text("".join(json.dumps(c) + "\n" for c in train), encoding="utf-8")
    convs, stats = read_chat_jsonl([f])
    assert stats["malformed"] == 0 and len(convs) == len(train)
    ex, st = render_examples(chat_tok, convs, max_tokens=257)
    assert st["no_target"] == 0 and len(ex) == len(train)


def test_default_chat_set_errors(tmp_path):
    with pytest.raises(InputError, match="holdout"):
        build_default_chat_set(DICT, holdout=1.0)
    empty = tmp_path / "d.jsonl"
    empty.write_text(json.dumps({"word": "x", "text": "nothing"}) + "\n")
    with pytest.raises(InputError, match="no usable dictionary entries"):
        build_default_chat_set([empty])
