"""A paged (block) KV cache: the keys/values of every running sequence live in fixed-size blocks
of one shared pool, addressed through a per-sequence block table (the PagedAttention layout).

- `BlockAllocator` hands out block ids from a pool of `num_blocks`, counts references, and keeps
  the prefix cache: a full block is identified by a chain hash over the token ids of every block
  up to and including it (`block_hashes`), so two prompts that begin with the same full blocks
  share those blocks (ref-counted). Only full blocks are shared, so nothing is ever written into
  a shared block and no copy-on-write is needed. A block whose last reference goes away but which
  holds a hashed prefix is kept as *cached* (free to evict, least recently used first) until the
  space is needed, so a later request with the same beginning finds it.
- `PagedKVCache` is one layer's storage, `(num_blocks * block_size, n_kv_heads, head_dim)` for
  keys and for values, plugged into the model's cache protocol (`Attention.cache.update(k, v,
  pos)`). Which slots a forward writes and which it reads are not derived from `pos` but set for
  all layers at once in a shared `PagedStep` before the forward: `slots` (the flat slot of every
  query token; padding tokens write into the reserved scratch block 0) and `table` (B, nb), each
  row's block table (padded with the scratch block). `update` scatters the new keys/values with
  `index_copy_` and gathers each row's blocks in logical order with one `index_select` of whole
  blocks (block_size x heads x head_dim contiguous values each: a few large copies, about twice as
  fast on CPU as gathering token slots), so attention sees an ordinary (B, heads, nb*block_size,
  head_dim) tensor and the caller's mask (`key position <= query position`) does the rest.
  Gather-based attention: plain indexing ops, the same on CPU and CUDA.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn

from lmforge.errors import ConfigError
from lmforge.model.transformer import sdpa_attend

SCRATCH_BLOCK = 0  # never handed out: padding tokens write their keys/values here


def block_hashes(tokens: list[int], block_size: int, n_blocks: int | None = None) -> list[int]:
    """Chain hashes of the first `n_blocks` full blocks of `tokens` (all full blocks by default):
    h_i = hash((h_{i-1}, tokens of block i)), so a block's hash names its whole prefix."""
    full = len(tokens) // block_size if n_blocks is None else min(n_blocks, len(tokens) // block_size)
    out, h = [], 0
    for i in range(full):
        h = hash((h, tuple(tokens[i * block_size : (i + 1) * block_size])))
        out.append(h)
    return out


class BlockAllocator:
    """Block ids 1..num_blocks-1 (0 is the scratch block) with reference counts and a prefix cache
    (hash -> block). `free_count` counts blocks that can be handed out now: never-used or
    released blocks plus cached blocks nobody references (evicted on demand, LRU first)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ConfigError(f"a paged KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() gives low ids first
        self._ref = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block -> hash (registered blocks)
        self._tokens_of: dict[int, tuple] = {}  # block -> its tokens (collision check)
        self._by_hash: dict[int, int] = {}  # hash -> block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # registered blocks with ref 0, LRU first

    # ---- counts
    @property
    def total(self) -> int:
        """Blocks usable by sequences (the scratch block excluded)."""
        return self.num_blocks - 1

    @property
    def free_count(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.total - self.free_count

    @property
    def cached(self) -> int:
        """Blocks holding a hashed prefix that nobody references (reusable, evictable)."""
        return len(self._evictable)

    def refcount(self, block: int) -> int:
        return self._ref[block]

    # ---- allocation
    def allocate(self) -> int:
        """A block with reference count 1; evicts the least recently used cached block when no
        unused block is left. IndexError when every block is referenced."""
        if self._free:
            b = self._free.pop()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)
            self._unregister(b)
        else:
            raise IndexError("no free KV block")
        self._ref[b] = 1
        return b

    def incref(self, block: int) -> None:
        if self._ref[block] == 0:
            self._evictable.pop(block, None)
        self._ref[block] += 1

    def release(self, block: int) -> None:
        """Drop one reference; at zero the block becomes cached (if it holds a hashed prefix) or free."""
        if self._ref[block] <= 0:
            raise RuntimeError(f"KV block {block} released more often than taken")
        self._ref[block] -= 1
        if self._ref[block] == 0:
            if block in self._hash_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def release_all(self, blocks: list[int]) -> None:
        # in reverse: the tail of a sequence (least likely to be shared) is evicted first
        for b in reversed(blocks):
            self.release(b)

    # ---- prefix cache
    def register(self, block: int, h: int, tokens: tuple) -> None:
        """Record that `block` holds the full block whose chain hash is `h`. A hash already
        registered keeps its block (this one stays private to its sequence)."""
        if h in self._by_hash or block in self._hash_of:
            return
        self._by_hash[h], self._hash_of[block], self._tokens_of[block] = block, h, tokens

    def _unregister(self, block: int) -> None:
        h = self._hash_of.pop(block)
        self._tokens_of.pop(block, None)
        if self._by_hash.get(h) == block:
            del self._by_hash[h]

    def lookup(self, hashes: list[int], tokens: list[int]) -> list[int]:
        """The longest run of cached blocks matching `hashes` from the start (their tokens checked
        against `tokens`), each taken with one more reference."""
        out = []
        bs = self.block_size
        for i, h in enumerate(hashes):
            b = self._by_hash.get(h)
            if b is None or self._tokens_of.get(b) != tuple(tokens[i * bs : (i + 1) * bs]):
                break
            self.incref(b)  # out of the LRU order; appended as most recent when released again
            out.append(b)
        return out

    def clear_cache(self) -> None:
        """Forget every cached prefix (blocks still referenced keep their contents, unregistered)."""
        for b in list(self._hash_of):
            self._unregister(b)
        while self._evictable:
            b, _ = self._evictable.popitem(last=False)
            self._free.append(b)


@dataclass
class PagedStep:
    """What one forward writes and reads, shared by every layer's `PagedKVCache`: `slots` (N,) the
    flat slot (block * block_size + offset) of each query token in row-major (B, T) order, `table`
    (B, nb) the block table of each row (logical block i of row b is block table[b, i])."""

    slots: torch.Tensor | None = None
    table: torch.Tensor | None = None
    # decode with rows of very different lengths: rows split into groups, each gathering only the
    # blocks its longest row needs; per group (row indices, block table, additive mask), and the
    # permutation that puts the groups' outputs back in row order. `update` then returns the cache
    # itself and `paged_attend` does the attention.
    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    inverse: torch.Tensor | None = None


class PagedKVCache(nn.Module):
    """One layer's paged keys/values, plugged in as `Attention.cache` (see the module docstring).
    A module (the model only accepts modules there) whose storage is plain tensor attributes, not
    buffers: it never enters a state dict and the engine owns its device."""

    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, dtype, device,
                 step: PagedStep):
        super().__init__()
        n = num_blocks * block_size
        # token-major storage: slot s = block * block_size + offset holds (heads, head_dim)
        self.k = torch.zeros(n, n_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(n, n_kv_heads, head_dim, dtype=dtype, device=device)
        self._kb = self.k.view(num_blocks, -1)  # one row per block, for whole-block gathers
        self._vb = self.v.view(num_blocks, -1)
        self.block_size = block_size
        self.step = step

    def update(self, k: torch.Tensor, v: torch.Tensor, pos) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (B, heads, T, head_dim). Writes them at `step.slots`, returns (B, heads, S, head_dim)
        keys/values of the blocks in `step.table` (S = nb * block_size). `pos` (the logical
        positions) is used by the model for RoPE; the slots come from the block tables."""
        B, H, T, D = k.shape
        slots = self.step.slots
        self.k.index_copy_(0, slots, k.transpose(1, 2).reshape(B * T, H, D).to(self.k.dtype))
        self.v.index_copy_(0, slots, v.transpose(1, 2).reshape(B * T, H, D).to(self.v.dtype))
        if self.step.groups is not None:
            return self, self  # `paged_attend` gathers per group
        return self.gather(self.step.table)

    def gather(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, heads, nb * block_size, head_dim) of the blocks in `table` (B, nb)."""
        B, S = table.shape[0], table.shape[1] * self.block_size
        H, D = self.k.shape[1], self.k.shape[2]
        idx = table.reshape(-1)
        kk = self._kb.index_select(0, idx).view(B, S, H, D).transpose(1, 2)
        vv = self._vb.index_select(0, idx).view(B, S, H, D).transpose(1, 2)
        return kk, vv

    def copy_block(self, src: int, dst: int, block_size: int) -> None:
        s, d = src * block_size, dst * block_size
        self.k[d : d + block_size] = self.k[s : s + block_size]
        self.v[d : d + block_size] = self.v[s : s + block_size]


def paged_attend(q: torch.Tensor, k, v, mask) -> torch.Tensor:
    """The attention core for a grouped decode step (`PagedStep.groups`): `k` is the layer's
    `PagedKVCache`; each group of rows attends over its own gathered blocks, and the outputs are
    put back in row order."""
    cache: PagedKVCache = k
    step = cache.step
    outs = []
    for rows, table, m in step.groups:
        kk, vv = cache.gather(table)
        outs.append(sdpa_attend(q.index_select(0, rows), kk, vv, m))
    return torch.cat(outs).index_select(0, step.inverse)


def bytes_per_block(cfg, block_size: int, dtype: torch.dtype) -> int:
    """KV bytes of one block over all layers: 2 (keys, values) x layers x kv heads x head_dim x block_size."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * block_size * elem


__all__ = ["SCRATCH_BLOCK", "BlockAllocator", "PagedKVCache", "PagedStep", "block_hashes", "bytes_per_block", "paged_attend"]
