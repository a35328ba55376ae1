"""Token-shard loader for pretraining (reads the tokenizer stage's `tokens/`, docs/ARTIFACTS.md).

The shards of a split are memory-mapped and seen as one stream of tokens. The stream is cut
into windows of `seq_len + 1` tokens (each window overlaps the next by one token, so every
token is a target once per epoch); each epoch visits the windows in a fresh permutation
seeded by (seed, epoch). Documents are packed back to back, so a window can hold the end of
one document and the start of others:

- packing = "doc_mask": per-token document ids (a new document starts at every `<|bos|>`)
  go to the model, whose attention then stays inside each document;
- packing = "separator": plain causal attention; the `<|bos|>` tokens separate documents.

The loader's position is two integers (epoch, windows consumed), saved in every checkpoint so a
resumed run reads exactly the batches it would have read. `BatchLoader` is the pretraining batch
source of lmforge.train.trainer (next_batch / state_dict / load_state_dict). With data parallelism every step
consumes `batch * dp_size` windows and rank r takes its own contiguous slice of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import InputError

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


@dataclass
class TokenIndex:
    """tokens/index.json: dtype, vocab and special ids, shards per split."""

    root: Path
    dtype: str
    vocab_size: int
    bos_id: int
    eos_id: int | None
    splits: dict[str, list[dict]]
    raw: dict = field(default_factory=dict)


def read_index(tokens_dir: str | Path) -> TokenIndex:
    root = Path(tokens_dir)
    p = root / "index.json"
    if not p.is_file():
        raise InputError(f"no token index at {p}: run the tokenizer stage (lmforge tokenize) first, or point --tokens at its output")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{p} is not valid JSON: {e}") from None
    dtype = raw.get("dtype", "uint16")
    if dtype not in DTYPES:
        raise InputError(f"{p}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    for k in ("vocab_size", "bos_id"):
        if not isinstance(raw.get(k), int):
            raise InputError(f"{p}: missing integer {k!r}")
    splits = {s: list(raw.get(s) or []) for s in ("train", "val")}
    return TokenIndex(root, dtype, raw["vocab_size"], raw["bos_id"], raw.get("eos_id"), splits, raw)


class TokenStream:
    """The shards of one split as one contiguous, memory-mapped token stream."""

    def __init__(self, index: TokenIndex, split: str):
        self.split = split
        self.shards: list[np.ndarray] = []
        self.paths: list[Path] = []
        dt = DTYPES[index.dtype]
        for entry in index.splits.get(split, []):
            path = index.root / entry["path"]
            if not path.is_file():
                raise InputError(f"token shard {path} listed in {index.root / 'index.json'} does not exist")
            size = path.stat().st_size
            if size == 0:
                raise InputError(f"token shard {path} is empty (0 tokens); re-run the tokenizer stage or remove it from index.json")
            itemsize = np.dtype(dt).itemsize
            if size % itemsize or ("tokens" in entry and size // itemsize != entry["tokens"]):
                raise InputError(
                    f"token shard {path} holds {size} bytes but index.json says {entry.get('tokens')} {index.dtype} tokens: "
                    "the shard is truncated or corrupt"
                )
            self.shards.append(np.memmap(path, dtype=dt, mode="r"))
            self.paths.append(path)
        self.lengths = np.array([len(s) for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.total = int(self.starts[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the stream as int64 (may span shards)."""
        out = np.empty(n, dtype=np.int64)
        filled = 0
        i = int(np.searchsorted(self.starts, start, side="right") - 1)
        pos = start - int(self.starts[i])
        while filled < n:
            take = min(n - filled, int(self.lengths[i]) - pos)
            out[filled : filled + take] = self.shards[i][pos : pos + take]
            filled += take
            i, pos = i + 1, 0
        return out

    def max_token(self) -> int:
        """Largest token id (checked once against the model's vocabulary)."""
        return max((int(s.max()) for s in self.shards), default=-1)


@dataclass
class Batch:
    x: torch.Tensor  # (B, T) inputs
    y: torch.Tensor  # (B, T) targets
    doc_ids: torch.Tensor | None  # (B, T) document index within each row, doc_mask packing only


def make_batch(rows: np.ndarray, bos_id: int, packing: str, device) -> Batch:
    x = torch.from_numpy(rows[:, :-1].copy())
    y = torch.from_numpy(rows[:, 1:].copy())
    doc = None
    if packing == "doc_mask":
        doc = torch.from_numpy(np.cumsum(rows[:, :-1] == bos_id, axis=1))
    if device.type != "cuda":
        return Batch(x, y, doc)
    # pinned host memory makes the copies truly asynchronous (no stall of the GPU queue per step)
    move = lambda t: t.pin_memory().to(device, non_blocking=True)  # noqa: E731
    return Batch(move(x), move(y), move(doc) if doc is not None else None)


class BatchLoader:
    """Shuffled, exactly resumable windows of `seq_len + 1` tokens; one rank's share of each step."""

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, *, seed: int, bos_id: int,
                 packing: str = "doc_mask", dp_rank: int = 0, dp_size: int = 1, device=torch.device("cpu")):
        self.stream, self.T, self.B = stream, seq_len, batch_size
        self.seed, self.bos_id, self.packing = seed, bos_id, packing
        self.rank, self.world, self.device = dp_rank, dp_size, torch.device(device)
        self.n_windows = (stream.total - 1) // seq_len if stream.total > seq_len else 0
        per_step = batch_size * dp_size
        if self.n_windows < per_step:
            raise InputError(
                f"{stream.split} shards hold {stream.total} tokens: fewer than one step needs "
                f"({per_step} sequences of {seq_len + 1} tokens); use more data or a smaller batch_size / seq_len"
            )
        self.epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_windows)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> Batch:
        per_step = self.B * self.world
        if self.pos + per_step > self.n_windows:  # drop the ragged tail of the epoch
            self.epoch, self.pos = self.epoch + 1, 0
        ids = self._order()[self.pos + self.rank * self.B : self.pos + (self.rank + 1) * self.B]
        self.pos += per_step
        rows = np.stack([self.stream.read(int(w) * self.T, self.T + 1) for w in ids])
        return make_batch(rows, self.bos_id, self.packing, self.device)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n_windows": self.n_windows, "seq_len": self.T}

    def load_state_dict(self, s: dict) -> None:
        if s.get("n_windows") not in (None, self.n_windows) or s.get("seq_len") not in (None, self.T):
            raise InputError(
                f"the checkpoint's data position was saved for {s.get('n_windows')} windows of {s.get('seq_len')} tokens, "
                f"but the train shards now give {self.n_windows} of {self.T}: the token shards changed since the checkpoint"
            )
        self.epoch, self.pos = int(s["epoch"]), int(s["pos"])


def val_batches(stream: TokenStream, seq_len: int, batch_size: int, n_batches: int, *, bos_id: int, packing: str,
                dp_rank: int = 0, dp_size: int = 1, device=torch.device("cpu")):
    """The first `n_batches` steps' worth of consecutive validation windows (same every eval)."""
    n_windows = (stream.total - 1) // seq_len if stream.total > seq_len else 0
    per_step = batch_size * dp_size
    steps = min(n_batches, n_windows // per_step)
    for s in range(steps):
        first = s * per_step + dp_rank * batch_size
        rows = np.stack([stream.read(w * seq_len, seq_len + 1) for w in range(first, first + batch_size)])
        yield make_batch(rows, bos_id, packing, torch.device(device))


def write_token_shards(tokens_dir: str | Path, splits: dict[str, list[list[int]]], vocab_size: int, bos_id: int = 0,
                       eos_id: int | None = 1, shard_tokens: int = 1 << 20) -> Path:
    """Write documents (lists of token ids, without <|bos|>) as shards + index.json in the
    tokenizer stage's format. Used by tests and benchmarks to make small token sets."""
    from lmforge.rundir import atomic_write_bytes, atomic_write_json

    root = Path(tokens_dir)
    dtype = "uint16" if vocab_size <= 65536 else "uint32"
    index = {"dtype": dtype, "vocab_size": vocab_size, "bos_id": bos_id, "eos_id": eos_id, "train": [], "val": []}
    for split, docs in splits.items():
        buf: list[int] = []
        nd = 0
        shard = 0

        def flush():
            nonlocal buf, nd, shard
            if not buf:
                return
            rel = f"{split}/shard_{shard:05d}.bin"
            atomic_write_bytes(root / rel, np.asarray(buf, dtype=DTYPES[dtype]).astype("<" + np.dtype(DTYPES[dtype]).str[1:]).tobytes())
            index[split].append({"path": rel, "tokens": len(buf), "docs": nd})
            buf, nd, shard = [], 0, shard + 1

        for d in docs:
            buf.append(bos_id)
            buf.extend(d)
            nd += 1
            if len(buf) >= shard_tokens:
                flush()
        flush()
    atomic_write_json(root / "index.json", index)
    return root


__all__ = ["TokenIndex", "TokenStream", "BatchLoader", "Batch", "read_index", "val_batches", "write_token_shards"]
