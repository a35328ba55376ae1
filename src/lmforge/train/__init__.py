"""Pretraining: token-shard loader, AdamW / Muon, schedules, checkpoints, metrics, the loop.

Public entry: `lmforge.train.loop.train(cfg, tokens_dir, out_dir, tokenizer_dir=None, on_eval=None)`;
the recipe stage "pretrain" is `lmforge.train.stage:run_stage`. Submodules are imported lazily
so `import lmforge.train` stays cheap.
"""


def train(*args, **kwargs):
    from lmforge.train.loop import train as _train

    return _train(*args, **kwargs)


__all__ = ["train"]
