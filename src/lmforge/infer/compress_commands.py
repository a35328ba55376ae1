"""`lmforge prune` and `lmforge lowrank`: compressed checkpoints with a dense-vs-compressed report.

    lmforge prune MODEL --out DIR --method magnitude [--sparsity 0.5 | --pattern 2:4]
    lmforge prune MODEL --out DIR --method heads --keep-heads K [--score activation|weight]
    lmforge prune MODEL --out DIR --method mlp --keep-ratio R [--score activation|weight]
    lmforge lowrank MODEL --out DIR --energy 0.9

DIR is a checkpoint directory that `lmforge generate`, eval, `lmforge distill --student DIR` (the
recovery fine-tuning) and every `lmforge.infer.load_model_and_tokenizer` caller accept (layout in
`lmforge.infer.compress`). The report (printed, and `DIR/compress_report.json`): parameters
(all / nonzero), model.safetensors size, held-out bits per byte and perplexity, batch-1 greedy
decode tokens/s on one thread, for the dense model and the compressed one. Held-out text and the
speed measurement are those of `lmforge quantize` (`quantize_cmd.heldout_sequences`,
`decode_speed`); importance scores for structured pruning come from the run's *train* tokens
(or the bundled sample's non-held-out documents), never from the held-out text.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="magnitude (unstructured / 2:4) or structured (attention heads, MLP channels) pruning, "
                                     "with a size / perplexity / speed report")
    p.add_argument("checkpoint", help="run directory, checkpoints directory, its `latest` file, step_* directory or HF folder")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--method", required=True, help="magnitude, heads or mlp")
    p.add_argument("--sparsity", type=float, default=0.5, help="magnitude: share of each layer's weights set to zero (0.5)")
    p.add_argument("--pattern", default="unstructured", help="magnitude: unstructured (default) or 2:4")
    p.add_argument("--keep-heads", type=int, help="heads: attention heads kept per layer")
    p.add_argument("--keep-ratio", type=float, help="mlp: share of each layer's SwiGLU channels kept")
    p.add_argument("--score", default="activation",
                   help="heads/mlp importance: activation (measured on calibration text, default) or weight (norms only)")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model's own copy, else the run's)")
    p.set_defaults(func=_cmd_prune)

    lr = sub.add_parser("lowrank", help="SVD factorisation of linear layers (rank by kept energy), with a size / "
                                        "perplexity / speed report")
    lr.add_argument("checkpoint", help="run directory, checkpoints directory, its `latest` file, step_* directory or HF folder")
    lr.add_argument("--out", required=True, help="output checkpoint directory")
    lr.add_argument("--energy", type=float, default=0.9, help="share of sum(singular values^2) each layer keeps (0.9)")
    lr.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model's own copy, else the run's)")
    lr.set_defaults(func=_cmd_lowrank)


def _cmd_prune(args: argparse.Namespace) -> int:
    report = prune_checkpoint(args.checkpoint, args.out, args.method, sparsity=args.sparsity, pattern=args.pattern,
                              keep_heads=args.keep_heads, keep_ratio=args.keep_ratio, score=args.score,
                              tokenizer=args.tokenizer)
    print(format_report(report))
    print(f"wrote {report['out']}")
    return 0


def _cmd_lowrank(args: argparse.Namespace) -> int:
    report = lowrank_checkpoint(args.checkpoint, args.out, args.energy, tokenizer=args.tokenizer)
    print(format_report(report))
    print(f"wrote {report['out']}")
    return 0


# ---- shared parts ------------------------------------------------------------------------------


def _load_dense(model_path, out, tokenizer, what: str):
    """(model fp32 eval, tokenizer, ref) of a dense model; InputError when out is the source or the
    model is already quantized / low-rank."""
    from lmforge.errors import InputError
    from lmforge.infer import load_model_and_tokenizer, quantization_of
    from lmforge.infer.compress import check_plain, lowrank_of
    from lmforge.model.io import resolve_model

    ref = resolve_model(model_path)
    if Path(out).resolve() == ref.path.resolve():
        raise InputError(f"--out {out} is the model being compressed: choose another directory")
    if ref.kind == "lmforge" and (quantization_of(ref.path) is not None or lowrank_of(ref.path) is not None):
        raise InputError(f"{ref.path} is a quantized or low-rank checkpoint: {what} the dense model instead")
    model, tok, ref = load_model_and_tokenizer(model_path, tokenizer=tokenizer)
    model.float().eval()
    check_plain(model, what)
    return model, tok, ref


def measure(model, seqs, nbytes, prompt) -> dict:
    """Parameters (all / nonzero), model.safetensors bytes, held-out loss / ppl / bpb, decode tok/s."""
    from lmforge.infer.compress import count_parameters, safetensors_bytes
    from lmforge.infer.quantize_cmd import decode_speed, heldout_metrics

    params, nonzero = count_parameters(model)
    return {"params": params, "nonzero_params": nonzero, "file_bytes": len(safetensors_bytes(model)),
            **heldout_metrics(model, seqs, nbytes), "decode_tok_s": decode_speed(model, prompt)}


def _heldout(ref, tok, model):
    from lmforge.errors import InputError
    from lmforge.infer.quantize_cmd import DECODE_PROMPT, DECODE_TOKENS, heldout_sequences

    source, seqs, nbytes = heldout_sequences(ref.path, tok, model.cfg.max_seq_len)
    if not seqs:
        raise InputError(f"no held-out text to measure perplexity on ({source})")
    prompt = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(DECODE_PROMPT)
    prompt = prompt[: max(1, model.cfg.max_seq_len - DECODE_TOKENS - 1)]
    return source, seqs, nbytes, prompt


def _report(kind: str, ref, out, source, seqs, dense: dict, comp: dict, details: dict, t0: float) -> dict:
    from lmforge.infer.quantize_cmd import DECODE_TOKENS

    return {
        "kind": kind, "source": str(ref.path), "out": str(out), **details,
        "held_out": {"source": source, "sequences": len(seqs), "tokens": dense["tokens"]},
        "decode": {"new_tokens": DECODE_TOKENS, "threads": 1, "best_of": 3, "greedy": True},
        "dense": dense, "compressed": comp,
        "param_ratio": comp["params"] / dense["params"], "nonzero_ratio": comp["nonzero_params"] / dense["nonzero_params"],
        "file_ratio": comp["file_bytes"] / dense["file_bytes"], "bpb_change": comp["bpb"] - dense["bpb"],
        "decode_speedup": comp["decode_tok_s"] / dense["decode_tok_s"], "seconds": time.time() - t0,
    }


# ---- the commands ------------------------------------------------------------------------------


def prune_checkpoint(model_path, out, method: str, *, sparsity: float = 0.5, pattern: str = "unstructured",
                     keep_heads: int | None = None, keep_ratio: float | None = None, score: str = "activation",
                     tokenizer=None) -> dict:
    """Prune the model at `model_path` with `method` ("magnitude" | "heads" | "mlp"), write the
    checkpoint `out` and return the report (also `out/compress_report.json`). ConfigError for a
    bad method or option; InputError for a bad model or `out`."""
    import torch

    from lmforge.errors import ConfigError
    from lmforge.infer import compress as C
    from lmforge.tokenizer.runtime import tokenizer_file

    t0 = time.time()
    if method not in C.METHODS:
        raise ConfigError(f"--method {method!r}: choose from {', '.join(C.METHODS)}")
    if score not in ("activation", "weight"):
        raise ConfigError(f"--score {score!r}: choose activation or weight")
    if method == "heads" and keep_heads is None:
        raise ConfigError("--method heads needs --keep-heads K")
    if method == "mlp" and keep_ratio is None:
        raise ConfigError("--method mlp needs --keep-ratio R")
    if method == "magnitude" and not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"--sparsity {sparsity}: must be in [0, 1)")
    if method == "magnitude" and pattern not in ("unstructured", "2:4"):
        raise ConfigError(f"--pattern {pattern!r}: choose unstructured or 2:4")
    model, tok, ref = _load_dense(model_path, out, tokenizer, "pruning")
    if method == "heads":
        C._check_keep_heads(model.cfg, keep_heads)
    if method == "mlp" and not 0.0 < keep_ratio <= 1.0:
        raise ConfigError(f"--keep-ratio {keep_ratio}: must be in (0, 1]")
    source, seqs, nbytes, prompt = _heldout(ref, tok, model)
    with torch.no_grad():
        dense = measure(model, seqs, nbytes, prompt)
    details: dict = {"method": method}
    if method == "magnitude":
        stats = C.magnitude_prune(model, sparsity, pattern)
        pruned = model
        details.update(pattern=stats["pattern"], sparsity=stats["sparsity"], pruned_sparsity=stats["pruned_sparsity"],
                       model_sparsity=stats["model_sparsity"], pruned_modules=len(stats["modules"]))
        compression = {"method": "magnitude", "pattern": stats["pattern"], "sparsity": stats["sparsity"],
                       "modules": sorted(stats["modules"])}
    else:
        calib_src, calib = C.calibration_sequences(ref.path, tok, model.cfg.max_seq_len) if score == "activation" else ("", [])
        heads, chans = C.importance(model, calib)
        details.update(score=score, calibration={"source": calib_src, "sequences": len(calib)} if calib else None)
        if method == "heads":
            pruned, kept = C.prune_heads(model, keep_heads, heads)
            details.update(heads_before=model.cfg.n_heads, heads_after=pruned.cfg.n_heads,
                           kv_heads_before=model.cfg.n_kv_heads, kv_heads_after=pruned.cfg.n_kv_heads,
                           kept_heads={str(k): v for k, v in kept.items()})
            compression = {"method": "heads", "keep_heads": keep_heads, "score": score, "kept_heads": details["kept_heads"]}
        else:
            pruned, hidden = C.prune_mlp(model, keep_ratio, chans)
            details.update(ffn_before=model.cfg.ffn_hidden, ffn_after=hidden, keep_ratio=keep_ratio)
            compression = {"method": "mlp", "keep_ratio": keep_ratio, "ffn_hidden": hidden, "score": score}
    with torch.no_grad():
        comp = measure(pruned, seqs, nbytes, prompt)
    report = _report(f"prune/{method}", ref, out, source, seqs, dense, comp, details, t0)
    C.write_checkpoint(pruned, out, tokenizer_file(tok.path), compression,
                       str(ref.path), report)
    return report


def lowrank_checkpoint(model_path, out, energy: float = 0.9, tokenizer=None) -> dict:
    """Factorise the model at `model_path` (`compress.lowrank_model` at `energy`), write the
    checkpoint `out`, return the report (also `out/compress_report.json`)."""
    import torch

    from lmforge.errors import ConfigError
    from lmforge.infer import compress as C
    from lmforge.tokenizer.runtime import tokenizer_file

    t0 = time.time()
    if not 0.0 < energy <= 1.0:
        raise ConfigError(f"--energy {energy}: must be in (0, 1]")
    model, tok, ref = _load_dense(model_path, out, tokenizer, "low-rank factorisation")
    source, seqs, nbytes, prompt = _heldout(ref, tok, model)
    with torch.no_grad():
        dense = measure(model, seqs, nbytes, prompt)
        layers = C.lowrank_model(model, energy)
        comp = measure(model, seqs, nbytes, prompt)
    swapped = {n: v for n, v in layers.items() if v["swapped"]}
    details = {"method": "lowrank", "energy": energy, "layers": len(layers), "swapped": len(swapped),
               "ranks": {n: v["rank"] for n, v in layers.items()},
               "kept_energy": {n: round(v["kept_energy"], 6) for n, v in layers.items()}}
    report = _report("lowrank", ref, out, source, seqs, dense, comp, details, t0)
    C.write_checkpoint(model, out, tokenizer_file(tok.path),
                       {"method": "lowrank", "energy": energy, "swapped": len(swapped), "layers": len(layers)},
                       str(ref.path), report)
    return report


def format_report(r: dict) -> str:
    """The dense-vs-compressed table of a report."""
    d, c = r["dense"], r["compressed"]
    rows = [("parameters", f"{d['params']:,}", f"{c['params']:,}", f"{r['param_ratio']:.3f}x"),
            ("nonzero parameters", f"{d['nonzero_params']:,}", f"{c['nonzero_params']:,}", f"{r['nonzero_ratio']:.3f}x"),
            ("model.safetensors MB", f"{d['file_bytes'] / 1e6:.3f}", f"{c['file_bytes'] / 1e6:.3f}", f"{r['file_ratio']:.3f}x"),
            ("held-out bpb", f"{d['bpb']:.4f}", f"{c['bpb']:.4f}", f"{r['bpb_change']:+.4f}"),
            ("held-out ppl", f"{d['ppl']:.3f}", f"{c['ppl']:.3f}", f"{c['ppl'] / d['ppl']:.4f}x"),
            ("decode tok/s (1 thread)", f"{d['decode_tok_s']:.1f}", f"{c['decode_tok_s']:.1f}", f"{r['decode_speedup']:.2f}x")]
    head = ("", "dense", r["kind"], "compressed/dense")
    w = [max(len(str(row[i])) for row in (head, *rows)) for i in range(4)]
    extra = {"prune/magnitude": lambda: f"{r['pattern']}, achieved sparsity {r['pruned_sparsity']:.4f} of the pruned layers, "
                                        f"{r['model_sparsity']:.4f} of all parameters",
             "prune/heads": lambda: f"heads {r['heads_before']} -> {r['heads_after']}, kv heads {r['kv_heads_before']} -> "
                                    f"{r['kv_heads_after']} ({r['score']} score)",
             "prune/mlp": lambda: f"ffn_hidden {r['ffn_before']} -> {r['ffn_after']} ({r['score']} score)",
             "lowrank": lambda: f"energy {r['energy']}: {r['swapped']} of {r['layers']} linear layers factorised"}
    lines = [f"{r['kind']} {r['source']} -> {r['out']}: {extra[r['kind']]()}",
             f"held out: {r['held_out']['source']}: {r['held_out']['sequences']} sequences, {r['held_out']['tokens']} tokens",
             "  ".join(str(x).ljust(w[i]) if i == 0 else str(x).rjust(w[i]) for i, x in enumerate(head))]
    lines += ["  ".join(x.ljust(w[i]) if i == 0 else x.rjust(w[i]) for i, x in enumerate(row)) for row in rows]
    return "\n".join(lines)


__all__ = ["format_report", "lowrank_checkpoint", "measure", "prune_checkpoint", "register"]
