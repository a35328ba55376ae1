"""Optimizers: AdamW (fused kernel where the device has one) and Muon for the hidden weight matrices.

Muon keeps a momentum buffer per matrix and replaces the update by its nearest semi-orthogonal
matrix, computed with a few Newton-Schulz iterations (a quintic polynomial tuned to push every
singular value towards 1 quickly; exact orthogonality is not needed). Same-shaped matrices are
orthogonalised together as one batched matmul, which matters on CPUs where per-matrix kernel
launches dominate; on CPU the scalings ride on the matmuls (baddbmm), and matrices at least twice
as wide as tall (SwiGLU's projections) run the same iteration in Gram space, on r x r matrices
(`_ns_gram_space`), about a third fewer multiply-adds. On GPU the iteration runs in bf16 (tensor
cores; the polynomial tolerates the rounding, its fixed point is a band of singular values around 1
anyway) and each same-shaped group's whole update (Nesterov momentum, stacking, normalisation, the
five iterations) is one `torch.compile`d graph with static shapes, so the optimizer step is a few
fused kernels per shape instead of hundreds of small launches, and reads no value on the host (no
`.item()`, no Python branch on a tensor): it never stalls the GPU queue. Embeddings, the output head, norms and
MoE routers stay on AdamW: they are not hidden linear maps, and Muon's geometry argument does
not apply to them.

`build_optimizers(model, cfg)` returns the list of optimizers for a TrainConfig; every param
group carries `base_lr`, and `set_lr(optimizers, factor)` applies the schedule.
"""

from __future__ import annotations

import functools
from collections import defaultdict

import torch
import torch.nn as nn

# Quintic Newton-Schulz coefficients (a, b, c) for X <- a X + b (X X^T) X + c (X X^T)^2 X.
NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximately orthogonalise a matrix or a batch of matrices (..., rows, cols).

    `dtype`: the precision of the iteration; None = bf16 on CUDA, fp32 elsewhere. fp32 on CPU
    takes the CPU kernels below (baddbmm, Gram space for wide matrices); every other case (CUDA,
    bf16 anywhere, more than one batch dimension) the plain iteration, which torch.compile fuses."""
    a, b, c = NS_COEFFS
    if dtype is None:
        dtype = torch.bfloat16 if g.is_cuda else torch.float32
    x = g.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # spectral norm <= Frobenius norm <= 1
    if g.is_cuda or x.dim() > 3 or dtype != torch.float32:
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
    move by a comparable RMS; weight decay is decoupled (p <- p (1 - lr wd)).

    `ns_dtype`: precision of the Newton-Schulz iteration (None: bf16 on CUDA, fp32 elsewhere).
    `compile`: run each same-shaped group's update as one `torch.compile`d graph (None: on CUDA
    when Triton is there). Eager fp32 on CPU keeps the CPU kernels of `newton_schulz`; every other
    combination goes through `_group_update`, the same function compiled or not."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0, *, ns_dtype: torch.dtype | None = None,
                 compile: bool | None = None):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got shape {tuple(p.shape)}")
        # instance settings, not param-group keys: optimizer.pt files written before them still load
        self.ns_dtype, self.compile = ns_dtype, compile

    def _fast_path(self, device: torch.device) -> tuple[bool, torch.dtype]:
        """(compile?, iteration dtype) for parameters on `device`."""
        dtype = self.ns_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        compile = self.compile if self.compile is not None else (device.type == "cuda" and _has_triton())
        return compile, dtype

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
                if _is_dtensor(buf):
                    buf.mul_(mom).add_(p.grad)
                    _apply_dtensor(p, p.grad.add(buf, alpha=mom) if nesterov else buf, lr, wd, group["ns_steps"])
                else:
                    plain[(tuple(p.shape), p.grad.dtype, p.grad.device)].append((p, buf))
            # momentum of every plain matrix in two multi-tensor kernels (mul then add: the same
            # numbers as p-by-p buf.mul_(mom).add_(grad))
            bufs = [buf for items in plain.values() for _, buf in items]
            if bufs:
                torch._foreach_mul_(bufs, mom)
                torch._foreach_add_(bufs, [p.grad for items in plain.values() for p, _ in items])
            for (shape, dtype, device), items in plain.items():
                compile, ns_dtype = self._fast_path(device)
                if compile or device.type != "cpu" or ns_dtype != torch.float32:
                    fn = _compiled_group_update() if compile else _group_update
                    ortho = fn([p.grad for p, _ in items], [b for _, b in items], mom, nesterov, group["ns_steps"], ns_dtype)
                else:
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


def _group_update(grads: list[torch.Tensor], bufs: list[torch.Tensor], momentum: float, nesterov: bool,
                  steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Orthogonalised updates of a group of same-shaped matrices, stacked (n, rows, cols) in the
    gradients' dtype: Nesterov (grad + momentum * buf) or heavy-ball (buf) directions, then
    `newton_schulz` in `dtype`. Reads no tensor value on the host, so compiled it is one graph."""
    if nesterov:
        upd = torch.stack([g.add(b, alpha=momentum) for g, b in zip(grads, bufs)])
    else:
        upd = torch.stack(bufs)
    return newton_schulz(upd, steps, dtype=dtype)


@functools.cache
def _compiled_group_update():
    """`_group_update` compiled once per process, lazily (importing lmforge never starts the
    compiler). Static shapes: one graph per matrix shape (a model has a handful; past dynamo's
    recompile limit further shapes run eagerly, still correct)."""
    return torch.compile(_group_update, dynamic=False)


@functools.cache
def _has_triton() -> bool:
    """torch.compile's GPU backend generates Triton kernels; without Triton Muon stays eager."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:  # pragma: no cover
        return False
    return has_triton()


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
