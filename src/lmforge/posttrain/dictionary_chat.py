"""The default chat set, built from GCIDE dictionary entries (the bundled sample or the full file).

Each usable entry gives a headword, a clean first definition (pronunciation, etymology, sense
numbers, field labels and cross-reference markup stripped to one readable clause) and, when the
entry has one that uses the word, a usage example (a "; as, ..." phrase or a quotation with its
author). Conversations:

* define:  "What does X mean?" (a few phrasings) -> the definition;
* reverse: "Which word means ...?" -> the headword (only when the definition does not give the
  word away);
* example: define, then "Use it in a sentence." -> the dictionary's own example (only when the
  entry has one, so the answer is true);
* multi:   one direction for one word, then the other direction for another word;
* a system prompt on some.

Every conversation is `{"messages": [...], "meta": {"kind", "word", "reference"}}` (`reference` is
the last assistant answer, for the chat eval) — the same records `chat_data.read_chat_jsonl`
reads. The held-out split is by headword (a fixed hash, the same for every seed), so no held-out
word appears in training.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import xxhash

from lmforge.data.gcide import TAG_LINE as _TAG_LINE
from lmforge.data.gcide import strip_brackets as _strip_brackets
from lmforge.errors import InputError

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful dictionary assistant. Answer briefly.",
    "You answer questions about English words.",
)
DEFINE = ("What does {w} mean?", "What is the meaning of \"{w}\"?", "Define {w}.", "What does the word {w} mean?")
REVERSE = ("Which word means {d}?", "What is the word for {d}?", "Give me a word that means {d}.")
EXAMPLE = ("Use it in a sentence.", "Can you show me how it is used?")

_HEADWORD = re.compile(r"^[A-Za-z][A-Za-z'\- ]{1,30}$")
_POS = re.compile(r"^,?\s*(?:(?:n|v|a|adv|prep|conj|interj|pron|p|pr|imp|t|i|sing|pl|vb|superl|compar|adj)\.[\s,;&]*)+")


@dataclass(frozen=True)
class Entry:
    word: str  # as it should appear in an answer
    definition: str  # one clause, capitalized, ending with "."
    example: str | None  # an answer quoting the dictionary's own usage example, or None


def _clean(s: str) -> str:
    s = re.sub(r"\{([^}]*)\}", r"\1", s)
    return " ".join(s.split())


def _first_clause(body: str) -> str:
    """The definition up to its first "; ", " -- " or sentence end."""
    body = re.split(r"\s--|;\s|\.\s+(?=[A-Z])", body, maxsplit=1)[0]
    return body.strip().rstrip(".,:; ")


def _uses_word(text: str, word: str) -> bool:
    stem = word.lower()[: max(4, len(word) - 2)]
    return re.search(r"\b" + re.escape(stem), text.lower()) is not None


def parse_entry(text: str, word: str) -> Entry | None:
    """A usable `Entry` from one GCIDE record, or None (not the headword's own entry, a mere
    cross-reference, markup left over, a definition too short or too long)."""
    header_word = text.split("\\", 1)[0].strip()
    if not _HEADWORD.match(header_word) or header_word.lower() != word.strip().lower():
        return None
    parts = _TAG_LINE.split(text, maxsplit=2)
    block = parts[0].split("\n\n", 1)[0]
    m = re.match(r"^[^\\]*\\[^\\]*\\\s*(\([^)]*\))?", block)  # headword \pron\ (pron)
    if not m:
        return None
    rest = _clean(_strip_brackets(block[m.end():]))
    rest = _POS.sub("", rest)
    rest = re.sub(r"^(?:\([^)]*\)\s*)+", "", rest)  # (Zool.) field labels
    rest = re.sub(r"^(?:1\.|\(a\))\s*", "", rest)  # first sense number
    rest = re.sub(r"^(?:\([^)]*\)\s*)+", "", rest)
    raw = rest
    d = _first_clause(rest)
    if not 12 <= len(d) <= 160 or not d[0].isalpha() or re.search(r"[\\\[\]{}\"`?*|]", d):
        return None
    if re.match(r"(?i)^(see|same as|of|pl\.|imp\.|p\. p\.)\b", d) or re.search(r"\b(?:a|v|n)\.\s", d + " "):
        return None
    if re.search(r"\b(?:St|Mr|Mrs|Dr|Mt|Co|esp|etc|viz|i\.e|e\.g)$", d):  # cut after an abbreviation
        return None
    if re.search(r"\d\.|\.\s", d):  # leftovers of a plural form or a sense number ("Moralities. 1")
        return None
    definition = d[0].upper() + d[1:] + "."
    w = header_word.lower() if header_word[1:] == header_word[1:].lower() else header_word
    return Entry(w, definition, _example(raw, parts[1] if len(parts) > 1 else "", w))


def _example(definition_text: str, after_tag: str, word: str) -> str | None:
    """An answer quoting a usage example of `word` from the entry itself, or None."""
    m = re.search(r";\s*as,\s*([^;]+?)(?:;|\.\s|\.$|$)", definition_text)
    if m:
        ex = m.group(1).strip().rstrip(".")
        if 12 <= len(ex) <= 140 and _uses_word(ex, word) and not re.search(r"[\\\[\]{}\"`|]", ex):
            return f"The dictionary gives this example: \"{ex}.\""
    # a quotation right after the first definition: indented lines ending with --Author.
    q = re.match(r"^\s*\n((?:\s{6,}\S.*\n?)+)", after_tag)
    if q:
        quote = _clean(q.group(1))
        qm = re.match(r"^(.{12,200}?)\s+--\s*([A-Z][A-Za-z. ]{1,30}?)\.?$", quote)
        if qm and _uses_word(qm.group(1), word) and not re.search(r"[\\\[\]{}`|]", qm.group(1)):
            return f"Here is how {qm.group(2).strip()} used it: \"{qm.group(1).strip()}\""
    return None


def read_entries(paths: Iterable[str | Path]) -> list[Entry]:
    """Usable entries of GCIDE JSONL files (fields `word`, `text`), one per headword (the first)."""
    from lmforge.posttrain.chat_data import _open_text

    out, seen = [], set()
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise InputError(f"dictionary file not found: {p}")
        with _open_text(p) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(r, dict) or not isinstance(r.get("text"), str) or not isinstance(r.get("word"), str):
                    continue
                e = parse_entry(r["text"], r["word"])
                if e is not None and e.word.lower() not in seen:
                    seen.add(e.word.lower())
                    out.append(e)
    return out


def is_heldout_word(word: str, holdout: float) -> bool:
    """The fixed split: a headword is held out when its hash falls in the last `holdout` share."""
    return xxhash.xxh64_intdigest(word.lower().encode("utf-8")) % 10_000 < round(holdout * 10_000)


def _phrase_def(d: str) -> str:
    """A definition as part of a question: no final period, lower-case start (unless an acronym)."""
    first = d.split()[0]
    d = d.rstrip(".")
    return d if len(first) > 1 and first.isupper() else d[0].lower() + d[1:]


def _leaks(e: Entry) -> bool:
    """Whether the definition gives the word away (its stem appears anywhere in it)."""
    return e.word.lower()[: max(4, len(e.word) - 2)] in e.definition.lower()


def _conversation(rng: random.Random, e: Entry, partner: Entry | None) -> dict:
    """One conversation about `e` (and `partner`, the word of a multi-turn second question)."""
    kinds = ["define", "define"] + (["reverse", "reverse"] if not _leaks(e) else [])
    if e.example:
        kinds.append("example")
    if partner is not None:
        kinds.append("multi")
    kind = rng.choice(kinds)
    define = lambda x: rng.choice(DEFINE).format(w=x.word)  # noqa: E731
    reverse = lambda x: rng.choice(REVERSE).format(d=_phrase_def(x.definition))  # noqa: E731
    if kind == "define":
        msgs = [("user", define(e)), ("assistant", e.definition)]
    elif kind == "reverse":
        msgs = [("user", reverse(e)), ("assistant", e.word)]
    elif kind == "example":
        msgs = [("user", define(e)), ("assistant", e.definition), ("user", rng.choice(EXAMPLE)), ("assistant", e.example)]
    else:
        if not _leaks(partner):
            msgs = [("user", define(e)), ("assistant", e.definition),
                    ("user", "And " + reverse(partner)[0].lower() + reverse(partner)[1:]), ("assistant", partner.word)]
        else:
            msgs = [("user", define(e)), ("assistant", e.definition), ("user", define(partner)),
                    ("assistant", partner.definition)]
    if rng.random() < 0.3:
        msgs = [("system", rng.choice(SYSTEM_PROMPTS))] + msgs
    words = [e.word] + ([partner.word] if kind == "multi" else [])
    return {"messages": [{"role": r, "content": c} for r, c in msgs],
            "meta": {"kind": kind, "word": words[-1], "words": words, "reference": msgs[-1][1]}}


def build_default_chat_set(dictionary_paths: Iterable[str | Path], seed: int = 0, n: int = 2000,
                           holdout: float = 0.1) -> tuple[list[dict], list[dict]]:
    """(train, held-out) conversations about dictionary words, about `n` in all (fewer when the
    files hold fewer usable entries); each held-out word is absent from the training set."""
    if not 0.0 <= holdout < 1.0:
        raise InputError(f"holdout = {holdout} must be in [0, 1)")
    entries = read_entries(dictionary_paths)
    if not entries:
        raise InputError("no usable dictionary entries in " + ", ".join(map(str, dictionary_paths)))
    rng = random.Random(seed)
    rng.shuffle(entries)
    splits: dict[bool, list[Entry]] = {False: [], True: []}
    for e in entries:
        splits[is_heldout_word(e.word, holdout)].append(e)
    out: dict[bool, list[dict]] = {False: [], True: []}
    for held, pool in splits.items():
        want = round(n * holdout) if held else n - round(n * holdout)
        i = 0
        while i < len(pool) and len(out[held]) < want:
            partner = pool[i + 1] if i + 1 < len(pool) else None
            conv = _conversation(rng, pool[i], partner)
            out[held].append(conv)
            i += 2 if conv["meta"]["kind"] == "multi" else 1
    return out[False], out[True]


__all__ = ["Entry", "parse_entry", "read_entries", "is_heldout_word", "build_default_chat_set", "SYSTEM_PROMPTS"]
