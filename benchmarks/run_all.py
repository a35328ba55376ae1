"""Run every CPU benchmark that has a peer, one after another, and rewrite the dated table in
benchmarks/README.md (the block between `<!-- run_all:begin -->` and `<!-- run_all:end -->`).

    python benchmarks/run_all.py                      # every CPU benchmark with a peer, default settings
    python benchmarks/run_all.py --quick              # each with its --quick settings (where it has them)
    python benchmarks/run_all.py --only tokenizer,eval_vs_lmeval
    python benchmarks/run_all.py --list               # what would run, what is skipped and why

Each benchmark runs in its own process with this interpreter (the data benchmarks start their peers'
environment, .venv-peers, themselves: scripts/setup_bench.sh). Before each, the load average is
logged; its whole output goes to benchmarks/out/run_all/<name>.log. Its last stdout line
`RESULT {json}` (benchmarks/_bench.py: bench, headline = lmforge/peer ratio, goal, what, ...) gives
the table row. GPU-only benchmarks and the ones without a peer are listed as skipped, with why.
With --only, the other rows of the table are kept as they were (each row carries its date).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"


@dataclass
class Bench:
    name: str  # RESULT's "bench"; the script is bench_<name>.py
    compared: str
    quick: list[str]  # arguments for --quick
    full: list[str] | None = None  # arguments otherwise (default: none)


# CPU benchmarks that run a named peer on the same input in the same run, in the order they run.
BENCHES = [
    Bench("extract_pipeline", "read -> extract -> langid -> filters, pages/s: lmforge vs datatrove (same extractor settings)", []),
    Bench("filters", "heuristic filters (Gopher, C4, FineWeb) docs/s: lmforge vs datatrove", []),
    Bench("minhash", "MinHash signatures: lmforge vs datasketch MinHash.bulk (dictionary, code)", []),
    Bench("langid", "language ID accuracy and speed: lmforge vs datatrove's lid.176", ["--quick"]),
    Bench("dedup_quality", "near-duplicate precision / recall on controlled edits: lmforge vs datasketch MinHashLSH", ["--quick"]),
    Bench("data_memory", "peak memory of the data pipeline: lmforge vs datatrove", ["--quick"]),
    Bench("quality", "ML quality filters: lmforge vs datatrove / scikit-learn / NLTK", ["--quick"]),
    Bench("tokenizer", "corpus -> token shards, same tokenizer.json: lmforge (tiktoken) vs HF tokenizers", ["--quick"]),
    Bench("eval_vs_lmeval", "multiple-choice scoring on the demo checkpoint: lmforge vs lm-evaluation-harness", ["--quick"]),
    Bench("train_cpu", "CPU training tokens/s: lmforge (Muon, AdamW) vs a nanoGPT-style loop", ["--quick"]),
    Bench("sft_trl", "full / LoRA SFT tokens/s: lmforge vs TRL SFTTrainer (+ peft)", ["--quick"]),
    Bench("align_trl", "DPO tokens/s: lmforge vs TRL", ["--quick"]),
    Bench("lora_memory", "LoRA / QLoRA peak memory: lmforge vs transformers + peft + bitsandbytes", ["--quick"]),
    Bench("speculative", "speculative decoding / Medusa at identical greedy output: lmforge vs HF assisted generation", []),
    Bench("compress", "pruning / quantization table; magnitude pruning vs torch.nn.utils.prune", []),
    Bench("decode", "batch-1 decode tok/s: lmforge fp32 / int8 / int4 vs HF transformers generate fp32", ["--threads", "1"]),
    Bench("llamacpp", "decode tokens/s: lmforge vs llama.cpp (llama-cpp-python)", ["--quick"]),
]
SKIP = {
    "mfu_gpu": "GPU only (CUDA)",
    "train_gpu": "GPU only (CUDA)",
    "decode_gpu": "GPU only (CUDA)",
    "sample_efficiency": "no peer (lmforge recipe vs its own AdamW baseline)",
    "sft_effect": "no peer (held-out effect of SFT)",
    "align_effect": "no peer (held-out effect of alignment)",
    "dedup_memory": "no peer (memory model)",
    "batching": "no peer (batched vs one-by-one on lmforge's own engine)",
    "decode_threads": "no peer (the engine's own thread choice)",
    "int8_precision": "no peer (a precision check of the int8 decode kernels)",
    "serve": "no peer in its default run (llama.cpp's server only with --llamacpp MODEL.gguf)",
}


def discover() -> tuple[list[Bench], dict[str, str]]:
    """The registered benchmarks whose script exists, and every other bench_*.py with why it is skipped."""
    names = {p.stem[len("bench_"):] for p in HERE.glob("bench_*.py")}
    run = [b for b in BENCHES if b.name in names]
    known = {b.name for b in BENCHES}
    skipped = {n: SKIP.get(n, "not registered in run_all.BENCHES (add it with its peer and --quick arguments)")
               for n in sorted(names - known)}
    return run, skipped


def last_result(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            try:
                return json.loads(line[len("RESULT "):])
            except ValueError:
                return None
    return None


def fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}x" if isinstance(x, (int, float)) else str(x)


def run_one(b: Bench, quick: bool, timeout: int, log_dir: Path) -> dict:
    args = b.quick if quick else (b.full or [])
    cmd = [sys.executable, str(HERE / f"bench_{b.name}.py"), *args]
    load = [round(x, 2) for x in os.getloadavg()]
    print(f"[run_all] {datetime.now(timezone.utc):%H:%M:%S} {b.name}: load average {load[0]} {load[1]} {load[2]}; "
          f"{' '.join(['python', f'benchmarks/bench_{b.name}.py', *args])}", flush=True)
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent)
        out, err, rc = p.stdout, p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")) + f"\n[run_all] timed out after {timeout} s"
        rc = -1
    secs = time.time() - t0
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / f"{b.name}.log").write_text(f"$ {' '.join(cmd)}\n# load before {load}\n{out}\n--- stderr ---\n{err}")
    r = last_result(out)
    row = {"bench": b.name, "compared": b.compared, "command": " ".join(["python", f"benchmarks/bench_{b.name}.py", *args]),
           "date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "load": load[0], "seconds": round(secs)}
    if r is None:
        tail = (err.strip().splitlines() or ["no output"])[-1][:160]
        row.update(figure="-", goal="-", met="no RESULT line" + (f" (exit {rc}: {tail})" if rc else ""))
    else:
        head, goal = r.get("headline"), r.get("goal")
        met = r.get("met")
        if met is None and isinstance(head, (int, float)) and isinstance(goal, (int, float)):
            met = head >= goal
        row.update(figure=fmt(head), goal=f">= {goal}x" if isinstance(goal, (int, float)) else str(goal),
                   met="yes" if met else "**no**", what=r.get("what") or r.get("unit") or "")
    print(f"[run_all] {b.name}: {row['figure']} (goal {row['goal']}, met: {row['met']}) in {secs:.0f} s; log "
          f"{log_dir / (b.name + '.log')}", flush=True)
    return row


ROW = re.compile(r"^\| `?([a-z0-9_]+)`? \|")


def render(rows: dict[str, dict], quick: bool) -> str:
    lines = [BEGIN,
             f"Generated by `python benchmarks/run_all.py` (last run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
             f"{', --quick settings' if quick else ''}, {os.cpu_count()} cores; each row's date and the 1-minute load "
             "average before it are given; figures taken under load are noisy). figure = lmforge / peer, higher is "
             "better; each benchmark's docstring says what both sides do and what the timer leaves out; its full "
             "output is in benchmarks/out/run_all/<name>.log.",
             "",
             "| benchmark | what is compared | figure | goal | met? | load | date | command |",
             "|---|---|---|---|---|---|---|---|"]
    order = [b.name for b in BENCHES]
    for name in sorted(rows, key=lambda n: order.index(n) if n in order else len(order)):
        r = rows[name]
        what = r.get("what") or r["compared"]
        lines.append(f"| `{name}` | {what} | {r['figure']} | {r['goal']} | {r['met']} | {r['load']} | {r['date']} | "
                     f"`{r['command']}` |")
    lines.append(END)
    return "\n".join(lines)


def previous_rows(text: str) -> dict[str, dict]:
    """Rows of the existing block (kept for benchmarks not run this time)."""
    if BEGIN not in text or END not in text:
        return {}
    block = text[text.index(BEGIN):text.index(END)]
    out = {}
    for line in block.splitlines():
        m = ROW.match(line)
        if m and not line.startswith("| benchmark"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 8:
                out[m.group(1)] = {"what": cells[1], "compared": cells[1], "figure": cells[2], "goal": cells[3], "met": cells[4],
                                   "load": cells[5], "date": cells[6], "command": cells[7].strip("`")}
    return out


def write_readme(rows: dict[str, dict], quick: bool) -> None:
    text = README.read_text(encoding="utf-8") if README.exists() else "# Benchmarks\n"
    block = render(rows, quick)
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:  # first run: the block goes after the title paragraph
        text = text.rstrip("\n") + "\n\n## Latest run of every CPU benchmark with a peer\n\n" + block + "\n"
    tmp = README.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(README)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated benchmark names (e.g. tokenizer,eval_vs_lmeval)")
    ap.add_argument("--quick", action="store_true", help="each benchmark with its quick settings")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per benchmark (default 3600)")
    ap.add_argument("--no-readme", action="store_true", help="print the table, leave benchmarks/README.md alone")
    ap.add_argument("--list", action="store_true", help="list what would run and what is skipped, then exit")
    args = ap.parse_args()
    benches, skipped = discover()
    if args.only:
        want = [w.strip().removeprefix("bench_").removesuffix(".py") for w in args.only.split(",") if w.strip()]
        unknown = [w for w in want if w not in {b.name for b in benches}]
        if unknown:
            print(f"--only: not a runnable benchmark: {', '.join(unknown)} (runnable: {', '.join(b.name for b in benches)}"
                  + (f"; skipped: {', '.join(f'{k} ({v})' for k, v in skipped.items() if k in unknown)}" if
                     any(k in unknown for k in skipped) else "") + ")", file=sys.stderr)
            return 2
        benches = [b for b in benches if b.name in want]
    for name, why in skipped.items():
        print(f"[run_all] skip bench_{name}.py: {why}")
    if args.list:
        for b in benches:
            print(f"[run_all] run  bench_{b.name}.py {' '.join(b.quick if args.quick else (b.full or []))}: {b.compared}")
        return 0
    rows = previous_rows(README.read_text(encoding="utf-8")) if README.exists() else {}
    log_dir = HERE / "out" / "run_all"
    for b in benches:
        rows[b.name] = run_one(b, args.quick, args.timeout, log_dir)
    table = render(rows, args.quick)
    print("\n" + table)
    if not args.no_readme:
        write_readme(rows, args.quick)
        print(f"\n[run_all] rewrote the run_all block of {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
