"""GPTQ (Frantar et al., 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): weight-only int4 (group-wise) or int8 (per channel) whose values are chosen to keep
each linear layer's *outputs* on calibration text close to the dense ones, not its weights.

For a layer y = x W^T with calibration inputs X (n x in), the error ||X W^T - X Q^T||^2 is a
quadratic form in (W - Q) with Hessian H = 2 X^T X / n. GPTQ quantizes W one input column at a
time (optionally in order of decreasing diag(H), "act order") and spreads each column's rounding
error over the columns not yet quantized, through the inverse Hessian:

    H += damp * mean(diag(H)) * I                   (dampening: H stays positive definite)
    U  = upper Cholesky factor of H^-1
    for column j:  q_j = quant(w_j);  e = (w_j - q_j) / U[j, j];  W[:, j+1:] -= e U[j, j+1:]

done in blocks of 128 columns, the updates to later blocks applied lazily in one matmul. Columns
whose inputs were always zero (diag(H) = 0) are set to zero. Group parameters (int4 scale / zero)
are taken from the error-updated weights when a group starts; with act order they are fixed from
the original weights first ("static groups"), so the stored layout stays the plain group-wise one
that `Int4Linear` and torch's int4 kernels read.

The model is processed block by block (`gptq_quantize_model`): the calibration sequences' hidden
states enter block i through the already quantized blocks 0..i-1, forward hooks accumulate H for
every target linear layer of the block, the block's layers are quantized and swapped for
`Int4Linear` / `Int8Linear` modules, and the block's outputs are recomputed through the quantized
layers for the next block. The output head (when asked for and not tied) uses the final normed
hidden states. Written from the paper's algorithm (and after reading gpt-fast's GPTQ), not copied.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn as nn

from lmforge.errors import ConfigError, InputError
from lmforge.infer.quantize import (
    Int4Linear,
    Int8Linear,
    _check_group,
    int4_codes,
    int4_group_params,
    replace_module,
    select_linears,
)

GPTQ_KINDS = ("int4", "int8")
BLOCK_COLUMNS = 128


def gptq_quantize_weight(w: torch.Tensor, H: torch.Tensor, kind: str = "int4", group_size: int = 128,
                         act_order: bool = False, damp: float = 0.01, block: int = BLOCK_COLUMNS) -> dict:
    """GPTQ of one weight `w` (out, in) with Hessian `H` (in, in). Returns, in the original column
    order, {"codes": int32 (out, in), "scales", "zeros" (int4: (out, in / group_size)) or "scale"
    (int8: (out,)), "dequantized": the fp32 weight the codes stand for}."""
    if kind not in GPTQ_KINDS:
        raise ConfigError(f"GPTQ quantizes to {' or '.join(GPTQ_KINDS)}, not {kind!r}")
    if not 0 <= damp < 1:
        raise ConfigError(f"GPTQ dampening must be in [0, 1), not {damp}")
    W = w.detach().float().clone()
    out, n = W.shape
    if kind == "int4":
        _check_group(n, group_size)
    H = H.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # quantization grids fixed before the error feedback: int8 per row; int4 groups with act order
    static_scale = static_zero = None
    if kind == "int8":
        amax = W.abs().amax(dim=1)
        scale8 = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    elif act_order:
        static_scale, static_zero = int4_group_params(W.view(out, -1, group_size))  # (out, groups)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n)
    W = W[:, perm]
    H = H[perm][:, perm]
    H.diagonal().add_(damp * float(torch.diag(H).mean()))
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError:  # not positive definite even dampened: more dampening
        H.diagonal().add_(0.1 * float(torch.diag(H).mean()))
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Hinv = Hinv.float()

    codes = torch.zeros(out, n, dtype=torch.int32)
    Q = torch.zeros_like(W)
    groups = n // group_size if kind == "int4" else 0
    scales = torch.zeros(out, groups) if kind == "int4" else None
    zeros = torch.zeros(out, groups) if kind == "int4" else None
    if kind == "int4" and not act_order:
        block = max(group_size, block // group_size * group_size)  # a group never straddles two blocks
    for i1 in range(0, n, block):
        i2 = min(n, i1 + block)
        W1 = W[:, i1:i2].clone()
        Err = torch.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            wcol = W1[:, i]
            if kind == "int8":
                c = torch.clamp(torch.round(wcol / scale8), -127, 127)
                qcol = c * scale8
            else:
                g = int(perm[col]) // group_size
                if act_order:
                    s, z = static_scale[:, g], static_zero[:, g]
                else:
                    if col % group_size == 0:
                        s, z = int4_group_params(W1[:, i : i + group_size])
                        scales[:, g], zeros[:, g] = s, z
                    s, z = scales[:, g], zeros[:, g]
                c = int4_codes(wcol, s, z)
                qcol = (c.float() - 8) * s + z
            codes[:, col] = c.to(torch.int32)
            Q[:, col] = qcol
            e = (wcol - qcol) / Hb[i, i]
            W1[:, i:].sub_(e[:, None] * Hb[i, i:][None, :])
            Err[:, i] = e
        W[:, i2:].sub_(Err @ Hinv[i1:i2, i2:])
    inv = torch.argsort(perm)
    res = {"codes": codes[:, inv], "dequantized": Q[:, inv]}
    if kind == "int8":
        res["scale"] = scale8
    else:
        res["scales"], res["zeros"] = (static_scale, static_zero) if act_order else (scales, zeros)
    return res


def layer_error(w_q: torch.Tensor, w: torch.Tensor, H: torch.Tensor) -> float:
    """The calibration output error tr((W - Q) H (W - Q)^T) GPTQ minimises (H = 2 X^T X / n)."""
    d = (w.float() - w_q.float()).double()
    return float(torch.einsum("oi,ij,oj->", d, H.double(), d))


class _Hessian:
    """Running H = 2 / n * sum of x^T x over the inputs a linear layer sees (a forward hook)."""

    def __init__(self, n_in: int):
        self.H = torch.zeros(n_in, n_in, dtype=torch.float64)
        self.n = 0

    def __call__(self, module, args, output):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double().cpu()
        m = x.shape[0]
        if m == 0:
            return
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * math.sqrt(2.0 / self.n)
        self.H.add_(x.t() @ x)


def _module_for(name: str, lin: nn.Linear, res: dict, kind: str, group_size: int) -> nn.Module:
    dtype = lin.weight.dtype
    if kind == "int4":
        return Int4Linear.from_codes(res["codes"], res["scales"], res["zeros"], group_size, lin.bias, dtype).to(lin.weight.device)
    m = Int8Linear(lin.in_features, lin.out_features, dtype=dtype, device=lin.weight.device)
    m.weight = res["codes"].to(torch.int8).to(lin.weight.device)
    m.scale = res["scale"].to(dtype).to(lin.weight.device)
    m._init_bias(lin.bias, dtype)
    return m


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, sequences: Sequence[Sequence[int]], kind: str = "int4", group_size: int = 128,
                        act_order: bool = False, damp: float = 0.01, include_head: bool = False, targets=None,
                        batch: int = 8, progress: Callable[[str], None] | None = None) -> dict:
    """Quantize `model` (an lmforge Transformer) in place with GPTQ calibrated on the token
    `sequences` (each at most the model's context). Returns {"modules": swapped names,
    "calibration_tokens": n, "error": {name: (gptq output error, round-to-nearest output error)}}
    (the second figure: what plain rounding would have cost on the same calibration inputs)."""
    if kind not in GPTQ_KINDS:
        raise ConfigError(f"GPTQ quantizes to {' or '.join(GPTQ_KINDS)}, not {kind!r}")
    seqs = [list(map(int, s)) for s in sequences if len(s) >= 1]
    if not seqs:
        raise InputError("GPTQ needs calibration text: no calibration sequences")
    ctx, vocab = model.cfg.max_seq_len, model.cfg.vocab_size
    if any(len(s) > ctx for s in seqs):
        raise InputError(f"a calibration sequence is longer than the model's context ({ctx} tokens)")
    if any(not 0 <= t < vocab for s in seqs for t in s):
        raise InputError(f"a calibration sequence holds a token id outside the model's vocabulary ({vocab})")
    chosen = set(select_linears(model, kind, targets, include_head))
    if kind == "int4":
        for name in chosen:
            _check_group(model.get_submodule(name).in_features, group_size, name)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    model.clear_cache()
    # equal-length batches (no padding: every position is real calibration text)
    by_len: dict[int, list[list[int]]] = {}
    for s in seqs:
        by_len.setdefault(len(s), []).append(s)
    batches = [torch.tensor(group[i : i + batch], device=device) for group in by_len.values()
               for i in range(0, len(group), batch)]
    states = [model.tok_emb(ids) for ids in batches]
    errors: dict[str, tuple[float, float]] = {}
    done: list[str] = []

    def quantize_set(names: list[str], hessians: dict[str, _Hessian]) -> None:
        for name in names:
            lin = model.get_submodule(name)
            H = hessians[name].H
            res = gptq_quantize_weight(lin.weight.detach().cpu(), H, kind, group_size, act_order, damp)
            w = lin.weight.detach().float().cpu()
            rtn = _rtn(w, kind, group_size)
            errors[name] = (layer_error(res["dequantized"], w, H), layer_error(rtn, w, H))
            replace_module(model, name, _module_for(name, lin, res, kind, group_size))
            done.append(name)

    for li, layer in enumerate(model.layers):
        prefix = f"layers.{li}."
        names = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and prefix + n in chosen]
        if names:
            hessians = {prefix + n: _Hessian(layer.get_submodule(n).in_features) for n in names}
            hooks = [layer.get_submodule(n).register_forward_hook(hessians[prefix + n]) for n in names]
            try:
                for x in states:
                    cos, sin = model.rope(0, x.shape[1])
                    layer(x, cos, sin)
            finally:
                for h in hooks:
                    h.remove()
            quantize_set([prefix + n for n in names], hessians)
        new_states = []
        for x in states:
            cos, sin = model.rope(0, x.shape[1])
            new_states.append(layer(x, cos, sin))
        states = new_states
        if progress is not None:
            progress(f"GPTQ block {li + 1}/{len(model.layers)}")
    if "lm_head" in chosen:
        hess = {"lm_head": _Hessian(model.lm_head.in_features)}
        for x in states:
            hess["lm_head"](model.lm_head, (model.norm(x),), None)
        quantize_set(["lm_head"], hess)
    model.train(was_training)
    return {"modules": done, "calibration_tokens": sum(len(s) for s in seqs), "error": errors}


def _rtn(w: torch.Tensor, kind: str, group_size: int) -> torch.Tensor:
    from lmforge.infer.quantize import int4_dequantize, int4_pack, int4_quantize, int8_quantize

    if kind == "int8":
        q, s = int8_quantize(w)
        return q.float() * s[:, None]
    codes, scales, zeros = int4_quantize(w, group_size)
    return int4_dequantize(int4_pack(codes), scales, zeros, group_size)


__all__ = ["GPTQ_KINDS", "gptq_quantize_model", "gptq_quantize_weight", "layer_error"]
