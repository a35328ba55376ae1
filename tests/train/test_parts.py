"""Schedules, optimizers, the token loader and checkpoint files (no full training runs)."""

import json

import numpy as np
import pytest
import torch

from lmforge.config import build
from lmforge.errors import ConfigError, InputError
from lmforge.model import Transformer, preset
from lmforge.train import checkpoint as ck
from lmforge.train.config import TrainConfig
from lmforge.train.data import BatchLoader, TokenStream, read_index, val_batches, write_token_shards
from lmforge.train.optim import Muon, build_optimizers, newton_schulz, param_groups
from lmforge.train.schedule import lr_factor


def test_wsd_schedule_warms_up_holds_and_decays_linearly():
    f = [lr_factor(s, 100, "wsd", warmup_steps=10, decay_frac=0.2, min_lr_frac=0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(v == 1.0 for v in f[10:80])
    decay = f[80:]
    assert all(a > b for a, b in zip(decay, decay[1:]))
    assert np.allclose(np.diff(decay), np.diff(decay)[0])  # linear
    assert f[-1] == pytest.approx(0.1)


def test_cosine_schedule_endpoints_and_monotone():
    f = [lr_factor(s, 50, "cosine", warmup_steps=5, min_lr_frac=0.0) for s in range(50)]
    assert f[4] == pytest.approx(1.0) and f[5] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[5:], f[6:]))
    assert f[-1] < 0.01
    assert lr_factor(30, 50, "constant", warmup_steps=5) == 1.0


def test_newton_schulz_orthogonalises_and_batches():
    g = torch.Generator().manual_seed(0)
    mats = torch.randn(3, 64, 24, generator=g)
    o = newton_schulz(mats, steps=5)
    sv = torch.linalg.svdvals(o)
    assert sv.min() > 0.5 and sv.max() < 1.3  # every singular value pushed towards 1
    single = newton_schulz(mats[1], steps=5)
    assert torch.allclose(single, o[1], atol=1e-5)


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = Transformer(preset("tiny", vocab_size=256, n_layers=2, d_model=64, n_heads=2, n_kv_heads=1))
    groups = param_groups(model)
    assert {n for n, _ in groups["embed"]} == {"tok_emb.weight"}  # tied head counted once
    assert all(p.dim() == 2 and n.startswith("layers.") for n, p in groups["matrix"])
    assert all(p.dim() == 1 for _, p in groups["vector"])
    cfg = build(TrainConfig, {"optimizer": "muon"}, "pretrain")
    muon, adam = build_optimizers(model, cfg)
    assert isinstance(muon, Muon) and isinstance(adam, torch.optim.AdamW)
    assert adam.defaults.get("fused") is True  # the fused kernel is used on CPU too
    n_opt = sum(p.numel() for o in (muon, adam) for g in o.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())
    # one step moves every parameter
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 256, (2, 17))
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    muon.step()
    adam.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    only_adam = build_optimizers(model, build(TrainConfig, {"optimizer": "adamw"}, "pretrain"))
    assert len(only_adam) == 1


def _shards(tmp_path, n_docs=40, doc_len=50, vocab=300):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(3, vocab, size=doc_len)) for _ in range(n_docs)]
    return write_token_shards(tmp_path / "tokens", {"train": docs, "val": docs[:5]}, vocab_size=vocab, shard_tokens=500)


def test_loader_resumes_exactly_and_slices_ranks(tmp_path):
    tokens = _shards(tmp_path)
    idx = read_index(tokens)
    assert len(idx.splits["train"]) > 1  # windows span shard boundaries
    stream = TokenStream(idx, "train")
    mk = lambda **kw: BatchLoader(stream, 16, 4, seed=3, bos_id=0, **kw)  # noqa: E731
    a = mk()
    for _ in range(7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))
    b = mk()
    b.load_state_dict(state)
    for _ in range(200):  # crosses several epoch boundaries
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x.x, y.x) and torch.equal(x.y, y.y) and torch.equal(x.doc_ids, y.doc_ids)
    assert a.epoch > 1
    # two data-parallel ranks of batch 2 see exactly the single-rank batch of 4, split in halves
    single = BatchLoader(stream, 16, 4, seed=3, bos_id=0).next_batch()
    r0 = BatchLoader(stream, 16, 2, seed=3, bos_id=0, dp_rank=0, dp_size=2).next_batch()
    r1 = BatchLoader(stream, 16, 2, seed=3, bos_id=0, dp_rank=1, dp_size=2).next_batch()
    assert torch.equal(torch.cat([r0.x, r1.x]), single.x)
    # targets are inputs shifted by one
    assert torch.equal(single.x[:, 1:], single.y[:, :-1])


def test_doc_ids_start_at_bos_and_separator_packing_has_none(tmp_path):
    tokens = _shards(tmp_path, doc_len=10)
    stream = TokenStream(read_index(tokens), "train")
    b = BatchLoader(stream, 32, 2, seed=0, bos_id=0).next_batch()
    for row_x, row_d in zip(b.x, b.doc_ids):
        starts = (row_x == 0).nonzero().flatten().tolist()
        assert torch.equal(row_d, torch.cumsum((row_x == 0).long(), 0))
        for s in starts:
            assert s == 0 or row_d[s] == row_d[s - 1] + 1
    assert BatchLoader(stream, 32, 2, seed=0, bos_id=0, packing="separator").next_batch().doc_ids is None
    vb = list(val_batches(TokenStream(read_index(tokens), "val"), 16, 1, 3, bos_id=0, packing="doc_mask"))
    vb2 = list(val_batches(TokenStream(read_index(tokens), "val"), 16, 1, 3, bos_id=0, packing="doc_mask"))
    assert len(vb) == 3 and all(torch.equal(a.x, b.x) for a, b in zip(vb, vb2))


def test_bad_shards_fail_with_clear_messages(tmp_path):
    tokens = _shards(tmp_path)
    first = tokens / "train" / "shard_00000.bin"
    data = first.read_bytes()
    first.write_bytes(data[:-10])
    with pytest.raises(InputError, match="truncated or corrupt"):
        TokenStream(read_index(tokens), "train")
    first.write_bytes(b"")
    with pytest.raises(InputError, match="is empty"):
        TokenStream(read_index(tokens), "train")
    first.write_bytes(data)
    with pytest.raises(InputError, match="fewer than one step"):
        BatchLoader(TokenStream(read_index(tokens), "val"), 64, 8, seed=0, bos_id=0)
    with pytest.raises(InputError, match="no token index"):
        read_index(tmp_path / "nowhere")


def test_config_rejects_bad_values_naming_the_key():
    with pytest.raises(ConfigError, match=r"pretrain\.optimizer.*choose one of"):
        build(TrainConfig, {"optimizer": "sgd"}, "pretrain")
    with pytest.raises(ConfigError, match=r"pretrain\.model\.widht"):
        build(TrainConfig, {"model": {"widht": 3}}, "pretrain")
    with pytest.raises(ConfigError, match="preset"):
        build(TrainConfig, {"model": {"preset": "huge"}}, "pretrain")
    with pytest.raises(ConfigError, match="longer than the model's context"):
        build(TrainConfig, {"seq_len": 512, "model": {"max_seq_len": 128}}, "pretrain").model_config(300)
    with pytest.raises(ConfigError, match="vocab_size"):
        build(TrainConfig, {"model": {"vocab_size": 128}}, "pretrain").model_config(300)
    mc = build(TrainConfig, {"seq_len": 64, "model": {"preset": "small", "d_model": 128, "n_heads": 4}}, "pretrain").model_config(300)
    assert mc.vocab_size == 320 and mc.max_seq_len == 64 and mc.d_model == 128 and mc.n_layers == 6
    with pytest.raises(ConfigError, match="warmup_steps"):
        build(TrainConfig, {"warmup_steps": -1}, "pretrain")


def test_checkpoint_checksums_detect_corruption_and_prune(tmp_path):
    model = Transformer(preset("tiny", vocab_size=128, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, max_seq_len=16))
    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(tmp_path, step, sd, model.cfg.to_dict(), [{"x": torch.ones(2)}], {"data": {}}, keep_last=2)
    assert [p.name for p in ck.list_checkpoints(tmp_path)] == ["step_000003", "step_000004"]
    assert (tmp_path / "latest").read_text().strip() == "step_000004"
    assert ck.verify(tmp_path / "step_000004") is None
    f = tmp_path / "step_000004" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert "checksum" in ck.verify(tmp_path / "step_000004")
    assert ck.find_resumable(tmp_path).name == "step_000003"
    from lmforge.model.io import load_model, resolve_model

    assert resolve_model(tmp_path).path.name == "step_000004"  # `latest` for inference

    m2 = load_model(tmp_path / "step_000003")
    assert torch.equal(m2.tok_emb.weight, model.tok_emb.weight)


def test_measuring_peak_flops_leaves_the_training_rng_alone():
    """MFU's CPU peak is measured after a resume restored the RNG: it must not draw from it (a
    model with dropout would then resume onto different random numbers)."""
    from lmforge.train.metrics import measure_matmul_flops

    state = torch.get_rng_state()
    assert measure_matmul_flops(n=64, seconds=0.01) > 0
    assert torch.equal(state, torch.get_rng_state())
