"""On-policy RL on the shared trainer: GRPO, RLOO, REINFORCE, and PPO with a value head and GAE.

`run_rl(cfg, out_dir, base=..., seed=...)` fine-tunes a chat model (or a base model) on prompts
scored by a reward (posttrain/rewards.py: the built-in task's exact answer, a user's Python
function, or a reward model). Like SFT it is a batch source + a loss on
`lmforge.train.trainer.fit`, so checkpoints, resume, metrics, progress and the NaN stop are the
trainer's.

One rollout (`RolloutSource._rollout`):
1. the next `prompts_per_step` prompts in a seeded per-epoch order, rendered with the chat template;
2. `group_size` (G) completions per prompt from the *current* policy through the generation engine
   (n samples per prompt share one prefill; a row stops at `<|end|>`, which is kept as the last
   response token so the policy learns to stop); the generator's seed is derived from the run seed
   and the rollout number, so a resumed run regenerates identical rollouts;
3. rewards (a failed reward function scored or skipped as configured); a NaN reward stops the run
   (`RewardNaN`, naming the step, before the weights change); `stall_steps` rollouts in a row where
   every group has one reward (nothing to learn from) stop it too (`NoLearningSignal`);
4. the old log-probs (and the reference's, when `kl_coef > 0`; PPO: the old values) in one no-grad
   pass — skipped when each rollout feeds exactly one update (not PPO, `ppo_epochs = minibatches = 1`:
   the old log-probs are the update's own, detached, and the ratio is 1; TRL skips it likewise for
   `num_iterations = 1`); then the advantages:
   * grpo: group-normalised `(r - mean_g) / (std_g + eps)` (`scale_rewards = false`: `r - mean_g`);
   * rloo: leave-one-out `r_i - mean_{j != i} r_j`;
   * reinforce: `r - b`, b a moving average of the mean reward (`baseline = "ema"`) or the group mean;
   * ppo: per-token rewards `-kl_coef (logp - logp_ref)` plus the sequence reward on the last response
     token, GAE(gamma, lam) advantages and returns from the value head's estimates, advantages
     whitened over the rollout's response tokens.

How trainer steps map to rollouts: one trainer step is one optimizer update on one minibatch. A
rollout of `prompts_per_step * group_size` samples is split into `minibatches` minibatches and
gone over `ppo_epochs` times (rows shuffled per epoch, seeded), so one rollout feeds
`ppo_epochs * minibatches` consecutive steps and the next step after that generates a new rollout.
With both 1 (the default) every step generates, and the clipped ratio is 1: plain policy gradient.
`grad_accum` stays 1 (a minibatch is the unit of an update; lower `minibatches` for larger ones).

The loss (`rl_loss`): PPO's clipped surrogate `-min(ratio A, clip(ratio, 1 +- clip_eps) A)` over
response tokens (mean over tokens, or per sequence then over sequences: `loss_agg`); grpo / rloo /
reinforce add `kl_coef * KL` with the k3 estimator `exp(ref - logp) - (ref - logp) - 1` as in GRPO;
ppo adds `vf_coef *` the clipped value loss. Logged per step: reward mean / std, KL to the reference,
clip fraction, response length, the sampled-token entropy estimate (mean -log p of the sampled
tokens), failed / skipped rewards, and for PPO the value loss and explained variance.

The value head (PPO) is a `Linear(d_model, 1)` on the policy's final hidden states (the same pass as
the log-probs: `token_logprobs(..., return_hidden=True)`), attached to the model from outside as
`model.value_head`, its weight kept as a vector so the optimizers treat it like a norm (AdamW, no
weight decay). Checkpoints: model.safetensors is the plain policy (every consumer loads it without
RL code); value_head.safetensors holds the head (checksummed, restored on resume).

RL runs in one process (a single device); data-parallel RL is not implemented.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn

from lmforge import config as cfgmod
from lmforge.errors import ConfigError, InputError
from lmforge.log import logger
from lmforge.rundir import atomic_write_json, atomic_write_text, read_json
from lmforge.tokenizer.chat import check_template, render_prompt, template_id
from lmforge.train import checkpoint as ck
from lmforge.train import trainer as T
from lmforge.train.config import TrainerConfig, check_trainer_fields

BUNDLED_DICTIONARY = Path(__file__).resolve().parents[1] / "sample" / "dictionary"
ALGORITHMS = ("grpo", "rloo", "reinforce", "ppo")


class RewardNaN(InputError):
    """A reward was NaN or infinite: the run stops before the weights change."""


class NoLearningSignal(InputError):
    """Every group had one reward for `stall_steps` rollouts in a row: nothing to learn from."""


# ---- configuration ----------------------------------------------------------------------------


@dataclass
class RLConfig(TrainerConfig):
    name: str = ""  # output sub-directory of rl/ ("" = the run's name)
    base: str = ""  # the policy to start from ("" = the run's latest SFT model); any path lmforge generate takes
    tokenizer: str = ""  # "" = the base model's
    algorithm: Literal["grpo", "rloo", "reinforce", "ppo"] = "grpo"
    reward: str = "choice"  # "choice" (exact + partial credit) | "exact" | "module:function" | "file.py:function" | "rm:PATH"
    reward_on_error: float | Literal["skip"] = 0.0  # score of a failed reward call, or "skip" the sample
    data: list[str] = field(default_factory=list)  # prompt JSONL ({"prompt" or "messages", other fields -> meta}); [] = built-in task
    eval_data: list[str] = field(default_factory=list)  # held-out prompt JSONL; [] = `heldout` of data split off
    dictionary: str = ""  # GCIDE JSONL for the built-in task ("" = the bundled sample's)
    prompts: int = 2000  # training prompts of the built-in task (at most)
    heldout: float = 0.1  # held-out share (built-in: by headword, as SFT's split; users' data without eval_data: random)
    eval_prompts: int = 100  # held-out prompts scored greedily for the task accuracy (0 = none)
    prompts_per_step: int = 8  # prompts per rollout
    group_size: int = 4  # completions per prompt (G)
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 16
    gen_batch: int = 64  # rows (prompts x G) decoded together
    ppo_epochs: int = 1  # passes over each rollout
    minibatches: int = 1  # optimizer updates per pass
    clip_eps: float = 0.2
    kl_coef: float = 0.0  # KL to the frozen reference (the base model); 0 = off (no reference forward)
    scale_rewards: bool = True  # grpo: divide by the group's std
    std_eps: float = 1e-4
    baseline: Literal["ema", "group"] = "ema"  # reinforce
    baseline_decay: float = 0.9
    loss_agg: Literal["token", "sequence"] = "token"
    gamma: float = 1.0  # ppo: GAE discount
    lam: float = 0.95  # ppo: GAE lambda
    vf_coef: float = 0.1  # ppo: value loss weight
    value_clip: float = 0.2  # ppo: value clipping range (0 = unclipped)
    whiten_advantages: bool = True  # ppo
    stall_steps: int = 20  # stop after this many rollouts in a row without a learning signal (0 = never)
    eval_tokens: int = 16  # max new tokens of the held-out greedy answers
    # trainer defaults for RL (keys as in [pretrain])
    max_steps: int = 60
    optimizer: Literal["muon", "adamw"] = "adamw"
    lr: float = 3e-4
    schedule: Literal["wsd", "cosine", "constant"] = "constant"
    warmup_steps: int = 0
    checkpoint_every: int = 20
    eval_every: int = 30
    log_every: int = 1

    RESUME_FREE = TrainerConfig.RESUME_FREE + ("name", "eval_prompts", "eval_tokens", "stall_steps")

    def validate(self) -> None:
        check_trainer_fields(self, "rl")
        if self.grad_accum != 1:
            raise ConfigError("rl.grad_accum must be 1: one step is one update on one rollout minibatch "
                              "(use rl.minibatches / rl.prompts_per_step to size the updates)")
        for k in ("prompts_per_step", "group_size", "max_new_tokens", "gen_batch", "ppo_epochs", "minibatches"):
            if getattr(self, k) < 1:
                raise ConfigError(f"rl.{k} must be >= 1, got {getattr(self, k)}")
        if self.algorithm in ("grpo", "rloo") and self.group_size < 2:
            raise ConfigError(f"rl.algorithm = {self.algorithm!r} compares samples within a group: rl.group_size must be >= 2")
        if self.minibatches > self.prompts_per_step * self.group_size:
            raise ConfigError(f"rl.minibatches = {self.minibatches} is more than the {self.prompts_per_step * self.group_size} "
                              "samples of a rollout")
        if not self.temperature > 0:
            raise ConfigError(f"rl.temperature must be > 0 (rollouts are sampled), got {self.temperature}")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ConfigError("rl.top_p must be in (0, 1] and rl.top_k >= 0")
        if not self.clip_eps > 0:
            raise ConfigError(f"rl.clip_eps must be > 0, got {self.clip_eps}")
        for k in ("kl_coef", "vf_coef", "value_clip", "std_eps", "stall_steps", "eval_prompts", "prompts"):
            if getattr(self, k) < 0:
                raise ConfigError(f"rl.{k} must be >= 0, got {getattr(self, k)}")
        for k in ("gamma", "lam", "baseline_decay"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise ConfigError(f"rl.{k} must be in [0, 1], got {getattr(self, k)}")
        if not 0.0 <= self.heldout < 1.0:
            raise ConfigError(f"rl.heldout = {self.heldout} must be in [0, 1)")
        if self.reward_on_error != "skip" and not math.isfinite(self.reward_on_error):
            raise ConfigError(f"rl.reward_on_error = {self.reward_on_error} must be a finite number or \"skip\"")
        if not self.reward.strip():
            raise ConfigError("rl.reward is empty: 'exact', 'module:function', 'file.py:function' or 'rm:PATH'")

    def trainer_config(self) -> TrainerConfig:
        return TrainerConfig.from_fields(self)


# ---- advantages -----------------------------------------------------------------------------


def _group_stats(r: torch.Tensor, valid: torch.Tensor):
    n = valid.sum(-1, keepdim=True)
    mean = (r * valid).sum(-1, keepdim=True) / n.clamp(min=1)
    return n, mean


def grpo_advantages(rewards: torch.Tensor, valid: torch.Tensor | None = None, scale: bool = True,
                    eps: float = 1e-4) -> torch.Tensor:
    """(P, G) rewards -> `(r - mean_g) / (std_g + eps)` per group (unbiased std over the group's valid
    samples), or `r - mean_g` without `scale`. Invalid (skipped) samples and groups with fewer than
    two valid samples get 0."""
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    v = valid.to(rewards.dtype)
    n, mean = _group_stats(rewards, v)
    adv = rewards - mean
    if scale:
        var = ((adv * v) ** 2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)
        denom = var.sqrt() + eps
        adv = torch.where(denom > 0, adv / denom.clamp(min=1e-30), torch.zeros_like(adv))  # one reward: 0, not 0/0
    return adv * v * (n >= 2)


def rloo_advantages(rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(P, G) rewards -> leave-one-out `r_i - mean_{j != i} r_j` over the group's valid samples."""
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    v = valid.to(rewards.dtype)
    n = v.sum(-1, keepdim=True)
    total = (rewards * v).sum(-1, keepdim=True)
    others = (total - rewards) / (n - 1).clamp(min=1)
    return (rewards - others) * v * (n >= 2)


def reinforce_advantages(rewards: torch.Tensor, valid: torch.Tensor | None = None, baseline: float | None = None
                         ) -> torch.Tensor:
    """`r - baseline` (a moving average kept by the caller), or `r - mean_g` when `baseline` is None."""
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    v = valid.to(rewards.dtype)
    if baseline is None:
        _, mean = _group_stats(rewards, v)
        return (rewards - mean) * v
    return (rewards - baseline) * v


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, T) per-token rewards and value estimates, on the
    positions where `mask` is 1 (one contiguous response per row; the value after its last token is
    0). Returns (advantages, returns = advantages + values), 0 outside the mask."""
    m = mask.to(values.dtype)
    v = values * m
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])
    T_ = v.shape[1]
    for t in range(T_ - 1, -1, -1):
        nxt = v[:, t + 1] if t + 1 < T_ else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * nxt - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + v) * m


def masked_mean(x: torch.Tensor, mask: torch.Tensor, agg: str = "token") -> torch.Tensor:
    """Mean of `x` over mask: over all tokens ("token"), or per row then over rows with any token ("sequence")."""
    m = mask.to(x.dtype)
    if agg == "sequence":
        per = (x * m).sum(-1) / m.sum(-1).clamp(min=1)
        has = (m.sum(-1) > 0).to(x.dtype)
        return (per * has).sum() / has.sum().clamp(min=1)
    return (x * m).sum() / m.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """`x` shifted and scaled to mean 0, std 1 over the masked positions (0 elsewhere)."""
    m = mask.to(x.dtype)
    mean = masked_mean(x, m)
    var = masked_mean((x - mean) ** 2, m)
    return (x - mean) * torch.rsqrt(var + eps) * m


# ---- losses ---------------------------------------------------------------------------------


def clipped_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                        clip_eps: float, agg: str = "token") -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate `-min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)`, ratio =
    exp(logp - old_logp), averaged over the masked tokens; and the fraction of tokens where the
    clipped term was the one taken."""
    ratio = torch.exp(logp - old_logp)
    a = ratio * adv
    b = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv
    loss = masked_mean(-torch.minimum(a, b), mask, agg)
    clipped = masked_mean((b < a).to(logp.dtype), mask)
    return loss, clipped.detach()


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate `exp(ref - logp) - (ref - logp) - 1` (>= 0; GRPO's k3)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> torch.Tensor:
    """PPO's clipped value loss `0.5 max((v - R)^2, (v_clip - R)^2)`, v_clip = old + clip(v - old, +-clip)
    (unclipped when clip is 0), averaged over the masked tokens."""
    err = (values - returns) ** 2
    if clip > 0:
        vc = old_values + (values - old_values).clamp(-clip, clip)
        err = torch.maximum(err, (vc - returns) ** 2)
    return 0.5 * masked_mean(err, mask)


def explained_variance(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(target - pred) / Var(target) over the masked positions."""
    m = mask.to(target.dtype)
    mt = masked_mean(target, m)
    var_t = masked_mean((target - mt) ** 2, m)
    d = target - pred
    var_d = masked_mean((d - masked_mean(d, m)) ** 2, m)
    return 1.0 - var_d / var_t.clamp(min=1e-8)


# ---- the value head -------------------------------------------------------------------------


class ValueHead(nn.Module):
    """Linear(d_model, 1) on the final hidden states; the weight stored as a (d_model,) vector."""

    def __init__(self, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d_model))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.float() @ self.weight.float() + self.bias.float()


def _core(model: nn.Module) -> nn.Module:
    """The Transformer inside a compiled / wrapped module."""
    m = model
    while not hasattr(m, "token_logprobs"):
        m = getattr(m, "_orig_mod", None) or getattr(m, "module")
    return m


# ---- rollouts -------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One rollout's tensors (rows = prompts x G in prompt order): inputs x, targets y (-100 off the
    response), response mask, old log-probs, per-token advantages; reference log-probs when the KL
    is on; PPO's old values and returns. `stats`: floats logged with every step it feeds."""

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor
    adv: torch.Tensor
    ref_logp: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    stats: dict = field(default_factory=dict)
    # each rollout feeds exactly one update (ppo_epochs = minibatches = 1, not PPO): the old log-probs are
    # the update's own, detached (the ratio is 1), so the no-grad pass that would compute them is skipped
    on_policy: bool = False

    TENSORS = ("x", "y", "mask", "old_logp", "adv", "ref_logp", "old_values", "returns")

    def rows(self, idx: torch.Tensor) -> "Rollout":
        """The rows `idx`, trimmed to the longest of their sequences."""
        sub = {k: (getattr(self, k)[idx] if getattr(self, k) is not None else None) for k in self.TENSORS}
        valid_t = (sub["y"] != -100).any(0).nonzero()
        T_ = int(valid_t.max()) + 1 if valid_t.numel() else 1
        sub = {k: (v[:, :T_] if v is not None else None) for k, v in sub.items()}
        return Rollout(**sub, stats=self.stats, on_policy=self.on_policy)

    def to_json(self) -> dict:
        out = {"stats": self.stats, "on_policy": self.on_policy}
        for k in self.TENSORS:
            t = getattr(self, k)
            out[k] = None if t is None else {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                                              "data": t.detach().cpu().flatten().tolist()}
        return out

    @classmethod
    def from_json(cls, d: dict, device) -> "Rollout":
        kw = {}
        for k in cls.TENSORS:
            v = d.get(k)
            kw[k] = None if v is None else torch.tensor(v["data"], dtype=getattr(torch, v["dtype"]), device=device).view(v["shape"])
        return cls(**kw, stats=dict(d.get("stats", {})), on_policy=bool(d.get("on_policy", False)))


@dataclass
class PromptSet:
    """Prompt records ({"messages", "meta"}) with their rendered ids."""

    records: list[dict]
    ids: list[list[int]]


def prepare_prompts(tok, records: list[dict], max_len: int) -> tuple[PromptSet, int]:
    """Render each record's conversation for completion; drop (and count) those that leave no room
    for an answer in `max_len` tokens."""
    keep, ids, dropped = [], [], 0
    for r in records:
        p = render_prompt(tok, r["messages"])
        if len(p) >= max_len - 1:
            dropped += 1
            continue
        keep.append(r)
        ids.append(p)
    return PromptSet(keep, ids), dropped


class RolloutSource:
    """The trainer's batch source: generates a rollout from the current policy when the previous one
    is used up, then hands out its minibatches (see the module docstring for the step mapping). Its
    state (prompt-order epoch and position, rollouts made, the REINFORCE baseline, the stall count,
    and a partly used rollout) travels in every checkpoint."""

    def __init__(self, model: nn.Module, tok, prompts: PromptSet, scorer, cfg: RLConfig, seed: int, runtime,
                 ref: nn.Module | None = None, out_dir: Path | None = None):
        self.model, self.tok, self.prompts, self.scorer, self.cfg = model, tok, prompts, scorer, cfg
        self.seed, self.runtime, self.ref, self.out_dir = seed, runtime, ref, out_dir
        self.epoch = self.pos = self.rollouts = self.served = self.stall = self.mb_index = 0
        self.baseline: float | None = None
        self.buffer: Rollout | None = None
        self.last_samples: list[dict] = []
        self._order: list[int] | None = None
        self.device = runtime.device

    # -- state ----
    @property
    def updates_per_rollout(self) -> int:
        return self.cfg.ppo_epochs * self.cfg.minibatches

    def state_dict(self) -> dict:
        partial = self.buffer is not None and self.mb_index < self.updates_per_rollout
        return {"epoch": self.epoch, "pos": self.pos, "rollouts": self.rollouts, "served": self.served,
                "stall": self.stall, "baseline": self.baseline, "mb_index": self.mb_index,
                "reward_errors": self.scorer.errors, "buffer": self.buffer.to_json() if partial else None}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos, self.rollouts, self.served = int(s["epoch"]), int(s["pos"]), int(s["rollouts"]), int(s["served"])
        self.stall, self.baseline, self.mb_index = int(s["stall"]), s.get("baseline"), int(s["mb_index"])
        self.scorer.errors = int(s.get("reward_errors", 0))
        self.buffer = Rollout.from_json(s["buffer"], self.device) if s.get("buffer") else None
        self._order = None

    # -- batches ----
    def next_batch(self) -> Rollout:
        if self.buffer is None or self.mb_index >= self.updates_per_rollout:
            self.buffer = self._rollout(step=self.served + 1)
            self.mb_index = 0
        n = self.buffer.x.shape[0]
        epoch, k = divmod(self.mb_index, self.cfg.minibatches)
        g = torch.Generator().manual_seed(_mix(self.seed, self.rollouts, epoch, 17))
        perm = torch.randperm(n, generator=g) if self.cfg.minibatches > 1 else torch.arange(n)
        idx = torch.tensor_split(perm, self.cfg.minibatches)[k].to(self.buffer.x.device)
        self.mb_index += 1
        self.served += 1
        return self.buffer.rows(idx)

    def _take(self, n: int) -> list[int]:
        out = []
        while len(out) < n:
            if self._order is None:
                self._order = list(range(len(self.prompts.ids)))
                random.Random(_mix(self.seed, self.epoch, 0, 3)).shuffle(self._order)
            if self.pos >= len(self._order):
                self.epoch, self.pos, self._order = self.epoch + 1, 0, None
                continue
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    @torch.no_grad()
    def _rollout(self, step: int) -> Rollout:
        from lmforge.infer.engine import SamplingParams, generate

        cfg, tok, G = self.cfg, self.tok, self.cfg.group_size
        core = _core(self.model)
        chosen = self._take(cfg.prompts_per_step)
        prompts = [self.prompts.ids[i] for i in chosen]
        t0 = time.perf_counter()
        on_policy = cfg.algorithm != "ppo" and cfg.ppo_epochs == 1 and cfg.minibatches == 1
        params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                                top_p=cfg.top_p, n=G, seed=_mix(self.seed, self.rollouts, 0, 1), logprobs=on_policy)
        outs = generate(core, prompts, params, tokenizer=tok, max_batch=cfg.gen_batch)
        gen_s = time.perf_counter() - t0
        self.rollouts += 1
        # rewards
        recs = [self.prompts.records[i] for i in chosen for _ in range(G)]
        texts = [tok.decode(o.token_ids, skip_special=True) for o in outs]
        errors_before = self.scorer.errors
        scores = self.scorer.score([r["messages"] for r in recs], texts, [r.get("meta", {}) for r in recs])
        for s, r, t in zip(scores, recs, texts):
            if s is not None and not math.isfinite(s):
                last = ck.list_checkpoints(self.out_dir) if self.out_dir is not None else []
                raise RewardNaN(f"rl: reward {s} at step {step} (reward {self.scorer.name}, prompt "
                                f"{r['messages'][-1]['content'][:120]!r}, answer {t[:80]!r}); stopped before updating "
                                f"the weights. Last good checkpoint: {last[-1] if last else 'none'}")
        valid = torch.tensor([s is not None for s in scores]).view(-1, G)
        r = torch.tensor([0.0 if s is None else float(s) for s in scores], dtype=torch.float32).view(-1, G)
        self._check_signal(r, valid, step)
        # token tensors: prompt + response (+ the stop token that ended it)
        rows = []
        for p, o in zip((p for p in prompts for _ in range(G)), outs):
            resp = list(o.token_ids)
            if o.finish_reason == "stop" and isinstance(o.stop_reason, int):
                resp.append(o.stop_reason)
            rows.append((p, resp))
        width = max(len(p) + len(s) for p, s in rows) - 1
        pad = tok.pad_id if tok.pad_id is not None else 0
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (p, s) in enumerate(rows):
            seq = p + s
            x[i, : len(seq) - 1] = torch.tensor(seq[:-1])
            y[i, len(p) - 1 : len(seq) - 1] = torch.tensor(s)
        y[~valid.flatten()] = -100  # skipped samples: no loss
        x, y = x.to(self.device), y.to(self.device)
        mask = (y != -100).float()
        if on_policy:  # the update computes its own log-probs; the sampled tokens' ones come from the engine
            old_logp, old_values = torch.zeros_like(mask), None
            sampled = [lp for o in outs for lp in (o.logprobs or [])]
            entropy = -sum(sampled) / len(sampled) if sampled else 0.0
        else:
            old_logp, old_values = self._forward(core, x, y, values=cfg.algorithm == "ppo")
            entropy = float(masked_mean(-old_logp, mask))
        ref_logp = self._forward(self.ref, x, y)[0] if self.ref is not None else None
        stats = {"reward_mean": float(r[valid].mean()) if valid.any() else 0.0,
                 "reward_std": float(r[valid].std()) if valid.sum() > 1 else 0.0,
                 "response_len": float(sum(len(s) for _, s in rows) / len(rows)),
                 "entropy": entropy,
                 "reward_failed": float(self.scorer.errors - errors_before),
                 "gen_s": gen_s, "samples_per_s": len(rows) / gen_s if gen_s > 0 else 0.0}
        if ref_logp is not None and not on_policy:  # on policy, the update logs "kl" from its own pass
            stats["kl_rollout"] = float(masked_mean(k3_kl(old_logp, ref_logp), mask))
        rd = r.to(self.device)
        vd = valid.to(self.device)
        out = Rollout(x, y, mask, old_logp, torch.zeros_like(old_logp), ref_logp, old_values, None, stats, on_policy)
        if cfg.algorithm == "ppo":
            self._ppo_advantages(out, rd.flatten())
        else:
            if cfg.algorithm == "grpo":
                a = grpo_advantages(rd, vd, cfg.scale_rewards, cfg.std_eps)
            elif cfg.algorithm == "rloo":
                a = rloo_advantages(rd, vd)
            else:
                b = None
                if cfg.baseline == "ema":
                    batch_mean = stats["reward_mean"]
                    b = batch_mean if self.baseline is None else self.baseline
                    self.baseline = batch_mean if self.baseline is None else (
                        cfg.baseline_decay * self.baseline + (1 - cfg.baseline_decay) * batch_mean)
                a = reinforce_advantages(rd, vd, b)
            out.adv = a.flatten()[:, None] * mask
        self.last_samples = [{"prompt": rec["messages"][-1]["content"], "completion": t,
                              "reward": s} for rec, t, s in list(zip(recs, texts, scores))[: 2 * G : G]]
        return out

    def _forward(self, model, x, y, values: bool = False):
        """Log-probs (and the value head's estimates) of the response tokens, no grad, in chunks."""
        was = model.training
        model.eval()
        lps, vs = [], []
        try:
            for i in range(0, x.shape[0], 64):
                with self.runtime.autocast():
                    if values:
                        lp, h = model.token_logprobs(x[i:i + 64], y[i:i + 64], return_hidden=True)
                        vs.append(model.value_head(h).float())
                    else:
                        lp = model.token_logprobs(x[i:i + 64], y[i:i + 64])
                lps.append(lp.float())
        finally:
            model.train(was)
        return torch.cat(lps), (torch.cat(vs) if values else None)

    def _ppo_advantages(self, out: Rollout, seq_reward: torch.Tensor) -> None:
        cfg = self.cfg
        m = out.mask
        tok_r = torch.zeros_like(out.old_logp)
        if out.ref_logp is not None and cfg.kl_coef > 0:
            tok_r = -cfg.kl_coef * (out.old_logp - out.ref_logp) * m
        T_ = m.shape[1]
        last = (m * torch.arange(T_, device=m.device)).argmax(1)  # the last response position per row
        has = m.sum(1) > 0
        tok_r[has, last[has]] += seq_reward[has]
        adv, ret = gae(tok_r, out.old_values, m, cfg.gamma, cfg.lam)
        out.returns = ret
        out.adv = whiten(adv, m) if cfg.whiten_advantages else adv
        out.old_values = out.old_values * m

    def _check_signal(self, r: torch.Tensor, valid: torch.Tensor, step: int) -> None:
        """Count rollouts in a row where every group (or, with G = 1, the whole rollout) has a single
        reward; stop after `stall_steps` of them."""
        if not self.cfg.stall_steps:
            return
        groups = [r[i][valid[i]] for i in range(r.shape[0])] if r.shape[1] > 1 else [r[valid]]
        flat = all(g.numel() < 2 or bool((g == g[0]).all()) for g in groups)
        self.stall = self.stall + 1 if flat else 0
        if self.stall >= self.cfg.stall_steps:
            vals = sorted({float(v) for v in r[valid].tolist()})
            raise NoLearningSignal(
                f"rl: no learning signal at step {step}: every group had one reward ({', '.join(f'{v:g}' for v in vals[:4])}) "
                f"for {self.stall} rollouts in a row (rl.stall_steps = {self.cfg.stall_steps}); the task is too hard or "
                "too easy for this model, or the reward function ignores the answer. Raise rl.group_size or "
                "rl.temperature, change the reward, or set rl.stall_steps = 0 to go on anyway")


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (stable across runs and processes)."""
    h = 1469598103934665603
    for v in xs:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def make_loss(cfg: RLConfig):
    """The loss function the trainer calls on each minibatch: `(model, Rollout) -> (loss, metrics)`."""

    def rl_loss(model, b: Rollout):
        core = _core(model)
        ppo = cfg.algorithm == "ppo"
        if ppo:
            logp, h = core.token_logprobs(b.x, b.y, return_hidden=True)
            values = core.value_head(h)
        else:
            logp = core.token_logprobs(b.x, b.y)
        logp = logp.float()
        old_logp = logp.detach() if b.on_policy else b.old_logp
        loss, clip_frac = clipped_policy_loss(logp, old_logp, b.adv, b.mask, cfg.clip_eps, cfg.loss_agg)
        metrics = {"policy_loss": loss.detach(), "clip_frac": clip_frac, **b.stats}
        if b.ref_logp is not None:
            kl = k3_kl(logp, b.ref_logp)
            kl_mean = masked_mean(kl, b.mask, cfg.loss_agg)
            if not ppo and cfg.kl_coef > 0:
                loss = loss + cfg.kl_coef * kl_mean
            metrics["kl"] = kl_mean.detach()
        if ppo:
            vl = value_loss(values, b.old_values, b.returns, b.mask, cfg.value_clip)
            loss = loss + cfg.vf_coef * vl
            metrics["value_loss"] = vl.detach()
            metrics["explained_var"] = explained_variance(values.detach(), b.returns, b.mask)
        return loss, metrics

    return rl_loss


# ---- evaluation -----------------------------------------------------------------------------


@torch.no_grad()
def task_accuracy(model, tok, prompts: PromptSet, scorer, max_new_tokens: int = 16, batch: int = 64
                  ) -> tuple[float | None, list[dict]]:
    """Mean reward of greedy answers to `prompts` (for the exact-answer task: the accuracy) and the
    answers. Failed reward calls count as configured; skipped ones are left out."""
    from lmforge.infer.engine import SamplingParams, generate

    if not prompts.ids:
        return None, []
    outs = generate(_core(model), prompts.ids, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0),
                    tokenizer=tok, max_batch=batch)
    texts = [tok.decode(o.token_ids, skip_special=True) for o in outs]
    scores = scorer.score([r["messages"] for r in prompts.records], texts, [r.get("meta", {}) for r in prompts.records])
    kept = [s for s in scores if s is not None]
    answers = [{"prompt": r["messages"][-1]["content"], "completion": t, "reward": s,
                "answer": r.get("meta", {}).get("answer")} for r, t, s in zip(prompts.records, texts, scores)]
    return (sum(kept) / len(kept) if kept else None), answers


# ---- the stage entry --------------------------------------------------------------------------


@dataclass
class RLResult:
    out_dir: Path
    algorithm: str = ""
    steps: int = 0
    rollouts: int = 0
    checkpoint: Path | None = None
    base: str = ""
    reward: str = ""
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    last_record: dict = field(default_factory=dict)
    reward_errors: int = 0
    data_stats: dict = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    metrics_path: Path | None = None
    plot_path: Path | None = None
    curve_path: Path | None = None
    wall_time_s: float = 0.0
    resumed_from: int | None = None


def load_prompts(cfg: RLConfig, seed: int, resolve=lambda p: Path(p)) -> tuple[list[dict], list[dict], dict]:
    """(train, held-out) prompt records and their counts: users' JSONL, or the built-in task."""
    from lmforge.posttrain import rl_task

    if cfg.data:
        recs, stats = rl_task.read_prompt_jsonl([resolve(p) for p in cfg.data])
        if cfg.eval_data:
            held, _ = rl_task.read_prompt_jsonl([resolve(p) for p in cfg.eval_data])
            train = recs
        else:
            train, held = rl_task.split_prompts(recs, cfg.heldout, seed)
        stats = {f"read_{k}": v for k, v in stats.items()}
        stats["source"] = ", ".join(str(resolve(p)) for p in cfg.data)
    else:
        if cfg.dictionary:
            p = resolve(cfg.dictionary)
            if not p.exists():
                raise InputError(f"rl.dictionary: {p} not found")
            paths = sorted(p.glob("*.jsonl*")) if p.is_dir() else [p]
        else:
            paths = sorted(BUNDLED_DICTIONARY.glob("*.jsonl*"))
        train, held = rl_task.which_word_prompts(paths, seed=seed, holdout=cfg.heldout, n_train=cfg.prompts,
                                                 n_heldout=max(cfg.eval_prompts, 1))
        stats = {"source": "built-in which-word task from " + ", ".join(p.name for p in paths)}
    if not train:
        raise InputError("rl: no training prompts")
    return train, held, stats


def run_rl(cfg: RLConfig, out_dir: str | Path, *, base: str | Path, seed: int = 1234, tokenizer: str | Path | None = None,
           resolve=lambda p: Path(p)) -> RLResult:
    """RL-train the model at `base` (anything the checkpoint reader takes) into `out_dir` (step_N/ +
    latest, metrics.jsonl, loss.png, reward.png, data/). Resumes from the newest intact checkpoint
    there (cfg.resume)."""
    from lmforge.infer import load_model_and_tokenizer
    from lmforge.posttrain.rewards import load_reward

    t0 = time.time()
    out_dir = Path(out_dir)
    tcfg = cfg.trainer_config()
    runtime = T.setup(tcfg, "rl")
    if runtime.info.world_size > 1:
        raise ConfigError("rl runs in one process: data-parallel RL is not implemented (run it without torchrun)")
    model, tok, ref = load_model_and_tokenizer(base, device=runtime.device, tokenizer=tokenizer)
    base_state = read_json(ref.path / "state.json", {}) or {}
    check_template(base_state.get("chat_template"))
    scorer = load_reward(cfg.reward, cfg.reward_on_error, resolve, device=runtime.device)
    train_recs, held_recs, stats = load_prompts(cfg, seed, resolve)
    ctx = model.cfg.max_seq_len
    train_set, dropped = prepare_prompts(tok, train_recs, ctx)
    held_set, held_dropped = prepare_prompts(tok, held_recs[: cfg.eval_prompts], ctx)
    if not train_set.ids:
        raise InputError(f"rl: every training prompt is too long for the model's context ({ctx} tokens)")
    stats.update(train_prompts=len(train_set.ids), heldout_prompts=len(held_set.ids), too_long=dropped + held_dropped)
    logger.info("rl (%s): %d training prompts, %d held out; reward %s; base %s", cfg.algorithm, len(train_set.ids),
                len(held_set.ids), scorer.name, ref.path)

    torch.manual_seed(seed)
    if cfg.algorithm == "ppo":
        model.value_head = ValueHead(model.cfg.d_model).to(runtime.device)
    model.train()
    reference = None
    if cfg.kl_coef > 0:
        reference, _, _ = load_model_and_tokenizer(ref.path, device=runtime.device, tokenizer=tokenizer)
        reference.requires_grad_(False)
        reference.eval()

    # the held-out figure: exact-match accuracy for the built-in rewards, else the mean configured reward
    acc_scorer = load_reward("exact", cfg.reward_on_error) if cfg.reward.strip() in ("exact", "choice") else scorer
    acc_before, answers_before = task_accuracy(model, tok, held_set, acc_scorer, cfg.eval_tokens, cfg.gen_batch)
    if runtime.is_main:
        d = out_dir / "data"
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_text(d / "task_heldout.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held_set.records))
        atomic_write_json(d / "stats.json", {**stats, "accuracy_before": acc_before})
        _copy_chat_eval_files(ref.path, d)

    source = RolloutSource(model, tok, train_set, scorer, cfg, seed, runtime, ref=reference, out_dir=out_dir)
    last_eval: dict = {"answers": answers_before}

    def evaluate(ts):
        acc, answers = task_accuracy(ts.model, tok, held_set, acc_scorer, cfg.eval_tokens, cfg.gen_batch)
        last_eval["answers"] = answers
        return {"heldout_reward": acc} if acc is not None else {}

    def sample(ts):
        return last_eval["answers"][:4] or source.last_samples or None

    hooks: dict = {}
    if cfg.algorithm == "ppo":
        hooks["export_weights"] = lambda w: {k: v for k, v in w.items() if not k.startswith("value_head.")}
        hooks["extra_files"] = lambda ts: {"value_head.safetensors": _value_head_bytes(model)}
        hooks["restore_weights"] = _restore_with_value_head
    extra_state = {"stage": "rl", "algorithm": cfg.algorithm, "reward": cfg.reward, "chat_template": template_id(),
                   "base": str(ref.path.resolve())}
    res = T.fit(
        tcfg, runtime, model, source, make_loss(cfg), out_dir, name="rl",
        run_config={**cfgmod.to_dict(cfg), "base": str(ref.path)}, resume_free=RLConfig.RESUME_FREE,
        model_config=model.cfg.to_dict(), tokenizer_file=tok.path, evaluate=evaluate if held_set.ids else None,
        sample=sample, extra_state=extra_state, data_desc=f"the reward ({scorer.name})", plot_title=f"RL ({cfg.algorithm}) loss",
        **hooks,
    )
    acc_after = res.eval_metrics.get("heldout_reward")
    curve = plot_reward_curve(out_dir / "metrics.jsonl", out_dir / "reward.png", f"RL ({cfg.algorithm}): reward") if runtime.is_main else None
    if runtime.is_main:
        atomic_write_json(out_dir / "data" / "stats.json", {**stats, "accuracy_before": acc_before, "accuracy_after": acc_after,
                                                             "reward_errors": scorer.errors})
    return RLResult(
        out_dir=out_dir, algorithm=cfg.algorithm, steps=res.steps, rollouts=source.rollouts, checkpoint=res.checkpoint,
        base=str(ref.path), reward=scorer.name, accuracy_before=acc_before, accuracy_after=acc_after,
        last_record=res.train_record, reward_errors=scorer.errors, data_stats=stats, samples=res.samples,
        metrics_path=res.metrics_path, plot_path=res.plot_path, curve_path=curve, wall_time_s=time.time() - t0,
        resumed_from=res.resumed_from,
    )


def _copy_chat_eval_files(model_dir: Path, dest: Path) -> None:
    """The SFT stage's held-out chat files beside the RL model too, so `lmforge chat-eval` finds them."""
    for name in ("heldout.jsonl", "safety_eval.jsonl"):
        src = model_dir.parent / "data" / name
        if src.is_file() and not (dest / name).exists():
            shutil.copyfile(src, dest / name)


def _value_head_bytes(model) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in model.value_head.state_dict().items()})


def _restore_with_value_head(model, step_dir: Path) -> None:
    """Resume: the policy from model.safetensors and the value head from value_head.safetensors."""
    from lmforge.model.io import load_weights, read_safetensors

    dev = next(model.parameters()).device
    weights = load_weights(step_dir)
    missing, unexpected = model.load_state_dict({k: v.to(dev) for k, v in weights.items()}, strict=False)
    missing = [m for m in missing if not m.startswith("value_head.")
               and not (m == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise InputError(f"{step_dir / 'model.safetensors'} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    vh, _ = read_safetensors(step_dir / "value_head.safetensors", "value head", dev)
    model.value_head.load_state_dict(vh)


def plot_reward_curve(metrics: Path, path: Path, title: str) -> Path | None:
    """Reward mean (+- std) per step, the held-out reward at eval steps, KL and response length."""
    recs = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()] if Path(metrics).is_file() else []
    train = [r for r in recs if r.get("kind") == "train" and "reward_mean" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.rundir import save_figure

    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    ax = axes[0]
    mean = [r["reward_mean"] for r in train]
    std = [r.get("reward_std", 0.0) for r in train]
    ax.plot(steps, mean, label="rollout reward")
    ax.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ev = [r for r in recs if r.get("kind") == "eval" and r.get("heldout_reward") is not None]
    if ev:
        ax.plot([r["step"] for r in ev], [r["heldout_reward"] for r in ev], "o-", label="held-out (greedy)")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    ax = axes[1]
    ax.plot(steps, [r.get("response_len", 0.0) for r in train], label="response length (tokens)")
    ax.set_xlabel("step")
    if any("kl" in r for r in train):
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("kl", 0.0) for r in train], color="tab:red", label="KL to reference")
        ax2.set_ylabel("KL")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    return save_figure(fig, path)


__all__ = ["RLConfig", "RLResult", "run_rl", "RolloutSource", "Rollout", "ValueHead", "make_loss", "task_accuracy",
           "grpo_advantages", "rloo_advantages", "reinforce_advantages", "gae", "whiten", "masked_mean",
           "clipped_policy_loss", "k3_kl", "value_loss", "explained_variance", "RewardNaN", "NoLearningSignal",
           "load_prompts", "prepare_prompts", "plot_reward_curve"]
