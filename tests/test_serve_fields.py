"""The fields, endpoints and metric names users of vLLM expect of `poelm serve`, through the real
openai client or httpx against a server on 127.0.0.1: continuous_usage_stats, logit_bias, min_p,
stop_token_ids, ignore_eos, min_tokens and presence/frequency penalty (speculative mode too; a
min_tokens above max_tokens is a 400 in the request's names), echo, /tokenize, /detokenize,
max_model_len, /health 503 while loading, poelm:* metrics.
Run: .venv/bin/pytest -q tests/test_serve_fields.py"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from poelm.tokenizer import SPECIAL_TOKENS
from test_chat_cli import byte_tokenizer
from test_serve import Server, build, free_port

PROMPT = "Once upon"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from poelm.checkpoint import save_model

    root = tmp_path_factory.mktemp("fields")
    tok = byte_tokenizer(SPECIAL_TOKENS)
    save_model(build(tok, 0), root / "base", tok)
    return root / "base"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer(SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def server(model_dir):
    srv = Server(str(model_dir), "--name", "base")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def complete(client, **kw):
    return client.completions.create(**{"model": "base", "prompt": PROMPT, "max_tokens": 6, "temperature": 0, **kw})


def error_of(server, body: dict, path: str = "/v1/completions") -> tuple[int, dict]:
    r = httpx.post(server.url + path, json={"model": "base", "prompt": PROMPT, "max_tokens": 4, **body}, timeout=30)
    return r.status_code, r.json()["error"]


def test_continuous_usage_stats_puts_usage_in_every_chunk(client):
    chunks = list(client.completions.create(model="base", prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"stream_options": {"include_usage": True,
                                                                           "continuous_usage_stats": True}}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage is not None and c.usage.prompt_tokens > 0 for c in chunks)
    assert counts == sorted(counts) and counts[-1] == 6
    plain = list(client.completions.create(model="base", prompt=PROMPT, max_tokens=6, temperature=0, stream=True))
    assert all(c.usage is None for c in plain)


def test_logit_bias_forces_a_token_and_refuses_keys_that_are_not_token_ids(server, client, tok):
    a = tok.encode("A")[0]
    assert complete(client, logit_bias={str(a): 100}).choices[0].text == "A" * 6
    for key in ("abc", "99999", "-1"):
        status, error = error_of(server, {"logit_bias": {key: 5}})
        assert status == 400 and error["param"] == "logit_bias" and "is not a token id of this model" in error["message"]


def test_min_p_one_is_greedy(client):
    greedy = complete(client).choices[0].text
    assert complete(client, temperature=1.0, seed=3, extra_body={"min_p": 1.0}).choices[0].text == greedy
    sampled = {complete(client, temperature=5.0, seed=s).choices[0].text for s in range(4)}
    assert sampled != {greedy}  # hot sampling without min_p does wander


def test_stop_token_ids_end_the_choice(client, model_dir):
    from poelm.checkpoint import load_model
    from poelm.engine import Engine

    tokens = Engine(*load_model(str(model_dir))).generate(PROMPT, max_new_tokens=6).tokens  # the server's greedy reply
    stop = tokens[2]
    out = complete(client, extra_body={"stop_token_ids": [stop]})
    assert out.choices[0].finish_reason == "stop" and out.usage.completion_tokens == tokens.index(stop) + 1


def test_ignore_eos_and_min_tokens(server, client, tok):
    bos = tok.bos_token_id
    forced = {str(bos): 100}
    ended = complete(client, logit_bias=forced)
    assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == 1
    on = complete(client, logit_bias=forced, extra_body={"ignore_eos": True})
    assert on.choices[0].finish_reason == "length" and on.usage.completion_tokens == 6
    for poe in ({}, {"poe": {"mode": "speculative", "gamma": 4}}):  # the boundary inside a draft/verify pass
        late = complete(client, logit_bias=forced, extra_body={"min_tokens": 3, **poe})
        assert late.choices[0].finish_reason == "stop" and late.usage.completion_tokens == 4  # 3 masked, then <|bos|>


def test_min_tokens_above_max_tokens_is_a_400_in_the_requests_names(server):
    status, error = error_of(server, {"min_tokens": 5})
    assert status == 400 and error["param"] == "min_tokens"
    assert error["message"] == "min_tokens 5 is above max_tokens 4: give min_tokens <= max_tokens"
    chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "min_tokens": 5}
    for field in ("max_tokens", "max_completion_tokens"):
        r = httpx.post(server.url + "/v1/chat/completions", json={**chat, field: 3}, timeout=30)
        error = r.json()["error"]
        assert r.status_code == 400 and error["param"] == "min_tokens"
        assert error["message"] == f"min_tokens 5 is above {field} 3: give min_tokens <= {field}"


def test_echo_puts_the_prompt_before_the_completion(client, server):
    plain = complete(client).choices[0].text
    assert complete(client, echo=True).choices[0].text == PROMPT + plain
    streamed = "".join(c.choices[0].text for c in complete(client, echo=True, stream=True) if c.choices)
    assert streamed == PROMPT + plain
    status, error = error_of(server, {"echo": True, "logprobs": 1})
    assert status == 400 and error["param"] == "echo"


def test_each_streamed_event_is_one_line_to_clients_that_split_at_unicode_line_breaks(server):
    """httpx's iter_lines (guidellm reads streams with it) splits at U+0085, U+2028 and U+2029 as
    str.splitlines does: text holding them must reach the client escaped, inside one line."""
    prompt = "a\u2028b\x85c\u2029d"
    body = {"model": "base", "prompt": prompt, "max_tokens": 3, "temperature": 0, "echo": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    text = "".join(c["text"] for c in (json.loads(line[6:]) for line in lines[:-1]) for c in c["choices"])
    assert text.startswith(prompt) and len(text) > len(prompt)


def test_presence_and_frequency_penalties(client, server, tok):
    a = tok.encode("A")[0]
    b = tok.encode("B")[0]
    tied = {str(a): 100, str(b): 100}  # the two likeliest tokens by far: the penalties choose between them
    free = complete(client, logit_bias=tied).choices[0].text
    assert len(set(free)) == 1  # greedy repeats its first choice
    alternating = complete(client, logit_bias=tied, presence_penalty=2.0).choices[0].text
    assert set(alternating) == {"A", "B"} and alternating != free
    assert complete(client, logit_bias=tied, frequency_penalty=2.0).choices[0].text.count(free[0]) < 6
    speculative = {"poe": {"mode": "speculative", "gamma": 3}}  # drafts penalised as emitted: plain greedy's text
    assert complete(client, logit_bias=tied, presence_penalty=2.0, extra_body=speculative).choices[0].text == alternating
    mixed = dict(logit_bias=tied, presence_penalty=-0.5, frequency_penalty=1.5)
    assert (complete(client, **mixed, extra_body=speculative).choices[0].text == complete(client, **mixed).choices[0].text)


def test_tokenize_and_detokenize(server, tok):
    r = httpx.post(server.url + "/tokenize", json={"model": "base", "prompt": PROMPT}).json()
    assert r["tokens"] == [tok.bos_token_id] + list(tok.encode(PROMPT)) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == 128 and r["token_strs"] is None
    strs = httpx.post(server.url + "/tokenize", json={"prompt": "ab", "add_special_tokens": False,
                                                      "return_token_strs": True}).json()
    assert strs["token_strs"] == ["a", "b"]
    chat = httpx.post(server.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["count"] > 2 and tok.encode_special("<|assistant_start|>") == chat["tokens"][-1]
    back = httpx.post(server.url + "/detokenize", json={"model": "base", "tokens": r["tokens"][1:]}).json()
    assert back == {"prompt": PROMPT}
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [99999]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_models_give_the_context_length(client):
    card = client.models.list().data[0]
    assert card.model_extra["max_model_len"] == 128


def test_metrics_carry_vllm_names_with_the_poelm_prefix(server, client):
    complete(client, extra_body={"poe": {"mode": "speculative", "gamma": 2}})
    text = httpx.get(server.url + "/metrics").text
    types = {"num_requests_running": "gauge", "num_requests_waiting": "gauge", "kv_cache_usage_perc": "gauge",
             "prompt_tokens": "counter", "generation_tokens": "counter", "time_to_first_token_seconds": "histogram",
             "inter_token_latency_seconds": "histogram", "e2e_request_latency_seconds": "histogram",
             "spec_decode_num_drafts": "counter", "spec_decode_num_draft_tokens": "counter",
             "spec_decode_num_accepted_tokens": "counter"}
    for name, kind in types.items():  # the text format names a counter's family with its _total suffix
        assert f"# TYPE poelm:{name}{'_total' if kind == 'counter' else ''} {kind}" in text, name
    drafts = [line for line in text.splitlines() if line.startswith('poelm:spec_decode_num_draft_tokens_total{')]
    assert drafts and float(drafts[0].split()[-1]) > 0
    assert "poelm_stages_per_token" in text  # poelm's own stay


def test_health_is_503_while_the_models_load(model_dir):
    import uvicorn

    from poelm.serve.app import ServeConfig, create_app
    from poelm.serve.metrics import Metrics
    from poelm.serve.models import ModelRegistry, load_models
    from poelm.serve.scheduler import Scheduler

    registry, metrics = ModelRegistry([], loading=True), Metrics()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(registry, Scheduler(4, 4, metrics), metrics, ServeConfig()),
                                           host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        busy = httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "a"})
        assert busy.status_code == 503 and "loading" in busy.json()["error"]["message"]
        registry.loaded(load_models(str(model_dir), name="base", device=torch.device("cpu")))
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.post(url + "/v1/completions", json={"model": "base", "prompt": "a", "max_tokens": 2}).status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)
