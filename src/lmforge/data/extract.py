"""HTML -> main text: the `extract` pipeline step.

Documents whose `metadata["format"] == "html"` (raw HTML in `text`, as the WARC reader
yields them) get their main text extracted with trafilatura: navigation, sidebars, footers,
cookie banners and other boilerplate are left out; headings, paragraphs, lists, tables and
code blocks are kept. The text replaces the HTML and `format` becomes "text". Other
documents pass through untouched.

Speed choices (measured in docs/extract-langid.md):
- trafilatura runs in this process with its fallback extractors off (`fast = true`): on the
  Python documentation crawl that halves the time for a word-level F1 of 0.985 (mean) against
  trafilatura's default output;
- inline `<span>` tags are unwrapped before extraction (`flatten_spans`): syntax-highlighted
  code is thousands of spans, and trafilatura unwraps them itself later anyway, after
  running its boilerplate XPath expressions over every one of them;
- the per-document time limit is an interval timer (SIGPROF/SIGALRM) in the main thread,
  or a watchdog thread that raises in the extracting thread elsewhere: microseconds per
  page, where a sandbox process costs a pipe round trip per page and a restart per timeout.
  It counts CPU time by default (`timeout_clock = "cpu"`), so a loaded machine does not
  turn slow pages into dropped pages.

A page that yields no text is dropped ("no_text"), one that runs past `timeout_s` is dropped
("timeout"), one larger than `max_html_chars` is dropped unparsed ("too_large"), one the
parser fails on is dropped ("error", logged once with its id).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Literal

from lmforge.data.document import Document
from lmforge.data.step import Step
from lmforge.log import log_once, logger


@dataclass
class ExtractConfig:
    enabled: bool = True
    timeout_s: float = 1.0  # per-document limit; 0 = none
    timeout_clock: Literal["cpu", "wall"] = "cpu"  # CPU time of the extracting thread, or wall-clock time
    fast: bool = True  # skip trafilatura's fallback extractors (readability, jusText)
    favor: Literal["balanced", "precision", "recall"] = "balanced"  # trafilatura's precision/recall bias
    include_tables: bool = True
    flatten_spans: bool = True  # unwrap <span> tags before extraction (faster, same text)
    max_html_chars: int = 20_000_000  # larger pages are dropped without parsing ("too_large")

    def validate(self) -> None:
        if self.timeout_s < 0:
            raise ValueError(f"extract.timeout_s must be >= 0 (0 = no limit), got {self.timeout_s}")
        if self.max_html_chars <= 0:
            raise ValueError(f"extract.max_html_chars must be > 0, got {self.max_html_chars}")


# --------------------------------------------------------------------------------------------
# per-document time limit


class ExtractionTimeout(BaseException):
    """Raised inside the extracting code when its time is up. A BaseException, so that the
    extractor's own `except Exception` blocks cannot swallow it."""


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")


@contextlib.contextmanager
def time_limit(seconds: float, clock: str = "cpu") -> Iterator[None]:
    """Raise ExtractionTimeout in the calling thread once the block has used `seconds` of
    CPU time (clock="cpu") or of wall-clock time (clock="wall").

    CPU time is the default: a page's budget then does not shrink when other processes load
    the machine, so which pages time out depends on the page, not on the neighbours.

    Main thread: an interval timer (ITIMER_PROF for CPU time, ITIMER_REAL for wall time) and
    its signal. Other threads: a watchdog thread that watches the thread's CPU clock (or the
    wall clock) and sets an asynchronous exception on it. Both fire only between Python
    bytecodes, so a single long C call (one lxml parse) finishes first.
    """
    if seconds <= 0:
        yield
        return
    if clock not in ("cpu", "wall"):
        raise ValueError(f"clock must be 'cpu' or 'wall', got {clock!r}")
    if _on_main_thread():
        which, signum = (signal.ITIMER_PROF, signal.SIGPROF) if clock == "cpu" else (signal.ITIMER_REAL, signal.SIGALRM)
        armed = True

        def _handler(signum: int, frame: Any) -> None:
            if armed:
                raise ExtractionTimeout()

        old = signal.signal(signum, _handler)
        signal.setitimer(which, seconds)
        try:
            yield
        finally:
            armed = False
            signal.setitimer(which, 0)
            signal.signal(signum, old)
        return

    tid = threading.get_ident()
    lock = threading.Lock()
    done = threading.Event()
    state = {"armed": True, "fired": False}
    if clock == "cpu":
        clk = time.pthread_getcpuclockid(tid)
        now = lambda: time.clock_gettime(clk)  # noqa: E731
    else:
        now = time.monotonic
    t0 = now()

    def _watch() -> None:
        while not done.is_set():
            left = seconds - (now() - t0)
            if left <= 0:
                with lock:
                    if state["armed"]:
                        state["fired"] = True
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(ExtractionTimeout))
                return
            done.wait(min(left, 0.05) if clock == "cpu" else left)

    watcher = threading.Thread(target=_watch, name="lmforge-extract-timeout", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        with lock:
            state["armed"] = False
            if state["fired"]:  # clear an exception that was set but not yet delivered
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)
        done.set()


# --------------------------------------------------------------------------------------------
# extraction


_quiet = False


def _quiet_trafilatura() -> None:
    """trafilatura logs every empty or odd page at ERROR level; the step counts them instead."""
    global _quiet
    if not _quiet:
        for name in ("trafilatura", "htmldate", "courlan"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        _quiet = True


def extract_text(html: str | bytes, cfg: ExtractConfig | None = None) -> str:
    """The main text of one HTML page ("" when there is none). No time limit: see `time_limit`."""
    import trafilatura
    from lxml import etree

    cfg = cfg or ExtractConfig()
    _quiet_trafilatura()
    if not html:
        return ""
    tree = trafilatura.load_html(html)
    if tree is None:
        return ""
    if cfg.flatten_spans:
        etree.strip_tags(tree, "span")
    text = trafilatura.extract(
        tree,
        fast=cfg.fast,
        favor_precision=cfg.favor == "precision",
        favor_recall=cfg.favor == "recall",
        include_comments=False,
        include_tables=cfg.include_tables,
        deduplicate=False,  # trafilatura's dedup cache spans documents: output would depend on order
    )
    return (text or "").strip()


class ExtractStep(Step):
    """HTML documents -> main text; other documents pass through untouched."""

    name = "extract"

    def __init__(self, cfg: ExtractConfig | None = None, sample_removed: int = 20):
        super().__init__(sample_removed)
        self.cfg = cfg or ExtractConfig()

    def process(self, docs: Iterable[Document]) -> Iterator[Document]:
        cfg = self.cfg
        st = self.stats
        for doc in docs:
            if doc.metadata.get("format") != "html":
                st.counters["passed_through"] += 1
                yield doc
                continue
            if len(doc.text) > cfg.max_html_chars:
                self.drop(doc, "too_large")
                continue
            t0 = time.perf_counter()
            try:
                with time_limit(cfg.timeout_s, cfg.timeout_clock):
                    text = extract_text(doc.text, cfg)
            except ExtractionTimeout:
                self.drop(doc, "timeout")
                log_once(
                    "extract:timeout",
                    f"extract: {doc.id} ({doc.metadata.get('url', '')}) ran past timeout_s={cfg.timeout_s}s and was dropped; "
                    "further timeouts are only counted (stats.json: extract.dropped.timeout)",
                )
                continue
            except (ValueError, TypeError, LookupError, RecursionError, MemoryError) as e:
                self.drop(doc, "error")
                log_once("extract:error", f"extract: {doc.id}: extraction failed ({type(e).__name__}: {e}); dropped, further failures only counted")
                continue
            finally:
                st.counters["html_pages"] += 1
            if time.perf_counter() - t0 > 0.5 * cfg.timeout_s > 0:
                st.counters["slow_pages"] += 1
            if not text:
                self.drop(doc, "no_text")
                continue
            st.counters["html_chars_in"] += len(doc.text)
            doc.text = text
            doc.metadata["format"] = "text"
            yield doc


# --------------------------------------------------------------------------------------------
# CLI: `lmforge data extract FILE` (registered by lmforge.data.commands)


def register(sub: Any) -> None:
    p = sub.add_parser("extract", help="extract the main text of the HTML pages in a WARC (or JSONL) file")
    p.add_argument("input", help="WARC (.warc, .warc.gz) or JSONL file of documents")
    p.add_argument("-o", "--out", help="write the extracted documents here (.jsonl.zst, or .jsonl for plain text)")
    p.add_argument("--limit", type=int, default=0, help="only the first N documents")
    p.add_argument("--timeout", type=float, default=ExtractConfig.timeout_s, help="per-page time limit in seconds (0 = none)")
    p.add_argument("--show", type=int, default=1, help="print the first N extracted texts (default 1)")
    p.set_defaults(func=_cmd_extract)


def _iter_input(path: str, limit: int) -> Iterator[Document]:
    import itertools
    from pathlib import Path

    from lmforge.data.readers import InputSpec, ReadStats, expand_inputs, read_file
    from lmforge.errors import InputError

    if not Path(path).exists():
        raise InputError(f"input file not found: {path}")
    files = expand_inputs([InputSpec(path=path, source="cli")], lambda p: Path(p))
    it = itertools.chain.from_iterable(read_file(f, ReadStats()) for f in files)
    return itertools.islice(it, limit) if limit else it


def _cmd_extract(args: Any) -> int:
    import json

    from lmforge.config import build
    from lmforge.data.corpus_io import write_shard
    from lmforge.log import progress
    from lmforge.rundir import atomic_write_text

    cfg = build(ExtractConfig, {"timeout_s": args.timeout}, "extract")
    step = ExtractStep(cfg, sample_removed=0)
    out = list(step(progress(_iter_input(args.input, args.limit), desc="extract", unit="doc")))
    for d in out[: max(0, args.show)]:
        print(f"=== {d.id} {d.metadata.get('url', '')}\n{d.text[:2000]}\n")
    if args.out:
        if args.out.endswith(".zst"):
            write_shard(args.out, out)
        else:
            atomic_write_text(args.out, "".join(d.to_json() + "\n" for d in out))
        logger.info("wrote %d documents to %s", len(out), args.out)
    print(json.dumps(step.stats.to_dict(), indent=1))
    return 0
