"""Word shingles for the near-duplicate passes (MinHash, Bloom, decontamination): text
normalisation into words, batching of texts, and vectorised 64-bit hashing of word n-grams.

One normalisation and one hash everywhere, so an n-gram hashes the same in the MinHash
signatures, the Bloom filter and the decontamination table.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

U64 = np.uint64
P = U64(0x100000001B3)  # odd multiplier for combining word hashes into n-gram hashes
_EMPTY = np.zeros(0, dtype=U64)


def words(text: str) -> list[str]:
    """Normalised words, as the shingler sees them: lower case, split on anything but ASCII
    letters, digits, underscore and non-ASCII characters (so ASCII punctuation is dropped)."""
    return [w.decode("utf-8", "replace") for w in text.lower().encode("utf-8", "surrogatepass").translate(_DELIM_TABLE).split()]


_WORD_BYTE = np.zeros(256, dtype=bool)
for _c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_":
    _WORD_BYTE[_c] = True
_WORD_BYTE[0x80:] = True
_DELIM_TABLE = bytes(c if _WORD_BYTE[c] else 0x20 for c in range(256))
_FLAG_TABLE = bytes(1 if _WORD_BYTE[c] else 0 for c in range(256))
_MASKS = np.array([0] + [(1 << (8 * r)) - 1 for r in range(1, 8)] + [2**64 - 1], dtype=U64)
_K1 = U64(0x9E3779B97F4A7C15)
_K2 = U64(0xD6E8FEB86659FD93)


def text_batches(texts: list[str], max_chars: int = 1 << 21, max_docs: int = 4096) -> Iterator[tuple[int, int]]:
    """(start, end) slices of `texts` of about `max_chars` characters each (for batch_shingles)."""
    i, n = 0, len(texts)
    while i < n:
        j, size = i, 0
        while j < n and (j == i or (size + len(texts[j]) <= max_chars and j - i < max_docs)):
            size += len(texts[j])
            j += 1
        yield i, j
        i = j


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised, in place."""
    x ^= x >> U64(30)
    x *= U64(0xBF58476D1CE4E5B9)
    x ^= x >> U64(27)
    x *= U64(0x94D049BB133111EB)
    x ^= x >> U64(31)
    return x


def batch_shingles(texts: list[str], n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the word n-grams of many texts at once, fully vectorised.

    Returns (hashes, offsets): the shingles of text i are hashes[offsets[i]:offsets[i+1]]
    (not de-duplicated). A text with fewer than n words gets one shingle of all its words;
    a text without words gets none. A word's UTF-8 bytes are read 8 at a time and chained
    into 64 bits (exact for words up to 8 bytes), mixed with its length and finalised with
    splitmix64; an n-gram is a polynomial (mod 2**64) of its n word hashes, finalised the
    same way. Everything is vectorised over the whole batch."""
    if not texts:
        return _EMPTY, np.zeros(1, np.int64)
    enc = [t.lower().encode("utf-8", "surrogatepass") for t in texts]
    blob = b" ".join(enc) + b" " + bytes(8)  # 8 zero bytes: every 8-byte read below stays inside
    nb = len(blob) - 8
    starts_doc = np.zeros(len(enc), np.int64)
    if len(enc) > 1:
        starts_doc[1:] = np.cumsum([len(e) + 1 for e in enc[:-1]])
    # word boundaries: one pass marks where "is a word byte" changes; starts and ends alternate
    # (the blob ends with a delimiter, so every word ends)
    isw = np.frombuffer(blob.translate(_FLAG_TABLE), dtype=np.bool_, count=nb)
    change = np.empty(nb + 1, dtype=np.bool_)
    change[0] = isw[0]
    np.not_equal(isw[1:], isw[:-1], out=change[1:nb])
    change[nb] = False
    edges = np.flatnonzero(change)
    ws, we = edges[0::2], edges[1::2]
    nd = len(texts)
    if len(ws) == 0:
        return _EMPTY, np.zeros(nd + 1, np.int64)
    # word hashes: the word's bytes read 8 at a time (little-endian, unaligned view of the
    # blob), masked to the word's length, chained by multiply-xor, then length + splitmix64
    u = np.ndarray(shape=(nb,), dtype="<u8", buffer=blob, offset=0, strides=(1,))
    wl = we - ws
    with np.errstate(over="ignore"):
        wh = u[ws]
        wh &= _MASKS[np.minimum(wl, 8)]
        k = 8
        sel = np.flatnonzero(wl > k)
        while len(sel):
            c = u[ws[sel] + k] & _MASKS[np.minimum(wl[sel] - k, 8)]
            wh[sel] = (wh[sel] * _K1) ^ c
            k += 8
            sel = sel[wl[sel] > k]
        wh ^= wl.astype(U64) * _K2 ^ U64(seed)
        mix64(wh)
        wfirst = np.searchsorted(ws, starts_doc)  # each document's first word
        nw = np.diff(wfirst, append=len(ws))
        wdoc = np.repeat(np.arange(nd), nw)
        # full n-grams: windows that start and end in the same document
        k = len(wh) - n + 1
        if k > 0:
            g = wh[:k].copy()
            for i in range(1, n):
                g *= P
                g += wh[i : i + k]
            valid = wdoc[:k] == wdoc[n - 1 :]
            g, gdoc = g[valid], wdoc[:k][valid]
        else:
            g, gdoc = _EMPTY, np.zeros(0, np.int64)
        # documents with 1..n-1 words: one shingle of all their words
        short = np.flatnonzero((nw > 0) & (nw < n))
        if len(short):
            idx = wfirst[short]
            sg = wh[idx].copy()
            for i in range(1, n - 1 + 1):
                m = nw[short] > i
                if not m.any():
                    break
                sg[m] = sg[m] * P + wh[idx[m] + i]
            g = np.concatenate([g, sg])
            gdoc = np.concatenate([gdoc, short])
            order = np.argsort(gdoc, kind="stable")
            g, gdoc = g[order], gdoc[order]
        mix64(g)
    offs = np.zeros(nd + 1, np.int64)
    np.cumsum(np.bincount(gdoc, minlength=nd), out=offs[1:])
    return g, offs


def shingle_hashes(text: str, n: int = 5, seed: int = 0) -> np.ndarray:
    """64-bit hashes of the word n-grams of one text (see `batch_shingles`)."""
    return batch_shingles([text], n, seed)[0]
