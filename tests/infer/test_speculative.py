"""Speculative decoding: greedy output equals the target's own greedy output on real prompts
(with a draft that agrees often and one that rarely does); sampled output follows the target's
distribution exactly (chi-square against the exact distribution of the first tokens, computed by
enumeration); stops, limits, statistics, bad input; the generate CLI with --draft."""

import copy
import itertools
import json

import pytest
import torch
from scipy.stats import chisquare

from lmforge.errors import ConfigError, InputError
from lmforge.infer.engine import SamplingParams, generate, process_logits
from lmforge.infer.speculative import accept, same_tokenizer, speculative_generate
from tests.infer.spec_helpers import real_prompts, sample_texts, tiny_model, train_tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Batch-1 decoding of tiny models: one intra-op thread (two are much slower on a shared machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("spec_tok"))


@pytest.fixture(scope="module")
def prompts(tok):
    return real_prompts(tok, sample_texts(), n=5)


def _target():
    # untied, wider init: a random model whose greedy continuations vary (a tied random model repeats its input)
    return tiny_model(512, init_std=0.1, tie_embeddings=False).eval()


def _near(m, noise=0.002, seed=1):
    """A draft that agrees with the target most of the time: its weights plus a little noise."""
    d = copy.deepcopy(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return d


def test_greedy_equals_target_greedy_with_agreeing_and_random_drafts(tok, prompts):
    m = _target()
    params = SamplingParams(max_new_tokens=30, temperature=0)
    ref = generate(m, prompts, params, tokenizer=tok)
    rates = {}
    for name, draft, ks in [("near", _near(m), (1, 4, 7)),
                            ("random", tiny_model(512, seed=7, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, init_std=0.1), (4,))]:
        for k in ks:
            outs, st = speculative_generate(m, draft, prompts, params, tokenizer=tok, k=k)
            for a, b in zip(ref, outs):
                assert b.token_ids == a.token_ids
                assert (b.finish_reason, b.text, b.prompt_index) == (a.finish_reason, a.text, a.prompt_index)
            assert st.emitted == sum(len(o.token_ids) + (o.finish_reason == "stop") for o in outs)
            assert st.accepted <= st.proposed and st.steps * (k + 1) >= st.emitted
            rates[name, k] = st
    assert rates["near", 4].acceptance_rate > 0.3 > 0.05 > rates["random", 4].acceptance_rate
    assert rates["near", 4].tokens_per_step > 1.5 and rates["random", 4].tokens_per_step < 1.1
    assert all(m.cfg and l.attn.cache is None for l in m.layers)  # caches released


def test_stop_tokens_strings_context_and_logprobs_match_the_engine(tok, prompts):
    m = _target()
    draft = _near(m)
    ref = generate(m, prompts, SamplingParams(max_new_tokens=30, temperature=0), tokenizer=tok)
    stop_tok = ref[0].token_ids[5]
    p = SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=[stop_tok], logprobs=True)
    a, b = generate(m, prompts, p, tokenizer=tok), speculative_generate(m, draft, prompts, p, tokenizer=tok, k=3)[0]
    for x, y in zip(a, b):
        assert (x.token_ids, x.finish_reason, x.stop_reason) == (y.token_ids, y.finish_reason, y.stop_reason)
        assert y.logprobs == pytest.approx(x.logprobs, abs=1e-4)
    stop_str = tok.decode(ref[1].token_ids)[4:7]
    p = SamplingParams(max_new_tokens=30, temperature=0, stop=[stop_str])
    a, b = generate(m, prompts[1:2], p, tokenizer=tok), speculative_generate(m, draft, prompts[1:2], p, tokenizer=tok)[0]
    assert (a[0].text, a[0].finish_reason, a[0].stop_reason) == (b[0].text, "stop", stop_str)
    # the model's context ends the sequence exactly where the engine ends it
    long = prompts[0] + ref[0].token_ids * 4
    long = long[: m.cfg.max_seq_len - 6]
    p = SamplingParams(max_new_tokens=20, temperature=0)
    a, b = generate(m, [long], p, tokenizer=tok), speculative_generate(m, draft, [long], p, tokenizer=tok, k=4)[0]
    assert b[0].finish_reason == a[0].finish_reason == "context" and b[0].token_ids == a[0].token_ids


def test_the_models_own_quantized_copy_as_draft(tok, prompts):
    from lmforge.infer.quantize import quantize_model

    m = _target()
    for kind, least in (("int8", 0.3), ("nf4", 0.1)):  # a random model's near-ties flip under 4-bit weights
        draft = copy.deepcopy(m)
        quantize_model(draft, kind, include_head=True)
        params = SamplingParams(max_new_tokens=24, temperature=0)
        outs, st = speculative_generate(m, draft, prompts, params, tokenizer=tok, k=4)
        assert [o.token_ids for o in outs] == [o.token_ids for o in generate(m, prompts, params, tokenizer=tok)]
        assert st.acceptance_rate > least


def test_repetition_penalty_greedy_equals_the_engine(tok, prompts):
    m = _target()
    p = SamplingParams(max_new_tokens=25, temperature=0, repetition_penalty=1.5)
    ref = generate(m, prompts, p, tokenizer=tok)
    outs, _ = speculative_generate(m, _near(m), prompts, p, tokenizer=tok, k=4)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]


# ---- sampling: exact in distribution -----------------------------------------------------------

V = 3


@torch.no_grad()
def _exact(model, prompt, params, n_tok):
    """{token tuple: probability} of the first n_tok tokens under the processed distribution."""
    out = {}
    for seq in itertools.product(range(V), repeat=n_tok):
        ids, prob = list(prompt), 1.0
        for t in seq:
            logits = model(torch.tensor([ids]))[0][:, -1].float()
            seen = None
            if params.repetition_penalty != 1.0:
                seen = torch.zeros(1, V, dtype=torch.bool)
                seen[0, ids] = True
            prob *= float(process_logits(logits, params, seen).softmax(-1)[0, t])
            ids.append(t)
        out[seq] = prob
    return out


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=3, temperature=1.0, n=700, seed=11, stop_token_ids=[]),
    SamplingParams(max_new_tokens=3, temperature=0.7, top_k=2, top_p=0.95, repetition_penalty=1.4, n=700, seed=12,
                   stop_token_ids=[]),
])
def test_sampling_follows_the_target_distribution_exactly(params):
    target = tiny_model(V, seed=0, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, init_std=0.6,
                        tie_embeddings=False).eval()
    draft = tiny_model(V, seed=1, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, init_std=0.6,
                       tie_embeddings=False).eval()
    prompt = [1, 2]
    outs, st = speculative_generate(target, draft, [prompt], params, k=2)
    assert 0.05 < st.acceptance_rate < 0.95  # both branches of the rule are exercised
    counts: dict = {}
    for o in outs:
        counts[tuple(o.token_ids)] = counts.get(tuple(o.token_ids), 0) + 1
    p_target, p_draft = _exact(target, prompt, params, 3), _exact(draft, prompt, params, 3)
    assert sum(counts.values()) == params.n
    assert all(p_target[s] > 0 for s in counts)  # nothing outside the target's support (top-k / top-p)

    def pvalue(p):
        cells = sorted((c for c in p if p[c] > 0), key=p.get, reverse=True)
        big = [c for c in cells if p[c] * params.n >= 5]  # pool the small cells into one
        small = [c for c in cells if c not in big]
        obs = [counts.get(c, 0) for c in big] + ([sum(counts.get(c, 0) for c in small)] if small else [])
        exp = [p[c] * params.n for c in big] + ([sum(p[c] for c in small) * params.n] if small else [])
        scale = sum(obs) / sum(exp)
        return chisquare(obs, [e * scale for e in exp]).pvalue

    assert pvalue(p_target) > 1e-3
    # the test has power: the same counts are far from the draft's own distribution
    p_draft = {s: max(v, 1e-12) for s, v in p_draft.items()}
    assert pvalue(p_draft) < 1e-6


def test_acceptance_rule_keeps_p_on_one_position():
    """One position, many draws: accepted guesses + corrections are distributed as p, not q."""
    torch.manual_seed(0)
    p_logits = torch.randn(2, 6) * 1.5
    q = torch.randn(1, 6).mul(1.5).softmax(-1)
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(6)
    for _ in range(6000):
        d = int(torch.multinomial(q[0], 1, generator=g))
        a, x = accept(p_logits, [d], q, params, g)
        counts[d if a == 1 else x] += 1
    p = p_logits[0].softmax(-1)
    assert chisquare(counts.numpy(), (p * 6000).numpy()).pvalue > 1e-3


# ---- errors and the CLI ----------------------------------------------------------------------------

def test_bad_input_is_refused(prompts):
    m = _target()
    with pytest.raises(ConfigError, match="separate model"):
        speculative_generate(m, m, prompts)
    small = tiny_model(64, seed=2)
    with pytest.raises(InputError, match="draft model's vocabulary"):
        speculative_generate(m, small, [[1, 2, 300]])
    with pytest.raises(ConfigError, match="guesses per step"):
        speculative_generate(m, _near(m), prompts, k=0)


def test_same_tokenizer(tok, tmp_path):
    other = train_tokenizer(tmp_path, texts_limit=100)
    assert same_tokenizer(tok, tok)
    assert not same_tokenizer(tok, other)


def _save(model, tok, path):
    import shutil

    from lmforge.model.io import save_model

    save_model(model, path)
    shutil.copyfile(tok.path, path / "tokenizer.json")
    return path


def test_generate_cli_with_a_draft(tok, prompts, tmp_path, capsys):
    from lmforge.cli import main

    m = _target()
    t = _save(m, tok, tmp_path / "target")
    d = _save(_near(m), tok, tmp_path / "draft")
    text = " ".join(sample_texts()[0].split()[:6])
    assert main(["generate", str(t), "--prompt", text, "--temperature", "0", "--max-new-tokens", "20", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out.strip())
    assert main(["generate", str(t), "--prompt", text, "--temperature", "0", "--max-new-tokens", "20", "--json",
                 "--draft", str(d), "--draft-tokens", "3"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert lines[0]["completion"] == plain["completion"]
    stats = lines[-1]["speculative"]
    assert stats["target_steps"] > 0 and 0 <= stats["acceptance_rate"] <= 1 and stats["tokens_per_target_step"] >= 1
    # text mode: the statistics go to stderr
    assert main(["generate", str(t), "--prompt", text, "--temperature", "0", "--max-new-tokens", "20",
                 "--draft", str(d)]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == text + plain["completion"] and "acceptance" in cap.err
    # a draft with another tokenizer, a missing draft, --draft with --medusa: one line each
    other = train_tokenizer(tmp_path / "o", texts_limit=100)
    bad = _save(_near(m), other, tmp_path / "bad")
    for extra, msg in [(["--draft", str(bad)], "tokenizer"), (["--draft", str(tmp_path / "nope")], "nope"),
                       (["--draft", str(d), "--medusa", str(d)], "either"), (["--draft-tokens", "3"], "--draft-tokens")]:
        assert main(["generate", str(t), "--prompt", text] + extra) == 2
        assert msg in capsys.readouterr().err
