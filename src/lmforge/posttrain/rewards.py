"""Reward functions for RL: what `[rl] reward = ...` names, loaded and called safely.

A reward function scores one sampled answer:

    fn(prompt: str | list[dict], completion: str, **meta) -> float

`prompt` is the conversation the model answered (a list of chat messages, or the plain string a
user's JSONL gave), `completion` the decoded answer (special tokens left out), `meta` the prompt
record's other fields (e.g. `answer` for the built-in task). `reward` names one of:

* `"exact"`: 1.0 when the answer equals `meta["answer"]` after normalisation (case, surrounding
  whitespace, quotes and final punctuation), else 0.0: the built-in verifiable task's reward;
* `"choice"`: 1.0 for the exact answer, else partial credit up to 0.25 (another of the listed
  `meta["options"]`: the right form; or the spelling similarity to the answer): the built-in
  task's default for training, so a small model gets a signal before it first answers right;
* `"module:function"`: a function in an importable module;
* `"path/to/file.py:function"`: a function in a Python file (relative paths resolve like the
  recipe's other paths);
* `"rm:PATH"`: a trained reward model (lmforge.posttrain.rm, imported only when asked for), which
  scores whole conversations in batches.

A Python function that raises, or returns something that is not a real number, is reported once
(one log line with the prompt and the error; later failures are only counted) and scored as
`on_error` says: a number (e.g. 0.0), or "skip" (the sample is left out of the advantages and the
loss). A NaN is a number: it is passed on, and the RL loop stops on it with a message naming the
step (a NaN reward is a broken reward, not a low one).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
import numbers
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from lmforge.errors import ConfigError, InputError
from lmforge.log import logger

RewardFn = Callable[..., float]

_PUNCT = " \t\n\"'`.,;:!?()[]{}*"


def normalize_answer(text: str) -> str:
    """An answer reduced for exact matching: lower case, single spaces, surrounding quotes,
    brackets and punctuation removed ("Apple." == "apple" == '"APPLE"')."""
    return " ".join(str(text).split()).strip(_PUNCT).lower()


def exact_answer_reward(prompt, completion: str, *, answer: str | None = None, **meta) -> float:
    """1.0 when `completion` is the expected `answer` (normalised exact match), else 0.0. A prompt
    record without an answer is a data error (raises, so it is reported with its prompt)."""
    if answer is None:
        raise KeyError("the prompt record has no 'answer' field for the exact-answer reward")
    return 1.0 if normalize_answer(completion) == normalize_answer(answer) else 0.0


def choice_reward(prompt, completion: str, *, answer: str | None = None, options=None, partial: float = 0.25,
                  **meta) -> float:
    """The multiple-choice task's shaped reward: 1.0 for the right answer (exact match); otherwise
    partial credit up to `partial`: the full `partial` for another of the listed `options` (the
    answer has the right form, as a format reward), else `partial` times the spelling similarity to
    the right answer (difflib's ratio). Gives a small model a learning signal long before it first
    answers right; the task accuracy stays the exact match."""
    if exact_answer_reward(prompt, completion, answer=answer):
        return 1.0
    norm = normalize_answer(completion)
    if options and any(norm == normalize_answer(o) for o in options):
        return float(partial)
    return float(partial) * difflib.SequenceMatcher(None, norm, normalize_answer(answer)).ratio()


def load_function(spec: str, resolve: Callable[[str], Path] = Path) -> RewardFn:
    """The callable a `module:function` or `file.py:function` spec names. ConfigError (one line
    naming the spec) when the module or file is missing, fails to import, or has no such callable."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"reward {spec!r}: expected 'exact', 'module:function', 'path/to/file.py:function' or 'rm:PATH'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = resolve(target)
        if not Path(path).is_file():
            raise ConfigError(f"reward {spec!r}: file {path} not found")
        mod_name = "lmforge_reward_" + re.sub(r"\W", "_", str(Path(path).resolve()))
        try:
            mspec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(mspec)
            sys.modules[mod_name] = module
            mspec.loader.exec_module(module)
        except Exception as e:  # a user's file can fail in any way
            sys.modules.pop(mod_name, None)
            raise ConfigError(f"reward {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except Exception as e:
            raise ConfigError(f"reward {spec!r}: cannot import module {target!r}: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: {target} has no function {name!r}")
    return fn


def _as_number(v: Any) -> float | None:
    """`v` as a float when it is a real number (bool, int, float, numpy or 0-d torch scalar), else None."""
    if isinstance(v, numbers.Real):
        return float(v)
    if callable(getattr(v, "item", None)) and tuple(getattr(v, "shape", (0,))) == ():
        try:
            x = v.item()
        except Exception:
            return None
        return float(x) if isinstance(x, numbers.Real) else None
    return None


def _prompt_text(prompt) -> str:
    if isinstance(prompt, list):
        return " | ".join(f"{m.get('role')}: {m.get('content')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


@dataclass
class Scorer:
    """Scores batches of (prompt, completion, meta); see the module docstring.

    `score` returns one value per sample: a float, or None for a sample to skip. `errors` counts
    the failed calls; `reported` whether the first one was logged."""

    name: str
    fn: RewardFn | None = None
    batch_fn: Callable[[list, list[str]], list[float]] | None = None  # reward model: (prompts, completions) -> scores
    on_error: float | str = 0.0
    errors: int = 0
    reported: bool = False
    first_error: str = ""

    def _failed(self, prompt, why: str) -> float | None:
        self.errors += 1
        if not self.reported:
            self.reported = True
            self.first_error = why
            how = "skipped" if self.on_error == "skip" else f"scored {float(self.on_error):g}"
            logger.warning("reward %s failed (%s) on prompt %r; this and later failures are %s and counted",
                           self.name, why, _prompt_text(prompt)[:300], how)
        return None if self.on_error == "skip" else float(self.on_error)

    def score_one(self, prompt, completion: str, meta: dict | None = None) -> float | None:
        try:
            v = self.fn(prompt, completion, **(meta or {}))
        except Exception as e:  # a user's function can fail in any way; KeyboardInterrupt still stops the run
            return self._failed(prompt, f"{type(e).__name__}: {e}")
        x = _as_number(v)
        if x is None:
            return self._failed(prompt, f"returned {type(v).__name__} {str(v)[:80]!r}, not a number")
        return x

    def score(self, prompts: Sequence, completions: Sequence[str], metas: Sequence[dict] | None = None) -> list[float | None]:
        metas = metas if metas is not None else [{}] * len(prompts)
        if self.batch_fn is not None:
            vals = list(self.batch_fn(list(prompts), list(completions)))
            if len(vals) != len(prompts):
                raise InputError(f"reward {self.name}: {len(vals)} scores for {len(prompts)} samples")
            return [float(v) for v in vals]
        return [self.score_one(p, c, m) for p, c, m in zip(prompts, completions, metas)]


def _reward_model_batch(path: Path, device=None) -> Callable[[list, list[str]], list[float]]:
    """A batch scorer over a trained reward model (lmforge.posttrain.rm, imported only here)."""
    try:
        from lmforge.posttrain.rm import load_reward_model
    except ImportError as e:
        raise ConfigError(f"reward 'rm:{path}': the reward model module is not available ({e})") from None
    if not Path(path).exists():
        raise ConfigError(f"reward 'rm:{path}': {path} not found")
    rm = load_reward_model(path) if device is None else load_reward_model(path, device=device)

    def score(prompts: list, completions: list[str]) -> list[float]:
        convs = [(list(p) if isinstance(p, list) else [{"role": "user", "content": str(p)}])
                 + [{"role": "assistant", "content": c}] for p, c in zip(prompts, completions)]
        return rm.score(convs)

    return score


def load_reward(spec: str, on_error: float | str = 0.0, resolve: Callable[[str], Path] = Path, device=None) -> Scorer:
    """The `Scorer` for a reward spec ("exact", "choice", "module:function", "file.py:function", "rm:PATH")."""
    if on_error != "skip" and not (isinstance(on_error, numbers.Real) and math.isfinite(on_error)):
        raise ConfigError(f"reward_on_error = {on_error!r}: give a finite number or \"skip\"")
    spec = spec.strip()
    if spec == "exact":
        return Scorer("exact", fn=exact_answer_reward, on_error=on_error)
    if spec == "choice":
        return Scorer("choice", fn=choice_reward, on_error=on_error)
    if spec.startswith("rm:"):
        path = resolve(spec[3:])
        return Scorer(spec, batch_fn=_reward_model_batch(path, device), on_error=on_error)
    return Scorer(spec, fn=load_function(spec, resolve), on_error=on_error)


__all__ = ["RewardFn", "Scorer", "normalize_answer", "exact_answer_reward", "choice_reward", "load_function", "load_reward"]
