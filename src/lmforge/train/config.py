"""Training configuration: the `[pretrain]` section of a recipe (`TrainConfig`) and the generic
knobs every training stage shares (`TrainerConfig`, what lmforge.train.trainer.fit reads).

`TrainConfig.model` names a preset (lmforge.model.PRESETS) plus optional ModelConfig overrides;
`vocab_size` left unset is taken from the token shards' index.json, `max_seq_len` left unset
is `seq_len`. Every key is validated by lmforge.config.build (unknown keys and bad values name
the key).

`TrainerConfig` has no model preset and no data layout: a post-training stage builds one from its
own section (`TrainerConfig.from_fields(section)` copies the keys of the same name, or
`lmforge.config.build(TrainerConfig, table, "sft")`). `TrainConfig.trainer_config()` is the same
for pretraining; the `[pretrain]` TOML keys are unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from lmforge.errors import ConfigError
from lmforge.model.config import PRESETS, ModelConfig
from lmforge.train.parallel import ParallelConfig


def _model_section() -> type:
    """A dataclass with `preset` plus every ModelConfig field as an optional override."""
    fields = [("preset", str, field(default="tiny"))]
    for f in dataclasses.fields(ModelConfig):
        tp = {int: int, float: float, bool: bool, "int": int, "float": float, "bool": bool}.get(f.type, f.type)
        fields.append((f.name, tp | None, field(default=None)))
    return dataclasses.make_dataclass("ModelSection", fields)


ModelSection = _model_section()
ModelSection.__doc__ = "Model preset name + optional ModelConfig overrides (None = the preset's value)."


def _validate_model_section(self) -> None:
    if self.preset not in PRESETS:
        raise ConfigError(f"pretrain.model.preset = {self.preset!r} is not a preset; choose one of: {', '.join(PRESETS)}")


ModelSection.validate = _validate_model_section


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    name: str = ""  # checkpoint sub-directory (checkpoints/<name>/); "" = the run's name
    # data
    seq_len: int = 256  # tokens per training sequence (<= model.max_seq_len)
    batch_size: int = 16  # sequences per micro-batch per data-parallel rank
    grad_accum: int = 1  # micro-batches per optimizer step
    packing: Literal["doc_mask", "separator"] = "doc_mask"  # attention blocked at document starts, or plain causal across <|bos|>
    max_steps: int = 1000
    seed: int | None = None  # None = the recipe's run.seed
    # optimisation
    optimizer: Literal["muon", "adamw"] = "muon"  # muon: Muon on hidden matrices + AdamW on the rest
    lr: float = 3e-3  # AdamW learning rate (embeddings, output head, norms; every parameter when optimizer = "adamw")
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0  # decoupled; applied to matrices and embeddings, never to norms
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_steps: int = 20
    decay_frac: float = 0.3  # wsd: last fraction of steps decays linearly to min_lr_frac
    min_lr_frac: float = 0.0  # final lr as a fraction of the peak (cosine and wsd)
    # performance
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    peak_flops: float = 0.0  # per device, for MFU; 0 = table for known GPUs, measured matmul peak on CPU
    # checkpoints, evaluation, metrics
    checkpoint_every: int = 200
    keep_last: int = 3
    resume: bool = True  # continue from the newest valid checkpoint in the output directory
    log_every: int = 10
    eval_every: int = 200  # val loss / bits per byte (and on_eval hooks); 0 = only at the end
    eval_batches: int = 8
    sample_prompts: list[str] = field(default_factory=lambda: ["The ", "def ", "A dictionary is"])
    sample_tokens: int = 48
    sample_temperature: float = 0.8
    tensorboard: bool = False

    def validate(self) -> None:
        for k in ("seq_len", "batch_size"):
            if getattr(self, k) < 1:
                raise ConfigError(f"pretrain.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("eval_batches", "sample_tokens"):
            if getattr(self, k) < 0:
                raise ConfigError(f"pretrain.{k} must be >= 0, got {getattr(self, k)}")
        check_trainer_fields(self, "pretrain")

    def trainer_config(self) -> "TrainerConfig":
        """The generic part of this config, as lmforge.train.trainer.fit reads it."""
        return TrainerConfig.from_fields(self)

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The ModelConfig this run trains: preset + overrides; vocab from the data when unset."""
        over = {f.name: getattr(self.model, f.name) for f in dataclasses.fields(ModelConfig) if getattr(self.model, f.name) is not None}
        if "vocab_size" not in over and vocab_size:
            over["vocab_size"] = _round_up(vocab_size, 64)  # matmul-friendly; extra rows are never targets
        over.setdefault("max_seq_len", self.seq_len)
        base = dict(PRESETS[self.model.preset])
        if "d_model" in over and "ffn_hidden" not in over:
            base.pop("ffn_hidden", None)  # derive from the new width
        try:
            mc = ModelConfig(**{**base, **over})
            mc.validate()
        except ValueError as e:
            raise ConfigError(f"pretrain.model: {e}") from None
        if self.seq_len > mc.max_seq_len:
            raise ConfigError(
                f"pretrain.seq_len = {self.seq_len} is longer than the model's context "
                f"(pretrain.model.max_seq_len = {mc.max_seq_len}); lower seq_len or raise max_seq_len"
            )
        if vocab_size and vocab_size > mc.vocab_size:
            raise ConfigError(
                f"the token shards use {vocab_size} token ids but pretrain.model.vocab_size = {mc.vocab_size}; "
                "leave vocab_size unset to take it from the tokenizer"
            )
        return mc

    # keys that may change between a checkpoint and a resumed run without changing the training math
    RESUME_FREE = (
        "max_steps", "checkpoint_every", "keep_last", "resume", "log_every", "eval_every", "eval_batches",
        "sample_prompts", "sample_tokens", "sample_temperature", "tensorboard", "peak_flops", "compile",
        "activation_checkpointing", "device", "name", "parallel",
    )


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


@dataclass
class TrainerConfig:
    """What every training stage shares: steps, optimizer, schedule, precision, parallelism,
    checkpoints and logging. The keys and defaults are those of `[pretrain]`; a stage whose section
    has keys of the same names gets them with `TrainerConfig.from_fields(section)`."""

    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    max_steps: int = 1000
    grad_accum: int = 1  # micro-batches (next_batch() calls) per optimizer step
    seed: int | None = None  # for the caller's data order and initialisation; fit() itself draws nothing
    optimizer: Literal["muon", "adamw"] = "muon"
    lr: float = 3e-3
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_ns_steps: int = 5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    warmup_steps: int = 20
    decay_frac: float = 0.3
    min_lr_frac: float = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    activation_checkpointing: bool = False  # applied to models with a `gradient_checkpointing` attribute
    peak_flops: float = 0.0
    checkpoint_every: int = 200
    keep_last: int = 3
    resume: bool = True
    log_every: int = 10
    eval_every: int = 200
    tensorboard: bool = False

    def validate(self) -> None:
        try:
            check_trainer_fields(self, "")
        except ConfigError as e:  # lmforge.config.build names the section: "[sft]: lr must be > 0, got -1.0"
            raise ValueError(str(e)) from None

    @classmethod
    def from_fields(cls, obj, **over) -> "TrainerConfig":
        """A TrainerConfig from any object with attributes of the same names (missing ones keep
        their defaults), then `over`."""
        vals = {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if hasattr(obj, f.name)}
        vals.update(over)
        cfg = cls(**vals)
        cfg.validate()
        return cfg

    # keys that may change between a checkpoint and a resumed run without changing the training math
    RESUME_FREE = (
        "max_steps", "checkpoint_every", "keep_last", "resume", "log_every", "eval_every", "tensorboard", "peak_flops",
        "compile", "activation_checkpointing", "device", "parallel", "seed",
    )


def check_trainer_fields(cfg, section: str) -> None:
    """Validate the TrainerConfig keys of `cfg` (a TrainerConfig, TrainConfig or a stage's own
    config with the same keys); the message names `section.key` (just `key` when section is "")."""
    section = f"{section}." if section else ""
    for k in ("grad_accum", "max_steps", "log_every", "keep_last", "muon_ns_steps"):
        if getattr(cfg, k) < 1:
            raise ConfigError(f"{section}{k} must be >= 1, got {getattr(cfg, k)}")
    for k in ("lr", "muon_lr"):
        if not getattr(cfg, k) > 0:
            raise ConfigError(f"{section}{k} must be > 0, got {getattr(cfg, k)}")
    for k in ("warmup_steps", "checkpoint_every", "eval_every"):
        if getattr(cfg, k) < 0:
            raise ConfigError(f"{section}{k} must be >= 0, got {getattr(cfg, k)}")
    if not 0.0 <= cfg.decay_frac <= 1.0:
        raise ConfigError(f"{section}decay_frac must be in [0, 1], got {cfg.decay_frac}")
    if not 0.0 <= cfg.min_lr_frac <= 1.0:
        raise ConfigError(f"{section}min_lr_frac must be in [0, 1], got {cfg.min_lr_frac}")
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        raise ConfigError(f"{section}betas must be two numbers in [0, 1), got {cfg.betas}")
    if cfg.grad_clip < 0 or cfg.weight_decay < 0 or cfg.peak_flops < 0:
        raise ConfigError(f"{section}grad_clip, weight_decay and peak_flops must be >= 0")
    if not 0.0 <= cfg.muon_momentum < 1.0:
        raise ConfigError(f"{section}muon_momentum must be in [0, 1), got {cfg.muon_momentum}")


__all__ = ["TrainConfig", "TrainerConfig", "ModelSection", "ParallelConfig", "check_trainer_fields"]
