"""The pretraining loop: `train(cfg, tokens_dir, out_dir, tokenizer_dir=None, on_eval=None)`.

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences per data-parallel
rank; bf16 autocast on GPU, fp32 on CPU; gradients clipped by global norm; the schedule is a
pure function of the step. Every `log_every` steps a train record (loss, lr, grad norm,
tokens/s, MFU) goes to `<out>/metrics.jsonl`; every `eval_every` steps the validation loss and
bits per byte, the `on_eval(step, model)` metrics and sample generations; every
`checkpoint_every` steps a checkpoint (lmforge.train.checkpoint). A run started again on the
same output directory resumes from the newest intact checkpoint and, on CPU, reproduces the
uninterrupted loss curve bit for bit (same data order, optimizer state, RNG).

A non-finite loss or gradient norm stops the run before the weights are touched, naming the
step; the last good checkpoint stays as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lmforge import config as cfgmod
from lmforge.errors import ConfigError, InputError, LmforgeError
from lmforge.log import log_once, logger, progress
from lmforge.rundir import fingerprint, read_json
from lmforge.train import checkpoint as ck
from lmforge.train.config import TrainConfig
from lmforge.train.context_parallel import cp_train_step
from lmforge.train.data import BatchLoader, TokenStream, read_index, val_batches
from lmforge.train.metrics import MetricsLog, device_peak_flops, plot_metrics
from lmforge.train.optim import build_optimizers, set_lr
from lmforge.train.pipeline_parallel import pp_clip_grad_norm, pp_merge_optimizer_states, pp_sync_weights, pp_train_step
from lmforge.train.schedule import schedule_from_config


class TrainingDiverged(LmforgeError):
    """The loss or gradient norm became NaN/inf."""


@dataclass
class TrainResult:
    out_dir: Path
    steps: int = 0
    tokens: int = 0
    params: int = 0
    final_loss: float | None = None
    val_loss: float | None = None
    val_bpb: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    wall_time_s: float = 0.0
    checkpoint: Path | None = None
    metrics_path: Path | None = None
    plot_path: Path | None = None
    resumed_from: int | None = None
    samples: list[dict] = field(default_factory=list)
    eval_metrics: dict = field(default_factory=dict)
    model_config: dict = field(default_factory=dict)
    peak_flops_source: str = ""


def _device_and_precision(cfg: TrainConfig, info_device: torch.device) -> tuple[torch.device, torch.dtype | None]:
    dev = info_device
    if cfg.precision == "fp32":
        return dev, None
    if cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda"):
        return dev, torch.bfloat16
    return dev, None


def _grad_sync(model, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (DDP and FSDP2)."""
    if hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _resume_mismatch(saved: dict, cfg: TrainConfig) -> str | None:
    now = cfgmod.to_dict(cfg)
    for k in sorted(set(saved) | set(now)):
        if k in TrainConfig.RESUME_FREE or k == "seed":
            continue
        if saved.get(k) != now.get(k):
            return f"{k}: checkpoint has {saved.get(k)!r}, config has {now.get(k)!r}"
    return None


def train(
    cfg: TrainConfig,
    tokens_dir: str | Path,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    on_eval: Callable[[int, torch.nn.Module], dict] | None = None,
) -> TrainResult:
    """Pretrain a model on `tokens_dir` (tokens/ of the tokenizer stage), writing checkpoints and
    metrics.jsonl into `out_dir`. Resumes from the newest intact checkpoint there (cfg.resume)."""
    from lmforge.model import Transformer
    from lmforge.train import parallel as P
    from lmforge.train.textio import bytes_per_token_from_stats, generate_samples, load_tokenizer, token_byte_lengths

    t_start = time.time()
    out_dir = Path(out_dir)
    seed = cfg.seed if cfg.seed is not None else 1234
    info = P.init_distributed(cfg.parallel, device=None if cfg.device == "auto" else cfg.device)
    device, amp_dtype = _device_and_precision(cfg, info.device)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("pretrain.device = 'cuda' but no CUDA device is available")

    # ---- data -----------------------------------------------------------------------------
    index = read_index(tokens_dir)
    train_stream = TokenStream(index, "train")
    if train_stream.total == 0:
        raise InputError(f"{Path(tokens_dir) / 'index.json'} lists no train shards")
    mcfg = cfg.model_config(index.vocab_size)
    top = train_stream.max_token()
    if top >= mcfg.vocab_size:
        raise InputError(
            f"train shards contain token id {top} but the model's vocabulary has {mcfg.vocab_size} entries: "
            "the tokens were made with a different tokenizer than index.json / pretrain.model.vocab_size describe"
        )
    val_stream = TokenStream(index, "val") if index.splits.get("val") else None
    if val_stream is None or val_stream.total <= cfg.seq_len:
        log_once("train.noval", "no usable validation shards: validation loss and bits per byte are skipped")
        val_stream = None
    loader = BatchLoader(train_stream, cfg.seq_len, cfg.batch_size, seed=seed, bos_id=index.bos_id, packing=cfg.packing,
                         dp_rank=info.dp_rank, dp_size=info.dp_size, device=device)

    tok = load_tokenizer(tokenizer_dir)
    tokenizer_file = None
    if tok is not None:
        tokenizer_file = Path(tokenizer_dir) / "tokenizer.json" if Path(tokenizer_dir).is_dir() else Path(tokenizer_dir)
    byte_lens = torch.from_numpy(token_byte_lengths(tok, mcfg.vocab_size)).to(device) if tok is not None else None
    bpt_stats = None if tok is not None else bytes_per_token_from_stats(tokenizer_dir)

    # ---- model & optimizer ----------------------------------------------------------------
    torch.manual_seed(seed)
    raw = Transformer(mcfg).to(device)
    raw.gradient_checkpointing = cfg.activation_checkpointing
    dp_model = P.parallelize(raw, cfg.parallel, info)
    sched, stage_mod, pp_group, cp_group = _model_parallel_setup(raw, cfg, info, device)
    fwd = torch.compile(dp_model) if cfg.compile and sched is None and cp_group is None else dp_model
    optimizers = build_optimizers(raw, cfg)
    sharded = info.distributed and (cfg.parallel.dp == "fsdp" or info.tp_size > 1)
    lr_at = schedule_from_config(cfg)

    # ---- resume ---------------------------------------------------------------------------
    start_step, tokens_seen, resumed_from = 0, 0, None
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume and info.is_main and ck.list_checkpoints(out_dir):
        logger.info("pretrain.resume = false: removing the old checkpoints in %s", out_dir)
        for p in ck.list_checkpoints(out_dir):
            shutil.rmtree(p, ignore_errors=True)
        (out_dir / "latest").unlink(missing_ok=True)
    if info.is_main:
        ck.remove_partial(out_dir)  # temp directories of a checkpoint write that was killed
    P.barrier()
    ckpt = ck.find_resumable(out_dir) if cfg.resume else None
    if ckpt is not None:
        state = read_json(ckpt / "state.json")
        why = _resume_mismatch(state.get("train_config", {}), cfg)
        saved_model = read_json(ckpt / "config.json") or {}
        if why is None and saved_model != mcfg.to_dict():
            why = f"model: checkpoint has {saved_model}, config has {mcfg.to_dict()}"
        if why:
            raise ConfigError(
                f"{ckpt} was made with a different training config ({why}); "
                "use another output directory, or set pretrain.resume = false to start over"
            )
        _load_into(raw, optimizers, ckpt, sharded)
        loader.load_state_dict(state["data"])
        ck.set_rng_state(state.get("rng", {}))
        start_step, tokens_seen, resumed_from = int(state["step"]), int(state.get("tokens", 0)), int(state["step"])
        logger.info("resuming from %s (step %d)", ckpt, start_step)

    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=info.is_main, tensorboard=cfg.tensorboard, resume_step=resumed_from)
    peak, peak_src = device_peak_flops(device, cfg.peak_flops)
    flops_tok = mcfg.flops_per_token(cfg.seq_len)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * info.dp_size
    result = TrainResult(out_dir=out_dir, params=mcfg.num_params(), resumed_from=resumed_from, model_config=mcfg.to_dict(),
                         metrics_path=out_dir / "metrics.jsonl", peak_flops_source=peak_src)
    if info.is_main:
        logger.info("model %s: %.2fM parameters, %d tokens/step, %s, %s on %s", cfg.model.preset, mcfg.num_params() / 1e6,
                    tokens_per_step, cfg.optimizer, "bf16 autocast" if amp_dtype else "fp32", device)
    train_cfg_dict = cfgmod.to_dict(dataclasses.replace(cfg, seed=seed))
    last_ckpt_step = start_step if ckpt is not None else -1

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    def evaluate() -> dict:
        if val_stream is None:
            return {}
        fwd.eval()
        nats = torch.zeros((), dtype=torch.float64, device=device)
        n_tok = torch.zeros((), dtype=torch.float64, device=device)
        bpb_nats = torch.zeros((), dtype=torch.float64, device=device)
        n_bytes = torch.zeros((), dtype=torch.float64, device=device)
        with torch.no_grad():
            for b in val_batches(val_stream, cfg.seq_len, cfg.batch_size, cfg.eval_batches, bos_id=index.bos_id,
                                 packing=cfg.packing, dp_rank=info.dp_rank, dp_size=info.dp_size, device=device):
                with autocast():
                    logits, _ = fwd(b.x, doc_ids=b.doc_ids)
                per = F.cross_entropy(logits.float().flatten(0, 1), b.y.flatten(), reduction="none").double()
                nats += per.sum()
                n_tok += per.numel()
                if byte_lens is not None:
                    nb = byte_lens[b.y.flatten()]
                    m = nb > 0
                    bpb_nats += per[m].sum()
                    n_bytes += nb.sum()
        fwd.train()
        if info.distributed:
            for t in (nats, n_tok, bpb_nats, n_bytes):
                torch.distributed.all_reduce(t)
        if n_tok.item() == 0:
            return {}
        out = {"val_loss": nats.item() / n_tok.item()}
        if byte_lens is not None and n_bytes.item() > 0:
            out["val_bpb"] = bpb_nats.item() / math.log(2) / n_bytes.item()
        elif bpt_stats:
            out["val_bpb"] = out["val_loss"] / math.log(2) / bpt_stats
        return out

    def eval_and_sample(step: int) -> None:
        if sched is not None:
            pp_sync_weights(raw, info.pp_size, pp_group)
        rec = {"kind": "eval", "step": step, "tokens": tokens_seen, **evaluate()}
        if on_eval is not None:
            rec.update(on_eval(step, raw) or {})
        if len(rec) > 3:
            metrics.log(rec)
            result.eval_metrics = rec
            result.val_loss, result.val_bpb = rec.get("val_loss"), rec.get("val_bpb")
            if info.is_main:
                logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if isinstance(v, float)))
        if tok is not None and cfg.sample_prompts and cfg.sample_tokens and not sharded:
            if info.is_main:
                samples = generate_samples(raw, tok, cfg.sample_prompts, cfg.sample_tokens, bos_id=index.bos_id,
                                           eos_id=index.eos_id, temperature=cfg.sample_temperature, seed=seed + step, device=device)
                metrics.log({"kind": "samples", "step": step, "samples": samples})
                result.samples = samples
            P.barrier()

    def save(step: int) -> Path | None:
        if sched is not None:
            pp_sync_weights(raw, info.pp_size, pp_group)
        weights = P.full_state_dict(dp_model)
        if mcfg.tie_embeddings:
            weights.pop("lm_head.weight", None)
        if sched is not None:
            opt_states = pp_merge_optimizer_states(optimizers, pp_group)
        else:
            opt_states = _optimizer_states(raw, optimizers, sharded)
        path = None
        if info.is_main:
            state = {
                "data": loader.state_dict(), "rng": ck.rng_state(), "tokens": tokens_seen,
                "scheduler": {"kind": cfg.schedule, "step": step, "lr_factor": lr_at(max(0, step - 1))},
                "train_config": train_cfg_dict, "config_fingerprint": fingerprint(train_cfg_dict),
                "world_size": info.world_size, "time": time.time(),
            }
            path = ck.save_checkpoint(out_dir, step, {k: v.cpu() for k, v in weights.items()}, mcfg.to_dict(), opt_states,
                                      state, cfg.keep_last, tokenizer_file=tokenizer_file)
        P.barrier()
        return path

    # ---- the loop -------------------------------------------------------------------------
    fwd.train()
    t_win, tok_win = time.perf_counter(), 0
    loss_f = None
    bar = progress(range(start_step, cfg.max_steps), desc="pretrain", total=cfg.max_steps, unit="step", initial=start_step)
    for step in bar:
        set_lr(optimizers, lr_at(step))
        if sched is not None or cp_group is not None:
            batches = [loader.next_batch() for _ in range(cfg.grad_accum)]
            with autocast():
                if sched is not None:
                    loss_acc = pp_train_step(sched, batches, info.pp_rank, info.pp_size, pp_group)
                else:
                    loss_acc = cp_train_step(raw, batches, cp_group, info.cp_rank, info.cp_size)
            # pipeline: each stage's gradients averaged over its data-parallel replicas; context:
            # every rank's chunk gradient averaged over all ranks (the mean of the chunk losses)
            P.average_gradients(stage_mod.parameters() if sched is not None else raw.parameters(),
                                info.group("dp") if sched is not None else None)
        else:
            loss_acc = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                b = loader.next_batch()
                with _grad_sync(dp_model, micro == cfg.grad_accum - 1):
                    with autocast():
                        _, loss = fwd(b.x, b.y, doc_ids=b.doc_ids)
                    (loss / cfg.grad_accum).backward()
                loss_acc += loss.detach() / cfg.grad_accum
        if info.distributed:
            loss_acc = P.all_reduce_mean(loss_acc)
        loss_f = float(loss_acc)
        if sched is not None:
            gn = pp_clip_grad_norm(list(stage_mod.parameters()), cfg.grad_clip, pp_group)
        else:
            gn = P.clip_grad_norm(dp_model, cfg.grad_clip)
        if not (math.isfinite(loss_f) and math.isfinite(gn)):
            what = f"loss {loss_f}" if not math.isfinite(loss_f) else f"gradient norm {gn}"
            last = ck.list_checkpoints(out_dir)
            raise TrainingDiverged(
                f"{what} at step {step + 1}: training stopped before updating the weights. "
                f"Last good checkpoint: {last[-1] if last else 'none'}. "
                "Hint: lower pretrain.lr / pretrain.muon_lr, raise pretrain.warmup_steps, keep pretrain.grad_clip > 0, "
                "or check the token shards."
            )
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        tok_win += tokens_per_step
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t_win
            tps = tok_win / dt if dt > 0 else 0.0
            mfu = tps * flops_tok / (peak * info.world_size) if peak > 0 else None
            rec = {"kind": "train", "step": done, "loss": loss_f, "lr": optimizers[0].param_groups[0]["lr"],
                   "lr_factor": lr_at(step), "grad_norm": gn, "tokens": tokens_seen, "tokens_per_s": tps, "mfu": mfu,
                   "epoch": loader.epoch}
            metrics.log(rec)
            result.tokens_per_s, result.mfu = tps, mfu
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss_f:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
        t_pause = time.perf_counter()
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps:
            eval_and_sample(done)
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.max_steps:
            result.checkpoint = save(done)
            last_ckpt_step = done
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            t_win, tok_win = time.perf_counter(), 0
        else:
            t_win += time.perf_counter() - t_pause  # eval and checkpoint time is not training time
    if hasattr(bar, "close"):
        bar.close()

    if start_step >= cfg.max_steps:  # nothing left to train: report on the checkpoint we resumed
        eval_and_sample(start_step)
        result.checkpoint = ckpt
    elif last_ckpt_step != cfg.max_steps:
        result.checkpoint = save(cfg.max_steps)
    result.steps, result.tokens, result.final_loss = max(start_step, cfg.max_steps), tokens_seen, loss_f
    metrics.close()
    if info.is_main:
        result.plot_path = plot_metrics(out_dir / "metrics.jsonl", out_dir / "loss.png", title=f"pretraining ({cfg.model.preset}, {cfg.optimizer}, {cfg.schedule})")
    result.wall_time_s = time.time() - t_start
    return result


def _model_parallel_setup(raw, cfg: TrainConfig, info, device):
    """Pipeline stage + schedule (parallel.pp > 1) or the context-parallel group (parallel.cp > 1).
    Returns (schedule, stage module, pipeline group, context group); all None without them."""
    if info.pp_size > 1:
        from lmforge.train.pipeline_parallel import build_pipeline

        if cfg.packing != "separator":
            raise ConfigError("parallel.pp > 1 needs pretrain.packing = 'separator': document ids do not travel between pipeline stages")
        if cfg.batch_size % cfg.parallel.pp_microbatches:
            raise ConfigError(f"pretrain.batch_size = {cfg.batch_size} must be divisible by parallel.pp_microbatches = {cfg.parallel.pp_microbatches}")
        _warn_unsupported(cfg, "pipeline")
        group = info.group("pp")
        stage, sched = build_pipeline(raw, info.pp_size, info.pp_rank, cfg.parallel.pp_microbatches * cfg.grad_accum,
                                      cfg.parallel.pp_schedule, device, group=group)
        return sched, stage, group, None
    if info.cp_size > 1:
        if cfg.seq_len % info.cp_size:
            raise ConfigError(f"pretrain.seq_len = {cfg.seq_len} must be divisible by parallel.cp = {info.cp_size}")
        if raw.cfg.moe_experts:
            raise ConfigError("context parallelism is not supported for mixture-of-experts models")
        _warn_unsupported(cfg, "context")
        return None, None, None, info.group("cp")
    return None, None, None, None


def _warn_unsupported(cfg: TrainConfig, what: str) -> None:
    if cfg.compile:
        log_once(f"train.{what}.compile", f"pretrain.compile is not applied with {what} parallelism (eager execution)")
    if cfg.activation_checkpointing:
        log_once(f"train.{what}.ac", f"pretrain.activation_checkpointing is not applied with {what} parallelism")


def _optimizer_states(raw, optimizers, sharded: bool) -> list[dict]:
    if not sharded:
        return [o.state_dict() for o in optimizers]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return [get_optimizer_state_dict(raw, o, options=opts) for o in optimizers]


def _load_into(raw, optimizers, path: Path, sharded: bool) -> None:
    weights = ck.load_weights(path)
    opt_states = ck.load_optimizer_states(path)
    if len(opt_states) != len(optimizers):
        raise ConfigError(f"{path} holds {len(opt_states)} optimizer states but this run uses {len(optimizers)}")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        if raw.cfg.tie_embeddings:
            weights["lm_head.weight"] = weights["tok_emb.weight"]
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(raw, weights, options=opts)
        for o, s in zip(optimizers, opt_states):
            set_optimizer_state_dict(raw, o, optim_state_dict=s, options=opts)
        return
    missing, unexpected = raw.load_state_dict({k: v.to(raw.tok_emb.weight.device) for k, v in weights.items()}, strict=False)
    missing = [m for m in missing if not (raw.cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise InputError(f"{path / 'model.safetensors'} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for o, s in zip(optimizers, opt_states):
        o.load_state_dict(s)


__all__ = ["train", "TrainResult", "TrainingDiverged"]
