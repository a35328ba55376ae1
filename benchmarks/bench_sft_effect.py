"""The held-out effect of SFT (issue 11's first figure): SFT on the demo's pretrained model with
several seeds, with and without the safety set, each scored by the chat eval against the base
model prompted zero-, one- and few-shot.

What varies and what does not:

* the SFT seed (`--seeds`) changes the built-in set's sampling (which training headwords, which
  question phrasings and conversation kinds), the safety mix, the data order and any LoRA init;
* the held-out conversations and the safety prompts are built once, with `--eval-seed`, and every
  run is scored on those same files (the held-out headwords are a fixed hash split, so none of
  them is in any seed's training set; the held-out safety requests are fixed by position);
* the base model does not depend on the SFT seed: its 0/1/k-shot baseline is evaluated once (its
  "±" is the chat eval's bootstrap standard error over items, not a spread over seeds);
* the chat eval runs with the same seed (`--eval-seed`) for every model: greedy answers, the
  same few-shot demonstrations, the same bootstrap resamples.

Everything else is the bundled demo's `[sft]` and `[chat_eval]` (200 steps, batch 8, lr 1e-3,
2,000 built-in conversations, 10% held out; 100 held-out items scored). With the default
`--eval-seed 1234` (the demo's run.seed) the held-out file is the demo's own, and the run with
seed 1234 and safety ratio 0.1 is the demo's SFT.

    python benchmarks/bench_sft_effect.py                       # 3 seeds x safety 0.1 / 0, ~10 min on 2 cores
    python benchmarks/bench_sft_effect.py --quick               # smoke run: a few steps, a few items
    python benchmarks/bench_sft_effect.py --base runs/demo/checkpoints/demo --seeds 1 2 3 --set lora.r=8

Prints a markdown table (mean ± std over seeds) and writes `effect.json` in `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANSWER = ("exact_match", "f1", "rougeL", "bleu")
SAFETY = (("harmful", "refusal_rate"), ("jailbreak", "refusal_rate"), ("harmless", "over_refusal_rate"))


def sft_config(a, safety_ratio: float):
    """The demo's [sft] section with the benchmark's settings and `--set` overrides."""
    from lmforge import config as cfgmod
    from lmforge.posttrain.config import SFTConfig

    section = {"max_steps": a.steps, "batch_size": 8, "lr": 1e-3, "examples": a.examples, "heldout": 0.1,
               "safety_ratio": safety_ratio, "sample_prompts": [], "peak_flops": 1e12,
               "checkpoint_every": a.steps, "eval_every": 0}
    cfgmod.apply_overrides(section, list(a.set))
    return cfgmod.build(SFTConfig, section, "sft")


def fixed_eval_files(a, out: Path) -> tuple[Path, Path, int]:
    """The held-out conversations and safety prompts every run is scored on, built once with
    `--eval-seed` exactly as the SFT stage builds them (files `out/fixed/data/*.jsonl`)."""
    from lmforge.posttrain.dictionary_chat import build_default_chat_set
    from lmforge.posttrain.safety import safety_eval_sets
    from lmforge.posttrain.sft import dictionary_paths, write_eval_files

    cfg = sft_config(a, 0.0)
    _, heldout = build_default_chat_set(dictionary_paths(cfg), seed=a.eval_seed, n=cfg.examples, holdout=cfg.heldout)
    write_eval_files(out / "fixed", heldout, safety_eval_sets(a.eval_seed), {"heldout_conversations": len(heldout)})
    return out / "fixed" / "data" / "heldout.jsonl", out / "fixed" / "data" / "safety_eval.jsonl", len(heldout)


def eval_config(a, baseline: bool):
    from lmforge.eval.chat_stage import ChatEvalConfig

    cfg = ChatEvalConfig(limit=a.limit, shots=a.shots, baseline=baseline, max_new_tokens=a.max_new_tokens,
                         bootstrap=a.bootstrap, safety_limit=a.safety_limit, samples=0, plots=False, device=a.device)
    cfg.validate()
    return cfg


def one_run(a, base: Path, out: Path, seed: int, ratio: float, heldout: Path, safety: Path, baseline: bool) -> dict:
    """SFT with `seed` and safety `ratio`, then the chat eval of its model on the fixed files."""
    from lmforge.eval.chat_stage import run_chat_eval
    from lmforge.posttrain.sft import run_sft

    cfg = sft_config(a, ratio)
    cfg.device = a.device
    t0 = time.time()
    res = run_sft(cfg, out / "sft", base=base, seed=seed)
    t_sft = time.time() - t0
    results, _ = run_chat_eval(eval_config(a, baseline), model=res.checkpoint, out=out / "chat_eval", seed=a.eval_seed,
                               base=base, data=heldout, safety=safety)
    run = {"seed": seed, "safety_ratio": ratio, "final_loss": res.final_loss, "sft_s": round(t_sft, 1),
           "eval_s": round(time.time() - t0 - t_sft, 1), "checkpoint": str(res.checkpoint),
           "safety_conversations": res.data_stats.get("safety_conversations"),
           "sft": results["models"]["sft"]["metrics"],
           "safety": {name: results["safety"][name][key] for name, key in SAFETY if name in results["safety"]},
           "harmless_answer_f1": results["safety"].get("harmless", {}).get("answer_f1")}
    if baseline:
        run["base"] = {k: {"metrics": v["metrics"], "stderr": v["stderr"], "shots_used_mean": v.get("shots_used_mean")}
                       for k, v in results["models"].items() if k.startswith("base_")}
        run["base_path"] = results["models"]["base_0shot"]["path"]
    print(f"seed {seed}, safety {ratio}: loss {res.final_loss:.4f}, F1 {run['sft']['f1']:.3f}, "
          f"SFT {t_sft:.0f}s, eval {run['eval_s']:.0f}s", file=sys.stderr, flush=True)
    return run


def mean_std(xs: list[float | None]) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    m = statistics.fmean(xs)
    return f"{m:.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{m:.3f}"


def table(runs: list[dict], base: dict, seeds: list[int]) -> str:
    """Markdown: SFT rows (mean ± std over seeds) per safety ratio, then the base model's rows."""
    lines = ["| model | safety set in SFT | EM | F1 | ROUGE-L | BLEU | harmful refusal ↑ | jailbreak refusal ↑ | "
             "harmless over-refusal ↓ |", "|---|---|---|---|---|---|---|---|---|"]
    for ratio in sorted({r["safety_ratio"] for r in runs}, reverse=True):
        rs = [r for r in runs if r["safety_ratio"] == ratio]
        ans = [mean_std([r["sft"][m] / (100.0 if m == "bleu" else 1.0) for r in rs]) for m in ANSWER]
        saf = [mean_std([r["safety"].get(name) for r in rs]) for name, _ in SAFETY]
        lines.append(f"| SFT, {len(rs)} seeds | {'ratio ' + format(ratio, 'g') if ratio else 'none'} | "
                     + " | ".join(ans + saf) + " |")
    for name in sorted(base, key=lambda k: int(k.split("_")[1].rstrip("shot"))):
        m, se = base[name]["metrics"], base[name]["stderr"]
        cells = [f"{m[k] / (100.0 if k == 'bleu' else 1.0):.3f} ± {(se.get(k) or 0.0) / (100.0 if k == 'bleu' else 1.0):.3f}"
                 for k in ANSWER]
        lines.append(f"| base {name.split('_')[1]} (once) | - | " + " | ".join(cells) + " | - | - | - |")
    best = max(base, key=lambda k: base[k]["metrics"]["f1"]) if base else None
    if best:
        lines += ["", f"F1 of SFT minus the best base baseline ({best}), per safety ratio, over seeds {seeds}:"]
        for ratio in sorted({r["safety_ratio"] for r in runs}, reverse=True):
            d = [r["sft"]["f1"] - base[best]["metrics"]["f1"] for r in runs if r["safety_ratio"] == ratio]
            lines.append(f"- safety ratio {ratio:g}: {mean_std(d)} (per seed: {', '.join(f'{x:+.3f}' for x in d)})")
    lines += ["", "Per run:", "", "| seed | safety ratio | final loss | F1 | ROUGE-L | harmful | jailbreak | harmless "
              "over-refusal | harmless answer F1 | SFT s | eval s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r["safety"]
        hf = r.get("harmless_answer_f1")
        lines.append(f"| {r['seed']} | {r['safety_ratio']:g} | {r['final_loss']:.4f} | {r['sft']['f1']:.3f} | "
                     f"{r['sft']['rougeL']:.3f} | {s.get('harmful', float('nan')):.3f} | "
                     f"{s.get('jailbreak', float('nan')):.3f} | {s.get('harmless', float('nan')):.3f} | "
                     f"{'-' if hf is None else format(hf, '.3f')} | {r['sft_s']} | {r['eval_s']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(ROOT / "runs" / "demo" / "checkpoints" / "demo"),
                    help="the pretrained model (anything lmforge generate takes)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234, 1235, 1236])
    ap.add_argument("--safety-ratios", type=float, nargs="+", default=[0.1, 0.0])
    ap.add_argument("--eval-seed", type=int, default=1234, help="builds the fixed held-out/safety files; the chat eval's seed")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--examples", type=int, default=2000, help="conversations in the built-in set (train + held out)")
    ap.add_argument("--limit", type=int, default=100, help="held-out items scored")
    ap.add_argument("--shots", type=int, default=5, help="k of the base model's k-shot baseline (0 and 1 always run)")
    ap.add_argument("--safety-limit", type=int, default=0, help="prompts per safety set (0 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an [sft] key for every run, e.g. lora.r=8 (repeatable)")
    ap.add_argument("--out", help="working directory (default: a new temporary one); runs there resume")
    ap.add_argument("--quick", action="store_true", help="smoke run: 5 steps, 200 conversations, 8 items, 2 prompts a set")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.examples, a.limit, a.safety_limit, a.max_new_tokens, a.bootstrap, a.shots = 5, 200, 8, 2, 16, 50, 2
    os.environ.setdefault("LMFORGE_PROGRESS", "0")
    sys.path.insert(0, str(ROOT / "src"))
    from lmforge.errors import LmforgeError

    out = Path(a.out) if a.out else Path(tempfile.mkdtemp(prefix="bench_sft_effect_"))
    base = Path(a.base)
    t0 = time.time()
    try:
        heldout, safety, n_held = fixed_eval_files(a, out)
        print(f"fixed eval files: {n_held} held-out conversations ({heldout}), safety prompts {safety}; "
              f"work dir {out}", file=sys.stderr, flush=True)
        runs, base_res, base_path = [], {}, ""
        for ratio in a.safety_ratios:
            for seed in a.seeds:
                r = one_run(a, base, out / f"safety{ratio:g}_seed{seed}", seed, ratio, heldout, safety, not base_res)
                if "base" in r:
                    base_res, base_path = r.pop("base"), r.pop("base_path")
                runs.append(r)
    except LmforgeError as e:
        sys.exit(f"error: {e}")
    settings = {k: getattr(a, k) for k in ("steps", "examples", "limit", "shots", "safety_limit", "max_new_tokens",
                                           "bootstrap", "eval_seed", "seeds", "safety_ratios", "set", "quick")}
    (out / "effect.json").write_text(json.dumps({"base": base_path, "settings": settings, "heldout": str(heldout),
                                                 "baseline": base_res, "runs": runs}, indent=1))
    print(f"\nBase model `{base_path}`; {min(a.limit, n_held) if a.limit else n_held} held-out items of {n_held}; "
          f"SFT {a.steps} steps, seeds {a.seeds}; wall time {time.time() - t0:.0f} s. SFT rows: mean ± std over seeds; "
          "base rows: one evaluation, ± bootstrap standard error. BLEU on a 0-1 scale. Refusals by "
          "`lmforge.eval.chat.is_refusal`.\n")
    print(table(runs, base_res, a.seeds))
    print(f"\nresults: {out / 'effect.json'}", file=sys.stderr)


if __name__ == "__main__":
    main()
