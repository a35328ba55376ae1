import gzip
import json

import pytest

from lmforge.errors import ConfigError, InputError
from lmforge.eval.tasks import GenExample, MCExample, TaskSpec, load_task, mc_pairs, make_task


def _spec(tmp_path, body: str, name="t.toml"):
    p = tmp_path / name
    p.write_text(body)
    return p


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_native_multiple_choice_with_fewshot_and_template(tmp_path):
    _jsonl(tmp_path / "d.jsonl", [{"query": f"q{i}", "choices": ["a", "b", "c"], "gold": i % 3} for i in range(20)])
    t = load_task(_spec(tmp_path, 'name = "t"\ndata = "d.jsonl"\nnum_fewshot = 2\ntemplate = "Q: {query}\\nA:"\nmetrics = ["acc", "acc_pmi"]\n'))
    assert t.spec.metrics == ["acc", "acc_pmi"]
    assert len(t.fewshot_pool) == 8 and len(t.examples) == 12
    ctxs, conts = mc_pairs(t, 0)
    assert conts == [" a", " b", " c"]
    assert ctxs[0].count("Q: ") == 3 and ctxs[0].endswith(f"Q: {t.examples[0].query}\nA:")
    assert mc_pairs(t, 0) == (ctxs, conts)  # deterministic


def test_generative_task_and_corrupt_line_skipped(tmp_path, caplog):
    p = tmp_path / "g.jsonl"
    p.write_text(json.dumps({"prompt": "2+2=", "answers": ["4"], "stop": ["\n"]}) + "\n{not json\n"
                 + json.dumps({"prompt": "x", "answers": "y"}) + "\n")
    t = load_task(_spec(tmp_path, 'name = "g"\ntype = "generative"\ndata = "g.jsonl"\n'))
    assert [type(e) for e in t.examples] == [GenExample, GenExample]
    assert t.examples[1].answers == ["y"] and t.spec.metrics == ["exact_match", "f1"]


def test_spec_errors_name_the_problem(tmp_path):
    _jsonl(tmp_path / "d.jsonl", [{"query": "q", "choices": ["a"], "gold": 0}])
    with pytest.raises(ConfigError, match="fewshots"):
        load_task(_spec(tmp_path, 'name = "t"\ndata = "d.jsonl"\nfewshots = 2\n'))
    with pytest.raises(ConfigError, match="exact_match"):
        load_task(_spec(tmp_path, 'name = "t"\ndata = "d.jsonl"\nmetrics = ["exact_match"]\n'))
    with pytest.raises(ConfigError, match="format"):
        load_task(_spec(tmp_path, 'name = "t"\ndata = "d.jsonl"\nformat = "squad"\n'))
    with pytest.raises(InputError, match="not found"):
        load_task(_spec(tmp_path, 'name = "t"\ndata = "missing.jsonl"\n'))
    _jsonl(tmp_path / "bad.jsonl", [{"query": "q", "choices": ["a"], "gold": 3}])
    with pytest.raises(InputError, match="no usable"):
        load_task(_spec(tmp_path, 'name = "t"\ndata = "bad.jsonl"\n'))


def test_hellaswag_jsonl(tmp_path):
    rec = {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes smiles.",
           "ctx_b": "then", "ctx": "...", "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski lift, while two men supporting the head of the person wearing winter clothes snow as the we girls sled.", ", the man puts on a christmas coat, knitted with netting.", ", the man continues removing the snow on his car."],
           "source_id": "activitynet~v_-1IBHYS3L-Y", "split": "val", "split_type": "indomain", "label": 3}
    _jsonl(tmp_path / "hellaswag_val.jsonl", [rec])
    t = load_task(_spec(tmp_path, 'name = "hs"\ndata = "hellaswag_val.jsonl"\nformat = "hellaswag"\n'))
    ex = t.examples[0]
    assert ex.query.startswith("Removing ice from car: Then, the man writes") and ex.query.endswith("smiles. Then")
    assert ex.gold == [3] and len(ex.choices) == 4


def test_hellaswag_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"ind": 1, "activity_label": "Baking", "ctx_a": "A man mixes flour.", "ctx_b": "he",
                                          "ctx": "", "endings": ["x", "y", "z", "w"], "label": "2"}]), tmp_path / "hs.parquet")
    t = load_task(_spec(tmp_path, 'name = "hs"\ndata = "hs.parquet"\nformat = "hellaswag"\n'))
    assert t.examples[0].gold == [2] and t.examples[0].query == "Baking: A man mixes flour. He"


def test_arc_ai2_jsonl_and_hf_layout(tmp_path):
    ai2 = {"id": "Mercury_7175875", "question": {"stem": "An astronomer observes that a planet rotates faster after a meteorite impact. Which is the most likely effect of this increase in rotation?",
                                                  "choices": [{"text": "Planetary density will decrease.", "label": "A"}, {"text": "Planetary years will become longer.", "label": "B"},
                                                              {"text": "Planetary days will become shorter.", "label": "C"}, {"text": "Planetary gravity will become stronger.", "label": "D"}]},
           "answerKey": "C"}
    with gzip.open(tmp_path / "ARC-Challenge-Test.jsonl.gz", "wt") as f:
        f.write(json.dumps(ai2) + "\n")
    t = load_task(_spec(tmp_path, 'name = "arc"\ndata = "ARC-Challenge-Test.jsonl.gz"\nformat = "arc"\n'))
    assert t.examples[0].gold == [2] and t.examples[0].query.startswith("Question: An astronomer") and t.examples[0].query.endswith("\nAnswer:")
    hf = {"id": "x", "question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["1", "2"]}, "answerKey": "2"}
    _jsonl(tmp_path / "arc_hf.jsonl", [hf])
    t = load_task(_spec(tmp_path, 'name = "arc"\ndata = "arc_hf.jsonl"\nformat = "arc"\n'))
    assert t.examples[0].choices == ["ice", "steam"] and t.examples[0].gold == [1]


def test_openbookqa_both_layouts(tmp_path):
    ai2 = {"id": "7-980", "question": {"stem": "The sun is responsible for", "choices": [{"text": "puppies learning new tricks", "label": "A"}, {"text": "children growing up and getting old", "label": "B"}, {"text": "flowers wilting in a vase", "label": "C"}, {"text": "plants sprouting, blooming and wilting", "label": "D"}]}, "answerKey": "D"}
    hf = {"id": "7-980", "question_stem": "The sun is responsible for", "choices": {"text": ["a", "b", "c", "d"], "label": ["A", "B", "C", "D"]}, "answerKey": "D"}
    _jsonl(tmp_path / "obqa.jsonl", [ai2, hf])
    t = load_task(_spec(tmp_path, 'name = "obqa"\ndata = "obqa.jsonl"\nformat = "openbookqa"\n'))
    assert [e.gold for e in t.examples] == [[3], [3]] and t.examples[0].query == "The sun is responsible for"


def test_piqa_with_separate_labels_file(tmp_path):
    _jsonl(tmp_path / "valid.jsonl", [{"goal": "How do I ready a guinea pig cage for it's new occupants?", "sol1": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will also need to supply it with a water bottle and a food dish.", "sol2": "Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you will also need to supply it with a water bottle and a food dish."},
                                      {"goal": "dresser", "sol1": "replace drawer with bobby pin ", "sol2": "finish, woodwork"}])
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    t = load_task(_spec(tmp_path, 'name = "piqa"\ndata = "valid.jsonl"\nlabels = "valid-labels.lst"\nformat = "piqa"\n'))
    assert [e.gold for e in t.examples] == [[0], [1]] and t.examples[1].query == "Question: dresser\nAnswer:"


def test_winogrande_partial_scoring(tmp_path):
    _jsonl(tmp_path / "dev.jsonl", [{"qID": "3QHITW7OYO7Q6B6ISU2UMJB84ZLAQE-2", "sentence": "Ian volunteered to eat Dennis's menudo after already having a bowl because _ despised eating intestine.", "option1": "Ian", "option2": "Dennis", "answer": "2"}])
    t = load_task(_spec(tmp_path, 'name = "wg"\ndata = "dev.jsonl"\nformat = "winogrande"\n'))
    ctxs, conts = mc_pairs(t, 0)
    assert ctxs == ["Ian volunteered to eat Dennis's menudo after already having a bowl because Ian",
                    "Ian volunteered to eat Dennis's menudo after already having a bowl because Dennis"]
    assert conts == [" despised eating intestine."] * 2 and t.examples[0].gold == [1]


def test_mmlu_csv_and_parquet(tmp_path):
    (tmp_path / "abstract_algebra_test.csv").write_text('"Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",0,4,2,6,B\n')
    t = load_task(_spec(tmp_path, 'name = "mmlu"\ndata = "abstract_algebra_test.csv"\nformat = "mmlu"\n'))
    ex = t.examples[0]
    assert ex.gold == [1] and ex.choices == ["A", "B", "C", "D"]
    assert ex.query.startswith("The following are multiple choice questions (with answers) about abstract algebra.")
    assert "\nB. 4\n" in ex.query and ex.query.endswith("Answer:")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"question": "2+2?", "subject": "elementary_mathematics", "choices": ["3", "4", "5", "6"], "answer": 1}]), tmp_path / "m.parquet")
    t = load_task(_spec(tmp_path, 'name = "mmlu"\ndata = "m.parquet"\nformat = "mmlu"\n'))
    assert t.examples[0].gold == [1] and "elementary mathematics" in t.examples[0].query


def test_make_task_limit():
    spec = TaskSpec(name="x", data="-", limit=3)
    spec.validate()
    t = make_task(spec, [MCExample("q", ["a", "b"], [0]) for _ in range(10)])
    assert len(t.examples) == 3
