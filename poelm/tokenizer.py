"""
Byte-level BPE tokenizer: trained with `rustbpe`, encoded with `tiktoken`.

Layout (docs/formats.md): ids 0..255 are the raw bytes, then the learned merges, then the
9 special tokens at the top ids (`<|bos|>` first, `<|output_end|>` = vocab_size - 1).
Ordinary text is never parsed for special tokens: "<|bos|>" typed by a user encodes as
plain bytes, only `encode_special` / `prepend_bos` produce special ids.

Files in a tokenizer directory:
- tokenizer.json  pickle-free (name, pat_str, mergeable_ranks as base64 -> rank,
                  special_tokens); preferred on load
- tokenizer.pkl   pickled tiktoken.Encoding, exactly what nanochat writes; read back
                  through an unpickler that admits only tiktoken.Encoding + plain data
- token_bytes.pt  int32 (V,) byte length of every token, 0 for specials

Usage:
    tok = Tokenizer.train(texts, vocab_size=4096)
    ids = tok.encode("hello", prepend_bos=True)
    tok.save("out/tokenizer"); tok = Tokenizer.load("out/tokenizer")
"""

import base64
import io
import json
import os
import pickle
import warnings
from collections.abc import Iterable
from pathlib import Path

import tiktoken
import torch

try:  # poelm's one atomic writer; an export ships this file standalone as poe_tokenizer.py (no poelm)
    from poelm.atomic import atomic_write_bytes
except ImportError:
    atomic_write_bytes = None

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}|"""
    r""" ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>",
    "<|output_start|>", "<|output_end|>",
]
JSON_FORMAT = "poelm-tokenizer-v1"
# the files of a tokenizer directory: the encoding as JSON (read first) or as a pickle, and the
# byte length of every token (for bits per byte)
TOKENIZER_JSON_NAME = "tokenizer.json"
TOKENIZER_PICKLE_NAME = "tokenizer.pkl"
TOKEN_BYTES_NAME = "token_bytes.pt"


class Tokenizer:
    """A tiktoken.Encoding plus the BOS protocol and save/load."""

    def __init__(self, enc: tiktoken.Encoding):
        self.enc = enc
        specials = enc._special_tokens
        bos = "<|bos|>" if "<|bos|>" in specials else "<|endoftext|>"
        if bos not in specials:
            raise ValueError(f"tokenizer {enc.name!r} has no <|bos|> special token; "
                             "train one with Tokenizer.train")
        self.bos_token_id = specials[bos]

    # ------------------------------------------------------------------ build
    @classmethod
    def from_encoding(cls, enc: tiktoken.Encoding) -> "Tokenizer":
        return cls(enc)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, name: str = "poelm") -> "Tokenizer":
        """Train BPE on `texts`; vocab_size counts 256 bytes + merges + 9 specials."""
        try:  # inside try: transformers' remote-code import check skips it (the HF export ships this module)
            import rustbpe
        except ImportError:
            raise ImportError("training a tokenizer needs the rustbpe package: pip install rustbpe") from None
        n_ranks = vocab_size - len(SPECIAL_TOKENS)
        if n_ranks < 256:
            raise ValueError(f"vocab_size {vocab_size} is too small: need at least "
                             f"{256 + len(SPECIAL_TOKENS)} (256 bytes + 9 specials)")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), n_ranks, pattern=SPLIT_PATTERN)
        ranks = {bytes(b): r for b, r in bpe.get_mergeable_ranks()}
        if len(ranks) != n_ranks or sorted(ranks.values()) != list(range(n_ranks)):
            raise ValueError(f"training text too small: learned {len(ranks) - 256} merges, "
                             f"vocab_size {vocab_size} needs {n_ranks - 256}; "
                             "give more text or a smaller vocab_size")
        specials = {s: n_ranks + i for i, s in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(name=name, pat_str=bpe.get_pattern(),
                                mergeable_ranks=ranks, special_tokens=specials)
        return cls(enc)

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.enc._special_tokens)

    def encode_special(self, name: str) -> int:
        if name not in self.enc._special_tokens:
            raise ValueError(f"unknown special token {name!r}; known: {sorted(self.enc._special_tokens)}")
        return self.enc._special_tokens[name]

    def encode(self, text: str, prepend_bos: bool = False) -> list[int]:
        ids = self.enc.encode_ordinary(text)
        return [self.bos_token_id] + ids if prepend_bos else ids

    def encode_batch(self, texts: list[str], prepend_bos: bool = False,
                     num_threads: int = 8) -> list[list[int]]:
        batch = self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads)
        if prepend_bos:
            batch = [[self.bos_token_id] + ids for ids in batch]
        return batch

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def token_bytes(self) -> torch.Tensor:
        """int32 (V,): raw byte length of each token, 0 for special tokens."""
        lengths = [0] * self.vocab_size
        for b, r in self.enc._mergeable_ranks.items():
            lengths[r] = len(b)
        return torch.tensor(lengths, dtype=torch.int32)

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict:
        ranks = sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        return {
            "format": JSON_FORMAT,
            "name": self.enc.name,
            "pat_str": self.enc._pat_str,
            "mergeable_ranks": {base64.b64encode(b).decode("ascii"): r for b, r in ranks},
            "special_tokens": self.special_tokens,
        }

    def save(self, dir: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer.pkl and token_bytes.pt into `dir` (atomically)."""
        if atomic_write_bytes is None:
            raise RuntimeError("saving needs poelm installed (this is the standalone copy of an export)")
        d = Path(dir)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(d / TOKENIZER_JSON_NAME, json.dumps(self.to_json()).encode())
        atomic_write_bytes(d / TOKENIZER_PICKLE_NAME, pickle.dumps(self.enc))
        buf = io.BytesIO()
        torch.save(self.token_bytes(), buf)
        atomic_write_bytes(d / TOKEN_BYTES_NAME, buf.getvalue())

    @classmethod
    def load(cls, dir: str | os.PathLike) -> "Tokenizer":
        """Load from tokenizer.json if present, else from tokenizer.pkl (restricted unpickler)."""
        d = Path(dir)
        if not d.is_dir():
            raise FileNotFoundError(f"tokenizer directory {d} not found; train one first "
                                    "(Tokenizer.train(...).save(dir)) or pass a nanochat tokenizer dir")
        if (d / TOKENIZER_JSON_NAME).is_file():
            return cls(_encoding_from_json(d / TOKENIZER_JSON_NAME))
        if (d / TOKENIZER_PICKLE_NAME).is_file():
            return cls(_encoding_from_pickle(d / TOKENIZER_PICKLE_NAME))
        raise FileNotFoundError(f"no tokenizer.json or tokenizer.pkl in {d}; "
                                "train one first (Tokenizer.train(...).save(dir))")


def has_tokenizer(dir: str | os.PathLike) -> bool:
    """Whether `dir` holds a tokenizer (tokenizer.json or tokenizer.pkl)."""
    return any((Path(dir) / n).exists() for n in (TOKENIZER_JSON_NAME, TOKENIZER_PICKLE_NAME))


def load_token_bytes(dir: str | os.PathLike) -> torch.Tensor:
    """token_bytes.pt from `dir` (weights_only); computed from the encoding if missing."""
    path = Path(dir) / TOKEN_BYTES_NAME
    if not path.is_file():
        warnings.warn(f"{path} missing; computing token byte lengths from the tokenizer")
        return Tokenizer.load(dir).token_bytes()
    try:
        tb = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except Exception as e:  # truncated, or a pickle that is more than tensors
        raise ValueError(f"{path} is not a readable token-bytes tensor ({type(e).__name__}); delete it to "
                         "recompute it from the tokenizer") from None
    if not isinstance(tb, torch.Tensor) or tb.ndim != 1:
        raise ValueError(f"{path} is not a 1-D tensor; delete it to recompute it from the tokenizer")
    return tb.to(torch.int32)


# ---------------------------------------------------------------------- helpers
def _make_encoding(state: object, path: Path) -> tiktoken.Encoding:
    """Validate a {name, pat_str, mergeable_ranks, special_tokens} state and build an Encoding."""
    keys = {"name", "pat_str", "mergeable_ranks", "special_tokens"}
    if not isinstance(state, dict) or not keys <= set(state):
        raise ValueError(f"{path} does not hold a tiktoken encoding state ({sorted(keys)}); "
                         "re-save the tokenizer")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    ok = (isinstance(state["name"], str) and isinstance(state["pat_str"], str)
          and isinstance(ranks, dict) and isinstance(specials, dict)
          and all(isinstance(b, bytes) and type(r) is int for b, r in ranks.items())
          and all(isinstance(s, str) and type(i) is int for s, i in specials.items()))
    if not ok:
        raise ValueError(f"{path} has a malformed tokenizer state (wrong field types); re-save the tokenizer")
    return tiktoken.Encoding(name=state["name"], pat_str=state["pat_str"],
                             mergeable_ranks=ranks, special_tokens=specials)


def _encoding_from_json(path: Path) -> tiktoken.Encoding:
    try:
        obj = json.loads(path.read_text())
        state = dict(obj)
        state["mergeable_ranks"] = {base64.b64decode(k, validate=True): v
                                    for k, v in obj["mergeable_ranks"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid tokenizer.json ({e}); re-save the tokenizer") from None
    return _make_encoding(state, path)


class _EncodingStub:
    """Stands in for tiktoken.core.Encoding while unpickling: only records the state."""

    def __setstate__(self, state):
        self.state = state


def _reconstructor(cls, base, state):  # copyreg._reconstructor for pickle protocols 0/1
    if cls is not _EncodingStub or base is not object or state is not None:
        raise ValueError("unexpected copyreg._reconstructor call in tokenizer.pkl")
    return _EncodingStub()


def _latin1_encode(s, encoding="latin1"):  # how protocols < 3 store bytes
    if not isinstance(s, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError("unexpected _codecs.encode call in tokenizer.pkl")
    return s.encode("latin1")


def _empty_bytes(*args):  # protocols < 3 store b"" as bytes()
    if args:
        raise ValueError("unexpected bytes(...) call in tokenizer.pkl")
    return b""


_ALLOWED = {
    ("tiktoken.core", "Encoding"): _EncodingStub,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("copy_reg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("__builtin__", "object"): object,
    ("_codecs", "encode"): _latin1_encode,
    ("builtins", "bytes"): _empty_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
}


# What to do about an unreadable tokenizer.pkl: exports ship only the pickle, while the
# directories Tokenizer.save writes (runs, `poelm tokenizer train`) hold tokenizer.json too.
_PICKLE_FIX = ("re-export the model with `poelm export` (exports ship only tokenizer.pkl), or put the tokenizer.json "
               "that Tokenizer.save wrote next to tokenizer.pkl, or re-train it with `poelm tokenizer train`")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f, path: Path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise ValueError(f"refusing to unpickle {module}.{name} from {self.path}: "
                         f"only tiktoken.Encoding is allowed; {_PICKLE_FIX}")

    def persistent_load(self, pid):
        raise ValueError(f"refusing persistent ids in {self.path}: only tiktoken.Encoding "
                         f"is allowed; {_PICKLE_FIX}")


def _encoding_from_pickle(path: Path) -> tiktoken.Encoding:
    with open(path, "rb") as f:
        try:
            obj = _RestrictedUnpickler(f, path).load()
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{path} is not a readable tokenizer pickle ({type(e).__name__}: {e}); "
                             f"{_PICKLE_FIX}") from None
    if not isinstance(obj, _EncodingStub) or not hasattr(obj, "state"):
        raise ValueError(f"{path} does not contain a tiktoken.Encoding; {_PICKLE_FIX}")
    if isinstance(obj.state, str):
        raise ValueError(f"{path} refers to the registered tiktoken encoding {obj.state!r} by name; "
                         f"save the full encoding: {_PICKLE_FIX}")
    return _make_encoding(obj.state, path)
