"""Worker for tests/test_parallel.py: a few AdamW steps of a tiny model at a fixed global batch,
single process or under torchrun (DDP / FSDP2 / TP). Rank 0 writes the losses to argv[2]."""

import json
import sys

import torch

from lmforge.model import Transformer, preset
from lmforge.train import parallel as P


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    dp, tp = {"single": ("none", 1), "ddp": ("ddp", 1), "fsdp": ("fsdp", 1), "tp": ("none", 2), "fsdp_tp": ("fsdp", 2)}[mode]
    pcfg = P.ParallelConfig(dp=dp, tp=tp)
    info = P.init_distributed(pcfg)
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=512, max_seq_len=64, n_layers=2)
    model = Transformer(cfg)
    model = P.parallelize(model, pcfg, info)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(4):
        x = torch.randint(0, 512, (8, 33), generator=g)
        # data-parallel ranks take their slice of the global batch; TP ranks see the same data
        n = x.shape[0] // info.dp_size
        xb = x[info.dp_rank * n : (info.dp_rank + 1) * n]
        _, loss = model(xb[:, :-1], xb[:, 1:])
        loss.backward()
        gn = P.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append([float(P.all_reduce_mean(loss.detach())), gn])
    sd = P.full_state_dict(model)
    result = {"losses": losses, "checksum": float(sum(v.float().abs().sum() for v in sd.values()))}
    if info.distributed:
        # sharded checkpoint round trip: save with DCP, load into a freshly initialised model
        ckpt = out + ".dcp"
        P.save_sharded(model, opt, ckpt)
        torch.manual_seed(123)
        fresh = P.parallelize(Transformer(cfg), pcfg, info)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
        P.load_sharded(fresh, fresh_opt, ckpt)
        sd2 = P.full_state_dict(fresh)
        result["reload_checksum"] = float(sum(v.float().abs().sum() for v in sd2.values()))
    if info.is_main:
        json.dump(result, open(out, "w"))
    P.destroy()


if __name__ == "__main__":
    main()
