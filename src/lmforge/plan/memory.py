"""Back-of-the-envelope planning for a model shape: memory for training and inference by
precision, FLOPs, GPU-hours for a token budget at a given MFU, and the Chinchilla-optimal
token count. The formulas are the standard ones:

- training compute C = 6 N D (+ attention, `ModelConfig.flops_per_token`), Kaplan et al. 2020;
- Chinchilla (Hoffmann et al. 2022): D_opt ~ 20 N, so for a budget C: N_opt = sqrt(C / 120);
- mixed-precision AdamW keeps 16 bytes per parameter (bf16 weights + bf16 grads + fp32 master
  weights + two fp32 moments; ZeRO paper, Rajbhandari et al. 2020), sharded by FSDP/ZeRO-3;
- activations per layer per token ~ d * (34 + 5 * heads * seq / d) bytes in 16-bit
  (Korthikanti et al. 2022); the attention-score term vanishes with flash attention; full
  activation checkpointing keeps only the 2 * d bytes of each layer's input;
- inference: weights at the chosen precision + KV cache 2 * layers * kv_heads * head_dim * bytes
  per token of context.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.model.config import ModelConfig

BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5}

# dense peak TFLOP/s per device for 16-bit matmuls (vendor spec sheets)
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0, "a10g": 125.0, "rtx4090": 165.0, "mi300x": 1307.0}

GiB = 1024.0**3


@dataclass
class Plan:
    params: int
    params_active: int
    flops_per_token: float
    train_state_gib: float  # weights + grads + optimizer, per device
    activations_gib: float  # per device
    inference: dict  # precision -> {weights_gib, kv_cache_gib, total_gib}
    tokens: float
    train_flops: float
    gpu_hours: float
    days: float
    chinchilla_tokens: float
    compute_optimal: dict


def plan(
    cfg: ModelConfig,
    seq_len: int | None = None,
    micro_batch: int = 1,
    tokens: float | None = None,
    gpu: str = "h100",
    gpus: int = 8,
    mfu: float = 0.4,
    precision: str = "bf16",
    fsdp: bool = True,
    flash: bool = True,
    checkpointing: bool = False,
    infer_batch: int = 1,
    compute_budget: float | None = None,
) -> Plan:
    T = seq_len or cfg.max_seq_len
    n = cfg.num_params()
    n_act = cfg.num_params(active=True)
    fpt = cfg.flops_per_token(T)
    bytes_state = 16.0 if precision in ("bf16", "fp16", "fp8") else 16.0  # fp32: 4 w + 4 g + 8 adam = 16 as well
    state = n * bytes_state / (gpus if fsdp else 1)
    d, L, h = cfg.d_model, cfg.n_layers, cfg.n_heads
    act_bytes = 2.0 if precision != "fp32" else 4.0
    if checkpointing:
        per_layer = act_bytes * d * T * micro_batch
    else:
        per_tok = d * (34 + (0 if flash else 5 * h * T / d)) * act_bytes / 2.0
        per_layer = per_tok * T * micro_batch
    act = L * per_layer + micro_batch * T * cfg.vocab_size * 4.0  # logits in fp32
    inference = {}
    for p in ("fp32", "bf16", "int8", "int4"):
        w = n * BYTES[p]
        kv = 2 * L * cfg.n_kv_heads * cfg.head_dim * T * infer_batch * BYTES["bf16" if p != "fp32" else "fp32"]
        inference[p] = {"weights_gib": w / GiB, "kv_cache_gib": kv / GiB, "total_gib": (w + kv) / GiB}
    chin = 20.0 * n
    D = tokens if tokens else chin
    C = fpt * D
    peak = PEAK_TFLOPS.get(gpu.lower())
    if peak is None:
        raise ValueError(f"unknown gpu {gpu!r}; known: {', '.join(PEAK_TFLOPS)}")
    seconds = C / (peak * 1e12 * mfu * gpus)
    co = {}
    if compute_budget:
        n_opt = math.sqrt(compute_budget / 120.0)
        co = {"compute": compute_budget, "n_opt": n_opt, "d_opt": 20.0 * n_opt}
    return Plan(
        params=n, params_active=n_act, flops_per_token=fpt, train_state_gib=state / GiB, activations_gib=act / GiB,
        inference=inference, tokens=D, train_flops=C, gpu_hours=seconds * gpus / 3600.0, days=seconds / 86400.0,
        chinchilla_tokens=chin, compute_optimal=co,
    )


def human(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def format_plan(p: Plan, name: str, gpu: str, gpus: int, mfu: float) -> str:
    lines = [
        f"model {name}: {human(p.params)} parameters ({human(p.params_active)} active per token), "
        f"{p.flops_per_token / 1e9:.2f} GFLOPs per training token",
        "",
        "training memory per device (mixed-precision AdamW, 16 bytes/param):",
        f"  weights+grads+optimizer  {p.train_state_gib:10.2f} GiB",
        f"  activations              {p.activations_gib:10.2f} GiB",
        f"  total                    {p.train_state_gib + p.activations_gib:10.2f} GiB",
        "",
        "inference memory (weights + KV cache at full context):",
    ]
    for prec, v in p.inference.items():
        lines.append(f"  {prec:5s} weights {v['weights_gib']:9.2f} GiB  kv-cache {v['kv_cache_gib']:8.2f} GiB  total {v['total_gib']:9.2f} GiB")
    lines += [
        "",
        f"token budget {human(p.tokens)} (Chinchilla-optimal for this size: {human(p.chinchilla_tokens)} = 20 tokens/param)",
        f"training compute {p.train_flops:.3e} FLOPs",
        f"on {gpus} x {gpu} at {mfu:.0%} MFU: {p.gpu_hours:,.0f} GPU-hours = {p.days:,.2f} days",
    ]
    if p.compute_optimal:
        c = p.compute_optimal
        lines.append(f"compute-optimal for C = {c['compute']:.3e} FLOPs: N = {human(c['n_opt'])} params, D = {human(c['d_opt'])} tokens")
    return "\n".join(lines)
