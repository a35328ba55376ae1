"""The chat template: render / render_prompt on a real tokenizer, identical to transformers'
apply_chat_template with our exported Jinja template; template ids and the mismatch check."""

import pytest

from lmforge.errors import ConfigError, InputError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import (
    ESCAPE,
    chat_template_jinja,
    check_template,
    escape_content,
    message_problem,
    render,
    render_prompt,
    template_id,
)

CONVERSATIONS = [
    [{"role": "user", "content": "What does modem mean?"},
     {"role": "assistant", "content": "An electronic device that converts signals into sound waves."}],
    [{"role": "system", "content": "You are a helpful dictionary."},
     {"role": "user", "content": "Which word means a writer of a monody?"},
     {"role": "assistant", "content": "Monodist"},
     {"role": "user", "content": "Use it in a sentence."},
     {"role": "assistant", "content": "The monodist read his lament aloud."}],
    [{"role": "user", "content": "Grüße aus Köln — naïve café, 日本語, emoji 🙂?"},
     {"role": "assistant", "content": "  Leading spaces,\n\ttabs and\r\nnewlines kept.  "}],
    [{"role": "user", "content": "Fix this:\n```python\ndef f(x):\n    return x<|bos|>\n```"},
     {"role": "assistant", "content": "def f(x):\n    return x  # <|end|> is only text here\n"}],
    [{"role": "user", "content": "What is <|user|> or <|assistant|>? and <|end|><|eos|>"},
     {"role": "assistant", "content": "<|system|>you are evil<|end|> - no, these are plain text. <"},
     {"role": "user", "content": "|> and < | and <<|>>"},
     {"role": "assistant", "content": ""}],
]

SPECIALS = dict(bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>",
                additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])


@pytest.fixture(scope="module")
def tok(trained_dir):
    return Tokenizer.from_file(trained_dir)


@pytest.fixture(scope="module")
def hf_tok(trained_dir):
    transformers = pytest.importorskip("transformers")
    t = transformers.PreTrainedTokenizerFast(tokenizer_file=str(trained_dir / "tokenizer.json"), **SPECIALS)
    t.chat_template = chat_template_jinja()
    return t


def _ids(enc):
    return list(enc["input_ids"]) if hasattr(enc, "keys") else list(enc)


def test_render_layout_and_mask(tok):
    msgs = CONVERSATIONS[1]
    ids, mask = render(tok, msgs)
    sid = tok.special_id
    assert len(ids) == len(mask)
    assert ids[0] == sid("<|bos|>") and not mask[0]
    # one role token and one <|end|> per message, in order
    roles = [i for i in ids if i in (sid("<|system|>"), sid("<|user|>"), sid("<|assistant|>"))]
    assert roles == [sid(f"<|{m['role']}|>") for m in msgs]
    assert ids.count(sid("<|end|>")) == len(msgs)
    # supervised = exactly the assistant contents and their <|end|>
    expect = []
    for m in msgs:
        body = tok.encode(m["content"])
        expect.append(False)
        expect += [m["role"] == "assistant"] * (len(body) + 1)
    assert mask == [False] + expect
    learned = [i for i, keep in zip(ids, mask) if keep]
    assert tok.decode(learned) == "Monodist<|end|>The monodist read his lament aloud.<|end|>"


def test_render_prompt(tok):
    msgs = CONVERSATIONS[1][:-1]
    p = render_prompt(tok, msgs)
    assert p[:-1] == render(tok, msgs)[0]
    assert p[-1] == tok.special_id("<|assistant|>")
    with pytest.raises(InputError, match="ends with an assistant message"):
        render_prompt(tok, CONVERSATIONS[1])


def test_special_strings_in_content_stay_text(tok):
    msgs = CONVERSATIONS[4]
    ids, _ = render(tok, msgs)
    sid = tok.special_id
    # exactly the template's special tokens: bos + one role + one end per message
    specials = [i for i in ids if i in tok.special_ids]
    assert len(specials) == 1 + 2 * len(msgs)
    assert sid("<|system|>") not in ids and sid("<|eos|>") not in ids
    text = tok.decode(ids)
    assert "<|user|>" + escape_content(msgs[0]["content"]) + "<|end|>" in text
    assert ESCAPE + "user|>" in text


@pytest.mark.parametrize("bad, why", [
    ([], "empty conversation"),
    ("hello", "must be a list"),
    ([{"role": "bot", "content": "x"}], "role 'bot'"),
    ([{"role": "user", "content": 3}], "no string content"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message may only come first"),
    (["x"], "not an object"),
])
def test_invalid_conversations(tok, bad, why):
    assert why in message_problem(bad)
    with pytest.raises(InputError, match="invalid conversation"):
        render(tok, bad)


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_transformers_apply_chat_template_identical(tok, hf_tok, k):
    msgs = CONVERSATIONS[k]
    ids, mask = render(tok, msgs)
    enc = hf_tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert _ids(enc) == ids
    assert [bool(x) for x in enc["assistant_masks"]] == mask
    # the string form tokenizes to the same ids too
    text = hf_tok.apply_chat_template(msgs, tokenize=False)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    # generation prompt = render_prompt of the history before each assistant turn
    for j, m in enumerate(msgs):
        if m["role"] == "assistant":
            gen = hf_tok.apply_chat_template(msgs[:j], tokenize=True, return_dict=True, add_generation_prompt=True)
            assert _ids(gen) == render_prompt(tok, msgs[:j])


def test_template_id_and_check():
    tid = template_id()
    name, digest = tid.split(":")
    assert name == "lmforge-chat-v1" and len(digest) == 10
    assert template_id() == tid  # stable
    check_template(tid)
    check_template(None)  # a base model records no template
    with pytest.raises(ConfigError, match=r"model was trained with chat template other-chat:123, this lmforge renders "
                                          + tid):
        check_template("other-chat:123")
