"""The OpenAI wire format: request validation, response bodies, and OpenAI-shaped errors.

Requests are parsed by hand (not by a schema library) so every problem becomes one OpenAI-shaped
error `{"error": {"message", "type", "param", "code"}}` with the right status, naming the field:

- `/v1/completions`: `prompt` as a string, a list of token ids, or a list of either (one choice
  group per prompt); `max_tokens` (default 16; null fills the context; 0 only with `echo`, which
  then scores the prompt), `temperature`, `top_p`, `top_k` (extension), `repetition_penalty`
  (extension), `stop` (string or up to 4 strings), `ignore_eos` (vLLM's extension), `n`, `seed`,
  `logprobs` (0..5: each token's log-probability plus that many alternatives; alternatives not
  streamed), `echo`, `stream`, `stream_options.include_usage`;
- `/v1/chat/completions`: `messages` (roles system / developer (= system) / user / assistant, string
  content or a list of text parts; `name` accepted and not shown to the model), rendered with the
  model's chat template; the same sampling fields, `max_completion_tokens` or `max_tokens` (default:
  what the context leaves), `logprobs` + `top_logprobs` (0..20; alternatives not streamed),
  `response_format` {"type": "text"}, `tools` only with `tool_choice` "none".

Fields OpenAI defines that change the output but that this server does not implement
(`best_of` other than n, `logit_bias` other than zeros, `suffix`, function calling, structured
`response_format`, `presence_penalty` / `frequency_penalty` other than 0, chat `echo`, audio) are
refused by name with a 400, never ignored; fields that change nothing here (`user`, `metadata`,
`store`, `service_tier`, `parallel_tool_calls`, ...) and unknown fields are ignored, as OpenAI's
forward-compatible clients expect.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field

MAX_STOP = 4
SAMPLING_EPS = 1e-5  # temperature / top_p below this: greedy / the top token (vLLM's _SAMPLING_EPS)
MIN_REPETITION_PENALTY = 0.01  # dividing logits by less overflows
MAX_LOGPROBS = 5


class APIError(Exception):
    """An error answered as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Limits:
    """What one request may ask for (the server's guard rails)."""

    max_body_bytes: int = 1 << 20
    max_messages: int = 256
    max_prompts: int = 64  # prompts in one /v1/completions request
    max_n: int = 16
    max_choices: int = 128  # prompts x n


@dataclass
class GenRequest:
    """One validated request, whichever endpoint it came from."""

    kind: str  # "completion" | "chat"
    prompts: list[list[int]]  # token ids, one list per prompt
    prompt_texts: list[str | None]  # the prompt as text where the client sent text (echo)
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    logprobs: int | None = None  # None = off; else how many alternatives (completions 0..5, chat's top_logprobs 0..20)
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens, end-of-text / end-of-turn tokens do not stop
    stop_token_ids: list[int] = field(default_factory=list)  # vLLM's extension: more ids that end a choice
    model: str | None = None


def _num(body: dict, key: str, default, lo=None, hi=None, lo_open=False, integer=False):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise bad(f"'{key}' must be a number, got {v!r}", key)
    if integer:
        if isinstance(v, float):
            if not v.is_integer():
                raise bad(f"'{key}' must be an integer, got {v!r}", key)
            v = int(v)
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise bad(f"'{key}' must be {'>' if lo_open else '>='} {lo}, got {v!r}", key)
    if hi is not None and v > hi:
        raise bad(f"'{key}' must be <= {hi}, got {v!r}", key)
    return v


_UNSUPPORTED_NONZERO = ("presence_penalty", "frequency_penalty")
# OpenAI fields that change the output in ways this server does not implement: refused by name
_UNSUPPORTED = ("suffix", "audio", "prediction")


def _tools(body: dict) -> None:
    """`tools` / `functions` only with `tool_choice` / `function_call` "none" (the model is told not to
    call them, so they change nothing); a tool choice without tools is fine when it is "none" or "auto"."""
    for tools_key, choice_key in (("tools", "tool_choice"), ("functions", "function_call")):
        tools, choice = body.get(tools_key), body.get(choice_key)
        if tools not in (None, []):
            if choice != "none":
                raise bad(f"'{tools_key}' (function calling) is not supported by this server; send "
                          f"'{choice_key}': \"none\" or no {tools_key}", tools_key, "unsupported_parameter")
        elif choice not in (None, "none", "auto"):
            raise bad(f"'{choice_key}' {choice!r} needs function calling, which this server does not support",
                      choice_key, "unsupported_parameter")


# vLLM's extensions that change the output and that this server does not implement: refused unless
# they hold their "off" value (clients written for vLLM send them through `extra_body`)
_VLLM_OFF = {"min_p": (0, 0.0), "min_tokens": (0,), "prompt_logprobs": (), "use_beam_search": (False,),
             "include_stop_str_in_output": (False,), "skip_special_tokens": (True,), "bad_words": ([],),
             "allowed_token_ids": (), "truncate_prompt_tokens": (), "guided_json": (), "guided_regex": (),
             "guided_choice": (), "guided_grammar": (), "structured_outputs": (), "chat_template": (),
             "continue_final_message": (False,), "add_generation_prompt": (True,), "length_penalty": (1, 1.0)}


def _sampling(body: dict, limits: Limits, req: GenRequest) -> None:
    for key, off in _VLLM_OFF.items():
        v = body.get(key)
        if v is not None and not any(v == o and isinstance(v, bool) == isinstance(o, bool) for o in off):
            raise bad(f"'{key}' {v!r} is not supported by this server", key, "unsupported_parameter")
    sti = body.get("stop_token_ids")
    if sti is not None:
        if not isinstance(sti, list) or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in sti):
            raise bad("'stop_token_ids' must be a list of token ids", "stop_token_ids")
        req.stop_token_ids = list(sti)
    for key in _UNSUPPORTED_NONZERO:
        v = body.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise bad(f"'{key}' must be a number, got {v!r}", key)
        if v not in (None, 0, 0.0):
            raise bad(f"'{key}' is not supported by this server (only 0)", key, "unsupported_parameter")
    for key in _UNSUPPORTED:
        if body.get(key) not in (None, {}, [], ""):
            raise bad(f"'{key}' is not supported by this server", key, "unsupported_parameter")
    lb = body.get("logit_bias")
    if lb is not None:
        if not isinstance(lb, dict):
            raise bad("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
        if any(v not in (0, 0.0) for v in lb.values()):
            raise bad("'logit_bias' is not supported by this server (only an empty map or zero biases)",
                      "logit_bias", "unsupported_parameter")
    mods = body.get("modalities")
    if mods is not None and (not isinstance(mods, list) or any(m != "text" for m in mods)):
        raise bad("'modalities' other than [\"text\"] are not supported by this server", "modalities",
                  "unsupported_parameter")
    _tools(body)
    n = body.get("n", 1)
    best_of = body.get("best_of")
    if best_of is not None and best_of != (n if n is not None else 1):
        raise bad(f"'best_of' is not supported by this server (only equal to n), got {best_of!r}", "best_of",
                  "unsupported_parameter")
    req.temperature = float(_num(body, "temperature", 1.0, lo=0, hi=2))
    if req.temperature < SAMPLING_EPS:  # as vLLM: a vanishing temperature is greedy (dividing by it overflows)
        req.temperature = 0.0
    req.top_p = float(_num(body, "top_p", 1.0, lo=0, hi=1, lo_open=True))
    req.top_k = int(_num(body, "top_k", 0, lo=-1, integer=True))
    if req.top_k == -1:  # vLLM's spelling of "off"
        req.top_k = 0
    if req.top_p < SAMPLING_EPS:  # a vanishing nucleus keeps the most likely token: the same as top_k 1
        req.top_p, req.top_k = 1.0, 1
    req.repetition_penalty = float(_num(body, "repetition_penalty", 1.0, lo=MIN_REPETITION_PENALTY, hi=10))
    req.n = int(_num(body, "n", 1, lo=1, hi=limits.max_n, integer=True))
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, float) and seed.is_integer():
            seed = int(seed)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise bad(f"'seed' must be an integer, got {seed!r}", "seed")
        if not -(1 << 63) <= seed < (1 << 64):  # what a torch generator takes (OpenAI: a 64-bit integer)
            raise bad(f"'seed' must fit in 64 bits, got {seed}", "seed")
        req.seed = seed
    stop = body.get("stop")
    if stop is None:
        req.stop = []
    elif isinstance(stop, str):
        req.stop = [stop] if stop else []
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOP:
            raise bad(f"'stop' holds at most {MAX_STOP} strings, got {len(stop)}", "stop")
        req.stop = [s for s in stop if s]
    else:
        raise bad("'stop' must be a string or a list of strings", "stop")
    ig = body.get("ignore_eos", False)
    if not isinstance(ig, bool) and ig is not None:
        raise bad("'ignore_eos' must be a boolean", "ignore_eos")
    req.ignore_eos = bool(ig)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("'stream' must be a boolean", "stream")
    req.stream = bool(stream)
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        if not req.stream:
            raise bad("'stream_options' is only allowed with stream=true", "stream_options")
        req.include_usage = bool(opts.get("include_usage", False))
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string", "model")
    req.model = model


def _token_list(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def parse_completion(body, tokenizer, limits: Limits, context: int, vocab: int) -> GenRequest:
    """A validated /v1/completions request (APIError otherwise)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    if "prompt" not in body:
        raise bad("'prompt' is required", "prompt")
    p = body["prompt"]
    if isinstance(p, str) or _token_list(p):
        raw = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) or _token_list(x) for x in p):
        raw = p
    else:
        raise bad("'prompt' must be a string, a list of token ids, or a non-empty list of either", "prompt")
    if len(raw) > limits.max_prompts:
        raise bad(f"at most {limits.max_prompts} prompts per request, got {len(raw)}", "prompt")
    prompts, texts = [], []
    bos = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
    for i, x in enumerate(raw):
        if isinstance(x, str):
            ids = bos + tokenizer.encode(x)
            texts.append(x)
        else:
            bad_ids = [t for t in x if not 0 <= t < vocab]
            if bad_ids:
                raise bad(f"prompt {i} holds token id {bad_ids[0]} outside the vocabulary (0..{vocab - 1})", "prompt")
            ids = list(x)
            texts.append(None)
        prompts.append(ids)
    req = GenRequest(kind="completion", prompts=prompts, prompt_texts=texts, max_tokens=16)
    _sampling(body, limits, req)
    echo = body.get("echo", False)
    if not isinstance(echo, bool) and echo is not None:
        raise bad("'echo' must be a boolean", "echo")
    req.echo = bool(echo)
    lp = body.get("logprobs")
    if lp is not None:
        if isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= MAX_LOGPROBS:
            raise bad(f"'logprobs' must be an integer from 0 to {MAX_LOGPROBS}, got {lp!r}", "logprobs")
        req.logprobs = lp
    if "max_tokens" in body and body["max_tokens"] is None:  # as OpenAI / vLLM: fill the context
        req.max_tokens = max(1, context - max(len(p) for p in prompts))
    else:
        req.max_tokens = int(_num(body, "max_tokens", 16, lo=0, integer=True))
    if req.logprobs and req.stream:
        raise bad("'logprobs' alternatives (> 0) are not streamed by this server: send stream=false, or "
                  "logprobs=0 for each token's own log-probability", "logprobs", "unsupported_parameter")
    if req.max_tokens == 0 and not req.echo:
        raise bad("'max_tokens' must be >= 1 (0 is allowed only with echo=true, to score the prompt)", "max_tokens")
    if req.max_tokens == 0 and req.stream:
        raise bad("'max_tokens' 0 (prompt scoring) cannot be streamed", "max_tokens")
    if req.n * len(prompts) > limits.max_choices:
        raise bad(f"prompts x n = {req.n * len(prompts)} is over the limit of {limits.max_choices} choices", "n")
    _check_context(req, context)
    return req


def _content_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...] (the openai client, LangChain)
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
                continue
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad(f"message {i}: content part {j} is of type {kind!r}; only text parts "
                          f"({{\"type\": \"text\", \"text\": ...}}) are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        raise bad(f"message {i} has no content (tool calls are not supported by this server)",
                  f"messages[{i}].content")
    raise bad(f"message {i}: 'content' must be a string or a list of text parts", f"messages[{i}].content")


MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI


def parse_chat(body, tokenizer, limits: Limits, context: int, render_prompt) -> GenRequest:
    """A validated /v1/chat/completions request; `render_prompt(tokenizer, messages)` is the chat
    template (lmforge.tokenizer.chat.render_prompt)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages")
    if len(msgs) > limits.max_messages:
        raise bad(f"at most {limits.max_messages} messages per request, got {len(msgs)}", "messages")
    clean = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"message {i} is not an object", f"messages[{i}]")
        role = m.get("role")
        if role == "developer":  # OpenAI's newer name for the system role
            role = "system"
        if role in ("tool", "function"):
            raise bad(f"message {i} has role {role!r}: tool results need function calling, which this server "
                      f"does not support", f"messages[{i}].role", "unsupported_parameter")
        if role not in ("system", "user", "assistant"):
            raise bad(f"message {i} has role {role!r} (allowed: system, developer, user, assistant)",
                      f"messages[{i}].role")
        if m.get("tool_calls") or m.get("function_call"):
            raise bad(f"message {i} holds tool calls, which this server does not support",
                      f"messages[{i}].tool_calls", "unsupported_parameter")
        # `name` (a participant's name) is accepted and not shown to the model: the template has no slot for it
        clean.append({"role": role, "content": _content_text(m.get("content"), i)})
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or "type" not in rf:
            raise bad("'response_format' must be an object with a 'type'", "response_format")
        if rf["type"] != "text":
            raise bad(f"'response_format' type {rf['type']!r} (structured output) is not supported by this "
                      f"server (only 'text')", "response_format", "unsupported_parameter")
    lp, top = body.get("logprobs"), body.get("top_logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise bad(f"'logprobs' must be a boolean on /v1/chat/completions, got {lp!r}", "logprobs")
    if top is not None:
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise bad(f"'top_logprobs' must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}", "top_logprobs")
        if not lp:
            raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    from lmforge.errors import LmforgeError

    try:
        ids = render_prompt(tokenizer, clean)
    except LmforgeError as e:
        raise bad(str(e), "messages") from None
    if body.get("echo") not in (None, False):
        raise bad("'echo' is supported on /v1/completions only", "echo", "unsupported_parameter")
    req = GenRequest(kind="chat", prompts=[ids], prompt_texts=[None], max_tokens=0)
    _sampling(body, limits, req)
    if lp:
        req.logprobs = top or 0
        if req.logprobs and req.stream:
            raise bad("'top_logprobs' > 0 is not streamed by this server: send stream=false, or top_logprobs=0 "
                      "for each token's own log-probability", "top_logprobs", "unsupported_parameter")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    mt = body.get(key)
    if mt is None:
        req.max_tokens = max(1, context - len(ids))
    else:
        req.max_tokens = int(_num({key: mt}, key, 1, lo=1, integer=True))
    _check_context(req, context, key)
    return req


def _check_context(req: GenRequest, context: int, key: str = "max_tokens") -> None:
    for i, p in enumerate(req.prompts):
        if len(p) + req.max_tokens > context:
            raise APIError(400, f"this model's context is {context} tokens, but prompt {i} has {len(p)} tokens "
                                f"and {key} is {req.max_tokens} ({len(p) + req.max_tokens} in all): shorten the prompt "
                                f"or lower {key}", param=key if len(p) < context else "prompt",
                           code="context_length_exceeded")


def finish_reason(engine_reason: str | None) -> str | None:
    """The engine's "stop" | "length" | "context" as OpenAI's "stop" | "length" ("context": the model's
    context filled, reported as "length" like vLLM does)."""
    if engine_reason is None:
        return None
    return "stop" if engine_reason == "stop" else "length"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def stop_holdback(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (held back from
    a stream until the next token says whether the stop string completes)."""
    keep = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                keep = max(keep, k)
                break
    return keep


__all__ = ["APIError", "Limits", "GenRequest", "error_body", "parse_completion", "parse_chat", "finish_reason",
           "new_id", "now", "usage", "stop_holdback", "MAX_LOGPROBS"]
