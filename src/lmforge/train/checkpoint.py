"""Training checkpoints: `<out>/step_000100/` with

    model.safetensors  weights (tied output head stored once)      } written by
    config.json        ModelConfig                                 } lmforge.model.io conventions
    optimizer.pt       every optimizer's state dict (tensors only; loaded with weights_only=True)
    tokenizer.json     copy of the tokenizer, when training had one (makes the checkpoint self-contained)
    state.json         step, data position, RNG, scheduler, train config, sha256 of the files above

A checkpoint directory is built under a temporary name and renamed when complete, then
`<out>/latest` (a one-line text file) is pointed at it and all but the newest `keep_last` are
removed. On resume the newest directory whose checksums match is used; a corrupt or truncated
one is reported and the previous one taken.

This module is the write/resume side. Reading a model for inference, eval or export (run dir,
`latest`, step dir or HF folder -> verified model) is `lmforge.model.io.load_checkpoint`.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
from pathlib import Path

import torch

from lmforge.errors import InputError
from lmforge.log import logger
from lmforge.model.io import load_weights, sha256_file  # noqa: F401  (resume reads weights through the model side)
from lmforge.rundir import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

STEP_RE = re.compile(r"^step_(\d{6,})$")
CHECKSUMMED = ("model.safetensors", "config.json", "optimizer.pt", "tokenizer.json")


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def rng_state() -> dict:
    s = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = [base64.b64encode(t.numpy().tobytes()).decode() for t in torch.cuda.get_rng_state_all()]
    return s


def set_rng_state(s: dict) -> None:
    import numpy as np

    if "torch" in s:
        torch.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(s["torch"]), dtype=np.uint8).copy()))
    if "cuda" in s and torch.cuda.is_available():
        states = [torch.from_numpy(np.frombuffer(base64.b64decode(x), dtype=np.uint8).copy()) for x in s["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def save_checkpoint(out_dir: str | Path, step: int, weights: dict[str, torch.Tensor], model_config: dict,
                    optimizer_states: list[dict], state: dict, keep_last: int = 3,
                    tokenizer_file: Path | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write one checkpoint atomically, point `latest` at it, prune old ones. Main rank only.
    `extra_files` (name -> bytes, e.g. a LoRA stage's adapter.safetensors) are written beside the
    weights and checksummed like them."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    final = out_dir / step_dir_name(step)
    with atomic_dir(final) as tmp:
        atomic_write_bytes(tmp / "model.safetensors", save({k: v.contiguous() for k, v in weights.items()}, metadata={"format": "pt"}))
        atomic_write_json(tmp / "config.json", model_config)
        buf = io.BytesIO()
        torch.save({"optimizers": optimizer_states}, buf)
        atomic_write_bytes(tmp / "optimizer.pt", buf.getvalue())
        if tokenizer_file is not None and Path(tokenizer_file).is_file():
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        for name, blob in (extra_files or {}).items():
            atomic_write_bytes(tmp / name, blob)
        sums = {n: sha256_file(tmp / n) for n in (*CHECKSUMMED, *(extra_files or {})) if (tmp / n).is_file()}
        atomic_write_json(tmp / "state.json", {**state, "step": step, "checksums": sums})
    atomic_write_text(out_dir / "latest", final.name + "\n")
    prune(out_dir, keep_last, protect=final.name)
    return final


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def prune(out_dir: Path, keep_last: int, protect: str = "") -> None:
    ckpts = list_checkpoints(out_dir)
    for p in ckpts[: max(0, len(ckpts) - keep_last)]:
        if p.name != protect:
            shutil.rmtree(p, ignore_errors=True)


def remove_partial(out_dir: str | Path) -> None:
    """Delete the temporary directories a killed checkpoint write left behind."""
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        for p in out_dir.glob(".step_*.tmp.*"):
            shutil.rmtree(p, ignore_errors=True)


def verify(path: Path) -> str | None:
    """None if the checkpoint is intact, else why not."""
    state = read_json(path / "state.json")
    if not isinstance(state, dict) or "checksums" not in state:
        return "state.json is missing or unreadable"
    for name, want in state["checksums"].items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256_file(f) != want:
            return f"{name} does not match its checksum (truncated or corrupt)"
    for name in ("model.safetensors", "config.json", "optimizer.pt"):
        if name not in state["checksums"]:
            return f"{name} has no checksum in state.json"
    return None


def find_resumable(out_dir: str | Path) -> Path | None:
    """The newest intact checkpoint; corrupt ones are logged and skipped."""
    for p in reversed(list_checkpoints(out_dir)):
        why = verify(p)
        if why is None:
            return p
        logger.warning("checkpoint %s is unusable (%s); trying the previous one", p, why)
    return None


def load_optimizer_states(path: Path) -> list[dict]:
    try:
        blob = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt pickle raises many different types
        raise InputError(f"cannot read {path / 'optimizer.pt'}: {e}") from None
    return blob["optimizers"]


__all__ = ["save_checkpoint", "find_resumable", "verify", "list_checkpoints", "load_weights", "load_optimizer_states", "rng_state", "set_rng_state"]
