"""Medusa heads: decoding with them gives the model's own greedy output (trained or not), samples
follow the model's distribution; training on the frozen model lowers the heads' loss and raises
their agreement with the model, resumes to the same heads; save/load round trip, a corrupt file
refused with one line; the `lmforge medusa` and `generate --medusa` commands."""

import itertools
import json
import shutil

import pytest
import torch
from scipy.stats import chisquare

from lmforge.errors import InputError
from lmforge.infer.engine import SamplingParams, generate, process_logits
from lmforge.infer.medusa import MedusaConfig, MedusaHeads, load_heads, medusa_generate, save_heads
from lmforge.model.io import save_model
from tests.conftest import SAMPLE
from tests.infer.spec_helpers import real_prompts, sample_texts, tiny_model, train_tokenizer

GCIDE = SAMPLE / "dictionary" / "gcide-sample.jsonl.gz"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("medusa_tok"))


@pytest.fixture(scope="module")
def prompts(tok):
    return real_prompts(tok, sample_texts(), n=5)


def _model():
    return tiny_model(512, init_std=0.1, tie_embeddings=False).eval()


def _random_heads(model, k=3, seed=0, own_head=False):
    torch.manual_seed(seed)
    h = MedusaHeads(MedusaConfig.for_model(model, heads=k, own_head=own_head)).init_from(model)
    with torch.no_grad():
        for p in h.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return h.eval()


def _save(model, tok, path):
    save_model(model, path)
    shutil.copyfile(tok.path, path / "tokenizer.json")
    return path


def test_medusa_greedy_equals_the_model_greedy(tok, prompts):
    m = _model()
    params = SamplingParams(max_new_tokens=30, temperature=0)
    ref = generate(m, prompts, params, tokenizer=tok)
    for heads in (_random_heads(m), _random_heads(m, k=5, own_head=True)):
        for k in (1, heads.cfg.heads):
            outs, st = medusa_generate(m, heads, prompts, params, tokenizer=tok, k=k)
            assert [o.token_ids for o in outs] == [o.token_ids for o in ref]
            assert [o.finish_reason for o in outs] == [o.finish_reason for o in ref]
            assert st.draft_forwards == 0 and st.proposed <= k * st.steps and st.tokens_per_step >= 1


def test_medusa_sampling_follows_the_model_distribution():
    V = 3
    m = tiny_model(V, seed=0, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, init_std=0.6, tie_embeddings=False).eval()
    heads = _random_heads(m, k=2, seed=1)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    params = SamplingParams(max_new_tokens=3, temperature=1.0, n=600, seed=5, stop_token_ids=[])
    prompt = [1, 2]
    outs, st = medusa_generate(m, heads, [prompt], params)
    assert 0.05 < st.acceptance_rate < 0.95
    counts: dict = {}
    for o in outs:
        counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
    exact = {}
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=3):
            ids, prob = list(prompt), 1.0
            for t in seq:
                prob *= float(process_logits(m(torch.tensor([ids]))[0][:, -1], params, None).softmax(-1)[0, t])
                ids.append(t)
            exact[seq] = prob
    cells = sorted(exact, key=exact.get, reverse=True)
    big = [c for c in cells if exact[c] * params.n >= 5]
    small = [c for c in cells if c not in big]
    obs = [counts.get(c, 0) for c in big] + [sum(counts.get(c, 0) for c in small)]
    exp = [exact[c] * params.n for c in big] + [sum(exact[c] for c in small) * params.n]
    exp = [e * sum(obs) / sum(exp) for e in exp]
    assert chisquare(obs, exp).pvalue > 1e-3


def test_heads_save_load_round_trip_and_corruption(tmp_path):
    m = _model()
    heads = _random_heads(m, own_head=True)
    d = save_heads(heads, tmp_path / "h", base={"path": "x"})
    back = load_heads(d, m)
    for (k1, v1), (k2, v2) in zip(heads.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    # a flipped byte in the weights: refused by the checksum
    raw = bytearray((d / "medusa.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (d / "medusa.safetensors").write_bytes(bytes(raw))
    with pytest.raises(InputError, match="checksum mismatch"):
        load_heads(d, m)
    # broken json, a foreign directory, heads for another model
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "medusa.json").write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        load_heads(tmp_path / "j")
    with pytest.raises(InputError, match="holds no Medusa heads"):
        load_heads(tmp_path)
    d2 = save_heads(heads, tmp_path / "h2")
    with pytest.raises(InputError, match="hidden size"):
        load_heads(d2, tiny_model(512, d_model=32, n_heads=2, n_kv_heads=1))


def _train(tmp_path, tok, steps, name="out", **over):
    from lmforge import config as cfgmod
    from lmforge.posttrain.medusa import MedusaTrainConfig, run_medusa

    base = tmp_path / "base"
    if not base.exists():
        _save(_model(), tok, base)
    section = dict(max_steps=steps, seq_len=64, batch_size=4, max_tokens=40_000, lr=1e-2, warmup_steps=2, eval_every=0,
                   eval_batches=2, log_every=1, checkpoint_every=5, own_head=True, schedule="constant")
    section.update(over)
    cfg = cfgmod.build(MedusaTrainConfig, section, "medusa")
    return run_medusa(cfg, tmp_path / name, base=base, data=[GCIDE], seed=3)


def test_training_lowers_the_loss_and_resumes_exactly(tmp_path, tok, prompts):
    res = _train(tmp_path, tok, 12)
    recs = [json.loads(x) for x in (res.out_dir / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    first, last = train[0], train[-1]
    assert last["loss"] < first["loss"] - 0.5
    assert last["head1_acc"] > first["head1_acc"]
    assert res.eval and all(0 <= v <= 1 for v in res.eval.values())
    meta = json.loads((res.out_dir / "medusa.json").read_text())
    assert meta["train"]["steps"] == 12 and meta["base"]["path"].endswith("base")
    heads = load_heads(res.out_dir, _model())
    assert res.data["train_tokens"] > 10_000 and res.data["docs"] > 0
    # a run stopped at step 5 and resumed to 12 ends with the same heads as the uninterrupted one
    _train(tmp_path, tok, 5, name="resumed")
    res2 = _train(tmp_path, tok, 12, name="resumed")
    assert res2.resumed_from == 5
    again = load_heads(res2.out_dir, _model())
    for v1, v2 in zip(heads.state_dict().values(), again.state_dict().values()):
        assert torch.equal(v1, v2)


def test_medusa_cli_and_generate(tmp_path, tok, capsys):
    from lmforge.cli import main

    base = _save(_model(), tok, tmp_path / "base")
    out = tmp_path / "heads"
    assert main(["medusa", str(base), "--out", str(out), "--data", str(GCIDE), "--steps", "4", "--heads", "2",
                 "--medusa.seq_len", "32", "--medusa.batch_size", "2", "--medusa.max_tokens", "20000",
                 "--medusa.eval_every", "0"]) == 0
    assert "medusa: 4 steps" in capsys.readouterr().out
    text = " ".join(sample_texts()[0].split()[:6])
    common = ["generate", str(base), "--prompt", text, "--temperature", "0", "--max-new-tokens", "16", "--json"]
    assert main(common) == 0
    plain = json.loads(capsys.readouterr().out.strip())
    assert main(common + ["--medusa", str(out)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["completion"] == plain["completion"]
    assert lines[-1]["speculative"]["method"] == "medusa" and lines[-1]["speculative"]["target_steps"] >= 1
    # bad input: one line, exit 2
    for argv, msg in [(common + ["--medusa", str(tmp_path)], "no Medusa heads"),
                      (common + ["--medusa", str(out), "--draft-tokens", "3"], "at most 2"),
                      (["medusa", str(base), "--out", str(tmp_path / "x"), "--data", str(tmp_path / "missing.txt")], "not found"),
                      (["medusa", str(base), "--out", str(tmp_path / "x"), "--heads", "0"], "heads"),
                      (["medusa", str(base), "--out", str(tmp_path / "x")], "--tokens")]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err


def test_self_distillation_trains_on_the_models_own_greedy_text(tmp_path, tok):
    from lmforge.train.data import TokenStream, read_index

    res = _train(tmp_path, tok, 3, name="self", self_distill=24, self_prompt_tokens=8, eval_every=0)
    assert res.data["self_distill_sequences"] == 24
    index = read_index(res.out_dir / "data" / "self")
    stream = TokenStream(index, "train")
    seq = stream.read(0, 65).tolist()  # <|bos|> + 8 prompt tokens + the model's continuation, one document
    assert seq[0] == tok.bos_id and tok.bos_id not in seq[1:]
    model = _model()
    out = generate(model, [seq[:8]], SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[]))[0]
    assert out.token_ids == seq[8:28]  # the text is the model's own greedy continuation
