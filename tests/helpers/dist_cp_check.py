"""Worker for tests/test_context_parallel.py: full-sequence training steps in one process, or the
same steps with the sequence split across a torchrun group (context parallelism)."""

import json
import sys

import torch
import torch.distributed as dist

from lmforge.model import Transformer, preset
from lmforge.train import parallel as P
from lmforge.train.context_parallel import cp_forward, cp_sync_grads


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    cp = mode == "cp"
    if cp:
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=512, max_seq_len=64, n_layers=2, qk_norm=True)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    losses, grad0 = [], None
    for step in range(3):
        x = torch.randint(0, 512, (4, 65), generator=g)
        inp, tgt = x[:, :-1], x[:, 1:]
        if cp:
            r, w = dist.get_rank(), dist.get_world_size()
            n = inp.shape[1] // w
            _, loss = cp_forward(model, inp[:, r * n : (r + 1) * n], tgt[:, r * n : (r + 1) * n])
            loss.backward()
            cp_sync_grads(model)
        else:
            _, loss = model(inp, tgt)
            loss.backward()
        if step == 0:
            grad0 = float(sum(p.grad.abs().sum() for p in model.parameters()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    if not cp or dist.get_rank() == 0:
        json.dump({"losses": losses, "grad0": grad0}, open(out, "w"))
    if cp:
        P.destroy()


if __name__ == "__main__":
    main()
