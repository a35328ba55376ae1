"""The transformer: document masking, KV cache, GQA, MoE, QK-norm, save/load, context errors."""

import pytest
import torch

from lmforge.model import ModelConfig, Transformer, preset
from lmforge.model.io import load_model, save_model


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=256, max_seq_len=64, **kw))


def test_document_mask_isolates_packed_documents():
    m = _model()
    x = torch.randint(0, 256, (2, 40))
    doc = torch.tensor([[0] * 15 + [1] * 25] * 2)
    packed, _ = m(x, doc_ids=doc)
    alone, _ = m(x[:, 15:])
    assert torch.allclose(packed[:, 15:], alone, atol=1e-5)


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True}, {"n_kv_heads": 1}, {"moe_experts": 4, "moe_top_k": 2}])
def test_kv_cache_matches_full_forward(kw):
    m = _model(**kw).eval()
    x = torch.randint(0, 256, (3, 24))
    full, _ = m(x)
    m.setup_cache(3, 32)
    a, _ = m(x[:, :16], pos=0)
    b, _ = m(x[:, 16:], pos=16)
    m.clear_cache()
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-4)


def test_greedy_generate_is_deterministic_and_respects_context():
    from lmforge.infer.engine import SamplingParams, generate

    m = _model()
    x = torch.randint(0, 256, (5,)).tolist()
    a = generate(m, [x], SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[]))[0]
    b = generate(m, [x], SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[]))[0]
    assert a.token_ids == b.token_ids and len(a.token_ids) == 20
    c = generate(m, [x], SamplingParams(max_new_tokens=500, temperature=0, stop_token_ids=[]))[0]
    assert len(x) + len(c.token_ids) == 64 and c.finish_reason == "context"  # capped at max_seq_len, and said so


def test_loss_and_gradients_flow_moe_aux():
    m = _model(moe_experts=4, moe_top_k=2)
    x = torch.randint(0, 256, (2, 32))
    _, loss = m(x[:, :-1], x[:, 1:])
    assert loss.item() == pytest.approx(torch.log(torch.tensor(256.0)).item(), rel=0.15)
    loss.backward()
    assert m.layers[0].mlp.router.weight.grad is not None  # router learns through the aux loss and gates
    assert all(p.grad is not None for p in m.parameters())


def test_sequence_longer_than_context_is_a_clear_error():
    m = _model()
    with pytest.raises(ValueError, match="longer than the model's context"):
        m(torch.zeros(1, 65, dtype=torch.long))


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        Transformer(ModelConfig(d_model=100, n_heads=3))
    with pytest.raises(ValueError, match="n_kv_heads"):
        Transformer(ModelConfig(n_heads=4, n_kv_heads=3))


def test_save_load_round_trip(tmp_path):
    m = _model(tie_embeddings=False)
    save_model(m, tmp_path / "m")
    m2 = load_model(tmp_path / "m")
    x = torch.randint(0, 256, (1, 10))
    assert torch.equal(m(x)[0], m2(x)[0])
    m3 = _model()
    save_model(m3, tmp_path / "tied")
    assert torch.equal(load_model(tmp_path / "tied")(x)[0], m3(x)[0])


def test_param_count_matches_module():
    for name in ["tiny", "tiny-moe"]:
        cfg = preset(name)
        assert cfg.num_params() == sum(p.numel() for p in Transformer(cfg).parameters())
