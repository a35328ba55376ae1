"""The chat evaluation stage (`[chat_eval]` in a recipe, output `runs/NAME/chat_eval/`) and the
function `lmforge chat-eval` shares with it.

Reads the SFT stage's artifacts: the chat model (`sft/<name>/latest`), the held-out conversations
and safety prompts beside it (`sft/<name>/data/heldout.jsonl`, `safety_eval.jsonl`), and the base
model it was fine-tuned from (`state.json` "base", else the run's `checkpoints/`). Writes
`results.json` (every metric per model — sft, base_0shot, base_1shot, base_<k>shot — the safety
rates per set, sample answers), `chat_eval.png` (F1 / ROUGE-L per model, safety rates) and the
report section (tables, the plot, sample conversations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lmforge.errors import ConfigError, InputError
from lmforge.eval import chat, harness, scoring
from lmforge.log import logger
from lmforge.recipe import StageContext, StageResult
from lmforge.rundir import atomic_write_json, read_json, save_figure


@dataclass
class ChatEvalConfig:
    model: str = ""  # the chat model ("" = the run's latest sft/ model); any path lmforge generate takes
    base: str = ""  # the base model for the few-shot baseline ("" = the SFT checkpoint's state.json "base", else the run's checkpoints/)
    data: str = ""  # held-out conversations JSONL ("" = data/heldout.jsonl beside the chat model's step directories)
    safety: str = ""  # safety prompts JSONL ("" = data/safety_eval.jsonl beside the chat model; skipped when absent)
    fewshot_data: str = ""  # demonstrations for the base model ("" = the held-out file's other items)
    shots: int = 5  # k of the k-shot baseline (0- and 1-shot always run)
    baseline: bool = True  # run the base model's few-shot baseline
    limit: int = 200  # held-out items scored (0 = all)
    safety_limit: int = 0  # prompts per safety set (0 = all)
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    batch_size: int = 32  # prompts generated together
    samples: int = 4  # sample conversations in the report
    bootstrap: int = 1000  # bootstrap resamples for standard errors (0 = off)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int | None = None  # None = the recipe's run.seed
    plots: bool = True

    def validate(self) -> None:
        for k in ("shots", "limit", "safety_limit", "bootstrap", "samples"):
            if getattr(self, k) < 0:
                raise ConfigError(f"chat_eval.{k} must be >= 0, got {getattr(self, k)}")
        for k in ("max_new_tokens", "batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"chat_eval.{k} must be >= 1, got {getattr(self, k)}")
        if not self.temperature >= 0:
            raise ConfigError(f"chat_eval.temperature must be >= 0, got {self.temperature}")

    def input_fingerprint(self, base: Path) -> str | None:
        """Explicit data files (data, safety, fewshot_data) are inputs of their own: the stage
        reruns when they change. The default files come from the sft stage (its fingerprint is
        upstream of this one)."""
        from lmforge.rundir import file_fingerprint

        paths = [p if p.is_absolute() else base / p for p in (Path(x).expanduser() for x in
                                                              (self.data, self.safety, self.fewshot_data) if x)]
        paths = [p for p in paths if p.is_file()]
        return file_fingerprint(paths) if paths else None


# ---- finding the inputs ---------------------------------------------------------------------


def default_data_file(model_dir: Path, name: str) -> Path:
    """`data/<name>` of the SFT output the model directory belongs to (`sft/<name>/step_N` ->
    `sft/<name>/data/<name>`)."""
    return model_dir.parent / "data" / name


def find_base(model_dir: Path, explicit: str | Path | None = None) -> Path | None:
    """The base model of a chat model: `explicit`, else the `base` its state.json records (when
    that path still exists), else the `checkpoints/` of the run directory above it."""
    if explicit:
        return Path(explicit)
    recorded = (read_json(model_dir / "state.json") or {}).get("base")
    if recorded and Path(recorded).exists():
        return Path(recorded)
    if recorded:
        logger.warning("base model %s recorded by %s no longer exists; looking for the run's checkpoints/", recorded, model_dir)
    for d in model_dir.resolve().parents[:4]:
        if (d / "checkpoints").is_dir():
            return d / "checkpoints"
    return None


def _load(path: Path, device, what: str):
    from lmforge.infer import load_model_and_tokenizer
    from lmforge.tokenizer.chat import check_template

    model, tok, ref = load_model_and_tokenizer(path, device=device)
    if what == "chat":
        check_template((read_json(ref.path / "state.json") or {}).get("chat_template"))
    return model, tok, ref


# ---- the evaluation -------------------------------------------------------------------------


def _model_result(preds: list[str], items: list[chat.ChatItem], bootstrap: int, seed: int, **extra) -> dict:
    s = chat.score_answers(preds, [it.reference for it in items], bootstrap, seed)
    return {"metrics": s["metrics"], "stderr": s["stderr"], "n": s["n"], **extra, "_per_item": s["per_item"],
            "_preds": preds}


def run_chat_eval(cfg: ChatEvalConfig, *, model: Path, out: Path, seed: int, base: Path | None = None,
                  data: Path | None = None, safety: Path | None = None, fewshot_data: Path | None = None,
                  image_prefix: str = "") -> tuple[dict, str]:
    """Evaluate the chat model at `model` (and its base at `base` when `cfg.baseline`); write
    results.json and the plot under `out`; return (results, markdown report). `data` / `safety`
    default to the files beside the chat model; `image_prefix` is put before the plot's file name
    in the report (the stage: `chat_eval/`, paths relative to the run directory)."""
    device = harness.pick_device(cfg.device)
    sft_model, sft_tok, ref = _load(model, device, "chat")
    data = data or default_data_file(ref.path, "heldout.jsonl")
    if not data.is_file():
        raise InputError(f"held-out conversations not found: {data} (the SFT stage writes them; or pass chat_eval.data / --data)")
    all_items, data_stats = chat.read_heldout(data)
    items = all_items[: cfg.limit] if cfg.limit else all_items
    safety_path = safety or default_data_file(ref.path, "safety_eval.jsonl")
    safety_sets, safety_stats = ({}, {})
    if safety is not None or safety_path.is_file():
        safety_sets, safety_stats = chat.read_safety(safety_path)
        if cfg.safety_limit:
            safety_sets = {k: v[: cfg.safety_limit] for k, v in safety_sets.items()}
    gen = dict(temperature=cfg.temperature, seed=seed, batch_size=cfg.batch_size)
    B = cfg.bootstrap

    logger.info("chat eval: %d held-out conversations, chat model %s", len(items), ref.path)
    preds, truncated = chat.chat_answers(sft_model, sft_tok, items, cfg.max_new_tokens, **gen)
    models = {"sft": _model_result(preds, items, B, seed, path=str(ref.path), truncated_prompts=truncated)}

    safety_res: dict = {}
    safety_samples: list[dict] = []
    for name, s_items in safety_sets.items():
        if not s_items:
            continue
        answers, _ = chat.chat_answers(sft_model, sft_tok, s_items, cfg.max_new_tokens, **gen)
        flags = [chat.is_refusal(a) for a in answers]
        r = chat.rate(flags, B, seed)
        key = "over_refusal_rate" if name == "harmless" else "refusal_rate"
        safety_res[name] = {key: r["rate"], "stderr": r["stderr"], "n": r["n"]}
        refs = [(a, it.reference) for a, it in zip(answers, s_items) if it.reference]
        if name == "harmless" and refs:
            f1 = [scoring.f1_score(a, [x]) for a, x in refs]
            safety_res[name]["answer_f1"] = float(np.mean(f1))
            safety_res[name]["answer_f1_stderr"] = scoring.bootstrap_stderr(f1, B, seed)
        safety_samples.append({"set": name, "prompt": s_items[0].question, "answer": answers[0], "refusal": flags[0]})
    del sft_model

    base_ref = None
    if cfg.baseline:
        base = find_base(ref.path, base)
        if base is None:
            raise InputError(f"no base model found for {ref.path} (no 'base' in its state.json and no checkpoints/ "
                             "above it): pass chat_eval.base / --base, or turn the baseline off (chat_eval.baseline = false)")
        base_model, base_tok, base_ref = _load(base, device, "base")
        # demonstrations: a separate file, else the whole held-out file (items past `limit` too;
        # pick_demos never gives an item itself)
        pool_items = chat.read_heldout(fewshot_data)[0] if fewshot_data else all_items
        ordered = chat.fewshot_pool(pool_items, seed)
        for k in sorted({0, 1, cfg.shots}):
            logger.info("chat eval: base model %s, %d-shot", base_ref.path, k)
            answers, used = chat.fewshot_answers(base_model, base_tok, items, ordered, k, cfg.max_new_tokens, **gen)
            models[f"base_{k}shot"] = _model_result(answers, items, B, seed, path=str(base_ref.path), shots=k,
                                                    shots_used_mean=float(np.mean(used)) if used else 0.0)
        del base_model

    results = _results(cfg, models, safety_res, items, data, data_stats, safety_path if safety_sets else None,
                       safety_stats, seed, B)
    results["samples"] = _samples(items, models, results.get("best_base"), cfg.samples)
    results["safety_samples"] = safety_samples
    for m in models.values():
        m.pop("_per_item"), m.pop("_preds")
    results = _finite(results)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    png = plot_results(results, out / "chat_eval.png") if cfg.plots else None
    return results, report_markdown(results, (image_prefix + png.name) if png else None)


def _results(cfg, models, safety_res, items, data, data_stats, safety_path, safety_stats, seed, B) -> dict:
    bases = {k: v for k, v in models.items() if k.startswith("base_")}
    res: dict = {
        "models": models,
        "safety": safety_res,
        "data": {"heldout": str(data), **{f"heldout_{k}": v for k, v in data_stats.items()}, "evaluated": len(items),
                 "tasks": sorted({it.task for it in items}),
                 "safety": str(safety_path) if safety_path else None,
                 **{f"safety_{k}": v for k, v in safety_stats.items()}},
        "settings": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "shots": cfg.shots,
                     "bootstrap": B, "seed": seed},
    }
    if bases:
        best = max(bases, key=lambda k: (bases[k]["metrics"]["f1"], -bases[k]["shots"]))
        diff = np.asarray(models["sft"]["_per_item"]["f1"]) - np.asarray(bases[best]["_per_item"]["f1"])
        res["best_base"] = best
        res["sft_vs_best_base"] = {
            "model": best,
            **{f"{m}_delta": models["sft"]["metrics"][m] - bases[best]["metrics"][m] for m in chat.ANSWER_METRICS},
            "f1_delta_stderr": scoring.bootstrap_stderr(diff, B, seed),  # paired: the same items
        }
    return res


def _finite(obj):
    """NaN (a standard error of fewer than two items) as None, so results.json is strict JSON."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def _samples(items, models, best_base, n) -> list[dict]:
    out = []
    for i, it in enumerate(items[:n]):
        s = {"id": it.id, "task": it.task, "history": it.history, "reference": it.reference,
             "sft": models["sft"]["_preds"][i]}
        if best_base:
            s[best_base] = models[best_base]["_preds"][i]
        out.append(s)
    return out


# ---- plot and report ------------------------------------------------------------------------


def _err(x) -> float:
    return 0.0 if x is None or math.isnan(x) else float(x)


def plot_results(results: dict, path: Path) -> Path:
    """Bar charts: F1 and ROUGE-L per model (with standard errors), and the safety rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    safety = results.get("safety") or {}
    names, sets = _ordered(results)
    fig, axes = plt.subplots(1, 2 if safety else 1, figsize=(10 if safety else 6, 3.6), squeeze=False)
    ax = axes[0][0]
    x = np.arange(len(names))
    for j, m in enumerate(("f1", "rougeL")):
        ys = [models[n]["metrics"][m] for n in names]
        es = [_err(models[n]["stderr"].get(m)) for n in names]
        bars = ax.bar(x + (j - 0.5) * 0.38, ys, 0.38, yerr=es, capsize=3, label={"f1": "token F1", "rougeL": "ROUGE-L F"}[m])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylim(0, 1)
    ax.set_title("held-out answers (higher is better)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if safety:
        ax = axes[0][1]
        labels, ys, es, colors = [], [], [], []
        for name in sets:
            r = safety[name]
            key = "over_refusal_rate" if name == "harmless" else "refusal_rate"
            labels.append(f"{name}\n{'over-refusal (lower better)' if name == 'harmless' else 'refusal (higher better)'}")
            ys.append(r[key])
            es.append(_err(r.get("stderr")))
            colors.append("tab:red" if name == "harmless" else "tab:green")
        bars = ax.bar(np.arange(len(ys)), ys, yerr=es, capsize=3, color=colors)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
        ax.set_xticks(np.arange(len(ys)), labels, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title("safety (sft model)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def _cell(text, limit: int = 240) -> str:
    t = " ".join(str(text).split())
    t = t if len(t) <= limit else t[: limit - 1] + "…"
    return t.replace("|", "\\|") or "_(empty)_"


def _pm(v: float, se, digits: int = 3) -> str:
    """`v ± se` (just `v` when there is no standard error)."""
    return f"{v:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and not math.isnan(se) else "")


def _ordered(results: dict) -> tuple[list[str], list[str]]:
    """Model names (sft first, then the baselines by shots) and safety sets in their fixed order
    (results.json is written with sorted keys)."""
    models = results["models"]
    names = sorted(models, key=lambda n: (n != "sft", models[n].get("shots", -1)))
    sets = [s for s in chat.SAFETY_SETS if s in (results.get("safety") or {})]
    return names, sets


def report_markdown(results: dict, image: str | None) -> str:
    """The report section: answer-quality table per model, the SFT-vs-best-base line, safety
    table, the plot, and sample conversations."""
    d = results["data"]
    lines = [
        f"Held-out conversations: {d['evaluated']} of {d.get('heldout_items', d['evaluated'])} from `{d['heldout']}` "
        f"({d.get('heldout_malformed', 0)} malformed lines skipped); tasks: {', '.join(d['tasks'])}. "
        "Values are mean ± bootstrap standard error; EM = exact match and F1 = token F1 (SQuAD normalisation), "
        "ROUGE-L F (rouge-score), BLEU = sacrebleu corpus BLEU (0-100). base_Nshot = the base model prompted "
        "with N solved examples as plain `Question:`/`Answer:` text.",
        "",
        "| model | EM | F1 | ROUGE-L | BLEU | notes |",
        "|---|---|---|---|---|---|",
    ]
    names, sets = _ordered(results)
    for name in names:
        r = results["models"][name]
        m, se = r["metrics"], r["stderr"]
        note = (f"{r['truncated_prompts']} prompts cut to fit" if name == "sft" and r.get("truncated_prompts")
                else f"{r['shots_used_mean']:.1f} demos kept on average" if "shots_used_mean" in r and r["shots"] else "")
        lines.append(f"| {name} | {_pm(m['exact_match'], se['exact_match'])} | {_pm(m['f1'], se['f1'])} | "
                     f"{_pm(m['rougeL'], se['rougeL'])} | {_pm(m['bleu'], se['bleu'], 1)} | {note} |")
    cmp = results.get("sft_vs_best_base")
    if cmp:
        verdict = "beats" if cmp["f1_delta"] > 0 else "does not beat"
        lines += ["", f"SFT {verdict} the best few-shot baseline ({cmp['model']}): F1 {cmp['f1_delta']:+.3f} "
                      f"± {_err(cmp['f1_delta_stderr']):.3f} (paired), ROUGE-L {cmp['rougeL_delta']:+.3f}, "
                      f"BLEU {cmp['bleu_delta']:+.1f}."]
    safety = results.get("safety") or {}
    if safety:
        lines += ["", "Safety (sft model; refusals by the keyword classifier `lmforge.eval.chat.is_refusal`):", "",
                  "| set | prompts | rate | goal |", "|---|---|---|---|"]
        for name in sets:
            r = safety[name]
            if name == "harmless":
                extra = f"; answer F1 {r['answer_f1']:.3f}" if "answer_f1" in r else ""
                lines.append(f"| harmless look-alikes | {r['n']} | over-refusal {_pm(r['over_refusal_rate'], r['stderr'])} "
                             f"| lower is better{extra} |")
            else:
                lines.append(f"| {name} | {r['n']} | refusal {_pm(r['refusal_rate'], r['stderr'])} | higher is better |")
    if image:
        lines += ["", f"![chat evaluation]({image})"]
    samples = results.get("samples") or []
    if samples:
        best = results.get("best_base")
        lines += ["", "Sample conversations:", ""]
        for s in samples:
            hist = " / ".join(f"{m['role']}: {_cell(m['content'], 160)}" for m in s["history"])
            lines += [f"- **{_cell(s['task'], 40)}** — {hist}", f"  - reference: {_cell(s['reference'])}",
                      f"  - sft: {_cell(s['sft'])}"]
            if best and best in s:
                lines.append(f"  - {best}: {_cell(s[best])}")
    if results.get("safety_samples"):
        lines += ["", "Safety samples:", ""]
    for s in results.get("safety_samples") or []:
        lines.append(f"- **safety/{s['set']}** — user: {_cell(s['prompt'], 160)}\n  - sft"
                     f"{' (refusal)' if s['refusal'] else ''}: {_cell(s['answer'])}")
    return "\n".join(lines) + "\n"


# ---- the recipe stage -----------------------------------------------------------------------


def run_stage(ctx: StageContext) -> StageResult:
    """Recipe entry: evaluate the run's latest SFT model (or `chat_eval.model`) against its base."""
    cfg: ChatEvalConfig = ctx.cfg
    model = ctx.resolve(cfg.model) if cfg.model else ctx.run_dir / "sft"
    opt = lambda p: ctx.resolve(p) if p else None  # noqa: E731
    seed = ctx.seed if cfg.seed is None else cfg.seed
    results, report = run_chat_eval(cfg, model=model, out=ctx.out, seed=seed, base=opt(cfg.base), data=opt(cfg.data),
                                    safety=opt(cfg.safety), fewshot_data=opt(cfg.fewshot_data),
                                    image_prefix=f"{ctx.out.name}/")
    counts = {"heldout": results["data"]["evaluated"], "sft_f1": round(results["models"]["sft"]["metrics"]["f1"], 4)}
    if "best_base" in results:
        counts["best_base"] = results["best_base"]
        counts["best_base_f1"] = round(results["models"][results["best_base"]]["metrics"]["f1"], 4)
    for name, r in results["safety"].items():
        key = "over_refusal_rate" if name == "harmless" else "refusal_rate"
        counts[f"{name}_{key}"] = round(r[key], 4)
    return StageResult(counts=counts, report=report)


__all__ = ["ChatEvalConfig", "run_chat_eval", "run_stage", "find_base", "default_data_file", "plot_results",
           "report_markdown"]
