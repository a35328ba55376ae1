"""Logging helpers: one logger for the package, progress (a bar on a terminal, plain lines in a
file or CI log), and log-once for noisy warnings."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, TypeVar

T = TypeVar("T")

logger = logging.getLogger("lmforge")
if not logger.handlers:
    _h = logging.StreamHandler(sys.stderr)
    _h.setFormatter(logging.Formatter("%(asctime)s lmforge %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(_h)
    logger.setLevel(os.environ.get("LMFORGE_LOG", "INFO").upper())
    logger.propagate = False

_seen: set[str] = set()


def log_once(key: str, msg: str, level: int = logging.WARNING) -> None:
    """Log `msg` the first time `key` is seen in this process."""
    if key not in _seen:
        _seen.add(key)
        logger.log(level, msg)


def progress_enabled() -> bool:
    return os.environ.get("LMFORGE_PROGRESS", "1") not in ("0", "false", "no")


LINE_INTERVAL_S = 5.0  # seconds between two progress lines when the output is not a terminal


def progress(it: Iterable[T] | None, desc: str = "", total: int | None = None, unit: str = "it", **kw) -> Iterable[T]:
    """Progress of a long job, on stderr (or `file=`); off with LMFORGE_PROGRESS=0.

    On a terminal (or in a notebook) a tqdm bar. Written to a file or a CI log, a bar would
    fill it with carriage-return frames, so there it is `LineProgress`: one plain line every
    `LINE_INTERVAL_S` seconds and one when the job ends. Both take the same arguments and
    offer what callers use: iteration, `update(n)`, `set_postfix(...)`, `close()`."""
    stream = kw.get("file") or sys.stderr
    if progress_enabled() and not _interactive(stream):
        return LineProgress(it, desc=desc, total=total, unit=unit, **kw)
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, unit=unit, disable=not progress_enabled(), dynamic_ncols=True, leave=False, **kw)


def _interactive(stream) -> bool:
    if "ipykernel" in sys.modules:  # a notebook: tqdm.auto draws a widget, no carriage returns
        return True
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class LineProgress:
    """Progress as plain log lines (`pretrain: 120/300 step (40%) 3.1 step/s loss=3.210`): at
    most one every `interval` seconds while the job runs and a final one when it ends (the
    iterable is exhausted or `close()` is called). A tqdm stand-in for non-terminal output."""

    def __init__(self, iterable: Iterable[T] | None = None, desc: str = "", total: int | None = None, unit: str = "it",
                 initial: int = 0, file=None, interval: float | None = None, **_ignored):
        self.iterable = iterable
        self.desc = desc
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total = total
        self.unit = unit
        self.n = self.initial = initial
        self.file = file
        self.interval = LINE_INTERVAL_S if interval is None else interval
        self.postfix = ""
        self.closed = False
        self._t0 = self._last = time.monotonic()

    def __iter__(self):
        if self.iterable is None:
            raise TypeError("LineProgress: nothing to iterate (it was created without an iterable)")
        try:
            for x in self.iterable:
                yield x
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return self.total or 0

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._write(self._line(now))

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kw) -> None:
        items = dict(ordered_dict or {}, **kw)
        self.postfix = " ".join(f"{k}={_fmt(v)}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        pass

    def write(self, s: str) -> None:
        self._write(s)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        now = time.monotonic()
        self._write(self._line(now, final=True))

    def _line(self, now: float, final: bool = False) -> str:
        elapsed = now - self._t0
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        head = f"{self.desc}: " if self.desc else ""
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        tail = f" done in {elapsed:.1f}s," if final else ""
        post = f" {self.postfix}" if self.postfix else ""
        return f"{head}{count} {self.unit}{pct}{tail} {_rate(rate)} {self.unit}/s{post}"

    def _write(self, line: str) -> None:
        if not logger.isEnabledFor(logging.INFO):  # LMFORGE_LOG=WARNING quiets progress lines too
            return
        stream = self.file or sys.stderr
        stamp = time.strftime("%H:%M:%S")
        try:
            stream.write(f"{stamp} lmforge progress {line}\n")
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream never stops the job
            pass


def _rate(r: float) -> str:
    return f"{r:,.0f}" if r >= 100 else f"{r:.1f}" if r >= 1 else f"{r:.2f}"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
