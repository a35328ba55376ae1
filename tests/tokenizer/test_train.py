"""Training the byte-level BPE: config, pre-tokenizer, sampling, and id identity HF == tiktoken == transformers."""

from __future__ import annotations

import json

import pytest

from lmforge.config import build
from lmforge.errors import ConfigError, InputError
from lmforge.tokenizer import load_tokenizer
from lmforge.tokenizer.config import BASE_SPECIAL_TOKENS, TokenizerConfig
from lmforge.tokenizer.corpus import corpus_shards
from lmforge.tokenizer.train_bpe import sample_corpus, split_pattern

from .conftest import sample_docs

TRICKY = [
    "Numbers: 1 12 123 1234 12345678 3.14159 -42 1,000,000 0x1F ٣٤٥ ²³",
    "def f(x):\n    if x:\n        return   x  \n\t\treturn None\n\n\n    # trailing   \n",
    "Unicode: café naïve Ærøskøbing Straße 日本語のテキスト Привет мир 😀😀 👩‍👩‍👧 ﬁ 𝔘",
    "Whitespace: a\u00a0\u00a0b \u2028c\u0085d \u3000e  \r\n\r\n  \t \n   end   ",
    "Contractions: I'll don't WE'RE it's she'd they've O'Neil '''quoted''' \"x\"",
    "Hard-wrapped prose: the \u2018elif\u2019 part is\noptional.  You\u2019re\n\u201cquoted\u201d\n\n(aside)\n- item\r\nline\n1913",
    "Punctuation!!! ??? ... --- === >>> <<< ::: (((a))) {{b}} [[c]] <|bos|> <|eos|>",
    "",
    " ",
    "a" * 3000 + " " * 300 + "\n" * 10,
]


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="tokenizer.vocab_sise"):
        build(TokenizerConfig, {"vocab_sise": 100}, "tokenizer")
    with pytest.raises(ConfigError, match="vocab_size = 100 is too small"):
        build(TokenizerConfig, {"vocab_size": 100}, "tokenizer")
    with pytest.raises(ConfigError, match="uint16"):
        build(TokenizerConfig, {"vocab_size": 70000, "dtype": "uint16"}, "tokenizer")
    with pytest.raises(ConfigError, match="tokenizer.digits"):
        build(TokenizerConfig, {"digits": "pairs"}, "tokenizer")
    with pytest.raises(ConfigError, match="val_fraction"):
        build(TokenizerConfig, {"val_fraction": 1.5}, "tokenizer")
    assert build(TokenizerConfig, {"vocab_size": 70000}, "tokenizer").token_dtype() == "uint32"
    assert TokenizerConfig().token_dtype() == "uint16"


@pytest.mark.parametrize("digits,expected", [("single", ["1", "2", "3", "4", "5"]), ("group3", ["123", "45"])])
def test_digit_splitting(digits, expected):
    from tokenizers import Regex, pre_tokenizers

    pre = pre_tokenizers.Split(Regex(split_pattern(digits)), behavior="isolated")
    assert [p for p, _ in pre.pre_tokenize_str("12345")] == expected
    # a newline and the indentation after it stay one piece (code), one space stays with the next word
    assert [p for p, _ in pre.pre_tokenize_str("x\n        y  z")] == ["x", "\n       ", " y", " ", " z"]
    assert [p for p, _ in pre.pre_tokenize_str("f(a):\n\treturn")] == ["f", "(a", "):\n", "\treturn"]
    # hard-wrapped prose: a word at the start of a line takes the line break, as a word takes its space
    assert [p for p, _ in pre.pre_tokenize_str("wrapped\nline. Next\n\nPara")] == ["wrapped", "\nline", ".", " Next", "\n", "\nPara"]
    assert [p for p, _ in pre.pre_tokenize_str("a\r\nb\u2019s\n7")] == ["a", "\r", "\nb", "\u2019s", "\n", "7"]


def test_sample_is_seeded_uniform_and_within_budget(sample_corpus_dir):
    shards = corpus_shards(sample_corpus_dir)
    a = sample_corpus(shards, 400_000, 5_000, seed=1)
    b = sample_corpus(shards, 400_000, 5_000, seed=1)
    c = sample_corpus(shards, 400_000, 5_000, seed=2)
    assert a.texts == b.texts
    assert a.texts != c.texts
    assert a.bytes <= 400_000 and a.bytes > 300_000
    assert sum(len(t.encode()) for t in a.texts) == a.bytes
    assert max(len(t) for t in a.texts) <= 5_000
    # drawn across the whole corpus: every source (one shard each) is represented, not the first shard only
    assert set(a.by_source) == {"code", "dictionary", "fortunes", "manpages"}
    assert a.docs_seen == sum(1 for _ in sample_docs_iter(sample_corpus_dir))


def sample_docs_iter(corpus_dir):
    from lmforge.tokenizer.corpus import iter_docs

    for s in corpus_shards(corpus_dir):
        yield from iter_docs(s)


def test_missing_corpus_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="corpus directory not found"):
        corpus_shards(tmp_path / "nope")
    with pytest.raises(InputError, match="no corpus shards"):
        corpus_shards(tmp_path)


def test_special_tokens_and_files(trained_dir):
    tok = load_tokenizer(trained_dir)
    assert tok.vocab_size == 1024
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    names = list(BASE_SPECIAL_TOKENS) + [f"<|reserved_{i}|>" for i in range(16)]
    assert tok.special_tokens == {n: i for i, n in enumerate(names)}
    assert json.loads((trained_dir / "special_tokens.json").read_text()) == tok.special_tokens
    # special strings inside text are plain text unless asked for
    assert tok.bos_id not in tok.encode("<|bos|>")
    assert tok.encode("<|user|>hi<|end|>", allow_special=True)[0] == tok.special_tokens["<|user|>"]
    assert tok.decode([tok.bos_id] + tok.encode("hello")) == "<|bos|>hello"


def _real_texts(sample_dir, n=80):
    docs = sample_docs(sample_dir, limit=n)
    return [d.text for ds in docs.values() for d in ds] + TRICKY


def test_ids_identical_hf_tiktoken_transformers(trained_dir, sample_dir):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(trained_dir)
    hf = HFTokenizer.from_file(str(trained_dir / "tokenizer.json"))
    tf = PreTrainedTokenizerFast(tokenizer_file=str(trained_dir / "tokenizer.json"))
    texts = _real_texts(sample_dir)
    # code, man pages in 7 languages, fortunes, dictionary entries, and the edge cases above
    assert len(texts) > 300
    ours = tok.encode_batch(texts)
    assert ours == [tok.encode(t) for t in texts]
    clean = [t for t in texts if "<|" not in t]  # HF treats special-token strings inside text as specials
    assert [e.ids for e in hf.encode_batch(clean, add_special_tokens=False)] == tok.encode_batch(clean)
    assert [tf.encode(t, add_special_tokens=False) for t in clean] == tok.encode_batch(clean)
    for t, ids in zip(texts, ours):
        assert tok.decode(ids) == t  # byte-level: lossless
    assert hf.get_vocab_size() == tok.vocab_size


def test_autotokenizer_loads_the_directory(trained_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(trained_dir))
    tok = load_tokenizer(trained_dir)
    text = "The quick brown fox jumps over 1234 lazy dogs.\n    indented"
    assert t.encode(text, add_special_tokens=False) == tok.encode(text)
    assert (t.bos_token_id, t.eos_token_id, t.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert t.decode(tok.encode(text)) == text


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(InputError, match="tokenizer not found"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="not an lmforge byte-level BPE"):
        load_tokenizer(tmp_path)
