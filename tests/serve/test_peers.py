"""Peers on our server and export: lm-evaluation-harness's `local-chat-completions` model on a generate_until
task, its `local-completions` model scoring a tiny
local multiple-choice task through /v1/completions (echo + logprobs), checked against the model's
own log-likelihoods; and the HF export holding what `vllm serve` reads."""

from __future__ import annotations

import json
import os

import pytest
import torch

from lmforge.cli import main
from tests.serve.conftest import CHAT_A, CHAT_Q, TEXT_PROMPT


@pytest.fixture(scope="module")
def export_dir(ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "tiny-hf"
    assert main(["export", "hf", str(ckpt[0]), str(out)]) == 0
    return out


def test_export_has_what_vllm_reads(export_dir, ckpt):
    """`vllm serve DIR` reads config.json (architectures: a Llama or Qwen3 model class), the tokenizer
    with tokenizer_config.json's chat_template (for /v1/chat/completions), and generation_config.json's
    eos ids (where generation stops: end of text and end of turn)."""
    tok = ckpt[1]
    cfg = json.loads((export_dir / "config.json").read_text())
    assert cfg["architectures"][0] in ("LlamaForCausalLM", "Qwen3ForCausalLM")
    assert cfg["max_position_embeddings"] == 128 and cfg["vocab_size"] == 512
    tc = json.loads((export_dir / "tokenizer_config.json").read_text())
    assert "{% generation %}" in tc["chat_template"] or "generation" in tc["chat_template"]
    assert (export_dir / "tokenizer.json").is_file() and any(export_dir.glob("*.safetensors"))
    gc = json.loads((export_dir / "generation_config.json").read_text())
    eos = gc["eos_token_id"] if isinstance(gc["eos_token_id"], list) else [gc["eos_token_id"]]
    assert set(eos) == {tok.special_id("<|eos|>"), tok.special_id("<|end|>")}
    from transformers import AutoTokenizer

    from lmforge.tokenizer.chat import render_prompt

    hf = AutoTokenizer.from_pretrained(export_dir)
    msgs = [{"role": "user", "content": "Say hello"}]
    assert hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False) == \
        render_prompt(tok, msgs)  # the server's prompt == what vLLM would render


DOCS = [
    {"question": "Once upon a", "choices": ["time", "river", "table"], "label": 0},
    {"question": "the naïve café served crème", "choices": ["brûlée", "stone", "window"], "label": 0},
    {"question": "The", "choices": ["cat", "dog"], "label": 1},
    {"question": TEXT_PROMPT + ", the", "choices": ["naïve", "blue"], "label": 0},
]


@pytest.mark.slow
def test_lm_eval_local_completions_against_the_server(server, export_dir, ckpt, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    url, _, _ = server
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS))
    (tmp_path / "task.yaml").write_text(f"""task: lmforge_serve_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    res = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"model=tiny,base_url={url}/v1/completions,tokenizer={export_dir},num_concurrent=1,max_retries=1",
        tasks=["lmforge_serve_mc"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
        batch_size=1)
    samples = res["samples"]["lmforge_serve_mc"]
    assert len(samples) == len(DOCS)
    # every log-likelihood lm-eval got from the server equals the model's own, on the ids lm-eval sent
    from lmforge.infer import load_model_and_tokenizer

    model, _, _ = load_model_and_tokenizer(ckpt[0])
    hf = AutoTokenizer.from_pretrained(export_dir)
    correct = 0
    for s in samples:
        lls = []
        for (ctx, cont), (ll, greedy) in zip((a for a in s["arguments"]), (r[0] for r in s["resps"])):
            ctx_ids = hf(ctx, add_special_tokens=False).input_ids
            whole = hf(ctx + cont, add_special_tokens=False).input_ids
            cont_ids = whole[len(ctx_ids):]
            ids = ctx_ids + cont_ids
            with torch.no_grad():
                lp = model(torch.tensor([ids]))[0][0, :-1].float().log_softmax(-1)
            want = sum(lp[i - 1, ids[i]].item() for i in range(len(ctx_ids), len(ids)))
            assert ll == pytest.approx(want, abs=1e-3)
            lls.append(want)
        correct += int(max(range(len(lls)), key=lls.__getitem__) == s["target"])
    assert res["results"]["lmforge_serve_mc"]["acc,none"] == pytest.approx(correct / len(DOCS))


CHAT_DOCS = [{"question": CHAT_Q, "answer": CHAT_A}, {"question": CHAT_Q + "!", "answer": ""}]


@pytest.mark.slow
def test_lm_eval_local_chat_completions_generate_until(server, tmp_path):
    """lm-evaluation-harness's `local-chat-completions` model runs a generate_until task through
    /v1/chat/completions (messages rendered by our template, `stop` from `until`, greedy); its
    answers are the server's own greedy answers."""
    lm_eval = pytest.importorskip("lm_eval")
    import httpx
    from lm_eval.tasks import TaskManager

    url, _, _ = server
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in CHAT_DOCS))
    (tmp_path / "chat.yaml").write_text(f"""task: lmforge_serve_chat
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n\\n", "<|user|>"]
  max_gen_toks: 40
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
""")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    res = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args=f"model=tiny,base_url={url}/v1/chat/completions,num_concurrent=1,max_retries=1",
        tasks=["lmforge_serve_chat"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
        apply_chat_template=True, batch_size=1)
    samples = sorted(res["samples"]["lmforge_serve_chat"], key=lambda s: s["doc_id"])
    assert len(samples) == len(CHAT_DOCS)
    assert samples[0]["resps"][0][0] == CHAT_A and samples[0]["exact_match"] == 1.0
    want = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": CHAT_DOCS[1]["question"]}], "max_tokens": 40, "temperature": 0,
        "stop": ["\n\n", "<|user|>"]}).json()["choices"][0]["message"]["content"]
    assert samples[1]["resps"][0][0] == want
    assert res["results"]["lmforge_serve_chat"]["exact_match,none"] == pytest.approx(
        sum(s["exact_match"] for s in samples) / len(samples))
