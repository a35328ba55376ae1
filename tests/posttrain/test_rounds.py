"""Iterated rounds: two rounds of DPO end to end through the recipe stage (each round's data and
model kept, round 2 starting from round 1's model, `rounds/latest` resolvable), a rerun skips the
finished rounds, a round killed in training resumes through the trainer to the same weights, SFT
rounds with a stub scorer, the config's checks, the rejection stage and the CLI."""

import json
from pathlib import Path

import pytest

from lmforge import config as cfgmod
from lmforge.errors import ConfigError
from lmforge.model.io import resolve_model
from lmforge.posttrain.pref_data import read_pref_jsonl
from lmforge.posttrain.rounds import RoundsConfig, run_rounds
from lmforge.rundir import RunDir, read_json
from lmforge.train import checkpoint as ck
from tests.posttrain.pref_helpers import make_base, write_jsonl
from tests.posttrain.test_rejection import make_rm, prompt_records, spread_scorer

DPO = {"max_steps": 4, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "checkpoint_every": 2, "eval_every": 4, "log_every": 1,
       "device": "cpu", "sample_tokens": 0, "beta": 0.5, "heldout": 0.2}


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, chat_tok):
    """A run directory with a tiny chat model in sft/t and a tiny reward model in rm/t."""
    root = tmp_path_factory.mktemp("rounds_run")
    make_base(root / "sft" / "t", chat_tok, seed=3)
    make_rm(root / "rm" / "t", chat_tok, seed=5)
    write_jsonl(root / "prompts.jsonl", prompt_records(12))
    return root


def _ctx(root: Path, cfg, stage="rounds", recipe=None, stages=("sft", "rm", "rounds")):
    from lmforge.recipe import RunConfig, StageContext

    return StageContext(name=stage, cfg=cfg, run_dir=RunDir(root), out=root / stage, run=RunConfig(name="t", stages=list(stages)),
                        base_dir=root, recipe=recipe or {}, fingerprint="")


def _rounds_cfg(**kw) -> RoundsConfig:
    base = {"rounds": 2, "n": 4, "prompts": ["prompts.jsonl"], "rejection": {"max_new_tokens": 6, "heldout_prompts": 2,
                                                                             "device": "cpu"}}
    base.update(kw)
    return cfgmod.build(RoundsConfig, base, "rounds")


def test_two_dpo_rounds_keep_each_rounds_data_and_model_and_resume(run_root):
    from lmforge.posttrain.rounds_stage import run_rounds_stage

    cfg = _rounds_cfg(dpo={"max_steps": 4})
    recipe = {"dpo": {**DPO, "max_steps": 99, "data": ["ignored.jsonl"]}}  # [rounds.dpo] overrides, rounds set data
    res = run_rounds_stage(_ctx(run_root, cfg, recipe=recipe))
    out = run_root / "rounds"
    assert res.counts["rounds"] == 2 and res.counts["skipped_rounds"] == 0 and res.counts["train"] == "dpo"
    assert len(res.counts["heldout_greedy_reward"]) == 3 and None not in res.counts["heldout_greedy_reward"]
    for r in (1, 2):
        d = out / f"round_{r}"
        pairs, _ = read_pref_jsonl([d / "data" / "pairs.jsonl"])
        assert pairs and (d / "data" / "sft.jsonl").is_file() and read_json(d / "data" / "stats.json")["n"] == 4
        marker = read_json(d / "round.json")
        assert marker["model"] == f"round_{r}/dpo/step_000004" and marker["train"]["steps"] == 4
        assert (out / marker["model"] / "model.safetensors").is_file()
    # round 2 trained from round 1's model; its samples came from it too
    assert read_json(out / "round_2" / "dpo" / "step_000004" / "state.json")["base"].endswith("round_1/dpo/step_000004")
    assert read_json(out / "round_2" / "data" / "stats.json")["policy"].endswith("round_1/dpo/step_000004")
    assert read_json(out / "round_1" / "data" / "stats.json")["policy"].endswith("sft/t/step_000010")
    # the newest model is what `lmforge generate runs/NAME/rounds` loads
    assert (out / "latest").read_text().strip() == "round_2/dpo/step_000004"
    assert resolve_model(out).path == out / "round_2" / "dpo" / "step_000004"
    assert "| 1 |" in res.report and "| 2 |" in res.report and "| final |" in res.report and "DPO 4 steps" in res.report
    assert read_json(out / "final.json")["heldout_greedy_reward"] == pytest.approx(res.counts["heldout_greedy_reward"][-1], abs=1e-4)

    # a rerun skips both finished rounds (nothing rewritten)
    w1 = (out / "round_1" / "dpo" / "step_000004" / "model.safetensors").stat().st_mtime_ns
    again = run_rounds_stage(_ctx(run_root, cfg, recipe=recipe))
    assert again.counts["skipped_rounds"] == 2 and "(done before)" in again.report
    assert (out / "round_1" / "dpo" / "step_000004" / "model.safetensors").stat().st_mtime_ns == w1

    # round 2 killed after its step-2 checkpoint: round 1 is skipped, round 2's samples are reused and
    # its DPO resumes at step 2 to the same weights
    final = ck.load_weights(out / "round_2" / "dpo" / "step_000004")
    (out / "round_2" / "round.json").unlink()
    import shutil

    shutil.rmtree(out / "round_2" / "dpo" / "step_000004")
    (out / "round_2" / "dpo" / "latest").write_text("step_000002")
    resumed = run_rounds_stage(_ctx(run_root, cfg, recipe=recipe))
    assert resumed.counts["skipped_rounds"] == 1
    assert read_json(out / "round_2" / "round.json")["train"]["resumed_from"] == 2
    again_w = ck.load_weights(out / "round_2" / "dpo" / "step_000004")
    assert all((again_w[k] == final[k]).all() for k in final)

    # a changed round setting recomputes that round (and the ones after it)
    changed = run_rounds_stage(_ctx(run_root, _rounds_cfg(dpo={"max_steps": 2}), recipe=recipe))
    assert changed.counts["skipped_rounds"] == 0
    assert read_json(out / "round_1" / "round.json")["model"] == "round_1/dpo/step_000002"


def test_sft_rounds_with_a_stub_scorer(tmp_path, run_root):
    cfg = _rounds_cfg(rounds=1, train="sft", sft={"max_steps": 2, "batch_size": 2, "seq_len": 95, "checkpoint_every": 2,
                                                  "eval_every": 0, "sample_tokens": 0, "safety_ratio": 0.0, "device": "cpu"})
    res = run_rounds(cfg, tmp_path / "rounds", base=run_root / "sft", scorer=spread_scorer(), seed=3,
                     resolve=lambda p: run_root / p)
    info = res.rounds[0]
    assert info["model"] == "round_1/sft/step_000002" and info["train"]["steps"] == 2
    assert info["reward_model"] == "callable" and info["rejection"]["sft_examples"] > 0
    convs = [json.loads(line) for line in (tmp_path / "rounds" / "round_1" / "data" / "sft.jsonl").read_text().splitlines()]
    assert read_json(tmp_path / "rounds" / "round_1" / "sft" / "data" / "stats.json")["task_conversations"] + \
        read_json(tmp_path / "rounds" / "round_1" / "sft" / "data" / "stats.json")["heldout_conversations"] == len(convs)
    assert res.final_model == tmp_path / "rounds" / "round_1" / "sft" / "step_000002"


@pytest.mark.parametrize("section,msg", [
    ({"rounds": 0}, "rounds.rounds"),
    ({"dpo": {"data": ["x.jsonl"]}}, "rounds.dpo.data is set by the rounds"),
    ({"dpo": {"max_stepz": 3}}, "rounds.dpo.max_stepz"),
    ({"rejection": {"temperature": 0}}, "rejection.temperature"),
    ({"train": "ppo"}, "rounds.train"),
])
def test_config_errors_name_the_key(section, msg):
    with pytest.raises(ConfigError, match=msg):
        cfgmod.build(RoundsConfig, section, "rounds")


def test_rejection_stage_samples_from_the_runs_latest_model(run_root):
    from lmforge.posttrain.rejection import RejectionConfig
    from lmforge.posttrain.rounds_stage import run_rejection_stage

    cfg = cfgmod.build(RejectionConfig, {"prompts": ["prompts.jsonl"], "n": 3, "max_new_tokens": 4, "heldout_prompts": 0,
                                         "device": "cpu"}, "rejection")
    res = run_rejection_stage(_ctx(run_root, cfg, stage="rejection", stages=("sft", "rm", "rejection")))
    assert res.counts["prompts"] == 12 and res.counts["pairs_file"] == "rejection/t/pairs.jsonl"
    assert read_json(run_root / "rejection" / "t" / "stats.json")["policy"].endswith("sft/t/step_000010")
    assert "mean best-of-3 reward" in res.report and "Samples (best and worst" in res.report


def test_rounds_cli_with_base(tmp_path, run_root, capsys):
    import argparse

    from lmforge.posttrain.rounds_commands import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    args = p.parse_args(["rounds", "--base", str(run_root / "sft"), "--rm", str(run_root), "--out", str(tmp_path / "o"),
                         "--prompts", str(run_root / "prompts.jsonl"), "--rounds", "1", "--n", "3"])
    args.overrides = [f"rounds.dpo.{k}={v}" for k, v in {**DPO, "max_steps": 2}.items()] + [
        "rounds.rejection.max_new_tokens=4", "rounds.rejection.device=cpu", "rounds.rejection.heldout_prompts=0"]
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "round 1: best-of-3 reward" in out and "rounds: final model" in out
    assert (tmp_path / "o" / "latest").read_text().strip() == "round_1/dpo/step_000002"
    args.overrides = ["dpo.max_steps=2"]
    with pytest.raises(ConfigError, match="only --rounds.KEY"):
        args.func(args)


def test_an_rl_round_with_a_retrained_reward_model(tmp_path, run_root):
    cfg = _rounds_cfg(rounds=1, train="rl", retrain_rm=True, n=2,
                      rm={"max_steps": 2, "pairs": 20, "batch_size": 4, "checkpoint_every": 2, "eval_every": 2, "device": "cpu"},
                      rl={"max_steps": 2, "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 3, "eval_prompts": 2,
                          "eval_tokens": 3, "checkpoint_every": 2, "device": "cpu"})
    res = run_rounds(cfg, tmp_path / "rounds", base=run_root / "sft", reward_model=run_root / "rm", seed=2,
                     resolve=lambda p: run_root / p)
    info = res.rounds[0]
    rd = tmp_path / "rounds" / "round_1"
    assert info["reward_model"] == "round_1/rm/step_000002" and info["rm_train"]["steps"] == 2
    assert read_json(rd / "rm" / "step_000002" / "state.json")["base"].endswith("sft/t/step_000010")
    assert read_json(rd / "data" / "stats.json")["reward_model"].startswith(str(rd / "rm" / "step_000002"))
    state = read_json(rd / "rl" / "step_000002" / "state.json")
    assert state["reward"] == f"rm:{rd / 'rm' / 'step_000002'}" and info["train"]["steps"] == 2
    # 12 prompts: at most a tenth (1) held out, given to RL as its held-out set
    assert len((rd / "data" / "prompts.jsonl").read_text().splitlines()) == 11
    assert len((rd / "data" / "heldout_prompts.jsonl").read_text().splitlines()) == 1
    assert info["model"] == "round_1/rl/step_000002" and res.final_heldout_reward is not None
