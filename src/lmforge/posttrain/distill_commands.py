"""CLI: `lmforge distill`.

    lmforge distill TEACHER --student-preset NAME [--student-set KEY=VALUE ...] --out DIR [options]
    lmforge distill TEACHER --student MODEL --out DIR [options]      (e.g. recovery of a pruned model)

Options: --tokens DIR (a tokens/ directory) or --data FILE ... (text: .txt, .jsonl[.gz|.zst]);
default: the teacher run's train tokens, else the bundled sample dictionary. --temperature T,
--alpha A (weight of the soft KL term; 1 - A on the hard labels), --steps N, --batch-size B,
--seq-len L, --lr, --optimizer, --seed, --no-keep-sparsity, and any `--distill.KEY VALUE`
(trainer keys as in [pretrain]: schedule, warmup_steps, checkpoint_every, eval_every, device, ...).
--student-init teacher starts a fresh student of the teacher's width from the teacher's embedding,
head and evenly spaced layers (e.g. --student-set n_layers=2 of a 4-layer teacher: layers 0 and 3).
A fresh student (--student-preset) trains with the pretraining defaults (muon, lr 3e-3, wsd)
unless told otherwise; an existing one with fine-tuning defaults (adamw, lr 3e-4, cosine).
Rerunning the same command resumes from DIR's newest checkpoint.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("distill", help="knowledge distillation: a student trained on a teacher's soft targets "
                                       "(also recovery fine-tuning of a pruned / low-rank model)")
    d.add_argument("teacher", help="teacher model: run directory, checkpoint, step directory, HF folder, quantized checkpoint")
    d.add_argument("--student", help="existing student model (e.g. the output of lmforge prune / lowrank)")
    d.add_argument("--student-preset", help="fresh student from a model preset (tiny, small, ...), with the teacher's vocabulary")
    d.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE",
                   help="model field override of the preset student (repeatable), e.g. n_layers=2")
    d.add_argument("--student-init", help="fresh student: random (default) or teacher (the teacher's embedding, head and "
                                          "evenly spaced layers; same width)")
    d.add_argument("--out", required=True, help="output directory (step_N/ checkpoints + latest, metrics.jsonl)")
    d.add_argument("--tokens", help="tokens/ directory (index.json + train shards) to train on")
    d.add_argument("--data", action="append", default=[], help="text file to train on (.txt, .jsonl, .jsonl.gz, .jsonl.zst; repeatable)")
    d.add_argument("--temperature", type=float, help="softmax temperature of the soft targets (2.0)")
    d.add_argument("--alpha", type=float, help="weight of the soft KL term, 1 - alpha on the hard labels (0.5)")
    d.add_argument("--steps", type=int, help="optimizer steps (200)")
    d.add_argument("--batch-size", type=int, help="rows per step (8)")
    d.add_argument("--seq-len", type=int, help="tokens per row (default: the models' context, at most 256)")
    d.add_argument("--lr", type=float, help="learning rate")
    d.add_argument("--optimizer", help="muon or adamw")
    d.add_argument("--no-keep-sparsity", action="store_true", help="let a magnitude-pruned student's zeros train")
    d.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the teacher's)")
    d.add_argument("--seed", type=int, default=1234)
    d.set_defaults(func=_cmd_distill)


def _parse_sets(items: list[str]) -> dict:
    from lmforge.config import parse_value
    from lmforge.errors import ConfigError

    out = {}
    for kv in items:
        if "=" not in kv:
            raise ConfigError(f"--student-set {kv!r} must look like KEY=VALUE")
        k, v = kv.split("=", 1)
        out[k.strip()] = parse_value(v)
    return out


def _cmd_distill(args: argparse.Namespace) -> int:
    from lmforge import config as cfgmod
    from lmforge.errors import ConfigError
    from lmforge.posttrain.distill import DistillConfig, run_distill

    if bool(args.student) == bool(args.student_preset):
        raise ConfigError("lmforge distill: give --student MODEL or --student-preset NAME (one of them)")
    if (args.student_set or args.student_init) and not args.student_preset:
        raise ConfigError("--student-set and --student-init apply to --student-preset only")
    overrides = getattr(args, "overrides", []) or []
    bad = [o for o in overrides if not o.startswith("distill.")]
    if bad:
        raise ConfigError(f"lmforge distill: only --distill.KEY overrides apply here, got --{bad[0].split('=')[0]}")
    section: dict = {}
    if args.student_preset:  # a fresh model: the pretraining defaults
        section.update(optimizer="muon", lr=3e-3, schedule="wsd")
    cfgmod.apply_overrides(section, [o[len("distill."):] for o in overrides])
    for key, val in (("temperature", args.temperature), ("alpha", args.alpha), ("max_steps", args.steps),
                     ("batch_size", args.batch_size), ("seq_len", args.seq_len), ("lr", args.lr),
                     ("optimizer", args.optimizer), ("student_init", args.student_init)):
        if val is not None:
            section[key] = val
    if args.no_keep_sparsity:
        section["keep_sparsity"] = False
    cfg = cfgmod.build(DistillConfig, section, "distill")
    res = run_distill(cfg, args.teacher, Path(args.out), student=args.student, student_preset=args.student_preset,
                      student_overrides=_parse_sets(args.student_set), tokens=args.tokens, data=args.data,
                      seed=args.seed, tokenizer=args.tokenizer)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"distill: teacher {res.teacher} ({res.teacher_params:,} params) -> student {res.student} "
          f"({res.student_params:,} params); data: {res.data}")
    print(f"  {res.steps} steps, final loss {fmt(res.final_loss)}"
          + (f" (resumed from step {res.resumed_from})" if res.resumed_from else ""))
    print(f"  held-out bits/byte: teacher {fmt(res.teacher_bpb)}, student before {fmt(res.student_bpb_before)}, "
          f"after {fmt(res.student_bpb)}")
    print(f"  checkpoint {res.checkpoint}")
    return 0
