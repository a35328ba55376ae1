"""Shared by the speculative-decoding and Medusa tests: a small real tokenizer (trained on the
bundled sample), real prompts from it, and a tiny model briefly trained on the same text so its
greedy continuations are text-like rather than random."""

from __future__ import annotations

import torch

from lmforge.model import Transformer, preset


def sample_texts(limit: int = 300) -> list[str]:
    from tests.conftest import SAMPLE
    from tests.tokenizer.conftest import sample_docs

    docs = sample_docs(SAMPLE, limit=limit)
    return [d.text for src in sorted(docs) for d in docs[src]]


def train_tokenizer(out, texts_limit: int = 300):
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.config import TokenizerConfig
    from lmforge.tokenizer.corpus import corpus_shards
    from lmforge.tokenizer.train_bpe import train_from_corpus
    from tests.conftest import SAMPLE
    from tests.tokenizer.conftest import sample_docs, write_corpus

    corpus = write_corpus(out / "corpus", sample_docs(SAMPLE, limit=texts_limit))
    train_from_corpus(corpus_shards(corpus), out / "tok", TokenizerConfig(vocab_size=512, train_bytes=200_000), seed=1)
    return Tokenizer.from_file(out / "tok")


def token_stream(tok, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids += [tok.bos_id] + tok.encode(t)
    return torch.tensor(ids, dtype=torch.long)


def tiny_model(vocab: int, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab, max_seq_len=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    cfg.update(kw)
    return Transformer(preset("tiny", **cfg))


def train_briefly(model: Transformer, stream: torch.Tensor, steps: int = 60, seq: int = 64, batch: int = 16,
                  lr: float = 3e-3, seed: int = 0) -> Transformer:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - seq - 1, (batch,), generator=g)
        rows = torch.stack([stream[s : s + seq + 1] for s in starts.tolist()])
        _, loss = model(rows[:, :-1], rows[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def real_prompts(tok, texts: list[str], n: int = 6, words: int = 6) -> list[list[int]]:
    """The first words of n different documents, encoded with <|bos|>."""
    out = []
    for t in texts[:: max(1, len(texts) // n)][:n]:
        out.append([tok.bos_id] + tok.encode(" ".join(t.split()[:words])))
    return out
