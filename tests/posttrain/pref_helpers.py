"""Shared pieces of the preference tests: a tiny chat 'base' checkpoint and an easy synthetic
preference set (chosen = a fixed answer, rejected = random words)."""

import json
import random
from pathlib import Path

import torch

WORDS = ("apple river stone cloud metal paper green quick slow table light sound water glass north "
         "candle orbit velvet pepper ladder").split()


def make_base(root: Path, tok, seed: int = 0) -> Path:
    """A tiny model saved as a chat-model checkpoint (chat template recorded) with its tokenizer."""
    from lmforge.model import Transformer, preset
    from lmforge.tokenizer.chat import template_id
    from lmforge.train import checkpoint as ck

    torch.manual_seed(seed)
    m = Transformer(preset("tiny", vocab_size=tok.vocab_size, max_seq_len=96, d_model=64, n_layers=2))
    sd = {k: v.detach().clone() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    ck.save_checkpoint(root, 10, sd, m.cfg.to_dict(), [], {"train_config": {}, "chat_template": template_id(),
                                                          "stage": "sft"}, tokenizer_file=tok.path)
    return root


def easy_pairs(n: int, seed: int, start: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"Tell me about item {i}.", "chosen": "Yes, certainly.",
             "rejected": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))} for i in range(start, start + n)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path
