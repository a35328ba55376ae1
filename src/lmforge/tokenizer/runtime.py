"""The one tokenizer runtime: `Tokenizer.from_file(path)` for every stage that turns text into ids.

Training samples, evaluation, `lmforge generate`, export and whatever comes next all load a
tokenizer through this class, so encode/decode/special-token behaviour is the same everywhere.

Two backends sit behind the same methods:

* **tiktoken** (the fast path) for lmforge's own byte-level BPE (what `train_bpe.py` writes:
  a Split(regex) + ByteLevel(use_regex=False) pre-tokenizer, `ignore_merges`, no normalizer).
  A tiktoken `Encoding` is built from the same vocabulary (byte strings ranked by id) and the
  same regex; because merges are applied in id order and a piece that is already a vocabulary
  entry is taken whole, tiktoken and HF `tokenizers` give identical ids (tested), tiktoken
  several times faster and without the GIL, so batches run on threads.
* **tokenizers** (HF) for any other tokenizer.json — an HF export of ours edited by someone, a
  GPT-2-style ByteLevel BPE, a Metaspace BPE — whose pre-tokenizer tiktoken cannot reproduce.

Special tokens: lmforge's are <|bos|>, <|eos|>, <|pad|>, the chat roles and <|reserved_N|>
(ids 0..k-1, see train_bpe.py); a foreign file's come from its `added_tokens` marked special,
with bos/eos/pad found through special_tokens.json / tokenizer_config.json beside it or the
usual names (<s>, </s>, <|endoftext|>, ...).
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lmforge.errors import InputError

_MISSING = object()
_NO_SPECIAL: frozenset[str] = frozenset()
_MIN_CHUNK = 16  # texts per thread-pool task, at least

# Names tried, in order, for the three ids every consumer needs (after special_tokens.json and
# tokenizer_config.json beside the file).
_BOS_NAMES = ("<|bos|>", "bos", "<s>", "<|begin_of_text|>", "<|endoftext|>")
_EOS_NAMES = ("<|eos|>", "eos", "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>")
_PAD_NAMES = ("<|pad|>", "pad", "<pad>", "<|finetune_right_pad_id|>")


def byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: each byte value -> one printable character (the table HF ByteLevel uses).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, a few
    Latin-1 gaps) map, in byte order, to the characters from U+0100 upward.
    """
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + extra)
            extra += 1
    return table


def byte_alphabet() -> dict[str, int]:
    """The byte-level alphabet inverted: printable character -> byte value."""
    return {c: b for b, c in byte_to_unicode().items()}


def tokenizer_file(path: str | Path) -> Path:
    """`path` itself, or `path/tokenizer.json` for a directory; InputError when it does not exist."""
    p = Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise InputError(f"tokenizer not found: {f} (train one with `lmforge tokenizer train` or the tokenizer stage)")
    return f


# ---- backends -------------------------------------------------------------------------------


class _Tiktoken:
    """lmforge byte-level BPE through a tiktoken Encoding."""

    name = "tiktoken"

    def __init__(self, enc):
        self.enc = enc
        self._core = enc._core_bpe  # tiktoken's Rust object: its calls skip the Python wrapper
        self.size = enc.max_token_value + 1

    def encode(self, text: str, allow_special: bool) -> list[int]:
        if allow_special:
            return self.enc.encode(text, allowed_special="all")
        return self.enc.encode_ordinary(text)

    def _one_ordinary(self, text: str) -> list[int]:
        try:
            return self._core.encode_ordinary(text)  # the GIL is released inside
        except UnicodeEncodeError:  # lone surrogates: tiktoken's wrapper repairs them
            return self.enc.encode_ordinary(text)

    def _one_array(self, text: str) -> np.ndarray:
        try:
            # an empty allowed set: special-token strings are encoded as plain text, as encode_ordinary
            return np.frombuffer(self._core.encode_to_tiktoken_buffer(text, _NO_SPECIAL), dtype=np.uint32)
        except UnicodeEncodeError:
            return np.asarray(self.enc.encode_ordinary(text), dtype=np.uint32)

    def _chunked(self, fn, texts: list[str], num_threads: int) -> list:
        """`fn` over `texts` on `num_threads` threads, in contiguous chunks: one pool task per chunk
        instead of one per text (tiktoken's own batch call pays a future per text)."""
        if num_threads <= 1 or len(texts) < 2 * _MIN_CHUNK:
            return [fn(t) for t in texts]
        k = min(num_threads * 4, len(texts) // _MIN_CHUNK)
        step = -(-len(texts) // k)
        chunks = [texts[i:i + step] for i in range(0, len(texts), step)]
        with ThreadPoolExecutor(num_threads) as ex:
            return [x for part in ex.map(lambda c: [fn(t) for t in c], chunks) for x in part]

    def encode_batch(self, texts: list[str], num_threads: int, allow_special: bool) -> list[list[int]]:
        if allow_special:
            return self.enc.encode_batch(texts, num_threads=num_threads, allowed_special="all")
        return self._chunked(self._one_ordinary, texts, num_threads)

    def encode_arrays(self, texts: list[str], num_threads: int) -> list[np.ndarray]:
        return self._chunked(self._one_array, texts, num_threads)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids, errors="replace")

    def token_bytes(self, i: int) -> bytes:
        return self.enc.decode_single_token_bytes(i)  # KeyError for an id the vocabulary lacks


class _HF:
    """Any tokenizer.json through HF `tokenizers`."""

    name = "tokenizers"

    def __init__(self, hf):
        self.hf = hf
        self.size = hf.get_vocab_size(with_added_tokens=True)
        self._alphabet = byte_alphabet()

    def _special_as_text(self, allow_special: bool) -> None:
        # HF matches special-token strings inside text unless told not to; lmforge's default is
        # "special strings are plain text" (a user prompt cannot inject <|eos|>).
        if self.hf.encode_special_tokens != (not allow_special):
            self.hf.encode_special_tokens = not allow_special

    def encode(self, text: str, allow_special: bool) -> list[int]:
        self._special_as_text(allow_special)
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int, allow_special: bool) -> list[list[int]]:
        self._special_as_text(allow_special)
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def encode_arrays(self, texts: list[str], num_threads: int) -> list[np.ndarray]:
        self._special_as_text(False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=False)

    def token_bytes(self, i: int) -> bytes:
        s = self.hf.id_to_token(i)
        if s is None:
            raise KeyError(i)
        if all(c in self._alphabet for c in s):  # a byte-level vocabulary entry: one byte per character
            return bytes(self._alphabet[c] for c in s)
        return self.hf.decode([i], skip_special_tokens=False).encode("utf-8")


# ---- the runtime ----------------------------------------------------------------------------


class Tokenizer:
    """Text <-> token ids with the ids of a tokenizer.json, whichever backend reads it.

    `encode(text)` treats special-token strings in `text` as plain text unless `allow_special`;
    `decode(ids)` is lossless for byte-level vocabularies (invalid UTF-8 becomes U+FFFD) and
    writes special tokens as their strings unless `skip_special`.
    """

    def __init__(self, backend, special_tokens: dict[str, int], *, path: Path | None = None, pattern: str = "",
                 bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None):
        self._b = backend
        self.special_tokens = dict(special_tokens)
        self.path = path
        self.pattern = pattern
        self.vocab_size = backend.size
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        self._special_ids = frozenset(self.special_tokens.values())
        self._byte_lengths: np.ndarray | None = None

    # ---- constructors
    @classmethod
    def from_file(cls, path: str | Path, backend: str = "auto") -> "Tokenizer":
        """Load a tokenizer directory or tokenizer.json. `backend`: "auto" (tiktoken for lmforge's
        byte-level BPE, HF `tokenizers` otherwise), "tiktoken" (InputError if the file is not
        lmforge's format) or "tokenizers"."""
        if backend not in ("auto", "tiktoken", "tokenizers"):
            raise ValueError(f"backend must be auto, tiktoken or tokenizers, got {backend!r}")
        f = tokenizer_file(path)
        try:
            spec = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{f}: not an lmforge byte-level BPE tokenizer.json, nor one HF tokenizers can read "
                             f"({type(e).__name__}: {e})") from None
        if backend != "tokenizers":
            why = _lmforge_format_problem(spec)
            if why is None:
                tok = _from_lmforge_spec(spec, f)
                if tok is not None or backend == "tiktoken":
                    if tok is None:
                        raise InputError(f"{f}: tiktoken cannot compile its pre-tokenizer regex")
                    return tok
            elif backend == "tiktoken":
                raise InputError(f"{f}: not an lmforge byte-level BPE tokenizer.json ({why}); load it with backend='tokenizers'")
        return _from_hf_file(spec, f)

    # ---- encoding
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it are plain text unless `allow_special`."""
        return self._b.encode(text, allow_special)

    def encode_batch(self, texts: list[str], num_threads: int = 0, allow_special: bool = False) -> list[list[int]]:
        """`encode` over many texts (tiktoken: on `num_threads` threads, default up to 8)."""
        return self._b.encode_batch(list(texts), num_threads or min(8, os.cpu_count() or 1), allow_special)

    def decode(self, ids, skip_special: bool = False) -> str:
        """Text of `ids` (ints or a tensor/array); special tokens dropped when `skip_special`."""
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return self._b.decode(ids)

    def encode_arrays(self, texts: list[str], num_threads: int = 0) -> list[np.ndarray]:
        """`encode_batch` (special strings as plain text) with each text's ids as a uint32 array:
        no Python int per token (tiktoken writes the ids straight into the array's buffer)."""
        return self._b.encode_arrays(list(texts), num_threads or min(8, os.cpu_count() or 1))

    # ---- vocabulary
    def special_id(self, name: str, default=_MISSING) -> int | None:
        """The id of special token `name` (e.g. "<|user|>"); `default` if given and it is absent, else InputError."""
        i = self.special_tokens.get(name)
        if i is None:
            if default is not _MISSING:
                return default
            raise InputError(f"tokenizer {self.path} has no special token {name}")
        return i

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id stands for (a special token: its string); KeyError for an unknown id."""
        return self._b.token_bytes(int(token_id))

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes per id, length `vocab_size`: 0 for special tokens and ids the vocabulary lacks.
        Bits per byte divides a token's loss by these counts."""
        if self._byte_lengths is None:
            out = np.zeros(self.vocab_size, dtype=np.int64)
            for i in range(self.vocab_size):
                if i in self._special_ids:
                    continue
                try:
                    out[i] = len(self._b.token_bytes(i))
                except KeyError:
                    continue
            self._byte_lengths = out
        return self._byte_lengths.copy()

    @property
    def backend(self) -> str:
        """"tiktoken" or "tokenizers"."""
        return self._b.name

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, backend={self.backend!r}, path={str(self.path)!r})"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """`Tokenizer.from_file(path)`: a tokenizer directory or tokenizer.json, any backend."""
    return Tokenizer.from_file(path)


# ---- loading --------------------------------------------------------------------------------


def _lmforge_format_problem(spec) -> str | None:
    """None when `spec` is lmforge's byte-level BPE (tiktoken reproduces it exactly), else why not."""
    try:
        model, pre = spec["model"], spec.get("pre_tokenizer") or {}
        if model.get("type") != "BPE":
            return f"model type {model.get('type')!r} is not BPE"
        if not model.get("ignore_merges"):
            return "BPE without ignore_merges"
        if spec.get("normalizer") is not None:
            return "it has a normalizer"
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            return "its decoder is not ByteLevel"
        steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
        if not steps or len(steps) != 2:
            return "its pre-tokenizer is not Split(regex) + ByteLevel"
        split, bl = steps
        if split.get("type") != "Split" or "Regex" not in (split.get("pattern") or {}) or split.get("behavior") != "Isolated" \
                or split.get("invert"):
            return "its pre-tokenizer does not start with an isolating Split(regex)"
        if bl.get("type") != "ByteLevel" or bl.get("use_regex") or bl.get("add_prefix_space"):
            return "its pre-tokenizer does not end with ByteLevel(use_regex=False)"
        added = {t["content"] for t in spec.get("added_tokens", [])}
        for name in ("<|bos|>", "<|eos|>", "<|pad|>"):
            if name not in added:
                return f"special token {name} is missing"
        alphabet = byte_alphabet()
        if not all(all(c in alphabet for c in s) for s in model["vocab"] if s not in added):
            return "vocabulary entries outside the byte-level alphabet"
    except (KeyError, TypeError, AttributeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _from_lmforge_spec(spec: dict, f: Path) -> Tokenizer | None:
    """A tiktoken-backed Tokenizer from lmforge's tokenizer.json; None if tiktoken rejects the regex."""
    import tiktoken

    pattern = spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"]
    added = {t["content"]: int(t["id"]) for t in spec.get("added_tokens", [])}
    decoder = byte_alphabet()
    ranks = {bytes(decoder[c] for c in s): int(i) for s, i in spec["model"]["vocab"].items() if s not in added}
    try:
        enc = tiktoken.Encoding(name=f"lmforge-{f.parent.name}", pat_str=pattern, mergeable_ranks=ranks, special_tokens=added)
    except ValueError:
        return None
    return Tokenizer(_Tiktoken(enc), added, path=f, pattern=pattern,
                     bos_id=added["<|bos|>"], eos_id=added["<|eos|>"], pad_id=added["<|pad|>"])


def _from_hf_file(spec: dict, f: Path) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises its own exception type on a bad file
        raise InputError(f"{f}: not an lmforge byte-level BPE tokenizer.json, nor one HF tokenizers can read ({e})") from None
    special = {t.content: int(i) for i, t in hf.get_added_tokens_decoder().items() if t.special}
    ids = [_find_special(hf, f.parent, role, names) for role, names in
           (("bos", _BOS_NAMES), ("eos", _EOS_NAMES), ("pad", _PAD_NAMES))]
    pattern = ""
    pre = spec.get("pre_tokenizer") or {}
    for step in pre.get("pretokenizers") or [pre]:
        if isinstance(step, dict) and "Regex" in (step.get("pattern") or {}):
            pattern = step["pattern"]["Regex"]
            break
    return Tokenizer(_HF(hf), special, path=f, pattern=pattern, bos_id=ids[0], eos_id=ids[1], pad_id=ids[2])


def _find_special(hf, directory: Path, role: str, names: tuple[str, ...]) -> int | None:
    """The id of the bos/eos/pad token: special_tokens.json, then tokenizer_config.json's
    `<role>_token`, then the usual names."""
    table = _read_json(directory / "special_tokens.json")
    cfg = _read_json(directory / "tokenizer_config.json")
    named = cfg.get(f"{role}_token")
    if isinstance(named, dict):
        named = named.get("content")
    candidates = ([named] if isinstance(named, str) else []) + list(names)
    for n in candidates:
        if isinstance(table.get(n), int):
            return table[n]
        i = hf.token_to_id(n)
        if i is not None:
            return i
    return None


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


__all__ = ["Tokenizer", "load_tokenizer", "tokenizer_file", "byte_alphabet", "byte_to_unicode"]
