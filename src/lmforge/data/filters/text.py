"""Fast text splitting shared by the heuristic filters: words, sentences, punctuation classes.

The FineWeb thresholds were tuned on a rule-based word tokenizer that splits punctuation
off words (`"end."` -> `end`, `.`; `"well-known"` -> `well`, `-`, `known`; `"don't"` ->
`do`, `n't`), keeps URLs, decimal numbers and common abbreviations whole, and drops
whitespace. `split_words` follows the same rules so the filters take the same decisions,
but works per whitespace-separated chunk with a fast path for plain alphanumeric chunks
(the large majority), which is what makes the filters cheap.

`count_sentences` counts sentences the way a punctuation-based sentence splitter does: a
new sentence starts at the first non-punctuation token after a `.`, `!` or `?` token.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from itertools import filterfalse

import numpy as np

# --- character classes -------------------------------------------------------------------

# Characters that make a "symbol" token (a token made only of these is not a word):
# ASCII punctuation, control characters and common typographic punctuation.
_ASCII_PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
_TYPO_PUNCT = (
    "—–‐‑‒―“”„‟‘’‚‛«»‹›…·•◦►◄▪▫■□●○★☆※†‡§¶°´¨"
    "、。，．！？：；（）［］｛｝「」『』【】〈〉《》〔〕〖〗～％＃＆＊＋－／＜＝＞＠＼＾＿｀｜１"
    "¡¿؟،؛۔।॥"
)
_CONTROL = "".join(chr(c) for c in list(range(0, 9)) + list(range(11, 32)) + list(range(127, 160)))


# Code points with the Unicode (16.0) Sentence_Terminal property: ., !, ?, 。, ।, ؟ and the like
# in other scripts. Listed as ranges so importing costs nothing.
_STERM_RANGES = [
    (0x21,), (0x2E,), (0x3F,), (0x589,), (0x61D, 0x61F), (0x6D4,), (0x700, 0x702), (0x7F9,),
    (0x837,), (0x839,), (0x83D, 0x83E), (0x964, 0x965), (0x104A, 0x104B), (0x1362,), (0x1367,
    0x1368), (0x166E,), (0x1735, 0x1736), (0x17D4, 0x17D5), (0x1803,), (0x1809,), (0x1944, 0x1945),
    (0x1AA8, 0x1AAB), (0x1B4E, 0x1B4F), (0x1B5A, 0x1B5B), (0x1B5E, 0x1B5F), (0x1B7D, 0x1B7F),
    (0x1C3B, 0x1C3C), (0x1C7E, 0x1C7F), (0x2024,), (0x203C, 0x203D), (0x2047, 0x2049), (0x2CF9,
    0x2CFB), (0x2E2E,), (0x2E3C,), (0x2E53, 0x2E54), (0x2E60, 0x2E61), (0x3002,), (0xA4FF,),
    (0xA60E, 0xA60F), (0xA6F3,), (0xA6F7,), (0xA876, 0xA877), (0xA8CE, 0xA8CF), (0xA92F,), (0xA9C8,
    0xA9C9), (0xAA5D, 0xAA5F), (0xAAF0, 0xAAF1), (0xABEB,), (0xFE12,), (0xFE15, 0xFE16), (0xFE52,),
    (0xFE56, 0xFE57), (0xFF01,), (0xFF0E,), (0xFF1F,), (0xFF61,), (0x10A56, 0x10A57), (0x10F55,
    0x10F59), (0x10F86, 0x10F89), (0x11047, 0x11048), (0x110BE, 0x110C1), (0x11141, 0x11143),
    (0x111C5, 0x111C6), (0x111CD,), (0x111DE, 0x111DF), (0x11238, 0x11239), (0x1123B, 0x1123C),
    (0x112A9,), (0x113D4, 0x113D5), (0x1144B, 0x1144C), (0x115C2, 0x115C3), (0x115C9, 0x115D7),
    (0x11641, 0x11642), (0x1173C, 0x1173E), (0x11944,), (0x11946,), (0x11A42, 0x11A43), (0x11A9B,
    0x11A9C), (0x11C41, 0x11C42), (0x11EF7, 0x11EF8), (0x11F43, 0x11F44), (0x16A6E, 0x16A6F),
    (0x16AF5,), (0x16B37, 0x16B38), (0x16B44,), (0x16D6E, 0x16D6F), (0x16E98,), (0x1BC9F,),
    (0x1DA88,),
]


def _sentence_terminals() -> frozenset[str]:
    return frozenset(chr(c) for r in _STERM_RANGES for c in range(r[0], r[-1] + 1))


TERMINAL_PUNCTUATION: frozenset[str] = _sentence_terminals()
PUNCTUATION: frozenset[str] = frozenset(_ASCII_PUNCT + _TYPO_PUNCT + _CONTROL) | TERMINAL_PUNCTUATION
_PUNCT_DELETE = {ord(c): None for c in PUNCTUATION}

# characters after which a sentence ends (a token that is exactly one of these)
SENTENCE_END: frozenset[str] = frozenset(".!?") | TERMINAL_PUNCTUATION


def word_stats(words: list[str]) -> tuple[int, int, int]:
    """(symbol words, characters in symbol words, words with a letter). Alphanumeric words (most
    of them) are handled by C-level str methods; only the rest are looked at one by one."""
    others = list(filterfalse(str.isalnum, words))
    n_alnum = len(words) - len(others)
    n_alpha = n_alnum - sum(map(str.isnumeric, words))  # an alphanumeric word without a letter is numeric
    n_sym = sym_chars = 0
    for w, k in Counter(others).items():  # distinct tokens only ("." and "," repeat a lot)
        if not w.translate(_PUNCT_DELETE):
            n_sym += k
            sym_chars += k * len(w)
        elif has_alpha(w):
            n_alpha += k
    return n_sym, sym_chars, n_alpha


def is_symbol_word(w: str) -> bool:
    """True when `w` is made only of punctuation/symbol characters."""
    return not w.translate(_PUNCT_DELETE)


def has_alpha(w: str) -> bool:
    if w.isalpha():
        return True
    for c in w:
        if c.isalpha():
            return True
    return False


@lru_cache(maxsize=4096)
def is_punct_token(tok: str) -> bool:
    """True when every character of `tok` is Unicode punctuation (category P*)."""
    return all(unicodedata.category(c)[0] == "P" for c in tok)


# --- word splitting ----------------------------------------------------------------------

# Prefix characters split off the front of a chunk one at a time ("..." and "…" as a whole).
_PREFIX_CHARS = frozenset(
    "§%=—–,:;!?¿¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪'\"”“`‘´’‚„»«「」『』（）〔〕【】《》〈〉⟦⟧$£€¥฿₽₴₩₪₫₹₺₿"
)
# Suffix characters split off the end of a chunk one at a time.
_SUFFIX_CHARS = frozenset(
    ",:;!?¿¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪'\"”“`‘´’‚„»«「」『』（）〔〕【】《》〈〉⟦⟧—–…"
)
_PUNCT_BEFORE_PERIOD = frozenset("%²-+'\"") | _PREFIX_CHARS | _SUFFIX_CHARS
_UNIT_SUFFIX = re.compile(
    r"(?<=[0-9])(?:km|cm|mm|nm|m|kg|mg|g|lb|oz|ft|in|yd|mph|kmh|ha|KB|MB|GB|TB|kb|mb|gb|tb|K|M|G|T|am|pm|%)$"
)
_EMOTICON_SUFFIX = frozenset(["''", "):", ":)", "(:", ":(", "]:", ":]", "[:", ":[", ";)", "(;", "=)", "(="])
_CLITIC_SUFFIX = re.compile(r"(?:'s|'S|’s|’S)$")
_NEG = re.compile(r"^([A-Za-z]+)(n['’]t)$")
_PRONOUN_CLITIC = re.compile(
    r"^(i|you|he|she|it|we|they|that|there|who|what|where|when|why|how|this|these|those)(['’](?:m|re|ll|ve|d))$",
    re.IGNORECASE,
)
_URL = re.compile(
    r"^(?:[\w+.-]{2,}://)?(?:\S+(?::\S*)?@)?(?:(?:[A-Za-z0-9\u00a1-\uffff][A-Za-z0-9\u00a1-\uffff_-]{0,62})?"
    r"[A-Za-z0-9\u00a1-\uffff]\.)+(?:[a-z\u00df-\u00ff]{2,63}|xn--[a-z0-9]+)\.?(?::\d{2,5})?(?:[/?#]\S*)?$"
)
_INFIX = re.compile(
    r"\.\.+|…"  # ellipsis inside a chunk
    r"|(?<=[0-9])[+\-*^](?=[0-9-])"  # arithmetic and dates between digits
    r"|(?<=[a-zß-öø-ÿ'\"])\.(?=[A-ZÀ-ÖØ-Þ'\"])"  # missing space after a sentence end
    r"|(?<=[A-Za-zÀ-ÖØ-öø-ÿ]),(?=[A-Za-zÀ-ÖØ-öø-ÿ])"  # comma between letters
    r"|(?<=[A-Za-zÀ-ÖØ-öø-ÿ0-9])(?:-|–|—|--|---|——|~)(?=[A-Za-zÀ-ÖØ-öø-ÿ])"  # hyphenated words
    r"|(?<=[A-Za-zÀ-ÖØ-öø-ÿ0-9])[:<>=/](?=[A-Za-zÀ-ÖØ-öø-ÿ])"  # a/b, key=value, x<y
)
_ELLIPSIS_PREFIX = re.compile(r"^(?:\.\.+|…+)")
_ELLIPSIS_SUFFIX = re.compile(r"(?:\.\.+|…+)$")
_CURRENCY_PREFIX = re.compile(r"^(?:US|C|A)\$")

# Abbreviations and other chunks that stay one token although they end in a period.
_ABBREVIATIONS = frozenset(
    """
    a.m. p.m. e.g. i.e. E.g. I.e. E.G. I.E. vs. v.s. Mr. Mrs. Ms. Dr. Prof. St. Mt. Jr. Inc. Ltd. Co. co.
    Corp. Bros. Gen. Gov. Rep. Sen. Rev. Adm. Messrs. Ph.D. D.C. N.Y. N.J. N.C. N.D. N.H. N.M. S.C. U.S. U.K.
    Jan. Feb. Mar. Apr. Jun. Jul. Aug. Sep. Sept. Oct. Nov. Dec.
    Ala. Ariz. Ark. Calif. Colo. Conn. Del. Fla. Ga. Ill. Ind. Ia. Id. Kan. Kans. Ky. La. Md. Mass. Mich. Minn.
    Miss. Mo. Mont. Neb. Nebr. Nev. Okla. Ore. Pa. Tenn. Va. Wash. Wis. Ak.
    """.split()
) | frozenset(f"{c}." for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZäöü")
# Chunks split in a fixed way (irregular negations).
_SPECIAL = {
    "can't": ["ca", "n't"], "Can't": ["Ca", "n't"], "won't": ["wo", "n't"], "Won't": ["Wo", "n't"],
    "cannot": ["can", "not"], "Cannot": ["Can", "not"], "ain't": ["ai", "n't"], "shan't": ["sha", "n't"],
    "id": ["i", "d"], "Id": ["I", "d"], "im": ["i", "m"], "Im": ["I", "m"], "cant": ["ca", "nt"],
    "dont": ["do", "nt"], "wont": ["wo", "nt"], "and/or": ["and/or"], "''": ["''"], "8)": ["8)"],
}
for _w in ("gonna", "gotta", "wanna"):
    _SPECIAL[_w] = [_w[:3], _w[3:]]
    _SPECIAL[_w.capitalize()] = [_w[:3].capitalize(), _w[3:]]
# apostrophe-less negations and clitics ("didnt" -> did nt, "thats" -> that s)
for _w in "do does did have has had could should would is are was were must need might ai".split():
    _SPECIAL[_w + "nt"] = [_w, "nt"]
    _SPECIAL[_w.capitalize() + "nt"] = [_w.capitalize(), "nt"]
for _w, _c in (("that", "s"), ("what", "s"), ("who", "s"), ("when", "s"), ("you", "re"), ("they", "re")):
    _SPECIAL[_w + _c] = [_w, _c]
    _SPECIAL[_w.capitalize() + _c] = [_w.capitalize(), _c]


def _split_chunk(chunk: str, out: list[str]) -> None:
    """Split one whitespace-free chunk into word and punctuation tokens (appended to `out`)."""
    sp = _SPECIAL.get(chunk)
    if sp is not None:
        out.extend(sp)
        return
    prefixes: list[str] = []
    suffixes: list[str] = []
    s = chunk
    while s:
        if s in _ABBREVIATIONS or s in _SPECIAL:
            break
        n = len(s)
        # prefix
        c = s[0]
        if (
            c in _PREFIX_CHARS
            or (c == "+" and not (len(s) > 1 and s[1].isdigit()))
            or (c > "\x7f" and unicodedata.category(c) == "So")
        ):
            prefixes.append(c)
            s = s[1:]
        elif c in ".…":
            m = _ELLIPSIS_PREFIX.match(s)
            if m:
                prefixes.append(m.group())
                s = s[m.end():]
        elif c in "UCA":
            m = _CURRENCY_PREFIX.match(s)
            if m and len(s) > m.end():
                prefixes.append(m.group())
                s = s[m.end():]
        if not s or s in _ABBREVIATIONS or s in _SPECIAL:
            break
        # suffix
        c = s[-1]
        if len(s) > 2 and s[-2:] in _EMOTICON_SUFFIX:
            suffixes.append(s[-2:])
            s = s[:-2]
        elif c in _SUFFIX_CHARS or (c > "\x7f" and unicodedata.category(c) == "So"):
            suffixes.append(c)
            s = s[:-1]
        elif c == ".":
            m = _ELLIPSIS_SUFFIX.search(s)
            if m and m.start() > 0:
                suffixes.append(m.group())
                s = s[: m.start()]
            elif len(s) > 1:
                p = s[-2]
                if p.islower() or p.isdigit() or p in _PUNCT_BEFORE_PERIOD or (p.isupper() and len(s) > 2 and s[-3].isupper()):
                    suffixes.append(".")
                    s = s[:-1]
        elif c in "sS" and len(s) > 2 and s[-2] in "'’":
            m = _CLITIC_SUFFIX.search(s)
            if m and m.start() > 0:
                suffixes.append(m.group())
                s = s[: m.start()]
        elif c == "+" and len(s) > 1 and s[-2].isdigit():
            suffixes.append("+")
            s = s[:-1]
        elif (c.isalpha() or c == "%") and len(s) > 1 and s[0].isdigit():
            m = _UNIT_SUFFIX.search(s)
            if m:
                suffixes.append(m.group())
                s = s[: m.start()]
        if len(s) == n:
            break
    out.extend(prefixes)
    if s:
        if s in _ABBREVIATIONS:
            out.append(s)
        elif s in _SPECIAL:
            out.extend(_SPECIAL[s])
        elif s.isalnum():
            out.append(s)
        else:
            m = _NEG.match(s) or _PRONOUN_CLITIC.match(s)
            if m:
                out.extend(m.groups())
            elif "." in s and _URL.match(s):
                out.append(s)
            else:
                start = 0
                for m in _INFIX.finditer(s):
                    a, b = m.span()
                    if a == 0:
                        continue
                    if a > start:
                        out.append(s[start:a])
                    out.append(s[a:b])
                    start = b
                if start < len(s):
                    out.append(s[start:])
    if suffixes:
        out.extend(reversed(suffixes))


# a word with at most one simple punctuation character on each side: the common case after plain words
_SIMPLE = re.compile(r"""([(\["`]?)([A-Za-z0-9]+)([.,;:!?)\]"']?)""")


# Chunks that needed the full rules, memoised (code and markup repeat the same chunks a lot).
_CHUNK_CACHE: dict[str, list[str]] = {}
_CHUNK_CACHE_SIZE = 100_000


def split_words(text: str) -> list[str]:
    """Words and punctuation tokens of `text`, whitespace dropped (see the module docstring)."""
    out: list[str] = []
    append = out.append
    simple = _SIMPLE.fullmatch
    cache_get = _CHUNK_CACHE.get
    for chunk in text.split():
        if chunk.isalnum():
            if not ((chunk[0].isdigit() and not chunk.isdigit()) or chunk in _SPECIAL):
                append(chunk)
                continue
        else:
            m = simple(chunk)
            if m is not None:
                pre, core, suf = m.groups()
                if core not in _SPECIAL and (core.isdigit() or not core[0].isdigit()) and chunk not in _SPECIAL:
                    if suf == ".":
                        if core + "." in _ABBREVIATIONS:
                            m = None
                        else:
                            last = core[-1]
                            if not (last.islower() or last.isdigit() or (len(core) > 1 and core[-2:].isupper())):
                                suf = ""
                                core = core + "."
                    if m is not None:
                        if pre:
                            append(pre)
                        append(core)
                        if suf:
                            append(suf)
                        continue
        toks = cache_get(chunk)
        if toks is None:
            toks = []
            _split_chunk(chunk, toks)
            if len(_CHUNK_CACHE) >= _CHUNK_CACHE_SIZE:
                _CHUNK_CACHE.clear()
            _CHUNK_CACHE[chunk] = toks
        out.extend(toks)
    return out


_WS_CHUNK = re.compile(r"(\s*)(\S+)")


def count_sentences(text: str, limit: int = 0) -> int:
    """Number of sentences in `text` (1 for any non-empty text); stops counting at `limit` if > 0.

    A sentence ends at a `.`/`!`/`?` token; the next one starts at the first following token
    that is not punctuation, or at extra whitespace (more than one space, a tab), which the
    reference tokenizer keeps as a token of its own."""
    n = 1
    seen_end = False
    for m in _WS_CHUNK.finditer(text):
        ws = m.group(1)
        if seen_end and ws and ws != " " and m.start() > 0:
            n += 1
            seen_end = False
            if limit and n >= limit:
                return n
        for tok in split_words(m.group(2)):
            if tok in SENTENCE_END:
                seen_end = True
            elif seen_end and not is_punct_token(tok):
                n += 1
                seen_end = False
                if limit and n >= limit:
                    return n
    return n


_CHUNK = re.compile(r"\S+")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` by the `count_sentences` rule (cut at the whitespace before a new sentence)."""
    out: list[str] = []
    start = 0
    seen_end = False
    for m in _CHUNK.finditer(text):
        toks: list[str] = []
        chunk = m.group()
        if chunk.isalnum() and chunk not in _SPECIAL:
            toks.append(chunk)
        else:
            _split_chunk(chunk, toks)
        for k, tok in enumerate(toks):
            if tok in SENTENCE_END:
                seen_end = True
            elif seen_end and not is_punct_token(tok):
                seen_end = False
                if k == 0 and m.start() > start:
                    out.append(text[start : m.start()].strip())
                    start = m.start()
    rest = text[start:].strip()
    if rest or not out:
        out.append(rest)
    return [s for s in out if s] or [text]


# --- per-chunk token statistics ------------------------------------------------------------
#
# `split_words` works chunk by chunk (whitespace-separated), so any sum over a document's
# tokens is a sum over its distinct chunks, each weighted by how often it occurs. The filters
# that need only counts (Gopher quality, FineWeb) count chunks with `Counter(text.split())`
# (C code), look each distinct chunk up in a table of its token statistics (memoised across
# documents; a new chunk is split once), and add the rows up with one numpy product: no word
# list, no per-word Python loop.

# columns of the chunk table
TOKENS, SYMBOLS, SYMBOL_CHARS, ALPHA, CHARS, SINGLE = range(6)
_TABLE_CAP = 200_000  # distinct chunks remembered; the table starts afresh when full
_table = np.zeros((1024, 6), dtype=np.int64)
_index: dict[str, int] = {}
_multi: dict[int, list[str]] = {}  # tokens of the chunks that are not a single token equal to themselves


def _add_chunks(chunks: list[str]) -> None:
    """Add new chunks to the table (each split once)."""
    global _table
    i0 = len(_index)
    need = i0 + len(chunks)
    if need > len(_table):
        _table = np.concatenate([_table, np.zeros((max(need, 2 * len(_table)) - len(_table), 6), dtype=np.int64)])
    rows = []
    for k, c in enumerate(chunks):
        if c.isalnum() and not ((c[0].isdigit() and not c.isdigit()) or c in _SPECIAL):  # one plain token (split_words' fast path)
            rows.append((1, 0, 0, not c.isnumeric(), len(c), 1))
            continue
        toks = split_words(c)
        n_sym = sym_chars = n_alpha = 0
        for w in toks:
            if w.isalnum():
                n_alpha += not w.isnumeric()
            elif not w.translate(_PUNCT_DELETE):
                n_sym += 1
                sym_chars += len(w)
            elif has_alpha(w):
                n_alpha += 1
        single = len(toks) == 1 and toks[0] == c
        rows.append((len(toks), n_sym, sym_chars, n_alpha, sum(map(len, toks)), single))
        if not single:
            _multi[i0 + k] = toks
    _table[i0:need] = rows
    _index.update(zip(chunks, range(i0, need)))


@dataclass
class TokenStats:
    """Sums over the tokens `split_words(text)` would give, without building that list."""

    tokens: int  # number of tokens
    symbols: int  # tokens made only of punctuation/symbols
    symbol_chars: int  # characters in those
    alpha: int  # tokens with at least one letter
    chars: int  # characters in all tokens
    chunks: Counter  # distinct whitespace-separated chunks -> occurrences
    rows: np.ndarray  # their rows in the chunk table, in the same order (valid until the next token_stats call)

    def has_tokens(self, wanted: frozenset[str], at_least: int) -> bool:
        """Whether at least `at_least` distinct tokens of `wanted` occur in the text."""
        if at_least <= 0:
            return True
        single = _table[self.rows, SINGLE]
        found = {w for w in wanted.intersection(self.chunks) if _table[_index[w], SINGLE]}
        if len(found) >= at_least:
            return True
        for r in self.rows[single == 0].tolist():
            found.update(wanted.intersection(_multi[r]))
            if len(found) >= at_least:
                return True
        return False


def token_stats(text: str) -> TokenStats:
    """Token count, symbol tokens, their characters, tokens with a letter and total token
    characters of `text`, exactly as `split_words(text)` and `word_stats` would give them."""
    counts = Counter(text.split())  # C loops from here on: counting, set difference, lookups
    if not counts:
        return TokenStats(0, 0, 0, 0, 0, counts, np.zeros(0, np.int64))
    if len(_index) + len(counts) > _TABLE_CAP:
        _index.clear()
        _multi.clear()
    new = set(counts).difference(_index)  # iterates the (small) counts, probes the dict
    if new:
        _add_chunks(list(new))
    n = len(counts)
    rows = np.fromiter(map(_index.__getitem__, counts), dtype=np.int64, count=n)
    tot = np.fromiter(counts.values(), dtype=np.int64, count=n) @ _table[rows, : CHARS + 1]
    return TokenStats(int(tot[TOKENS]), int(tot[SYMBOLS]), int(tot[SYMBOL_CHARS]), int(tot[ALPHA]), int(tot[CHARS]), counts, rows)


def count_tokens(text: str) -> int:
    """len(split_words(text)), without building the list."""
    return token_stats(text).tokens
