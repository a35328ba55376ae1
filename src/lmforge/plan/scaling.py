"""Scaling laws: IsoFLOP fits of loss against model size, power laws for the compute-optimal
model size N_opt(C) and token count D_opt(C), extrapolation to a target budget.

Method (Chinchilla's "approach 2"): for each compute budget C, fit a second-degree polynomial
of the final loss against log N over the model sizes trained with that budget; its minimum is
the compute-optimal size N_opt(C), and D_opt(C) = C / (FLOPs per token of that size). Then fit
log N_opt = a log C + log k_N and log D_opt = b log C + log k_D by least squares, and
extrapolate both to a target budget, reporting tokens per parameter next to Chinchilla's ~20.

Points come from a grid of small training runs (`run_grid`, tiny models on CPU) or from the
metrics.jsonl of runs already trained (`points_from_runs`: each run's loss curve is read at the
token counts where it spent each budget). N counts non-embedding parameters plus the output
projection (the parameters whose FLOPs scale with tokens); C = FLOPs per token x tokens
(`ModelConfig.flops_per_token`, attention included).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.errors import ConfigError, InputError
from lmforge.log import logger
from lmforge.rundir import save_figure

CHINCHILLA_TOKENS_PER_PARAM = 20.0


@dataclass
class Point:
    params: float  # N
    tokens: float  # D
    flops: float  # C
    loss: float
    budget: float = 0.0  # the nominal budget this point belongs to (grouping key); 0 = flops
    label: str = ""


def model_size(cfg) -> float:
    """N for scaling fits: non-embedding parameters + the output projection."""
    return float(cfg.num_params(embeddings=False, active=True) + cfg.vocab_size * cfg.d_model)


def fit_power_law(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """y = k * x^a by least squares in log space. Returns (k, a, r^2)."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    a, b = np.polyfit(lx, ly, 1)
    pred = a * lx + b
    ss = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float(((ly - pred) ** 2).sum()) / ss if ss > 0 else 1.0
    return float(math.exp(b)), float(a), r2


def fit_isoflop(points: list[Point]) -> list[dict]:
    """Per budget: the parabola loss = p0 (log N)^2 + p1 log N + p2, its minimum (N_opt, loss_opt),
    D_opt, and the residuals of each point. Budgets with < 3 sizes or a non-convex fit are kept
    with `ok: false` and the reason."""
    groups: dict[float, list[Point]] = {}
    for p in points:
        groups.setdefault(p.budget or p.flops, []).append(p)
    out = []
    for c, ps in sorted(groups.items()):
        ps = sorted(ps, key=lambda p: p.params)
        row: dict[str, Any] = {"budget": c, "points": [asdict(p) for p in ps]}
        if len({p.params for p in ps}) < 3:
            row.update(ok=False, reason="fewer than 3 model sizes")
            out.append(row)
            continue
        lx = np.log([p.params for p in ps])
        y = np.array([p.loss for p in ps])
        coef = np.polyfit(lx, y, 2)
        row["coef"] = [float(v) for v in coef]
        row["residuals"] = [float(v) for v in y - np.polyval(coef, lx)]
        if coef[0] <= 0:
            row.update(ok=False, reason="loss is not convex in log N at this budget (sizes do not bracket the optimum)")
            out.append(row)
            continue
        lopt = -coef[1] / (2 * coef[0])
        if not lx.min() - math.log(10) <= lopt <= lx.max() + math.log(10):
            row.update(ok=False, reason="the parabola's minimum lies more than 10x outside the sizes tried")
            out.append(row)
            continue
        n_opt = float(math.exp(lopt))
        inside = lx.min() <= lopt <= lx.max()
        # tokens at the optimum: interpolate log D against log N among this budget's points
        ld = np.log([p.tokens for p in ps])
        d_opt = float(math.exp(np.interp(lopt, lx, ld, left=None, right=None))) if inside else float(
            math.exp(np.polyval(np.polyfit(lx, ld, 1), lopt)))
        row.update(ok=True, n_opt=n_opt, d_opt=d_opt, loss_opt=float(np.polyval(coef, lopt)), inside_grid=bool(inside))
        out.append(row)
    return out


def fit_scaling(points: list[Point], target_flops: float = 0.0) -> dict:
    """IsoFLOP fits + power laws N_opt(C), D_opt(C) + extrapolation to `target_flops`."""
    if not points:
        raise InputError("no (size, tokens, loss) points to fit")
    iso = fit_isoflop(points)
    good = [r for r in iso if r["ok"]]
    res: dict[str, Any] = {"isoflop": iso, "n_points": len(points), "chinchilla_tokens_per_param": CHINCHILLA_TOKENS_PER_PARAM}
    if len(good) < 2:
        res["power_laws"] = None
        res["note"] = f"{len(good)} budget(s) with a usable parabola; power laws need at least 2"
        return res
    C = np.array([r["budget"] for r in good])
    kN, a, r2N = fit_power_law(C, [r["n_opt"] for r in good])
    kD, b, r2D = fit_power_law(C, [r["d_opt"] for r in good])
    res["power_laws"] = {"N_opt": {"k": kN, "exponent": a, "r2": r2N}, "D_opt": {"k": kD, "exponent": b, "r2": r2D}}
    res["tokens_per_param_at_budgets"] = {f"{r['budget']:.3g}": r["d_opt"] / r["n_opt"] for r in good}
    if target_flops > 0:
        n, d = kN * target_flops**a, kD * target_flops**b
        res["target"] = {"flops": target_flops, "n_opt": n, "d_opt": d, "tokens_per_param": d / n,
                         "vs_chinchilla": (d / n) / CHINCHILLA_TOKENS_PER_PARAM}
    return res


def format_fit(res: dict) -> str:
    lines = ["| budget C (FLOPs) | sizes | N_opt | D_opt | tokens/param | loss at opt | max abs residual |", "|---|---|---|---|---|---|---|"]
    for r in res["isoflop"]:
        if r["ok"]:
            lines.append(f"| {r['budget']:.3g} | {len(r['points'])} | {r['n_opt']:.3g}{'' if r['inside_grid'] else ' (outside grid)'} | {r['d_opt']:.3g} | {r['d_opt'] / r['n_opt']:.2f} | "
                         f"{r['loss_opt']:.4f} | {max(abs(v) for v in r['residuals']):.4f} |")
        else:
            lines.append(f"| {r['budget']:.3g} | {len(r['points'])} | — | — | — | — | {r['reason']} |")
    pl = res.get("power_laws")
    if pl:
        lines += ["", f"N_opt(C) = {pl['N_opt']['k']:.3g} · C^{pl['N_opt']['exponent']:.3f} (r² {pl['N_opt']['r2']:.3f}); "
                      f"D_opt(C) = {pl['D_opt']['k']:.3g} · C^{pl['D_opt']['exponent']:.3f} (r² {pl['D_opt']['r2']:.3f}). "
                      "Chinchilla found exponents ≈ 0.5 / 0.5."]
    else:
        lines += ["", res.get("note", "")]
    t = res.get("target")
    if t:
        lines.append(f"At C = {t['flops']:.3g}: N_opt ≈ {t['n_opt']:.3g} parameters, D_opt ≈ {t['d_opt']:.3g} tokens, "
                     f"{t['tokens_per_param']:.1f} tokens/parameter ({t['vs_chinchilla']:.2f}× Chinchilla's ~20).")
    return "\n".join(lines)


def plot_fit(res: dict, path: Path) -> Path:
    """IsoFLOP curves (points + parabolas + optima) and the N_opt / D_opt power laws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    cmap = plt.get_cmap("viridis")
    iso = res["isoflop"]
    for i, r in enumerate(iso):
        col = cmap(i / max(len(iso) - 1, 1))
        xs = [p["params"] for p in r["points"]]
        ys = [p["loss"] for p in r["points"]]
        a1.scatter(xs, ys, color=col, label=f"C={r['budget']:.2g}")
        if r.get("coef"):
            g = np.linspace(np.log(min(xs)) - 0.2, np.log(max(xs)) + 0.2, 100)
            a1.plot(np.exp(g), np.polyval(r["coef"], g), color=col, lw=1)
        if r["ok"]:
            a1.scatter([r["n_opt"]], [r["loss_opt"]], color=col, marker="*", s=160, edgecolor="k")
    a1.set_xscale("log")
    a1.set_xlabel("parameters N")
    a1.set_ylabel("final loss")
    a1.set_title("IsoFLOP curves")
    a1.legend(fontsize=7)
    good = [r for r in iso if r["ok"]]
    if good:
        C = np.array([r["budget"] for r in good])
        a2.scatter(C, [r["n_opt"] for r in good], label="N_opt", color="C0")
        a2.scatter(C, [r["d_opt"] for r in good], label="D_opt", color="C1")
        pl = res.get("power_laws")
        if pl:
            hi = max(C.max(), res.get("target", {}).get("flops", 0))
            g = np.geomspace(C.min(), hi, 50)
            a2.plot(g, pl["N_opt"]["k"] * g ** pl["N_opt"]["exponent"], color="C0", lw=1, label=f"N ∝ C^{pl['N_opt']['exponent']:.2f}")
            a2.plot(g, pl["D_opt"]["k"] * g ** pl["D_opt"]["exponent"], color="C1", lw=1, label=f"D ∝ C^{pl['D_opt']['exponent']:.2f}")
            a2.plot(g, pl["N_opt"]["k"] * g ** pl["N_opt"]["exponent"] * CHINCHILLA_TOKENS_PER_PARAM, color="gray", ls="--", lw=1,
                    label="20 tokens/param")
        a2.set_xscale("log")
        a2.set_yscale("log")
        a2.legend(fontsize=7)
    a2.set_xlabel("compute C (FLOPs)")
    a2.set_title("compute-optimal N and D")
    fig.tight_layout()
    return save_figure(fig, path)


# ---- points from existing runs --------------------------------------------------------------


def _read_metrics(path: Path) -> list[dict]:
    out, bad = [], 0
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                bad += 1
                if bad == 1:
                    logger.warning("%s:%d: not valid JSON, skipped", path, i)
    return out


def points_from_runs(run_dirs: list[Path], budgets: list[float] | None = None, smooth: int = 5) -> list[Point]:
    """Read each run's metrics.jsonl (train records: tokens, loss) and model config (config.json of
    a checkpoint), and return, for every budget a run's curve reaches, its loss after spending that
    budget (moving average of `smooth` logged points, interpolated in tokens). Budgets default to
    8 log-spaced values across the range the runs cover."""
    from lmforge.model.config import ModelConfig

    runs = []
    for rd in run_dirs:
        rd = Path(rd)
        mpath = rd / "metrics.jsonl"
        if not mpath.is_file():
            raise InputError(f"no metrics.jsonl in {rd}")
        cfgs = sorted(rd.glob("step_*/config.json"))
        if not cfgs:
            raise InputError(f"no checkpoint config (step_*/config.json) in {rd}: cannot tell the model size")
        mc = ModelConfig.from_dict(json.loads(cfgs[-1].read_text()))
        recs = [r for r in _read_metrics(mpath) if r.get("kind", "train") == "train" and "loss" in r and "tokens" in r]
        if len(recs) < 2:
            logger.warning("%s: fewer than 2 train records with tokens and loss, run skipped", mpath)
            continue
        toks = np.array([r["tokens"] for r in recs], float)
        loss = np.array([r["loss"] for r in recs], float)
        k = min(smooth, len(loss) // 2)
        if k > 1:
            loss = np.convolve(loss, np.ones(k) / k, mode="valid")
            toks = toks[k - 1 :]
        fpt = mc.flops_per_token()  # the training loop sets max_seq_len to the training seq_len
        runs.append((rd.name, model_size(mc), fpt, toks, loss))
    if not runs:
        raise InputError("none of the runs has at least 2 train records with tokens and loss in metrics.jsonl")
    if budgets is None:
        lo = max(r[2] * r[3][0] for r in runs)
        hi = max(r[2] * r[3][-1] for r in runs)
        budgets = list(np.geomspace(lo, hi, 8)) if hi > lo else [hi]
    pts = []
    for c in budgets:
        for name, n, fpt, toks, loss in runs:
            d = c / fpt
            if toks[0] <= d <= toks[-1]:
                pts.append(Point(n, d, c, float(np.interp(d, toks, loss)), budget=c, label=name))
    if not pts:
        raise InputError("no run reaches any of the budgets")
    return pts


# ---- a grid of small runs -------------------------------------------------------------------


@dataclass
class ScaleConfig:
    tokens: str = ""  # tokens/ directory (tokenizer stage output) to train on
    out: str = "runs/scale"
    widths: list[int] = field(default_factory=lambda: [32, 48, 64, 96, 128])  # d_model of each size (n_layers fixed)
    n_layers: int = 2
    head_dim: int = 16
    budgets: list[float] = field(default_factory=lambda: [3e11, 1e12, 3e12])  # training FLOPs per run
    seq_len: int = 128
    batch_size: int = 8
    lr: float = 3e-3
    optimizer: str = "adamw"
    target_flops: float = 1e21
    seed: int = 1234
    device: str = "auto"

    def validate(self) -> None:
        if not self.tokens:
            raise ValueError("scale.tokens: name a tokens/ directory to train on (e.g. runs/demo/tokens)")
        if len(self.widths) < 3:
            raise ValueError("scale.widths: need at least 3 model sizes per budget for the parabola fit")
        if any(w % self.head_dim for w in self.widths):
            raise ValueError(f"scale.widths must be multiples of head_dim ({self.head_dim})")
        if not self.budgets or any(b <= 0 for b in self.budgets):
            raise ValueError("scale.budgets: list positive FLOP budgets")


def grid_train_config(cfg: ScaleConfig, width: int, steps: int, vocab: int):
    from lmforge import config as cfgmod
    from lmforge.train.config import TrainConfig

    heads = width // cfg.head_dim
    return cfgmod.build(TrainConfig, {
        "model": {"preset": "tiny", "d_model": width, "n_layers": cfg.n_layers, "n_heads": heads, "n_kv_heads": heads,
                  "max_seq_len": cfg.seq_len, "ffn_hidden": 0},
        "seq_len": cfg.seq_len, "batch_size": cfg.batch_size, "max_steps": steps, "optimizer": cfg.optimizer, "lr": cfg.lr,
        "schedule": "wsd", "warmup_steps": max(1, steps // 10), "decay_frac": 0.3, "checkpoint_every": 0, "keep_last": 1,
        "eval_every": 0, "eval_batches": 4, "log_every": max(1, steps // 20), "sample_tokens": 0, "seed": cfg.seed,
        "device": cfg.device,
    }, "pretrain")


def run_grid(cfg: ScaleConfig) -> list[Point]:
    """Train every width at every budget (steps = budget / (FLOPs per token x tokens per step));
    the final validation loss of each run is one point. Finished runs are read back, not redone."""
    from lmforge.rundir import atomic_write_json, read_json
    from lmforge.train.data import read_index
    from lmforge.train.loop import train

    tokens = Path(cfg.tokens)
    index = read_index(tokens)
    out = Path(cfg.out)
    pts = []
    for budget in cfg.budgets:
        for w in cfg.widths:
            probe = grid_train_config(cfg, w, 1, index.vocab_size).model_config(index.vocab_size)
            fpt = probe.flops_per_token(cfg.seq_len)
            steps = max(1, round(budget / (fpt * cfg.seq_len * cfg.batch_size)))
            d = steps * cfg.seq_len * cfg.batch_size
            name = f"C{budget:.3g}_d{w}".replace("+", "")
            rdir = out / "runs" / name
            done = read_json(rdir / "point.json")
            if not done:
                logger.info("scale: %s: %d steps, N=%.3g, D=%d", name, steps, model_size(probe), d)
                res = train(grid_train_config(cfg, w, steps, index.vocab_size), tokens, rdir)
                loss = res.val_loss if res.val_loss is not None else res.final_loss
                done = asdict(Point(model_size(probe), float(d), float(fpt * d), float(loss), budget=float(budget), label=name))
                atomic_write_json(rdir / "point.json", done)
            pts.append(Point(**done))
    return pts


def save_fit(res: dict, points: list[Point], out: Path) -> tuple[Path, Path, Path]:
    from lmforge.rundir import atomic_write_json, atomic_write_text

    out = Path(out)
    j = atomic_write_json(out / "scaling_fit.json", {**res, "points": [asdict(p) for p in points]})
    png = plot_fit(res, out / "scaling.png")
    md = atomic_write_text(out / "scaling.md", "# Scaling-law fit\n\n" + format_fit(res) + "\n\n![scaling](scaling.png)\n")
    return j, png, md


__all__ = ["Point", "fit_isoflop", "fit_power_law", "fit_scaling", "points_from_runs", "run_grid", "ScaleConfig", "ConfigError"]
