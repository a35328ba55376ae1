"""Iterated rounds of rejection sampling and training (Llama 2 / 3 style): `run_rounds(cfg, out_dir, ...)`.

A recipe's `[rounds]` section:

    [rounds]
    rounds = 2                 # how many rounds
    train = "dpo"              # "dpo" (on the best/worst pairs) | "sft" (on best-of-n) | "rl" (the RM as reward)
    n = 8                      # samples per prompt
    prompts = []               # prompt JSONL; [] = the built-in dictionary questions (training split)
    retrain_rm = false         # retrain the reward model on fresh pairs at the start of each round
    [rounds.rejection]         # other rejection-sampling keys (temperature, max_new_tokens, min_margin, max_prompts, ...)
    [rounds.dpo]               # overrides of the recipe's [dpo] section for every round's training
    max_steps = 50
    [rounds.sft] / [rounds.rl] / [rounds.rm]   # likewise

Round r (1-based), from policy_r (round 1: the run's SFT model or `rounds.base`) and the reward
model (the run's rm/ or `rounds.reward_model`):

1. with `retrain_rm`: a reward model trained from policy_r (`run_rm`, the recipe's [rm] section
   merged with [rounds.rm]) on the built-in or configured pairs, half of whose rejected answers are
   sampled from policy_r unless `rm.sampled` says otherwise: "fresh" pairs on the current policy's
   mistakes; it scores this round and is the next round's starting RM;
2. rejection sampling with policy_r and the RM (posttrain/rejection.py): best-of-n SFT data and
   best/worst pairs; the prompts (and the held-out prompts) are the same every round, the samples
   are drawn with a per-round seed;
3. the next policy trained from policy_r: DPO on the pairs, SFT on the best-of-n data, or RL
   (`rl.reward = "rm:..."`, the prompts and held-out prompts of step 2 written as JSONL).

Layout (`out_dir` is the run's `rounds/`):

    rounds/round_1/data/        sft.jsonl pairs.jsonl scored.jsonl samples.json stats.json (prompts.jsonl for RL)
    rounds/round_1/rm/          only with retrain_rm (the rm stage's layout)
    rounds/round_1/dpo/         (or sft/ or rl/) the trainer's step_N/ + latest layout
    rounds/round_1/round.json   the round's marker: key, policy, reward model, model, figures
    rounds/latest               the newest finished round's model, relative to rounds/ (e.g.
                                "round_2/dpo/step_000050"): `lmforge generate runs/NAME/rounds` loads it
    rounds/final.json           the final policy's greedy held-out reward

Resume: a round whose `round.json` key matches (same starting policy chain, settings and seed) is
skipped; the running one resumes inside: rejection sampling by its finished chunks, training by the
trainer's own checkpoints. A round whose marker key differs (changed settings) is recomputed from
scratch, and so are the rounds after it (their keys chain).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lmforge import config as cfgmod
from lmforge.errors import ConfigError, InputError
from lmforge.log import logger
from lmforge.rundir import atomic_write_json, atomic_write_text, fingerprint, read_json

TRAIN_KINDS = ("dpo", "sft", "rl")
# keys of the per-round sections that the rounds set themselves
_SET_BY_ROUNDS = {"rejection": ("policy", "reward_model", "prompts", "eval_prompts", "n", "seed", "name"),
                  "dpo": ("base", "data", "name"), "sft": ("base", "data", "name"), "rl": ("base", "data", "reward", "name"),
                  "rm": ("base", "name")}


@dataclass
class RoundsConfig:
    base: str = ""  # the starting policy ("" = the run's SFT model); any path lmforge generate takes
    reward_model: str = ""  # the reward model ("" = the run's rm/)
    tokenizer: str = ""  # "" = the policy's
    rounds: int = 2
    train: Literal["dpo", "sft", "rl"] = "dpo"
    retrain_rm: bool = False
    n: int = 8  # samples per prompt
    prompts: list[str] = field(default_factory=list)  # prompt JSONL; [] = the built-in dictionary questions
    eval_prompts: list[str] = field(default_factory=list)  # held-out prompt JSONL ([] = the built-in held-out split)
    seed: int | None = None  # None = the run's seed
    rejection: dict[str, Any] = field(default_factory=dict)  # rejection-sampling keys (posttrain/rejection.py)
    sft: dict[str, Any] = field(default_factory=dict)  # overrides of [sft] for every round
    dpo: dict[str, Any] = field(default_factory=dict)  # overrides of [dpo]
    rl: dict[str, Any] = field(default_factory=dict)  # overrides of [rl]
    rm: dict[str, Any] = field(default_factory=dict)  # overrides of [rm] (with retrain_rm)

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds.rounds = {self.rounds} must be >= 1")
        for section, keys in _SET_BY_ROUNDS.items():
            bad = [k for k in getattr(self, section) if k in keys]
            if bad:
                raise ConfigError(f"rounds.{section}.{bad[0]} is set by the rounds themselves; "
                                  f"set rounds.base / rounds.reward_model / rounds.prompts / rounds.n instead")
        self.rejection_config()
        for kind in ("dpo", "sft", "rl", "rm"):
            section_config(kind, {}, getattr(self, kind), f"rounds.{kind}")

    def rejection_config(self):
        from lmforge.posttrain.rejection import RejectionConfig

        return cfgmod.build(RejectionConfig, {**self.rejection, "n": self.n, "prompts": self.prompts,
                                              "eval_prompts": self.eval_prompts}, "rounds.rejection")


def _merge(a: dict, b: dict) -> dict:
    """`a` with `b` laid over it, sub-tables merged key by key."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _config_class(kind: str):
    if kind == "dpo":
        from lmforge.posttrain.dpo import DPOConfig

        return DPOConfig
    if kind == "sft":
        from lmforge.posttrain.config import SFTConfig

        return SFTConfig
    if kind == "rl":
        from lmforge.posttrain.rl import RLConfig

        return RLConfig
    from lmforge.posttrain.rm import RMConfig

    return RMConfig


def section_config(kind: str, recipe_section: dict, overrides: dict, where: str, **fixed):
    """The validated config of a round's `kind` stage: the recipe's section, the rounds' overrides
    over it, then the keys the rounds set (`fixed`)."""
    merged = _merge(recipe_section or {}, overrides or {})
    for k in _SET_BY_ROUNDS[kind]:
        merged.pop(k, None)
    merged.update(fixed)
    return cfgmod.build(_config_class(kind), merged, where)


# ---- results ----------------------------------------------------------------------------------


@dataclass
class RoundsResult:
    out_dir: Path
    rounds: list[dict] = field(default_factory=list)  # each round's marker (round.json) + "skipped"
    final_model: Path | None = None
    final_heldout_reward: float | None = None
    final_answers: list[dict] = field(default_factory=list)
    train: str = "dpo"
    wall_time_s: float = 0.0


def _rel(p: Path, root: Path) -> str:
    p = Path(p).resolve()
    try:
        return p.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(p)


def _abs(s: str, root: Path) -> Path:
    p = Path(s)
    return p if p.is_absolute() else root / p


def rm_dir(path: str | Path) -> Path:
    """A reward model path as `rm.load_reward_model` takes it: a run directory stands for its rm/."""
    p = Path(path)
    if p.is_dir() and not (p / "model.safetensors").is_file() and (p / "rm").is_dir():
        return p / "rm"
    return p


def _weights_id(path: Path) -> str:
    from lmforge.model.io import resolve_model

    ref = resolve_model(path)
    state = read_json(ref.path / "state.json", {}) or {}
    return f"{ref.path}:{((state.get('checksums') or {}).get('model.safetensors') or '')}"


def _headline(kind: str, res) -> dict:
    if kind == "dpo":
        return {"steps": res.steps, "final_loss": res.final_loss, "heldout_accuracy_before": res.before.get("heldout_accuracy"),
                "heldout_accuracy": res.after.get("heldout_accuracy"), "heldout_margin": res.after.get("heldout_margin"),
                "pairs": res.data_stats.get("examples"), "resumed_from": res.resumed_from}
    if kind == "sft":
        return {"steps": res.steps, "final_loss": res.final_loss, "examples": res.data_stats.get("examples"),
                "resumed_from": res.resumed_from}
    if kind == "rl":
        return {"steps": res.steps, "rollouts": res.rollouts, "reward_mean": res.last_record.get("reward_mean"),
                "heldout_reward_before": res.accuracy_before, "heldout_reward": res.accuracy_after,
                "resumed_from": res.resumed_from}
    return {"steps": res.steps, "final_loss": res.final_loss, "heldout_accuracy": res.heldout_accuracy,
            "resumed_from": res.resumed_from}


def _write_prompts(path: Path, recs: list[dict]) -> Path:
    atomic_write_text(path, "".join(json.dumps({"messages": r["messages"], "meta": r.get("meta", {})}, ensure_ascii=False) + "\n"
                                    for r in recs))
    return path


def _run_round(r: int, rdir: Path, policy: Path, rm_path: Path | None, cfg: RoundsConfig, sections: dict, seed: int,
               resolve, scorer, key: str, out_dir: Path) -> dict:
    from lmforge.posttrain.rejection import load_prompts, rejection_sample

    t0 = time.time()
    rdir.mkdir(parents=True, exist_ok=True)
    tok = resolve(cfg.tokenizer) if cfg.tokenizer else None
    info: dict = {"round": r, "key": key, "policy": _rel(policy, out_dir), "train_kind": cfg.train}
    if cfg.retrain_rm:
        from lmforge.posttrain.rm import run_rm

        rm_sec = _merge({"sampled": 0.5}, sections.get("rm") or {})
        rm_cfg = section_config("rm", rm_sec, cfg.rm, "rounds.rm")
        logger.info("rounds: round %d: retraining the reward model from %s", r, policy)
        res = run_rm(rm_cfg, rdir / "rm", base=policy, seed=seed + r, tokenizer=tok, resolve=resolve)
        if res.checkpoint is None:
            raise InputError(f"rounds: round {r}'s reward model wrote no checkpoint (rounds.rm.max_steps?)")
        rm_path = res.checkpoint
        scorer = None  # the retrained model scores from here on
        info["rm_train"] = _headline("rm", res)
    info["reward_model"] = _rel(rm_path, out_dir) if rm_path is not None else "callable"
    rej_cfg = cfg.rejection_config()
    logger.info("rounds: round %d: rejection sampling (%d per prompt) from %s", r, cfg.n, policy)
    rej = rejection_sample(rej_cfg, rdir / "data", policy=policy, reward_model=rm_path, seed=seed + 1000 * r, tokenizer=tok,
                           resolve=resolve, scorer=scorer, scorer_name="callable" if scorer else "", prompt_seed=seed)
    keep = ("prompts", "samples", "mean_reward", "mean_best", "mean_worst", "pairs", "sft_examples", "dropped_margin",
            "identical", "no_answer", "heldout_greedy_reward", "heldout_prompts")
    info["rejection"] = {k: rej.stats.get(k) for k in keep}
    data = rdir / "data"
    kind = cfg.train
    if kind == "dpo":
        from lmforge.posttrain.dpo import run_dpo

        if not rej.stats.get("pairs"):
            raise InputError(f"rounds: round {r} kept no preference pair ({rej.stats.get('dropped_margin', 0)} within "
                             f"rejection.min_margin, {rej.stats.get('identical', 0)} identical): raise rounds.n or the "
                             "sampling temperature, or lower rounds.rejection.min_margin")
        tcfg = section_config("dpo", sections.get("dpo"), cfg.dpo, "rounds.dpo", data=[str(data / "pairs.jsonl")])
        res = run_dpo(tcfg, rdir / "dpo", base=policy, seed=seed + r, tokenizer=tok, resolve=resolve)
    elif kind == "sft":
        from lmforge.posttrain.sft import run_sft

        if not rej.stats.get("sft_examples"):
            raise InputError(f"rounds: round {r} gave no best-of-n answer to train on (every sample was empty)")
        tcfg = section_config("sft", sections.get("sft"), cfg.sft, "rounds.sft", data=[str(data / "sft.jsonl")])
        res = run_sft(tcfg, rdir / "sft", base=policy, seed=seed + r, tokenizer=tok, resolve=resolve)
    else:
        from lmforge.posttrain.rl import run_rl

        if rm_path is None:
            raise ConfigError("rounds.train = 'rl' needs a reward model on disk (not a scorer function)")
        recs, held, _ = load_prompts(rej_cfg, seed, resolve)
        fixed = {"data": [str(_write_prompts(data / "prompts.jsonl", recs))], "reward": f"rm:{rm_path}"}
        if held:
            fixed["eval_data"] = [str(_write_prompts(data / "heldout_prompts.jsonl", held))]
        tcfg = section_config("rl", sections.get("rl"), cfg.rl, "rounds.rl", **fixed)
        res = run_rl(tcfg, rdir / "rl", base=policy, seed=seed + r, tokenizer=tok, resolve=resolve)
    if res.checkpoint is None:
        raise InputError(f"rounds: round {r}'s {kind} training wrote no checkpoint (rounds.{kind}.max_steps?)")
    info["train"] = _headline(kind, res)
    info["model"] = _rel(res.checkpoint, out_dir)
    info["wall_time_s"] = time.time() - t0
    return info


def run_rounds(cfg: RoundsConfig, out_dir: str | Path, *, base: str | Path, reward_model: str | Path | None = None,
               seed: int = 1234, sections: dict | None = None, resolve=lambda p: Path(p), force: bool = False,
               scorer=None) -> RoundsResult:
    """Run `cfg.rounds` rounds from the policy at `base` with the reward model at `reward_model` (or
    `scorer`, a callable conversations -> floats, for tests) into `out_dir`. `sections` are the
    recipe's {"sft", "dpo", "rl", "rm"} sections the per-round overrides lay over. Finished rounds
    (matching markers) are skipped; `force` recomputes every round."""
    from lmforge.model.io import resolve_model

    t0 = time.time()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = sections or {}
    if reward_model is None and scorer is None:
        raise ConfigError("rounds need a reward model (rounds.reward_model, or the run's rm stage)")
    policy = resolve_model(base).path
    rm_path = rm_dir(reward_model) if reward_model is not None else None
    effective = {k: cfgmod.to_dict(section_config(k, sections.get(k), getattr(cfg, k), f"rounds.{k}"))
                 for k in ("dpo", "sft", "rl", "rm")}
    settings = {k: v for k, v in cfgmod.to_dict(cfg).items() if k not in ("rounds", "dpo", "sft", "rl", "rm")}
    prev = fingerprint({"base": _weights_id(policy), "rm": _weights_id(rm_path) if rm_path is not None else "callable"})
    result = RoundsResult(out_dir=out_dir, train=cfg.train)
    for r in range(1, cfg.rounds + 1):
        rdir = out_dir / f"round_{r}"
        key = fingerprint({"prev": prev, "round": r, "settings": settings, "trainer": effective[cfg.train],
                           "rm": effective["rm"] if cfg.retrain_rm else None, "seed": seed})
        marker = read_json(rdir / "round.json")
        if (not force and isinstance(marker, dict) and marker.get("key") == key
                and (_abs(marker.get("model", ""), out_dir) / "model.safetensors").is_file()):
            logger.info("rounds: round %d is complete (marker matches): skipped", r)
            info = {**marker, "skipped": True}
        else:
            if rdir.exists() and (force or isinstance(marker, dict)):
                logger.info("rounds: round %d was made with other settings%s: recomputed", r, " (--force)" if force else "")
                shutil.rmtree(rdir)
            info = _run_round(r, rdir, policy, rm_path, cfg, sections, seed, resolve, scorer, key, out_dir)
            atomic_write_json(rdir / "round.json", info)
            info = {**info, "skipped": False}
        result.rounds.append(info)
        policy = _abs(info["model"], out_dir)
        if info.get("reward_model") not in (None, "callable"):
            rm_path = _abs(info["reward_model"], out_dir)
            if info.get("rm_train"):
                scorer = None
        prev = key
        atomic_write_text(out_dir / "latest", info["model"] + "\n")
    result.final_model = policy
    final = read_json(out_dir / "final.json")
    if not force and isinstance(final, dict) and final.get("key") == prev:
        result.final_heldout_reward, result.final_answers = final.get("heldout_greedy_reward"), final.get("answers", [])
    else:
        result.final_heldout_reward, result.final_answers = _final_eval(cfg, policy, rm_path, scorer, seed, resolve)
        atomic_write_json(out_dir / "final.json", {"key": prev, "model": _rel(policy, out_dir),
                                                   "heldout_greedy_reward": result.final_heldout_reward,
                                                   "answers": result.final_answers[:8]})
    result.wall_time_s = time.time() - t0
    return result


def _final_eval(cfg: RoundsConfig, policy: Path, rm_path: Path | None, scorer, seed: int, resolve):
    """The final policy's greedy answers to the held-out prompts, scored by the last reward model."""
    import torch

    from lmforge.infer import load_model_and_tokenizer
    from lmforge.posttrain.rejection import _dtype, _pick_device, heldout_reward, load_prompts, reward_scorer

    rej_cfg = cfg.rejection_config()
    _, held, _ = load_prompts(rej_cfg, seed, resolve)
    if not held:
        return None, []
    device = _pick_device(rej_cfg.device)
    dtype = _dtype(rej_cfg.dtype, device)
    model, tok, _ = load_model_and_tokenizer(policy, device=device, dtype=dtype,
                                             tokenizer=resolve(cfg.tokenizer) if cfg.tokenizer else None)
    if scorer is None:
        from lmforge.posttrain.rm import load_reward_model

        rm = load_reward_model(rm_path, device=device)
        if dtype is not None:
            rm.to(dtype)
        scorer = reward_scorer(rm, rej_cfg.score_batch)
    with torch.no_grad():
        return heldout_reward(model, tok, held, scorer, rej_cfg.max_new_tokens)


__all__ = ["RoundsConfig", "RoundsResult", "run_rounds", "section_config", "rm_dir", "TRAIN_KINDS"]
