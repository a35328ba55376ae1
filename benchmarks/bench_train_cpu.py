"""CPU training throughput: lmforge's `train()` against a plain nanoGPT-style PyTorch loop, same
run, same token shards, same shape (layers, width, heads, vocab, sequence, batch), fp32.

The reference is written here from nanoGPT's description (GPT-2 blocks: LayerNorm with bias,
fused QKV projection, SDPA causal attention, 4x GELU MLP, learned positions, tied head; loop:
random windows from a memmap, forward, backward, clip 1.0, AdamW, zero_grad). lmforge runs its
own loop (loader, schedule, metrics, final checkpoint) on its Llama-style model, twice: with its
default optimizer (Muon for matrices + AdamW for the rest, document-masked packing) and with AdamW
(separator packing).

    python benchmarks/bench_train_cpu.py                 # 4 layers x 256, vocab 8192, seq 256, batch 16; 16 steps x 3 rounds
    python benchmarks/bench_train_cpu.py --quick         # 6 steps x 2 rounds
    python benchmarks/bench_train_cpu.py --compile       # adds a torch.compile row (needs a C++ compiler)

Timed: each step's wall time after `--warmup` steps (reference: batch sampling + forward + backward
+ clip + AdamW step + zero_grad; lmforge: the step time its own metrics log, which covers its loader,
forward, backward, clip, optimizer step and logging). Left out on both sides: model construction,
data set-up, the warm-up steps, lmforge's final checkpoint write. Rounds alternate the order of the
three runs (reference, Muon, AdamW, then AdamW, Muon, reference, ...) so load bursts hit every side;
per side the tokens/s of each round (median over its steps) is kept, and the table prints the median
over rounds with the min-max, and the ratio to the reference as the median of the per-round paired
ratios (same round) with their min-max. Both sides use the same torch thread count (`--threads`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from _bench import result  # noqa: E402

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
    ap.add_argument("--steps", type=int, default=16, help="timed steps per run (default 16)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads, both sides (0 = torch default)")
    ap.add_argument("--chars", type=int, default=2_500_000)
    ap.add_argument("--quick", action="store_true", help="--steps 6 --warmup 2 --rounds 2")
    ap.add_argument("--compile", action="store_true", help="add a row with pretrain.compile = true (first steps compile)")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.warmup, a.rounds = min(a.steps, 6), min(a.warmup, 2), min(a.rounds, 2)
    if a.steps < 1 or a.rounds < 1 or a.warmup < 0:
        print("--steps and --rounds must be >= 1, --warmup >= 0", file=sys.stderr)
        raise SystemExit(2)
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
    REF, MUON, ADAMW = "nanoGPT-style reference (GPT-2 block, AdamW)", "lmforge train() default (Muon+AdamW, doc_mask)", \
        "lmforge train() (AdamW, separator packing)"
    sides = {
        REF: lambda r: reference_run(flat, a, total),
        MUON: lambda r: lmforge_run(tokens_dir, a, total, "muon", "doc_mask", tmp / f"m{r}"),
        ADAMW: lambda r: lmforge_run(tokens_dir, a, total, "adamw", "separator", tmp / f"a{r}"),
    }
    if a.compile:
        sides["lmforge train() default + torch.compile"] = lambda r: lmforge_run(tokens_dir, a, total, "muon", "doc_mask", tmp / f"c{r}", True)
    tps: dict[str, list[float]] = {name: [] for name in sides}  # per round: tokens/s (median over its steps)
    loads = [os.getloadavg()[0]]
    try:
        for r in range(a.rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                times = sides[name](r)[a.warmup :]
                tps[name].append(a.batch * a.seq / statistics.median(times))
                print(f"round {r + 1}: {name}: {tps[name][-1]:,.0f} tokens/s (load {os.getloadavg()[0]:.2f})", file=sys.stderr)
            loads.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    from lmforge.model import preset

    n_lm = preset("tiny", d_model=a.d_model, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.heads, vocab_size=a.vocab,
                  max_seq_len=a.seq).num_params()
    n_ref = sum(p.numel() for p in RefGPT(a.vocab, a.seq, a.d_model, a.layers, a.heads).parameters())
    print(f"\nCPU training throughput, fp32, {a.layers} layers x {a.d_model}, {a.heads} heads, vocab {a.vocab}, "
          f"seq {a.seq}, batch {a.batch}; params: reference {n_ref / 1e6:.2f}M, lmforge {n_lm / 1e6:.2f}M; "
          f"{torch.get_num_threads()} threads; {a.rounds} alternating rounds x {a.steps} timed steps (+{a.warmup} warm-up); "
          f"load average during the rounds {min(loads):.2f}-{max(loads):.2f}")
    print("\n| run | tokens/s, median over rounds (min-max) | vs reference, median of per-round ratios (min-max) |")
    print("|---|---|---|")
    ratios: dict[str, list[float]] = {}
    for name, v in tps.items():
        rr = [x / y for x, y in zip(v, tps[REF])]
        ratios[name] = rr
        cell = "1.00x" if name == REF else f"{statistics.median(rr):.2f}x ({min(rr):.2f}-{max(rr):.2f})"
        print(f"| {name} | {statistics.median(v):,.0f} ({min(v):,.0f}-{max(v):,.0f}) | {cell} |")
    muon, adamw = statistics.median(ratios[MUON]), statistics.median(ratios[ADAMW])
    result("train_cpu", min(muon, adamw), 1.0, f"CPU training tokens/s vs a nanoGPT-style loop, {a.layers}x{a.d_model}, "
           f"{torch.get_num_threads()} threads; headline = the lower of Muon {muon:.2f}x and AdamW {adamw:.2f}x",
           muon=round(muon, 3), adamw=round(adamw, 3), muon_range=[round(min(ratios[MUON]), 3), round(max(ratios[MUON]), 3)],
           adamw_range=[round(min(ratios[ADAMW]), 3), round(max(ratios[ADAMW]), 3)],
           reference_tps=round(statistics.median(tps[REF]), 1), rounds=a.rounds, steps=a.steps)


if __name__ == "__main__":
    main()
