"""What the int8 decode kernel costs in accuracy: held-out next-token loss decoded one token at a time.

lmforge only, no peer (a precision check, not a speed comparison). A trained checkpoint (default:
the demo run's pretrained model) quantized to int8 per channel (`quantize_model(..., include_head=
True)`), then `--windows` windows of `--tokens` held-out tokens (the run's validation shard) fed
one token per step through the KV cache with `engine.decode_step` — the batch-1 decode path — under:

- dense fp32 (the unquantized model),
- int8, weight-only kernel (`LMFORGE_INT8_DECODE=weight-only`: `_weight_int8pack_mm`, bf16 activations),
- int8, dynamic kernel (the default on x86: lmforge's compiled int8 GEMV, lmforge.infer.cpu_kernels,
  the activation row quantized to 8 bits per call, symmetric),
- int8, torch's fbgemm `quantized::linear_dynamic` instead (`LMFORGE_CPU_KERNELS=0`: the activation
  row quantized to 8 bits with a scale and zero point),
- int8 through lmforge's whole-step kernel (lmforge.infer.native_decode, what one-sequence decode
  runs on x86 since the eighth session: the same int8 GEMV, the rest of the step in C),
- int4 (group 128, `quantize_model(..., "int4")`) through torch's step (`_weight_int4pack_mm_for_cpu`
  with bf16 activations where the CPU has native bf16, else dequantize-and-matmul) and through the
  whole-step kernel (int4 codes x 8-bit activations).

Printed per window: mean negative log-likelihood (nats) of the next token, the greedy (argmax)
agreement with the dense model and with the weight-only kernel, and the largest logit difference
between the two int8 kernels.

    python benchmarks/bench_int8_precision.py [--model runs/demo/checkpoints/demo] [--windows 2] [--tokens 250]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lmforge.infer import cpu_kernels, load_model  # noqa: E402
from lmforge.infer.engine import decode_step  # noqa: E402
from lmforge.infer.quantize import fbgemm_available, quantize_model  # noqa: E402


def val_tokens(model_dir: Path) -> np.ndarray:
    """The validation shard of the run the checkpoint belongs to."""
    for d in [model_dir, *model_dir.parents]:
        index = d / "tokens" / "index.json"
        if index.is_file():
            dtype = np.dtype(json.loads(index.read_text()).get("dtype", "uint16"))
            shards = sorted((d / "tokens" / "val").glob("*.bin"))
            if shards:
                return np.fromfile(shards[0], dtype=dtype)
    raise SystemExit(f"no run tokens/val shard above {model_dir}")


@torch.no_grad()
def decode_logits(model, toks: torch.Tensor) -> torch.Tensor:
    n = toks.numel() - 1
    model.setup_cache(1, n)
    mask = torch.zeros(1, 1, 1, n, dtype=torch.bool)
    out = []
    try:
        for t in range(n):
            mask[..., t] = True
            out.append(decode_step(model, toks[t].view(1, 1), torch.tensor([[t]]), mask))
    finally:
        model.clear_cache()
    return torch.cat(out)


@torch.no_grad()
def native_logits(model, toks: torch.Tensor) -> torch.Tensor | None:
    """The same one-token-per-step decode through lmforge's whole-step kernel (None where it cannot run)."""
    from lmforge.infer.native_decode import native_forward

    n = toks.numel() - 1
    model.setup_cache(1, n)
    try:
        fwd = native_forward(model)
        if fwd is None:
            return None
        return torch.cat([fwd([int(toks[t])], t, logits=1)[1] for t in range(n)])
    finally:
        model.clear_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "runs" / "demo" / "checkpoints" / "demo"))
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=250)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dense, ref = load_model(args.model)
    n = min(args.tokens, dense.cfg.max_seq_len - 1)
    raw = val_tokens(ref.path)
    q = copy.deepcopy(dense)
    quantize_model(q, "int8", include_head=True)
    q4 = copy.deepcopy(dense)
    quantize_model(q4, "int4", group_size=128, include_head=True)
    print(f"model {ref.path}, int8 per channel (head included), {args.windows} windows x {n} held-out tokens, "
          f"decoded one token per step; fbgemm available: {fbgemm_available()}; lmforge's int8 kernel: {cpu_kernels.int8_gemv_status()}")
    step = max(1, (len(raw) - n - 1) // max(1, args.windows))
    for w in range(args.windows):
        toks = torch.tensor(raw[w * step : w * step + n + 1].astype(np.int64))
        target = toks[1:]
        res = {}
        for name, model, mode in (("dense", dense, None), ("weight-only", q, "weight-only"), ("dynamic", q, "dynamic"),
                                  ("fbgemm", q, "dynamic")):
            if mode:
                os.environ["LMFORGE_INT8_DECODE"] = mode
            if name == "fbgemm":
                if not fbgemm_available():
                    continue
                os.environ["LMFORGE_CPU_KERNELS"] = "0"
            cpu_kernels.reset()
            res[name] = decode_logits(model, toks)
            os.environ.pop("LMFORGE_INT8_DECODE", None)
            os.environ.pop("LMFORGE_CPU_KERNELS", None)
            cpu_kernels.reset()
        res["int4-torch"] = decode_logits(q4, toks)
        for name, model in (("native", q), ("int4-native", q4)):
            got = native_logits(model, toks)
            if got is not None:
                res[name] = got
        nll = {k: float(-v.log_softmax(-1).gather(1, target[:, None]).mean()) for k, v in res.items()}
        agree = lambda a, b: float((res[a].argmax(-1) == res[b].argmax(-1)).float().mean())  # noqa: E731
        print(f"window {w} (tokens {w * step}..{w * step + n}): mean NLL dense {nll['dense']:.5f}, "
              f"int8 weight-only {nll['weight-only']:.5f}, int8 dynamic {nll['dynamic']:.5f} "
              f"(dynamic - weight-only {nll['dynamic'] - nll['weight-only']:+.5f}); greedy agreement with dense: "
              f"weight-only {agree('weight-only', 'dense'):.3f}, dynamic {agree('dynamic', 'dense'):.3f}; dynamic vs "
              f"weight-only {agree('dynamic', 'weight-only'):.3f}; max |logit difference| between the int8 kernels "
              f"{float((res['dynamic'] - res['weight-only']).abs().max()):.3f}"
              + (f"; torch's fbgemm dynamic kernel instead of lmforge's: NLL {nll['fbgemm']:.5f} "
                 f"(lmforge - fbgemm {nll['dynamic'] - nll['fbgemm']:+.5f}), greedy agreement with dense "
                 f"{agree('fbgemm', 'dense'):.3f}" if "fbgemm" in res else "")
              + (f"; whole-step kernel, int8: NLL {nll['native']:.5f} (- torch's step with the same GEMV "
                 f"{nll['native'] - nll['dynamic']:+.5f}), greedy agreement with dense {agree('native', 'dense'):.3f}, "
                 f"with torch's step {agree('native', 'dynamic'):.3f}" if "native" in res else "")
              + f"; int4 g128 through torch's step: NLL {nll['int4-torch']:.5f}, greedy agreement with dense "
                f"{agree('int4-torch', 'dense'):.3f}"
              + (f"; int4 through the whole-step kernel: NLL {nll['int4-native']:.5f} (- torch's "
                 f"{nll['int4-native'] - nll['int4-torch']:+.5f}), greedy agreement with dense "
                 f"{agree('int4-native', 'dense'):.3f}" if "int4-native" in res else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
