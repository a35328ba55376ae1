"""LoRA and QLoRA, applied to the model from outside it (module swaps; the model's code never
changes and its fast paths skip anything that is not a plain `nn.Linear`).

A `LoraLinear(base, r, alpha, dropout)` wraps a linear layer — a plain `nn.Linear`, or an
`Int8Linear` / `NF4Linear` from `lmforge.infer.quantize` for QLoRA — and computes

    y = base(x) + (alpha / r) * B(A(dropout(x)))

with A (r x in) Kaiming-uniform and B (out x r) zero, so a freshly applied adapter leaves the model's
outputs exactly as they were. The base is frozen; `apply_lora` freezes everything else too
(`mark_only_lora_trainable`), so a trainer that optimises `requires_grad` parameters trains only A
and B.

Artifacts: a LoRA stage saves `model.safetensors` = `merged_state_dict(model)` (a plain model's
weights: every consumer loads it without LoRA code) and `adapter.safetensors` =
`adapter_bytes(model, cfg)` (A and B of each adapted layer, the `LoraConfig` in the metadata), which
`load_adapter` applies onto the base model again.

Merging: `merge` folds (alpha / r) B A into plain base weights (the wrappers stay, flagged merged, so
`unmerge` can take the delta out again); a quantized base cannot absorb the delta, so there merging
replaces the wrapper with a plain `nn.Linear` holding the dequantized base plus the delta.
`merge(model, unload=True)` replaces every wrapper (the model is then plain again, fast paths on).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import ConfigError, InputError
from lmforge.infer.quantize import QuantizedLinear, quantize_model

META_KEY = "lmforge_lora"
ADAPTER_FILE = "adapter.safetensors"
DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclass
class LoraConfig:
    """`targets`: module-name suffixes ("wq", "mlp.w1", "lm_head", ...); "all-linear" selects every
    linear layer except the output head (list "lm_head" as well to include it)."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"lora.r must be a positive integer, not {self.r!r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha must be positive, not {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), not {self.dropout!r}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise ConfigError(f"lora.targets must be a non-empty list of module names, not {list(self.targets)!r}")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LoraConfig":
        known = {"r", "alpha", "dropout", "targets"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown LoRA config key {unknown[0]!r} (allowed: {', '.join(sorted(known))})")
        return cls(**d)


class LoraLinear(nn.Module):
    """y = base(x) + scale * B(A(dropout(x))), scale = alpha / r; `base` frozen. While `merged`, the
    delta lives in the (plain) base weight and the forward is base(x) alone."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        ref = _float_tensor(base)
        self.lora_a = nn.Parameter(torch.empty(r, self.in_features, device=ref.device, dtype=ref.dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, r, device=ref.device, dtype=ref.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.merged = False
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.scale * F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)

    def delta(self) -> torch.Tensor:
        """scale * B A, the change this adapter makes to the base weight (out x in)."""
        return (self.lora_b @ self.lora_a) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """The plain weight of base + adapter (dequantized for a quantized base); no side effect."""
        with torch.no_grad():
            if self.merged:
                return self.base.weight.detach().clone()
            w = base_weight(self.base)
            return w + self.delta().to(w.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, merged={self.merged}"


def _float_tensor(base: nn.Module) -> torch.Tensor:
    """A floating tensor of `base` whose device and dtype the adapter takes."""
    w = getattr(base, "weight", None)
    if isinstance(w, torch.Tensor) and w.is_floating_point():
        return w
    if isinstance(base, QuantizedLinear):
        return torch.empty(0, dtype=base.dtype, device=next(base.buffers()).device)
    raise ConfigError(f"cannot put a LoRA adapter on {type(base).__name__}: not a linear layer")


def base_weight(base: nn.Module) -> torch.Tensor:
    """The fp weight of a plain or quantized linear layer (a copy for quantized ones)."""
    if isinstance(base, QuantizedLinear):
        return base.dequantize()
    return base.weight.detach()


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, QuantizedLinear))


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    """Name -> LoraLinear for every adapter in `model`."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def find_targets(model: nn.Module, targets) -> list[str]:
    """Names of the linear layers (plain or quantized) `targets` selects: a name equal to a target or
    ending in "." + target; "all-linear" = every linear layer but the output head. ConfigError when
    nothing matches, or when the head is selected but tied to the embedding."""
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    everything = "all-linear" in targets
    inside_lora = {n + ".base" for n in lora_modules(model)}
    names = []
    for name, mod in model.named_modules():
        if not _is_linear(mod) or name in inside_lora:
            continue
        listed = any(name == t or name.endswith("." + t) for t in targets)
        if listed or (everything and name != "lm_head"):
            names.append(name)
    if not names:
        raise ConfigError(f"LoRA targets {list(targets)} match no linear layer of the model")
    emb = getattr(model, "tok_emb", None)
    for name in names:
        if emb is not None and getattr(model.get_submodule(name), "weight", None) is emb.weight:
            raise ConfigError(f"cannot put a LoRA adapter on {name}: its weight is tied to the embedding")
    return names


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def mark_only_lora_trainable(model: nn.Module) -> None:
    """requires_grad only on the adapters' A and B; every other parameter frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.rpartition(".")[2] in ("lora_a", "lora_b"))


def apply_lora(model: nn.Module, cfg: LoraConfig | None = None) -> list[str]:
    """Wrap each target linear layer of `model` in a `LoraLinear` (in place) and freeze everything
    but the adapters. Returns the wrapped layer names. ConfigError when the model has adapters
    already or a target matches nothing."""
    cfg = cfg or LoraConfig()
    if lora_modules(model):
        raise ConfigError("the model has LoRA adapters already (merge(model, unload=True) first)")
    names = find_targets(model, cfg.targets)
    for name in names:
        _set(model, name, LoraLinear(model.get_submodule(name), cfg.r, cfg.alpha, cfg.dropout))
    mark_only_lora_trainable(model)
    return names


def qlora(model: nn.Module, kind: str = "nf4", cfg: LoraConfig | None = None, block_size: int = 64) -> list[str]:
    """QLoRA: quantize the frozen base model's linear layers (all but the output head, as
    `lmforge.infer.quantize.quantize_model` does) to `kind` ("nf4" | "int8"), then apply LoRA on
    `cfg.targets`. Returns the adapted layer names."""
    quantize_model(model, kind, block_size=block_size)
    return apply_lora(model, cfg)


@torch.no_grad()
def merge(model: nn.Module, unload: bool = False) -> list[str]:
    """Fold every adapter into its base weight. A plain base absorbs the delta in place and keeps
    its wrapper (flagged merged, `unmerge` reverses it) unless `unload`; a quantized base cannot, so
    that wrapper becomes a plain `nn.Linear` with the dequantized base weight plus the delta (as
    does every wrapper when `unload`). Returns the merged layer names."""
    names = []
    for name, mod in lora_modules(model).items():
        if isinstance(mod.base, nn.Linear):
            if not mod.merged:
                mod.base.weight.add_(mod.delta().to(mod.base.weight.dtype))
                mod.merged = True
            if unload:
                _set(model, name, mod.base)
        else:
            w = mod.merged_weight()
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.base.bias is not None,
                            device=w.device, dtype=w.dtype)
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.copy_(mod.base.bias)
            lin.requires_grad_(False)
            _set(model, name, lin)
        names.append(name)
    return names


@torch.no_grad()
def unmerge(model: nn.Module) -> list[str]:
    """Take merged adapters' deltas out of their (plain) base weights again: the adapter form back.
    Returns the unmerged layer names (adapters replaced by `merge` of a quantized base, or unloaded,
    are gone and cannot come back)."""
    names = []
    for name, mod in lora_modules(model).items():
        if mod.merged:
            mod.base.weight.sub_(mod.delta().to(mod.base.weight.dtype))
            mod.merged = False
            names.append(name)
    return names


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model (no LoRA, no quantized modules; CPU, contiguous, a tied
    output head stored once) that `model` computes: each adapted layer's weight is base + delta,
    each quantized layer's weight dequantized. What a LoRA stage writes as model.safetensors. The
    model is not changed."""
    plain: dict[str, torch.Tensor] = {}
    replaced: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in replaced):
            continue
        if isinstance(mod, LoraLinear):
            plain[name + ".weight"] = mod.merged_weight()
            bias = getattr(mod.base, "bias", None)
        elif isinstance(mod, QuantizedLinear):
            plain[name + ".weight"] = mod.dequantize()
            bias = mod.bias
        else:
            continue
        if bias is not None:
            plain[name + ".bias"] = bias.detach()
        replaced.append(name)
    for key, t in model.state_dict().items():
        if not any(key.startswith(p + ".") for p in replaced):
            plain[key] = t.detach()
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        plain.pop("lm_head.weight", None)  # shared with tok_emb.weight, stored once
    return {k: v.contiguous().cpu() for k, v in plain.items()}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """`<layer>.lora_a` (r x in) and `<layer>.lora_b` (out x r) of every adapter (CPU copies)."""
    out = {}
    for name, mod in lora_modules(model).items():
        out[name + ".lora_a"] = mod.lora_a.detach().cpu().contiguous()
        out[name + ".lora_b"] = mod.lora_b.detach().cpu().contiguous()
    return out


def adapter_bytes(model: nn.Module, cfg: LoraConfig) -> bytes:
    """The adapter file's bytes (for a checkpoint's extra files): the adapters' tensors, the LoRA
    config and the adapted layer names in the safetensors metadata."""
    from safetensors.torch import save

    if not lora_modules(model):
        raise ConfigError("the model has no LoRA adapters to save")
    meta = {"format": "pt", META_KEY: json.dumps({"config": cfg.to_dict(), "modules": sorted(lora_modules(model))})}
    return save(adapter_state_dict(model), metadata=meta)


def _adapter_path(path: str | Path) -> Path:
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / ADAPTER_FILE


def save_adapter(model: nn.Module, path: str | Path, cfg: LoraConfig) -> Path:
    """Write `adapter.safetensors` into directory `path` (or to `path` itself when it ends in
    .safetensors), atomically. Returns the file written."""
    from lmforge.rundir import atomic_write_bytes

    return atomic_write_bytes(_adapter_path(path), adapter_bytes(model, cfg))


def read_adapter(path: str | Path) -> tuple[LoraConfig, list[str], dict[str, torch.Tensor]]:
    """(config, adapted layer names, tensors) of an adapter file; InputError (one line) when it is
    missing, unreadable or not an lmforge adapter."""
    from lmforge.model.io import read_safetensors

    f = _adapter_path(path)
    tensors, meta = read_safetensors(f, "LoRA adapter")
    if META_KEY not in meta:
        raise InputError(f"{f} is not an lmforge LoRA adapter (no LoRA config in its metadata)")
    try:
        info = json.loads(meta[META_KEY])
        cfg = LoraConfig.from_dict(info["config"])
        modules = list(info["modules"])
    except (ValueError, KeyError, TypeError, ConfigError) as e:
        raise InputError(f"{f}: bad LoRA config in its metadata ({e})") from None
    return cfg, modules, tensors


def load_adapter(model: nn.Module, path: str | Path) -> LoraConfig:
    """Apply the adapter saved at `path` onto `model` (a base model, plain or quantized, without
    adapters; or one with the same adapters applied, whose values are replaced). Names and shapes
    are checked before the model is touched: a mismatch is one InputError line. Returns the config."""
    cfg, modules, tensors = read_adapter(path)
    f = _adapter_path(path)
    existing = lora_modules(model)
    try:
        names = sorted(existing) if existing else sorted(find_targets(model, cfg.targets))
    except ConfigError as e:
        raise InputError(f"{f} does not fit the model: {e}") from None
    if names != sorted(modules):
        extra = sorted(set(modules) - set(names)) or sorted(set(names) - set(modules))
        raise InputError(f"{f} adapts {len(modules)} layers that do not match the model's {len(names)} "
                         f"(first difference: {extra[0] if extra else '?'})")
    for name in names:
        mod = model.get_submodule(name)
        want = {name + ".lora_a": (cfg.r, mod.in_features), name + ".lora_b": (mod.out_features, cfg.r)}
        for key, shape in want.items():
            if key not in tensors:
                raise InputError(f"{f} has no tensor {key}")
            if tuple(tensors[key].shape) != shape:
                raise InputError(f"{f}: {key} has shape {tuple(tensors[key].shape)} but the model needs {shape}")
    unexpected = sorted(set(tensors) - {f"{n}.lora_{x}" for n in names for x in "ab"})
    if unexpected:
        raise InputError(f"{f} holds tensors the model has no place for: {unexpected[0]}")
    if not existing:
        apply_lora(model, cfg)
    with torch.no_grad():
        for name, mod in lora_modules(model).items():
            if mod.merged:
                raise InputError(f"cannot load {f} into merged adapters (unmerge(model) first)")
            mod.lora_a.copy_(tensors[name + ".lora_a"])
            mod.lora_b.copy_(tensors[name + ".lora_b"])
    return cfg


def trainable_parameters(model: nn.Module) -> dict:
    """Counts for a parameter-efficiency / memory report: {"trainable", "total", "percent"}; `total`
    counts quantized layers' weights as the parameters they stand for, shared tensors once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            total += mod.in_features * mod.out_features + (mod.out_features if mod.bias is not None else 0)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


__all__ = ["ADAPTER_FILE", "DEFAULT_TARGETS", "LoraConfig", "LoraLinear", "adapter_bytes", "adapter_state_dict",
           "apply_lora", "base_weight", "find_targets", "load_adapter", "lora_modules", "mark_only_lora_trainable",
           "merge", "merged_state_dict", "qlora", "read_adapter", "save_adapter", "trainable_parameters", "unmerge"]
