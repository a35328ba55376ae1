"""CLI: `lmforge serve` (the OpenAI-compatible server) and `lmforge chat` (a terminal chat).

    lmforge serve MODEL [--host 127.0.0.1] [--port 8000] [--api-key KEY | env LMFORGE_API_KEY]
                  [--max-queue 64] [--max-running N] [--kv-memory-mb MB] [--model-name NAME]
                  [--device cpu|cuda|auto] [--dtype float32|bfloat16|float16] [--tokenizer DIR]
                  [--max-body-kb 1024] [--max-messages 256] [--drain-timeout 30] [--compile]
    lmforge chat MODEL [--system TEXT] [--max-tokens N] [--temperature T] [--top-p P] [--top-k K]
                  [--seed S] [--device ...] [--dtype ...] [--tokenizer DIR]

MODEL is anything `lmforge generate` takes (a run directory: its latest model, a checkpoints or
step directory, an HF folder). The model is loaded and its checksums verified before the server
binds its port: a corrupt checkpoint ends the command with one line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

_DTYPES = ("float32", "bfloat16", "float16")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="run directory (its latest model), checkpoints / step directory, or HF folder")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model's own, else the run's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--dtype", choices=_DTYPES, help="cast the weights (default: as stored)")


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (+ chat page at /) with continuous batching",
                       description="Serve a model over an OpenAI-compatible API: /v1/completions, /v1/chat/completions, "
                                   "/v1/models, /health, /metrics, and a chat page at /.")
    _model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free port; the chosen one is printed)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health "
                                     "(default: $LMFORGE_API_KEY; none when unset)")
    s.add_argument("--model-name", help="the model id clients send (default: the name of MODEL's directory)")
    s.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429 (default 64)")
    s.add_argument("--max-running", type=int, help="sequences decoded together (default: set by the KV budget, 16)")
    s.add_argument("--kv-memory-mb", type=float, help="KV-cache budget in MB (sets how many requests run at once)")
    s.add_argument("--max-body-kb", type=int, default=1024, help="largest request body (default 1024 KB)")
    s.add_argument("--max-messages", type=int, default=256, help="most messages in one chat request (default 256)")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish (default 30)")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let browser pages from ORIGIN (e.g. http://localhost:3000; '*' for any) call the API "
                        "(CORS); repeatable; default: none, the chat page at / is same-origin")
    s.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    s.set_defaults(func=_cmd_serve)

    c = sub.add_parser("chat", help="chat with a model in the terminal (streaming, history, the chat template)",
                       description="A terminal chat: type a message, the answer streams back. /reset clears the "
                                   "history, /quit (or end of input) leaves. Reads lines from stdin when it is not a "
                                   "terminal, one user message per line.")
    _model_args(c)
    c.add_argument("--system", help="system message for the conversation")
    c.add_argument("--max-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    c.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    c.add_argument("--top-p", type=float, default=0.95)
    c.add_argument("--top-k", type=int, default=50, help="0 = off")
    c.add_argument("--repetition-penalty", type=float, default=1.0)
    c.add_argument("--seed", type=int, help="sampling seed (default: random)")
    c.set_defaults(func=_cmd_chat)


def _load(args):
    """(model, tokenizer, ModelRef): verified (checksums) before anything binds or prints a prompt."""
    import torch

    from lmforge.errors import InputError
    from lmforge.infer import device_from_name, load_model_and_tokenizer

    if not Path(args.checkpoint).exists():
        raise InputError(f"{args.checkpoint}: not found")
    device = device_from_name(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tok, ref = load_model_and_tokenizer(args.checkpoint, device=device, dtype=dtype, tokenizer=args.tokenizer)
    _check_chat_template(ref)
    return model, tok, ref


def _check_chat_template(ref) -> None:
    from lmforge.tokenizer.chat import check_template

    f = Path(ref.path) / "state.json"
    try:
        state = json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        state = {}
    check_template(state.get("chat_template") if isinstance(state, dict) else None)


def _bind(host: str, port: int):
    import socket

    from lmforge.errors import InputError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise InputError(f"--host {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from lmforge.errors import ConfigError
    from lmforge.infer.batching import BatchEngine
    from lmforge.log import logger
    from lmforge.serve.app import create_app
    from lmforge.serve.protocol import Limits

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0..65535, got {args.port}")
    if args.max_body_kb < 1 or args.max_messages < 1:
        raise ConfigError("--max-body-kb and --max-messages must be >= 1")
    if args.drain_timeout < 0:
        raise ConfigError("--drain-timeout must be >= 0")
    api_key = args.api_key or os.environ.get("LMFORGE_API_KEY") or None
    model, tok, ref = _load(args)  # a corrupt checkpoint stops here, before the port is bound
    engine = BatchEngine(model, tok, max_running=args.max_running, kv_memory_mb=args.kv_memory_mb,
                         max_queue=args.max_queue, compile=args.compile)
    name = args.model_name or Path(args.checkpoint).resolve().name
    app = create_app(engine, tok, name, api_key=api_key, model=model, drain_timeout=args.drain_timeout,
                     limits=Limits(max_body_bytes=args.max_body_kb * 1024, max_messages=args.max_messages),
                     cors_origins=tuple(args.cors_origin))
    import uvicorn

    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if args.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning("listening on %s without an API key: anyone who can reach this address can use the model",
                       args.host)
    print(f"lmforge serve: model {name} ({ref.path}) at http://{shown}:{port}  "
          f"(OpenAI API under /v1, chat page at /, metrics at /metrics)", flush=True)
    logging.getLogger("lmforge").setLevel(args.log_level.upper())
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.drain_timeout,
                            access_log=args.log_level == "debug", lifespan="on")
    # the engine thread re-takes the GIL after every torch op; with the event loop busy streaming, the
    # default 5 ms switch interval makes it wait that long each time (a convoy): hand over sooner
    sys.setswitchinterval(float(os.environ.get("LMFORGE_SWITCH_INTERVAL", "0.0002")))
    server = _Server(config)
    server.run(sockets=[sock])
    print("lmforge serve: stopped", flush=True)
    return 0


def _server_class():
    import contextlib
    import signal
    import threading

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, except that a SIGTERM / SIGINT that ended a graceful shutdown is not
        raised again afterwards: a drained shutdown exits 0."""

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, h in old.items():
                    signal.signal(s, h)

    return Server


def _Server(config):
    return _server_class()(config)


# ---- lmforge chat -----------------------------------------------------------------------------


def _cmd_chat(args: argparse.Namespace) -> int:
    from lmforge.errors import ConfigError
    from lmforge.infer.engine import SamplingParams

    if args.max_tokens < 1:
        raise ConfigError("--max-tokens must be >= 1")
    SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty).validate()
    model, tok, ref = _load(args)
    from lmforge.serve.chat_cli import ChatSession

    session = ChatSession(model, tok, system=args.system, max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                          seed=args.seed)
    try:
        return session.run(sys.stdin, sys.stdout, interactive=sys.stdin.isatty(), name=str(ref.path))
    finally:
        session.close()
