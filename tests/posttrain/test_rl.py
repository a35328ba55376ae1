"""RL on the shared trainer: advantages and losses against hand computations, GRPO and PPO learning
a trivially learnable reward on a tiny model, the NaN and no-signal stops, resume, the built-in
task, the stage's config checks."""

import json
from pathlib import Path

import pytest
import torch

from lmforge import config as cfgmod
from lmforge.errors import ConfigError
from lmforge.model import Transformer, preset
from lmforge.posttrain import rl as R
from lmforge.rundir import read_json
from lmforge.train import checkpoint as ck


# ---- advantages and losses on hand-made numbers ------------------------------------------------


def test_grpo_advantages_are_group_normalised():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = R.grpo_advantages(r, eps=0.0)
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as GRPO
    torch.testing.assert_close(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    assert torch.equal(a[1], torch.zeros(4))  # one reward in the group: no signal
    torch.testing.assert_close(R.grpo_advantages(r, scale=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    # a skipped sample is left out of the group's statistics and gets 0
    valid = torch.tensor([[True, True, False, True], [True, True, True, True]])
    a = R.grpo_advantages(torch.tensor([[3.0, 1.0, 100.0, 2.0], [0.0, 0.0, 0.0, 0.0]]), valid, eps=0.0)
    torch.testing.assert_close(a[0], torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_rloo_leave_one_out_and_reinforce_baselines():
    r = torch.tensor([[1.0, 2.0, 6.0]])
    torch.testing.assert_close(R.rloo_advantages(r), torch.tensor([[1 - 4.0, 2 - 3.5, 6 - 1.5]]))
    valid = torch.tensor([[True, False, True]])
    torch.testing.assert_close(R.rloo_advantages(r, valid), torch.tensor([[1 - 6.0, 0.0, 6 - 1.0]]))
    torch.testing.assert_close(R.reinforce_advantages(r, baseline=2.5), torch.tensor([[-1.5, -0.5, 3.5]]))
    torch.testing.assert_close(R.reinforce_advantages(r), torch.tensor([[-2.0, -1.0, 3.0]]))


def test_gae_matches_a_hand_computation():
    # one row: two prompt positions (mask 0), three response tokens, one pad
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]], dtype=torch.float32)
    values = torch.tensor([[9.0, 9.0, 0.5, 0.2, -0.1, 7.0]])
    rewards = torch.tensor([[0.0, 0.0, -0.1, 0.05, 1.0, 0.0]])
    g, lam = 0.9, 0.8
    d4 = 1.0 + g * 0 - (-0.1)
    d3 = 0.05 + g * (-0.1) - 0.2
    d2 = -0.1 + g * 0.2 - 0.5
    a4 = d4
    a3 = d3 + g * lam * a4
    a2 = d2 + g * lam * a3
    adv, ret = R.gae(rewards, values, mask, g, lam)
    torch.testing.assert_close(adv, torch.tensor([[0, 0, a2, a3, a4, 0]], dtype=torch.float32))
    torch.testing.assert_close(ret, torch.tensor([[0, 0, a2 + 0.5, a3 + 0.2, a4 - 0.1, 0]], dtype=torch.float32))
    w = R.whiten(adv, mask)
    assert abs(float(R.masked_mean(w, mask))) < 1e-6 and w[0, 0] == 0 and w[0, 5] == 0


def test_clipped_policy_and_value_losses_on_hand_numbers():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 3.0]]))  # ratios 1.5, 0.5, 1.1, 3.0 (the last is masked)
    adv = torch.tensor([[1.0, -2.0, -1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, clip = R.clipped_policy_loss(logp, old, adv, mask, 0.2)
    # -min(r A, clip(r) A): 1.5*1 vs 1.2*1 -> 1.2; 0.5*-2 vs 0.8*-2 -> -1.6; 1.1*-1 vs 1.1*-1 -> -1.1
    torch.testing.assert_close(loss, torch.tensor(-(1.2 - 1.6 - 1.1) / 3))
    torch.testing.assert_close(clip, torch.tensor(2 / 3))
    seq = R.clipped_policy_loss(logp, old, adv, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), 0.2, "sequence")[0]
    torch.testing.assert_close(seq, torch.tensor(-1.2))
    # value loss: 0.5 * max((v-R)^2, (old + clip(v-old, +-0.2) - R)^2)
    v, ov, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.1]]), torch.tensor([[0.0, 1.0]])
    vl = R.value_loss(v, ov, ret, torch.ones(1, 2), 0.2)
    torch.testing.assert_close(vl, torch.tensor(0.5 * (max(1.0, 0.7 ** 2) + max(1.0, 0.9 ** 2)) / 2))
    kl = R.k3_kl(torch.tensor([-1.0]), torch.tensor([-2.0]))
    torch.testing.assert_close(kl, torch.exp(torch.tensor([-1.0])) + 1.0 - 1.0)


# ---- a tiny model and a trivially learnable reward -----------------------------------------------


@pytest.fixture(scope="module")
def rl_base(tmp_path_factory, chat_tok):
    """A tiny untrained policy saved as a checkpoint with its tokenizer."""
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=chat_tok.vocab_size, max_seq_len=192, d_model=64, n_layers=2))
    root = tmp_path_factory.mktemp("rlbase") / "checkpoints" / "t"
    sd = {k: v.detach().clone() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    ck.save_checkpoint(root, 1, sd, m.cfg.to_dict(), [], {"train_config": {}}, tokenizer_file=chat_tok.path)
    return root


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("rlprompts") / "prompts.jsonl"
    rows = [{"prompt": f"Say something about {w}.", "answer": w} for w in
            ("cats", "dogs", "rain", "salt", "ships", "maps", "tea", "wool", "iron", "sand", "bees", "milk")]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def space_first(prompt, completion, **meta):
    """1 when the answer starts with a space: about a third of the tiny vocabulary's tokens do."""
    return 1.0 if completion[:1] == " " else 0.0


def _cfg(prompts_file, **kw) -> R.RLConfig:
    base = dict(data=[str(prompts_file)], heldout=0.0, reward="tests.posttrain.test_rl:space_first", max_steps=30,
                prompts_per_step=4, group_size=4, max_new_tokens=3, lr=3e-3, checkpoint_every=0, eval_every=0,
                log_every=1, eval_prompts=0, stall_steps=0)
    base.update(kw)
    return cfgmod.build(R.RLConfig, base, "rl")


def _rewards(out: Path) -> list[float]:
    return [r["reward_mean"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_a_tiny_model_learns_a_trivial_reward(tmp_path, rl_base, prompts_file, algorithm):
    kw = {"kl_coef": 0.05, "vf_coef": 0.5} if algorithm == "ppo" else {"kl_coef": 0.02}
    res = R.run_rl(_cfg(prompts_file, algorithm=algorithm, lr=1e-2, max_new_tokens=2, **kw), tmp_path / "rl",
                   base=rl_base, seed=1)
    r = _rewards(tmp_path / "rl")
    assert len(r) == 30 and res.rollouts == 30
    first, last = sum(r[:6]) / 6, sum(r[-6:]) / 6
    assert last > first + 0.3 and last > 0.6, (algorithm, r)
    rec = res.last_record
    for k in ("reward_std", "kl", "clip_frac", "response_len", "entropy", "policy_loss"):
        assert k in rec, k
    if algorithm == "ppo":
        assert "value_loss" in rec and "explained_var" in rec
        assert (res.checkpoint / "value_head.safetensors").is_file() and ck.verify(res.checkpoint) is None
    state = read_json(res.checkpoint / "state.json")
    assert state["stage"] == "rl" and state["algorithm"] == algorithm and state["chat_template"].startswith("lmforge-chat")
    from lmforge.model.io import load_checkpoint

    m, _ = load_checkpoint(tmp_path / "rl")  # a plain model: no value head in model.safetensors
    assert not any(k.startswith("value_head") for k in m.state_dict())
    assert res.curve_path is not None and res.curve_path.is_file()


def test_rloo_and_reinforce_with_ppo_epochs_and_minibatches_run(tmp_path, rl_base, prompts_file):
    for alg in ("rloo", "reinforce"):
        res = R.run_rl(_cfg(prompts_file, algorithm=alg, max_steps=4, ppo_epochs=2, minibatches=2), tmp_path / alg,
                       base=rl_base, seed=2)
        assert res.steps == 4 and res.rollouts == 1  # one rollout feeds epochs x minibatches updates
        assert res.last_record["clip_frac"] >= 0.0


def _as_loaded(fn):
    """`fn` as the RL run imports it by its "tests.posttrain.test_rl:NAME" spec (pytest may import this
    file under another module name): the object whose counters the run sees."""
    import importlib

    return getattr(importlib.import_module("tests.posttrain.test_rl"), fn.__name__)


def nan_after_two_rollouts(prompt, completion, **meta):
    nan_after_two_rollouts.calls += 1
    return float("nan") if nan_after_two_rollouts.calls > 32 else 0.5 + 0.1 * (completion[:1] == " ")


def test_nan_reward_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, rl_base, prompts_file):
    _as_loaded(nan_after_two_rollouts).calls = 0
    cfg = _cfg(prompts_file, reward="tests.posttrain.test_rl:nan_after_two_rollouts", checkpoint_every=1, max_steps=5)
    with pytest.raises(R.RewardNaN, match=r"reward nan at step 3 .*Last good checkpoint: .*step_000002"):
        R.run_rl(cfg, tmp_path / "rl", base=rl_base, seed=1)


def constant(prompt, completion, **meta):
    return 1.0


def test_constant_rewards_stop_after_stall_steps(tmp_path, rl_base, prompts_file):
    cfg = _cfg(prompts_file, reward="tests.posttrain.test_rl:constant", stall_steps=3, max_steps=10)
    with pytest.raises(R.NoLearningSignal, match=r"no learning signal at step 3: every group had one reward \(1\)"):
        R.run_rl(cfg, tmp_path / "rl", base=rl_base, seed=1)


def test_a_raising_reward_is_reported_once_and_scored_as_configured(tmp_path, rl_base, prompts_file, caplog):
    f = tmp_path / "my_reward.py"
    f.write_text("def fn(prompt, completion, **meta):\n    if 'cats' in prompt[-1]['content']:\n"
                 "        raise ValueError('no cats')\n    return float(completion[:1] == ' ')\n")
    with caplog.at_level("WARNING"):
        res = R.run_rl(_cfg(prompts_file, reward=f"{f}:fn", max_steps=6, reward_on_error="skip"), tmp_path / "rl",
                       base=rl_base, seed=1)
    warned = [r for r in caplog.records if "failed" in r.getMessage() and "no cats" in r.getMessage()]
    assert len(warned) == 1 and "Say something about cats" in warned[0].getMessage()
    assert res.reward_errors > 0 and res.reward_errors % 4 == 0  # every sample of the cats prompt, G = 4
    # scored 0.0 instead: the failed samples enter the batch with reward 0
    res = R.run_rl(_cfg(prompts_file, reward=f"{f}:fn", max_steps=6, reward_on_error=0.0), tmp_path / "rl0",
                   base=rl_base, seed=1)
    assert res.reward_errors > 0


def interrupt_at(prompt, completion, **meta):
    interrupt_at.calls += 1
    if interrupt_at.calls == interrupt_at.limit:
        raise KeyboardInterrupt  # an interruption, not a reward failure: it stops the run
    return float(completion[:1] == " ")


@pytest.mark.parametrize("algorithm,epochs,stop_in_rollout", [("grpo", 1, 3), ("ppo", 2, 2)])
def test_resume_after_an_interruption_gives_the_same_weights(tmp_path, rl_base, prompts_file, algorithm, epochs,
                                                            stop_in_rollout):
    """The run is interrupted at step 5 (while scoring a rollout), after its checkpoint at step 3,
    which falls inside a rollout (epochs x 2 minibatches per rollout: the partly used rollout is
    saved with it); the rerun resumes there and ends with the uninterrupted run's weights."""
    cfg = _cfg(prompts_file, algorithm=algorithm, reward="tests.posttrain.test_rl:interrupt_at", max_steps=8,
               checkpoint_every=3, ppo_epochs=epochs, minibatches=2, kl_coef=0.05)
    fn = _as_loaded(interrupt_at)
    fn.calls, fn.limit = 0, 10 ** 9
    ref = R.run_rl(cfg, tmp_path / "ref", base=rl_base, seed=4)
    fn.calls, fn.limit = 0, 16 * (stop_in_rollout - 1) + 1  # 16 samples per rollout
    with pytest.raises(KeyboardInterrupt):
        R.run_rl(cfg, tmp_path / "run", base=rl_base, seed=4)
    assert ck.list_checkpoints(tmp_path / "run")
    fn.limit = 10 ** 9
    again = R.run_rl(cfg, tmp_path / "run", base=rl_base, seed=4)
    assert again.resumed_from == 3
    a, b = ck.load_weights(again.checkpoint), ck.load_weights(ref.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if algorithm == "ppo":
        from safetensors.torch import load_file

        va, vb = load_file(again.checkpoint / "value_head.safetensors"), load_file(ref.checkpoint / "value_head.safetensors")
        assert all(torch.equal(va[k], vb[k]) for k in va)


# ---- the built-in task and the config ------------------------------------------------------------


def test_builtin_task_reports_accuracy_before_and_after(tmp_path, rl_base):
    cfg = cfgmod.build(R.RLConfig, dict(max_steps=2, prompts=40, eval_prompts=6, prompts_per_step=2, group_size=2,
                                        max_new_tokens=4, eval_tokens=4, checkpoint_every=0, eval_every=0), "rl")
    res = R.run_rl(cfg, tmp_path / "rl", base=rl_base, seed=1)
    assert res.accuracy_before is not None and res.accuracy_after is not None
    assert 0.0 <= res.accuracy_before <= 1.0 and res.data_stats["heldout_prompts"] == 6
    held = [json.loads(line) for line in (tmp_path / "rl" / "data" / "task_heldout.jsonl").read_text().splitlines()]
    assert len(held) == 6 and all(h["meta"]["answer"] in h["meta"]["options"] for h in held)
    stats = read_json(tmp_path / "rl" / "data" / "stats.json")
    assert stats["accuracy_after"] == res.accuracy_after


@pytest.mark.parametrize("over,msg", [
    ({"grad_accum": 2}, "grad_accum"),
    ({"algorithm": "grpo", "group_size": 1}, "group_size"),
    ({"temperature": 0.0}, "temperature"),
    ({"algorithm": "a2c"}, "algorithm"),
    ({"reward_on_error": "ignore"}, "reward_on_error"),
    ({"gamma": 1.5}, "gamma"),
])
def test_bad_config_names_the_key(over, msg):
    with pytest.raises(ConfigError, match=msg):
        cfgmod.build(R.RLConfig, over, "rl")


def test_missing_reward_function_is_a_config_error(tmp_path, rl_base, prompts_file):
    with pytest.raises(ConfigError, match="no function 'nope'"):
        R.run_rl(_cfg(prompts_file, reward="tests.posttrain.test_rl:nope", max_steps=1), tmp_path / "rl", base=rl_base)


# ---- the recipe stage and the CLI ----------------------------------------------------------------


def _run_with_sft_model(root: Path, rl_base: Path) -> Path:
    """A run directory whose sft/t/ holds the tiny model as a chat model."""
    from lmforge.tokenizer.chat import template_id

    step = ck.find_resumable(rl_base)
    sd = ck.load_weights(step)
    ck.save_checkpoint(root / "sft" / "t", 3, sd, read_json(step / "config.json"), [], {"train_config": {},
                       "chat_template": template_id(), "stage": "sft"}, tokenizer_file=step / "tokenizer.json")
    return root


def test_recipe_stage_takes_the_runs_sft_model_and_reports(tmp_path, rl_base, prompts_file):
    from lmforge.posttrain.rl_stage import run_stage
    from lmforge.recipe import RunConfig, StageContext
    from lmforge.rundir import RunDir

    root = _run_with_sft_model(tmp_path / "run", rl_base)
    cfg = _cfg(prompts_file, heldout=0.25, eval_prompts=3, max_steps=2, eval_tokens=3, reward="exact")
    ctx = StageContext(name="rl", cfg=cfg, run_dir=RunDir(root), out=root / "rl", run=RunConfig(name="t"), base_dir=root,
                       recipe={}, fingerprint="")
    res = run_stage(ctx)
    assert res.counts["steps"] == 2 and res.counts["algorithm"] == "grpo" and res.counts["heldout_prompts"] == 3
    assert res.counts["checkpoint"].startswith("rl/t/step_000002") and res.counts["accuracy_before"] is not None
    assert "held-out task accuracy before RL" in res.report and "![RL reward](rl/t/reward.png)" in res.report
    state = read_json(root / "rl" / "t" / "step_000002" / "state.json")
    assert state["base"].endswith("sft/t/step_000003")
    with pytest.raises(Exception, match="no reward model"):
        run_stage(StageContext(name="rl", cfg=_cfg(prompts_file, reward="rm"), run_dir=RunDir(root), out=root / "rl",
                               run=RunConfig(name="t"), base_dir=root, recipe={}, fingerprint=""))


def test_cli_with_base_and_out(tmp_path, rl_base, prompts_file, capsys):
    import argparse

    from lmforge.posttrain.rl_commands import register

    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    args = p.parse_args(["rl", "--base", str(rl_base), "--out", str(tmp_path / "o"), "--data", str(prompts_file),
                         "--reward", "tests.posttrain.test_rl:space_first", "--algorithm", "rloo"])
    args.overrides = ["rl.max_steps=2", "rl.max_new_tokens=2", "rl.eval_prompts=0", "rl.prompts_per_step=2"]
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "rl (rloo): 2 steps, 2 rollouts" in out
    args.overrides = ["sft.max_steps=2"]
    with pytest.raises(ConfigError, match="only --rl.KEY"):
        args.func(args)
