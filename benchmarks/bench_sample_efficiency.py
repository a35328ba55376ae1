"""Sample efficiency on CPU: lmforge's default recipe (Muon on hidden matrices + AdamW, warmup-
stable-decay) against a GPT-2-style baseline (AdamW on everything, weight decay 0.1, betas
0.9/0.95, linear warmup + cosine decay to 10%), same model, same tokens, same data order, same
seeds, both through lmforge.train.loop.train so only the optimizer and schedule differ.

The baseline trains N steps and its final validation loss is the target. lmforge trains
shorter budgets (fractions of N, each a complete run with its own decay) and the smallest
fraction whose final validation loss reaches the target is reported, per seed.

    python benchmarks/bench_sample_efficiency.py                  # N = 300, seeds 0 1 2, fractions 0.5 0.7
    python benchmarks/bench_sample_efficiency.py --steps 200 --seeds 0 --plot docs/training_sample_efficiency.png
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train_cpu import make_tokens  # noqa: E402


def run(tokens: Path, out: Path, a, seed: int, steps: int, recipe: str) -> dict:
    from lmforge.config import build
    from lmforge.train.config import TrainConfig
    from lmforge.train.loop import train
    from lmforge.train.metrics import read_metrics

    common = {
        "model": {"preset": "tiny", "d_model": a.d_model, "n_layers": a.layers, "n_heads": a.heads, "n_kv_heads": a.heads},
        "seq_len": a.seq, "batch_size": a.batch, "max_steps": steps, "seed": seed, "log_every": 10,
        "eval_every": max(1, steps // 10), "eval_batches": a.eval_batches, "checkpoint_every": 0, "sample_prompts": [],
        "resume": False, "peak_flops": 1e12, "device": "cpu",
    }
    if recipe == "baseline":
        extra = {"optimizer": "adamw", "schedule": "cosine", "lr": a.baseline_lr, "weight_decay": 0.1,
                 "warmup_steps": a.warmup, "min_lr_frac": 0.1, "grad_clip": 1.0}
    else:
        extra = {"warmup_steps": a.warmup}  # everything else: TrainConfig defaults
    cfg = build(TrainConfig, {**common, **extra}, "pretrain")
    t0 = time.time()
    res = train(cfg, tokens, out)
    evals = [(r["step"], r["val_loss"]) for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    return {"final": res.val_loss, "curve": evals, "seconds": time.time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="baseline steps N")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--baseline-lr", type=float, default=3e-3)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--chars", type=int, default=3_000_000)
    ap.add_argument("--plot", help="write a PNG of the validation curves here")
    a = ap.parse_args()
    os.environ.setdefault("LMFORGE_PROGRESS", "0")
    tmp = Path(tempfile.mkdtemp(prefix="bench_eff_"))
    t0 = time.time()
    tokens, flat = make_tokens(tmp, a.vocab, a.chars, val_frac=0.05)
    print(f"tokens: {len(flat):,} train tokens of real text ({time.time() - t0:.0f}s); baseline {a.steps} steps x "
          f"{a.batch * a.seq} tokens = {a.steps * a.batch * a.seq / len(flat):.2f} epochs", file=sys.stderr)
    rows, curves = [], {}
    for seed in a.seeds:
        base = run(tokens, tmp / f"base{seed}", a, seed, a.steps, "baseline")
        curves[("baseline", seed)] = base["curve"]
        row = {"seed": seed, "target": base["final"], "base_s": base["seconds"], "lm": {}}
        for f in sorted(a.fractions):
            n = int(round(f * a.steps))
            r = run(tokens, tmp / f"lm{seed}_{n}", a, seed, n, "lmforge")
            row["lm"][f] = r["final"]
            curves[("lmforge", seed, f)] = r["curve"]
            print(f"seed {seed}: baseline {a.steps} steps -> {base['final']:.4f}; lmforge {n} steps -> {r['final']:.4f}",
                  file=sys.stderr)
        reached = [f for f in sorted(a.fractions) if row["lm"][f] <= row["target"]]
        row["reached"] = reached[0] if reached else None
        rows.append(row)
    print(f"\nSample efficiency, CPU, model {a.layers} layers x {a.d_model} (vocab {a.vocab}), seq {a.seq}, batch {a.batch}; "
          f"baseline AdamW lr {a.baseline_lr} + cosine, N = {a.steps} steps")
    head = f"{'seed':>4s} {'baseline val loss @N':>21s} " + " ".join(f"{'lmforge @' + format(f, '.2f') + 'N':>15s}" for f in sorted(a.fractions))
    print(head + f" {'steps ratio':>12s}")
    for r in rows:
        cells = " ".join(f"{r['lm'][f]:15.4f}" for f in sorted(a.fractions))
        ratio = f"<= {r['reached']:.2f}x" if r["reached"] is not None else f"> {max(a.fractions):.2f}x"
        print(f"{r['seed']:>4d} {r['target']:21.4f} {cells} {ratio:>12s}")
    mean_t = statistics.mean(r["target"] for r in rows)
    means = " ".join(f"{statistics.mean(r['lm'][f] for r in rows):15.4f}" for f in sorted(a.fractions))
    print(f"{'mean':>4s} {mean_t:21.4f} {means}")
    ok = all(r["reached"] is not None and r["reached"] <= 0.7 for r in rows)
    print(f"lmforge reaches the baseline's final validation loss within 0.7x the steps on every seed: {'yes' if ok else 'no'}")
    if a.plot:
        plot(curves, a, a.plot)


def plot(curves: dict, a, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"baseline": "tab:gray"}
    for key, c in curves.items():
        if not c:
            continue
        s, v = zip(*c)
        if key[0] == "baseline":
            ax.plot(s, v, color="tab:gray", alpha=0.8, label="AdamW + cosine (baseline)" if key[1] == a.seeds[0] else None)
        else:
            col = {0.5: "tab:blue", 0.7: "tab:orange"}.get(key[2], "tab:green")
            ax.plot(s, v, color=col, alpha=0.8, label=f"lmforge default, {key[2]:.2f}N steps" if key[1] == a.seeds[0] else None)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("sample efficiency on CPU (seeds overlaid)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}", file=sys.stderr)
    del colors


if __name__ == "__main__":
    main()
