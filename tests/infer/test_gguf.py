"""GGUF export: a tiny checkpoint with an lmforge byte-level BPE written with gguf's writer and read
back with its reader — metadata, tensor shapes and values per type, the RoPE row permutation llama.cpp
needs, tokenizer vocabulary / merges / special ids / chat template, and one-line errors."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmforge.cli import main  # noqa: E402
from lmforge.errors import InputError  # noqa: E402
from lmforge.infer.gguf import (  # noqa: E402
    LLAMA3_PATTERN,
    _encode_tensor,
    export_gguf,
    gguf_state_dict,
    gguf_tokenizer,
    load_gguf_model,
    read_gguf_info,
    rope_permute,
    rope_unpermute,
)
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.io import save_model  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.tokenizer import Tokenizer  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[2] / "src" / "lmforge" / "sample"


def _texts(name: str, n: int) -> list[str]:
    with gzip.open(SAMPLE / name, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """Real text of the bundled sample: dictionary entries and man pages (multi-line, indented)."""
    return _texts("dictionary/gcide-sample.jsonl.gz", 300) + _texts("multilingual/manpages-sample.jsonl.gz", 40)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, corpus) -> Path:
    """lmforge's own byte-level BPE (train_bpe: its regex, special tokens, whole-piece lookup)."""
    from lmforge.tokenizer.config import TokenizerConfig
    from lmforge.tokenizer.train_bpe import save_tokenizer, train_tokenizer

    cfg = TokenizerConfig(vocab_size=600, reserved_tokens=2)
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(corpus[::2], cfg), out, cfg)
    return out


def _checkpoint(root: Path, tok_dir: Path, **kw) -> tuple[Path, Transformer]:
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=640, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                                ffn_hidden=128, rope_theta=5000.0, norm_eps=1e-6), **kw})
    model = Transformer(cfg).eval()
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_model(model, root)
    shutil.copyfile(tok_dir / "tokenizer.json", root / "tokenizer.json")
    return root, model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok_dir):
    return _checkpoint(tmp_path_factory.mktemp("model") / "m", tok_dir)


@pytest.fixture(scope="module")
def f32_file(ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gguf") / "m-f32.gguf"
    export_gguf(ckpt[0], out, "f32")
    return out


def test_metadata_and_tensor_shapes(ckpt, f32_file):
    model = ckpt[1]
    cfg = model.cfg
    info = read_gguf_info(f32_file)
    m, t = info["metadata"], info["tensors"]
    assert info["arch"] == "llama"
    assert m["llama.context_length"] == 64 and m["llama.embedding_length"] == 64 and m["llama.block_count"] == 2
    assert m["llama.feed_forward_length"] == 128 and m["llama.attention.head_count"] == 4
    assert m["llama.attention.head_count_kv"] == 2 and m["llama.rope.dimension_count"] == 16
    assert m["llama.rope.freq_base"] == pytest.approx(5000.0) and m["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert m["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert json.loads(m["lmforge.config"]) == cfg.to_dict()
    assert t["token_embd.weight"]["shape"] == (640, 64)
    assert "output.weight" not in t  # tied head: llama.cpp reads token_embd
    assert t["blk.0.attn_q.weight"]["shape"] == (64, 64) and t["blk.1.attn_k.weight"]["shape"] == (32, 64)
    assert t["blk.0.ffn_gate.weight"]["shape"] == (128, 64) and t["blk.0.ffn_down.weight"]["shape"] == (64, 128)
    assert t["blk.1.attn_norm.weight"]["shape"] == (64,) and t["output_norm.weight"]["shape"] == (64,)
    assert len(t) == 2 + 9 * 2
    assert {v["type"] for v in t.values()} == {"F32"}


def test_f32_tensors_equal_the_weights(ckpt, f32_file):
    model = ckpt[1]
    sd = model.state_dict()
    r = gguf.GGUFReader(str(f32_file))
    raw = {x.name: np.asarray(x.data) for x in r.tensors}
    # stored: the q/k rows permuted to llama.cpp's adjacent-pair RoPE layout, the rest as is
    assert np.array_equal(raw["blk.0.attn_q.weight"], rope_permute(sd["layers.0.attn.wq.weight"].numpy(), 4))
    assert np.array_equal(raw["blk.0.attn_k.weight"], rope_permute(sd["layers.0.attn.wk.weight"].numpy(), 2))
    assert not np.array_equal(raw["blk.0.attn_q.weight"], sd["layers.0.attn.wq.weight"].numpy())
    assert np.array_equal(raw["blk.1.ffn_up.weight"], sd["layers.1.mlp.w3.weight"].numpy())
    back, cfg = gguf_state_dict(f32_file)
    assert cfg.to_dict() == model.cfg.to_dict()
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert torch.equal(back[k], v), k
    x = torch.randint(0, 600, (2, 20))
    with torch.no_grad():
        assert torch.equal(load_gguf_model(f32_file)(x)[0], model(x)[0])


def _rope_rotate_half(x, pos, theta):
    d = x.shape[-1]
    inv = theta ** (-np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def _rope_adjacent_pairs(x, pos, theta):
    """ggml's LLAMA_ROPE_TYPE_NORM: pairs (2i, 2i+1) rotated by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    ang = pos[:, None] * theta ** (-np.arange(0, d, 2) / d)[None]
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * np.cos(ang) - b * np.sin(ang)
    out[..., 1::2] = a * np.sin(ang) + b * np.cos(ang)
    return out


def test_rope_permutation_matches_llama_cpp_rope():
    """Queries from the permuted weights, rotated the llama.cpp way, are our rotated queries with
    their dimensions permuted the same way in every head, so q.k (attention) is unchanged."""
    rng = np.random.default_rng(0)
    n_heads, hd, d, T = 3, 8, 12, 5
    w = rng.standard_normal((n_heads * hd, d))
    x = rng.standard_normal((T, d))
    pos = np.arange(T, dtype=np.float64) + 3
    ours = np.stack([_rope_rotate_half((x @ w.T)[:, h * hd:(h + 1) * hd], pos, 500.0) for h in range(n_heads)], 1)
    wp = rope_permute(w, n_heads)
    theirs = np.stack([_rope_adjacent_pairs((x @ wp.T)[:, h * hd:(h + 1) * hd], pos, 500.0) for h in range(n_heads)], 1)
    perm = rope_permute(np.arange(hd)[:, None], 1)[:, 0]
    np.testing.assert_allclose(theirs, ours[..., perm], atol=1e-12)
    np.testing.assert_array_equal(rope_unpermute(wp, n_heads), w)


def test_q8_0_and_f16(ckpt, tmp_path):
    model = ckpt[1]
    sd = model.state_dict()
    for kind in ("q8_0", "f16"):
        out = tmp_path / f"m-{kind}.gguf"
        s = export_gguf(ckpt[0], out, kind)
        t = read_gguf_info(out)["tensors"]
        want = "Q8_0" if kind == "q8_0" else "F16"
        assert {k for k, v in t.items() if v["type"] == "F32"} == {k for k in t if k.endswith("norm.weight")}
        assert all(v["type"] == want for k, v in t.items() if not k.endswith("norm.weight"))
        assert t["blk.0.attn_q.weight"]["shape"] == (64, 64)  # logical shape, not the byte shape
        back, _ = gguf_state_dict(out)
        for k, v in sd.items():
            if v.dim() == 1:
                assert torch.equal(back[k], v), k
            elif kind == "f16":
                assert torch.equal(back[k], v.half().float()), k
            else:  # blocks of 32, scale d = amax/127 stored as f16: |err| <= d/2 + 127 * d * 2^-11
                blocks = v.reshape(-1, 32)
                step = blocks.abs().amax(1, keepdim=True) / 127
                err = (back[k].reshape(-1, 32) - blocks).abs()
                assert bool((err <= step * (0.5 + 127 * 2**-11) + 1e-8).all()), k
                assert float(err.max()) > 0
        assert s["file_bytes"] < (export_gguf(ckpt[0], tmp_path / "again.gguf", "f32")["file_bytes"] * (0.35 if kind == "q8_0" else 0.6))


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32():
    a = np.random.default_rng(0).standard_normal((4, 48)).astype(np.float32)
    data, raw = _encode_tensor("x", a, "q8_0")
    assert raw is None and data.dtype == np.float16
    data, raw = _encode_tensor("x", a[:, :32].copy(), "q8_0")
    assert raw == gguf.GGMLQuantizationType.Q8_0


def test_tokenizer_round_trip(tok_dir, f32_file, corpus):
    ours = Tokenizer.from_file(tok_dir)
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    m = read_gguf_info(f32_file)["metadata"]
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "llama-bpe"
    assert m["lmforge.tokenizer.pre_regex"] == ours.pattern and m["lmforge.tokenizer.pre_exact"] is False
    tokens, types = m["tokenizer.ggml.tokens"], m["tokenizer.ggml.token_type"]
    assert len(tokens) == 640 and len(types) == 640
    for s, i in spec["model"]["vocab"].items():
        assert tokens[i] == s
    for t in spec["added_tokens"]:
        assert tokens[t["id"]] == t["content"] and types[t["id"]] == gguf.TokenType.CONTROL
    n = ours.vocab_size
    assert all(ty == gguf.TokenType.NORMAL for i, ty in enumerate(types[:n]) if i not in ours.special_ids)
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 640)] and set(types[n:]) == {gguf.TokenType.UNUSED}
    merges = [x if isinstance(x, str) else " ".join(x) for x in spec["model"]["merges"]]
    assert m["tokenizer.ggml.merges"] == merges
    assert m["tokenizer.ggml.bos_token_id"] == ours.bos_id and m["tokenizer.ggml.eos_token_id"] == ours.eos_id
    assert m["tokenizer.ggml.padding_token_id"] == ours.pad_id
    assert m["tokenizer.ggml.eot_token_id"] == ours.special_id("<|end|>") and m["tokenizer.ggml.add_bos_token"] is True
    rebuilt = gguf_tokenizer(f32_file)  # vocabulary + merges from the file, our exact regex
    held_out = corpus[1::2]
    assert [e.ids for e in rebuilt.encode_batch(held_out, add_special_tokens=False)] == ours.encode_batch(held_out)
    assert rebuilt.encode("<|user|>hi<|end|>", add_special_tokens=False).ids == ours.encode("<|user|>hi<|end|>", allow_special=True)


def test_declared_pre_tokenizer_differs_only_at_line_breaks(f32_file, tok_dir, corpus):
    """llama.cpp splits with the Llama 3 regex (the declared `llama-bpe`): the same ids as ours on every
    line of real text, different ids where a line break precedes a word or sits in a whitespace run."""
    ours = Tokenizer.from_file(tok_dir)
    llama3 = gguf_tokenizer(f32_file, pattern=LLAMA3_PATTERN)
    lines = [ln for doc in corpus for ln in doc.split("\n") if ln and "\r" not in ln]
    assert len(lines) > 1000
    assert [e.ids for e in llama3.encode_batch(lines, add_special_tokens=False)] == ours.encode_batch(lines)
    docs_differ = sum(llama3.encode(d, add_special_tokens=False).ids != ours.encode(d) for d in corpus)
    assert docs_differ > 0  # multi-line documents: the known difference, not hidden
    pieces = lambda tok, text: [p for p, _ in tok.pre_tokenizer.pre_tokenize_str(text)]  # noqa: E731
    ours_hf = gguf_tokenizer(f32_file)
    assert pieces(ours_hf, "a\nthe  \n\n  x") == ["a", "Ċthe", "ĠĠĊĊĠ", "Ġx"]
    assert pieces(llama3, "a\nthe  \n\n  x") == ["a", "Ċ", "the", "ĠĠĊĊ", "Ġ", "Ġx"]


def test_chat_template(f32_file, tok_dir):
    import jinja2

    from lmforge.tokenizer.chat import render

    ours = Tokenizer.from_file(tok_dir)
    tpl = read_gguf_info(f32_file)["metadata"]["tokenizer.chat_template"]
    assert "{%- generation" not in tpl and "endgeneration" not in tpl  # transformers-only tag: plain Jinja (llama.cpp, llama-cpp-python) must parse it
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Define <|end|> a word."},
            {"role": "assistant", "content": "A word is\na unit."}]
    text = jinja2.Environment().from_string(tpl).render(messages=msgs, add_generation_prompt=False)
    assert ours.encode(text, allow_special=True) == render(ours, msgs)[0]


def test_qk_norm_model_is_qwen3(tmp_path, tok_dir):
    root, model = _checkpoint(tmp_path / "qk", tok_dir, qk_norm=True, tie_embeddings=False)
    s = export_gguf(root, tmp_path / "qk.gguf", "f32")
    info = read_gguf_info(s["path"])
    assert info["arch"] == "qwen3" and info["metadata"]["qwen3.attention.key_length"] == 16
    assert "blk.0.attn_q_norm.weight" in info["tensors"] and info["tensors"]["output.weight"]["shape"] == (640, 64)
    r = {x.name: np.asarray(x.data) for x in gguf.GGUFReader(str(s["path"])).tensors}
    assert np.array_equal(r["blk.0.attn_q.weight"], model.state_dict()["layers.0.attn.wq.weight"].numpy())  # NEOX RoPE: unpermuted
    x = torch.randint(0, 600, (1, 16))
    with torch.no_grad():
        assert torch.equal(load_gguf_model(s["path"])(x)[0], model(x)[0])


def test_refusals_are_one_line(tmp_path, tok_dir, ckpt, f32_file):
    root, _ = _checkpoint(tmp_path / "moe", tok_dir, moe_experts=2, moe_top_k=1)
    with pytest.raises(InputError, match="mixture-of-experts"):
        export_gguf(root, tmp_path / "moe.gguf")
    with pytest.raises(InputError, match="--type"):
        export_gguf(ckpt[0], tmp_path / "x.gguf", "q4_k")
    (tmp_path / "notgguf.gguf").write_bytes(b"\x00" * 64)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(f32_file.read_bytes()[:5000])
    (tmp_path / "empty.gguf").write_bytes(b"")
    for bad in ("notgguf.gguf", "truncated.gguf", "empty.gguf", "missing.gguf"):
        with pytest.raises(InputError) as e:
            read_gguf_info(tmp_path / bad)
        assert "\n" not in str(e.value)
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(InputError, match="not BPE"):
        export_gguf(ckpt[0], tmp_path / "y.gguf", tokenizer=foreign)
    assert not list(tmp_path.glob("*.tmp"))


def test_cli(ckpt, tmp_path, capsys, f32_file):
    out = tmp_path / "cli.gguf"
    assert main(["export", "gguf", str(ckpt[0]), str(out), "--type", "q8_0", "--check"]) == 0
    text = capsys.readouterr().out
    assert "llama q8_0" in text and "argmax agreement" in text and "encode identically" in text
    assert main(["export", "gguf-info", str(out)]) == 0
    assert "tokenizer.ggml.pre = llama-bpe" in capsys.readouterr().out
    assert main(["export", "gguf", str(tmp_path / "nope"), str(tmp_path / "a.gguf")]) == 2
    assert main(["export", "gguf", str(ckpt[0]), str(tmp_path / "b.gguf"), "--type", "q5"]) == 2
    assert main(["export", "gguf", str(ckpt[0]), str(tmp_path / "no" / "dir" / "c.gguf")]) == 2
    assert main(["export", "gguf", str(ckpt[0]), str(tmp_path / "d.gguf"), "--tokenizer", str(tmp_path / "none")]) == 2
    (tmp_path / "bad.gguf").write_text("not a gguf")
    assert main(["export", "gguf-info", str(tmp_path / "bad.gguf")]) == 2
    err = capsys.readouterr().err
    assert "not a readable GGUF" in err and "Traceback" not in err


# ---- `[tokenizer] split = "llama-bpe"`: llama.cpp's own regex, declared exactly ------------------


@pytest.fixture(scope="module")
def llama_bpe_tok(tmp_path_factory, corpus) -> Path:
    from lmforge.tokenizer.config import TokenizerConfig
    from lmforge.tokenizer.train_bpe import save_tokenizer, train_tokenizer

    cfg = TokenizerConfig(vocab_size=600, reserved_tokens=2, split="llama-bpe")
    cfg.validate()
    out = tmp_path_factory.mktemp("tok-llama-bpe")
    save_tokenizer(train_tokenizer(corpus[::2], cfg), out, cfg)
    return out


@pytest.fixture(scope="module")
def llama_bpe_file(tmp_path_factory, llama_bpe_tok) -> Path:
    root, _ = _checkpoint(tmp_path_factory.mktemp("model-llama-bpe") / "m", llama_bpe_tok)
    out = root.parent / "m.gguf"
    s = export_gguf(root, out, "f32")
    assert s["pre"] == "llama-bpe" and s["pre_exact"] is True and s["pre_difference"] == ""
    return out


def test_llama_bpe_split_is_declared_exactly(llama_bpe_tok, llama_bpe_file, corpus):
    ours = Tokenizer.from_file(llama_bpe_tok)
    assert ours.backend == "tiktoken" and ours.pattern == LLAMA3_PATTERN
    m = read_gguf_info(llama_bpe_file)["metadata"]
    assert m["tokenizer.ggml.pre"] == "llama-bpe" and m["lmforge.tokenizer.pre_exact"] is True
    assert m["lmforge.tokenizer.pre_regex"] == LLAMA3_PATTERN
    held_out = corpus[1::2]  # whole dictionary entries and man pages: line breaks, indentation, blank lines
    assert sum("\n" in d for d in held_out) > 100
    want = ours.encode_batch(held_out)
    # rebuilt from the file with the regex llama.cpp runs for `llama-bpe` (= the recorded one)
    for rebuilt in (gguf_tokenizer(llama_bpe_file), gguf_tokenizer(llama_bpe_file, pattern=LLAMA3_PATTERN)):
        assert [e.ids for e in rebuilt.encode_batch(held_out, add_special_tokens=False)] == want


def test_llama_bpe_split_in_llama_cpp(llama_bpe_tok, llama_bpe_file, corpus):
    """llama.cpp itself (llama-cpp-python, vocabulary only) gives our ids on whole multi-line documents."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (scripts/setup_llamacpp.sh)")
    ours = Tokenizer.from_file(llama_bpe_tok)
    llm = llama_cpp.Llama(model_path=str(llama_bpe_file), vocab_only=True, verbose=False)
    texts = corpus[1::2] + ["a\nthe  \n\n  x\r\n\r\n z", "IT'S x'\u017fa we'Re 12345\u00a0\u2028y"]
    theirs = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in texts]
    assert theirs == ours.encode_batch(texts)


def test_case_folded_llama3_regex_is_not_exact(tmp_path, llama_bpe_tok, ckpt):
    """The Llama 3 tokenizer.json spelling `(?i:'s|...)` also folds U+017F into 's': declared, not exact."""
    from lmforge.infer.gguf import CASE_FOLD_DIFFERENCE, HF_CASE_FOLDED

    spec = json.loads((llama_bpe_tok / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = HF_CASE_FOLDED["llama-bpe"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    s = export_gguf(ckpt[0], tmp_path / "f.gguf", tokenizer=tmp_path / "tokenizer.json")
    assert s["pre"] == "llama-bpe" and s["pre_exact"] is False and s["pre_difference"] == CASE_FOLD_DIFFERENCE


def test_cli_warns_only_when_not_exact(llama_bpe_file, ckpt, tmp_path, monkeypatch, capsys):
    import lmforge.log

    warned = []
    monkeypatch.setattr(lmforge.log.logger, "warning", lambda *a, **k: warned.append(a))
    assert main(["export", "gguf", str(ckpt[0]), str(tmp_path / "a.gguf")]) == 0
    assert len(warned) == 1 and "closest" in warned[0][0]
    warned.clear()
    assert main(["export", "gguf", str(llama_bpe_file.parent / "m"), str(tmp_path / "b.gguf")]) == 0
    assert warned == [] and "pre-tokenizer llama-bpe" in capsys.readouterr().out
