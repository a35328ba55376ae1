"""Chat JSONL reading (malformed lines reported and skipped), rendering (truncate / drop / nothing
to learn, counted) and the SFT batch source (packing, masks, document ids, exact resume)."""

import json
import logging

import numpy as np
import pytest
import torch

from lmforge.errors import InputError
from lmforge.posttrain.chat_data import (
    IGNORE,
    ChatExample,
    SFTBatches,
    load_chat_data,
    pack_rows,
    read_chat_jsonl,
    render_examples,
)
from lmforge.tokenizer.chat import render


def _conv(q, a, system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": msgs}


def test_read_chat_jsonl_formats_and_malformed_lines(tmp_path, caplog):
    lines = [
        json.dumps(_conv("What does modem mean?", "A device.")),                       # 1 ok
        json.dumps({"prompt": "Hi", "completion": "Hello!", "system": "Be nice."}),      # 2 ok
        "{not json",                                                                      # 3 bad JSON
        json.dumps({"prompt": "only a prompt"}),                                          # 4 missing completion
        json.dumps({"messages": [{"role": "robot", "content": "x"}]}),                    # 5 bad role
        json.dumps({"messages": []}),                                                     # 6 empty
        json.dumps({"messages": [{"role": "user", "content": ["a"]}]}),                   # 7 non-string content
        "",                                                                               # 8 blank
        json.dumps({"text": "no chat here"}),                                             # 9 no fields
        json.dumps([1, 2]),                                                               # 10 not an object
        json.dumps({**_conv("Q", "A"), "meta": {"kind": "define"}}),                     # 11 ok, extra key kept
    ]
    f = tmp_path / "chat.jsonl"
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lmforge"):
        convs, stats = read_chat_jsonl([f])
    assert stats == {"lines": 11, "conversations": 3, "malformed": 7, "blank": 1}
    assert [c["source"] for c in convs] == [f"{f}:1", f"{f}:2", f"{f}:11"]
    assert convs[1]["messages"] == [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello!"}]
    assert convs[2]["meta"] == {"kind": "define"}
    warned = [r.getMessage() for r in caplog.records]
    for n in (3, 4, 5, 6, 7, 9, 10):
        assert sum(f"{f}:{n}:" in w for w in warned) == 1, n
    assert any("bad JSON" in w for w in warned) and any("role 'robot'" in w for w in warned)


def test_read_chat_jsonl_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_chat_jsonl([tmp_path / "missing.jsonl"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n")
    with pytest.raises(InputError, match="no usable conversation"):
        read_chat_jsonl([bad])


def test_render_examples_truncate_drop_and_nothing_to_learn(chat_tok):
    long_q = "word " * 200
    convs = [
        _conv("Short question?", "Short answer."),
        _conv(long_q, "An answer after a long question."),   # too long; truncation cuts the answer off
        _conv("Q", "A long answer " * 50),                    # too long; truncation keeps part of the answer
        {"messages": [{"role": "user", "content": "no answer"}]},  # nothing to learn
        {"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}], "source": "s:9"},
    ]
    n_short = len(render(chat_tok, convs[0]["messages"])[0])
    ex, st = render_examples(chat_tok, convs, max_tokens=64, overflow="truncate")
    assert st["conversations"] == 5 and st["truncated"] == 2 and st["dropped"] == 0
    assert st["no_target"] == 2 and st["invalid"] == 1 and st["examples"] == 2
    assert [len(e.ids) for e in ex] == [n_short, 64]
    assert all(len(e.ids) == len(e.mask) and any(e.mask) for e in ex)
    assert st["tokens"] == n_short + 64

    ex, st = render_examples(chat_tok, convs, max_tokens=64, overflow="drop")
    assert st["dropped"] == 2 and st["truncated"] == 0 and st["no_target"] == 1 and st["examples"] == 1
    with pytest.raises(InputError, match="overflow"):
        render_examples(chat_tok, convs, 64, overflow="wrap")


def test_load_chat_data(tmp_path, chat_tok):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps(_conv("Hi", "Hello")) + "\nbroken\n", encoding="utf-8")
    ex, st = load_chat_data(chat_tok, [f], max_tokens=128)
    assert len(ex) == 1 and st["read_malformed"] == 1 and st["examples"] == 1
    with pytest.raises(InputError, match="no chat example left"):
        load_chat_data(chat_tok, [f], max_tokens=3, overflow="drop")


def test_pack_rows_best_fit():
    rows = pack_rows([5, 3, 4, 2, 6], order=[0, 1, 2, 3, 4], capacity=8)
    assert rows == [[0, 1], [2, 3], [4]]
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    with pytest.raises(InputError):
        pack_rows([9], [0], 8)


def _examples(chat_tok, n=40, seed=0, max_tokens=49):
    rng = np.random.default_rng(seed)
    convs = []
    for i in range(n):
        q = " ".join(["what"] * int(rng.integers(1, 4))) + f" {i}?"
        a = " ".join(["answer"] * int(rng.integers(1, 6))) + f" {i}."
        convs.append(_conv(q, a, system="Be brief." if i % 3 == 0 else None))
    ex, _ = render_examples(chat_tok, convs, max_tokens=max_tokens)
    return ex


def _check_batch(b, examples, T, B, chat_tok):
    assert b.x.shape == b.y.shape == b.doc_ids.shape == (B, T) and b.x.dtype == torch.int64
    bos = chat_tok.special_id("<|bos|>")
    for r in range(B):
        x, y, d = b.x[r].tolist(), b.y[r].tolist(), b.doc_ids[r].tolist()
        # a new conversation (doc id step) starts exactly at a <|bos|>, and nothing crosses it
        starts = [t for t in range(T) if x[t] == bos]
        assert starts[0] == 0 and d[0] == 0
        for t in range(1, T):
            assert d[t] in (d[t - 1], d[t - 1] + 1)
            if d[t] != d[t - 1]:
                assert x[t] == bos and y[t - 1] == IGNORE
        # targets: -100 or the next input token; supervised ones decode to assistant text and <|end|>
        for t in range(T - 1):
            assert y[t] == IGNORE or y[t] == x[t + 1]
        sup = [v for v in y if v != IGNORE]
        assert sup and bos not in sup
        assert "<|user|>" not in chat_tok.decode(sup) and "<|assistant|>" not in chat_tok.decode(sup)


@pytest.mark.parametrize("packing", [True, False])
def test_sft_batches_masks_and_documents(chat_tok, packing):
    ex = _examples(chat_tok)
    T, B = 48, 4
    src = SFTBatches(ex, seq_len=T, batch_size=B, seed=3, pad_id=chat_tok.pad_id, packing=packing)
    for _ in range(6):
        _check_batch(src.next_batch(), ex, T, B, chat_tok)
    # every supervised target of one epoch, in any order, equals the examples' supervised tokens
    src = SFTBatches(ex, seq_len=T, batch_size=1, seed=3, pad_id=chat_tok.pad_id, packing=packing)
    n_rows = src.epoch_rows()
    got = sorted(v for _ in range(n_rows) for v in src.next_batch().y[0].tolist() if v != IGNORE)
    want = sorted(i for e in ex for i, m in zip(e.ids[1:], e.mask[1:]) if m)
    assert got == want
    assert src.state_dict()["epoch"] == 1 and src.state_dict()["pos"] == 0
    if packing:
        assert n_rows < len(ex)  # several conversations per row
    else:
        assert n_rows == len(ex)


def test_sft_batches_single_conversation_row_needs_no_mask(chat_tok):
    ex = [ChatExample(*render(chat_tok, _conv("Hi", "Hello")["messages"]))]
    b = SFTBatches(ex, seq_len=64, batch_size=2, seed=0, pad_id=chat_tok.pad_id, packing=False).next_batch()
    assert (b.doc_ids == 0).all()  # padding shares the conversation's id: plain causal attention
    n = len(ex[0].ids)
    assert (b.x[:, n:] == chat_tok.pad_id).all() and (b.y[:, n - 1:] == IGNORE).all()


def test_sft_batches_exact_resume_and_epochs(chat_tok):
    ex = _examples(chat_tok, n=25)
    kw = dict(seq_len=48, batch_size=3, seed=7, pad_id=chat_tok.pad_id)
    a = SFTBatches(ex, **kw)
    for _ in range(5):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip (state.json)
    expect = [a.next_batch() for _ in range(12)]  # crosses epoch boundaries
    b = SFTBatches(ex, **kw)
    b.load_state_dict(state)
    for e in expect:
        g = b.next_batch()
        assert torch.equal(g.x, e.x) and torch.equal(g.y, e.y) and torch.equal(g.doc_ids, e.doc_ids)
    # epochs reshuffle (seeded): a different row order per epoch, the same for the same seed
    assert a.rows_of_epoch(0) != a.rows_of_epoch(1)
    assert SFTBatches(ex, **kw).rows_of_epoch(1) == a.rows_of_epoch(1)
    assert SFTBatches(ex, **{**kw, "seed": 8}).rows_of_epoch(0) != a.rows_of_epoch(0)
    # changed data or settings are refused on resume
    with pytest.raises(InputError, match="changed since the checkpoint"):
        SFTBatches(ex[:-1], **kw).load_state_dict(state)
    with pytest.raises(InputError, match="seq_len"):
        SFTBatches(ex, **{**kw, "seq_len": 40}).load_state_dict(state)


def test_sft_batches_rejects_bad_input(chat_tok):
    long = ChatExample(list(range(50)), [True] * 50)
    with pytest.raises(InputError, match="seq_len \\+ 1"):
        SFTBatches([long], seq_len=32, batch_size=1, seed=0, pad_id=0)
    with pytest.raises(InputError, match="no chat examples"):
        SFTBatches([], seq_len=32, batch_size=1, seed=0, pad_id=0)


def test_sft_batch_trains_a_tiny_model(chat_tok):
    """The batch feeds the model as the pretraining batch does (x, y, doc_ids with -100 ignored)."""
    from lmforge.model import ModelConfig, Transformer

    ex = _examples(chat_tok, n=12)
    b = SFTBatches(ex, seq_len=48, batch_size=2, seed=0, pad_id=chat_tok.pad_id).next_batch()
    assert int(b.doc_ids.max()) > 0  # packed: the document mask is in play
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=chat_tok.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                    max_seq_len=48))
    _, loss = model(b.x, b.y, doc_ids=b.doc_ids)
    assert torch.isfinite(loss)
    loss.backward()
