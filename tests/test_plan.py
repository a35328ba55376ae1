"""`lmforge plan`: parameter counts of known shapes, Chinchilla tokens, GPU-hours arithmetic."""

import pytest

from lmforge.cli import main
from lmforge.model.config import preset
from lmforge.plan.memory import plan


def test_known_shapes_match_published_parameter_counts():
    assert preset("7b").num_params() == pytest.approx(6.74e9, rel=0.002)  # Llama-2-7B: 6,738,415,616
    assert preset("1b").num_params() == pytest.approx(1.236e9, rel=0.002)  # Llama-3.2-1B
    assert preset("124m").num_params() == pytest.approx(124e6, rel=0.01)


def test_plan_arithmetic():
    cfg = preset("7b")
    p = plan(cfg, tokens=2e12, gpu="a100", gpus=1, mfu=0.5, fsdp=False)
    assert p.chinchilla_tokens == pytest.approx(20 * cfg.num_params())
    assert p.train_flops == pytest.approx(cfg.flops_per_token() * 2e12)
    assert p.gpu_hours == pytest.approx(p.train_flops / (312e12 * 0.5) / 3600)
    assert p.train_state_gib == pytest.approx(cfg.num_params() * 16 / 1024**3)
    assert p.inference["int4"]["weights_gib"] == pytest.approx(p.inference["bf16"]["weights_gib"] / 4)
    co = plan(cfg, compute_budget=1e21).compute_optimal
    assert 6 * co["n_opt"] * co["d_opt"] == pytest.approx(1e21)


def test_plan_cli(capsys):
    assert main(["plan", "--model", "tiny", "--set", "n_layers=8"]) == 0
    assert "GPU-hours" in capsys.readouterr().out
    assert main(["plan", "--model", "tiny", "--set", "n_layer=8"]) == 2
    assert "unknown model field 'n_layer'" in capsys.readouterr().err
