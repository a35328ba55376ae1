"""Weight-only quantization by swapping `nn.Linear` modules from outside the model (gpt-fast style):
the model's code never changes, its fast paths apply only to plain `nn.Linear`
(`lmforge.model.transformer.plain_linear`), so a quantized module is always called as a module.

Kinds (`KINDS`, name -> module class):
- "int8": `Int8Linear`, symmetric int8 per output channel (one fp scale per row).
- "int4": `Int4Linear`, asymmetric 4-bit per group of `group_size` (32 / 64 / 128 / 256) input
  columns: w = (q - 8) * scale + zero with q in 0..15, two codes per byte; torch's int4 kernels
  (`_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm` on CUDA) multiply without expanding
  the weight, with a dequantize-and-matmul fallback where the kernel is absent.
- "nf4": `NF4Linear`, 4-bit NormalFloat (QLoRA, Dettmers et al. 2023): 16 code values that are
  quantiles of a normal distribution, one absmax scale per block of 64 weights, two codes packed
  per uint8. The forward dequantizes the weight block-wise, then matmuls.
GPTQ (`lmforge.infer.gptq`) chooses the int4 / int8 values differently (calibrated error feedback)
and stores them in the same modules.

Kernel choice on CPU (measured with torch 2.13 on this project's 2-core Xeon with AVX512-BF16/AMX,
one thread, 2048 x 768 weight; see docs/inference.md): torch's int8 and int4 weight-only kernels are
fast only with bfloat16 activations (1 row: int4 0.3-0.5 ms, int8 0.8 ms against 0.9-1.1 ms for the
fp32 BLAS GEMV; with fp32 activations 10-20x slower than BLAS), and they do not reuse weights across
rows (at 64 rows they lose to BLAS). So a call with at most `kernel_rows` rows (decode: one row per
sequence) casts the activations to bf16 and runs the kernel when the CPU has native bf16
(`cpu_has_bf16()`); larger calls (prefill, eval, training) dequantize-and-matmul in the input's own
dtype. `kernel_rows = 0` on a class turns the kernel off (exactly the dequantized weights' result).

Every quantized module is a `QuantizedLinear`: `in_features`/`out_features`, `dequantize(dtype)`
(the fp weight), `weight_bytes` (its stored size, for size reports), `spec()` (what is needed to
rebuild an empty one before loading a state dict) and `empty(...)`.

Training through a quantized module (QLoRA: the frozen base under LoRA adapters) is supported:
the input gradient is `g @ W`, computed in the backward from the quantized weights again
(`_QuantMatmul`), so no dequantized copy of any weight is kept between forward and backward.

`quantize_model(model, kind, targets)` swaps in place; `save_quantized` / `load_quantized`
round-trip a quantized model through safetensors (the quantized buffers plus a map of which
module is which kind, in the file's metadata). The stored int4 layout is the kernel-independent
one (codes + scales + zeros); the kernels' packed forms are built on first use on each device.
"""

from __future__ import annotations

import abc
import json
import os
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import ConfigError, InputError
from lmforge.infer.cpu_kernels import int8_gemv, int8_gemv_lib, int8_gemv_ready, kernel_threads

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
        return module._matmul(x, kernel=False)  # training: the exact dequantized product, no bf16 kernel

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

    def _matmul(self, x: torch.Tensor, kernel: bool = True) -> torch.Tensor:
        """x (N, in) -> x W^T (N, out). Default: dequantize, then matmul. `kernel=False`: no reduced-
        precision kernel (the autograd path)."""
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


_BF16_NATIVE: bool | None = None


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo):
    only then are torch's CPU weight-only kernels fast (module docstring)."""
    global _BF16_NATIVE
    if _BF16_NATIVE is None:
        try:
            flags = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            flags = ""
        _BF16_NATIVE = ("avx512_bf16" in flags) or ("amx_bf16" in flags)
    return _BF16_NATIVE


def _int8_kernel_ok(x: torch.Tensor) -> bool:
    """Whether `Int8Linear.use_kernel` sends this input, in its own dtype, through torch's CPU
    `_weight_int8pack_mm` (off by default: with fp32 inputs the kernel measured 2-80x slower than
    int8 -> fp32 conversion + BLAS at 1-2,048 rows, see `_int8_decode_kernel_ok` for the bf16 path
    that is used). It needs a 2-D input contiguous in its last dimension (we pass one) and has no
    autograd formula (`_QuantMatmul` supplies the backward); fp32 and fp16 accept any width, bf16
    crashes on widths that are not a multiple of 16, so reduced precision is kept to those."""
    if not Int8Linear.use_kernel:
        return False
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if torch.compiler.is_compiling():
        return False
    return x.dtype == torch.float32 or x.shape[-1] % 16 == 0


def _env(name: str) -> str:
    """`os.environ.get(name, "").strip()`, read from the environment's own dict where it has one (a
    plain dict lookup: this is read on every decode call, and `os.environ.get` of an unset name costs
    an exception)."""
    data = getattr(os.environ, "_data", None)
    if isinstance(data, dict):
        try:
            raw = data.get(os.environ.encodekey(name))
            return os.environ.decodevalue(raw).strip() if raw is not None else ""
        except (AttributeError, TypeError):
            pass
    return os.environ.get(name, "").strip()


def int8_decode_mode() -> str:
    """How a single-row fp32 call of `Int8Linear` runs on CPU: "dynamic" (default: the activation row
    quantized to 8 bits on the fly, int8 x int8 products accumulated in int32 — the precision class
    of llama.cpp's q8_0, whose matmuls also quantize the activations to 8 bits — by lmforge's
    compiled kernel, `lmforge.infer.cpu_kernels`, where it builds, else torch's fbgemm
    `quantized::linear_dynamic`) or "weight-only" (the bf16-activation `_weight_int8pack_mm`
    path; exactly the dequantized weights' result up to bf16 rounding of the activations).
    `LMFORGE_INT8_DECODE=weight-only|dynamic` overrides; `Int8Linear.decode_mode` sets the default."""
    env = _env("LMFORGE_INT8_DECODE")
    mode = env or Int8Linear.decode_mode
    if mode not in ("dynamic", "weight-only"):
        raise ConfigError(f"LMFORGE_INT8_DECODE={env!r}: choose 'dynamic' or 'weight-only'")
    return mode


_FBGEMM: bool | None = None


def fbgemm_available() -> bool:
    """Whether this torch build has the x86 quantized engine (fbgemm) for `quantized::linear_dynamic`."""
    global _FBGEMM
    if _FBGEMM is None:
        engines = torch.backends.quantized.supported_engines
        _FBGEMM = "fbgemm" in engines and torch.backends.quantized.engine in ("x86", "fbgemm")
    return _FBGEMM


def _int8_dynamic_ok(x: torch.Tensor) -> bool:
    """One fp32 row on CPU (decode at batch 1), the dynamic mode chosen, and a kernel for it
    (lmforge's compiled one, `lmforge.infer.cpu_kernels`, else fbgemm). One row only: the activation
    is quantized with one scale per call, so rows of a batch would otherwise share a scale (and each
    row's result would depend on its neighbours)."""
    return (x.shape[0] == 1 and x.dtype == torch.float32 and x.device.type == "cpu"
            and int8_decode_mode() == "dynamic" and (int8_gemv_ready() or fbgemm_available()))


_DERIVED: dict = {}  # (what, id(weight)) -> (weakref to the weight, versions, the derived object)


def _derived(what: str, weight: torch.Tensor, scale: torch.Tensor, make):
    """`make(weight, scale)`, built on first use and kept while the weight lives and neither it nor
    the scale is modified in place (their version counters); a reload or a move rebuilds it."""
    key = (what, id(weight))
    hit = _DERIVED.get(key)
    if hit is not None and hit[0]() is weight and hit[1] == (weight._version, scale._version):
        return hit[2]
    value = make(weight, scale)
    _DERIVED[key] = (weakref.ref(weight, lambda _, k=key: _DERIVED.pop(k, None)), (weight._version, scale._version), value)
    return value


def _fbgemm_pack(weight: torch.Tensor, scale: torch.Tensor):
    with warnings.catch_warnings():  # torch's qint8 tensor type is marked deprecated; the op is not
        warnings.simplefilter("ignore")
        q = torch._make_per_channel_quantized_tensor(weight, scale.double(),
                                                     torch.zeros(weight.shape[0], dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(q, None)


def _gemv_operands(weight: torch.Tensor, scale: torch.Tensor):
    """What the compiled kernel reads besides the weight: fp32 scales and the int32 row sums."""
    return scale.detach().float().contiguous(), weight.sum(dim=1, dtype=torch.int32).contiguous()


def _int8_dynamic(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """One fp32 row through the dynamic int8 kernel: lmforge's compiled GEMV on `kernel_threads()`
    threads where it is available, else fbgemm's `quantized::linear_dynamic`."""
    lib = int8_gemv_lib()
    if lib is not None and weight.is_contiguous():
        sc, wsum = _derived("gemv", weight, scale, _gemv_operands)
        return int8_gemv(lib, x.contiguous(), weight, sc, wsum, kernel_threads())
    return torch.ops.quantized.linear_dynamic(x.contiguous(), _derived("fbgemm", weight, scale, _fbgemm_pack), False)


@torch.library.custom_op("lmforge::int8_dynamic_linear", mutates_args=())
def int8_dynamic_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (1, in) fp32 -> (1, out): the dynamic int8 linear (`_int8_dynamic`) on the int8 weight (out,
    in) with per-channel `scale` (out,). A custom op so that `torch.compile` keeps it as one call
    (neither the compiled kernel's ctypes call nor fbgemm's packed weight, a TorchScript object, can
    be traced) and fuses the ops around it; eager calls skip the op's dispatch and run
    `_int8_dynamic` directly."""
    return _int8_dynamic(x, weight, scale)


@int8_dynamic_linear.register_fake
def _(x, weight, scale):
    return x.new_empty(x.shape[0], weight.shape[0])


def int8_kernel_decode(model: nn.Module) -> bool:
    """Whether batch-1 decode of `model` runs its int8 layers through lmforge's compiled kernel (an
    `Int8Linear` on CPU, the dynamic mode, the kernel built): the decode loop then gives the kernel
    the threads and runs torch's own ops on one (`lmforge.infer.cpu_kernels.kernel_threads`)."""
    lin = next((m for m in model.modules() if isinstance(m, Int8Linear)), None)
    return (lin is not None and lin.weight.device.type == "cpu" and lin.kernel_rows > 0
            and int8_decode_mode() == "dynamic" and int8_gemv_ready())


def _int8_decode_kernel_ok(x: torch.Tensor, kernel_rows: int) -> bool:
    """Decode-shaped CPU calls (at most `kernel_rows` rows) go through `_weight_int8pack_mm` with
    bf16 activations when the CPU has native bf16 and the width is a multiple of 16. Not inside
    `torch.compile` (inductor cannot lower the bf16 CPU kernel; the traced dequantize-and-matmul is
    what it fuses)."""
    return (kernel_rows > 0 and x.shape[0] <= kernel_rows and x.device.type == "cpu" and x.shape[-1] % 16 == 0
            and x.dtype in (torch.float32, torch.bfloat16) and cpu_has_bf16() and not torch.compiler.is_compiling())


class Int8Linear(QuantizedLinear):
    """Weight-only int8 per output channel: buffers `weight` (int8, out x in) and `scale` (out,)."""

    kind = "int8"
    use_kernel = False  # every call through `_weight_int8pack_mm` in the input's dtype (see `_int8_kernel_ok`)
    kernel_rows = 16  # calls of <= this many rows: the bf16 kernel on CPUs with native bf16 (0 = never)
    decode_mode = "dynamic"  # single-row fp32 CPU calls: see `int8_decode_mode`

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # decode's hot call (one fp32 row on CPU, no autograd) straight to the dynamic kernel: the
        # same result as the general path below, without its per-call checks (~10 us of ~20)
        if (x.numel() == self.in_features and x.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.is_grad_enabled() and self.kernel_rows > 0 and self._buffers.get("bias") is None
                and int8_gemv_ready() and not torch.compiler.is_compiling() and x.is_contiguous()
                and int8_decode_mode() == "dynamic"):
            w, scale = self._buffers["weight"], self._buffers["scale"]
            if w.is_contiguous():
                sc, wsum = _derived("gemv", w, scale, _gemv_operands)
                return int8_gemv(int8_gemv_lib(), x, w, sc, wsum, kernel_threads(), lead=x.shape[:-1])
        return super().forward(x)

    def _matmul(self, x: torch.Tensor, kernel: bool = True) -> torch.Tensor:
        if _int8_kernel_ok(x):
            return torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.weight, self.scale.to(x.dtype))
        if kernel and self.kernel_rows > 0 and _int8_dynamic_ok(x):
            if torch.compiler.is_compiling():
                return int8_dynamic_linear(x, self.weight, self.scale)
            return _int8_dynamic(x, self.weight, self.scale)
        if kernel and _int8_decode_kernel_ok(x, self.kernel_rows):
            xb = x.to(torch.bfloat16).contiguous()
            return torch.ops.aten._weight_int8pack_mm(xb, self.weight, self._scale_bf16()).to(x.dtype)
        # the scale is per output channel, so it applies after the matmul (no scaled weight copy)
        return F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)

    def _matmul_grad(self, g: torch.Tensor) -> torch.Tensor:
        return (g * self.scale.to(g.dtype)) @ self.weight.to(g.dtype)

    def _scale_bf16(self) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.scale.to(torch.bfloat16)
        c = self.__dict__.get("_sb")
        if c is None or c.device != self.scale.device or c.shape != self.scale.shape:
            c = self.__dict__["_sb"] = self.scale.to(torch.bfloat16)
        return c

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_sb", None)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self.__dict__.pop("_sb", None)
        return super()._load_from_state_dict(*args, **kwargs)


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


# ---- int4 group-wise ---------------------------------------------------------------------------

INT4_GROUP_SIZES = (32, 64, 128, 256)


def _check_group(in_features: int, group_size: int, name: str = "") -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, not {group_size}")
    if in_features % group_size:
        where = f"{name} has " if name else ""
        raise ConfigError(f"int4 with group size {group_size}: {where}{in_features} input features, not a multiple "
                          f"of {group_size}; choose a smaller --group-size")


def int4_group_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of asymmetric 4-bit quantization over the last axis of `w` (..., group): the
    group's [min, max] onto codes 0..15, in torch's int4 kernel convention w = (q - 8) * scale + zero
    (so zero = min + 8 * scale)."""
    wf = w.float()
    lo = wf.amin(dim=-1).clamp(max=0.0)
    hi = wf.amax(dim=-1).clamp(min=0.0)  # the range always holds 0, as gpt-fast and GPTQ do
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    return scale, lo + 8.0 * scale


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (int32) of `w` for per-element broadcastable `scale`/`zero`: round to nearest."""
    return torch.clamp(torch.round((w.float() - zero) / scale) + 8, 0, 15).to(torch.int32)


def int4_quantize(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest group-wise int4 of `w` (out, in): (codes int32 (out, in) in 0..15, scales
    fp32 (out, in / group_size), zeros fp32 (out, in / group_size))."""
    _check_group(w.shape[1], group_size)
    g = w.detach().float().view(w.shape[0], -1, group_size)
    scale, zero = int4_group_params(g)
    return int4_codes(g, scale[..., None], zero[..., None]).view(w.shape), scale, zero


def int4_pack(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes 0..15 -> (out, in / 2) uint8, the even column in the high nibble (the layout
    torch's CUDA `_convert_weight_to_int4pack` takes)."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] << 4) | c[:, 1::2]


def int4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `int4_pack`: (out, in / 2) uint8 -> (out, in) int32 codes."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).view(packed.shape[0], -1).to(torch.int32)


def int4_dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    out = packed.shape[0]
    q = int4_unpack(packed).to(dtype).view(out, -1, group_size)
    return ((q - 8) * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]).view(out, -1)


def int4_kernel_available(device: torch.device | str) -> bool:
    """Whether torch has the int4 weight-only matmul for `device` (CPU: `_weight_int4pack_mm_for_cpu`;
    CUDA: `_weight_int4pack_mm`, which needs compute capability 8.0+)."""
    dev = torch.device(device)
    ops = torch.ops.aten
    if dev.type == "cpu":
        return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")
    if dev.type == "cuda":
        return (hasattr(ops, "_weight_int4pack_mm") and torch.cuda.is_available()
                and torch.cuda.get_device_capability(dev)[0] >= 8)
    return False


class Int4Linear(QuantizedLinear):
    """Weight-only int4 per group of `group_size` input columns: buffers `packed` (uint8, out x
    in / 2, two codes per byte), `scales` and `zeros` (out x in / group_size, fp32 unless the model
    is cast); w = (q - 8) * scale + zero.

    Matmul: calls of at most `kernel_rows` rows (decode) go through torch's int4 kernel in bf16
    (CPU: when the CPU has native bf16; CUDA: always, sm80+), whose packed weight is built from the
    stored codes on first use on a device and kept outside the state dict; other calls (prefill,
    eval) dequantize-and-matmul. `kernel_rows = 0` turns the kernel off."""

    kind = "int4"
    kernel_rows = 16

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 128,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__(in_features, out_features)
        _check_group(in_features, group_size)
        if in_features % 2:
            raise ConfigError(f"int4 needs an even number of input features, not {in_features}")
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=dtype, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        self._kernel_cache: tuple | None = None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> "Int4Linear":
        """A module from codes (out, in) in 0..15 and per-group scales / zeros (out, in / group_size)."""
        out, inf = codes.shape
        m = cls(inf, out, group_size=group_size, dtype=dtype, device=codes.device)
        m.packed = int4_pack(codes)
        m.scales, m.zeros = scales.to(dtype).contiguous(), zeros.to(dtype).contiguous()
        m._init_bias(bias, dtype)
        return m

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128) -> "Int4Linear":
        w = linear.weight
        codes, scales, zeros = int4_quantize(w, group_size)
        return cls.from_codes(codes, scales, zeros, group_size, linear.bias, w.dtype)

    @classmethod
    def empty(cls, spec: dict) -> "Int4Linear":
        return cls(spec["in_features"], spec["out_features"], bias=spec.get("bias", False),
                   group_size=spec.get("group_size", 128))

    def spec(self) -> dict:
        return {**super().spec(), "group_size": self.group_size}

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return int4_dequantize(self.packed, self.scales, self.zeros, self.group_size, dtype or self.dtype)

    @property
    def weight_bytes(self) -> int:
        return (self.packed.numel() + self.scales.numel() * self.scales.element_size()
                + self.zeros.numel() * self.zeros.element_size())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"

    def _apply(self, fn, recurse=True):
        self._kernel_cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._kernel_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _kernel_ok(self, x: torch.Tensor) -> bool:
        if not 0 < x.shape[0] <= self.kernel_rows:
            return False
        if x.device.type == "cpu":
            return cpu_has_bf16() and int4_kernel_available("cpu")
        return x.device.type == "cuda" and self.in_features % 32 == 0 and int4_kernel_available(x.device)

    def prepare_kernel(self) -> tuple | None:
        """The kernel's packed weight and (groups, out, 2) bf16 scales-and-zeros for the module's
        device, built once (None when the kernel refuses this shape: the module then dequantizes)."""
        dev = self.packed.device
        cache = self._kernel_cache
        if cache is not None and cache[0] == dev:
            return cache[1]
        sz = torch.stack([self.scales.t(), self.zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
        try:
            if dev.type == "cpu":
                w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(int4_unpack(self.packed).contiguous(), 1)
            else:
                tiles = next(t for t in (8, 4, 2) if self.in_features % (t * 16) == 0)
                w = torch.ops.aten._convert_weight_to_int4pack(self.packed.contiguous(), tiles)
            value = (w, sz)
        except (RuntimeError, StopIteration):
            value = None
        self._kernel_cache = (dev, value)
        return value

    def _matmul(self, x: torch.Tensor, kernel: bool = True) -> torch.Tensor:
        if kernel and self._kernel_ok(x):
            prepared = self.prepare_kernel() if not torch.compiler.is_compiling() else (
                self._kernel_cache[1] if self._kernel_cache is not None else None)
            if prepared is not None:
                w, sz = prepared
                xb = x.to(torch.bfloat16).contiguous()
                if x.device.type == "cpu":
                    y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, w, self.group_size, sz)
                else:
                    y = torch.ops.aten._weight_int4pack_mm(xb, w, self.group_size, sz)
                return y.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype))


KINDS: dict[str, type[QuantizedLinear]] = {"int8": Int8Linear, "int4": Int4Linear, "nf4": NF4Linear}


# ---- whole models ------------------------------------------------------------------------------

def _matches(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def quantize_model(model: nn.Module, kind: str = "int8", targets=None, include_head: bool = False,
                   block_size: int = 64, group_size: int = 128) -> list[str]:
    """Swap `nn.Linear` modules of `model` in place for quantized ones of `kind` ("int8" | "int4" |
    "nf4"; `group_size` for int4, `block_size` for NF4); returns the swapped module names.
    `targets`: module-name suffixes ("wq", "w1", "lm_head", ...); None = every linear layer except
    the output head (`include_head` adds it). The embedding is never quantized; a head whose weight
    is tied to it, when asked for, gets its own quantized copy (the embedding stays as it is, so
    the checkpoint then holds both: the embedding is read one row per token, the head in full —
    llama.cpp's q8_0 quantizes the shared matrix for both)."""
    chosen = select_linears(model, kind, targets, include_head)
    cls = KINDS[kind]
    if cls is Int4Linear:
        for name in chosen:
            _check_group(model.get_submodule(name).in_features, group_size, name)
    for name in chosen:
        opts = {"block_size": block_size} if cls is NF4Linear else {"group_size": group_size} if cls is Int4Linear else {}
        replace_module(model, name, cls.from_linear(model.get_submodule(name), **opts))
    return chosen


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def select_linears(model: nn.Module, kind: str, targets=None, include_head: bool = False) -> list[str]:
    """The names of the `nn.Linear` modules `quantize_model` would swap (same rules, same errors)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown quantization kind {kind!r} (choose from {', '.join(KINDS)})")
    chosen = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        is_head = name == "lm_head"
        wanted = _matches(name, targets) if targets is not None else (include_head or not is_head)
        if not wanted:
            continue
        chosen.append(name)
    if targets is not None and not chosen:
        raise ConfigError(f"quantization targets {list(targets)} match no linear layer of the model")
    return chosen


def prepare_kernels(model: nn.Module) -> None:
    """Build every int4 module's kernel weight now (before `torch.compile` captures a decode step)."""
    for m in model.modules():
        if isinstance(m, Int4Linear):
            m.prepare_kernel()


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
    head = getattr(model, "lm_head", None)
    if getattr(getattr(model, "cfg", None), "tie_embeddings", False) and not isinstance(head, QuantizedLinear):
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


__all__ = ["INT4_GROUP_SIZES", "KINDS", "NF4_CODE", "Int4Linear", "Int8Linear", "NF4Linear", "cpu_has_bf16",
           "int4_dequantize", "int4_group_params", "int4_codes", "int4_kernel_available", "int4_pack", "int4_quantize",
           "int4_unpack", "int8_kernel_decode", "prepare_kernels", "replace_module", "select_linears", "QuantizedLinear", "int8_quantize", "load_quantized",
           "model_bytes", "nf4_dequantize", "nf4_quantize", "quantization_map", "quantize_model", "quantized_bytes",
           "save_quantized"]
