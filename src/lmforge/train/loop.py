"""The pretraining loop: `train(cfg, tokens_dir, out_dir, tokenizer_dir=None, on_eval=None)`.

Pretraining is a batch source (shuffled token windows from `tokens/`, lmforge.train.data.BatchLoader)
plus the language-model loss (`trainer.lm_loss`) on the shared trainer (lmforge.train.trainer),
which brings device and precision, DDP/FSDP2/TP/pipeline/context parallelism, optimizers, the
schedule, checkpoints, bit-exact resume, metrics and the NaN stop. What this module adds: the
model built from the `[pretrain]` preset and the token shards' vocabulary, the validation loss
and bits per byte, sample generations, and the pretraining result the recipe stage reports.

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences per data-parallel
rank; bf16 autocast on GPU, fp32 on CPU; gradients clipped by global norm; the schedule is a
pure function of the step. Every `log_every` steps a train record (loss, lr, grad norm,
tokens/s, MFU) goes to `<out>/metrics.jsonl`; every `eval_every` steps the validation loss and
bits per byte, the `on_eval(step, model)` metrics and sample generations; every
`checkpoint_every` steps a checkpoint (lmforge.train.checkpoint). A run started again on the
same output directory resumes from the newest intact checkpoint and, on CPU, reproduces the
uninterrupted loss curve bit for bit (same data order, optimizer state, RNG).

A non-finite loss or gradient norm stops the run naming the step (on CPU before the weights are
touched; on GPU at the next log step, see lmforge.train.trainer); the last good checkpoint stays
as it is.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from lmforge import config as cfgmod
from lmforge.errors import ConfigError, InputError
from lmforge.log import log_once, logger
from lmforge.train import trainer as T
from lmforge.train.config import TrainConfig
from lmforge.train.data import BatchLoader, TokenStream, read_index, val_batches
from lmforge.train.trainer import TrainingDiverged


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
    from lmforge.train.textio import bytes_per_token_from_stats, generate_samples, load_tokenizer, token_byte_lengths

    t_start = time.time()
    out_dir = Path(out_dir)
    seed = cfg.seed if cfg.seed is not None else 1234
    tcfg = cfg.trainer_config()
    rt = T.setup(tcfg, "pretrain")
    info, device = rt.info, rt.device

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

    # ---- model ----------------------------------------------------------------------------
    _check_model_parallel(cfg, info)
    torch.manual_seed(seed)
    raw = Transformer(mcfg).to(device)
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * info.dp_size
    if info.is_main:
        logger.info("model %s: %.2fM parameters, %d tokens/step, %s, %s on %s", cfg.model.preset, mcfg.num_params() / 1e6,
                    tokens_per_step, cfg.optimizer, "bf16 autocast" if rt.amp_dtype else "fp32", device)

    def evaluate(ts: T.TrainerState) -> dict:
        """Validation loss and bits per byte (every rank), then the caller's on_eval hook."""
        out = _validation(ts.forward, val_stream, cfg, index.bos_id, rt, byte_lens, bpt_stats) if val_stream is not None else {}
        if on_eval is not None:
            out.update(on_eval(ts.step, ts.model) or {})
        return out

    def sample(ts: T.TrainerState) -> list[dict]:
        return generate_samples(ts.model, tok, cfg.sample_prompts, cfg.sample_tokens, bos_id=index.bos_id, eos_id=index.eos_id,
                                temperature=cfg.sample_temperature, seed=seed + ts.step, device=device)

    run_config = cfgmod.to_dict(dataclasses.replace(cfg, seed=seed))
    fit = T.fit(
        tcfg, rt, raw, loader, T.lm_loss, out_dir, name="pretrain", run_config=run_config,
        resume_free=(*TrainConfig.RESUME_FREE, "seed"), model_config=mcfg.to_dict(), tokenizer_file=tokenizer_file,
        tokens_per_step=tokens_per_step, flops_per_token=mcfg.flops_per_token(cfg.seq_len), evaluate=evaluate,
        sample=sample if tok is not None and cfg.sample_prompts and cfg.sample_tokens else None,
        data_desc="the token shards", plot_title=f"pretraining ({cfg.model.preset}, {cfg.optimizer}, {cfg.schedule})",
    )
    ev = fit.eval_metrics
    return TrainResult(
        out_dir=out_dir, steps=fit.steps, tokens=fit.tokens, params=mcfg.num_params(), final_loss=fit.final_loss,
        val_loss=ev.get("val_loss"), val_bpb=ev.get("val_bpb"), tokens_per_s=fit.tokens_per_s, mfu=fit.mfu,
        wall_time_s=time.time() - t_start, checkpoint=fit.checkpoint, metrics_path=fit.metrics_path, plot_path=fit.plot_path,
        resumed_from=fit.resumed_from, samples=fit.samples, eval_metrics=ev, model_config=mcfg.to_dict(),
        peak_flops_source=fit.peak_flops_source,
    )


def _validation(fwd, val_stream: TokenStream, cfg: TrainConfig, bos_id: int, rt: T.Runtime, byte_lens, bpt_stats) -> dict:
    """Mean validation loss over the first `eval_batches` steps of validation windows, and bits per
    byte (exact from the tokenizer's token byte lengths, else from the tokenizer stage's stats)."""
    info, device = rt.info, rt.device
    fwd.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    n_tok = torch.zeros((), dtype=torch.float64, device=device)
    bpb_nats = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for b in val_batches(val_stream, cfg.seq_len, cfg.batch_size, cfg.eval_batches, bos_id=bos_id,
                             packing=cfg.packing, dp_rank=info.dp_rank, dp_size=info.dp_size, device=device):
            with rt.autocast():
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


def _check_model_parallel(cfg: TrainConfig, info) -> None:
    """What pipeline / context parallelism need of the pretraining data layout."""
    if info.pp_size > 1:
        if cfg.packing != "separator":
            raise ConfigError("parallel.pp > 1 needs pretrain.packing = 'separator': document ids do not travel between pipeline stages")
        if cfg.batch_size % cfg.parallel.pp_microbatches:
            raise ConfigError(f"pretrain.batch_size = {cfg.batch_size} must be divisible by parallel.pp_microbatches = {cfg.parallel.pp_microbatches}")
    elif info.cp_size > 1 and cfg.seq_len % info.cp_size:
        raise ConfigError(f"pretrain.seq_len = {cfg.seq_len} must be divisible by parallel.cp = {info.cp_size}")


__all__ = ["train", "TrainResult", "TrainingDiverged"]
