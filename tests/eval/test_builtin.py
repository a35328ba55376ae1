import json

from lmforge.eval import builtin

GCIDE = {
    "moorish": 'Moorish \\Moor"ish\\, a. [See 1st {Moor}, and cf. {Morris},\n   {Moresque}.]\n   Of or pertaining to Morocco or the Moors; in the style of the\n   Moors.\n   [1913 Webster]\n\n   {Moorish architecture}, the style.',
    "negoce": 'Negoce \\Ne*goce"\\, n. [F. n[\'e]goce. See {Negotiate}.]\n   Business; occupation. [Obs.] --Bentley.\n   [1913 Webster]',
    "national": 'National \\Na"tion*al\\ (?; 277), a. [Cf. F. national.]\n   1. Of or pertaining to a nation; common to a whole people or\n      race; public.\n      [1913 Webster]\n\n   2. Attached to one\'s own country or nation.',
}


def test_gcide_definition_strips_header_etymology_and_citations():
    assert builtin.gcide_definition(GCIDE["moorish"]) == "Of or pertaining to Morocco or the Moors; in the style of the Moors."
    assert builtin.gcide_definition(GCIDE["negoce"]) == "Business; occupation."
    assert builtin.gcide_definition(GCIDE["national"]) == "Of or pertaining to a nation; common to a whole people or race; public."
    assert builtin.gcide_definition("Word \\W\\, n.") == ""


def test_dictionary_task_from_bundled_sample():
    t = builtin.dictionary_task(n=50, seed=3)
    assert len(t.examples) == 50
    for ex in t.examples:
        assert len(ex.choices) == 4 and len(set(ex.choices)) == 4
        assert ex.query == f'The word "{ex.id}" means:'
        assert ex.id.lower() not in ex.choices[ex.gold[0]].lower()
    again = builtin.dictionary_task(n=50, seed=3)
    assert [e.choices for e in again.examples] == [e.choices for e in t.examples]


def test_dictionary_task_on_the_full_gcide(shared_corpus):
    t = builtin.dictionary_task(shared_corpus / "dictionary" / "gcide.jsonl.gz", n=300, seed=0)
    assert len(t.examples) == 300 and len({e.id for e in t.examples}) > 250


def test_heldout_docs_cloze_and_sources(tmp_path):
    rows = []
    for i in range(400):
        src = "a" if i % 2 else "b"
        rows.append({"id": f"d{i}", "text": f"Document {i} talks about the weather in the northern mountains today. "
                                             f"It was a long and very cold winter for the farmers living there. ",
                     "metadata": {"source": src}})
    p = tmp_path / "docs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = builtin.heldout_docs([p], per_mille=100, per_source=5)
    assert set(held) == {"a", "b"} and all(len(v) == 5 for v in held.values())
    ids = {d.id for v in held.values() for d in v}
    assert all(builtin.is_heldout(i, 100) for i in ids)
    assert builtin.heldout_docs([p], per_mille=100, per_source=5) == held
    t = builtin.cloze_task([d for v in held.values() for d in v], n=8)
    for ex in t.examples:
        assert ex.choices[ex.gold[0]] in ("today", "there") and not ex.query.endswith(ex.choices[ex.gold[0]])
    g = builtin.cloze_gen_task([d for v in held.values() for d in v], n=4)
    assert all(e.answers[0] in ("today", "there") for e in g.examples)
