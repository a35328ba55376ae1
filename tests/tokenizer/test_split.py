"""`[tokenizer] split`: lmforge's regex or exactly llama.cpp's `llama-bpe` / `qwen2` pre-tokenizer regex,
with identical ids from HF `tokenizers`, tiktoken and transformers on real multi-line text."""

from __future__ import annotations

import pytest

from lmforge.config import build
from lmforge.errors import ConfigError
from lmforge.tokenizer import load_tokenizer
from lmforge.tokenizer.config import TokenizerConfig
from lmforge.tokenizer.corpus import corpus_shards
from lmforge.tokenizer.train_bpe import LLAMA_CPP_PATTERNS, split_pattern, train_from_corpus

from .conftest import sample_docs
from .test_train import TRICKY

EDGE = [
    "a\nthe  \n\n  x", "x\r\ny\r\n\r\n z", "\r\rx\r", "it's IT'S x'\u017fa 'LL 'Ll we'Re", "a\u2028\u2029b \u000b\u000cc",
    "\u00a0\u2003word\u3000x\n\u2028y", "12345 \u0661\u0662\u0663\u0664 \u00bd\u00b2", "  \t\n\t  end", "foo!!\n\nbar",
    "emoji \U0001f600\n\U0001f600x", "\u0085next", "a\u200bb",
]


def test_config():
    assert TokenizerConfig().split == "lmforge"
    build(TokenizerConfig, {"split": "llama-bpe"}, "tokenizer").validate()
    build(TokenizerConfig, {"split": "qwen2", "digits": "single"}, "tokenizer").validate()
    with pytest.raises(ConfigError, match=r"tokenizer.split.*choose one of: 'lmforge', 'llama-bpe', 'qwen2'"):
        build(TokenizerConfig, {"split": "llama3"}, "tokenizer")
    with pytest.raises(ConfigError, match=r"did you mean 'split'"):
        build(TokenizerConfig, {"splt": "llama-bpe"}, "tokenizer")
    with pytest.raises(ConfigError, match=r"split = 'qwen2' .* digits = 'single'.*set digits = 'single', or split = 'llama-bpe'"):
        build(TokenizerConfig, {"split": "qwen2"}, "tokenizer").validate()
    with pytest.raises(ConfigError, match=r"split = 'llama-bpe' .* set digits = 'group3', or split = 'qwen2'"):
        build(TokenizerConfig, {"split": "llama-bpe", "digits": "single"}, "tokenizer").validate()


def test_patterns_are_llama_cpp_strings():
    from lmforge.infer.gguf import LLAMA3_PATTERN, QWEN2_PATTERN

    assert split_pattern("group3", "llama-bpe") == LLAMA_CPP_PATTERNS["llama-bpe"] == LLAMA3_PATTERN
    assert split_pattern("single", "qwen2") == LLAMA_CPP_PATTERNS["qwen2"] == QWEN2_PATTERN
    with pytest.raises(ValueError):
        split_pattern("single", "llama-bpe")


def _pieces(pattern: str, text: str) -> list[str]:
    from tokenizers import Regex, pre_tokenizers

    return [p for p, _ in pre_tokenizers.Split(Regex(pattern), behavior="isolated").pre_tokenize_str(text)]


def test_pieces():
    llama = split_pattern("group3", "llama-bpe")
    # llama.cpp's split: line breaks stand apart from the word after them, a whitespace run ends at its last line break
    assert _pieces(llama, "a\nthe  \n\n  x") == ["a", "\n", "the", "  \n\n", " ", " x"]
    assert _pieces(split_pattern("group3"), "a\nthe  \n\n  x") == ["a", "\nthe", "  \n\n ", " x"]
    # ASCII-case contractions as llama.cpp spells them: U+017F (long s) is a letter, not a contraction
    assert _pieces(llama, "IT'S x'\u017fa 12345") == ["IT", "'S", " x", "'\u017fa", " ", "123", "45"]
    assert _pieces(split_pattern("single", "qwen2"), "12345") == ["1", "2", "3", "4", "5"]


@pytest.fixture(scope="module", params=[("llama-bpe", "group3"), ("qwen2", "single")], ids=["llama-bpe", "qwen2"])
def split_tok(request, tmp_path_factory, sample_corpus_dir):
    split, digits = request.param
    cfg = TokenizerConfig(vocab_size=1024, train_bytes=400_000, split=split, digits=digits)
    cfg.validate()
    out = tmp_path_factory.mktemp(f"tok-{split}")
    train_from_corpus(corpus_shards(sample_corpus_dir), out, cfg, seed=1)
    return split, out


def test_ids_identical_hf_tiktoken_transformers(split_tok, sample_dir):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    split, d = split_tok
    tok = load_tokenizer(d)
    assert tok.backend == "tiktoken" and tok.pattern == LLAMA_CPP_PATTERNS[split]
    hf = HFTokenizer.from_file(str(d / "tokenizer.json"))
    tf = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    docs = sample_docs(sample_dir, limit=60)  # dictionary, man pages, fortunes, code: whole multi-line documents
    texts = [x.text for ds in docs.values() for x in ds] + EDGE + [t for t in TRICKY if "<|" not in t]
    assert sum("\n" in t for t in texts) > 150
    ours = tok.encode_batch(texts)
    assert [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)] == ours
    assert [tf.encode(t, add_special_tokens=False) for t in texts] == ours
    assert all(tok.decode(ids) == t for t, ids in zip(texts, ours))


def test_demo_recipe_uses_llama_bpe(tmp_path, sample_corpus_dir):
    """The bundled demo trains with llama.cpp's regex, so its GGUF export is exact in llama.cpp."""
    from lmforge.recipe import DEMO_RECIPE, load_recipe, run_recipe

    raw, _ = load_recipe(DEMO_RECIPE)
    assert raw["tokenizer"]["split"] == "llama-bpe"
    rd = run_recipe(DEMO_RECIPE, overrides=[f"tokenizer.corpus={sample_corpus_dir}", "tokenizer.train_bytes=300000",
                                            "tokenizer.encode=false", "run.workers=1"],
                    run_dir=tmp_path / "demo", only=["tokenizer"])
    assert load_tokenizer(rd.tokenizer).pattern == LLAMA_CPP_PATTERNS["llama-bpe"]
