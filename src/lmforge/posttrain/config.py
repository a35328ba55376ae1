"""Configuration of supervised fine-tuning: `[sft]` in a recipe, also the options of `lmforge sft`.

The trainer keys (max_steps, optimizer, lr, schedule, warmup_steps, grad_accum, checkpoint_every,
parallel, ...) are those of `[pretrain]` (lmforge.train.config.TrainerConfig), with fine-tuning
defaults: AdamW at a smaller learning rate, a cosine schedule, a few hundred steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmforge.errors import ConfigError
from lmforge.train.config import TrainerConfig, check_trainer_fields

LORA_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


@dataclass
class LoraSection:
    """LoRA / QLoRA (`r = 0`: full fine-tuning)."""

    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))  # module-name suffixes, or ["all-linear"]
    quantize: Literal["none", "nf4", "int8"] = "none"  # QLoRA: the frozen base weights in NF4 or int8

    def validate(self) -> None:
        if self.r < 0:
            raise ConfigError(f"sft.lora.r = {self.r} must be >= 0 (0 = full fine-tuning)")
        if self.r and self.alpha <= 0:
            raise ConfigError(f"sft.lora.alpha = {self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"sft.lora.dropout = {self.dropout} must be in [0, 1)")
        if self.r and not self.targets:
            raise ConfigError("sft.lora.targets is empty: name the linear layers to adapt (e.g. [\"wq\", \"wv\"])")
        if self.quantize != "none" and not self.r:
            raise ConfigError(f"sft.lora.quantize = {self.quantize!r} needs LoRA (sft.lora.r > 0): "
                              "a quantized base is frozen, only adapters train")


@dataclass
class SFTConfig(TrainerConfig):
    name: str = ""  # output sub-directory of sft/ ("" = the run's name)
    base: str = ""  # the model to fine-tune ("" = the run's latest pretrained model); any path lmforge generate takes
    tokenizer: str = ""  # "" = the base model's tokenizer
    data: list[str] = field(default_factory=list)  # chat JSONL files ({"messages": [...]} or prompt/completion); [] = the built-in set
    eval_data: list[str] = field(default_factory=list)  # held-out chat JSONL; [] = `heldout` of the data split off
    dictionary: str = ""  # GCIDE JSONL for the built-in set ("" = the bundled sample's)
    examples: int = 2000  # conversations in the built-in set (train + held out)
    heldout: float = 0.1  # share of the built-in set (or of users' data without eval_data) held out
    safety_ratio: float = 0.1  # share of the training mix taken from the refusal / look-alike safety set (0 = none)
    seq_len: int = 0  # tokens per row (0 = the model's context)
    batch_size: int = 8
    packing: bool = True  # several conversations per row, with no attention across them
    overflow: Literal["truncate", "drop"] = "truncate"  # a conversation longer than a row
    init_optimizer: Literal["fresh", "pretrain"] = "fresh"  # "pretrain": warm-start from the base checkpoint's optimizer state
    lora: LoraSection = field(default_factory=LoraSection)
    sample_prompts: list[str] = field(default_factory=lambda: ["What does serendipity mean?", "Which word means a small house?"])
    sample_tokens: int = 48
    # trainer defaults for fine-tuning (keys as in [pretrain])
    max_steps: int = 300
    optimizer: Literal["muon", "adamw"] = "adamw"
    lr: float = 1e-3
    schedule: Literal["wsd", "cosine", "constant"] = "cosine"
    warmup_steps: int = 10
    checkpoint_every: int = 100
    eval_every: int = 100
    log_every: int = 10

    RESUME_FREE = TrainerConfig.RESUME_FREE + ("name", "sample_prompts", "sample_tokens")

    def validate(self) -> None:
        check_trainer_fields(self, "sft")
        self.lora.validate()
        if self.seq_len < 0 or self.batch_size < 1:
            raise ConfigError(f"sft.seq_len ({self.seq_len}) must be >= 0 and sft.batch_size ({self.batch_size}) >= 1")
        if self.examples < 10:
            raise ConfigError(f"sft.examples = {self.examples} must be >= 10")
        if not 0.0 <= self.heldout < 1.0:
            raise ConfigError(f"sft.heldout = {self.heldout} must be in [0, 1)")
        if not 0.0 <= self.safety_ratio < 1.0:
            raise ConfigError(f"sft.safety_ratio = {self.safety_ratio} must be in [0, 1)")
        if self.init_optimizer == "pretrain" and self.lora.r:
            raise ConfigError("sft.init_optimizer = 'pretrain' needs full fine-tuning: with LoRA the trained "
                              "parameters are new adapters, not the pretrained weights")

    def trainer_config(self) -> TrainerConfig:
        return TrainerConfig.from_fields(self)


__all__ = ["SFTConfig", "LoraSection", "LORA_TARGETS"]
