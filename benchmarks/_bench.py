"""Shared by the benchmark scripts: the RESULT line `benchmarks/run_all.py` collects, and the load average.

Every benchmark with a peer ends its stdout with one line

    RESULT {"bench": "<name>", "headline": <ratio lmforge/peer, higher is better>, "goal": <ratio>,
            "met": <bool>, "what": "<what the headline compares>", "load": [1, 5, 15 min], ...}

(JSON after the word RESULT; extra keys are free: per-row figures, equality checks).
"""

from __future__ import annotations

import json
import os


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def result(bench: str, headline: float, goal: float, what: str, **extra) -> dict:
    """Print the RESULT line (last line of stdout) and return it as a dict."""
    r = {"bench": bench, "headline": round(float(headline), 3), "goal": goal, "met": bool(headline >= goal),
         "what": what, "load": load(), **extra}
    print("RESULT " + json.dumps(r, ensure_ascii=False), flush=True)
    return r
