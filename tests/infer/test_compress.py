"""Compression (lmforge.infer.compress, `lmforge prune` / `lmforge lowrank`): magnitude pruning hits
its sparsity with torch's own pattern, structured pruning removes heads / channels that contribute
nothing without changing the outputs, low rank at energy 1 reproduces the logits, rank follows
the kept energy, checkpoints round-trip and corrupt ones are refused with one line."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as torch_prune

from lmforge.cli import main
from lmforge.errors import ConfigError, InputError
from lmforge.infer import compress as C
from lmforge.infer import load_model, load_model_and_tokenizer
from lmforge.infer.compress_commands import lowrank_checkpoint, prune_checkpoint
from lmforge.infer.engine import SamplingParams, generate
from lmforge.model import Transformer, preset
from lmforge.train.checkpoint import save_checkpoint
from tests.eval.conftest import train_tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = preset("tiny", **{"vocab_size": 512, "max_seq_len": 64, "d_model": 64, "n_layers": 2, **kw})
    return Transformer(cfg).eval()


def _x(seed=1, T=20):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 512, (2, T), generator=g)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A tiny random model saved as a training checkpoint with its tokenizer copy."""
    root = tmp_path_factory.mktemp("cmp")
    tok = train_tokenizer(root / "tok")
    m = _model(0)
    sd = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
    save_checkpoint(root / "ck", 10, sd, m.cfg.to_dict(), [], {"data": {}}, tokenizer_file=tok / "tokenizer.json")
    return root / "ck" / "step_000010"


# ---- magnitude ---------------------------------------------------------------------------------


def test_magnitude_hits_the_sparsity_with_torch_prunes_pattern():
    m = _model(0)
    ref = _model(0)
    stats = C.magnitude_prune(m, 0.5)
    assert stats["pruned_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert set(stats["modules"]) == {n for n, _ in C.block_linears(ref)} and len(stats["modules"]) == 2 * 7
    for name, frac in stats["modules"].items():
        assert frac == pytest.approx(0.5, abs=1e-3)
        lin = ref.get_submodule(name)
        torch_prune.l1_unstructured(lin, "weight", amount=0.5)
        assert torch.equal(m.get_submodule(name).weight, lin.weight)  # the same zeros, the same kept values
    # embedding (tied head) and norms untouched; the whole-model share is below the layers' share
    assert torch.equal(m.tok_emb.weight, _model(0).tok_emb.weight)
    assert 0 < stats["model_sparsity"] < 0.5


def test_two_four_pattern():
    m = _model(0)
    stats = C.magnitude_prune(m, pattern="2:4")
    for name, _ in C.block_linears(m):
        w = m.get_submodule(name).weight.reshape(-1, 4)
        assert torch.equal((w == 0).sum(1), torch.full((w.shape[0],), 2))
    assert stats["pruned_sparsity"] == pytest.approx(0.5)
    with pytest.raises(ConfigError):
        C.magnitude_prune(_model(0), 1.0)


# ---- structured ----------------------------------------------------------------------------------


def _silence_heads(m: Transformer, heads: list[int]):
    """Zero the output-projection columns of `heads` in every layer: they contribute nothing."""
    hd = m.cfg.head_dim
    with torch.no_grad():
        for layer in m.layers:
            for h in heads:
                layer.attn.wo.weight[:, h * hd : (h + 1) * hd] = 0


@pytest.mark.parametrize("n_kv,silent,keep,kv_after", [(4, [1, 3], 2, 2),   # multi-head: heads and their kv heads go
                                                       (2, [1, 3], 2, 2),   # GQA, one query head of each group
                                                       (2, [2, 3], 2, 1)])  # GQA, a whole group
def test_pruning_silent_heads_keeps_the_outputs(n_kv, silent, keep, kv_after):
    m = _model(0, n_kv_heads=n_kv)
    _silence_heads(m, silent)
    x = _x()
    calib = [list(range(1, 40)), list(range(100, 160))]
    for calib_seqs in (calib, None):  # measured and weight-only scores both find them
        heads, _ = C.importance(m, calib_seqs)
        assert (heads[:, silent] == 0).all() and (heads[:, [h for h in range(4) if h not in silent]] > 0).all()
        small, kept = C.prune_heads(m, keep, heads)
        assert small.cfg.n_heads == keep and small.cfg.n_kv_heads == kv_after and small.cfg.head_dim == 16
        assert all(v == [h for h in range(4) if h not in silent] for v in kept.values())
        assert small.layers[0].attn.wq.weight.shape == (keep * 16, 64)
        assert small.layers[0].attn.wo.weight.shape == (64, keep * 16)
        with torch.no_grad():
            torch.testing.assert_close(small(x)[0], m(x)[0], rtol=1e-5, atol=1e-5)
    assert C.count_parameters(small)[0] < C.count_parameters(m)[0]


def test_pruning_silent_mlp_channels_keeps_the_outputs():
    m = _model(0)
    H = m.cfg.ffn_hidden
    silent = torch.randperm(H, generator=torch.Generator().manual_seed(0))[: H // 2]
    with torch.no_grad():
        for layer in m.layers:
            layer.mlp.w2.weight[:, silent] = 0
    _, chans = C.importance(m, [list(range(5, 50))])
    small, hidden = C.prune_mlp(m, 0.5, chans)
    assert hidden == H // 2 and small.cfg.ffn_hidden == H // 2
    assert small.layers[1].mlp.w1.weight.shape == (H // 2, 64)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(small(x)[0], m(x)[0], rtol=1e-5, atol=1e-5)


def test_keep_heads_must_fit_the_groups():
    m = _model(0)  # 4 query heads in 2 kv groups
    with pytest.raises(ConfigError, match="choose one of"):
        C.prune_heads(m, 3, C.importance(m)[0])
    with pytest.raises(ConfigError):
        C.prune_heads(m, 5, C.importance(m)[0])


def test_head_dim_is_written_only_when_explicit():
    m = _model(0)
    assert "head_dim" not in m.cfg.to_dict()
    small, _ = C.prune_heads(m, 2, C.importance(m)[0])
    d = small.cfg.to_dict()
    assert d["head_dim"] == 16 and d["n_heads"] * d["head_dim"] != d["d_model"]


# ---- low rank -------------------------------------------------------------------------------------


def test_rank_follows_the_kept_energy():
    s = torch.tensor([3.0, 2.0, 1.0, 1.0])  # squared: 9, 4, 1, 1 of 15
    assert C.rank_for_energy(s, 0.5) == 1  # 9/15 = 0.6
    assert C.rank_for_energy(s, 0.6) == 1
    assert C.rank_for_energy(s, 0.61) == 2  # 13/15
    assert C.rank_for_energy(s, 0.9) == 3  # 14/15
    assert C.rank_for_energy(s, 1.0) == 4
    w = torch.randn(40, 8) @ torch.randn(8, 30)  # rank 8
    up, down, r, kept = C.factorize(w, 1.0)
    assert r == 8 and kept == pytest.approx(1.0)
    torch.testing.assert_close(up @ down, w, rtol=1e-4, atol=1e-4)


def test_lowrank_at_full_energy_reproduces_the_logits():
    m = _model(0)
    x = _x()
    with torch.no_grad():
        want = m(x)[0]
        layers = C.lowrank_model(m, 1.0, only_if_smaller=False)
    assert all(v["swapped"] for v in layers.values()) and len(C.lowrank_map(m)) == 14
    assert all(isinstance(m.get_submodule(n), C.LowRankLinear) for n in layers)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], want, rtol=1e-4, atol=1e-4)


def test_lowrank_swaps_only_where_it_saves_parameters():
    m = _model(0)
    with torch.no_grad():  # make one layer truly low rank: the others (random) are full rank
        m.layers[0].mlp.w1.weight.copy_(torch.randn(m.cfg.ffn_hidden, 4) @ torch.randn(4, 64) * 0.02)
    layers = C.lowrank_model(m, 0.999)
    swapped = [n for n, v in layers.items() if v["swapped"]]
    assert swapped == ["layers.0.mlp.w1"] and layers["layers.0.mlp.w1"]["rank"] == 4
    for n, v in layers.items():
        assert v["swapped"] == (v["rank"] * (v["in"] + v["out"]) < v["in"] * v["out"])
    with pytest.raises(InputError, match="dense"):
        C.lowrank_model(m, 0.9)  # already factorised


# ---- checkpoints and the commands ------------------------------------------------------------------


def test_prune_commands_write_loadable_checkpoints(dense, tmp_path):
    for method, kw in (("magnitude", {"sparsity": 0.5}), ("heads", {"keep_heads": 2}), ("mlp", {"keep_ratio": 0.5})):
        out = tmp_path / method
        r = prune_checkpoint(dense, out, method, **kw)
        assert sorted(p.name for p in out.iterdir()) == ["compress_report.json", "config.json", "model.safetensors",
                                                          "state.json", "tokenizer.json"]
        state = json.loads((out / "state.json").read_text())
        assert state["compression"]["method"] == method and set(state["checksums"]) == {"model.safetensors", "config.json",
                                                                                        "tokenizer.json"}
        model, tok, _ = load_model_and_tokenizer(out)
        assert r["compressed"]["params"] == C.count_parameters(model)[0]
        assert r["dense"]["bpb"] > 0 and r["compressed"]["bpb"] > 0 and r["compressed"]["decode_tok_s"] > 0
        if method == "magnitude":
            assert r["pruned_sparsity"] == pytest.approx(0.5, abs=1e-6) and r["file_ratio"] == 1.0
            assert C.zero_fraction(model) == pytest.approx(r["model_sparsity"])
        else:
            assert r["param_ratio"] < 1.0 and r["file_ratio"] < 1.0
        out_ids = generate(model, [[tok.bos_id] + tok.encode("A word")], SamplingParams(max_new_tokens=4, temperature=0.0))
        assert len(out_ids[0].token_ids) >= 1
    assert json.loads((tmp_path / "heads" / "config.json").read_text())["n_heads"] == 2


def test_lowrank_checkpoint_round_trip_and_corruption(dense, tmp_path):
    out = tmp_path / "lr"
    r = lowrank_checkpoint(dense, out, 0.5)
    state = json.loads((out / "state.json").read_text())
    assert state["lowrank"]["ranks"] and r["swapped"] == len(state["lowrank"]["ranks"])
    model, _ = load_model(out)
    assert C.lowrank_map(model) == state["lowrank"]["ranks"]
    # the saved model is the one measured: the loaded copy gives the same held-out loss
    from lmforge.infer.quantize_cmd import heldout_metrics, heldout_sequences
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_file(out / "tokenizer.json")
    _, seqs, nbytes = heldout_sequences(out, tok, model.cfg.max_seq_len)
    assert heldout_metrics(model, seqs, nbytes)["bpb"] == pytest.approx(r["compressed"]["bpb"], rel=1e-5)

    # corrupt weights -> checksum refusal; a bad rank map -> one line naming state.json
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in out.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="checksum"):
        load_model(bad)
    with pytest.raises(InputError, match="cannot read"):
        load_model(bad, verify=False)
    st = json.loads((out / "state.json").read_text())
    st["lowrank"]["ranks"] = {"layers.9.attn.wq": 3}
    (bad / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    (bad / "state.json").write_text(json.dumps(st))
    with pytest.raises(InputError, match="does not exist"):
        load_model(bad)
    # refused as input to further compression
    with pytest.raises(InputError, match="dense model"):
        prune_checkpoint(out, tmp_path / "x", "mlp", keep_ratio=0.5)


def test_cli_bad_input_is_one_line(dense, tmp_path, capsys):
    cases = [["prune", str(dense), "--out", str(tmp_path / "a"), "--method", "random"],
             ["prune", str(dense), "--out", str(tmp_path / "a"), "--method", "heads"],
             ["prune", str(dense), "--out", str(tmp_path / "a"), "--method", "heads", "--keep-heads", "3"],
             ["prune", str(dense), "--out", str(tmp_path / "a"), "--method", "magnitude", "--sparsity", "1.2"],
             ["prune", str(tmp_path / "nope"), "--out", str(tmp_path / "a"), "--method", "mlp", "--keep-ratio", "0.5"],
             ["prune", str(dense), "--out", str(dense), "--method", "mlp", "--keep-ratio", "0.5"],
             ["lowrank", str(dense), "--out", str(tmp_path / "b"), "--energy", "1.5"]]
    for argv in cases:
        capsys.readouterr()
        assert main(argv) != 0, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("lmforge: error:") and "\n" not in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_prune_prints_the_table(dense, tmp_path, capsys):
    assert main(["prune", str(dense), "--out", str(tmp_path / "m"), "--method", "mlp", "--keep-ratio", "0.25",
                 "--score", "weight"]) == 0
    out = capsys.readouterr().out
    for row in ("parameters", "model.safetensors MB", "held-out bpb", "decode tok/s"):
        assert row in out
    assert json.loads((tmp_path / "m" / "compress_report.json").read_text())["ffn_after"] == round(0.25 * 192)


def test_non_linear_modules_are_left_alone():
    m = _model(0)
    assert all(type(mod) is nn.Linear for _, mod in C.block_linears(m))
    assert "lm_head" not in dict(C.block_linears(m)) and "tok_emb" not in dict(C.block_linears(m))


def test_head_pruned_model_exports_to_hf_and_back(tmp_path):
    from lmforge.model.hf import export_hf, load_hf
    from lmforge.model.io import save_model

    m = _model(0)
    small, _ = C.prune_heads(m, 2, C.importance(m)[0])
    save_model(small, tmp_path / "small")
    export_hf(tmp_path / "small", tmp_path / "hf")
    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_cfg["head_dim"] == 16 and hf_cfg["num_attention_heads"] == 2 and hf_cfg["hidden_size"] == 64
    back = load_hf(tmp_path / "hf").eval()
    assert back.cfg.head_dim == 16 and back.cfg.n_heads == 2
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], small(x)[0])


def test_lowrank_checkpoint_exports_dense_and_refuses_quantization(dense, tmp_path, capsys):
    out = tmp_path / "lr"
    lowrank_checkpoint(dense, out, 0.5)
    lowrank, _ = load_model(out)
    x = _x()
    with torch.no_grad():
        want = lowrank(x)[0]
        dense_copy, _ = load_model(out)
        names = C.densify_lowrank(dense_copy)
        assert names and not C.lowrank_map(dense_copy) and all(type(dense_copy.get_submodule(n)) is nn.Linear for n in names)
        torch.testing.assert_close(dense_copy(x)[0], want, rtol=1e-4, atol=1e-4)
    # GGUF and HF exports write the dense equivalent (with a note), read back to the same logits
    from lmforge.infer.gguf import load_gguf_model
    from lmforge.model.hf import load_hf

    assert main(["export", "gguf", str(out), str(tmp_path / "lr.gguf")]) == 0
    assert "low-rank checkpoint" in capsys.readouterr().out
    back = load_gguf_model(tmp_path / "lr.gguf")
    assert main(["export", "hf", str(out), str(tmp_path / "hf")]) == 0
    hf = load_hf(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x)[0], want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hf(x)[0], want, rtol=1e-4, atol=1e-4)
    # quantizing the factorised layers is not supported: one line, nothing written
    capsys.readouterr()
    assert main(["quantize", str(out), "--method", "int8", "--out", str(tmp_path / "q")]) != 0
    err = capsys.readouterr().err.strip()
    assert "low-rank checkpoint" in err and "\n" not in err and not (tmp_path / "q").exists()
