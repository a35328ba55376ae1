"""The evaluation harness: load a checkpoint and a tokenizer, build tasks, score them, and
write one JSON result per checkpoint and task.

`evaluate(model, tok, tasks)` is the in-process entry (also used by the training loop's
`on_eval` hook and by `lmforge ablate`); `evaluate_checkpoints` is what `lmforge eval` and the
recipe's eval stage call.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lmforge.errors import ConfigError, InputError
from lmforge.eval import builtin, scoring
from lmforge.eval.tasks import GenExample, Task, gen_prompt, load_task, mc_pairs
from lmforge.log import logger, progress
from lmforge.rundir import atomic_write_json, read_json, save_figure
from lmforge.tokenizer import Tokenizer

# ---- tokenizer ------------------------------------------------------------------------------


Tok = Tokenizer  # the one tokenizer runtime (lmforge.tokenizer); the old name stays for annotations


def load_tok(path: str | Path) -> Tokenizer:
    """Load a tokenizer directory or tokenizer.json (lmforge's or a foreign one) for evaluation,
    which needs a beginning-of-text id to score from."""
    tok = Tokenizer.from_file(path)
    if tok.bos_id is None:
        raise InputError(f"tokenizer {tok.path} has no <|bos|> token")
    return tok


# ---- checkpoints ----------------------------------------------------------------------------

_STEP = re.compile(r"step_(\d+)$")


def find_checkpoints(path: str | Path, which: str = "latest") -> list[tuple[str, Path]]:
    """(label, directory) of the checkpoints to evaluate. `path` is a model directory (with
    model.safetensors), a run's checkpoints/<name>/ folder of step_N directories, or a folder
    of such runs. `which`: "latest", "all", or comma-separated steps."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        m = _STEP.search(path.name)
        return [(f"step_{int(m.group(1)):06d}" if m else path.name, path)]
    if not path.is_dir():
        raise InputError(f"checkpoint path not found: {path}")
    steps = sorted((int(m.group(1)), p) for p in path.glob("step_*") if (m := _STEP.search(p.name)) and (p / "model.safetensors").is_file())
    if not steps:  # a folder of runs: evaluate each run's checkpoints, labelled <run>/step_N
        out = []
        for run in sorted(p for p in path.iterdir() if p.is_dir()):
            try:
                out += [(f"{run.name}/{label}", p) for label, p in find_checkpoints(run, which)]
            except InputError:
                continue
        if out:
            return out
        raise InputError(f"no checkpoints (model.safetensors or step_N/ directories) under {path}")
    if which == "latest":
        steps = steps[-1:]
    elif which != "all":
        try:
            want = {int(s) for s in which.split(",")}
        except ValueError:
            raise ConfigError(f"checkpoints = {which!r}: use 'latest', 'all' or comma-separated step numbers") from None
        steps = [s for s in steps if s[0] in want]
        if not steps:
            raise InputError(f"none of the steps {sorted(want)} exist under {path}")
    return [(f"step_{s:06d}", p) for s, p in steps]


def guess_tokenizer(path: str | Path) -> Path | None:
    """The tokenizer that belongs to a checkpoint: tokenizer.json next to it (an HF export) or a
    run directory's tokenizer/ a few levels up."""
    p = Path(path).resolve()
    for d in [p, *p.parents][:5]:
        if (d / "tokenizer.json").is_file():
            return d
        if (d / "tokenizer" / "tokenizer.json").is_file():
            return d / "tokenizer"
    return None


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---- tasks ----------------------------------------------------------------------------------


def build_tasks(names: list[str], *, docs: list[Path] | None = None, dictionary: Path | None = None,
                limit: int = 200, seed: int = 0, heldout_per_mille: int = 50, docs_per_source: int = 20) -> list[Task | tuple[str, dict]]:
    """Resolve task names: built-in names or paths of TOML task specs. Perplexity comes back as
    ("perplexity", {source: [Doc]}) since it is not an example-based task."""
    out: list[Any] = []
    held = None

    def held_docs():
        nonlocal held
        if held is None:
            held = builtin.heldout_docs(docs or builtin.default_doc_paths(), heldout_per_mille, docs_per_source, seed)
        return held

    for name in names:
        if name == "perplexity":
            out.append(("perplexity", held_docs()))
        elif name == "dictionary":
            out.append(builtin.dictionary_task(dictionary, n=limit, seed=seed))
        elif name in ("cloze", "cloze_gen"):
            flat = [d for v in held_docs().values() for d in v]
            fn = builtin.cloze_task if name == "cloze" else builtin.cloze_gen_task
            out.append(fn(flat, n=limit if name == "cloze" else max(1, limit // 2), seed=seed))
        elif name.endswith(".toml"):
            t = load_task(name)
            if limit and (not t.spec.limit or t.spec.limit > limit):
                t.examples = t.examples[:limit]
            out.append(t)
        else:
            raise ConfigError(f"unknown task {name!r}: use a built-in task ({', '.join(builtin.BUILTIN)}) or the path of a task .toml spec")
    return out


# ---- evaluation -----------------------------------------------------------------------------


def eval_multiple_choice(model, tok: Tok, task: Task, batch_tokens: int = 8192, bootstrap: int = 1000, seed: int = 0,
                         per_example: bool = False) -> dict:
    """Score a multiple-choice task; `per_example` adds every example's log-likelihoods, continuation
    token counts and correctness under each metric (`result["per_example"]`, in task order)."""
    spec = task.spec
    pmi = "acc_pmi" in spec.metrics
    reqs: list[scoring.TreeRequest] = []
    plan = []  # per example: (indices of trees, per-choice mapping) for conditional, unconditional
    for i, ex in enumerate(task.examples):
        ctxs, conts = mc_pairs(task, i)
        cont_ids = tok.encode_batch(conts)
        first = len(reqs)
        if len(set(ctxs)) == 1:
            reqs.append(scoring.TreeRequest([tok.bos_id] + tok.encode(ctxs[0]), cont_ids))
            cond = [(first, k) for k in range(len(conts))]
        else:
            cond = []
            for k, (c, ids) in enumerate(zip(ctxs, cont_ids)):
                reqs.append(scoring.TreeRequest([tok.bos_id] + tok.encode(c), [ids]))
                cond.append((first + k, 0))
        unc = None
        if pmi:
            reqs.append(scoring.TreeRequest([tok.bos_id], cont_ids))
            unc = [(len(reqs) - 1, k) for k in range(len(conts))]
        plan.append((cond, unc))
    bar = progress(None, desc=f"eval {spec.name}", total=len(reqs), unit="req")
    scores = scoring.score_trees(model, reqs, batch_tokens=batch_tokens, progress=bar.update)
    bar.close()
    per: dict[str, list[float]] = {m: [] for m in spec.metrics}
    rand = []
    samples: list[dict] = []
    every: list[dict] = []
    for i, (ex, (cond, unc)) in enumerate(zip(task.examples, plan)):
        s = [scores[r][k] for r, k in cond]
        u = [scores[r][k] for r, k in unc] if unc else None
        c = scoring.mc_correct(s, ex.choices, ex.gold, u)
        for m in spec.metrics:
            per[m].append(c[m])
        rand.append(len(ex.gold) / len(ex.choices))
        if i < 5:
            samples.append({"id": ex.id, "gold": ex.gold, "loglik": [round(x[0], 4) for x in s], **c})
        if per_example:
            every.append({"id": ex.id, "gold": ex.gold, "loglik": [x[0] for x in s], "ntok": [x[2] for x in s], **c})
    out = {
        "metrics": {m: float(np.mean(v)) for m, v in per.items()},
        "stderr": {m: scoring.bootstrap_stderr(v, bootstrap, seed) for m, v in per.items()},
        "random": float(np.mean(rand)),
        "n": len(task.examples),
        "requests": sum(len(r.continuations) for r in reqs),
        "samples": samples,
    }
    if per_example:
        out["per_example"] = every
    return out


def greedy_until(model, tok: Tok, prompt_ids: list[int], max_new: int, stop: list[str]) -> str:
    """Greedy decoding until a stop sequence, EOS, or `max_new` tokens (one prompt of `greedy_batch`)."""
    return greedy_batch(model, tok, [prompt_ids], max_new, [stop])[0]


def greedy_batch(model, tok: Tok, prompts: list[list[int]], max_new: int, stops: list[list[str]]) -> list[str]:
    """Greedy completions of many prompts at once through the generation engine (every row at its
    own position, stopping on EOS on its own), each cut at its first stop sequence (leading
    whitespace does not count as one). A prompt too long for the context keeps its first token
    (beginning of text) and its last tokens."""
    from lmforge.infer.engine import SamplingParams, generate

    L = model.cfg.max_seq_len
    fitted = []
    for ids in prompts:
        if len(ids) + max_new > L:
            keep = max(0, L - max_new - 1)
            ids = [ids[0]] + ids[len(ids) - keep:]
        fitted.append(ids)
    eos = [tok.eos_id] if tok.eos_id is not None else []
    outs = generate(model, fitted, SamplingParams(max_new_tokens=max_new, temperature=0, stop_token_ids=eos))
    return [cut_at_stop(tok.decode(o.token_ids, skip_special=True), stop) for o, stop in zip(outs, stops)]


def cut_at_stop(text: str, stop: list[str]) -> str:
    """The generated text up to the first stop sequence (leading whitespace does not count as one)."""
    lead = len(text) - len(text.lstrip())
    body = text[lead:]
    cut = min([body.index(s) for s in stop if s and s in body] or [len(body)])
    return body[:cut]


def eval_generative(model, tok: Tok, task: Task, bootstrap: int = 1000, seed: int = 0) -> dict:
    em, f1, samples = [], [], []
    prompts = [[tok.bos_id] + tok.encode(gen_prompt(task, i)) for i in range(len(task.examples))]
    preds = greedy_batch(model, tok, prompts, task.spec.max_new_tokens, [ex.stop for ex in task.examples])
    for i, (ex, pred) in enumerate(zip(task.examples, preds)):
        ex: GenExample
        em.append(scoring.exact_match(pred, ex.answers))
        f1.append(scoring.f1_score(pred, ex.answers))
        if i < 5:
            samples.append({"id": ex.id, "prediction": pred, "answers": ex.answers})
    per = {"exact_match": em, "f1": f1}
    per = {m: per[m] for m in task.spec.metrics}
    return {
        "metrics": {m: float(np.mean(v)) for m, v in per.items()},
        "stderr": {m: scoring.bootstrap_stderr(v, bootstrap, seed) for m, v in per.items()},
        "random": 0.0,
        "n": len(task.examples),
        "samples": samples,
    }


def eval_perplexity(model, tok: Tok, docs: dict[str, list[builtin.Doc]], bootstrap: int = 1000, seed: int = 0) -> dict:
    """Per source and overall: loss (nats/token), perplexity and bits per byte (UTF-8 bytes)."""
    metrics, stderr, counts = {}, {}, {}
    all_nll, all_bytes, all_tok = [], [], []
    for src, ds in docs.items():
        enc = tok.encode_batch([d.text for d in ds if d.ids is None])
        ids = [d.ids if d.ids is not None else [tok.bos_id] + enc.pop(0) for d in ds]
        res = scoring.token_nll(model, ids)
        nll = np.array([r[0] for r in res])
        ntok = np.array([r[1] for r in res], dtype=float)
        nbytes = np.array([len(d.text.encode("utf-8")) for d in ds], dtype=float)
        metrics[f"bpb/{src}"] = float(nll.sum() / scoring.LN2 / nbytes.sum())
        metrics[f"loss/{src}"] = float(nll.sum() / ntok.sum())
        metrics[f"ppl/{src}"] = float(math.exp(metrics[f"loss/{src}"]))
        stderr[f"bpb/{src}"] = scoring.bootstrap_ratio_stderr(nll / scoring.LN2, nbytes, bootstrap, seed)
        counts[src] = {"docs": len(ds), "tokens": int(ntok.sum()), "bytes": int(nbytes.sum())}
        all_nll.append(nll), all_bytes.append(nbytes), all_tok.append(ntok)
    nll, nb, nt = np.concatenate(all_nll), np.concatenate(all_bytes), np.concatenate(all_tok)
    metrics["bpb"] = float(nll.sum() / scoring.LN2 / nb.sum())
    metrics["loss"] = float(nll.sum() / nt.sum())
    metrics["ppl"] = float(math.exp(metrics["loss"]))
    stderr["bpb"] = scoring.bootstrap_ratio_stderr(nll / scoring.LN2, nb, bootstrap, seed)
    stderr["loss"] = scoring.bootstrap_ratio_stderr(nll, nt, bootstrap, seed)
    return {"metrics": metrics, "stderr": stderr, "n": int(len(nll)), "sources": counts, "lower_is_better": True}


def evaluate(model, tok: Tok, tasks: list[Any], batch_tokens: int = 8192, bootstrap: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Score every task; returns {task name: result dict}."""
    results = {}
    for t in tasks:
        t0 = time.perf_counter()
        if isinstance(t, tuple):
            name, r = t[0], eval_perplexity(model, tok, t[1], bootstrap, seed)
            r["type"] = "perplexity"
        elif t.spec.type == "multiple_choice":
            name, r = t.name, eval_multiple_choice(model, tok, t, batch_tokens, bootstrap, seed)
            r["type"] = "multiple_choice"
        else:
            name, r = t.name, eval_generative(model, tok, t, bootstrap, seed)
            r["type"] = "generative"
        r["task"] = name
        r["time_s"] = round(time.perf_counter() - t0, 3)
        r["examples_per_s"] = round(r["n"] / max(r["time_s"], 1e-9), 2)
        results[name] = r
    return results


def headline(name: str, r: dict) -> tuple[str, float]:
    """The one number that represents a task result (bpb for perplexity, else the first metric)."""
    if r.get("type") == "perplexity":
        return "bpb", r["metrics"]["bpb"]
    m = next(iter(r["metrics"]))
    return m, r["metrics"][m]


def evaluate_checkpoints(checkpoints: list[tuple[str, Path]], tok: Tok, tasks: list[Any], out_dir: Path, *,
                         device: str = "auto", batch_tokens: int = 8192, bootstrap: int = 1000, seed: int = 0,
                         resume: bool = True, on_result: Callable[[str, str, dict], None] | None = None) -> dict:
    """Evaluate each checkpoint on each task; writes out_dir/<label>/<task>.json and out_dir/summary.json.
    A (checkpoint, task) whose JSON already exists is not recomputed when `resume`."""
    from lmforge.infer import load_model  # plain checkpoints through model.io, quantized ones too

    dev = pick_device(device)
    summary: dict[str, dict] = read_json(out_dir / "summary.json", {}) if resume else {}
    summary = {k: v for k, v in (summary or {}).items() if isinstance(v, dict)}
    for label, ckpt in checkpoints:
        names = [t[0] if isinstance(t, tuple) else t.name for t in tasks]
        todo = [t for t, n in zip(tasks, names) if not (resume and (out_dir / label / f"{n}.json").is_file())]
        row = summary.setdefault(label, {})
        if todo:
            model, _ = load_model(ckpt, device=dev)  # checksums verified against state.json
            if model.cfg.vocab_size < tok.vocab_size:
                raise InputError(f"tokenizer has {tok.vocab_size} tokens but the model {ckpt} only {model.cfg.vocab_size}")
            logger.info("eval %s (%s): %s", label, ckpt, ", ".join(t[0] if isinstance(t, tuple) else t.name for t in todo))
            res = evaluate(model, tok, todo, batch_tokens, bootstrap, seed)
            state = read_json(ckpt / "state.json", {}) or {}
            for name, r in res.items():
                r.update(checkpoint=str(ckpt), label=label, step=state.get("step", _step_of(label)))
                atomic_write_json(out_dir / label / f"{name}.json", r)
                if on_result:
                    on_result(label, name, r)
            del model
        for n in names:
            r = read_json(out_dir / label / f"{n}.json")
            if r:
                row[n] = {"metrics": r["metrics"], "stderr": r.get("stderr", {}), "step": r.get("step"), "n": r.get("n"),
                          "type": r.get("type"), "random": r.get("random")}
        atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _step_of(label: str) -> int | None:
    m = _STEP.search(label)
    return int(m.group(1)) if m else None


def summary_table(summary: dict) -> str:
    """Markdown table: one row per checkpoint, one column per task metric (value ± stderr)."""
    cols: list[tuple[str, str]] = []
    for row in summary.values():
        for task, r in row.items():
            for m in r["metrics"]:
                if "/" in m and not m.startswith("bpb/"):
                    continue
                if (task, m) not in cols:
                    cols.append((task, m))
    lines = ["| checkpoint | " + " | ".join(f"{t} {m}" for t, m in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, row in summary.items():
        cells = []
        for t, m in cols:
            r = row.get(t, {})
            v = r.get("metrics", {}).get(m)
            se = r.get("stderr", {}).get(m)
            cells.append("" if v is None else (f"{v:.4f}" + (f" ± {se:.4f}" if se is not None and not math.isnan(se) else "")))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_summary(summary: dict, path: Path) -> Path | None:
    """PNG of each task's headline metric over checkpoint steps (needs >= 2 checkpoints)."""
    rows = [(r, row) for r, row in summary.items() if _step_of(r) is not None]
    if len(rows) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for _, row in rows for t in row})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        pts = [(_step_of(l), row[t]) for l, row in rows if t in row]
        if not pts:
            continue
        m = "bpb" if "bpb" in pts[0][1]["metrics"] else next(iter(pts[0][1]["metrics"]))
        xs = [p[0] for p in pts]
        ys = [p[1]["metrics"][m] for p in pts]
        es = [p[1].get("stderr", {}).get(m, 0) or 0 for p in pts]
        ax.errorbar(xs, ys, yerr=[0 if math.isnan(e) else e for e in es], marker="o", capsize=3)
        ax.set_title(f"{t}: {m}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def make_on_eval(tok_dir: str | Path, task_names: list[str], *, docs: list[Path] | None = None, limit: int = 100,
                 seed: int = 0, batch_tokens: int = 8192, out_dir: Path | None = None,
                 docs_per_source: int = 20) -> Callable[[int, Any], dict]:
    """An `on_eval(step, model) -> dict` hook for the training loop: scores the tasks on the live
    model every eval interval and returns flat metrics ("eval/<task>/<metric>") for metrics.jsonl.
    With `out_dir`, each result is also written to out_dir/step_N/<task>.json."""
    tok = load_tok(tok_dir)
    tasks = build_tasks(task_names, docs=docs, limit=limit, seed=seed, docs_per_source=docs_per_source)

    def on_eval(step: int, model) -> dict:
        was_training = model.training
        try:
            res = evaluate(model, tok, tasks, batch_tokens=batch_tokens, bootstrap=0, seed=seed)
        finally:
            model.train(was_training)
        flat = {}
        for name, r in res.items():
            for m, v in r["metrics"].items():
                if "/" not in m or m.startswith("bpb/"):
                    flat[f"eval/{name}/{m}"] = round(float(v), 6)
            if out_dir is not None:
                r.update(step=step, label=f"step_{step:06d}")
                atomic_write_json(Path(out_dir) / f"step_{step:06d}" / f"{name}.json", r)
        return flat

    return on_eval
