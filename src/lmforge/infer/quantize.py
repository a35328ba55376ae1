"""Weight-only quantization by swapping `nn.Linear` modules from outside the model (gpt-fast style):
the model's code never changes, its fast paths apply only to plain `nn.Linear`
(`lmforge.model.transformer.plain_linear`), so a quantized module is always called as a module.

Kinds (`KINDS`, name -> module class):
- "int8": `Int8Linear`, symmetric int8 per output channel (one fp scale per row). On CPU the matmul
  runs in torch's `_weight_int8pack_mm` kernel (int8 weights read directly, never expanded in
  memory) where it accepts the input; elsewhere dequantize-and-matmul.
- "nf4": `NF4Linear`, 4-bit NormalFloat (QLoRA, Dettmers et al. 2023): 16 code values that are
  quantiles of a normal distribution, one absmax scale per block of 64 weights, two codes packed
  per uint8. The forward dequantizes the weight block-wise, then matmuls.

Every quantized module is a `QuantizedLinear`: `in_features`/`out_features`, `dequantize(dtype)`
(the fp weight), `weight_bytes` (its stored size, for size reports), `spec()` (what is needed to
rebuild an empty one before loading a state dict) and `empty(...)`. Further kinds (int4
group-wise with `_weight_int4pack_mm_for_cpu`, GPTQ, which only chooses the int4 values
differently) subclass it, override `_matmul` where torch has a kernel, and register in `KINDS`.

Training through a quantized module (QLoRA: the frozen base under LoRA adapters) is supported:
the input gradient is `g @ W`, computed in the backward from the quantized weights again
(`_QuantMatmul`), so no dequantized copy of any weight is kept between forward and backward.

`quantize_model(model, kind, targets)` swaps in place; `save_quantized` / `load_quantized`
round-trip a quantized model through safetensors (the quantized buffers plus a map of which
module is which kind, in the file's metadata).
"""

from __future__ import annotations

import abc
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import ConfigError, InputError

META_KEY = "lmforge_quantization"

# The 16 NF4 code values of the QLoRA paper (appendix E): quantiles of N(0, 1) scaled to [-1, 1],
# asymmetric so that 0 is represented exactly (7 negative, zero, 8 positive values).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


class _QuantMatmul(torch.autograd.Function):
    """y = x W^T for a quantized module's W, with the input gradient g W computed from the quantized
    weights in the backward (the weights themselves are frozen: no weight gradient)."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module = module
        return module._matmul(x)

    @staticmethod
    def backward(ctx, g):
        return ctx.module._matmul_grad(g), None


class QuantizedLinear(nn.Module, metaclass=abc.ABCMeta):
    """Base of the weight-only quantized linear layers: y = x W^T (+ bias) with W stored quantized.
    Subclasses store their buffers, implement `dequantize`, `weight_bytes`, `from_linear`, `empty`,
    and may override `_matmul` (a fused kernel) and `_matmul_grad`."""

    kind = ""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("bias", None)  # a subclass registers a tensor when the layer has a bias

    def _init_bias(self, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        if bias is not None:
            self.register_buffer("bias", bias.detach().clone().to(dtype))

    @property
    @abc.abstractmethod
    def dtype(self) -> torch.dtype:
        """The floating dtype the weight dequantizes to by default (that of the scales)."""

    @abc.abstractmethod
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The fp weight (out_features, in_features)."""

    @property
    @abc.abstractmethod
    def weight_bytes(self) -> int:
        """Bytes this module stores for its weight (quantized values + scales), bias excluded."""

    def spec(self) -> dict:
        """JSON-able description from which `empty` rebuilds this module (before loading its state)."""
        return {"kind": self.kind, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) -> x W^T (N, out). Default: dequantize, then matmul."""
        return F.linear(x, self.dequantize(x.dtype))

    def _matmul_grad(self, g: torch.Tensor) -> torch.Tensor:
        """g (N, out) -> g W (N, in), the input gradient."""
        return g @ self.dequantize(g.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if torch.is_grad_enabled() and x2.requires_grad:
            y = _QuantMatmul.apply(x2, self)
        else:
            y = self._matmul(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# ---- int8 ------------------------------------------------------------------------------------

def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q int8 (out, in), scale (out,) in w's dtype) with
    w ~= q * scale[:, None]; the largest |w| of each row maps to 127."""
    wf = w.detach().float()
    amax = wf.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))  # an all-zero row: any scale
    q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype if w.is_floating_point() else torch.float32)


def _int8_kernel_ok(x: torch.Tensor) -> bool:
    """Whether to use torch's CPU `_weight_int8pack_mm` for this input (`Int8Linear.use_kernel`, off
    by default). Measured in torch 2.13 CPU on this project's 2-core AVX2 machine, 768 -> 2048, one
    thread: the kernel took 2.2 / 23 / 93 / 7,216 ms for 1 / 8 / 32 / 2,048 rows against 0.8 / 2.1 /
    2.5 / 92 ms for int8 -> fp32 conversion + BLAS matmul (a QLoRA-int8 training step was 18x slower
    through it), so the BLAS path is the default. When enabled: it needs a 2-D input contiguous in
    its last dimension (we pass one) and has no autograd formula (`_QuantMatmul` supplies the
    backward); fp32 and fp16 accept any width, bf16 crashes on widths that are not a multiple of 16,
    so reduced precision is kept to those."""
    if not Int8Linear.use_kernel:
        return False
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if torch.compiler.is_compiling():
        return False
    return x.dtype == torch.float32 or x.shape[-1] % 16 == 0


class Int8Linear(QuantizedLinear):
    """Weight-only int8 per output channel: buffers `weight` (int8, out x in) and `scale` (out,)."""

    kind = "int8"
    use_kernel = False  # torch's `_weight_int8pack_mm` on CPU: slower than BLAS here (see `_int8_kernel_ok`)

    def __init__(self, in_features: int, out_features: int, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device=None):
        super().__init__(in_features, out_features)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, dtype=w.dtype, device=w.device)
        m.weight, m.scale = int8_quantize(w)
        m._init_bias(linear.bias, w.dtype)
        return m

    @classmethod
    def empty(cls, spec: dict) -> "Int8Linear":
        return cls(spec["in_features"], spec["out_features"], bias=spec.get("bias", False))

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.dtype
        return self.weight.to(dtype) * self.scale.to(dtype)[:, None]

    @property
    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.scale.numel() * self.scale.element_size()

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if _int8_kernel_ok(x):
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.weight, self.scale.to(x.dtype))
        # the scale is per output channel, so it applies after the matmul (no scaled weight copy)
        return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)

    def _matmul_grad(self, g: torch.Tensor) -> torch.Tensor:
        return (g * self.scale.to(g.dtype)) @ self.weight.to(g.dtype)


# ---- NF4 -------------------------------------------------------------------------------------

def _code(device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(NF4_CODE, device=device, dtype=dtype)


def nf4_quantize(w: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise NF4 of `w` flattened row-major (the last block zero-padded): (packed uint8 of
    ceil(numel / block_size) * block_size / 2 bytes, two codes per byte with the first in the high
    nibble; absmax fp32 (blocks,)). Each value is divided by its block's absmax and rounded to the
    nearest of the 16 `NF4_CODE` values."""
    if block_size < 2 or block_size % 2:
        raise ConfigError(f"NF4 block size must be an even number >= 2, not {block_size}")
    flat = w.detach().float().reshape(-1)
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    blocks = flat.view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    normed = blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    code = _code(flat.device)
    mids = (code[1:] + code[:-1]) / 2  # nearest code value = number of midpoints below the value
    idx = torch.bucketize(normed.reshape(-1), mids).to(torch.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    return packed, absmax


def nf4_dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], block_size: int = 64,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The fp weight of `shape` from `nf4_quantize`'s output, block by block: one gather from a
    256-entry table of the (high, low) code-value pairs of every byte, then the blocks' scales."""
    code = _code(packed.device, dtype)
    byte = torch.arange(256, device=packed.device)
    pairs = torch.stack([code[byte >> 4], code[byte & 0x0F]], dim=1)  # (256, 2)
    vals = pairs.index_select(0, packed.long()).view(-1, block_size) * absmax.to(dtype)[:, None]
    n = shape[0] * shape[1]
    return vals.reshape(-1)[:n].view(shape)


class NF4Linear(QuantizedLinear):
    """Weight-only 4-bit NormalFloat: buffers `packed` (uint8, two codes per byte) and `absmax`
    (fp32, one per block of `block_size` weights); `dtype` is what the weight dequantizes to."""

    kind = "nf4"

    def __init__(self, in_features: int, out_features: int, bias: bool = False, block_size: int = 64,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features)
        if block_size < 2 or block_size % 2:
            raise ConfigError(f"NF4 block size must be an even number >= 2, not {block_size}")
        self.block_size = block_size
        self.compute_dtype = dtype
        blocks = -(-in_features * out_features // block_size)
        self.register_buffer("packed", torch.zeros(blocks * block_size // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64) -> "NF4Linear":
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, block_size=block_size, dtype=w.dtype, device=w.device)
        m.packed, m.absmax = nf4_quantize(w, block_size)
        m._init_bias(linear.bias, w.dtype)
        return m

    @classmethod
    def empty(cls, spec: dict) -> "NF4Linear":
        return cls(spec["in_features"], spec["out_features"], bias=spec.get("bias", False),
                   block_size=spec.get("block_size", 64))

    def spec(self) -> dict:
        return {**super().spec(), "block_size": self.block_size}

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    def _apply(self, fn, recurse=True):
        # model.to(dtype) casts the floating buffers; follow it so dequantize() returns that dtype
        out = super()._apply(fn, recurse)
        probe = fn(torch.zeros((), dtype=self.compute_dtype, device=self.absmax.device))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return out

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return nf4_dequantize(self.packed, self.absmax, (self.out_features, self.in_features), self.block_size,
                              dtype or self.dtype)

    @property
    def weight_bytes(self) -> int:
        return self.packed.numel() + self.absmax.numel() * self.absmax.element_size()


KINDS: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "nf4": NF4Linear}


# ---- whole models ------------------------------------------------------------------------------

def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _tied_head(model: nn.Module, name: str, module: nn.Module) -> bool:
    emb = getattr(model, "tok_emb", None)
    return emb is not None and getattr(module, "weight", None) is emb.weight


def quantize_model(model: nn.Module, kind: str = "int8", targets=None, include_head: bool = False,
                   block_size: int = 64) -> list[str]:
    """Swap `nn.Linear` modules of `model` in place for quantized ones of `kind` ("int8" | "nf4");
    returns the swapped module names. `targets`: module-name suffixes ("wq", "w1", "lm_head", ...);
    None = every linear layer except the output head (`include_head` adds it). The embedding is
    never quantized, nor a head whose weight is tied to it (ConfigError when asked to)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown quantization kind {kind!r} (choose from {', '.join(KINDS)})")
    cls = KINDS[kind]
    chosen = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        is_head = name == "lm_head"
        wanted = _matches(name, targets) if targets is not None else (include_head or not is_head)
        if not wanted:
            continue
        if _tied_head(model, name, mod):
            if targets is None and not include_head:
                continue
            raise ConfigError(f"cannot quantize {name}: its weight is tied to the embedding")
        chosen.append(name)
    if targets is not None and not chosen:
        raise ConfigError(f"quantization targets {list(targets)} match no linear layer of the model")
    for name in chosen:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        lin = getattr(owner, attr)
        opts = {"block_size": block_size} if cls is NF4Linear else {}
        setattr(owner, attr, cls.from_linear(lin, **opts))
    return chosen


def quantization_map(model: nn.Module) -> dict[str, dict]:
    """Module name -> `spec()` for every quantized module of `model`."""
    return {n: m.spec() for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's stored state (parameters and persistent buffers, shared tensors counted
    once): with quantized modules, their quantized buffers."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _state_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        sd.pop("lm_head.weight", None)  # shared with tok_emb.weight, stored once (as model.safetensors does)
    return sd


def quantized_bytes(model: nn.Module) -> bytes:
    """A quantized model as safetensors bytes: its state dict (quantized buffers included) and the
    quantization map in the metadata."""
    from safetensors.torch import save

    return save(_state_for_save(model), metadata={"format": "pt", META_KEY: json.dumps(quantization_map(model))})


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """Write `quantized_bytes(model)` to `path` (atomically)."""
    from lmforge.rundir import atomic_write_bytes

    return atomic_write_bytes(Path(path), quantized_bytes(model))


def load_quantized(model: nn.Module, path: str | Path) -> list[str]:
    """Load a file written by `save_quantized` into `model`, a plain model of the same config:
    the modules named in the file's quantization map are replaced by empty quantized modules of
    the recorded kind and shape, then the state is loaded. Returns the quantized module names.
    InputError (one line) when the file is missing, unreadable, not a quantized model, or does not
    fit the model."""
    from lmforge.model.io import read_safetensors

    path = Path(path)
    sd, meta = read_safetensors(path, "quantized model")
    if META_KEY not in meta:
        raise InputError(f"{path} holds no quantization map: not a quantized model")
    qmap = json.loads(meta[META_KEY])
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    for name, spec in qmap.items():
        cls = KINDS.get(spec.get("kind"))
        if cls is None:
            raise InputError(f"{path}: module {name} has unknown quantization kind {spec.get('kind')!r}")
        parent, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(parent) if parent else model
            old = getattr(owner, attr)
        except AttributeError:
            raise InputError(f"{path}: quantized module {name} does not exist in the model") from None
        shape = (getattr(old, "in_features", None), getattr(old, "out_features", None))
        if shape != (spec["in_features"], spec["out_features"]):
            raise InputError(f"{path}: {name} is {spec['in_features']}->{spec['out_features']} in the file "
                             f"but {shape[0]}->{shape[1]} in the model")
        setattr(owner, attr, cls.empty(spec).to(device))
    try:
        missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in sd.items()}, strict=False)
    except RuntimeError as e:  # a tensor of the wrong shape
        raise InputError(f"{path} does not match the model: {str(e).splitlines()[-1].strip()}") from None
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False):
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise InputError(f"{path} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return list(qmap)


__all__ = ["KINDS", "NF4_CODE", "Int8Linear", "NF4Linear", "QuantizedLinear", "int8_quantize", "load_quantized",
           "model_bytes", "nf4_dequantize", "nf4_quantize", "quantization_map", "quantize_model", "quantized_bytes",
           "save_quantized"]
