"""Preference data for the reward model and DPO: JSONL pairs -> rendered pairs -> pair batches.

Input lines (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`), one preference pair each:

    {"prompt": "What does able mean?", "chosen": "Having power ...", "rejected": "A small house."}
    {"prompt": [{"role": "system", ...}, {"role": "user", ...}, ...], "chosen": "...", "rejected": "..."}

`prompt` is a user message, or a conversation (chat messages) ending with a user turn; `chosen` and
`rejected` are the two candidate assistant answers to it. Other keys are kept (e.g. `meta`).
A malformed line is logged with `file:line` and skipped, and counted; a pair whose chosen and
rejected answers are identical teaches nothing and is counted and dropped.

`render_pairs` renders each pair with the chat template (tokenizer/chat.py) into two sequences that
share the prompt: `prompt ids + answer ids + <|end|>`, with a mask of the response tokens (the
answer and its `<|end|>`; the prompt's earlier assistant turns are not part of the response). A
pair longer than `max_tokens` has its responses truncated (the prompt kept) or is dropped, as
configured, and counted; a prompt that leaves no room for a response drops the pair.

`PairBatches` is the batch source for the trainer: `next_batch()` -> `PairBatch` whose `ids` hold
the chosen rows first and the rejected rows of the same pairs after them (row i and row B + i are
one pair), right-padded; seeded order reshuffled each epoch, exact resume from `state_dict()`.

`build_default_pairs` makes a real default set from the bundled GCIDE dictionary: for "What does X
mean?" the right definition (chosen) against another word's definition, a truncated definition, or
(when a model is given) a sampled answer of that model; held out by headword with the same split as
the SFT chat set (`dictionary_chat.is_heldout_word`), so a held-out word is never trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from lmforge.errors import InputError
from lmforge.log import logger
from lmforge.tokenizer.chat import TEMPLATE, escape_content, message_problem, render_prompt

IGNORE = -100
OVERFLOW = ("truncate", "drop")
PAIR_KINDS = ("other", "truncated", "sampled")


# ---- reading --------------------------------------------------------------------------------


def record_to_pair(record) -> tuple[dict | None, str | None]:
    """({"prompt": messages, "chosen", "rejected"}, None) for a valid record, else (None, why)."""
    if not isinstance(record, dict):
        return None, f"a line must be a JSON object, got {type(record).__name__}"
    for key in ("prompt", "chosen", "rejected"):
        if key not in record:
            return None, f"'{key}' is missing"
    for key in ("chosen", "rejected"):
        if not isinstance(record[key], str):
            return None, f"'{key}' is not a string"
    prompt = record["prompt"]
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, list):
        why = message_problem(prompt)
        if why:
            return None, f"'prompt': {why}"
        if prompt[-1]["role"] != "user":
            return None, "'prompt' must end with a user message"
        msgs = [{"role": m["role"], "content": m["content"]} for m in prompt]
    else:
        return None, f"'prompt' must be a string or a list of messages, got {type(prompt).__name__}"
    return {"prompt": msgs, "chosen": record["chosen"], "rejected": record["rejected"]}, None


def read_pref_jsonl(paths: Iterable[str | Path]) -> tuple[list[dict], dict]:
    """Pairs `{"prompt": messages, "chosen", "rejected", "source": "file:line", ...other keys}` from
    JSONL files, and stats {lines, pairs, malformed, identical, blank}. Malformed lines are logged
    (file:line and why) and skipped; identical chosen/rejected pairs are counted and dropped. A
    missing file, or one without a usable pair, is an InputError."""
    from lmforge.posttrain.chat_data import read_jsonl_records

    def parse(rec):
        pair, why = record_to_pair(rec)
        if pair is None:
            return None, why
        if pair["chosen"].strip() == pair["rejected"].strip():
            return pair, "identical"  # counted and dropped: chosen and rejected are the same answer
        extra = {k: v for k, v in rec.items() if k not in ("prompt", "chosen", "rejected")}
        return {**extra, **pair}, ""

    pairs, stats = read_jsonl_records(paths, parse, kind="preference", missing="preference data", noun="preference pair",
                                      needs="'prompt', 'chosen' and 'rejected'")
    stats.setdefault("identical", 0)
    stats["pairs"] = len(pairs)
    return pairs, stats


def pair_to_json(pair: dict) -> dict:
    """A pair as a JSONL record (prompt a plain string when it is a single user message)."""
    prompt = pair["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and prompt[0]["role"] == "user":
        prompt = prompt[0]["content"]
    return {k: v for k, v in {**pair, "prompt": prompt}.items() if k != "source"}


def write_pairs_jsonl(path: str | Path, pairs: Iterable[dict]) -> Path:
    """Write pairs as JSONL (atomically), in the format `read_pref_jsonl` reads."""
    from lmforge.rundir import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(json.dumps(pair_to_json(p), ensure_ascii=False) + "\n" for p in pairs))
    return path


# ---- rendering ------------------------------------------------------------------------------


@dataclass
class PairExample:
    """One rendered pair: each side's full ids (prompt + response + <|end|>) and response mask."""

    chosen_ids: list[int]
    chosen_mask: list[bool]
    rejected_ids: list[int]
    rejected_mask: list[bool]
    source: str = ""


def _prompt_messages(pair: dict) -> list[dict]:
    p = pair["prompt"]
    return [{"role": "user", "content": p}] if isinstance(p, str) else p


def render_response(tokenizer, prompt_ids: list[int], answer: str) -> tuple[list[int], list[bool]]:
    """prompt ids (ending with <|assistant|>) + the answer + <|end|>, and the response mask — the
    same ids `chat.render` gives for the conversation with the answer as the last assistant turn."""
    resp = tokenizer.encode(escape_content(answer)) + [tokenizer.special_id(TEMPLATE.end)]
    return prompt_ids + resp, [False] * len(prompt_ids) + [True] * len(resp)


def render_pairs(tokenizer, pairs: Iterable[dict], max_tokens: int, overflow: str = "truncate"
                 ) -> tuple[list[PairExample], dict]:
    """Render pairs into `PairExample`s of at most `max_tokens` tokens per side.

    Too long: "truncate" cuts the responses (the prompt is kept, at least one response token must
    remain, else the pair is dropped), "drop" leaves the pair out. Stats: pairs, examples,
    truncated, dropped, identical (identical after rendering or truncation), invalid, tokens."""
    if overflow not in OVERFLOW:
        raise InputError(f"overflow must be one of {', '.join(OVERFLOW)}, got {overflow!r}")
    if max_tokens < 3:
        raise InputError(f"max_tokens = {max_tokens} must be >= 3")
    out: list[PairExample] = []
    stats = {"pairs": 0, "examples": 0, "truncated": 0, "dropped": 0, "identical": 0, "invalid": 0, "tokens": 0}
    for k, pair in enumerate(pairs):
        stats["pairs"] += 1
        source = pair.get("source", str(k))
        msgs = _prompt_messages(pair)
        why = message_problem(msgs)
        if why or msgs[-1]["role"] != "user" or not all(isinstance(pair.get(s), str) for s in ("chosen", "rejected")):
            stats["invalid"] += 1
            logger.warning("%s: skipped invalid preference pair: %s", source, why or "prompt must end with a user turn")
            continue
        prompt_ids = render_prompt(tokenizer, msgs)
        c_ids, c_mask = render_response(tokenizer, prompt_ids, pair["chosen"])
        r_ids, r_mask = render_response(tokenizer, prompt_ids, pair["rejected"])
        if max(len(c_ids), len(r_ids)) > max_tokens:
            if overflow == "drop" or len(prompt_ids) >= max_tokens:
                stats["dropped"] += 1
                continue
            c_ids, c_mask, r_ids, r_mask = c_ids[:max_tokens], c_mask[:max_tokens], r_ids[:max_tokens], r_mask[:max_tokens]
            stats["truncated"] += 1
        if c_ids == r_ids:
            stats["identical"] += 1
            continue
        out.append(PairExample(c_ids, c_mask, r_ids, r_mask, source))
        stats["tokens"] += len(c_ids) + len(r_ids)
    stats["examples"] = len(out)
    return out, stats


# ---- batches --------------------------------------------------------------------------------


@dataclass
class PairBatch:
    """`B` pairs: `ids` (2B, L) with the chosen rows first and the rejected rows after (row i and row
    B + i are one pair), right-padded; `mask` (2B, L) the response tokens; `lengths` (2B,) real
    lengths; `index` (B,) the pairs' positions in the batch source (for per-pair lookups such as
    precomputed reference log-probs); `ref` (2B,) those reference log-probs when the source has them."""

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    index: torch.Tensor
    ref: torch.Tensor | None = None

    @property
    def n_pairs(self) -> int:
        return int(self.index.shape[0])

    def lm_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) for per-token log-probs of the responses: x = ids[:, :-1], y = the next token where
        it is a response token, else -100."""
        return self.ids[:, :-1], torch.where(self.mask[:, 1:], self.ids[:, 1:], IGNORE)

    def to(self, device) -> "PairBatch":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return PairBatch(mv(self.ids), mv(self.mask), mv(self.lengths), mv(self.index), mv(self.ref))


def collate_pairs(examples: Sequence[PairExample], pad_id: int, index: Sequence[int] | None = None) -> PairBatch:
    """A `PairBatch` of `examples` (chosen rows, then rejected rows), padded to the longest row."""
    rows = [(e.chosen_ids, e.chosen_mask) for e in examples] + [(e.rejected_ids, e.rejected_mask) for e in examples]
    L = max(len(r[0]) for r in rows)
    ids = np.full((len(rows), L), int(pad_id), dtype=np.int64)
    mask = np.zeros((len(rows), L), dtype=bool)
    for i, (a, m) in enumerate(rows):
        ids[i, : len(a)] = a
        mask[i, : len(m)] = m
    lengths = torch.tensor([len(r[0]) for r in rows], dtype=torch.int64)
    idx = torch.tensor(list(index) if index is not None else range(len(examples)), dtype=torch.int64)
    return PairBatch(torch.from_numpy(ids), torch.from_numpy(mask), lengths, idx)


class PairBatches:
    """Exactly resumable pair batches; one data-parallel rank's share of each step.

    Pairs come in a seeded shuffled order, reshuffled each epoch; the stream runs across epochs
    without dropping anything. `ref` (N, 2) optional per-pair (chosen, rejected) reference
    log-probs, attached to each batch as `PairBatch.ref`. `state_dict()` is (epoch, position)
    plus what must not have changed (seed, batch size, the data's fingerprint)."""

    def __init__(self, examples: Sequence[PairExample], batch_size: int, seed: int, pad_id: int | None, *,
                 ref: torch.Tensor | None = None, dp_rank: int = 0, dp_size: int = 1, device=torch.device("cpu")):
        if batch_size < 1:
            raise InputError(f"batch_size ({batch_size}) must be >= 1")
        if not examples:
            raise InputError("no preference pairs to make batches from")
        if ref is not None and tuple(ref.shape) != (len(examples), 2):
            raise InputError(f"reference log-probs have shape {tuple(ref.shape)}, expected ({len(examples)}, 2)")
        self.examples, self.B, self.seed = list(examples), batch_size, seed
        self.pad_id = int(pad_id) if pad_id is not None else 0
        self.ref = ref
        self.rank, self.world, self.device = dp_rank, dp_size, torch.device(device)
        self.fingerprint = pairs_fingerprint(self.examples)
        self.epoch, self.pos = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def order_of_epoch(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.examples)))
        return self._order[1]

    def _take(self, n: int) -> list[int]:
        out: list[int] = []
        while len(out) < n:
            order = self.order_of_epoch(self.epoch)
            take = order[self.pos : self.pos + n - len(out)]
            out += [int(i) for i in take]
            self.pos += len(take)
            if self.pos >= len(order):
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def next_batch(self) -> PairBatch:
        idx = self._take(self.B * self.world)[self.rank * self.B : (self.rank + 1) * self.B]
        b = collate_pairs([self.examples[i] for i in idx], self.pad_id, idx)
        if self.ref is not None:
            r = self.ref[b.index]
            b.ref = torch.cat([r[:, 0], r[:, 1]])
        return b.to(self.device) if self.device.type != "cpu" else b

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "batch_size": self.B,
                "n_pairs": len(self.examples), "fingerprint": self.fingerprint}

    def load_state_dict(self, s: dict) -> None:
        for key, now in (("n_pairs", len(self.examples)), ("fingerprint", self.fingerprint), ("seed", self.seed),
                         ("batch_size", self.B)):
            if key in s and s[key] != now:
                raise InputError(f"the checkpoint's preference data position was saved with {key} = {s[key]!r}, but now "
                                 f"it is {now!r}: the preference data or its settings changed since the checkpoint")
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])


def pairs_fingerprint(examples: Sequence[PairExample]) -> str:
    """A short hash of every pair's ids and masks (a resume, or a cached reference, must see the same data)."""
    h = hashlib.sha256()
    for e in examples:
        for ids, mask in ((e.chosen_ids, e.chosen_mask), (e.rejected_ids, e.rejected_mask)):
            a = np.asarray(ids, dtype=np.int64)
            h.update(len(a).to_bytes(8, "little"))
            h.update(a.tobytes())
            h.update(np.packbits(np.asarray(mask, dtype=bool)).tobytes())
    return h.hexdigest()[:16]


def iter_batches(examples: Sequence[PairExample], batch_size: int, pad_id: int | None) -> Iterable[PairBatch]:
    """Fixed-order batches over all examples (evaluation, reference log-probs)."""
    for s in range(0, len(examples), batch_size):
        yield collate_pairs(examples[s : s + batch_size], int(pad_id) if pad_id is not None else 0,
                            range(s, min(s + batch_size, len(examples))))


# ---- the default set from the bundled dictionary ---------------------------------------------


def truncate_definition(definition: str, rng: random.Random) -> str | None:
    """The first 30-60% of a definition's words (no final period), or None when it is too short to cut."""
    words = definition.rstrip(".").split()
    if len(words) < 4:
        return None
    keep = max(1, min(len(words) - 2, round(len(words) * rng.uniform(0.3, 0.6))))
    return " ".join(words[:keep])


def build_default_pairs(dictionary_paths: Iterable[str | Path], seed: int = 0, n: int = 1000, holdout: float = 0.1, *,
                        model=None, tokenizer=None, sampled: float = 0.25, sample_temperature: float = 1.0,
                        sample_tokens: int = 48) -> tuple[list[dict], list[dict], dict]:
    """(train pairs, held-out pairs, stats): about `n` pairs "What does X mean?" -> the right GCIDE
    definition (chosen) vs a wrong answer (rejected):

    * other:     another word's definition (from the same side of the split);
    * truncated: the first 30-60% of the right definition's words;
    * sampled:   with `model` and `tokenizer`, an answer of that model sampled through the
      generation engine for a `sampled` share of the pairs (dropped, and counted, when it equals
      the definition).

    Held out by headword with `dictionary_chat.is_heldout_word(word, holdout)`: with the SFT stage's
    `heldout`, a held-out word is absent from both SFT's and these training pairs."""
    from lmforge.posttrain.dictionary_chat import DEFINE, is_heldout_word, read_entries

    if not 0.0 <= holdout < 1.0:
        raise InputError(f"holdout = {holdout} must be in [0, 1)")
    if not 0.0 <= sampled <= 1.0:
        raise InputError(f"sampled = {sampled} must be in [0, 1]")
    paths = [Path(p) for p in dictionary_paths]
    entries = read_entries(paths)
    if len(entries) < 4:
        raise InputError("fewer than 4 usable dictionary entries in " + ", ".join(map(str, paths)))
    rng = random.Random(seed)
    rng.shuffle(entries)
    splits: dict[bool, list] = {False: [], True: []}
    for e in entries:
        splits[is_heldout_word(e.word, holdout)].append(e)
    stats = {k: 0 for k in PAIR_KINDS}
    stats["sampled_identical"] = 0
    out: dict[bool, list[dict]] = {False: [], True: []}
    to_sample: list[tuple[bool, int]] = []
    for held, pool in splits.items():
        want = round(n * holdout) if held else n - round(n * holdout)
        for i, e in enumerate(pool[:want]):
            kinds = ["other", "truncated"]
            trunc = truncate_definition(e.definition, rng)
            if trunc is None:
                kinds.remove("truncated")
            kind = rng.choice(kinds)
            if model is not None and rng.random() < sampled:
                kind = "sampled"
            if kind == "other":
                other = pool[(i + 1 + rng.randrange(max(1, len(pool) - 1))) % len(pool)]
                if other.definition == e.definition:
                    other = pool[(i + 1) % len(pool)]
                rejected = other.definition
            elif kind == "truncated":
                rejected = trunc
            else:
                rejected = ""  # filled in below, in one batched generation
                to_sample.append((held, len(out[held])))
            out[held].append({"prompt": rng.choice(DEFINE).format(w=e.word), "chosen": e.definition, "rejected": rejected,
                              "meta": {"kind": kind, "word": e.word}})
    if to_sample:
        from lmforge.posttrain.sft import chat_samples

        convs = [[{"role": "user", "content": out[h][j]["prompt"]}] for h, j in to_sample]
        answers = chat_samples(model, tokenizer, convs, sample_tokens, temperature=sample_temperature, seed=seed)
        for (h, j), a in zip(to_sample, answers):
            out[h][j]["rejected"] = a["completion"].strip()
    for held in (False, True):
        keep = []
        for p in out[held]:
            if p["chosen"].strip() == p["rejected"].strip() or not p["rejected"].strip():
                stats["sampled_identical"] += 1
                continue
            stats[p["meta"]["kind"]] += 1
            keep.append(p)
        out[held] = keep
    stats.update(train_pairs=len(out[False]), heldout_pairs=len(out[True]))
    return out[False], out[True], stats


# ---- one place for the stages' data step ------------------------------------------------------


def prepare_pairs(cfg, tokenizer, max_tokens: int, seed: int, resolve=lambda p: Path(p), *, model=None, section: str = "rm"
                  ) -> tuple[list[PairExample], list[PairExample], list[dict], dict]:
    """(training examples, held-out examples, held-out pairs as records, stats) for a stage config
    with the keys data, eval_data, dictionary, pairs, heldout, sampled, overflow.

    Users' JSONL (`cfg.data`; held out: `cfg.eval_data`, else a seeded `heldout` share), or the
    default dictionary pairs (`model` given and `cfg.sampled > 0`: some rejected answers sampled
    from it)."""
    from lmforge.posttrain.sft import BUNDLED_DICTIONARY

    stats: dict = {}
    if cfg.data:
        paths = [resolve(p) for p in cfg.data]
        pairs, rstats = read_pref_jsonl(paths)
        stats.update({f"read_{k}": v for k, v in rstats.items()})
        if cfg.eval_data:
            held, hstats = read_pref_jsonl([resolve(p) for p in cfg.eval_data])
            stats.update({f"read_heldout_{k}": v for k, v in hstats.items()})
        else:
            order = list(range(len(pairs)))
            random.Random(seed).shuffle(order)
            n_held = round(len(pairs) * cfg.heldout)
            held_idx = set(order[:n_held])
            held = [p for i, p in enumerate(pairs) if i in held_idx]
            pairs = [p for i, p in enumerate(pairs) if i not in held_idx]
        stats["source"] = ", ".join(str(p) for p in paths)
    else:
        if cfg.dictionary:
            d = resolve(cfg.dictionary)
            if not d.exists():
                raise InputError(f"{section}.dictionary: {d} not found")
            dpaths = sorted(d.glob("*.jsonl*")) if d.is_dir() else [d]
        else:
            dpaths = sorted(BUNDLED_DICTIONARY.glob("*.jsonl*"))
        pairs, held, bstats = build_default_pairs(dpaths, seed=seed, n=cfg.pairs, holdout=cfg.heldout,
                                                  model=model if cfg.sampled > 0 else None, tokenizer=tokenizer,
                                                  sampled=cfg.sampled)
        stats.update({f"kind_{k}": v for k, v in bstats.items() if k in PAIR_KINDS})
        stats["sampled_identical"] = bstats["sampled_identical"]
        stats["source"] = "built-in dictionary pairs from " + ", ".join(p.name for p in dpaths)
    train, tstats = render_pairs(tokenizer, pairs, max_tokens, cfg.overflow)
    heldout, hstats = render_pairs(tokenizer, held, max_tokens, cfg.overflow)
    stats.update(tstats)
    stats.update({f"heldout_{k}": v for k, v in hstats.items()})
    if not train:
        raise InputError(f"{section}: no preference pair left to train on ({tstats['dropped']} too long, "
                         f"{tstats['identical']} identical, {tstats['invalid']} invalid)")
    return train, heldout, held, stats


__all__ = ["PAIR_KINDS", "record_to_pair", "read_pref_jsonl", "pair_to_json", "write_pairs_jsonl", "PairExample",
           "render_response", "render_pairs", "PairBatch", "collate_pairs", "PairBatches", "pairs_fingerprint",
           "iter_batches", "truncate_definition", "build_default_pairs", "prepare_pairs"]
