"""CLI: `lmforge eval` and `lmforge chat-eval` (export lives in lmforge.infer.commands; ablate and scale in lmforge.plan.commands)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate checkpoints: perplexity / bits per byte, multiple choice, generative tasks")
    p.add_argument("checkpoint", help="a model directory (model.safetensors), a run's checkpoints/<name>/ folder, or a run directory")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: found next to / above the checkpoint)")
    p.add_argument("--tasks", help="comma-separated built-in tasks (perplexity, dictionary, cloze, cloze_gen) or task .toml specs")
    p.add_argument("--checkpoints", help="latest | all | comma-separated steps (default: all)")
    p.add_argument("--docs", action="append", help="corpus dir or JSONL file for perplexity / cloze (repeatable; default: the run's corpus, else the bundled sample)")
    p.add_argument("--dictionary", help="GCIDE JSONL for the dictionary task (default: the bundled sample)")
    p.add_argument("--limit", type=int, help="examples per task (default 200)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="output directory (default: <run>/eval or ./eval)")
    p.add_argument("--force", action="store_true", help="recompute results that already exist")
    p.set_defaults(func=_cmd_eval)
    _register_chat_eval(sub)


def _eval_config(args: argparse.Namespace):
    from lmforge import config as cfgmod
    from lmforge.eval.config import EvalConfig

    raw: dict = {}
    if args.tasks:
        raw["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for k in ("checkpoints", "dictionary", "limit", "device", "docs"):
        v = getattr(args, k)
        if v is not None:
            raw[k] = v
    cfgmod.apply_overrides(raw, {k.removeprefix("eval."): v for k, v in (o.split("=", 1) for o in args.overrides)
                                 if k.startswith("eval.")})
    bad = [o for o in args.overrides if not o.startswith("eval.")]
    if bad:
        from lmforge.errors import ConfigError

        raise ConfigError(f"lmforge eval takes --eval.KEY overrides only, got --{bad[0]}")
    return cfgmod.build(EvalConfig, raw, "eval")


def _cmd_eval(args: argparse.Namespace) -> int:
    from lmforge.errors import InputError
    from lmforge.eval import harness
    from lmforge.eval.stage import resolve_docs, run_evaluation

    cfg = _eval_config(args)
    path = Path(args.checkpoint)
    run_dir = path if (path / "checkpoints").is_dir() else None
    ck_root = run_dir / "checkpoints" if run_dir else path
    checkpoints = harness.find_checkpoints(ck_root, cfg.checkpoints)
    tok_dir = Path(args.tokenizer) if args.tokenizer else harness.guess_tokenizer(checkpoints[0][1])
    if tok_dir is None:
        raise InputError(f"no tokenizer found next to or above {checkpoints[0][1]}; pass --tokenizer")
    corpus = run_dir / "corpus" if run_dir else None
    docs = resolve_docs(cfg, lambda p: Path(p), corpus)
    out = Path(args.out) if args.out else (run_dir / "eval" if run_dir else Path("eval"))
    summary, report = run_evaluation(cfg, checkpoints=checkpoints, tok_dir=tok_dir, docs=docs, out=out, seed=cfg.seed or 0,
                                     tokens_dir=run_dir / "tokens" if run_dir else None, resume=not args.force)
    print(harness.summary_table(summary))
    print(f"\nresults: {out}/<checkpoint>/<task>.json, {out}/summary.json")
    return 0


def _register_chat_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat-eval", help="evaluate a chat (SFT) model: held-out answers vs its base model few-shot, safety")
    p.add_argument("model", help="the chat model: a run directory, sft/<name>/, its latest file or a step directory")
    p.add_argument("--data", help="held-out conversations JSONL (default: data/heldout.jsonl beside the model's steps)")
    p.add_argument("--safety", help="safety prompts JSONL (default: data/safety_eval.jsonl beside the model, if present)")
    p.add_argument("--base", help="base model for the few-shot baseline (default: the 'base' in the model's state.json, "
                                  "else the run's checkpoints/)")
    p.add_argument("--fewshot-data", help="demonstrations for the baseline (default: the held-out file's other items)")
    p.add_argument("--shots", type=int, help="k of the k-shot baseline (default 5; 0- and 1-shot always run)")
    p.add_argument("--no-baseline", action="store_true", help="skip the base model's few-shot baseline")
    p.add_argument("--limit", type=int, help="held-out conversations scored (default 200; 0 = all)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per answer (default 64)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="output directory (default: <run>/chat_eval when the model is in a run, else ./chat_eval)")
    p.set_defaults(func=_cmd_chat_eval)


def _cmd_chat_eval(args: argparse.Namespace) -> int:
    from lmforge import config as cfgmod
    from lmforge.errors import ConfigError
    from lmforge.eval.chat_stage import ChatEvalConfig, run_chat_eval

    raw: dict = {}
    for k in ("shots", "limit", "max_new_tokens", "device"):
        if getattr(args, k) is not None:
            raw[k] = getattr(args, k)
    if args.no_baseline:
        raw["baseline"] = False
    bad = [o for o in args.overrides if not o.startswith("chat_eval.")]
    if bad:
        raise ConfigError(f"lmforge chat-eval takes --chat_eval.KEY overrides only, got --{bad[0]}")
    cfgmod.apply_overrides(raw, {k.removeprefix("chat_eval."): v for k, v in (o.split("=", 1) for o in args.overrides)})
    cfg = cfgmod.build(ChatEvalConfig, raw, "chat_eval")
    model = Path(args.model)
    run_dir = next((d for d in [model, *model.resolve().parents][:5] if (d / "sft").is_dir() or (d / "recipe.toml").is_file()), None)
    out = Path(args.out) if args.out else (run_dir / "chat_eval" if run_dir else Path("chat_eval"))
    opt = lambda p: Path(p) if p else None  # noqa: E731
    results, report = run_chat_eval(cfg, model=model, out=out, seed=cfg.seed or 0, base=opt(args.base),
                                    data=opt(args.data), safety=opt(args.safety), fewshot_data=opt(args.fewshot_data))
    print(report)
    print(f"results: {out / 'results.json'}")
    return 0
