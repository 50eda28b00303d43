"""Structured output: a constraint (any JSON object, a JSON Schema, a regex, a Lark or GBNF
grammar, a choice of strings) compiled against poelm's tokenizer, and per row a matcher that
gives the tokens allowed next as a mask on the logits.

    grammar = compile_constraint(Constraint("json_schema", schema), tokenizer, stop_ids={260}, vocab_size=V)
    m = grammar.matcher()                  # one per row
    allowed = masks([m], V, device)        # (1, V) bool; masked(logits, allowed) puts -inf elsewhere
    m.advance(token); m.rollback(2); m.is_done

The library is llguidance (guidance-ai; vLLM and SGLang use it too), chosen over xgrammar
for its dependencies: llguidance is one abi3 wheel that needs nothing, while xgrammar requires
torch, transformers, triton and apache-tvm-ffi (pip would add triton, a GPU compiler, beside
poelm's pinned CPU torch). It builds its token trie straight from the tiktoken encoding (the
id -> bytes table and the special tokens), compiles a grammar lazily (about 30 ms for the
tokenizer and a schema at vocab 4096) and has rollback built in. Measured on the 2-core CPU
box, a JSON Schema at vocab 4096: 6-20 us per row and step for llguidance, 2-4 us for xgrammar
(which precomputes masks at compile time); both are far below a decode step (milliseconds).

The stop ids of the decode (<|bos|>, <|assistant_end|> or the caller's stop_token_ids) are the
grammar's end: allowed where the grammar may end, the only tokens allowed once it must; so a
row stops with its output complete, or reaches max_new_tokens with a prefix of one. JSON is
generated compactly (", " and ": " separators, no other whitespace) unless the schema's
"x-guidance" options say otherwise: free whitespace would let a weak model spend its tokens
on blanks.
"""

from __future__ import annotations

import json
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from poelm.engine.options import OptionError

KINDS = ("json_object", "json_schema", "regex", "grammar", "choice")
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
GRAMMAR_CACHE = 64  # compiled grammars kept per tokenizer (a server sees the same schemas again)
_SHIFTS = torch.arange(32, dtype=torch.int32)
_VOCABS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(stop ids, V): _Vocab}
_EXECUTOR = None  # llguidance.LLExecutor: masks of a batch's rows in parallel (made on first use)


class ConstraintError(OptionError):
    """A constraint that cannot be compiled; `detail` says why without naming the field (the server
    names its own request field)."""

    def __init__(self, detail: str):
        super().__init__(f"constraint: {detail}", "constraint")
        self.detail = detail


@dataclass(frozen=True)
class Constraint:
    """What the output must match. kind: json_object (spec unused), json_schema (a schema: dict or
    JSON text), regex (a pattern), grammar (Lark, or GBNF as llama.cpp writes it), choice (a list
    of strings: the output is one of them)."""

    kind: str
    spec: object = None

    @classmethod
    def of(cls, value) -> "Constraint":
        """A Constraint, or a {"kind", "spec"} dict -> a Constraint (ConstraintError if neither)."""
        if isinstance(value, Constraint):
            return value
        if isinstance(value, dict) and set(value) <= {"kind", "spec"} and "kind" in value:
            return cls(value["kind"], value.get("spec"))
        raise ConstraintError(f"give a Constraint or a {{'kind': ..., 'spec': ...}} dict, got {type(value).__name__}")


def _llguidance():
    """The llguidance module (the `serve` extra), or ConstraintError saying how to install it."""
    try:
        import llguidance
    except ImportError:
        raise ConstraintError("structured output needs the llguidance package: pip install 'poelm[serve]' "
                              "(or pip install llguidance)") from None
    return llguidance


def one_line(text: str, limit: int = 200) -> str:
    """The library's (multi-line) message as one short line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def grammar_text(c: Constraint) -> str:
    """The constraint in llguidance's grammar format (ConstraintError for a bad kind or spec)."""
    llg = _llguidance()

    if c.kind not in KINDS:
        raise ConstraintError(f"unknown kind {c.kind!r}; use one of {', '.join(KINDS)}")
    if c.kind in ("json_object", "json_schema"):
        schema = {"type": "object"} if c.kind == "json_object" else c.spec
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ConstraintError(f"the JSON schema is not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError(f"a JSON schema is an object, got {type(schema).__name__}")
        try:
            return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_DEFAULTS)
        except ValueError as e:
            raise ConstraintError(f"not a valid JSON schema: {one_line(e)}") from None
    if c.kind == "choice":
        if not (isinstance(c.spec, list) and c.spec and all(isinstance(s, str) and s for s in c.spec)):
            raise ConstraintError("a choice is a non-empty list of non-empty strings")
        return llg.grammar_from("choice", c.spec)
    if not isinstance(c.spec, str) or not c.spec:
        raise ConstraintError(f"a {c.kind} is a non-empty string")
    if c.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(c.spec)
    try:
        return llg.grammar_from("grammar", c.spec)  # Lark, or GBNF (rules written with ::=)
    except ValueError as e:
        raise ConstraintError(f"not a valid grammar: {one_line(e)}") from None


class _Vocab:
    """llguidance's view of one tokenizer with one set of end ids, and the grammars compiled for it."""

    def __init__(self, tokenizer, stop_ids: tuple[int, ...], vocab_size: int):
        import llguidance as llg

        enc = tokenizer.enc
        self.lltok = llg.LLTokenizer.from_tiktoken(encoder=enc._mergeable_ranks, special_tokens=enc._special_tokens,
                                                   pattern=enc._pat_str, eos_token=list(stop_ids), n_vocab=vocab_size)
        self.grammars: OrderedDict[str, Grammar] = OrderedDict()

    def grammar(self, text: str, c: Constraint) -> "Grammar":
        if text in self.grammars:
            self.grammars.move_to_end(text)
            return self.grammars[text]
        g = self.grammars[text] = Grammar(c, text, self.lltok)
        if len(self.grammars) > GRAMMAR_CACHE:
            self.grammars.popitem(last=False)
        return g


class Grammar:
    """A constraint compiled against one tokenizer: `matcher()` gives each row its own."""

    def __init__(self, constraint: Constraint, text: str, lltok):
        import llguidance as llg

        self.constraint, self.eos = constraint, list(lltok.eos_tokens)
        bad, messages = llg.LLMatcher.validate_grammar_with_warnings(text, lltok)
        if bad:
            raise ConstraintError(self._message(messages[0]))
        self._proto = llg.LLMatcher(lltok, text, log_level=0)
        if self._proto.is_error():
            raise ConstraintError(self._message(self._proto.get_error()))

    def _message(self, error: str) -> str:
        what = {"json_object": "JSON", "json_schema": "JSON schema", "regex": "regex"}.get(self.constraint.kind,
                                                                                          self.constraint.kind)
        return f"not a valid {what}: {one_line(error)}"

    def matcher(self) -> "RowMatcher":
        return RowMatcher(self._proto.deep_copy(), self.eos)


class RowMatcher:
    """One row's position in a grammar: advance by each generated token, roll back rejected
    speculative drafts. Once the grammar has ended only the end ids are allowed; tokens after
    that (a row that goes on past its stop) are counted, not fed, so rollback stays exact."""

    def __init__(self, matcher, eos: list[int]):
        self.m, self.eos = matcher, eos
        self.past_end = 0  # tokens taken after the grammar ended

    @property
    def is_done(self) -> bool:
        """The grammar has ended: only an end id can follow."""
        return self.m.is_stopped()

    def advance(self, token: int) -> None:
        if self.past_end or self.m.is_stopped():
            self.past_end += 1
        elif not self.m.consume_token(token):  # the mask allowed it, so this is a bug
            raise RuntimeError(f"token {token} broke the constraint: {one_line(self.m.get_error())}")

    def rollback(self, n: int) -> None:
        tail = min(n, self.past_end)
        self.past_end -= tail
        if n > tail and not self.m.rollback(n - tail):
            raise RuntimeError(f"cannot roll the constraint back {n - tail} tokens: {one_line(self.m.get_error())}")


def compile_constraint(constraint, tokenizer, stop_ids, vocab_size: int) -> Grammar:
    """A Constraint (or {"kind", "spec"} dict) compiled for a poelm Tokenizer whose stop ids end
    the grammar; ConstraintError (one line) for a bad constraint, a tokenizer without a tiktoken
    encoding or no stop id."""
    if isinstance(constraint, Grammar):  # compiled already
        return constraint
    c = Constraint.of(constraint)
    if tokenizer is None or not hasattr(tokenizer, "enc"):
        raise ConstraintError("structured output needs the model's poelm tokenizer (byte-level BPE)")
    if not stop_ids:
        raise ConstraintError("structured output needs a stop token to end on; keep the default stop_token_ids "
                              "or give at least one")
    text = grammar_text(c)
    key = (tuple(sorted(stop_ids)), vocab_size)
    vocabs = _VOCABS.setdefault(tokenizer, {})
    if key not in vocabs:
        vocabs[key] = _Vocab(tokenizer, key[0], vocab_size)
    return vocabs[key].grammar(text, c)


def row_matcher(grammar) -> RowMatcher | None:
    """A new row's matcher of a compiled constraint (None: an unconstrained row)."""
    if grammar is None:
        return None
    if not isinstance(grammar, Grammar):
        raise TypeError(f"a decoder takes constraints compiled by compile_constraint (Engine.options does it), "
                        f"got {type(grammar).__name__}")
    return grammar.matcher()


def masks(matchers: list[RowMatcher | None], vocab_size: int, device: torch.device) -> torch.Tensor | None:
    """(B, V) bool of the tokens each row may take next (every token for a row without a
    matcher); None when no row has one."""
    rows = [(m.m, b) for b, m in enumerate(matchers) if m is not None]
    if not rows:
        return None
    import llguidance.torch as lgt

    global _EXECUTOR
    if _EXECUTOR is None:
        import llguidance as llg
        _EXECUTOR = llg.LLExecutor()
    bits = torch.full((len(matchers), (vocab_size + 31) // 32), -1, dtype=torch.int32)
    lgt.fill_next_token_bitmask_par(_EXECUTOR, rows, bits)
    allowed = ((bits.unsqueeze(-1) >> _SHIFTS) & 1).view(len(matchers), -1)[:, :vocab_size].bool()
    return allowed.to(device, non_blocking=True)


def masked(logits: torch.Tensor, allowed: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
    """logits (N, [T,] V) with -inf where `allowed` (N, [T,] V) is False (`rows`: the rows of
    `allowed` the logits hold); the logits themselves when allowed is None."""
    if allowed is None:
        return logits
    if rows is not None:
        allowed = allowed.index_select(0, rows)
    return logits.masked_fill(~allowed, float("-inf"))
