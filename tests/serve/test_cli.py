"""`lmforge serve` and `lmforge chat` as real processes: SIGTERM drains a stream in flight, a corrupt
checkpoint is refused with one line before the port is bound, the terminal chat driven through stdin."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from tests.serve.conftest import CHAT_A, CHAT_Q

LMFORGE = [sys.executable, "-m", "lmforge"]


def _env():
    return {**os.environ, "LMFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "LMFORGE_API_KEY": ""}


@pytest.fixture(scope="module")
def long_ckpt(ckpt, tmp_path_factory):
    """A random tiny model with a 2048-token context (long generations) and the test tokenizer."""
    from lmforge.model import Transformer, preset
    from lmforge.train.checkpoint import save_checkpoint

    torch.manual_seed(3)
    m = Transformer(preset("tiny", vocab_size=512, max_seq_len=2048, d_model=64, n_layers=2))
    sd = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
    return save_checkpoint(tmp_path_factory.mktemp("long") / "ck", 1, sd, m.cfg.to_dict(), [], {},
                           tokenizer_file=ckpt[0] / "tokenizer.json")


def _start(model_dir, *extra):
    p = subprocess.Popen(LMFORGE + ["serve", str(model_dir), "--port", "0", *extra], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env())
    line = p.stdout.readline()
    assert " at http://127.0.0.1:" in line, (line, p.stderr.read() if p.poll() is not None else "")
    url = line.split(" at ")[1].split()[0]
    t0 = time.time()
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return p, url
        except httpx.TransportError:
            pass
        assert time.time() - t0 < 60 and p.poll() is None
        time.sleep(0.1)


def test_sigterm_drains_the_stream_in_flight(long_ckpt):
    p, url = _start(long_ckpt, "--drain-timeout", "120")
    try:
        body = {"prompt": "The", "max_tokens": 600, "temperature": 0, "n": 2, "stream": True,
                "stream_options": {"include_usage": True}}
        after, finishes, usage, done = 0, [], None, False
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            p.send_signal(signal.SIGTERM)  # a stream is in flight
            for line in lines:
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                j = json.loads(line[6:])
                after += 1
                if j.get("usage"):
                    usage = j["usage"]
                finishes += [c["finish_reason"] for c in j["choices"] if c["finish_reason"]]
        assert done and after > 100 and finishes == ["length"] * 2 and usage["completion_tokens"] == 1200
        assert p.wait(60) == 0
        with pytest.raises(httpx.TransportError):  # no longer listening
            httpx.get(url + "/health", timeout=2)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_corrupt_checkpoint_is_refused_with_one_line_before_binding(ckpt, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(ckpt[0], bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (bad / "model.safetensors").write_bytes(bytes(data))
    r = subprocess.run(LMFORGE + ["serve", str(bad), "--port", "0"], capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert r.returncode == 2
    assert r.stdout == ""  # never announced an address
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge: error:") and "model.safetensors" in lines[0], r.stderr
    r = subprocess.run(LMFORGE + ["serve", str(tmp_path / "nope")], capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_chat_through_stdin_streams_answers_keeps_history_and_resets(ckpt):
    script = f"{CHAT_Q}\n/reset\n{CHAT_Q}\nand again?\n/quit\nnever read\n"
    r = subprocess.run(LMFORGE + ["chat", str(ckpt[0]), "--temperature", "0", "--max-tokens", "40"], input=script,
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == CHAT_A and out[1] == CHAT_A and len(out) == 3  # the third answer, after two turns of history
    assert "[new conversation]" in r.stderr
    assert "you>" not in r.stdout  # no prompts when stdin is not a terminal


def test_chat_session_history_is_rendered_with_the_template(ckpt):
    import io

    from lmforge.infer import load_model_and_tokenizer
    from lmforge.serve.chat_cli import ChatSession
    from lmforge.tokenizer.chat import render_prompt

    m, tok, _ = load_model_and_tokenizer(ckpt[0])
    s = ChatSession(m, tok, temperature=0, max_tokens=30)
    try:
        out = io.StringIO()
        assert s.answer(CHAT_Q, out) == CHAT_A and out.getvalue() == CHAT_A + "\n"
        s.system = "Be brief."
        s.history.append({"role": "user", "content": "more"})
        want = render_prompt(tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": CHAT_Q},
                                   {"role": "assistant", "content": CHAT_A}, {"role": "user", "content": "more"}])
        assert s.prompt_ids() == want
        s.history = [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok"}] * 3
        s.history.append({"role": "user", "content": "last"})
        err = io.StringIO()
        ids = s.prompt_ids(err)  # the oldest turns are dropped to fit the 128-token context
        assert ids is not None and len(ids) < 127 and "dropped" in err.getvalue()
    finally:
        s.close()
