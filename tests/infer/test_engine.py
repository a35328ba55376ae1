"""The generation engine: per-row positions equal one-at-a-time decoding and the plain no-cache
computation; sampling options; stops; n samples from one prefill; context limits; compile."""

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.engine import ContextLimitError, SamplingParams, decode_step, generate, process_logits, unpad
from lmforge.model import Transformer, preset


def _model(**kw):
    torch.manual_seed(0)
    return Transformer(preset("tiny", vocab_size=96, max_seq_len=48, **kw)).eval()


class CharTok:
    """A stand-in tokenizer: id t is the character chr(32 + t); id 95 ends the text."""

    special_tokens = {"<|eos|>": 95}
    eos_id = 95

    def decode(self, ids):
        return "".join(chr(32 + int(t)) for t in ids)


@torch.no_grad()
def _greedy_plain(m, ids, n):
    """Greedy decoding by a full forward over the whole sequence at every step (no cache)."""
    ids = list(ids)
    out = []
    for _ in range(n):
        t = int(m(torch.tensor([ids]))[0][0, -1].argmax())
        out.append(t)
        ids.append(t)
    return out


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 1, "qk_norm": True}])
def test_batched_greedy_equals_plain_decoding_row_by_row(kw):
    m = _model(**kw)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 95, (n,), generator=g).tolist() for n in (3, 11, 7, 1)]
    outs = generate(m, prompts, SamplingParams(max_new_tokens=9, temperature=0, stop_token_ids=[]))
    assert [o.prompt_index for o in outs] == [0, 1, 2, 3]
    for p, o in zip(prompts, outs):
        assert o.token_ids == _greedy_plain(m, p, 9)
        assert o.finish_reason == "length" and o.prompt_tokens == len(p)


def test_moe_model_generates_equal_to_plain_decoding():
    m = _model(moe_experts=4, moe_top_k=2)
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6]]
    outs = generate(m, prompts, SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=[]))
    for p, o in zip(prompts, outs):
        assert o.token_ids == _greedy_plain(m, p, 5)


def test_left_or_right_padded_batches_give_the_same_prompts():
    ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
    left = unpad(ids, torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    right = unpad(torch.tensor([[5, 6, 0, 0], [1, 2, 3, 4]]), torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    assert left == right == [[5, 6], [1, 2, 3, 4]]


def test_n_samples_share_one_prefill_and_the_seed_makes_them_reproducible():
    m = _model()
    p = SamplingParams(max_new_tokens=12, temperature=1.0, n=4, seed=7, stop_token_ids=[])
    a = generate(m, [[1, 2, 3], [4, 5]], p)
    b = generate(m, [[1, 2, 3], [4, 5]], p)
    assert [(o.prompt_index, o.sample_index) for o in a] == [(i, j) for i in range(2) for j in range(4)]
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert len({tuple(o.token_ids) for o in a[:4]}) > 1  # the samples differ from one another
    c = generate(m, [[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=12, temperature=1.0, n=4, seed=8, stop_token_ids=[]))
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    # greedy: all n samples equal the single greedy answer; the caller's RNG is not touched
    state = torch.get_rng_state()
    g = generate(m, [[1, 2, 3]], SamplingParams(max_new_tokens=6, temperature=0, n=3, stop_token_ids=[]))
    assert torch.equal(state, torch.get_rng_state())
    assert all(o.token_ids == _greedy_plain(m, [1, 2, 3], 6) for o in g)


def test_top_k_one_and_tiny_top_p_are_greedy():
    m = _model()
    greedy = generate(m, [[9, 8, 7]], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[]))[0].token_ids
    for p in (SamplingParams(max_new_tokens=8, temperature=1.5, top_k=1, seed=0, stop_token_ids=[]),
              SamplingParams(max_new_tokens=8, temperature=1.5, top_p=1e-6, seed=0, stop_token_ids=[])):
        assert generate(m, [[9, 8, 7]], p)[0].token_ids == greedy


def test_process_logits_penalty_top_k_top_p():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = process_logits(logits, SamplingParams(temperature=0, repetition_penalty=2.0), seen)
    assert out.tolist() == [[1.0, -2.0, 0.5, 1.0]]
    out = process_logits(logits, SamplingParams(temperature=1.0, top_k=2), None)
    assert torch.isinf(out).tolist() == [[False, True, True, False]]
    # probabilities ~ [0.61, 0.03, 0.14, 0.22]: top_p 0.7 keeps the two largest
    out = process_logits(logits, SamplingParams(temperature=1.0, top_p=0.7), None)
    assert torch.isinf(out).tolist() == [[False, True, True, False]]


def test_each_row_stops_on_its_own_token_or_string():
    m = _model()
    prompts = [[10, 11, 12], [20, 21]]
    free = generate(m, prompts, SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[]))
    stop_tok = free[0].token_ids[3]
    first = free[0].token_ids.index(stop_tok)
    outs = generate(m, prompts, SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[stop_tok]))
    assert outs[0].finish_reason == "stop" and outs[0].stop_reason == stop_tok
    assert outs[0].token_ids == free[0].token_ids[:first]
    if stop_tok not in free[1].token_ids:
        assert outs[1].token_ids == free[1].token_ids and outs[1].finish_reason == "length"
    # a stop string: the text is cut before it
    tok = CharTok()
    text = tok.decode(free[1].token_ids)
    s = text[4:6]
    o = generate(m, prompts, SamplingParams(max_new_tokens=10, temperature=0, stop=[s], stop_token_ids=[]), tokenizer=tok)[1]
    assert o.finish_reason == "stop" and o.stop_reason == s and o.text == text[: text.find(s)]
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(m, prompts, SamplingParams(stop=["x"]))


def test_context_limit_is_reported_not_clipped_silently():
    m = _model()
    o = generate(m, [list(range(45)), [1, 2]], SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[]))
    assert o[0].finish_reason == "context" and len(o[0].token_ids) == 3  # 45 + 3 = the 48-token context
    assert o[1].finish_reason == "length" and len(o[1].token_ids) == 10
    with pytest.raises(ContextLimitError, match="48"):
        generate(m, [list(range(48))], SamplingParams(max_new_tokens=1))
    with pytest.raises(ConfigError, match="top_p"):
        generate(m, [[1]], SamplingParams(top_p=0))


def test_logprobs_and_streaming_callback():
    m = _model()
    seen = []
    o = generate(m, [[3, 4, 5]], SamplingParams(max_new_tokens=4, temperature=0, logprobs=True, stop_token_ids=[]),
                 on_token=lambda i, j, t: seen.append((i, j, t)))[0]
    assert seen == [(0, 0, t) for t in o.token_ids]
    ids = [3, 4, 5] + o.token_ids
    with torch.no_grad():
        ref = m(torch.tensor([ids]))[0][0].log_softmax(-1)
    want = [ref[2 + i, t].item() for i, t in enumerate(o.token_ids)]
    assert o.logprobs == pytest.approx(want, abs=1e-4)


def test_compiled_decode_step_gives_the_same_tokens():
    m = _model()
    prompts = [[1, 2, 3, 4], [7, 8]]
    p = SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[])
    eager = generate(m, prompts, p)
    compiled = generate(m, prompts, p, compile=True)
    assert [o.token_ids for o in eager] == [o.token_ids for o in compiled]
    # the step's shapes are static: the same (B, 1) tokens / positions and (B, 1, 1, S) mask each call
    m.setup_cache(2, 8)
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    assert decode_step(m, torch.ones(2, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), mask).shape == (2, 96)
    m.clear_cache()


def test_compiled_decode_of_an_int8_model_on_cpu(monkeypatch):
    # batch 1: the fbgemm dynamic int8 kernel runs inside the compiled step as one custom op
    # (lmforge::int8_dynamic_linear), the same kernel as eager; with the weight-only mode the int8
    # layers trace as dequantize-and-matmul (inductor cannot lower the CPU bf16 kernel; this call used
    # to fail with an inductor LoweringException)
    from lmforge.infer.quantize import Int8Linear, fbgemm_available, quantize_model

    m = _model()
    quantize_model(m, "int8")
    p = SamplingParams(max_new_tokens=4, temperature=0, stop_token_ids=[])
    if fbgemm_available():
        monkeypatch.setenv("LMFORGE_INT8_DECODE", "dynamic")
        assert generate(m, [[1, 2, 3, 4]], p, compile=True)[0].token_ids == generate(m, [[1, 2, 3, 4]], p)[0].token_ids
    monkeypatch.setenv("LMFORGE_INT8_DECODE", "weight-only")
    out = generate(m, [[5, 6, 7]], p, compile=True)
    monkeypatch.setattr(Int8Linear, "kernel_rows", 0)  # eager through the same dequantize-and-matmul
    assert out[0].token_ids == generate(m, [[5, 6, 7]], p)[0].token_ids


# ---- engine speed: chunked prefill, threads per phase, the compiled step's kept cache ----------

@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_prefill_gives_the_same_tokens_and_logprobs(chunk):
    m = _model()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 95, (n,), generator=g).tolist() for n in (30, 3, 11)]
    p = SamplingParams(max_new_tokens=6, temperature=0, logprobs=True, stop_token_ids=[])
    whole = generate(m, prompts, p)
    chunked = generate(m, prompts, p, prefill_chunk=chunk)
    for a, b, prompt in zip(whole, chunked, prompts):
        assert b.token_ids == a.token_ids == _greedy_plain(m, prompt, 6)
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-4)
    with pytest.raises(ConfigError, match="prefill_chunk"):
        generate(m, prompts, p, prefill_chunk=0)


def test_decode_runs_on_its_own_thread_count_and_restores_the_callers(monkeypatch):
    monkeypatch.setenv("LMFORGE_NATIVE_DECODE", "0")  # torch's step: its intra-op threads are what is tuned
    from lmforge.infer.engine import AUTO_THREADS, DECODE_SINGLE_THREAD_ROWS, LAST_TUNER, decode_threads_for

    m = _model()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        during = []
        p = SamplingParams(max_new_tokens=3, temperature=0, stop_token_ids=[])
        out = generate(m, [[1, 2, 3]], p, on_token=lambda *a: during.append(torch.get_num_threads()))
        # batch 1: the tuner alternates 1 and 2 threads over its first steps, then the caller's count is back
        assert LAST_TUNER[0].choices == [1, 2] and torch.get_num_threads() == 2
        during.clear()
        generate(m, [[1, 2, 3]], p, decode_threads=1, on_token=lambda *a: during.append(torch.get_num_threads()))
        assert during == [1, 1, 1] and torch.get_num_threads() == 2 and LAST_TUNER[0] is None
        during.clear()
        generate(m, [[1, 2, 3]], p, decode_threads=2, on_token=lambda *a: during.append(torch.get_num_threads()))
        assert during == [2, 2, 2]
        rows = DECODE_SINGLE_THREAD_ROWS + 1
        assert decode_threads_for(1) == AUTO_THREADS and decode_threads_for(rows) is None
        assert decode_threads_for(1, "meta") is None
        monkeypatch.setenv("LMFORGE_DECODE_THREADS", "2")
        assert decode_threads_for(1) == 2
        during.clear()
        again = generate(m, [[1, 2, 3]], p, on_token=lambda *a: during.append(torch.get_num_threads()))
        assert during == [2, 2, 2] and again[0].token_ids == out[0].token_ids
        monkeypatch.setenv("LMFORGE_DECODE_THREADS", "many")
        with pytest.raises(ConfigError, match="LMFORGE_DECODE_THREADS"):
            generate(m, [[1, 2, 3]], p)
        with pytest.raises(ConfigError, match="decode_threads"):
            generate(m, [[1, 2, 3]], p, decode_threads=0)
    finally:
        torch.set_num_threads(before)


def test_thread_tuner_keeps_the_faster_count_and_probes_again():
    from lmforge.infer.engine import ThreadTuner

    t = ThreadTuner(2)
    cost = {1: 1.0, 2: 0.6}  # 2 threads faster
    ran = []
    for step in range(2 * t.PROBE + 10):
        th = t.threads(step)
        ran.append(th)
        t.record(step, th, cost[th])
    assert ran[: 2 * t.PROBE] == [1, 2] * t.PROBE and set(ran[2 * t.PROBE :]) == {2}
    cost = {1: 0.5, 2: 2.0}  # another job started: 2 threads now slower
    for step in range(2 * t.PROBE + 10, t.REPROBE + 2 * t.PROBE + 5):
        th = t.threads(step)
        ran.append(th)
        t.record(step, th, cost[th])
    assert ran[-1] == 1 and t.best == 1 and t.choices == ran


def test_decode_tunes_threads_to_the_faster_count(monkeypatch):
    # a model step that is much slower at 2 threads (as on a machine whose other core is busy)
    import time as _time

    from lmforge.infer import engine as E

    monkeypatch.setenv("LMFORGE_NATIVE_DECODE", "0")  # torch's step (the one patched here)
    m = _model()
    real = E.decode_step

    def slow_at_two(model, *a):
        if torch.get_num_threads() == 2:
            _time.sleep(0.01)
        return real(model, *a)

    monkeypatch.setattr(E, "decode_step", slow_at_two)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        p = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[])
        out = E.generate(m, [[1, 2, 3]], p)
        choices = E.LAST_TUNER[0].choices
        assert choices[6:] == [1] * (len(choices) - 6) and torch.get_num_threads() == 2
        assert out[0].token_ids == E.generate(m, [[1, 2, 3]], p, decode_threads=1)[0].token_ids
    finally:
        torch.set_num_threads(before)


def test_compiled_decode_keeps_its_cache_aside_between_calls():
    from lmforge.infer.engine import release_cache

    m = _model()
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = m(x)[0]
    p = SamplingParams(max_new_tokens=4, temperature=0, stop_token_ids=[])
    caches = []
    a = generate(m, [[1, 2, 3]], p, compile=True, on_token=lambda *_: caches.append(m.layers[0].attn.cache))
    assert all(c is None for c in m.caches())  # detached: plain forwards run without a cache
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], before)
    b = generate(m, [[1, 2, 3]], p, compile=True, on_token=lambda *_: caches.append(m.layers[0].attn.cache))
    assert a[0].token_ids == b[0].token_ids == _greedy_plain(m, [1, 2, 3], 4)
    assert len({id(c) for c in caches}) == 1  # the same shape: the same cache buffers, no re-capture
    c = generate(m, [[1, 2, 3, 4, 5]], p, compile=True, on_token=lambda *_: caches.append(m.layers[0].attn.cache))
    assert c[0].token_ids == _greedy_plain(m, [1, 2, 3, 4, 5], 4) and len({id(c) for c in caches}) == 2
    release_cache(m)


@pytest.mark.parametrize("bad", [dict(temperature=1e-45), dict(temperature=float("nan")), dict(top_p=1e-300),
                                 dict(repetition_penalty=1e-300), dict(seed=2**70), dict(seed=True)])
def test_sampling_values_that_would_give_nan_or_overflow_are_refused(bad):
    """Values that would make the sampler produce NaN probabilities or overflow the generator's
    seed are refused up front (one request must never fail a whole batch in the server)."""
    with pytest.raises(ConfigError):
        SamplingParams(**bad).validate()
    SamplingParams(temperature=1e-5, top_p=1e-6, repetition_penalty=0.01, seed=2**64 - 1).validate()


@pytest.mark.parametrize("bucket", [4, 0])
def test_decode_over_the_live_cache_prefix_equals_the_whole_cache(monkeypatch, bucket):
    """Eager decode attends to the written slots rounded up to LIVE_BUCKET (here 4: the width
    grows every few steps); greedy tokens and log-probs equal those of attention over every slot
    (bucket 0)."""
    from lmforge.infer import engine as E

    m = _model()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15]]
    p = SamplingParams(max_new_tokens=20, temperature=0.0, stop_token_ids=(), logprobs=True)
    with monkeypatch.context() as mp:
        mp.setattr(E, "LIVE_BUCKET", 0)
        ref = generate(m, prompts, p)
    monkeypatch.setattr(E, "LIVE_BUCKET", bucket)
    got = generate(m, prompts, p)
    for a, b in zip(got, ref):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    assert got[0].token_ids == _greedy_plain(m, prompts[0], 20)


def test_int8_kernel_decode_gets_the_threads_and_torch_runs_on_one(monkeypatch, int8_kernel):
    # one row of an int8 model through lmforge's compiled kernel: the decode's thread count goes to
    # the kernel's own pool, torch's ops run on one thread; the tokens do not depend on the count
    from lmforge.infer import engine as E
    from lmforge.infer.quantize import int8_kernel_decode, quantize_model

    CK = int8_kernel
    m = _model()
    quantize_model(m, "int8", include_head=True)
    assert int8_kernel_decode(m)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        p = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[])
        seen = []
        on = lambda *a: seen.append((torch.get_num_threads(), CK.kernel_threads()))  # noqa: E731
        one = E.generate(m, [[1, 2, 3]], p, decode_threads=1, on_token=on)
        assert set(seen) == {(1, 1)}
        seen.clear()
        two = E.generate(m, [[1, 2, 3]], p, decode_threads=2, on_token=on)
        assert set(seen) == {(1, 2)} and two[0].token_ids == one[0].token_ids
        seen.clear()
        auto = E.generate(m, [[1, 2, 3]], p, on_token=on)  # the tuner alternates the kernel's count
        assert {t for t, _ in seen} == {1} and {k for _, k in seen} == {1, 2}
        assert auto[0].token_ids == one[0].token_ids and E.LAST_TUNER[0].choices[:2] == [1, 2]
        assert torch.get_num_threads() == 2 and CK.kernel_threads() == 1  # both restored
        monkeypatch.setenv("LMFORGE_INT8_DECODE", "weight-only")
        assert not int8_kernel_decode(m)
    finally:
        torch.set_num_threads(before)


def test_draw_samples_the_distribution_and_never_a_zero_probability_entry():
    from lmforge.infer.engine import draw

    probs = torch.tensor([0.0, 0.1, 0.0, 0.4, 0.2, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    n = 20000
    idx = draw(probs.expand(n, -1).contiguous(), g)
    counts = torch.bincount(idx, minlength=7).double()
    assert counts[[0, 2, 6]].sum() == 0
    expected = probs.double() * n
    keep = expected > 0
    chi2 = (((counts - expected)[keep]) ** 2 / expected[keep]).sum().item()
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001
    # rows of another scale (an unnormalised row) and a one-hot row
    two = torch.tensor([[0.0, 2.0, 0.0, 6.0], [0.0, 0.0, 1.0, 0.0]])
    got = torch.stack([draw(two, g) for _ in range(2000)])
    assert set(got[:, 0].tolist()) == {1, 3} and set(got[:, 1].tolist()) == {2}
    assert abs((got[:, 0] == 3).double().mean().item() - 0.75) < 0.04
