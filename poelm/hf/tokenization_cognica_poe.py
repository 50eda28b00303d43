"""transformers tokenizer of the Cognica BP / PoE models (remote code, a "slow" tokenizer).

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    tok("Hello")["input_ids"]                 # [<|bos|>, ...]: BOS first, as base models expect
    tok("Hello", add_special_tokens=False)    # the bare ids, equal to poelm's Tokenizer.encode
    tok.decode(ids)                           # equal to poelm's Tokenizer.decode

Encoding and decoding are poelm's `Tokenizer` (`poe_tokenizer.py` beside this file is a copy
of `poelm/tokenizer.py`): a tiktoken byte-level BPE read from `tokenizer.pkl` through
poelm's restricted unpickler (only tiktoken's Encoding state and plain data are admitted).

- Ordinary text is never parsed for special tokens: "<|bos|>" typed in a prompt is plain
  bytes, exactly as in poelm. Special ids come only from `add_special_tokens`.
- BOS: `add_bos_token` (default True) prepends `<|bos|>` whenever special tokens are added
  and the sequence does not already start with it, so `tok(text)` feeds a base model what it
  was trained on. `add_special_tokens=False` (or `add_bos_token=False`) gives the bare ids.
  transformers 5 does not write `add_bos_token` back into tokenizer_config.json on save;
  the default applies again after a reload.
- `bos_token`, `eos_token` and `pad_token` are all `<|bos|>` (a base model ends a document by
  starting the next one; generation_config.json also stops at `<|assistant_end|>`).
- Padding goes on the left by default (`padding_side="left"`), as batched generation needs.
- Token strings (`tokenize`, `convert_ids_to_tokens`) spell each token's bytes with the usual
  byte-to-printable-character table (a space shows as "Ġ"); special tokens are their names.
- Chat: `tokenizer_config.json` carries poelm's chat format (poelm/chat.py, copied beside this
  file as `poe_chat.py`) as `chat_template`. `apply_chat_template(messages, tokenize=False)`
  renders that template; with tokenize=True (transformers' default) the ids come from poelm's
  own rules, `render_prompt` (add_generation_prompt=True) or `render_conversation`, because
  the rendered text cannot be tokenized back: a message may contain "<|assistant_end|>" as
  text, which must stay bytes, while the same characters from the template are the special
  token. The override checks and renders each conversation itself, then lets transformers'
  own apply_chat_template do the rest (batching, padding, truncation, tensors, return_dict)
  while `tokenize` hands back the ids prepared for exactly that rendered text (and refuses
  any other text during the call). Ordinary `tok(text)` never sees special tokens. So the ids
  equal poelm's and the returned structure is transformers' own, in 4.57 and 5.x alike
  (`sanitize_control_tokens` is accepted and needs nothing: messages are always ordinary
  text). A different template, `tools`, `documents` or `continue_final_message` with
  tokenize=True are refused with one line; malformed conversations raise poelm's one-line
  ValueError naming the message.
- `token_bytes` is the byte length of every token (0 for specials) for bits-per-byte, read
  from `token_bytes.pt`; when that file is missing a warning names it and the lengths are
  recomputed from the vocabulary.
"""

from __future__ import annotations

import inspect
import io
import os
import pickle
from pathlib import Path

import torch
from transformers import PreTrainedTokenizer

from .poe_chat import CHAT_TEMPLATE, render_conversation, render_prompt
from .poe_tokenizer import Tokenizer, _encoding_from_pickle, load_token_bytes


def _byte_to_char() -> list[str]:
    """One printable character per byte value: printable Latin-1 bytes stand for themselves,
    the others (controls, space, a few more) are moved up past U+00FF in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table, shifted = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(0x100 + shifted))
            shifted += 1
    return table


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


class _ChatTokens(list):
    """Token strings of a rendered chat that also carry its exact ids (a byte token may spell
    a special token's name, so the strings alone do not determine the ids)."""

    def __init__(self, tokens: list[str], ids: list[int]):
        super().__init__(tokens)
        self.ids = ids


class CognicaPoETokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.pkl", "token_bytes_file": "token_bytes.pt"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, token_bytes_file: str | None = None, add_bos_token: bool = True,
                 bos_token: str = "<|bos|>", eos_token: str = "<|bos|>", pad_token: str = "<|bos|>",
                 clean_up_tokenization_spaces: bool = False, padding_side: str = "left", **kwargs):
        self.poe = Tokenizer(_encoding_from_pickle(Path(vocab_file)))
        self.vocab_file = str(vocab_file)
        self.token_bytes_file = token_bytes_file
        self._token_bytes: torch.Tensor | None = None
        self.add_bos_token = add_bos_token
        enc = self.poe.enc
        self._specials = self.poe.special_tokens  # name -> id
        self._id_to_token: dict[int, str] = {i: name for name, i in self._specials.items()}
        self._token_to_id: dict[str, int] = {}
        for token_bytes, rank in enc._mergeable_ranks.items():
            text = "".join(BYTE_TO_CHAR[b] for b in token_bytes)
            self._id_to_token[rank] = text
            self._token_to_id[text] = rank
        self._token_to_id.update(self._specials)
        self._chat_pending: list[tuple[str, list[int]]] | None = None  # set during apply_chat_template
        kwargs.pop("split_special_tokens", None)
        super().__init__(bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, add_bos_token=add_bos_token,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, split_special_tokens=True,
                         padding_side=padding_side, **kwargs)
        self.add_bos_token = add_bos_token

    # --- vocabulary ------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.poe.vocab_size

    def get_vocab(self) -> dict[str, int]:
        return dict(self._token_to_id)

    @property
    def token_bytes(self) -> torch.Tensor:
        """int32 (V,): the raw byte length of every token, 0 for special tokens."""
        if self._token_bytes is None:
            directory = Path(self.token_bytes_file).parent if self.token_bytes_file else Path(self.vocab_file).parent
            self._token_bytes = load_token_bytes(directory)
        return self._token_bytes

    # --- text <-> tokens <-> ids -------------------------------------------------------------------
    def tokenize(self, text: str, **kwargs) -> list[str]:
        if self._chat_pending is None:
            return super().tokenize(text, **kwargs)
        if not self._chat_pending or self._chat_pending[0][0] != text:
            raise RuntimeError("apply_chat_template tokenized a text other than the rendered conversation")
        _, ids = self._chat_pending.pop(0)
        return _ChatTokens([self._id_to_token[i] for i in ids], ids)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, _ChatTokens):
            return list(tokens.ids)
        return super().convert_tokens_to_ids(tokens)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return [self._id_to_token[i] for i in self.poe.encode(text)]

    def _convert_token_to_id(self, token: str) -> int | None:
        return self._token_to_id.get(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self._id_to_token[int(index)]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytearray()
        for token in tokens:
            if token in self._specials:
                data += token.encode("utf-8")
            else:
                data += bytes(CHAR_TO_BYTE[c] for c in token)
        return data.decode("utf-8", errors="replace")

    def _decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces=None,
                **kwargs) -> str:
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            specials = set(self._specials.values())
            ids = [i for i in ids if i not in specials]
        return self.poe.decode(ids)

    # --- chat ------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, *args, **kwargs):
        """transformers' apply_chat_template with poelm's chat rules for the ids (module docstring)."""
        bound = inspect.signature(PreTrainedTokenizer.apply_chat_template).bind(self, conversation, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        template = self.get_chat_template(a["chat_template"], a["tools"])
        if template != CHAT_TEMPLATE:
            if a["tokenize"]:
                raise ValueError("this tokenizer tokenizes only its own chat template (poelm's chat format); "
                                 "render another template with tokenize=False and encode the parts yourself")
            return super().apply_chat_template(conversation, *args, **kwargs)
        for name in ("tools", "documents", "continue_final_message"):
            if a[name]:
                raise ValueError(f"apply_chat_template: {name} is not supported by poelm's chat format")
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
        pending = []
        for chat in conversation if batched else [conversation]:
            messages = [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                        for m in getattr(chat, "messages", chat)]  # transformers drops None values too
            if a["add_generation_prompt"]:
                ids = render_prompt(self.poe, messages)
            else:
                ids = render_conversation(self.poe, messages, training=False).ids
            pending.append((self.poe.decode(ids), ids))
        if not a["tokenize"]:
            return super().apply_chat_template(conversation, *args, **kwargs)
        extra = a.pop("kwargs", {})
        a.pop("self")
        a.pop("sanitize_control_tokens", None)  # messages are always ordinary text here (5.x names it,
        extra.pop("sanitize_control_tokens", None)  # 4.57 would pass it to the template)
        self._chat_pending = pending
        try:
            out = super().apply_chat_template(**a, **extra)
        finally:
            left, self._chat_pending = self._chat_pending, None
        if left:
            raise RuntimeError("apply_chat_template did not tokenize every rendered conversation")
        return out

    # --- special tokens --------------------------------------------------------------------------
    def build_inputs_with_special_tokens(self, token_ids_0: list[int],
                                         token_ids_1: list[int] | None = None) -> list[int]:
        ids = list(token_ids_0) + (list(token_ids_1) if token_ids_1 is not None else [])
        if self.add_bos_token and (not ids or ids[0] != self.poe.bos_token_id):
            ids = [self.poe.bos_token_id] + ids
        return ids

    def get_special_tokens_mask(self, token_ids_0: list[int], token_ids_1: list[int] | None = None,
                                already_has_special_tokens: bool = False) -> list[int]:
        ids = list(token_ids_0) + (list(token_ids_1) if token_ids_1 is not None else [])
        if already_has_special_tokens:
            specials = set(self._specials.values())
            return [1 if i in specials else 0 for i in ids]
        added = 1 if self.add_bos_token and (not ids or ids[0] != self.poe.bos_token_id) else 0
        return [1] * added + [0] * len(ids)

    def create_token_type_ids_from_sequences(self, token_ids_0: list[int],
                                             token_ids_1: list[int] | None = None) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    # --- files -----------------------------------------------------------------------------------
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        pkl = directory / f"{prefix}tokenizer.pkl"
        pkl.write_bytes(pickle.dumps(self.poe.enc))
        buf = io.BytesIO()
        torch.save(self.poe.token_bytes(), buf)
        tb = directory / f"{prefix}token_bytes.pt"
        tb.write_bytes(buf.getvalue())
        return (os.fspath(pkl), os.fspath(tb))
