"""Inference: the generation engine (`engine.py`), loading a model with its tokenizer, and the
`lmforge generate` / `lmforge export` verbs (`commands.py`).

`load_model_and_tokenizer(path)` is the one way every consumer (generate, serve, post-training)
turns what a user points at — a run directory, checkpoints directory, `latest`, step directory,
HF folder — into a verified model on a device plus the `lmforge.tokenizer.Tokenizer` that belongs
to it. Imports stay inside the function so `lmforge --help` does not load torch.
"""

from __future__ import annotations

from pathlib import Path


def load_model_and_tokenizer(path: str | Path, device="cpu", dtype=None, tokenizer: str | Path | None = None,
                             verify: bool = True):
    """(model in eval mode, Tokenizer, ModelRef) for `path`. `tokenizer` overrides the one found
    with the model (its checkpoint copy, an HF folder's file, or the run's tokenizer/).
    InputError when there is no tokenizer, or when it has more ids than the model's vocabulary."""
    from lmforge.errors import InputError
    from lmforge.model.io import load_checkpoint, resolve_model
    from lmforge.tokenizer import Tokenizer

    ref = resolve_model(path)
    tok_path = Path(tokenizer) if tokenizer is not None else ref.tokenizer
    if tok_path is None:
        raise InputError(f"no tokenizer.json with the model {ref.path} or in its run: pass --tokenizer DIR")
    model, ref = load_checkpoint(ref.path, device=device, dtype=dtype, verify=verify)  # verifies the tokenizer copy too
    tok = Tokenizer.from_file(tok_path)
    if tok.vocab_size > model.cfg.vocab_size:
        raise InputError(f"tokenizer {tok.path} has {tok.vocab_size} ids but the model's vocabulary is "
                         f"{model.cfg.vocab_size}: wrong tokenizer")
    return model, tok, ref


__all__ = ["load_model_and_tokenizer"]
