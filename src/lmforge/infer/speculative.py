"""Speculative decoding (Leviathan et al. 2023, Chen et al. 2023): a cheap proposer guesses the
next k tokens, the target model checks all of them in one forward pass over its KV cache.

    from lmforge.infer.speculative import speculative_generate
    outs, stats = speculative_generate(target, draft, [prompt_ids], SamplingParams(temperature=0), tokenizer=tok, k=4)
    stats.acceptance_rate, stats.tokens_per_step

One sequence at a time (batch 1: several prompts, or n samples, are decoded one after the other).
The loop keeps one invariant: the sequence so far has N tokens and the target's cache holds
positions 0 .. N-2 (every token but the last). A round:

1. the proposer guesses d_1 .. d_m for positions N .. N+m-1 (m <= k, fewer near the end of
   `max_new_tokens` or of the context), with the distributions q_1 .. q_m it drew them from;
   a draft model (`DraftProposer`) runs m autoregressive steps over its own cache, Medusa heads
   (lmforge.infer.medusa) read them off the target's last hidden state;
2. the target runs [last token, d_1 .. d_m] at positions N-1 .. N+m-1 in one forward (causal
   inside the chunk, the cache before it): m+1 next-token distributions p_1 .. p_{m+1};
3. acceptance, left to right: greedy (temperature 0) accepts d_i while it equals argmax p_i;
   sampling accepts d_i with probability min(1, p_i(d_i) / q_i(d_i)); the first rejected position
   gets a token drawn from norm(max(0, p_i - q_i)) (greedy: argmax p_i), and when all m are
   accepted a bonus token is drawn from p_{m+1}. The accepted tokens plus that one are emitted:
   1 .. m+1 tokens per target forward. The output distribution is exactly the target's (the
   standard rejection rule), and greedy output is the target's greedy output.
4. rejected positions need no rollback: the cache is written at integer positions, each forward
   reads slots [0, pos + T) only, and the next round overwrites the stale slots.

Repetition penalty, temperature, top-k and top-p are applied to p and to q alike through
`engine.process_logits` (the penalty with the tokens seen up to each position, guesses included),
so "the target's distribution" means the same processed distribution `engine.generate` samples.
Stop tokens, stop strings, `max_new_tokens` and the model's context end a sequence exactly as
in `engine.generate` (same `Completion`s, same finish reasons).

On CPU, the target's verification chunk (and a draft model's steps) run in lmforge's compiled
whole-model kernel where it can run the model (lmforge.infer.native_decode, as `engine.generate`
decodes one row): each token of a chunk gets exactly the arithmetic of a one-token decode step, so
greedy output equals the engine's plain greedy output bit for bit. The kernel gets the caller's
intra-op thread count, torch's own ops (prefill aside) run on one.

`SpecStats` counts target forwards ("steps": verification passes; a prompt's prefill, which
emits nothing, is not one), proposed and accepted guesses and emitted tokens: acceptance rate =
accepted / proposed, tokens per target step = emitted / steps (plain decoding: 1.0).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from lmforge.errors import ConfigError, InputError
from lmforge.infer.cpu_kernels import use_threads as use_kernel_threads
from lmforge.infer.engine import (Completion, ContextLimitError, SamplingParams, draw, end_token_ids,
                                  intra_op_threads, process_logits, sample)
from lmforge.infer.engine import _completion, _hit_stop, _Row  # the engine's stop-string cut and result, shared


@dataclass
class SpecStats:
    steps: int = 0  # target forward passes that verified guesses (prefills not counted)
    proposed: int = 0  # guesses made
    accepted: int = 0  # guesses the target accepted
    emitted: int = 0  # tokens produced (stop tokens included)
    draft_forwards: int = 0  # forward passes of a draft model (0 for Medusa)
    seconds: float = 0.0
    per_position: list[int] = field(default_factory=list)  # per_position[i]: rounds whose guess i+1 was accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.emitted / self.steps if self.steps else 0.0

    def add(self, other: "SpecStats") -> None:
        self.steps += other.steps
        self.proposed += other.proposed
        self.accepted += other.accepted
        self.emitted += other.emitted
        self.draft_forwards += other.draft_forwards
        self.seconds += other.seconds
        for i, n in enumerate(other.per_position):
            if i < len(self.per_position):
                self.per_position[i] += n
            else:
                self.per_position.append(n)

    def to_dict(self) -> dict:
        return {"target_steps": self.steps, "proposed": self.proposed, "accepted": self.accepted,
                "emitted_tokens": self.emitted, "draft_forwards": self.draft_forwards,
                "acceptance_rate": round(self.acceptance_rate, 4), "tokens_per_target_step": round(self.tokens_per_step, 4),
                "accepted_at_position": list(self.per_position), "seconds": round(self.seconds, 4)}

    def summary(self) -> str:
        return (f"acceptance {100 * self.acceptance_rate:.1f}% ({self.accepted}/{self.proposed} guesses), "
                f"{self.tokens_per_step:.2f} tokens per target step ({self.emitted} tokens in {self.steps} steps)")


class Proposer(ABC):
    """What the decoding loop asks of a guesser. `begin(prompt)` before a sequence (the target's
    prefill of prompt[:-1] has run; `hidden` is its last hidden state (1, d) or None);
    `propose(seq, m, params, seen, g)` -> (m guesses for positions len(seq) .., their
    distributions (m, V) as probabilities, or None when greedy); `verified(seq_len_before,
    m, accepted, hidden)` after each target pass (hidden: the target's final hidden states of
    that pass, (m+1, d)); `end()` after the sequence. `max_guess(n)`: the most guesses possible
    when the sequence has n tokens (the proposer's own context)."""

    draft_forwards = 0

    def begin(self, prompt: list[int], hidden: torch.Tensor | None) -> None: ...

    @abstractmethod
    def propose(self, seq: list[int], m: int, params: SamplingParams, seen: torch.Tensor | None,
                g: torch.Generator | None) -> tuple[list[int], torch.Tensor | None]:
        """The m guesses and their distributions (each guesser implements it)."""

    def verified(self, n_before: int, m: int, accepted: int, hidden: torch.Tensor) -> None: ...

    def max_guess(self, n: int) -> int:
        return 1 << 30

    def end(self) -> None: ...


def fit_vocab(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """(rows, V') logits over the target's vocabulary of `vocab` ids: extra ids cut, missing ones -inf
    (a draft whose embedding table is padded differently; the tokenizer is the same)."""
    v = logits.shape[-1]
    if v == vocab:
        return logits
    if v > vocab:
        return logits[..., :vocab]
    pad = logits.new_full(logits.shape[:-1] + (vocab - v,), float("-inf"))
    return torch.cat([logits, pad], dim=-1)


def seen_rows(seen: torch.Tensor | None, extra: Sequence[int], rows: int) -> torch.Tensor | None:
    """Repetition-penalty masks for `rows` consecutive positions: row i has `seen` plus extra[:i]."""
    if seen is None:
        return None
    out = seen.unsqueeze(0).repeat(rows, 1)
    for i, t in enumerate(extra[: rows - 1]):
        out[i + 1 :, t] = True
    return out


def accept(p_logits: torch.Tensor, guesses: Sequence[int], q: torch.Tensor | None, params: SamplingParams,
           g: torch.Generator | None) -> tuple[int, int]:
    """The acceptance rule. p_logits: (m+1, V) processed target logits; guesses: m tokens; q: (m, V)
    probabilities they were drawn from (None when greedy). Returns (accepted count a, the token
    for position a: the correction at the first rejection, or the bonus token after m accepts)."""
    m = len(guesses)
    if params.temperature == 0:
        best = p_logits.argmax(-1).tolist()
        a = 0
        while a < m and guesses[a] == best[a]:
            a += 1
        return a, best[a]
    p = p_logits.softmax(-1)
    for i in range(m):
        d = guesses[i]
        u = torch.rand((), generator=g, device=p.device)
        if bool(u * q[i, d] < p[i, d]):  # accepted with probability min(1, p/q)
            continue
        residual = (p[i] - q[i]).clamp_(min=0)
        total = residual.sum()
        if not bool(total > 0):  # p == q up to rounding: no residual mass left
            residual, total = p[i], p[i].sum()
        return i, int(draw((residual / total)[None], g)[0])
    return m, int(draw(p[m][None], g)[0])


def _native(model):
    """lmforge's compiled forward over `model` and its current cache (CPU), or None (torch's path)."""
    if next(model.parameters()).device.type != "cpu":
        return None
    from lmforge.infer.native_decode import native_forward

    return native_forward(model)


def _chunk_forward(model, native, ids: list[int], pos: int, logits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(final hidden states (T, d), fp32 logits of the last `logits` tokens) of the token chunk `ids`
    at positions pos.., written to the model's cache: the native kernel when there is one and the
    chunk fits it, else torch."""
    from lmforge.infer.native_decode import MAX_TOKENS

    if native is not None and len(ids) <= MAX_TOKENS:
        return native(ids, pos, hidden=True, logits=logits)
    h = model.hidden_states(torch.tensor([ids], dtype=torch.long, device=model.tok_emb.weight.device), pos=pos)[0]
    return h, model.lm_head(h[len(ids) - logits :]).float()


class DraftProposer(Proposer):
    """A draft model with the target's tokenizer: guesses by autoregressive decoding over its own KV
    cache, its logits processed exactly like the target's. The cache keeps positions 0 .. fed-1;
    each proposal first feeds the tokens it has not seen (the last emitted one or two) as one chunk."""

    def __init__(self, draft, vocab: int):
        self.model, self.vocab = draft, vocab
        self.ctx = draft.cfg.max_seq_len
        self.fed = 0
        self.size = 0
        self.draft_forwards = 0
        self.native = None

    def setup(self, slots: int) -> None:
        self.size = min(self.ctx, slots)
        self.model.setup_cache(1, self.size)
        self.native = _native(self.model)
        self.fed = 0

    def begin(self, prompt, hidden):
        self.fed = 0

    def max_guess(self, n: int) -> int:
        # guesses d_1..d_m feed positions up to n+m-2; the catch-up chunk ends at n-1
        return max(0, self.size - n + 1) if n <= self.size else 0

    def _logits(self, ids: list[int], pos: int) -> torch.Tensor:
        self.draft_forwards += 1
        return fit_vocab(_chunk_forward(self.model, self.native, ids, pos, 1)[1], self.vocab)

    def propose(self, seq, m, params, seen, g):
        n = len(seq)
        logits = self._logits(seq[self.fed : n], self.fed)
        self.fed = n
        guesses: list[int] = []
        probs = []
        s = seen.clone() if seen is not None else None
        for i in range(m):
            z = process_logits(logits, params, s[None] if s is not None else None)
            t = int(sample(z, params, g))
            guesses.append(t)
            if params.temperature > 0:
                probs.append(z.softmax(-1)[0])
            if i + 1 < m:
                if s is not None:
                    s[t] = True
                logits = self._logits([t], n + i)
                self.fed = n + i + 1
        return guesses, (torch.stack(probs) if probs else None)

    def verified(self, n_before, m, accepted, hidden):
        # valid draft slots: the old sequence plus the accepted guesses it has been fed
        self.fed = min(self.fed, n_before + accepted)

    def end(self):
        self.native = None
        self.model.clear_cache()


_Seq = _Row  # one sequence being generated: the engine's row record


def check_prompts(prompts, vocab: int, ctx: int, who: str = "the model") -> list[list[int]]:
    out = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(out):
        if not p:
            raise InputError(f"prompt {i} is empty (it needs at least a beginning-of-text token)")
        if len(p) >= ctx:
            raise ContextLimitError(f"prompt {i} has {len(p)} tokens: no room left in the model's context of {ctx} tokens")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise InputError(f"prompt {i} holds token id {bad[0]} outside {who}'s vocabulary ({vocab})")
    return out


@torch.no_grad()
def decode_with_proposer(target, make_proposer: Callable[[int], Proposer], prompts: Sequence[Sequence[int]],
                         params: SamplingParams | None = None, tokenizer=None, *, k: int = 4,
                         on_token: Callable[[int, int, int], None] | None = None) -> tuple[list[Completion], SpecStats]:
    """Decode every prompt `params.n` times, one sequence at a time, with guesses from the proposer
    `make_proposer(cache_slots)` builds; returns the completions (prompt order, n per prompt) and the
    summed statistics. `k`: most guesses per round."""
    params = params or SamplingParams()
    params.validate()
    if not isinstance(k, int) or k < 1:
        raise ConfigError(f"the number of guesses per step must be an integer >= 1, got {k!r}")
    if params.stop and tokenizer is None:
        raise ConfigError("stop strings need a tokenizer to decode the generated text")
    ctx, vocab = target.cfg.max_seq_len, target.cfg.vocab_size
    prompts = check_prompts(prompts, vocab, ctx)
    stop_ids = set(end_token_ids(tokenizer) if params.stop_token_ids is None else map(int, params.stop_token_ids))
    device = next(target.parameters()).device
    g = None
    if params.temperature > 0:
        g = torch.Generator(device=device)
        if params.seed is None:
            g.seed()
        else:
            g.manual_seed(params.seed)
    was_training = target.training
    target.eval()
    total = SpecStats()
    out: list[Completion] = []
    proposer = None
    try:
        slots = min(ctx, max(len(p) for p in prompts) + params.max_new_tokens + 1)
        proposer = make_proposer(slots)
        target.setup_cache(1, slots)
        native = _native(target)
        caller = torch.get_num_threads()
        with use_kernel_threads(caller if native is not None else 1):
            for pi, prompt in enumerate(prompts):
                for si in range(params.n):
                    row, st = _decode_one(target, proposer, prompt, pi, si, params, tokenizer, stop_ids, g, k, slots,
                                          on_token, native)
                    total.add(st)
                    out.append(_completion(row, tokenizer, params))
    finally:
        target.clear_cache()
        if proposer is not None:
            proposer.end()
        target.train(was_training)
    total.draft_forwards = proposer.draft_forwards if proposer is not None else 0
    return out, total


def _decode_one(target, proposer: Proposer, prompt, pi, si, params, tokenizer, stop_ids, g, k, slots, on_token,
                native=None):
    t0 = time.perf_counter()
    vocab = target.cfg.vocab_size
    device = next(target.parameters()).device
    st = SpecStats()
    row = _Seq(pi, si, len(prompt))
    seq = list(prompt)
    hidden = None
    if len(seq) > 1:  # prefill every prompt token but the last: cache positions 0 .. N-2
        hidden = target.hidden_states(torch.tensor([seq[:-1]], dtype=torch.long, device=device), pos=0)[0, -1:]
    proposer.begin(seq, hidden)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        seen[torch.tensor(seq, device=device)] = True
    max_stop = max((len(s) for s in params.stop), default=0)
    # the kernel (when there is one) gets the threads (decode_with_proposer); torch's ops, tiny from
    # here on, run on one
    with intra_op_threads(1 if native is not None else None):
        _rounds(target, proposer, params, tokenizer, stop_ids, g, k, slots, on_token, native, seq, row, st, seen,
                max_stop)
    st.seconds = time.perf_counter() - t0
    return row, st


def _rounds(target, proposer, params, tokenizer, stop_ids, g, k, slots, on_token, native, seq, row, st, seen, max_stop):
    ctx = target.cfg.max_seq_len
    pi, si = row.prompt_index, row.sample_index
    while row.finish is None:
        n = len(seq)
        remaining = params.max_new_tokens - len(row.tokens)
        m = max(0, min(k, remaining - 1, ctx - n, slots - n, proposer.max_guess(n)))
        guesses, q = proposer.propose(seq, m, params, seen, g) if m else ([], None)
        h, raw = _chunk_forward(target, native, [seq[-1], *guesses], n - 1, m + 1)  # (m+1, d), (m+1, V)
        z = process_logits(raw, params, seen_rows(seen, guesses, m + 1))
        a, nxt = accept(z, guesses, q, params, g)
        st.steps += 1
        st.proposed += m
        st.accepted += a
        while len(st.per_position) < m:
            st.per_position.append(0)
        for i in range(a):
            st.per_position[i] += 1
        proposer.verified(n, m, a, h)
        lp = raw.log_softmax(-1) if params.logprobs else None
        for j, t in enumerate([*guesses[:a], nxt]):
            st.emitted += 1
            if t in stop_ids:
                row.finish, row.stop_reason = "stop", t
                break
            seq.append(t)
            row.tokens.append(t)
            if seen is not None:
                seen[t] = True
            if lp is not None:
                row.logprobs.append(float(lp[j, t]))
            if on_token is not None:
                on_token(pi, si, t)
            if max_stop and _hit_stop(row, tokenizer, params.stop, max_stop):
                break
            if len(row.tokens) >= params.max_new_tokens:
                row.finish = "length"
                break
            if row.prompt_len + len(row.tokens) >= ctx:
                row.finish = "context"
                break


def speculative_generate(target, draft, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None,
                         tokenizer=None, *, k: int = 4, on_token=None) -> tuple[list[Completion], SpecStats]:
    """Speculative decoding of `prompts` with `draft` (a smaller model with the same tokenizer: a
    distilled student, a smaller checkpoint, the target's own quantized copy) proposing `k` tokens
    per target step. Same output contract as `engine.generate`; batch 1 (sequences one after the
    other)."""
    if draft is target:
        raise ConfigError("the draft model must be a separate model object (it keeps its own KV cache)")
    dvocab = draft.cfg.vocab_size
    for i, p in enumerate(prompts):
        bad = [int(t) for t in p if not 0 <= int(t) < dvocab]
        if bad:
            raise InputError(f"prompt {i} holds token id {bad[0]} outside the draft model's vocabulary ({dvocab}): "
                             "the draft needs the target's tokenizer")
    was_training = draft.training
    draft.eval()

    def make(slots: int) -> DraftProposer:
        p = DraftProposer(draft, target.cfg.vocab_size)
        p.setup(slots)
        return p

    try:
        return decode_with_proposer(target, make, prompts, params, tokenizer, k=k, on_token=on_token)
    finally:
        draft.train(was_training)


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map every id to the same bytes and have the same special tokens."""
    if a.vocab_size != b.vocab_size or dict(a.special_tokens) != dict(b.special_tokens):
        return False
    return all(a.token_bytes(i) == b.token_bytes(i) for i in range(a.vocab_size) if i not in a.special_ids)


__all__ = ["SpecStats", "Proposer", "DraftProposer", "speculative_generate", "decode_with_proposer", "accept",
           "fit_vocab", "seen_rows", "same_tokenizer", "check_prompts"]
