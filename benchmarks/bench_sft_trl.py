"""SFT speed against TRL: lmforge `run_sft` vs TRL `SFTTrainer` doing the same work in the same run.

Needs the `posttrain-bench` extra (trl, peft, datasets, accelerate): `pip install -e '.[dev,posttrain-bench]'`.

    python benchmarks/bench_sft_trl.py                 # the demo's pretrained model, full + LoRA SFT
    python benchmarks/bench_sft_trl.py --quick         # smoke run: a few steps, a small data set
    python benchmarks/bench_sft_trl.py --base runs/x/checkpoints/x --threads 1 --steps 60

What is the same on both sides
- threads: `torch.set_num_threads(--threads)` (default 2) for the whole process, both sides;
- the model: the lmforge checkpoint (`--base`, default the demo's pretrained `tiny`) and its HF export
  (`lmforge.model.hf.export_hf` with the chat template), fp32, the same weights; HF attention is `sdpa`;
- the data: lmforge's built-in SFT set (GCIDE dictionary conversations + the safety set mixed in at
  `--safety-ratio`), rendered once with lmforge's chat template. It is checked against TRL's own data
  pipeline: TRL's `assistant_only_loss=True` tokenization of the same conversations through the exported
  `chat_template` gives the same ids and the same supervised tokens (printed as "TRL tokenization"),
  and TRL's own `packing=True` (BFD) packing of them is reported beside ours (rows, fill);
- the batches, bit for bit and in the same order: lmforge's packed rows (`SFTBatches`: best-fit packing in a
  seeded order, `--batch-size` rows of `seq_len + 1` tokens) are handed to TRL pre-tokenized
  (`input_ids`, `labels` with -100 off the assistant turns, `seq_lengths` of the conversations in each row),
  read in order (a sequential sampler). TRL's padding-free collator (the one `packing=True` uses) flattens
  each batch into one sequence with per-conversation `position_ids`; transformers' mask builder turns
  those into a block-diagonal causal mask for `sdpa` on CPU, so, like lmforge's document mask, no
  attention crosses two conversations (TRL 1.x's `padding_free` needs no flash-attention kernel for that
  since transformers 5 detects packed `position_ids`). Same rows, so the initial loss must match;
- the optimisation: AdamW (lr `--lr` / `--lora-lr`, betas 0.9/0.95, eps 1e-8, no weight decay), gradient
  clipping at 1.0, `--schedule` (cosine or constant) with no warmup on either side (their warmups differ by
  one step), one micro-batch per step, `--warmup + --steps` optimizer steps;
- LoRA: the same r, alpha, no dropout, the same seven projections (our wq/wk/wv/wo/w1/w3/w2 are peft's
  q_proj/k_proj/v_proj/o_proj/gate_proj/up_proj/down_proj), and the same initial adapter values (lmforge's
  A, drawn as `run_sft` draws it, copied into peft's `lora_A`; B = 0 on both sides).

What each side runs
- lmforge: `lmforge.posttrain.sft.run_sft` (the `lmforge sft` stage): its trainer loop with the fused
  head + cross-entropy over supervised targets, metrics every step, one checkpoint at the end.
- TRL: `trl.SFTTrainer` (`padding_free=True`, `optim="adamw_torch"`, `logging_steps=1`, no saving) on
  `AutoModelForCausalLM` (peft `get_peft_model` for LoRA). Its default per-step metrics (entropy, token
  accuracy) stay on: they are part of what TRL does in a step.

What the timer covers: the training steps only. Model loading, export, data building and each trainer's
set-up are outside it, and so is lmforge's final checkpoint write (its trainer excludes checkpoint time).
lmforge: per-step wall time from its metrics.jsonl (`log_every = 1`: each record's tokens_per_s is one
step's `batch x seq_len / dt`). TRL: the wall time between consecutive `on_step_end` callbacks (batch
collation, forward, backward, clipping, optimizer, logging). The first `--warmup` steps are left out on
both sides. tokens/s is the median over the timed steps of (the step's conversation tokens, padding
excluded, the same number on both sides) / (its wall time); each side runs `--rounds` times, alternating
which goes first, and its best round counts (the machine is shared; the load average is printed).
The losses printed are the first round's (every round is deterministic and identical).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE = REPO / "runs" / "demo" / "checkpoints" / "demo"
HF_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
GOAL = 1.5


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default=str(DEFAULT_BASE), help="lmforge checkpoint (run, checkpoints dir, step dir)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both sides (default 2)")
    ap.add_argument("--steps", type=int, default=25, help="timed optimizer steps per side")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    ap.add_argument("--batch-size", type=int, default=8, help="packed rows per step")
    ap.add_argument("--seq-len", type=int, default=0, help="tokens per row (0 = the model's context)")
    ap.add_argument("--examples", type=int, default=2000, help="conversations in the built-in set")
    ap.add_argument("--safety-ratio", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-3, help="full fine-tuning learning rate")
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lora-alpha", type=float, default=16.0)
    ap.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    ap.add_argument("--modes", default="full,lora", help="comma list of full, lora")
    ap.add_argument("--rounds", type=int, default=2, help="runs per side, alternating which goes first; best tokens/s kept")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--workdir", default="", help="where exports and outputs go (default: a temporary directory)")
    ap.add_argument("--json", default="", help="also write the results here")
    ap.add_argument("--no-trl-data-check", action="store_true", help="skip the TRL tokenization / packing check")
    ap.add_argument("--quick", action="store_true", help="smoke run: 4 steps after 1 warmup, 200 conversations")
    a = ap.parse_args(argv)
    if a.quick:
        a.steps, a.warmup, a.examples, a.rounds = 4, 1, 200, 1
    if a.steps < 1 or a.warmup < 0 or a.threads < 1 or a.rounds < 1:
        ap.error("--steps, --threads and --rounds must be >= 1, --warmup >= 0")
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not a.modes or any(m not in ("full", "lora") for m in a.modes):
        ap.error("--modes takes full and/or lora")
    return a


# ---- data: one rendering, lmforge's packed rows step by step ----------------------------------


def sft_config(args, seq_len: int, lora: bool):
    """The lmforge SFT config both sides mirror (no checkpoints but the last, no samples, no eval)."""
    from lmforge.posttrain.config import LORA_TARGETS, LoraSection, SFTConfig

    cfg = SFTConfig(
        examples=args.examples, heldout=0.1, safety_ratio=args.safety_ratio, seq_len=seq_len, batch_size=args.batch_size,
        packing=True, max_steps=args.warmup + args.steps, optimizer="adamw", lr=args.lora_lr if lora else args.lr,
        schedule=args.schedule, warmup_steps=0, grad_clip=1.0, betas=[0.9, 0.95], eps=1e-8, weight_decay=0.0,
        checkpoint_every=0, eval_every=0, log_every=1, sample_prompts=[], resume=False, device="cpu", precision="fp32",
        lora=LoraSection(r=args.lora_r, alpha=args.lora_alpha, targets=list(LORA_TARGETS)) if lora else LoraSection(),
    )
    cfg.validate()
    return cfg


def build_data(cfg, tok, seq_len: int, seed: int):
    """(training conversations, rendered examples) exactly as `run_sft`'s prepare_data builds them."""
    from lmforge.posttrain.chat_data import render_examples
    from lmforge.posttrain.dictionary_chat import build_default_chat_set
    from lmforge.posttrain.safety import mix, safety_train_set
    from lmforge.posttrain.sft import dictionary_paths

    convs, _held = build_default_chat_set(dictionary_paths(cfg), seed=seed, n=cfg.examples, holdout=cfg.heldout)
    safety = safety_train_set(seed) if cfg.safety_ratio > 0 else []
    mixed = mix(convs, safety, cfg.safety_ratio, seed) if safety else convs
    examples, _stats = render_examples(tok, mixed, seq_len + 1, cfg.overflow)
    return mixed, examples


def packed_steps(examples, seq_len: int, batch_size: int, seed: int, pad_id: int, n_steps: int):
    """The example indices of each row lmforge's `SFTBatches` gives, step by step (its row stream runs
    across epochs), and the batch source's data fingerprint. Checked against `next_batch()`."""
    import numpy as np

    from lmforge.posttrain.chat_data import SFTBatches

    b = SFTBatches(examples, seq_len, batch_size, seed, pad_id, packing=True)
    steps, epoch, pos = [], 0, 0
    for _ in range(n_steps):
        rows: list[list[int]] = []
        while len(rows) < batch_size:
            er = b.rows_of_epoch(epoch)
            take = er[pos : pos + batch_size - len(rows)]
            rows += take
            pos += len(take)
            if pos >= len(er):
                epoch, pos = epoch + 1, 0
        steps.append(rows)
    check = SFTBatches(examples, seq_len, batch_size, seed, pad_id, packing=True)
    for rows in steps[:2]:
        x = check.next_batch().x.numpy()
        want = np.stack([b.make_row(r)[0] for r in rows])
        if not np.array_equal(x, want):
            raise SystemExit("internal: the replayed row stream differs from SFTBatches.next_batch()")
    return steps, b.fingerprint, b.epoch_rows()


def hf_row(examples, members: list[int]) -> dict:
    """One packed row for TRL: ids, labels (-100 where lmforge does not supervise), conversation lengths."""
    ids, labels, lens = [], [], []
    for i in members:
        e = examples[i]
        lab = [t if m else -100 for t, m in zip(e.ids, e.mask)]
        lab[0] = -100  # a conversation's first token is never a target (lmforge's make_row does the same)
        ids += list(e.ids)
        labels += lab
        lens.append(len(e.ids))
    return {"input_ids": ids, "labels": labels, "seq_lengths": lens}


# ---- lmforge side ----------------------------------------------------------------------------


def run_lmforge(cfg, base: Path, out_dir: Path, seed: int) -> dict:
    from lmforge.posttrain.sft import run_sft

    res = run_sft(cfg, out_dir, base=base, seed=seed)
    recs = [json.loads(line) for line in res.metrics_path.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if r.get("kind") == "train"]
    row_tokens = cfg.batch_size * (cfg.seq_len)
    state = json.loads((res.checkpoint / "state.json").read_text())
    return {"losses": [r["loss"] for r in recs], "step_s": [row_tokens / r["tokens_per_s"] for r in recs],
            "fingerprint": state["train_config"]["data_fingerprint"], "trainable": res.trainable_params}


def lmforge_lora_init(base: Path, seed: int, cfg) -> dict:
    """lmforge's initial adapters as `run_sft` draws them (torch.manual_seed(seed), then apply_lora)."""
    from lmforge.infer import load_model_and_tokenizer
    from lmforge.posttrain import lora as L

    model, _tok, _ref = load_model_and_tokenizer(base)
    torch.manual_seed(seed)
    L.apply_lora(model, L.LoraConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=0.0, targets=tuple(cfg.lora.targets)))
    return {name: (m.lora_a.detach().clone(), m.lora_b.detach().clone()) for name, m in L.lora_modules(model).items()}


def peft_name(ours: str) -> str:
    """layers.3.attn.wq -> base_model.model.model.layers.3.self_attn.q_proj"""
    _, i, block, proj = ours.split(".")
    return f"base_model.model.model.layers.{i}.{'self_attn' if block == 'attn' else 'mlp'}.{HF_NAMES[proj]}"


# ---- TRL side --------------------------------------------------------------------------------


def trl_args(cfg, out_dir: Path, seed: int, **over):
    from trl import SFTConfig as TrlSFTConfig

    kw = dict(
        output_dir=str(out_dir), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=1, learning_rate=cfg.lr, lr_scheduler_type=cfg.schedule, warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        logging_steps=1, save_strategy="no", report_to="none", seed=seed, data_seed=seed, dataloader_num_workers=0,
        use_cpu=True, bf16=False, fp16=False, disable_tqdm=True, max_length=cfg.seq_len + 1, padding_free=True,
        packing=False, assistant_only_loss=False, shuffle_dataset=False,
    )
    kw.update(over)
    return TrlSFTConfig(**kw)


def load_hf(hf_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, attn_implementation="sdpa")


def run_trl(cfg, hf_dir: Path, rows: list[dict], out_dir: Path, seed: int, lora_init: dict | None) -> dict:
    import datasets
    from torch.utils.data import SequentialSampler
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

    class InOrderSFTTrainer(SFTTrainer):
        """SFTTrainer reading the (already shuffled and packed) rows in order, recording each step's loss."""

        losses: list[float] = []

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if model.training:
                self.losses.append(float((out[0] if return_outputs else out).detach()))
            return out

    model = load_hf(hf_dir)
    trainable = sum(p.numel() for p in model.parameters())
    if lora_init is not None:
        from peft import LoraConfig, get_peft_model

        targets = [HF_NAMES[t] for t in cfg.lora.targets]
        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                                 target_modules=targets, bias="none", task_type="CAUSAL_LM"))
        with torch.no_grad():
            for ours, (a, b) in lora_init.items():
                mod = model.get_submodule(peft_name(ours))
                mod.lora_A["default"].weight.copy_(a)
                mod.lora_B["default"].weight.copy_(b)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    timer = Timer()
    trainer = InOrderSFTTrainer(model=model, args=trl_args(cfg, out_dir, seed, max_length=None),  # rows are packed already
                                train_dataset=datasets.Dataset.from_list(rows),
                                processing_class=tok, callbacks=[timer])
    trainer.losses = []
    trainer.remove_callback(PrinterCallback)  # its per-step dict lines only; TRL still logs every step
    trainer.train()
    step_s = [b - a for a, b in zip(timer.marks, timer.marks[1:])]
    return {"losses": list(trainer.losses), "step_s": step_s, "trainable": trainable}


def trl_data_check(cfg, hf_dir: Path, convs: list, examples, our_rows: int, seed: int, out_dir: Path) -> dict:
    """TRL's own pipeline on the same conversations: `assistant_only_loss=True` tokenization through the
    exported chat template (compared with lmforge's ids and supervised tokens, conversation by
    conversation), and `packing=True` (BFD) packing (rows and fill, beside lmforge's)."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    model = load_hf(hf_dir)
    ds = datasets.Dataset.from_list([{"messages": c["messages"]} for c in convs])
    out = {}
    for packing in (False, True):
        t = SFTTrainer(model=model, args=trl_args(cfg, out_dir / f"check_{packing}", seed, assistant_only_loss=True,
                                                  packing=packing, padding_free=packing),
                       train_dataset=ds, processing_class=tok)
        prepared = t.train_dataset
        if not packing:
            theirs = sorted((tuple(r["input_ids"]), tuple(x != -100 for x in r["labels"])) for r in prepared)
            ours = sorted((tuple(e.ids), tuple(e.mask)) for e in examples)
            out["same_ids"] = [a for a, _ in theirs] == [a for a, _ in ours]
            # supervised tokens: lmforge never supervises a conversation's first token (nothing precedes it)
            out["same_supervised"] = [m[1:] for _, m in theirs] == [m[1:] for _, m in ours] if out["same_ids"] else False
            out["conversations"] = (len(theirs), len(ours))
        else:
            n_tok = sum(len(r["input_ids"]) for r in prepared)
            out["trl_bfd_rows"] = len(prepared)
            out["trl_bfd_fill"] = n_tok / (len(prepared) * (cfg.seq_len + 1))
            out["lmforge_rows"] = our_rows
            out["lmforge_fill"] = sum(len(e.ids) for e in examples) / (our_rows * (cfg.seq_len + 1))
    return out


# ---- report ----------------------------------------------------------------------------------


def summarize(side: dict, tokens_per_step: list[int], warmup: int) -> dict:
    """tokens/s of one run: the median over the timed steps of (the step's conversation tokens / its wall
    time); a median because the machine is shared and a step now and then is slowed from outside."""
    dt = side["step_s"][warmup:]
    toks = tokens_per_step[warmup : warmup + len(dt)]
    return {"tokens_per_s": statistics.median(t / d for t, d in zip(toks, dt)), "median_step_s": statistics.median(dt),
            "first_loss": side["losses"][0], "last_loss": side["losses"][-1],
            "last5_loss": statistics.fmean(side["losses"][-5:]), "trainable": side["trainable"]}


def _result(*a, **k):
    """The RESULT line run_all.py collects (benchmarks/_bench.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _bench import result

    return result(*a, **k)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    import transformers
    import trl

    from lmforge.infer import load_model_and_tokenizer
    from lmforge.model.hf import export_hf
    from lmforge.model.io import resolve_model
    from lmforge.tokenizer.chat import chat_template_jinja

    transformers.logging.set_verbosity_error()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_sft_trl_"))
    work.mkdir(parents=True, exist_ok=True)
    ref = resolve_model(args.base)
    _model, tok, ref = load_model_and_tokenizer(ref.path)
    seq_len = args.seq_len or _model.cfg.max_seq_len
    n_params = _model.cfg.num_params()
    del _model
    hf_dir = work / "hf"
    if not hf_dir.exists():
        export_hf(ref.path, hf_dir, tokenizer=ref.tokenizer, chat_template=chat_template_jinja())

    n_steps = args.warmup + args.steps
    cfg_full = sft_config(args, seq_len, lora=False)
    convs, examples = build_data(cfg_full, tok, seq_len, args.seed)
    steps, fingerprint, epoch_rows = packed_steps(examples, seq_len, args.batch_size, args.seed, tok.pad_id, n_steps)
    rows = [hf_row(examples, r) for step in steps for r in step]
    tokens_per_step = [sum(len(examples[i].ids) for r in step for i in r) for step in steps]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}; "
          f"torch threads {torch.get_num_threads()} (both sides)")
    print(f"model {ref.path} ({n_params:,} parameters), seq_len {seq_len}, batch {args.batch_size} rows, "
          f"{len(examples)} conversations, {n_steps} steps ({args.warmup} untimed), "
          f"{statistics.fmean(tokens_per_step):.0f} conversation tokens per step, schedule {args.schedule}, no warmup")

    results: dict = {"config": {k: v for k, v in vars(args).items()}, "seq_len": seq_len}
    if not args.no_trl_data_check:
        chk = trl_data_check(cfg_full, hf_dir, convs, examples, epoch_rows, args.seed, work / "trl_check")
        results["trl_data_check"] = chk
        print(f"TRL tokenization (assistant_only_loss=True, same conversations): ids identical: {chk['same_ids']}, "
              f"supervised tokens identical: {chk['same_supervised']} ({chk['conversations'][0]} vs {chk['conversations'][1]} conversations)")
        print(f"packing of one epoch into rows of {seq_len + 1}: lmforge best-fit {chk['lmforge_rows']} rows "
              f"({chk['lmforge_fill']:.1%} full), TRL packing=True/BFD {chk['trl_bfd_rows']} rows ({chk['trl_bfd_fill']:.1%} full)")

    table = []
    for mode in args.modes:
        lora = mode == "lora"
        cfg = sft_config(args, seq_len, lora=lora)
        init = lmforge_lora_init(ref.path, args.seed, cfg) if lora else None
        runs: dict[str, list[dict]] = {"lmforge": [], "trl": []}
        for rnd in range(args.rounds):  # alternate which side goes first: the machine's load drifts
            for side in (("lmforge", "trl") if rnd % 2 == 0 else ("trl", "lmforge")):
                if side == "lmforge":
                    got = run_lmforge(cfg, ref.path, work / f"lmforge_{mode}_{rnd}", args.seed)
                    if got["fingerprint"] != fingerprint:
                        raise SystemExit(f"internal: run_sft trained on other data ({got['fingerprint']} vs {fingerprint})")
                else:
                    got = run_trl(cfg, hf_dir, rows, work / f"trl_{mode}_{rnd}", args.seed, init)
                if len(got["losses"]) != n_steps:
                    raise SystemExit(f"internal: {len(got['losses'])} {side} losses for {n_steps} steps")
                got["summary"] = summarize(got, tokens_per_step, args.warmup)
                runs[side].append(got)
                print(f"  [{mode}] round {rnd + 1} {side}: {got['summary']['tokens_per_s']:,.0f} tok/s "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
        ours, theirs = runs["lmforge"][0], runs["trl"][0]
        a = max((r["summary"] for r in runs["lmforge"]), key=lambda x: x["tokens_per_s"])
        b = max((r["summary"] for r in runs["trl"]), key=lambda x: x["tokens_per_s"])
        diffs = [abs(x - y) for x, y in zip(ours["losses"], theirs["losses"])]
        row = {"mode": mode, "lmforge": a, "trl": b, "ratio": a["tokens_per_s"] / b["tokens_per_s"],
               "rounds": {k: [r["summary"]["tokens_per_s"] for r in v] for k, v in runs.items()},
               "step1_loss_diff": diffs[0], "max_loss_diff": max(diffs), "lmforge_losses": ours["losses"],
               "trl_losses": theirs["losses"]}
        table.append(row)
        print(f"\n[{mode}] lr {cfg.lr}" + (f", LoRA r {cfg.lora.r} alpha {cfg.lora.alpha} on {', '.join(cfg.lora.targets)}" if lora else ""))
        print(f"  step-1 loss: lmforge {ours['losses'][0]:.6f}  TRL {theirs['losses'][0]:.6f}  |diff| {diffs[0]:.2e} "
              f"({'OK' if diffs[0] < 1e-3 else 'MISMATCH'}: same weights, same batch)")
        print(f"  last loss:   lmforge {a['last_loss']:.4f}  TRL {b['last_loss']:.4f};  mean of last 5: "
              f"{a['last5_loss']:.4f} vs {b['last5_loss']:.4f};  max |diff| over the curve {max(diffs):.2e}")
    results["rows"] = table

    print(f"\nSFT tokens/s (conversation tokens, padding excluded; median of {args.steps} timed steps, best of "
          f"{args.rounds} alternating rounds per side; {args.threads} threads)")
    print("| mode | trainable params (lmforge / TRL) | lmforge tok/s | TRL tok/s | ratio | step-1 loss diff | last loss lmforge / TRL | goal |")
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        met = "met" if r["ratio"] >= GOAL else "**not met**"
        print(f"| {r['mode']} | {r['lmforge']['trainable']:,} / {r['trl']['trainable']:,} | {r['lmforge']['tokens_per_s']:,.0f} | "
              f"{r['trl']['tokens_per_s']:,.0f} | **{r['ratio']:.2f}x** | {r['step1_loss_diff']:.1e} | "
              f"{r['lmforge']['last_loss']:.4f} / {r['trl']['last_loss']:.4f} | >= {GOAL}x: {met} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if table:
        _result("sft_trl", min(r["ratio"] for r in table), GOAL,
                "SFT tokens/s, lmforge / TRL SFTTrainer (+ peft), same rows and init; headline = the lower of "
                + ", ".join(f"{r['mode']} {r['ratio']:.2f}x" for r in table),
                **{r["mode"]: round(r["ratio"], 3) for r in table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
