"""Raw HTTP: OpenAI-shaped 4xx errors, API keys, 429 + Retry-After at the queue limit, client
disconnects freeing their slot; the server keeps serving after every bad request."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from lmforge.serve.protocol import Limits
from tests.serve.conftest import TEXT_PROMPT, make_app, serving


def _err(r, status, code=None, param=None):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if code is not None:
        assert e["code"] == code
    if param is not None:
        assert e["param"] == param
    return e


@pytest.fixture(scope="module")
def guarded(ckpt):
    app, engine, _ = make_app(ckpt[0], api_key="sekret", limits=Limits(max_body_bytes=4096, max_messages=4))
    with serving(app) as url:
        yield url, engine


H = {"Authorization": "Bearer sekret"}


def test_bad_requests_get_openai_shaped_errors(guarded):
    url, _ = guarded
    c = url + "/v1/completions"
    _err(httpx.post(c, content=b"{not json", headers=H), 400, "invalid_json")
    _err(httpx.post(c, content=b"\xff\xfe", headers=H), 400, "invalid_json")
    _err(httpx.post(c, json=[1, 2], headers=H), 400)
    _err(httpx.post(c, json={"model": "gpt-9", "prompt": "x"}, headers=H), 404, "model_not_found", "model")
    _err(httpx.post(c, json={"prompt": "x", "max_tokens": 500}, headers=H), 400, "context_length_exceeded", "max_tokens")
    _err(httpx.post(c, json={"prompt": list(range(1, 130)), "max_tokens": 1}, headers=H), 400, "context_length_exceeded")
    _err(httpx.post(c, json={"prompt": [1, 99999]}, headers=H), 400, param="prompt")
    for field, value in (("temperature", -1), ("temperature", "hot"), ("top_p", 0), ("top_p", 1.5), ("n", 0),
                         ("n", 1000), ("top_k", -5), ("max_tokens", -1), ("logprobs", 9), ("stop", [1]),
                         ("seed", "x"), ("presence_penalty", 0.5), ("logit_bias", {"1": 2})):
        _err(httpx.post(c, json={"prompt": "x", field: value}, headers=H), 400, param=field)
    _err(httpx.post(c, json={"prompt": "x", "max_tokens": 0}, headers=H), 400, param="max_tokens")  # 0 needs echo
    _err(httpx.post(c, json={}, headers=H), 400, param="prompt")
    ch = url + "/v1/chat/completions"
    _err(httpx.post(ch, json={"messages": []}, headers=H), 400, param="messages")
    _err(httpx.post(ch, json={"messages": [{"role": "wizard", "content": "x"}]}, headers=H), 400)
    _err(httpx.post(ch, json={"messages": [{"role": "user", "content": "x"}] * 5}, headers=H), 400, param="messages")
    _err(httpx.post(ch, json={"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
                    headers=H), 400, param="messages")
    _err(httpx.post(url + "/v1/nowhere", headers=H), 404)
    _err(httpx.get(c, headers=H), 405)
    # oversize bodies: by Content-Length, and streamed without one
    _err(httpx.post(c, content=b"x" * 5000, headers=H), 413, "request_too_large")
    _err(httpx.post(c, content=iter([b"{", b" " * 5000, b"}"]), headers=H), 413, "request_too_large")
    r = httpx.post(c, json={"prompt": TEXT_PROMPT, "max_tokens": 2}, headers=H)  # still serving
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_api_key_on_every_route_but_health(guarded):
    url, _ = guarded
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/").status_code == 200 and "<title>lmforge chat</title>" in httpx.get(url + "/").text
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions")):
        _err(httpx.request(method, url + path, json={"prompt": "x"}), 401, "invalid_api_key")
        _err(httpx.request(method, url + path, json={"prompt": "x"}, headers={"Authorization": "Bearer nope"}), 401)
    assert httpx.get(url + "/v1/models", headers=H).status_code == 200


def test_queue_full_answers_429_with_retry_after_at_once(ckpt):
    gate = threading.Event()
    app, engine, _ = make_app(ckpt[0], gate=gate, max_running=1, max_queue=1)
    gate.set()  # open while the server starts
    with serving(app) as url:
        gate.clear()  # from here the engine blocks in its next forward
        body = {"prompt": TEXT_PROMPT, "max_tokens": 20}
        results = []

        def post():
            results.append(httpx.post(url + "/v1/completions", json=body, timeout=60))

        threads = [threading.Thread(target=post) for _ in range(2)]
        threads[0].start()
        t0 = time.time()
        while engine.stats()["running"] < 1:  # the first request holds the only slot (blocked in its prefill)
            assert time.time() - t0 < 10, engine.stats()
            time.sleep(0.01)
        threads[1].start()
        while engine.stats()["queue_depth"] < 1:  # the second one waits in the queue
            assert time.time() - t0 < 10, engine.stats()
            time.sleep(0.01)
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json=body)
        assert time.perf_counter() - t0 < 2.0  # at once, while the engine is blocked
        _err(r, 429, "queue_full")
        assert int(r.headers["Retry-After"]) >= 1
        metrics = httpx.get(url + "/metrics").text
        assert 'lmforge_requests_total{endpoint="/v1/completions",status="429"} 1.0' in metrics
        assert "lmforge_queue_depth 1.0" in metrics and "lmforge_running_requests 1.0" in metrics
        gate.set()
        for t in threads:
            t.join(60)
        assert [r.status_code for r in results] == [200, 200]  # both were served


def test_client_disconnect_frees_the_slot(ckpt):
    app, engine, _ = make_app(ckpt[0], slow=0.02, max_running=2)
    with serving(app) as url:
        body = {"prompt": TEXT_PROMPT, "max_tokens": 100, "temperature": 1.0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = [json.loads(l[6:]) for l in (next(lines), next(lines), next(lines)) if l.startswith("data: ")]
            assert got and engine.stats()["running"] == 1
        # the connection is closed mid-stream: the engine request is cancelled at once
        t0 = time.time()
        while engine.stats()["running"] or engine.stats()["kv_blocks_used"]:
            assert time.time() - t0 < 3, engine.stats()
            time.sleep(0.02)
        assert engine.stats()["requests_cancelled"] == 1
        # a non-streamed request whose client gives up is cancelled too
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=0.5)
        t0 = time.time()
        while engine.stats()["requests_cancelled"] < 2:
            assert time.time() - t0 < 3, engine.stats()
            time.sleep(0.02)
        assert engine.stats()["running"] == 0
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200


def test_health_is_503_while_loading_then_200(ckpt):
    from lmforge.infer import load_model_and_tokenizer
    from lmforge.infer.batching import BatchEngine
    from lmforge.serve.app import create_app
    from tests.serve.conftest import free_socket

    release = threading.Event()

    def loader():
        release.wait(30)
        model, tok, _ = load_model_and_tokenizer(ckpt[0])
        return BatchEngine(model, tok), tok, model

    import uvicorn

    app = create_app(model_name="tiny", loader=loader)
    sock = free_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    try:
        t0 = time.time()
        while not server.started:
            assert time.time() - t0 < 30
            time.sleep(0.02)
        _err(httpx.get(url + "/health"), 503, "model_loading")
        _err(httpx.post(url + "/v1/completions", json={"prompt": "x"}), 503, "model_loading")
        release.set()
        while httpx.get(url + "/health").status_code != 200:
            assert time.time() - t0 < 60
            time.sleep(0.05)
        assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        release.set()
        server.should_exit = True
        th.join(30)


def test_a_failed_load_is_reported_on_health(ckpt):
    from lmforge.errors import InputError
    from lmforge.serve.app import create_app

    def loader():
        raise InputError("checksum mismatch for model.safetensors")

    app = create_app(model_name="tiny", loader=loader)
    with __import__("fastapi.testclient", fromlist=["TestClient"]).TestClient(app) as c:
        t0 = time.time()
        while "failed" not in c.get("/health").text:
            assert time.time() - t0 < 10
            time.sleep(0.02)
        e = _err(c.get("/health"), 503, "model_load_failed")
        assert "checksum mismatch" in e["message"]
