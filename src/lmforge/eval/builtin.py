"""Built-in tasks made from real text: held-out perplexity / bits per byte per source, a
dictionary multiple-choice task (pick a word's definition among four, from GCIDE entries),
a multiple-choice cloze (pick a sentence's last word among four) and a generative cloze
(greedy next word, exact match).

Documents come from a corpus directory (`*.jsonl.zst` shards of the data stage) or from
JSONL files (`.jsonl`, `.jsonl.gz`, `.jsonl.zst`) whose records have `text` and a source
(`metadata.source`, `source`, or the file name). Held-out documents are those whose id hashes
into the last `heldout_per_mille` buckets of 1000 — the same rule for every model, so scores
compare across checkpoints and runs.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import xxhash

from lmforge.data.gcide import TAG_LINE as _TAG_LINE
from lmforge.data.gcide import strip_brackets as _strip_brackets
from lmforge.errors import InputError
from lmforge.rundir import read_json
from lmforge.eval.tasks import GenExample, MCExample, Task, TaskSpec, make_task, read_records

PACKAGE_SAMPLE = Path(__file__).resolve().parents[1] / "sample"
BUILTIN = ("perplexity", "dictionary", "cloze", "cloze_gen")


@dataclass
class Doc:
    id: str
    text: str
    source: str
    ids: list[int] | None = None  # already tokenized (tokens/val documents, starting with BOS)


def default_doc_paths() -> list[Path]:
    """The bundled sample's JSONL inputs (dictionary, manual pages, fortunes)."""
    return sorted(p for p in PACKAGE_SAMPLE.rglob("*.jsonl*") if p.is_file())


def default_dictionary_path() -> Path:
    return PACKAGE_SAMPLE / "dictionary" / "gcide-sample.jsonl.gz"


def iter_docs(paths: list[Path]) -> Iterator[Doc]:
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("*.jsonl.zst")) if p.is_dir() else [p]
        if p.is_dir() and not files:
            raise InputError(f"{p}: no *.jsonl.zst corpus shards")
        for f in files:
            fallback = f.name.split(".")[0].split("-")[0]
            for i, r in read_records(f):
                if not isinstance(r, dict) or not isinstance(r.get("text"), str):
                    continue
                meta = r.get("metadata") if isinstance(r.get("metadata"), dict) else {}
                src = meta.get("source") or r.get("source") or fallback
                yield Doc(str(r.get("id", f"{f.name}:{i}")), r["text"], str(src))


def is_heldout(doc_id: str, per_mille: int) -> bool:
    return xxhash.xxh64_intdigest(doc_id.encode()) % 1000 >= 1000 - per_mille


def heldout_docs(paths: list[Path], per_mille: int = 50, per_source: int = 20, seed: int = 0) -> dict[str, list[Doc]]:
    """Up to `per_source` held-out documents per source (deterministic)."""
    by: dict[str, list[Doc]] = {}
    for d in iter_docs(paths):
        if d.text.strip() and is_heldout(d.id, per_mille):
            by.setdefault(d.source, []).append(d)
    rng = random.Random(seed)
    out = {}
    for s, docs in sorted(by.items()):
        docs.sort(key=lambda d: d.id)
        rng.shuffle(docs)
        out[s] = docs[:per_source]
    if not out:
        raise InputError(f"no held-out documents found in {', '.join(map(str, paths))}")
    return out


def val_token_docs(tokens_dir: Path, tok, max_docs: int = 50) -> list[Doc]:
    """The first `max_docs` documents of the tokenizer stage's validation shards (tokens/val),
    split at BOS; their text is the decoded tokens (for bits per byte)."""
    import numpy as np

    index = read_json(Path(tokens_dir) / "index.json")
    if not index or not index.get("val"):
        return []
    bos = int(index.get("bos_id", tok.bos_id))
    docs: list[Doc] = []
    for shard in index["val"]:
        arr = np.memmap(Path(tokens_dir) / shard["path"], dtype=index.get("dtype", "uint16"), mode="r")
        starts = np.flatnonzero(arr == bos).tolist() + [len(arr)]
        for a, b in zip(starts[:-1], starts[1:]):
            ids = arr[a:b].astype(np.int64).tolist()
            if len(ids) > 1:
                docs.append(Doc(f"{shard['path']}:{a}", tok.decode(ids), "val", ids))
            if len(docs) >= max_docs:
                return docs
    return docs


# ---- dictionary -----------------------------------------------------------------------------



def gcide_definition(text: str, max_chars: int = 120) -> str:
    """The first definition of a GCIDE entry as plain text ('' when there is none)."""
    first = _TAG_LINE.split(text, maxsplit=1)[0]
    # bracket groups (etymology, inflections, usage labels) may span lines: drop them first,
    # then the first line is the header (headword, pronunciation, part of speech)
    first = _strip_brackets(first.split("\n\n", 1)[0])
    if "\n" not in first:
        return ""
    body = first.split("\n", 1)[1]
    body = re.sub(r"\{([^}]*)\}", r"\1", body)
    body = re.sub(r"\s+--\S.*$", "", body, flags=re.S)
    # a header that wrapped onto the next line ("Nem`a*tel*min"thes, prop. n. pl. (Zool.) ...")
    body = re.sub(r"^\s*\S*?,?\s*prop\. n\.( pl\.)?\s*(\([^)]*\))?", "", body)
    body = re.sub(r"^\s*\d+\.\s*", "", body)
    body = " ".join(body.split()).replace("\\", "")
    if len(body) > max_chars:
        cut = body[:max_chars]
        body = cut[: cut.rfind(" ")] if " " in cut else cut
        body = body.rstrip(",;:") + " ..."
    return body


def dictionary_task(path: Path | None = None, n: int = 200, seed: int = 0, n_choices: int = 4) -> Task:
    """Pick the right definition of a word among `n_choices` (distractors: other entries' definitions).

    Entries are visited in a seeded random order and parsed only until enough usable ones are
    found (n questions + a distractor pool), so the full 200k-entry GCIDE costs one read."""
    path = Path(path) if path else default_dictionary_path()
    raw = [(str(r.get("word", "")).strip(), r.get("text")) for _, r in read_records(path) if isinstance(r, dict)]
    rng = random.Random(seed)
    order = list(range(len(raw)))
    rng.shuffle(order)
    want = n + max(3 * n, 200)
    entries, seen = [], set()
    for i in order:
        word, text = raw[i]
        if not word or not isinstance(text, str):
            continue
        d = gcide_definition(text)
        if len(d) < 15 or d.lower().startswith("see ") or word.lower() in d.lower() or d in seen:
            continue
        seen.add(d)
        entries.append((word, d))
        if len(entries) >= want:
            break
    if len(entries) < n_choices + 1:
        raise InputError(f"{path}: too few usable dictionary entries ({len(entries)})")
    examples = []
    for i in range(min(n, len(entries) - n_choices)):
        word, d = entries[i]
        others = [entries[j][1] for j in rng.sample(range(len(entries)), n_choices + 2) if j != i][: n_choices - 1]
        choices = others + [d]
        rng.shuffle(choices)
        examples.append(MCExample(f'The word "{word}" means:', choices, [choices.index(d)], id=word))
    spec = TaskSpec(name="dictionary", data=str(path), metrics=["acc", "acc_norm", "acc_tok", "acc_pmi"])
    spec.validate()
    return make_task(spec, examples)


# ---- cloze ----------------------------------------------------------------------------------

_SENT = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"^[A-Za-z]{3,}$")


def _cloze_items(docs: list[Doc], n: int, seed: int, min_words: int = 8, context_chars: int = 300):
    """(context, last word, source) from sentences of at least `min_words` words whose last
    word is alphabetic; context = preceding text (up to `context_chars`) + the sentence minus
    its last word."""
    rng = random.Random(seed)
    items, vocab = [], []
    for d in docs:
        text = " ".join(d.text.split())
        start = 0
        for sent in _SENT.split(text):
            pos = text.find(sent, start)
            start = pos + len(sent)
            words = sent.split()
            if len(words) < min_words:
                continue
            last = words[-1].rstrip(".!?\"')")
            if not _WORD.match(last):
                continue
            vocab.append(last.lower())
            before = text[max(0, pos - context_chars) : pos]
            ctx = (before + " " + " ".join(words[:-1])).strip()
            items.append((ctx, last, d.source))
    if len(items) < 10:
        raise InputError("too few sentences for a cloze task in the given documents")
    rng.shuffle(items)
    return items[:n], sorted(set(vocab))


def cloze_task(docs: list[Doc], n: int = 200, seed: int = 0, n_choices: int = 4) -> Task:
    """Multiple-choice cloze: the sentence's real last word among words drawn from the same documents."""
    items, vocab = _cloze_items(docs, n, seed)
    rng = random.Random(seed + 1)
    examples = []
    for ctx, last, src in items:
        pool = [w for w in rng.sample(vocab, min(len(vocab), n_choices * 3)) if w != last.lower()]
        choices = pool[: n_choices - 1] + [last]
        rng.shuffle(choices)
        examples.append(MCExample(ctx, choices, [choices.index(last)], id=src))
    spec = TaskSpec(name="cloze", data="(held-out documents)", metrics=["acc", "acc_norm", "acc_tok", "acc_pmi"])
    spec.validate()
    return make_task(spec, examples)


def cloze_gen_task(docs: list[Doc], n: int = 100, seed: int = 0) -> Task:
    """Generative cloze: greedy-decode the sentence's last word (exact match / F1)."""
    items, _ = _cloze_items(docs, n, seed + 7)
    examples = [GenExample(ctx, [last], stop=[" ", "\n", ".", ","], id=src) for ctx, last, src in items]
    spec = TaskSpec(name="cloze_gen", type="generative", data="(held-out documents)", max_new_tokens=8)
    spec.validate()
    return make_task(spec, examples)
