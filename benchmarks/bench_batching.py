"""Continuous batching, engine level: 16 requests at once through `BatchEngine` vs the same 16 one
after another.

    .venv/bin/python benchmarks/bench_batching.py [--threads 1] [--requests 16] [--device cpu]

Input: a ~30M-parameter model with random weights (d_model 512, 8 layers, 8 heads, vocabulary
8192, context 512) and a byte-level BPE trained on the bundled sample; 16 prompts cut from real
text of ../shared/corpus (GCIDE dictionary entries and Python docs from the web crawl; the
bundled sample when the shared corpus is absent) at mixed lengths (16-192 tokens), each asking for
64-128 new tokens (greedy, no stop token, so every request produces exactly its max_new_tokens).

Three ways through the same requests, same process, same thread count:
  concurrent  all 16 submitted to a BatchEngine at once (continuous batching over the paged KV
              cache); the clock runs from the first submit to the last completion;
  sequential  the same BatchEngine setup, each request submitted when the previous one finished;
  generate    `lmforge.infer.engine.generate` with one prompt per call (batch 1, dense KV cache),
              one after another.
Each side builds its own engine before the clock starts; model build, tokenizer training and
tokenization are outside the timings; detokenization (the engine's UTF-8-safe streaming text) is
inside for the BatchEngine sides and, for `generate`, its own decode of the final text.
Printed: generated tokens/s of each (wall clock) and tokens per CPU-second of the process (all
threads; a figure that other load on a shared machine disturbs less than the wall clock), the ratios, p50/p99 time to first token and per-token
latency (time between tokens of one request) for concurrent and sequential, and whether the
three produced the same tokens (greedy: they should, up to float ties).
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import load, result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "corpus"
SAMPLE = REPO / "src" / "lmforge" / "sample"


def _texts(n: int) -> list[str]:
    """Real text: dictionary entries and Python documentation pages (the shared corpus, else the sample)."""
    out = []
    dic = SHARED / "dictionary" / "gcide.jsonl.gz"
    if not dic.is_file():
        dic = SAMPLE / "dictionary" / "gcide-sample.jsonl.gz"
    with gzip.open(dic, "rt", encoding="utf-8") as f:
        for line in f:
            t = json.loads(line)["text"]
            if len(t) > 1200:
                out.append(t)
            if len(out) >= n // 2:
                break
    code = SHARED / "code" / "python-stdlib.jsonl.gz"
    if code.is_file():
        with gzip.open(code, "rt", encoding="utf-8") as f:
            for line in f:
                t = json.loads(line)["text"]
                if len(t) > 1200:
                    out.append(t)
                if len(out) >= n:
                    break
    while len(out) < n:
        out.append(out[len(out) % max(1, len(out))])
    return out[:n]


def _tokenizer(tmp: Path):
    from lmforge.tokenizer import Tokenizer
    from lmforge.tokenizer.config import TokenizerConfig
    from lmforge.tokenizer.train_bpe import save_tokenizer, train_tokenizer

    texts = []
    with gzip.open(SAMPLE / "dictionary" / "gcide-sample.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    cfg = TokenizerConfig(vocab_size=8192)
    save_tokenizer(train_tokenizer(texts, cfg), tmp, cfg)
    return Tokenizer.from_file(tmp)


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def run_engine(model, tok, prompts, params, concurrent: bool, **kw):
    from lmforge.infer.batching import BatchEngine, TokenEvent

    e = BatchEngine(model, tok, **kw)
    e.start()
    # warm-up outside the clock (first-call allocations)
    e.submit(prompts[0][:8], type(params[0])(max_new_tokens=4, temperature=0, stop_token_ids=[])).result()
    stamps: dict[int, list[float]] = {i: [] for i in range(len(prompts))}

    def watcher(i):
        def on(ev):
            if isinstance(ev, TokenEvent):
                stamps[i].append(time.perf_counter())
        return on

    submitted = {}
    outs = [None] * len(prompts)
    c0 = time.process_time()
    t0 = time.perf_counter()
    if concurrent:
        reqs = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            submitted[i] = time.perf_counter()
            reqs.append(e.submit(p, sp, on_event=watcher(i)))
        for i, r in enumerate(reqs):
            outs[i] = r.result()[0]
    else:
        for i, (p, sp) in enumerate(zip(prompts, params)):
            submitted[i] = time.perf_counter()
            outs[i] = e.submit(p, sp, on_event=watcher(i)).result()[0]
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    st = e.stats()
    e.shutdown()
    ttft = [stamps[i][0] - submitted[i] for i in stamps]
    itl = [b - a for i in stamps for a, b in zip(stamps[i], stamps[i][1:])]
    return outs, wall, cpu, ttft, itl, st


def run_generate(model, tok, prompts, params):
    from lmforge.infer.engine import generate

    generate(model, [prompts[0][:8]], type(params[0])(max_new_tokens=4, temperature=0, stop_token_ids=[]), tokenizer=tok)
    outs = []
    c0 = time.process_time()
    t0 = time.perf_counter()
    for p, sp in zip(prompts, params):
        outs.append(generate(model, [p], sp, tokenizer=tok)[0])
    return outs, time.perf_counter() - t0, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import tempfile

    from lmforge.infer.engine import SamplingParams
    from lmforge.model import ModelConfig, Transformer

    with tempfile.TemporaryDirectory() as tmp:
        tok = _tokenizer(Path(tmp))
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=8192, d_model=512, n_layers=8, n_heads=8, max_seq_len=512)
    model = Transformer(cfg).to(args.device).eval()
    n_params = sum(p.numel() for p in model.parameters())
    texts = _texts(args.requests)
    g = torch.Generator().manual_seed(0)
    prompts, params = [], []
    for t in texts:
        ids = tok.encode(t)
        L = int(torch.randint(16, 193, (1,), generator=g))
        prompts.append(ids[:L])
        params.append(SamplingParams(max_new_tokens=int(torch.randint(64, 129, (1,), generator=g)), temperature=0,
                                     stop_token_ids=[]))
    total_new = sum(p.max_new_tokens for p in params)
    print(f"model: {n_params / 1e6:.1f}M params random weights, {args.device}, threads {args.threads}; "
          f"{len(prompts)} requests, prompt tokens {min(map(len, prompts))}-{max(map(len, prompts))} "
          f"(sum {sum(map(len, prompts))}), new tokens {total_new}; load {load()}", flush=True)
    kw = dict(block_size=args.block_size, max_running=args.requests, compile=args.compile)
    c_out, c_wall, c_cpu, c_ttft, c_itl, c_st = run_engine(model, tok, prompts, params, True, **kw)
    print(f"concurrent: {c_wall:.2f} s, {total_new / c_wall:.1f} tok/s; CPU {c_cpu:.2f} s, "
          f"{total_new / c_cpu:.1f} tok per CPU-s  (steps {c_st['steps']}) load {load()}", flush=True)
    s_out, s_wall, s_cpu, s_ttft, s_itl, _ = run_engine(model, tok, prompts, params, False, **kw)
    print(f"sequential: {s_wall:.2f} s, {total_new / s_wall:.1f} tok/s; CPU {s_cpu:.2f} s, "
          f"{total_new / s_cpu:.1f} tok per CPU-s  load {load()}", flush=True)
    g_out, g_wall, g_cpu = run_generate(model, tok, prompts, params)
    print(f"generate (batch 1, one after another): {g_wall:.2f} s, {total_new / g_wall:.1f} tok/s; CPU {g_cpu:.2f} s, "
          f"{total_new / g_cpu:.1f} tok per CPU-s  load {load()}", flush=True)
    same_cs = sum(a.token_ids == b.token_ids for a, b in zip(c_out, s_out))
    same_cg = sum(a.token_ids == b.token_ids for a, b in zip(c_out, g_out))
    ms = 1000.0
    lat = {
        "concurrent": {"ttft_p50_ms": _pct(c_ttft, .5) * ms, "ttft_p99_ms": _pct(c_ttft, .99) * ms,
                       "itl_p50_ms": _pct(c_itl, .5) * ms, "itl_p99_ms": _pct(c_itl, .99) * ms},
        "sequential": {"ttft_p50_ms": _pct(s_ttft, .5) * ms, "ttft_p99_ms": _pct(s_ttft, .99) * ms,
                       "itl_p50_ms": _pct(s_itl, .5) * ms, "itl_p99_ms": _pct(s_itl, .99) * ms},
    }
    lat = {k: {m: round(v, 1) for m, v in d.items()} for k, d in lat.items()}
    for k, d in lat.items():
        print(f"{k:>10}: TTFT p50 {d['ttft_p50_ms']} ms p99 {d['ttft_p99_ms']} ms; per-token p50 {d['itl_p50_ms']} ms "
              f"p99 {d['itl_p99_ms']} ms")
    print(f"ratio concurrent / sequential BatchEngine: {s_wall / c_wall:.2f}x; concurrent / sequential generate: "
          f"{g_wall / c_wall:.2f}x; sequential BatchEngine / generate: {g_wall / s_wall:.2f}x")
    print(f"CPU-time ratios (less sensitive to other load on the machine): concurrent / sequential "
          f"{s_cpu / c_cpu:.2f}x, concurrent / generate {g_cpu / c_cpu:.2f}x")
    print(f"same tokens: concurrent vs sequential {same_cs}/{len(prompts)}, concurrent vs generate {same_cg}/{len(prompts)}")
    result("batching", s_wall / c_wall, 4.0, "generated tokens/s, 16 concurrent requests vs the same 16 one after another "
           "(BatchEngine, engine level)", tokens_per_s={"concurrent": round(total_new / c_wall, 1),
                                                        "sequential": round(total_new / s_wall, 1),
                                                        "generate_batch1": round(total_new / g_wall, 1)},
           vs_generate=round(g_wall / c_wall, 3), latency=lat,
           cpu_seconds={"concurrent": round(c_cpu, 2), "sequential": round(s_cpu, 2), "generate_batch1": round(g_cpu, 2)},
           cpu_ratio=round(s_cpu / c_cpu, 3), same_tokens={"sequential": same_cs, "generate": same_cg},
           threads=args.threads, device=args.device, mean_ttft_concurrent_ms=round(statistics.mean(c_ttft) * ms, 1))


if __name__ == "__main__":
    main()
