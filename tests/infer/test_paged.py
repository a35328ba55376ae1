"""The paged KV cache: block allocation and reference counts, the prefix cache (chain hashes,
sharing, LRU eviction), and attention through scattered block tables equal to the plain forward."""

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.infer.paged import SCRATCH_BLOCK, BlockAllocator, PagedKVCache, PagedStep, block_hashes, bytes_per_block
from lmforge.model import Transformer, preset


def test_allocator_counts_references_and_never_hands_out_the_scratch_block():
    a = BlockAllocator(5, 4)
    assert a.total == 4 and a.free_count == 4 and a.used == 0
    got = [a.allocate() for _ in range(4)]
    assert sorted(got) == [1, 2, 3, 4] and SCRATCH_BLOCK not in got
    assert a.free_count == 0 and a.used == 4
    with pytest.raises(IndexError):
        a.allocate()
    a.incref(got[0])
    a.release(got[0])
    assert a.used == 4  # still referenced once
    a.release(got[0])
    assert a.used == 3 and a.allocate() == got[0]
    for b in got:
        a.release(b)
    assert a.used == 0
    with pytest.raises(RuntimeError):
        a.release(got[1])
    with pytest.raises(ConfigError):
        BlockAllocator(1, 4)


def test_chain_hashes_name_the_whole_prefix():
    t = list(range(20))
    h = block_hashes(t, 4)
    assert len(h) == 5 and len(set(h)) == 5
    assert block_hashes(t[:13], 4) == h[:3]  # only full blocks
    assert block_hashes(t, 4, 2) == h[:2]
    other = [99] + t[1:]
    assert not set(block_hashes(other, 4)) & set(h)  # a different first block changes every later hash


def test_prefix_cache_shares_full_blocks_keeps_released_ones_and_evicts_lru():
    a = BlockAllocator(6, 2)  # 5 usable blocks
    toks = [1, 2, 3, 4, 5, 6]
    hs = block_hashes(toks, 2)
    blocks = [a.allocate() for _ in range(3)]
    for b, h, i in zip(blocks, hs, range(3)):
        a.register(b, h, tuple(toks[2 * i : 2 * i + 2]))
    # a second sequence with the same first two blocks shares them
    hit = a.lookup(hs[:2], toks)
    assert hit == blocks[:2] and a.refcount(blocks[0]) == 2
    # a hash match whose tokens differ (a collision) is not taken
    assert a.lookup(hs[:1], [7, 7]) == []
    a.release_all(hit)
    a.release_all(blocks)
    assert a.used == 0 and a.cached == 3 and a.free_count == 5
    # released blocks still answer lookups
    again = a.lookup(hs, toks)
    assert again == blocks and a.cached == 0
    a.release_all(again)
    # filling the pool evicts cached blocks, least recently used first (the tail went back first)
    fresh = [a.allocate() for _ in range(3)]
    assert a.cached == 2
    assert a.lookup(hs[:1], toks) == [blocks[0]]  # the first block survived longest
    a.release(blocks[0])
    for b in fresh:
        a.release(b)
    a.clear_cache()
    assert a.cached == 0 and a.lookup(hs, toks) == [] and a.free_count == 5


@torch.no_grad()
def test_attention_through_scattered_blocks_equals_the_plain_forward():
    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=64, max_seq_len=32, n_kv_heads=1, init_std=0.2)).eval()
    bs, n_blocks = 4, 12
    step = PagedStep()
    caches = [PagedKVCache(n_blocks, bs, m.cfg.n_kv_heads, m.cfg.head_dim, torch.float32, "cpu", step) for _ in m.layers]
    for layer, c in zip(m.layers, caches):
        layer.attn.cache = c
    seqs = [torch.randint(0, 64, (10,)).tolist(), torch.randint(0, 64, (7,)).tolist()]
    tables = [[9, 2, 5], [11, 3]]  # deliberately out of order
    S = 3 * bs

    def run(tokens, positions):
        idx = torch.tensor(tokens)
        pos = torch.tensor(positions)
        table = torch.tensor([t + [SCRATCH_BLOCK] * (3 - len(t)) for t in tables])
        slots = table.gather(1, pos // bs) * bs + pos % bs
        step.slots, step.table = slots.view(-1), table
        mask = (torch.arange(S)[None, None, :] <= pos[:, :, None])[:, None]
        return m(idx, pos=pos, mask=mask)[0]

    # prefill the first 6 tokens of each row, then decode the rest one token at a time
    run([s[:6] for s in seqs], [list(range(6))] * 2)
    for t in range(6, 10):
        toks = [[s[min(t, len(s) - 1)]] for s in seqs]
        pos = [[min(t, len(s) - 1)] for s in seqs]
        out = run(toks, pos)
        for b, s in enumerate(seqs):
            if t < len(s):
                ref = m.clear_cache() or m(torch.tensor([s[: t + 1]]))[0][0, -1]
                for layer, c in zip(m.layers, caches):
                    layer.attn.cache = c
                torch.testing.assert_close(out[b, -1], ref, atol=1e-4, rtol=1e-4)


def test_bytes_per_block():
    cfg = preset("tiny", vocab_size=64, max_seq_len=32)
    assert bytes_per_block(cfg, 16, torch.float32) == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 16 * 4
    assert bytes_per_block(cfg, 16, torch.bfloat16) * 2 == bytes_per_block(cfg, 16, torch.float32)
