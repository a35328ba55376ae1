"""MFU of lmforge's transformer on one GPU: the 124M preset at seq 1024 in bf16 with torch.compile,
fused AdamW, flash attention through SDPA. Prints tokens/s and MFU (model FLOPs per token from
ModelConfig.flops_per_token: 6 x non-embedding params incl. the output head + 12 x layers x d x seq,
over the device's dense bf16 peak, 989 TFLOP/s for H100/H200 SXM).

    python benchmarks/bench_mfu_gpu.py [--batch 32] [--steps 30] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lmforge.model import Transformer, preset  # noqa: E402

PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="124m")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    ap.add_argument("--cdt", action="store_true", help="inductor coordinate-descent tuning of generated kernels")
    ap.add_argument("--sdpa", default="default", choices=["default", "flash", "cudnn", "efficient"])
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of 3 steps")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.cdt:
        import torch._inductor.config as ic

        ic.coordinate_descent_tuning = True
    if args.sdpa != "default":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[args.sdpa]
        sdpa_kernel(backend).__enter__()
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK.items() if k in name), 989e12)
    cfg = preset(args.model, max_seq_len=args.seq)
    model = Transformer(cfg).cuda()
    if args.optimizer == "muon":
        from lmforge.config import build
        from lmforge.train.config import TrainConfig
        from lmforge.train.optim import build_optimizers  # the training loop's optimizer factory

        opts = build_optimizers(model, build(TrainConfig, {"optimizer": "muon", "weight_decay": 0.1}, "pretrain"))
    else:
        opts = [torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)]
    step_model = model if args.no_compile else torch.compile(model, mode=args.compile_mode)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = step_model(x[:, :-1], x[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in opts:
            opt.step()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))
    t = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    tps = args.batch * args.seq * args.steps / dt
    mfu = tps * cfg.flops_per_token(args.seq) / peak
    res = {"device": name, "model": args.model, "params": cfg.num_params(), "batch": args.batch, "seq": args.seq,
           "compile": args.compile_mode or (not args.no_compile), "optimizer": args.optimizer, "cdt": args.cdt, "sdpa": args.sdpa, "tokens_per_s": round(tps), "mfu": round(mfu, 4),
           "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "loss": float(loss.detach()), "torch": torch.__version__}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
