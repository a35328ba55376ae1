"""The trainer every training stage runs on: `setup(cfg)` then `fit(cfg, runtime, model, batches, loss_fn, out_dir)`.

A stage supplies three things and inherits the rest:

- the model, built by the caller on `runtime.device` (from scratch, or loaded from a checkpoint,
  possibly with LoRA modules swapped in from outside and most parameters frozen: the optimizers
  only ever see parameters with `requires_grad`);
- a batch source: any object with `next_batch()`, `state_dict()` and `load_state_dict(d)`
  (lmforge.train.data.BatchLoader is one); its state is saved in every checkpoint, so a resumed run
  reads exactly the batches the uninterrupted one would have read;
- a loss: `loss_fn(model, batch) -> loss` or `(loss, {name: value})`. The extra values are averaged
  over the step's micro-batches (and data-parallel ranks) and logged beside the loss.

What `fit` does: one optimizer step = `grad_accum` micro-batches, bf16 autocast on GPU
(`precision`), data/tensor parallelism through `parallel.parallelize` (DDP, FSDP2, TP; the
pipeline- and context-parallel paths train the language-model loss `lm_loss` only), optimizers from
`build_optimizers` (Muon + AdamW or AdamW), the learning-rate schedule, gradient clipping,
checksummed checkpoints (`step_N/` + `latest`, lmforge.train.checkpoint) written every
`checkpoint_every` steps and at the end, bit-exact resume on CPU (model, optimizer states, RNG and the
batch source's position), `metrics.jsonl` (train records every `log_every` steps; eval and samples
records from the hooks every `eval_every` steps), a progress bar and a loss plot.

Stages that keep more than the weights pass `extra_files` (e.g. adapter.safetensors, checksummed
like the rest) and `extra_state` (JSON merged into state.json, e.g. a chat template);
`export_weights` changes what model.safetensors holds (e.g. LoRA merged into the base weights) and
`restore_weights` loads the model back on resume from whatever the stage saved.

Host syncs: reading a GPU tensor's value (`.item()`, `float()`) stalls the CPU until the GPU
queue drains, so on an accelerator the loss, gradient norm and extra metrics stay on the device
and are read only on "sync steps": every `log_every`-th step, eval and checkpoint steps and the
last step. Between them, a non-finite loss or gradient norm is recorded on the device (the first
such step and its values); the next sync step raises TrainingDiverged naming that step, before any
eval or checkpoint, so no checkpoint is ever written from non-finite weights and the last good one
stays. On CPU there is no queue to stall, so every step syncs and a non-finite step stops the run
before the weights are touched, as before (`sync_every_step` overrides the choice).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.nn as nn

from lmforge import config as cfgmod
from lmforge.errors import ConfigError, InputError, LmforgeError
from lmforge.log import log_once, logger, progress
from lmforge.rundir import fingerprint, read_json
from lmforge.train import checkpoint as ck
from lmforge.train import parallel as P
from lmforge.train.config import TrainerConfig
from lmforge.train.metrics import MetricsLog, device_peak_flops, plot_metrics
from lmforge.train.optim import build_optimizers, set_lr
from lmforge.train.schedule import schedule_from_config


class TrainingDiverged(LmforgeError):
    """The loss or gradient norm became NaN/inf."""


class BatchSource(Protocol):
    """Where a stage's batches come from; its state travels in every checkpoint."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


LossFn = Callable[[nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, Any]]"]

# keys of a train record that a loss function's extra metrics may not reuse
TRAIN_RECORD_KEYS = ("kind", "step", "loss", "lr", "lr_factor", "grad_norm", "tokens", "tokens_per_s", "mfu", "epoch",
                     "steps_per_s")
# state.json keys the trainer writes itself
STATE_KEYS = ("data", "rng", "tokens", "scheduler", "train_config", "config_fingerprint", "world_size", "time", "step",
              "checksums")


def lm_loss(model: nn.Module, batch) -> torch.Tensor:
    """Next-token cross-entropy of a lmforge Transformer on a token batch (x, y, doc_ids): the
    pretraining loss, and the only one the pipeline- and context-parallel paths can train."""
    _, loss = model(batch.x, batch.y, doc_ids=batch.doc_ids)
    return loss


@dataclass
class Runtime:
    """The process's place in the job: distributed info, device and autocast dtype."""

    info: P.DistInfo
    device: torch.device
    amp_dtype: torch.dtype | None

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    @property
    def is_main(self) -> bool:
        return self.info.is_main


def setup(cfg: TrainerConfig, name: str = "train") -> Runtime:
    """Initialise torch.distributed (under torchrun), pick the device and the autocast dtype:
    bf16 on GPU with precision "auto", fp32 on CPU. Call before building the model and the batch
    source (they need `runtime.device` and `runtime.info.dp_rank / dp_size`)."""
    info = P.init_distributed(cfg.parallel, device=None if cfg.device == "auto" else cfg.device)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{name}.device = 'cuda' but no CUDA device is available")
    dev = info.device
    amp = None
    if cfg.precision == "bf16" or (cfg.precision == "auto" and dev.type == "cuda"):
        amp = torch.bfloat16
    return Runtime(info, dev, amp)


@dataclass
class TrainerState:
    """What the hooks see at an eval or checkpoint step."""

    model: nn.Module  # the caller's module (weights gathered on every rank under pipeline parallelism)
    forward: Callable  # the module to run forward passes through (DDP/FSDP wrapper, compiled)
    runtime: Runtime
    optimizers: list[torch.optim.Optimizer]
    step: int = 0
    tokens: int = 0


@dataclass
class FitResult:
    out_dir: Path
    steps: int = 0
    tokens: int = 0
    final_loss: float | None = None
    train_record: dict = field(default_factory=dict)  # the last logged train record (incl. extra metrics)
    tokens_per_s: float | None = None
    mfu: float | None = None
    peak_flops_source: str = ""
    wall_time_s: float = 0.0
    checkpoint: Path | None = None
    metrics_path: Path | None = None
    plot_path: Path | None = None
    resumed_from: int | None = None
    eval_metrics: dict = field(default_factory=dict)  # the last eval record
    samples: list[dict] = field(default_factory=list)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def fit(
    cfg: TrainerConfig,
    runtime: Runtime,
    model: nn.Module,
    batches: BatchSource,
    loss_fn: LossFn,
    out_dir: str | Path,
    *,
    name: str = "train",
    run_config: dict | None = None,
    resume_free: Iterable[str] | None = None,
    model_config: dict | None = None,
    tokenizer_file: Path | None = None,
    tokens_per_step: int | None = None,
    flops_per_token: float | None = None,
    evaluate: Callable[[TrainerState], dict] | None = None,
    sample: Callable[[TrainerState], list[dict] | None] | None = None,
    extra_files: Callable[[TrainerState], dict[str, bytes]] | None = None,
    extra_state: dict | Callable[[TrainerState], dict] | None = None,
    export_weights: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    restore_weights: Callable[[nn.Module, Path], None] | None = None,
    init_optimizers: Callable[[list[torch.optim.Optimizer]], None] | None = None,
    data_desc: str = "the training data",
    plot_title: str = "",
    sync_every_step: bool | None = None,
) -> FitResult:
    """Train `model` on `batches` with `loss_fn` for `cfg.max_steps` optimizer steps, writing
    checkpoints, metrics.jsonl and loss.png into `out_dir`; resume from the newest intact
    checkpoint there when `cfg.resume`.

    name: the config section ("pretrain", "sft", ...): progress label and the keys error messages name.
    run_config: JSON saved in state.json as "train_config" (default: `cfg`); a resumed run whose
      run_config differs outside `resume_free` (default TrainerConfig.RESUME_FREE) is refused.
    model_config: written as config.json (and compared on resume) when given.
    tokenizer_file: copied into every checkpoint.
    tokens_per_step / flops_per_token: for the tokens, tokens/s and MFU fields of the train records.
    evaluate(state) -> metrics: every rank, every `eval_every` steps and at the end ("eval" records);
      the model is in training mode: a hook that needs eval mode switches and switches back.
    sample(state) -> list of dicts: main rank only, unsharded models only, beside `evaluate`.
    extra_files(state) -> {name: bytes}: written and checksummed in each checkpoint (every rank calls it).
    extra_state: a dict, or state -> dict, merged into state.json.
    export_weights(full state dict) -> what model.safetensors holds; restore_weights(model, step_dir)
      loads a resumed run's model instead of model.safetensors (a stage that exports merged weights).
    init_optimizers(optimizers): called once on a fresh (not resumed) run, e.g. to warm-start the
      optimizer states from a pretraining checkpoint.
    sync_every_step: read the loss on the host every step (default: on CPU only; see the module doc).
    """
    t_start = time.time()
    info, device = runtime.info, runtime.device
    out_dir = Path(out_dir)
    raw = model
    if sync_every_step is None:
        sync_every_step = device.type == "cpu"
    if not trainable_parameters(raw):
        raise ConfigError(f"{name}: the model has no trainable parameters (every parameter has requires_grad = False)")
    if hasattr(raw, "gradient_checkpointing"):
        raw.gradient_checkpointing = cfg.activation_checkpointing

    # ---- parallelism, optimizers, schedule ------------------------------------------------
    dp_model = P.parallelize(raw, cfg.parallel, info)
    sched, stage_mod, pp_group, cp_group = _model_parallel_setup(raw, cfg, info, device, loss_fn, name)
    fwd = torch.compile(dp_model) if cfg.compile and sched is None and cp_group is None else dp_model
    optimizers = [o for o in build_optimizers(raw, cfg) if any(g["params"] for g in o.param_groups)]
    sharded = info.distributed and (cfg.parallel.dp == "fsdp" or info.tp_size > 1)
    lr_at = schedule_from_config(cfg)
    run_config = cfgmod.to_dict(cfg) if run_config is None else run_config
    resume_free = set(TrainerConfig.RESUME_FREE if resume_free is None else resume_free)

    # ---- resume ---------------------------------------------------------------------------
    start_step, tokens_seen, resumed_from = 0, 0, None
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume and info.is_main and ck.list_checkpoints(out_dir):
        logger.info("%s.resume = false: removing the old checkpoints in %s", name, out_dir)
        for p in ck.list_checkpoints(out_dir):
            shutil.rmtree(p, ignore_errors=True)
        (out_dir / "latest").unlink(missing_ok=True)
    if info.is_main:
        ck.remove_partial(out_dir)  # temp directories of a checkpoint write that was killed
    P.barrier()
    ckpt = ck.find_resumable(out_dir) if cfg.resume else None
    if ckpt is not None:
        state = read_json(ckpt / "state.json")
        why = _resume_mismatch(state.get("train_config", {}), run_config, resume_free)
        if why is None and model_config is not None:
            saved_model = read_json(ckpt / "config.json") or {}
            if saved_model != model_config:
                why = f"model: checkpoint has {saved_model}, config has {model_config}"
        if why:
            raise ConfigError(
                f"{ckpt} was made with a different training config ({why}); "
                f"use another output directory, or set {name}.resume = false to start over"
            )
        if restore_weights is not None:
            restore_weights(raw, ckpt)
        else:
            _load_weights(raw, ckpt, sharded)
        _load_optimizers(raw, optimizers, ckpt, sharded)
        batches.load_state_dict(state["data"])
        ck.set_rng_state(state.get("rng", {}))
        start_step, tokens_seen, resumed_from = int(state["step"]), int(state.get("tokens", 0)), int(state["step"])
        logger.info("resuming from %s (step %d)", ckpt, start_step)
    elif init_optimizers is not None:
        init_optimizers(optimizers)

    metrics = MetricsLog(out_dir / "metrics.jsonl", enabled=info.is_main, tensorboard=cfg.tensorboard, resume_step=resumed_from)
    peak, peak_src = device_peak_flops(device, cfg.peak_flops) if flops_per_token else (0.0, "")
    result = FitResult(out_dir=out_dir, resumed_from=resumed_from, metrics_path=out_dir / "metrics.jsonl", peak_flops_source=peak_src)
    ts = TrainerState(raw, fwd, runtime, optimizers, start_step, tokens_seen)

    def eval_and_sample(step: int) -> None:
        if evaluate is None and sample is None:
            return
        if sched is not None:
            from lmforge.train.pipeline_parallel import pp_sync_weights

            pp_sync_weights(raw, info.pp_size, pp_group)
        ts.step, ts.tokens = step, tokens_seen
        rec = {"kind": "eval", "step": step, "tokens": tokens_seen}
        if evaluate is not None:
            rec.update(evaluate(ts) or {})
        if len(rec) > 3:
            metrics.log(rec)
            result.eval_metrics = rec
            if info.is_main:
                logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if isinstance(v, float)))
        if sample is not None and not sharded:
            if info.is_main:
                samples = sample(ts)
                if samples is not None:
                    metrics.log({"kind": "samples", "step": step, "samples": samples})
                    result.samples = samples
            P.barrier()

    def save(step: int) -> Path | None:
        if sched is not None:
            from lmforge.train.pipeline_parallel import pp_merge_optimizer_states, pp_sync_weights

            pp_sync_weights(raw, info.pp_size, pp_group)
        ts.step, ts.tokens = step, tokens_seen
        weights = P.full_state_dict(dp_model)
        if getattr(getattr(raw, "cfg", None), "tie_embeddings", False):
            weights.pop("lm_head.weight", None)
        if export_weights is not None:
            weights = export_weights(weights)
        opt_states = pp_merge_optimizer_states(optimizers, pp_group) if sched is not None else _optimizer_states(raw, optimizers, sharded)
        files = _check_extra_files(extra_files(ts) if extra_files is not None else {})
        more = extra_state(ts) if callable(extra_state) else dict(extra_state or {})
        clash = sorted(set(more) & set(STATE_KEYS))
        if clash:
            raise ValueError(f"extra_state may not set the trainer's own state.json keys: {', '.join(clash)}")
        path = None
        if info.is_main:
            state = {
                **more,
                "data": batches.state_dict(), "rng": ck.rng_state(), "tokens": tokens_seen,
                "scheduler": {"kind": cfg.schedule, "step": step, "lr_factor": lr_at(max(0, step - 1))},
                "train_config": run_config, "config_fingerprint": fingerprint(run_config),
                "world_size": info.world_size, "time": time.time(),
            }
            path = ck.save_checkpoint(out_dir, step, {k: v.cpu() for k, v in weights.items()}, model_config or {}, opt_states,
                                      state, cfg.keep_last, tokenizer_file=tokenizer_file, extra_files=files or None)
        P.barrier()
        return path

    def diverged(what: str, bad_step: int, stopped_at: int | None) -> TrainingDiverged:
        last = ck.list_checkpoints(out_dir)
        when = ("training stopped before updating the weights" if stopped_at is None else
                f"training stopped at step {stopped_at}, the first log/eval/checkpoint step after it; nothing was saved since")
        return TrainingDiverged(
            f"{what} at step {bad_step}: {when}. Last good checkpoint: {last[-1] if last else 'none'}. "
            f"Hint: lower {name}.lr / {name}.muon_lr, raise {name}.warmup_steps, keep {name}.grad_clip > 0, "
            f"or check {data_desc}."
        )

    # ---- the loop -------------------------------------------------------------------------
    fwd.train()
    t_win, tok_win, steps_win = time.perf_counter(), 0, 0
    loss_f = None
    # first non-finite step (0 = none yet) and its loss / grad norm, kept on the device between syncs
    bad_step = torch.zeros((), dtype=torch.float64, device=device)
    bad_vals = torch.zeros(2, dtype=torch.float64, device=device)
    bar = progress(range(start_step, cfg.max_steps), desc=name, total=cfg.max_steps, unit="step", initial=start_step)
    for step in bar:
        done = step + 1
        log_now = done % cfg.log_every == 0 or done == cfg.max_steps
        eval_now = bool(cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps
        ckpt_now = bool(cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.max_steps
        sync = sync_every_step or log_now or eval_now or ckpt_now
        set_lr(optimizers, lr_at(step))
        if sched is not None or cp_group is not None:
            loss_acc, extras = _model_parallel_step(raw, batches, cfg, runtime, sched, stage_mod, pp_group, cp_group), {}
        else:
            loss_acc, extras = _accumulate(fwd, dp_model, batches, loss_fn, cfg.grad_accum, runtime)
        if info.distributed:
            loss_acc, extras = _all_reduce_mean(loss_acc, extras)
        if sched is not None:
            from lmforge.train.pipeline_parallel import pp_clip_grad_norm

            gn = torch.tensor(pp_clip_grad_norm(list(stage_mod.parameters()), cfg.grad_clip, pp_group), dtype=torch.float64)
        else:
            gn = clip_grad_norm_(dp_model.parameters(), cfg.grad_clip, sync=sync)
        if sync:  # one device-to-host read: loss, grad norm, the first non-finite step and its values, extras
            vals = torch.stack([loss_acc.double(), gn.double().to(loss_acc.device), bad_step, *bad_vals,
                                *(v.double() for v in extras.values())]).tolist()
            loss_f, gn_f = vals[0], vals[1]
            extras_f = dict(zip(extras, vals[5:]))
            if vals[2] > 0:
                first_loss, first_gn = vals[3], vals[4]
                what = f"loss {first_loss}" if not math.isfinite(first_loss) else f"gradient norm {first_gn}"
                raise diverged(what, int(vals[2]), done)
            if not (math.isfinite(loss_f) and math.isfinite(gn_f)):
                raise diverged(f"loss {loss_f}" if not math.isfinite(loss_f) else f"gradient norm {gn_f}", done, None)
        else:
            pair = torch.stack([loss_acc.double(), gn.double().to(loss_acc.device)])
            first = (bad_step == 0) & ~torch.isfinite(pair).all()
            bad_vals = torch.where(first, pair, bad_vals)
            bad_step = torch.where(first, float(done), bad_step)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if tokens_per_step:
            tokens_seen += tokens_per_step
            tok_win += tokens_per_step
        steps_win += 1
        if log_now:
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t_win
            rec = {"kind": "train", "step": done, "loss": loss_f, "lr": optimizers[0].param_groups[0]["lr"], "lr_factor": lr_at(step),
                   "grad_norm": gn_f}
            if tokens_per_step:
                tps = tok_win / dt if dt > 0 else 0.0
                mfu = tps * flops_per_token / (peak * info.world_size) if flops_per_token and peak > 0 else None
                rec.update(tokens=tokens_seen, tokens_per_s=tps, mfu=mfu)
                result.tokens_per_s, result.mfu = tps, mfu
            else:
                rec["steps_per_s"] = steps_win / dt if dt > 0 else 0.0
            if hasattr(batches, "epoch"):
                rec["epoch"] = batches.epoch
            rec.update(extras_f)
            metrics.log(rec)
            result.train_record = rec
            if hasattr(bar, "set_postfix"):
                post = {"loss": f"{loss_f:.3f}"}
                if tokens_per_step:
                    post["tok_s"] = f"{rec['tokens_per_s']:,.0f}"
                bar.set_postfix(refresh=False, **post)
        t_pause = time.perf_counter()
        if eval_now:
            eval_and_sample(done)
        if ckpt_now:
            result.checkpoint = save(done)
        if log_now:
            t_win, tok_win, steps_win = time.perf_counter(), 0, 0
        else:
            t_win += time.perf_counter() - t_pause  # eval and checkpoint time is not training time
    if hasattr(bar, "close"):
        bar.close()

    if start_step >= cfg.max_steps:  # nothing left to train: report on the checkpoint we resumed
        eval_and_sample(start_step)
        result.checkpoint = ckpt
    result.steps, result.tokens, result.final_loss = max(start_step, cfg.max_steps), tokens_seen, loss_f
    metrics.close()
    if info.is_main:
        result.plot_path = plot_metrics(out_dir / "metrics.jsonl", out_dir / "loss.png", title=plot_title or name)
    result.wall_time_s = time.time() - t_start
    return result


def _accumulate(fwd, dp_model, batches: BatchSource, loss_fn: LossFn, n: int, runtime: Runtime):
    """Forward + backward of `n` micro-batches; returns the mean loss and the mean extra metrics,
    detached and on the device (nothing read on the host)."""
    device = runtime.device
    loss_acc = torch.zeros((), device=device)
    extras: dict[str, torch.Tensor] = {}
    for micro in range(n):
        b = batches.next_batch()
        with _grad_sync(dp_model, micro == n - 1):
            with runtime.autocast():
                out = loss_fn(fwd, b)
            loss, more = out if isinstance(out, tuple) else (out, None)
            (loss / n).backward()
        loss_acc += loss.detach() / n
        for k, v in (more or {}).items():
            if k in TRAIN_RECORD_KEYS:
                raise ValueError(f"loss function metric {k!r} clashes with a train record field; rename it")
            v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v), device=device)
            extras[k] = extras[k] + v / n if k in extras else v / n
    return loss_acc, extras


def _all_reduce_mean(loss: torch.Tensor, extras: dict[str, torch.Tensor]):
    """Mean over all ranks of the loss and the extra metrics, in one collective (no host sync)."""
    if not extras:
        return P.all_reduce_mean(loss), extras
    flat = P.all_reduce_mean(torch.stack([loss.float(), *(v.float().to(loss.device) for v in extras.values())]))
    return flat[0].to(loss.dtype), dict(zip(extras, flat[1:]))


def _model_parallel_step(raw, batches, cfg: TrainerConfig, runtime: Runtime, sched, stage_mod, pp_group, cp_group):
    """One step's forward/backward through the pipeline schedule or on this rank's sequence chunk,
    then the gradient average over the replicas (the language-model loss only)."""
    info = runtime.info
    mbs = [batches.next_batch() for _ in range(cfg.grad_accum)]
    with runtime.autocast():
        if sched is not None:
            from lmforge.train.pipeline_parallel import pp_train_step

            loss = pp_train_step(sched, mbs, info.pp_rank, info.pp_size, pp_group)
        else:
            from lmforge.train.context_parallel import cp_train_step

            loss = cp_train_step(raw, mbs, cp_group, info.cp_rank, info.cp_size)
    # pipeline: each stage's gradients averaged over its data-parallel replicas; context: every
    # rank's chunk gradient averaged over all ranks (the mean of the chunk losses)
    P.average_gradients(stage_mod.parameters() if sched is not None else raw.parameters(),
                        info.group("dp") if sched is not None else None)
    return loss


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, sync: bool = True) -> torch.Tensor:
    """Global L2 norm of the gradients (float64, on their device), clipped to `max_norm` (0 = off).
    Works for plain, DDP, FSDP2 and TP (DTensor) parameters: gradients are grouped by (mesh,
    placements) so sharded and replicated ones are each counted once. With `sync` the norm is read
    on the host and the gradients scaled only when it exceeds `max_norm` (bit for bit what the
    loop always did); without, the clip factor stays on the device (no host sync)."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            g = p.grad
            key = (id(g.device_mesh), tuple(g.placements)) if hasattr(g, "placements") else None
            groups.setdefault(key, []).append(g)
    total_sq = None
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, 2.0)
        if hasattr(n, "full_tensor"):
            n = n.full_tensor()
        sq = n.double() ** 2
        total_sq = sq if total_sq is None else total_sq + sq.to(total_sq.device)
    if total_sq is None:
        return torch.zeros((), dtype=torch.float64)
    total = total_sq.sqrt()
    if max_norm <= 0:
        return total
    if sync:
        t = float(total)
        if t > max_norm:
            coef = max_norm / (t + 1e-6)
            for grads in groups.values():
                torch._foreach_mul_(grads, coef)
        return total
    coef = torch.where(total > max_norm, max_norm / (total + 1e-6), torch.ones_like(total))
    for grads in groups.values():
        torch._foreach_mul_(grads, coef.to(device=grads[0].device, dtype=grads[0].dtype))
    return total


def _grad_sync(model, sync: bool):
    """Skip the gradient all-reduce on all but the last micro-batch (DDP and FSDP2)."""
    if hasattr(model, "no_sync") and not sync:
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def _resume_mismatch(saved: dict, now: dict, free: set) -> str | None:
    for k in sorted(set(saved) | set(now)):
        if k in free:
            continue
        if saved.get(k) != now.get(k):
            return f"{k}: checkpoint has {saved.get(k)!r}, config has {now.get(k)!r}"
    return None


def _check_extra_files(files: dict[str, bytes]) -> dict[str, bytes]:
    reserved = set(ck.CHECKSUMMED) | {"state.json"}
    for n in files:
        if n in reserved or "/" in n or "\\" in n or n.startswith("."):
            raise ValueError(f"extra checkpoint file name {n!r} is reserved or not a plain file name")
    return files


def _model_parallel_setup(raw, cfg: TrainerConfig, info, device, loss_fn, name: str):
    """Pipeline stage + schedule (parallel.pp > 1) or the context-parallel group (parallel.cp > 1).
    Returns (schedule, stage module, pipeline group, context group); all None without them."""
    if info.pp_size == 1 and info.cp_size == 1:
        return None, None, None, None
    what = "pipeline" if info.pp_size > 1 else "context"
    if loss_fn is not lm_loss:
        raise ConfigError(f"{what} parallelism trains the language-model loss only; {name} has its own loss: use parallel.dp / parallel.tp")
    if cfg.compile:
        log_once(f"train.{what}.compile", f"{name}.compile is not applied with {what} parallelism (eager execution)")
    if cfg.activation_checkpointing:
        log_once(f"train.{what}.ac", f"{name}.activation_checkpointing is not applied with {what} parallelism")
    if info.pp_size > 1:
        from lmforge.train.pipeline_parallel import build_pipeline

        group = info.group("pp")
        stage, sched = build_pipeline(raw, info.pp_size, info.pp_rank, cfg.parallel.pp_microbatches * cfg.grad_accum,
                                      cfg.parallel.pp_schedule, device, group=group)
        return sched, stage, group, None
    if raw.cfg.moe_experts:
        raise ConfigError("context parallelism is not supported for mixture-of-experts models")
    return None, None, None, info.group("cp")


def _optimizer_states(raw, optimizers, sharded: bool) -> list[dict]:
    if not sharded:
        return [o.state_dict() for o in optimizers]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return [get_optimizer_state_dict(raw, o, options=opts) for o in optimizers]


def _load_weights(raw: nn.Module, path: Path, sharded: bool) -> None:
    """model.safetensors into the (possibly sharded) model; a tied output head is stored once."""
    weights = ck.load_weights(path)
    tied = getattr(getattr(raw, "cfg", None), "tie_embeddings", False)
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if tied:
            weights["lm_head.weight"] = weights["tok_emb.weight"]
        set_model_state_dict(raw, weights, options=StateDictOptions(full_state_dict=True))
        return
    dev = next(raw.parameters()).device
    missing, unexpected = raw.load_state_dict({k: v.to(dev) for k, v in weights.items()}, strict=False)
    missing = [m for m in missing if not (tied and m == "lm_head.weight")]
    if missing or unexpected:
        raise InputError(f"{path / 'model.safetensors'} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _load_optimizers(raw: nn.Module, optimizers, path: Path, sharded: bool) -> None:
    opt_states = ck.load_optimizer_states(path)
    if len(opt_states) != len(optimizers):
        raise ConfigError(f"{path} holds {len(opt_states)} optimizer states but this run uses {len(optimizers)}")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True)
        for o, s in zip(optimizers, opt_states):
            set_optimizer_state_dict(raw, o, optim_state_dict=s, options=opts)
        return
    for o, s in zip(optimizers, opt_states):
        o.load_state_dict(s)


__all__ = ["setup", "fit", "lm_loss", "clip_grad_norm_", "trainable_parameters", "Runtime", "TrainerState", "FitResult",
           "BatchSource", "TrainingDiverged", "TrainerConfig"]
