"""`poelm chat` and `poelm generate --chat` (poelm/cli/chat.py): replies are exactly greedy
Engine.generate on render_prompt of the whole conversation, through a pipe and a pseudo-terminal.
Run: .venv/bin/pytest -q tests/test_chat_cli.py"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from poelm.chat import render_prompt
from poelm.cli import main
from poelm.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
MAX_NEW = 8
HELLO, HOW, AGAIN = "hello", "how are you", "tell me more"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def byte_tokenizer(specials):
    import tiktoken

    from poelm.tokenizer import SPLIT_PATTERN, Tokenizer

    enc = tiktoken.Encoding(name="bytes", pat_str=SPLIT_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={s: 256 + i for i, s in enumerate(specials)})
    return Tokenizer(enc)


def noisy_model(tok, seed: int = 0, **config):
    """A tiny random GPT over tok's vocabulary (4 PoE stages of 1 layer unless config says
    otherwise) whose weights carry N(0, 0.5) noise on top of the init, so that its readouts differ
    by position and prompt; in eval mode."""
    from poelm.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**dict(n_layer=4, n_embd=32, n_head=2, vocab_size=tok.vocab_size, sequence_len=128,
                                    poe_every=1), **config}))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """(model dir, Engine): a tiny random model whose <|assistant_end|> row copies (x1.05) the
    row of the third token greedy would answer HELLO with, so that reply ends at <|assistant_end|>."""
    from poelm.checkpoint import save_model
    from poelm.tokenizer import SPECIAL_TOKENS

    tok = byte_tokenizer(SPECIAL_TOKENS)
    model = noisy_model(tok, n_layer=2, sequence_len=64)
    with torch.no_grad():
        engine = Engine(model, tok)
        third = engine.generate(render_prompt(tok, [user(HELLO)]), max_new_tokens=3, stop_token_ids=[]).tokens[2]
        model.lm_head.weight[tok.encode_special("<|assistant_end|>")] = 1.05 * model.lm_head.weight[third]
    path = save_model(model, tmp_path_factory.mktemp("chat") / "model", tok)
    return path, engine


def greedy(engine: Engine, messages: list[dict], max_new: int = MAX_NEW):
    return engine.generate(render_prompt(engine.tokenizer, messages), max_new_tokens=max_new)


def poelm_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8",
            "HF_HUB_OFFLINE": "1"}


def test_replies_history_reset_and_stop_through_a_pipe(chat_model):
    path, engine = chat_model
    end = engine.tokenizer.encode_special("<|assistant_end|>")
    first = greedy(engine, [user(HELLO)])
    assert first.tokens[-1] == end and first.stats["stop_reason"] == "stop_token" and first.text  # stops at the end
    second = greedy(engine, [user(HELLO), assistant(first.text), user(HOW)])
    assert second.text != greedy(engine, [user(HOW)]).text  # so the history shows in the reply
    after_reset = greedy(engine, [user(AGAIN)])
    assert after_reset.text != greedy(engine, [user(HELLO), assistant(first.text), user(HOW), assistant(second.text),
                                               user(AGAIN)]).text

    stdin = f"{HELLO}\n\n{HOW}\n/reset\n{AGAIN}\n/quit\nnever read\n"
    proc = subprocess.run([sys.executable, "-m", "poelm", "chat", str(path), "--max-new-tokens", str(MAX_NEW)],
                          input=stdin, capture_output=True, text=True, encoding="utf-8", env=poelm_env(), cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{first.text}\n{second.text}\n{after_reset.text}\n"  # no prompt from a pipe
    assert "history cleared" in proc.stderr and "you> " not in proc.stdout


def read_until(fd: int, marker: bytes, timeout: float = 120.0) -> bytes:
    """Read the pseudo-terminal until `marker` appears (or it closes)."""
    out, deadline = b"", time.monotonic() + timeout
    while marker not in out:
        assert time.monotonic() < deadline, f"no {marker!r} in {out!r}"
        if select.select([fd], [], [], 1.0)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
    return out


def shown(text: str) -> str:
    """A reply and its newline as the terminal shows them (output processing maps \\n to \\r\\n)."""
    return (text + "\n").replace("\n", "\r\n")


def test_interactive_session_in_a_pseudo_terminal(chat_model):
    path, engine = chat_model
    first = greedy(engine, [user(HELLO)])
    second = greedy(engine, [user(HELLO), assistant(first.text), user(HOW)])
    after_reset = greedy(engine, [user(HOW)])
    argv = [sys.executable, "-m", "poelm", "chat", str(path), "--max-new-tokens", str(MAX_NEW)]
    pid, fd = pty.fork()
    if pid == 0:  # the child: poelm chat with the terminal as stdin, stdout and stderr
        os.chdir(ROOT)
        os.execve(sys.executable, argv, poelm_env())
    try:
        banner = read_until(fd, b"you> ")
        assert b"/reset" in banner and b"/quit" in banner
        replies = []
        for line in (HELLO, HOW, "/reset", HOW):
            os.write(fd, line.encode() + b"\n")
            out = read_until(fd, b"you> ")
            echo = line.encode() + b"\r\n"
            assert out.startswith(echo), out
            replies.append(out[len(echo):-len(b"you> ")].decode("utf-8"))
        os.write(fd, b"/quit\n")
        read_until(fd, b"\0", timeout=60)  # until the child closes the terminal
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert replies[0] == shown(first.text)
    assert replies[1] == shown(second.text)
    assert "history cleared" in replies[2]
    assert replies[3] == shown(after_reset.text)


def run_in_process(argv: list[str], stdin: str, capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_oldest_turns_dropped_to_fit_the_context(chat_model, capsys, monkeypatch):
    path, engine = chat_model
    tok, context = engine.tokenizer, engine.model.config.sequence_len
    msgs = ["one", "two", "three", "four", "five"]
    system = {"role": "system", "content": "terse"}
    history, expected = [system], []
    for m in msgs:  # what `poelm chat` must do: drop the oldest exchange until the reply has room
        while len(render_prompt(tok, history + [user(m)])) + MAX_NEW > context and len(history) > 1:
            history = [system] + history[3:]
            expected.append("dropped")
        out = greedy(engine, history + [user(m)])
        expected.append(out.text)
        history += [user(m), assistant(out.text)]
    assert expected[:2] != ["dropped"] * 2 and "dropped" in expected  # history kept at first, then dropped
    rc, stdout, stderr = run_in_process(["chat", str(path), "--system", "terse", "--max-new-tokens", str(MAX_NEW)],
                                        "\n".join(msgs) + "\n", capsys, monkeypatch)
    assert rc == 0, stderr
    assert stdout == "".join(t + "\n" for t in expected if t != "dropped")
    assert stderr.count("dropped the oldest exchange") == expected.count("dropped")


def test_message_too_long_for_the_context_is_not_sent(chat_model, capsys, monkeypatch):
    path, engine = chat_model
    reply = greedy(engine, [user(HELLO)]).text
    rc, stdout, stderr = run_in_process(["chat", str(path), "--max-new-tokens", str(MAX_NEW)],
                                        "x" * 80 + f"\n{HELLO}\n", capsys, monkeypatch)
    assert rc == 0 and stdout == reply + "\n"  # the chat goes on, the long line left no history
    assert "context holds 64" in stderr and "not sent" in stderr


def test_json_lines_and_sampling_flags(chat_model, capsys, monkeypatch):
    path, engine = chat_model
    kw = dict(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=7, max_new_tokens=5)
    first = engine.generate(render_prompt(engine.tokenizer, [user(HELLO)]), **kw)
    second = engine.generate(render_prompt(engine.tokenizer, [user(HELLO), assistant(first.text), user(HOW)]), **kw)
    rc, stdout, stderr = run_in_process(["chat", str(path), "--json", "--temperature", "0.9", "--top-k", "20",
                                         "--top-p", "0.9", "--repetition-penalty", "1.3", "--seed", "7",
                                         "--max-new-tokens", "5"], f"{HELLO}\n{HOW}\n", capsys, monkeypatch)
    assert rc == 0, stderr
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert [(d["text"], d["tokens"]) for d in lines] == [(first.text, first.tokens), (second.text, second.tokens)]


def test_speculative_chat_equals_greedy(chat_model, capsys, monkeypatch):
    path, engine = chat_model
    first = greedy(engine, [user(HELLO)])
    rc, stdout, stderr = run_in_process(["chat", str(path), "--mode", "speculative", "--draft-stage", "0",
                                         "--gamma", "3", "--max-new-tokens", str(MAX_NEW)],
                                        f"{HELLO}\n", capsys, monkeypatch)
    assert rc == 0, stderr
    assert stdout == first.text + "\n"


def test_generate_chat_is_one_user_turn(chat_model, capsys):
    path, engine = chat_model
    first = greedy(engine, [user(HELLO)])
    capsys.readouterr()
    assert main(["generate", str(path), HELLO, "--chat", "--max-new-tokens", str(MAX_NEW)]) == 0
    assert capsys.readouterr().out == first.text + "\n"
    assert main(["generate", str(path), HELLO, "--chat", "--max-new-tokens", str(MAX_NEW), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == first.tokens and out["tokens"][-1] == engine.tokenizer.encode_special("<|assistant_end|>")
    assert out["stats"]["stop_reason"] == "stop_token"
    plain = engine.generate(HELLO, max_new_tokens=MAX_NEW)  # without --chat: the text itself is the prompt
    assert main(["generate", str(path), HELLO, "--max-new-tokens", str(MAX_NEW), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == plain.tokens != first.tokens


def one_line_error(argv: list[str], capsys, monkeypatch, *needles: str) -> None:
    rc, stdout, stderr = run_in_process(argv, "hello\n", capsys, monkeypatch)
    lines = stderr.strip().splitlines()
    assert rc == 2 and stdout == "" and len(lines) == 1, stderr
    assert lines[0].startswith("poelm: error: ") and all(n in lines[0] for n in needles), lines[0]


@pytest.mark.parametrize("command", [["chat"], ["generate", "--chat", "hi"]])
def test_tokenizer_without_chat_specials_or_none(command, tmp_path, capsys, monkeypatch):
    from poelm.checkpoint import save_model
    from poelm.model import GPT, GPTConfig

    tok = byte_tokenizer(["<|bos|>"])
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, vocab_size=tok.vocab_size, sequence_len=16))
    model.init_weights()
    save_model(model, tmp_path / "bare", tok)
    save_model(model, tmp_path / "untokenized")
    name, *rest = command
    one_line_error([name, str(tmp_path / "bare"), *rest], capsys, monkeypatch, "<|assistant_end|>", "lacks")
    one_line_error([name, str(tmp_path / "untokenized"), *rest], capsys, monkeypatch, "no tokenizer")


def test_bad_flags_fail_before_the_first_prompt(chat_model, capsys, monkeypatch):
    path, _ = chat_model
    one_line_error(["chat", str(path), "--system", "  "], capsys, monkeypatch, "--system")
    one_line_error(["chat", str(path), "--mode", "stage", "--stage", "9"], capsys, monkeypatch, "stage")


def test_empty_reply_is_not_kept(chat_model, tmp_path, capsys, monkeypatch):
    """A model that answers HELLO with <|assistant_end|> at once: the chat goes on (an empty
    assistant turn in the history would make the next render_prompt refuse)."""
    from poelm.checkpoint import load_model, save_model

    path, engine = chat_model
    model, tok = load_model(path)
    with torch.no_grad():
        first = greedy(Engine(model, tok), [user(HELLO)], max_new=1).tokens[0]
        model.lm_head.weight[tok.encode_special("<|assistant_end|>")] = 2 * model.lm_head.weight[first]
    save_model(model, tmp_path / "mute", tok)
    assert greedy(Engine(model, tok), [user(HELLO)]).tokens == [tok.encode_special("<|assistant_end|>")]
    rc, stdout, stderr = run_in_process(["chat", str(tmp_path / "mute"), "--max-new-tokens", str(MAX_NEW)],
                                        f"{HELLO}\n{HELLO}\n", capsys, monkeypatch)
    assert rc == 0 and stdout == "\n\n", stderr
    assert stderr.count("the reply is empty") == 2
