"""DecodeOptions declared once (poelm/engine/options.py): every field is a decoding flag of
`poelm generate` / `poelm chat` and a field of the server's requests with the same default, and a
bad value gets the same refusal from the Python API, the CLI and the server.
Run: .venv/bin/pytest -q tests/test_decode_options.py"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

import httpx
import pytest

from poelm.cli import main
from poelm.cli.main import build_parser
from poelm.engine import DecodeOptions, Engine, OptionError
from poelm.engine.options import OPENAI, POE, TOP, request_param
from poelm.flags import setting_flag_names
from poelm.serve.protocol import ChatRequest, CompletionRequest, PoeOptions, Sampling
from poelm.tokenizer import SPECIAL_TOKENS
from test_chat_cli import byte_tokenizer
from test_serve import Server, build

FIELDS = {f.name: f for f in fields(DecodeOptions)}


def default_of(f):
    return f.default_factory() if f.default is MISSING else f.default


def flags_of(command: str) -> dict[str, argparse.Action]:
    parser = build_parser(only=command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {a.dest: a for a in sub._actions}


def test_python_only_fields_are_the_calibration_dict_the_returned_cache_and_the_constraint():
    """(a request sets the constraint through response_format / guided_* instead)"""
    assert {n for n, f in FIELDS.items() if f.metadata["request"] is None} == {"calibration", "keep_cache", "constraint"}


@pytest.mark.parametrize("command,max_new_tokens", [("generate", 64), ("chat", 256)])
def test_every_field_is_a_cli_flag_with_its_default(command, max_new_tokens):
    actions = flags_of(command)
    for name, f in FIELDS.items():
        if f.metadata["request"] is None:
            assert name not in actions
            continue
        action = actions[name]
        assert action.option_strings[0] == setting_flag_names(f)[0]
        if name == "max_new_tokens":  # chat answers longer by default
            assert action.default == max_new_tokens
        elif isinstance(action, argparse._AppendAction) or f.default is None:
            assert action.default is None and default_of(f) in (None, [])  # not given: the field's default
        else:
            assert action.default == f.default, name


def test_every_field_is_a_server_field_with_its_default():
    for name, f in FIELDS.items():
        where = f.metadata["request"]
        if where == POE:
            assert PoeOptions.model_fields[name].get_default(call_default_factory=True) == default_of(f), name
        elif where == TOP:
            assert Sampling.model_fields[name].get_default(call_default_factory=True) == default_of(f), name
            assert name in CompletionRequest.model_fields and name in ChatRequest.model_fields
        elif where == OPENAI:  # OpenAI's own name and default (temperature 1, max_tokens 16, ...)
            key = f.metadata.get("request_name", name)
            assert key in CompletionRequest.model_fields and key in ChatRequest.model_fields, name
    assert request_param("gamma") == "poe.gamma" and request_param("top_k") == "top_k"
    assert request_param("max_new_tokens") == "max_tokens" and request_param("stop_strings") == "stop"


def test_a_new_field_needs_no_other_edit():
    """The server's and the CLI's fields are exactly the declared ones (nothing hand-kept beside them)."""
    declared_poe = {n for n, f in FIELDS.items() if f.metadata["request"] == POE}
    assert set(PoeOptions.model_fields) == declared_poe | {"head_mode"}
    declared_top = {n for n, f in FIELDS.items() if f.metadata["request"] == TOP}
    assert declared_top <= set(Sampling.model_fields)
    assert {"logop_alpha", "adaptive_gamma", "draft_threshold", "adaptive", "adaptive_probe",
            "stop_strings"} <= set(flags_of("generate"))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from poelm.checkpoint import save_model

    root = tmp_path_factory.mktemp("opts")
    tok = byte_tokenizer(SPECIAL_TOKENS)
    save_model(build(tok, 0), root / "base", tok)
    return root / "base"


@pytest.fixture(scope="module")
def server(model_dir):
    srv = Server(str(model_dir), "--name", "base")
    yield srv
    srv.stop()


# (DecodeOptions field, Python value, CLI text, words of the refusal)
BAD = [
    ("top_k", -1, "-1", "top_k must be an integer >= 0, got -1"),
    ("gamma", 0, "0", "gamma must be an integer in 1..64, got 0"),
    ("min_p", 1.5, "1.5", "min_p must lie in [0, 1]"),
    ("presence_penalty", 3.0, "3", "presence_penalty must lie in [-2, 2]"),
    ("logit_bias", {99999: 1.0}, "99999=1", "logit_bias key 99999 is not a token id of this model"),
    ("min_tokens", 5, "5", "min_tokens 5 is above max_new_tokens 2"),
    ("stop_token_ids", [99999], "99999", "stop_token_ids must be token ids in [0,"),
]


@pytest.mark.parametrize("name,value,text,words", BAD)
def test_a_bad_value_gets_the_same_refusal_everywhere(model_dir, server, capsys, name, value, text, words):
    from poelm.checkpoint import load_model

    model, tok = load_model(str(model_dir))
    mode = "speculative" if FIELDS[name].metadata["request"] == POE else "final"  # a mode that reads the field
    with pytest.raises(OptionError) as python:
        Engine(model, tok).generate("a", max_new_tokens=2, mode=mode, **{name: value})
    message = str(python.value)
    assert words in message and python.value.option == name

    capsys.readouterr()
    flag = setting_flag_names(FIELDS[name])[0]
    assert main(["generate", str(model_dir), "a", "--max-new-tokens", "2", "--mode", mode, flag, text]) == 2
    flags = {f: setting_flag_names(FIELDS[f])[0] for f in FIELDS}
    cli = python.value.said(flags.get) if python.value.template else f"{flag}: {message}"  # it says its flags
    assert capsys.readouterr().err == f"poelm: error: {cli}\n"

    body = {"model": "base", "prompt": "a", "max_tokens": 2}
    json_value = {str(k): v for k, v in value.items()} if isinstance(value, dict) else value
    if FIELDS[name].metadata["request"] == POE:
        body["poe"] = {"mode": mode, name: json_value}
    else:
        body[name] = json_value
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    error = r.json()["error"]
    said = python.value.said(lambda field: request_param(field) or field)  # the server says its request fields
    assert r.status_code == 400 and error["param"] == request_param(name) and error["message"] == said, error
