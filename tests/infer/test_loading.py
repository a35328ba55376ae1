"""The checkpoint reader behind every consumer: what a user points at -> a verified model and its
tokenizer, and `lmforge generate` / `lmforge export` on top of it."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import InputError
from lmforge.model.io import load_checkpoint, resolve_model, save_model
from lmforge.train.checkpoint import save_checkpoint
from tests.eval.conftest import make_model, train_tokenizer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """runs/demo laid out as the recipe writes it: recipe.toml, tokenizer/, checkpoints/tiny/step_N + latest."""
    rd = tmp_path_factory.mktemp("runs") / "demo"
    tok = train_tokenizer(rd / "tokenizer")
    (rd / "recipe.toml").write_text('[run]\nname = "demo"\nstages = ["data", "tokenizer", "pretrain", "eval"]\n')
    for step, seed in ((200, 0), (300, 1)):
        m = make_model(seed)
        sd = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
        save_checkpoint(rd / "checkpoints" / "tiny", step, sd, m.cfg.to_dict(), [], {"data": {}}, keep_last=3,
                        tokenizer_file=tok / "tokenizer.json")
    return rd


def test_resolve_everything_a_user_points_at(run_dir, tmp_path):
    ck = run_dir / "checkpoints" / "tiny"
    for p in (run_dir, run_dir / "checkpoints", ck, ck / "latest", ck / "step_000300"):
        ref = resolve_model(p)
        assert ref.path == ck / "step_000300" and ref.kind == "lmforge" and ref.step == 300, p
        assert ref.tokenizer == ck / "step_000300" / "tokenizer.json" and ref.stage == "checkpoints"
    assert resolve_model(ck / "step_000200").step == 200
    save_model(make_model(2), tmp_path / "plain")
    ref = resolve_model(tmp_path / "plain")
    assert ref.path == tmp_path / "plain" and ref.step is None
    with pytest.raises(InputError, match="not found"):
        resolve_model(tmp_path / "nope")
    with pytest.raises(InputError, match="no checkpoint"):
        resolve_model(tmp_path / "plain" / "..")  # a folder holding models, but none directly or via latest


def test_run_prefers_the_last_model_producing_stage(run_dir, tmp_path):
    import shutil

    rd = tmp_path / "run"
    shutil.copytree(run_dir, rd)
    sft = rd / "sft"
    save_checkpoint(sft, 5, {k: v for k, v in make_model(3).state_dict().items() if k != "lm_head.weight"},
                    make_model(3).cfg.to_dict(), [], {}, tokenizer_file=rd / "tokenizer" / "tokenizer.json")
    assert resolve_model(rd).path == rd / "checkpoints" / "tiny" / "step_000300"  # recipe: pretrain is the last model stage
    (rd / "recipe.toml").write_text('[run]\nname = "demo"\nstages = ["pretrain", "sft"]\n')
    assert resolve_model(rd).stage == "sft" and resolve_model(rd).path == sft / "step_000005"
    (rd / "recipe.toml").unlink()  # no recipe: rl, dpo, sft, checkpoints
    assert resolve_model(rd).stage == "sft"


def test_load_checkpoint_verifies_checksums(run_dir, tmp_path):
    import shutil

    model, ref = load_checkpoint(run_dir, dtype=torch.bfloat16)
    assert not model.training and model.tok_emb.weight.dtype == torch.bfloat16
    ref_model = make_model(1)
    assert torch.equal(model.tok_emb.weight.float(), ref_model.tok_emb.weight.to(torch.bfloat16).float())
    rd = tmp_path / "demo"
    shutil.copytree(run_dir, rd)
    f = rd / "checkpoints" / "tiny" / "step_000300" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 1  # one flipped bit in a weight: still a valid safetensors file
    f.write_bytes(bytes(data))
    with pytest.raises(InputError, match="model.safetensors does not match its checksum in state.json"):
        load_checkpoint(rd)
    model, _ = load_checkpoint(rd, verify=False)  # loads when asked not to check


def test_generate_cli_on_a_run_dir_and_a_corrupt_checkpoint(run_dir, tmp_path, capsys):
    import shutil

    assert main(["generate", str(run_dir), "--prompt", "The", "--max-new-tokens", "4", "--json", "--seed", "1"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["prompt"] == "The" and isinstance(line["completion"], str) and line["model"].endswith("step_000300")
    assert main(["generate", str(run_dir / "checkpoints" / "tiny" / "latest"), "--prompt", "A", "--prompt", "B",
                 "--temperature", "0", "--max-new-tokens", "3"]) == 0
    eager = capsys.readouterr().out.strip().splitlines()
    assert len(eager) == 2
    assert main(["generate", str(run_dir / "checkpoints" / "tiny" / "latest"), "--prompt", "A", "--prompt", "B",
                 "--temperature", "0", "--max-new-tokens", "3", "--compile"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == eager  # the compiled decode step: the same text
    rd = tmp_path / "demo"
    shutil.copytree(run_dir, rd)
    f = rd / "checkpoints" / "tiny" / "step_000300" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 1
    f.write_bytes(bytes(data))
    assert main(["generate", str(rd), "--prompt", "The"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.endswith(f"{f} does not match its checksum in state.json (corrupt or modified)")


def test_export_cli_takes_a_run_dir_and_its_export_loads_back(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "hf", str(run_dir), str(out)]) == 0
    assert (out / "tokenizer.json").is_file() and json.loads((out / "config.json").read_text())["model_type"] == "llama"
    a, ref_a = load_checkpoint(run_dir)
    b, ref_b = load_checkpoint(out)
    assert ref_b.kind == "hf" and ref_b.tokenizer == out / "tokenizer.json"
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(a(x)[0], b(x)[0])
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "The", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The")
