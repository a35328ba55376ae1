"""Training metrics: JSONL (one object per logged step), optional TensorBoard, loss plot PNG, MFU.

`metrics.jsonl` records carry a `kind`: "train" (loss, lr, grad_norm, tokens, tokens_per_s,
mfu — or steps_per_s for a stage that does not count tokens — plus the extra metrics a stage's
loss function returns), "eval" (val_loss, val_bpb and whatever an eval hook returned) and
"samples" (text generations). On resume the records after the checkpoint's step are dropped first, so the file
reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from lmforge.errors import ConfigError

# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity).
PEAK_FLOPS = {
    "h200": 989e12, "h100": 989e12, "h800": 989e12, "gh200": 989e12, "b200": 2250e12,
    "a100": 312e12, "a800": 312e12, "a10g": 70e12, "a10": 125e12, "l40s": 362e12, "l4": 121e12,
    "4090": 165e12, "3090": 71e12, "v100": 125e12, "t4": 65e12, "mi300x": 1307e12, "mi250x": 383e12,
}


def device_peak_flops(device: torch.device, configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s, where the figure came from) for MFU."""
    if configured > 0:
        return configured, "configured"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for key, v in PEAK_FLOPS.items():
            if key in name:
                return v, f"table ({key})"
        return 0.0, f"unknown GPU {name!r}: set pretrain.peak_flops"
    return measure_matmul_flops(), "measured fp32 matmul"


def measure_matmul_flops(n: int = 512, seconds: float = 0.3) -> float:
    """Achievable fp32 matmul FLOP/s of this CPU (best of a few timed square matmuls)."""
    g = torch.Generator().manual_seed(0)  # its own generator: the training RNG (dropout, resume) is left untouched
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        dt = time.perf_counter() - t0
        best = max(best, 4 * 2 * n**3 / dt)
    return best


class MetricsLog:
    """Append-only JSONL log (+ TensorBoard scalars when enabled). Only the main rank writes."""

    def __init__(self, path: Path, enabled: bool = True, tensorboard: bool = False, resume_step: int | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:
            truncate_after(self.path, resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("pretrain.tensorboard = true needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def truncate_after(path: Path, step: int) -> None:
    """Keep only the records with step <= `step` (the resumed run rewrites the rest)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if rec.get("step", 0) <= step:
            keep.append(line)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(path: str | Path) -> list[dict]:
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_metrics(metrics_path: str | Path, png_path: str | Path, title: str = "") -> Path | None:
    """Train loss (raw and smoothed), val loss, and learning rate against steps, as a PNG."""
    recs = read_metrics(metrics_path)
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval" and "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.rundir import atomic_write_bytes

    steps = [r["step"] for r in train]
    loss = [r["loss"] for r in train]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), height_ratios=[3, 1], sharex=True)
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="train loss")
    if len(loss) >= 5:
        k = max(2, len(loss) // 20)
        sm = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
        ax.plot(steps, sm, color="tab:blue", lw=1.8, label=f"train loss (mean of {k})")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange", label="val loss")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "pretraining")
    lrs = [r.get("lr") for r in train]
    if all(v is not None for v in lrs):
        ax2.plot(steps, lrs, color="tab:green")
        ax2.set_ylabel("lr")
        ax2.grid(alpha=0.3)
    ax2.set_xlabel("step")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(png_path, buf.getvalue())


__all__ = ["MetricsLog", "plot_metrics", "read_metrics", "device_peak_flops", "truncate_after", "PEAK_FLOPS"]
