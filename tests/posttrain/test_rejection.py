"""Rejection sampling: best-of-n picks the highest-scored answer and worst the lowest, pairs within
the margin are dropped and counted, the files parse with the SFT and preference readers, a killed
run resumes by its finished chunks to the same output, a finished one is reused, the built-in
prompts and a real reward model checkpoint work, and the CLI."""

import json
import math
from pathlib import Path

import pytest
import torch

from lmforge import config as cfgmod
from lmforge.errors import ConfigError
from lmforge.posttrain import rejection as RJ
from lmforge.posttrain.chat_data import read_chat_jsonl
from lmforge.posttrain.pref_data import read_pref_jsonl
from lmforge.posttrain.rejection import RejectionConfig, best_and_worst, rejection_sample, select
from lmforge.rundir import read_json
from tests.posttrain.pref_helpers import make_base, write_jsonl


def make_rm(root: Path, tok, seed: int = 0) -> Path:
    """A tiny reward model checkpoint (stage rm) with a fixed random head, as `lmforge rm` writes one."""
    from lmforge.model import Transformer, preset
    from lmforge.posttrain.rm import HEAD_FILE, head_bytes
    from lmforge.tokenizer.chat import template_id
    from lmforge.train import checkpoint as ck

    torch.manual_seed(seed)
    m = Transformer(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=96, d_model=64, n_layers=2))
    head = torch.nn.Linear(64, 1)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    ck.save_checkpoint(root, 1, sd, m.cfg.to_dict(), [], {"train_config": {}, "chat_template": template_id(), "stage": "rm"},
                       tokenizer_file=tok.path, extra_files={HEAD_FILE: head_bytes(head)})
    return root


def prompt_records(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"Tell me about item {i}."} for i in range(start, start + n)]


def item_of(conv) -> int:
    return int(conv[-2]["content"].split("item ")[1].rstrip("."))


def spread_scorer(calls: list | None = None):
    """Sample j of a prompt about an odd item scores 10 j, of an even item 0.1 j; empty answers -100."""
    seen: dict = {}

    def score(convs):
        if calls is not None:
            calls.append(len(convs))
        out = []
        for c in convs:
            k = item_of(c)
            j = seen.get(k, 0)
            seen[k] = j + 1
            out.append(-100.0 if not c[-1]["content"] else (10.0 if k % 2 else 0.1) * (j % 4))
        return out

    return score


@pytest.fixture(scope="module")
def policy(tmp_path_factory, chat_tok):
    return make_base(tmp_path_factory.mktemp("rj_policy") / "sft" / "t", chat_tok, seed=2)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("rj_prompts")
    recs = prompt_records(6) + ["{not json", {"messages": [{"role": "user", "content": "Tell me about item 6."},
                                                           {"role": "assistant", "content": "An answer to drop."}]}]
    return write_jsonl(d / "prompts.jsonl", recs)


def _cfg(prompts_file, **kw) -> RejectionConfig:
    base = dict(prompts=[str(prompts_file)], n=4, max_new_tokens=6, heldout_prompts=0, device="cpu", chunk=3)
    base.update(kw)
    return cfgmod.build(RejectionConfig, base, "rejection")


def test_best_and_worst_and_the_margin_rule():
    assert best_and_worst(["a", "b", "c"], [0.5, 2.0, -1.0]) == (1, 2)
    assert best_and_worst(["a", "b", "c"], [1.0, 1.0, 1.0]) == (0, 0)  # ties go to the earlier sample
    assert best_and_worst(["", "b", "c"], [9.0, 1.0, 0.0]) == (1, 2)  # an empty answer is never the best
    assert best_and_worst(["", "b"], [-9.0, 1.0]) == (1, 0)  # ... but may be the worst
    assert best_and_worst(["a", "b"], [math.nan, 1.0]) == (1, 1)
    msgs = [{"role": "user", "content": "q"}]
    sft, pair, why = select(msgs, ["good", "bad"], [2.0, 1.0], min_margin=0.5)
    assert why is None and pair == {"prompt": msgs, "chosen": "good", "rejected": "bad",
                                    "meta": {"chosen_reward": 2.0, "rejected_reward": 1.0, "margin": 1.0}}
    assert sft["messages"] == msgs + [{"role": "assistant", "content": "good"}]
    assert select(msgs, ["good", "bad"], [2.0, 1.0], min_margin=1.0)[1:] == (None, "dropped_margin")
    assert select(msgs, ["same", "same"], [2.0, 1.0])[1:] == (None, "identical")
    assert select(msgs, ["", ""], [2.0, 1.0]) == (None, None, "no_answer")


def test_best_of_n_files_margin_counts_and_readers(tmp_path, policy, prompts_file):
    res = rejection_sample(_cfg(prompts_file, min_margin=1.0), tmp_path / "rj", policy=policy, scorer=spread_scorer(), seed=5)
    s = res.stats
    assert s["prompts"] == 7 and s["samples"] == 28 and s["read_malformed"] == 1 and s["n"] == 4
    scored = [json.loads(line) for line in (tmp_path / "rj" / "scored.jsonl").read_text().splitlines()]
    for r in scored:
        sc, texts = r["scores"], r["completions"]
        assert sc[r["best"]] == max(x for x, t in zip(sc, texts) if t) and texts[r["best"]]
        assert sc[r["worst"]] == min(sc)
    # the answer of a conversation line was dropped to make it a prompt
    assert scored[-1]["messages"] == [{"role": "user", "content": "Tell me about item 6."}]
    assert scored[-1]["meta"]["reference"] == "An answer to drop."
    # odd items spread 30 > 1: kept; even items spread 0.3 <= 1: dropped and counted
    pairs, pstats = read_pref_jsonl([res.pairs_path])
    kept = {int(p["prompt"][-1]["content"].split("item ")[1].rstrip(".")) for p in pairs}
    assert kept and all(k % 2 for k in kept)
    assert s["pairs"] == len(pairs) and s["dropped_margin"] >= 3 and pstats["malformed"] == 0
    assert s["pairs"] + s["dropped_margin"] + s["identical"] + s["no_answer"] == 7
    for p in pairs:
        assert p["meta"]["margin"] > 1.0 and p["chosen"] != p["rejected"]
    convs, cstats = read_chat_jsonl([res.sft_path])
    assert len(convs) == s["sft_examples"] == 7 - s["no_answer"] and cstats["malformed"] == 0
    by_item = {item_of(c["messages"]): c for c in convs}
    for r in scored:
        assert by_item[item_of(r["messages"] + [{}])]["messages"][-1]["content"] == r["completions"][r["best"]]
    assert s["mean_best"] >= s["mean_reward"] >= s["mean_worst"]
    assert len(read_json(tmp_path / "rj" / "samples.json")) == 7 and not (tmp_path / "rj" / "parts").exists()


def test_a_killed_run_resumes_by_chunks_to_the_same_output_and_a_finished_one_is_reused(tmp_path, policy, prompts_file,
                                                                                         monkeypatch):
    cfg = _cfg(prompts_file, chunk=2)
    full = rejection_sample(cfg, tmp_path / "full", policy=policy, scorer=spread_scorer(), seed=7)
    real = RJ._sample_chunk
    calls = {"n": 0}

    def dies_on_the_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(RJ, "_sample_chunk", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        rejection_sample(cfg, tmp_path / "killed", policy=policy, scorer=spread_scorer(), seed=7)
    assert sorted(p.name for p in (tmp_path / "killed" / "parts").iterdir()) == ["chunk_00000.jsonl", "chunk_00001.jsonl"]
    assert not (tmp_path / "killed" / "stats.json").exists()
    monkeypatch.setattr(RJ, "_sample_chunk", real)
    again = rejection_sample(cfg, tmp_path / "killed", policy=policy, scorer=spread_scorer(), seed=7)
    assert again.resumed_chunks == 2 and not again.reused
    for name in ("sft.jsonl", "pairs.jsonl", "scored.jsonl"):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "full" / name).read_text()
    calls_made: list = []
    reused = rejection_sample(cfg, tmp_path / "killed", policy=policy, scorer=spread_scorer(calls_made), seed=7)
    assert reused.reused and calls_made == [] and reused.stats["pairs"] == full.stats["pairs"]
    other = rejection_sample(cfg, tmp_path / "killed", policy=policy, scorer=spread_scorer(calls_made), seed=8)
    assert not other.reused and calls_made  # another seed: sampled again


def test_builtin_prompts_with_a_reward_model_checkpoint(tmp_path, policy, chat_tok):
    rm = make_rm(tmp_path / "rm" / "t", chat_tok, seed=4)
    cfg = cfgmod.build(RejectionConfig, dict(n=2, max_new_tokens=4, max_prompts=5, heldout_prompts=2, device="cpu"), "rejection")
    res = rejection_sample(cfg, tmp_path / "out", policy=policy, reward_model=rm, seed=1)
    s = res.stats
    assert s["prompts"] + s["too_long"] == 5 and s["prompts"] >= 2 and s["source"].startswith("built-in dictionary questions")
    assert s["heldout_prompts"] == 2 and s["heldout_greedy_reward"] is not None
    assert s["reward_model"].startswith(str(rm / "step_000001"))
    convs, _ = read_chat_jsonl([res.sft_path])
    assert convs and all(c["messages"][-1]["role"] == "assistant" for c in convs)
    assert len(res.heldout_answers) == 2 and all("reward" in a and a["reference"] for a in res.heldout_answers)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="rejection.n"):
        cfgmod.build(RejectionConfig, {"n": 1}, "rejection")
    with pytest.raises(ConfigError, match="rejection.min_margin"):
        cfgmod.build(RejectionConfig, {"min_margin": -1}, "rejection")
    with pytest.raises(ConfigError, match="needs a reward model"):
        rejection_sample(RejectionConfig(), "/nonexistent", policy="/nonexistent")


def test_cli(tmp_path, policy, prompts_file, chat_tok, capsys):
    import argparse

    from lmforge.posttrain.rounds_commands import register

    rm = make_rm(tmp_path / "rm", chat_tok, seed=4)
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    args = p.parse_args(["rejection-sample", str(policy), "--rm", str(rm), "--out", str(tmp_path / "o"), "--prompts",
                         str(prompts_file), "--n", "3", "--min-margin", "0"])
    args.overrides = ["rejection.max_new_tokens=3", "rejection.device=cpu"]
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "rejection-sample: 7 prompts x 3" in out and "pairs" in out
    assert (tmp_path / "o" / "pairs.jsonl").is_file() and read_json(tmp_path / "o" / "stats.json")["n"] == 3
    args.overrides = ["dpo.max_steps=2"]
    with pytest.raises(ConfigError, match="only --rejection.KEY"):
        args.func(args)
