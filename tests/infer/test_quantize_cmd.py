"""`lmforge quantize`: a quantized checkpoint directory that load_model_and_tokenizer, generate and
eval accept, verified like any checkpoint, with a dense-vs-quantized report."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.cli import main
from lmforge.errors import InputError
from lmforge.infer import load_model, load_model_and_tokenizer
from lmforge.infer.engine import SamplingParams, generate
from lmforge.infer.quantize import QuantizedLinear, quantize_model
from lmforge.infer.quantize_cmd import quantize_checkpoint
from lmforge.model.io import load_checkpoint, save_model
from lmforge.train.checkpoint import save_checkpoint
from tests.eval.conftest import make_model, train_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A tiny random model saved as a training checkpoint (with its tokenizer copy)."""
    root = tmp_path_factory.mktemp("q")
    tok = train_tokenizer(root / "tok")
    m = make_model(0)
    sd = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
    save_checkpoint(root / "ck", 10, sd, m.cfg.to_dict(), [], {"data": {}}, tokenizer_file=tok / "tokenizer.json")
    return root / "ck" / "step_000010"


@pytest.fixture(scope="module", params=["int8", "int4", "nf4", "gptq-int4"])
def quantized(request, dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / request.param
    report = quantize_checkpoint(dense, request.param, out, group_size=32, samples=4)
    return request.param, out, report


@pytest.fixture
def exact_kernels(monkeypatch):
    """Int8 / int4 decode calls through the dequantized weights (no bf16 kernel): the quantized model
    then computes exactly what a dense model holding the dequantized weights computes."""
    from lmforge.infer.quantize import Int4Linear, Int8Linear

    monkeypatch.setattr(Int8Linear, "kernel_rows", 0)
    monkeypatch.setattr(Int4Linear, "kernel_rows", 0)


def _greedy(model, prompt, n=12):
    return generate(model, [prompt], SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=()))[0].token_ids


def test_quantized_dir_loads_and_decodes_like_the_dequantized_model(dense, quantized, exact_kernels):
    method, out, _ = quantized
    kind = method.removeprefix("gptq-")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "model.safetensors", "quantize_report.json", "state.json", "tokenizer.json"]
    state = json.loads((out / "state.json").read_text())
    assert state["quantization"]["kind"] == kind and state["quantization"]["method"] == method
    assert state["source"] == str(dense)
    assert set(state["checksums"]) == {"model.safetensors", "config.json", "tokenizer.json"}

    model, tok, ref = load_model_and_tokenizer(out)
    qmods = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert set(qmods) == set(state["quantization"]["map"]) and all(m.kind == kind for m in qmods.values())
    assert "lm_head" not in qmods and ref.path == out

    # the reference: the dense model with every quantized weight replaced by its dequantized value
    ref_model, _ = load_checkpoint(dense)
    with torch.no_grad():
        for name, m in qmods.items():
            ref_model.get_submodule(name).weight.copy_(m.dequantize(torch.float32))
    prompt = [tok.bos_id] + tok.encode("A word")
    x = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], ref_model(x)[0], rtol=1e-4, atol=1e-4)
    assert _greedy(model, prompt) == _greedy(ref_model, prompt)

    # and the fresh in-memory quantization of the dense model gives the same tokens as the loaded copy
    if method == kind:
        fresh, _ = load_checkpoint(dense)
        quantize_model(fresh, kind, group_size=32)
        assert _greedy(fresh, prompt) == _greedy(model, prompt)


def test_report_fields(quantized):
    kind, out, report = quantized
    on_disk = json.loads((out / "quantize_report.json").read_text())
    if kind.startswith("gptq-"):
        c = on_disk["calibration"]
        assert c["sequences"] == 4 and c["tokens"] > 0 and "does not hold out" in c["source"]
        assert 0 < c["output_error_vs_rtn"] < 1  # GPTQ's layer outputs on the calibration text beat rounding
        assert on_disk["round_to_nearest"]["bpb"] > 0
    assert on_disk["group_size"] == (32 if "int4" in kind else None)
    assert on_disk == json.loads(json.dumps(report))
    for side in ("dense", "quantized"):
        r = on_disk[side]
        assert set(r) >= {"weight_bytes", "bpb", "ppl", "loss", "decode_tok_s"}
        assert r["weight_bytes"] > 0 and r["bpb"] > 0 and r["ppl"] > 1 and r["decode_tok_s"] > 0
    assert on_disk["kind"] == kind and on_disk["quantized_modules"] == 14  # 2 layers x 7 linear layers
    assert on_disk["quantized"]["weight_bytes"] < on_disk["dense"]["weight_bytes"]
    assert on_disk["held_out"]["sequences"] > 0 and on_disk["held_out"]["tokens"] > 0
    assert "dictionary" in on_disk["held_out"]["source"]  # no run around the checkpoint: the bundled sample
    assert abs(on_disk["bpb_change"]) < 0.5  # a random tiny model: quantization barely moves its loss


def test_generate_cli_and_eval_on_a_quantized_dir(quantized, capsys, tmp_path):
    from lmforge.eval.harness import build_tasks, evaluate_checkpoints, load_tok

    _, out, _ = quantized
    assert main(["generate", str(out), "--prompt", "A word", "--temperature", "0", "--max-new-tokens", "5", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["model"] == str(out) and row["finish_reason"] in ("length", "stop")

    tasks = build_tasks(["perplexity"], docs_per_source=2)
    summary = evaluate_checkpoints([("q", out)], load_tok(out), tasks, tmp_path / "eval", device="cpu", bootstrap=10)
    assert summary["q"]["perplexity"]["metrics"]["bpb"] > 0


def test_corrupt_byte_and_plain_reader_are_refused(quantized, tmp_path, capsys):
    import shutil

    kind, out, _ = quantized
    with pytest.raises(InputError, match="quantized checkpoint .*lmforge.infer.load_model_and_tokenizer"):
        load_checkpoint(out)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    blob = bytearray((bad / "model.safetensors").read_bytes())
    blob[-5] ^= 0x01
    (bad / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(InputError, match="does not match its checksum"):
        load_model(bad)
    assert main(["generate", str(bad), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checksum" in err[0]


def test_bad_kind_and_requantizing_are_one_line_errors(dense, quantized, tmp_path, capsys):
    assert main(["quantize", str(dense), "--kind", "int3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "int3" in err[0] and "int8" in err[0]
    assert main(["quantize", str(dense), "--method", "int4", "--group-size", "48", "--out", str(tmp_path / "o")]) == 2
    assert "group-size 48" in capsys.readouterr().err
    # d_model 64 is not a multiple of 128: one line naming the layer
    assert main(["quantize", str(dense), "--method", "int4", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a multiple of 128" in err[0]
    assert main(["quantize", str(dense), "--method", "gptq-int4", "--group-size", "32", "--calibration",
                 str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    _, out, _ = quantized
    assert main(["quantize", str(out), "--kind", "int8", "--out", str(tmp_path / "o")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_cli_prints_table_and_uses_run_val_tokens(tmp_path, capsys):
    """Inside a run with tokens/val, the held-out text is the run's val split."""
    from lmforge.train.data import write_token_shards

    run = tmp_path / "run"
    tok = train_tokenizer(run / "tokenizer")
    save_model(make_model(1, tie_embeddings=False), run / "checkpoints" / "tiny" / "step_000005")
    from lmforge.tokenizer import Tokenizer

    t = Tokenizer.from_file(tok)
    ids = [t.encode(f"entry {i}: a short definition of a word") for i in range(40)]
    write_token_shards(run / "tokens", {"train": ids[:30], "val": ids[30:]}, vocab_size=512, bos_id=0, eos_id=1)
    out = tmp_path / "q"
    assert main(["quantize", str(run), "--kind", "int8", "--out", str(out), "--include-head"]) == 0
    printed = capsys.readouterr().out
    assert "weight MB" in printed and "decode tok/s" in printed and "held-out bpb" in printed
    report = json.loads((out / "quantize_report.json").read_text())
    assert "val" in report["held_out"]["source"] and report["include_head"]
    assert report["quantized_modules"] == 15  # the untied head too
    model, _, _ = load_model_and_tokenizer(out)
    assert isinstance(model.lm_head, QuantizedLinear)


def test_gptq_cli_with_a_calibration_file_and_act_order(dense, tmp_path, capsys):
    text = tmp_path / "calib.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"Entry {i}: the meaning of a word, with a short example."})
                              for i in range(60)) + "\nnot json\n")
    out = tmp_path / "g8"
    assert main(["quantize", str(dense), "--method", "gptq-int8", "--calibration", str(text), "--samples", "3",
                 "--act-order", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "calibration: file" in printed and "act order" in printed and "GPTQ minus RTN" in printed
    report = json.loads((out / "quantize_report.json").read_text())
    assert report["calibration"]["sequences"] <= 3 and report["calibration"]["act_order"]
    model, tok, _ = load_model_and_tokenizer(out)
    assert {m.kind for m in model.modules() if isinstance(m, QuantizedLinear)} == {"int8"}
    assert len(_greedy(model, [tok.bos_id] + tok.encode("A word"), 4)) == 4
