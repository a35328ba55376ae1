"""Fixtures for the server tests: a real byte-level BPE (with the chat tokens) trained on the
bundled sample, a tiny model trained for a few seconds to memorize two sequences that hold
multi-byte characters (a chat answer and a plain text) so greedy outputs are known, saved as a
checksummed checkpoint; and an in-process uvicorn server on a free port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

CHAT_Q = "Say hello"
CHAT_A = "Bonjour, café 🙂 日本!"
TEXT_PROMPT = "Once upon a time"
TEXT_REST = ", the naïve café served crème brûlée 🙂 and 日本茶."


def _train_tokenizer(out: Path):
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.config import TokenizerConfig
    from lmforge.tokenizer.corpus import corpus_shards
    from lmforge.tokenizer.train_bpe import train_from_corpus
    from tests.conftest import SAMPLE
    from tests.tokenizer.conftest import sample_docs, write_corpus

    corpus = write_corpus(out.parent / "serve_corpus", sample_docs(SAMPLE, limit=200))
    train_from_corpus(corpus_shards(corpus), out, TokenizerConfig(vocab_size=512, train_bytes=150_000), seed=1)
    return Tokenizer.from_file(out)


def memorized_sequences(tok) -> list[list[int]]:
    from lmforge.tokenizer.chat import render

    chat, _ = render(tok, [{"role": "user", "content": CHAT_Q}, {"role": "assistant", "content": CHAT_A}])
    text = [tok.bos_id] + tok.encode(TEXT_PROMPT + TEXT_REST) + [tok.eos_id]
    return [chat, text]


def build_checkpoint(root: Path, max_seq_len: int = 128, d_model: int = 64, train: bool = True) -> tuple[Path, object]:
    """(step directory, Tokenizer): a tiny model that memorized `memorized_sequences`."""
    from lmforge.model import Transformer, preset
    from lmforge.train.checkpoint import save_checkpoint

    tok = _train_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=512, max_seq_len=max_seq_len, d_model=d_model, n_layers=2))
    if train:
        seqs = memorized_sequences(tok)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for _ in range(150):
                loss = 0
                for s in seqs:
                    x = torch.tensor([s])
                    _, l = m(x[:, :-1], targets=x[:, 1:])
                    loss = loss + l
                opt.zero_grad()
                loss.backward()
                opt.step()
        finally:
            torch.set_num_threads(n)
    m.eval()
    sd = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
    d = save_checkpoint(root / "checkpoints" / "tiny", 10, sd, m.cfg.to_dict(), [], {"data": {}},
                        tokenizer_file=root / "tokenizer" / "tokenizer.json")
    return d, tok


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("serve_ckpt"))


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def free_socket() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    return s


@contextlib.contextmanager
def serving(app):
    """Run `app` on uvicorn in a thread; yields its base URL; stops it (graceful) on exit."""
    import uvicorn

    sock = free_socket()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    t0 = time.time()
    while not server.started:
        if time.time() - t0 > 30 or not th.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    import httpx

    while httpx.get(url + "/health").status_code != 200:  # the engine starts in the app's startup thread
        if time.time() - t0 > 30:
            raise RuntimeError("server never became ready")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        th.join(30)
        sock.close()


def make_app(ckpt_dir, slow: float = 0.0, gate: threading.Event | None = None, **engine_kw):
    """(app, engine, model): the real loader, engine and app; `slow` seconds of sleep per forward
    (a test-side forward pre-hook) to keep requests in flight; `gate`: every forward waits until it
    is set (a blocked engine)."""
    from lmforge.infer import load_model_and_tokenizer
    from lmforge.infer.batching import BatchEngine
    from lmforge.serve.app import create_app

    api_key = engine_kw.pop("api_key", None)
    limits = engine_kw.pop("limits", None)
    cors = engine_kw.pop("cors_origins", ())
    model, tok, _ = load_model_and_tokenizer(ckpt_dir)
    if slow:
        model.register_forward_pre_hook(lambda *a: time.sleep(slow))
    if gate is not None:
        model.register_forward_pre_hook(lambda *a: None if gate.wait(60) else None)
    engine = BatchEngine(model, tok, **engine_kw)
    app = create_app(engine, tok, "tiny", api_key=api_key, model=model, limits=limits, cors_origins=cors)
    return app, engine, model


@pytest.fixture(scope="module")
def server(ckpt):
    app, engine, model = make_app(ckpt[0])
    with serving(app) as url:
        yield url, engine, ckpt[1]
