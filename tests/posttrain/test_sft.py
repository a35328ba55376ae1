"""Supervised fine-tuning on the shared trainer: full, LoRA and QLoRA; the built-in chat set;
the chat template recorded and checked; bit-exact resume; the CLI."""

import json
from pathlib import Path

import pytest
import torch

from lmforge import config as cfgmod
from lmforge.errors import ConfigError
from lmforge.model import Transformer, preset
from lmforge.model.io import load_checkpoint
from lmforge.posttrain.config import SFTConfig
from lmforge.posttrain.sft import run_sft
from lmforge.rundir import read_json
from lmforge.train import checkpoint as ck
from lmforge.train.config import TrainerConfig
from lmforge.train.optim import build_optimizers


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, chat_tok):
    """A tiny 'pretrained' model saved as a training checkpoint with its tokenizer and an AdamW state."""
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=chat_tok.vocab_size, max_seq_len=96, d_model=64, n_layers=2))
    (opt,) = build_optimizers(m, TrainerConfig(optimizer="adamw"))  # as pretraining with AdamW builds it
    x = torch.randint(0, chat_tok.vocab_size, (2, 33))
    m(x[:, :-1], x[:, 1:])[1].backward()
    opt.step()
    root = tmp_path_factory.mktemp("base") / "checkpoints" / "t"
    sd = {k: v.detach().clone() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    ck.save_checkpoint(root, 10, sd, m.cfg.to_dict(), [opt.state_dict()], {"train_config": {}}, tokenizer_file=chat_tok.path)
    return root


def _cfg(**kw) -> SFTConfig:
    base = dict(max_steps=8, batch_size=4, seq_len=95, examples=300, checkpoint_every=4, eval_every=0, log_every=2,
                sample_prompts=["What does able mean?"], sample_tokens=8, lr=3e-3, warmup_steps=2)
    base.update(kw)
    lora = base.pop("lora", None)
    cfg = cfgmod.build(SFTConfig, {**base, **({"lora": lora} if lora else {})}, "sft")
    return cfg


def _weights(step_dir: Path):
    return ck.load_weights(step_dir)


def test_full_sft_learns_writes_eval_files_and_records_the_template(tmp_path, base_ckpt):
    res = run_sft(_cfg(max_steps=16, checkpoint_every=8), tmp_path / "sft", base=base_ckpt, seed=3)
    lines = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    assert all(r["supervised_tokens"] > 0 for r in lines if r["kind"] == "train")
    state = read_json(res.checkpoint / "state.json")
    assert state["chat_template"].startswith("lmforge-chat") and state["base"].endswith("step_000010")
    assert state["stage"] == "sft" and state["lora"] is None
    held = [json.loads(l) for l in (tmp_path / "sft" / "data" / "heldout.jsonl").read_text().splitlines()]
    assert held and held[0]["messages"][-1]["role"] == "assistant"
    train_words = {c["meta"]["word"] for c in held}
    safety = [json.loads(l) for l in (tmp_path / "sft" / "data" / "safety_eval.jsonl").read_text().splitlines()]
    assert {s["set"] for s in safety} == {"harmful", "jailbreak", "harmless"}
    stats = read_json(tmp_path / "sft" / "data" / "stats.json")
    assert stats["safety_conversations"] > 0 and stats["examples"] > 100 and train_words
    assert res.samples and res.samples[0]["prompt"] == "What does able mean?"
    model, ref = load_checkpoint(tmp_path / "sft")  # the stage's output is an ordinary checkpoint
    assert ref.step == 16


def test_lora_sft_killed_with_sigkill_resumes_to_the_same_weights(tmp_path, base_ckpt):
    """A real `lmforge sft` subprocess is killed with SIGKILL after a checkpoint; the rerun resumes
    there (model, adapters, optimizer, RNG, data position) and ends with the uninterrupted weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    over = {"max_steps": 40, "checkpoint_every": 4, "keep_last": 2, "sample_tokens": 0, "lora.r": 4, "lora.dropout": 0.1}
    args = [f"--sft.{k}={v}" for k, v in over.items()] + ["--sft.batch_size=4", "--sft.seq_len=95", "--sft.examples=300",
                                                         "--sft.lr=3e-3", "--sft.warmup_steps=2"]
    out = tmp_path / "killed"
    env = dict(os.environ, LMFORGE_PROGRESS="0", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "sft", "--base", str(base_ckpt), "--out", str(out), "--seed", "5",
                             *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "step_000004" / "state.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the SFT subprocess made no checkpoint in time"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocess's thread count: bit-exact comparison
    try:
        cfg = _cfg(**{k: v for k, v in over.items() if "." not in k}, lora={"r": 4, "dropout": 0.1})
        again = run_sft(cfg, out, base=base_ckpt, seed=5)
        ref = run_sft(cfg, tmp_path / "ref", base=base_ckpt, seed=5)
    finally:
        torch.set_num_threads(n)
    assert again.resumed_from is not None and 4 <= again.resumed_from < 40
    a, b = _weights(again.checkpoint), _weights(ref.checkpoint)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from safetensors.torch import load_file

    a, b = load_file(again.checkpoint / "adapter.safetensors"), load_file(ref.checkpoint / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_lora_sft_saves_merged_weights_and_adapters(tmp_path, base_ckpt, quantize):
    from lmforge.posttrain import lora as L

    cfg = _cfg(lora={"r": 4, "alpha": 8, "targets": ["wq", "wv", "w2"], "quantize": quantize}, lr=1e-2)
    res = run_sft(cfg, tmp_path / "sft", base=base_ckpt, seed=1)
    step = res.checkpoint
    assert (step / "adapter.safetensors").is_file() and ck.verify(step) is None
    assert res.trainable_params < res.total_params / 10
    merged, _ = load_checkpoint(step)  # plain weights: loads with no LoRA code
    base, _ = load_checkpoint(base_ckpt)
    plain = _weights(step)
    assert not any("lora" in k for k in plain)
    changed = [k for k in plain if not torch.equal(plain[k], base.state_dict()[k])]
    targets = [k for k in changed if k.split(".")[-2] in ("wq", "wv", "w2")]
    assert targets
    if quantize == "none":
        assert changed == targets  # only adapted layers move
    else:  # QLoRA: the other linear layers are the dequantized NF4 base, close to the original
        for k in set(changed) - set(targets):
            w = base.state_dict()[k]
            assert (plain[k] - w).norm() / w.norm() < 0.15, k
    # the adapters loaded onto the base give the merged model's outputs
    if quantize == "none":
        L.apply_lora(base, L.LoraConfig(r=4, alpha=8, targets=("wq", "wv", "w2")))
        L.load_adapter(base, step / "adapter.safetensors")
        x = torch.randint(0, 500, (1, 20))
        torch.testing.assert_close(base(x)[0], merged(x)[0], rtol=1e-4, atol=1e-5)


def test_a_model_trained_with_another_template_is_refused(tmp_path, base_ckpt):
    import shutil

    other = tmp_path / "other" / "step_000010"
    shutil.copytree(base_ckpt / "step_000010", other)
    state = read_json(other / "state.json")
    state["chat_template"] = "someone-elses-template-abc123"
    (other / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="template"):
        run_sft(_cfg(max_steps=1), tmp_path / "sft", base=other, seed=1)


def test_optimizer_warm_start_from_the_base_checkpoint(tmp_path, base_ckpt):
    res = run_sft(_cfg(max_steps=2, init_optimizer="pretrain"), tmp_path / "sft", base=base_ckpt, seed=1)
    assert res.steps == 2
    with pytest.raises(ConfigError, match="optimizer"):
        run_sft(_cfg(max_steps=2, init_optimizer="pretrain", optimizer="muon"), tmp_path / "sft2", base=base_ckpt, seed=1)
    with pytest.raises(ConfigError, match="full fine-tuning"):
        _cfg(init_optimizer="pretrain", lora={"r": 2})


def test_cli_with_user_data_counts_malformed_lines(tmp_path, base_ckpt, capsys):
    from lmforge.cli import main

    data = tmp_path / "chats.jsonl"
    good = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]} for w in
            ("yes", "no", "maybe", "hello", "goodbye", "thanks", "sorry", "please", "okay", "fine")]
    lines = [json.dumps(g) for g in good] + ["{not json", json.dumps({"prompt": "Hi", "completion": "Hello!"}),
                                             json.dumps({"messages": [{"role": "robot", "content": "x"}]})]
    data.write_text("\n".join(lines) + "\n")
    rc = main(["sft", "--base", str(base_ckpt), "--out", str(tmp_path / "out"), "--data", str(data),
               "--sft.max_steps", "2", "--sft.safety_ratio", "0", "--sft.heldout", "0.2", "--sft.sample_tokens", "0"])
    assert rc == 0
    stats = read_json(tmp_path / "out" / "data" / "stats.json")
    assert stats["read_malformed"] == 2 and stats["read_conversations"] == 11
    capsys.readouterr()
    # the fine-tuned model answers a user message through the chat template
    assert main(["generate", str(tmp_path / "out"), "--chat", "--prompt", "Say yes.", "--json", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["prompt"] == "Say yes." and rec["model"].endswith("step_000002")
    assert main(["sft", "--base", str(base_ckpt), "--out", str(tmp_path / "o2"), "--sft.lr", "abc"]) == 2
    assert "sft.lr" in capsys.readouterr().err
