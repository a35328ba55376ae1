"""Data-quality ablations: train the same small model on two or more corpora (or filter
settings) with several seeds each, evaluate every task over checkpoints during training, and
rank the tasks by how much signal they give at this scale.

Per task metric:
* monotonicity — Spearman correlation of the score with the training step, averaged over runs
  (sign-adjusted: +1 = improves at every evaluation);
* seed std — standard deviation of the final score across seeds, averaged over corpora;
* separation — |difference of the corpora's mean final scores| / pooled seed std (the largest
  pair when there are more than two corpora), with the corpus that scores better;
* margin over random — mean final score minus the random-guess baseline (accuracy tasks);
* signal = separation x max(monotonicity, 0): a task is useful for data decisions when it
  moves with training and separates the datasets by more than the seed noise.

The evaluation documents (held out by id hash, as everywhere in lmforge.eval) are removed from
every training corpus, and the same tokenizer is used for all corpora, so scores compare.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge import config as cfgmod
from lmforge.errors import ConfigError, InputError
from lmforge.eval import builtin, harness
from lmforge.log import logger
from lmforge.rundir import atomic_write_json, atomic_write_text, read_json, save_figure

DEFAULT_PRETRAIN = {
    "model": {"preset": "tiny", "d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "ffn_hidden": 0},
    "seq_len": 128, "batch_size": 8, "max_steps": 150, "optimizer": "adamw", "lr": 3e-3, "warmup_steps": 10,
    "checkpoint_every": 50, "keep_last": 1, "log_every": 10, "eval_batches": 4, "sample_tokens": 0,
}


@dataclass
class AblateConfig:
    corpora: dict[str, list[str]] = field(default_factory=dict)  # name -> corpus dirs / JSONL files
    tokenizer: str = ""  # tokenizer directory shared by every corpus
    out: str = "runs/ablate"
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    tasks: list[str] = field(default_factory=lambda: ["perplexity", "dictionary", "cloze"])
    eval_docs: list[str] = field(default_factory=list)  # documents for held-out tasks; [] = the bundled sample
    eval_every: int = 50  # steps between evaluations (and at the end)
    limit: int = 100  # examples per multiple-choice task
    docs_per_source: int = 10
    heldout_per_mille: int = 50
    val_per_mille: int = 20  # share of each corpus kept as its own validation split
    max_docs: int = 0  # documents per corpus (0 = all)
    pretrain: dict[str, Any] = field(default_factory=dict)  # [pretrain] overrides over DEFAULT_PRETRAIN

    def validate(self) -> None:
        if len(self.corpora) < 2:
            raise ValueError("ablate.corpora: name at least two corpora, e.g. {filtered = [...], unfiltered = [...]}")
        for k, v in self.corpora.items():
            if not v:
                raise ValueError(f"ablate.corpora.{k}: list at least one corpus directory or JSONL file")
        if not self.tokenizer:
            raise ValueError("ablate.tokenizer: name the tokenizer directory every corpus is encoded with")
        if len(self.seeds) < 2:
            raise ValueError("ablate.seeds: at least 2 seeds are needed to measure seed noise")
        if self.eval_every < 1 or self.limit < 1 or self.docs_per_source < 1:
            raise ValueError("ablate.eval_every, limit and docs_per_source must be >= 1")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[AblateConfig, Path]:
    raw: dict = {}
    base = Path.cwd()
    if path:
        doc = cfgmod.load_toml(path)
        unknown = [k for k in doc if k != "ablate"]
        if unknown:
            raise ConfigError(f"{path}: unknown section [{unknown[0]}]; an ablation file has one [ablate] section")
        raw = doc.get("ablate", {})
        base = Path(path).resolve().parent
    cfgmod.apply_overrides(raw, {k.removeprefix("ablate."): v for k, v in (o.split("=", 1) for o in overrides or [])})
    bad = [o for o in overrides or [] if not o.startswith("ablate.")]
    if bad:
        raise ConfigError(f"lmforge ablate takes --ablate.KEY overrides only, got --{bad[0]}")
    return cfgmod.build(AblateConfig, raw, "ablate"), base


def _res(base: Path, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else base / q


def train_config(cfg: AblateConfig, seed: int):
    from lmforge.train.config import TrainConfig

    merged = json.loads(json.dumps(DEFAULT_PRETRAIN))
    for k, v in cfg.pretrain.items():
        if k == "model" and isinstance(v, dict):
            merged["model"].update(v)
        else:
            merged[k] = v
    merged.update(seed=seed, eval_every=cfg.eval_every)
    return cfgmod.build(TrainConfig, merged, "ablate.pretrain")


def prepare_tokens(paths: list[Path], tok: harness.Tok, out: Path, exclude: set[str], cfg: AblateConfig) -> dict:
    """Encode a corpus (minus the evaluation documents) into train/val token shards."""
    from lmforge.train.data import write_token_shards

    if (out / "index.json").is_file() and read_json(out / "prepared.json"):
        return read_json(out / "prepared.json")
    train_docs, val_docs, skipped, n = [], [], 0, 0
    batch: list[builtin.Doc] = []

    def flush():
        for d, ids in zip(batch, tok.encode_batch([d.text for d in batch])):
            (val_docs if builtin.is_heldout("val:" + d.id, cfg.val_per_mille) else train_docs).append(ids)
        batch.clear()

    for d in builtin.iter_docs(paths):
        if builtin.is_heldout(d.id, cfg.heldout_per_mille) or " ".join(d.text.split()) in exclude:
            skipped += 1
            continue
        batch.append(d)
        n += 1
        if len(batch) >= 256:
            flush()
        if cfg.max_docs and n >= cfg.max_docs:
            break
    flush()
    if not train_docs or not val_docs:
        raise InputError(f"corpus {', '.join(map(str, paths))}: too few documents for train and validation splits")
    write_token_shards(out, {"train": train_docs, "val": val_docs}, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id)
    info = {"docs_train": len(train_docs), "docs_val": len(val_docs), "tokens_train": sum(map(len, train_docs)) + len(train_docs),
            "excluded_eval_docs": skipped}
    atomic_write_json(out / "prepared.json", info)
    return info


def run_ablation(cfg: AblateConfig, base: Path) -> dict:
    from lmforge.train.loop import train

    out = _res(base, cfg.out)
    tok_dir = _res(base, cfg.tokenizer)
    tok = harness.load_tok(tok_dir)
    eval_docs = [_res(base, p) for p in cfg.eval_docs] or builtin.default_doc_paths()
    held = builtin.heldout_docs(eval_docs, cfg.heldout_per_mille, cfg.docs_per_source)
    exclude = {" ".join(d.text.split()) for v in held.values() for d in v}  # the same text under another id
    prepared = {}
    for name, paths in cfg.corpora.items():
        ps = [_res(base, p) for p in paths]
        for p in ps:
            if not p.exists():
                raise InputError(f"ablate.corpora.{name}: {p} not found")
        prepared[name] = prepare_tokens(ps, tok, out / "tokens" / name, exclude, cfg)
        logger.info("ablate: corpus %s: %s", name, prepared[name])
    for name, seed in itertools.product(cfg.corpora, cfg.seeds):
        rdir = out / "runs" / f"{name}_seed{seed}"
        if read_json(rdir / "done.json"):
            continue
        hook = harness.make_on_eval(tok_dir, cfg.tasks, docs=eval_docs, limit=cfg.limit, seed=0, out_dir=rdir / "eval",
                                    docs_per_source=cfg.docs_per_source)
        logger.info("ablate: training %s seed %d", name, seed)
        res = train(train_config(cfg, seed), out / "tokens" / name, rdir, tokenizer_dir=tok_dir, on_eval=hook)
        atomic_write_json(rdir / "done.json", {"steps": res.steps, "val_loss": res.val_loss})
    series = collect(out, list(cfg.corpora), cfg.seeds)
    rows = analyze(series, list(cfg.corpora))
    result = {"config": cfgmod.to_dict(cfg), "corpora": prepared, "tasks": rows, "series": series}
    atomic_write_json(out / "ablation.json", result)
    pngs = plot_ablation(series, rows, list(cfg.corpora), out)
    atomic_write_text(out / "ablation.md", report(rows, prepared, cfg, pngs))
    return result


def _lower_is_better(metric: str) -> bool:
    return metric.startswith(("bpb", "loss", "ppl"))


def collect(out: Path, corpora: list[str], seeds: list[int]) -> dict:
    """{task/metric: {"random": r, "lower": bool, "runs": {corpus: {seed: [[step, value], ...]}}}}"""
    series: dict[str, dict] = {}
    for name, seed in itertools.product(corpora, seeds):
        for f in sorted((out / "runs" / f"{name}_seed{seed}" / "eval").glob("step_*/*.json")):
            r = json.loads(f.read_text())
            step = int(f.parent.name[5:])
            for m, v in r["metrics"].items():
                if r.get("type") == "perplexity" and not m.startswith("bpb"):
                    continue
                key = f"{r['task']}/{m}"
                s = series.setdefault(key, {"random": r.get("random"), "lower": _lower_is_better(m), "runs": {}})
                s["runs"].setdefault(name, {}).setdefault(str(seed), []).append([step, float(v)])
    for s in series.values():
        for runs in s["runs"].values():
            for pts in runs.values():
                pts.sort()
    return series


def _spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3 or len(set(y)) < 2:
        return 0.0
    r = spearmanr(x, y).statistic
    return 0.0 if r is None or math.isnan(r) else float(r)


def analyze(series: dict, corpora: list[str]) -> list[dict]:
    rows = []
    for key, s in series.items():
        sign = -1.0 if s["lower"] else 1.0
        mono, finals = [], {}
        for c in corpora:
            for seed, pts in s["runs"].get(c, {}).items():
                mono.append(sign * _spearman([p[0] for p in pts], [p[1] for p in pts]))
                finals.setdefault(c, []).append(pts[-1][1])
        if len(finals) < 2:
            continue
        stds = {c: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for c, v in finals.items()}
        means = {c: float(np.mean(v)) for c, v in finals.items()}
        best_sep, pair = 0.0, None
        for a, b in itertools.combinations(finals, 2):
            pooled = math.sqrt((stds[a] ** 2 + stds[b] ** 2) / 2)
            diff = abs(means[a] - means[b])
            sep = diff / pooled if pooled > 0 else (math.inf if diff > 0 else 0.0)
            if pair is None or sep > best_sep:
                best_sep, pair = sep, (a, b)
        better = None
        if pair:
            a, b = pair
            better = a if sign * (means[a] - means[b]) > 0 else b
        m = float(np.mean(mono)) if mono else 0.0
        rnd = s.get("random")
        margin = sign * (float(np.mean([v for vs in finals.values() for v in vs])) - rnd) if rnd is not None and not s["lower"] else None
        sep_c = min(best_sep, 1e6)
        rows.append({
            "task": key, "lower_is_better": s["lower"], "monotonicity": m, "seed_std": float(np.mean(list(stds.values()))),
            "separation": sep_c, "pair": list(pair) if pair else None, "better": better, "means": means,
            "margin_over_random": margin, "random": rnd, "signal": sep_c * max(m, 0.0),
        })
    rows.sort(key=lambda r: -r["signal"])
    return rows


def report(rows: list[dict], prepared: dict, cfg: AblateConfig, pngs: list[Path]) -> str:
    lines = ["# Data-quality ablation", "",
             "Corpora: " + ", ".join(f"{k} ({v['docs_train']} train docs, {v['tokens_train']:,} tokens)" for k, v in prepared.items()) + "; "
             f"seeds {cfg.seeds}; evaluation every {cfg.eval_every} steps.", "",
             "| rank | task/metric | signal | separation (pooled seed std) | better | monotonicity | seed std | margin over random | "
             + " | ".join(f"{c} final" for c in cfg.corpora) + " |",
             "|---" * (9 + len(cfg.corpora) - 1) + "|"]
    for i, r in enumerate(rows, 1):
        marg = "—" if r["margin_over_random"] is None else f"{r['margin_over_random']:+.4f}"
        lines.append(f"| {i} | {r['task']}{' (↓)' if r['lower_is_better'] else ''} | {r['signal']:.2f} | {r['separation']:.2f} | {r['better']} | "
                     f"{r['monotonicity']:+.2f} | {r['seed_std']:.4f} | {marg} | " + " | ".join(f"{r['means'].get(c, float('nan')):.4f}" for c in cfg.corpora) + " |")
    sep = [r for r in rows if r["separation"] >= 2 and r["monotonicity"] > 0.5]
    lines += ["", (f"{len(sep)} task metric(s) separate the corpora by at least 2 pooled seed standard deviations while improving "
                   f"with training: {', '.join(r['task'] for r in sep)}." if sep else
                   "No task metric separates the corpora by 2 pooled seed standard deviations while improving with training at this scale.")]
    lines += [f"\n![{p.stem}]({p.name})" for p in pngs]
    return "\n".join(lines) + "\n"


def plot_ablation(series: dict, rows: list[dict], corpora: list[str], out: Path, top: int = 6) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [r["task"] for r in rows[:top]]
    if not keys:
        return []
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for i, c in enumerate(corpora):
            runs = list(series[k]["runs"].get(c, {}).values())
            if not runs:
                continue
            steps = sorted({p[0] for r in runs for p in r})
            vals = np.array([[dict(map(tuple, r)).get(s, np.nan) for s in steps] for r in runs])
            mean, lo, hi = np.nanmean(vals, 0), np.nanmin(vals, 0), np.nanmax(vals, 0)
            ax.plot(steps, mean, marker="o", color=f"C{i}", label=c)
            ax.fill_between(steps, lo, hi, color=f"C{i}", alpha=0.2)
        rnd = series[k].get("random")
        if rnd is not None and not series[k]["lower"]:
            ax.axhline(rnd, color="gray", ls=":", lw=1)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    p1 = out / "ablation_curves.png"
    save_figure(fig, p1)
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(rows) + 2), 3.2))
    ax.bar(range(len(rows)), [min(r["separation"], 50) for r in rows], color=["C2" if r["monotonicity"] > 0.5 else "C7" for r in rows])
    ax.axhline(2, color="k", ls="--", lw=1)
    ax.set_xticks(range(len(rows)), [r["task"] for r in rows], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("separation / pooled seed std")
    ax.set_title("task signal (green: monotonicity > 0.5)", fontsize=9)
    fig.tight_layout()
    p2 = out / "ablation_signal.png"
    save_figure(fig, p2)
    return [p1, p2]


__all__ = ["AblateConfig", "run_ablation", "analyze", "collect", "asdict"]
