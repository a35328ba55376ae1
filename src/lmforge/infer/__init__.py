"""Inference: the generation engine (`engine.py`), loading a model with its tokenizer, and the
`lmforge generate` / `lmforge export` verbs (`commands.py`).

`load_model_and_tokenizer(path)` is the one way every consumer (generate, serve, post-training)
turns what a user points at — a run directory, checkpoints directory, `latest`, step directory,
HF folder, a quantized checkpoint written by `lmforge quantize`, a low-rank one written by
`lmforge lowrank` — into a verified model on a device
plus the `lmforge.tokenizer.Tokenizer` that belongs to it (`load_model(path)`: the model alone).
Imports stay inside the functions so `lmforge --help` does not load torch.
"""

from __future__ import annotations

from pathlib import Path


def load_model_and_tokenizer(path: str | Path, device="cpu", dtype=None, tokenizer: str | Path | None = None,
                             verify: bool = True):
    """(model in eval mode, Tokenizer, ModelRef) for `path`. `tokenizer` overrides the one found
    with the model (its checkpoint copy, an HF folder's file, or the run's tokenizer/).
    InputError when there is no tokenizer, or when it has more ids than the model's vocabulary."""
    from lmforge.errors import InputError
    from lmforge.model.io import resolve_model
    from lmforge.tokenizer import Tokenizer

    ref = resolve_model(path)
    tok_path = Path(tokenizer) if tokenizer is not None else ref.tokenizer
    if tok_path is None:
        raise InputError(f"no tokenizer.json with the model {ref.path} or in its run: pass --tokenizer DIR")
    model, ref = load_model(ref.path, device=device, dtype=dtype, verify=verify)  # verifies the tokenizer copy too
    tok = Tokenizer.from_file(tok_path)
    if tok.vocab_size > model.cfg.vocab_size:
        raise InputError(f"tokenizer {tok.path} has {tok.vocab_size} ids but the model's vocabulary is "
                         f"{model.cfg.vocab_size}: wrong tokenizer")
    return model, tok, ref


def quantization_of(directory: str | Path) -> dict | None:
    """The `{"kind", "map"}` a quantized checkpoint's state.json records (written by `lmforge
    quantize`), or None for a plain checkpoint."""
    from lmforge.rundir import read_json

    state = read_json(Path(directory) / "state.json")
    q = state.get("quantization") if isinstance(state, dict) else None
    return q if isinstance(q, dict) else None


def load_model(path: str | Path, device="cpu", dtype=None, verify: bool = True):
    """(model in eval mode, ModelRef) for `path`: `lmforge.model.io.load_checkpoint` for plain
    checkpoints and HF folders; for a quantized checkpoint (state.json records "quantization"),
    the checksums are verified, the plain Transformer is built from config.json, its linear layers
    are swapped for the recorded quantized modules and the quantized tensors loaded
    (`quantize.load_quantized`). model/ cannot build quantized modules, so this is the loader
    every consumer of a quantized checkpoint goes through. A low-rank checkpoint (state.json records
    "lowrank") is loaded the same way, its recorded modules swapped for `compress.LowRankLinear`.
    Pruned checkpoints are plain ones (structured pruning writes its smaller config)."""
    from lmforge.model.io import load_checkpoint, load_config, resolve_model, verify_checksums

    from lmforge.infer.compress import load_lowrank, lowrank_of

    ref = resolve_model(path)
    quantized = ref.kind == "lmforge" and quantization_of(ref.path) is not None
    lowrank = ref.kind == "lmforge" and not quantized and lowrank_of(ref.path) is not None
    if not (quantized or lowrank):
        return load_checkpoint(ref.path, device=device, dtype=dtype, verify=verify)
    import torch

    from lmforge.infer.quantize import load_quantized
    from lmforge.model.transformer import Transformer

    if verify:
        verify_checksums(ref.path)
    # built normally on the CPU (dense weights allocated, then replaced): the quantized / low-rank
    # modules need real tensors to load into, and the RoPE tables are computed at construction
    with torch.device("cpu"):
        model = Transformer(load_config(ref.path))
    if quantized:
        load_quantized(model, ref.path / "model.safetensors")
    else:  # written by `lmforge lowrank` (or distilled into a low-rank student): state.json records the ranks
        load_lowrank(model, ref.path)
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model.eval(), ref


def device_from_name(name: str):
    """`torch.device` for a `--device` value: cpu, cuda, cuda:N or auto (CUDA when present).
    ConfigError for a malformed name or CUDA asked for where there is none."""
    import torch

    from lmforge.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return dev


__all__ = ["load_model", "load_model_and_tokenizer", "quantization_of", "device_from_name"]
