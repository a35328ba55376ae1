"""Model compression applied from outside the model: magnitude (unstructured) pruning, structured
pruning of attention heads and MLP channels, and low-rank factorisation of linear layers.

- Magnitude pruning (`magnitude_prune`): in every linear layer of the blocks, the `sparsity`
  fraction of weights with the smallest |w| is set to zero (per layer, the same rule as
  `torch.nn.utils.prune.l1_unstructured`), or the 2:4 pattern (two zeros in every four
  consecutive input weights, what sparse tensor cores run). The zeros stay in the dense weights:
  the checkpoint is a plain one, the same size; the gain is what a sparse kernel or a compressor
  could use, not speed on this path.
- Structured pruning (`prune_heads`, `prune_mlp`): whole attention heads / SwiGLU channels are
  removed by an importance score, giving physically smaller weights and a smaller config (a
  plain checkpoint with `head_dim` / `ffn_hidden` in config.json). The score is measured on
  calibration text (`importance(..., calib)`): for head h, the energy of its contribution to
  the attention output, sum over tokens of ||y_h Wo_h^T||^2; for channel j, sum over tokens of
  a_j^2 ||W2[:, j]||^2 (a_j the SwiGLU activation). Without calibration text, a weight-only score
  (||Wq_h|| ||Wo_h||, ||W1_j|| ||W3_j|| ||W2[:, j]||). A pruned head/channel whose contribution is
  exactly zero leaves the outputs unchanged. With grouped-query attention the groups stay
  uniform: `keep_heads` a multiple of n_kv_heads keeps every key/value head and the best query
  heads of each group; a multiple of the group size keeps the best whole groups (key/value heads
  removed too); when both fit, the way that keeps the larger total score.
- Low rank (`lowrank_model`): each linear layer W (out x in) is replaced by a `LowRankLinear`
  (W ~ U_r S_r V_r^T stored as up = U_r sqrt(S_r) and down = sqrt(S_r) V_r^T) with the smallest
  rank r whose singular values keep `energy` of sum(s^2), only where r (in + out) < in * out.
  The swap is recorded in state.json ("lowrank": {"ranks": {module: r}}), and
  `lmforge.infer.load_model` rebuilds the modules before loading (`load_lowrank`).

Checkpoints are written by `write_checkpoint` (model.safetensors, config.json, tokenizer.json,
state.json with "compression" and sha256 checksums, compress_report.json) under a temporary name.
The output head and the embedding are never compressed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge.errors import ConfigError, InputError

METHODS = ("magnitude", "heads", "mlp")


# ---- which layers -----------------------------------------------------------------------------


def block_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every plain `nn.Linear` inside the transformer blocks (not the embedding,
    not the output head)."""
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith("layers.")]


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def check_plain(model: nn.Module, what: str) -> None:
    """InputError when `model` already holds swapped-in modules (quantized or low-rank)."""
    for n, m in model.named_modules():
        if isinstance(m, LowRankLinear) or type(m).__name__.endswith("Linear") and not isinstance(m, nn.Linear):
            raise InputError(f"{what} needs a plain (dense) model, but {n} is a {type(m).__name__}: "
                             "compress the dense checkpoint instead")


# ---- magnitude pruning ------------------------------------------------------------------------


def magnitude_mask(w: torch.Tensor, sparsity: float, pattern: str = "unstructured") -> torch.Tensor:
    """Boolean keep-mask of `w`: unstructured, the round(sparsity * numel) smallest |w| dropped
    (ties broken like torch.topk, as torch.nn.utils.prune.l1_unstructured); "2:4", the two
    smallest |w| of every four consecutive weights along the input dimension dropped."""
    if pattern == "2:4":
        if w.shape[-1] % 4:
            raise ConfigError(f"2:4 sparsity needs an input width divisible by 4, got {w.shape[-1]}")
        groups = w.abs().reshape(-1, 4)
        drop = groups.topk(2, dim=1, largest=False).indices
        mask = torch.ones_like(groups, dtype=torch.bool).scatter_(1, drop, False)
        return mask.reshape(w.shape)
    k = round(sparsity * w.numel())
    mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    if k:
        mask[torch.topk(w.abs().flatten(), k, largest=False).indices] = False
    return mask.view_as(w)


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float = 0.5, pattern: str = "unstructured") -> dict:
    """Zero the smallest-magnitude weights of every block linear layer in place (`magnitude_mask`);
    returns {"pattern", "sparsity" (target), "modules": {name: achieved sparsity},
    "pruned_sparsity" (zeros / weights over the pruned layers), "model_sparsity" (over all
    parameters)}."""
    if pattern not in ("unstructured", "2:4"):
        raise ConfigError(f"--pattern {pattern!r}: choose unstructured or 2:4")
    if pattern == "2:4":
        sparsity = 0.5
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"--sparsity {sparsity}: must be in [0, 1)")
    mods, zeros, total = {}, 0, 0
    for name, lin in block_linears(model):
        mask = magnitude_mask(lin.weight, sparsity, pattern)
        lin.weight.mul_(mask)
        z = int((lin.weight == 0).sum())
        mods[name] = z / lin.weight.numel()
        zeros, total = zeros + z, total + lin.weight.numel()
    if not mods:
        raise InputError("the model has no plain linear layers in its blocks to prune")
    return {"pattern": pattern, "sparsity": sparsity, "modules": mods, "pruned_sparsity": zeros / max(1, total),
            "model_sparsity": zero_fraction(model)}


def zero_fraction(model: nn.Module) -> float:
    """Share of exactly-zero values among the model's (unique) parameters."""
    z = n = 0
    for p in unique_parameters(model):
        z += int((p == 0).sum())
        n += p.numel()
    return z / max(1, n)


def unique_parameters(model: nn.Module) -> list[torch.Tensor]:
    seen, out = set(), []
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, nonzero parameters), tied tensors counted once."""
    ps = unique_parameters(model)
    return sum(p.numel() for p in ps), sum(int((p != 0).sum()) for p in ps)


# ---- importance scores ------------------------------------------------------------------------


@torch.no_grad()
def importance(model, calib: list[list[int]] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(head scores (n_layers, n_heads), [channel scores (ffn_hidden,) per layer]) of a dense model
    (module docstring). `calib`: token sequences; None or empty = the weight-only scores."""
    cfg = model.cfg
    if cfg.moe_experts:
        raise ConfigError("structured pruning of mixture-of-experts models is not supported (prune a dense model)")
    check_plain(model, "structured pruning")
    H, hd = cfg.n_heads, cfg.head_dim
    layers = list(model.layers)
    if not calib:
        heads = []
        for layer in layers:
            wq = layer.attn.wq.weight.float().view(H, hd, -1)
            wo = layer.attn.wo.weight.float().view(-1, H, hd)
            heads.append(wq.pow(2).sum((1, 2)).sqrt() * wo.pow(2).sum((0, 2)).sqrt())
        chans = [layer.mlp.w1.weight.float().norm(dim=1) * layer.mlp.w3.weight.float().norm(dim=1)
                 * layer.mlp.w2.weight.float().norm(dim=0) for layer in layers]
        return torch.stack(heads), chans
    head_acc = [torch.zeros(H, dtype=torch.float64) for _ in layers]
    act_acc = [torch.zeros(cfg.ffn_hidden, dtype=torch.float64) for _ in layers]
    hooks = []
    for i, layer in enumerate(layers):
        wo = layer.attn.wo.weight.float().view(-1, H, hd)  # (d, H, hd)

        def attn_hook(_m, inp, i=i, wo=wo):
            y = inp[0].float().reshape(-1, H, hd)  # (N, H, hd)
            contrib = torch.einsum("nhk,dhk->nhd", y, wo)  # each head's part of the output projection
            head_acc[i] += contrib.pow(2).sum((0, 2)).double().cpu()

        def mlp_hook(_m, inp, i=i):
            act_acc[i] += inp[0].float().reshape(-1, inp[0].shape[-1]).pow(2).sum(0).double().cpu()

        hooks.append(layer.attn.wo.register_forward_pre_hook(attn_hook))
        hooks.append(layer.mlp.w2.register_forward_pre_hook(mlp_hook))
    device = next(model.parameters()).device
    try:
        for s in calib:
            ids = torch.tensor([[min(t, cfg.vocab_size - 1) for t in s[: cfg.max_seq_len]]], device=device)
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    chans = [acc.float() * layer.mlp.w2.weight.float().pow(2).sum(0).cpu() for acc, layer in zip(act_acc, layers)]
    return torch.stack([a.float() for a in head_acc]), chans


# ---- structured pruning ------------------------------------------------------------------------


def _head_selection(scores: torch.Tensor, keep: int, n_kv: int, whole_groups: bool) -> tuple[list[int], list[int]]:
    """(kept query heads, kept key/value heads) of one layer, both sorted: the best keep / n_kv query
    heads of every group (every kv head stays), or with `whole_groups` the best keep / group-size
    groups by their summed score."""
    H = scores.shape[0]
    g = H // n_kv
    if not whole_groups:
        per = keep // n_kv
        q = []
        for grp in range(n_kv):
            s = scores[grp * g : (grp + 1) * g]
            q += sorted(grp * g + int(j) for j in s.topk(per).indices)
        return q, list(range(n_kv))
    groups = scores.view(n_kv, g).sum(1)
    kv = sorted(int(j) for j in groups.topk(keep // g).indices)
    return [k * g + j for k in kv for j in range(g)], kv


def _check_keep_heads(cfg, keep: int) -> None:
    g = cfg.n_heads // cfg.n_kv_heads
    if not 1 <= keep <= cfg.n_heads:
        raise ConfigError(f"--keep-heads {keep}: must be in [1, {cfg.n_heads}] (the model has {cfg.n_heads} heads)")
    if keep % cfg.n_kv_heads and keep % g:
        ok = sorted({k for k in range(1, cfg.n_heads + 1) if k % cfg.n_kv_heads == 0 or k % g == 0})
        raise ConfigError(f"--keep-heads {keep}: with {cfg.n_heads} query heads in {cfg.n_kv_heads} key/value groups, "
                          f"choose one of {ok}")


@torch.no_grad()
def prune_heads(model, keep_heads: int, head_scores: torch.Tensor):
    """A new Transformer with `keep_heads` query heads per layer (and the key/value heads they use),
    head_dim and d_model unchanged; (new model, {layer: kept query heads})."""
    from lmforge.model.config import ModelConfig

    cfg = model.cfg
    _check_keep_heads(cfg, keep_heads)
    H, hd, d = cfg.n_heads, cfg.head_dim, cfg.d_model
    sd = dict(model.state_dict())
    # with grouped-query attention both ways may fit keep_heads: the one that keeps the larger
    # total score over all layers is used in every layer (n_kv_heads is one number per model)
    ways = [w for w, ok in ((False, keep_heads % cfg.n_kv_heads == 0), (True, keep_heads % (H // cfg.n_kv_heads) == 0)) if ok]
    kept_score = {w: sum(float(head_scores[i][_head_selection(head_scores[i], keep_heads, cfg.n_kv_heads, w)[0]].sum())
                         for i in range(cfg.n_layers)) for w in ways}
    whole = max(ways, key=lambda w: kept_score[w])  # ties: per-group (the first), which keeps every kv head
    kept = {}
    new_kv = None
    for i in range(cfg.n_layers):
        q, kv = _head_selection(head_scores[i], keep_heads, cfg.n_kv_heads, whole)
        new_kv = len(kv)
        kept[i] = q
        p = f"layers.{i}.attn."
        qi, kvi = torch.tensor(q), torch.tensor(kv)
        sd[p + "wq.weight"] = sd[p + "wq.weight"].view(H, hd, d)[qi].reshape(-1, d)
        sd[p + "wk.weight"] = sd[p + "wk.weight"].view(cfg.n_kv_heads, hd, d)[kvi].reshape(-1, d)
        sd[p + "wv.weight"] = sd[p + "wv.weight"].view(cfg.n_kv_heads, hd, d)[kvi].reshape(-1, d)
        sd[p + "wo.weight"] = sd[p + "wo.weight"].view(d, H, hd)[:, qi].reshape(d, -1)
    new_cfg = ModelConfig.from_dict({**cfg.to_dict(), "n_heads": keep_heads, "n_kv_heads": new_kv, "head_dim": hd})
    return _rebuild(model, new_cfg, sd), kept


@torch.no_grad()
def prune_mlp(model, keep_ratio: float, channel_scores: list[torch.Tensor]):
    """A new Transformer whose SwiGLU layers keep round(keep_ratio * ffn_hidden) channels, the
    highest-scoring of each layer; (new model, new ffn_hidden)."""
    from lmforge.model.config import ModelConfig

    cfg = model.cfg
    if not 0.0 < keep_ratio <= 1.0:
        raise ConfigError(f"--keep-ratio {keep_ratio}: must be in (0, 1]")
    keep = max(1, round(keep_ratio * cfg.ffn_hidden))
    sd = dict(model.state_dict())
    for i in range(cfg.n_layers):
        idx = torch.tensor(sorted(int(j) for j in channel_scores[i].topk(keep).indices))
        p = f"layers.{i}.mlp."
        sd[p + "w1.weight"] = sd[p + "w1.weight"][idx]
        sd[p + "w3.weight"] = sd[p + "w3.weight"][idx]
        sd[p + "w2.weight"] = sd[p + "w2.weight"][:, idx]
    new_cfg = ModelConfig.from_dict({**cfg.to_dict(), "ffn_hidden": keep, "head_dim": cfg.head_dim})
    return _rebuild(model, new_cfg, sd), keep


def _rebuild(model, cfg, sd: dict):
    from lmforge.model.transformer import Transformer

    p = next(model.parameters())
    with torch.device(p.device):
        new = Transformer(cfg)
    new.to(p.dtype)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = new.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    assert not missing and not unexpected, (missing, unexpected)
    return new.eval()


# ---- low rank -----------------------------------------------------------------------------------


class LowRankLinear(nn.Module):
    """y = (x down^T) up^T (+ bias): a linear layer of rank `rank`, in_features -> out_features,
    with rank (in + out) parameters instead of in * out. Both factors are trainable parameters
    (a low-rank student can be fine-tuned or distilled)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.up = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None = None) -> "LowRankLinear":
        m = cls(down.shape[1], up.shape[0], down.shape[0], bias is not None, dtype=up.dtype, device=up.device)
        with torch.no_grad():
            m.up.copy_(up)
            m.down.copy_(down)
            if bias is not None:
                m.bias.copy_(bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up, self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) matrix this layer applies."""
        return self.up @ self.down

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """The smallest r with sum(s[:r]^2) >= energy * sum(s^2) (s sorted descending); at energy 1
    the numerical rank (singular values below float64 rounding of the total left out)."""
    e = s.double().pow(2)
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = e.cumsum(0) / total
    r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=torch.float64)).item()) + 1
    return max(1, min(r, s.numel()))


def factorize(w: torch.Tensor, energy: float) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """(up (out, r), down (r, in), r, kept energy) of `w` by SVD, r from `rank_for_energy`."""
    U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
    r = rank_for_energy(S, energy)
    root = S[:r].sqrt()
    kept = float(S[:r].pow(2).sum() / S.pow(2).sum().clamp(min=1e-300))
    return (U[:, :r] * root).to(w.dtype), (root[:, None] * Vh[:r]).to(w.dtype), r, kept


@torch.no_grad()
def lowrank_model(model: nn.Module, energy: float = 0.9, only_if_smaller: bool = True) -> dict[str, dict]:
    """Swap every block linear layer for a `LowRankLinear` keeping `energy` of its squared singular
    values, in place; with `only_if_smaller` (the default) only where rank (in + out) < in * out.
    Returns {name: {"rank", "in", "out", "kept_energy", "swapped"}} for every layer considered."""
    if not 0.0 < energy <= 1.0:
        raise ConfigError(f"--energy {energy}: must be in (0, 1]")
    check_plain(model, "low-rank factorisation")
    out = {}
    for name, lin in block_linears(model):
        o, i = lin.weight.shape
        up, down, r, kept = factorize(lin.weight, energy)
        swap = not only_if_smaller or r * (i + o) < i * o
        out[name] = {"rank": r, "in": i, "out": o, "kept_energy": kept, "swapped": swap}
        if swap:
            _set_module(model, name, LowRankLinear.from_factors(up, down, lin.bias))
    return out


def lowrank_map(model: nn.Module) -> dict[str, int]:
    """Module name -> rank of every `LowRankLinear` of `model` (what state.json records)."""
    return {n: m.rank for n, m in model.named_modules() if isinstance(m, LowRankLinear)}


def apply_lowrank_map(model: nn.Module, ranks: dict, where: str = "state.json") -> None:
    """Replace the modules named in `ranks` by empty `LowRankLinear`s of those ranks (before loading
    a low-rank checkpoint's weights). InputError naming `where` when the map does not fit."""
    p = next(model.parameters())
    for name, r in ranks.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise InputError(f"{where}: low-rank module {name} does not exist in the model") from None
        if not isinstance(old, nn.Linear) or not isinstance(r, int) or not 1 <= r <= min(old.in_features, old.out_features):
            raise InputError(f"{where}: bad low-rank entry {name}: {r!r}")
        _set_module(model, name, LowRankLinear(old.in_features, old.out_features, r, old.bias is not None,
                                               dtype=p.dtype, device=p.device))


def densify_lowrank(model: nn.Module) -> list[str]:
    """Replace every `LowRankLinear` of `model` by a plain `nn.Linear` holding `up @ down` (the
    matrix it applies), in place; returns the names. For formats without factorised layers (GGUF,
    Hugging Face): the file then holds the low-rank model's function at the dense size."""
    names = []
    for name, m in list(model.named_modules()):
        if isinstance(m, LowRankLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=m.up.dtype, device=m.up.device)
            with torch.no_grad():
                lin.weight.copy_(m.dense_weight())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            _set_module(model, name, lin)
            names.append(name)
    return names


def lowrank_of(directory: str | Path) -> dict | None:
    """The {"ranks": {...}, ...} a low-rank checkpoint's state.json records, or None."""
    from lmforge.rundir import read_json

    state = read_json(Path(directory) / "state.json")
    lr = state.get("lowrank") if isinstance(state, dict) else None
    return lr if isinstance(lr, dict) else None


def load_lowrank(model: nn.Module, directory: str | Path) -> None:
    """Load a low-rank checkpoint's weights into `model`, a plain model of its config.json: the
    recorded modules are swapped first. InputError (one line) when anything does not fit."""
    from lmforge.model.io import load_weights

    directory = Path(directory)
    ranks = (lowrank_of(directory) or {}).get("ranks")
    if not isinstance(ranks, dict):
        raise InputError(f"{directory / 'state.json'}: the low-rank entry has no module ranks")
    apply_lowrank_map(model, ranks, str(directory / "state.json"))
    sd = load_weights(directory)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise InputError(f"{directory / 'model.safetensors'} does not match its low-rank map: "
                         f"{str(e).strip().splitlines()[-1].strip()}") from None
    if model.cfg.tie_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise InputError(f"{directory / 'model.safetensors'} does not match its low-rank map: "
                         f"missing {missing[:3]}, unexpected {unexpected[:3]}")


# ---- checkpoints ---------------------------------------------------------------------------------


def state_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def safetensors_bytes(model: nn.Module) -> bytes:
    from safetensors.torch import save

    return save(state_for_save(model), metadata={"format": "pt"})


def write_checkpoint(model: nn.Module, out: str | Path, tokenizer_json: Path, compression: dict, source: str,
                     report: dict | None = None) -> Path:
    """Write a compressed model as a checkpoint directory (module docstring); a low-rank model's
    module ranks go into state.json["lowrank"]. Atomic: written under a temporary name."""
    from lmforge.model.io import sha256_file
    from lmforge.rundir import atomic_dir, atomic_write_bytes, atomic_write_json

    out = Path(out)
    ranks = lowrank_map(model)
    with atomic_dir(out) as tmp:
        atomic_write_bytes(tmp / "model.safetensors", safetensors_bytes(model))
        atomic_write_json(tmp / "config.json", model.cfg.to_dict())
        atomic_write_bytes(tmp / "tokenizer.json", Path(tokenizer_json).read_bytes())
        sums = {n: sha256_file(tmp / n) for n in ("model.safetensors", "config.json", "tokenizer.json")}
        state = {"compression": compression, "source": source, "checksums": sums}
        if ranks:
            state["lowrank"] = {"ranks": ranks, "energy": compression.get("energy")}
        atomic_write_json(tmp / "state.json", state)
        if report is not None:
            atomic_write_json(tmp / "compress_report.json", report)
    return out


# ---- calibration text ------------------------------------------------------------------------------


def calibration_sequences(model_dir: Path, tok, ctx: int, n: int = 16, window: int = 256) -> tuple[str, list[list[int]]]:
    """(description, token sequences) to score importance on: `n` windows of the train tokens of
    the run `model_dir` lies in, else `n` documents of the bundled sample dictionary that eval does
    not hold out. Never the held-out text the report measures."""
    import gzip

    import numpy as np

    from lmforge.infer.quantize_cmd import SAMPLE_DICTIONARY

    length = min(ctx, window)
    for d in [model_dir.resolve(), *model_dir.resolve().parents][:6]:
        index = d / "tokens" / "index.json"
        if not index.is_file():
            continue
        try:
            meta = json.loads(index.read_text())
            shards = [d / "tokens" / s["path"] for s in meta.get("train", [])]
            dtype = meta.get("dtype", "uint16")
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            break
        shards = [s for s in shards if s.is_file() and s.stat().st_size]
        if not shards or dtype not in ("uint16", "uint32"):
            break
        toks = np.concatenate([np.memmap(s, dtype=np.dtype(dtype).newbyteorder("<"), mode="r") for s in shards])
        span = max(0, len(toks) - length)
        starts = list(range(0, span + 1, max(1, span // n)))[:n]
        seqs = [toks[s : s + length].astype(np.int64).tolist() for s in starts]
        seqs = [s for s in seqs if len(s) >= 2]
        if seqs:
            return f"run train tokens ({d / 'tokens'})", seqs
        break
    import xxhash

    bos = [tok.bos_id] if tok.bos_id is not None else []
    with gzip.open(SAMPLE_DICTIONARY, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if r.get("text", "").strip() and xxhash.xxh64_intdigest(str(r["id"]).encode()) % 1000 < 950]
    train.sort(key=lambda r: str(r["id"]))
    seqs = [(bos + tok.encode(r["text"]))[:length] for r in train[:n]]
    return f"bundled sample dictionary (non-held-out docs of {SAMPLE_DICTIONARY.name})", [s for s in seqs if len(s) >= 2]


__all__ = ["LowRankLinear", "METHODS", "apply_lowrank_map", "block_linears", "calibration_sequences", "count_parameters",
           "factorize", "importance", "load_lowrank", "lowrank_map", "lowrank_model", "lowrank_of", "magnitude_mask",
           "magnitude_prune", "prune_heads", "prune_mlp", "rank_for_energy", "safetensors_bytes", "write_checkpoint",
           "zero_fraction"]
