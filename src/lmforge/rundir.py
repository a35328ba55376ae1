"""The run directory: the contract between stages (see docs/ARTIFACTS.md).

Every artifact is written under a temporary name and renamed when complete, so a killed
stage never leaves a half-written file that looks finished. A stage records
`<out>/manifest.json` (config, input fingerprint, counts, wall time) when it completes;
a stage whose manifest matches its current fingerprint is skipped on rerun.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file next to `path`; on clean exit fsync + rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    f = open(tmp, mode)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)
    except BaseException:
        f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory; on clean exit it replaces `path` (which must not be half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old.{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically (a temporary name, then a rename) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    tmp.replace(path)
    return path


def read_json(path: str | Path, default: Any = None) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-serialisable object."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_fingerprint(paths: list[str | Path]) -> str:
    """Fingerprint a set of input files by path, size and mtime (cheap; content changes move mtime)."""
    items = []
    for p in sorted(str(p) for p in paths):
        st = os.stat(p)
        items.append([p, st.st_size, int(st.st_mtime)])
    return fingerprint(items)


class RunDir:
    """Paths of one run: runs/NAME/{recipe.toml, corpus/, tokenizer/, tokens/, checkpoints/, eval/, report.md}."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __truediv__(self, other: str) -> Path:
        return self.root / other

    @property
    def corpus(self) -> Path:
        return self.root / "corpus"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    def mkdir(self) -> "RunDir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self


def manifest_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / MANIFEST


def stage_complete(out_dir: str | Path, fp: str) -> dict | None:
    """The manifest of a completed stage whose fingerprint equals `fp`, else None."""
    m = read_json(manifest_path(out_dir))
    if m and m.get("status") == "complete" and m.get("fingerprint") == fp:
        return m
    return None


def write_manifest(out_dir: str | Path, *, stage: str, fp: str, config: Any, counts: dict, started: float, extra: dict | None = None) -> dict:
    m = {
        "stage": stage,
        "status": "complete",
        "fingerprint": fp,
        "config": config,
        "counts": counts,
        "wall_time_s": round(time.time() - started, 3),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if extra:
        m.update(extra)
    atomic_write_json(manifest_path(out_dir), m)
    return m
