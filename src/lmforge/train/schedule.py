"""Learning-rate schedules as a multiplier of the peak learning rate, a pure function of the step
(so the scheduler's state in a checkpoint is just the step).

- `cosine`: linear warmup, then cosine decay from 1 to `min_lr_frac` at the last step.
- `wsd` (warmup-stable-decay): linear warmup, constant 1, then over the last `decay_frac` of
  the steps a linear decay to `min_lr_frac`. Because the stable phase does not depend on the
  total length, a run can be extended and decayed later.
- `constant`: linear warmup, then 1.
"""

from __future__ import annotations

import math


def lr_factor(step: int, max_steps: int, schedule: str = "wsd", warmup_steps: int = 0,
              decay_frac: float = 0.3, min_lr_frac: float = 0.0) -> float:
    """Multiplier for the optimizer step number `step` (0-based) of `max_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(1, max_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return min_lr_frac + (1.0 - min_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "wsd":
        decay_steps = int(round(decay_frac * max_steps))
        start = max_steps - decay_steps
        if decay_steps <= 0 or step < start:
            return 1.0
        t = (step - start + 1) / decay_steps  # reaches exactly min_lr_frac at the last step
        return 1.0 - (1.0 - min_lr_frac) * min(1.0, t)
    raise ValueError(f"unknown schedule {schedule!r}")


def schedule_from_config(cfg) -> "callable":
    """step -> multiplier for a TrainConfig."""
    return lambda step: lr_factor(step, cfg.max_steps, cfg.schedule, cfg.warmup_steps, cfg.decay_frac, cfg.min_lr_frac)
