"""Supervised fine-tuning: `run_sft(cfg, out_dir, base=..., seed=...)`.

SFT is a batch source + a loss on the shared trainer (lmforge.train.trainer), so resume,
checksummed checkpoints, DDP/FSDP, metrics and progress are the trainer's:

1. the base model and its tokenizer load through the checkpoint reader (checksums verified); a
   base already trained with another chat template is refused (tokenizer/chat.py);
2. the data: users' chat JSONL, or the built-in set (dictionary conversations from GCIDE, and
   the safety set mixed in at `safety_ratio`); conversations are rendered with the chat template
   into ids + loss masks (assistant answers and their `<|end|>` supervised), too-long ones
   truncated or dropped, empty ones counted and left out; part is held out for the chat eval;
3. LoRA / QLoRA adapters are applied from outside (posttrain/lora.py) when `lora.r > 0`;
4. batches: conversations packed into rows with document ids, so no attention crosses two
   conversations (posttrain/chat_data.py `SFTBatches`); the loss is the fused cross-entropy over
   supervised targets only;
5. every checkpoint (`sft/<name>/step_N/`): model.safetensors always holds the plain merged model
   (every consumer works without LoRA code), adapter.safetensors the adapters when LoRA is on,
   state.json the chat template id, the base model and the LoRA settings.

Files the chat eval reads (the contract between the stages): `<out>/data/heldout.jsonl` (held-out
conversations, the last assistant message the reference) and `<out>/data/safety_eval.jsonl`;
`<out>/data/stats.json` has the data counts.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge import config as cfgmod
from lmforge.errors import ConfigError, InputError
from lmforge.log import logger
from lmforge.rundir import atomic_write_json, atomic_write_text, read_json
from lmforge.tokenizer.chat import check_template, render_prompt, template_id
from lmforge.posttrain.chat_data import SFTBatches, read_chat_jsonl, render_examples
from lmforge.posttrain.config import SFTConfig
from lmforge.train import trainer as T

BUNDLED_DICTIONARY = Path(__file__).resolve().parents[1] / "sample" / "dictionary"


@dataclass
class SFTResult:
    out_dir: Path
    steps: int = 0
    final_loss: float | None = None
    checkpoint: Path | None = None
    base: str = ""
    trainable_params: int = 0
    total_params: int = 0
    tokens_per_s: float | None = None
    supervised_fraction: float | None = None
    data_stats: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    metrics_path: Path | None = None
    plot_path: Path | None = None
    wall_time_s: float = 0.0
    resumed_from: int | None = None


def sft_loss(model, batch):
    """Mean cross-entropy over the supervised targets of a packed batch (targets -100 elsewhere),
    and the number of supervised tokens (a logged metric)."""
    _, loss = model(batch.x, batch.y, doc_ids=batch.doc_ids)
    return loss, {"supervised_tokens": (batch.y != -100).sum().float()}


def dictionary_paths(cfg: SFTConfig, resolve=lambda p: Path(p)) -> list[Path]:
    if cfg.dictionary:
        p = resolve(cfg.dictionary)
        if not p.exists():
            raise InputError(f"sft.dictionary: {p} not found")
        return sorted(p.glob("*.jsonl*")) if p.is_dir() else [p]
    return sorted(BUNDLED_DICTIONARY.glob("*.jsonl*"))


def prepare_data(cfg: SFTConfig, tok, max_tokens: int, seed: int, resolve=lambda p: Path(p)) -> tuple[list, list, dict, dict]:
    """(training examples, held-out conversations, safety eval sets, stats)."""
    from lmforge.posttrain.dictionary_chat import build_default_chat_set
    from lmforge.posttrain.safety import mix, safety_eval_sets, safety_train_set

    stats: dict = {}
    if cfg.data:
        paths = [resolve(p) for p in cfg.data]
        convs, read_stats = read_chat_jsonl(paths)
        stats.update({f"read_{k}": v for k, v in read_stats.items()})
        if cfg.eval_data:
            heldout, _ = read_chat_jsonl([resolve(p) for p in cfg.eval_data])
        else:
            import random

            order = list(range(len(convs)))
            random.Random(seed).shuffle(order)
            n_held = round(len(convs) * cfg.heldout)
            held_idx = set(order[:n_held])
            heldout = [c for i, c in enumerate(convs) if i in held_idx]
            convs = [c for i, c in enumerate(convs) if i not in held_idx]
        stats["source"] = ", ".join(str(p) for p in paths)
    else:
        dpaths = dictionary_paths(cfg, resolve)
        convs, heldout = build_default_chat_set(dpaths, seed=seed, n=cfg.examples, holdout=cfg.heldout)
        stats["source"] = "built-in dictionary conversations from " + ", ".join(p.name for p in dpaths)
    n_task = len(convs)
    safety = safety_train_set(seed) if cfg.safety_ratio > 0 else []
    mixed = mix(convs, safety, cfg.safety_ratio, seed) if safety else convs
    examples, rstats = render_examples(tok, mixed, max_tokens, cfg.overflow)
    stats.update(rstats)
    stats.update(task_conversations=n_task, safety_conversations=len(mixed) - n_task, heldout_conversations=len(heldout))
    if not examples:
        raise InputError(f"no chat example left to train on ({rstats['dropped']} too long, "
                         f"{rstats['no_target']} with nothing to learn, {rstats['invalid']} invalid)")
    return examples, heldout, safety_eval_sets(seed), stats


def write_eval_files(out_dir: Path, heldout: list, safety_sets: dict, stats: dict) -> None:
    d = out_dir / "data"
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / "heldout.jsonl", "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in heldout))
    lines = [json.dumps({"set": name, **c}, ensure_ascii=False) + "\n" for name, convs in safety_sets.items() for c in convs]
    atomic_write_text(d / "safety_eval.jsonl", "".join(lines))
    atomic_write_json(d / "stats.json", stats)


def _warm_start(base_dir: Path):
    """init_optimizers hook: the base checkpoint's optimizer states (moments, Muon momentum) loaded
    into the fresh optimizers; learning rates and weight decay stay the fine-tuning ones."""

    def init(optimizers):
        f = base_dir / "optimizer.pt"
        if not f.is_file():
            raise InputError(f"sft.init_optimizer = 'pretrain' but the base model has no optimizer state ({f})")
        try:
            states = torch.load(f, map_location="cpu", weights_only=True)["optimizers"]
        except Exception as e:  # a corrupt pickle raises many types
            raise InputError(f"cannot read {f}: {e}") from None
        if len(states) != len(optimizers):
            raise ConfigError(f"{f} holds {len(states)} optimizer states but SFT uses {len(optimizers)}: "
                              "set sft.optimizer to the one pretraining used, or sft.init_optimizer = 'fresh'")
        for opt, st in zip(optimizers, states):
            keep = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
            try:
                opt.load_state_dict(st)
            except (ValueError, KeyError, RuntimeError) as e:
                raise ConfigError(f"{f} does not match SFT's optimizer ({e}): set sft.init_optimizer = 'fresh'") from None
            for g, k in zip(opt.param_groups, keep):
                g.update(k)

    return init


def run_sft(cfg: SFTConfig, out_dir: str | Path, *, base: str | Path, seed: int = 1234, tokenizer: str | Path | None = None,
            resolve=lambda p: Path(p)) -> SFTResult:
    """Fine-tune the model at `base` (anything the checkpoint reader takes) on chat data into
    `out_dir` (step_N/ + latest, metrics.jsonl, loss.png, data/). Resumes from the newest intact
    checkpoint there (cfg.resume)."""
    from lmforge.infer import load_model_and_tokenizer
    from lmforge.posttrain import lora as L

    t0 = time.time()
    out_dir = Path(out_dir)
    tcfg = cfg.trainer_config()
    runtime = T.setup(tcfg, "sft")
    model, tok, ref = load_model_and_tokenizer(base, device=runtime.device, tokenizer=tokenizer)
    base_state = read_json(ref.path / "state.json", {}) or {}
    check_template(base_state.get("chat_template"))
    seq_len = cfg.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"sft.seq_len = {seq_len} is longer than the base model's context ({model.cfg.max_seq_len})")
    examples, heldout, safety_sets, stats = prepare_data(cfg, tok, seq_len + 1, seed, resolve)
    if runtime.is_main:
        write_eval_files(out_dir, heldout, safety_sets, stats)
    logger.info("sft: %d training examples (%d supervised tokens), %d held out; base %s",
                stats["examples"], stats["supervised_tokens"], len(heldout), ref.path)

    torch.manual_seed(seed)
    lcfg = None
    if cfg.lora.r:
        lcfg = L.LoraConfig(r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout, targets=tuple(cfg.lora.targets))
        if cfg.lora.quantize != "none":
            L.qlora(model, cfg.lora.quantize, lcfg)
        else:
            L.apply_lora(model, lcfg)
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_total = model.cfg.num_params()
    batches = SFTBatches(examples, seq_len, cfg.batch_size, seed, tok.pad_id, cfg.packing,
                         dp_rank=runtime.info.dp_rank, dp_size=runtime.info.dp_size, device=runtime.device)

    lora_state = dataclasses.asdict(cfg.lora) if cfg.lora.r else None
    extra_state = {"chat_template": template_id(), "base": str(ref.path.resolve()), "lora": lora_state, "stage": "sft"}
    hooks: dict = {}
    if lcfg is not None:
        hooks["export_weights"] = lambda _weights: L.merged_state_dict(model)
        hooks["extra_files"] = lambda _ts: {"adapter.safetensors": L.adapter_bytes(model, lcfg)}
        hooks["restore_weights"] = lambda m, step_dir: L.load_adapter(m, step_dir / "adapter.safetensors")
    if cfg.init_optimizer == "pretrain":
        hooks["init_optimizers"] = _warm_start(ref.path)

    def sample(ts):
        msgs = [[{"role": "user", "content": p}] for p in cfg.sample_prompts]
        return chat_samples(ts.model, tok, msgs, cfg.sample_tokens)

    res = T.fit(
        tcfg, runtime, model, batches, sft_loss, out_dir, name="sft",
        run_config={**cfgmod.to_dict(cfg), "seq_len": seq_len, "base": str(ref.path), "data_fingerprint": batches.fingerprint},
        resume_free=SFTConfig.RESUME_FREE, model_config=model.cfg.to_dict(), tokenizer_file=tok.path,
        tokens_per_step=cfg.batch_size * seq_len * tcfg.grad_accum * runtime.info.dp_size,
        flops_per_token=model.cfg.flops_per_token(seq_len), sample=sample if cfg.sample_prompts and cfg.sample_tokens else None,
        extra_state=extra_state, data_desc="the chat data", plot_title="SFT loss", **hooks,
    )
    sup = res.train_record.get("supervised_tokens")
    rows_tokens = cfg.batch_size * seq_len * tcfg.grad_accum
    return SFTResult(
        out_dir=out_dir, steps=res.steps, final_loss=res.final_loss, checkpoint=res.checkpoint, base=str(ref.path),
        trainable_params=n_train, total_params=n_total, tokens_per_s=res.tokens_per_s,
        supervised_fraction=(sup * tcfg.grad_accum / rows_tokens) if sup is not None else None, data_stats=stats,
        samples=res.samples, metrics_path=res.metrics_path, plot_path=res.plot_path, wall_time_s=time.time() - t0,
        resumed_from=res.resumed_from,
    )


@torch.no_grad()
def chat_samples(model, tok, conversations: list[list[dict]], max_new_tokens: int = 64, temperature: float = 0.0,
                 seed: int = 0) -> list[dict]:
    """The model's answers to `conversations` (history ending with a user message) through the
    chat template and the generation engine; greedy by default."""
    from lmforge.infer.engine import SamplingParams, generate

    prompts = [render_prompt(tok, c) for c in conversations]
    outs = generate(model, prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed),
                    tokenizer=tok)
    return [{"prompt": c[-1]["content"], "completion": tok.decode(o.token_ids, skip_special=True),
             "finish_reason": o.finish_reason} for c, o in zip(conversations, outs)]


__all__ = ["run_sft", "SFTResult", "sft_loss", "prepare_data", "chat_samples"]
