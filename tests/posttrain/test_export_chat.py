"""The HF export of a chat model carries the chat template: transformers' apply_chat_template on the
exported folder gives our ids and our assistant-only loss mask (what TRL's assistant_only_loss
trains on), and HF generation stops at the end-of-turn token."""

import json

import torch

from lmforge.cli import main
from lmforge.model import Transformer, preset
from lmforge.tokenizer.chat import render, render_prompt
from lmforge.train import checkpoint as ck


def test_exported_chat_template_matches_render(tmp_path, chat_tok):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=chat_tok.vocab_size, max_seq_len=64, d_model=64, n_layers=2))
    sd = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
    step = ck.save_checkpoint(tmp_path / "ck", 5, sd, m.cfg.to_dict(), [], {}, tokenizer_file=chat_tok.path)
    assert main(["export", "hf", str(step), str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert "generation" in cfg["chat_template"] and "endgeneration" in cfg["chat_template"]
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert chat_tok.special_tokens["<|end|>"] in gen["eos_token_id"]
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does able mean?"},
            {"role": "assistant", "content": "Having the power to do something."},
            {"role": "user", "content": "Use it in a sentence."}, {"role": "assistant", "content": "She is able to swim."}]
    ids, mask = render(chat_tok, conv)
    out = hf.apply_chat_template(conv, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids
    assert [bool(x) for x in out["assistant_masks"]] == mask
    assert hf.apply_chat_template(conv[:2], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"] == \
        render_prompt(chat_tok, conv[:2])
