"""`lmforge quantize MODEL --method int8|int4|nf4|gptq-int4|gptq-int8 --out DIR [--group-size 128]
[--calibration corpus|FILE --samples N --act-order --damp 0.01] [--include-head]`: a weight-only
quantized checkpoint that `lmforge generate`, eval and every `lmforge.infer.load_model_and_tokenizer`
caller accept, with a dense-vs-quantized report (weight bytes, held-out perplexity / bits per byte,
batch-1 greedy decode tokens/s); for GPTQ also the round-to-nearest model's held-out figures on the
same text, so the calibration's gain is measured, and the calibration layers' output error ratio.

DIR is a checkpoint directory: `model.safetensors` (the quantized state; the quantization map in
its metadata, as `quantize.save_quantized` writes it), `config.json` (the plain model's config),
`tokenizer.json`, `state.json` = {"quantization": {"kind", "method", "map"}, "source": MODEL,
"checksums": sha256 of those three files (what `model.io.verify_checksums` checks)}, and
`quantize_report.json`. It is written under a temporary name and renamed when complete.

Speed on CPU: decode-shaped calls (a few rows) of int8 and int4 modules run torch's weight-only
kernels with bf16 activations where the CPU has native bf16 (see `lmforge.infer.quantize`); NF4
dequantizes every weight block on every call, so it is slower than dense (its gain is size).

Held-out text: when MODEL lies inside a run with `tokens/val/*.bin`, a few windows of those tokens;
otherwise the bundled sample's dictionary documents that eval holds out (the same id hash rule).
Calibration text (`--calibration corpus`, the default): windows of the run's *train* tokens, else the
bundled sample's dictionary documents eval does not hold out, so calibration and held-out text never
overlap; `--calibration FILE`: a UTF-8 text file (.txt, cut into windows) or JSONL (.jsonl / .jsonl.gz,
one `text` field per line).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from pathlib import Path

SAMPLE_DICTIONARY = Path(__file__).resolve().parents[1] / "sample" / "dictionary" / "gcide-sample.jsonl.gz"
DECODE_PROMPT = "The meaning of the word"
DECODE_TOKENS = 32
HELDOUT_DOCS = 8
HELDOUT_WINDOW = 256
METHODS = ("int8", "int4", "nf4", "gptq-int4", "gptq-int8")
CALIBRATION_WINDOW = 256


def register(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser("quantize", help="weight-only int8 / int4 / NF4 / GPTQ copy of a model, with a size / perplexity / "
                                        "speed report")
    q.add_argument("checkpoint", help="run directory, checkpoints directory, its `latest` file, step_* directory or HF folder")
    q.add_argument("--method", "--kind", dest="method", required=True, metavar="METHOD",
                   help="int8 (per channel), int4 (group-wise, round to nearest), nf4 (4-bit NormalFloat, blocks "
                        "of 64), gptq-int4 or gptq-int8 (GPTQ calibrated on --calibration text)")
    q.add_argument("--out", required=True, help="output checkpoint directory")
    q.add_argument("--group-size", type=int, default=128, help="int4 columns per scale/zero: 32, 64, 128 or 256 (default 128)")
    q.add_argument("--calibration", default="corpus",
                   help="GPTQ calibration text: 'corpus' (the run's train tokens, else the bundled sample's "
                        "non-held-out dictionary documents) or a .txt / .jsonl[.gz] file (default corpus)")
    q.add_argument("--samples", type=int, default=32, help=f"GPTQ calibration sequences of up to {CALIBRATION_WINDOW} "
                                                           "tokens (default 32)")
    q.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing activation energy")
    q.add_argument("--damp", type=float, default=0.01, help="GPTQ dampening, a fraction of the mean Hessian diagonal "
                                                            "(default 0.01)")
    q.add_argument("--include-head", action="store_true", help="quantize the output head too (a tied head gets its own quantized copy)")
    q.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model's own copy, else the run's)")
    q.set_defaults(func=_cmd_quantize)


def _cmd_quantize(args: argparse.Namespace) -> int:
    report = quantize_checkpoint(args.checkpoint, args.method, args.out, include_head=args.include_head,
                                 tokenizer=args.tokenizer, group_size=args.group_size, calibration=args.calibration,
                                 samples=args.samples, act_order=args.act_order, damp=args.damp)
    print(format_report(report))
    print(f"wrote {report['out']}")
    return 0


# ---- held-out text ---------------------------------------------------------------------------


def _run_val_shards(model_dir: Path) -> tuple[list[Path], str] | None:
    """The val token shards of the run `model_dir` lies in (a few levels up), with their dtype."""
    return _run_shards(model_dir, "val")


def _run_shards(model_dir: Path, split: str) -> tuple[list[Path], str] | None:
    """The `split` token shards of the run `model_dir` lies in (a few levels up), with their dtype."""
    for d in [model_dir.resolve(), *model_dir.resolve().parents][:6]:
        index = d / "tokens" / "index.json"
        if index.is_file():
            try:
                meta = json.loads(index.read_text())
                shards = [d / "tokens" / s["path"] for s in meta.get(split, [])]
                dtype = meta.get("dtype", "uint16")
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return None
            shards = [s for s in shards if s.is_file()]
            return (shards, dtype) if shards and dtype in ("uint16", "uint32") else None
    return None


def heldout_sequences(model_dir: Path, tok, ctx: int, n: int = HELDOUT_DOCS) -> tuple[str, list[list[int]], list[int]]:
    """(description, token sequences, UTF-8 bytes of each sequence's scored tokens): up to `n`
    windows of a run's val tokens, else `n` held-out dictionary documents of the bundled sample,
    each cut to the model's context."""
    import numpy as np

    length = min(ctx, HELDOUT_WINDOW) + 1
    found = _run_val_shards(model_dir)
    seqs: list[list[int]] = []
    if found is not None:
        shards, dtype = found
        toks = np.concatenate([np.memmap(s, dtype=np.dtype(dtype).newbyteorder("<"), mode="r") for s in shards])
        span = max(0, len(toks) - length)
        starts = range(0, span + 1, max(1, span // n))[:n]  # spread over the whole val split
        seqs = [toks[s : s + length].astype(np.int64).tolist() for s in starts]
        seqs = [s for s in seqs if len(s) >= 2]
        source = f"run val tokens ({', '.join(str(s) for s in shards)})"
    if not seqs:
        import xxhash

        bos = [tok.bos_id] if tok.bos_id is not None else []
        with gzip.open(SAMPLE_DICTIONARY, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        # eval's held-out rule (lmforge.eval.builtin.is_heldout, 50 per mille)
        held = [r for r in rows if r.get("text", "").strip() and xxhash.xxh64_intdigest(str(r["id"]).encode()) % 1000 >= 950]
        held.sort(key=lambda r: str(r["id"]))
        seqs = [(bos + tok.encode(r["text"]))[:length] for r in held[:n]]
        seqs = [s for s in seqs if len(s) >= 2]
        source = f"bundled sample dictionary (held-out docs of {SAMPLE_DICTIONARY.name})"
    nbytes = [max(1, len(tok.decode(s[1:], skip_special=True).encode("utf-8"))) for s in seqs]
    return source, seqs, nbytes


def calibration_sequences(spec: str | Path, model_dir: Path, tok, ctx: int, n: int) -> tuple[str, list[list[int]]]:
    """(description, up to `n` token windows of at most min(ctx, CALIBRATION_WINDOW) tokens) for GPTQ
    (module docstring: 'corpus' or a file). InputError when the file is missing or holds no text."""
    import numpy as np

    from lmforge.errors import ConfigError, InputError

    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"--samples must be a positive integer, not {n!r}")
    length = min(ctx, CALIBRATION_WINDOW)
    bos = [tok.bos_id] if tok.bos_id is not None else []
    if str(spec) == "corpus":
        found = _run_shards(model_dir, "train")
        if found is not None:
            shards, dtype = found
            toks = np.concatenate([np.memmap(s, dtype=np.dtype(dtype).newbyteorder("<"), mode="r") for s in shards])
            span = max(0, len(toks) - length)
            starts = range(0, span + 1, max(1, span // n))[:n]  # spread over the whole train split
            seqs = [toks[s : s + length].astype(np.int64).tolist() for s in starts]
            return f"run train tokens ({', '.join(str(s) for s in shards)})", [s for s in seqs if len(s) >= 2]
        import xxhash

        with gzip.open(SAMPLE_DICTIONARY, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        kept = [r for r in rows if r.get("text", "").strip() and xxhash.xxh64_intdigest(str(r["id"]).encode()) % 1000 < 950]
        kept.sort(key=lambda r: str(r["id"]))
        texts = [r["text"] for r in kept]
        source = f"bundled sample dictionary (documents eval does not hold out, {SAMPLE_DICTIONARY.name})"
    else:
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"--calibration {path}: no such file (give a .txt or .jsonl file, or 'corpus')")
        try:
            if path.name.endswith((".jsonl", ".jsonl.gz")):
                opener = gzip.open if path.name.endswith(".gz") else open
                texts = []
                with opener(path, "rt", encoding="utf-8") as f:
                    for line in f:
                        try:
                            t = json.loads(line).get("text") if line.strip() else None
                        except (ValueError, AttributeError):
                            t = None
                        if isinstance(t, str) and t.strip():
                            texts.append(t)
            else:
                texts = [path.read_text(encoding="utf-8")]
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise InputError(f"--calibration {path}: cannot read it ({e.__class__.__name__})") from None
        source = f"file {path}"
    # documents packed one after another (each with its beginning-of-text token), cut into windows
    seqs: list[list[int]] = []
    buf: list[int] = []
    for t in texts:
        buf.extend(bos + tok.encode(t))
        while len(buf) >= length and len(seqs) < n:
            seqs.append(buf[:length])
            buf = buf[length:]
        if len(seqs) >= n:
            break
    if len(seqs) < n and len(buf) >= 2:
        seqs.append(buf[:length])
    if not seqs:
        raise InputError(f"--calibration {spec}: no text to calibrate on")
    return source, seqs


def heldout_metrics(model, seqs: list[list[int]], nbytes: list[int]) -> dict:
    """Loss (nats/token), perplexity and bits per byte of `model` on the sequences (next-token
    prediction over each whole sequence, one forward each)."""
    import torch

    vocab = model.cfg.vocab_size
    nll, ntok = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([[min(t, vocab - 1) for t in s]], device=device)
            lp = model.token_logprobs(ids[:, :-1], ids[:, 1:])
            nll -= float(lp.double().sum())
            ntok += ids.shape[1] - 1
    loss = nll / max(1, ntok)
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "bpb": nll / math.log(2) / sum(nbytes), "tokens": ntok}


# ---- speed -----------------------------------------------------------------------------------


def decode_speed(model, prompt_ids: list[int], new_tokens: int = DECODE_TOKENS, repeats: int = 3) -> float:
    """Batch-1 greedy decode tokens/s through the engine on one intra-op thread, best of `repeats`
    (end tokens do not stop it; the short prompt's prefill is included in the time)."""
    import torch

    from lmforge.infer.engine import SamplingParams, generate

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, stop_token_ids=())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = generate(model, [prompt_ids], params)
            dt = time.perf_counter() - t0
            best = min(best, dt / max(1, len(out[0].token_ids)))
    finally:
        torch.set_num_threads(threads)
    return 1.0 / best


# ---- the command -----------------------------------------------------------------------------


def _measure(model, seqs, nbytes, prompt_ids) -> dict:
    from lmforge.infer.quantize import model_bytes

    return {"weight_bytes": model_bytes(model), **heldout_metrics(model, seqs, nbytes),
            "decode_tok_s": decode_speed(model, prompt_ids)}


def quantize_checkpoint(model_path: str | Path, kind: str, out: str | Path, include_head: bool = False,
                        tokenizer: str | Path | None = None, group_size: int = 128, calibration: str | Path = "corpus",
                        samples: int = 32, act_order: bool = False, damp: float = 0.01) -> dict:
    """Quantize the model at `model_path` (anything `load_model_and_tokenizer` accepts) with method
    `kind` (`METHODS`: "int8" | "int4" | "nf4" | "gptq-int4" | "gptq-int8"), write the checkpoint
    directory `out` (module docstring) and return the report (also written as
    `out/quantize_report.json`). ConfigError for an unknown method or a bad group size; InputError
    when the model is already quantized, `out` is the source, or the calibration text is missing."""
    import copy

    import torch

    from lmforge.errors import ConfigError, InputError
    from lmforge.infer import load_model_and_tokenizer, quantization_of
    from lmforge.infer.quantize import INT4_GROUP_SIZES, quantization_map, quantize_model, quantized_bytes, select_linears
    from lmforge.model.io import resolve_model, sha256_file
    from lmforge.rundir import atomic_dir, atomic_write_bytes, atomic_write_json
    from lmforge.tokenizer.runtime import tokenizer_file

    if kind not in METHODS:
        raise ConfigError(f"--method {kind!r}: choose from {', '.join(METHODS)}")
    gptq = kind.startswith("gptq-")
    base = kind.removeprefix("gptq-")
    if base == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"--group-size {group_size}: choose from {', '.join(map(str, INT4_GROUP_SIZES))}")
    if gptq and not 0 <= damp < 1:
        raise ConfigError(f"--damp {damp}: must be in [0, 1)")
    out = Path(out)
    ref = resolve_model(model_path)
    if out.resolve() == ref.path.resolve():
        raise InputError(f"--out {out} is the model being quantized: choose another directory")
    from lmforge.infer.compress import lowrank_of

    if ref.kind == "lmforge" and lowrank_of(ref.path) is not None:
        raise InputError(f"{ref.path} is a low-rank checkpoint (`lmforge lowrank`): its factorised layers are not "
                         "quantized; quantize the dense model it came from")
    if ref.kind == "lmforge" and quantization_of(ref.path) is not None:
        raise InputError(f"{ref.path} is already quantized: quantize the dense model instead")
    model, tok, ref = load_model_and_tokenizer(model_path, tokenizer=tokenizer)
    model.float()
    if not select_linears(model, base, None, include_head):  # an unknown method: one line now, not after loading data
        raise InputError(f"{ref.path} has no linear layer to quantize")
    source, seqs, nbytes = heldout_sequences(ref.path, tok, model.cfg.max_seq_len)
    if not seqs:
        raise InputError(f"no held-out text to measure perplexity on ({source})")
    calib = None
    if gptq:
        csource, cseqs = calibration_sequences(calibration, ref.path, tok, model.cfg.max_seq_len, samples)
        vocab = model.cfg.vocab_size
        cseqs = [[min(t, vocab - 1) for t in s] for s in cseqs]
        calib = {"source": csource, "sequences": len(cseqs), "tokens": sum(map(len, cseqs)), "act_order": act_order,
                 "damp": damp}
    prompt = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(DECODE_PROMPT)
    prompt = prompt[: max(1, model.cfg.max_seq_len - DECODE_TOKENS - 1)]
    rtn = None
    with torch.no_grad():
        dense = _measure(model, seqs, nbytes, prompt)
        if gptq:
            from lmforge.infer.gptq import gptq_quantize_model

            rtn_model = copy.deepcopy(model)
            quantize_model(rtn_model, base, include_head=include_head, group_size=group_size)
            rtn = heldout_metrics(rtn_model, seqs, nbytes)
            del rtn_model
            res = gptq_quantize_model(model, cseqs, base, group_size=group_size, act_order=act_order, damp=damp,
                                      include_head=include_head)
            swapped = res["modules"]
            errs = res["error"].values()
            calib["output_error_vs_rtn"] = sum(e[0] for e in errs) / max(1e-30, sum(e[1] for e in errs))
        else:
            swapped = quantize_model(model, base, include_head=include_head, group_size=group_size)
        quant = _measure(model, seqs, nbytes, prompt)
    qmap = quantization_map(model)
    report = {
        "kind": kind, "source": str(ref.path), "out": str(out), "include_head": include_head,
        "quantized_modules": len(swapped),
        "group_size": group_size if base == "int4" else None,
        "held_out": {"source": source, "sequences": len(seqs), "tokens": dense["tokens"], "bytes": sum(nbytes)},
        "decode": {"prompt_tokens": len(prompt), "new_tokens": DECODE_TOKENS, "threads": 1, "best_of": 3, "greedy": True},
        "dense": dense, "quantized": quant,
        "size_ratio": quant["weight_bytes"] / dense["weight_bytes"],
        "bpb_change": quant["bpb"] - dense["bpb"],
        "decode_speedup": quant["decode_tok_s"] / dense["decode_tok_s"],
        "note": ("CPU: int8 / int4 decode-shaped calls use torch's weight-only kernels with bf16 activations where the "
                 "CPU has native bf16, larger calls dequantize and matmul; NF4 dequantizes every call (size, not speed)"),
    }
    if gptq:
        report["calibration"] = calib
        report["round_to_nearest"] = rtn
        report["bpb_change_vs_rtn"] = quant["bpb"] - rtn["bpb"]
    with atomic_dir(out) as tmp:
        atomic_write_bytes(tmp / "model.safetensors", quantized_bytes(model))
        atomic_write_json(tmp / "config.json", model.cfg.to_dict())
        atomic_write_bytes(tmp / "tokenizer.json", tokenizer_file(tok.path).read_bytes())
        sums = {n: sha256_file(tmp / n) for n in ("model.safetensors", "config.json", "tokenizer.json")}
        atomic_write_json(tmp / "state.json", {"quantization": {"kind": base, "method": kind, "map": qmap},
                                               "source": str(ref.path), "checksums": sums})
        atomic_write_json(tmp / "quantize_report.json", report)
    return report


def format_report(r: dict) -> str:
    """The dense-vs-quantized table of a `quantize_checkpoint` report."""
    d, q = r["dense"], r["quantized"]
    rows = [("weight MB", f"{d['weight_bytes'] / 1e6:.3f}", f"{q['weight_bytes'] / 1e6:.3f}", f"{r['size_ratio']:.3f}x"),
            ("held-out bpb", f"{d['bpb']:.4f}", f"{q['bpb']:.4f}", f"{r['bpb_change']:+.4f}"),
            ("held-out ppl", f"{d['ppl']:.3f}", f"{q['ppl']:.3f}", f"{q['ppl'] / d['ppl']:.4f}x"),
            ("decode tok/s (1 thread)", f"{d['decode_tok_s']:.1f}", f"{q['decode_tok_s']:.1f}", f"{r['decode_speedup']:.2f}x")]
    head = ("", "dense", r["kind"], "quantized/dense")
    w = [max(len(str(row[i])) for row in (head, *rows)) for i in range(4)]
    lines = [f"quantize {r['source']} -> {r['out']} ({r['kind']}, {r['quantized_modules']} linear layers)",
             f"held out: {r['held_out']['source']}: {r['held_out']['sequences']} sequences, {r['held_out']['tokens']} tokens",
             "  ".join(str(c).ljust(w[i]) if i == 0 else str(c).rjust(w[i]) for i, c in enumerate(head))]
    lines += ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in rows]
    if r.get("calibration"):
        c, rt = r["calibration"], r["round_to_nearest"]
        lines.append(f"calibration: {c['source']}: {c['sequences']} sequences, {c['tokens']} tokens"
                     f"{', act order' if c['act_order'] else ''}, damp {c['damp']}")
        lines.append(f"round to nearest, same bits: held-out bpb {rt['bpb']:.4f}, ppl {rt['ppl']:.3f}; GPTQ minus RTN bpb "
                     f"{r['bpb_change_vs_rtn']:+.4f}; calibration output error GPTQ/RTN {c['output_error_vs_rtn']:.3f}")
    return "\n".join(lines)


__all__ = ["METHODS", "calibration_sequences", "decode_speed", "format_report", "heldout_metrics", "heldout_sequences", "quantize_checkpoint", "register"]
