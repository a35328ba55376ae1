"""CPU training throughput: lmforge's `train()` against a plain nanoGPT-style PyTorch loop, same
run, same token shards, same shape (layers, width, heads, vocab, sequence, batch), fp32.

The reference is written here from nanoGPT's description (GPT-2 blocks: LayerNorm with bias,
fused QKV projection, SDPA causal attention, 4x GELU MLP, learned positions, tied head; loop:
random windows from a memmap, forward, backward, clip 1.0, AdamW, zero_grad). lmforge runs its
own loop (loader, schedule, metrics, final checkpoint) on its Llama-style model.

    python benchmarks/bench_train_cpu.py                     # 4 layers x 256, vocab 8192, seq 256, batch 16
    python benchmarks/bench_train_cpu.py --steps 6 --rounds 1   # quicker
    python benchmarks/bench_train_cpu.py --compile              # adds a torch.compile row (needs a C++ compiler)

Timing: per-step wall time after `--warmup` steps, median over steps, best of `--rounds`
interleaved rounds (the machine is shared; interleaving keeps both sides under the same load).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "lmforge" / "sample"


# ---- nanoGPT-style reference model (written for this benchmark) ------------------------------
class RefAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class RefBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), RefAttention(d, h)
        self.ln2 = nn.LayerNorm(d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class RefGPT(nn.Module):
    def __init__(self, vocab, seq, d, layers, heads):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(RefBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight
        for n, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if n.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif n.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def reference_run(tokens: np.ndarray, a, steps: int) -> list[float]:
    torch.manual_seed(0)
    model = RefGPT(a.vocab, a.seq, a.d_model, a.layers, a.heads)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95))
    rng = np.random.default_rng(0)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        ix = rng.integers(0, len(tokens) - a.seq - 1, size=a.batch)
        x = torch.from_numpy(np.stack([tokens[i : i + a.seq] for i in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([tokens[i + 1 : i + 1 + a.seq] for i in ix]).astype(np.int64))
        loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def lmforge_run(tokens_dir: Path, a, steps: int, optimizer: str, packing: str, out: Path, compile: bool = False) -> list[float]:
    from lmforge.config import build
    from lmforge.train.config import TrainConfig
    from lmforge.train.loop import train
    from lmforge.train.metrics import read_metrics

    cfg = build(TrainConfig, {
        "model": {"preset": "tiny", "d_model": a.d_model, "n_layers": a.layers, "n_heads": a.heads, "n_kv_heads": a.heads,
                  "vocab_size": a.vocab},
        "seq_len": a.seq, "batch_size": a.batch, "max_steps": steps, "optimizer": optimizer, "packing": packing,
        "log_every": 1, "eval_every": 0, "checkpoint_every": 0, "sample_prompts": [], "warmup_steps": 2, "seed": 0,
        "peak_flops": 1e12, "resume": False, "device": "cpu", "compile": compile,
    }, "pretrain")
    train(cfg, tokens_dir, out)
    recs = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    return [a.batch * a.seq / r["tokens_per_s"] for r in recs]


def make_tokens(root: Path, vocab: int, chars: int, val_frac: float = 0.0) -> tuple[Path, np.ndarray]:
    """Real text (GCIDE dictionary sample + CPython stdlib sample) -> byte-level BPE -> token shards."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lmforge.train.data import write_token_shards

    texts, n = [], 0
    with gzip.open(SAMPLE / "dictionary" / "gcide-sample.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            n += len(texts[-1])
            if n > chars:
                break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|bos|>", "<|eos|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    docs = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    n_val = int(len(docs) * val_frac)
    write_token_shards(root / "tokens", {"train": docs[n_val:], "val": docs[:n_val]}, vocab_size=vocab)
    flat = np.concatenate([np.asarray([0] + d, dtype=np.uint16) for d in docs[n_val:]])
    return root / "tokens", flat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per run")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--chars", type=int, default=2_500_000)
    ap.add_argument("--compile", action="store_true", help="add a row with pretrain.compile = true (first steps compile)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import os

    os.environ.setdefault("LMFORGE_PROGRESS", "0")
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    t0 = time.time()
    tokens_dir, flat = make_tokens(tmp, a.vocab, a.chars)
    print(f"tokens: {len(flat):,} from real text in {time.time() - t0:.1f}s; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    total = a.warmup + a.steps
    sides = {
        "nanoGPT-style reference (GPT-2 block, AdamW)": lambda r: reference_run(flat, a, total),
        "lmforge train() default (Muon+AdamW, doc_mask)": lambda r: lmforge_run(tokens_dir, a, total, "muon", "doc_mask", tmp / f"m{r}"),
        "lmforge train() (AdamW, separator packing)": lambda r: lmforge_run(tokens_dir, a, total, "adamw", "separator", tmp / f"a{r}"),
    }
    if a.compile:
        sides["lmforge train() default + torch.compile"] = lambda r: lmforge_run(tokens_dir, a, total, "muon", "doc_mask", tmp / f"c{r}", True)
    best: dict[str, float] = {}
    for r in range(a.rounds):
        for name, fn in sides.items():
            times = fn(r)[a.warmup :]
            med = statistics.median(times)
            best[name] = min(best.get(name, float("inf")), med)
            print(f"round {r + 1}: {name}: {a.batch * a.seq / med:,.0f} tokens/s", file=sys.stderr)
    from lmforge.model import preset

    n_lm = preset("tiny", d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.heads, vocab_size=a.vocab,
                  max_seq_len=a.seq).num_params()
    n_ref = sum(p.numel() for p in RefGPT(a.vocab, a.seq, a.d_model, a.layers, a.heads).parameters())
    ref_name = next(iter(sides))
    ref_tps = a.batch * a.seq / best[ref_name]
    print(f"\nCPU training throughput, fp32, {a.layers} layers x {a.d_model}, {a.heads} heads, vocab {a.vocab}, "
          f"seq {a.seq}, batch {a.batch}; params: reference {n_ref / 1e6:.2f}M, lmforge {n_lm / 1e6:.2f}M")
    print(f"{'run':50s} {'ms/step':>9s} {'tokens/s':>10s} {'vs reference':>13s}")
    for name, s in best.items():
        tps = a.batch * a.seq / s
        print(f"{name:50s} {s * 1e3:9.1f} {tps:10,.0f} {tps / ref_tps:12.2f}x")


if __name__ == "__main__":
    main()
