"""Multiple-choice scoring throughput: lmforge vs lm-evaluation-harness, same task, same model,
same process.

The task is lmforge's dictionary task (GCIDE word -> definition, 4 choices) from the bundled
sample, written once as JSONL and given to both tools: to lmforge as a task .toml spec, to
lm-eval as a local YAML task (`output_type: multiple_choice`, `dataset_path: json`). The model is
an lmforge checkpoint exported with `lmforge export hf`; lm-eval runs it through `--model hf`
(HFLM, built before the timer starts, like lmforge's model load). Both tools compute acc and
acc_norm; the table prints examples/s and the ratio.

    python benchmarks/bench_eval_vs_lmeval.py [--checkpoint DIR --tokenizer DIR] [--n 200] [--batch-size 32]

Without --checkpoint a randomly initialised model of the given preset is used (throughput does
not depend on the weights). Offline: HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1 are set here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("LMFORGE_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parents[1]


def make_tokenizer(out: Path) -> Path:
    """A 4096-token byte-level BPE trained on the bundled sample's dictionary (when none is given)."""
    import gzip

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [json.loads(l)["text"] for l in gzip.open(ROOT / "src/lmforge/sample/dictionary/gcide-sample.jsonl.gz", "rt")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="lmforge model directory (default: random init of --preset)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: train a 4096-token BPE on the bundled sample)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--n", type=int, default=200, help="examples")
    ap.add_argument("--batch-size", type=int, default=32, help="lm-eval batch size")
    ap.add_argument("--batch-tokens", type=int, default=8192, help="lmforge tokens per forward")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for both (0 = torch default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "eval_vs_lmeval"))
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lmforge.eval import builtin, harness
    from lmforge.model.hf import export_hf
    from lmforge.eval.tasks import load_task, write_jsonl
    from lmforge.model import Transformer, preset
    from lmforge.model.io import load_model, save_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(args.tokenizer) if args.tokenizer else make_tokenizer(out / "tokenizer")
    tok = harness.load_tok(tok_dir)
    if args.checkpoint:
        ck = Path(args.checkpoint)
    else:
        torch.manual_seed(0)
        ck = save_model(Transformer(preset(args.preset, vocab_size=max(4096, tok.vocab_size))), out / "model")
    hf_dir = export_hf(ck, out / "hf", tok_dir)

    # the task, once, in lmforge's JSONL format; both tools read this file
    task = builtin.dictionary_task(n=args.n, seed=0)
    data = write_jsonl(out / "dictionary.jsonl", task.examples)
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
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )

    # ---- lmforge
    model = load_model(ck).eval()
    spec_task = load_task(out / "dictionary.toml")
    t0 = time.perf_counter()
    r = harness.evaluate(model, tok, [spec_task], batch_tokens=args.batch_tokens, bootstrap=0)["dictionary"]
    t_lmf = time.perf_counter() - t0

    # ---- lm-evaluation-harness
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(hf_dir), dtype="float32", batch_size=args.batch_size, device="cpu")
    tm = TaskManager(include_path=str(out / "lmeval_tasks"))
    t0 = time.perf_counter()
    le = lm_eval.simple_evaluate(model=lm, tasks=["lmforge_dictionary"], task_manager=tm, batch_size=args.batch_size,
                                 log_samples=False, bootstrap_iters=0)
    t_le = time.perf_counter() - t0
    le_res = le["results"]["lmforge_dictionary"]

    n = len(spec_task.examples)
    rows = [
        ("lm-eval (hf)", t_le, le_res.get("acc,none"), le_res.get("acc_norm,none")),
        ("lmforge", t_lmf, r["metrics"]["acc"], r["metrics"]["acc_norm"]),
    ]
    print(f"\nmultiple-choice scoring: {n} examples x 4 choices, model {ck} "
          f"({model.cfg.num_params() / 1e6:.2f}M params), torch threads {torch.get_num_threads()}")
    print(f"{'tool':<14} {'seconds':>8} {'examples/s':>11} {'acc':>7} {'acc_norm':>9}")
    for name, t, acc, accn in rows:
        print(f"{name:<14} {t:>8.2f} {n / t:>11.1f} {acc:>7.3f} {accn:>9.3f}")
    print(f"ratio (lmforge examples/s over lm-eval): {t_le / t_lmf:.2f}x")
    json.dump({"n": n, "lmforge_s": t_lmf, "lmeval_s": t_le, "ratio": t_le / t_lmf,
               "lmforge": r["metrics"], "lmeval": {k: v for k, v in le_res.items() if isinstance(v, float)}},
              open(out / "result.json", "w"), indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
