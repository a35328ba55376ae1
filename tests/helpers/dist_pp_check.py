"""Worker for tests/test_pipeline_parallel.py: training steps in one process, or the same steps
with the layers split over a torchrun group (pipeline parallelism, microbatched)."""

import json
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

from lmforge.model import Transformer, preset
from lmforge.train import parallel as P
from lmforge.train.pipeline_parallel import build_pipeline, pp_train_step


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    pp = mode != "single"
    if pp:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=512, max_seq_len=64, n_layers=4, tie_embeddings=False)
    model = Transformer(cfg)
    if pp:
        rank, world = dist.get_rank(), dist.get_world_size()
        mod, sched = build_pipeline(model, world, rank, n_microbatches=4, schedule=mode)
        params = list(mod.parameters())
    else:
        params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        x = torch.randint(0, 512, (8, 33), generator=g)
        inp, tgt = x[:, :-1], x[:, 1:]
        if pp:
            loss = pp_train_step(sched, [SimpleNamespace(x=inp, y=tgt)], rank, world, dist.group.WORLD)
        else:
            _, loss = model(inp, tgt)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    checksum = torch.tensor(float(sum(p.detach().abs().sum() for p in params)))
    if pp:
        dist.all_reduce(checksum)
    if not pp or dist.get_rank() == 0:
        json.dump({"losses": losses, "checksum": float(checksum)}, open(out, "w"))
    if pp:
        P.destroy()


if __name__ == "__main__":
    main()
