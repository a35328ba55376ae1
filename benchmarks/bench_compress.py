"""Compression table: held-out bits per byte vs parameters / file size vs decode tokens/s for the
dense model and its compressed forms, plus a same-run check of magnitude pruning against torch's own
`torch.nn.utils.prune.l1_unstructured`.

    .venv/bin/python benchmarks/bench_compress.py [--model runs/demo/checkpoints] [--steps 40]
        [--student-steps 40] [--out /tmp/bench_compress]     (default run: ~3 min on an idle 2-core CPU)

Rows (each a checkpoint written by the library's own entry points, then loaded back from disk the
way `lmforge generate` loads it, and measured the same way):
- dense: the model given (default: the demo run's pretrained model);
- magnitude 50%: `lmforge prune --method magnitude --sparsity 0.5` (zeros kept in dense weights);
- heads: `--method heads --keep-heads` half the heads (importance measured on the run's train tokens);
- MLP: `--method mlp --keep-ratio 0.5`;
- each of those three "+ recovery": `lmforge distill DENSE --student PRUNED` for --steps steps
  (batch 4 x 128 tokens, AdamW lr 3e-4 cosine, T = 2, alpha = 0.5, the run's train tokens);
- low rank at energy 0.8, 0.9 and 0.95: `lmforge lowrank --energy E` (a layer is factorised only
  where the rank saves parameters, so at high energy few or none are);
- distilled students: fresh models of the teacher's width with half its layers, distilled for
  --student-steps steps (muon, the pretraining defaults), one randomly initialised and one
  starting from the teacher's embedding and evenly spaced layers (`--student-init teacher`); and the
  randomly initialised one trained on the hard labels alone (alpha = 0, no teacher) for the same
  steps, as the no-distillation baseline.
Columns: parameters (unique), nonzero parameters, model.safetensors size, held-out bits per byte on
the run's val tokens (8 windows of 256 tokens, `quantize_cmd.heldout_sequences`), batch-1 greedy
decode tokens/s on one thread (32 new tokens, prompt prefill included; the engine,
`quantize_cmd.decode_speed`): best of the 3 measurements taken when the row is made and
--decode-rounds more taken round-robin over all rows at the end. Training time of the recovery / student is printed but not a column.

Peer (magnitude pruning): torch.nn.utils.prune.l1_unstructured(module, "weight", amount) +
prune.remove on every block linear layer of a copy of the same model vs `compress.magnitude_prune`;
the timer covers only the pruning calls on both sides (model load and copy left out), best of 3
alternating runs; the zero patterns and kept values are checked equal. There is no single peer tool for structured pruning,
low rank or distillation.

Figures depend on the machine's load (printed); on this tiny model decode speed is dominated by
per-token overhead, not by weight bytes, so smaller weights barely change it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.utils.prune as torch_prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import load, result  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/demo/checkpoints")
    ap.add_argument("--out", default="/tmp/bench_compress")
    ap.add_argument("--steps", type=int, default=20, help="recovery distillation steps")
    ap.add_argument("--student-steps", type=int, default=40, help="distillation steps of the half-depth student")
    ap.add_argument("--decode-rounds", type=int, default=5, help="round-robin decode measurements over all rows at the end")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for pruning / distillation (decode uses 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lmforge.infer import compress as C
    from lmforge.infer import load_model, load_model_and_tokenizer
    from lmforge.infer.compress_commands import _heldout, lowrank_checkpoint, measure, prune_checkpoint
    from lmforge.infer.quantize_cmd import decode_speed
    from lmforge.model.io import resolve_model
    from lmforge.posttrain.distill import DistillConfig, run_distill

    if not Path(args.model).exists():
        print(f"no model at {args.model}: build the demo run first (.venv/bin/lmforge run src/lmforge/sample/demo.toml) "
              "or pass --model", file=sys.stderr)
        return 2
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)  # every row made in this run
    out.mkdir(parents=True)
    dense_path = resolve_model(args.model).path
    dense, tok, ref = load_model_and_tokenizer(dense_path)
    source, seqs, nbytes, prompt = _heldout(ref, tok, dense)
    print(f"model {dense_path} ({dense.cfg.n_layers} layers, d_model {dense.cfg.d_model}, {dense.cfg.n_heads} heads / "
          f"{dense.cfg.n_kv_heads} kv, ffn {dense.cfg.ffn_hidden}); held out: {source}; load {load()}", flush=True)

    # ---- peer check: magnitude pruning vs torch.nn.utils.prune ------------------------------------
    t_ours = t_torch = float("inf")
    same = True
    for _ in range(3):  # alternating, best of 3 each; copies made outside the timers
        ours, theirs = copy.deepcopy(dense), copy.deepcopy(dense)
        t0 = time.perf_counter()
        C.magnitude_prune(ours, 0.5)
        t_ours = min(t_ours, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for name, lin in C.block_linears(theirs):
            torch_prune.l1_unstructured(lin, "weight", amount=0.5)
            torch_prune.remove(lin, "weight")
        t_torch = min(t_torch, time.perf_counter() - t0)
        same = same and all(torch.equal(a.weight, theirs.get_submodule(n).weight) for n, a in C.block_linears(ours))
    print(f"magnitude 50% (best of 3): lmforge {t_ours * 1e3:.1f} ms, torch.nn.utils.prune {t_torch * 1e3:.1f} ms "
          f"({t_torch / t_ours:.2f}x); identical weights: {same}", flush=True)
    del ours, theirs

    rows: list[tuple[str, dict, str]] = []
    models: dict[str, torch.nn.Module] = {}

    def row(label: str, path: Path, note: str = "") -> None:
        model, _ = load_model(path)
        model.float().eval()
        with torch.no_grad():
            m = measure(model, seqs, nbytes, prompt)
        rows.append((label, m, note))
        models[label] = model
        print(f"  {label}: bpb {m['bpb']:.4f}, params {m['params']:,} ({m['nonzero_params']:,} nonzero), "
              f"{m['file_bytes'] / 1e6:.2f} MB, {m['decode_tok_s']:.1f} tok/s; load {load()}", flush=True)

    def recover(label: str, student: Path) -> None:
        cfg = DistillConfig(max_steps=args.steps, batch_size=4, seq_len=128, optimizer="adamw", lr=3e-4, schedule="cosine",
                            warmup_steps=5, checkpoint_every=0, eval_every=0, log_every=10, resume=False)
        cfg.validate()
        t0 = time.time()
        res = run_distill(cfg, dense_path, out / f"{student.name}_rec", student=student)
        row(f"{label} + recovery ({args.steps} steps)", res.checkpoint, f"distill {time.time() - t0:.0f} s")

    row("dense", dense_path)
    half_heads = dense.cfg.n_heads // 2
    g = dense.cfg.n_heads // dense.cfg.n_kv_heads
    if half_heads % dense.cfg.n_kv_heads and half_heads % g:
        half_heads = dense.cfg.n_kv_heads
    for label, method, kw in (("magnitude 50%", "magnitude", {"sparsity": 0.5}),
                              (f"heads {dense.cfg.n_heads}->{half_heads}", "heads", {"keep_heads": half_heads}),
                              ("MLP channels 50%", "mlp", {"keep_ratio": 0.5})):
        p = out / method
        prune_checkpoint(dense_path, p, method, **kw)
        row(label, p)
        if args.steps:
            recover(label, p)
    for e in (0.8, 0.9, 0.95):
        p = out / f"lowrank{int(e * 100)}"
        r = lowrank_checkpoint(dense_path, p, e)
        print(f"  low rank {e}: {r['swapped']} of {r['layers']} layers factorised", flush=True)
        row(f"low rank, energy {e}", p)
    if args.student_steps:
        n_half = max(1, dense.cfg.n_layers // 2)
        shape = {k: v for k, v in dense.cfg.to_dict().items() if k in ("d_model", "n_heads", "n_kv_heads", "ffn_hidden")}
        for init, alpha in (("random", 0.0), ("random", 0.5), ("teacher", 0.5)):
            cfg = DistillConfig(max_steps=args.student_steps, batch_size=4, seq_len=128, optimizer="muon", lr=3e-3,
                                schedule="wsd", warmup_steps=5, checkpoint_every=0, eval_every=0, log_every=10, resume=False,
                                student_init=init, alpha=alpha)
            cfg.validate()
            t0 = time.time()
            res = run_distill(cfg, dense_path, out / f"student_{init}_{alpha}", student_preset="tiny",
                              student_overrides={**shape, "n_layers": n_half})
            how = "random init" if init == "random" else "init from teacher layers"
            how += ", hard labels only (no teacher)" if alpha == 0 else ""
            row(f"distilled student, {n_half} layers, {how} ({args.student_steps} steps)", res.checkpoint,
                f"distill {time.time() - t0:.0f} s")

    # decode speed again, round-robin over all models (best of --decode-rounds per model), so a burst of
    # load on the shared machine hits every row alike instead of one
    best = {label: 0.0 for label in models}
    for _ in range(args.decode_rounds):
        for label, model in models.items():
            best[label] = max(best[label], decode_speed(model, prompt, repeats=1))
    for label, m, _ in rows:
        m["decode_tok_s"] = max(m["decode_tok_s"], best[label])
    d = rows[0][1]
    lines = ["| model | params | nonzero | file MB | held-out bpb | Δ bpb | decode tok/s (1 thread) | note |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for label, m, note in rows:
        lines.append(f"| {label} | {m['params']:,} | {m['nonzero_params']:,} | {m['file_bytes'] / 1e6:.2f} | {m['bpb']:.4f} | "
                     f"{m['bpb'] - d['bpb']:+.4f} | {m['decode_tok_s']:.1f} | {note} |")
    print("\n" + "\n".join(lines) + "\n")
    print(f"load average {load()} on {os.cpu_count()} cores (figures under load)")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "rows.json").write_text(json.dumps([{"model": lab, **m, "note": n} for lab, m, n in rows], indent=1))
    result("compress", t_torch / t_ours, 1.0, "magnitude pruning time, torch.nn.utils.prune / lmforge (same zeros)",
           identical=same, rows={lab: {"bpb": round(m["bpb"], 4), "params": m["params"], "nonzero": m["nonzero_params"],
                                       "file_mb": round(m["file_bytes"] / 1e6, 3), "tok_s": round(m["decode_tok_s"], 1)}
                                 for lab, m, _ in rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
