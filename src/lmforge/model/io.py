"""Model weights on disk, and the one checkpoint reader.

Writing: `save_model(model, dir)` -> `model.safetensors` + `config.json` (training checkpoints add
optimizer.pt, tokenizer.json and state.json with sha256 checksums: train/checkpoint.py).

Reading: `resolve_model(path)` turns whatever a user points at into a `ModelRef` (the directory
holding the weights, its kind, the tokenizer.json that belongs to it); `load_checkpoint(path,
device, dtype)` resolves, verifies the checksums state.json records, and loads. Accepted:

* a run directory (`runs/demo`): its latest model — the last model-producing stage of its
  recipe.toml (pretrain -> checkpoints/, then sft/, dpo/, rl/), or without a recipe the first of
  rl/, dpo/, sft/, checkpoints/ that holds one; inside a stage directory `<name>/latest` or
  `latest` / `step_*` directly (several names: the most recently written);
* a checkpoints directory (`latest` file or `step_*` directories), its `latest` file, a
  `step_*` directory, a directory written by `save_model`;
* a Hugging Face folder (config.json with `model_type` llama or qwen3 + safetensors), converted
  by `lmforge.model.hf`.

The model side returns the tokenizer *path* only (model/ imports no tokenizer/); `lmforge.infer`
pairs it with the tokenizer runtime.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmforge.errors import InputError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.rundir import atomic_write_bytes, atomic_write_json, read_json

STEP_RE = re.compile(r"^step_(\d+)$")
# Stage directories of a run that hold models, newest stage first (same step_N/ + latest layout).
MODEL_STAGE_DIRS = ("rounds", "rl", "dpo", "sft", "checkpoints")
# Recipe stage name -> its directory in the run, for the stages that produce a model.
MODEL_STAGES = {"pretrain": "checkpoints", "sft": "sft", "dpo": "dpo", "rl": "rl", "rounds": "rounds"}
# Files a loaded model depends on; their checksums in state.json are verified before loading.
VERIFIED = ("model.safetensors", "config.json", "tokenizer.json")


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


def read_safetensors(path: str | Path, what: str = "weights", device: str | torch.device = "cpu"
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; one InputError line naming the file (and `what` it
    should hold) when it is missing or unreadable."""
    from safetensors import safe_open

    f = Path(path)
    if not f.is_file():
        raise InputError(f"no {what} at {f}")
    try:
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
        return load_file(str(f), device=str(device)), meta
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise InputError(f"cannot read {what} {f}: {e}") from None


def load_weights(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of `<directory>/model.safetensors` (InputError naming the file when unreadable)."""
    return read_safetensors(Path(directory) / "model.safetensors", "weights", device)[0]


def load_model(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Load a model saved by `save_model` (or a training checkpoint directory); no checksum check
    (`load_checkpoint` does that)."""
    directory = Path(directory)
    cfg = load_config(directory)
    sd = load_weights(directory, device)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise InputError(f"weights in {directory / 'model.safetensors'} do not match config.json: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model


# ---- checksums ------------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checksums(directory: str | Path, names: tuple[str, ...] = VERIFIED) -> None:
    """Check `names` in a checkpoint directory against the sha256 sums its state.json records;
    InputError naming the first file that differs. A directory without state.json (save_model,
    an HF folder) has nothing to verify."""
    directory = Path(directory)
    state = read_json(directory / "state.json")
    if state is None:
        return
    sums = state.get("checksums") if isinstance(state, dict) else None
    if not isinstance(sums, dict):
        raise InputError(f"{directory / 'state.json'} has no checksums (unreadable or not written by lmforge)")
    for name in names:
        want = sums.get(name)
        if want is None:
            continue
        f = directory / name
        if not f.is_file():
            raise InputError(f"{f} is missing (state.json lists it)")
        if sha256_file(f) != want:
            raise InputError(f"{f} does not match its checksum in state.json (corrupt or modified)")


# ---- resolving what a user points at ---------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: `path` holds the weights; `kind` is "lmforge" (model.safetensors +
    lmforge config.json) or "hf" (a Hugging Face Llama/Qwen3 folder); `tokenizer` the
    tokenizer.json that belongs to it (None when none was found)."""

    path: Path
    kind: str
    tokenizer: Path | None
    step: int | None = None
    stage: str | None = None  # the run's stage directory it came from ("checkpoints", "sft", ...)


def is_hf_folder(directory: Path) -> bool:
    cfg = read_json(directory / "config.json")
    has_weights = (directory / "model.safetensors").is_file() or (directory / "model.safetensors.index.json").is_file()
    return isinstance(cfg, dict) and "model_type" in cfg and has_weights


def _is_model_dir(d: Path) -> bool:
    return d.is_dir() and ((d / "model.safetensors").is_file() or is_hf_folder(d))


def _step_dirs(d: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in d.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))] if d.is_dir() else []
    return [p for _, p in sorted(found)]


def _latest_in(d: Path) -> Path | None:
    """The model a checkpoints directory points at: its `latest` file, else its newest step_*."""
    latest = d / "latest"
    if latest.is_file():
        target = d / latest.read_text().strip()
        if not _is_model_dir(target):
            raise InputError(f"{latest} points at {target}, which holds no model.safetensors")
        return target
    steps = [p for p in _step_dirs(d) if _is_model_dir(p)]
    return steps[-1] if steps else None


def _latest_in_stage(d: Path) -> Path | None:
    """A stage directory: `latest` / step_* directly, or inside its named runs (the most recent)."""
    if not d.is_dir():
        return None
    direct = _latest_in(d)
    if direct is not None:
        return direct
    subs = [s for s in d.iterdir() if s.is_dir() and not s.name.startswith(".")]
    found = [(p, s) for s in subs if (p := _latest_in(s)) is not None]
    if not found:
        return None
    return max(found, key=lambda ps: ((ps[1] / "latest").stat().st_mtime if (ps[1] / "latest").is_file() else 0,
                                      ps[0].stat().st_mtime))[0]


def _run_stage_order(run: Path) -> list[str]:
    """Stage directories to look in, preferred first: the recipe's model-producing stages last to
    first when recipe.toml lists them, else rl, dpo, sft, checkpoints."""
    f = run / "recipe.toml"
    if f.is_file():
        import tomllib

        try:
            stages = tomllib.loads(f.read_text(encoding="utf-8")).get("run", {}).get("stages") or []
        except (tomllib.TOMLDecodeError, OSError, AttributeError):
            stages = []
        dirs = [MODEL_STAGES[s] for s in stages if isinstance(s, str) and s in MODEL_STAGES]
        if dirs:
            return list(reversed(dirs)) + [d for d in MODEL_STAGE_DIRS if d not in dirs]
    return list(MODEL_STAGE_DIRS)


def _is_run_dir(p: Path) -> bool:
    return (p / "recipe.toml").is_file() or any((p / d).is_dir() for d in MODEL_STAGE_DIRS)


def find_tokenizer(model_dir: Path) -> Path | None:
    """The tokenizer.json that belongs to a model: its own copy (checkpoints and HF folders carry
    one), else a run's tokenizer/ a few levels up."""
    p = model_dir.resolve()
    for d in [p, *p.parents][:5]:
        if (d / "tokenizer.json").is_file():
            return d / "tokenizer.json"
        if (d / "tokenizer" / "tokenizer.json").is_file():
            return d / "tokenizer" / "tokenizer.json"
    return None


def resolve_model(path: str | Path) -> ModelRef:
    """What a user points at (run dir, checkpoints dir, `latest` file, step dir, save_model dir,
    HF folder) -> the model directory, its kind and its tokenizer. InputError when there is none."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"model path not found: {p}")
    stage = None
    if p.is_file():
        if p.name != "latest":
            raise InputError(f"{p} is a file: point at a run, checkpoint or model directory (or a checkpoints 'latest' file)")
        target = _latest_in(p.parent)
        if target is None:
            raise InputError(f"{p} points at no model")
        d = target
    elif _is_model_dir(p):
        d = p
    elif _is_run_dir(p):
        d = None
        for name in _run_stage_order(p):
            d = _latest_in_stage(p / name)
            if d is not None:
                stage = name
                break
        if d is None:
            raise InputError(f"no checkpoint in run {p} (looked in {', '.join(n + '/' for n in _run_stage_order(p))})")
    else:
        d = _latest_in_stage(p)
        if d is None:
            raise InputError(f"no checkpoint or model at {p} (expected model.safetensors, a directory with a 'latest' file or step_* "
                             "directories, a run directory, or a Hugging Face folder)")
    kind = "hf" if is_hf_folder(d) else "lmforge"
    if kind == "lmforge" and not (d / "config.json").is_file():
        raise InputError(f"no model config at {d / 'config.json'}")
    state = read_json(d / "state.json") if kind == "lmforge" else None
    m = STEP_RE.match(d.name)
    step = state.get("step") if isinstance(state, dict) and isinstance(state.get("step"), int) else (int(m.group(1)) if m else None)
    if stage is None and d.parent.parent.name in MODEL_STAGE_DIRS:
        stage = d.parent.parent.name
    elif stage is None and d.parent.name in MODEL_STAGE_DIRS:
        stage = d.parent.name
    return ModelRef(path=d, kind=kind, tokenizer=find_tokenizer(d), step=step, stage=stage)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    verify: bool = True) -> tuple[Transformer, ModelRef]:
    """Resolve `path`, verify the checksums state.json records (unless `verify` is False), and load
    the model on `device` (cast to `dtype` when given), in eval mode."""
    ref = resolve_model(path)
    if ref.kind == "hf":
        from lmforge.model.hf import load_hf

        model = load_hf(ref.path, device=device, dtype=dtype)
    else:
        state = read_json(ref.path / "state.json")
        if isinstance(state, dict) and isinstance(state.get("quantization"), dict):  # written by `lmforge quantize`
            raise InputError(f"{ref.path} is a quantized checkpoint ({state['quantization'].get('kind')}): "
                             "load it with lmforge.infer.load_model_and_tokenizer (or lmforge.infer.load_model)")
        if verify:
            verify_checksums(ref.path)
        model = load_model(ref.path, device=device, dtype=dtype)
    return model.eval(), ref


__all__ = ["save_model", "load_model", "load_config", "load_weights", "state_dict_for_save", "save_file",
           "ModelRef", "resolve_model", "load_checkpoint", "verify_checksums", "sha256_file", "find_tokenizer"]
