"""Continuous batching over a paged KV cache: the serving engine.

    engine = BatchEngine(model, tokenizer, kv_memory_mb=256)
    engine.start()
    req = engine.submit(tokenizer.encode("Hello"), SamplingParams(max_new_tokens=32), on_event=print)
    for ev in req.events(): ...          # TokenEvent per token, FinishEvent per sample
    completions = req.result()           # or block for the n completions
    engine.shutdown(drain=True)

One background thread runs the step loop. Every iteration:
1. cancellations and new submissions are taken in (a cancelled request's blocks are freed here);
2. admission: waiting requests, first come first served, join the running batch while their
   prompt's KV blocks fit in the free pool and `max_running` sequences are not exceeded, up to
   `max_prefill_tokens` prompt tokens per iteration. A prompt's full blocks already in the
   prefix cache (same chain hash of token ids) are shared, not recomputed; only the rest is
   prefilled, one prompt per forward (no padding), and the request's first token is sampled
   right after its own prefill. The n samples of a request share its prefill: full prompt
   blocks are shared by reference, the last partial block is copied per sample;
3. one decode step for every running sequence: each row feeds its last token at its own
   position, its keys/values written into its own blocks, attention reading its block table
   (`lmforge.infer.paged`); one host sync per step fetches the sampled tokens (and log-probs).
   Sequences that finish leave the batch at once and their blocks return to the pool, so a
   waiting request joins at the next iteration.

Memory: `kv_memory_mb` sets the number of blocks (each block holds `block_size` tokens of keys
and values for every layer), and so how many sequences run at once. A request whose prompt plus
`max_new_tokens` could not fit in the whole budget even alone is refused at submit. When a running
sequence needs a new block and none is free, the most recently admitted other sequence is
*preempted*: its blocks are freed and it goes back to the front of the queue with the tokens it
has generated; when it is readmitted its prompt plus those tokens are prefilled again
(recompute; its prompt blocks usually come back from the prefix cache) and it continues where it
stopped — the client sees no difference but latency.

Sampling parameters are per request (rows of one batch may differ): greedy rows share one argmax,
every other request gets `process_logits` + `sample` on its own rows with its own generator
(seeded per request: the same seed gives the same tokens whatever else is running). A request
whose own sampling fails ends alone with finish_reason "error" (its `Request.error` says why); the
other rows of that step go on. A failure of the step itself (the batched forward) still ends every
request in flight with "error" and restarts the block pool.

Text: every TokenEvent carries a UTF-8-safe text delta (`IncrementalText`: never half a
character) from which text that could be the beginning of a stop string is held back; the
concatenation of a sample's TokenEvent texts and its FinishEvent's `text` is exactly the final
completion text.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from lmforge.errors import ConfigError, InputError, LmforgeError
from lmforge.infer.cpu_kernels import use_threads as use_kernel_threads
from lmforge.infer.engine import (
    Completion,
    ContextLimitError,
    SamplingParams,
    end_token_ids,
    intra_op_threads,
    process_logits,
    sample,
)
from lmforge.infer.paged import (
    SCRATCH_BLOCK,
    BlockAllocator,
    PagedKVCache,
    PagedStep,
    block_hashes,
    bytes_per_block,
    paged_attend,
)
from lmforge.infer.native_decode import MAX_TOKENS as NATIVE_ROWS
from lmforge.log import logger
from lmforge.model.transformer import run_layers


class QueueFullError(InputError):
    """The engine's queue holds `max_queue` waiting requests; `retry_after` (seconds) estimates
    when a slot frees up."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class EngineStoppedError(LmforgeError):
    """The engine is shutting down (or was never started) and takes no new requests."""


class EngineError(LmforgeError):
    """The engine failed while running a request (the message says why); other requests go on."""


@dataclass
class TokenEvent:
    request_id: str
    sample_index: int
    token_id: int
    text: str  # UTF-8-safe text delta ('' while held back; '' without a tokenizer)
    logprob: float | None = None  # with params.logprobs


@dataclass
class FinishEvent:
    request_id: str
    sample_index: int
    completion: Completion
    text: str = ""  # text not yet delivered by TokenEvents (held back until the end), usually ''


Event = TokenEvent | FinishEvent


class IncrementalText:
    """Incremental detokenizer: `push(token_id)` returns the new text, never a split character
    (bytes of an unfinished UTF-8 sequence are held back until the character is complete), so
    streamed pieces are always valid text; `finish()` returns what is left, after which the
    concatenation of every returned piece equals `tokenizer.decode(all ids)`. Decodes a short
    window of ids each time (the ids since the last safe point), not the whole sequence."""

    def __init__(self, tokenizer, ids: list[int] | None = None):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.text = ""  # everything returned so far
        self._prefix = 0  # ids[_prefix:_read] decode to text already returned
        self._read = 0
        for t in ids or ():
            self.push(t)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self.tok.decode(self.ids[self._prefix : self._read])
        new = self.tok.decode(self.ids[self._prefix :])
        if len(new) > len(prefix) and not new.endswith("\ufffd") and new.startswith(prefix):
            delta = new[len(prefix) :]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def finish(self) -> str:
        """The rest of the text (a trailing unfinished character comes out as U+FFFD, as decode gives it)."""
        full = self.tok.decode(self.ids)
        rest = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += rest
        return rest


class Request:
    """A submitted request: `events()` streams its events, `result()` waits for its completions."""

    def __init__(self, rid: str, prompt_tokens: list[int], params: SamplingParams,
                 on_event: Callable[[Event], None] | None):
        self.id = rid
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.on_event = on_event
        self.completions: list[Completion | None] = [None] * params.n
        self.error: str | None = None
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._left = params.n
        self._generator: torch.Generator | None = None
        self._seqs: list = []  # its samples (the engine's _Seq objects)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Events as they come (blocking) until all n samples finished or were cancelled.
        `timeout`: the longest wait for one event (queue.Empty past it)."""
        left = self.params.n
        while left:
            ev = self._q.get(timeout=timeout)
            if isinstance(ev, FinishEvent):
                left -= 1
            yield ev

    def result(self, timeout: float | None = None) -> list[Completion]:
        """The n completions in sample order (finish_reason "cancelled" for a cancelled sample).
        TimeoutError past `timeout`; EngineError when the engine failed on this request."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        if self.error is not None:
            raise EngineError(self.error)
        return list(self.completions)  # type: ignore[arg-type]

    def _emit(self, ev: Event) -> None:
        self._q.put(ev)
        if self.on_event is not None:
            try:
                self.on_event(ev)
            except Exception:  # a consumer's bug must not stop the engine
                logger.exception("on_event callback of request %s failed", self.id)


@dataclass(eq=False)
class _Seq:
    """One sample of a request: its tokens (prompt + generated), blocks and text state."""

    req: Request
    sample_index: int
    tokens: list[int]
    prompt_len: int
    text: IncrementalText | None
    blocks: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)  # chain hashes of the full blocks registered so far
    computed: int = 0  # tokens whose keys/values are in the cache
    logprobs: list[float] = field(default_factory=list)
    emitted: str = ""  # text delivered through TokenEvents
    held: str = ""  # text held back (may begin a stop string)
    seen: torch.Tensor | None = None  # (V,) bool, for the repetition penalty
    admitted: int = 0  # admission order (preemption picks the latest)
    finished: bool = False
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    final_text: str | None = None  # set when a stop string cut the text

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


@dataclass(eq=False)
class _Group:
    """What waits in the queue: a new request (its n samples share one prefill) or one preempted
    sample (its prompt + generated tokens are prefilled again)."""

    req: Request
    seqs: list[_Seq]
    fresh: bool


class BatchEngine:
    """Continuous batching over a paged KV cache (see the module docstring). `max_running`: most
    sequences decoded together; `kv_memory_mb`: the KV cache budget (sets the number of blocks);
    without it, enough blocks for `max_running` (default 16) sequences of the full context.
    `max_queue`: waiting requests beyond which `submit` raises QueueFullError.
    `prefix_cache`: share the full blocks of equal prompt beginnings. `compile`: torch.compile
    the decode step (batch and key length padded to buckets so few graphs are compiled).
    `max_prefill_tokens`: prompt tokens prefilled per iteration before the running sequences
    take their next step (a longer prompt alone still gets in), bounding the pause that new
    requests impose on the ones already streaming."""

    def __init__(self, model, tokenizer=None, *, max_running: int | None = None, kv_memory_mb: float | None = None,
                 block_size: int = 16, max_queue: int = 64, prefix_cache: bool = True, compile: bool = False,
                 max_prefill_tokens: int = 512):
        if not isinstance(block_size, int) or block_size < 1:
            raise ConfigError(f"block_size must be a positive integer, got {block_size!r}")
        if max_running is not None and (not isinstance(max_running, int) or max_running < 1):
            raise ConfigError(f"max_running must be a positive integer, got {max_running!r}")
        if kv_memory_mb is not None and not kv_memory_mb > 0:
            raise ConfigError(f"kv_memory_mb must be > 0, got {kv_memory_mb!r}")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ConfigError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.block_size = block_size
        self.max_queue = max_queue
        self.prefix_cache = prefix_cache
        self.compile = compile
        self.max_prefill_tokens = max(1, int(max_prefill_tokens))
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        from lmforge.infer.quantize import int8_kernel_decode

        # a lone sequence of an int8 model decodes through lmforge's int8 kernel (one row): the
        # engine thread's intra-op count goes to the kernel's threads, torch's ops run on one
        self._kernel_decode = self.device.type == "cpu" and int8_kernel_decode(model)
        self._native = None  # the whole-step kernel for a lone sequence (native_decode): None = not tried yet
        per_block = bytes_per_block(self.cfg, block_size, self.dtype)
        blocks_per_ctx = math.ceil(self.cfg.max_seq_len / block_size)
        if kv_memory_mb is None:
            self.max_running = max_running or 16
            num_blocks = self.max_running * blocks_per_ctx + 1
        else:
            num_blocks = int(kv_memory_mb * 2**20 // per_block)
            if num_blocks < 2:
                raise ConfigError(f"kv_memory_mb={kv_memory_mb} holds less than one KV block of {per_block / 2**20:.3f} MB "
                                  f"({block_size} tokens x {self.cfg.n_layers} layers)")
            self.max_running = max_running or 256
        self.allocator = BlockAllocator(num_blocks, block_size)
        self._step_meta = PagedStep()
        self._caches = [PagedKVCache(num_blocks, block_size, self.cfg.n_kv_heads, self.cfg.head_dim, self.dtype,
                                     self.device, self._step_meta) for _ in range(self.cfg.n_layers)]
        self.kv_bytes = num_blocks * per_block
        self._default_stop = set(end_token_ids(tokenizer))
        self._lock = threading.Condition()
        self._inbox: deque[_Group] = deque()
        self._cancel: set[str] = set()
        self._waiting: deque[_Group] = deque()
        self._running: list[_Seq] = []
        self._requests: dict[str, Request] = {}  # not finished yet
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = True
        self._queued = 0  # requests submitted and not yet admitted (the queue depth)
        self._admit_counter = itertools.count()
        self._compiled = None
        self._prefill_logits: torch.Tensor | None = None
        self._stats = {"tokens_generated": 0, "prompt_tokens": 0, "prefill_tokens": 0, "requests_submitted": 0,
                       "requests_finished": 0, "requests_cancelled": 0, "requests_failed": 0, "prefix_hits": 0,
                       "prefix_hit_tokens": 0, "preemptions": 0, "steps": 0, "ttft_sum": 0.0, "ttft_count": 0}
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps, for tokens_per_s
        self._req_seconds = 1.0  # moving average of a request's time in the engine (Retry-After estimate)

    # ---- lifecycle
    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> None:
        """Start the step loop on a background thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="lmforge-batch-engine", daemon=True)
        self._thread.start()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with `drain`, let the queued and running ones finish (at most
        `timeout` seconds, after which the rest are cancelled), else cancel them now. Returns when
        the loop has stopped."""
        with self._lock:
            self._stopping, self._drain = True, drain
            self._lock.notify_all()
        if self._thread is None:
            return
        self._thread.join(timeout if drain else None)
        if self._thread.is_alive():
            with self._lock:
                self._drain = False
                self._lock.notify_all()
            self._thread.join()

    # ---- requests
    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None,
               on_event: Callable[[Event], None] | None = None) -> Request:
        """Queue a request. Raises InputError / ContextLimitError / ConfigError for a request that
        cannot run (empty prompt, ids outside the vocabulary, prompt + max_new_tokens over the
        context or over the whole KV budget, bad sampling values), QueueFullError at once when
        `max_queue` requests are waiting, EngineStoppedError after shutdown."""
        params = params or SamplingParams()
        params.validate()
        if params.stop and self.tokenizer is None:
            raise ConfigError("stop strings need a tokenizer to decode the generated text")
        try:
            prompt = [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            raise InputError("the prompt must be a list of integer token ids") from None
        ctx, V = self.cfg.max_seq_len, self.cfg.vocab_size
        if not prompt:
            raise InputError("the prompt is empty (it needs at least one token)")
        bad = next((t for t in prompt if not 0 <= t < V), None)
        if bad is not None:
            raise InputError(f"the prompt holds token id {bad} outside the model's vocabulary ({V})")
        if len(prompt) + params.max_new_tokens > ctx:
            raise ContextLimitError(f"the prompt has {len(prompt)} tokens and max_new_tokens is {params.max_new_tokens}: "
                                    f"{len(prompt) + params.max_new_tokens} is over the model's context of {ctx} tokens")
        if params.n > self.max_running:
            raise InputError(f"n = {params.n} samples is more than the engine runs at once (max_running = {self.max_running})")
        bs = self.block_size
        need = max(math.ceil((len(prompt) + params.max_new_tokens) / bs),
                   math.ceil(len(prompt) / bs) + (params.n - 1) * (len(prompt) % bs != 0))  # growth alone / n-way start
        if need > self.allocator.total:
            raise InputError(f"the request needs {need} KV blocks of {self.block_size} tokens but the engine's KV memory "
                             f"budget holds {self.allocator.total}: raise kv_memory_mb or lower max_new_tokens")
        rid = "req-" + uuid.uuid4().hex[:16]
        req = Request(rid, prompt, params, on_event)
        with self._lock:
            if self._stopping or self._thread is None or not self._thread.is_alive():
                raise EngineStoppedError("the engine is not running (not started yet, or shutting down)")
            depth = self._queued
            if depth >= self.max_queue:
                raise QueueFullError(f"the queue is full ({depth} requests waiting)", self._retry_after(depth))
            seqs = [_Seq(req, i, list(prompt), len(prompt), IncrementalText(self.tokenizer) if self.tokenizer else None)
                    for i in range(params.n)]
            req._seqs = seqs
            self._inbox.append(_Group(req, seqs, fresh=True))
            self._queued += 1
            self._requests[rid] = req
            self._stats["requests_submitted"] += 1
            self._lock.notify_all()
        return req

    def cancel(self, request_id: str) -> None:
        """Cancel a request (unknown or finished ids are ignored): its samples finish with
        finish_reason "cancelled" and its blocks are freed at the next step."""
        with self._lock:
            if request_id in self._requests:
                self._cancel.add(request_id)
                self._lock.notify_all()

    def _retry_after(self, depth: int) -> float:
        return round(max(1.0, self._req_seconds * (depth + 1) / max(1, self.max_running)), 1)

    def stats(self) -> dict:
        """Counters and gauges for monitoring (Prometheus /metrics)."""
        now = time.monotonic()
        with self._lock:
            s = dict(self._stats)
            s["queue_depth"] = self._queued
            s["running"] = len({q.req.id for q in self._running})
            s["running_sequences"] = len(self._running)
            recent = [(t, n) for t, n in self._recent if now - t <= 10.0]
        s["kv_blocks_used"] = self.allocator.used
        s["kv_blocks_total"] = self.allocator.total
        s["kv_blocks_cached"] = self.allocator.cached
        s["kv_block_size"] = self.block_size
        s["kv_cache_bytes"] = self.kv_bytes
        s["max_running"] = self.max_running
        s["max_queue"] = self.max_queue
        span = (now - recent[0][0]) if len(recent) > 1 else 0.0
        s["tokens_per_s"] = sum(n for _, n in recent[1:]) / span if span > 0 else 0.0
        s["ready"] = self.ready
        return s

    # ---- the loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._lock:
                while self._inbox:
                    self._waiting.append(self._inbox.popleft())
                cancel, self._cancel = self._cancel, set()
                if self._stopping and not self._drain:
                    cancel |= set(self._requests)
                idle = not self._waiting and not self._running
                if self._stopping and idle and not cancel:
                    return
                if idle and not cancel:
                    self._lock.wait()
                    continue
            try:
                if cancel:
                    self._do_cancel(cancel)
                self._step()
            except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
                logger.exception("batch engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")

    def _step(self) -> None:
        self._install_caches()
        self._admit()
        if self._running:
            self._decode()
        self._stats["steps"] += 1

    def _install_caches(self) -> None:
        for layer, c in zip(self.model.layers, self._caches):
            layer.attn.cache = c

    # ---- admission and prefill
    def _admit(self) -> None:
        """Admit waiting groups, first come first served, while they fit (blocks, max_running) and
        the iteration's prompt-token budget lasts (the first one always gets in). Each admitted
        group is prefilled and its first token sampled before the next is looked at, so a
        burst of requests with a common beginning shares it, and the first tokens of early
        requests are not held back by the prefill of later ones."""
        budget = self.max_prefill_tokens
        first = True
        while self._waiting and not self._stopping_hard():
            g = self._waiting[0]
            if len(self._running) + len(g.seqs) > self.max_running:
                break
            plan = self._reserve(g, budget if not first else None)
            if plan is None:
                break
            self._waiting.popleft()
            if g.fresh:
                with self._lock:
                    self._queued -= 1
            start, todo, copies = plan
            self._prefill(g, start, todo)
            for src, dst in copies:
                for c in self._caches:
                    c.copy_block(src, dst, self.block_size)
            lead = g.seqs[0]
            for s in g.seqs:
                s.computed = lead.computed
                s.hashes = list(lead.hashes)
                s.admitted = next(self._admit_counter)
                if s.seen is None and g.req.params.repetition_penalty != 1.0:
                    s.seen = torch.zeros(self.cfg.vocab_size, dtype=torch.bool, device=self.device)
                    s.seen[torch.tensor(s.tokens, device=self.device)] = True
            self._running.extend(g.seqs)
            if g.fresh:
                # one row per sample: the n samples of a prompt start from the same logits
                logits = self._prefill_logits.expand(len(g.seqs), -1)
                self._prefill_logits = None
                self._sample_and_advance(list(g.seqs), logits)
            budget -= todo
            first = False
            if budget <= 0:
                break

    def _reserve(self, g: _Group, budget: int | None):
        """Blocks for a group about to be admitted: prefix-cache hits shared, the rest allocated
        (the n samples: full prompt blocks shared, the last partial block one copy each). None
        (nothing taken) when they do not fit or the uncached part is over `budget`; else (first
        position to compute, tokens to compute, [(src, dst) block copies after the prefill])."""
        bs, alloc = self.block_size, self.allocator
        n = len(g.seqs)
        tokens = g.seqs[0].tokens
        L = len(tokens) if g.fresh else len(tokens) - 1  # a resumed sample's last token is fed by decode
        hits: list[int] = []
        hashes: list[int] = []
        if self.prefix_cache:
            # full blocks only, and never the whole prompt: the last prompt token is computed for its logits
            hashes = block_hashes(tokens, bs, (L - 1) // bs if g.fresh else L // bs)
            hits = alloc.lookup(hashes, tokens)
        start = len(hits) * bs
        todo = L - start
        partial = L % bs != 0
        need = math.ceil(L / bs) - len(hits) + (n - 1 if partial else 0)
        if (budget is not None and todo > budget) or need > alloc.free_count:
            alloc.release_all(hits)
            return None
        lead = g.seqs[0]
        lead.blocks = hits + [alloc.allocate() for _ in range(math.ceil(L / bs) - len(hits))]
        lead.hashes = hashes[: len(hits)]
        lead.computed = start
        full = L // bs
        copies = []
        for s in g.seqs[1:]:
            for b in lead.blocks[:full]:
                alloc.incref(b)
            s.blocks = list(lead.blocks[:full])
            if partial:
                nb = alloc.allocate()
                s.blocks.append(nb)
                copies.append((lead.blocks[full], nb))
        if hits:
            self._stats["prefix_hits"] += len(hits)
            self._stats["prefix_hit_tokens"] += start
        if g.fresh:
            self._stats["prompt_tokens"] += len(tokens)
        return start, todo, copies

    def _stopping_hard(self) -> bool:
        return self._stopping and not self._drain

    def _prefill(self, g: _Group, start: int, todo: int) -> None:
        """One forward over the uncached part of a group's tokens (no padding), keys/values written
        into its blocks; for a fresh prompt keeps the last position's logits for its first token."""
        bs, dev = self.block_size, self.device
        s = g.seqs[0]
        if todo:
            p = torch.arange(start, start + todo)
            blocks = torch.tensor(s.blocks, dtype=torch.long)
            slots = blocks[p // bs] * bs + p % bs
            S = len(s.blocks) * bs
            idx = torch.tensor(s.tokens[start : start + todo], dtype=torch.long)[None]
            idx, pos, slots, table = (t.to(dev, non_blocking=True) for t in (idx, p[None], slots, blocks[None]))
            mask = _additive_mask(pos, S, self.dtype)[:, None]  # (1, 1, T, S)
            self._step_meta.slots, self._step_meta.table = slots, table
            h = self.model.hidden_states(idx, pos=pos, mask=mask)
            if g.fresh:
                self._prefill_logits = self.model.lm_head(h[0, -1:]).float()
            self._stats["prefill_tokens"] += todo
        s.computed = start + todo
        self._register_full_blocks(s)

    def _register_full_blocks(self, s: _Seq) -> None:
        """Put the sequence's newly filled blocks in the prefix cache."""
        if not self.prefix_cache:
            return
        bs = self.block_size
        full = s.computed // bs
        h = s.hashes[-1] if s.hashes else 0
        for i in range(len(s.hashes), full):
            blk = tuple(s.tokens[i * bs : (i + 1) * bs])
            h = hash((h, blk))
            s.hashes.append(h)
            self.allocator.register(s.blocks[i], h, blk)

    # ---- decode
    def _decode(self) -> None:
        bs, alloc = self.block_size, self.allocator
        # every row needs a slot for the token it feeds; preempt the latest admitted when out of blocks
        i = 0
        self._running.sort(key=lambda s: s.admitted)
        while i < len(self._running):
            s = self._running[i]
            if s.computed == len(s.blocks) * bs:
                while alloc.free_count == 0:
                    victim = self._running[-1]
                    if victim is s:
                        break
                    self._preempt(victim)
                if alloc.free_count == 0:  # s itself is the latest: preempt it
                    self._preempt(s)
                    continue
                s.blocks.append(alloc.allocate())
            i += 1
        if not self._running:
            return
        seqs = self._running
        B = len(seqs)
        nb = max(len(s.blocks) for s in seqs)
        Bp, nbp = B, nb
        if self.compile:
            Bp, nbp = _bucket(B), _bucket(nb)
        # every per-row input in one host tensor (one copy to the device): block table | token, position, slot
        pad = [SCRATCH_BLOCK] * nbp
        rows = [s.blocks + pad[len(s.blocks):] + [s.tokens[s.computed], s.computed,
                                                   s.blocks[s.computed // bs] * bs + s.computed % bs] for s in seqs]
        rows += [pad + [0, 0, SCRATCH_BLOCK * bs]] * (Bp - B)
        dev = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        table, tok, pos, slot = dev[:, :nbp].contiguous(), dev[:, nbp : nbp + 1], dev[:, nbp + 1 : nbp + 2], dev[:, nbp + 2]
        pos = pos.contiguous()
        self._step_meta.slots, self._step_meta.table = slot.contiguous(), table
        split = None if self.compile else _split_by_length([len(s.blocks) for s in seqs])
        native = self._native_step() if Bp == B and B <= NATIVE_ROWS else None
        if native is not None:  # every row through lmforge's whole-step kernel, over its block table
            threads = torch.get_num_threads()
            with intra_op_threads(1), use_kernel_threads(threads):
                logits = native(self.model, tok, pos, None, table=table)
        elif split is None:
            mask = _additive_mask(pos, nbp * bs, self.dtype)[:, None]  # (B, 1, 1, S)
            logits = self._decode_forward(tok.contiguous(), pos, mask)
        else:
            # rows of very different lengths: each group gathers only the blocks its longest row needs
            groups = []
            for rows, n in split:
                r = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
                groups.append((r, table.index_select(0, r)[:, :n].contiguous(),
                               _additive_mask(pos.index_select(0, r), n * bs, self.dtype)[:, None]))
            order = [i for rows, _ in split for i in rows]
            inverse = [0] * B
            for j, i in enumerate(order):
                inverse[i] = j
            self._step_meta.groups = groups
            self._step_meta.inverse = torch.tensor(inverse, dtype=torch.long).to(self.device, non_blocking=True)
            try:
                logits = _forward_grouped(self.model, tok.contiguous(), pos)
            finally:
                self._step_meta.groups = self._step_meta.inverse = None
        logits = logits[:B]
        for s in seqs:
            s.computed += 1
            if s.computed % bs == 0:
                self._register_full_blocks(s)
        self._sample_and_advance(list(seqs), logits)

    def _native_step(self):
        """lmforge's whole-step decode kernel over the paged cache (lmforge.infer.native_decode), for
        up to NATIVE_ROWS sequences on CPU; None where it cannot run this model (or with `compile`)."""
        if self._native is None:
            self._native = False
            if self.device.type == "cpu" and not self.compile:
                from lmforge.infer.native_decode import native_step

                self._native = native_step(self.model) or False
        return self._native or None

    def _decode_forward(self, tok, pos, mask) -> torch.Tensor:
        if self._kernel_decode and tok.shape[0] == 1:
            threads = torch.get_num_threads()
            with intra_op_threads(1), use_kernel_threads(threads):
                return self._decode_forward_as_is(tok, pos, mask)
        return self._decode_forward_as_is(tok, pos, mask)

    def _decode_forward_as_is(self, tok, pos, mask) -> torch.Tensor:
        if self.compile:
            if self._compiled is None:
                mode = "reduce-overhead" if self.device.type == "cuda" else None
                self._compiled = torch.compile(_forward_last, mode=mode, dynamic=False)
            return self._compiled(self.model, tok, pos, mask)
        return _forward_last(self.model, tok, pos, mask)

    def _preempt(self, s: _Seq) -> None:
        """Free a running sequence's blocks and queue it (at the front) to be recomputed later."""
        self._running.remove(s)
        self.allocator.release_all(s.blocks)
        s.blocks, s.hashes, s.computed = [], [], 0
        self._waiting.appendleft(_Group(s.req, [s], fresh=False))
        self._stats["preemptions"] += 1

    # ---- sampling, stops, events
    def _sample_and_advance(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Sample one token per row (rows grouped by request, in sample order), one host sync, then
        append, stream and finish."""
        B = len(seqs)
        nxt = torch.empty(B, dtype=torch.long, device=logits.device)
        greedy: list[int] = []
        want_lp = False
        failed: dict[str, str] = {}  # request id -> why its sampling failed (it alone ends with "error")
        r = 0
        while r < B:
            req = seqs[r].req
            e = r + 1
            while e < B and seqs[e].req is req:
                e += 1
            p = req.params
            want_lp = want_lp or p.logprobs
            if p.temperature == 0 and p.repetition_penalty == 1.0:
                greedy.extend(range(r, e))
            else:
                seen = None
                if p.repetition_penalty != 1.0:
                    seen = torch.stack([s.seen for s in seqs[r:e]])
                gen = req._generator
                if gen is None and p.temperature > 0:
                    gen = req._generator = torch.Generator(device=logits.device)
                    if p.seed is None:
                        gen.seed()
                    else:
                        gen.manual_seed(p.seed)
                try:
                    nxt[r:e] = sample(process_logits(logits[r:e], p, seen), p, gen)
                except Exception as exc:  # noqa: BLE001 - one request's sampling failed: end it, keep the others
                    logger.exception("sampling failed for request %s", req.id)
                    failed[req.id] = f"{type(exc).__name__}: {exc}"
                    nxt[r:e] = 0
            r = e
        if len(greedy) == B:
            nxt = logits.argmax(-1)
        elif greedy:
            gi = torch.tensor(greedy, device=logits.device)
            nxt[gi] = logits[gi].argmax(-1)
        if want_lp:
            lp = logits.log_softmax(-1).gather(1, nxt[:, None]).squeeze(1)
            host = torch.stack([nxt.double(), lp.double()]).tolist()
            toks, lps = [int(t) for t in host[0]], host[1]
        else:
            toks, lps = nxt.tolist(), None
        done: list[_Seq] = []
        now = time.monotonic()
        for i, s in enumerate(seqs):
            req = s.req
            if req.id in failed:
                continue
            if req.first_token_at is None:
                req.first_token_at = now
                self._stats["ttft_sum"] += now - req.submitted_at
                self._stats["ttft_count"] += 1
            if self._advance(s, toks[i], lps[i] if lps is not None else None):
                done.append(s)
        made = B - sum(1 for s in seqs if s.req.id in failed)
        self._stats["tokens_generated"] += made
        self._recent.append((now, made))
        while self._recent and now - self._recent[0][0] > 10.0:
            self._recent.popleft()
        for s in done:
            self._finish_seq(s)
        if failed:
            for s in seqs:
                if s.req.id in failed:
                    s.req.error = failed[s.req.id]
            self._end_requests(set(failed), "error")

    def _advance(self, s: _Seq, t: int, lp: float | None) -> bool:
        """Append token t to a sequence, emit its TokenEvent; True when the sequence is finished."""
        p = s.req.params
        stop_ids = self._default_stop if p.stop_token_ids is None else set(map(int, p.stop_token_ids))
        if t in stop_ids:
            s.finish_reason, s.stop_reason = "stop", t
            return True
        s.tokens.append(t)
        if lp is not None and p.logprobs:
            s.logprobs.append(lp)
        if s.seen is not None:
            s.seen[t] = True
        finish = None
        text = ""
        if s.text is not None:
            pending = s.held + s.text.push(t)
            if p.stop:
                at, which = min(((pending.find(x), x) for x in p.stop if x in pending), default=(-1, None))
                if at >= 0:
                    text, s.held = pending[:at], ""
                    s.final_text = s.emitted + text
                    finish, s.stop_reason = "stop", which
                else:
                    keep = _stop_prefix_len(pending, p.stop)
                    text, s.held = pending[: len(pending) - keep], pending[len(pending) - keep :]
            else:
                text, s.held = pending, ""
        n = len(s.tokens) - s.prompt_len
        if finish is None:
            if n >= p.max_new_tokens:
                finish = "length"
            elif len(s.tokens) >= self.cfg.max_seq_len:
                finish = "context"
            if finish is not None and s.text is not None:
                text += s.held + s.text.finish()
                s.held = ""
        s.emitted += text
        s.req._emit(TokenEvent(s.req.id, s.sample_index, t, text, lp if p.logprobs else None))
        if finish is not None:
            s.finish_reason = finish
            if finish != "stop":
                s.stop_reason = None
            return True
        return False

    def _finish_seq(self, s: _Seq, reason: str | None = None) -> None:
        """Take a sequence out of the batch, free its blocks, emit its FinishEvent."""
        if s in self._running:
            self._running.remove(s)
        self.allocator.release_all(s.blocks)
        s.blocks = []
        if reason is not None:
            s.finish_reason, s.stop_reason = reason, None
        rest = ""
        text = None
        if s.text is not None:
            final = s.final_text
            if final is None:
                rest = s.held + s.text.finish()
                s.held = ""
                final = s.emitted + rest
            text = final
        s.finished = True
        req = s.req
        comp = Completion(prompt_index=0, sample_index=s.sample_index, token_ids=list(s.generated), text=text,
                          finish_reason=s.finish_reason, prompt_tokens=s.prompt_len,
                          logprobs=list(s.logprobs) if req.params.logprobs else None, stop_reason=s.stop_reason)
        req.completions[s.sample_index] = comp
        req._emit(FinishEvent(req.id, s.sample_index, comp, rest))
        req._left -= 1
        if req._left == 0:
            req.finished_at = time.monotonic()
            self._req_seconds = 0.8 * self._req_seconds + 0.2 * (req.finished_at - req.submitted_at)
            with self._lock:
                self._requests.pop(req.id, None)
            if reason == "cancelled":
                self._stats["requests_cancelled"] += 1
            elif reason == "error":
                self._stats["requests_failed"] += 1
            else:
                self._stats["requests_finished"] += 1
            req._done.set()

    def _do_cancel(self, ids: set[str]) -> None:
        self._end_requests(ids, "cancelled")

    def _end_requests(self, ids: set[str], reason: str) -> None:
        """Finish every sample of the requests `ids` with `reason` ("cancelled" or "error"), wherever
        it is (queued, preempted, running), freeing its blocks."""
        for g in [g for g in self._waiting if g.req.id in ids]:
            self._waiting.remove(g)
            if g.fresh:
                with self._lock:
                    self._queued -= 1
            for s in g.seqs:
                self.allocator.release_all(s.blocks)
                s.blocks = []
                self._finish_seq(s, reason)
        for s in [s for s in self._running if s.req.id in ids]:
            self._finish_seq(s, reason)
        for rid in ids:  # anything left (not in the queue, not running): finish it too
            req = self._requests.get(rid)
            for s in req._seqs if req is not None else ():
                if not s.finished:
                    self._finish_seq(s, reason)

    def _fail_all(self, message: str) -> None:
        """After an engine failure: every request taken in (queued, being admitted or running; not
        those submitted during the failed step) ends with finish_reason "error", and the block
        pool starts afresh (what a failed step wrote is not trusted, cached prefixes included)."""
        with self._lock:
            inbox = {g.req.id for g in self._inbox}
            self._queued -= sum(1 for g in self._waiting if g.fresh)
            victims = [r for rid, r in self._requests.items() if rid not in inbox]
        self._waiting.clear()
        self._running = []
        for req in victims:
            req.error = message
            for s in req._seqs:
                if not s.finished:
                    s.blocks = []
                    self._finish_seq(s, "error")
        self.allocator = BlockAllocator(self.allocator.num_blocks, self.block_size)


def _forward_last(model, tok: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """tokens (B, 1) at positions (B, 1) -> next-token logits (B, V) fp32 (caches set beforehand)."""
    logits, _ = model(tok, pos=pos, mask=mask)
    return logits[:, -1].float()


def _additive_mask(pos: torch.Tensor, S: int, dtype) -> torch.Tensor:
    """(B, T) query positions -> (B, T, S) additive mask: 0 where key position <= query position,
    -inf elsewhere (SDPA's CPU kernel takes a float mask as is; a boolean one it converts per layer)."""
    keys = torch.arange(S, device=pos.device)
    return torch.zeros((), dtype=dtype, device=pos.device).masked_fill(keys > pos[..., None], float("-inf"))


def _forward_grouped(model, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The model's forward for one token per row (Transformer.forward's own steps: embedding,
    RoPE at per-row positions, the shared layer loop, final norm, head) with `paged_attend` as the
    attention core, so rows are attended over in length groups."""
    cos, sin = model.rope(pos, 1)
    x = run_layers(model.layers, model.tok_emb(tok), cos, sin, None, pos, attend=paged_attend)
    return model.lm_head(model.norm(x)[:, -1]).float()


def _split_by_length(nblocks: list[int]) -> list[tuple[list[int], int]] | None:
    """Rows split in two groups by block count when that gathers at least a quarter fewer blocks
    than padding every row to the longest; [(row indices, blocks per row)] or None."""
    B = len(nblocks)
    if B < 4:
        return None
    order = sorted(range(B), key=nblocks.__getitem__)
    ns = [nblocks[i] for i in order]
    whole = B * ns[-1]
    best, at = whole, 0
    for j in range(1, B):
        cost = j * ns[j - 1] + (B - j) * ns[-1]
        if cost < best:
            best, at = cost, j
    if best > 0.75 * whole:
        return None
    return [(order[:at], ns[at - 1]), (order[at:], ns[-1])]


def _bucket(n: int) -> int:
    """The next power of two >= n (so compiled graphs are reused across batch sizes)."""
    return 1 << max(0, (n - 1).bit_length())


def _stop_prefix_len(text: str, stops) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


__all__ = ["BatchEngine", "EngineError", "EngineStoppedError", "Event", "FinishEvent", "IncrementalText",
           "QueueFullError", "Request", "TokenEvent"]
