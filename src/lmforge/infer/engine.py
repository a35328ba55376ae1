"""The generation engine: prefill + decode over the model's pre-allocated KV cache, for a batch of
prompts of different lengths, each row at its own position and stopping on its own.

    from lmforge.infer.engine import SamplingParams, generate
    outs = generate(model, [ids_a, ids_b], SamplingParams(max_new_tokens=32, temperature=0.8, n=4, seed=0),
                    tokenizer=tok)

How a batch runs (static shapes throughout, so the decode step is one graph `torch.compile` can
capture — with CUDA graphs on GPU):
1. prefill: the distinct prompts, right-padded to the longest, go through the model once with a
   causal mask, filling cache slots 0..len-1 of their rows (a padded row's garbage slots lie
   after its own tokens, where its causal mask never looks, and its decode steps overwrite them);
   only each row's last real position goes through the output head;
2. n samples per prompt share that prefill: the cache rows are copied n times;
3. decode: every row feeds its last token at its own position `pos[b]` (per-row RoPE, per-row
   cache write, additive mask `slot <= pos[b]`), one token per row per step; a row that has
   stopped keeps computing (the shapes stay fixed) and its tokens are ignored. Eager decode
   attends to the slots written so far rounded up to a multiple of `LIVE_BUCKET` (the mask passed
   is that prefix of the full one: a handful of static shapes over a long generation), compiled
   decode to the whole cache (one shape, one graph).

Speed (docs/inference.md, "Engine speed"):
- threads per phase (CPU): the prefill runs at the caller's `torch.get_num_threads()` (GEMMs that
  use every core). Batch-1 decode is a chain of small GEMVs bound by memory bandwidth, where the
  best intra-op thread count depends on what else the machine runs: measured on this project's
  2-core machine, 2 threads decode 1.4-1.7x faster than 1 when the other core is idle and 2x
  *slower* when another process keeps it busy (the threads wait for each other at every op). So
  while the batch has at most `DECODE_SINGLE_THREAD_ROWS` rows the decode tunes itself
  (`ThreadTuner`): it times its own steps at 1 thread and at the caller's count, alternating, keeps
  the faster, and probes again every `ThreadTuner.REPROBE` steps; larger batches decode at the
  caller's count. `decode_threads=N` or `LMFORGE_DECODE_THREADS=N` fixes the count; the caller's
  count is restored afterwards. A single row of an int8 model whose decode runs lmforge's compiled
  int8 kernel (`lmforge.infer.cpu_kernels`) gives the chosen count to that kernel's own threads and
  runs torch's ops on one (two thread pools spinning on the same two cores slowed decode 2-3x).
- chunked prefill: prompts longer than `prefill_chunk` tokens (default `PREFILL_CHUNK`) go through
  the cache in chunks (each chunk's queries attend to the cache so far), so the attention scores
  and activations of a long prompt never exist at full length at once;
- the decode mask is kept in place (one slot set per row per step, not rebuilt), and the only host
  sync per step is reading the sampled tokens (needed for stop tokens and streaming);
- `compile=True`: the decode step through `torch.compile` (mode "reduce-overhead" = CUDA graphs on
  GPU); the KV cache is then kept aside between calls (detached from the model, so other forwards
  run without it) and put back for a call of the same shape, so that call replays the captured
  graph instead of recompiling (`release_cache(model)` frees it). On CPU the
  compiled step measured no faster than eager here, at a minute of compile time: off by default.

Sampling: greedy (temperature 0), temperature, top-k, top-p (nucleus), repetition penalty (CTRL /
HF style: a seen token's logit divided by the penalty when positive, multiplied when negative),
stop token ids (default the tokenizer's end-of-text and, for chat, end-of-turn tokens) and stop
strings, a seed (own generator: the caller's RNG is never touched). Each completion says why it
ended: "stop" (a stop token or string), "length" (max_new_tokens), or "context" (the model's
context was full before max_new_tokens) — a request is never clipped silently; a prompt that
leaves no room at all is refused with `ContextLimitError`.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from lmforge.errors import ConfigError, InputError
from lmforge.infer.cpu_kernels import set_threads as set_kernel_threads
from lmforge.infer.cpu_kernels import use_threads as use_kernel_threads


class ContextLimitError(InputError):
    """A prompt leaves no room in the model's context for a single new token."""


PREFILL_CHUNK = 512  # prompt tokens per prefill chunk
DECODE_SINGLE_THREAD_ROWS = 4  # CPU decode batches up to this many rows run on one intra-op thread
LIVE_BUCKET = 256  # eager decode attends to the written cache slots rounded up to a multiple of this


AUTO_THREADS = "auto"


def decode_threads_for(rows: int, device: torch.device | str = "cpu") -> int | str | None:
    """The intra-op threads the decode phase runs on for a batch of `rows`: None (leave torch's
    setting alone — GPU, or a larger CPU batch), `AUTO_THREADS` (small CPU batches: `ThreadTuner`
    picks 1 or the caller's count from measured step times), or N from `LMFORGE_DECODE_THREADS=N`."""
    if torch.device(device).type != "cpu":
        return None
    env = os.environ.get("LMFORGE_DECODE_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ConfigError(f"LMFORGE_DECODE_THREADS={env!r}: expected a positive integer") from None
        if n < 1:
            raise ConfigError(f"LMFORGE_DECODE_THREADS={env!r}: expected a positive integer")
        return n
    return AUTO_THREADS if rows <= DECODE_SINGLE_THREAD_ROWS else None


class ThreadTuner:
    """Chooses the intra-op thread count of each decode step between 1 and `most` from the step
    times it measures: the first `2 * PROBE` steps alternate the two counts, the count with the
    smaller median step time is kept, and every `REPROBE` steps the probe runs again (another job
    may have started or ended). Only the model step is timed (the sampling around it is the same
    either way)."""

    PROBE = 3  # timed steps per candidate in one probe
    REPROBE = 96  # steps between probes

    def __init__(self, most: int):
        self.candidates = (1, most)
        self.best = 1
        self.times: dict[int, list[float]] = {1: [], most: []}
        self.probing_from = 0
        self.choices: list[int] = []  # the count each step ran at (tests, benchmarks)

    def threads(self, step: int) -> int:
        k = step - self.probing_from
        if k < 2 * self.PROBE:
            return self.candidates[k % 2]
        if k == 2 * self.PROBE:
            med = {c: sorted(v)[len(v) // 2] for c, v in self.times.items() if v}
            self.best = min(med, key=med.get) if len(med) == 2 else self.best
            for v in self.times.values():
                v.clear()
        if k >= self.REPROBE:
            self.probing_from = step
            return self.candidates[0]
        return self.best

    def record(self, step: int, threads: int, seconds: float) -> None:
        self.choices.append(threads)
        if step - self.probing_from < 2 * self.PROBE:
            self.times[threads].append(seconds)


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Run the block with `torch.set_num_threads(n)` (None: unchanged), then restore the count."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


MIN_TEMPERATURE = 1e-5  # below it, sampling is greedy in all but name (callers map it to 0)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    stop: Sequence[str] = ()  # stop strings: the text is cut before the first one
    stop_token_ids: Sequence[int] | None = None  # None: the tokenizer's end tokens
    n: int = 1  # samples per prompt, sharing one prefill
    seed: int | None = None
    logprobs: bool = False  # return each sampled token's log-probability (under the raw model distribution)

    def validate(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        # the bounds keep every value representable in fp32 sampling (a temperature of 1e-45 or a
        # penalty of 1e-300 would turn the logits into inf and the probabilities into NaN)
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 1e4):
            raise ConfigError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, 1e4], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 1e-6 <= self.top_p <= 1:
            raise ConfigError(f"top_p must be in [1e-6, 1], got {self.top_p!r}")
        if not 0.01 <= self.repetition_penalty <= 100:
            raise ConfigError(f"repetition_penalty must be in [0.01, 100], got {self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(2**63) <= self.seed < 2**64):
            raise ConfigError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"n must be a positive integer, got {self.n!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty strings")


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    token_ids: list[int]  # generated ids, without the stop token (up to the token that completed a stop string)
    text: str | None  # decoded and cut before a stop string (None without a tokenizer)
    finish_reason: str  # "stop" | "length" | "context"
    prompt_tokens: int
    logprobs: list[float] | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it


@dataclass
class _Row:
    prompt_index: int
    sample_index: int
    prompt_len: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None
    stop_reason: int | str | None = None
    text: str | None = None


def end_token_ids(tokenizer) -> list[int]:
    """The ids that end a generation by default: end of text, and end of turn when the vocabulary
    has chat tokens."""
    ids = []
    for name in ("<|eos|>", "<|end|>", "<|eot|>", "<|im_end|>"):
        i = tokenizer.special_tokens.get(name) if tokenizer is not None and hasattr(tokenizer, "special_tokens") else None
        if i is not None:
            ids.append(int(i))
    if not ids and tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
        ids.append(int(tokenizer.eos_id))
    return ids


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None) -> torch.Tensor:
    """Repetition penalty, temperature, top-k and top-p applied to (rows, V) float logits; masked
    entries become -inf. Greedy (temperature 0) skips temperature, top-k and top-p."""
    if seen is not None and params.repetition_penalty != 1.0:
        pen = torch.where(logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty)
        logits = torch.where(seen, pen, logits)
    if params.temperature == 0:
        return logits
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from processed logits: argmax when greedy, else a draw from the softmax."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    return draw(logits.softmax(dim=-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of `probs` (rows, V), drawn with probability probs[i] / sum: the first index
    whose running sum exceeds u x the total, u uniform in [0, 1) — inverse-CDF sampling, the same
    distribution as `torch.multinomial(probs, 1)` at a fraction of its cost on CPU (15 vs 180 us at
    4,096 entries, 60 vs 1,270 us at 32,768 here). Entries of probability 0 are never drawn; should
    u x total round up to the total (u within 2^-24 of 1), the most probable entry is taken."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    over = idx >= probs.shape[-1]
    if bool(over.any()):
        idx = torch.where(over, probs.argmax(-1), idx)
    return idx


def decode_step(model, tokens: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One decode step: tokens (B, 1) at per-row cache positions pos (B, 1), attention mask (B, 1, 1, S')
    (boolean, or additive float; S' <= S: attention reads the first S' cache slots) -> next-token
    logits (B, V) in fp32. Static shapes: the graph `torch.compile` captures."""
    logits, _ = model(tokens, pos=pos, mask=mask)
    return logits[:, -1].float()


_COMPILED: dict = {}


def _decode_fn(model, compile: bool) -> Callable:
    if not compile:
        return decode_step
    key = id(model)
    if key not in _COMPILED or _COMPILED[key][0]() is not model:
        from lmforge.infer.quantize import prepare_kernels

        prepare_kernels(model)  # int4 kernel weights built eagerly, outside the captured graph
        mode = "reduce-overhead" if next(model.parameters()).device.type == "cuda" else None
        _COMPILED[key] = (weakref.ref(model), torch.compile(decode_step, mode=mode, dynamic=False))
    return _COMPILED[key][1]


_KEPT_CACHES: weakref.WeakKeyDictionary | None = None  # model -> KV caches kept for the compiled decode step


def _setup_cache(model, rows: int, slots: int, keep: bool) -> None:
    """A KV cache of `rows` x `slots` on every layer. With `keep` (compiled decode) the caches a
    previous call kept (`_keep_cache`) are put back when they have exactly that shape, dtype and
    device, so the compiled graph sees the same buffers and is not recompiled / re-captured."""
    if keep and _KEPT_CACHES is not None:
        kept = _KEPT_CACHES.get(model)
        p = next(model.parameters())
        if kept and len(kept) == len(model.layers):
            k = kept[0].k
            if (k.shape[0], k.shape[2]) == (rows, slots) and k.device == p.device and k.dtype == p.dtype:
                for layer, c in zip(model.layers, kept):
                    layer.attn.cache = c
                return
    model.setup_cache(rows, slots)


def _keep_cache(model) -> None:
    """Detach the model's caches (so later forwards run without a cache) but keep them for the next
    compiled call of the same shape."""
    global _KEPT_CACHES

    if _KEPT_CACHES is None:
        _KEPT_CACHES = weakref.WeakKeyDictionary()
    caches = model.caches()
    if caches and all(c is not None for c in caches):
        _KEPT_CACHES[model] = caches
    model.clear_cache()


def release_cache(model) -> None:
    """Free the KV cache `generate(compile=True)` keeps for `model` between calls."""
    if _KEPT_CACHES is not None:
        _KEPT_CACHES.pop(model, None)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, tokenizer=None, *,
             max_batch: int = 64, compile: bool = False, on_token: Callable[[int, int, int], None] | None = None,
             decode_threads: int | None = None, prefill_chunk: int | None = None) -> list[Completion]:
    """Complete every prompt (lists of token ids; no padding needed) `params.n` times. Returns the
    completions in prompt order, n per prompt. `tokenizer` (lmforge.tokenizer.Tokenizer) decodes
    text, applies stop strings and supplies the default stop tokens. `max_batch` caps the rows
    (prompts x n) decoded together. `on_token(prompt_index, sample_index, token_id)` is called for
    every generated token as it is produced (streaming). `decode_threads`: CPU intra-op threads of
    the decode phase (default `decode_threads_for(rows)`); `prefill_chunk`: prompt tokens per
    prefill chunk (default `PREFILL_CHUNK`); `compile`: the decode step through torch.compile
    (module docstring)."""
    params = params or SamplingParams()
    params.validate()
    if decode_threads is not None and (not isinstance(decode_threads, int) or decode_threads < 1):
        raise ConfigError(f"decode_threads must be a positive integer, got {decode_threads!r}")
    chunk_len = PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
    if not isinstance(chunk_len, int) or chunk_len < 1:
        raise ConfigError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
    if params.stop and tokenizer is None:
        raise ConfigError("stop strings need a tokenizer to decode the generated text")
    ctx = model.cfg.max_seq_len
    prompts = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(prompts):
        if not p:
            raise InputError(f"prompt {i} is empty (it needs at least a beginning-of-text token)")
        if len(p) >= ctx:
            raise ContextLimitError(f"prompt {i} has {len(p)} tokens: no room left in the model's context of {ctx} tokens")
        bad = [t for t in p if not 0 <= t < model.cfg.vocab_size]
        if bad:
            raise InputError(f"prompt {i} holds token id {bad[0]} outside the model's vocabulary ({model.cfg.vocab_size})")
    stop_ids = set(end_token_ids(tokenizer) if params.stop_token_ids is None else map(int, params.stop_token_ids))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    g = None
    if params.temperature > 0:
        g = torch.Generator(device=device)
        if params.seed is None:
            g.seed()
        else:
            g.manual_seed(params.seed)
    per_chunk = max(1, max_batch // params.n)
    out: list[Completion] = []
    try:
        for c0 in range(0, len(prompts), per_chunk):
            chunk = prompts[c0 : c0 + per_chunk]
            threads = decode_threads if decode_threads is not None else decode_threads_for(len(chunk) * params.n, device)
            if device.type != "cpu":
                threads = None
            out.extend(_generate_chunk(model, chunk, c0, params, tokenizer, stop_ids, g, device, compile, on_token,
                                       threads, chunk_len))
    finally:
        if compile:
            _keep_cache(model)
        else:
            model.clear_cache()
        model.train(was_training)
    return out


def prefill(model, prompts: Sequence[Sequence[int]], device, chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Fill cache rows 0..P-1 with the right-padded `prompts` (a cache of at least P rows and max-len
    slots set up), `chunk` tokens at a time; returns the fp32 logits (P, V) of each prompt's last
    token (only those positions go through the output head)."""
    P = len(prompts)
    lens = [len(p) for p in prompts]
    L = max(lens)
    x = torch.zeros(P, L, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        x[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    last = torch.tensor(lens, device=device) - 1
    if L <= chunk:
        h = model.hidden_states(x, pos=0)
        return model.lm_head(h[torch.arange(P, device=device), last]).float()
    h_last = None
    for s in range(0, L, chunk):
        e = min(L, s + chunk)
        h = model.hidden_states(x[:, s:e], pos=s)
        inside = [i for i in range(P) if s <= lens[i] - 1 < e]
        if inside:
            idx = torch.tensor(inside, device=device)
            if h_last is None:
                h_last = h.new_zeros(P, h.shape[-1])
            h_last[idx] = h[idx, last[idx] - s]
    return model.lm_head(h_last).float()


def _native_step(model, rows: int = 1):
    from lmforge.infer.native_decode import MAX_TOKENS, native_step

    return native_step(model) if rows <= MAX_TOKENS else None


def _int8_kernel_decode(model) -> bool:
    from lmforge.infer.quantize import int8_kernel_decode

    return int8_kernel_decode(model)


def _generate_chunk(model, prompts, first_index, params, tokenizer, stop_ids, g, device, compile, on_token,
                    threads=None, chunk_len=PREFILL_CHUNK):
    ctx = model.cfg.max_seq_len
    P, n = len(prompts), params.n
    lens = [len(p) for p in prompts]
    L = max(lens)
    S = min(ctx, L + params.max_new_tokens)  # cache slots: the longest prompt plus what it may add
    rows = P * n
    _setup_cache(model, rows, S, keep=compile)
    # ---- prefill: distinct prompts only, right-padded, causal; logits of each last real position
    logits = prefill(model, prompts, device, chunk_len)
    if n > 1:
        for c in model.caches():
            c.k[:rows] = c.k[:P].repeat_interleave(n, 0)
            c.v[:rows] = c.v[:P].repeat_interleave(n, 0)
        logits = logits.repeat_interleave(n, 0)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(rows, model.cfg.vocab_size, dtype=torch.bool, device=device)
        for r in range(rows):
            seen[r, torch.tensor(prompts[r // n], device=device)] = True
    state = [_Row(first_index + r // n, r % n, lens[r // n]) for r in range(rows)]
    pos = torch.tensor([lens[r // n] for r in range(rows)], dtype=torch.long, device=device)  # next slot per row
    # the decode mask (rows, 1, 1, S), additive (0 where slot <= pos[row], -inf elsewhere: SDPA's CPU
    # kernel takes it as is, a boolean one it converts in every layer); kept in place, one slot
    # opened per row per step
    dtype = next(model.parameters()).dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    mask = torch.zeros(rows, 1, 1, S, dtype=dtype, device=device)
    mask.masked_fill_((torch.arange(S, device=device)[None, :] >= pos[:, None])[:, None, None, :], float("-inf"))
    step_fn = _decode_fn(model, compile)
    tuner = None
    caller = torch.get_num_threads()
    if threads == AUTO_THREADS:
        threads = 1 if caller == 1 else None
        if caller > 1:
            tuner = ThreadTuner(caller)
    # on CPU the whole step runs in lmforge's compiled kernel where it can run this model and batch
    # (lmforge.infer.native_decode: up to MAX_TOKENS rows, each row the arithmetic of a one-row step),
    # else torch's step (one row of an int8 model: its int8 layers through lmforge's int8 GEMV). With
    # either kernel the tuned / fixed count goes to the kernel's own threads and torch's ops run on one
    # (cpu_kernels.kernel_threads)
    native = device.type == "cpu" and not compile and _native_step(model, rows)
    if native:
        step_fn = native
    kernel = device.type == "cpu" and (bool(native) or (rows == 1 and _int8_kernel_decode(model)))
    try:
        with intra_op_threads(1 if kernel else threads), use_kernel_threads((threads or caller) if kernel else 1):
            _decode_loop(model, params, tokenizer, stop_ids, g, on_token, state, logits, seen, pos, mask, S, step_fn,
                         live_bucket=0 if compile else LIVE_BUCKET, max_len=L, tuner=tuner, kernel=kernel)
    finally:
        if torch.get_num_threads() != caller:  # the tuner's last choice
            torch.set_num_threads(caller)
    LAST_TUNER[0] = tuner
    for row in state:
        if row.finish is None:  # cannot happen: every row ends by length at the latest
            row.finish = "length"
    return [_completion(row, tokenizer, params) for row in state]


LAST_TUNER: list = [None]  # the ThreadTuner of the last generate call on this process (tests, benchmarks)


def _decode_loop(model, params, tokenizer, stop_ids, g, on_token, state, logits, seen, pos, mask, S, step_fn,
                 live_bucket: int = 0, max_len: int = 0, tuner: ThreadTuner | None = None, kernel: bool = False):
    """`live_bucket` > 0: each step attends only to the first slots that any row has written,
    rounded up to a multiple of `live_bucket` (a few static shapes), not to all S slots; `max_len`
    is the longest prompt (the first decode step writes slot max_len at the latest)."""
    ctx = model.cfg.max_seq_len
    rows = len(state)
    device = pos.device
    arange_rows = torch.arange(rows, device=device)
    max_stop = max((len(s) for s in params.stop), default=0)
    for step in range(params.max_new_tokens):
        lp_all = logits.log_softmax(-1) if params.logprobs else None
        nxt = sample(process_logits(logits, params, seen), params, g)
        nxt_host = nxt.tolist()
        lp_host = lp_all.gather(1, nxt[:, None]).squeeze(1).tolist() if lp_all is not None else None
        for r, row in enumerate(state):
            if row.finish is not None:
                continue
            t = nxt_host[r]
            if t in stop_ids:
                row.finish, row.stop_reason = "stop", t
                continue
            row.tokens.append(t)
            if lp_host is not None:
                row.logprobs.append(lp_host[r])
            if on_token is not None:
                on_token(row.prompt_index, row.sample_index, t)
            if max_stop and _hit_stop(row, tokenizer, params.stop, max_stop):
                continue
            if len(row.tokens) >= params.max_new_tokens:
                row.finish = "length"
            elif row.prompt_len + len(row.tokens) >= ctx:
                row.finish = "context"  # the next token would need a position past the model's context
        if all(row.finish is not None for row in state):
            break
        if seen is not None:
            seen[arange_rows, nxt] = True
        p = pos.clamp(max=S - 1)[:, None]  # finished rows keep computing at a valid slot; their output is ignored
        mask[arange_rows, 0, 0, p[:, 0]] = 0.0
        m = mask
        if live_bucket:
            live = -(-(max_len + step + 1) // live_bucket) * live_bucket  # slots 0..max_len+step are written
            if live < S:
                m = mask[..., :live]
        if tuner is None:
            logits = step_fn(model, nxt[:, None], p, m)
        else:
            th = tuner.threads(step)
            if kernel:
                set_kernel_threads(th)
            elif th != torch.get_num_threads():
                torch.set_num_threads(th)
            t0 = time.perf_counter()
            logits = step_fn(model, nxt[:, None], p, m)
            tuner.record(step, th, time.perf_counter() - t0)
        pos = pos + 1


def _hit_stop(row: _Row, tokenizer, stops, max_stop: int) -> bool:
    """True (and the row finished, its text cut) when a stop string appears in the text so far."""
    tail = tokenizer.decode(row.tokens[-(max_stop + 8):])
    if not any(s in tail for s in stops):
        return False
    text = tokenizer.decode(row.tokens)
    at, which = min(((text.find(s), s) for s in stops if s in text), default=(-1, None))
    if at < 0:
        return False
    row.finish, row.stop_reason, row.text = "stop", which, text[:at]
    return True


def _completion(row: _Row, tokenizer, params: SamplingParams) -> Completion:
    text = row.text if row.text is not None else (tokenizer.decode(row.tokens) if tokenizer is not None else None)
    return Completion(prompt_index=row.prompt_index, sample_index=row.sample_index, token_ids=row.tokens, text=text,
                      finish_reason=row.finish, prompt_tokens=row.prompt_len,
                      logprobs=row.logprobs if params.logprobs else None, stop_reason=row.stop_reason)


__all__ = ["SamplingParams", "Completion", "ContextLimitError", "generate", "decode_step", "process_logits", "sample", "draw",
           "end_token_ids", "prefill", "release_cache", "decode_threads_for", "intra_op_threads", "PREFILL_CHUNK",
           "ThreadTuner", "AUTO_THREADS",
           "DECODE_SINGLE_THREAD_ROWS"]


def unpad(ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """A padded (B, T) batch, left- or right-padded (HF style: `attention_mask` 1 on real tokens), as
    the list of prompts `generate` takes."""
    if ids.shape != attention_mask.shape:
        raise InputError(f"ids {tuple(ids.shape)} and attention_mask {tuple(attention_mask.shape)} differ in shape")
    return [row[m.bool()].tolist() for row, m in zip(ids, attention_mask)]


__all__ += ["unpad"]
