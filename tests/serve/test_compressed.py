"""`lmforge serve` as a real process on what the other commands write: an int8-quantized checkpoint
(`lmforge quantize`; int4 too), a low-rank one (`lmforge lowrank`), an MLP-pruned one (`lmforge prune`,
smaller matrices) and an HF export folder (`lmforge export hf`); each answers the chat through the
`openai` client (the lossless kinds with the memorized answer)."""

from __future__ import annotations

import signal

import pytest

from lmforge.cli import main
from tests.serve.conftest import CHAT_A, CHAT_Q
from tests.serve.test_cli import _start

openai = pytest.importorskip("openai")


def _ask(url: str) -> str:
    c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    name = c.models.list().data[0].id
    r = c.chat.completions.create(model=name, messages=[{"role": "user", "content": CHAT_Q}], temperature=0,
                                  max_tokens=40)
    return r.choices[0].message.content


def _serve_and_ask(model_dir) -> str:
    p, url = _start(model_dir)
    try:
        return _ask(url)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(60)


@pytest.mark.parametrize("kind", ["int8"] + [pytest.param(k, marks=pytest.mark.slow)
                                             for k in ("int4", "lowrank", "prune-mlp", "hf")])
def test_serve_compressed_and_exported_models(ckpt, tmp_path, kind):
    out = tmp_path / kind
    if kind == "int8":
        assert main(["quantize", str(ckpt[0]), "--method", "int8", "--out", str(out)]) == 0
    elif kind == "int4":
        assert main(["quantize", str(ckpt[0]), "--method", "int4", "--group-size", "32", "--out", str(out)]) == 0
    elif kind == "prune-mlp":  # structured: smaller MLP matrices, a different config
        assert main(["prune", str(ckpt[0]), "--method", "mlp", "--keep-ratio", "0.75", "--out", str(out)]) == 0
    elif kind == "lowrank":
        assert main(["lowrank", str(ckpt[0]), "--energy", "0.999", "--out", str(out)]) == 0
    else:
        assert main(["export", "hf", str(ckpt[0]), str(out)]) == 0
    answer = _serve_and_ask(out)
    if kind in ("int4", "lowrank", "prune-mlp"):  # lossy: a close model, not the same one
        assert isinstance(answer, str) and answer
    else:
        assert answer == CHAT_A

