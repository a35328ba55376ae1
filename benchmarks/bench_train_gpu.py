"""GPU pretraining speed against a nanoGPT-style peer, in one process (issue 9, section 3).

    python benchmarks/bench_train_gpu.py            # one H200/H100: 124M, seq 1024, batch 32, bf16, compile; < 5 min
    python benchmarks/bench_train_gpu.py --smoke    # tiny shapes, 2 steps, CPU, no compile: checks the script runs

Rows, all on the same device in the same run:
- `peer`: a nanoGPT `model.py`-style GPT written below (learned positions, LayerNorm, GELU MLP,
  tied head, `F.scaled_dot_product_attention(is_causal=True)`), bare compiled step: bf16 autocast,
  forward + loss, backward, grad clip, fused AdamW (decay on matrices, as nanoGPT configures it);
- `bare-adamw`, `bare-muon`: lmforge's `Transformer` (the preset of the same shape) in the same
  bare step, with the training loop's optimizers (`build_optimizers`: fused AdamW, or Muon on the
  hidden matrices + AdamW on the rest); `bare-muon-docmask` (opt-in) adds the batch's document ids;
- `loop-<optimizer>-<packing>`: lmforge's full training loop (`lmforge.train.loop.train`: batch
  loader, schedule, metrics, checkpoint at the end) with `compile = true` on the same token shards;
  `loop-muon-doc_mask` is the default configuration, the one the goal is about.

tokens/s of the bare rows: timed steps after warm-up, one synchronise at each end. tokens/s of the
loop rows: the median of the loop's own per-window figures after the compile window (metrics.jsonl).
MFU = tokens/s x training FLOPs per token (6 x non-embedding params incl. the head + 12 x layers x
d_model x seq, the same formula for every row) / the device's dense bf16 peak. The goal line:
the default loop at >= 1.05x the peer's tokens/s.

Token shards: `--tokens DIR` (a tokens/ directory of the tokenizer stage), else synthetic documents
with log-normal lengths (median ~ 500 tokens, so rows of 1024 hold a few documents each and the
document mask has work to do) of random ids; throughput does not depend on the id values.
Whatever attention path the model takes for document masks (dense SDPA mask, or FlexAttention
once `Transformer` uses `lmforge.model.flex`) is what gets measured; the script does not choose.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DEFAULT_VARIANTS = "peer,bare-adamw,bare-muon,loop-adamw-separator,loop-adamw-doc_mask,loop-muon-separator,loop-muon-doc_mask"
ALL_VARIANTS = DEFAULT_VARIANTS + ",bare-muon-docmask"
GOAL = 1.05  # default loop tokens/s over the peer's bare step


# ---- the peer: a nanoGPT model.py-style GPT ------------------------------------------------------
class _PeerBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class PeerGPT(nn.Module):
    """nanoGPT's GPT (bias=False, dropout=0): token + learned position embeddings, pre-LayerNorm
    blocks, tied output head, cross-entropy over the full logits."""

    def __init__(self, vocab: int, seq: int, n_layer: int, n_head: int, d: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.h = nn.ModuleList(_PeerBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith(("c_proj.weight", "mlp_proj.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    def flops_per_token(self, seq: int) -> float:
        """The same formula as ModelConfig.flops_per_token (position table excluded, tied head counted)."""
        n = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return 6.0 * n + 12.0 * len(self.h) * self.wte.weight.shape[1] * seq


def peer_optimizer(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """nanoGPT's configure_optimizers: weight decay 0.1 on >= 2-D tensors, fused AdamW on CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=device.type == "cuda")


# ---- measurements ----------------------------------------------------------------------------------
def _fresh(device: torch.device) -> None:
    """Between rows: free the previous row's model, optimizer state and cached blocks. Compiled
    graphs stay (the steady state does not depend on them; recompiling identical graphs would
    only spend the time budget)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_step_rate(model, optimizers, batches, device, amp, warmup: int, steps: int, compile: bool, doc_mask: bool) -> dict:
    """tokens/s of forward + backward + clip + optimizer steps, no loader, no logging, no host reads."""
    fwd = torch.compile(model) if compile else model
    params = [p for p in model.parameters() if p.requires_grad]
    is_lmforge = not isinstance(model, PeerGPT)

    def step(i):
        x, y, doc = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if is_lmforge:
                _, loss = fwd(x, y, doc_ids=doc if doc_mask else None)
            else:
                _, loss = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    _sync(device)
    t1 = time.perf_counter()
    for i in range(steps):
        loss = step(warmup + i)
    _sync(device)
    dt = time.perf_counter() - t1
    x = batches[0][0]
    return {"tokens_per_s": steps * x.numel() / dt, "warmup_s": t1 - t0, "loss": float(loss.detach())}


def make_batches(tokens_dir: Path, seq: int, batch: int, n: int, device: torch.device) -> list:
    """`n` (x, y, doc_ids) batches from the train shards, the loader's doc_mask layout."""
    from lmforge.train.data import BatchLoader, TokenStream, read_index

    index = read_index(tokens_dir)
    loader = BatchLoader(TokenStream(index, "train"), seq, batch, seed=0, bos_id=index.bos_id, packing="doc_mask", device=device)
    out = []
    for _ in range(n):
        b = loader.next_batch()
        out.append((b.x, b.y, b.doc_ids))
    return out


def synthetic_tokens(root: Path, vocab: int, n_tokens: int, seed: int = 0) -> Path:
    from lmforge.train.data import write_token_shards

    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_tokens:
        n = int(min(8192, max(16, rng.lognormal(math.log(500), 0.9))))
        docs.append(rng.integers(3, vocab, n).tolist())
        total += n + 1
    write_token_shards(root, {"train": docs, "val": docs[:40]}, vocab_size=vocab, shard_tokens=1 << 24)
    return root


def loop_rate(variant: str, args, tokens_dir: Path, out_root: Path, device: torch.device) -> dict:
    """lmforge's training loop; tokens/s = median of the per-window figures after the first window."""
    from lmforge.config import build
    from lmforge.train.config import TrainConfig
    from lmforge.train.loop import train
    from lmforge.train.metrics import read_metrics

    _, opt, packing = variant.split("-", 2)
    window = max(1, args.loop_window)
    cfg = build(TrainConfig, {
        "model": {"preset": args.preset}, "seq_len": args.seq, "batch_size": args.batch, "max_steps": args.loop_steps,
        "compile": args.compile, "optimizer": opt, "packing": packing, "device": device.type,
        "log_every": window, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 0, "keep_last": 1,
        "sample_prompts": [], "warmup_steps": 5, "resume": False, "seed": 0,
    }, "pretrain")
    t0 = time.perf_counter()
    train(cfg, tokens_dir, out_root / variant)
    recs = [r for r in read_metrics(out_root / variant / "metrics.jsonl") if r["kind"] == "train"]
    timed = recs[1:] or recs  # the first window holds the compilation
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed), "warmup_s": time.perf_counter() - t0,
            "loss": recs[-1]["loss"]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="124m", help="lmforge model preset; the peer takes its shape (default 124m = GPT-2 small)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=6, help="bare rows: untimed steps (compilation) before timing")
    ap.add_argument("--steps", type=int, default=30, help="bare rows: timed steps")
    ap.add_argument("--loop-steps", type=int, default=30, help="loop rows: max_steps (the first window is not counted)")
    ap.add_argument("--loop-window", type=int, default=6, help="loop rows: log_every (tokens/s per window)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list, or 'all' ({ALL_VARIANTS})")
    ap.add_argument("--tokens", type=Path, default=None, help="token shards (tokens/ directory); default: synthetic")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="eager (default: torch.compile; --smoke is eager)")
    ap.add_argument("--smoke", action="store_true", help="tiny preset, seq 64, batch 2, 2 steps, CPU, eager: checks that every row runs")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset, args.seq, args.batch = "tiny", 64, 2
        args.warmup, args.steps, args.loop_steps, args.loop_window = 1, 2, 4, 2
        args.device, args.compile = args.device or "cpu", False
    variants = ALL_VARIANTS.split(",") if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in ALL_VARIANTS.split(",")]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; choose from {ALL_VARIANTS}")
    device = torch.device(args.device or "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU machine, or use --smoke for the CPU check")
    os.environ.setdefault("LMFORGE_PROGRESS", "0")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for knob in ("recompile_limit", "cache_size_limit"):  # every row is a new model instance: allow the recompiles
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))

    from lmforge.config import build
    from lmforge.model import Transformer, preset
    from lmforge.model.flex import flex_available
    from lmforge.train.config import TrainConfig
    from lmforge.train.metrics import device_peak_flops
    from lmforge.train.optim import build_optimizers

    mcfg = preset(args.preset, max_seq_len=args.seq)
    amp = device.type == "cuda"
    peak, peak_src = device_peak_flops(device)
    tmp = Path(tempfile.mkdtemp(prefix="bench_train_gpu_"))
    tokens_dir = args.tokens or synthetic_tokens(tmp / "tokens", mcfg.vocab_size,
                                                 args.seq * args.batch * (max(args.loop_steps, args.warmup + args.steps) + 4))
    # the loop sizes the vocabulary from the shards (rounded up to 64): every row uses that model
    from lmforge.train.data import read_index

    mcfg = preset(args.preset, max_seq_len=args.seq, vocab_size=-(-read_index(tokens_dir).vocab_size // 64) * 64)
    batches = make_batches(tokens_dir, args.seq, args.batch, 8, device)
    docs_per_row = statistics.mean(float((d[:, -1] - d[:, 0] + 1).float().mean()) for _, _, d in batches)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}; torch {torch.__version__}; preset {args.preset} ({mcfg.num_params() / 1e6:.0f}M), seq {args.seq}, "
          f"batch {args.batch}, {'bf16 autocast' if amp else 'fp32'}, {'compile' if args.compile else 'eager'}; "
          f"peak {peak / 1e12:.0f} TFLOP/s ({peak_src}); {docs_per_row:.1f} documents per row; "
          f"FlexAttention {'available' if flex_available(device) else 'not available'} on this device", flush=True)
    print(f"{'row':22s} {'tokens/s':>11s} {'MFU':>7s} {'vs peer':>8s} {'warmup s':>9s} {'loss':>7s}", flush=True)

    rows: dict[str, dict] = {}
    t_all = time.perf_counter()
    for v in variants:
        _fresh(device)
        torch.manual_seed(0)
        if v == "peer":
            model = PeerGPT(mcfg.vocab_size, args.seq, mcfg.n_layers, mcfg.n_heads, mcfg.d_model).to(device)
            flops = model.flops_per_token(args.seq)
            r = bare_step_rate(model, [peer_optimizer(model, device)], batches, device, amp, args.warmup, args.steps,
                               args.compile, doc_mask=False)
        elif v.startswith("bare-"):
            model = Transformer(mcfg).to(device)
            flops = mcfg.flops_per_token(args.seq)
            tcfg = build(TrainConfig, {"optimizer": "adamw" if "adamw" in v else "muon", "weight_decay": 0.1}, "pretrain")
            r = bare_step_rate(model, build_optimizers(model, tcfg), batches, device, amp, args.warmup, args.steps,
                               args.compile, doc_mask=v.endswith("docmask"))
        else:
            model = None
            flops = mcfg.flops_per_token(args.seq)
            r = loop_rate(v, args, tokens_dir, tmp / "runs", device)
        del model
        r["mfu"] = r["tokens_per_s"] * flops / peak if peak > 0 else None
        if device.type == "cuda":
            r["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        rows[v] = r
        ref = rows.get("peer", {}).get("tokens_per_s")
        r["vs_peer"] = r["tokens_per_s"] / ref if ref else None
        mfu = f"{100 * r['mfu']:6.1f}%" if r["mfu"] is not None else "      -"
        vs = f"{r['vs_peer']:7.2f}x" if r["vs_peer"] else "       -"
        print(f"{v:22s} {r['tokens_per_s']:11,.0f} {mfu} {vs} {r['warmup_s']:9.1f} {r['loss']:7.3f}", flush=True)

    default, ref = rows.get("loop-muon-doc_mask"), rows.get("peer")
    if default and ref:
        ratio = default["tokens_per_s"] / ref["tokens_per_s"]
        verdict = "MET" if ratio >= GOAL else "NOT met"
        print(f"goal: default loop (Muon, doc_mask) at >= {GOAL:.2f}x the peer's bare step: {ratio:.2f}x -> {verdict}")
    print(f"total wall time {time.perf_counter() - t_all:.0f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "args": {k: str(val) for k, val in vars(args).items()},
                                         "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
