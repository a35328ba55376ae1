"""Shared helpers of the ML quality filters: word tokenization, reading labelled examples,
and a batched scoring filter.

Labelled examples come from files a user names on the command line:
- a corpus directory (`*.jsonl.zst` shards) or a run directory (its `corpus/`), or a
  directory of `.jsonl[.gz]` files such as `corpus/removed/`,
- `corpus/removed/*.jsonl` (what the pipeline's filters removed) or any `.jsonl[.gz|.zst]`
  with a `text` field,
- `.txt` files (the whole file is one example).
Unreadable lines are counted, logged once with their location, and skipped.
"""

from __future__ import annotations

import abc

import glob
import gzip
import io
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

from lmforge.data.document import Document
from lmforge.data.step import Filter
from lmforge.errors import InputError
from lmforge.log import log_once, logger

_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]", re.UNICODE)


def words(text: str, lower: bool = True) -> list[str]:
    """Word and punctuation tokens (Unicode-aware; no tokenizer model needed)."""
    return _WORD.findall(text.lower() if lower else text)


def one_line(text: str, max_chars: int = 0) -> str:
    """Text as one lowercased line of space-separated tokens (fastText's input format)."""
    if max_chars:
        text = text[:max_chars]
    return " ".join(words(text))


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    if name.endswith(".zst"):
        import zstandard

        raw = open(path, "rb")
        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def expand_inputs(specs: Iterable[str | Path]) -> list[Path]:
    """Files behind a list of paths: a run dir -> its corpus shards; a corpus dir -> its shards;
    a file -> itself. Glob patterns are expanded. Raises InputError naming a path that matches nothing."""
    out: list[Path] = []
    for spec in specs:
        p = Path(spec).expanduser()
        if any(ch in str(spec) for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
            if not matches:
                raise InputError(f"no files match {spec}")
            out.extend(m for m in matches if m.is_file())
            continue
        if p.is_dir():
            d = p / "corpus" if (p / "corpus").is_dir() else p
            shards = sorted(d.glob("*.jsonl.zst")) or sorted(x for pat in ("*.jsonl", "*.jsonl.gz") for x in d.glob(pat))
            if not shards:
                raise InputError(f"{spec}: directory has no corpus shards (*.jsonl.zst) or *.jsonl files")
            out.extend(shards)
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"input not found: {spec}")
    return out


def iter_texts(paths: Iterable[Path], stats: dict | None = None) -> Iterator[str]:
    """Texts of every record in `paths` (see module docstring); corrupt lines are counted and skipped."""
    stats = stats if stats is not None else {}
    for p in paths:
        if p.suffix == ".txt":
            yield p.read_text(encoding="utf-8", errors="replace")
            continue
        try:
            with _open_text(p) as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        text = rec["text"] if isinstance(rec, dict) else None
                        if not isinstance(text, str):
                            raise ValueError("no 'text' string")
                    except (ValueError, KeyError, TypeError) as e:
                        stats["corrupt"] = stats.get("corrupt", 0) + 1
                        log_once(f"corrupt:{p}", f"{p}:{lineno}: skipping unreadable record ({e}); further ones in this file are counted silently")
                        continue
                    yield text
        except (OSError, EOFError) as e:
            stats["corrupt"] = stats.get("corrupt", 0) + 1
            logger.warning("%s: stopped reading: %s", p, e)


class ScoreFilter(Filter, abc.ABC):
    """A filter that scores documents in batches (`score_batch`) and drops those whose
    score fails `passes`. The score is written to `metadata[self.key]` for every document."""

    key = "score"
    reason = "low_score"
    batch_size = 64

    @abc.abstractmethod
    def score_batch(self, docs: list[Document]) -> list[float]:
        """One score per document of the batch."""

    @abc.abstractmethod
    def passes(self, score: float, doc: Document) -> bool:
        """Whether a document with this score is kept."""

    def decide(self, doc: Document) -> str | None:
        return None if self.passes(doc.metadata[self.key], doc) else self.reason

    def process(self, docs: Iterable[Document]) -> Iterator[Document]:
        batch: list[Document] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) >= self.batch_size:
                yield from self._flush(batch)
                batch = []
        if batch:
            yield from self._flush(batch)

    def _flush(self, batch: list[Document]) -> Iterator[Document]:
        for doc, s in zip(batch, self.score_batch(batch)):
            doc.metadata[self.key] = round(float(s), 5)
        yield from Filter.process(self, batch)
