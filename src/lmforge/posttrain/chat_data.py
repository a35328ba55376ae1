"""Chat data for supervised fine-tuning: users' JSONL -> rendered examples -> packed SFT batches.

Input lines (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`), one conversation each:

    {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "...", "system": "..."}      # system optional

Other keys are kept (e.g. `meta`). A malformed line (bad JSON, missing fields, a bad role, an
empty conversation, non-string content) is logged once with `file:line` and skipped, and counted.

`render_examples` turns conversations into `ChatExample`s (ids + loss mask, tokenizer/chat.py).
A conversation longer than `max_tokens` is truncated (its start kept) or dropped, as configured,
and counted; an example with nothing to learn (no supervised token, e.g. after truncation) is
counted and not trained on.

`SFTBatches` is the SFT batch source for the trainer (`next_batch`, `state_dict`,
`load_state_dict`): rows of `seq_len + 1` tokens (so a conversation of up to `seq_len + 1` tokens
fits: `x` and `y` are each `seq_len` long).
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from lmforge.errors import InputError
from lmforge.log import logger
from lmforge.tokenizer.chat import message_problem, render
from lmforge.train.data import Batch

IGNORE = -100  # target id the loss ignores (not supervised, or padding)
OVERFLOW = ("truncate", "drop")


@dataclass
class ChatExample:
    """One rendered conversation: token ids and the per-token loss mask (True = supervised)."""

    ids: list[int]
    mask: list[bool]
    source: str = ""  # file:line (or an index) the conversation came from

    @property
    def n_supervised(self) -> int:
        return sum(self.mask)


# ---- reading --------------------------------------------------------------------------------


def _open_text(path: Path):
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if name.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8",
                                errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def record_to_messages(record) -> tuple[list[dict] | None, str | None]:
    """(messages, None) for a valid `messages` or `prompt`/`completion` record, else (None, why)."""
    if not isinstance(record, dict):
        return None, f"a line must be a JSON object, got {type(record).__name__}"
    if "messages" in record:
        msgs = record["messages"]
        why = message_problem(msgs)
        if why:
            return None, why
        return [{"role": m["role"], "content": m["content"]} for m in msgs], None
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                return None, f"'{key}' is missing or not a string"
        msgs = []
        if "system" in record:
            if not isinstance(record["system"], str):
                return None, "'system' is not a string"
            msgs.append({"role": "system", "content": record["system"]})
        msgs += [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
        return msgs, None
    return None, "no 'messages' and no 'prompt'/'completion'"


def read_jsonl_records(paths: Iterable[str | Path], parse, *, kind: str, missing: str, noun: str, needs: str
                       ) -> tuple[list[dict], dict]:
    """The one JSONL reader of post-training data (chat conversations, preference pairs, prompts).

    `parse(record) -> (item dict | None, why | "")`: None + why for a malformed line (logged once with
    file:line and skipped, counted in `malformed`), an item with `why` set for a line that parses but
    is dropped all the same (logged, counted under that `why` as the stats key, e.g. "identical").
    Each kept item gets `source` = "file:line". Stats: lines, blank, malformed, + dropped reasons.
    A missing file (`<missing> not found`), or a file with no usable line (`no usable <noun> (each line
    needs <needs>)`), is an InputError; log lines say "malformed <kind> line"."""
    items: list[dict] = []
    stats = {"lines": 0, "malformed": 0, "blank": 0}
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise InputError(f"{missing} not found: {p}")
        before = len(items)
        with _open_text(p) as f:
            for lineno, line in enumerate(f, 1):
                stats["lines"] += 1
                if not line.strip():
                    stats["blank"] += 1
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    item, why = None, f"bad JSON ({e.msg})"
                else:
                    item, why = parse(rec)
                if item is None:
                    stats["malformed"] += 1
                    logger.warning("%s:%d: skipped malformed %s line: %s", p, lineno, kind, why)
                    continue
                if why:
                    stats[why] = stats.get(why, 0) + 1
                    logger.warning("%s:%d: skipped %s line: %s", p, lineno, kind, why)
                    continue
                items.append({**item, "source": f"{p}:{lineno}"})
        if len(items) == before:
            raise InputError(f"{p}: no usable {noun} (each line needs {needs})")
    return items, stats


def read_chat_jsonl(paths: Iterable[str | Path]) -> tuple[list[dict], dict]:
    """Conversations `{"messages": [...], "source": "file:line", ...other keys}` from JSONL files,
    and stats {lines, conversations, malformed, blank}. Malformed lines are logged (file:line and
    why) and skipped; a missing file or one without a single usable line is an InputError."""

    def parse(rec):
        msgs, why = record_to_messages(rec)
        if msgs is None:
            return None, why
        extra = {k: v for k, v in rec.items() if k not in ("messages", "prompt", "completion", "system")}
        return {**extra, "messages": msgs}, ""

    convs, stats = read_jsonl_records(paths, parse, kind="chat", missing="chat data", noun="conversation",
                                      needs="'messages' or 'prompt'/'completion'")
    stats["conversations"] = len(convs)
    return convs, stats


# ---- rendering ------------------------------------------------------------------------------


def _messages_of(conv) -> list[dict]:
    return conv["messages"] if isinstance(conv, dict) else conv


def render_examples(tokenizer, conversations: Iterable, max_tokens: int, overflow: str = "truncate"
                    ) -> tuple[list[ChatExample], dict]:
    """Render conversations (dicts with `messages`, or message lists) into examples of at most
    `max_tokens` tokens (for `SFTBatches`: `seq_len + 1`).

    `overflow`: "truncate" keeps the first `max_tokens` tokens of a longer conversation, "drop"
    leaves it out. Stats: conversations, examples, truncated, dropped (too long), no_target
    (nothing supervised: not trained on), invalid (bad messages), tokens, supervised_tokens."""
    if overflow not in OVERFLOW:
        raise InputError(f"overflow must be one of {', '.join(OVERFLOW)}, got {overflow!r}")
    if max_tokens < 2:
        raise InputError(f"max_tokens = {max_tokens} must be >= 2")
    out: list[ChatExample] = []
    stats = {"conversations": 0, "examples": 0, "truncated": 0, "dropped": 0, "no_target": 0, "invalid": 0,
             "tokens": 0, "supervised_tokens": 0}
    for k, conv in enumerate(conversations):
        stats["conversations"] += 1
        msgs = _messages_of(conv)
        source = conv.get("source", str(k)) if isinstance(conv, dict) else str(k)
        why = message_problem(msgs)
        if why:
            stats["invalid"] += 1
            logger.warning("%s: skipped invalid conversation: %s", source, why)
            continue
        ids, mask = render(tokenizer, msgs)
        if len(ids) > max_tokens:
            if overflow == "drop":
                stats["dropped"] += 1
                continue
            ids, mask = ids[:max_tokens], mask[:max_tokens]
            stats["truncated"] += 1
        # the first token is never a target (nothing precedes it)
        if not any(mask[1:]):
            stats["no_target"] += 1
            continue
        out.append(ChatExample(ids, mask, source))
        stats["tokens"] += len(ids)
        stats["supervised_tokens"] += sum(mask[1:])
    stats["examples"] = len(out)
    return out, stats


def load_chat_data(tokenizer, paths: Iterable[str | Path], max_tokens: int, overflow: str = "truncate"
                   ) -> tuple[list[ChatExample], dict]:
    """`read_chat_jsonl` + `render_examples`; stats of both (reading's under `read_*` names)."""
    convs, read_stats = read_chat_jsonl(paths)
    examples, stats = render_examples(tokenizer, convs, max_tokens, overflow)
    if not examples:
        raise InputError("no chat example left to train on "
                         f"({stats['dropped']} too long, {stats['no_target']} with nothing to learn)")
    return examples, {**{f"read_{k}": v for k, v in read_stats.items()}, **stats}


# ---- batches --------------------------------------------------------------------------------


def pack_rows(lengths: Sequence[int], order: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit packing: example indices per row, each row's lengths summing to <= `capacity`.

    Examples are taken in `order`; each goes into the open row with the least room left that
    still fits it (a new row when none does). Deterministic for a given order."""
    import bisect

    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        n = int(lengths[i])
        if n > capacity:
            raise InputError(f"example {i} has {n} tokens, more than a row holds ({capacity})")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
        else:
            room, r = capacity, len(rows)
            rows.append([])
        rows[r].append(int(i))
        room -= n
        if room > 0:
            bisect.insort(free, (room, r))
    return rows


@dataclass
class _Epoch:
    epoch: int = -1
    rows: list[list[int]] = field(default_factory=list)


class SFTBatches:
    """Exactly resumable SFT batches over rendered examples; one rank's share of each step.

    `next_batch()` -> `Batch(x, y, doc_ids)`, each (batch_size, seq_len) int64:
    * rows are `seq_len + 1` tokens: with `packing`, conversations packed best-fit in a seeded
      shuffled order (reshuffled each epoch); without, one conversation per row; right-padded
      with `pad_id`;
    * `x = row[:-1]`; `y = row[1:]` where the target token is supervised (its mask is True) and in
      the same conversation as the input, else -100 (padding, prompts, role tokens, boundaries);
    * `doc_ids` numbers the conversations of a row 0, 1, ... so the model's document mask keeps
      attention inside each; trailing padding shares the last conversation's id (its targets are
      -100, and a row with a single conversation then needs no mask at all).

    The row stream runs across epochs without dropping anything (a batch may end one epoch and
    start the next); `state_dict()` is (epoch, row position) plus what must not have changed.
    """

    def __init__(self, examples: Sequence, seq_len: int, batch_size: int, seed: int, pad_id: int,
                 packing: bool = True, *, dp_rank: int = 0, dp_size: int = 1, device=torch.device("cpu")):
        if seq_len < 1 or batch_size < 1:
            raise InputError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")
        if not examples:
            raise InputError("no chat examples to make SFT batches from")
        self.T, self.B, self.seed, self.pad_id, self.packing = seq_len, batch_size, seed, int(pad_id), packing
        self.rank, self.world, self.device = dp_rank, dp_size, torch.device(device)
        self.ids = [np.asarray(_ids_of(e), dtype=np.int64) for e in examples]
        self.mask = [np.asarray(_mask_of(e), dtype=bool) for e in examples]
        for i, (a, m) in enumerate(zip(self.ids, self.mask)):
            if len(a) != len(m):
                raise InputError(f"example {i}: {len(a)} ids but {len(m)} mask values")
            if len(a) > seq_len + 1:
                raise InputError(f"example {i} has {len(a)} tokens, more than seq_len + 1 = {seq_len + 1}; "
                                 "render with max_tokens = seq_len + 1")
        self.lengths = np.array([len(a) for a in self.ids], dtype=np.int64)
        self.fingerprint = _fingerprint(self.ids, self.mask)
        self.epoch, self.pos = 0, 0
        self._cache = _Epoch()

    # ---- the row stream
    def rows_of_epoch(self, epoch: int) -> list[list[int]]:
        """Example indices of each row of `epoch` (seeded shuffle, then packing)."""
        if self._cache.epoch != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.ids))
            rows = pack_rows(self.lengths, order, self.T + 1) if self.packing else [[int(i)] for i in order]
            self._cache = _Epoch(epoch, rows)
        return self._cache.rows

    def _take_rows(self, n: int) -> list[list[int]]:
        out = []
        while len(out) < n:
            rows = self.rows_of_epoch(self.epoch)
            take = rows[self.pos : self.pos + n - len(out)]
            out += take
            self.pos += len(take)
            if self.pos >= len(rows):
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def make_row(self, members: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, doc_ids) of one row holding the examples `members`, each length seq_len."""
        n = self.T + 1
        tok = np.full(n, self.pad_id, dtype=np.int64)
        sup = np.zeros(n, dtype=bool)
        doc = np.zeros(n, dtype=np.int64)
        at = 0
        for d, i in enumerate(members):
            a = self.ids[i]
            tok[at : at + len(a)] = a
            sup[at : at + len(a)] = self.mask[i]
            sup[at] = False  # a conversation's first token is never a target of the previous one
            doc[at : at + len(a)] = d
            at += len(a)
        doc[at:] = max(len(members) - 1, 0)
        y = np.where(sup[1:], tok[1:], IGNORE)
        return tok[:-1], y, doc[:-1]

    def next_batch(self) -> Batch:
        rows = self._take_rows(self.B * self.world)[self.rank * self.B : (self.rank + 1) * self.B]
        parts = [self.make_row(r) for r in rows]
        x, y, doc = (torch.from_numpy(np.stack([p[k] for p in parts])) for k in range(3))
        if self.device.type == "cuda":
            move = lambda t: t.pin_memory().to(self.device, non_blocking=True)  # noqa: E731
            return Batch(move(x), move(y), move(doc))
        return Batch(x, y, doc)

    def epoch_rows(self) -> int:
        """Rows in the current epoch (a packing-efficiency figure: tokens / (rows * (seq_len + 1)))."""
        return len(self.rows_of_epoch(self.epoch))

    # ---- resume
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "seq_len": self.T, "batch_size": self.B,
                "packing": self.packing, "n_examples": len(self.ids), "fingerprint": self.fingerprint}

    def load_state_dict(self, s: dict) -> None:
        for key, now in (("seq_len", self.T), ("packing", self.packing), ("n_examples", len(self.ids)),
                         ("fingerprint", self.fingerprint), ("seed", self.seed)):
            if key in s and s[key] != now:
                raise InputError(f"the checkpoint's SFT data position was saved with {key} = {s[key]!r}, but now it is "
                                 f"{now!r}: the chat data or its settings changed since the checkpoint")
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])


def _ids_of(e) -> Sequence[int]:
    return e.ids if hasattr(e, "ids") else e[0]


def _mask_of(e) -> Sequence[bool]:
    return e.mask if hasattr(e, "mask") else e[1]


def _fingerprint(ids: list[np.ndarray], mask: list[np.ndarray]) -> str:
    """A short hash of every example's ids and mask (a resume must see the same data)."""
    import hashlib

    h = hashlib.sha256()
    for a, m in zip(ids, mask):
        h.update(len(a).to_bytes(8, "little"))
        h.update(a.tobytes())
        h.update(np.packbits(m).tobytes())
    return h.hexdigest()[:16]


__all__ = ["IGNORE", "ChatExample", "record_to_messages", "read_chat_jsonl", "render_examples", "load_chat_data",
           "pack_rows", "SFTBatches"]
