"""The server through the `openai` Python client: completions, chat, streaming, n, seed, logprobs,
echo scoring, models, metrics; UTF-8-safe streaming on a model that memorized multi-byte text."""

from __future__ import annotations

import httpx
import pytest

from tests.serve.conftest import CHAT_A, CHAT_Q, TEXT_PROMPT, TEXT_REST

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def client(server):
    url, _, _ = server
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def test_models_and_health(server, client):
    url, _, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    assert httpx.get(url + "/v1/models/tiny").json()["max_model_len"] == 128


def test_chat_completion_answers_with_the_template(client):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": CHAT_Q}], temperature=0)
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content == CHAT_A and c.finish_reason == "stop"
    assert r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_sends_role_first_then_deltas_and_usage(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": CHAT_Q}],
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == CHAT_A
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 1


def test_completion_text_stop_and_length(client):
    r = client.completions.create(model="tiny", prompt=TEXT_PROMPT, max_tokens=60, temperature=0)
    assert TEXT_REST.startswith(r.choices[0].text) and len(r.choices[0].text) > 20
    r = client.completions.create(model="tiny", prompt=TEXT_PROMPT, max_tokens=60, temperature=0, stop=["café"])
    assert r.choices[0].text == ", the naïve " and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt=TEXT_PROMPT, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_prompt_as_token_ids_and_several_prompts(server, client):
    _, _, tok = server
    ids = [tok.bos_id] + tok.encode(TEXT_PROMPT)
    a = client.completions.create(model="tiny", prompt=ids, max_tokens=8, temperature=0).choices[0].text
    b = client.completions.create(model="tiny", prompt=TEXT_PROMPT, max_tokens=8, temperature=0).choices[0].text
    assert a == b
    r = client.completions.create(model="tiny", prompt=[TEXT_PROMPT, ids], max_tokens=8, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and {c.text for c in r.choices} == {a}


def test_n_and_seed_reproducibility(client):
    kw = dict(model="tiny", prompt="The", max_tokens=12, temperature=1.0, n=3)
    r1 = client.completions.create(seed=7, **kw)
    r2 = client.completions.create(seed=7, **kw)
    assert len(r1.choices) == 3
    assert [c.text for c in r1.choices] == [c.text for c in r2.choices]
    texts = {c.text for c in r1.choices} | {c.text for c in client.completions.create(seed=8, **kw).choices}
    assert len(texts) > 1  # samples differ


def test_logprobs_shape_and_values(server, client):
    _, _, tok = server
    r = client.completions.create(model="tiny", prompt=TEXT_PROMPT, max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(v <= 0 for v in lp.token_logprobs) and lp.text_offset[0] == 0
    for tokstr, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(v, abs=1e-5)  # greedy: the top-1 is the token
    assert "".join(lp.tokens).startswith(", the")


def test_echo_scores_the_prompt_like_the_model(server, ckpt):
    url, _, tok = server
    import torch

    from lmforge.infer import load_model_and_tokenizer

    m, _, _ = load_model_and_tokenizer(ckpt[0])
    ids = [tok.bos_id] + tok.encode(TEXT_PROMPT + ", the")
    body = {"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1}
    j = httpx.post(url + "/v1/completions", json=body).json()
    lp = j["choices"][0]["logprobs"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
    with torch.no_grad():
        want = m(torch.tensor([ids]))[0][0, :-1].float().log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])
    assert lp["token_logprobs"][1:] == pytest.approx(want.squeeze(1).tolist(), abs=1e-4)
    assert j["usage"]["completion_tokens"] == 0 and j["choices"][0]["text"] == tok.decode(ids)


def test_streaming_never_splits_a_character(server, client):
    _, _, tok = server
    assert any(len(tok.decode([t]).encode()) and "\ufffd" in tok.decode([t]) for t in tok.encode("🙂 日本")), \
        "the test needs characters split across tokens"
    whole = client.completions.create(model="tiny", prompt=TEXT_PROMPT, max_tokens=60, temperature=0).choices[0].text
    assert "🙂" in whole and "crème brûlée" in whole
    deltas = [c.choices[0].text for c in client.completions.create(model="tiny", prompt=TEXT_PROMPT, max_tokens=60,
                                                                    temperature=0, stream=True)]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == whole
    assert len([d for d in deltas if d]) > 10  # it really streamed


def test_metrics_expose_queue_running_tokens_and_ttft(server, client):
    url, _, _ = server
    client.completions.create(model="tiny", prompt="The", max_tokens=4, temperature=0)
    text = httpx.get(url + "/metrics").text
    for name in ("lmforge_queue_depth", "lmforge_running_requests", "lmforge_generation_tokens_per_second",
                 "lmforge_kv_blocks_total", "lmforge_time_to_first_token_seconds_count"):
        assert name in text, name
    assert 'lmforge_requests_total{endpoint="/v1/completions",status="200"}' in text
    gen = [l for l in text.splitlines() if l.startswith("lmforge_generated_tokens_total")]
    assert float(gen[0].split()[-1]) >= 4


def test_stream_with_stop_string_and_n(client):
    chunks = list(client.completions.create(model="tiny", prompt=TEXT_PROMPT, max_tokens=60, temperature=0,
                                            stop=["café"], stream=True, n=2))
    for i in (0, 1):
        text = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
        assert text == ", the naïve "  # the stop string never reaches the client
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].index == i][-1] == "stop"
