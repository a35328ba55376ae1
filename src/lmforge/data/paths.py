"""Recipe paths: how a path written in a recipe (or a bare data TOML) becomes a file path.

One helper, shared by the data config (input fingerprints) and the pipeline (inputs, model
and list files), so the two agree and neither imports the other for it.
"""

from __future__ import annotations

import os
from pathlib import Path


def resolve_under(base_dir: str | Path, path: str | Path) -> Path:
    """A recipe path: `~` expanded, relative paths taken under `base_dir` (the recipe's folder)."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else Path(base_dir) / p
