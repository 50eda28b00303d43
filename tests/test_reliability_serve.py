"""Reliability of `poelm serve` and sampling (issue [14], items 4, 6, 7): idle and half-open
sockets never take the server down, no request value makes it answer 500 or emit NaN, a client
that leaves costs no traceback, and bad flags are one line before the model loads.

A real server runs on 127.0.0.1 (test_serve.Server) under an open-file limit of 800, with
--max-connections 32 and --header-timeout 1.
Run: .venv/bin/pytest -q tests/test_reliability_serve.py"""

from __future__ import annotations

import asyncio
import json
import math
import resource
import socket
import subprocess
import threading
import time
from unittest import mock

import httpx
import pytest
import torch

from poelm.cli import main
from poelm.engine import NonFiniteLogits
from poelm.tokenizer import SPECIAL_TOKENS
from test_chat_cli import byte_tokenizer
from test_serve import Server, build

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}
FILES = 800  # the server's open-file limit: HALF_OPEN sockets would exhaust it without the cap
HALF_OPEN = 1500
LONG = 4000  # tokens of a request that runs for seconds on this model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Directories: a small base (context 128) and a long-context one."""
    from poelm.checkpoint import save_model

    root = tmp_path_factory.mktemp("serve_rel")
    tok = byte_tokenizer(SPECIAL_TOKENS)
    save_model(build(tok, 0), root / "base", tok)
    save_model(build(tok, 0, sequence_len=LONG + 96, n_layer=2), root / "long", tok)
    return root


def nan_engine(models):
    """The base's engine with a NaN weight put in after loading (loading refuses one): NaN logits."""
    from poelm.serve.models import load_models

    served = load_models(str(models / "base")).models["base"]
    with torch.no_grad():
        served.model.lm_head.weight[7, 0] = float("nan")
    return served


def limited_files(files: int):
    """A Popen preexec_fn: the child may open `files` files at most (soft and hard)."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))


@pytest.fixture(scope="module")
def server(models):
    real = subprocess.Popen
    with mock.patch.object(subprocess, "Popen", lambda *a, **kw: real(*a, preexec_fn=limited_files(FILES), **kw)):
        srv = Server(str(models / "long"), "--api-key", KEY, "--max-connections", "32", "--header-timeout", "1")
    srv.err_lines = []
    threading.Thread(target=read_lines, args=(srv.proc.stderr, srv.err_lines), daemon=True).start()
    yield srv
    srv.stop()


def post(server, body, path: str = "/v1/completions", timeout: float = 30) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers={**AUTH, "Content-Type": "application/json"},
                      timeout=timeout)


def stderr_so_far(server) -> str:
    """What the server wrote to stderr until now (a reader thread collects it)."""
    return "".join(server.err_lines)


def read_lines(stream, into: list[str]) -> None:
    for line in stream:
        into.append(line)


def closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(100) == b""
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


# -----------------------------------------------------------------------------
# 4. Idle sockets


def test_half_open_sockets_are_capped_and_closed_while_requests_go_on(server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < HALF_OPEN + 100:
        if hard != resource.RLIM_INFINITY and hard < HALF_OPEN + 100:
            pytest.skip(f"this test opens {HALF_OPEN} sockets; `ulimit -Hn` is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (HALF_OPEN + 100, hard))
    socks = []
    try:
        for _ in range(HALF_OPEN):  # half a request header each, then silence
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty")
            socks.append(s)
        r = post(server, {"model": "long", "prompt": "a", "max_tokens": 2}, timeout=10)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        deadline = time.monotonic() + 10  # --header-timeout 1: every one of them is closed by the server
        while not all(closed_by_peer(s) for s in socks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(closed_by_peer(s) for s in socks)
    finally:
        for s in socks:
            s.close()
    err = stderr_so_far(server)
    assert len(err) < 2000 and "Traceback" not in err and "Too many open files" not in err, err
    assert err.count("connections are open (--max-connections 32)") == 1  # rate-limited, not one per accept


def test_a_trickled_header_or_stalled_body_is_cut_at_the_deadline(server):
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # a byte every 0.3 s never completes
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3 and not closed_by_peer(s):
            try:
                s.sendall(b"X")
            except (BrokenPipeError, ConnectionResetError):
                break
            time.sleep(0.25)
        assert time.monotonic() - t0 < 2.5
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # a whole header, 10 of 100 body bytes
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                  b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
        s.settimeout(5)
        answer = b""
        while b"--header-timeout" not in answer and (part := s.recv(4096)):
            answer += part
    assert answer.startswith(b"HTTP/1.1 408") and b"--header-timeout" in answer


def test_accept_errors_are_one_line_a_minute_with_their_count(capsys):
    from poelm.serve.guard import ConnectionGuard

    guard, loop = ConnectionGuard(max_connections=4, header_timeout_s=1.0), asyncio.new_event_loop()
    context = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
    try:
        for _ in range(1000):
            guard.loop_exception(loop, context)
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Too many open files" in err and "ulimit -n" in err
        guard.log.last["accept"] -= 61  # a minute later
        guard.loop_exception(loop, context)
        assert "(999 more since the last report)" in capsys.readouterr().err
    finally:
        loop.close()


# -----------------------------------------------------------------------------
# 6. No request value makes a 500


def test_tiny_temperature_and_repetition_penalty_decode_like_greedy(server):
    base = {"model": "long", "prompt": "Once upon", "max_tokens": 12}
    greedy = post(server, {**base, "temperature": 0}).json()["choices"][0]["text"]
    for extra in ({"temperature": 1e-300}, {"temperature": 5e-324, "seed": 3}, {"temperature": 1e-300, "n": 3}):
        r = post(server, {**base, **extra})
        assert r.status_code == 200, r.text
        assert [c["text"] for c in r.json()["choices"]] == [greedy] * extra.get("n", 1)
    for extra in ({"temperature": 0.7, "repetition_penalty": 1e-300}, {"temperature": 1e-300, "repetition_penalty": 1e300},
                  {"temperature": 0, "repetition_penalty": 1e-300}):
        r = post(server, {**base, **extra})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0, r.text


BAD = [  # (body, param, words in the message)
    ({"seed": 2 ** 70}, "seed", "seed must be an integer in [-2**63, 2**64)"),
    ({"seed": -(2 ** 63) - 1}, "seed", "seed must be an integer"),
    ({"poe": {"mode": "speculative", "gamma": 1000}}, "poe.gamma", "gamma must be an integer in 1..64"),
    ({"poe": {"mode": "logop", "stages": list(range(100_000))}}, "poe.stages", "logop stages [0, 1, 2"),
    ({"poe": {"mode": "stage", "stage": 9}}, "poe.stage", "stage 9 is out of range"),
    ({"poe": {"head_mode": "spec"}}, "poe.head_mode", "poe.head_mode spec: head_mode=spec needs a specialist head"),
    ({"top_k": -1}, "top_k", "top_k must be an integer >= 0"),
    ({"prompt": ["a"] * 64_999 + [""]}, "n", "this request needs 65000 rows"),  # counted before encoding
]


@pytest.mark.parametrize("extra,param,words", BAD)
def test_bad_values_are_400_naming_the_field_in_a_short_line(server, extra, param, words):
    r = post(server, {"model": "long", "prompt": "a", "max_tokens": 2, **extra})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and words in error["message"], error
    assert len(error["message"]) <= 400 and "\n" not in error["message"]


def test_a_deeply_nested_body_is_a_400_json_error(server):
    for depth in (50_000, 5_000):
        r = post(server, b'{"model": "long", "prompt": ' + b"[" * depth + b"]" * depth + b"}")
        assert r.status_code == 400 and "nests" in r.json()["error"]["message"]


def test_a_client_that_leaves_a_whole_request_costs_no_traceback(server):
    body = json.dumps({"model": "long", "prompt": "a", "max_tokens": LONG, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 10
        while not httpx.get(server.url + "/health").json()["running_rows"] and time.monotonic() < deadline:
            time.sleep(0.02)
    t0 = time.monotonic()  # the row leaves once the server sees the client gone (it alone would run for seconds)
    while httpx.get(server.url + "/health").json()["running_rows"] and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert time.monotonic() - t0 < 2.5
    time.sleep(0.3)
    err = stderr_so_far(server)
    assert "Traceback" not in err and "KeyError" not in err, err
    assert post(server, {"model": "long", "prompt": "a", "max_tokens": 2}).status_code == 200


def test_a_client_that_leaves_while_sending_its_body_costs_no_traceback(server):
    """guidellm closes its in-flight connections when a sweep's time is up, some of them in the
    middle of a request body: the server answers nobody and logs nothing (it raised
    ClientDisconnect through uvicorn's "Exception in ASGI application" traceback)."""
    before = len(stderr_so_far(server))
    for path in ("/v1/completions", "/tokenize"):
        with socket.create_connection(("127.0.0.1", server.port)) as s:  # 10 of 100 body bytes, then gone
            s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n" % path.encode()
                      + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
            time.sleep(0.2)  # the handler is reading the body
    time.sleep(0.3)
    err = stderr_so_far(server)[before:]
    assert "Traceback" not in err and "ClientDisconnect" not in err, err
    assert post(server, {"model": "long", "prompt": "a", "max_tokens": 2}).status_code == 200


def test_nan_logits_are_one_500_error_object_and_never_json_nan(models):
    """In-process: NaN logits end a request's logprobs (greedy) and samples with the 500 naming them."""
    from poelm.serve.app import sse
    from poelm.serve.metrics import Metrics
    from poelm.serve.scheduler import Job, Scheduler

    served = nan_engine(models)

    async def run(stream: bool, logprobs: int | None, temperature: float) -> tuple:
        scheduler = Scheduler(max_batch=4, max_queue=4, metrics=Metrics())
        scheduler.start()
        opts = served.engine.options(dict(max_new_tokens=4, temperature=temperature))
        job = Job(served, served.model, [served.engine.encode_prompt("Once")], opts, set(), asyncio.get_running_loop(),
                  stream=stream, logprobs=logprobs)
        scheduler.submit(job)
        events = [await job.events.get()]
        while events[-1][0] == "chunk":
            events.append(await job.events.get())
        scheduler.stop()
        return events

    for stream, logprobs, temperature in ((True, 2, 0.0), (False, 0, 0.0), (False, None, 0.8)):
        events = asyncio.run(run(stream, logprobs, temperature))
        kind, error = events[-1]
        assert kind == "error" and error.status == 500 and error.code == "non_finite_logits"
        assert "NaN or inf" in error.message and "weights" in error.message
        assert all(math.isfinite(e.logprob) for k, chunk in events if k == "chunk" for *_, entries, _ in chunk
                   for e in entries)
        json.loads(sse(error.body())[len("data: "):])  # valid JSON
    with pytest.raises(ValueError):
        sse({"logprob": float("nan")})


def test_sampler_stays_finite_at_extreme_temperatures_and_penalties():
    from poelm.engine import DecodeOptions, Sampler

    logits = torch.tensor([[1.0, 3.0, -2.0, 3.0, 0.5], [0.0, -1.0, 2.0, 1.0, 0.0]])
    seen = torch.tensor([[True, False, False, True, False], [False, False, True, True, False]])
    for t, rp in ((1e-300, 1.0), (5e-324, 1.0), (1e-300, 1e-300), (0.7, 1e-300), (1e300, 1e300), (1e-300, 1e300)):
        sampler = Sampler(DecodeOptions(temperature=t, repetition_penalty=rp, seed=0), torch.device("cpu"))
        probs = sampler.probs(sampler.penalise(logits, seen))
        assert torch.isfinite(probs).all() and torch.allclose(probs.sum(-1), torch.ones(2)), (t, rp, probs)
    sampler = Sampler(DecodeOptions(temperature=1e-300, seed=0), torch.device("cpu"))
    assert sampler.pick(logits, None).tolist() in ([1, 2], [3, 2])  # the maxima only


# -----------------------------------------------------------------------------
# 7. Flags: one line, before the model loads


def one_line_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("poelm: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("flags,words", [
    (["--port", "70000"], "--port: must be <= 65535"),
    (["--request-timeout", "inf"], "--request-timeout: must be > 0"),
    (["--request-timeout", "-1"], "--request-timeout: must be > 0"),
    (["--max-queue", "0"], "--max-queue: must be >= 1"),
    (["--header-timeout", "0"], "--header-timeout: must be > 0"),
    (["--max-connections", "0"], "--max-connections: must be >= 1"),
    (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' is not an address"),
    (["--max-connections", "100000000"], "--max-connections 100000000 needs"),
])
def test_bad_serve_flags_are_one_line(flags, words, tmp_path, capsys):
    assert words in one_line_error(["serve", str(tmp_path / "no-model"), *flags], capsys)


def test_a_busy_port_is_one_line_before_the_model_loads(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = one_line_error(["serve", str(tmp_path / "no-model"), "--port", str(port)], capsys)
    assert f"--port {port} is in use" in err  # not the missing model: the port is checked first


def test_scheduler_refuses_an_empty_queue():
    from poelm.serve.metrics import Metrics
    from poelm.serve.scheduler import Scheduler

    with pytest.raises(ValueError, match="max_queue must be >= 1"):
        Scheduler(max_batch=4, max_queue=0, metrics=Metrics())


def test_generate_with_extreme_values(models, capsys):
    def generate(*flags) -> str:
        capsys.readouterr()
        assert main(["generate", str(models / "base"), "Once upon", "--max-new-tokens", "8", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)["text"]

    greedy = generate()
    assert generate("--temperature", "1e-300") == greedy
    assert generate("--temperature", "1e-300", "--seed", "5") == greedy
    generate("--temperature", "0.8", "--repetition-penalty", "1e-300")
    err = one_line_error(["generate", str(models / "base"), "a", "--temperature", "0.5", "--seed", str(2 ** 70)], capsys)
    assert "seed must be an integer" in err
    with pytest.raises(NonFiniteLogits, match="logits hold NaN or inf"):  # a ValueError: one line at the CLI
        nan_engine(models).engine.generate("Once", max_new_tokens=4, temperature=0.8)
