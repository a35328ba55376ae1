"""Peak memory of LoRA and QLoRA against full fine-tuning: lmforge vs transformers + peft + bitsandbytes.

Needs the `posttrain-bench` extra (peft, bitsandbytes, transformers): `pip install -e '.[dev,posttrain-bench]'`.

    python benchmarks/bench_lora_memory.py             # GPT-2-small shape (12 x 768, ffn 2048), vocab 4096: 88M params
    python benchmarks/bench_lora_memory.py --quick     # 4 x 256 model, 2 steps: a smoke run

The model: random weights (seeded) in lmforge's `124m` shape with a 4,096-token vocabulary (so the
transformer weights, not the embedding, dominate), saved as an lmforge checkpoint and exported to HF
Llama (`lmforge.model.hf.export_hf`); both sides load the same weights from disk, fp32.

Configurations, each side the same work (the same fixed batch of `--batch x --seq-len` random tokens,
the next-token loss on every position, `--steps` AdamW steps over the trainable parameters, lr 1e-4,
no gradient checkpointing on either side):
- full: every parameter trained. lmforge: `lmforge.train.optim.build_optimizers` (AdamW) on
  `lmforge.model.io.load_model`; HF: `torch.optim.AdamW` on `AutoModelForCausalLM`.
- LoRA: r 16, alpha 32, no dropout, on the seven projections (wq/wk/wv/wo/w1/w3/w2 =
  q_proj/k_proj/v_proj/o_proj/gate_proj/up_proj/down_proj). lmforge: `posttrain.lora.apply_lora`;
  HF: peft `get_peft_model(LoraConfig(target_modules=...))`.
- QLoRA NF4: the frozen projections in NF4 (block 64, no double quantization), LoRA on top, fp32 compute.
  lmforge: `posttrain.lora.qlora(model, "nf4")`; HF: `BitsAndBytesConfig(load_in_4bit=True,
  bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=float32)` + peft.
- QLoRA int8: the same with 8-bit weights. lmforge: `qlora(model, "int8")` (per-row absmax int8);
  HF: `BitsAndBytesConfig(load_in_8bit=True)` (LLM.int8) + peft.
Neither side calls a `prepare_model_for_kbit_training`-style helper (it would turn on gradient
checkpointing on one side only); the output head / tied embedding stays fp32 on both sides.

What is measured, and why it is fair: each configuration runs in a fresh Python subprocess (so no
allocator state or cached buffer carries over), with `MALLOC_MMAP_THRESHOLD_=65536` so freed tensors go
back to the OS on both sides. The figure is the process's peak resident memory while training
(Linux VmHWM, reset through /proc/self/clear_refs once the model, adapters and optimizer are ready, read
after the last step) minus its resident memory right after importing its libraries: memory for the
model, adapters, gradients, optimizer state and activations, not for the code of transformers / peft
/ bitsandbytes (their imports are larger than lmforge's, printed apart). The load peak (reading the
weights and quantizing them, before training) is printed too: both sides load fp32 weights first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
CONFIGS = ("full", "lora", "qlora-nf4", "qlora-int8")
SIDES = ("lmforge", "hf")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {', '.join(CONFIGS)}")
    ap.add_argument("--workdir", default="", help="where the checkpoint and its HF export go (default: temporary)")
    ap.add_argument("--json", default="")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 x 256 model, 2 steps")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # child mode: SIDE:CONFIG
    ap.add_argument("--ckpt", default="", help=argparse.SUPPRESS)
    ap.add_argument("--hf", default="", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.d_model, a.layers, a.heads, a.ffn, a.steps = 256, 4, 4, 704, 2
    a.configs = [c.strip() for c in a.configs.split(",") if c.strip()]
    if not a.configs or any(c not in CONFIGS for c in a.configs):
        ap.error(f"--configs takes {', '.join(CONFIGS)}")
    return a


# ---- memory readings (Linux) -------------------------------------------------------------------


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


# ---- one configuration, in a child process ---------------------------------------------------


def build_lmforge(args, config: str):
    import torch

    from lmforge.model.io import load_model
    from lmforge.posttrain import lora as L
    from lmforge.train.config import TrainerConfig
    from lmforge.train.optim import build_optimizers

    model = load_model(args.ckpt)
    lcfg = L.LoraConfig(r=args.r, alpha=args.alpha, dropout=0.0, targets=tuple(HF_NAMES))
    if config == "lora":
        L.apply_lora(model, lcfg)
    elif config.startswith("qlora"):
        L.qlora(model, config.split("-")[1], lcfg)
    model.train()
    opt = build_optimizers(model, TrainerConfig(optimizer="adamw", lr=1e-4, betas=[0.9, 0.95], device="cpu"))

    def step(tokens):
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        for o in opt:
            o.step()
            o.zero_grad(set_to_none=True)
        return float(loss)

    return model, step, torch


def build_hf(args, config: str):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if config == "qlora-nf4":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.float32, bnb_4bit_use_double_quant=False)
    elif config == "qlora-int8":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(args.hf, dtype=torch.float32, attn_implementation="sdpa", **kw)
    model.config.use_cache = False
    if config != "full":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                                                 target_modules=list(HF_NAMES.values()), bias="none", task_type="CAUSAL_LM"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.0)

    def step(tokens):
        out = model(input_ids=tokens[:, :-1], labels=tokens[:, :-1].contiguous(), use_cache=False)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss)

    return model, step, torch


def child(args) -> dict:
    side, config = args.one.split(":")
    import torch

    torch.set_num_threads(args.threads)
    if side == "hf":
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        import transformers

        transformers.logging.set_verbosity_error()
    else:
        import lmforge.model.io  # noqa: F401
        import lmforge.posttrain.lora  # noqa: F401
        import lmforge.train.optim  # noqa: F401
    rss_imports = rss_mb()
    reset_peak()
    model, step, torch = (build_hf if side == "hf" else build_lmforge)(args, config)
    load_peak = peak_mb()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    rss_ready = rss_mb()
    reset_peak()
    t0 = time.perf_counter()
    losses = [step(tokens) for _ in range(args.steps)]
    dt = (time.perf_counter() - t0) / args.steps
    return {"side": side, "config": config, "trained": trained, "params_listed": total, "rss_imports": rss_imports,
            "load_peak": load_peak - rss_imports, "ready": rss_ready - rss_imports, "train_peak": peak_mb() - rss_imports,
            "train_peak_abs": peak_mb(), "s_per_step": dt, "losses": losses}


# ---- the driver ------------------------------------------------------------------------------


def make_model(args, work: Path) -> tuple[Path, Path, int]:
    import torch

    from lmforge.model import Transformer
    from lmforge.model.config import ModelConfig
    from lmforge.model.hf import export_hf
    from lmforge.model.io import save_model

    cfg = ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.heads,
                      ffn_hidden=args.ffn, vocab_size=args.vocab, max_seq_len=args.seq_len, tie_embeddings=True)
    cfg.validate()
    torch.manual_seed(0)
    ck = save_model(Transformer(cfg), work / "lmforge")
    hf = work / "hf"
    if not hf.exists():
        export_hf(ck, hf)
    return ck, hf, cfg.num_params()


def run_child(args, side: str, config: str, ck: Path, hf: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", f"{side}:{config}", "--ckpt", str(ck), "--hf", str(hf),
           "--vocab", str(args.vocab), "--seq-len", str(args.seq_len), "--batch", str(args.batch), "--steps", str(args.steps),
           "--r", str(args.r), "--alpha", str(args.alpha), "--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
        return {"side": side, "config": config, "error": " | ".join(tail) or f"exit {p.returncode}"}
    return json.loads(lines[-1])


def _result(*a, **k):
    """The RESULT line run_all.py collects (benchmarks/_bench.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench import result

    return result(*a, **k)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(child(args)))
        return 0
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_lora_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    ck, hf, n_params = make_model(args, work)
    print(f"model: {args.layers} x {args.d_model}, ffn {args.ffn}, vocab {args.vocab}, {n_params / 1e6:.1f}M params "
          f"({n_params * 4 / 2**20:,.0f} MB fp32), batch {args.batch} x {args.seq_len}, {args.steps} AdamW steps, "
          f"LoRA r {args.r} alpha {args.alpha:g} on 7 projections, {args.threads} threads, one fresh process per row")
    rows = []
    for config in args.configs:
        for side in SIDES:
            r = run_child(args, side, config, ck, hf)
            rows.append(r)
            if "error" in r:
                print(f"  {side} {config}: FAILED: {r['error']}", flush=True)
            else:
                print(f"  {side} {config}: peak {r['train_peak']:,.0f} MB above imports ({r['s_per_step']:.2f} s/step, "
                      f"losses {', '.join(f'{x:.3f}' for x in r['losses'])})", flush=True)
    full = {r["side"]: r["train_peak"] for r in rows if r.get("config") == "full" and "error" not in r}
    print("\n| config | side | params trained | peak MB training (above imports) | vs full (same side) | "
          "lmforge / peer | load peak MB | imports MB | s/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    peer = {(r["config"], r["side"]): r for r in rows if "error" not in r}
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | {r['side']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        vs = f"{r['train_peak'] / full[r['side']]:.2f}x" if r["side"] in full else "-"
        other = peer.get((r["config"], "hf"))
        ratio = f"{r['train_peak'] / other['train_peak']:.2f}x" if r["side"] == "lmforge" and other else ""
        side = "lmforge" if r["side"] == "lmforge" else ("transformers + peft" if r["config"] in ("full", "lora")
                                                          else "peft + bitsandbytes")
        print(f"| {r['config']} | {side} | {r['trained']:,} | {r['train_peak']:,.0f} | {vs} | {ratio} | "
              f"{r['load_peak']:,.0f} | {r['rss_imports']:,.0f} | {r['s_per_step']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "rows": rows}, indent=1))
    less = {r["config"]: peer[(r["config"], "hf")]["train_peak"] / r["train_peak"]
            for r in rows if r["side"] == "lmforge" and "error" not in r and (r["config"], "hf") in peer}
    if less:
        _result("lora_memory", min(less.values()), 1.0,
                "peak training memory, peer (transformers + peft / bitsandbytes) / lmforge, higher = lmforge uses less; "
                "headline = the lowest of " + ", ".join(f"{k} {v:.2f}x" for k, v in less.items()),
                **{k: round(v, 3) for k, v in less.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
