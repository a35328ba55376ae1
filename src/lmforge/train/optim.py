"""Optimizers: AdamW (fused kernel where the device has one) and Muon for the hidden weight matrices.

Muon keeps a momentum buffer per matrix and replaces the update by its nearest semi-orthogonal
matrix, computed with a few Newton-Schulz iterations (a quintic polynomial tuned to push every
singular value towards 1 quickly; exact orthogonality is not needed). Same-shaped matrices are
orthogonalised together as one batched matmul, which matters on CPUs where per-matrix kernel
launches dominate. Embeddings, the output head, norms and MoE routers stay on AdamW: they are
not hidden linear maps, and Muon's geometry argument does not apply to them.

`build_optimizers(model, cfg)` returns the list of optimizers for a TrainConfig; every param
group carries `base_lr`, and `set_lr(optimizers, factor)` applies the schedule.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn as nn

# Quintic Newton-Schulz coefficients (a, b, c) for X <- a X + b (X X^T) X + c (X X^T)^2 X.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise a matrix or a batch of matrices (..., rows, cols)."""
    a, b, c = NS_COEFFS
    dtype = torch.bfloat16 if g.is_cuda else torch.float32
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Momentum + Newton-Schulz orthogonalised updates for 2-D parameters.

    The update of an (r, c) matrix is scaled by sqrt(max(1, r / c)) so tall and wide matrices
    move by a comparable RMS; weight decay is decoupled (p <- p (1 - lr wd))."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            plain: dict[tuple, list] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(mom).add_(p.grad)
                upd = p.grad.add(buf, alpha=mom) if group["nesterov"] else buf
                if _is_dtensor(upd):
                    _apply_dtensor(p, upd, lr, wd, group["ns_steps"])
                else:
                    plain[tuple(p.shape)].append((p, upd))
            for shape, items in plain.items():
                ortho = newton_schulz(torch.stack([u for _, u in items]), group["ns_steps"])
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                for (p, _), o in zip(items, ortho.unbind(0)):
                    if wd:
                        p.mul_(1.0 - lr * wd)
                    p.add_(o, alpha=-lr * scale)
        return loss


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def _apply_dtensor(p, upd, lr: float, wd: float, steps: int) -> None:
    """Sharded parameter (FSDP2 / tensor parallel): orthogonalise the full matrix, keep our shard."""
    from torch.distributed.tensor import distribute_tensor

    full = upd.full_tensor()
    o = newton_schulz(full, steps)
    scale = max(1.0, full.shape[0] / full.shape[1]) ** 0.5
    shard = distribute_tensor(o, upd.device_mesh, upd.placements)
    if wd:
        p.mul_(1.0 - lr * wd)
    p.add_(shard, alpha=-lr * scale)


def adamw(groups: list[dict], lr: float, betas, eps: float, device_type: str) -> torch.optim.AdamW:
    """AdamW with the fused kernel when available for the device (CUDA, and CPU in recent torch)."""
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, foreach=device_type == "cuda")


def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split parameters: hidden matrices (Muon candidates), embeddings/head, and vectors (norms)."""
    out = {"matrix": [], "embed": [], "vector": []}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2:
            out["vector"].append((name, p))
        elif name.startswith(("tok_emb", "lm_head")) or ".router." in name or name.endswith("router.weight"):
            out["embed"].append((name, p))
        else:
            out["matrix"].append((name, p))
    return out


def build_optimizers(model: nn.Module, cfg) -> list[torch.optim.Optimizer]:
    """Optimizers for a TrainConfig: Muon (hidden matrices) + AdamW (rest), or AdamW for all."""
    groups = param_groups(model)
    dev = next(model.parameters()).device.type
    p = lambda items: [x for _, x in items]  # noqa: E731
    if cfg.optimizer == "adamw":
        decay = p(groups["matrix"]) + p(groups["embed"])
        opt = adamw([
            {"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
            {"params": p(groups["vector"]), "weight_decay": 0.0, "base_lr": cfg.lr},
        ], cfg.lr, cfg.betas, cfg.eps, dev)
        return [opt]
    muon = Muon([{"params": p(groups["matrix"]), "base_lr": cfg.muon_lr}], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                ns_steps=cfg.muon_ns_steps, weight_decay=cfg.weight_decay)
    opt = adamw([
        {"params": p(groups["embed"]), "weight_decay": cfg.weight_decay, "base_lr": cfg.lr},
        {"params": p(groups["vector"]), "weight_decay": 0.0, "base_lr": cfg.lr},
    ], cfg.lr, cfg.betas, cfg.eps, dev)
    return [muon, opt]


def set_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    for opt in optimizers:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor


def current_lr(optimizers: list[torch.optim.Optimizer]) -> dict[str, float]:
    """Peak-group learning rate of each optimizer, by name (for metrics)."""
    return {type(o).__name__.lower(): o.param_groups[0]["lr"] for o in optimizers}


__all__ = ["Muon", "newton_schulz", "build_optimizers", "set_lr", "current_lr", "param_groups"]
