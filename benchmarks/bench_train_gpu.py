"""lmforge's training loop on one GPU: bf16 autocast, fused AdamW + Muon, with and without
torch.compile and activation checkpointing; prints tokens/s and MFU from metrics.jsonl.

    python benchmarks/bench_train_gpu.py --preset 124m --seq 1024 --batch 16 --steps 30

Token shards are random ids (throughput does not depend on the values); the loss is printed to
show the step ran, not as a quality figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="124m")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--variants", default="eager,compile,compile+ckpt,compile+adamw")
    a = ap.parse_args()
    os.environ.setdefault("LMFORGE_PROGRESS", "0")
    from lmforge.config import build
    from lmforge.model import preset
    from lmforge.train.config import TrainConfig
    from lmforge.train.data import write_token_shards
    from lmforge.train.loop import train
    from lmforge.train.metrics import read_metrics

    vocab = preset(a.preset).vocab_size
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    rng = np.random.default_rng(0)
    n_tok = a.seq * a.batch * (a.steps + 2) + 10
    docs = [list(rng.integers(3, vocab, 2000)) for _ in range(n_tok // 2000 + 1)]
    write_token_shards(tmp / "tokens", {"train": docs, "val": docs[:20]}, vocab_size=vocab, shard_tokens=1 << 22)
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; preset {a.preset}, seq {a.seq}, batch {a.batch}")
    print(f"{'variant':18s} {'tokens/s':>10s} {'MFU':>7s} {'final loss':>10s} {'peak mem GiB':>13s} {'wall s':>7s}")
    for v in a.variants.split(","):
        torch.cuda.reset_peak_memory_stats()
        cfg = build(TrainConfig, {
            "model": {"preset": a.preset}, "seq_len": a.seq, "batch_size": a.batch, "max_steps": a.steps,
            "compile": "compile" in v, "activation_checkpointing": "ckpt" in v,
            "optimizer": "adamw" if "adamw" in v else "muon", "log_every": 1, "eval_every": 0, "eval_batches": 2,
            "checkpoint_every": 0, "sample_prompts": [], "warmup_steps": 5, "resume": False, "seed": 0,
        }, "pretrain")
        t0 = time.time()
        res = train(cfg, tmp / "tokens", tmp / v)
        recs = [r for r in read_metrics(tmp / v / "metrics.jsonl") if r["kind"] == "train"][a.steps // 2 :]
        tps = statistics.median(r["tokens_per_s"] for r in recs)
        mfu = statistics.median(r["mfu"] for r in recs)
        print(f"{v:18s} {tps:10,.0f} {100 * mfu:6.1f}% {res.final_loss:10.3f} {torch.cuda.max_memory_allocated() / 2**30:13.1f} "
              f"{time.time() - t0:7.1f}", flush=True)


if __name__ == "__main__":
    main()
