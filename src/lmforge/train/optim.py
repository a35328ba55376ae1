"""Optimizers: AdamW (fused kernel where the device has one) and Muon for the hidden weight matrices.

Muon keeps a momentum buffer per matrix and replaces the update by its nearest semi-orthogonal
matrix, computed with a few Newton-Schulz iterations (a quintic polynomial tuned to push every
singular value towards 1 quickly; exact orthogonality is not needed). Same-shaped matrices are
orthogonalised together as one batched matmul, which matters on CPUs where per-matrix kernel
launches dominate; on CPU the scalings ride on the matmuls (baddbmm), and matrices at least twice
as wide as tall (SwiGLU's projections) run the same iteration in Gram space, on r x r matrices
(`_ns_gram_space`), about a third fewer multiply-adds. Embeddings, the output head, norms and
MoE routers stay on AdamW: they are not hidden linear maps, and Muon's geometry argument does
not apply to them.

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
    if g.is_cuda or x.dim() > 3:
        for _ in range(steps):
            gram = x @ x.mT
            poly = b * gram + c * (gram @ gram)
            x = a * x + poly @ x
    else:
        batch = x.unsqueeze(0) if x.dim() == 2 else x
        batch = _ns_gram_space(batch, steps) if _gram_space_pays(*x.shape[-2:], steps) else _ns_batched(batch, steps)
        x = batch.squeeze(0) if x.dim() == 2 else batch
    if tall:
        x = x.mT
    return x.to(g.dtype)


def _ns_batched(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The iteration on a (batch, rows, cols) stack, rows <= cols, with the scalings folded into
    the matmuls (baddbmm: beta * input + alpha * batch1 @ batch2) instead of separate passes."""
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)  # b G + c G^2
        x = torch.baddbmm(x, poly, x, beta=a)  # a X + (b G + c G^2) X
    return x


def _gram_space_pays(rows: int, cols: int, steps: int) -> bool:
    """Cost of the plain iteration: steps * (2 r^2 c + r^3) multiply-adds; in Gram space:
    2 r^2 c + (4 steps - 3) r^3, smaller once c > 1.5 r. Used from c >= 2 r (SwiGLU's up/down
    projections, 8/3 x wider), where the saving is large enough to pay for the smaller matmuls."""
    return steps >= 2 and cols >= 2 * rows


def _ns_gram_space(x: torch.Tensor, steps: int) -> torch.Tensor:
    """The same iteration for wide matrices (rows r <= cols c) carried out on r x r matrices.

    Each step multiplies X from the left by Q = a I + b G + c G^2, a polynomial in G = X X^T.
    So X_k = P_k X_0 with P_k = Q_k ... Q_1, and G_{k+1} = Q_k G_k Q_k (Q_k is symmetric). All
    of these are r x r; only G_0 = X_0 X_0^T and the final P X_0 touch the wide matrix. Equal to
    `_ns_batched` in exact arithmetic; in fp32 the two differ by rounding only (tested)."""
    a, b, c = NS_COEFFS
    gram = torch.bmm(x, x.mT)
    p = None
    for i in range(steps):
        q = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        q.diagonal(dim1=-2, dim2=-1).add_(a)
        p = q if p is None else torch.bmm(q, p)
        if i + 1 < steps:
            gram = torch.bmm(q, torch.bmm(gram, q))
    return torch.bmm(p, x)


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
            lr, mom, wd, nesterov = group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]
            plain: dict[tuple, list] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(mom).add_(p.grad)
                if _is_dtensor(buf):
                    _apply_dtensor(p, p.grad.add(buf, alpha=mom) if nesterov else buf, lr, wd, group["ns_steps"])
                else:
                    plain[(tuple(p.shape), p.grad.dtype, p.grad.device)].append((p, buf))
            for (shape, dtype, device), items in plain.items():
                # same-shaped updates written straight into one stack (no per-matrix temporaries)
                upd = torch.empty((len(items),) + shape, dtype=dtype, device=device)
                for i, (p, buf) in enumerate(items):
                    if nesterov:
                        torch.add(p.grad, buf, alpha=mom, out=upd[i])
                    else:
                        upd[i].copy_(buf)
                ortho = newton_schulz(upd, group["ns_steps"])
                scale = max(1.0, shape[0] / shape[1]) ** 0.5
                params = [p for p, _ in items]
                if wd:
                    torch._foreach_mul_(params, 1.0 - lr * wd)
                torch._foreach_add_(params, list(ortho.unbind(0)), alpha=-lr * scale)
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
