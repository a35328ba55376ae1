"""GGUF export (`lmforge export gguf`): an lmforge checkpoint as a file llama.cpp loads.

Written with the `gguf` package's `GGUFWriter`, read back with its `GGUFReader`.

* **Architecture.** Dense models without QK-norm are written as llama.cpp's `llama`; with QK-norm
  as `qwen3` (the same block with an RMSNorm on each query/key head before RoPE). Mixture-of-experts
  models are refused. Metadata: context length, width, depth, FFN width, heads and key/value heads,
  RoPE theta and dimension, RMSNorm epsilon, vocabulary size, file type.
* **RoPE layout.** lmforge (like HF Llama) rotates the two *halves* of each head; llama.cpp's `llama`
  architecture rotates *adjacent pairs*. The query/key projection rows are therefore permuted for
  `llama` (row h*hd + 2i + j <- h*hd + j*hd/2 + i), as llama.cpp's own HF converter does; `qwen3`
  uses the half-rotation (NEOX) layout and takes the rows unchanged.
* **Types.** `f32` (everything), `f16` and `q8_0` (2-D weights; norms stay f32, as llama.cpp's
  converter does). q8_0 uses `gguf.quants.quantize` (blocks of 32 int8 with one f16 scale); a weight
  whose row length is not a multiple of 32 falls back to f16.
* **Tokenizer.** `tokenizer.ggml.model = "gpt2"` (byte-level BPE): the vocabulary strings in the
  byte-level alphabet, token types (special tokens are CONTROL, ids beyond the tokenizer up to the
  model's vocabulary are `[PAD<i>]` UNUSED rows), the merges, bos/eos/pad/eot ids and the chat
  template (lmforge's template without the `{% generation %}` markers, which only `transformers`
  understands; the rendered text is the same).
* **Pre-tokenizer.** llama.cpp has no way to read a split regex from the file: it maps
  `tokenizer.ggml.pre` to one of its built-in regexes. A tokenizer trained with `[tokenizer] split =
  "llama-bpe"` (or `"qwen2"`) carries llama.cpp's own regex for that pre-tokenizer, character for
  character (`LLAMA3_PATTERN`, `QWEN2_PATTERN`): it is declared as such, exactly, and llama.cpp
  tokenizes every text as lmforge does. lmforge's default regex (`split = "lmforge"`) equals none of
  them: it lets a word take the line break before it ("\\nword" is one piece) and has no
  `\\s*[\\r\\n]+` rule. For it the closest is declared, with a warning: `llama-bpe` (digits in runs of
  up to 3, whole-piece vocabulary lookup like ours) for `digits = "group3"`, `qwen2` (single digits)
  for `digits = "single"`; the two agree on any text without a line break and differ where a line
  break is followed by a letter or a whitespace run holds a line break (`PRETOKENIZER_DIFFERENCES`).
  The file's exact regex is stored under `lmforge.tokenizer.pre_regex` (llama.cpp ignores it;
  `gguf_tokenizer` rebuilds our tokenizer from it) and `lmforge.tokenizer.pre_exact` says whether
  llama.cpp's equals it. A foreign tokenizer with GPT-2's ByteLevel regex is declared `gpt-2`
  (exact); one with the Llama 3 / Qwen2 regex as their tokenizer.json spells it (`(?i:'s|...)`)
  as `llama-bpe` / `qwen2`, not exact: Unicode case folding makes `'\u017f` (long s) a contraction
  there, llama.cpp's ASCII `'[sS]` does not. Any other pre-tokenizer is refused.

`read_gguf_info(path)` reads a GGUF back (metadata, tensors); `gguf_state_dict` / `load_gguf_model`
turn one of ours (or any llama / qwen3 GGUF of the same block) back into lmforge weights, which is
what `lmforge export gguf --check` compares against the source model.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lmforge.errors import InputError

TYPES = ("f32", "f16", "q8_0")
ARCHITECTURES = ("llama", "qwen3")

# lmforge's split regex (lmforge.tokenizer.train_bpe.split_pattern) for each `digits` setting, and
# the llama.cpp pre-tokenizer declared for it.
LMFORGE_PATTERNS = {
    "group3": r"'(?i:[sdmt]|ll|ve|re)|[^\r\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s+(?!\S)|\s+",
    "single": r"'(?i:[sdmt]|ll|ve|re)|[^\r\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s+(?!\S)|\s+",
}
# llama.cpp's built-in regexes, as src/llama-vocab.cpp spells them (the contractions in ASCII case);
# lmforge.tokenizer.train_bpe.LLAMA_CPP_PATTERNS (`split = "llama-bpe"` / `"qwen2"`) are these strings.
LLAMA3_PATTERN = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
PRE_REGEX = {"llama-bpe": LLAMA3_PATTERN, "qwen2": QWEN2_PATTERN, "gpt-2": GPT2_PATTERN}
# the same regexes as the original Llama 3 / Qwen2 tokenizer.json files write them
HF_CASE_FOLDED = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}
PRETOKENIZER_DIFFERENCES = (
    "lmforge's regex lets a word take the line break before it ('\\nword' is one piece; llama.cpp: '\\n' + 'word'), "
    "and has no '\\s*[\\r\\n]+' rule (a whitespace run holding a line break splits differently); "
    "on text without line breaks the two agree (train with [tokenizer] split = \"llama-bpe\" for an exact match)"
)
CASE_FOLD_DIFFERENCE = ("the tokenizer's (?i:'s|...) contractions also match \"'\u017f\" (long s) through Unicode case "
                        "folding; llama.cpp's ASCII '[sS] does not; all other text splits the same")

# our parameter name (inside layers.{i}.) -> GGUF tensor name (inside blk.{i}.)
_LAYER_MAP = {
    "attn_norm.weight": "attn_norm.weight",
    "attn.wq.weight": "attn_q.weight",
    "attn.wk.weight": "attn_k.weight",
    "attn.wv.weight": "attn_v.weight",
    "attn.wo.weight": "attn_output.weight",
    "attn.q_norm.weight": "attn_q_norm.weight",
    "attn.k_norm.weight": "attn_k_norm.weight",
    "mlp_norm.weight": "ffn_norm.weight",
    "mlp.w1.weight": "ffn_gate.weight",
    "mlp.w3.weight": "ffn_up.weight",
    "mlp.w2.weight": "ffn_down.weight",
}
_TOP_MAP = {"tok_emb.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
_INV_LAYER = {v: k for k, v in _LAYER_MAP.items()}
_INV_TOP = {v: k for k, v in _TOP_MAP.items()}


def _gguf():
    try:
        import gguf
    except ImportError:
        raise InputError("GGUF export needs the `gguf` package: pip install gguf") from None
    return gguf


# ---- weights --------------------------------------------------------------------------------


def rope_permute(w, n_heads: int):
    """Rows of a query/key projection from rotate-half (lmforge/HF) to adjacent-pair (GGML) order."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_unpermute(w, n_heads: int):
    """The inverse of `rope_permute`."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(sd: dict, cfg) -> dict:
    """lmforge state dict (torch tensors) -> {GGUF name: float32 numpy array in GGUF row order}."""
    import torch

    arch = "qwen3" if cfg.qk_norm else "llama"
    out = {}
    for k, v in sd.items():
        a = v.detach().to(torch.float32).cpu().numpy()
        if k in _TOP_MAP:
            if k == "lm_head.weight" and cfg.tie_embeddings:
                continue  # llama.cpp reads the tied head from token_embd
            out[_TOP_MAP[k]] = a
            continue
        parts = k.split(".", 2)
        if len(parts) != 3 or parts[0] != "layers" or parts[2] not in _LAYER_MAP:
            raise InputError(f"cannot export parameter {k!r}: no GGUF ({arch}) equivalent")
        rest = parts[2]
        if arch == "llama" and rest == "attn.wq.weight":
            a = rope_permute(a, cfg.n_heads)
        elif arch == "llama" and rest == "attn.wk.weight":
            a = rope_permute(a, cfg.n_kv_heads)
        out[f"blk.{parts[1]}.{_LAYER_MAP[rest]}"] = a
    if "token_embd.weight" not in out:
        raise InputError("the checkpoint has no token embedding (tok_emb.weight)")
    return out


def _encode_tensor(name: str, a, kind: str):
    """(array to write, GGMLQuantizationType or None for a plain float32/float16 array)."""
    gguf = _gguf()
    import numpy as np

    if kind == "f32" or a.ndim < 2:
        return np.ascontiguousarray(a, dtype=np.float32), None
    if kind == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        q = gguf.quants.quantize(np.ascontiguousarray(a, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
        return q, gguf.GGMLQuantizationType.Q8_0
    return np.ascontiguousarray(a, dtype=np.float16), None


# ---- tokenizer ------------------------------------------------------------------------------


def _pre_tokenizer_of(spec: dict, where: Path) -> tuple[str, str, bool]:
    """(llama.cpp pre name, the file's exact split regex, whether llama.cpp's regex equals it)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    steps = [s for s in steps or [] if isinstance(s, dict)]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True) \
            and not steps[0].get("add_prefix_space"):
        return "gpt-2", GPT2_PATTERN, True
    if len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and not steps[1].get("use_regex") and "Regex" in (steps[0].get("pattern") or {}):
        regex = steps[0]["pattern"]["Regex"]
        for name, r in PRE_REGEX.items():
            if regex == r:
                return name, regex, True
        if regex == LMFORGE_PATTERNS["group3"]:
            return "llama-bpe", regex, False
        if regex == LMFORGE_PATTERNS["single"]:
            return "qwen2", regex, False
        for name, r in HF_CASE_FOLDED.items():
            if regex == r:
                return name, regex, False
        raise InputError(f"{where}: its split regex {regex!r} matches none of llama.cpp's pre-tokenizers "
                         "(supported: lmforge's, llama.cpp's llama-bpe and qwen2 — `[tokenizer] split` —, GPT-2)")
    raise InputError(f"{where}: not a byte-level BPE with a Split(regex) + ByteLevel or a GPT-2 ByteLevel "
                     "pre-tokenizer; llama.cpp's `gpt2` tokenizer model cannot reproduce it")


def gguf_vocab(tokenizer_json: str | Path, n_vocab: int) -> dict:
    """The tokenizer metadata a GGUF carries, from a tokenizer.json: tokens, types, merges, pre-tokenizer,
    special ids; padded with `[PAD<i>]` UNUSED entries up to the model's `n_vocab` rows."""
    gguf = _gguf()
    f = Path(tokenizer_json)
    f = f / "tokenizer.json" if f.is_dir() else f
    if not f.is_file():
        raise InputError(f"no tokenizer at {f}")
    try:
        spec = json.loads(f.read_text(encoding="utf-8"))
        model = spec["model"]
        if model.get("type") != "BPE":
            raise InputError(f"{f}: tokenizer model {model.get('type')!r} is not BPE; GGUF export writes byte-level BPE only")
        vocab: dict[str, int] = dict(model["vocab"])
        added = spec.get("added_tokens") or []
        raw_merges = model.get("merges") or []
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{f}: not a tokenizer.json ({type(e).__name__}: {e})") from None
    pre, regex, exact = _pre_tokenizer_of(spec, f)
    types: dict[int, int] = {}
    for t in added:
        vocab[t["content"]] = int(t["id"])
        types[int(t["id"])] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    size = max(vocab.values()) + 1
    if size > n_vocab:
        raise InputError(f"tokenizer {f} has {size} ids, more than the model's vocab_size {n_vocab}: wrong tokenizer")
    by_id: dict[int, str] = {i: s for s, i in vocab.items()}
    tokens, toktypes = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            toktypes.append(types.get(i, int(gguf.TokenType.NORMAL)))
        else:
            tokens.append(f"[PAD{i}]")
            toktypes.append(int(gguf.TokenType.UNUSED))
    merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges]
    ids = {name: vocab.get(tok) for name, tok in (("bos", "<|bos|>"), ("eos", "<|eos|>"), ("pad", "<|pad|>"), ("eot", "<|end|>"))}
    if ids["bos"] is None or ids["eos"] is None:  # a foreign tokenizer: the runtime's lookup rules
        from lmforge.tokenizer import Tokenizer

        t = Tokenizer.from_file(f, backend="tokenizers")
        ids.update(bos=t.bos_id, eos=t.eos_id, pad=t.pad_id)
    return {"tokens": tokens, "types": toktypes, "merges": merges, "pre": pre, "regex": regex, "exact": exact,
            "difference": pretokenizer_difference(regex), "n_tokenizer": size, **ids}


def pretokenizer_difference(regex: str) -> str:
    """How llama.cpp's declared pre-tokenizer splits differently from `regex` ("" when it does not)."""
    if regex in PRE_REGEX.values():
        return ""
    if regex in HF_CASE_FOLDED.values():
        return CASE_FOLD_DIFFERENCE
    return PRETOKENIZER_DIFFERENCES


def gguf_chat_template() -> str:
    """lmforge's chat template for llama.cpp / llama-cpp-python's Jinja: `chat_template_jinja()` without
    the `{% generation %}` markers (a transformers-only tag); it renders the same text."""
    from lmforge.tokenizer.chat import chat_template_jinja

    return chat_template_jinja().replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")


# ---- export ---------------------------------------------------------------------------------


def export_gguf(model_path: str | Path, out: str | Path, kind: str = "f32", tokenizer: str | Path | None = None) -> dict:
    """Write the GGUF of the model at `model_path` (anything `resolve_model` accepts) to `out`.
    Returns a summary: path, architecture, type, tensor count, bytes, pre-tokenizer."""
    gguf = _gguf()
    import torch

    from lmforge.infer import load_model, quantization_of
    from lmforge.infer.compress import densify_lowrank, lowrank_of
    from lmforge.model.io import load_checkpoint, resolve_model

    if kind not in TYPES:
        raise InputError(f"--type {kind!r}: choose one of {', '.join(TYPES)}")
    ref = resolve_model(model_path)
    if ref.kind == "lmforge" and quantization_of(ref.path) is not None:
        raise InputError(f"{ref.path} is a quantized checkpoint ({quantization_of(ref.path).get('kind')}): "
                         "export the dense checkpoint it came from (--type q8_0 quantizes for llama.cpp)")
    tok = Path(tokenizer) if tokenizer is not None else ref.tokenizer
    if tok is None:
        raise InputError(f"no tokenizer.json with the model {ref.path} or in its run: pass --tokenizer DIR")
    if not tok.exists():
        raise InputError(f"--tokenizer {tok} not found")
    lowrank = ref.kind == "lmforge" and lowrank_of(ref.path) is not None
    if lowrank:  # llama.cpp has no factorised linear layer: the function at the dense size
        model, ref = load_model(ref.path)
        densified = densify_lowrank(model)
    else:
        model, ref = load_checkpoint(ref.path)
        densified = []
    cfg = model.cfg
    if cfg.moe_experts:
        raise InputError(f"{ref.path} is a mixture-of-experts model ({cfg.moe_experts} experts); GGUF export supports dense models only")
    voc = gguf_vocab(tok, cfg.vocab_size)
    with torch.no_grad():
        tensors = gguf_tensors(model.state_dict(), cfg)
    del model
    arch = "qwen3" if cfg.qk_norm else "llama"
    out = Path(out)
    if out.is_dir():
        raise InputError(f"{out} is a directory: give the output file name (e.g. {out / 'model.gguf'})")
    if not out.parent.exists():
        raise InputError(f"output directory {out.parent} does not exist")
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    try:
        name = ref.path.parent.parent.name if ref.path.name.startswith("step_") else ref.path.name
        w.add_name(f"lmforge {name}")
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.ffn_hidden)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_vocab_size(cfg.vocab_size)
        ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[kind]
        w.add_file_type(int(ftype))
        if kind != "f32":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        # tokenizer
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(voc["pre"])
        w.add_token_list(voc["tokens"])
        w.add_token_types(voc["types"])
        w.add_token_merges(voc["merges"])
        for key, fn in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id),
                        ("eot", w.add_eot_token_id)):
            if voc[key] is not None:
                fn(int(voc[key]))
        w.add_add_bos_token(voc["bos"] is not None)  # `lmforge generate` starts every prompt with <|bos|>
        w.add_add_eos_token(False)
        from lmforge.tokenizer.chat import TEMPLATE

        if all(t in voc["tokens"][: voc["n_tokenizer"]] for t in TEMPLATE.special_tokens):
            w.add_chat_template(gguf_chat_template())
        # lmforge's own keys (llama.cpp ignores them): the exact split regex and the source config
        w.add_string("lmforge.tokenizer.pre_regex", voc["regex"])
        w.add_bool("lmforge.tokenizer.pre_exact", bool(voc["exact"]))
        w.add_string("lmforge.config", json.dumps(cfg.to_dict(), sort_keys=True))
        w.add_string("lmforge.source", str(ref.path))
        if ref.step is not None:
            w.add_uint64("lmforge.step", int(ref.step))
        n_bytes = 0
        for tname, a in tensors.items():
            data, raw = _encode_tensor(tname, a, kind)
            n_bytes += data.nbytes
            w.add_tensor(tname, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"path": out, "arch": arch, "type": kind, "tensors": len(tensors), "tensor_bytes": n_bytes,
            "file_bytes": out.stat().st_size, "pre": voc["pre"], "pre_exact": voc["exact"],
            "pre_difference": voc["difference"], "source": ref.path, "densified": len(densified)}


# ---- reading back ---------------------------------------------------------------------------


def _reader(path: str | Path):
    gguf = _gguf()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"GGUF file not found: {p}")
    try:
        return gguf.GGUFReader(str(p))
    except Exception as e:  # the reader raises ValueError, IndexError, OSError ... on a bad file
        raise InputError(f"{p}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def read_gguf_info(path: str | Path) -> dict:
    """A GGUF's metadata and tensor table: {"path", "arch", "metadata": {key: value} (arrays as lists),
    "tensors": {name: {"shape": torch-order shape, "type": "F32" | "F16" | "Q8_0" | ...}}}.
    InputError (one line) when the file is missing, not GGUF, truncated or corrupt."""
    r = _reader(path)
    meta = {}
    try:
        for key, field in r.fields.items():
            if key.startswith("GGUF."):
                continue
            meta[key] = field.contents()
        tensors = {t.name: {"shape": tuple(int(d) for d in reversed(t.shape.tolist())), "type": t.tensor_type.name}
                   for t in r.tensors}
    except Exception as e:
        raise InputError(f"{path}: corrupt GGUF metadata ({type(e).__name__}: {e})") from None
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise InputError(f"{path}: GGUF without general.architecture")
    return {"path": Path(path), "arch": arch, "metadata": meta, "tensors": tensors}


def gguf_config(info: dict):
    """The lmforge ModelConfig of a llama / qwen3 GGUF (ours record it exactly under lmforge.config)."""
    from lmforge.model.config import ModelConfig

    m, arch = info["metadata"], info["arch"]
    if arch not in ARCHITECTURES:
        raise InputError(f"{info['path']}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    if isinstance(m.get("lmforge.config"), str):
        try:
            return ModelConfig.from_dict(json.loads(m["lmforge.config"]))
        except (ValueError, TypeError) as e:
            raise InputError(f"{info['path']}: corrupt lmforge.config ({e})") from None
    try:
        n_heads = int(m[f"{arch}.attention.head_count"])
        d = int(m[f"{arch}.embedding_length"])
        emb = info["tensors"]["token_embd.weight"]["shape"]
        cfg = ModelConfig(vocab_size=int(emb[0]), d_model=d, n_layers=int(m[f"{arch}.block_count"]), n_heads=n_heads,
                          n_kv_heads=int(m.get(f"{arch}.attention.head_count_kv", n_heads)),
                          ffn_hidden=int(m[f"{arch}.feed_forward_length"]), max_seq_len=int(m[f"{arch}.context_length"]),
                          rope_theta=float(m.get(f"{arch}.rope.freq_base", 10000.0)),
                          norm_eps=float(m[f"{arch}.attention.layer_norm_rms_epsilon"]), qk_norm=arch == "qwen3",
                          tie_embeddings="output.weight" not in info["tensors"])
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"{info['path']}: {arch} GGUF without the metadata lmforge needs ({type(e).__name__}: {e})") from None
    if int(m.get(f"{arch}.attention.key_length", cfg.head_dim)) != cfg.head_dim:
        raise InputError(f"{info['path']}: head dimension differs from embedding_length / head_count; lmforge's block cannot load it")
    return cfg


def gguf_state_dict(path: str | Path) -> tuple[dict, object]:
    """(lmforge state dict of float32 torch tensors, ModelConfig) from a llama / qwen3 GGUF: quantized
    tensors dequantized, the llama RoPE row permutation undone, names mapped back."""
    gguf = _gguf()
    import numpy as np
    import torch

    info = read_gguf_info(path)
    cfg = gguf_config(info)
    r = _reader(path)
    sd = {}
    for t in r.tensors:
        if t.name in _INV_TOP:
            key = _INV_TOP[t.name]
        else:
            parts = t.name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or parts[2] not in _INV_LAYER:
                raise InputError(f"{path}: tensor {t.name!r} has no lmforge equivalent")
            key = f"layers.{parts[1]}.{_INV_LAYER[parts[2]]}"
        a = np.asarray(t.data)
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            a = a.astype(np.float32)
        else:
            try:
                a = gguf.quants.dequantize(a, t.tensor_type)
            except NotImplementedError:
                raise InputError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, which cannot be dequantized here") from None
        a = a.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
        if info["arch"] == "llama" and key.endswith("attn.wq.weight"):
            a = rope_unpermute(a, cfg.n_heads)
        elif info["arch"] == "llama" and key.endswith("attn.wk.weight"):
            a = rope_unpermute(a, cfg.n_kv_heads)
        sd[key] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    return sd, cfg


def load_gguf_model(path: str | Path):
    """An lmforge Transformer (float32, eval mode) with the weights of a llama / qwen3 GGUF."""
    from lmforge.model.transformer import Transformer

    sd, cfg = gguf_state_dict(path)
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise InputError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def gguf_tokenizer(path: str | Path, pattern: str | None = None):
    """An HF `tokenizers.Tokenizer` rebuilt from a GGUF's vocabulary and merges: byte-level BPE with
    whole-piece lookup, split by `pattern` (default: the exact regex lmforge recorded, else the regex of
    the declared llama.cpp pre-tokenizer). Special (CONTROL) tokens become added special tokens."""
    gguf = _gguf()
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    m = read_gguf_info(path)["metadata"]
    if m.get("tokenizer.ggml.model") != "gpt2":
        raise InputError(f"{path}: tokenizer model {m.get('tokenizer.ggml.model')!r} is not byte-level BPE (gpt2)")
    if pattern is None:
        pattern = m.get("lmforge.tokenizer.pre_regex") or PRE_REGEX.get(m.get("tokenizer.ggml.pre"))
        if pattern is None:
            raise InputError(f"{path}: unknown pre-tokenizer {m.get('tokenizer.ggml.pre')!r}: pass the split regex")
    tokens, types, merges = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"], m.get("tokenizer.ggml.merges", [])
    vocab = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (gguf.TokenType.NORMAL, gguf.TokenType.BYTE)}
    special = [(i, t) for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    for i, t in special:
        vocab[t] = i
    pairs = [tuple(x.split(" ", 1)) for x in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=m.get("tokenizer.ggml.pre") != "gpt-2"))
    if pattern == GPT2_PATTERN:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in sorted(special)])
    return tok


# ---- CLI ------------------------------------------------------------------------------------


def _cmd_export_gguf(args: argparse.Namespace) -> int:
    from lmforge.log import logger

    s = export_gguf(args.model, args.out, args.type, args.tokenizer)
    print(f"exported {s['source']} -> {s['path']}: {s['arch']} {s['type']}, {s['tensors']} tensors, "
          f"{s['file_bytes'] / 1e6:.1f} MB, pre-tokenizer {s['pre']}")
    if s["densified"]:
        print(f"note: {s['source']} is a low-rank checkpoint: its {s['densified']} factorised layers are written as "
              "dense weights (up @ down; llama.cpp has no factorised linear layer), so the file has the dense size")
    if not s["pre_exact"]:
        logger.warning("llama.cpp has no pre-tokenizer with this tokenizer's split regex; declared the closest, %r: %s",
                       s["pre"], s["pre_difference"])
    if args.check:
        _check(s)
    return 0


def _check(s: dict) -> None:
    """Read the file back: weights vs the source model's logits, tokenizer vs the source tokenizer."""
    import gzip

    import torch

    from lmforge.infer import load_model_and_tokenizer

    src, tok, _ = load_model_and_tokenizer(s["source"])
    back = load_gguf_model(s["path"])
    sample = Path(__file__).resolve().parents[1] / "sample" / "dictionary" / "gcide-sample.jsonl.gz"
    texts = [json.loads(line)["text"] for _, line in zip(range(20), gzip.open(sample, "rt", encoding="utf-8"))] \
        if sample.is_file() else ["The quick brown fox jumps over the lazy dog.\nA second line, 123 4567."]
    ids = [tok.bos_id] if tok.bos_id is not None else []
    ids = (ids + tok.encode("\n".join(texts)))[: min(64, src.cfg.max_seq_len)]
    x = torch.tensor([ids])
    with torch.no_grad():
        a, _ = src(x)
        b, _ = back(x)
    diff = float((a - b).abs().max())
    agree = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    print(f"check: max |logit difference| lmforge vs GGUF weights ({s['type']}): {diff:.3g}, argmax agreement {agree:.1%}")
    rebuilt = gguf_tokenizer(s["path"])
    bad = sum(rebuilt.encode(t, add_special_tokens=False).ids != tok.encode(t) for t in texts)
    print(f"check: tokenizer rebuilt from the GGUF vocabulary + merges: {len(texts) - bad}/{len(texts)} texts encode identically")
    if bad or (s["type"] == "f32" and diff > 1e-3):
        raise InputError(f"check failed: {bad} texts tokenized differently, max logit difference {diff:.3g}")


def _cmd_gguf_info(args: argparse.Namespace) -> int:
    info = read_gguf_info(args.file)
    m = info["metadata"]
    if args.json:
        short = {k: (v if not isinstance(v, list) or len(v) <= 16 else f"[{len(v)} items]") for k, v in m.items()}
        print(json.dumps({"arch": info["arch"], "metadata": short, "tensors": info["tensors"]}, default=str))
        return 0
    print(f"{info['path']}: {info['arch']}, {len(info['tensors'])} tensors")
    for k, v in m.items():
        if isinstance(v, list):
            v = f"[{len(v)} items]" if len(v) > 8 else v
        elif isinstance(v, str) and len(v) > 100:
            v = v[:100] + "..."
        print(f"  {k} = {v}")
    types: dict[str, int] = {}
    for t in info["tensors"].values():
        types[t["type"]] = types.get(t["type"], 0) + 1
    print("  tensor types: " + ", ".join(f"{k} x{n}" for k, n in sorted(types.items())))
    return 0


def add_export_parser(esub: argparse._SubParsersAction) -> None:
    """Adds `lmforge export gguf` and `lmforge export gguf-info` to the `export` sub-parsers."""
    g = esub.add_parser("gguf", help="GGUF file for llama.cpp (llama, or qwen3 with QK-norm): f32, f16 or q8_0")
    g.add_argument("model", help="run directory, checkpoints directory or model directory")
    g.add_argument("out", help="output .gguf file")
    g.add_argument("--type", default="f32", help="tensor type: f32, f16 or q8_0 (norms stay f32)")
    g.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (default: the checkpoint's copy, else the run's)")
    g.add_argument("--check", action="store_true",
                   help="read the file back: logits of its weights vs the source model, tokenizer rebuilt from its vocabulary")
    g.set_defaults(func=_cmd_export_gguf)
    i = esub.add_parser("gguf-info", help="show a GGUF file's metadata and tensor types")
    i.add_argument("file", help=".gguf file")
    i.add_argument("--json", action="store_true", help="one JSON object")
    i.set_defaults(func=_cmd_gguf_info)
