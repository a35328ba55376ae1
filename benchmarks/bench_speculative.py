"""Speculative decoding and Medusa: speed-up at identical greedy output, batch 1, CPU, threads pinned.

Rows (same prompts, same number of new tokens, greedy, stop tokens off so every row decodes
exactly --max-new-tokens tokens):

- lmforge plain:   `lmforge.infer.engine.generate` on the target, one prompt at a time;
- lmforge draft:   `lmforge.infer.speculative.speculative_generate(target, draft, k=--k)`;
- lmforge medusa:  `lmforge.infer.medusa.medusa_generate(target, heads)` (top-1 chain, all heads);
- HF plain:        transformers `model.generate(ids, do_sample=False)` on our HF export of the target;
- HF assisted:     transformers assisted generation `model.generate(ids, assistant_model=draft)` on
                   the exports of the target and the draft, `num_assistant_tokens = k` with the
                   "constant" schedule (so both sides guess k tokens per step).

Every row's token ids are checked equal to lmforge plain (and HF plain to HF assisted); a
mismatch is printed, never hidden. The timer covers the generation call only (prefill, decoding,
verification, sampling), on both sides; tokenization, model loading and the HF export are left out.
Acceptance rate and tokens per target step are lmforge's own counts (SpecStats); HF's assisted
generation does not report them.

What the pair is: by default the target is the demo run's pretrained model
(runs/demo/checkpoints/demo: 4 layers x 128, vocab 4096, 1.3M parameters); the draft is a
1-layer student of the same width distilled from it (`lmforge distill --student-init teacher`),
and 4 Medusa heads are self-distilled on 1024 of its own greedy continuations (`lmforge medusa
--heads 4 --self-distill 1024 --steps 1000`); `--prepare` makes both into --work (about 25 minutes
on 2 shared cores).
Both models are tiny: at this size a decode step costs mostly fixed per-layer overhead and the
output head (4096 x 128, the same in the 1-layer student), not weight reads, so the draft costs
about half a target step and the draft-model speed-up is bounded by that; Medusa needs no second
model. Pass --target / --draft / --medusa to measure another pair (a larger target with a
distilled student is where a draft pays off).
On CPU, plain decoding of one sequence, the target's verification chunks and a draft's steps all
run in lmforge's compiled whole-model kernel (lmforge.infer.native_decode: ~0.4 ms a step for the
demo model), so at this size the speculative loop's own Python work per round (sampling, the
acceptance test, the Medusa heads in torch) costs as much as the steps it saves, and speculation
does not pay; the 124M-shape `--random-target --self-draft int8` run is where it does. A
verification chunk of k+1 tokens costs more than one step here (this CPU's FMA throughput: ~1.7x
a one-token step for 5 fp32 tokens at the 124M shape), which bounds the gain.

    python benchmarks/bench_speculative.py --prepare          # trains the draft + heads once (minutes), then measures
    python benchmarks/bench_speculative.py --no-hf            # lmforge rows only
    python benchmarks/bench_speculative.py --random-target --no-hf --self-draft int8,int4   # the target's own
                                     # int8 / int4 copy as the draft, on a 124M-shape random-weight target
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _bench import load, result  # noqa: E402

SHARED = REPO.parent / "shared" / "corpus"


def prompts_from_corpus(n: int, words: int) -> list[str]:
    """The first words of documents from the shared corpus (dictionary, code, fortunes), else the bundled sample."""
    files = [SHARED / "dictionary" / "gcide.jsonl.gz", SHARED / "code" / "python-stdlib.jsonl.gz",
             SHARED / "multilingual" / "fortunes.jsonl.gz"]
    if not all(f.is_file() for f in files):
        files = [REPO / "src" / "lmforge" / "sample" / "dictionary" / "gcide-sample.jsonl.gz"]
    per = -(-n // len(files))
    out = []
    for f in files:
        got = 0
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for i, line in enumerate(fh):
                if i % 97 != 5:  # spread over the file
                    continue
                text = " ".join(json.loads(line)["text"].split()[:words])
                if text:
                    out.append(text)
                    got += 1
                if got >= per:
                    break
    return out[:n]


def prepare(args) -> None:
    work = Path(args.work)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    lm = [sys.executable, "-m", "lmforge"]
    if args.draft is None and not (work / "draft" / "latest").is_file():
        # a distilled student: one layer of the target's width, started from the target's embedding,
        # head and last layer, trained on the target's soft targets (lmforge distill)
        subprocess.run(lm + ["distill", args.target, "--student-preset", "tiny", "--student-set", "n_layers=1",
                             "--student-init", "teacher", "--out", str(work / "draft"), "--tokens", str(args.tokens),
                             "--steps", "200", "--temperature", "1.0", "--alpha", "0.9"], check=True, env=env)
    if args.medusa is None and not (work / "medusa" / "medusa.json").is_file():
        # 4 Medusa heads self-distilled on 1024 of the target's own greedy continuations
        subprocess.run(lm + ["medusa", args.target, "--out", str(work / "medusa"), "--tokens", str(args.tokens), "--heads", "4",
                             "--steps", "1000", "--self-distill", "1024", "--medusa.seq_len", "128", "--medusa.lr", "0.003"],
                       check=True, env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default=str(REPO / "runs" / "demo" / "checkpoints" / "demo"))
    ap.add_argument("--draft", help="draft model (default: --work/draft, made by --prepare)")
    ap.add_argument("--medusa", help="Medusa heads directory (default: --work/medusa, made by --prepare)")
    ap.add_argument("--tokens", default=str(REPO / "runs" / "demo" / "tokens"), help="token shards for --prepare")
    ap.add_argument("--work", default="/tmp/lmforge-bench-speculative")
    ap.add_argument("--prepare", action="store_true", help="train the missing draft / heads first")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--words", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="draft tokens per target step")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds; the best of each row is kept")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    ap.add_argument("--self-draft", default="",
                    help="comma list of int8 / int4: also decode with the target's own quantized copy as the draft "
                         "(`quantize_model(copy, kind, include_head=True)`)")
    ap.add_argument("--random-target", action="store_true",
                    help="the target is a random-weight 124M-shape model (12 x 768, the demo tokenizer's vocabulary) "
                         "instead of --target's weights: a size where the weights, not per-call overhead, set the step time")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.prepare:
        prepare(args)
    draft_path = args.draft or str(Path(args.work) / "draft")
    medusa_path = args.medusa or str(Path(args.work) / "medusa")

    from lmforge.infer import load_model, load_model_and_tokenizer
    from lmforge.infer.engine import SamplingParams, generate
    from lmforge.infer.medusa import load_heads, medusa_generate
    from lmforge.infer.speculative import speculative_generate

    target, tok, tref = load_model_and_tokenizer(args.target)
    draft, dref = load_model(draft_path) if Path(draft_path).exists() else (None, None)
    if args.random_target:
        from lmforge.model import Transformer, preset

        if not args.no_hf or args.draft or args.medusa:
            raise SystemExit("--random-target runs the lmforge rows only: pass --no-hf, and no --draft / --medusa")
        torch.manual_seed(0)
        target = Transformer(preset("124m", vocab_size=target.cfg.vocab_size, max_seq_len=1024)).eval()
        draft = dref = None
        medusa_path = "/nonexistent"
    self_drafts = {}
    for kind in filter(None, args.self_draft.split(",")):
        import copy

        from lmforge.infer.quantize import quantize_model

        self_drafts[kind] = copy.deepcopy(target)
        quantize_model(self_drafts[kind], kind, include_head=True)
    heads = load_heads(medusa_path, target) if Path(medusa_path, "medusa.json").is_file() else None
    texts = prompts_from_corpus(args.prompts, args.words)
    prompts = [[tok.bos_id] + tok.encode(t) for t in texts]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0, stop_token_ids=[])
    nparams = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"target {'random 124M-shape' if args.random_target else tref.path} ({nparams(target) / 1e6:.2f}M parameters)")
    if draft is not None:
        print(f"draft  {dref.path} ({nparams(draft) / 1e6:.2f}M parameters)")
    if heads is not None:
        print(f"medusa {medusa_path} ({heads.cfg.heads} heads, {nparams(heads) / 1e6:.3f}M parameters)")
    print(f"{len(prompts)} prompts from the corpus, {args.max_new_tokens} new tokens each, greedy, batch 1, "
          f"{args.threads} thread(s); load average before: {load()}")

    rows: dict[str, dict] = {}

    def run_ours(name, fn):
        ids, stats, t = [], None, 0.0
        for p in prompts:
            t0 = time.perf_counter()
            out = fn(p)
            t += time.perf_counter() - t0
            if isinstance(out, tuple):
                out, st = out
                if stats is None:
                    stats = st
                else:
                    stats.add(st)
            ids.append(out[0].token_ids)
        r = rows.setdefault(name, {"seconds": float("inf")})
        r["seconds"] = min(r["seconds"], t)
        r["ids"] = ids
        if stats is not None:
            r["acceptance"], r["tokens_per_step"] = stats.acceptance_rate, stats.tokens_per_step

    hf = None
    if not args.no_hf:
        hf = hf_models(tref, dref, tok, Path(args.work), args.k)

    def run_hf(name, assistant, k=None):
        model, amodel = hf
        if assistant:
            set_assistant(amodel, k)
        ids, t = [], 0.0
        for p in prompts:
            x = torch.tensor([p])
            kw = {"assistant_model": amodel} if assistant else {}
            t0 = time.perf_counter()
            with torch.no_grad():
                y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=args.max_new_tokens,
                                   min_new_tokens=args.max_new_tokens, **kw)
            t += time.perf_counter() - t0
            ids.append(y[0, len(p):].tolist())
        r = rows.setdefault(name, {"seconds": float("inf")})
        r["seconds"] = min(r["seconds"], t)
        r["ids"] = ids

    # warm-up (first calls allocate caches and pick kernels): every path once on a short run, untimed
    short = SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[])
    generate(target, prompts[:1], short)
    if draft is not None:
        speculative_generate(target, draft, prompts[:1], short, k=args.k)
    for d in self_drafts.values():
        speculative_generate(target, d, prompts[:1], short, k=args.k)
    if heads is not None:
        medusa_generate(target, heads, prompts[:1], short)
    if hf is not None:
        x = torch.tensor(prompts[:1])
        with torch.no_grad():
            hf[0].generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=8)
            if hf[1] is not None:
                hf[0].generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=8, assistant_model=hf[1])

    for _ in range(args.rounds):  # interleaved: every row sees the same load drift
        # plain decode pinned to --threads (speculative decoding runs at the caller's count too)
        run_ours("lmforge plain", lambda p: generate(target, [p], params, decode_threads=args.threads))
        if draft is not None:
            run_ours(f"lmforge draft k={args.k}", lambda p: speculative_generate(target, draft, [p], params, k=args.k))
        for kind, d in self_drafts.items():
            run_ours(f"lmforge self-{kind} k={args.k}", lambda p, d=d: speculative_generate(target, d, [p], params, k=args.k))
        if heads is not None:
            run_ours(f"lmforge medusa {heads.cfg.heads} heads", lambda p: medusa_generate(target, heads, [p], params))
        if hf is not None:
            run_hf("HF plain", False)
            if hf[1] is not None:
                run_hf(f"HF assisted k={args.k}", True, args.k)
                run_hf("HF assisted (defaults)", True)

    ntok = len(prompts) * args.max_new_tokens
    ref = rows["lmforge plain"]
    print(f"\n{'row':28s} {'tok/s':>8s} {'vs plain':>9s} {'accept':>7s} {'tok/step':>8s}  output")
    for name, r in rows.items():
        base = rows["HF plain"] if name.startswith("HF") else ref
        same = r["ids"] == ref["ids"]
        r["tok_s"] = ntok / r["seconds"]
        r["speedup"] = base["seconds"] / r["seconds"]
        r["equal"] = same
        acc = f"{100 * r['acceptance']:.1f}%" if "acceptance" in r else "-"
        tps = f"{r['tokens_per_step']:.2f}" if "tokens_per_step" in r else "-"
        diff = "identical" if same else f"DIFFERS from lmforge plain in {sum(a != b for a, b in zip(r['ids'], ref['ids']))} prompts"
        print(f"{name:28s} {r['tok_s']:8.1f} {r['speedup']:8.2f}x {acc:>7s} {tps:>8s}  {diff}")
    print(f"load average after: {load()} (the machine is shared: figures are taken under that load)")

    extra = {name: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "ids"} for name, r in rows.items()}
    draft_row = next((n for n in rows if n.startswith("lmforge draft")), None)
    self_rows = [n for n in rows if n.startswith("lmforge self-")]
    med_row = next((n for n in rows if n.startswith("lmforge medusa")), None)
    hf_row = max((n for n in rows if n.startswith("HF assisted")), key=lambda n: rows[n]["tok_s"], default=None)
    if hf_row and draft_row:
        ratio = rows["HF plain"]["seconds"] / rows[draft_row]["seconds"]
        print(f"lmforge draft vs HF plain: {ratio:.2f}x; lmforge draft vs the faster HF assisted row: "
              f"{rows[hf_row]['seconds'] / rows[draft_row]['seconds']:.2f}x")
        extra["vs_hf_assisted"] = round(rows[hf_row]["seconds"] / rows[draft_row]["seconds"], 3)
    best = max((rows[n]["speedup"] for n in (draft_row, med_row, *self_rows) if n and rows[n]["equal"]), default=0.0)
    result("speculative", best, 1.5, "best speed-up over lmforge plain greedy at identical output (draft, self-draft or "
           "Medusa), batch 1 CPU", rows=extra, target="random 124M-shape" if args.random_target else str(tref.path),
           prompts=len(prompts), new_tokens=args.max_new_tokens, threads=args.threads)
    return 0


def hf_models(tref, dref, tok, work: Path, k: int):
    """transformers models loaded from our HF exports of the target and the draft (stop ids cleared)."""
    import torch
    import transformers

    from lmforge.model.hf import export_hf

    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=work))
    out = []
    for ref in (tref, dref):
        if ref is None:
            out.append(None)
            continue
        d = export_hf(ref.path, tmp / ref.path.name, tok.path)
        m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        m.generation_config.eos_token_id = None
        m.generation_config.pad_token_id = tok.pad_id if tok.pad_id is not None else 0
        out.append(m)
    return out


def set_assistant(model, k: int | None) -> None:
    """k: exactly k guesses per step (constant schedule, no confidence cut-off); None: transformers' defaults."""
    gc = model.generation_config
    if not hasattr(set_assistant, "defaults"):
        set_assistant.defaults = (gc.num_assistant_tokens, gc.num_assistant_tokens_schedule,
                                  getattr(gc, "assistant_confidence_threshold", None))
    if k is None:
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, thr = set_assistant.defaults
    else:
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, thr = k, "constant", 0.0
    if hasattr(gc, "assistant_confidence_threshold"):
        gc.assistant_confidence_threshold = thr


if __name__ == "__main__":
    raise SystemExit(main())
