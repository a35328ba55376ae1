"""Training Medusa heads (Medusa-1: the model frozen, only the heads learn): `run_medusa(cfg, out_dir,
base=..., tokens=... | data=[...])`.

A batch source + a loss on the shared trainer (lmforge.train.trainer), so resume, checksummed
checkpoints, metrics and progress are the trainer's:

1. the base model and its tokenizer load through the checkpoint reader (checksums verified) and
   are frozen; the heads (lmforge.infer.medusa.MedusaHeads) are the only trainable parameters;
2. data: token shards (`--tokens DIR`, the tokenizer stage's layout; default: the base model's
   run's tokens/) or text files (`--data`: .txt, .jsonl / .jsonl.gz / .jsonl.zst with a "text"
   field, or directories of them), encoded once with the model's tokenizer into
   `<out>/data/tokens/`; windows of `seq_len + 1` tokens, shuffled, resumable (BatchLoader);
   `self_distill = N` (Medusa-2-style self-distillation data) trains instead on N greedy
   continuations by the model itself of prompts cut from that text (generated once, batched,
   through lmforge.infer.engine, kept in `<out>/data/self/`);
3. loss: the base model's final hidden states h_t (no gradient), and for head k (1..K) the
   cross-entropy of its logits at t against token t+1+k, weighted decay^(k-1); targets that lie in
   another packed document are left out. `targets = "model"` (self-distillation) trains against the
   base model's own greedy prediction of that token (teacher-forced) instead of the text's token:
   what greedy verification accepts;
4. checkpoints (`<out>/checkpoints/step_N/`) hold the heads only; at the end `<out>/medusa.json` +
   `medusa.safetensors` (lmforge.infer.medusa.save_heads: config, base model and its checksum,
   training figures) is what `lmforge generate --medusa <out>` loads.

Evaluation (every eval_every steps and at the end, on the validation split): per head, top-1
agreement with the base model's greedy token (`val_agree_k`), the figure acceptance depends on.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import config as cfgmod
from lmforge.errors import ConfigError, InputError
from lmforge.log import logger
from lmforge.rundir import atomic_write_json, file_fingerprint, fingerprint, read_json
from lmforge.train import trainer as T
from lmforge.train.config import TrainerConfig, check_trainer_fields


@dataclass
class MedusaTrainConfig(TrainerConfig):
    heads: int = 3  # K extra heads: head k guesses token t+1+k
    layers: int = 1  # residual blocks per head
    own_head: bool = False  # each head gets its own output layer (initialised from the model's) instead of sharing it
    targets: Literal["data", "model"] = "data"  # the text's tokens, or the base model's greedy predictions (self-distillation)
    decay: float = 0.8  # loss weight of head k: decay^(k-1)
    self_distill: int = 0  # > 0: train on this many of the model's own greedy continuations of prompts from the text
    self_prompt_tokens: int = 16  # prompt length (tokens of the text) of each self-distillation sequence
    seq_len: int = 0  # tokens per row (0 = min(256, the model's context))
    batch_size: int = 8
    max_tokens: int = 2_000_000  # --data: at most this many tokens are encoded
    val_fraction: float = 0.02  # --data: documents held out for the validation figures
    eval_batches: int = 4
    # trainer defaults for head training (keys as in [pretrain])
    max_steps: int = 300
    optimizer: Literal["muon", "adamw"] = "adamw"
    lr: float = 1e-3
    schedule: Literal["wsd", "cosine", "constant"] = "cosine"
    warmup_steps: int = 10
    checkpoint_every: int = 100
    eval_every: int = 100
    log_every: int = 10

    RESUME_FREE = TrainerConfig.RESUME_FREE + ("eval_batches",)

    def validate(self) -> None:
        check_trainer_fields(self, "medusa")
        if not 1 <= self.heads <= 16:
            raise ConfigError(f"medusa.heads = {self.heads} must be between 1 and 16")
        if not 1 <= self.layers <= 8:
            raise ConfigError(f"medusa.layers = {self.layers} must be between 1 and 8")
        if not 0 < self.decay <= 1:
            raise ConfigError(f"medusa.decay = {self.decay} must be in (0, 1]")
        if self.seq_len < 0 or self.batch_size < 1:
            raise ConfigError(f"medusa.seq_len ({self.seq_len}) must be >= 0 and medusa.batch_size ({self.batch_size}) >= 1")
        if self.max_tokens < 1000:
            raise ConfigError(f"medusa.max_tokens = {self.max_tokens} must be >= 1000")
        if not 0 <= self.val_fraction < 0.5:
            raise ConfigError(f"medusa.val_fraction = {self.val_fraction} must be in [0, 0.5)")
        if self.eval_batches < 0:
            raise ConfigError(f"medusa.eval_batches = {self.eval_batches} must be >= 0")
        if self.self_distill < 0 or self.self_prompt_tokens < 1:
            raise ConfigError(f"medusa.self_distill ({self.self_distill}) must be >= 0 and medusa.self_prompt_tokens "
                              f"({self.self_prompt_tokens}) >= 1")

    def trainer_config(self) -> TrainerConfig:
        return TrainerConfig.from_fields(self)


@dataclass
class MedusaResult:
    out_dir: Path
    heads_dir: Path
    steps: int = 0
    final_loss: float | None = None
    eval: dict = field(default_factory=dict)
    first_eval: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    trainable_params: int = 0
    wall_time_s: float = 0.0
    resumed_from: int | None = None


class MedusaTraining(nn.Module):
    """The frozen base model and the trainable heads, as one module for the trainer. The base stays
    in eval mode whatever the trainer asks."""

    def __init__(self, base: nn.Module, heads: nn.Module):
        super().__init__()
        self.base, self.heads = base, heads
        for p in base.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()
        return self


def _unwrap(m):
    return getattr(m, "module", m)


def head_targets(batch, h, base, k: int, targets: str, bos_id: int, pred=None) -> torch.Tensor:
    """Targets (B, T-k-1) of 0-based head k at positions 0 .. T-k-2: token t+2+k of the text (or the
    base model's greedy prediction of it), -100 where it lies in another packed document."""
    s = k + 1
    tgt = (batch.y if targets == "data" else pred)[:, s:]
    if batch.doc_ids is not None:
        doc = batch.doc_ids
        doc_y = doc + (batch.y == bos_id).to(doc.dtype)  # document of token t+1
        tgt = tgt.masked_fill(doc[:, : doc.shape[1] - s] != doc_y[:, s:], -100)
    return tgt


def medusa_loss(cfg: MedusaTrainConfig, bos_id: int):
    def loss_fn(module, batch):
        m = _unwrap(module)
        base, heads = m.base, m.heads
        with torch.no_grad():
            h = base.hidden_states(batch.x, doc_ids=batch.doc_ids)
            pred = base.lm_head(h).argmax(-1) if cfg.targets == "model" else None
        T_ = h.shape[1]
        total, wsum, extras = 0.0, 0.0, {}
        for k in range(heads.cfg.heads):
            s = k + 1
            tgt = head_targets(batch, h, base, k, cfg.targets, bos_id, pred)
            logits = heads.head_logits(k, h[:, : T_ - s], base.lm_head).float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
            w = cfg.decay ** k
            total, wsum = total + w * loss, wsum + w
            valid = tgt != -100
            with torch.no_grad():
                acc = ((logits.argmax(-1) == tgt) & valid).sum() / valid.sum().clamp(min=1)
            extras[f"head{k + 1}_loss"] = loss.detach()
            extras[f"head{k + 1}_acc"] = acc.float()
        return total / wsum, extras

    return loss_fn


@torch.no_grad()
def agreement(base, heads, batches, bos_id: int = 0) -> dict[str, float]:
    """Per head: how often its top-1 guess equals the base model's greedy token at that position
    (teacher-forced on the text): what greedy verification accepts."""
    hits = torch.zeros(heads.cfg.heads)
    counts = torch.zeros(heads.cfg.heads)
    for b in batches:
        h = base.hidden_states(b.x, doc_ids=b.doc_ids)
        pred = base.lm_head(h).argmax(-1)
        for k in range(heads.cfg.heads):
            s = k + 1
            tgt = pred[:, s:]
            if b.doc_ids is not None:
                doc_y = b.doc_ids + (b.y == bos_id).to(b.doc_ids.dtype)
                ok = b.doc_ids[:, : b.doc_ids.shape[1] - s] == doc_y[:, s:]
            else:
                ok = torch.ones_like(tgt, dtype=torch.bool)
            guess = heads.head_logits(k, h[:, : h.shape[1] - s], base.lm_head).argmax(-1)
            hits[k] += ((guess == tgt) & ok).sum().item()
            counts[k] += ok.sum().item()
    return {f"val_agree_{k + 1}": float(hits[k] / counts[k]) if counts[k] else 0.0 for k in range(heads.cfg.heads)}


# ---- data ------------------------------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst")


def data_files(paths: list[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES))
            if not found:
                raise InputError(f"--data {p}: no {', '.join(TEXT_SUFFIXES)} files in it")
            out += found
        elif p.is_file():
            if not p.name.endswith(TEXT_SUFFIXES):
                raise InputError(f"--data {p}: not a text file ({', '.join(TEXT_SUFFIXES)})")
            out.append(p)
        else:
            raise InputError(f"--data {p} not found")
    return out


def read_texts(files: list[Path], stats: dict):
    """Documents of the files: a .txt file is one document; JSONL lines need a "text" string
    (others are counted as malformed and skipped)."""
    from lmforge.tokenizer.corpus import ReadStats, iter_docs

    for f in files:
        if f.name.endswith(".txt"):
            stats["docs"] = stats.get("docs", 0) + 1
            yield f.read_text(encoding="utf-8", errors="replace")
        elif f.name.endswith(".zst"):
            rs = ReadStats()
            for d in iter_docs(f, rs):
                yield d.text
            stats["docs"] = stats.get("docs", 0) + rs.docs
            stats["malformed"] = stats.get("malformed", 0) + rs.corrupt
        else:
            opener = gzip.open if f.name.endswith(".gz") else open
            try:
                with opener(f, "rt", encoding="utf-8", errors="replace") as fh:
                    for line in fh:
                        if not line.strip():
                            continue
                        try:
                            text = json.loads(line)["text"]
                            if not isinstance(text, str):
                                raise TypeError
                        except (ValueError, KeyError, TypeError):
                            stats["malformed"] = stats.get("malformed", 0) + 1
                            continue
                        stats["docs"] = stats.get("docs", 0) + 1
                        yield text
            except (OSError, EOFError) as e:
                stats["unreadable"] = stats.get("unreadable", 0) + 1
                logger.warning("medusa: %s: cannot read (%s); skipped", f, e)


def encode_data(files: list[Path], tok, out: Path, max_tokens: int, val_fraction: float, seed: int) -> tuple[Path, dict]:
    """Encode the text files into token shards at `out` (reused when the files, tokenizer and
    limits are unchanged). Returns (tokens dir, stats)."""
    import random

    from lmforge.train.data import write_token_shards

    fp = fingerprint([file_fingerprint(files), str(tok.path), max_tokens, val_fraction, seed])
    src = out / "source.json"
    old = read_json(src, {}) or {}
    if old.get("fingerprint") == fp and (out / "index.json").is_file():
        return out, old.get("stats", {})
    stats: dict = {}
    docs, n = [], 0
    for text in read_texts(files, stats):
        ids = tok.encode(text)
        if not ids:
            continue
        docs.append(ids)
        n += len(ids) + 1
        if n >= max_tokens:
            break
    if not docs:
        raise InputError(f"no text in {', '.join(map(str, files[:3]))}{' ...' if len(files) > 3 else ''}")
    random.Random(seed).shuffle(docs)
    n_val = int(len(docs) * val_fraction) if len(docs) > 20 else 0
    write_token_shards(out, {"train": docs[n_val:], "val": docs[:n_val]}, vocab_size=tok.vocab_size,
                       bos_id=tok.bos_id if tok.bos_id is not None else 0, eos_id=tok.eos_id)
    stats.update(tokens=n, encoded_docs=len(docs), val_docs=n_val)
    atomic_write_json(src, {"fingerprint": fp, "files": [str(f) for f in files], "stats": stats})
    return out, stats


def self_distill_data(model, tok, stream, cfg: MedusaTrainConfig, seq_len: int, seed: int, out: Path,
                      model_sum: str | None) -> tuple[Path, dict]:
    """Medusa-2-style self-distillation data: `cfg.self_distill` greedy continuations by the model
    itself (lmforge.infer.engine, batched) of prompts cut from the text, each `seq_len + 1` tokens
    long, written as token shards at `out` (reused while the model, the text and the settings are
    unchanged). Training on them teaches the heads the model's own trajectories, which greedy
    verification accepts."""
    import numpy as np

    from lmforge.infer.engine import SamplingParams, generate
    from lmforge.train.data import write_token_shards

    n, plen = cfg.self_distill, min(cfg.self_prompt_tokens, seq_len // 2)
    fp = fingerprint([model_sum, str(stream.paths), stream.total, n, plen, seq_len, seed])
    src = out / "source.json"
    old = read_json(src, {}) or {}
    if old.get("fingerprint") == fp and (out / "index.json").is_file():
        return out, old.get("stats", {})
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, max(1, stream.total - plen), size=n)
    bos = [tok.bos_id] if tok.bos_id is not None else []
    prompts = [bos + stream.read(int(s0), plen - len(bos)).tolist() for s0 in starts]
    t0 = time.time()
    outs = generate(model, prompts, SamplingParams(max_new_tokens=seq_len + 1 - plen, temperature=0, stop_token_ids=[]),
                    max_batch=64)
    docs = [p[len(bos):] + o.token_ids for p, o in zip(prompts, outs)]
    n_val = max(1, n // 20) if n >= 20 else 0
    write_token_shards(out, {"train": docs[n_val:], "val": docs[:n_val]}, vocab_size=model.cfg.vocab_size,
                       bos_id=tok.bos_id if tok.bos_id is not None else 0, eos_id=tok.eos_id)
    stats = {"self_distill_sequences": n, "self_distill_tokens": sum(len(d) + 1 for d in docs),
             "generation_s": round(time.time() - t0, 1)}
    atomic_write_json(src, {"fingerprint": fp, "stats": stats})
    logger.info("medusa: %d self-distillation sequences of %d tokens generated in %.0fs", n, seq_len + 1, time.time() - t0)
    return out, stats


def _run_tokens(ref) -> Path | None:
    """The tokens/ directory of the run the base model belongs to, if any."""
    for p in [ref.path, *ref.path.parents][:6]:
        if (p / "tokens" / "index.json").is_file():
            return p / "tokens"
    return None


# ---- the stage -------------------------------------------------------------------------------------

def run_medusa(cfg: MedusaTrainConfig, out_dir: str | Path, *, base: str | Path, tokens: str | Path | None = None,
               data: list[str | Path] | None = None, seed: int = 1234, tokenizer: str | Path | None = None) -> MedusaResult:
    """Train Medusa heads for the model at `base` into `out_dir` (checkpoints/ for resume, then
    medusa.json + medusa.safetensors). Resumes from the newest intact checkpoint (cfg.resume)."""
    from lmforge.infer import load_model_and_tokenizer
    from lmforge.infer.medusa import MedusaConfig, MedusaHeads, save_heads
    from lmforge.train.data import BatchLoader, TokenStream, read_index, val_batches

    t0 = time.time()
    cfg.validate()
    if tokens and data:
        raise ConfigError("give either --tokens DIR or --data FILE..., not both")
    out_dir = Path(out_dir)
    tcfg = cfg.trainer_config()
    runtime = T.setup(tcfg, "medusa")
    model, tok, ref = load_model_and_tokenizer(base, device=runtime.device, tokenizer=tokenizer)
    seq_len = cfg.seq_len or min(256, model.cfg.max_seq_len)
    if seq_len > model.cfg.max_seq_len:
        raise ConfigError(f"medusa.seq_len = {seq_len} is longer than the model's context ({model.cfg.max_seq_len})")
    if seq_len <= cfg.heads + 1:
        raise ConfigError(f"medusa.seq_len = {seq_len} must be longer than heads + 1 = {cfg.heads + 1}")

    data_stats: dict = {}
    if data:
        tokens_dir, data_stats = encode_data(data_files(data), tok, out_dir / "data" / "tokens", cfg.max_tokens,
                                             cfg.val_fraction, seed)
        data_stats["source"] = ", ".join(map(str, data))
    else:
        tokens_dir = Path(tokens) if tokens else _run_tokens(ref)
        if tokens_dir is None:
            raise InputError(f"no training text for {ref.path}: pass --tokens DIR (token shards) or --data FILE (text)")
        data_stats["source"] = str(tokens_dir)
    index = read_index(tokens_dir)
    stream = TokenStream(index, "train")
    base_sum = ((read_json(ref.path / "state.json", {}) or {}).get("checksums") or {}).get("model.safetensors")
    if cfg.self_distill:
        if stream.total <= cfg.self_prompt_tokens:
            raise InputError(f"{tokens_dir}: too little text for self-distillation prompts")
        was = model.training
        tokens_dir, sd_stats = self_distill_data(model, tok, stream, cfg, seq_len, seed, out_dir / "data" / "self", base_sum)
        model.train(was)
        data_stats.update(sd_stats)
        data_stats["source"] = f"the model's greedy continuations of prompts from {data_stats['source']}"
        index = read_index(tokens_dir)
        stream = TokenStream(index, "train")
    if stream.total == 0:
        raise InputError(f"{tokens_dir}: the train split holds no tokens")
    if stream.max_token() >= model.cfg.vocab_size:
        raise InputError(f"{tokens_dir} holds token id {stream.max_token()} outside the model's vocabulary "
                         f"({model.cfg.vocab_size}): tokens made with another tokenizer")
    data_stats["train_tokens"] = stream.total
    val = TokenStream(index, "val") if index.splits.get("val") else None

    torch.manual_seed(seed)
    heads = MedusaHeads(MedusaConfig.for_model(model, cfg.heads, cfg.layers, cfg.own_head)).init_from(model)
    heads.to(runtime.device)
    module = MedusaTraining(model, heads)
    n_train = sum(p.numel() for p in heads.parameters())
    batches = BatchLoader(stream, seq_len, cfg.batch_size, seed=seed, bos_id=index.bos_id, packing="doc_mask",
                          dp_rank=runtime.info.dp_rank, dp_size=runtime.info.dp_size, device=runtime.device)
    logger.info("medusa: %d heads (%s parameters) on %s, frozen; %d training tokens from %s",
                cfg.heads, f"{n_train:,}", ref.path, stream.total, data_stats["source"])

    evals: list[dict] = []

    def evaluate(ts):
        if val is None or cfg.eval_batches == 0:
            return {}
        vb = list(val_batches(val, seq_len, cfg.batch_size, cfg.eval_batches, bos_id=index.bos_id, packing="doc_mask",
                              device=runtime.device))
        if not vb:
            return {}
        heads.eval()
        try:
            r = agreement(model, heads, vb, index.bos_id)
        finally:
            heads.train()
        evals.append(r)
        return r

    prefix = "heads."
    res = T.fit(
        tcfg, runtime, module, batches, medusa_loss(cfg, index.bos_id), out_dir / "checkpoints", name="medusa",
        run_config={**cfgmod.to_dict(cfg), "seq_len": seq_len, "base": str(ref.path), "tokens": str(tokens_dir)},
        resume_free=MedusaTrainConfig.RESUME_FREE, model_config=dataclasses.asdict(heads.cfg),
        tokens_per_step=cfg.batch_size * seq_len * tcfg.grad_accum * runtime.info.dp_size,
        evaluate=evaluate, extra_state={"stage": "medusa", "base": str(ref.path.resolve())},
        export_weights=lambda w: {k[len(prefix):]: v for k, v in w.items() if k.startswith(prefix)},
        restore_weights=lambda m, step_dir: _restore(m, step_dir), data_desc="the Medusa training text",
        plot_title="Medusa heads loss",
    )
    heads.eval()
    train_info = {"steps": res.steps, "final_loss": res.final_loss, "targets": cfg.targets, "seq_len": seq_len,
                  "eval": res.eval_metrics or {}, "data": data_stats}
    save_heads(heads, out_dir, base={"path": str(ref.path.resolve()), "checksum": base_sum}, extra={"train": train_info})
    return MedusaResult(out_dir=out_dir, heads_dir=out_dir, steps=res.steps, final_loss=res.final_loss,
                        eval={k: v for k, v in (res.eval_metrics or {}).items() if k.startswith("val_")},
                        first_eval=evals[0] if evals else {}, data=data_stats, trainable_params=n_train,
                        wall_time_s=time.time() - t0, resumed_from=res.resumed_from)


def _restore(module, step_dir: Path) -> None:
    from lmforge.model.io import read_safetensors

    tensors, _ = read_safetensors(step_dir / "model.safetensors", "Medusa head weights")
    heads = _unwrap(module).heads
    p = next(heads.parameters())
    heads.load_state_dict({k: v.to(p.device) for k, v in tensors.items()}, strict=True)


__all__ = ["MedusaTrainConfig", "MedusaResult", "run_medusa", "medusa_loss", "agreement", "encode_data", "data_files"]
