"""Multiple-choice scoring: lmforge vs lm-evaluation-harness, same model, same task, same tokens.

    python benchmarks/bench_eval_vs_lmeval.py [--checkpoint runs/demo/checkpoints/demo --tokenizer runs/demo/tokenizer]
                                              [--n 1000] [--shots 0,3] [--threads 1] [--rounds 2] [--batch-size 64] [--quick]

Task: lmforge's dictionary task (GCIDE word -> its definition among 4, distractors = other entries'
definitions) built from /work/shared/corpus/dictionary/gcide.jsonl.gz, written once as JSONL and given
to lmforge as a task .toml and to lm-eval as a local YAML task (`output_type: multiple_choice`,
`dataset_path: json`, `target_delimiter: " "`). Model: the demo run's trained checkpoint (default
runs/demo/checkpoints/demo, latest step; a random init of the `tiny` preset with a warning when absent),
exported once with `lmforge.model.hf.export_hf`; lm-eval runs that export through `HFLM` (`--model hf`,
float32, batch size `--batch-size`) with `add_bos_token=True`: lmforge scores every context from
<|bos|>, and lm-eval's default for this tokenizer adds none, which changes every log-likelihood.
Both sides run in this process with the same torch thread count (`--threads`, default 1: the 1.3M-
parameter demo model's matrices are too small to split, and with 2 threads on a shared machine
OpenMP's waiting made both sides erratic, lm-eval most: 6x its 1-thread CPU time in one run).
`--shots 0,3` (default): each setting is a separate comparison; k > 0: the k-shot prompt (k solved
examples from a held-apart pool, lmforge's few-shot rendering) is baked into each example's query,
so both tools score the same long contexts. The headline is the first setting (0-shot: the context
is ~10 tokens against 4 continuations of ~25, so lmforge's shared-context tree saves few FLOPs there).

Timed, headline ("scoring"): given the task's examples in memory and the model loaded,
  * lmforge: `harness.eval_multiple_choice` = prompts formatted, contexts and continuations
    tokenized, every (context, 4 continuations) scored as one tree, acc/acc_norm per example;
  * lm-eval: `HFLM.loglikelihood(instances)` + `task.process_results` per document = what
    `simple_evaluate` runs per request type: each (context, continuation) pair tokenized, scored
    in length-sorted padded batches, acc/acc_norm/acc_bytes per document.
  Left out of the timer: model load/export, lm-eval's `build_all_requests` (its prompt formatting,
  done before the timer; lmforge's formatting is inside its timer), aggregation and bootstrap.
Timed, secondary ("end to end", one round): task set-up + scoring on both sides:
  `harness.evaluate([load_task(toml)])` vs `lm_eval.simple_evaluate(model=HFLM, tasks=[yaml task])`
  (YAML parse, JSON dataset load, request building, scoring, metrics; bootstrap off on both).
Rounds alternate which side goes first; medians and min-max are printed, wall and CPU seconds.

Checked (not timed): per-example token ids of every (context, continuation) pair (lm-eval's
`_encode_pair` vs lmforge's encode), log-likelihoods (max |diff|) and predictions: acc vs acc;
lmforge acc_norm (log-likelihood / UTF-8 bytes of the choice) vs lm-eval's `acc_bytes` (the same
definition; lm-eval's `acc_norm` divides by characters, compared too). Every differing prediction is
listed with its cause. Offline: HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("LMFORGE_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

from _bench import result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"


def timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, time.process_time() - c0, out


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "runs" / "demo" / "checkpoints" / "demo"),
                    help="lmforge checkpoint (model dir or a run's checkpoints/<name>; default: the demo run's)")
    ap.add_argument("--tokenizer", default=str(ROOT / "runs" / "demo" / "tokenizer"))
    ap.add_argument("--dictionary", default=str(CORPUS / "dictionary" / "gcide.jsonl.gz"))
    ap.add_argument("--n", type=int, default=1000, help="examples (default 1000)")
    ap.add_argument("--shots", default="0,3", help="comma-separated k-shot settings; the first is the headline (default 0,3)")
    ap.add_argument("--batch-size", type=int, default=64, help="lm-eval batch size (default 64)")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="lmforge tokens per forward")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides (default 1: see the docstring)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the scoring comparison")
    ap.add_argument("--no-end-to-end", action="store_true", help="skip the set-up + scoring comparison")
    ap.add_argument("--quick", action="store_true", help="--n 300 --rounds 1 --no-end-to-end")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "eval_vs_lmeval"))
    args = ap.parse_args()
    if args.quick:
        args.n, args.rounds, args.no_end_to_end = min(args.n, 300), 1, True
    try:
        shot_list = [int(k) for k in args.shots.split(",")]
    except ValueError:
        shot_list = [-1]
    if not shot_list or min(shot_list) < 0:
        print(f"--shots: comma-separated integers >= 0, got {args.shots!r}", file=sys.stderr)
        return 2
    if args.n < 1 or args.rounds < 1 or args.threads < 1:
        print("--n, --rounds and --threads must be >= 1", file=sys.stderr)
        return 2

    import torch

    torch.set_num_threads(args.threads)
    from lmforge.eval import builtin, harness
    from lmforge.eval.tasks import MCExample, load_task, make_task, mc_pairs, write_jsonl
    from lmforge.model import Transformer, preset
    from lmforge.model.hf import export_hf
    from lmforge.model.io import load_model, save_model

    base_out = out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(args.tokenizer)
    if not (tok_dir / "tokenizer.json").is_file():
        print(f"no tokenizer at {tok_dir} (run `lmforge run` for the demo, or pass --tokenizer)", file=sys.stderr)
        return 2
    tok = harness.load_tok(tok_dir)
    ck_note = ""
    try:
        ck = harness.find_checkpoints(args.checkpoint)[0][1]
    except Exception as e:  # noqa: BLE001 - fall back to a random model, said plainly
        torch.manual_seed(0)
        ck = save_model(Transformer(preset("tiny", vocab_size=max(4096, tok.vocab_size))), out / "model")
        ck_note = f" (RANDOM INIT: {args.checkpoint} unusable: {e})"
        print(f"warning: {ck_note.strip()}", file=sys.stderr)
    hf_dir = export_hf(ck, out / "hf", tok_dir)

    model = load_model(ck).eval()

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    lm = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=args.batch_size, device="cpu", add_bos_token=True)

    runs = []
    for si, shots in enumerate(shot_list):
        out = base_out / f"{shots}shot"
        out.mkdir(parents=True, exist_ok=True)
        # ---- the task, once, in lmforge's JSONL format; both tools read this file
        task0 = builtin.dictionary_task(Path(args.dictionary), n=args.n + 4 * shots, seed=0)
        if shots:  # the k-shot prompt rendered once by lmforge and baked into each query: both tools see it verbatim
            spec = dataclasses.replace(task0.spec, num_fewshot=shots)
            shot_task = make_task(spec, task0.examples)
            task0.examples = [MCExample(mc_pairs(shot_task, i)[0][0], ex.choices, ex.gold, id=ex.id)
                              for i, ex in enumerate(shot_task.examples)][: args.n]
        data = write_jsonl(out / "dictionary.jsonl", task0.examples)
        (out / "dictionary.toml").write_text('name = "dictionary"\ndata = "dictionary.jsonl"\nmetrics = ["acc", "acc_norm"]\n')
        (out / "lmeval_tasks").mkdir(exist_ok=True)
        (out / "lmeval_tasks" / "lmforge_dictionary.yaml").write_text(
            "task: lmforge_dictionary\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            'doc_to_text: "{{query}}"\n'
            'doc_to_choice: "{{choices}}"\n'
            'doc_to_target: "{{gold[0]}}"\n'
            'target_delimiter: " "\n'
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n  - metric: acc_bytes\n"
        )
        task = load_task(out / "dictionary.toml")
        n = len(task.examples)
        tm = TaskManager(include_path=str(out / "lmeval_tasks"))
        le_task = get_task_dict(["lmforge_dictionary"], tm)["lmforge_dictionary"]
        le_task.build_all_requests(limit=None, rank=0, world_size=1)
        instances = sorted(le_task.instances, key=lambda x: (x.doc_id, x.idx))
        docs = {inst.doc_id: inst.doc for inst in instances}
        assert len(docs) == n, (len(docs), n)

        def ours():
            return harness.eval_multiple_choice(model, tok, task, batch_tokens=args.batch_tokens, bootstrap=0, per_example=True)

        def peer():
            resps = lm.loglikelihood(instances, disable_tqdm=True)
            per_doc: dict[int, list] = {}
            for inst, r in zip(instances, resps):
                per_doc.setdefault(inst.doc_id, []).append(r)
            return {d: (per_doc[d], le_task.process_results(docs[d], per_doc[d])) for d in sorted(per_doc)}

        load0 = os.getloadavg()
        w_o, c_o, w_p, c_p = [], [], [], []
        r_o = r_p = None
        for rnd in range(args.rounds):
            for side in (("o", "p") if rnd % 2 == 0 else ("p", "o")):
                if side == "o":
                    w, c, r_o = timed(ours)
                    w_o.append(w), c_o.append(c)
                else:
                    w, c, r_p = timed(peer)
                    w_p.append(w), c_p.append(c)
        ratio = statistics.median(w_p) / statistics.median(w_o)
        ratio_cpu = statistics.median(c_p) / statistics.median(c_o)

        # ---- per-example comparison (not timed)
        ex_o = r_o["per_example"]
        le_ll = [[x[0] for x in r_p[d][0]] for d in sorted(r_p)]
        le_res = [r_p[d][1] for d in sorted(r_p)]
        maxlen = model.cfg.max_seq_len
        tok_diff, too_long, max_d = [], 0, 0.0
        diffs = {"acc": [], "acc_norm/acc_bytes": [], "acc_norm (chars, both)": []}
        import numpy as np

        for i, ex in enumerate(task.examples):
            ctx = ex.query
            ids_o = [tok.bos_id] + tok.encode(ctx)
            conts_o = tok.encode_batch([" " + c for c in ex.choices])
            pairs = [lm._encode_pair(ctx, " " + c) for c in ex.choices]
            same_ids = all(p[0] == ids_o and p[1] == co for p, co in zip(pairs, conts_o))
            if not same_ids:
                tok_diff.append(i)
            long = len(ids_o) + max(len(c) for c in conts_o) > maxlen
            too_long += long
            llo, llp = np.array(ex_o[i]["loglik"]), np.array(le_ll[i])
            d = float(np.abs(llo - llp).max())
            max_d = max(max_d, d)
            nb = np.array([max(len(c.encode("utf-8")), 1) for c in ex.choices], float)
            nc = np.array([float(len(c)) for c in ex.choices])
            for name, po, pp in (("acc", llo.argmax(), llp.argmax()), ("acc_norm/acc_bytes", (llo / nb).argmax(), (llp / nb).argmax()),
                                 ("acc_norm (chars, both)", (llo / nc).argmax(), (llp / nc).argmax())):
                if po != pp:
                    norm = {"acc": 1.0, "acc_norm/acc_bytes": nb, "acc_norm (chars, both)": nc}[name]
                    s = np.sort(llo / norm)[::-1]
                    why = ("token ids differ" if not same_ids else "context + continuation truncated" if long
                           else f"near tie: lmforge's top two differ by {s[0] - s[1]:.2e}, the sides' log-likelihoods by up to {d:.2e}")
                    diffs[name].append((i, int(po), int(pp), why))
        acc_o = r_o["metrics"]["acc"]
        accn_o = r_o["metrics"]["acc_norm"]
        acc_p = float(np.mean([r["acc"] for r in le_res]))
        accb_p = float(np.mean([r["acc_bytes"] for r in le_res]))
        accn_p = float(np.mean([r["acc_norm"] for r in le_res]))

        print(f"\nmultiple-choice scoring, {n} dictionary examples ({shots}-shot) x 4 choices ({sum(len(e.choices) for e in task.examples)} "
              f"continuations), model {ck}{ck_note} ({model.cfg.num_params() / 1e6:.2f}M params), torch threads {args.threads}, "
              f"lm-eval {lm_eval.__version__} batch {args.batch_size}, rounds {args.rounds}; load before {load0[0]:.2f} {load0[1]:.2f}, "
              f"after {os.getloadavg()[0]:.2f}")
        print("\n| side | wall s median (min-max) | CPU s median (min-max) | examples/s | acc | acc_norm (bytes) |")
        print("|---|---|---|---|---|---|")
        print(f"| lm-eval HFLM.loglikelihood + process_results | {med(w_p)} | {med(c_p)} | {n / statistics.median(w_p):.1f} | "
              f"{acc_p:.3f} | {accb_p:.3f} (acc_bytes; its char-normalised acc_norm {accn_p:.3f}) |")
        print(f"| lmforge eval_multiple_choice | {med(w_o)} | {med(c_o)} | {n / statistics.median(w_o):.1f} | {acc_o:.3f} | {accn_o:.3f} |")
        print(f"\nscoring ratio (lm-eval seconds / lmforge seconds): wall {ratio:.2f}x, CPU {ratio_cpu:.2f}x")
        print(f"token ids identical on {n - len(tok_diff)}/{n} examples (all 4 pairs each); {too_long} examples longer than the "
              f"model's {maxlen}-token context; max |log-likelihood diff| {max_d:.2e}")
        for name, rows in diffs.items():
            print(f"predictions differing, {name}: {len(rows)}" + "".join(f"\n  example {i} ({task.examples[i].id!r}): lmforge {a}, "
                                                                           f"lm-eval {b}: {why}" for i, a, b, why in rows))

        e2e = {}
        if not args.no_end_to_end and si == 0:
            def ours_e2e():
                return harness.evaluate(model, tok, [load_task(out / "dictionary.toml")], batch_tokens=args.batch_tokens,
                                        bootstrap=0)["dictionary"]

            def peer_e2e():
                tm2 = TaskManager(include_path=str(out / "lmeval_tasks"))
                return lm_eval.simple_evaluate(model=lm, tasks=["lmforge_dictionary"], task_manager=tm2,
                                               batch_size=args.batch_size, log_samples=False, bootstrap_iters=0)
            we_o, ce_o, eo = timed(ours_e2e)
            we_p, ce_p, ep = timed(peer_e2e)
            e2e = {"ratio": round(we_p / we_o, 2), "lmforge_s": round(we_o, 2), "lmeval_s": round(we_p, 2)}
            res = ep["results"]["lmforge_dictionary"]
            print(f"\nend to end (task set-up + scoring, one round each): lm-eval simple_evaluate {we_p:.2f} s (CPU {ce_p:.2f}), "
                  f"acc {res['acc,none']:.3f}; lmforge harness.evaluate {we_o:.2f} s (CPU {ce_o:.2f}), acc {eo['metrics']['acc']:.3f}; "
                  f"ratio {we_p / we_o:.2f}x (CPU {ce_p / ce_o:.2f}x)")

        equal_acc = acc_o == acc_p and accn_o == accb_p
        runs.append({"shots": shots, "n": n, "ratio_wall": round(ratio, 3), "ratio_cpu": round(ratio_cpu, 3),
                     "acc": [acc_o, acc_p], "acc_norm_bytes": [accn_o, accb_p], "tokens_identical": n - len(tok_diff),
                     "max_ll_diff": max_d, "differing": {k: len(v) for k, v in diffs.items()}, "end_to_end": e2e,
                     "equal_accuracy": equal_acc})
    (base_out / "result.json").write_text(json.dumps(runs, indent=2))
    h = runs[0]
    others = {f"ratio_{r['shots']}shot": r["ratio_wall"] for r in runs[1:]}
    more = ", ".join(f"{r['shots']}-shot {r['ratio_wall']:.2f}x" for r in runs[1:]) or "no other shots"
    what = (f"multiple-choice scoring, {h['n']} GCIDE examples x 4, {h['shots']}-shot (headline; {more}), demo checkpoint, "
            f"{args.threads} thread(s): lmforge eval_multiple_choice vs lm-eval HFLM.loglikelihood + process_results")
    result("eval_vs_lmeval", h["ratio_wall"], 2.0, what, equal_accuracy=all(r["equal_accuracy"] for r in runs),
           ratio_cpu=h["ratio_cpu"], acc=h["acc"], acc_norm_bytes=h["acc_norm_bytes"],
           differing_predictions=sum(r["differing"]["acc"] for r in runs), end_to_end=h["end_to_end"].get("ratio"), **others)
    return 0


if __name__ == "__main__":
    sys.exit(main())
