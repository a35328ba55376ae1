"""RL prompts: the built-in verifiable task from the bundled GCIDE sample, and users' prompt JSONL.

The built-in task ("which word"): a definition and four candidate headwords, one right:

    Which of these words is defined as "a small house"? Options: cot, mallet, cottage, plover.
    Answer with the word only.

The answer is checked by exact match (rewards.exact_answer_reward, `meta["answer"]`), so the
reward is verifiable and cannot be gamed by style. Distractors are other headwords of the same
split; definitions that give their word away (its stem appears in them) are left out. The
held-out split is by headword with `dictionary_chat.is_heldout_word` — the very split SFT's
built-in set uses, so a held-out RL word was never an SFT training word either (with the same
`heldout` share).

A prompt record is `{"messages": [...], "meta": {...}}`: the conversation to answer (ending with a
user message) and the fields the reward function receives as keyword arguments. Users' JSONL
lines give `prompt` (a string, or a list of chat messages) or `messages`, plus any other fields
(e.g. `answer`), which become `meta`. Malformed lines are reported with file:line and skipped.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Iterable

from lmforge.errors import InputError
from lmforge.log import logger
from lmforge.posttrain.dictionary_chat import _leaks, is_heldout_word, read_entries
from lmforge.tokenizer.chat import message_problem

QUESTION = "Which of these words is defined as \"{d}\"? Options: {opts}. Answer with the word only."
N_OPTIONS = 4


def which_word_prompts(dictionary_paths: Iterable[str | Path], seed: int = 0, holdout: float = 0.1,
                       n_train: int = 2000, n_heldout: int = 200) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompt records of the which-word task; distractors drawn (seeded) from
    the same split, options in a seeded order."""
    entries = [e for e in read_entries(dictionary_paths) if not _leaks(e)]
    splits: dict[bool, list] = {False: [], True: []}
    for e in entries:
        splits[is_heldout_word(e.word, holdout)].append(e)
    out: dict[bool, list[dict]] = {}
    for held, pool in splits.items():
        want = n_heldout if held else n_train
        rng = random.Random(f"{seed}:{'heldout' if held else 'train'}")
        order = list(range(len(pool)))
        rng.shuffle(order)
        recs = []
        for i in order[:want]:
            if len(pool) < N_OPTIONS:
                break
            e = pool[i]
            others = rng.sample([j for j in range(len(pool)) if j != i and pool[j].word.lower() != e.word.lower()],
                                N_OPTIONS - 1)
            opts = [e.word] + [pool[j].word for j in others]
            rng.shuffle(opts)
            q = QUESTION.format(d=e.definition.rstrip("."), opts=", ".join(opts))
            recs.append({"messages": [{"role": "user", "content": q}],
                         "meta": {"task": "which_word", "answer": e.word, "options": opts}})
        out[held] = recs
    if not out[False]:
        raise InputError("the dictionary gave no usable which-word prompts (too few usable entries)")
    return out[False], out[True]


def read_prompt_jsonl(paths: Iterable[str | Path]) -> tuple[list[dict], dict]:
    """Prompt records from users' JSONL files and counts {"lines", "prompts", "malformed"}."""
    from lmforge.posttrain.chat_data import _open_text

    recs, stats = [], {"lines": 0, "prompts": 0, "malformed": 0}
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise InputError(f"RL prompt file not found: {p}")
        with _open_text(p) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                stats["lines"] += 1
                rec, why = _prompt_record(line)
                if why:
                    stats["malformed"] += 1
                    logger.warning("%s:%d: %s; line skipped", p, n, why)
                    continue
                recs.append(rec)
    stats["prompts"] = len(recs)
    return recs, stats


def _prompt_record(line: str) -> tuple[dict | None, str | None]:
    try:
        r = json.loads(line)
    except ValueError as e:
        return None, f"not JSON ({e})"
    if not isinstance(r, dict):
        return None, "not a JSON object"
    msgs = r.pop("messages", None)
    prompt = r.pop("prompt", None)
    if msgs is None and prompt is None:
        return None, "no 'prompt' or 'messages'"
    if msgs is None:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    why = message_problem(msgs)
    if why:
        return None, why
    if msgs[-1]["role"] == "assistant":
        return None, "the prompt ends with an assistant message (it must end with a user or system message)"
    meta = r.pop("meta", {}) if isinstance(r.get("meta"), dict) else {}
    return {"messages": msgs, "meta": {**r, **meta}}, None


def split_prompts(recs: list[dict], holdout: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded random share `holdout` of users' prompts held out (when no eval file is given)."""
    order = list(range(len(recs)))
    random.Random(seed).shuffle(order)
    held = set(order[: round(len(recs) * holdout)])
    return [r for i, r in enumerate(recs) if i not in held], [r for i, r in enumerate(recs) if i in held]


__all__ = ["which_word_prompts", "read_prompt_jsonl", "split_prompts", "QUESTION"]
