"""BatchEngine: continuous batching equals engine.generate (greedy and seeded), requests joining a
running batch, preemption under a small KV budget, prefix reuse, cancel, the bounded queue, stop
strings, UTF-8-safe streaming on a real tokenizer and real multilingual text, shutdown."""

import gzip
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from lmforge.errors import ConfigError, InputError
from lmforge.infer.batching import (
    BatchEngine,
    EngineError,
    EngineStoppedError,
    FinishEvent,
    IncrementalText,
    QueueFullError,
    TokenEvent,
)
from lmforge.infer.engine import ContextLimitError, SamplingParams, generate
from lmforge.infer.paged import bytes_per_block
from lmforge.model import Transformer, preset

torch.set_num_threads(1)


def _model(**kw):
    torch.manual_seed(0)
    # a larger init than training uses, so a random model's greedy output varies from token to token
    return Transformer(preset("tiny", vocab_size=96, max_seq_len=64, init_std=0.3, **kw)).eval()


@pytest.fixture(scope="module")
def model():
    return _model()


class CharTok:
    """Id t is the character chr(32 + t); id 95 ends the text."""

    special_tokens = {"<|eos|>": 95}
    eos_id = 95

    def decode(self, ids):
        return "".join(chr(32 + int(t)) for t in ids)


def _prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 95, (n,), generator=g).tolist() for n in lengths]


class _Engine:
    def __init__(self, *a, **kw):
        self.e = BatchEngine(*a, **kw)

    def __enter__(self):
        self.e.start()
        return self.e

    def __exit__(self, *exc):
        self.e.shutdown(drain=False)


def _blocks_mb(m, n_blocks, bs):
    # room for n_blocks usable blocks (plus the scratch block)
    return (n_blocks + 1.5) * bytes_per_block(m.cfg, bs, torch.float32) / 2**20


@pytest.mark.parametrize("kw", [dict(max_running=4), dict(block_size=4, kv_memory_mb="small", max_running=8)])
def test_greedy_equals_generate_with_requests_joining_a_running_batch(model, kw):
    prompts = _prompts((3, 11, 7, 1, 20, 33, 9, 16))
    p = SamplingParams(max_new_tokens=16, temperature=0, stop_token_ids=[])
    ref = generate(model, prompts, p)
    assert len({tuple(r.token_ids) for r in ref}) == len(prompts)
    if kw.get("kv_memory_mb") == "small":  # room for 14 blocks of 4 tokens: the batch must preempt
        kw = {**kw, "kv_memory_mb": _blocks_mb(model, 14, 4)}
    with _Engine(model, None, **kw) as e:
        first = threading.Event()
        reqs = [e.submit(pr, p, on_event=lambda ev: first.set()) for pr in prompts[:3]]
        assert first.wait(10)  # the first requests are decoding when the others arrive
        for pr in prompts[3:]:
            reqs.append(e.submit(pr, p))
            time.sleep(0.002)
        outs = [r.result(timeout=60) for r in reqs]
        st = e.stats()
    for r, o, pr in zip(ref, outs, prompts):
        assert len(o) == 1
        assert o[0].token_ids == r.token_ids and o[0].finish_reason == "length" and o[0].prompt_tokens == len(pr)
    assert st["requests_finished"] == len(prompts) and st["kv_blocks_used"] == 0
    if kw.get("block_size") == 4:
        assert st["preemptions"] > 0


def test_seeded_sampling_is_reproducible_and_per_request(model):
    prompts = _prompts((5, 12))
    ps = SamplingParams(max_new_tokens=15, temperature=1.0, top_k=40, n=3, seed=5, stop_token_ids=[], logprobs=True)
    ref = generate(model, [prompts[0]], ps)
    with _Engine(model, None, max_running=8) as e:
        # a greedy request and a differently seeded one run in the same batch
        other = e.submit(prompts[1], SamplingParams(max_new_tokens=15, temperature=0.7, seed=9, stop_token_ids=[]))
        greedy = e.submit(prompts[1], SamplingParams(max_new_tokens=15, temperature=0, stop_token_ids=[]))
        a = e.submit(prompts[0], ps).result(timeout=60)
        b = e.submit(prompts[0], ps).result(timeout=60)
        c = e.submit(prompts[0], SamplingParams(**{**ps.__dict__, "seed": 6})).result(timeout=60)
        g = greedy.result(timeout=60)[0]
        other.result(timeout=60)
    assert [x.sample_index for x in a] == [0, 1, 2]
    assert [x.token_ids for x in a] == [x.token_ids for x in b] == [x.token_ids for x in ref]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]
    assert len({tuple(x.token_ids) for x in a}) > 1
    for x, r in zip(a, ref):
        assert len(x.logprobs) == len(x.token_ids)
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(r.logprobs), atol=1e-4, rtol=1e-4)
    assert g.token_ids == generate(model, [prompts[1]], SamplingParams(max_new_tokens=15, temperature=0, stop_token_ids=[]))[0].token_ids


def test_repetition_penalty_and_top_p_match_generate(model):
    pr = _prompts((9,))[0]
    p = SamplingParams(max_new_tokens=12, temperature=0.9, top_p=0.8, repetition_penalty=1.3, seed=3, stop_token_ids=[])
    ref = generate(model, [pr], p)[0]
    with _Engine(model, None) as e:
        out = e.submit(pr, p).result(timeout=60)[0]
    assert out.token_ids == ref.token_ids


def test_prefix_blocks_are_shared_and_output_unchanged(model):
    base = _prompts((24,))[0]
    prompts = [base + [1, 2, 3], base + [4, 5], base[:17]]
    p = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[])
    ref = generate(model, prompts, p)
    with _Engine(model, None, block_size=8) as e:
        outs = [e.submit(pr, p).result(timeout=60)[0] for pr in prompts]  # one after another
        st = e.stats()
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    # the 2nd prompt reuses the 3 full blocks of the 1st; the 3rd (17 tokens) its first 2
    assert st["prefix_hits"] == 5 and st["prefix_hit_tokens"] == 40
    assert st["prefill_tokens"] == 27 + 2 + 1


def test_a_burst_of_requests_with_a_common_beginning_shares_it(model):
    system = _prompts((32,), seed=4)[0]
    prompts = [system + q for q in _prompts((3, 5, 2, 6), seed=5)]
    p = SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[])
    ref = generate(model, prompts, p)
    gate, started = threading.Event(), threading.Event()
    with _Engine(model, None, block_size=8) as e:
        def hold(ev):
            started.set()
            gate.wait(10)

        blocker = e.submit([1, 2], SamplingParams(max_new_tokens=2, temperature=0, stop_token_ids=[]), on_event=hold)
        assert started.wait(10)
        reqs = [e.submit(pr, p) for pr in prompts]  # all arrive while the engine is busy: one admission round
        gate.set()
        outs = [r.result(timeout=60)[0] for r in reqs]
        blocker.result(timeout=60)
        st = e.stats()
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
    assert st["prefix_hits"] == 3 * 4  # the 2nd..4th reuse the 4 blocks of the shared 32 tokens


def test_cancel_frees_blocks_and_ends_the_request(model):
    gate = threading.Event()
    with _Engine(model, None, block_size=4) as e:
        started = threading.Event()

        def hold(ev):
            started.set()
            gate.wait(10)  # keep the engine on this request until the test has cancelled it

        r = e.submit(_prompts((10,))[0], SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=[]), on_event=hold)
        assert started.wait(10)
        assert e.stats()["kv_blocks_used"] > 0
        e.cancel(r.id)
        gate.set()
        out = r.result(timeout=30)
        assert out[0].finish_reason == "cancelled" and len(out[0].token_ids) < 40
        deadline = time.monotonic() + 10
        while e.stats()["kv_blocks_used"] and time.monotonic() < deadline:
            time.sleep(0.01)
        st = e.stats()
        assert st["kv_blocks_used"] == 0 and st["running"] == 0 and st["requests_cancelled"] == 1
        e.cancel("no-such-request")  # ignored


def test_queue_full_raises_at_once_with_retry_after(model):
    gate = threading.Event()
    with _Engine(model, None, max_running=1, max_queue=2) as e:
        started = threading.Event()

        def hold(ev):
            started.set()
            gate.wait(10)

        p = SamplingParams(max_new_tokens=4, temperature=0, stop_token_ids=[])
        first = e.submit([1, 2, 3], p, on_event=hold)
        assert started.wait(10)  # the engine thread is busy with the first request
        queued = [e.submit([4, 5], p), e.submit([6], p)]
        t0 = time.monotonic()
        with pytest.raises(QueueFullError) as err:
            e.submit([7], p)
        assert time.monotonic() - t0 < 1.0 and err.value.retry_after > 0
        assert isinstance(err.value, InputError)
        assert e.stats()["queue_depth"] == 2
        gate.set()
        assert all(len(r.result(timeout=30)[0].token_ids) == 4 for r in [first] + queued)
        e.submit([7], p).result(timeout=30)  # room again


def test_memory_budget_limits_concurrency(model):
    prompts = _prompts((8,) * 6, seed=3)
    p = SamplingParams(max_new_tokens=4, temperature=0, stop_token_ids=[])
    ref = generate(model, prompts, p)

    def run(**kw):
        peak = []
        gate, started = threading.Event(), threading.Event()
        with _Engine(model, None, block_size=4, **kw) as e:
            def watch(ev):
                peak.append(e.stats()["running_sequences"])

            def hold(ev):
                started.set()
                gate.wait(10)

            # a one-block request holds the engine until all six are queued: they compete in one round
            blocker = e.submit([1, 2], SamplingParams(max_new_tokens=2, temperature=0, stop_token_ids=[]), on_event=hold)
            assert started.wait(10)
            reqs = [e.submit(pr, p, on_event=watch) for pr in prompts]
            gate.set()
            outs = [r.result(timeout=60)[0] for r in reqs]
            blocker.result(timeout=60)
            used = e.stats()["kv_blocks_total"]
        assert [o.token_ids for o in outs] == [r.token_ids for r in ref]
        return max(peak), used

    # each request needs 2 blocks for its prompt and a 3rd for its new tokens: 6 blocks run 3 at
    # most; 40 blocks run all six at once (the blocker is done by the time they are admitted)
    small, total = run(kv_memory_mb=_blocks_mb(model, 6, 4))
    assert total == 6 and small <= 3
    large, _ = run(kv_memory_mb=_blocks_mb(model, 40, 4))
    assert large == 6


def test_stop_strings_match_generate_and_stream_without_the_stop(model):
    tok = CharTok()
    pr = _prompts((6,))[0]
    free = generate(model, [pr], SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[]), tokenizer=tok)[0]
    stop = free.text[7:9]  # a stop string the output does contain
    p = SamplingParams(max_new_tokens=20, temperature=0, stop=[stop, "never-there"], stop_token_ids=[])
    ref = generate(model, [pr], p, tokenizer=tok)[0]
    assert ref.finish_reason == "stop" and ref.stop_reason == stop
    with _Engine(model, tok) as e:
        r = e.submit(pr, p)
        evs = list(r.events(timeout=30))
        out = r.result()[0]
    assert (out.text, out.token_ids, out.finish_reason, out.stop_reason) == (ref.text, ref.token_ids, "stop", stop)
    toks = [ev for ev in evs if isinstance(ev, TokenEvent)]
    fin = [ev for ev in evs if isinstance(ev, FinishEvent)]
    assert len(fin) == 1 and fin[0].completion.text == out.text
    assert "".join(ev.text for ev in toks) + fin[0].text == out.text
    assert [ev.token_id for ev in toks] == out.token_ids
    # a stop token id ends the sample without a token event for it
    sid = free.token_ids[3]
    p2 = SamplingParams(max_new_tokens=20, temperature=0, stop_token_ids=[sid])
    with _Engine(model, tok) as e:
        o2 = e.submit(pr, p2).result(timeout=30)[0]
    ref2 = generate(model, [pr], p2, tokenizer=tok)[0]
    assert (o2.token_ids, o2.finish_reason, o2.stop_reason, o2.text) == (ref2.token_ids, "stop", sid, ref2.text)


# ---- UTF-8-safe streaming on a real byte-level BPE and real multilingual text -------------------

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ru_text():
    path = REPO.parent / "shared" / "corpus" / "multilingual" / "manpages.jsonl.gz"
    if not path.is_file():
        pytest.skip("../shared/corpus not present")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("lang") == "ru" and sum(ord(c) > 0x400 for c in r["text"]) > 200:
                return r["text"]
    pytest.skip("no Russian manpage in the shared corpus")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.config import TokenizerConfig
    from lmforge.tokenizer.train_bpe import save_tokenizer, train_tokenizer

    texts = []
    with gzip.open(REPO / "src" / "lmforge" / "sample" / "dictionary" / "gcide-sample.jsonl.gz", "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 400:
                break
            texts.append(json.loads(line)["text"])
    cfg = TokenizerConfig(vocab_size=400)  # English merges only: Cyrillic letters stay split into bytes
    out = tmp_path_factory.mktemp("bpe")
    save_tokenizer(train_tokenizer(texts, cfg), out, cfg)
    return Tokenizer.from_file(out)


def test_incremental_text_never_splits_a_character(bpe, ru_text):
    ids = bpe.encode(ru_text[:1500])
    assert any("\ufffd" in bpe.decode([t]) for t in ids)  # some tokens are half a character
    inc = IncrementalText(bpe)
    pieces = [inc.push(t) for t in ids]
    pieces.append(inc.finish())
    assert "".join(pieces) == bpe.decode(ids) == ru_text[:1500]
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > len(ids) // 3


class _Scripted(Transformer):
    """A model that always predicts the next token of a fixed script from the position: the final
    hidden state is one-hot in the position and the head maps position p to script[p + 1]. It runs
    the real layers (and so the engine's paged cache) before replacing their output."""

    def __init__(self, script, vocab):
        n = len(script)
        super().__init__(preset("tiny", vocab_size=vocab, max_seq_len=n, d_model=n, n_heads=1, n_kv_heads=1, n_layers=1,
                                tie_embeddings=False))
        self.script = script
        with torch.no_grad():
            self.lm_head.weight.zero_()
            for p in range(n - 1):
                self.lm_head.weight[script[p + 1], p] = 10.0

    def hidden_states(self, idx, doc_ids=None, pos=0, mask=None):
        h = super().hidden_states(idx, doc_ids, pos, mask)
        if isinstance(pos, int):
            pos = torch.arange(pos, pos + idx.shape[1]).expand(idx.shape[0], -1)
        return torch.nn.functional.one_hot(pos, self.cfg.d_model).to(h.dtype) + 0 * h


def test_streamed_deltas_are_utf8_safe_and_concatenate_to_the_text(bpe, ru_text):
    script = bpe.encode(ru_text[:600])[:120]
    m = _Scripted(script, len(bpe)).eval()
    p = SamplingParams(max_new_tokens=100, temperature=0, stop_token_ids=[], n=2)
    with _Engine(m, bpe, block_size=8) as e:
        r = e.submit(script[:20], p)
        evs = list(r.events(timeout=60))
        outs = r.result()
    for i, out in enumerate(outs):
        assert out.token_ids == script[20:120]
        assert out.text == bpe.decode(script[20:120])
        deltas = [ev.text for ev in evs if isinstance(ev, TokenEvent) and ev.sample_index == i]
        fin = [ev for ev in evs if isinstance(ev, FinishEvent) and ev.sample_index == i]
        assert len(deltas) == 100 and len(fin) == 1
        assert "".join(deltas) + fin[0].text == out.text
        assert not any("\ufffd" in d for d in deltas)
        assert any(not d for d in deltas)  # some tokens were held back (half a character)


def test_engine_on_generated_multilingual_text_with_stop_string(bpe, ru_text):
    script = bpe.encode(ru_text[:600])[:120]
    m = _Scripted(script, len(bpe)).eval()
    full = bpe.decode(script[20:120])
    stop = full[30:33]
    p = SamplingParams(max_new_tokens=100, temperature=0, stop_token_ids=[], stop=[stop])
    with _Engine(m, bpe) as e:
        r = e.submit(script[:20], p)
        evs = list(r.events(timeout=60))
    out = r.result()[0]
    assert out.finish_reason == "stop" and out.text == full[: full.find(stop)]
    assert "".join(ev.text for ev in evs if isinstance(ev, TokenEvent)) + evs[-1].text == out.text
    assert not any(stop in ev.text for ev in evs if isinstance(ev, TokenEvent))


# ---- validation, lifecycle -----------------------------------------------------------------

def test_bad_requests_are_refused_with_one_clear_error(model):
    with _Engine(model, None, block_size=4, kv_memory_mb=_blocks_mb(model, 6, 4)) as e:
        with pytest.raises(InputError, match="empty"):
            e.submit([], SamplingParams())
        with pytest.raises(InputError, match="vocabulary"):
            e.submit([1, 500], SamplingParams())
        with pytest.raises(ContextLimitError, match="context"):
            e.submit([1] * 60, SamplingParams(max_new_tokens=5))  # 65 > 64: refused, not clipped
        with pytest.raises(InputError, match="KV blocks"):
            e.submit([1] * 20, SamplingParams(max_new_tokens=10))  # 30 tokens > 6 blocks of 4
        with pytest.raises(InputError, match="KV blocks"):
            e.submit([1] * 9, SamplingParams(max_new_tokens=2, n=5))  # 3 prompt blocks + 4 copies of the last
        with pytest.raises(InputError, match="max_running"):
            e.submit([1], SamplingParams(max_new_tokens=2, n=300))
        with pytest.raises(ConfigError):
            e.submit([1], SamplingParams(max_new_tokens=4, temperature=-1))
        with pytest.raises(ConfigError, match="tokenizer"):
            e.submit([1], SamplingParams(max_new_tokens=4, stop=["x"]))
        assert e.ready
    with pytest.raises(ConfigError):
        BatchEngine(model, None, kv_memory_mb=1e-9)
    with pytest.raises(EngineStoppedError):
        BatchEngine(model, None).submit([1], SamplingParams(max_new_tokens=4))


def test_shutdown_drains_in_flight_requests(model):
    e = BatchEngine(model, None, max_running=2)
    e.start()
    p = SamplingParams(max_new_tokens=10, temperature=0, stop_token_ids=[])
    reqs = [e.submit(pr, p) for pr in _prompts((4, 6, 8, 3))]
    e.shutdown(drain=True)
    assert not e.ready
    assert all(r.done and r.result()[0].finish_reason == "length" for r in reqs)
    with pytest.raises(EngineStoppedError):
        e.submit([1], p)
    # without draining, what is left is cancelled
    e = BatchEngine(model, None, max_running=1)
    e.start()
    reqs = [e.submit(pr, SamplingParams(max_new_tokens=30, temperature=0, stop_token_ids=[])) for pr in _prompts((4, 6, 8))]
    e.shutdown(drain=False)
    reasons = [r.result(timeout=10)[0].finish_reason for r in reqs]
    assert "cancelled" in reasons and e.stats()["kv_blocks_used"] == 0


class _Faulty(Transformer):
    """Fails on any forward that sees token id 77 (a stand-in for a kernel error on one request)."""

    def hidden_states(self, idx, doc_ids=None, pos=0, mask=None):
        if bool((idx == 77).any()):
            raise RuntimeError("boom")
        return super().hidden_states(idx, doc_ids, pos, mask)


def test_a_failing_step_ends_the_requests_in_flight_and_the_engine_goes_on():
    torch.manual_seed(0)
    m = _Faulty(preset("tiny", vocab_size=96, max_seq_len=64, init_std=0.3)).eval()
    p = SamplingParams(max_new_tokens=5, temperature=0, stop_token_ids=[])
    with _Engine(m, None) as e:
        bad = e.submit([1, 77, 3], p)
        with pytest.raises(EngineError, match="boom"):
            bad.result(timeout=30)
        assert bad.error and bad.completions[0].finish_reason == "error"
        good = e.submit([1, 2, 3], p).result(timeout=30)[0]
        st = e.stats()
    assert good.finish_reason == "length" and len(good.token_ids) == 5
    assert st["requests_failed"] == 1 and st["kv_blocks_used"] == 0 and st["ready"]


def test_rows_of_very_different_lengths_attend_in_groups_with_unchanged_output(model, monkeypatch):
    from lmforge.infer import batching

    monkeypatch.setenv("LMFORGE_NATIVE_DECODE", "0")  # torch's batched step: the one that groups rows

    assert batching._split_by_length([2, 2, 2]) is None  # too few rows
    assert batching._split_by_length([3, 3, 4, 4]) is None  # little padding to save
    assert batching._split_by_length([1, 9, 1, 8, 1]) == [([0, 2, 4], 1), ([3, 1], 9)]
    calls = []
    real = batching._forward_grouped
    monkeypatch.setattr(batching, "_forward_grouped", lambda *a: calls.append(1) or real(*a))
    prompts = _prompts((2, 40, 3, 1, 36, 2))
    p = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[])
    ref = generate(model, prompts, p)
    gate, started = threading.Event(), threading.Event()
    with _Engine(model, None, block_size=4) as e:
        def hold(ev):
            started.set()
            gate.wait(10)

        blocker = e.submit([1], SamplingParams(max_new_tokens=1, temperature=0, stop_token_ids=[]), on_event=hold)
        assert started.wait(10)
        reqs = [e.submit(pr, p) for pr in prompts]
        gate.set()
        outs = [r.result(timeout=60)[0] for r in reqs]
        blocker.result(timeout=60)
    assert calls  # the grouped path ran
    assert [o.token_ids for o in outs] == [r.token_ids for r in ref]


def test_a_lone_int8_sequence_decodes_through_the_int8_kernel_on_the_engine_threads(monkeypatch, int8_kernel):
    # one running sequence of an int8 model: torch's ops on one thread, the engine thread's count
    # to lmforge's int8 kernel (as generate does); two sequences: torch's count, the batched path
    from lmforge.infer.quantize import quantize_model

    CK = int8_kernel
    m = _model()
    quantize_model(m, "int8", include_head=True)
    seen = []
    m.lm_head.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].shape[0], torch.get_num_threads(),
                                                                        CK.kernel_threads())))
    real_loop = BatchEngine._loop

    def loop_on_two_threads(self):
        torch.set_num_threads(2)
        return real_loop(self)

    monkeypatch.setattr(BatchEngine, "_loop", loop_on_two_threads)
    p = SamplingParams(max_new_tokens=6, temperature=0, stop_token_ids=[])
    want = generate(m, [[1, 2, 3]], p)[0].token_ids
    seen.clear()
    with _Engine(m, None, max_running=4) as e:
        out = e.submit([1, 2, 3], p).result()[0].token_ids
        lone = set(seen)
        seen.clear()
        both = [e.submit(q, p) for q in ([1, 2, 3], [4, 5, 6, 7])]
        outs = [r.result()[0].token_ids for r in both]
    assert out == want == outs[0]
    # decode steps of the lone sequence (1, 2); its prefill's last row (2, 1); never both pools at 2
    assert {(t, k) for rows, t, k in lone} == {(1, 2), (2, 1)}
    assert {(t, k) for rows, t, k in seen if rows == 2} == {(2, 1)}  # two rows: torch's threads


def test_a_request_whose_sampling_fails_ends_alone_and_the_batch_goes_on(model, monkeypatch):
    # one request's sampler raises (seed 13 here): that request ends with finish_reason "error" and
    # EngineError from result(); the requests decoded beside it give the tokens they give alone
    import lmforge.infer.batching as B

    real = B.sample

    calls = []

    def sample_that_fails_for_seed_13(logits, params, gen):
        if params.seed == 13:
            calls.append(logits.shape[0])
            if len(calls) == 3:  # a decode step, the other requests' rows in the same batch
                raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(logits, params, gen)

    prompts = _prompts([5, 9, 3])
    greedy = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[])
    sampled = SamplingParams(max_new_tokens=8, temperature=0.9, seed=7, stop_token_ids=[])
    doomed = SamplingParams(max_new_tokens=8, temperature=0.9, seed=13, stop_token_ids=[], n=2)
    with _Engine(model, None, max_running=8) as e:
        alone = [e.submit(prompts[0], greedy).result()[0].token_ids, e.submit(prompts[1], sampled).result()[0].token_ids]
        monkeypatch.setattr(B, "sample", sample_that_fails_for_seed_13)
        reqs = [e.submit(prompts[0], greedy), e.submit(prompts[1], sampled), e.submit(prompts[2], doomed)]
        with pytest.raises(EngineError, match="inf, nan"):
            reqs[2].result(timeout=60)
        assert [c.finish_reason for c in reqs[2].completions] == ["error", "error"] and len(calls) == 3
        assert len(reqs[2].completions[0].token_ids) == 2  # two tokens before the failing step
        assert [r.result(timeout=60)[0].token_ids for r in reqs[:2]] == alone
        stats = e.stats()
        assert stats["requests_failed"] == 1 and stats["running"] == 0
        monkeypatch.setattr(B, "sample", real)
        assert e.submit(prompts[0], greedy).result(timeout=60)[0].token_ids == alone[0]  # still serving
    assert e.allocator.used == 0  # every block back in the pool
