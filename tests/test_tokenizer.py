"""Tokenizer: training layout, round trips, no special ids from text, save/load, safe unpickling."""

import builtins
import os
import pickle
import random

import pytest
import tiktoken
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from poelm import tokenizer as tokmod
from poelm.tokenizer import SPECIAL_TOKENS, Tokenizer, load_token_bytes

VOCAB = 400


def synthetic_texts(n=300, seed=0):
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(400)] + ["日本語", "😀", "naïve", "1234", "\t", "<|bos|>"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))) for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(synthetic_texts(), VOCAB)


def test_layout_specials_on_top(tok):
    assert tok.vocab_size == VOCAB
    assert tok.special_tokens == {s: VOCAB - len(SPECIAL_TOKENS) + i for i, s in enumerate(SPECIAL_TOKENS)}
    assert tok.bos_token_id == VOCAB - 9 == tok.encode_special("<|bos|>")
    assert tok.encode_special("<|output_end|>") == VOCAB - 1
    assert all(tok.enc._mergeable_ranks[bytes([b])] == b for b in range(256))  # id = byte value
    assert tok.enc._pat_str == tokmod.SPLIT_PATTERN
    with pytest.raises(ValueError, match="unknown special token"):
        tok.encode_special("<|nope|>")


def test_train_errors():
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(["aaa bbb"], 1000)
    with pytest.raises(ValueError, match="at least 265"):
        Tokenizer.train(synthetic_texts(10), 200)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
@example(text="emoji 😀👩‍👩‍👧 CJK 中文字 한국어 control \x00\x01\x1b\x7f\r\n\t tail  ")
@example(text="")
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode_bytes(ids) == text.encode("utf-8")
    assert all(0 <= i < tok.bos_token_id for i in ids)


@settings(max_examples=100, deadline=None)
@given(parts=st.lists(st.one_of(st.sampled_from(SPECIAL_TOKENS + ["<|endoftext|>", "<|", "|>"]),
                                st.text(max_size=10)), max_size=10))
def test_special_text_never_special(tok, parts):
    text = "".join(parts)
    ids = tok.encode(text)
    assert all(i < tok.bos_token_id for i in ids)
    assert tok.decode(ids) == text
    (batch,) = tok.encode_batch([text], num_threads=1)
    assert batch == ids


def test_bos_and_batch(tok):
    texts = ["<|bos|> hello", "world", ""]
    out = tok.encode_batch(texts, prepend_bos=True, num_threads=2)
    assert out == [tok.encode(t, prepend_bos=True) for t in texts]
    assert all(o[0] == tok.bos_token_id and tok.bos_token_id not in o[1:] for o in out)
    assert out[2] == [tok.bos_token_id]


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (VOCAB,)
    for i in range(tok.bos_token_id):
        assert tb[i] == len(tok.decode_bytes([i]))
    assert tb[tok.bos_token_id:].eq(0).all()


def _same(a: Tokenizer, b: Tokenizer):
    assert a.enc._mergeable_ranks == b.enc._mergeable_ranks
    assert a.enc._special_tokens == b.enc._special_tokens
    assert a.enc._pat_str == b.enc._pat_str and a.bos_token_id == b.bos_token_id
    for t in synthetic_texts(20, seed=1) + ["héllo 😀 \x00 <|bos|>"]:
        assert a.encode(t) == b.encode(t)


def test_save_load_both_formats(tok, tmp_path):
    tok.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"tokenizer.json", "tokenizer.pkl", "token_bytes.pt"}
    _same(tok, Tokenizer.load(tmp_path))  # json
    with open(tmp_path / "tokenizer.pkl", "rb") as f:  # what nanochat reads back
        assert isinstance(pickle.load(f), tiktoken.Encoding)
    (tmp_path / "tokenizer.json").unlink()
    _same(tok, Tokenizer.load(tmp_path))  # restricted pickle
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(tok.enc, protocol=proto))
        _same(tok, Tokenizer.load(tmp_path))
    _same(tok, Tokenizer.from_encoding(tok.enc))


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.pkl"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)


class _SystemCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalCall:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, (f"open({str(self.marker)!r}, 'w').close()",))


def _encoding_pickle(state) -> bytes:
    """Protocol-2 pickle of tiktoken.core.Encoding built with an arbitrary state."""
    body = pickle.dumps(state, protocol=2)[2:-1]  # drop PROTO header and STOP
    return b"\x80\x02ctiktoken.core\nEncoding\n)\x81" + body + b"b."


class _EvilEncoding:
    """Pickles as tiktoken.core.Encoding but smuggles os.system into its state."""

    def __init__(self, marker):
        self.marker = marker

    def pickled(self):
        return _encoding_pickle({"name": "x", "pat_str": "x", "mergeable_ranks": {},
                                 "special_tokens": {}, "evil": _SystemCall(self.marker)})


@pytest.mark.parametrize("make, name", [(_SystemCall, "system"), (_EvalCall, "builtins.eval"),
                                        (_EvilEncoding, "system")])
def test_malicious_pickle_refused(tmp_path, make, name):
    marker = tmp_path / "pwned"
    obj = make(marker)
    data = obj.pickled() if hasattr(obj, "pickled") else pickle.dumps(obj)
    (tmp_path / "tokenizer.pkl").write_bytes(data)
    with pytest.raises(ValueError, match=f"refusing to unpickle .*{name}.*only tiktoken.Encoding"):
        Tokenizer.load(tmp_path)
    assert not marker.exists()


def test_pickle_state_checked(tok, tmp_path):
    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(_encoding_pickle("cl100k_base"))  # by registered name: would download
    with pytest.raises(ValueError, match="registered tiktoken encoding"):
        Tokenizer.load(tmp_path)
    path.write_bytes(_encoding_pickle({"name": "x", "pat_str": 1, "mergeable_ranks": {},
                                       "special_tokens": {}}))
    with pytest.raises(ValueError, match="malformed"):
        Tokenizer.load(tmp_path)
    path.write_bytes(pickle.dumps({"not": "an encoding"}))
    with pytest.raises(ValueError, match="does not contain a tiktoken.Encoding"):
        Tokenizer.load(tmp_path)
    path.write_bytes(_encoding_pickle(tok.enc.__getstate__()))  # the crafted form itself is fine
    _same(tok, Tokenizer.load(tmp_path))


def test_load_token_bytes(tok, tmp_path, monkeypatch):
    tok.save(tmp_path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch, "load", spy)
    tb = load_token_bytes(tmp_path)
    assert calls == [True]
    assert torch.equal(tb, tok.token_bytes())
    (tmp_path / "token_bytes.pt").unlink()
    with pytest.warns(UserWarning, match="missing"):
        assert torch.equal(load_token_bytes(tmp_path), tok.token_bytes())
