"""Batch-1 greedy decode on CPU: lmforge's engine (fp32, int8, int4) against Hugging Face
transformers `generate` (fp32), on the same 124M-shape model (12 layers, 768 wide, 12 heads, FFN
2048, vocabulary 32,768, untied head, random weights: speed does not depend on the values).

What each side does, per measured call (the timer covers exactly this on both sides):
- ours: `lmforge.infer.engine.generate(model, [prompt], greedy, max_new_tokens=N, no stop tokens)`:
  prefill of the 16-token prompt + N-1 decode steps over the pre-allocated KV cache, sampling, the
  per-step host read of the token; intra-op threads pinned with `torch.set_num_threads(T)` and the
  engine's decode phase told to use T as well (`decode_threads=T`), so both sides run on T threads.
- HF: `LlamaForCausalLM.generate(ids, do_sample=False, max_new_tokens=N, min_new_tokens=N,
  use_cache=True)` on our own HF export of the same weights (`lmforge.model.hf.export_hf`),
  fp32, `torch.no_grad`, same T threads; both the default dynamic cache and
  `cache_implementation="static"` are timed and the faster is the reference (its fastest
  documented CPU path; `torch.compile` of HF's forward is left out, as it is on our side).
- fp32 / int8: batch-1 decode of these models runs the whole step in lmforge's compiled kernel
  (lmforge.infer.native_decode: one C call per token, T threads on the kernel's own pool, torch's
  ops — the prefill aside — on one); "fp32-torch" / "int8-torch" are the same models through
  torch's decode step instead (`LMFORGE_NATIVE_DECODE=0`).
- int8 / int4 (ours only): the same model with every linear layer, the head included, swapped
  for `Int8Linear` (per channel) / `Int4Linear` (group 128) by `quantize_model`. Batch-1 int8
  GEMVs are lmforge's compiled int8 GEMV (lmforge.infer.cpu_kernels: the activation row
  quantized to 8 bits on the fly, int32 accumulation — the precision class of llama.cpp's q8_0 —
  with the T threads given to the kernel's own pool and torch's ops on one); "int8-fbgemm" is the
  same model through torch's step and fbgemm `quantized::linear_dynamic` instead (`LMFORGE_CPU_KERNELS=0`,
  torch's ops on T threads); "int8-wo" is the same
  model through the weight-only path (`LMFORGE_INT8_DECODE=weight-only`: `_weight_int8pack_mm`
  with bf16 activations); int4 runs `_weight_int4pack_mm_for_cpu` with bf16 activations
  (lmforge.infer.quantize); all compared with HF fp32 as the issue asks.
Left out of every timing: model construction, loading, export, quantization, one warm-up call.
Each figure is the best of `--repeats` interleaved rounds (every round times HF and each of our
variants once, in turn, so all of them see the same minutes of this shared machine, whose memory
bandwidth drifts by 20-30% over minutes; best-of filters other processes' bursts). Greedy tokens of ours fp32 and HF fp32 are compared token by token.

Bandwidth limit (as gpt-fast reports it): bytes read per decoded token = every linear weight as
stored (fp32 / int8 + scales / int4 codes + scales + zeros) + one embedding row + norms; measured
bandwidth = a 256 MB fp32 GEMV on T threads (bytes / time, best of 5). Fraction = tok/s x
bytes per token / bandwidth. The KV cache reads (a few hundred KB at these lengths) are left out.

    .venv/bin/python benchmarks/bench_decode.py [--threads 1,2] [--new-tokens 128] [--repeats 2] [--compile]

`--compile` adds fp32 and int8 rows with the decode step through `torch.compile` (`generate(...,
compile=True)`; on CPU inductor's C++ kernels around the BLAS / fbgemm calls, no CUDA graphs); the
compile runs in the untimed warm-up call of the same shape, its time printed. HF is timed eager
either way (its `torch.compile` path is not used on CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge.infer import cpu_kernels  # noqa: E402
from lmforge.infer.engine import SamplingParams, generate  # noqa: E402
from lmforge.infer.quantize import model_bytes, quantize_model  # noqa: E402
from lmforge.model import Transformer, preset  # noqa: E402
from lmforge.model.io import save_model  # noqa: E402

PROMPT_LEN = 16


def build(shape: str) -> Transformer:
    torch.manual_seed(0)
    if shape == "124m":
        cfg = preset("124m", vocab_size=32768, tie_embeddings=False, max_seq_len=1024)
    else:  # a quick check of the script itself
        cfg = preset("tiny", vocab_size=4096, tie_embeddings=False, d_model=128, max_seq_len=512)
    return Transformer(cfg).eval()


def bytes_per_token(model: Transformer) -> int:
    """Weights read per decode step: everything stored except the embedding table, plus one row."""
    emb = model.tok_emb.weight
    return model_bytes(model) - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


def bandwidth(threads: int) -> float:
    """Bytes/s of a 256 MB fp32 GEMV on `threads` threads: the faster of torch's (`F.linear`) and
    lmforge's decode kernel's (`cpu_kernels.f32_gemv`, which streams more bytes per second here)."""
    torch.set_num_threads(threads)
    w = torch.randn(8192, 8192)  # 256 MB fp32
    x = torch.randn(1, 8192)
    lib = cpu_kernels.int8_gemv_lib()
    best = float("inf")
    for _ in range(6):
        for run in (lambda: torch.nn.functional.linear(x, w),
                    lambda: cpu_kernels.f32_gemv(lib, x, w, threads) if lib is not None else None):
            t0 = time.perf_counter()
            run()
            best = min(best, time.perf_counter() - t0)
    return w.numel() * 4 / best


ENV = {"int8-wo": {"LMFORGE_INT8_DECODE": "weight-only"}, "int8-fbgemm": {"LMFORGE_CPU_KERNELS": "0"},
       "fp32-torch": {"LMFORGE_NATIVE_DECODE": "0"}, "int8-torch": {"LMFORGE_NATIVE_DECODE": "0"}}


def _with_env(env: dict, fn):
    """Run fn with the variant's environment; the kernel choice is re-read (and the compiled
    kernel's library loaded) before fn, so no loading falls inside a timed call."""
    os.environ.update(env)
    cpu_kernels.reset()
    cpu_kernels.int8_gemv_lib()
    try:
        return fn()
    finally:
        for k in env:
            os.environ.pop(k, None)
        cpu_kernels.reset()


def ours_runner(name, model, prompt, n, threads, compile: bool = False):
    """(warm-up, one timed call -> (seconds, tokens)) for one of our variants."""
    p = SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=())
    env = ENV.get(name, {})

    def warm():
        torch.set_num_threads(threads)
        t0 = time.perf_counter()
        # with `compile`, the call of the timed shape (same cache size) compiles the step
        _with_env(env, lambda: generate(model, [prompt], p if compile else SamplingParams(max_new_tokens=4, temperature=0.0,
                                                                                         stop_token_ids=()),
                                        decode_threads=threads, compile=compile))
        if compile:
            print(f"    ({name}: compile + first call {time.perf_counter() - t0:.1f} s, not timed)")

    def once():
        torch.set_num_threads(threads)

        def call():
            t0 = time.perf_counter()
            out = generate(model, [prompt], p, decode_threads=threads, compile=compile)
            return time.perf_counter() - t0, out[0].token_ids

        return _with_env(env, call)

    return warm, once


def hf_runner(hf, prompt, n, threads, static: bool):
    ids = torch.tensor([prompt])
    kw = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"

    def warm():
        torch.set_num_threads(threads)
        with torch.no_grad():
            hf.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})

    def once():
        torch.set_num_threads(threads)
        with torch.no_grad():
            t0 = time.perf_counter()
            out = hf.generate(ids, **kw)
            return time.perf_counter() - t0, out[0, len(prompt):].tolist()

    return warm, once


def interleaved(runners: dict, repeats: int) -> dict[str, tuple[float, list[int]]]:
    """Warm every runner, then `repeats` rounds timing each once in turn (so every side sees the same
    minutes of this shared machine); best time per runner -> (tokens/s, tokens)."""
    for warm, _ in runners.values():
        warm()
    best: dict[str, tuple[float, list[int]]] = {}
    for _ in range(repeats):
        for name, (_, once) in runners.items():
            sec, toks = once()
            if name not in best or sec < best[name][0]:
                best[name] = (sec, toks)
    return {k: (len(toks) / sec, toks) for k, (sec, toks) in best.items()}


def first_difference(a: list[int], b: list[int]) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"differ from token {i} on ({x} vs {y})"
    return "identical" if len(a) == len(b) else f"same prefix, lengths {len(a)} vs {len(b)}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shape", default="124m", choices=["124m", "tiny"])
    ap.add_argument("--no-hf", action="store_true", help="ours only (no transformers installed)")
    ap.add_argument("--compile", action="store_true",
                    help="also time fp32 and int8 with the decode step through torch.compile (compile time not timed)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = [int(t) for t in args.threads.split(",")]
    model = build(args.shape)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, model.cfg.vocab_size, (PROMPT_LEN,), generator=g).tolist()
    print(f"model {args.shape}: {model.cfg.num_params() / 1e6:.1f}M parameters, prompt {PROMPT_LEN} tokens, "
          f"{args.new_tokens} new tokens, greedy, batch 1, best of {args.repeats}; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs; load average at start {os.getloadavg()}")
    hf = None
    if not args.no_hf:
        from transformers import LlamaForCausalLM

        from lmforge.model.hf import export_hf

        tmp = Path(tempfile.mkdtemp(prefix="bench_decode_"))
        save_model(model, tmp / "ours")
        export_hf(tmp / "ours", tmp / "hf")
        hf = LlamaForCausalLM.from_pretrained(tmp / "hf", torch_dtype=torch.float32).eval()
    variants = {"fp32": model, "fp32-torch": model}
    for kind, opts in (("int8", {}), ("int4", {"group_size": 128})):
        q = build(args.shape)
        quantize_model(q, kind, include_head=True, **opts)
        variants[kind] = q
        if kind == "int8":
            variants["int8-torch"] = q  # the same model, torch's decode step (its int8 layers through lmforge's GEMV)
            variants["int8-fbgemm"] = q  # the same model, the dynamic kernel of torch (fbgemm), not lmforge's
            variants["int8-wo"] = q  # the same model, decode through the weight-only bf16 kernel
            if args.compile:
                variants["fp32-compiled"] = model
                variants["int8-compiled"] = q
    rows = []
    for th in threads:
        bw = bandwidth(th)
        runners = {}
        if hf is not None:
            runners["hf-dynamic"] = hf_runner(hf, prompt, args.new_tokens, th, static=False)
            runners["hf-static"] = hf_runner(hf, prompt, args.new_tokens, th, static=True)
        for name, m in variants.items():
            runners[name] = ours_runner(name, m, prompt, args.new_tokens, th, compile=name.endswith("-compiled"))
        timed = interleaved(runners, args.repeats)
        res = {}
        if hf is not None:
            (dyn, hf_toks), (sta, hf_toks_s) = timed.pop("hf-dynamic"), timed.pop("hf-static")
            res["hf"] = max(dyn, sta)
            print(f"[{th} thread(s)] HF generate fp32: dynamic cache {dyn:.1f} tok/s, static cache {sta:.1f} tok/s "
                  f"(load {os.getloadavg()[0]:.2f})")
        for name, m in variants.items():
            tps, toks = timed[name]
            res[name] = tps
            bpt = bytes_per_token(m)
            line = (f"[{th} thread(s)] ours {name}: {tps:.1f} tok/s, {bpt / 1e6:.1f} MB/token, "
                    f"{100 * tps * bpt / bw:.0f}% of the {bw / 1e9:.1f} GB/s bandwidth limit")
            if hf is not None:
                line += f", {tps / res['hf']:.2f}x HF fp32"
            print(line)
            if name == "fp32" and hf is not None:
                print(f"    greedy tokens ours fp32 vs HF fp32 (dynamic): {first_difference(toks, hf_toks)}; "
                      f"vs HF static: {first_difference(toks, hf_toks_s)}")
        rows.append((th, bw, res))
    print("\nsummary (tok/s; ratio to HF fp32 at the same thread count; goals: fp32 >= 1.5x, int8 >= 3x)")
    for th, bw, res in rows:
        cells = [f"{k} {v:.1f}" + (f" ({v / res['hf']:.2f}x)" if "hf" in res and k != "hf" else "") for k, v in res.items()]
        print(f"  {th} thread(s), {bw / 1e9:.1f} GB/s: " + ", ".join(cells))
    print(f"load average at end {os.getloadavg()}")
    th, _, res = rows[0]
    if "hf" in res:
        from _bench import result

        result("decode", res["fp32"] / res["hf"], 1.5,
               f"batch-1 greedy decode tok/s, {args.shape} shape, {th} thread(s): lmforge fp32 vs HF generate fp32 "
               f"(int8 {res['int8'] / res['hf']:.2f}x, goal 3x; torch's decode step: fp32 {res['fp32-torch'] / res['hf']:.2f}x, "
               f"int8 {res['int8-torch'] / res['hf']:.2f}x; int8 through torch's fbgemm {res['int8-fbgemm'] / res['hf']:.2f}x; "
               f"int8 weight-only kernel {res['int8-wo'] / res['hf']:.2f}x; "
               f"int4 {res['int4'] / res['hf']:.2f}x"
               + (f"; compiled step: fp32 {res['fp32-compiled'] / res['hf']:.2f}x, int8 {res['int8-compiled'] / res['hf']:.2f}x"
                  if "int8-compiled" in res else "") + ")",
               **{k: round(v, 2) for k, v in res.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
