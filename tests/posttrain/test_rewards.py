"""Reward functions for RL: the exact-answer reward, loading by module:function and file.py:function,
safe calls (a raising or non-numeric function reported once with the prompt, scored as configured),
the reward-model spec, and the users' prompt files of the RL task."""

import json
import logging
import sys
import types

import numpy as np
import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.posttrain import rewards as W
from lmforge.posttrain.rl_task import read_prompt_jsonl, which_word_prompts

PROMPT = [{"role": "user", "content": "Which of these words is defined as \"a bird\"? Options: crow, cow."}]


def test_exact_answer_reward_normalises_case_quotes_and_punctuation():
    s = W.load_reward("exact")
    assert s.score([PROMPT] * 4, ["Crow.", "  \"crow\" ", "cow", "crows"], [{"answer": "crow"}] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert W.normalize_answer("  The   Crow! ") == "the crow"


def test_module_function_and_file_function(tmp_path, monkeypatch):
    mod = types.ModuleType("my_rewards_mod")
    mod.length = lambda prompt, completion, **meta: len(completion) / 10
    monkeypatch.setitem(sys.modules, "my_rewards_mod", mod)
    assert W.load_reward("my_rewards_mod:length").score([PROMPT], ["abcde"]) == [0.5]
    f = tmp_path / "rw.py"
    f.write_text("def has_word(prompt, completion, word='crow', **meta):\n    return float(word in completion)\n")
    s = W.load_reward(f"{f}:has_word")
    assert s.score([PROMPT, PROMPT], ["a crow", "a cow"], [{}, {"word": "cow"}]) == [1.0, 1.0]
    # relative paths resolve through the caller's resolver (the recipe's directory)
    assert W.load_reward("rw.py:has_word", resolve=lambda p: tmp_path / p).score([PROMPT], ["x"]) == [0.0]


@pytest.mark.parametrize("spec,msg", [
    ("nonexistent_mod_xyz:fn", "cannot import module"),
    ("json:no_such_fn", "no function 'no_such_fn'"),
    ("missing/file.py:fn", "not found"),
    ("justaname", "expected 'exact'"),
])
def test_bad_specs_are_config_errors(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        W.load_reward(spec)


def test_a_file_that_fails_to_import_is_a_config_error(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ConfigError, match="importing .*broken.py failed: RuntimeError: boom"):
        W.load_reward(f"{f}:fn")


def test_a_raising_function_is_reported_once_with_the_prompt_and_scored_as_configured(tmp_path, caplog):
    f = tmp_path / "bad.py"
    f.write_text("def fn(prompt, completion, **meta):\n    raise ValueError('cannot parse ' + completion)\n")
    s = W.load_reward(f"{f}:fn", on_error=-1.0)
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        assert s.score([PROMPT] * 3, ["a", "b", "c"]) == [-1.0, -1.0, -1.0]
    msgs = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(msgs) == 1 and "ValueError: cannot parse a" in msgs[0] and "Which of these words" in msgs[0]
    assert s.errors == 3 and s.first_error.startswith("ValueError")
    skip = W.load_reward(f"{f}:fn", on_error="skip")
    assert skip.score([PROMPT], ["a"]) == [None]


def test_non_numbers_are_failures_numbers_of_any_kind_are_not(monkeypatch):
    vals = iter(["high", None, [1.0], True, np.float32(0.25), torch.tensor(0.5), 3, float("nan")])
    mod = types.ModuleType("my_rewards_mod2")
    mod.fn = lambda prompt, completion, **meta: next(vals)
    monkeypatch.setitem(sys.modules, "my_rewards_mod2", mod)
    s = W.load_reward("my_rewards_mod2:fn", on_error=0.0)
    out = s.score([PROMPT] * 8, ["x"] * 8)
    assert out[:7] == [0.0, 0.0, 0.0, 1.0, 0.25, 0.5, 3.0] and s.errors == 3
    assert out[7] != out[7]  # NaN is passed on: the RL loop stops on it, naming the step


def test_bad_on_error_value():
    with pytest.raises(ConfigError, match="reward_on_error"):
        W.load_reward("exact", on_error=float("inf"))


def test_rm_spec_loads_the_reward_model_lazily(tmp_path, monkeypatch):
    """`rm:PATH` imports lmforge.posttrain.rm only when asked, and scores conversations in a batch."""
    seen = {}

    class FakeRM:
        def score(self, conversations):
            seen["convs"] = conversations
            return [float(len(c[-1]["content"])) for c in conversations]

    fake = types.ModuleType("lmforge.posttrain.rm")
    fake.load_reward_model = lambda path, **kw: FakeRM()
    monkeypatch.setitem(sys.modules, "lmforge.posttrain.rm", fake)
    (tmp_path / "rm").mkdir()
    s = W.load_reward(f"rm:{tmp_path / 'rm'}")
    assert s.score([PROMPT, "plain prompt"], ["ab", "abc"]) == [2.0, 3.0]
    assert seen["convs"][0][-1] == {"role": "assistant", "content": "ab"}
    assert seen["convs"][1][0] == {"role": "user", "content": "plain prompt"}
    with pytest.raises(ConfigError, match="not found"):
        W.load_reward(f"rm:{tmp_path / 'nope'}")


def test_prompt_jsonl_reports_malformed_lines(tmp_path, caplog):
    f = tmp_path / "p.jsonl"
    f.write_text("\n".join([
        json.dumps({"prompt": "What is 2+2?", "answer": "4"}),
        json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}),
        "{oops",
        json.dumps({"answer": "no prompt"}),
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}),
    ]) + "\n")
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        recs, stats = read_prompt_jsonl([f])
    assert stats == {"lines": 5, "prompts": 2, "malformed": 3}
    assert recs[0] == {"messages": [{"role": "user", "content": "What is 2+2?"}], "meta": {"answer": "4"}}
    assert any("p.jsonl:3" in r.getMessage() for r in caplog.records)


def test_which_word_task_split_matches_sft_and_has_one_right_option():
    from pathlib import Path

    from lmforge.posttrain.dictionary_chat import is_heldout_word

    paths = sorted((Path(W.__file__).parents[1] / "sample" / "dictionary").glob("*.jsonl*"))
    train, held = which_word_prompts(paths, seed=0, holdout=0.1, n_train=200, n_heldout=50)
    assert len(train) == 200 and len(held) == 50
    assert all(is_heldout_word(r["meta"]["answer"], 0.1) for r in held)
    assert not any(is_heldout_word(r["meta"]["answer"], 0.1) for r in train)
    for r in train[:50]:
        opts = r["meta"]["options"]
        assert len(opts) == 4 and opts.count(r["meta"]["answer"]) == 1
        assert ", ".join(opts) in r["messages"][0]["content"]
    assert which_word_prompts(paths, seed=0, n_train=20, n_heldout=5) == which_word_prompts(paths, seed=0, n_train=20, n_heldout=5)


def test_choice_reward_gives_partial_credit_below_the_exact_answer():
    meta = {"answer": "crow", "options": ["crow", "cow", "hen", "owl"]}
    s = W.load_reward("choice")
    right, option, close, far = s.score([PROMPT] * 4, ["Crow.", "owl", "crowd", "zzzz"], [meta] * 4)
    assert right == 1.0 and option == 0.25 and 0.0 < close < 0.25 and far == 0.0
