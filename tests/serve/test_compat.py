"""What real clients send (the `openai` client, LangChain's ChatOpenAI, LiteLLM, curl users,
lm-evaluation-harness): accepted and honoured, or refused with an OpenAI-shaped 400 naming the field.
LangChain and LiteLLM are driven for real when installed (`langchain-openai`, `litellm`)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from tests.serve.conftest import CHAT_A, CHAT_Q, TEXT_PROMPT, TEXT_REST, make_app, serving

openai = pytest.importorskip("openai")
USER = [{"role": "user", "content": CHAT_Q}]


@pytest.fixture(scope="module")
def client(server):
    url, _, _ = server
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def _err(r, param, code=None):
    assert r.status_code == 400, r.text
    e = r.json()["error"]
    assert e["param"] == param and e["message"] and e["type"] == "invalid_request_error", e
    if code:
        assert e["code"] == code
    return e


def _sse(r) -> list[dict]:
    lines = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_chat_accepts_what_clients_send(server, client):
    url, _, _ = server
    # content as text parts (openai client, LangChain), `name`, unknown and inert OpenAI fields
    body = {"model": "tiny", "temperature": 0, "user": "u-1", "store": False, "metadata": {"a": "b"},
            "parallel_tool_calls": False, "service_tier": "auto", "some_future_field": {"x": 1},
            "response_format": {"type": "text"}, "tool_choice": "none", "modalities": ["text"],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "logprobs": False,
            "messages": [{"role": "user", "name": "ann",
                          "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello"}]}]}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == CHAT_A
    # max_completion_tokens (newer clients) wins over max_tokens
    r = client.chat.completions.create(model="tiny", messages=USER, temperature=0, max_completion_tokens=3,
                                       max_tokens=50)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    # stop as a plain string
    r = client.chat.completions.create(model="tiny", messages=USER, temperature=0, stop="café")
    assert r.choices[0].message.content == CHAT_A.split("café")[0] and r.choices[0].finish_reason == "stop"
    # developer is the system role
    sys_msgs = [{"role": "system", "content": "Be brief."}] + USER
    dev_msgs = [{"role": "developer", "content": "Be brief."}] + USER
    a = client.chat.completions.create(model="tiny", messages=sys_msgs, temperature=0, max_tokens=8)
    b = client.chat.completions.create(model="tiny", messages=dev_msgs, temperature=0, max_tokens=8)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_chat_refuses_what_it_cannot_do_by_name(server):
    url, _, _ = server
    ch = url + "/v1/chat/completions"
    tool = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    cases = [({"response_format": {"type": "json_object"}}, "response_format"),
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
             ({"tools": tool}, "tools"), ({"tools": tool, "tool_choice": "auto"}, "tools"),
             ({"tool_choice": "required"}, "tool_choice"), ({"functions": [{"name": "f"}]}, "functions"),
             ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": -1}, "frequency_penalty"),
             ({"logit_bias": {"5": 10}}, "logit_bias"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
             ({"logprobs": "yes"}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
             ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
             ({"logprobs": True, "top_logprobs": 2, "stream": True}, "top_logprobs"),
             ({"modalities": ["text", "audio"]}, "modalities"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
             ({"stream_options": {"include_usage": True}}, "stream_options"), ({"echo": True}, "echo"),
             ({"seed": 2 ** 70}, "seed"), ({"seed": 1.5}, "seed")]
    for extra, param in cases:
        _err(httpx.post(ch, json={"messages": USER, **extra}), param)
    for msgs, param in (
            ([{"role": "tool", "content": "42", "tool_call_id": "c1"}], "messages[0].role"),
            ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
             "messages[0].content"),
            ([{"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}], "messages[0].tool_calls"),
            ([{"role": "user", "content": None}], "messages[0].content")):
        _err(httpx.post(ch, json={"messages": msgs}), param)
    # the server keeps answering; a 64-bit seed (and an integral float) is fine
    assert httpx.post(ch, json={"messages": USER, "max_tokens": 2, "seed": 2 ** 64 - 1}).status_code == 200
    assert httpx.post(ch, json={"messages": USER, "max_tokens": 2, "seed": -(2 ** 63)}).status_code == 200
    assert httpx.post(ch, json={"messages": USER, "max_tokens": 2, "seed": 7.0}).status_code == 200


def _model_logprobs(ckpt, ids: list[int]) -> torch.Tensor:
    from lmforge.infer import load_model_and_tokenizer

    model, _, _ = load_model_and_tokenizer(ckpt[0])
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0].float().log_softmax(-1)


def test_chat_logprobs_and_top_logprobs(server, client, ckpt):
    _, _, tok = server
    r = client.chat.completions.create(model="tiny", messages=USER, temperature=0, logprobs=True, top_logprobs=3)
    c = r.choices[0]
    content = c.logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8").startswith(CHAT_A)
    from lmforge.tokenizer.chat import render_prompt

    prompt = render_prompt(tok, USER)
    lp = _model_logprobs(ckpt, prompt + _ids_of(tok, content))
    for k, e in enumerate(content):
        assert len(e.top_logprobs) == 3
        assert e.top_logprobs[0].token == e.token  # greedy: the chosen token is the most likely
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
        assert e.logprob == pytest.approx(lp[len(prompt) + k - 1].max().item(), abs=1e-3)
    # streamed: each token's logprob in its chunk, top_logprobs empty
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, temperature=0, logprobs=True,
                                                 stream=True))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-3)


def _ids_of(tok, content) -> list[int]:
    ids = []
    for e in content:
        b = bytes(e.bytes)
        ids.append(next(i for i in range(tok.vocab_size) if _tb(tok, i) == b))
    return ids


def _tb(tok, i):
    if i in tok.special_ids:
        return tok.decode([i]).encode()
    return bytes(tok.token_bytes(i))


def test_chat_stream_with_n_indexes_each_choice(server, client):
    url, _, _ = server
    one = client.chat.completions.create(model="tiny", messages=USER, temperature=0).usage.completion_tokens
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   json={"messages": USER, "temperature": 0, "n": 2, "stream": True,
                         "stream_options": {"include_usage": True}})
    chunks = _sse(r)
    texts, finish, roles = {0: "", 1: ""}, {}, set()
    for ch in chunks[:-1]:
        assert ch["object"] == "chat.completion.chunk" and ch["id"] == chunks[0]["id"]
        assert ch["system_fingerprint"] and isinstance(ch["created"], int)
        (c,) = ch["choices"]
        roles |= {c["index"]} if c["delta"].get("role") == "assistant" else set()
        texts[c["index"]] += c["delta"].get("content") or ""
        if c["finish_reason"]:
            finish[c["index"]] = c["finish_reason"]
    assert roles == {0, 1} and texts == {0: CHAT_A, 1: CHAT_A} and finish == {0: "stop", 1: "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2 * one


def test_completions_parameters(server, client):
    url, _, tok = server
    c = url + "/v1/completions"
    ids = [tok.bos_id] + tok.encode(TEXT_PROMPT)
    # max_tokens null fills the context (ignore_eos so the end-of-text token does not stop it)
    r = httpx.post(c, json={"prompt": TEXT_PROMPT, "max_tokens": None, "ignore_eos": True, "temperature": 0},
                   timeout=60).json()
    assert r["usage"]["completion_tokens"] == 128 - len(ids) and r["choices"][0]["finish_reason"] == "length"
    # omitted max_tokens is OpenAI's default 16
    r = httpx.post(c, json={"prompt": TEXT_PROMPT, "ignore_eos": True}, timeout=60).json()
    assert r["usage"]["completion_tokens"] == 16
    # zero penalties, an empty logit_bias, best_of == n and `user` are accepted
    r = client.completions.create(model="tiny", prompt=TEXT_PROMPT, max_tokens=6, temperature=0, presence_penalty=0,
                                  frequency_penalty=0, logit_bias={}, best_of=2, n=2, user="me")
    assert [ch.text for ch in r.choices] == [r.choices[0].text] * 2 and TEXT_REST.startswith(r.choices[0].text)
    # prompt as a list of token-id lists: one choice per prompt
    r = client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=4, temperature=0)
    assert [ch.index for ch in r.choices] == [0, 1] and TEXT_REST.startswith(r.choices[0].text)
    # echo with generation and logprobs alternatives
    r = client.completions.create(model="tiny", prompt=TEXT_PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2)
    ch = r.choices[0]
    assert ch.text.startswith(TEXT_PROMPT) and TEXT_REST.startswith(ch.text[len(TEXT_PROMPT):])
    assert len(ch.logprobs.tokens) == len(ids) + 3 == len(ch.logprobs.token_logprobs)
    assert ch.logprobs.token_logprobs[0] is None and ch.logprobs.top_logprobs[0] is None
    assert all(len(t) == 2 for t in ch.logprobs.top_logprobs[1:])
    for bad, param in (({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"), ({"presence_penalty": 1}, "presence_penalty"),
                       ({"logit_bias": {"3": -100}}, "logit_bias"), ({"logprobs": 6}, "logprobs"),
                       ({"logprobs": 2, "stream": True}, "logprobs"), ({"frequency_penalty": "x"}, "frequency_penalty"),
                       ({"tools": [{"type": "function"}]}, "tools")):
        _err(httpx.post(c, json={"prompt": "x", **bad}), param)


def test_vllm_extensions(server):
    """Clients written for vLLM send its extensions (`extra_body`): `stop_token_ids` is implemented,
    the others are accepted at their "off" value and refused by name otherwise."""
    url, _, tok = server
    c = url + "/v1/completions"
    base = {"prompt": TEXT_PROMPT, "max_tokens": 30, "temperature": 0}
    full = httpx.post(c, json=base, timeout=60).json()["choices"][0]
    first = tok.encode(full["text"])[:4]
    cut = httpx.post(c, json={**base, "stop_token_ids": [first[3]]}, timeout=60).json()["choices"][0]
    assert cut["finish_reason"] == "stop" and full["text"].startswith(cut["text"]) and len(cut["text"]) < len(full["text"])
    off = {"min_p": 0, "min_tokens": 0, "use_beam_search": False, "skip_special_tokens": True,
           "include_stop_str_in_output": False, "add_generation_prompt": True, "length_penalty": 1.0}
    assert httpx.post(c, json={**base, **off}, timeout=60).json()["choices"][0]["text"] == full["text"]
    for k, v in (("min_p", 0.1), ("min_tokens", 5), ("prompt_logprobs", 1), ("use_beam_search", True),
                 ("guided_json", {"type": "object"}), ("guided_choice", ["a"]), ("skip_special_tokens", False),
                 ("include_stop_str_in_output", True), ("stop_token_ids", [-1]), ("stop_token_ids", [99999]),
                 ("add_generation_prompt", 0)):
        _err(httpx.post(c, json={**base, k: v}), k)
    _err(httpx.post(url + "/v1/chat/completions", json={"messages": USER, "continue_final_message": True}),
         "continue_final_message")


def test_completion_stream_logprobs_zero(server):
    url, _, _ = server
    chunks = _sse(httpx.post(url + "/v1/completions", timeout=60,
                             json={"prompt": TEXT_PROMPT, "max_tokens": 4, "temperature": 0, "stream": True,
                                   "logprobs": 0}))
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert len(lps) == 4 and all(len(x["tokens"]) == 1 and x["top_logprobs"] == [{}] for x in lps)


def test_http_details(server):
    url, _, _ = server
    h = httpx.head(url + "/health")
    assert h.status_code == 200 and h.content == b""
    assert httpx.head(url + "/v1/models").status_code == 200
    o = httpx.options(url + "/v1/chat/completions")
    assert o.status_code == 204 and "POST" in o.headers["allow"]
    # trailing slashes are the same routes (no redirect)
    assert httpx.get(url + "/v1/models/").json()["data"][0]["id"] == "tiny"
    assert httpx.get(url + "/v1/models/tiny/").json()["id"] == "tiny"
    r = httpx.post(url + "/v1/completions/", json={"prompt": TEXT_PROMPT, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int) and body["system_fingerprint"]
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    # a base URL without /v1, and curl's default form content type on a JSON body
    assert httpx.get(url + "/models").json()["data"][0]["id"] == "tiny"
    r3 = httpx.post(url + "/chat/completions", content=json.dumps({"messages": USER, "max_tokens": 2}),
                    headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=60)
    assert r3.status_code == 200 and r3.json()["object"] == "chat.completion"
    bom = b"\xef\xbb\xbf" + json.dumps({"prompt": "x", "max_tokens": 1}).encode()
    assert httpx.post(url + "/v1/completions", content=bom, timeout=60).status_code == 200
    # x-request-id: the client's echoed, else a fresh one per answer (errors too)
    assert len(r.headers["x-request-id"]) >= 16
    r2 = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2},
                    headers={"x-request-id": "trace-42"}, timeout=60)
    assert r2.headers["x-request-id"] == "trace-42" and r2.json()["object"] == "chat.completion"
    assert r2.json()["choices"][0]["message"]["role"] == "assistant"
    e = httpx.post(url + "/v1/completions", json={"prompt": "x", "n": 0}, headers={"x-request-id": "t-7"})
    assert e.status_code == 400 and e.headers["x-request-id"] == "t-7"
    # a method a route does not take is an OpenAI-shaped 405
    m = httpx.get(url + "/v1/completions")
    assert m.status_code == 405 and m.json()["error"]["code"] == "method_not_allowed"


def test_cors_is_off_by_default_and_opt_in(server, ckpt):
    url, _, _ = server
    r = httpx.get(url + "/v1/models", headers={"Origin": "http://elsewhere.test"})
    assert "access-control-allow-origin" not in r.headers
    app, _, _ = make_app(ckpt[0], api_key="k", cors_origins=("http://ui.test",))
    with serving(app) as u:
        pre = httpx.options(u + "/v1/chat/completions", headers={
            "Origin": "http://ui.test", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://ui.test"
        r = httpx.post(u + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2},
                       headers={"Origin": "http://ui.test", "Authorization": "Bearer k"}, timeout=60)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://ui.test"
        assert httpx.get(u + "/v1/models", headers={"Authorization": "bearer k"}).status_code == 200  # any case
        no_key = httpx.get(u + "/v1/models", headers={"Origin": "http://ui.test"})
        assert no_key.status_code == 401 and no_key.headers["access-control-allow-origin"] == "http://ui.test"
        other = httpx.get(u + "/v1/models", headers={"Origin": "http://evil.test", "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in other.headers


def test_langchain_chat_openai(server):
    """LangChain's ChatOpenAI (invoke, stream with usage, batch, logprobs) against the server."""
    lc = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, SystemMessage

    url, _, _ = server
    llm = lc.ChatOpenAI(base_url=url + "/v1", api_key="unused", model="tiny", temperature=0, max_tokens=40,
                        max_retries=0, stream_usage=True)
    msg = llm.invoke([HumanMessage(content=[{"type": "text", "text": CHAT_Q}])])
    assert msg.content == CHAT_A and msg.response_metadata["finish_reason"] == "stop"
    assert msg.usage_metadata["output_tokens"] > 0
    parts = list(llm.stream(CHAT_Q))
    assert "".join(p.content for p in parts) == CHAT_A
    assert sum((p.usage_metadata or {}).get("output_tokens", 0) for p in parts) == msg.usage_metadata["output_tokens"]
    out = llm.batch([CHAT_Q, [SystemMessage(content="Be brief."), HumanMessage(content=CHAT_Q)]])
    assert out[0].content == CHAT_A and isinstance(out[1].content, str)
    lp = llm.bind(logprobs=True, top_logprobs=2).invoke(CHAT_Q)
    content = lp.response_metadata["logprobs"]["content"]
    assert "".join(e["token"] for e in content).startswith(CHAT_A[:5]) and len(content[0]["top_logprobs"]) == 2
    tools = llm.bind_tools([{"type": "function", "function": {"name": "f", "description": "x",
                                                               "parameters": {"type": "object", "properties": {}}}}])
    with pytest.raises(Exception, match="tools"):
        tools.invoke(CHAT_Q)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_litellm_openai_compatible_provider(server, monkeypatch):
    """LiteLLM's `openai/` provider (the way it reaches vLLM and other OpenAI-compatible servers)."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price list at import
    litellm = pytest.importorskip("litellm")

    url, _, _ = server
    kw = dict(model="openai/tiny", api_base=url + "/v1", api_key="unused", temperature=0, max_tokens=40,
              num_retries=0)
    r = litellm.completion(messages=USER, **kw)
    assert r.choices[0].message.content == CHAT_A and r.usage.completion_tokens > 0
    chunks = list(litellm.completion(messages=USER, stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == CHAT_A
    t = litellm.text_completion(model="openai/tiny", api_base=url + "/v1", api_key="unused", prompt=TEXT_PROMPT,
                                max_tokens=6, temperature=0)
    assert TEXT_REST.startswith(t.choices[0].text) and t.choices[0].text
    with pytest.raises(Exception, match="response_format"):
        litellm.completion(messages=USER, response_format={"type": "json_object"}, **kw)


def test_vanishing_sampling_values_are_greedy_not_a_crash(server):
    """A temperature or top_p below 1e-5 (vLLM's epsilon) is greedy / the top token; dividing the
    logits by it would overflow to NaN and fail every request in the engine's batch."""
    url, _, _ = server
    c = url + "/v1/completions"
    base = {"prompt": TEXT_PROMPT, "max_tokens": 12}
    greedy = httpx.post(c, json={**base, "temperature": 0}, timeout=60).json()["choices"][0]["text"]
    for extra in ({"temperature": 1e-45}, {"temperature": 5e-324}, {"top_p": 1e-300}, {"top_p": 1e-9, "seed": 3}):
        r = httpx.post(c, json={**base, **extra}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == greedy, (extra, r.text)
    _err(httpx.post(c, json={**base, "repetition_penalty": 1e-300}), "repetition_penalty")
