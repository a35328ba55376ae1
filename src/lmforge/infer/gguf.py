"""GGUF export (being built)."""

from __future__ import annotations

import argparse


def add_export_parser(esub: argparse._SubParsersAction) -> None:
    """Adds `lmforge export gguf` to the `export` sub-parsers."""
