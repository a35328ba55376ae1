"""Direct preference optimisation: `run_dpo(cfg, out_dir, base=..., seed=...)`.

DPO trains the chat model (the policy) directly on preference pairs, against a frozen reference
(the starting model). With pi and ref the log-probabilities of a response summed over its tokens
(the answer and its `<|end|>`; `Transformer.token_logprobs`, the fused head):

    sigmoid (default, TRL's):  loss = -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
    ipo:                       loss = ((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 beta))^2
                               with log-probs averaged over the response tokens (as TRL's IPO)

At step 0 the policy is the reference, so the sigmoid loss is ln 2 and the IPO loss 1 / (4 beta^2)
(both tested). Logged per step: loss, rewards_chosen / rewards_rejected (beta * (pi - ref)),
reward_margin, accuracy (the share of pairs whose chosen reward is higher; a tie counts one half,
so step 0 reads 0.5). The eval hook logs the same on the held-out pairs, and `heldout_logp_accuracy`
(pi_c > pi_r: whether the model itself now prefers the chosen answer).

Reference log-probs: `reference = "precomputed"` (default) computes them once before training, in
eval mode (under the training autocast), for the training and held-out pairs, and stores them in `<out>/ref_logps.pt` keyed by
the data's fingerprint and the reference model, so a resumed run reads them back instead of
recomputing; `reference = "live"` keeps a frozen copy of the starting model and computes them on
every batch (twice the memory, no precompute). With LoRA the reference is the starting model with
no adapters — precomputed before the adapters are applied, or the frozen copy taken before them.

Checkpoints are the SFT stage's layout (`dpo/<name>/step_N/`): model.safetensors always the plain
(merged) model, adapter.safetensors with LoRA, state.json `{"stage": "dpo", "chat_template", ...}`,
so every consumer (eval, generate, export, serve) takes the DPO model as it takes an SFT model.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import config as cfgmod
from lmforge.errors import ConfigError
from lmforge.log import logger
from lmforge.posttrain.config import LoraSection
from lmforge.posttrain.pref_data import PairBatch, PairBatches, iter_batches, pairs_fingerprint, prepare_pairs
from lmforge.posttrain.rm import (apply_lora_section, load_chat_model, pair_accuracy, seq_limit, validate_pref_fields,
                                  write_data_files)
from lmforge.rundir import read_json
from lmforge.tokenizer.chat import template_id
from lmforge.train import trainer as T
from lmforge.train.config import TrainerConfig

REF_FILE = "ref_logps.pt"
LOSSES = ("sigmoid", "ipo")


@dataclass
class DPOConfig(TrainerConfig):
    name: str = ""  # output sub-directory of dpo/ ("" = the run's name)
    base: str = ""  # the chat model to align ("" = the run's SFT model); any path lmforge generate takes
    tokenizer: str = ""  # "" = the base model's tokenizer
    data: list[str] = field(default_factory=list)  # preference JSONL ({"prompt", "chosen", "rejected"}); [] = the built-in pairs
    eval_data: list[str] = field(default_factory=list)  # held-out preference JSONL; [] = `heldout` of the data split off
    dictionary: str = ""  # GCIDE JSONL for the built-in pairs ("" = the bundled sample's)
    pairs: int = 1000  # pairs in the built-in set (train + held out)
    heldout: float = 0.1  # share held out (the built-in set: by headword, the SFT chat set's split)
    sampled: float = 0.0  # share of built-in pairs whose rejected answer is sampled from the base model
    seq_len: int = 0  # longest pair side in tokens (0 = the model's context)
    batch_size: int = 8  # pairs per micro-batch
    overflow: Literal["truncate", "drop"] = "truncate"
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    beta: float = 0.1
    reference: Literal["precomputed", "live"] = "precomputed"
    eval_batch_size: int = 32
    lora: LoraSection = field(default_factory=LoraSection)
    sample_prompts: list[str] = field(default_factory=lambda: ["What does serendipity mean?"])
    sample_tokens: int = 48
    # trainer defaults for fine-tuning (keys as in [pretrain])
    max_steps: int = 200
    optimizer: Literal["muon", "adamw"] = "adamw"
    lr: float = 1e-4
    schedule: Literal["wsd", "cosine", "constant"] = "cosine"
    warmup_steps: int = 10
    checkpoint_every: int = 100
    eval_every: int = 50
    log_every: int = 10

    RESUME_FREE = TrainerConfig.RESUME_FREE + ("name", "eval_batch_size", "eval_data", "sample_prompts", "sample_tokens")

    def validate(self) -> None:
        validate_pref_fields(self, "dpo")
        if not self.beta > 0:
            raise ConfigError(f"dpo.beta = {self.beta} must be > 0")

    def trainer_config(self) -> TrainerConfig:
        return TrainerConfig.from_fields(self)


# ---- log-probs and the loss -----------------------------------------------------------------


def _logprob_fn(model):
    """The per-token log-prob function of `model`: its `token_logprobs` (a plain or compiled
    Transformer, fused head), or — for a wrapper without it (DDP) — log_softmax of the logits of a
    forward call through the wrapper (so its gradient hooks run)."""
    if hasattr(model, "token_logprobs"):
        return model.token_logprobs

    def via_forward(x, y):
        logits, _ = model(x)
        valid = y != -100
        lp = logits.float().log_softmax(-1).gather(-1, torch.where(valid, y, 0)[..., None]).squeeze(-1)
        return lp * valid

    return via_forward


def sequence_logps(model, batch: PairBatch, average: bool = False) -> torch.Tensor:
    """(2B,) log-probability of each row's response (summed, or averaged with `average`)."""
    x, y = batch.lm_inputs()
    lp = _logprob_fn(model)(x, y).float()
    s = lp.sum(-1)
    if average:
        s = s / (y != -100).sum(-1).clamp(min=1)
    return s


def preference_loss(pi: torch.Tensor, ref: torch.Tensor, n_pairs: int, beta: float, kind: str = "sigmoid"
                    ) -> tuple[torch.Tensor, dict]:
    """DPO / IPO loss of (2B,) policy and reference log-probs (chosen rows first), and the metrics."""
    pi_c, pi_r, ref_c, ref_r = pi[:n_pairs], pi[n_pairs:], ref[:n_pairs], ref[n_pairs:]
    diff = (pi_c - ref_c) - (pi_r - ref_r)
    if kind == "sigmoid":
        losses = -F.logsigmoid(beta * diff)
    elif kind == "ipo":
        losses = (diff - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ConfigError(f"dpo.loss = {kind!r}: allowed {', '.join(LOSSES)}")
    rc, rr = (beta * (pi_c - ref_c)).detach(), (beta * (pi_r - ref_r)).detach()
    return losses.mean(), {"rewards_chosen": rc.mean(), "rewards_rejected": rr.mean(), "reward_margin": (rc - rr).mean(),
                           "accuracy": pair_accuracy(rc - rr)}


def make_dpo_loss(beta: float, kind: str = "sigmoid", ref_model: nn.Module | None = None):
    """loss_fn(model, batch) for the trainer: reference log-probs from the batch (precomputed) or
    from `ref_model` (live, no grad)."""
    average = kind == "ipo"

    def dpo_loss(model, batch: PairBatch):
        pi = sequence_logps(model, batch, average)
        if ref_model is not None:
            with torch.no_grad():
                ref = sequence_logps(ref_model, batch, average)
        elif batch.ref is not None:
            ref = batch.ref.to(pi.device)
        else:
            raise ValueError("DPO batch without reference log-probs and no reference model")
        return preference_loss(pi, ref, batch.n_pairs, beta, kind)

    return dpo_loss


@torch.no_grad()
def logps_of(model: nn.Module, examples, batch_size: int, pad_id, average: bool = False) -> torch.Tensor:
    """(N, 2) summed (or averaged) response log-probs (chosen, rejected) of every pair, eval mode."""
    if not examples:
        return torch.zeros(0, 2)
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    try:
        for b in iter_batches(examples, batch_size, pad_id):
            s = sequence_logps(model, b.to(dev), average).cpu()
            out.append(torch.stack([s[: b.n_pairs], s[b.n_pairs :]], 1))
    finally:
        model.train(was)
    return torch.cat(out)


def heldout_metrics(pi: torch.Tensor, ref: torch.Tensor, beta: float, kind: str) -> dict:
    """Held-out figures from (N, 2) policy and reference log-probs."""
    if pi.numel() == 0:
        return {}
    n = pi.shape[0]
    loss, m = preference_loss(torch.cat([pi[:, 0], pi[:, 1]]), torch.cat([ref[:, 0], ref[:, 1]]), n, beta, kind)
    return {"heldout_loss": float(loss), "heldout_accuracy": float(m["accuracy"]), "heldout_margin": float(m["reward_margin"]),
            "heldout_logp_accuracy": float(pair_accuracy(pi[:, 0] - pi[:, 1]))}


def reference_logps(model: nn.Module, train, heldout, cfg: DPOConfig, pad_id, out_dir: Path, key: str,
                    is_main: bool = True) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(train (N, 2), held-out (M, 2), reused) reference log-probs: read from `<out_dir>/ref_logps.pt`
    when it was made for the same data and reference (`key`), else computed with `model` and saved."""
    from lmforge.rundir import atomic_write_bytes

    f = out_dir / REF_FILE
    if f.is_file():
        try:
            saved = torch.load(f, map_location="cpu", weights_only=True)
        except Exception:  # a corrupt file is recomputed  # noqa: BLE001
            saved = None
        if isinstance(saved, dict) and saved.get("key") == key:
            return saved["train"], saved["heldout"], True
    average = cfg.loss == "ipo"
    tr = logps_of(model, train, cfg.eval_batch_size, pad_id, average)
    he = logps_of(model, heldout, cfg.eval_batch_size, pad_id, average)
    if is_main:
        import io

        buf = io.BytesIO()
        torch.save({"key": key, "train": tr, "heldout": he}, buf)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(f, buf.getvalue())
    return tr, he, False


# ---- the stage's work ------------------------------------------------------------------------


@dataclass
class DPOResult:
    out_dir: Path
    steps: int = 0
    final_loss: float | None = None
    first_loss: float | None = None  # the step-1 train record's loss (ln 2 for sigmoid with log_every = 1)
    checkpoint: Path | None = None
    base: str = ""
    trainable_params: int = 0
    total_params: int = 0
    before: dict = field(default_factory=dict)  # held-out figures of the starting model (policy = reference)
    after: dict = field(default_factory=dict)  # held-out figures at the end (the last eval record)
    train_record: dict = field(default_factory=dict)
    data_stats: dict = field(default_factory=dict)
    reference_reused: bool = False
    samples: list[dict] = field(default_factory=list)
    metrics_path: Path | None = None
    plot_path: Path | None = None
    wall_time_s: float = 0.0
    resumed_from: int | None = None


def run_dpo(cfg: DPOConfig, out_dir: str | Path, *, base: str | Path, seed: int = 1234, tokenizer: str | Path | None = None,
            resolve=lambda p: Path(p)) -> DPOResult:
    """Align the chat model at `base` on preference pairs with DPO (or IPO) into `out_dir`
    (step_N/ + latest, metrics.jsonl, loss.png, ref_logps.pt, data/). Resumes from the newest
    intact checkpoint there (cfg.resume), reusing the stored reference log-probs."""
    from lmforge.posttrain import lora as L
    from lmforge.posttrain.sft import chat_samples

    t0 = time.time()
    out_dir = Path(out_dir)
    tcfg = cfg.trainer_config()
    runtime = T.setup(tcfg, "dpo")
    model, tok, ref = load_chat_model(base, runtime, tokenizer, "dpo")
    max_tokens = seq_limit(cfg, model, "dpo")
    if max_tokens < 3:
        raise ConfigError(f"dpo.seq_len = {max_tokens} is too short for a pair")
    train, heldout, held_pairs, stats = prepare_pairs(cfg, tok, max_tokens, seed, resolve, model=model, section="dpo")
    if runtime.is_main:
        write_data_files(out_dir, held_pairs, stats)
    logger.info("dpo: %d training pairs, %d held out; base %s; %s loss, beta %g, %s reference", len(train), len(heldout),
                ref.path, cfg.loss, cfg.beta, cfg.reference)

    # the reference: the starting model, before any adapter
    # (live: only the held-out pairs' reference log-probs are stored, for the eval hook)
    live = cfg.reference == "live"
    weights_sum = ((read_json(ref.path / "state.json", {}) or {}).get("checksums") or {}).get("model.safetensors", "")
    key = f"{pairs_fingerprint([] if live else train)}:{pairs_fingerprint(heldout)}:{ref.path}:{ref.step}:{weights_sum}:{cfg.loss}"
    with runtime.autocast():
        ref_train, ref_held, reused = reference_logps(model, [] if live else train, heldout, cfg, tok.pad_id, out_dir, key,
                                                      runtime.is_main)
    ref_model = None
    if live:
        ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    before = heldout_metrics(ref_held, ref_held, cfg.beta, cfg.loss)

    torch.manual_seed(seed)
    lcfg = apply_lora_section(model, cfg.lora)
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batches = PairBatches(train, cfg.batch_size, seed, tok.pad_id, ref=None if live else ref_train,
                          dp_rank=runtime.info.dp_rank, dp_size=runtime.info.dp_size, device=runtime.device)

    def evaluate(ts) -> dict:
        if not heldout:
            return {}
        with ts.runtime.autocast():
            pi = logps_of(ts.model, heldout, cfg.eval_batch_size, tok.pad_id, cfg.loss == "ipo")
        return heldout_metrics(pi, ref_held, cfg.beta, cfg.loss)

    def sample(ts):
        msgs = [[{"role": "user", "content": p}] for p in cfg.sample_prompts]
        return chat_samples(ts.model, tok, msgs, cfg.sample_tokens)

    hooks: dict = {}
    if lcfg is not None:
        hooks["export_weights"] = lambda _weights: L.merged_state_dict(model)
        hooks["extra_files"] = lambda _ts: {"adapter.safetensors": L.adapter_bytes(model, lcfg)}
        hooks["restore_weights"] = lambda m, step_dir: L.load_adapter(m, step_dir / "adapter.safetensors")
    lora_state = dataclasses.asdict(cfg.lora) if cfg.lora.r else None
    extra_state = {"stage": "dpo", "chat_template": template_id(), "base": str(ref.path.resolve()), "lora": lora_state,
                   "loss": cfg.loss, "beta": cfg.beta, "reference": cfg.reference}
    res = T.fit(
        tcfg, runtime, model, batches, make_dpo_loss(cfg.beta, cfg.loss, ref_model), out_dir, name="dpo",
        run_config={**cfgmod.to_dict(cfg), "seq_len": max_tokens, "base": str(ref.path), "data_fingerprint": batches.fingerprint},
        resume_free=DPOConfig.RESUME_FREE, model_config=model.cfg.to_dict(), tokenizer_file=tok.path,
        evaluate=evaluate, sample=sample if cfg.sample_prompts and cfg.sample_tokens else None,
        extra_state=extra_state, data_desc="the preference data", plot_title=f"{'DPO' if cfg.loss == 'sigmoid' else 'IPO'} loss",
        **hooks,
    )
    first = _first_loss(res.metrics_path)
    return DPOResult(
        out_dir=out_dir, steps=res.steps, final_loss=res.final_loss, first_loss=first, checkpoint=res.checkpoint,
        base=str(ref.path), trainable_params=n_train, total_params=model.cfg.num_params(), before=before,
        after={k: v for k, v in res.eval_metrics.items() if k.startswith("heldout_")}, train_record=res.train_record,
        data_stats=stats, reference_reused=reused, samples=res.samples, metrics_path=res.metrics_path,
        plot_path=res.plot_path, wall_time_s=time.time() - t0, resumed_from=res.resumed_from,
    )


def _first_loss(metrics_path: Path | None) -> float | None:
    import json

    if metrics_path is None or not metrics_path.is_file():
        return None
    for line in metrics_path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("kind") == "train" and r.get("step") == 1:
            return r.get("loss")
    return None


__all__ = ["DPOConfig", "DPOResult", "run_dpo", "preference_loss", "make_dpo_loss", "sequence_logps", "logps_of",
           "heldout_metrics", "reference_logps", "REF_FILE", "LOSSES"]
