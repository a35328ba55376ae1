"""Preference data: reading (malformed and identical pairs counted), rendering with the chat
template (response masks, truncation / drop), exactly resumable pair batches, the default
dictionary pairs (held out by headword with the SFT set's split)."""

import json

import pytest
import torch

from lmforge.errors import InputError
from lmforge.posttrain.pref_data import (PairBatches, build_default_pairs, collate_pairs, read_pref_jsonl,
                                         render_pairs, write_pairs_jsonl)
from lmforge.tokenizer.chat import render
from tests.posttrain.pref_helpers import easy_pairs, write_jsonl


def test_malformed_lines_and_identical_pairs_are_counted_and_skipped(tmp_path, caplog):
    good = easy_pairs(3, seed=0)
    lines = [*good, "{not json", {"prompt": "Hi", "chosen": "Hello"}, {"prompt": 3, "chosen": "a", "rejected": "b"},
             {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}], "chosen": "a", "rejected": "b"},
             {"prompt": "Same?", "chosen": "Same.", "rejected": " Same. "}, "",
             {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "chosen": "Hello.",
              "rejected": "Go away.", "meta": {"k": 1}}]
    f = write_jsonl(tmp_path / "p.jsonl", lines)
    with caplog.at_level("WARNING"):
        pairs, stats = read_pref_jsonl([f])
    assert stats == {"lines": 10, "pairs": 4, "malformed": 4, "identical": 1, "blank": 1}
    assert f"{f}:4" in caplog.text and f"{f}:8" in caplog.text  # file:line of a malformed and the identical pair
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Tell me about item 0."}]
    assert pairs[-1]["meta"] == {"k": 1} and pairs[-1]["prompt"][0]["role"] == "system"
    with pytest.raises(InputError, match="no usable preference pair"):
        read_pref_jsonl([write_jsonl(tmp_path / "bad.jsonl", ["{x"])])
    with pytest.raises(InputError, match="not found"):
        read_pref_jsonl([tmp_path / "missing.jsonl"])


def test_pairs_render_with_the_chat_template_and_a_response_mask(chat_tok):
    pair = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a fruit."}],
            "chosen": "An apple.", "rejected": "A chair."}
    (ex,), stats = render_pairs(chat_tok, [pair], 200)
    assert stats["examples"] == 1 and stats["truncated"] == 0
    for side in ("chosen", "rejected"):
        ids, _ = render(chat_tok, pair["prompt"] + [{"role": "assistant", "content": pair[side]}])
        got_ids, got_mask = getattr(ex, f"{side}_ids"), getattr(ex, f"{side}_mask")
        assert got_ids == ids  # the same ids as the chat template renders the whole conversation
        n_resp = len(chat_tok.encode(pair[side])) + 1  # the answer and its <|end|>
        assert got_mask == [False] * (len(ids) - n_resp) + [True] * n_resp  # earlier assistant turns not masked
    # the two sides share the prompt
    k = ex.chosen_mask.index(True)
    assert ex.chosen_ids[:k] == ex.rejected_ids[:k]


def test_too_long_pairs_are_truncated_or_dropped_and_counted(chat_tok):
    long = {"prompt": "Say it.", "chosen": "word " * 60, "rejected": "other " * 60}
    short = {"prompt": "Say it.", "chosen": "Yes.", "rejected": "No."}
    huge_prompt = {"prompt": "word " * 80, "chosen": "Yes.", "rejected": "No."}
    ex, stats = render_pairs(chat_tok, [long, short, huge_prompt], 40, "truncate")
    assert stats["truncated"] == 1 and stats["dropped"] == 1 and stats["examples"] == 2
    assert max(len(ex[0].chosen_ids), len(ex[0].rejected_ids)) <= 40 and any(ex[0].chosen_mask)
    ex, stats = render_pairs(chat_tok, [long, short], 40, "drop")
    assert stats["dropped"] == 1 and stats["examples"] == 1
    # identical after truncation: counted, not kept
    same_start = {"prompt": "Say it.", "chosen": "word " * 60 + "a", "rejected": "word " * 60 + "b"}
    _, stats = render_pairs(chat_tok, [same_start], 40)
    assert stats["identical"] == 1 and stats["examples"] == 0


def test_pair_batches_are_padded_adjacent_and_exactly_resumable(chat_tok):
    ex, _ = render_pairs(chat_tok, easy_pairs(11, seed=1), 96)
    src = PairBatches(ex, 4, seed=3, pad_id=chat_tok.pad_id)
    b = src.next_batch()
    assert b.ids.shape[0] == 8 and b.n_pairs == 4
    for i, j in enumerate(b.index.tolist()):  # row i = pair j's chosen side, row 4 + i its rejected side
        assert b.ids[i, : len(ex[j].chosen_ids)].tolist() == ex[j].chosen_ids
        assert b.ids[4 + i, : len(ex[j].rejected_ids)].tolist() == ex[j].rejected_ids
        assert b.mask[4 + i].sum() == sum(ex[j].rejected_mask) and b.lengths[4 + i] == len(ex[j].rejected_ids)
        assert (b.ids[i, len(ex[j].chosen_ids):] == chat_tok.pad_id).all()
    x, y = b.lm_inputs()
    assert ((y != -100) == b.mask[:, 1:]).all() and x.shape == y.shape
    for _ in range(3):  # into the next epoch
        src.next_batch()
    state = src.state_dict()
    want = [src.next_batch() for _ in range(4)]
    again = PairBatches(ex, 4, seed=3, pad_id=chat_tok.pad_id)
    again.load_state_dict(state)
    got = [again.next_batch() for _ in range(4)]
    assert all(torch.equal(a.ids, g.ids) and torch.equal(a.index, g.index) for a, g in zip(want, got))
    seen = torch.cat([PairBatches(ex, 11, seed=3, pad_id=0).next_batch().index])
    assert sorted(seen.tolist()) == list(range(11))  # one epoch covers every pair once
    with pytest.raises(InputError, match="changed"):
        PairBatches(ex[:-1], 4, seed=3, pad_id=0).load_state_dict(state)
    ref = torch.arange(22.0).view(11, 2)
    rb = PairBatches(ex, 4, seed=3, pad_id=0, ref=ref).next_batch()
    assert torch.equal(rb.ref, torch.cat([ref[rb.index, 0], ref[rb.index, 1]]))
    assert collate_pairs(ex[:2], 0).ids.shape[0] == 4


def test_default_pairs_from_the_dictionary_hold_out_words_like_the_chat_set(tmp_path):
    from lmforge.posttrain.dictionary_chat import build_default_chat_set, is_heldout_word
    from lmforge.posttrain.sft import BUNDLED_DICTIONARY

    paths = sorted(BUNDLED_DICTIONARY.glob("*.jsonl*"))
    train, held, stats = build_default_pairs(paths, seed=2, n=300, holdout=0.1)
    assert len(train) + len(held) == 300 and stats["other"] > 0 and stats["truncated"] > 0 and stats["sampled"] == 0
    assert all(p["chosen"] != p["rejected"] for p in train + held)
    words = lambda ps: {p["meta"]["word"].lower() for p in ps}  # noqa: E731
    assert words(train).isdisjoint(words(held))
    assert all(is_heldout_word(w, 0.1) for w in words(held)) and not any(is_heldout_word(w, 0.1) for w in words(train))
    sft_train, _ = build_default_chat_set(paths, seed=2, n=300, holdout=0.1)
    sft_words = {w.lower() for c in sft_train for w in c["meta"]["words"]}
    assert sft_words.isdisjoint(words(held))  # a held-out pair's word was never an SFT training word
    trunc = next(p for p in train if p["meta"]["kind"] == "truncated")
    assert trunc["chosen"].startswith(trunc["rejected"]) and len(trunc["rejected"]) < len(trunc["chosen"])
    f = write_pairs_jsonl(tmp_path / "held.jsonl", held)
    back, rstats = read_pref_jsonl([f])
    assert rstats["pairs"] == len(held) and back[0]["meta"] == held[0]["meta"]
    assert json.loads(f.read_text().splitlines()[0])["prompt"] == held[0]["prompt"]


def test_default_pairs_can_use_sampled_answers_of_a_model(tmp_path, chat_tok):
    from lmforge.model import Transformer, preset
    from lmforge.posttrain.sft import BUNDLED_DICTIONARY

    torch.manual_seed(0)
    m = Transformer(preset("tiny", vocab_size=chat_tok.vocab_size, max_seq_len=96, d_model=32, n_layers=1)).eval()
    train, held, stats = build_default_pairs(sorted(BUNDLED_DICTIONARY.glob("*.jsonl*")), seed=1, n=40, holdout=0.1,
                                             model=m, tokenizer=chat_tok, sampled=0.5, sample_tokens=6)
    assert stats["sampled"] > 0
    assert all(p["rejected"] for p in train + held if p["meta"]["kind"] == "sampled")
