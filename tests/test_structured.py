"""Structured output (poelm/engine/constrain.py): a JSON object / JSON Schema / regex / grammar /
choice applied as a token mask in every decoding mode, and through `poelm serve` with the real
openai client (response_format, beta.chat.completions.parse, vLLM's guided_* extras).
Run: .venv/bin/pytest -q tests/test_structured.py"""

from __future__ import annotations

import json
import re

import openai
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from poelm.engine import ConstraintError, DecodeOptions, Engine, OptionError, make_decoder
from poelm.tokenizer import SPECIAL_TOKENS, Tokenizer
from test_serve import KEY, Server, build, models  # noqa: F401  (the served models fixture)


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)
    pet: str = Field(pattern="^(cat|dog|fish)$")


SCHEMA = {"kind": "json_schema", "spec": Person.model_json_schema()}
REGEX = {"kind": "regex", "spec": r"[a-z]{2,5}@[a-z]{1,4}\.(com|org)"}
PROMPTS = ["Once upon", "The cat sat", "x"]
CALIB = {"wand_bounds": [0.0, 9.0, 9.0, 9.0]}  # exit thresholds 27, 18, 9: below a readout's largest gap (30)


@pytest.fixture(scope="module")
def bpe_engine():
    """A tiny random 4-stage model over a BPE tokenizer with merges (tokens span JSON punctuation)."""
    names, pets = ["ann", "bob", "carla", "dmitri", "eve"], ["cat", "dog", "fish"]
    text = [f'{{"name": "{n}", "age": {a}, "pet": "{p}"}} once upon a time the {p} sat with {n}'
            for n in names for p in pets for a in range(10, 90, 7)]
    tok = Tokenizer.train(text, vocab_size=330)
    return Engine(build(tok, 3), tok, calibration=CALIB)


def parse_person(text: str) -> Person:
    return Person.model_validate_json(text)


@pytest.mark.parametrize("options", [dict(mode="final"), dict(mode="stage", stage=1), dict(mode="logop"),
                                     dict(mode="wand"), dict(mode="speculative", gamma=3),
                                     dict(mode="speculative", adaptive_gamma=True),
                                     dict(mode="final", temperature=1.0, top_p=0.9, seed=1),
                                     dict(mode="wand", temperature=1.0, seed=2),
                                     dict(mode="speculative", temperature=1.0, seed=3, gamma=4)])
def test_every_mode_output_matches_the_schema(bpe_engine, options):
    out = bpe_engine.generate(PROMPTS, max_new_tokens=80, constraint=SCHEMA, **options)
    for g in out:
        assert g.stats["stop_reason"] == "stop_token"
        parse_person(g.text)  # raises on a reply that breaks the schema


def test_unconstrained_output_is_not_json(bpe_engine):
    """The mask is what makes the replies above valid: the same model free is not."""
    for g in bpe_engine.generate(PROMPTS, max_new_tokens=30):
        with pytest.raises(ValueError):
            json.loads(g.text)


@pytest.mark.parametrize("constraint", [SCHEMA, REGEX])
@pytest.mark.parametrize("spec", [dict(gamma=1), dict(gamma=4), dict(gamma=6, draft_stage=2), dict(adaptive_gamma=True),
                                  dict(gamma=3, repetition_penalty=1.3)])
def test_speculative_greedy_equals_plain_masked_greedy(bpe_engine, constraint, spec):
    penalty = {"repetition_penalty": spec["repetition_penalty"]} if "repetition_penalty" in spec else {}
    plain = [g.tokens for g in bpe_engine.generate(PROMPTS, max_new_tokens=60, constraint=constraint, **penalty)]
    out = bpe_engine.generate(PROMPTS, max_new_tokens=60, constraint=constraint, mode="speculative", **spec)
    assert [g.tokens for g in out] == plain
    assert out[0].stats["drafted"] > out[0].stats["accepted"]  # drafts were rejected: the matchers rolled back


def test_compiled_decoders_mask_too(bpe_engine):
    """A compiled speculative decoder drafts eagerly while a row is constrained; compiled plain masks its logits."""
    compiled = Engine(bpe_engine.model, bpe_engine.tokenizer, compile="eager")
    plain = [g.tokens for g in bpe_engine.generate(PROMPTS, max_new_tokens=60, constraint=SCHEMA)]
    for mode in ("final", "speculative"):
        assert [g.tokens for g in compiled.generate(PROMPTS, max_new_tokens=60, constraint=SCHEMA, mode=mode)] == plain


def test_speculative_sampling_keeps_to_the_regex(bpe_engine):
    for seed in range(4):
        for g in bpe_engine.generate(PROMPTS, max_new_tokens=40, constraint=REGEX, mode="speculative", gamma=4,
                                     temperature=1.5, seed=seed):
            assert re.fullmatch(REGEX["spec"], g.text), g.text


def test_wand_decides_exits_among_allowed_tokens(bpe_engine):
    """A forced token (one allowed) has no runner-up: it exits at the first tested stage."""
    free = bpe_engine.generate("Once upon", max_new_tokens=12, mode="wand")
    assert free.stats["exit_stage_counts"][0] < 6
    out = bpe_engine.generate("Once upon", max_new_tokens=40, mode="wand", constraint={"kind": "regex", "spec": "hello world"})
    assert out.text == "hello world"
    assert out.stats["exit_stage_counts"][0] >= len(out.tokens) - 1  # all but the stop token (two stop ids allowed)
    full = bpe_engine.generate(PROMPTS, max_new_tokens=60, constraint=SCHEMA, mode="wand", wand_factor=float("inf"))
    assert [g.tokens for g in full] == [g.tokens for g in bpe_engine.generate(PROMPTS, max_new_tokens=60, constraint=SCHEMA)]


def test_grammars_and_choices(bpe_engine):
    gbnf = 'root ::= "yes" | "no" | "maybe"'
    assert bpe_engine.generate("x", max_new_tokens=10, constraint={"kind": "grammar", "spec": gbnf}).text in ("yes", "no", "maybe")
    lark = 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/'
    assert re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", bpe_engine.generate("x", max_new_tokens=30, constraint={"kind": "grammar", "spec": lark}).text)
    assert bpe_engine.generate("x", max_new_tokens=10, constraint={"kind": "choice", "spec": ["red", "green"]}).text in ("red", "green")


def test_max_new_tokens_cuts_a_prefix(bpe_engine):
    whole = bpe_engine.generate("Once upon", max_new_tokens=80, constraint=SCHEMA)
    cut = bpe_engine.generate("Once upon", max_new_tokens=5, constraint=SCHEMA)
    assert cut.stats["stop_reason"] == "max_new_tokens" and cut.tokens == whole.tokens[:5]


def test_rollback_rewinds_the_matcher(bpe_engine):
    """A decoder rolled back 4 tokens generates them again (the matcher is where the row is)."""
    opts = bpe_engine.options(dict(constraint=SCHEMA, max_new_tokens=40))
    dec = make_decoder(bpe_engine.model, opts, 128)
    h = dec.add_rows([bpe_engine.encode_prompt("Once upon")])[0]
    first = [dec.step()[h][0] for _ in range(10)]
    dec.rollback(h, 4)
    assert [dec.step()[h][0] for _ in range(4)] == first[6:]


def test_rows_of_one_decoder_keep_their_own_constraints(bpe_engine):
    """What the server does: a constrained row, a differently constrained one and a free one, one batch."""
    ids = [bpe_engine.encode_prompt(p) for p in PROMPTS]
    grammars = [bpe_engine.options(dict(constraint=c)).constraint for c in (SCHEMA, REGEX)] + [None]
    for opts in (DecodeOptions(max_new_tokens=30), DecodeOptions(mode="speculative", max_new_tokens=30)):
        dec = make_decoder(bpe_engine.model, opts, 128)
        handles = dec.add_rows(ids, grammars)
        got = {h: [] for h in handles}
        while min(len(t) for t in got.values()) < 30:
            for h, new in dec.step().items():
                got[h] += new
        for h, p, c in zip(handles, PROMPTS, (SCHEMA, REGEX, None)):
            alone = bpe_engine.generate(p, max_new_tokens=30, constraint=c, stop_token_ids=[]).tokens if c is None else \
                bpe_engine.generate(p, max_new_tokens=30, constraint=c).tokens
            assert got[h][:len(alone)] == alone
        assert dec.row(handles[1]).matcher.is_done  # the regex row ended its grammar (and took stop ids since)


def test_rows_that_go_on_past_their_end_keep_the_cache_exact(bpe_engine):
    """keep_cache: finished rows step on (only stop ids allowed) and roll back at the end."""
    out = bpe_engine.generate(PROMPTS, max_new_tokens=60, constraint=REGEX, keep_cache=True)
    assert [g.tokens for g in out] == [g.tokens for g in bpe_engine.generate(PROMPTS, max_new_tokens=60, constraint=REGEX)]


@pytest.mark.parametrize("constraint, words", [
    ({"kind": "json_schema", "spec": {"type": "foo"}}, "not a valid JSON schema"),
    ({"kind": "json_schema", "spec": "{not json"}, "not valid JSON"),
    ({"kind": "regex", "spec": "[a-z]+("}, "unclosed group"),
    ({"kind": "grammar", "spec": "start: undefined_rule"}, "not a valid grammar"),
    ({"kind": "yaml", "spec": "x"}, "unknown kind 'yaml'"),
    ({"kind": "choice", "spec": []}, "non-empty list"),
    ("json", "give a Constraint"),
])
def test_bad_constraints_are_one_line_option_errors(bpe_engine, constraint, words):
    with pytest.raises(ConstraintError, match=re.escape(words)) as e:
        bpe_engine.generate("x", constraint=constraint)
    assert e.value.option == "constraint" and "\n" not in str(e.value)


def test_a_constraint_needs_a_tokenizer_and_a_stop_id(bpe_engine):
    with pytest.raises(OptionError, match="needs the model's poelm tokenizer"):
        Engine(bpe_engine.model).generate([1, 2], constraint=REGEX)
    with pytest.raises(OptionError, match="needs a stop token"):
        bpe_engine.generate("x", constraint=REGEX, stop_token_ids=[])


# --- the server, with the real openai client ---------------------------------


@pytest.fixture(scope="module")
def client(models):  # noqa: F811
    srv = Server(str(models / "base"), "--api-key", KEY)
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    srv.stop()


def chat(client, **kw):
    return client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], **{"max_tokens": 80, **kw})


def test_response_format_json_object_and_schema(client):
    out = chat(client, response_format={"type": "json_object"})
    assert isinstance(json.loads(out.choices[0].message.content), dict) and out.choices[0].finish_reason == "stop"
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": Person.model_json_schema(), "strict": True}}
    for poe in ({"mode": "final"}, {"mode": "speculative", "gamma": 3}, {"mode": "logop"}):
        out = chat(client, response_format=fmt, temperature=0.8, n=2, extra_body={"poe": poe})
        for choice in out.choices:
            parse_person(choice.message.content)


def test_beta_parse_gives_the_pydantic_model(client):
    out = client.beta.chat.completions.parse(model="base", messages=[{"role": "user", "content": "who?"}],
                                             response_format=Person, max_tokens=80)
    person = out.choices[0].message.parsed
    assert isinstance(person, Person) and person.pet in ("cat", "dog", "fish")


def test_streamed_json_parses(client):
    stream = chat(client, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}},
                  stream=True)
    parse_person("".join(c.choices[0].delta.content or "" for c in stream if c.choices))


def test_guided_extras_on_both_endpoints(client):
    out = client.completions.create(model="base", prompt="mail:", max_tokens=40, extra_body={"guided_regex": REGEX["spec"]})
    assert re.fullmatch(REGEX["spec"], out.choices[0].text)
    out = chat(client, extra_body={"guided_grammar": 'root ::= "yes" | "no"'})
    assert out.choices[0].message.content in ("yes", "no")
    out = chat(client, extra_body={"guided_choice": ["left", "right"]})
    assert out.choices[0].message.content in ("left", "right")
    out = client.completions.create(model="base", prompt="x", max_tokens=80,
                                    extra_body={"structured_outputs": {"json": Person.model_json_schema()}})
    parse_person(out.choices[0].text)
    out = client.completions.create(model="base", prompt="x", max_tokens=60, logprobs=5,
                                    extra_body={"guided_choice": ["yes", "no"]})
    assert out.choices[0].text in ("yes", "no")  # alternatives the mask removed are not reported as -inf


def test_a_short_max_tokens_finishes_with_length(client):
    out = chat(client, response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": Person.model_json_schema()}},
               max_tokens=4)
    assert out.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema", "not a valid JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}}, "response_format.json_schema", "needs json_schema.schema"),
    ({"guided_regex": "(", "guided_choice": ["a"]}, "guided_choice", "give one structured-output field"),
    ({"guided_regex": "[a-"}, "guided_regex", "not a valid regex"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "response_format.type"),
])
def test_bad_structured_requests_are_400s_naming_the_field(client, body, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, extra_body=body)
    err = e.value.body
    assert err["param"] == param and words in err["message"] and "\n" not in err["message"]
