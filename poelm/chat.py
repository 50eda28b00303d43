"""
Chat format (docs/poe.md §7): conversations rendered with nanochat's special tokens.

    <|bos|><|user_start|>SYSTEM\n\nUSER<|user_end|><|assistant_start|>REPLY<|assistant_end|><|user_start|>...

- Conversations use the OpenAI / Hugging Face convention: a list of
  {"role": "system" | "user" | "assistant", "content": str}. One optional leading system
  message is merged into the first user turn as `system + "\n\n" + user` (the separator
  nanochat's render_conversation uses); after it turns alternate user/assistant, starting
  with user. Keys other than role and content are ignored.
- Every content string is encoded on its own as ordinary text: "<|assistant_end|>" typed in
  a message is plain bytes, never the special token; special ids come only from the format.
- Training mask: 1 on the assistant content tokens and on each `<|assistant_end|>`, 0 on
  everything else (`<|bos|>`, user turns, `<|assistant_start|>`).
- Generation: the prompt (ending with a user turn) is followed by `<|assistant_start|>`; the
  model's reply stops at `<|assistant_end|>`.
- Malformed conversations raise ValueError with one line naming the message index (and the
  file:line the caller passes as `source`).

Hugging Face: an export's tokenizer_config.json carries the same format as CHAT_TEMPLATE
(a Jinja `chat_template`), whose text equals the decode of these ids. Text cannot be
tokenized back into these ids (a user's "<|assistant_end|>" and the format's look the same),
and the remote tokenizer never parses special tokens from text. So its apply_chat_template
(poelm/hf/tokenization_cognica_poe.py) computes the ids with this module's rules, copied into
the export as `poe_chat.py` (nothing here imports poelm), and leaves the rest to
transformers' own apply_chat_template (template text, batching, padding, return types), which
then receives exactly these ids for the text it rendered, in transformers 4.57 and 5.x alike.

Usage:
    from poelm.chat import render_conversation, render_prompt
    chat = render_conversation(tok, [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello!"}])
    chat.ids, chat.mask                 # mask 1 = training target
    ids = render_prompt(tok, [{"role": "user", "content": "Hi"}])   # ends with <|assistant_start|>
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

ROLES = ("system", "user", "assistant")
# The chat special tokens, declared here only (poelm/tokenizer.py, shipped standalone in exports,
# lists them among its own; tests/test_settings.py checks they agree). <|bos|> is every
# tokenizer's; the four turn tokens never occur in pretraining text.
BOS = "<|bos|>"
ASSISTANT_END = "<|assistant_end|>"
TURN_SPECIALS = ("<|user_start|>", "<|user_end|>", "<|assistant_start|>", ASSISTANT_END)
CHAT_SPECIALS = (BOS, *TURN_SPECIALS)
SYSTEM_SEPARATOR = "\n\n"

# The same format for transformers' apply_chat_template (and anything else that reads Jinja
# chat templates). Its output text is exactly the decode of render_conversation /
# render_prompt; tests/test_chat.py checks both against transformers.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- if not turns -%}{{ raise_exception('the conversation has no user turn') }}{%- endif -%}"
    "<|bos|>"
    "{%- for message in turns -%}"
    "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
    "{{ raise_exception('turns must alternate user/assistant, starting with user, "
    "after one optional leading system message') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "<|user_start|>{{ (system if loop.first else '') + message['content'] }}<|user_end|>"
    "{%- else -%}"
    "<|assistant_start|>{{ message['content'] }}<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


class ChatTokenizer(Protocol):
    """What rendering needs: poelm.tokenizer.Tokenizer has it."""
    bos_token_id: int

    def encode(self, text: str) -> list[int]: ...  # ordinary text, specials never parsed

    def encode_special(self, name: str) -> int: ...


@dataclass
class RenderedChat:
    ids: list[int]   # (L,) token ids, starting with <|bos|>
    mask: list[int]  # (L,) 1 where ids[i] is a training target (assistant content, <|assistant_end|>)


def validate_conversation(messages: object, training: bool = False, source: str = "") -> list[tuple[str, str]]:
    """Check `messages` and return its turns as (role, content) with the system message merged
    into the first user turn. `training` also requires an assistant turn. Errors are one line,
    prefixed with `source` (e.g. "data.jsonl:12") when given."""
    where = f"{source}: " if source else ""

    def fail(problem: str) -> ValueError:
        return ValueError(f"{where}{problem}")

    if not isinstance(messages, (list, tuple)) or not messages:
        raise fail("a conversation must be a non-empty list of {role, content} messages")
    system, turns = None, []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise fail(f"message {i} is not an object with 'role' and 'content'")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise fail(f"message {i} has unknown role {role!r}; use system, user or assistant")
        if not isinstance(content, str):
            raise fail(f"message {i} ({role}) content must be a string, not {type(content).__name__}")
        if not content.strip():
            raise fail(f"message {i} ({role}) has empty content")
        if role == "system":
            if i != 0:
                raise fail(f"message {i} is a system message but not the first; "
                           "only one leading system message is allowed")
            system = content
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            if turns:
                raise fail(f"message {i}: two {role} turns in a row; turns must alternate user/assistant")
            raise fail(f"message {i}: the first turn is from the {role}; a conversation starts with a user turn")
        turns.append((role, content))
    if not turns:
        raise fail("the conversation has no user turn after the system message")
    if system is not None:
        turns[0] = ("user", system + SYSTEM_SEPARATOR + turns[0][1])
    if training and len(turns) < 2:
        raise fail("the conversation has no assistant turn to train on")
    return turns


def render_conversation(tokenizer: ChatTokenizer, messages: list[dict], training: bool = True,
                        source: str = "") -> RenderedChat:
    """ids + training mask of a whole conversation. With training=False a conversation
    without assistant turns (ending with a user turn) is accepted too."""
    return _render(tokenizer, validate_conversation(messages, training=training, source=source))


def render_prompt(tokenizer: ChatTokenizer, messages: list[dict], source: str = "") -> list[int]:
    """ids of a conversation that ends with a user turn, followed by <|assistant_start|>."""
    turns = validate_conversation(messages, source=source)
    if turns[-1][0] != "user":
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}message {len(messages) - 1}: a generation prompt must end with a user turn, "
                         "not an assistant turn")
    return _render(tokenizer, turns).ids + [tokenizer.encode_special("<|assistant_start|>")]


def _render(tokenizer: ChatTokenizer, turns: list[tuple[str, str]]) -> RenderedChat:
    special = tokenizer.encode_special
    ids, mask = [tokenizer.bos_token_id], [0]
    for role, content in turns:
        body = tokenizer.encode(content)
        if role == "user":
            ids += [special("<|user_start|>"), *body, special("<|user_end|>")]
            mask += [0] * (len(body) + 2)
        else:
            ids += [special("<|assistant_start|>"), *body, special("<|assistant_end|>")]
            mask += [0] + [1] * (len(body) + 1)
    return RenderedChat(ids, mask)


def check_chat_tokenizer(tokenizer, spec: str) -> None:
    """Raise a one-line ValueError unless `tokenizer` (MODEL `spec`'s) has every chat special token."""
    if tokenizer is None:
        raise ValueError(f"MODEL {spec} has no tokenizer; chat needs one with the chat special tokens "
                         f"({', '.join(CHAT_SPECIALS)})")
    known = getattr(tokenizer, "special_tokens", None) or {}
    missing = [name for name in CHAT_SPECIALS if name not in known]
    if missing:
        raise ValueError(f"MODEL {spec}: its tokenizer lacks the chat special tokens {', '.join(missing)}; "
                         "chat needs a tokenizer from `poelm tokenizer train` (or nanochat's)")
