"""The one tokenizer runtime: both backends give the same ids, foreign tokenizer.json files load
through the same class, special ids and byte counts."""

from __future__ import annotations

import pytest

from lmforge.errors import InputError
from lmforge.tokenizer import Tokenizer

from .conftest import sample_docs
from .test_train import TRICKY


def _texts(sample_dir, n=60):
    return [d.text for ds in sample_docs(sample_dir, limit=n).values() for d in ds] + TRICKY


def test_backends_give_identical_ids_on_real_text(trained_dir, sample_dir):
    fast = Tokenizer.from_file(trained_dir)
    slow = Tokenizer.from_file(trained_dir / "tokenizer.json", backend="tokenizers")
    assert (fast.backend, slow.backend) == ("tiktoken", "tokenizers")
    texts = _texts(sample_dir)
    assert len(texts) > 200
    ids = fast.encode_batch(texts)
    assert slow.encode_batch(texts) == ids  # special strings inside text are plain text in both
    assert [slow.encode(t) for t in texts[:20]] == ids[:20]
    for t, i in zip(texts, ids):
        assert fast.decode(i) == t and slow.decode(i) == t
    chat = "<|user|>hi<|end|>"
    assert slow.encode(chat, allow_special=True) == fast.encode(chat, allow_special=True)
    assert fast.encode(chat, allow_special=True)[0] == fast.special_id("<|user|>")
    assert fast.special_id("<|user|>") not in fast.encode(chat)
    assert (slow.bos_id, slow.eos_id, slow.pad_id, slow.vocab_size) == (fast.bos_id, fast.eos_id, fast.pad_id, fast.vocab_size)
    assert slow.special_tokens == fast.special_tokens
    assert (slow.token_byte_lengths() == fast.token_byte_lengths()).all()
    assert slow.token_bytes(500) == fast.token_bytes(500)


def test_special_ids_decode_and_byte_lengths(trained_dir):
    tok = Tokenizer.from_file(trained_dir)
    assert tok.special_id("<|bos|>") == tok.bos_id == 0
    assert tok.special_id("<|nope|>", None) is None
    with pytest.raises(InputError, match="no special token <|nope|>"):
        tok.special_id("<|nope|>")
    ids = [tok.bos_id] + tok.encode("héllo") + [tok.eos_id]
    assert tok.decode(ids) == "<|bos|>héllo<|eos|>"
    assert tok.decode(ids, skip_special=True) == "héllo"
    lens = tok.token_byte_lengths()
    assert lens.shape == (tok.vocab_size,) and all(lens[i] == 0 for i in tok.special_ids)
    text = "Bits per byte needs the UTF-8 bytes of each token: naïve café 日本"
    assert int(lens[tok.encode(text)].sum()) == len(text.encode("utf-8"))
    assert b"".join(tok.token_bytes(i) for i in tok.encode(text)) == text.encode("utf-8")


def _foreign(path, pre, decoder, specials=("<s>", "</s>", "<pad>")):
    from tokenizers import Tokenizer as HF
    from tokenizers import models, trainers

    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "Pack my box with five dozen liquor jugs!", "naïve café 1234"] * 20
    hf = HF(models.BPE(unk_token=None))
    hf.pre_tokenizer = pre
    hf.decoder = decoder
    kw = {}
    if decoder.__class__.__name__ == "ByteLevel":
        from tokenizers import pre_tokenizers

        kw["initial_alphabet"] = pre_tokenizers.ByteLevel.alphabet()
    hf.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=list(specials), show_progress=False, **kw))
    path.mkdir(parents=True, exist_ok=True)
    hf.save(str(path / "tokenizer.json"))
    return hf


def test_foreign_byte_level_tokenizer_loads_and_round_trips(tmp_path):
    from tokenizers import decoders, pre_tokenizers

    hf = _foreign(tmp_path / "gpt2ish", pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())
    tok = Tokenizer.from_file(tmp_path / "gpt2ish")
    assert tok.backend == "tokenizers"  # GPT-2's own regex inside ByteLevel: not lmforge's format
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2) and tok.special_tokens == {"<s>": 0, "</s>": 1, "<pad>": 2}
    text = "The lazy fox, naïve café 日本 </s> 42"
    ids = tok.encode(text)
    assert tok.encode("The lazy fox, naïve") == hf.encode("The lazy fox, naïve", add_special_tokens=False).ids
    assert tok.eos_id not in ids and tok.decode(ids) == text  # "</s>" in text stays text
    assert tok.encode("a</s>", allow_special=True)[-1] == tok.eos_id
    assert tok.decode([tok.bos_id] + ids, skip_special=True) == text
    assert int(tok.token_byte_lengths()[ids].sum()) == len(text.encode("utf-8"))
    with pytest.raises(InputError, match="not an lmforge byte-level BPE"):
        Tokenizer.from_file(tmp_path / "gpt2ish", backend="tiktoken")


def test_foreign_metaspace_tokenizer_with_config_names(tmp_path):
    """A sentencepiece-style BPE (Metaspace) whose bos/eos names come from tokenizer_config.json."""
    import json

    from tokenizers import decoders, pre_tokenizers

    _foreign(tmp_path / "sp", pre_tokenizers.Metaspace(), decoders.Metaspace(), specials=("[BEGIN]", "[END]"))
    (tmp_path / "sp" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "[BEGIN]", "eos_token": {"content": "[END]"}}))
    tok = Tokenizer.from_file(tmp_path / "sp")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, None)
    text = "The quick brown fox"
    assert tok.decode(tok.encode(text)) == text


def test_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="tokenizer not found"):
        Tokenizer.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Unigram"}}')
    with pytest.raises(InputError, match="nor one HF tokenizers can read"):
        Tokenizer.from_file(tmp_path)


def test_threaded_chunks_and_arrays_match_one_by_one(trained_dir, sample_dir):
    """The chunked thread-pool batch and the uint32-array path give the ids of encoding each text alone
    (special strings stay plain text, lone surrogates are repaired as tiktoken's own wrapper does)."""
    fast = Tokenizer.from_file(trained_dir)
    slow = Tokenizer.from_file(trained_dir / "tokenizer.json", backend="tokenizers")
    texts = _texts(sample_dir) + ["a <|bos|> b <|eos|>", "lone \udc80 surrogate", ""]
    one = [fast.encode(t) for t in texts]
    for threads in (1, 2, 3):
        assert fast.encode_batch(texts, num_threads=threads) == one
        arrays = fast.encode_arrays(texts, num_threads=threads)
        assert all(a.dtype.name == "uint32" for a in arrays)
        assert [a.tolist() for a in arrays] == one
    clean = texts[:-2]  # HF tokenizers rejects lone surrogates
    assert [a.tolist() for a in slow.encode_arrays(clean)] == one[:-2]
