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
from lmforge.model.transformer import Transformer, run_layers


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
        x = run_layers(self.layers, x, cos, sin)
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


# ---- training-loop helpers (lmforge.train.loop uses these when parallel.pp > 1) ---------------
def stage_of(name: str, n_layers: int, pp_size: int) -> int:
    """The stage that owns the full-model parameter `name` (tok_emb.*, layers.N.*, norm.*, lm_head.*)."""
    if name.startswith("tok_emb"):
        return 0
    if name.startswith("layers."):
        i = int(name.split(".")[1])
        return next(r for r in range(pp_size) if stage_bounds(n_layers, pp_size, r)[0] <= i < stage_bounds(n_layers, pp_size, r)[1])
    return pp_size - 1


def pp_train_step(sched, batches, rank: int, pp_size: int, group) -> torch.Tensor:
    """One optimizer step's forward/backward through the pipeline: the step's micro-batches are
    concatenated and the schedule splits them into its microbatches. Returns the mean loss, on
    every stage (broadcast from the last)."""
    import torch.distributed as dist

    x = torch.cat([b.x for b in batches])
    y = torch.cat([b.y for b in batches])
    losses: list[torch.Tensor] = []
    if rank == 0:
        sched.step(x)
    elif rank == pp_size - 1:
        sched.step(target=y, losses=losses)
    else:
        sched.step()
    loss = torch.stack([l.detach().float() for l in losses]).mean() if losses else torch.zeros((), device=x.device)
    dist.broadcast(loss, src=dist.get_global_rank(group, pp_size - 1), group=group)
    return loss


def pp_clip_grad_norm(params, max_norm: float, group) -> float:
    """Clip by the global norm over every stage's gradients (squared norms summed over the group)."""
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    sq = torch.nn.utils.get_total_norm(grads, 2.0).double() ** 2 if grads else torch.zeros((), dtype=torch.float64)
    sq = sq.to(grads[0].device if grads else "cpu")
    dist.all_reduce(sq, group=group)
    total = float(sq.sqrt())
    if max_norm > 0 and total > max_norm and grads:
        torch._foreach_mul_(grads, max_norm / (total + 1e-6))
    return total


@torch.no_grad()
def pp_sync_weights(model: Transformer, pp_size: int, group) -> None:
    """Give every stage the current weights of the whole model (each parameter broadcast from the
    stage that trains it), for evaluation, sampling and full checkpoints."""
    import torch.distributed as dist

    for name, p in model.named_parameters():
        if model.cfg.tie_embeddings and name == "lm_head.weight":
            continue
        owner = stage_of(name, model.cfg.n_layers, pp_size)
        dist.broadcast(p.data, src=dist.get_global_rank(group, owner), group=group)


def pp_merge_optimizer_states(optimizers, group) -> list[dict]:
    """Optimizer state dicts with every stage's per-parameter state (each stage steps only its own
    parameters, indexed the same way on every rank because every rank built the whole model)."""
    import torch.distributed as dist

    mine = [o.state_dict() for o in optimizers]
    mine = [{"state": {k: {n: (t.cpu() if torch.is_tensor(t) else t) for n, t in v.items()} for k, v in sd["state"].items()},
             "param_groups": sd["param_groups"]} for sd in mine]
    every: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    merged = []
    for i, sd in enumerate(mine):
        state = {}
        for other in every:
            state.update(other[i]["state"])
        merged.append({"state": state, "param_groups": sd["param_groups"]})
    return merged
