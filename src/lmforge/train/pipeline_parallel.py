"""Pipeline parallelism with torch.distributed.pipelining: the Transformer's layers split into
contiguous stages (token embedding on the first, final norm + output head on the last), driven
by a GPipe or 1F1B schedule over microbatches. Every rank builds the full model from the same
seed and keeps only its stage, so weights start identical to a single-process run.

Embeddings must be untied (`tie_embeddings = false`): the input embedding and the output head
live on different stages.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import ConfigError
from lmforge.model.transformer import Transformer


class PipelineStageModule(nn.Module):
    """Layers [lo, hi) of `model`, plus the embedding (first stage) or norm + head (last stage)."""

    def __init__(self, model: Transformer, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.tok_emb = model.tok_emb if first else None
        self.layers = nn.ModuleList(model.layers[lo:hi])
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x = self.tok_emb(x)
        T = x.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for layer in self.layers:
            x = layer(x, cos, sin)
        if self.last:
            x = self.lm_head(self.norm(x))
        return x


def stage_bounds(n_layers: int, pp_size: int, rank: int) -> tuple[int, int]:
    """Contiguous, as-even-as-possible split of n_layers over pp_size stages."""
    if pp_size > n_layers:
        raise ConfigError(f"pipeline size {pp_size} is larger than the number of layers ({n_layers})")
    base, extra = divmod(n_layers, pp_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def build_pipeline(model: Transformer, pp_size: int, rank: int, n_microbatches: int,
                   schedule: Literal["gpipe", "1f1b"] = "1f1b", device: torch.device | str = "cpu", group=None):
    """This rank's (stage module, schedule). Call `schedule.step(inputs)` on the first stage,
    `schedule.step(target=targets, losses=list)` on the last, `schedule.step()` in between."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    if model.cfg.tie_embeddings and pp_size > 1:
        raise ConfigError("pipeline parallelism needs untied embeddings: set model.tie_embeddings = false")
    if model.cfg.moe_experts:
        raise ConfigError("pipeline parallelism is not supported for mixture-of-experts models yet")
    lo, hi = stage_bounds(model.cfg.n_layers, pp_size, rank)
    mod = PipelineStageModule(model, lo, hi, rank == 0, rank == pp_size - 1).to(device)
    stage = PipelineStage(mod, rank, pp_size, torch.device(device), group=group)
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    return mod, cls(stage, n_microbatches=n_microbatches, loss_fn=lm_loss)
