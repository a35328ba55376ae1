"""CPU decode of a whole model step in lmforge's compiled C kernel (`csrc/decode_kernels.c`).

A decode step of one sequence through torch is ~150 small ops and module calls around the model's
GEMVs; on a 124M model at one thread they cost about as much as the GEMVs themselves (~8 of ~18 ms,
int8), and torch's fp32 GEMV streams the weights at ~75% of what a plain loop can. `lmf_forward`
runs the step in one call instead: embedding row, per layer RMSNorm, the q/k/v GEMVs (one parallel
call), per-head QK-norm, rotate-half RoPE, the key/value write into the KV cache, attention over
the written positions (heads split over threads on long contexts), the output projection, RMSNorm,
gate/up GEMVs (one parallel call), SiLU x up, down projection, then the final norm and the head.
Each linear layer is run by its kind, chosen per layer: a plain fp32 `nn.Linear` (AVX512/AVX2 FMA
GEMV over the row-major weight), an `Int8Linear` in the dynamic mode (the same int8 GEMV as its
one-row forward: the activation row quantized to 8 bits, int32 sums) or an `Int4Linear` (its codes
x the activation quantized to 8 bits, group scales and zeros); the threads are
`cpu_kernels.kernel_threads()` (the decode loop's tuned count) on the kernel's own pool.

One call takes up to `MAX_TOKENS` tokens: consecutive tokens of one sequence (a speculative
verification chunk, a draft's catch-up: `NativeForward.__call__`) or one token of each of several
sequences (a batch decode step: `NativeForward.rows`, each row in its own row of the engine's cache
or through its own block table of the server's paged cache). The weights are read once for all of
them and every token gets exactly the arithmetic of a one-token call.

It reads the model's own tensors (weights, RoPE tables, KV cache) in place, so it is applied from
outside the model like quantization: `native_step(model)` returns a step function for the engine, or
None — with `why_not(model)` saying why — when the model is anything else: not fp32 on CPU, an MoE,
a module swapped in that the kernel does not know (LoRA, NF4, low rank, weight-only int8), forward
hooks (tensor parallelism), column-major weights (`decode_layout`), a subclass of the model that
changes its forward. Then the engine runs the torch step as before. `LMFORGE_NATIVE_DECODE=0` (or
`LMFORGE_CPU_KERNELS=0`) turns it off.

Numbers: fp32 results equal the torch step's up to float summation order (~1e-6 relative); int8
layers compute what `Int8Linear` computes for one row (its activation rounding may differ where the
fp32 input differs in its last bit); int4 layers use 8-bit activations where torch's int4 path uses
bf16 ones (held-out loss within ~0.003 nats of it, benchmarks/bench_int8_precision.py).
"""

from __future__ import annotations

import ctypes
from typing import Callable

import torch
import torch.nn as nn

from lmforge.infer.cpu_kernels import int8_gemv_lib, kernel_threads
from lmforge.infer.quantize import Int4Linear, Int8Linear, _derived, _env, _gemv_operands, int8_decode_mode
from lmforge.model.transformer import Attention, Block, KVCache, RMSNorm, SwiGLU, Transformer, plain_linear

F32, INT8, INT4 = 0, 1, 2
MAX_TOKENS = 64  # tokens one kernel call takes (a batch decode step's rows, a speculative verification chunk)
P = ctypes.c_void_p


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("N", ctypes.c_int32), ("K", ctypes.c_int32), ("w", P), ("ws", P),
                ("wsum", P), ("wz", P), ("group", ctypes.c_int32)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", P), ("mlp_norm", P), ("q_norm", P), ("k_norm", P), ("kcache", P), ("vcache", P),
                *[(n, _Linear) for n in ("wq", "wk", "wv", "wo", "w1", "w3", "w2")]]


class _Model(ctypes.Structure):
    _fields_ = [("n_layers", ctypes.c_int32), ("d", ctypes.c_int32), ("n_heads", ctypes.c_int32),
                ("n_kv", ctypes.c_int32), ("hd", ctypes.c_int32), ("ffn", ctypes.c_int32), ("vocab", ctypes.c_int32),
                ("slots", ctypes.c_int32), ("eps", ctypes.c_float), ("head_stride", ctypes.c_int64),
                ("slot_stride", ctypes.c_int64), ("block_size", ctypes.c_int32), ("max_tokens", ctypes.c_int32),
                ("emb", P), ("cos", P), ("sin", P), ("norm", P),
                ("head", _Linear), ("layers", P), ("work", P), ("qwork", P)]


def enabled() -> bool:
    return _env("LMFORGE_NATIVE_DECODE").lower() not in ("0", "off", "false", "no")


def _f32(t: torch.Tensor) -> bool:
    return (type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and t.dtype == torch.float32
            and t.is_contiguous())


def _no_hooks(m: nn.Module) -> bool:
    return not (m._forward_hooks or m._forward_pre_hooks)


def _linear(m: nn.Module, name: str, keep: list) -> _Linear | str:
    """The kernel's description of one linear layer, or why it cannot take it."""
    if not _no_hooks(m):
        return f"{name} has forward hooks"
    if plain_linear(m):
        w = m.weight
        if not _f32(w):
            return f"{name}: weight is not a contiguous (row-major) fp32 CPU tensor"
        keep.append(w)
        return _Linear(F32, w.shape[0], w.shape[1], w.data_ptr(), None, None, None, 0)
    if type(m) is Int8Linear:
        w, scale = m._buffers["weight"], m._buffers["scale"]
        if m._buffers.get("bias") is not None:
            return f"{name}: an int8 layer with a bias"
        if m.kernel_rows <= 0 or int8_decode_mode() != "dynamic":
            return f"{name}: int8 layers run the weight-only path (LMFORGE_INT8_DECODE / Int8Linear settings)"
        if w.device.type != "cpu" or not w.is_contiguous():
            return f"{name}: int8 weight is not a contiguous CPU tensor"
        sc, wsum = _derived("gemv", w, scale, _gemv_operands)
        keep.extend((w, sc, wsum))
        return _Linear(INT8, w.shape[0], w.shape[1], w.data_ptr(), sc.data_ptr(), wsum.data_ptr(), None, 0)
    if type(m) is Int4Linear:
        packed, scales, zeros = m._buffers["packed"], m._buffers["scales"], m._buffers["zeros"]
        if m._buffers.get("bias") is not None:
            return f"{name}: an int4 layer with a bias"
        if not (packed.device.type == "cpu" and packed.is_contiguous() and _f32(scales) and _f32(zeros)):
            return f"{name}: int4 codes, scales and zeros are not contiguous fp32 CPU tensors"
        keep.extend((packed, scales, zeros))
        return _Linear(INT4, m.out_features, m.in_features, packed.data_ptr(), scales.data_ptr(), None,
                       zeros.data_ptr(), m.group_size)
    return f"{name} is a {type(m).__name__}, which the native decode step does not run"


def _norm(m, name: str, keep: list) -> int | str:
    if type(m) is not RMSNorm or not _no_hooks(m) or not _f32(m.weight):
        return f"{name} is not a plain fp32 RMSNorm"
    keep.append(m.weight)
    return m.weight.data_ptr()


def _build(model) -> tuple[_Model, list] | str:
    if not enabled():
        return "turned off by LMFORGE_NATIVE_DECODE"
    if not isinstance(model, Transformer) or any(getattr(type(model), f) is not getattr(Transformer, f)
                                                 for f in ("forward", "hidden_states")):
        return f"{type(model).__name__} is not lmforge's Transformer"
    cfg = model.cfg
    if cfg.moe_experts:
        return "mixture-of-experts layers"
    lib = int8_gemv_lib()
    if lib is None:
        from lmforge.infer.cpu_kernels import int8_gemv_status

        return f"compiled kernels not available: {int8_gemv_status()}"
    keep: list = []
    emb = model.tok_emb
    if type(emb) is not nn.Embedding or not _no_hooks(emb) or not _f32(emb.weight) or not _no_hooks(model):
        return "the embedding is not a plain fp32 row-major table"
    layers = (_Layer * cfg.n_layers)()
    layouts: list = []
    for i, (blk, dst) in enumerate(zip(model.layers, layers)):
        at, mlp = blk.attn, blk.mlp
        if type(blk) is not Block or type(at) is not Attention or type(mlp) is not SwiGLU:
            return f"layer {i} is a {type(blk).__name__} with a {type(at).__name__} and a {type(mlp).__name__}"
        if not (_no_hooks(blk) and _no_hooks(at) and _no_hooks(mlp)):
            return f"layer {i} has forward hooks"
        cache = at.cache
        layout = _cache_layout(cache, cfg)
        if isinstance(layout, str):
            return f"layer {i}: {layout}"
        if layouts and layout != layouts[0]:
            return f"layer {i}'s KV cache has another shape"
        layouts.append(layout)
        keep.extend((cache.k, cache.v))
        dst.kcache, dst.vcache = cache.k.data_ptr(), cache.v.data_ptr()
        for name, m in (("attn_norm", blk.attn_norm), ("mlp_norm", blk.mlp_norm)):
            p = _norm(m, f"layer {i} {name}", keep)
            if isinstance(p, str):
                return p
            setattr(dst, name, p)
        if (at.q_norm is None) != (at.k_norm is None):
            return f"layer {i} has a query norm without a key norm"
        if at.q_norm is not None:
            for name in ("q_norm", "k_norm"):
                p = _norm(getattr(at, name), f"layer {i} {name}", keep)
                if isinstance(p, str):
                    return p
                setattr(dst, name, p)
        for name, m in (("wq", at.wq), ("wk", at.wk), ("wv", at.wv), ("wo", at.wo), ("w1", mlp.w1), ("w3", mlp.w3),
                        ("w2", mlp.w2)):
            lin = _linear(m, f"layer {i} {name}", keep)
            if isinstance(lin, str):
                return lin
            setattr(dst, name, lin)
        hd, d = cfg.head_dim, cfg.d_model
        want = {"wq": (cfg.n_heads * hd, d), "wk": (cfg.n_kv_heads * hd, d), "wv": (cfg.n_kv_heads * hd, d),
                "wo": (d, cfg.n_heads * hd), "w1": (None, d), "w3": (None, d), "w2": (d, None)}
        for name, (n, k) in want.items():
            lin = getattr(dst, name)
            if (n is not None and lin.N != n) or (k is not None and lin.K != k):
                return f"layer {i} {name} has shape ({lin.N}, {lin.K})"
        if not (dst.w1.N == dst.w3.N == dst.w2.K):
            return f"layer {i}'s MLP widths differ"
        for a, b in (("wq", "wk"), ("wq", "wv"), ("w1", "w3")):  # layers sharing an input share its int4 groups
            la, lb = getattr(dst, a), getattr(dst, b)
            if INT4 in (la.kind, lb.kind) and la.kind == lb.kind and la.group != lb.group:
                return f"layer {i}: int4 group sizes of {a} and {b} differ"
    ffn = max(layers[i].w1.N for i in range(cfg.n_layers)) if cfg.n_layers else 0
    if any(layers[i].w1.N != ffn for i in range(cfg.n_layers)):
        return "MLP widths differ between layers (pruned channels)"
    norm = _norm(model.norm, "the final norm", keep)
    if isinstance(norm, str):
        return norm
    head = _linear(model.lm_head, "lm_head", keep)
    if isinstance(head, str):
        return head
    if head.K != cfg.d_model or head.N != emb.weight.shape[0] or emb.weight.shape[1] != cfg.d_model:
        return "the head's or the embedding's shape differs from the model's"
    cos, sin = model.rope_cos, model.rope_sin
    if not (_f32(cos) and _f32(sin)) or cos.shape[1] != cfg.head_dim:
        return "RoPE tables are not fp32 CPU tensors"
    if not layouts:
        return "no layers"
    slots, head_stride, slot_stride, block_size, paged = layouts[0]
    keep.extend((cos, sin, layers))
    m = _Model(cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, ffn, head.N, slots, cfg.norm_eps,
               head_stride, slot_stride, block_size, MAX_TOKENS, emb.weight.data_ptr(), cos.data_ptr(), sin.data_ptr(), norm, head, ctypes.cast(layers, P), None, None)
    work = torch.empty(lib.lmf_work_floats(ctypes.byref(m)))
    qwork = torch.empty(lib.lmf_qwork_bytes(ctypes.byref(m)), dtype=torch.int8)
    m.work, m.qwork = work.data_ptr(), qwork.data_ptr()
    keep.extend((work, qwork))
    return m, keep, paged


def _cache_layout(cache, cfg) -> tuple[int, int, int, int, bool] | str:
    """(positions it holds, head stride, slot stride, block size, paged) of a layer's KV cache: the engine's
    `KVCache` (this sequence's row 0: (n_kv, slots, hd)) or the server's `PagedKVCache` ((blocks *
    block_size, n_kv, hd), addressed through a block table)."""
    from lmforge.infer.paged import PagedKVCache

    hd, kv = cfg.head_dim, cfg.n_kv_heads
    if type(cache) is KVCache and _f32(cache.k) and _f32(cache.v):
        if tuple(cache.k.shape[1:]) != (kv, cache.k.shape[2], hd):
            return "the KV cache has another shape"
        return cache.k.shape[2], cache.k.shape[2] * hd, hd, cache.k.shape[2], False
    if type(cache) is PagedKVCache and _f32(cache.k) and _f32(cache.v):
        if tuple(cache.k.shape[1:]) != (kv, hd):
            return "the paged KV cache has another shape"
        return cfg.max_seq_len, hd, kv * hd, cache.block_size, True
    return "no fp32 KV cache"


def why_not(model) -> str:
    """Why `native_step(model)` gives None ("" when it does not): the first thing the kernel cannot run."""
    built = _build(model)
    return built if isinstance(built, str) else ""


class NativeForward:
    """The kernel over one model and its current KV cache (`native_forward`). Call it with up to
    `MAX_TOKENS` token ids at positions pos, pos+1, ...: their keys/values are written to the cache,
    and it returns (hidden (T, d) after the last norm, or None; logits (n, V) fp32 of the last n
    tokens, or None). Every token gets the arithmetic of a one-token call, so a chunk computes what
    decoding its tokens one by one computes (a speculative verification equals plain decoding)."""

    def __init__(self, model, m: _Model, keep: list, paged: bool):
        self.model, self._m, self.keep, self.paged = model, m, keep, paged
        self._ref = ctypes.byref(m)
        lib = int8_gemv_lib()
        self._forward, self._forward_rows = lib.lmf_forward, lib.lmf_forward_rows
        cache = model.layers[0].attn.cache
        # rows of the engine's contiguous cache: (batch, n_kv, slots, hd), one sequence per row
        self.cache_rows = 1 if paged else cache.k.shape[0]
        self._row_stride = 0 if paged else cache.k.stride(0)
        self.vocab, self.d, self.slots = m.vocab, m.d, m.slots
        self.ctx = model.cfg.max_seq_len
        self._ids = torch.empty(MAX_TOKENS, dtype=torch.int32)

    def __call__(self, ids, pos: int, hidden: bool = False, logits: int = 1, table: torch.Tensor | None = None):
        T = len(ids)
        if not 1 <= T <= MAX_TOKENS:
            raise ValueError(f"{T} tokens: the native forward takes 1 to {MAX_TOKENS} at a time")
        if not (0 <= pos and pos + T <= min(self.slots, self.ctx)):
            raise IndexError(f"positions {pos}..{pos + T - 1}: outside the cache ({self.slots} slots)")
        if self.paged and (table is None or table.dtype != torch.int64 or not table.is_contiguous()
                           or table.numel() * self._m.block_size < pos + T):
            raise ValueError("a paged KV cache needs the sequence's block table (int64, contiguous, covering the positions)")
        for i, t in enumerate(ids):
            t = int(t)
            if not 0 <= t < self.vocab:
                raise IndexError(f"token {t}: outside the vocabulary ({self.vocab})")
            self._ids[i] = t
        n = min(max(int(logits), 0), T)
        h = torch.empty(T, self.d) if hidden else None
        z = torch.empty(n, self.vocab) if n else None
        self._forward(self._ref, self._ids.data_ptr(), T, pos, h.data_ptr() if h is not None else None,
                      z.data_ptr() if z is not None else None, n, kernel_threads(),
                      table.data_ptr() if self.paged else None)
        return h, z


    def rows(self, tokens: torch.Tensor, pos: torch.Tensor, tables: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step of B sequences (B <= MAX_TOKENS): token b at position pos[b] of sequence b —
        row b of the engine's contiguous cache, or the paged cache through tables[b] (int64 (B, nb)) —
        -> logits (B, V). Each row gets exactly the arithmetic of a one-sequence step."""
        tok = tokens.reshape(-1).to(torch.int32)
        p = pos.reshape(-1).to(torch.int32)
        B = tok.numel()
        if not 1 <= B <= MAX_TOKENS or p.numel() != B:
            raise ValueError(f"{B} rows: the native step takes 1 to {MAX_TOKENS}, one position each")
        if int(p.min()) < 0 or int(p.max()) >= min(self.slots, self.ctx):
            raise IndexError(f"a position outside the cache ({self.slots} slots)")
        if int(tok.min()) < 0 or int(tok.max()) >= self.vocab:
            raise IndexError(f"a token outside the vocabulary ({self.vocab})")
        offsets = None
        if self.paged:
            if (tables is None or tables.dtype != torch.int64 or tables.dim() != 2 or tables.shape[0] < B
                    or not tables.is_contiguous() or tables.shape[1] * self._m.block_size <= int(p.max())):
                raise ValueError("a paged KV cache needs each sequence's block table (int64 (B, nb), contiguous, covering its position)")
        else:
            if B > self.cache_rows:
                raise ValueError(f"{B} rows for a cache of {self.cache_rows}")
            offsets = torch.arange(B, dtype=torch.int64) * self._row_stride
        tok, p = tok.contiguous(), p.contiguous()
        z = torch.empty(B, self.vocab)
        self._forward_rows(self._ref, tok.data_ptr(), B, p.data_ptr(), tables.data_ptr() if self.paged else None,
                           tables.shape[1] if self.paged else 0, offsets.data_ptr() if offsets is not None else None,
                           z.data_ptr(), kernel_threads())
        return z


def native_forward(model) -> NativeForward | None:
    """The kernel over `model` and the KV cache it has now (set up before; a new cache needs a new
    one), or None when it cannot run this model (`why_not`)."""
    built = _build(model)
    if isinstance(built, str):
        return None
    return NativeForward(model, *built)


def native_step(model) -> Callable | None:
    """A decode-step function `(model, tokens (B, 1), pos (B, 1), mask, table=None) -> logits (B, V)
    fp32` for B <= MAX_TOKENS sequences over the model's current KV cache (set up before; a new cache
    needs a new step), or None when the kernel cannot run this model (`why_not`). The mask is not
    read: row b attends to positions 0..pos[b] of its sequence, which is what the engine's mask
    allows. A paged cache (the server's) needs the sequences' block tables, `table` (int64 (B, nb),
    contiguous, covering each position)."""
    fwd = native_forward(model)
    if fwd is None:
        return None

    def step(_model, tokens: torch.Tensor, pos: torch.Tensor, mask=None, table: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.shape[0] == 1:
            return fwd([int(tokens.reshape(-1)[0])], int(pos.reshape(-1)[0]), table=table.reshape(-1) if table is not None else None)[1]
        return fwd.rows(tokens, pos, table)

    step.forward = fwd  # holds the tensors the kernel reads
    return step


__all__ = ["MAX_TOKENS", "NativeForward", "enabled", "native_forward", "native_step", "why_not"]
