"""Reward model: `run_rm(cfg, out_dir, base=..., seed=...)` trains one; `load_reward_model(path)` scores.

A reward model is the chat model (the backbone, usually the SFT model) with a scalar head,
`nn.Linear(d_model, 1)`, read at the final hidden state (`Transformer.hidden_states`) of the last
response token — the `<|end|>` closing the assistant's answer. It is trained on preference pairs
(posttrain/pref_data.py) with the Bradley–Terry loss

    loss = -logsigmoid(r_chosen - r_rejected - margin)  [+ center * mean((r_chosen + r_rejected)^2)]

(`margin` and the centering term of TRL's `center_rewards_coefficient` are off by default), on the
shared trainer, so resume, checksummed checkpoints, metrics and NaN stops are the trainer's. The
held-out pair accuracy (r_chosen > r_rejected; a tie counts one half) is logged by the eval hook and
reported. The head starts at zero, so the step-0 loss is ln 2. The backbone trains fully, or
through LoRA / QLoRA adapters (`lora.r > 0`; the head always trains).

Checkpoint (`rm/<name>/step_N/`, the trainer's layout): `model.safetensors` = the backbone (with
LoRA merged: a plain chat model), `config.json`, `tokenizer.json`, `reward_head.safetensors` = the
head (`weight` (1, d_model), `bias` (1,)), `adapter.safetensors` with LoRA, and `state.json`
with `{"stage": "rm", "chat_template": ..., "base": ...}`.

Export: `lmforge export hf rm/<name>` exports the backbone like any chat model; copy
`reward_head.safetensors` beside it. Outside lmforge the reward of a conversation is then
`head(hidden_states[-1][last token])` — in transformers, the `LlamaModel` output's last hidden
state (after the final norm) at the last token of `apply_chat_template(conversation)`, times
`weight`, plus `bias`.

`load_reward_model(path).score(conversations)` gives a float per conversation (message lists
ending with an assistant turn), batched: what DPO/RL/rejection sampling and eval call.
"""

from __future__ import annotations

import dataclasses
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
from lmforge.posttrain.config import LoraSection
from lmforge.posttrain.pref_data import PairBatch, PairBatches, iter_batches, prepare_pairs, write_pairs_jsonl
from lmforge.rundir import atomic_write_json, read_json
from lmforge.tokenizer.chat import check_messages, check_template, render, template_id
from lmforge.train import trainer as T
from lmforge.train.config import TrainerConfig, check_trainer_fields

HEAD_FILE = "reward_head.safetensors"
HEAD_META = "lmforge_reward_head"


@dataclass
class RMConfig(TrainerConfig):
    name: str = ""  # output sub-directory of rm/ ("" = the run's name)
    base: str = ""  # the chat model to start from ("" = the run's SFT model); any path lmforge generate takes
    tokenizer: str = ""  # "" = the base model's tokenizer
    data: list[str] = field(default_factory=list)  # preference JSONL ({"prompt", "chosen", "rejected"}); [] = the built-in pairs
    eval_data: list[str] = field(default_factory=list)  # held-out preference JSONL; [] = `heldout` of the data split off
    dictionary: str = ""  # GCIDE JSONL for the built-in pairs ("" = the bundled sample's)
    pairs: int = 1000  # pairs in the built-in set (train + held out)
    heldout: float = 0.1  # share held out (the built-in set: by headword, the SFT chat set's split)
    sampled: float = 0.0  # share of built-in pairs whose rejected answer is sampled from the base model
    seq_len: int = 0  # longest pair side in tokens (0 = the model's context)
    batch_size: int = 8  # pairs per micro-batch
    overflow: Literal["truncate", "drop"] = "truncate"  # a pair longer than seq_len
    margin: float = 0.0  # Bradley–Terry margin: -logsigmoid(r_c - r_r - margin)
    center: float = 0.0  # coefficient of the centering term mean((r_c + r_r)^2) (0 = off)
    eval_batch_size: int = 32
    lora: LoraSection = field(default_factory=LoraSection)
    # trainer defaults for fine-tuning (keys as in [pretrain])
    max_steps: int = 200
    optimizer: Literal["muon", "adamw"] = "adamw"
    lr: float = 3e-4
    schedule: Literal["wsd", "cosine", "constant"] = "cosine"
    warmup_steps: int = 10
    checkpoint_every: int = 100
    eval_every: int = 50
    log_every: int = 10

    RESUME_FREE = TrainerConfig.RESUME_FREE + ("name", "eval_batch_size", "eval_data")

    def validate(self) -> None:
        validate_pref_fields(self, "rm")
        if self.margin < 0 or self.center < 0:
            raise ConfigError(f"rm.margin ({self.margin}) and rm.center ({self.center}) must be >= 0")

    def trainer_config(self) -> TrainerConfig:
        return TrainerConfig.from_fields(self)


def validate_pref_fields(cfg, section: str) -> None:
    """Checks RMConfig and DPOConfig share (the message names `section.key`)."""
    check_trainer_fields(cfg, section)
    cfg.lora.validate()
    if cfg.optimizer != "adamw":
        raise ConfigError(f"{section}.optimizer = {cfg.optimizer!r}: preference stages train with 'adamw' only")
    if cfg.seq_len < 0 or cfg.batch_size < 1 or cfg.eval_batch_size < 1:
        raise ConfigError(f"{section}.seq_len ({cfg.seq_len}) must be >= 0, {section}.batch_size ({cfg.batch_size}) "
                          f"and {section}.eval_batch_size ({cfg.eval_batch_size}) >= 1")
    if cfg.pairs < 10:
        raise ConfigError(f"{section}.pairs = {cfg.pairs} must be >= 10")
    if not 0.0 <= cfg.heldout < 1.0:
        raise ConfigError(f"{section}.heldout = {cfg.heldout} must be in [0, 1)")
    if not 0.0 <= cfg.sampled <= 1.0:
        raise ConfigError(f"{section}.sampled = {cfg.sampled} must be in [0, 1]")


# ---- the model --------------------------------------------------------------------------------


class RewardModel(nn.Module):
    """A chat model (`backbone`, a lmforge Transformer) + a scalar `head` read at a given position.

    `forward(ids, last)` -> rewards (B,): ids (B, L) right-padded, `last` (B,) the index of each
    row's last real token. `score(conversations)` for finished conversations (needs `tokenizer`)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None, tokenizer=None):
        super().__init__()
        self.backbone = backbone
        d = backbone.cfg.d_model
        p = next(backbone.parameters())
        if head is None:
            head = nn.Linear(d, 1, device=p.device, dtype=torch.float32)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.head = head
        self.tokenizer = tokenizer

    @property
    def cfg(self):  # the trainer reads the model config (tied embeddings) from here
        return self.backbone.cfg

    @property
    def layers(self):  # parallelize (FSDP) shards the backbone's blocks
        return self.backbone.layers

    @property
    def gradient_checkpointing(self) -> bool:
        return self.backbone.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.backbone.gradient_checkpointing = on

    def forward(self, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        h = self.backbone.hidden_states(ids)
        h_last = h[torch.arange(h.shape[0], device=h.device), last]
        return self.head(h_last.to(self.head.weight.dtype)).squeeze(-1).float()

    @torch.no_grad()
    def score(self, conversations: list[list[dict]], batch_size: int = 16) -> list[float]:
        """The reward of each conversation (a message list ending with an assistant turn), batched.
        A conversation longer than the model's context keeps its first tokens (as in training)."""
        if self.tokenizer is None:
            raise InputError("this reward model has no tokenizer to render conversations with")
        rows = []
        for c in conversations:
            check_messages(c)
            if c[-1]["role"] != "assistant":
                raise InputError("a conversation to score must end with an assistant message")
            rows.append(render(self.tokenizer, c)[0][: self.backbone.cfg.max_seq_len])
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
        out: list[float] = []
        try:
            for s in range(0, len(rows), batch_size):
                chunk = rows[s : s + batch_size]
                L = max(len(r) for r in chunk)
                ids = torch.full((len(chunk), L), pad, dtype=torch.long)
                for i, r in enumerate(chunk):
                    ids[i, : len(r)] = torch.tensor(r)
                last = torch.tensor([len(r) - 1 for r in chunk])
                out += self(ids.to(dev), last.to(dev)).tolist()
        finally:
            self.train(was)
        return out


def pair_rewards(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected), each (B,), of a pair batch through `model` (a RewardModel, or its
    DDP / compiled wrapper: called as a module)."""
    r = model(batch.ids, batch.lengths - 1)
    B = batch.n_pairs
    return r[:B], r[B:]


def bt_loss(r_c: torch.Tensor, r_r: torch.Tensor, margin: float = 0.0, center: float = 0.0) -> torch.Tensor:
    """Bradley–Terry: mean -logsigmoid(r_c - r_r - margin) [+ center * mean((r_c + r_r)^2)]."""
    loss = -F.logsigmoid(r_c - r_r - margin).mean()
    if center:
        loss = loss + center * ((r_c + r_r) ** 2).mean()
    return loss


def pair_accuracy(diff: torch.Tensor) -> torch.Tensor:
    """Share of pairs with diff > 0; a tie counts one half (so identical scores give 0.5)."""
    return (diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()


def make_rm_loss(margin: float = 0.0, center: float = 0.0):
    def rm_loss(model, batch: PairBatch):
        r_c, r_r = pair_rewards(model, batch)
        loss = bt_loss(r_c, r_r, margin, center)
        d = (r_c - r_r).detach()
        return loss, {"accuracy": pair_accuracy(d), "reward_margin": d.mean(), "rewards_chosen": r_c.detach().mean(),
                      "rewards_rejected": r_r.detach().mean()}

    return rm_loss


@torch.no_grad()
def evaluate_pairs(model: RewardModel, examples, batch_size: int, pad_id) -> dict:
    """Held-out pair accuracy, mean margin and loss of a reward model (eval mode, switched back)."""
    if not examples:
        return {}
    was = model.training
    model.eval()
    diffs = []
    try:
        for b in iter_batches(examples, batch_size, pad_id):
            r_c, r_r = pair_rewards(model, b.to(next(model.parameters()).device))
            diffs.append(r_c - r_r)
    finally:
        model.train(was)
    d = torch.cat(diffs)
    return {"heldout_accuracy": float(pair_accuracy(d)), "heldout_margin": float(d.mean()),
            "heldout_loss": float(-F.logsigmoid(d).mean())}


# ---- checkpoint files ------------------------------------------------------------------------


def head_bytes(head: nn.Linear) -> bytes:
    from safetensors.torch import save

    meta = {"format": "pt", HEAD_META: json.dumps({"d_model": head.in_features})}
    return save({"weight": head.weight.detach().float().cpu().contiguous(),
                 "bias": head.bias.detach().float().cpu().contiguous()}, metadata=meta)


def load_head(path: Path, d_model: int, device="cpu") -> nn.Linear:
    from lmforge.model.io import read_safetensors

    if not path.is_file():
        raise InputError(f"{path} not found: {path.parent} is not a reward model checkpoint (no {HEAD_FILE})")
    t, _ = read_safetensors(path, "reward head")
    if set(t) != {"weight", "bias"} or tuple(t["weight"].shape) != (1, d_model) or tuple(t["bias"].shape) != (1,):
        raise InputError(f"{path} does not hold a reward head for d_model = {d_model}")
    head = nn.Linear(d_model, 1, device=device, dtype=torch.float32)
    with torch.no_grad():
        head.weight.copy_(t["weight"])
        head.bias.copy_(t["bias"])
    return head


def _backbone_weights(weights: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    out = {k[len("backbone."):]: v for k, v in weights.items() if k.startswith("backbone.")}
    if tied:
        out.pop("lm_head.weight", None)
    return out


# ---- shared stage plumbing (DPO uses it too) ------------------------------------------------


def load_chat_model(base, runtime, tokenizer, section: str):
    """(model, tokenizer, ref) of the chat model at `base`; its chat template checked."""
    from lmforge.infer import load_model_and_tokenizer

    model, tok, ref = load_model_and_tokenizer(base, device=runtime.device, tokenizer=tokenizer)
    state = read_json(ref.path / "state.json", {}) or {}
    check_template(state.get("chat_template"))
    if not state.get("chat_template"):
        logger.warning("%s: %s records no chat template (a base model, not a chat model): fine-tune it with SFT first "
                       "for useful results", section, ref.path)
    return model, tok, ref


def seq_limit(cfg, model, section: str) -> int:
    n = cfg.seq_len or model.cfg.max_seq_len
    if n > model.cfg.max_seq_len:
        raise ConfigError(f"{section}.seq_len = {n} is longer than the base model's context ({model.cfg.max_seq_len})")
    return n


def apply_lora_section(model: nn.Module, lora: LoraSection):
    """LoRA / QLoRA adapters on `model` as configured; the LoraConfig (None for full fine-tuning)."""
    from lmforge.posttrain import lora as L

    if not lora.r:
        return None
    lcfg = L.LoraConfig(r=lora.r, alpha=lora.alpha, dropout=lora.dropout, targets=tuple(lora.targets))
    if lora.quantize != "none":
        L.qlora(model, lora.quantize, lcfg)
    else:
        L.apply_lora(model, lcfg)
    return lcfg


def write_data_files(out_dir: Path, heldout_pairs: list[dict], stats: dict) -> None:
    d = out_dir / "data"
    write_pairs_jsonl(d / "heldout_pairs.jsonl", heldout_pairs)
    atomic_write_json(d / "stats.json", stats)


# ---- the stage's work ------------------------------------------------------------------------


@dataclass
class RMResult:
    out_dir: Path
    steps: int = 0
    final_loss: float | None = None
    checkpoint: Path | None = None
    base: str = ""
    trainable_params: int = 0
    total_params: int = 0
    heldout_accuracy: float | None = None  # after training
    heldout_accuracy_before: float | None = None  # the zero head: 0.5
    heldout_margin: float | None = None
    train_accuracy: float | None = None  # the last logged train record's
    data_stats: dict = field(default_factory=dict)
    metrics_path: Path | None = None
    plot_path: Path | None = None
    wall_time_s: float = 0.0
    resumed_from: int | None = None


def run_rm(cfg: RMConfig, out_dir: str | Path, *, base: str | Path, seed: int = 1234, tokenizer: str | Path | None = None,
           resolve=lambda p: Path(p)) -> RMResult:
    """Train a reward model from the chat model at `base` on preference pairs into `out_dir`
    (step_N/ + latest, metrics.jsonl, loss.png, data/heldout_pairs.jsonl, data/stats.json).
    Resumes from the newest intact checkpoint there (cfg.resume)."""
    from lmforge.posttrain import lora as L

    t0 = time.time()
    out_dir = Path(out_dir)
    tcfg = cfg.trainer_config()
    runtime = T.setup(tcfg, "rm")
    backbone, tok, ref = load_chat_model(base, runtime, tokenizer, "rm")
    max_tokens = seq_limit(cfg, backbone, "rm")
    train, heldout, held_pairs, stats = prepare_pairs(cfg, tok, max_tokens, seed, resolve, model=backbone, section="rm")
    if runtime.is_main:
        write_data_files(out_dir, held_pairs, stats)
    logger.info("rm: %d training pairs, %d held out; base %s", len(train), len(heldout), ref.path)

    torch.manual_seed(seed)
    lcfg = apply_lora_section(backbone, cfg.lora)
    model = RewardModel(backbone, tokenizer=tok)
    model.train()
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    batches = PairBatches(train, cfg.batch_size, seed, tok.pad_id, dp_rank=runtime.info.dp_rank,
                          dp_size=runtime.info.dp_size, device=runtime.device)
    before = evaluate_pairs(model, heldout, cfg.eval_batch_size, tok.pad_id)

    tied = bool(getattr(backbone.cfg, "tie_embeddings", False))
    hooks: dict = {}
    if lcfg is not None:
        hooks["export_weights"] = lambda _w: L.merged_state_dict(model.backbone)
        files = lambda _ts: {HEAD_FILE: head_bytes(model.head), "adapter.safetensors": L.adapter_bytes(model.backbone, lcfg)}  # noqa: E731
    else:
        hooks["export_weights"] = lambda w: _backbone_weights(w, tied)
        files = lambda _ts: {HEAD_FILE: head_bytes(model.head)}  # noqa: E731

    def restore(m: RewardModel, step_dir: Path) -> None:
        if lcfg is not None:
            L.load_adapter(m.backbone, step_dir / "adapter.safetensors")
        else:
            from lmforge.train import checkpoint as ck

            w = ck.load_weights(step_dir)
            dev = next(m.parameters()).device
            missing, unexpected = m.backbone.load_state_dict({k: v.to(dev) for k, v in w.items()}, strict=False)
            missing = [k for k in missing if not (tied and k == "lm_head.weight")]
            if missing or unexpected:
                raise InputError(f"{step_dir / 'model.safetensors'} does not match the model: missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")
        m.head.load_state_dict(load_head(step_dir / HEAD_FILE, m.backbone.cfg.d_model, next(m.parameters()).device).state_dict())

    lora_state = dataclasses.asdict(cfg.lora) if cfg.lora.r else None
    extra_state = {"stage": "rm", "chat_template": template_id(), "base": str(ref.path.resolve()), "lora": lora_state}
    res = T.fit(
        tcfg, runtime, model, batches, make_rm_loss(cfg.margin, cfg.center), out_dir, name="rm",
        run_config={**cfgmod.to_dict(cfg), "seq_len": max_tokens, "base": str(ref.path), "data_fingerprint": batches.fingerprint},
        resume_free=RMConfig.RESUME_FREE, model_config=backbone.cfg.to_dict(), tokenizer_file=tok.path,
        evaluate=lambda ts: _eval_autocast(ts, heldout, cfg.eval_batch_size, tok.pad_id),
        extra_files=files, extra_state=extra_state, restore_weights=restore, data_desc="the preference data",
        plot_title="reward model loss", **hooks,
    )
    ev = res.eval_metrics
    return RMResult(
        out_dir=out_dir, steps=res.steps, final_loss=res.final_loss, checkpoint=res.checkpoint, base=str(ref.path),
        trainable_params=n_train, total_params=backbone.cfg.num_params() + backbone.cfg.d_model + 1,
        heldout_accuracy=ev.get("heldout_accuracy"), heldout_accuracy_before=before.get("heldout_accuracy"),
        heldout_margin=ev.get("heldout_margin"), train_accuracy=res.train_record.get("accuracy"), data_stats=stats,
        metrics_path=res.metrics_path, plot_path=res.plot_path, wall_time_s=time.time() - t0, resumed_from=res.resumed_from,
    )


def _eval_autocast(ts, heldout, batch_size: int, pad_id) -> dict:
    with ts.runtime.autocast():
        return evaluate_pairs(ts.model, heldout, batch_size, pad_id)


def load_reward_model(path: str | Path, device: str | torch.device = "cpu", tokenizer: str | Path | None = None) -> RewardModel:
    """The reward model at `path` (a run directory — its rm/ —, an rm/ or rm/<name>/ directory, or a
    step directory), in eval mode, with its tokenizer; checksums and the chat template checked."""
    from lmforge.infer import load_model_and_tokenizer
    from lmforge.model.io import resolve_model

    p = Path(path)
    if p.is_dir() and not (p / "model.safetensors").is_file() and (p / "rm").is_dir():
        p = p / "rm"
    ref = resolve_model(p)
    backbone, tok, ref = load_model_and_tokenizer(ref.path, device=device, tokenizer=tokenizer)
    state = read_json(ref.path / "state.json", {}) or {}
    if state.get("stage") != "rm" or not (ref.path / HEAD_FILE).is_file():
        raise InputError(f"{ref.path} is not a reward model (no {HEAD_FILE}; train one with lmforge rm)")
    check_template(state.get("chat_template"))
    from lmforge.model.io import sha256_file

    want = (state.get("checksums") or {}).get(HEAD_FILE)
    if want and sha256_file(ref.path / HEAD_FILE) != want:
        raise InputError(f"{ref.path / HEAD_FILE} does not match its checksum in state.json (corrupt or modified)")
    head = load_head(ref.path / HEAD_FILE, backbone.cfg.d_model, device)
    rm = RewardModel(backbone, head, tokenizer=tok)
    rm.eval()
    return rm


__all__ = ["RMConfig", "RMResult", "RewardModel", "run_rm", "load_reward_model", "bt_loss", "pair_accuracy", "pair_rewards",
           "make_rm_loss", "evaluate_pairs", "HEAD_FILE", "validate_pref_fields"]
