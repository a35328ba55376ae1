"""Hugging Face conversion both ways: export an lmforge checkpoint as a checkpoint `transformers`
loads, and import an HF Llama/Qwen3 folder (ours or any with the same block) into `Transformer`.

Dense models without QK-norm become `LlamaForCausalLM`; with QK-norm they become
`Qwen3ForCausalLM` (the same block with an RMSNorm on each query/key head before RoPE, which
is what lmforge's qk_norm does). Mixture-of-experts models are refused: their top-k routing
without token dropping and the load-balancing setup have no matching HF architecture here.

The weights need no permutation: lmforge's RoPE already uses the rotate-half layout of HF
Llama. Written files: config.json, generation_config.json, model.safetensors and, given a
tokenizer, tokenizer.json + tokenizer_config.json + special_tokens_map.json.

Import (`load_hf`) is the inverse mapping: config.json -> ModelConfig, HF names -> ours, with the
features our block lacks refused by name (biases, rope scaling, sliding windows, other
activations) rather than loaded wrong. Our own export loads back with identical logits.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from lmforge.errors import InputError
from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer
from lmforge.rundir import atomic_dir, atomic_write_bytes, atomic_write_json, read_json

ARCHITECTURES = ("llama", "qwen3")

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}


def hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename an lmforge state dict to HF Llama/Qwen3 names."""
    out = {}
    for k, v in sd.items():
        if k == "tok_emb.weight":
            out["model.embed_tokens.weight"] = v
        elif k == "norm.weight":
            out["model.norm.weight"] = v
        elif k == "lm_head.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = v
        elif k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            if rest not in _LAYER_MAP:
                raise InputError(f"cannot export parameter {k!r}: no Hugging Face equivalent")
            out[f"model.layers.{i}.{_LAYER_MAP[rest]}"] = v
        else:
            raise InputError(f"cannot export parameter {k!r}: no Hugging Face equivalent")
    return out


def hf_config(cfg: ModelConfig, bos_id: int | None, eos_id: int | None, dtype: str) -> dict:
    arch = "qwen3" if cfg.qk_norm else "llama"
    c = {
        "architectures": ["Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
        "use_cache": True,
        "torch_dtype": dtype,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
    }
    if arch == "llama":
        c["mlp_bias"] = False
        c["pretraining_tp"] = 1
    else:
        c.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
                 layer_types=["full_attention"] * cfg.n_layers)
    return c


def export_hf(checkpoint: str | Path, out: str | Path, tokenizer: str | Path | None = None, dtype: str = "float32",
              chat_template: str | None = None) -> Path:
    """Write the HF checkpoint of `checkpoint` (a directory with model.safetensors + config.json) to `out`.
    `chat_template`: a Jinja chat template (lmforge.tokenizer.chat.chat_template_jinja) written into
    tokenizer_config.json, with the end-of-turn token `<|end|>` added to generation_config's stop ids."""
    from safetensors.torch import load_file, save

    from lmforge.model.io import load_config

    checkpoint, out = Path(checkpoint), Path(out)
    if not checkpoint.is_dir():
        raise InputError(f"checkpoint not found: {checkpoint}")
    cfg = load_config(checkpoint)
    if cfg.moe_experts:
        raise InputError(
            f"{checkpoint} is a mixture-of-experts model ({cfg.moe_experts} experts); Hugging Face export supports dense models only"
        )
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if dt is None:
        raise InputError(f"--dtype {dtype!r}: choose float32, bfloat16 or float16")
    f = checkpoint / "model.safetensors"
    if not f.is_file():
        raise InputError(f"no weights at {f}")
    try:
        sd = load_file(str(f))
    except Exception as e:
        raise InputError(f"cannot read weights {f}: {e}") from None
    hsd = {k: v.to(dt).contiguous() for k, v in hf_state_dict(sd, cfg).items()}
    bos = eos = pad = None
    tok_file = None
    if tokenizer is not None:
        tok_file = Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else Path(tokenizer)
        if not tok_file.is_file():
            raise InputError(f"no tokenizer at {tok_file}")
        from tokenizers import Tokenizer

        hf_tok = Tokenizer.from_file(str(tok_file))
        if hf_tok.get_vocab_size() > cfg.vocab_size:
            raise InputError(f"tokenizer has {hf_tok.get_vocab_size()} tokens, more than the model's vocab_size {cfg.vocab_size}")
        bos, eos, pad = (hf_tok.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>"))
        end = hf_tok.token_to_id("<|end|>")
    stop = [eos] + ([end] if chat_template and tokenizer is not None and end is not None else [])
    with atomic_dir(out) as tmp:
        atomic_write_bytes(tmp / "model.safetensors", save(hsd, metadata={"format": "pt"}))
        atomic_write_json(tmp / "config.json", hf_config(cfg, bos, eos, dtype))
        atomic_write_json(tmp / "generation_config.json", {"bos_token_id": bos, "eos_token_id": stop if len(stop) > 1 else eos,
                                                                 "pad_token_id": pad, "do_sample": False})
        if tok_file is not None:
            shutil.copyfile(tok_file, tmp / "tokenizer.json")
            special = {k: v for k, v in (("bos_token", "<|bos|>" if bos is not None else None),
                                         ("eos_token", "<|eos|>" if eos is not None else None),
                                         ("pad_token", "<|pad|>" if pad is not None else None)) if v}
            atomic_write_json(tmp / "special_tokens_map.json", special)
            atomic_write_json(tmp / "tokenizer_config.json", {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": cfg.max_seq_len,
                "add_bos_token": False,
                "clean_up_tokenization_spaces": False,
                **special,
                **({"chat_template": chat_template} if chat_template else {}),
            })
        src = read_json(checkpoint / "state.json", {}) or {}
        atomic_write_json(tmp / "lmforge_export.json", {"source": str(checkpoint), "step": src.get("step"),
                                                       "architecture": "qwen3" if cfg.qk_norm else "llama",
                                                       "lmforge_config": cfg.to_dict()})
    return out


def compare_logits(checkpoint: str | Path, hf_dir: str | Path, ids: list[list[int]] | None = None) -> float:
    """Max absolute difference between lmforge's and transformers' logits on `ids`."""
    from transformers import AutoModelForCausalLM

    from lmforge.model.io import load_model

    m = load_model(checkpoint).eval()
    h = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    if ids is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, m.cfg.vocab_size, (2, min(32, m.cfg.max_seq_len)), generator=g).tolist()
    x = torch.tensor(ids)
    with torch.no_grad():
        a, _ = m(x)
        b = h(x).logits
    return float((a.float() - b.float()).abs().max())


# ---- import ---------------------------------------------------------------------------------

_INVERSE_LAYER_MAP = {v: k for k, v in _LAYER_MAP.items()}


def lmforge_config(hf_cfg: dict, where: str = "config.json") -> ModelConfig:
    """The ModelConfig of an HF Llama/Qwen3 config.json; InputError naming what our block cannot do."""
    arch = hf_cfg.get("model_type")
    if arch not in ARCHITECTURES:
        raise InputError(f"{where}: model_type {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    refuse = {
        "attention_bias": bool(hf_cfg.get("attention_bias")),
        "mlp_bias": bool(hf_cfg.get("mlp_bias")),
        "hidden_act": hf_cfg.get("hidden_act", "silu") != "silu",
        "rope_scaling": bool(hf_cfg.get("rope_scaling")) and (hf_cfg["rope_scaling"].get("rope_type") or hf_cfg["rope_scaling"].get("type")) != "default",
        "use_sliding_window": bool(hf_cfg.get("use_sliding_window")),
    }
    rp = hf_cfg.get("rope_parameters")
    if isinstance(rp, dict) and rp.get("rope_type", "default") != "default":
        refuse["rope_parameters"] = True
    bad = [k for k, v in refuse.items() if v]
    if bad:
        raise InputError(f"{where}: {bad[0]} = {hf_cfg.get(bad[0])!r} has no lmforge equivalent")
    try:
        d, heads = int(hf_cfg["hidden_size"]), int(hf_cfg["num_attention_heads"])
        head_dim = int(hf_cfg.get("head_dim") or d // heads)
        theta = (rp or {}).get("rope_theta", hf_cfg.get("rope_theta", 10000.0)) if isinstance(rp, dict) else hf_cfg.get("rope_theta", 10000.0)
        cfg = ModelConfig(
            vocab_size=int(hf_cfg["vocab_size"]), d_model=d, n_layers=int(hf_cfg["num_hidden_layers"]), n_heads=heads,
            n_kv_heads=int(hf_cfg.get("num_key_value_heads") or heads), ffn_hidden=int(hf_cfg["intermediate_size"]),
            max_seq_len=int(hf_cfg.get("max_position_embeddings", 2048)), rope_theta=float(theta),
            norm_eps=float(hf_cfg.get("rms_norm_eps", 1e-6)), qk_norm=arch == "qwen3",
            tie_embeddings=bool(hf_cfg.get("tie_word_embeddings", arch == "qwen3")),
            init_std=float(hf_cfg.get("initializer_range", 0.02)), head_dim=head_dim)
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{where}: missing or bad field ({type(e).__name__}: {e})") from None
    try:
        cfg.validate()
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None
    return cfg


def lmforge_state_dict(hsd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename an HF Llama/Qwen3 state dict to lmforge names (the inverse of `hf_state_dict`)."""
    out = {}
    for k, v in hsd.items():
        if k == "model.embed_tokens.weight":
            out["tok_emb.weight"] = v
        elif k == "model.norm.weight":
            out["norm.weight"] = v
        elif k == "lm_head.weight":
            if not cfg.tie_embeddings:
                out["lm_head.weight"] = v
        elif k.startswith("model.layers."):
            _, _, i, rest = k.split(".", 3)
            qk = rest in ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
            if rest not in _INVERSE_LAYER_MAP or (qk and not cfg.qk_norm):
                raise InputError(f"cannot import parameter {k!r}: no lmforge equivalent")
            out[f"layers.{i}.{_INVERSE_LAYER_MAP[rest]}"] = v
        elif k.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from rope_theta
        else:
            raise InputError(f"cannot import parameter {k!r}: no lmforge equivalent")
    return out


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    files = [directory / "model.safetensors"]
    if not files[0].is_file() and index.is_file():
        wm = (read_json(index, {}) or {}).get("weight_map") or {}
        files = [directory / f for f in sorted(set(wm.values()))]
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise InputError(f"no weights at {f}")
        try:
            sd.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types on corrupt files
            raise InputError(f"cannot read weights {f}: {e}") from None
    return sd


def load_hf(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Transformer:
    """An HF Llama/Qwen3 folder (config.json + safetensors) as an lmforge `Transformer`."""
    directory = Path(directory)
    hf_cfg = read_json(directory / "config.json")
    if not isinstance(hf_cfg, dict):
        raise InputError(f"no readable config.json in {directory}")
    cfg = lmforge_config(hf_cfg, str(directory / "config.json"))
    sd = lmforge_state_dict(_read_hf_weights(directory), cfg)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (cfg.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise InputError(f"weights in {directory} do not match its config.json: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model


__all__ = ["export_hf", "hf_state_dict", "hf_config", "compare_logits", "load_hf", "lmforge_config", "lmforge_state_dict"]
