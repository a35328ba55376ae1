"""Batch-1 greedy decode on one CUDA GPU at 7B shape (32 layers, 4096 wide, 32 heads, FFN 11008,
vocabulary 32,000, untied head, random weights) in bf16, int8 and int4: lmforge's engine with the
decode step compiled (`torch.compile(mode="reduce-overhead")` = CUDA graphs) against Hugging Face
transformers `generate` on the same bf16 weights, each as a fraction of the HBM bandwidth limit.

What each side does, per measured call (the timer covers exactly this, with a
`torch.cuda.synchronize()` at both ends):
- ours: `lmforge.infer.engine.generate(model, [prompt], greedy, max_new_tokens=N, compile=True)`:
  prefill of the 16-token prompt (eager) + N-1 replays of the captured decode step, greedy argmax
  and the per-step token read to the host. The compile / capture happens in an untimed warm-up
  call of the same shape (the engine keeps the KV cache aside between calls, so the timed call
  replays the same graph).
- HF: `LlamaForCausalLM.generate(ids, do_sample=False, max_new_tokens=N, min_new_tokens=N)` with the
  same weights (copied into an HF model built from `lmforge.model.hf.hf_config`), eager, default
  dynamic cache and `cache_implementation="static"`; the faster is reported. (HF's own
  compiled static-cache path, `--hf-compile`, is off by default: it compiles for minutes.)
- int8: every linear layer (head included) as `Int8Linear` (per-channel int8; on CUDA the
  int8 -> bf16 conversion + matmul is left to inductor, as gpt-fast does); int4: `Int4Linear`
  (group 128) through torch's `_weight_int4pack_mm` (bf16 activations, sm80+).
Left out of timings: model construction, quantization, compilation, the warm-up call.

Bandwidth limit: bytes read per token = every linear weight as stored + one embedding row + the
norms (the KV cache, ~2 MB at this length, is left out); measured bandwidth = a 1 GB bf16 GEMV
(best of 10). Fraction = tok/s x bytes per token / bandwidth; the nominal H200 figure (4.8 TB/s)
is printed beside it.

    python benchmarks/bench_decode_gpu.py [--new-tokens 128] [--variants bf16,int8,int4]
    python benchmarks/bench_decode_gpu.py --smoke   # the same code path on CPU at a tiny shape

Without CUDA (and without --smoke) it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge.infer.engine import SamplingParams, generate, release_cache  # noqa: E402
from lmforge.infer.quantize import model_bytes, quantize_model  # noqa: E402
from lmforge.model import Transformer, preset  # noqa: E402

PROMPT_LEN = 16
NOMINAL_TBPS = {"H200": 4.8, "H100": 3.35, "A100": 2.0}


def config(smoke: bool):
    if smoke:
        return preset("tiny", vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=256,
                      tie_embeddings=False)
    return preset("7b", max_seq_len=1024)


def build(cfg, device, dtype) -> Transformer:
    """Random weights made directly on the device in `dtype` (seeded: every variant gets the same)."""
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = Transformer(cfg)
    finally:
        torch.set_default_dtype(prev)
    return m.eval()


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bytes_per_token(model) -> int:
    emb = model.tok_emb.weight
    return model_bytes(model) - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


def bandwidth(device, dtype, smoke: bool) -> float:
    n = 2048 if smoke else 22528  # 22528^2 bf16 ~ 1 GB
    w = torch.randn(n, n, device=device, dtype=dtype)
    x = torch.randn(1, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(11):
        sync(device)
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return w.numel() * w.element_size() / best


def time_ours(model, prompt, n, device, repeats, compile: bool):
    p = SamplingParams(max_new_tokens=n, temperature=0.0, stop_token_ids=())
    t0 = time.perf_counter()
    generate(model, [prompt], p, compile=compile)  # warm-up: compiles and captures at this exact shape
    sync(device)
    warm = time.perf_counter() - t0
    best, toks = float("inf"), []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = generate(model, [prompt], p, compile=compile)
        sync(device)
        best = min(best, time.perf_counter() - t0)
        toks = out[0].token_ids
    release_cache(model)
    return len(toks) / best, toks, warm


def build_hf(model, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.model.hf import hf_config, hf_state_dict

    c = hf_config(model.cfg, None, None, "bfloat16" if dtype == torch.bfloat16 else "float32")
    c.pop("architectures", None), c.pop("model_type", None)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = LlamaForCausalLM(LlamaConfig(**c))
    finally:
        torch.set_default_dtype(prev)
    missing, unexpected = hf.load_state_dict(hf_state_dict(model.state_dict(), model.cfg), strict=False)
    missing = [k for k in missing if "rotary" not in k]
    if missing or unexpected:
        raise RuntimeError(f"HF model does not take our weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf.eval()


def time_hf(hf, prompt, n, device, repeats, mode: str):
    ids = torch.tensor([prompt], device=device)
    kw = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, use_cache=True, pad_token_id=0)
    if mode in ("static", "compiled"):
        kw["cache_implementation"] = "static"
    if mode == "compiled":
        hf.forward = torch.compile(hf.forward, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        hf.generate(ids, **kw)
        best, toks = float("inf"), []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            out = hf.generate(ids, **kw)
            sync(device)
            best = min(best, time.perf_counter() - t0)
            toks = out[0, len(prompt):].tolist()
    return len(toks) / best, toks


def first_difference(a, b) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"identical for {i} tokens, then {x} vs {y}"
    return "identical" if len(a) == len(b) else f"same prefix, lengths {len(a)} vs {len(b)}"


def run(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default="bf16,int8,int4")
    ap.add_argument("--smoke", action="store_true", help="the same code path on CPU at a tiny shape (a check of the script)")
    ap.add_argument("--no-compile", action="store_true", help="eager decode (to see what compilation buys)")
    ap.add_argument("--no-hf", action="store_true", help="skip HF transformers")
    ap.add_argument("--hf-compile", action="store_true", help="also time HF's static cache + torch.compile path")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_decode_gpu: no CUDA device here; skipped (run with --smoke for the CPU check of the script)")
        return {"skipped": "no CUDA"}
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.bfloat16
    cfg = config(args.smoke)
    compile = not args.no_compile
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke)"
    nominal = next((v for k, v in NOMINAL_TBPS.items() if k in name), None)
    if device == "cuda":
        # gpt-fast's inductor settings: autotuned GEMV tiles (coordinate descent) and a cached graph
        import torch._inductor.config as inductor_config

        inductor_config.coordinate_descent_tuning = True
        inductor_config.fx_graph_cache = True
    print(f"{name}; torch {torch.__version__}; {cfg.num_params() / 1e6:.1f}M parameters; batch 1, prompt {PROMPT_LEN}, "
          f"{args.new_tokens} greedy tokens; decode {'compiled' if compile else 'eager'}")
    bw = bandwidth(device, dtype, args.smoke)
    print(f"measured bandwidth (bf16 GEMV): {bw / 1e9:.1f} GB/s" + (f" (nominal {nominal} TB/s)" if nominal else ""))
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, cfg.vocab_size, (PROMPT_LEN,), generator=g).tolist()
    results: dict = {"bandwidth": bw, "variants": {}}
    base_toks = None
    for variant in args.variants.split(","):
        if variant not in ("bf16", "int8", "int4"):
            raise SystemExit(f"unknown variant {variant!r}: bf16, int8, int4")
        model = build(cfg, device, dtype)
        if variant != "bf16":
            quantize_model(model, variant, include_head=True, group_size=128)
        tps, toks, warm = time_ours(model, prompt, args.new_tokens, device, args.repeats, compile)
        bpt = bytes_per_token(model)
        frac = tps * bpt / bw
        results["variants"][variant] = {"tok_s": tps, "bytes_per_token": bpt, "fraction": frac, "warmup_s": warm}
        line = (f"ours {variant}: {tps:.1f} tok/s, {bpt / 1e6:.1f} MB/token, {100 * frac:.0f}% of measured bandwidth"
                + (f", {100 * tps * bpt / (nominal * 1e12):.0f}% of nominal" if nominal else "")
                + f" (warm-up incl. compile {warm:.0f} s)")
        print(line, flush=True)
        if variant == "bf16":
            base_toks = toks
            if not args.no_hf:
                try:
                    hf = build_hf(model, device, dtype)
                except ImportError:
                    print("HF transformers not installed: HF side skipped")
                else:
                    modes = ["dynamic", "static"] + (["compiled"] if args.hf_compile else [])
                    for mode in modes:
                        htps, htoks = time_hf(hf, prompt, args.new_tokens, device, args.repeats, mode)
                        results.setdefault("hf", {})[mode] = htps
                        results.setdefault("hf_same_tokens", {})[mode] = htoks == toks
                        print(f"HF generate bf16 ({mode} cache{' + torch.compile' if mode == 'compiled' else ''}): "
                              f"{htps:.1f} tok/s, {100 * htps * bpt / bw:.0f}% of measured bandwidth; ours/HF "
                              f"{tps / htps:.2f}x; greedy tokens vs ours: {first_difference(toks, htoks)}", flush=True)
                    del hf
        elif base_toks is not None:
            print(f"    greedy tokens vs ours bf16: {first_difference(toks, base_toks)}")
            results["variants"][variant]["same_as_bf16"] = toks == base_toks
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
