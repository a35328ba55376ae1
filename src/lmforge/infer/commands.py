"""CLI: `lmforge generate` and `lmforge export`.

    lmforge generate MODEL --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N] [--temperature T]
                     [--top-k K] [--top-p P] [--repetition-penalty R] [--stop S] [-n N] [--seed S]
                     [--compile] [--draft MODEL [--draft-tokens K] | --medusa HEADS_DIR [--draft-tokens K]]
    lmforge export hf MODEL OUT [--tokenizer DIR] [--dtype float32|bfloat16|float16] [--check]

MODEL is anything `lmforge.model.io.resolve_model` accepts: a run directory (its latest model), a
checkpoints directory, its `latest` file, a step_* directory, a `save_model` directory, or (for
generate) a Hugging Face Llama/Qwen3 folder. Checkpoint checksums are verified before loading.

`--draft MODEL` decodes speculatively (lmforge.infer.speculative) with a smaller model that has the
same tokenizer, `--medusa DIR` with Medusa heads trained by `lmforge medusa` (lmforge.infer.medusa):
the same output as without (identical greedy text, the same sampling distribution), one sequence
at a time; the acceptance statistics go to stderr, or as a last JSON line with --json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

_DTYPES = ("float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="sample text from a model (a run, checkpoint, step directory or HF folder)")
    g.add_argument("checkpoint", help="run directory, checkpoints directory, its `latest` file, step_* directory or HF folder")
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    g.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the model's own copy, else the run's)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=50, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("-n", type=int, default=1, help="samples per prompt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    g.add_argument("--dtype", choices=_DTYPES, help="cast the weights (default: float32)")
    g.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    g.add_argument("--chat", action="store_true",
                   help="each prompt is a user message, rendered with the chat template (for SFT / DPO / RL models)")
    g.add_argument("--draft", help="speculative decoding: a draft model with the same tokenizer (run, checkpoint or "
                   "step directory, e.g. a distilled student or a quantized copy)")
    g.add_argument("--medusa", help="speculative decoding with Medusa heads (a directory written by `lmforge medusa`)")
    g.add_argument("--compile", action="store_true",
                   help="the decode step through torch.compile (CUDA graphs on GPU; seconds to a minute of compilation "
                        "first, worth it for long generations)")
    g.add_argument("--draft-tokens", type=int,
                   help="guesses per target step (default 4 with --draft, the number of heads with --medusa)")
    g.set_defaults(func=_cmd_generate)

    e = sub.add_parser("export", help="export a checkpoint to another format")
    esub = e.add_subparsers(dest="format", metavar="FORMAT")
    h = esub.add_parser("hf", help="Hugging Face transformers checkpoint (Llama, or Qwen3 when the model uses QK-norm)")
    h.add_argument("checkpoint", help="run directory, checkpoints directory or model directory (e.g. runs/demo/checkpoints/tiny/step_000300)")
    h.add_argument("out", help="output directory")
    h.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's copy, else the run's)")
    h.add_argument("--dtype", default="float32", choices=_DTYPES)
    h.add_argument("--check", action="store_true", help="load the export with transformers and compare logits")
    h.set_defaults(func=_cmd_export_hf)
    from lmforge.infer.gguf import add_export_parser as add_gguf

    add_gguf(esub)  # lmforge export gguf
    e.set_defaults(func=lambda a: (e.print_help(), 1)[1])

    from lmforge.infer.quantize_cmd import register as register_quantize

    register_quantize(sub)  # lmforge quantize


def _cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from lmforge.errors import ConfigError
    from lmforge.infer import device_from_name, load_model_and_tokenizer
    from lmforge.infer.engine import SamplingParams, generate

    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be >= 1")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=tuple(args.stop), n=args.n,
                            seed=args.seed)
    params.validate()
    device = device_from_name(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tok, ref = load_model_and_tokenizer(args.checkpoint, device=device, dtype=dtype, tokenizer=args.tokenizer)
    if args.chat:
        from lmforge.tokenizer.chat import render_prompt

        prompts = [render_prompt(tok, [{"role": "user", "content": p}]) for p in args.prompt]
    else:
        bos = [tok.bos_id] if tok.bos_id is not None else []
        prompts = [bos + tok.encode(p) for p in args.prompt]
    spec = None
    if args.draft or args.medusa:
        if args.compile:
            raise ConfigError("--compile applies to plain decoding, not to --draft / --medusa")
        outs, spec = _speculative(args, model, tok, ref, prompts, params, device, dtype)
    else:
        if args.draft_tokens is not None:
            raise ConfigError("--draft-tokens needs --draft MODEL or --medusa DIR")
        outs = generate(model, prompts, params, tokenizer=tok, compile=args.compile)
    for o in outs:
        prompt = args.prompt[o.prompt_index] + ("\n" if args.chat and not args.json else "")
        # special tokens (a weak model's stray <|pad|>) are left out of the text, as before the engine
        completion = o.text if args.stop and o.text is not None else tok.decode(o.token_ids, skip_special=True)
        if o.finish_reason == "context":
            print(f"lmforge: note: prompt {o.prompt_index} reached the model's context ({model.cfg.max_seq_len} tokens) "
                  f"after {len(o.token_ids)} of {args.max_new_tokens} new tokens", file=sys.stderr)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": completion, "sample": o.sample_index,
                              "finish_reason": o.finish_reason, "model": str(ref.path)}, ensure_ascii=False))
        else:
            print(prompt + completion)
    if spec is not None:
        method, stats = spec
        if args.json:
            print(json.dumps({"speculative": {"method": method, **stats.to_dict()}}))
        else:
            print(f"lmforge: {method}: {stats.summary()}", file=sys.stderr)
    return 0


def _speculative(args, model, tok, ref, prompts, params, device, dtype):
    """(completions, (method, SpecStats)) for --draft / --medusa."""
    from lmforge.errors import ConfigError, InputError

    if args.draft and args.medusa:
        raise ConfigError("give either --draft MODEL or --medusa DIR, not both")
    if args.draft_tokens is not None and args.draft_tokens < 1:
        raise ConfigError(f"--draft-tokens must be >= 1, got {args.draft_tokens}")
    if args.medusa:
        from lmforge.infer.medusa import load_heads, medusa_generate, read_meta

        heads = load_heads(args.medusa, model, device=device)
        base = read_meta(args.medusa)[1].get("base") or {}
        if base.get("checksum") and base.get("checksum") != _weights_checksum(ref.path):
            print(f"lmforge: note: the Medusa heads were trained on {base.get('path')}, not on {ref.path}: "
                  "the output is unchanged, the acceptance may be low", file=sys.stderr)
        if args.draft_tokens is not None and args.draft_tokens > heads.cfg.heads:
            raise ConfigError(f"--draft-tokens {args.draft_tokens}: the heads in {args.medusa} guess at most {heads.cfg.heads}")
        outs, stats = medusa_generate(model, heads, prompts, params, tokenizer=tok, k=args.draft_tokens)
        return outs, ("medusa", stats)
    from lmforge.infer import load_model
    from lmforge.infer.speculative import same_tokenizer, speculative_generate
    from lmforge.model.io import resolve_model
    from lmforge.tokenizer import Tokenizer

    dref = resolve_model(args.draft)
    draft, dref = load_model(dref.path, device=device, dtype=dtype)
    if dref.tokenizer is not None and not same_tokenizer(tok, Tokenizer.from_file(dref.tokenizer)):
        raise InputError(f"the draft model {dref.path} has another tokenizer than the model ({dref.tokenizer}): "
                         "a draft must share the target's tokenizer")
    outs, stats = speculative_generate(model, draft, prompts, params, tokenizer=tok, k=args.draft_tokens or 4)
    return outs, ("draft", stats)


def _weights_checksum(path: Path) -> str | None:
    from lmforge.rundir import read_json

    state = read_json(Path(path) / "state.json", {}) or {}
    return (state.get("checksums") or {}).get("model.safetensors") if isinstance(state, dict) else None


def _cmd_export_hf(args: argparse.Namespace) -> int:
    from lmforge.errors import InputError
    from lmforge.model.hf import compare_logits, export_hf
    from lmforge.model.io import resolve_model, verify_checksums

    ref = resolve_model(args.checkpoint)
    if ref.kind != "lmforge":
        raise InputError(f"{ref.path} is already a Hugging Face folder")
    verify_checksums(ref.path)
    tok = Path(args.tokenizer) if args.tokenizer else ref.tokenizer
    if args.tokenizer and not tok.exists():
        raise InputError(f"--tokenizer {tok} not found")
    template = None
    if tok is not None:
        from lmforge.tokenizer import Tokenizer
        from lmforge.tokenizer.chat import TEMPLATE, chat_template_jinja

        if all(t in Tokenizer.from_file(tok).special_tokens for t in TEMPLATE.special_tokens):
            template = chat_template_jinja()  # the chat format every lmforge model is trained and served with
    import tempfile

    from lmforge.infer.compress import lowrank_of

    with tempfile.TemporaryDirectory(prefix="lmforge-densify-") as tmp:
        source = ref.path
        if lowrank_of(ref.path) is not None:  # transformers has no factorised linear layer
            source = _densified_copy(ref.path, Path(tmp))
            print(f"note: {ref.path} is a low-rank checkpoint: exported with dense weights (up @ down), at the dense size")
        out = export_hf(source, args.out, tok, args.dtype, chat_template=template)
        print(f"exported {ref.path} -> {out}" + ("" if tok else " (no tokenizer found: pass --tokenizer to include one)"))
        if args.check:
            diff = compare_logits(source, out)
            print(f"max |logit difference| lmforge vs transformers: {diff:.3g}")
    return 0


def _densified_copy(path: Path, tmp: Path) -> Path:
    """A plain checkpoint in `tmp` holding the low-rank checkpoint at `path` with dense weights."""
    from lmforge.infer import load_model
    from lmforge.infer.compress import densify_lowrank
    from lmforge.model.io import save_model

    model, _ = load_model(path)
    densify_lowrank(model)
    return save_model(model, tmp / "dense")
