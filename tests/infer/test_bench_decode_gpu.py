"""benchmarks/bench_decode_gpu.py: without CUDA it skips with a message; `--smoke` runs the same code
path (model build in bf16 on the device, int8 / int4 swaps, the engine's generate, the HF model built
from our weights, bandwidth and bytes-per-token accounting) on CPU at a tiny shape."""

import importlib.util
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_decode_gpu.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_decode_gpu", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_without_cuda_it_skips_with_a_message(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the full benchmark would run")
    assert _bench().run([]) == {"skipped": "no CUDA"}
    assert "no CUDA device" in capsys.readouterr().out


def test_smoke_mode_runs_every_variant_and_the_hf_side(capsys):
    pytest.importorskip("transformers")
    # eager decode here to keep the test short; the compiled step is tested in test_engine.py
    res = _bench().run(["--smoke", "--new-tokens", "3", "--repeats", "1", "--no-compile"])
    out = capsys.readouterr().out
    assert set(res["variants"]) == {"bf16", "int8", "int4"}
    v = res["variants"]
    assert all(r["tok_s"] > 0 and 0 < r["fraction"] for r in v.values())
    # stored bytes per token: int8 about half of bf16, int4 about a quarter
    assert v["int8"]["bytes_per_token"] < 0.6 * v["bf16"]["bytes_per_token"]
    assert v["int4"]["bytes_per_token"] < 0.35 * v["bf16"]["bytes_per_token"]
    assert set(res["hf"]) == {"dynamic", "static"} and all(t > 0 for t in res["hf"].values())
    assert all(res["hf_same_tokens"].values())  # HF on our weights: the same greedy tokens
    assert "ours/HF" in out and "% of measured bandwidth" in out
