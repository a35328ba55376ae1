"""The chat format: one template for training, evaluation, serving and the HF export.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`,
multi-turn, with an optional system message first. It is rendered with the tokenizer's reserved
special tokens (tokenizer/config.py BASE_SPECIAL_TOKENS):

    <|bos|> <|system|>SYSTEM<|end|> <|user|>QUESTION<|end|> <|assistant|>ANSWER<|end|> ...

(no spaces or newlines between the pieces; they are shown here for reading). For completion
(serving, generative eval) the history is followed by `<|assistant|>` and the model writes the
answer and its `<|end|>`.

Loss mask (`render`): the assistant's content **and its `<|end|>`** are supervised (without the end
token a model never learns to stop); `<|bos|>`, role tokens, system and user content are not.

Content is plain text: special-token strings typed inside a message never become special tokens
(a user cannot inject a role). Because `transformers`' `apply_chat_template` tokenizes the rendered
string and would match such strings as special tokens, both sides *escape* them the same way:
every `<|` in content becomes `<` + U+200B (zero-width space) + `|` (`escape_content`; the Jinja
template applies the same `replace`). With that, `apply_chat_template` gives ids identical to
`render` for every conversation (tested), including content that contains `<|user|>`.

The template is identified by `template_id()` (a name + a short hash of the Jinja text), which
every post-training checkpoint records; `check_template(recorded)` refuses a model trained with a
different template.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from lmforge.errors import ConfigError, InputError

ROLES = ("system", "user", "assistant")
ESCAPE = "<\u200b|"  # what "<|" inside message content becomes (see the module docstring)


@dataclass(frozen=True)
class ChatTemplate:
    """The special-token strings the template uses; one instance, `TEMPLATE`."""

    name: str = "lmforge-chat-v1"
    bos: str = "<|bos|>"
    end: str = "<|end|>"
    system: str = "<|system|>"
    user: str = "<|user|>"
    assistant: str = "<|assistant|>"

    def role_token(self, role: str) -> str:
        return {"system": self.system, "user": self.user, "assistant": self.assistant}[role]

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return (self.bos, self.system, self.user, self.assistant, self.end)


TEMPLATE = ChatTemplate()


def escape_content(text: str) -> str:
    """Message content as the template writes it: `<|` -> `<` U+200B `|`, so no special-token
    string inside content can be read as a special token (by us or by transformers)."""
    return text.replace("<|", ESCAPE)


def message_problem(messages) -> str | None:
    """Why `messages` is not a valid conversation, or None. Rules: a non-empty list of dicts with
    `role` in system/user/assistant and a string `content`; a system message only first."""
    if not isinstance(messages, list):
        return f"messages must be a list, got {type(messages).__name__}"
    if not messages:
        return "empty conversation"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} is not an object"
        role = m.get("role")
        if role not in ROLES:
            return f"message {i} has role {role!r} (allowed: system, user, assistant)"
        if not isinstance(m.get("content"), str):
            return f"message {i} has no string content"
        if role == "system" and i != 0:
            return f"message {i}: a system message may only come first"
    return None


def check_messages(messages) -> None:
    """InputError naming the problem when `messages` is not a valid conversation."""
    why = message_problem(messages)
    if why is not None:
        raise InputError(f"invalid conversation: {why}")


def _special(tokenizer, name: str) -> int:
    return tokenizer.special_id(name)  # InputError when the tokenizer lacks it


def render(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and its loss mask (True = supervised: assistant content
    and the `<|end|>` closing it). InputError for an invalid conversation."""
    check_messages(messages)
    t = TEMPLATE
    end = _special(tokenizer, t.end)
    ids, mask = [_special(tokenizer, t.bos)], [False]
    for m in messages:
        learn = m["role"] == "assistant"
        content = tokenizer.encode(escape_content(m["content"]))
        ids.append(_special(tokenizer, t.role_token(m["role"])))
        mask.append(False)
        ids.extend(content)
        ids.append(end)
        mask.extend([learn] * (len(content) + 1))
    return ids, mask


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids that ask the model for the next assistant turn: the conversation, then
    `<|assistant|>`. The conversation must not end with an assistant message (InputError): a
    finished answer is closed by `<|end|>`, so "continuing" it would put a second turn after it —
    send the history up to the last user message instead."""
    check_messages(messages)
    if messages[-1]["role"] == "assistant":
        raise InputError("invalid conversation for completion: it ends with an assistant message "
                         "(the prompt must end with a user or system message)")
    ids, _ = render(tokenizer, messages)
    return ids + [_special(tokenizer, TEMPLATE.assistant)]


def chat_template_jinja() -> str:
    """The same template as a Jinja `chat_template` for tokenizer_config.json.

    Assistant content + `<|end|>` sit inside `{% generation %}` blocks (transformers'
    `return_assistant_tokens_mask`, TRL's `assistant_only_loss`); `add_generation_prompt` appends
    `<|assistant|>`. Content is escaped exactly like `escape_content`."""
    t = TEMPLATE
    esc = ESCAPE.replace("\u200b", "\\u200b")
    content = "message['content'] | replace('<|', '" + esc + "')"
    return (
        "{{- '" + t.bos + "' -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'assistant' -%}"
        "{{- '" + t.assistant + "' -}}"
        "{%- generation -%}{{- " + content + " -}}{{- '" + t.end + "' -}}{%- endgeneration -%}"
        "{%- else -%}"
        "{{- '<|' + message['role'] + '|>' -}}{{- " + content + " -}}{{- '" + t.end + "' -}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '" + t.assistant + "' -}}{%- endif -%}"
    )


def template_id() -> str:
    """`name:hash` of the template (first 10 hex digits of the SHA-256 of its Jinja text): record
    it in every checkpoint so a model is never served with a template it was not trained on."""
    digest = hashlib.sha256(chat_template_jinja().encode("utf-8")).hexdigest()[:10]
    return f"{TEMPLATE.name}:{digest}"


def check_template(recorded: str | None) -> None:
    """ConfigError when a model was trained with another chat template than this lmforge renders.

    `recorded` None (or "") means the checkpoint records no chat template — a base model from
    pretraining, never trained on conversations — and is accepted."""
    if not recorded:
        return
    now = template_id()
    if recorded != now:
        raise ConfigError(f"model was trained with chat template {recorded}, this lmforge renders {now}; "
                          "use the lmforge version that trained it, or fine-tune it again with this one")


__all__ = ["ROLES", "TEMPLATE", "ChatTemplate", "escape_content", "message_problem", "check_messages", "render",
           "render_prompt", "chat_template_jinja", "template_id", "check_template"]
