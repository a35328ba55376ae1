"""Model weights on disk: `model.safetensors` + `config.json` in one directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import InputError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.rundir import atomic_write_json, atomic_write_bytes


def state_dict_for_save(model: Transformer) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # shared with tok_emb.weight
    return sd


def save_model(model: Transformer, directory: str | Path) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save

    atomic_write_bytes(directory / "model.safetensors", save(state_dict_for_save(model), metadata={"format": "pt"}))
    atomic_write_json(directory / "config.json", model.cfg.to_dict())
    return directory


def load_config(directory: str | Path) -> ModelConfig:
    p = Path(directory) / "config.json"
    if not p.is_file():
        raise InputError(f"no model config at {p}")
    return ModelConfig.from_dict(json.loads(p.read_text()))


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Load a model saved by `save_model` (or a training checkpoint directory)."""
    directory = Path(directory)
    cfg = load_config(directory)
    f = directory / "model.safetensors"
    if not f.is_file():
        raise InputError(f"no weights at {f}")
    try:
        sd = load_file(str(f), device=str(device))
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise InputError(f"cannot read weights {f}: {e}") from None
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise InputError(f"weights in {f} do not match config.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model


__all__ = ["save_model", "load_model", "load_config", "state_dict_for_save", "save_file"]
