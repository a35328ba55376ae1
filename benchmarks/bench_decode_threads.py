"""Batch-1 CPU decode: which intra-op thread count, and what the engine's own choice gives.

lmforge's engine only, no peer: this measures a design choice (`lmforge.infer.engine.ThreadTuner`),
not a comparison. On the 124M shape (12 layers, 768 wide, vocabulary 32,768, untied head, random
weights), greedy, 128 new tokens after a 16-token prompt, best of `--repeats`:

- `decode_threads=1`, `decode_threads=T` (T = the caller's `torch.get_num_threads()`, --threads),
  and the default (auto: the tuner times its own steps at 1 and T threads and keeps the faster);
  for the auto row, how many steps ran at each count;
- the same three again while another process spins on one core (`--busy`, on by default): a
  stand-in for a machine whose other core is taken by another job.

The timer covers one `generate` call (prefill + decode + sampling); model construction and one
warm-up call are left out.

    python benchmarks/bench_decode_threads.py [--threads 2] [--new-tokens 128] [--repeats 2] [--no-busy]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge.infer import engine as E  # noqa: E402
from lmforge.infer.engine import SamplingParams, generate  # noqa: E402
from lmforge.model import Transformer, preset  # noqa: E402


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def measure(model, prompt, n: int, repeats: int, threads: int) -> list[tuple[str, float, dict | None]]:
    p = SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=())
    rows = []
    for name, dt in (("1 thread", 1), (f"{threads} threads", threads), ("auto (default)", None)):
        generate(model, [prompt], SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=()), decode_threads=dt)
        best, counts = 0.0, None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = generate(model, [prompt], p, decode_threads=dt)
            best = max(best, len(out[0].token_ids) / (time.perf_counter() - t0))
            tuner = E.LAST_TUNER[0]
            counts = None if dt is not None or tuner is None else {c: tuner.choices.count(c) for c in tuner.candidates}
        rows.append((name, best, counts))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-busy", action="store_true", help="skip the rows with a spinning process")
    ap.add_argument("--shape", default="124m", choices=["124m", "tiny"])
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.shape == "124m":
        cfg = preset("124m", vocab_size=32768, tie_embeddings=False, max_seq_len=1024)
    else:
        cfg = preset("tiny", vocab_size=4096, tie_embeddings=False, d_model=128, max_seq_len=512)
    model = Transformer(cfg).eval()
    torch.set_num_threads(args.threads)
    prompt = list(range(3, 19))
    print(f"model {args.shape}, {args.new_tokens} new tokens, greedy, batch 1, caller threads {args.threads}, "
          f"best of {args.repeats}; load average at start {os.getloadavg()}")
    conditions = [("idle", False)] + ([] if args.no_busy else [("one core busy", True)])
    for label, busy in conditions:
        stop = proc = None
        if busy:
            stop = mp.Event()
            proc = mp.Process(target=_spin, args=(stop,), daemon=True)
            proc.start()
            time.sleep(0.5)
        try:
            rows = measure(model, prompt, args.new_tokens, args.repeats, args.threads)
        finally:
            if proc is not None:
                stop.set()
                proc.join(5)
        print(f"[{label}] " + "; ".join(f"{name} {tps:.1f} tok/s" + (f" (steps per count {c})" if c else "")
                                        for name, tps, c in rows))
    print(f"load average at end {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
