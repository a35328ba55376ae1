"""Rejection sampling (best-of-n): `rejection_sample(cfg, out_dir, policy=..., reward_model=..., seed=...)`.

For every prompt (a conversation ending with a user turn) the policy generates `n` completions
through the generation engine (the n samples of a prompt share one prefill), the reward model
scores each finished conversation, and the samples become new training data:

* `sft.jsonl`   best-of-n SFT data: `{"messages": [...prompt, {"role": "assistant", "content": best}],
                "meta": {"reward": ...}}` (what `chat_data.read_chat_jsonl` and `lmforge sft` read);
* `pairs.jsonl` DPO pairs: `{"prompt": messages, "chosen": best, "rejected": worst, "meta": {...}}`
                (what `pref_data.read_pref_jsonl`, `lmforge dpo` and `lmforge rm` read); a prompt
                whose best and worst scores differ by `min_margin` or less gives no pair (counted:
                `dropped_margin`), nor one whose best and worst texts are the same (`identical`);
* `stats.json`  counts and reward figures (prompts, samples, mean reward of all samples, mean
                best-of-n and worst-of-n reward, pairs kept, the greedy answers' mean reward on
                held-out prompts when there are any);
* `samples.json` the first few prompts with their best and worst answers and all scores (for the
                report); `scored.jsonl` every prompt with all its completions and scores.

The best answer is the highest-scored non-empty completion (an empty answer teaches only to stop);
the worst is the lowest-scored completion, empty ones included (a fine thing to push down). Ties go
to the earlier sample. A score that is not finite (a broken reward model) is counted and the sample
left out.

Prompts: users' JSONL files (`{"messages": [...]}` — trailing assistant turns are dropped, so chat
data works as a prompt source —, or `{"prompt": "..." | [...]}`), or by default the questions of the
built-in dictionary conversations' training split (`dictionary_chat.build_default_chat_set`; its
held-out split gives the held-out prompts). A prompt that leaves no room in the model's context is
counted (`too_long`) and skipped.

Seeded and resumable: the prompts are processed in chunks of `chunk` prompts; each chunk's sampling
seed is derived from the run seed and the chunk number (so a resumed run draws the same samples),
and each finished chunk is written atomically to `<out>/parts/chunk_NNNNN.jsonl` under a key of
the policy, the reward model, the prompts and the sampling settings. A killed run resumes at the
first missing chunk; a changed key discards the parts. The final files are written atomically at
the end (stats.json last: its `key` marks the output complete, and a rerun with the same key
returns it without sampling again), and the parts are removed.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch

from lmforge.errors import ConfigError, InputError
from lmforge.log import logger
from lmforge.rundir import atomic_write_json, atomic_write_text, fingerprint, read_json
from lmforge.tokenizer.chat import message_problem, render_prompt

Scorer = Callable[[list[list[dict]]], Sequence[float]]
PARTS = "parts"
OUTPUT_FILES = ("sft.jsonl", "pairs.jsonl", "scored.jsonl", "samples.json", "stats.json")


@dataclass
class RejectionConfig:
    name: str = ""  # output sub-directory of rejection/ ("" = the run's name)
    policy: str = ""  # the model to sample from ("" = the run's latest model before this stage); any path generate takes
    reward_model: str = ""  # the reward model ("" = the run's rm/)
    tokenizer: str = ""  # "" = the policy's tokenizer
    prompts: list[str] = field(default_factory=list)  # prompt / conversation JSONL; [] = the built-in dictionary questions
    eval_prompts: list[str] = field(default_factory=list)  # held-out prompt JSONL; [] = the built-in held-out split (or a share of users')
    dictionary: str = ""  # GCIDE JSONL for the built-in prompts ("" = the bundled sample's)
    max_prompts: int = 256  # prompts used (at most; 0 = all of users' files)
    heldout: float = 0.1  # the built-in set's held-out share (by headword, as SFT's split)
    heldout_prompts: int = 16  # held-out prompts answered greedily and scored (0 = none)
    n: int = 8  # samples per prompt
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 48
    gen_batch: int = 64  # rows (prompts x n) decoded together
    score_batch: int = 16  # conversations per reward-model forward
    min_margin: float = 0.0  # a pair is kept when best - worst > min_margin
    chunk: int = 32  # prompts per resumable chunk
    samples: int = 8  # prompts shown in samples.json
    seed: int | None = None  # None = the run's seed
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on CUDA, float32 on the CPU

    def validate(self) -> None:
        if self.n < 2:
            raise ConfigError(f"rejection.n = {self.n} must be >= 2 (best-of-n needs several samples)")
        if self.temperature <= 0:
            raise ConfigError(f"rejection.temperature = {self.temperature} must be > 0 (greedy samples are all the same)")
        if self.max_new_tokens < 1 or self.gen_batch < 1 or self.score_batch < 1 or self.chunk < 1:
            raise ConfigError(f"rejection.max_new_tokens ({self.max_new_tokens}), gen_batch ({self.gen_batch}), "
                              f"score_batch ({self.score_batch}) and chunk ({self.chunk}) must be >= 1")
        if self.max_prompts < 0 or self.heldout_prompts < 0 or self.samples < 0:
            raise ConfigError(f"rejection.max_prompts ({self.max_prompts}), heldout_prompts ({self.heldout_prompts}) and "
                              f"samples ({self.samples}) must be >= 0")
        if not 0.0 <= self.heldout < 1.0:
            raise ConfigError(f"rejection.heldout = {self.heldout} must be in [0, 1)")
        if self.min_margin < 0:
            raise ConfigError(f"rejection.min_margin = {self.min_margin} must be >= 0")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"rejection.top_k ({self.top_k}) must be >= 0 and rejection.top_p ({self.top_p}) in (0, 1]")


# ---- prompts ----------------------------------------------------------------------------------


def prompt_from_record(record) -> tuple[dict | None, str | None]:
    """({"messages": prompt ending with a user turn, "meta": {...}}, None), or (None, why).

    `messages` (trailing assistant turns dropped; the last one kept as `meta["reference"]`) or
    `prompt` (a string, or a message list ending with a user turn); other keys go to `meta`."""
    if not isinstance(record, dict):
        return None, f"a line must be a JSON object, got {type(record).__name__}"
    meta = dict(record.get("meta") or {}) if isinstance(record.get("meta"), dict) else {}
    if "messages" in record:
        msgs = record["messages"]
        why = message_problem(msgs)
        if why:
            return None, why
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        while msgs and msgs[-1]["role"] == "assistant":
            meta.setdefault("reference", msgs.pop()["content"])
    elif "prompt" in record:
        p = record["prompt"]
        msgs = [{"role": "user", "content": p}] if isinstance(p, str) else p
        why = message_problem(msgs)
        if why:
            return None, f"'prompt': {why}"
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
    else:
        return None, "no 'messages' and no 'prompt'"
    if not msgs or msgs[-1]["role"] != "user":
        return None, "the prompt must end with a user message"
    for k, v in record.items():
        if k not in ("messages", "prompt", "meta", "chosen", "rejected", "completion", "source"):
            meta.setdefault(k, v)
    return {"messages": msgs, "meta": meta}, None


def read_prompts_jsonl(paths: Sequence[str | Path]) -> tuple[list[dict], dict]:
    """Prompt records from JSONL files and counts {lines, prompts, malformed, blank}. A malformed
    line is logged with file:line and skipped; a missing file or one without a usable prompt is an
    InputError."""
    from lmforge.posttrain.chat_data import read_jsonl_records

    out, stats = read_jsonl_records(paths, prompt_from_record, kind="prompt", missing="prompt file", noun="prompt",
                                    needs="'messages' or 'prompt' ending with a user turn")
    stats["prompts"] = len(out)
    return out, stats


def builtin_prompts(dictionary_paths: Sequence[str | Path], seed: int, n: int, holdout: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out) prompts: the built-in dictionary conversations with their last answer
    taken off (kept as `meta["reference"]`), the held-out ones from the held-out headwords."""
    from lmforge.posttrain.dictionary_chat import build_default_chat_set

    train, held = build_default_chat_set(dictionary_paths, seed=seed, n=max(n, 10), holdout=holdout)

    def strip(convs):
        out = []
        for c in convs:
            rec, _ = prompt_from_record(c)
            if rec is not None:
                out.append(rec)
        return out

    return strip(train), strip(held)


def load_prompts(cfg: RejectionConfig, seed: int, resolve=lambda p: Path(p)) -> tuple[list[dict], list[dict], dict]:
    """(prompts, held-out prompts, stats) as configured: users' files (held out: `eval_prompts`, else
    a seeded share of at most `heldout_prompts`, capped at a tenth of them) or the built-in questions."""
    stats: dict = {}
    if cfg.prompts:
        paths = [resolve(p) for p in cfg.prompts]
        recs, rstats = read_prompts_jsonl(paths)
        stats.update({f"read_{k}": v for k, v in rstats.items()})
        if cfg.eval_prompts:
            held, _ = read_prompts_jsonl([resolve(p) for p in cfg.eval_prompts])
        else:
            order = list(range(len(recs)))
            random.Random(f"{seed}:heldout").shuffle(order)
            k = min(cfg.heldout_prompts, len(recs) // 10)
            hold = set(order[:k])
            held = [r for i, r in enumerate(recs) if i in hold]
            recs = [r for i, r in enumerate(recs) if i not in hold]
        if cfg.max_prompts:
            recs = recs[: cfg.max_prompts]
        stats["source"] = ", ".join(str(p) for p in paths)
    else:
        from lmforge.posttrain.sft import BUNDLED_DICTIONARY

        if cfg.dictionary:
            d = resolve(cfg.dictionary)
            if not d.exists():
                raise InputError(f"rejection.dictionary: {d} not found")
            dpaths = sorted(d.glob("*.jsonl*")) if d.is_dir() else [d]
        else:
            dpaths = sorted(BUNDLED_DICTIONARY.glob("*.jsonl*"))
        want = cfg.max_prompts or 2000
        n_all = want
        if cfg.heldout:  # enough conversations for `want` training and `heldout_prompts` held-out prompts
            n_all = math.ceil(max(want / (1 - cfg.heldout), cfg.heldout_prompts / cfg.heldout))
        recs, held = builtin_prompts(dpaths, seed, n_all, cfg.heldout)
        recs = recs[:want]
        stats["source"] = "built-in dictionary questions from " + ", ".join(p.name for p in dpaths)
    held = held[: cfg.heldout_prompts]
    if not recs:
        raise InputError("rejection: no prompts to sample from")
    return recs, held, stats


# ---- choosing best and worst -------------------------------------------------------------------


def best_and_worst(completions: Sequence[str], scores: Sequence[float]) -> tuple[int | None, int | None]:
    """(index of the best, index of the worst) sample: the best is the highest-scored non-empty
    completion, the worst the lowest-scored one (empty included); ties go to the earlier sample;
    non-finite scores are left out. None where there is no candidate."""
    best = worst = None
    for i, (c, s) in enumerate(zip(completions, scores)):
        if s is None or not math.isfinite(s):
            continue
        if c.strip() and (best is None or s > scores[best]):
            best = i
        if worst is None or s < scores[worst]:
            worst = i
    return best, worst


def select(messages: list[dict], completions: Sequence[str], scores: Sequence[float], min_margin: float = 0.0
           ) -> tuple[dict | None, dict | None, str | None]:
    """(SFT record or None, DPO pair or None, why the pair was not kept or None) for one prompt."""
    b, w = best_and_worst(completions, scores)
    if b is None:
        return None, None, "no_answer"
    best = completions[b].strip()
    sft = {"messages": [*messages, {"role": "assistant", "content": best}], "meta": {"reward": scores[b]}}
    if w is None or w == b:
        return sft, None, "identical"
    worst = completions[w].strip()
    if worst == best:
        return sft, None, "identical"
    margin = scores[b] - scores[w]
    if margin <= min_margin:
        return sft, None, "dropped_margin"
    pair = {"prompt": messages, "chosen": best, "rejected": worst,
            "meta": {"chosen_reward": scores[b], "rejected_reward": scores[w], "margin": margin}}
    return sft, pair, None


# ---- the reward -------------------------------------------------------------------------------


def reward_scorer(rm, batch_size: int = 16) -> Scorer:
    """A `Scorer` (conversations -> floats) over a loaded reward model (`rm.load_reward_model`)."""

    def score(conversations: list[list[dict]]) -> list[float]:
        return [float(x) for x in rm.score(conversations, batch_size=batch_size)]

    return score


def _checksum(path: Path) -> str:
    state = read_json(path / "state.json", {}) or {}
    return ((state.get("checksums") or {}).get("model.safetensors") or "") if isinstance(state, dict) else ""


def _pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("rejection.device = 'cuda' but no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def _dtype(name: str, device: torch.device):
    if name == "bfloat16" or (name == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


@torch.no_grad()
def heldout_reward(model, tok, prompts: Sequence[dict], scorer: Scorer, max_new_tokens: int = 48
                   ) -> tuple[float | None, list[dict]]:
    """(mean reward of the greedy answers to `prompts`, the answers with their rewards); (None, [])
    without prompts."""
    from lmforge.posttrain.sft import chat_samples

    if not prompts:
        return None, []
    ctx = model.cfg.max_seq_len
    usable = [p for p in prompts if len(render_prompt(tok, p["messages"])) < ctx - 1]
    if not usable:
        return None, []
    answers = chat_samples(model, tok, [p["messages"] for p in usable], max_new_tokens)
    convs = [[*p["messages"], {"role": "assistant", "content": a["completion"].strip()}] for p, a in zip(usable, answers)]
    scores = [float(s) for s in scorer(convs)]
    finite = [s for s in scores if math.isfinite(s)]
    out = [{"prompt": p["messages"][-1]["content"], "completion": a["completion"].strip(), "reward": s,
            **({"reference": p["meta"]["reference"]} if p.get("meta", {}).get("reference") else {})}
           for p, a, s in zip(usable, answers, scores)]
    return (sum(finite) / len(finite) if finite else None), out


# ---- the stage's work -------------------------------------------------------------------------


@dataclass
class RejectionResult:
    out_dir: Path
    stats: dict = field(default_factory=dict)
    sft_path: Path | None = None
    pairs_path: Path | None = None
    samples: list[dict] = field(default_factory=list)
    heldout_answers: list[dict] = field(default_factory=list)
    policy: str = ""
    reward_model: str = ""
    reused: bool = False  # the finished output was found and returned without sampling
    resumed_chunks: int = 0  # chunks read back from an interrupted run


def _chunk_seed(seed: int, chunk: int) -> int:
    return random.Random(f"rejection:{seed}:{chunk}").getrandbits(62)


def _sample_chunk(model, tok, prompts: list[dict], cfg: RejectionConfig, scorer: Scorer, seed: int) -> list[dict]:
    """Every prompt of one chunk with its n completions and their scores."""
    from lmforge.infer.engine import SamplingParams, generate

    ids = [render_prompt(tok, p["messages"]) for p in prompts]
    params = SamplingParams(n=cfg.n, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                            max_new_tokens=cfg.max_new_tokens, seed=seed)
    outs = generate(model, ids, params, tokenizer=tok, max_batch=max(cfg.gen_batch, cfg.n))
    texts: list[list[str]] = [[] for _ in prompts]
    finish: list[list[str]] = [[] for _ in prompts]
    for o in outs:
        texts[o.prompt_index].append(tok.decode(o.token_ids, skip_special=True).strip())
        finish[o.prompt_index].append(o.finish_reason)
    convs = [[*p["messages"], {"role": "assistant", "content": t}] for p, ts in zip(prompts, texts) for t in ts]
    flat = [float(s) for s in scorer(convs)]
    if len(flat) != len(convs):
        raise InputError(f"the reward scorer returned {len(flat)} scores for {len(convs)} conversations")
    recs = []
    for i, p in enumerate(prompts):
        recs.append({"messages": p["messages"], "meta": p.get("meta", {}), "completions": texts[i],
                     "finish": finish[i], "scores": flat[i * cfg.n : (i + 1) * cfg.n]})
    return recs


def _read_chunk(path: Path, key: str) -> list[dict] | None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        head = json.loads(lines[0])
        if head.get("key") != key:
            return None
        return [json.loads(line) for line in lines[1:]]
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _finite_mean(xs) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def rejection_sample(cfg: RejectionConfig, out_dir: str | Path, *, policy: str | Path, reward_model: str | Path | None = None,
                     seed: int = 1234, tokenizer: str | Path | None = None, resolve=lambda p: Path(p),
                     scorer: Scorer | None = None, scorer_name: str = "", force: bool = False,
                     prompt_seed: int | None = None) -> RejectionResult:
    """Best-of-n sampling from the model at `policy`, scored by the reward model at `reward_model`
    (or by `scorer`, a callable conversations -> floats, named `scorer_name` in the key), into
    `out_dir` (sft.jsonl, pairs.jsonl, scored.jsonl, samples.json, stats.json). Resumes by chunks;
    returns the finished output as it is when its key matches (unless `force`). `seed` seeds the
    sampling; `prompt_seed` (default: `seed`) the built-in prompt set and the held-out split, so
    iterated rounds can sample afresh from the same prompts."""
    from lmforge.infer import load_model_and_tokenizer

    t0 = time.time()
    out_dir = Path(out_dir)
    if scorer is None and reward_model is None:
        raise ConfigError("rejection sampling needs a reward model (rejection.reward_model, or --rm PATH)")
    device = _pick_device(cfg.device)
    dtype = _dtype(cfg.dtype, device)
    model, tok, ref = load_model_and_tokenizer(policy, device=device, dtype=dtype, tokenizer=tokenizer)
    rm_desc = scorer_name or "callable"
    if scorer is None:
        from lmforge.model.io import resolve_model
        from lmforge.posttrain.rm import load_reward_model

        rm = load_reward_model(reward_model, device=device)
        if dtype is not None:
            rm.to(dtype)
        rp = Path(reward_model)
        if rp.is_dir() and not (rp / "model.safetensors").is_file() and (rp / "rm").is_dir():
            rp = rp / "rm"  # a run directory: its rm/ (as load_reward_model takes it)
        rpath = resolve_model(rp).path
        rm_desc = f"{rpath}:{_checksum(rpath)}"
        scorer = reward_scorer(rm, cfg.score_batch)
    prompts, held, stats = load_prompts(cfg, seed if prompt_seed is None else prompt_seed, resolve)
    key = fingerprint({"policy": f"{ref.path}:{_checksum(ref.path)}", "rm": rm_desc, "seed": seed,
                       "prompts": [p["messages"] for p in prompts], "heldout": [p["messages"] for p in held],
                       "sampling": [cfg.n, cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens, cfg.chunk,
                                    cfg.min_margin, cfg.dtype, device.type]})
    done = read_json(out_dir / "stats.json")
    if not force and isinstance(done, dict) and done.get("key") == key and all((out_dir / f).is_file() for f in OUTPUT_FILES):
        logger.info("rejection: %s is complete (same policy, reward model, prompts and settings): reused", out_dir)
        return RejectionResult(out_dir=out_dir, stats=done, sft_path=out_dir / "sft.jsonl", pairs_path=out_dir / "pairs.jsonl",
                               samples=read_json(out_dir / "samples.json", []), heldout_answers=done.get("heldout_answers", []),
                               policy=str(ref.path), reward_model=rm_desc, reused=True)

    ctx = model.cfg.max_seq_len
    usable, too_long = [], 0
    for p in prompts:
        if len(render_prompt(tok, p["messages"])) >= ctx - 1:
            too_long += 1
        else:
            usable.append(p)
    if not usable:
        raise InputError(f"rejection: every prompt is too long for the model's context ({ctx} tokens)")
    parts = out_dir / PARTS
    if force and parts.exists():
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    n_chunks = (len(usable) + cfg.chunk - 1) // cfg.chunk
    logger.info("rejection: %d prompts x %d samples from %s, scored by %s (%d chunks)", len(usable), cfg.n, ref.path,
                rm_desc, n_chunks)
    records: list[dict] = []
    resumed = 0
    for c in range(n_chunks):
        f = parts / f"chunk_{c:05d}.jsonl"
        got = _read_chunk(f, key) if f.is_file() else None
        if got is not None:
            resumed += 1
            logger.info("rejection: chunk %d/%d read back from %s", c + 1, n_chunks, f)
        else:
            got = _sample_chunk(model, tok, usable[c * cfg.chunk : (c + 1) * cfg.chunk], cfg, scorer, _chunk_seed(seed, c))
            atomic_write_text(f, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [{"key": key}, *got]))
            logger.info("rejection: chunk %d/%d sampled and scored", c + 1, n_chunks)
        records.extend(got)

    sft, pairs, counts = [], [], {"no_answer": 0, "identical": 0, "dropped_margin": 0}
    all_scores, bests, worsts = [], [], []
    nonfinite = 0
    for r in records:
        s, pair, why = select(r["messages"], r["completions"], r["scores"], cfg.min_margin)
        nonfinite += sum(1 for x in r["scores"] if not math.isfinite(x))
        all_scores += r["scores"]
        b, w = best_and_worst(r["completions"], r["scores"])
        r["best"], r["worst"] = b, w
        if b is not None:
            bests.append(r["scores"][b])
        if w is not None:
            worsts.append(r["scores"][w])
        if why:
            counts[why] += 1
        if s is not None:
            sft.append(s)
        if pair is not None:
            pairs.append(pair)

    h_mean, h_answers = heldout_reward(model, tok, held, scorer, cfg.max_new_tokens)
    samples = []
    for r in records[: cfg.samples]:
        b, w = r["best"], r["worst"]
        samples.append({"prompt": r["messages"][-1]["content"], "best": r["completions"][b] if b is not None else None,
                        "best_reward": r["scores"][b] if b is not None else None,
                        "worst": r["completions"][w] if w is not None else None,
                        "worst_reward": r["scores"][w] if w is not None else None, "scores": r["scores"]})
    stats.update({
        "prompts": len(records), "too_long": too_long, "n": cfg.n, "samples": sum(len(r["completions"]) for r in records),
        "empty": sum(1 for r in records for t in r["completions"] if not t),
        "length_stops": sum(1 for r in records for x in r["finish"] if x != "stop"), "nonfinite_scores": nonfinite,
        "mean_reward": _finite_mean(all_scores), "mean_best": _finite_mean(bests), "mean_worst": _finite_mean(worsts),
        "sft_examples": len(sft), "pairs": len(pairs), **counts, "min_margin": cfg.min_margin,
        "heldout_prompts": len(h_answers), "heldout_greedy_reward": h_mean, "heldout_answers": h_answers[:8],
        "policy": str(ref.path), "reward_model": rm_desc, "resumed_chunks": resumed, "wall_time_s": time.time() - t0,
    })
    out_dir.mkdir(parents=True, exist_ok=True)
    dump = lambda recs: "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in recs)  # noqa: E731
    atomic_write_text(out_dir / "sft.jsonl", dump(sft))
    atomic_write_text(out_dir / "pairs.jsonl", dump(pairs))
    atomic_write_text(out_dir / "scored.jsonl", dump(records))
    atomic_write_json(out_dir / "samples.json", samples)
    atomic_write_json(out_dir / "stats.json", {**stats, "key": key})  # last: marks the output complete
    shutil.rmtree(parts, ignore_errors=True)
    logger.info("rejection: %d prompts, mean reward %s, best-of-%d %s, worst %s; %d SFT examples, %d pairs (%d within the "
                "margin, %d identical)", len(records), _fmt(stats["mean_reward"]), cfg.n, _fmt(stats["mean_best"]),
                _fmt(stats["mean_worst"]), len(sft), len(pairs), counts["dropped_margin"], counts["identical"])
    return RejectionResult(out_dir=out_dir, stats=stats, sft_path=out_dir / "sft.jsonl", pairs_path=out_dir / "pairs.jsonl",
                           samples=samples, heldout_answers=h_answers, policy=str(ref.path), reward_model=rm_desc,
                           resumed_chunks=resumed)


def _fmt(v, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


__all__ = ["RejectionConfig", "RejectionResult", "rejection_sample", "read_prompts_jsonl", "prompt_from_record",
           "builtin_prompts", "load_prompts", "best_and_worst", "select", "heldout_reward", "reward_scorer"]
