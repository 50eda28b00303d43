"""`poelm serve` (poelm/serve/) through the real `openai` client against a server in a subprocess
on a free 127.0.0.1 port: results equal `poelm generate`, streaming, stop strings, n, seeds,
32 concurrent requests, PoE modes, logprobs, every bad request, overload, disconnects, SIGTERM,
specialists sharing the base's weights, a delta on the wrong base (refused by the engine process
or in one process) and the HTTP side's models on the meta device.
Run: .venv/bin/pytest -q tests/test_serve.py"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from poelm.cli import main
from poelm.engine import BP_REFUSAL
from poelm.tokenizer import SPECIAL_TOKENS
from test_chat_cli import byte_tokenizer, noisy_model  # noqa: E402  (tests/ is on sys.path, like conftest)

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key"
PROMPT = "Once upon"  # the fixture makes its greedy reply start with "é" (two bytes, two tokens)


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`poelm serve ARGS` in a subprocess; .url, .stop() (SIGTERM) -> exit status."""

    def __init__(self, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "poelm", "serve", *args, "--port", str(self.port), "--threads", "1"],
                                     env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.proc.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        raise RuntimeError("server did not start in 60 s")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def build(tok, seed: int, **overrides):
    return noisy_model(tok, seed, **overrides)


def make_reply_start_with_e_acute(model, tok) -> None:
    """Copy (x1.05) lm_head rows so greedy on PROMPT answers 0xC3 0xA9 ("é") first."""
    from poelm.engine import Engine

    engine = Engine(model, tok)
    with torch.no_grad():
        for byte, n in ((0xC3, 1), (0xA9, 2)):
            prev = engine.generate(PROMPT, max_new_tokens=n, stop_token_ids=[]).tokens[n - 1]
            assert prev not in (0xC3, 0xA9)
            model.lm_head.weight[byte] = 1.05 * model.lm_head.weight[prev]
    assert engine.generate(PROMPT, max_new_tokens=4).text.startswith("é")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Directories: a PoE base, a specialist delta on it ("chat"), a delta on another base, a BP model."""
    from poelm.checkpoint import save_model
    from poelm.specialist import attach, base_content_hash, save_delta
    root = tmp_path_factory.mktemp("serve")
    tok = byte_tokenizer(SPECIAL_TOKENS)
    base = build(tok, 0)
    make_reply_start_with_e_acute(base, tok)
    save_model(base, root / "base", tok)
    spec = attach(base, 1)
    with torch.no_grad():
        for p in spec.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    save_delta(spec, root / "chat", "base", base_content_hash(base))
    other = build(tok, 1)
    save_delta(attach(other, 1), root / "wrong", "other", base_content_hash(other))
    save_model(build(tok, 2, poe_mode="none"), root / "bp", tok)
    return root


@pytest.fixture(scope="module")
def server(models):
    srv = Server(str(models / "base"), "--delta", f"chat={models / 'chat'}", "--api-key", KEY, "--max-n", "4",
                 "--max-body-bytes", "65536")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def generate_cli(capsys, *args) -> dict:
    """`poelm generate ... --json` in this process -> its JSON."""
    capsys.readouterr()
    assert main(["generate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def extra(obj, name: str):
    return obj.model_extra[name]


# -----------------------------------------------------------------------------
# Results


def test_models_list_the_base_and_its_specialist(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["base", "base+chat"]


def test_greedy_completion_equals_poelm_generate(client, models, capsys):
    out = client.completions.create(model="base", prompt=PROMPT, max_tokens=12, temperature=0)
    cli = generate_cli(capsys, str(models / "base"), PROMPT, "--max-new-tokens", "12")
    assert out.choices[0].text == cli["text"] and out.choices[0].text.startswith("é")
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(PROMPT) + 1, 12)  # bytes + <|bos|>
    assert extra(out, "poe")["mode"] == "final"


@pytest.mark.parametrize("model,delta", [("base", None), ("base+chat", "chat")])
def test_greedy_chat_equals_poelm_generate_chat(client, models, capsys, model, delta):
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}],
                                         max_tokens=10, temperature=0)
    args = [str(models / "base"), "hello", "--chat", "--max-new-tokens", "10"]
    cli = generate_cli(capsys, *args, *(["--delta", str(models / delta)] if delta else []))
    end = byte_tokenizer(SPECIAL_TOKENS).encode_special("<|assistant_end|>")
    assert out.choices[0].message.content == cli["text"] and out.choices[0].message.role == "assistant"
    assert out.usage.completion_tokens == len(cli["tokens"])
    assert out.choices[0].finish_reason == ("stop" if cli["tokens"][-1] == end else "length")


def test_streaming_deltas_concatenate_to_the_whole_text_and_never_split_a_character(client):
    whole = client.completions.create(model="base", prompt=PROMPT, max_tokens=20, temperature=0).choices[0].text
    chunks = list(client.completions.create(model="base", prompt=PROMPT, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    deltas = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(deltas) == whole and whole.startswith("é")
    # é is held back until its second byte came (no U+FFFD, no half character); a client that falls
    # behind gets the deltas waiting for it joined into one event
    assert deltas[0].startswith("é")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    chat = list(client.chat.completions.create(model="base+chat", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=12, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chat)
    assert chat[0].choices[0].delta.role == "assistant"
    assert text == client.chat.completions.create(model="base+chat", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=12, temperature=0).choices[0].message.content


def test_stream_ends_with_done(server):
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    r = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    events = [line for line in r.text.split("\n\n") if line]
    assert r.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"


def test_stop_strings_cut_the_text(client):
    whole = client.completions.create(model="base", prompt="To be, or", max_tokens=16, temperature=0).choices[0].text
    stop = whole[4:6]
    out = client.completions.create(model="base", prompt="To be, or", max_tokens=16, temperature=0, stop=[stop, "zzz"])
    assert out.choices[0].text == whole[: whole.find(stop)] and out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="base", prompt="To be, or", max_tokens=16, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == out.choices[0].text


def test_n_choices_and_seeds_reproduce(client):
    kw = dict(model="base", prompt="abc", max_tokens=10, temperature=1.0, n=3)
    a = client.completions.create(seed=7, **kw)
    b = client.completions.create(seed=7, **kw)
    c = client.completions.create(seed=8, **kw)
    texts = [ch.text for ch in a.choices]
    assert [ch.index for ch in a.choices] == [0, 1, 2] and len(set(texts)) > 1
    assert texts == [ch.text for ch in b.choices] and texts != [ch.text for ch in c.choices]
    assert a.usage.completion_tokens == 30
    greedy = client.completions.create(model="base", prompt="abc", max_tokens=10, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text


def test_32_concurrent_greedy_requests_equal_their_sequential_results(client, server):
    prompts = [f"prompt {i} " + "xyz"[: i % 4] for i in range(32)]
    lengths = [4 + i % 13 for i in range(32)]  # ragged: rows leave the batch at different steps

    def ask(i: int) -> str:
        return client.completions.create(model="base", prompt=prompts[i], max_tokens=lengths[i], temperature=0).choices[0].text

    sequential = [ask(i) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(ask, range(32)))
    assert concurrent == sequential
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'poelm_requests_total{model="base",status="200"}' in metrics and "poelm_time_to_first_token_seconds" in metrics
    one_row = float(metrics.split('poelm_step_rows_bucket{le="1.0"} ')[1].split()[0])
    steps = float(metrics.split("poelm_step_rows_count ")[1].split()[0])
    assert steps - one_row >= 8  # the concurrent requests did run together


def test_poe_modes_per_request_with_their_stats(client):
    kw = dict(model="base", prompt=PROMPT, max_tokens=12, temperature=0)
    final = client.completions.create(**kw)
    spec = client.completions.create(**kw, extra_body={"poe": {"mode": "speculative", "draft_stage": 0, "gamma": 3}})
    assert spec.choices[0].text == final.choices[0].text  # speculative greedy is token-identical
    poe = extra(spec, "poe")
    assert poe["mode"] == "speculative" and poe["gamma"] == 3 and 0 <= poe["acceptance_rate"] <= 1
    stage = client.completions.create(**kw, extra_body={"poe": {"mode": "stage", "stage": 1}})
    assert extra(stage, "poe")["mean_stages_per_token"] == 2
    logop = client.completions.create(**kw, extra_body={"poe": {"mode": "logop", "stages": [0, 3]}})
    assert extra(logop, "poe")["mean_stages_per_token"] == 4
    head = client.completions.create(**{**kw, "model": "base+chat"}, extra_body={"poe": {"head_mode": "base"}})
    assert head.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError, match="WAND needs calibrated swing bounds"):
        client.completions.create(**kw, extra_body={"poe": {"mode": "wand"}})
    with pytest.raises(openai.BadRequestError, match="draft stage 3 is out of range"):
        client.completions.create(**kw, extra_body={"poe": {"mode": "speculative", "draft_stage": 3}})


def test_logprobs(client):
    out = client.completions.create(model="base", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 6 and lp.tokens[0] == "\ufffd"  # 0xC3 alone
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 2 and chosen == pytest.approx(max(top.values())) and chosen <= 0  # texts may coincide
    chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 3 and c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)
    with pytest.raises(openai.BadRequestError, match="logprobs are reported in poe modes"):
        client.completions.create(model="base", prompt="a", max_tokens=2, logprobs=1,
                                  extra_body={"poe": {"mode": "speculative"}})


# -----------------------------------------------------------------------------
# Bad input


BAD = [  # (body or raw bytes, status, words in the message)
    ({"model": "nope", "prompt": "a"}, 404, "model 'nope' does not exist"),
    ({"model": "base", "prompt": "a", "max_tokens": -1}, 400, "max_tokens must lie in 1..128"),
    ({"model": "base", "prompt": "a" * 200}, 400, "the context holds 128"),
    (b'{"model": "base", "prompt": ', 400, "not valid JSON"),
    (b'[1, 2]', 400, "must be a JSON object"),
    ({"model": "base", "prompt": "a", "max_tokens": "10"}, 400, "max_tokens: Input should be a valid integer"),
    ({"model": "base", "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"model": "base", "prompt": 5}, 400, "prompt"),
    ({"model": "base"}, 400, "missing required field 'prompt'"),
    ({"prompt": "a"}, 400, "missing required field 'model'"),
    ({"model": "base", "prompt": "a", "n": 9}, 400, "n must lie in 1..4"),
    ({"model": "base", "prompt": "a", "temperature": -1}, 400, "temperature must be a finite number >= 0"),
    ({"model": "base", "prompt": "a", "top_p": 0}, 400, "top_p must lie in (0, 1]"),
    ({"model": "base", "prompt": "a", "suffix": "x"}, 400, "suffix is not supported"),
    ({"model": "base", "prompt": "a", "tools": []}, 400, "unsupported field 'tools'"),
    ({"model": "base", "prompt": "a", "poe": {"mode": "fast"}}, 400, "poe.mode"),
    ({"model": "base", "prompt": "a", "poe": {"head_mode": "spec"}}, 400, "needs a specialist head"),
    ({"model": "base", "prompt": "a" * 70000}, 413, "limit is 65536"),
]
CHAT_BAD = [
    ({"model": "base", "messages": []}, 400, "messages"),
    ({"model": "base", "messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ({"model": "base", "messages": [{"role": "assistant", "content": "x"}]}, 400, "starts with a user turn"),
    ({"model": "base", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens must lie in 1.."),
    ({"model": "base", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "needs logprobs: true"),
]


@pytest.mark.parametrize("path,body,status,words", [("/v1/completions", *b) for b in BAD] +
                         [("/v1/chat/completions", *b) for b in CHAT_BAD])
def test_bad_requests_answer_one_line_openai_errors(server, path, body, status, words):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers=headers, timeout=30)
    error = r.json()["error"]
    assert r.status_code == status, error
    assert words in error["message"] and "\n" not in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_api_key_required_and_server_healthy_after_bad_requests(server, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.url + "/v1/completions", json={"model": "base", "prompt": "a"}, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # /health needs no key
    assert client.completions.create(model="base", prompt="a", max_tokens=2, temperature=0).usage.completion_tokens == 2
    assert httpx.get(server.url + "/nowhere", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404


@pytest.mark.parametrize("mode", [[], ["--in-process"]], ids=["engine-process", "in-process"])
def test_a_delta_on_the_wrong_base_refuses_at_start_up(models, mode):
    """The engine process finds it (the base's hash needs the weights) and says so over its socket:
    one line from the server, exit 2; in one process, the server's own load finds it."""
    r = subprocess.run([sys.executable, "-m", "poelm", "serve", str(models / "base"), "--delta", f"x={models / 'wrong'}",
                        "--port", str(free_port()), *mode], env=env(), capture_output=True, text=True, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("poelm: error: ") and "is a delta for base" in lines[0]


def test_the_http_side_holds_configs_alone_and_checks_requests_as_the_weights_would(models):
    """Beside an engine process the server loads on the meta device: no parameter or buffer of
    any model has storage, yet configs, cards, tokenizer and request checks are the real load's.
    A delta on the wrong base passes there (its hash needs the weights); the real load refuses it."""
    from poelm.serve.models import load_models

    deltas = {"chat": str(models / "chat")}
    meta = load_models(str(models / "base"), {**deltas, "x": str(models / "wrong")}, name="base", device="meta")
    real = load_models(str(models / "base"), deltas, name="base")
    assert list(meta.models) == ["base", "base+chat", "base+x"]
    for model_id, served in meta.models.items():
        tensors = [*served.model.parameters(), *served.model.buffers()]
        assert tensors and all(t.is_meta for t in tensors), model_id
    for model_id, served in real.models.items():
        held = meta.get(model_id)
        assert held.model.config == served.model.config
        assert {**held.card(), "created": 0} == {**served.card(), "created": 0}
        assert held.engine.tokenizer.vocab_size == served.engine.tokenizer.vocab_size
        for options in (dict(mode="speculative", draft_stage=0, gamma=3), dict(mode="logop", stages=[0, 2])):
            assert held.engine.options(options) == served.engine.options(options)
        for options in (dict(mode="stage", stage=9), dict(mode="wand")):  # out of range, no calibration
            with pytest.raises(ValueError) as theirs:
                served.engine.options(options)
            with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
                held.engine.options(options)
    assert meta.get("base+chat").variant("base").config.head_mode == "base"
    with pytest.raises(ValueError, match="is a delta for base"):
        load_models(str(models / "base"), {"x": str(models / "wrong")}, name="base")


def test_specialists_share_the_frozen_base_weights(models):
    from poelm.serve.models import load_models
    from poelm.specialist import load_with_delta

    registry = load_models(str(models / "base"), {"chat": str(models / "chat")}, name="base")
    base, spec = registry.get("base").model, registry.get("base+chat").model
    ptr = lambda m, name: dict(m.named_parameters())[name].data_ptr()  # noqa: E731
    for name, _ in base.named_parameters():
        if name in ("transformer.wte.weight", "resid_lambdas", "x0_lambdas"):  # the delta's own rows
            assert ptr(spec, name) != ptr(base, name)
        else:
            assert ptr(spec, name) == ptr(base, name), name
    alone, _ = load_with_delta(models / "base", models / "chat")  # the same predictions as a private copy
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(spec(idx), alone(idx))


# -----------------------------------------------------------------------------
# Load and life cycle (a BP server with room for one row and one queued request)


def stream_lines(url: str, body: dict):
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        yield r
        for line in r.iter_lines():
            if line:
                yield line


def test_bp_refusal_overload_disconnect_and_sigterm_drain(models):
    srv = Server(str(models / "bp"), "--max-batch", "1", "--max-queue", "1")
    try:
        r = httpx.post(srv.url + "/v1/completions", json={"model": "bp", "prompt": "a", "poe": {"mode": "speculative"}})
        assert r.status_code == 400
        assert r.json()["error"]["message"] == BP_REFUSAL.format(what="speculative drafting from a stage")
        # overload: one row runs, one request waits, the rest get 503 + Retry-After
        body = {"model": "bp", "prompt": "a", "max_tokens": 120, "temperature": 0}
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: httpx.post(srv.url + "/v1/completions", json=body, timeout=60), range(6)))
        statuses = sorted(a.status_code for a in answers)
        assert statuses.count(200) >= 2 and set(statuses) <= {200, 503} and 503 in statuses
        busy = next(a for a in answers if a.status_code == 503)
        assert busy.headers["Retry-After"] == "1" and "busy" in busy.json()["error"]["message"]
        # a client that disconnects frees its row: a long stream, dropped after its first chunk
        lines = stream_lines(srv.url, {**body, "stream": True})
        next(lines), next(lines)
        lines.close()
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health").json()["running_rows"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(srv.url + "/health").json()["running_rows"] == 0
        # SIGTERM while a stream is in flight: it completes with [DONE], then the server exits
        got: list[str] = []
        lines = stream_lines(srv.url, {**body, "stream": True})
        next(lines)
        got.append(next(lines))
        reader = threading.Thread(target=lambda: got.extend(lines))
        reader.start()
        srv.proc.send_signal(signal.SIGTERM)
        reader.join(60)
        assert got[-1] == "data: [DONE]"  # drained to the end: its last chunk says length (max_tokens)
        assert json.loads(got[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(30) in (0, -signal.SIGTERM)
    finally:
        srv.stop()


# -----------------------------------------------------------------------------
# The scheduler in this process


def test_joins_wait_and_dead_rows_leave_in_one_compaction(models, monkeypatch):
    """Ragged requests in one plain decoder: each equals its own greedy generation, late requests
    join in one prefill, and the rows that finish early leave in fewer compactions than rows."""
    import asyncio

    from poelm.engine.decoders import PlainDecoder
    from poelm.serve.metrics import Metrics
    from poelm.serve.models import load_models
    from poelm.serve.scheduler import Job, Scheduler

    served = load_models(str(models / "base")).models["base"]
    prompts = [f"row {i} " + "ab"[: i % 3] for i in range(8)]
    lengths = [100, 3, 5, 7, 9, 11, 13, 15]
    expected = [served.engine.generate(p, max_new_tokens=n, stop_token_ids=[]).text for p, n in zip(prompts, lengths)]
    calls = {"add_rows": [], "remove_rows": []}
    for name in calls:
        real = getattr(PlainDecoder, name)
        monkeypatch.setattr(PlainDecoder, name, lambda self, arg, *rest, real=real, name=name: calls[name].append(len(arg)) or real(self, arg, *rest))

    async def run() -> list[str]:
        loop = asyncio.get_running_loop()
        scheduler = Scheduler(max_batch=8, max_queue=16, metrics=Metrics(), join_wait_s=0.5)
        scheduler.start()
        jobs = []
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            opts = served.engine.options(dict(max_new_tokens=n, temperature=0, stop_token_ids=[]))
            jobs.append(Job(served, served.model, [served.engine.encode_prompt(p)], opts, set(), loop, stream=True))
            scheduler.submit(jobs[-1])
            if i == 0:  # the first runs alone; the other 7 queue behind it and join it together
                assert (await jobs[0].events.get())[0] == "chunk"
        for job in jobs:
            while (await job.events.get())[0] != "end":
                pass
        scheduler.stop()
        return [job.text(0) for job in jobs]

    assert asyncio.run(run()) == expected
    assert calls["add_rows"] == [1, 7]
    assert calls["remove_rows"] == [4, 2, 1]  # dead rows leave together (not 7 compactions), the last with its decoder


def test_steady_load_keeps_buffers_bounded_and_frees_dropped_decoders_at_once(models):
    """Greedy rows keep joining and leaving one decoder that never empties while seeded requests
    (a decoder each) come and go, with Python's cyclic collector off: each request equals its own
    generation, the greedy decoder's buffers stay within its rows' need (2 x max_batch rows), and
    every decoder the scheduler drops is freed at once by reference counting. (A decoder -> sampler
    -> decoder cycle kept each dropped decoder's KV cache until the cyclic collector ran, which a
    busy engine process seldom does: its memory grew with every dropped decoder.)"""
    import asyncio
    import gc
    import weakref

    from poelm.serve import scheduler as sched
    from poelm.serve.metrics import Metrics
    from poelm.serve.models import load_models

    served = load_models(str(models / "base")).models["base"]
    max_batch, long_n = 4, 120  # the anchor (7 prompt tokens) fills the model's context of 128
    greedy = [(f"join {c}.{i} " + "xy"[: i % 3], 3 + (i + c) % 5) for c in range(2) for i in range(8)]
    seeded = [(f"seed {i}", 6, 10 + i) for i in range(4)]
    expected_long = served.engine.generate("anchor", max_new_tokens=long_n, stop_token_ids=[]).text
    expected = {p: served.engine.generate(p, max_new_tokens=n, stop_token_ids=[]).text for p, n in greedy}
    expected_seeded = {p: served.engine.generate(p, max_new_tokens=n, temperature=1.0, seed=s, stop_token_ids=[]).text
                       for p, n, s in seeded}
    made, greedy_steps = [], []  # weak references to every decoder; (rows, buffer rows) of each greedy step
    clients_done = threading.Event()

    class Watched(sched.Scheduler):
        def _prefill(self, jobs):
            before = {id(b.decoder) for b in self.batches.values()}
            super()._prefill(jobs)
            made.extend(weakref.ref(b.decoder) for b in self.batches.values() if id(b.decoder) not in before)

        def _step(self, batch):
            dec = batch.decoder
            if batch.key[3] is None and len(dec.rows) == 1 and not clients_done.is_set():
                # the anchor alone steps only once the clients are done: it advances at most one step
                # per token of a greedy client row (<= 16 x 7 < long_n) before, so the greedy decoder
                # never empties while they run, at any machine speed
                time.sleep(0.001)
                return
            if batch.key[3] is None:  # the greedy decoder
                greedy_steps.append((len(dec.rows), dec.cache.k[0].untyped_storage().nbytes() // dec.cache.k[0][0].nbytes))
            super()._step(batch)

    async def run() -> dict[str, str]:
        loop = asyncio.get_running_loop()
        scheduler = Watched(max_batch=max_batch, max_queue=16, metrics=Metrics())
        scheduler.start()
        texts = {}

        async def request(prompt: str, **options) -> None:
            opts = served.engine.options(dict(stop_token_ids=[], **options))
            job = sched.Job(served, served.model, [served.engine.encode_prompt(prompt)], opts, set(), loop)
            scheduler.submit(job)
            while (await job.events.get())[0] != "end":
                pass
            texts[prompt] = job.text(0)

        async def client(requests: list[tuple]) -> None:
            for prompt, *options in requests:
                keys = ("max_new_tokens", "seed") if options[1:] else ("max_new_tokens",)
                await request(prompt, **dict(zip(keys, options)), **({"temperature": 1.0} if options[1:] else {}))

        anchor = asyncio.create_task(request("anchor", max_new_tokens=long_n))
        while not scheduler.batches:
            await asyncio.sleep(0.001)
        await asyncio.gather(client(greedy[:8]), client(greedy[8:]), client(seeded))
        clients_done.set()
        await anchor
        scheduler.stop()
        return texts

    gc.disable()
    try:
        texts = asyncio.run(run())
        alive = sum(ref() is not None for ref in made)
    finally:
        gc.enable()
    assert texts == {"anchor": expected_long, **expected, **expected_seeded}
    assert len(made) == 1 + len(seeded)  # the greedy decoder never emptied: every greedy row joined it
    assert len(greedy_steps) >= long_n and all(1 <= rows <= max_batch for rows, _ in greedy_steps)
    assert max(buffer for _, buffer in greedy_steps) <= 2 * max_batch
    assert alive == 0


def test_merge_chunks_joins_each_rows_deltas_in_order():
    from poelm.serve.app import merge_chunks

    payloads = [[(0, 0, "a", ["e1"], None), (1, 0, "x", [], None)], [(0, 1, "é", ["e2", "e3"], None)],
                [(1, 1, "", [], "length"), (0, 2, "b", [], "stop")]]
    assert merge_chunks(payloads) == [(0, 0, "aéb", ["e1", "e2", "e3"], "stop"), (1, 0, "x", [], "length")]


def test_stream_chunk_template_writes_what_sse_of_the_chunk_dict_writes():
    from types import SimpleNamespace

    from poelm.serve.app import Responder, sse

    job = SimpleNamespace(served=SimpleNamespace(id="modèl \"x\"", engine=SimpleNamespace(tokenizer=None)), logprobs=None,
                          poe=None)
    for chat in (False, True):
        r = Responder(job, chat, prompt_tokens=3, include_usage=True)
        head = {"id": r.id, "object": "chat.completion.chunk" if chat else "text_completion", "created": r.created,
                "model": job.served.id}
        for row, delta in [(0, ""), (3, 'a"b\\\n\t'), (12, "é😀\u2028\x00"), (1, " plain")]:
            choice = {"index": row, "logprobs": None, "finish_reason": None}
            if chat:
                choice["delta"] = {"content": delta} if delta else {}
            else:
                choice["text"] = delta
            assert r.chunk(row, 5, delta, [], None) == sse(dict(head, choices=[choice]))
