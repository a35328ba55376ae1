"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) over the continuous-batching engine.

    app = create_app(engine, tokenizer, "demo", api_key=None)     # engine: lmforge.infer.batching.BatchEngine
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: `POST /v1/completions`, `POST /v1/chat/completions` (SSE streaming: `data: {json}\\n\\n`
chunks ending with `data: [DONE]`), `GET /v1/models`, `GET /health` (503 with an OpenAI-shaped error
until the engine is ready, then 200), `GET /metrics` (Prometheus), `GET /` (the chat page).

How a request flows: the body is read with a size cap (413 past it), parsed and validated
(`protocol.py`: 400 naming the field, 404 for an unknown model), then one engine request per prompt
is submitted (`engine.submit`, which answers at once with `QueueFullError` when the bounded queue
is full: 429 with `Retry-After`). The engine calls `on_event` on its own thread; each event is
handed to the event loop with `loop.call_soon_threadsafe` onto the request's `asyncio.Queue`.
Streaming answers send each token's text as the engine releases it (the engine never splits a
UTF-8 character; the server also holds back text that could be the start of a stop string, so a
stop string never leaks into a stream). When the client goes away — a stream closed or a waiting
request disconnected — the engine requests are cancelled at once (`engine.cancel`), which frees
their batch slots and KV blocks.

Authentication: with an API key, every route but `/health` and the static chat page `/` needs
`Authorization: Bearer KEY` (the page itself holds no data; it asks for the key and sends it with its
API calls). Requests are stateless: any number of servers can sit behind a load balancer.

Prompt log-probabilities (`echo=true` with `logprobs`, used by lm-evaluation-harness for
log-likelihoods) and the top-N alternatives of non-streamed completions come from one scoring
forward pass over prompt + completion on a weight-sharing copy of the model with no KV cache (the
engine's caches are never touched), one pass at a time.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LmforgeError
from lmforge.serve.metrics import CONTENT_TYPE, Metrics
from lmforge.serve.protocol import (APIError, GenRequest, Limits, error_body, finish_reason, new_id, now,
                                    parse_chat, parse_completion, stop_holdback, usage)

log = logging.getLogger("lmforge.serve")

PUBLIC_PATHS = ("/health", "/")


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


ALLOW = "GET, HEAD, POST, OPTIONS"


def _request_id(headers: dict) -> str:
    """The client's `x-request-id` when it is a sane token (echoed back, as vLLM does), else a new one."""
    rid = headers.get("x-request-id", "")
    if 0 < len(rid) <= 128 and rid.isprintable() and rid.isascii():
        return rid
    return uuid.uuid4().hex


class _AuthAndSize:
    """Pure ASGI middleware (streams and disconnects pass through untouched): trailing slashes dropped
    (`/v1/models/` is `/v1/models`) and the OpenAI routes also answered without `/v1`, an `x-request-id` header on every answer, `OPTIONS` answered with
    the allowed methods, `HEAD` answered like `GET` without the body, the Bearer key on every route but
    the public ones, and a Content-Length over the body limit refused before reading."""

    def __init__(self, app, state: "ServerState"):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "/")
        new = path.rstrip("/") or "/"
        if new in ("/completions", "/chat/completions", "/models") or new.startswith("/models/"):
            new = "/v1" + new  # a base URL without /v1 (llama.cpp's server answers both)
        if new != path:
            path = new
            scope = dict(scope, path=path, raw_path=path.encode())
        rid = _request_id(headers)
        head = scope.get("method") == "HEAD"
        if head:
            scope = dict(scope, method="GET")

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=list(message.get("headers", [])) + [(b"x-request-id", rid.encode())])
            elif head and message["type"] == "http.response.body":
                message = dict(message, body=b"")
            await send(message)

        if scope.get("method") == "OPTIONS":
            return await Response(status_code=204, headers={"Allow": ALLOW})(scope, receive, send_with_id)
        err = None
        if self.state.api_key and path not in PUBLIC_PATHS:
            auth = headers.get("authorization", "")
            if auth[:7].lower() != "bearer " or auth[7:].strip() != self.state.api_key:
                err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               type="invalid_request_error", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
        cl = headers.get("content-length")
        if err is None and cl is not None:
            try:
                n = int(cl)
            except ValueError:
                n = -1
            if n < 0:
                err = APIError(400, "bad Content-Length header")
            elif n > self.state.limits.max_body_bytes:
                err = APIError(413, f"request body of {n} bytes is over the limit of {self.state.limits.max_body_bytes}",
                               code="request_too_large")
        if err is not None:
            if path in ("/v1/completions", "/v1/chat/completions"):
                self.state.metrics.request(path, err.status)
            resp = error_response(err)
            resp.headers["Connection"] = "close"
            return await resp(scope, receive, send_with_id)
        return await self.app(scope, receive, send_with_id)


class Scorer:
    """Log-probabilities of given tokens by one full forward pass, on a copy of the model that shares
    its weights (no copy of the parameters) and has no KV cache, so it never disturbs the engine."""

    def __init__(self, model):
        memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
        for m in model.modules():
            if getattr(m, "cache", None) is not None:
                memo[id(m.cache)] = None  # the copy gets no cache
        self.model = copy.deepcopy(model, memo)
        for m in self.model.modules():
            if hasattr(m, "cache"):
                m.cache = None
        self.lock = threading.Lock()

    def score(self, ids: list[int], top: int) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
        """(log p(ids[i] | ids[:i]) for every i, None for the first; the `top` most likely (id, logprob)
        at each position, None for the first)."""
        import torch

        with self.lock, torch.inference_mode():
            dev = next(self.model.parameters()).device
            x = torch.tensor([ids], dtype=torch.long, device=dev)
            logits, _ = self.model(x)
            lp = logits[0, :-1].float().log_softmax(-1)
            tgt = x[0, 1:]
            chosen = lp.gather(1, tgt[:, None]).squeeze(1).tolist()
            tops: list = [None]
            if top > 0:
                v, i = lp.topk(top, dim=-1)
                tops += [list(zip(ii, vv)) for ii, vv in zip(i.tolist(), v.tolist())]
            else:
                tops += [[] for _ in chosen]
        return [None] + chosen, tops


@dataclass
class ServerState:
    engine: object = None
    tokenizer: object = None
    model_name: str = "lmforge"
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    context: int = 0
    vocab: int = 0
    scorer: Scorer | None = None
    metrics: Metrics | None = None
    loading_error: str | None = None
    started: bool = False
    created: int = field(default_factory=now)
    fingerprint: str = field(default_factory=lambda: _fingerprint())

    @property
    def ready(self) -> bool:
        return self.started and self.engine is not None and bool(getattr(self.engine, "ready", True))

    def stats(self) -> dict:
        try:
            return self.engine.stats() if self.engine is not None else {}
        except Exception:  # a scrape never fails because of the engine
            return {}


def _fingerprint() -> str:
    try:
        from importlib.metadata import version

        return f"lmforge-{version('lmforge')}"
    except Exception:
        return "lmforge"


def _token_bytes(tok, i: int) -> bytes:
    if i in getattr(tok, "special_ids", ()):
        return tok.decode([i]).encode("utf-8")
    try:
        return bytes(tok.token_bytes(i))
    except Exception:
        return tok.decode([i]).encode("utf-8")


def _chat_lp_entry(tok, i: int, lp) -> dict:
    """One entry of chat's `logprobs.content` (without its top_logprobs)."""
    b = _token_bytes(tok, i)
    return {"token": b.decode("utf-8", errors="replace"), "logprob": _finite(lp) if lp is not None else None,
            "bytes": list(b)}


def _token_str(tok, i: int) -> str:
    if i in getattr(tok, "special_ids", ()):
        return tok.decode([i])
    try:
        b = tok.token_bytes(i)
    except Exception:
        return tok.decode([i])
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{c:02x}" for c in b)


def _offsets(tok, ids: list[int], start: int, skip_special: bool = False) -> list[int]:
    """Character offset of each token's start in decode(ids), plus `start` (special tokens count as
    no text with `skip_special`: a text prompt's added beginning-of-text token)."""
    out, acc = [], b""
    specials = getattr(tok, "special_ids", ())
    for i in ids:
        out.append(start + len(acc.decode("utf-8", errors="ignore")))
        if i in specials:
            acc += b"" if skip_special else tok.decode([i]).encode()
            continue
        try:
            acc += tok.token_bytes(i)
        except Exception:
            acc += tok.decode([i]).encode()
    return out


def _finite(x):
    return None if x is None or not math.isfinite(x) else x


class _Job:
    """The engine requests of one HTTP request (one per prompt) and their events on the loop."""

    def __init__(self, state: ServerState, req: GenRequest, endpoint: str):
        self.state, self.req, self.endpoint = state, req, endpoint
        self.queue: asyncio.Queue = asyncio.Queue()
        self.requests: list = []
        self.t0 = time.perf_counter()
        self.first_token_at: float | None = None
        self.done = False

    def submit(self) -> None:
        from lmforge.infer.batching import EngineStoppedError, QueueFullError
        from lmforge.infer.engine import ContextLimitError, SamplingParams, end_token_ids

        r = self.req
        stop_ids = [] if r.ignore_eos else None
        if r.stop_token_ids:  # vLLM's meaning: these as well as the end tokens (unless ignore_eos)
            stop_ids = sorted(set(r.stop_token_ids) | set([] if r.ignore_eos else end_token_ids(self.state.tokenizer)))
        params = SamplingParams(max_new_tokens=r.max_tokens, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                                repetition_penalty=r.repetition_penalty, stop=tuple(r.stop), n=r.n, seed=r.seed,
                                logprobs=r.logprobs is not None, stop_token_ids=stop_ids)
        loop = asyncio.get_running_loop()
        q = self.queue

        def make_cb(pi):
            def cb(ev):
                try:
                    loop.call_soon_threadsafe(q.put_nowait, (pi, ev))
                except RuntimeError:  # the loop is closed: the server is going away
                    pass
            return cb

        try:
            for pi, ids in enumerate(r.prompts):
                self.requests.append(self.state.engine.submit(ids, params, on_event=make_cb(pi)))
        except QueueFullError as e:
            self.cancel()
            ra = max(1, math.ceil(getattr(e, "retry_after", 1) or 1))
            raise APIError(429, f"the server's queue is full: {e}; retry after {ra} s", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(ra)}) from None
        except EngineStoppedError as e:
            self.cancel()
            raise APIError(503, f"the server is shutting down: {e}", type="server_error", code="shutting_down") from None
        except ContextLimitError as e:
            self.cancel()
            raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
        except LmforgeError as e:
            self.cancel()
            raise APIError(400, str(e)) from None
        self.state.metrics.prompt.inc(sum(len(p) for p in r.prompts) * 1)

    def cancel(self) -> None:
        if self.done:
            return
        self.done = True
        for rq in self.requests:
            try:
                self.state.engine.cancel(rq.id)
            except Exception:  # already finished
                pass

    async def events(self):
        """(choice index, event) until every choice has finished."""
        from lmforge.infer.batching import FinishEvent, TokenEvent

        left = len(self.req.prompts) * self.req.n
        while left:
            pi, ev = await self.queue.get()
            if isinstance(ev, TokenEvent):
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                    self.state.metrics.ttft.observe(self.first_token_at - self.t0)
                self.state.metrics.tokens(1)
            elif isinstance(ev, FinishEvent):
                left -= 1
                if ev.completion.finish_reason == "error":
                    self.cancel()
                    why = getattr(self.requests[pi], "error", None) if pi < len(self.requests) else None
                    raise APIError(500, f"generation failed: {why or 'engine error'}", type="server_error")
            elif isinstance(ev, BaseException):
                raise ev
            else:
                err = getattr(ev, "error", None)
                if err is not None:
                    raise APIError(500, f"generation failed: {err}", type="server_error")
                continue
            yield pi * self.req.n + ev.sample_index, ev
        self.done = True
        self.state.metrics.duration.observe(time.perf_counter() - self.t0)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


class _Stream:
    """Per-choice text released to a stream: held back while it could be the start of a stop string."""

    def __init__(self, stops):
        self.stops, self.raw, self.sent = stops, "", 0
        self.tokens = 0

    def push(self, delta: str) -> str:
        self.raw += delta
        limit = len(self.raw)
        for s in self.stops:
            at = self.raw.find(s)
            if at >= 0:
                limit = min(limit, at)
        limit = min(limit, len(self.raw) - stop_holdback(self.raw, self.stops)) if self.stops else limit
        out = self.raw[self.sent: limit] if limit > self.sent else ""
        self.sent = max(self.sent, limit)
        return out

    def finish(self, final: str | None) -> str:
        final = self.raw if final is None else final
        if final.startswith(self.raw[: self.sent]) and len(final) > self.sent:
            out = final[self.sent:]
            self.sent = len(final)
            return out
        return ""


def create_app(engine=None, tokenizer=None, model_name: str = "lmforge", api_key: str | None = None, *,
               model=None, limits: Limits | None = None, loader=None, drain_timeout: float | None = 30.0,
               cors_origins: list[str] | tuple[str, ...] = ()) -> FastAPI:
    """The FastAPI app. `engine`: a started or unstarted `BatchEngine` (started on the app's startup,
    in a thread; `/health` answers 503 until it is ready). `model`: the engine's model (default
    `engine.model`), for the context length, vocabulary and prompt scoring. `loader`: instead of
    engine/tokenizer, a callable returning (engine, tokenizer, model) run in a thread after the
    server binds. On shutdown (SIGTERM: uvicorn first finishes in-flight responses), the engine is
    shut down with drain=True. `cors_origins`: origins whose browser pages may call the API (CORS,
    off by default: the chat page at `/` is same-origin; "*" allows any origin)."""
    from contextlib import asynccontextmanager

    state = ServerState(model_name=model_name, api_key=api_key or None, limits=limits or Limits())
    state.metrics = Metrics(engine_stats=state.stats, ready=lambda: state.ready)

    def attach(eng, tok, mdl):
        mdl = mdl if mdl is not None else getattr(eng, "model", None)
        state.tokenizer = tok
        if mdl is not None:
            state.context = int(mdl.cfg.max_seq_len)
            state.vocab = int(mdl.cfg.vocab_size)
            state.scorer = Scorer(mdl)
        state.engine = eng

    def bring_up():
        try:
            if loader is not None:
                attach(*loader())
            if not getattr(state.engine, "ready", False):
                state.engine.start()
            state.started = True
            log.info("model %s ready", state.model_name)
        except LmforgeError as e:
            state.loading_error = str(e)
            log.error("loading failed: %s", e)
        except Exception as e:  # reported on /health, the process stays up to say so
            state.loading_error = f"{type(e).__name__}: {e}"
            log.exception("loading failed")

    if engine is not None:
        attach(engine, tokenizer, model)

    @asynccontextmanager
    async def lifespan(app):
        th = threading.Thread(target=bring_up, name="lmforge-serve-load", daemon=True)
        th.start()
        yield
        if state.engine is not None:
            await asyncio.to_thread(_shutdown_engine, state.engine, drain_timeout)

    app = FastAPI(title="lmforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.lmforge = state
    app.add_middleware(_AuthAndSize, state=state)
    if cors_origins:  # outermost: a browser's preflight carries no API key
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["*"], expose_headers=["x-request-id", "Retry-After"], max_age=600)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", None, code), status_code=exc.status_code)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception):
        log.exception("error while serving %s", request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error", None, None),
                            status_code=500)

    def not_ready() -> APIError:
        if state.loading_error:
            return APIError(503, f"the model failed to load: {state.loading_error}", type="server_error",
                            code="model_load_failed")
        return APIError(503, "the model is loading; retry shortly", type="server_error", code="model_loading",
                        headers={"Retry-After": "1"})

    @app.get("/health")
    async def health():
        if not state.ready:
            return error_response(not_ready())
        return {"status": "ok", "model": state.model_name}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files("lmforge.serve").joinpath("static/chat.html").read_text(encoding="utf-8"))

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card():
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "lmforge",
                "max_model_len": state.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name != state.model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {state.model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    async def read_json(request: Request, endpoint: str):
        if not state.ready:
            raise not_ready()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > state.limits.max_body_bytes:
                raise APIError(413, f"request body is over the limit of {state.limits.max_body_bytes} bytes",
                               code="request_too_large")
        try:
            data = json.loads(body.decode("utf-8-sig"))  # a byte-order mark (some Windows tools) is fine
        except (UnicodeDecodeError, ValueError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        return data

    def check_model(req: GenRequest):
        if req.model is not None and req.model != state.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {state.model_name!r}",
                           param="model", code="model_not_found")

    async def handle(request: Request, endpoint: str, parse):
        try:
            data = await read_json(request, endpoint)
            req = parse(data)
            check_model(req)
            out = [t for t in req.stop_token_ids if t >= state.vocab]
            if out and state.vocab:
                raise APIError(400, f"'stop_token_ids' holds {out[0]}, outside the vocabulary (0..{state.vocab - 1})",
                               param="stop_token_ids")
            if req.max_tokens == 0:
                result = await _score_only(state, req)
                state.metrics.request(endpoint, 200)
                return JSONResponse(result)
            job = _Job(state, req, endpoint)
            job.submit()
        except APIError as e:
            state.metrics.request(endpoint, e.status)
            return error_response(e)
        if req.stream:
            return StreamingResponse(_stream(state, job, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(state, job, request)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "/v1/completions",
                            lambda d: parse_completion(d, state.tokenizer, state.limits, state.context, state.vocab))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        from lmforge.tokenizer.chat import render_prompt

        return await handle(request, "/v1/chat/completions",
                            lambda d: parse_chat(d, state.tokenizer, state.limits, state.context, render_prompt))

    return app


def _shutdown_engine(engine, timeout):
    try:
        engine.shutdown(drain=True, timeout=timeout)
    except Exception:
        log.exception("engine shutdown")


async def _watch_disconnect(request: Request):
    while True:
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.1)


async def _complete(state: ServerState, job: _Job, request: Request):
    """A whole (non-streamed) answer; a client that disconnects while waiting cancels its requests."""
    req = job.req
    comps: dict[int, object] = {}

    async def collect():
        async for idx, ev in job.events():
            if hasattr(ev, "completion"):
                comps[idx] = ev.completion

    collector = asyncio.ensure_future(collect())
    watcher = asyncio.ensure_future(_watch_disconnect(request))
    try:
        done, _ = await asyncio.wait({collector, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if collector not in done:
            job.cancel()
            state.metrics.request(job.endpoint, 499)
            return Response(status_code=499)
        collector.result()
    except APIError as e:
        job.cancel()
        state.metrics.request(job.endpoint, e.status)
        return error_response(e)
    except asyncio.CancelledError:
        job.cancel()
        raise
    finally:
        watcher.cancel()
        if not collector.done():
            collector.cancel()
    tok = state.tokenizer
    choices = []
    n_prompt = sum(len(p) for p in req.prompts)
    n_gen = 0
    for idx in sorted(comps):
        c = comps[idx]
        pi = idx // req.n
        n_gen += len(c.token_ids)
        text = c.text if c.text is not None else tok.decode(c.token_ids)
        fr = finish_reason(c.finish_reason)
        if req.kind == "chat":
            lp = None
            if req.logprobs is not None:
                lp = await _chat_logprobs(state, req.prompts[pi], list(c.token_ids), req.logprobs)
            choices.append({"index": idx, "message": {"role": "assistant", "content": text, "refusal": None},
                            "logprobs": lp, "finish_reason": fr})
            continue
        prompt_text = req.prompt_texts[pi] if req.prompt_texts[pi] is not None else tok.decode(req.prompts[pi])
        full = prompt_text + text if req.echo else text
        lp = None
        if req.logprobs is not None:
            lp = await _logprobs(state, req.prompts[pi], list(c.token_ids), req.logprobs, req.echo, prompt_text,
                                 req.prompt_texts[pi] is not None)
        choices.append({"index": idx, "text": full, "logprobs": lp, "finish_reason": fr})
    obj = "chat.completion" if req.kind == "chat" else "text_completion"
    body = {"id": new_id("chatcmpl" if req.kind == "chat" else "cmpl"), "object": obj, "created": now(),
            "model": state.model_name, "system_fingerprint": state.fingerprint, "choices": choices,
            "usage": usage(n_prompt, n_gen)}
    state.metrics.request(job.endpoint, 200)
    return JSONResponse(body)


async def _logprobs(state: ServerState, prompt: list[int], gen: list[int], top: int, echo: bool, prompt_text: str,
                    text_prompt: bool = False):
    """OpenAI's completions `logprobs` object for the generated tokens (and the prompt's with echo)."""
    tok = state.tokenizer
    ids = prompt + gen
    ids = ids[: max(state.context, len(prompt))]
    lps, tops = await asyncio.to_thread(state.scorer.score, ids, top)
    first = 0 if echo else len(prompt)
    sel = list(range(first, len(ids)))
    tokens = [_token_str(tok, ids[i]) for i in sel]
    if echo:  # offsets run over the echoed prompt text, then the completion
        offs = _offsets(tok, prompt, 0, skip_special=text_prompt) + _offsets(tok, gen, len(prompt_text))
    else:
        offs = _offsets(tok, gen, 0)
    top_out = []
    for i in sel:
        t = tops[i]
        top_out.append(None if t is None else {_token_str(tok, a): _finite(b) for a, b in t[:max(top, 0)]})
    return {"tokens": tokens, "token_logprobs": [_finite(lps[i]) for i in sel], "top_logprobs": top_out,
            "text_offset": offs}


async def _chat_logprobs(state: ServerState, prompt: list[int], gen: list[int], top: int) -> dict:
    """Chat's `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": None}`
    for the generated tokens, scored under the raw model distribution (as OpenAI and vLLM report them)."""
    tok = state.tokenizer
    ids = (prompt + gen)[: max(state.context, len(prompt))]
    if len(ids) == len(prompt):
        return {"content": [], "refusal": None}
    lps, tops = await asyncio.to_thread(state.scorer.score, ids, top)
    content = []
    for i in range(len(prompt), len(ids)):
        e = _chat_lp_entry(tok, ids[i], lps[i])
        e["top_logprobs"] = [_chat_lp_entry(tok, a, b) for a, b in (tops[i] or [])[:top]]
        content.append(e)
    return {"content": content, "refusal": None}


async def _score_only(state: ServerState, req: GenRequest) -> dict:
    """max_tokens 0 with echo: the prompt and its log-probabilities, nothing generated."""
    tok = state.tokenizer
    choices = []
    for pi, ids in enumerate(req.prompts):
        text = req.prompt_texts[pi] if req.prompt_texts[pi] is not None else tok.decode(ids)
        lp = (await _logprobs(state, ids, [], req.logprobs, True, text, req.prompt_texts[pi] is not None)
              if req.logprobs is not None else None)
        for s in range(req.n):
            choices.append({"index": pi * req.n + s, "text": text, "logprobs": lp, "finish_reason": "length"})
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": state.model_name,
            "system_fingerprint": state.fingerprint, "choices": choices, "usage": usage(sum(len(p) for p in req.prompts), 0)}


async def _stream(state: ServerState, job: _Job, request: Request):
    """SSE chunks: OpenAI's `text_completion` / `chat.completion.chunk` objects, then `[DONE]`. A
    client that goes away (the generator is cancelled or closed) cancels the engine requests."""
    req = job.req
    tok = state.tokenizer
    rid = new_id("chatcmpl" if req.kind == "chat" else "cmpl")
    created = now()
    chat = req.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    n_choices = len(req.prompts) * req.n
    streams = [_Stream(req.stop) for _ in range(n_choices)]
    offsets = [0] * n_choices
    n_gen = 0
    status = 499

    def chunk(idx, text, fr=None, lp=None, role=False):
        if chat:
            delta = {"role": "assistant", "content": text} if role else ({"content": text} if text or fr is None else {})
            ch = {"index": idx, "delta": delta, "logprobs": lp, "finish_reason": fr}
        else:
            ch = {"index": idx, "text": text, "logprobs": lp, "finish_reason": fr}
        out = {"id": rid, "object": obj, "created": created, "model": state.model_name,
               "system_fingerprint": state.fingerprint, "choices": [ch]}
        if req.include_usage:
            out["usage"] = None
        return _sse(out)

    try:
        if chat:
            for idx in range(n_choices):
                yield chunk(idx, "", role=True)
        if req.echo:
            for idx in range(n_choices):
                pi = idx // req.n
                text = req.prompt_texts[pi] if req.prompt_texts[pi] is not None else tok.decode(req.prompts[pi])
                offsets[idx] = len(text)
                yield chunk(idx, text)
        async for idx, ev in job.events():
            st = streams[idx]
            if hasattr(ev, "completion"):
                c = ev.completion
                n_gen += len(c.token_ids)
                rest = st.finish(c.text)
                yield chunk(idx, rest, fr=finish_reason(c.finish_reason))
                continue
            delta = st.push(ev.text or "")
            lp = None
            if req.logprobs is not None and chat:
                lp = {"content": [dict(_chat_lp_entry(tok, ev.token_id, ev.logprob), top_logprobs=[])],
                      "refusal": None}
            elif req.logprobs is not None:
                lp = {"tokens": [_token_str(tok, ev.token_id)], "token_logprobs": [_finite(ev.logprob)],
                      "top_logprobs": [{}], "text_offset": [offsets[idx]]}
            offsets[idx] += len(delta)
            if delta or lp is not None:
                yield chunk(idx, delta, lp=lp)
        if req.include_usage:
            yield _sse({"id": rid, "object": obj, "created": created, "model": state.model_name,
                        "system_fingerprint": state.fingerprint, "choices": [],
                        "usage": usage(sum(len(p) for p in req.prompts), n_gen)})
        yield b"data: [DONE]\n\n"
        status = 200
    except APIError as e:
        status = e.status
        yield _sse(e.body())
        yield b"data: [DONE]\n\n"
    finally:
        job.cancel()  # no-op when every choice finished; frees the slots of a client that left
        state.metrics.request(job.endpoint, status)


__all__ = ["create_app", "ServerState", "Scorer", "PUBLIC_PATHS"]
