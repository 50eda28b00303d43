"""`poelm chat MODEL`: a multi-turn chat in the terminal, in the chat format of poelm/chat.py.

    poelm chat runs/sft --system "You are terse." --temperature 0.7 --top-p 0.9
    printf 'Hi\\nAnd then?\\n' | poelm chat runs/sft     # a pipe works too: one reply per line
    poelm generate runs/sft "Hi" --chat                  # one user turn, no history

Every input line is a user turn. The whole conversation (the --system message, the earlier
turns, the new user turn) is rendered again with render_prompt each turn, and the reply is
streamed as it is generated (never splitting a character) until `<|assistant_end|>` (or
`<|bos|>`), --max-new-tokens or the end of the context. The reply then joins the history.
- `/reset` clears the history (the --system message stays), `/quit` or end of input exits 0.
- The decoding flags are generate's; every reply is decoded with them afresh (--seed seeds
  each reply the same way).
- When stdin is a terminal the prompt `you> ` is shown; from a pipe nothing but the replies
  (each followed by `\\n`) reaches stdout.
- History that no longer fits the context, with room for the reply (--max-new-tokens, at most
  half the context), loses its oldest exchanges, said on stderr. A message too long to fit
  even alone is not sent (said on stderr) and the chat goes on.
- An empty reply is not kept (the chat format has no empty turns); Ctrl-C during a reply
  stops that reply and drops its turn, Ctrl-C at the prompt exits.
- A model without a tokenizer, or whose tokenizer lacks the chat special tokens: one line,
  exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from poelm.chat import render_prompt
from poelm.cli.common import CliError, chat_stop_ids, decode_kwargs, decode_options, load_engine, threads_note
from poelm.cli.generate import decoding_arguments

PROMPT = "you> "
QUIT, RESET = "/quit", "/reset"


def chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="MODEL (its tokenizer must have the chat special tokens)")
    p.add_argument("--system", default=None, help="system message, merged into the first user turn")
    decoding_arguments(p, max_new_tokens=256)


class History:
    """The conversation so far: the optional system message, then user/assistant turns."""

    def __init__(self, tokenizer, system: str | None, context: int, reply_room: int):
        self.tokenizer, self.context, self.reply_room = tokenizer, context, reply_room
        self.system = [{"role": "system", "content": system}] if system is not None else []
        self.turns: list[dict] = []  # user, assistant, user, assistant, ...

    def prompt(self, user_text: str) -> list[int] | None:
        """Prompt ids for a new user turn, dropping the oldest exchanges until it leaves
        reply_room tokens of the context; None (said on stderr) when the turn cannot fit."""
        user = {"role": "user", "content": user_text}
        alone = render_prompt(self.tokenizer, self.system + [user])
        if len(alone) >= self.context:
            print(f"poelm: this message is {len(alone)} tokens with the chat format but the context holds "
                  f"{self.context}; not sent, shorten it", file=sys.stderr)
            return None
        while True:
            ids = render_prompt(self.tokenizer, self.system + self.turns + [user])
            if len(ids) + self.reply_room <= self.context or not self.turns:
                return ids
            del self.turns[:2]
            print(f"poelm: dropped the oldest exchange from the history to fit the context of {self.context} "
                  "tokens", file=sys.stderr)

    def add(self, user_text: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]


def read_line(interactive: bool) -> str | None:
    """The next input line without its newline, None at end of input."""
    try:
        return input(PROMPT if interactive else "")
    except EOFError:
        return None


def reply(engine, ids: list[int], options: dict, as_json: bool) -> str | None:
    """Generate one reply, streamed to stdout (a JSON line with --json); None if interrupted."""
    try:
        if as_json:
            out = engine.generate(ids, **options)
            print(json.dumps(out.to_json()), flush=True)
            return out.text
        stream = engine.stream(ids, **options)
        for delta in stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
        print(flush=True)
        return stream.result.text
    except KeyboardInterrupt:
        print(flush=True)
        print("poelm: reply interrupted; that turn is not kept", file=sys.stderr)
        return None


def cmd_chat(args: argparse.Namespace) -> int:
    if args.system is not None and not args.system.strip():
        raise CliError("--system is empty; give the system message text or leave --system out")
    if args.compose:
        raise CliError("--compose is not supported by poelm chat (composed siblings decode without a cache); "
                       "use `poelm generate --compose` or load one specialist with --delta")
    engine = load_engine(args)
    options = decode_kwargs(args)
    options.setdefault("stop_token_ids", chat_stop_ids(engine.tokenizer, args.model))
    decode_options(engine, options)  # bad flags fail before the first prompt
    context = engine.model.config.sequence_len
    history = History(engine.tokenizer, args.system, context, max(1, min(args.max_new_tokens, context // 2)))
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")  # bytes that are not UTF-8 become U+FFFD
    interactive = sys.stdin.isatty()
    if interactive:
        note = threads_note(args)
        print(f"poelm chat: {RESET} clears the history, {QUIT} or Ctrl-D exits{f'; {note}' if note else ''}",
              file=sys.stderr)
    while (line := read_line(interactive)) is not None:
        command = line.strip()
        if command == QUIT:
            break
        if command == RESET:
            history.turns.clear()
            print("poelm: history cleared", file=sys.stderr)
            continue
        if not command:
            continue
        ids = history.prompt(line)
        if ids is None:
            continue
        text = reply(engine, ids, options, args.json)
        if text is None:
            continue
        if text.strip():
            history.add(line, text)
        else:
            print("poelm: the reply is empty; that turn is not kept", file=sys.stderr)
    return 0
