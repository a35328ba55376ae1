"""GCIDE dictionary markup (the bundled `dictionary/gcide-sample.jsonl.gz` and the full GNU
Collaborative International Dictionary of English): what the evaluation tasks and the built-in chat
set both need to turn an entry into plain text."""

from __future__ import annotations

import re

# a line holding only a bracketed tag, e.g. "[Wordnet 1.5]" or "[1913 Webster]": sections end there
TAG_LINE = re.compile(r"^\s*\[[^\]]*\]\s*$", re.M)


def strip_brackets(s: str) -> str:
    """`s` without its bracketed parts (etymologies, source tags), nested brackets included."""
    out, depth = [], 0
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth = max(depth - 1, 0)
        elif depth == 0:
            out.append(ch)
    return "".join(out)
