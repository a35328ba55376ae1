"""Logging helpers: one logger for the package, progress bars, and log-once for noisy warnings."""

from __future__ import annotations

import logging
import os
import sys
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


def progress(it: Iterable[T], desc: str = "", total: int | None = None, unit: str = "it", **kw) -> Iterable[T]:
    """A tqdm progress bar on stderr (off with LMFORGE_PROGRESS=0)."""
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, unit=unit, disable=not progress_enabled(), dynamic_ncols=True, leave=False, **kw)
