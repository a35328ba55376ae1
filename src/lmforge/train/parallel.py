"""Distributed training wrappers around the one model: torchrun init, data parallelism (DDP or
FSDP2 `fully_shard`), tensor parallelism with DTensor (column/row-wise attention and MLP), and
a 2-D (dp x tp) device mesh. With no torchrun environment everything is a single-process no-op.

Launch: `torchrun --nproc_per_node N -m lmforge train RECIPE --pretrain.parallel.dp fsdp`
(gloo on CPU, nccl on GPU). Tensor parallelism shards each block's wq/wk/wv/w1/w3 column-wise
and wo/w2 row-wise (one all-reduce after attention and one after the MLP, as Megatron does);
embeddings, norms and the output head stay replicated. FSDP2 shards every block, then the root.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn as nn

from lmforge.errors import ConfigError


@dataclass
class ParallelConfig:
    dp: Literal["none", "ddp", "fsdp"] = "ddp"  # data parallelism used when world_size / (tp * pp * cp) > 1
    tp: int = 1  # tensor-parallel degree (must divide world size, n_heads and n_kv_heads)
    pp: int = 1  # pipeline-parallel degree: layers split into pp stages (train/pipeline_parallel.py)
    pp_schedule: Literal["1f1b", "gpipe"] = "1f1b"
    pp_microbatches: int = 4  # microbatches per optimizer step and pipeline (x grad_accum); must divide batch_size * grad_accum
    cp: int = 1  # context-parallel degree: each sequence split into cp chunks (train/context_parallel.py)
    backend: Literal["auto", "nccl", "gloo"] = "auto"

    def validate(self) -> None:
        for k in ("tp", "pp", "cp", "pp_microbatches"):
            if getattr(self, k) < 1:
                raise ValueError(f"parallel.{k} must be >= 1")
        if sum(x > 1 for x in (self.tp, self.pp, self.cp)) > 1:
            raise ValueError("combine data parallelism with one of tp, pp or cp; more than one of them at once is not supported yet")

    @property
    def inner(self) -> tuple[str, int]:
        """The model-parallel mesh dimension (name, size) paired with data parallelism."""
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) > 1:
                return name, getattr(self, name)
        return "tp", 1


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: Any = None  # DeviceMesh with dims ("dp", "tp") when distributed
    dp_rank: int = 0
    dp_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    pp_rank: int = 0
    cp_size: int = 1
    cp_rank: int = 0

    def group(self, name: str):
        """The process group of mesh dimension `name` ("dp", or the model-parallel one)."""
        return self.mesh[name].get_group() if self.mesh is not None and name in self.mesh.mesh_dim_names else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(pcfg: ParallelConfig | None = None, device: str | None = None) -> DistInfo:
    """Initialise torch.distributed from torchrun's environment; single process otherwise."""
    pcfg = pcfg or ParallelConfig()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if world <= 1:
        dev = torch.device(device or ("cuda" if want_cuda else "cpu"))
        name, n = pcfg.inner
        if n > 1:
            raise ConfigError(f"parallel.{name} = {n} needs that many processes: launch with torchrun --nproc_per_node {n}")
        return DistInfo(device=dev)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = pcfg.backend if pcfg.backend != "auto" else ("nccl" if want_cuda else "gloo")
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    name, n = pcfg.inner
    if world % n:
        raise ConfigError(f"parallel.{name} = {n} must divide the world size {world}")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world // n, n), mesh_dim_names=("dp", name))
    inner_rank = mesh[name].get_local_rank()
    return DistInfo(
        rank=rank, world_size=world, local_rank=local_rank, device=dev, mesh=mesh,
        dp_rank=mesh["dp"].get_local_rank(), dp_size=world // n, tp_size=pcfg.tp,
        pp_size=pcfg.pp, pp_rank=inner_rank if name == "pp" else 0, cp_size=pcfg.cp, cp_rank=inner_rank if name == "cp" else 0,
    )


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    cfg = model.cfg
    tp = tp_mesh.size()
    if cfg.n_heads % tp or cfg.n_kv_heads % tp:
        raise ConfigError(f"parallel.tp = {tp} must divide n_heads ({cfg.n_heads}) and n_kv_heads ({cfg.n_kv_heads})")
    if cfg.moe_experts:
        raise ConfigError("tensor parallelism is not supported for mixture-of-experts models; use dp = 'fsdp'")
    plan = {
        "attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
        "attn.wo": RowwiseParallel(),
        "mlp.w1": ColwiseParallel(), "mlp.w3": ColwiseParallel(), "mlp.w2": RowwiseParallel(),
    }
    for block in model.layers:
        parallelize_module(block, tp_mesh, plan)


def parallelize(model: nn.Module, pcfg: ParallelConfig, info: DistInfo) -> nn.Module:
    """Apply TP (if tp > 1) then DP (DDP or FSDP2) to `model` (already on info.device)."""
    if not info.distributed:
        return model
    if info.pp_size > 1 or info.cp_size > 1:
        # pipeline / context parallelism keep the plain module; gradients are averaged over the
        # data-parallel ranks by average_gradients (the loop calls it), as DDP would
        if info.dp_size > 1 and pcfg.dp != "ddp":
            raise ConfigError("pipeline and context parallelism combine with parallel.dp = 'ddp' only")
        return model
    if info.tp_size > 1:
        apply_tensor_parallel(model, info.mesh["tp"])
    if info.dp_size > 1:
        if pcfg.dp == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.layers:
                fully_shard(block, mesh=info.mesh["dp"])
            fully_shard(model, mesh=info.mesh["dp"])
        elif pcfg.dp == "ddp":
            if info.tp_size > 1:
                raise ConfigError("combine tensor parallelism with dp = 'fsdp' (DDP over DTensor parameters is not supported)")
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
        else:
            raise ConfigError(f"world size {info.world_size} with tp {info.tp_size} needs parallel.dp = 'ddp' or 'fsdp'")
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain Transformer inside a DDP wrapper (FSDP2/TP modify the module in place)."""
    return getattr(model, "module", model)


def all_reduce_mean(x: torch.Tensor | float, info: DistInfo | None = None) -> torch.Tensor | float:
    if not (dist.is_available() and dist.is_initialized()):
        return x
    is_float = not isinstance(x, torch.Tensor)
    t = torch.tensor(float(x), device="cuda" if torch.cuda.is_available() else "cpu") if is_float else x.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t /= dist.get_world_size()
    return t.item() if is_float else t


def clip_grad_norm(model: nn.Module, max_norm: float) -> float:
    """Clip gradients by global L2 norm; works for plain, DDP, FSDP2 and TP (DTensor) parameters.
    Gradients are grouped by (mesh, placements) so sharded and replicated ones are each counted once."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad
            key = (id(g.device_mesh), tuple(g.placements)) if hasattr(g, "placements") else None
            groups.setdefault(key, []).append(g)
    total_sq = torch.zeros((), dtype=torch.float64)
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, 2.0)
        if hasattr(n, "full_tensor"):
            n = n.full_tensor()
        total_sq += n.double().cpu() ** 2
    total = float(total_sq.sqrt())
    if max_norm > 0 and total > max_norm:
        coef = max_norm / (total + 1e-6)
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Gather a full (unsharded) CPU state dict on every rank (safetensors export, rank 0 writes)."""
    if not (dist.is_available() and dist.is_initialized()):
        return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, path: str | Path) -> None:
    """Each rank writes its own shards with torch.distributed.checkpoint (DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    m = unwrap(model)
    if optimizer is not None:
        msd, osd = get_state_dict(m, optimizer)
        state = {"model": msd, "optim": osd}
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = {"model": get_model_state_dict(m)}
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, path: str | Path) -> None:
    """Load a DCP checkpoint into an already parallelised model (resharding if the layout changed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    m = unwrap(model)
    if optimizer is not None:
        msd, osd = get_state_dict(m, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(m, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        state = {"model": get_model_state_dict(m)}
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(m, state["model"])


def average_gradients(params, group=None) -> None:
    """Mean of each gradient over `group` (all ranks when None), one flat all-reduce per dtype."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    n = dist.get_world_size(group)
    if n == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat /= n
        off = 0
        for g in grads:
            g.copy_(flat[off : off + g.numel()].view_as(g))
            off += g.numel()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def destroy(wait: bool = True) -> None:
    """Wait for every rank, then tear the process groups down while the interpreter is whole.
    A process that exits with live gloo groups can abort in their worker threads during
    interpreter shutdown ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
