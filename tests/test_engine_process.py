"""The engine process of `poelm serve` (poelm/serve/engine_proc.py) and the prefix cache
(poelm/serve/prefix_cache.py): prefix caching gives the same tokens as none in every PoE mode,
reuses a chat's earlier turns and the replies to them (only K/V each mode has completed; a
cancelled row's too), stays within its budget; the engine process answers like the in-process
scheduler, reports its prefix counters, holds the weights the HTTP process does not, and a
crash of it is a 503 and an unhealthy /health, never a hang.
Run: .venv/bin/pytest -q tests/test_engine_process.py"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from poelm.tokenizer import SPECIAL_TOKENS
from test_chat_cli import byte_tokenizer, noisy_model  # noqa: E402  (tests/ is on sys.path, like conftest)

SYSTEM = "You are a terse assistant who answers in one line. Rules: be kind, be brief. "
MODES = {"final": {}, "stage": dict(stage=1), "logop": dict(stages=[0, 2]),
         "wand": dict(wand_factor=0.0), "speculative": dict(draft_stage=0, gamma=3)}

# every stage tested; at wand_factor 0, exits at the first stage whose gap is positive: lazy back-fill on every step
CALIBRATION = {"wand_bounds": [0.0, 1.0, 1.0, 1.0], "wand_quantile": 0.99, "wand_target": "final",
               "wand_calibration_tokens": 1}


def build(tok, seed: int = 0):
    return noisy_model(tok, seed, sequence_len=256)


@pytest.fixture(scope="module")
def served():
    from poelm.engine import Engine
    from poelm.serve.models import ServedModel

    tok = byte_tokenizer(SPECIAL_TOKENS)
    model = build(tok)
    return ServedModel("tiny", Engine(model, tok, CALIBRATION))


async def turn(scheduler, served, ids: list[int], mode: str, max_new: int, poe: dict) -> list[int]:
    """One prompt through a running in-process scheduler -> its new tokens."""
    from poelm.serve.scheduler import Job

    opts = served.engine.options(dict(mode=mode, max_new_tokens=max_new, stop_token_ids=[], **poe))
    job = Job(served, served.model, [ids], opts, set(), asyncio.get_running_loop())
    scheduler.submit(job)
    while True:
        kind, payload = await job.events.get()
        assert kind != "error", payload
        if kind == "end":
            return job.collector.tokens[0]


async def decode(served, prompts: list, mode: str, cache, max_new: int = 12, poe: dict | None = None) -> list[list[int]]:
    """Each prompt through the in-process scheduler, one after the other -> its new tokens. A
    prompt may be a function of the replies so far (a chat's next turn)."""
    from poelm.serve.metrics import Metrics
    from poelm.serve.scheduler import Scheduler

    scheduler = Scheduler(max_batch=8, max_queue=8, metrics=Metrics(), prefix_cache=cache)
    scheduler.start()
    out = []
    try:
        for ids in prompts:
            ids = ids(out) if callable(ids) else ids
            out.append(await turn(scheduler, served, ids, mode, max_new, MODES[mode] if poe is None else poe))
    finally:
        scheduler.stop()
    return out


def chat_prompts(served) -> list[list[int]]:
    """Two users with one system prompt, then the first user's second turn (its first turn a prefix)."""
    enc = served.engine.encode_prompt
    first = enc(SYSTEM + "User: what is a product of experts?")
    return [first, enc(SYSTEM + "User: name a colour."), first + enc("Assistant: many models voting. User: more?",
                                                                     add_bos=False)]


@pytest.mark.parametrize("mode", list(MODES))
def test_prefix_cache_gives_the_same_tokens_in_every_mode(served, mode):
    from poelm.serve.prefix_cache import PrefixCache

    prompts = chat_prompts(served)
    cache = PrefixCache(1 << 24)
    plain = asyncio.run(decode(served, prompts, mode, None))
    cached = asyncio.run(decode(served, prompts, mode, cache))
    assert cached == plain
    # the second user reuses the system prompt's blocks, the second turn the whole first turn
    assert cache.hits >= (len(prompts[0]) - 1) // 16 * 16 + (len(SYSTEM) // 16) * 16
    assert cache.queries == sum(len(p) - 1 for p in prompts)


# WAND at a factor where tokens exit at every stage: some steps back-fill, some leave a lagging tail
TURN_MODES = {**MODES, "wand": dict(wand_factor=0.5)}


def mode_readouts(model, mode: str, poe: dict, ids: list[int]) -> list[tuple[torch.Tensor, float]]:
    """Per position of ids, (readout, threshold) pairs whose top-2 gap decides the greedy token of
    `mode`: the readout it picks from (threshold None: its argmax), and for WAND also each stage's
    exit test up to the exit (the gap against its threshold), all from one full forward pass."""
    from poelm.engine.sampling import logop, top_gap
    from poelm.engine.wand import wand_exit_rule

    with torch.no_grad():
        final, stages = model(torch.tensor([ids]), return_stage_logits=True)
    final, stages = final[0], [z[0] for z in stages]  # (T, V) each
    if mode in ("final", "speculative"):
        return [(final, None)]
    if mode == "stage":
        return [(stages[poe["stage"]], None)]
    if mode == "logop":
        return [(logop([stages[k] for k in poe["stages"]], model.config.poe_alpha), None)]
    thresholds = wand_exit_rule(CALIBRATION["wand_bounds"], poe["wand_factor"])  # the first exit picks
    readouts = stages[:-1] + [final]
    out, exited = [], torch.zeros(len(ids), dtype=torch.bool)
    for z, th in zip(readouts, thresholds):
        gap = top_gap(z)
        exits = (gap > th) & ~exited
        out += [(torch.where(exited[:, None], torch.inf, z), th), (torch.where(exits[:, None], z, torch.inf), None)]
        exited |= exits
    return out


def assert_decisive_turn(model, mode: str, poe: dict, prompt: list[int], tokens: list[int]) -> None:
    """Every greedy decision behind `tokens` wins by more than what computations of other shapes
    change (test_engine's CROSS_SHAPE_BOUND on logits; x4: a log-softmax moves twice a logit,
    Log-OP adds two stages): a cached K/V made by decode steps instead of a prefill changes no token."""
    from test_engine import CROSS_SHAPE_BOUND

    bound = 4 * CROSS_SHAPE_BOUND
    for z, th in mode_readouts(model, mode, poe, prompt + tokens[:-1]):
        if th is not None and math.isinf(th):  # a test every gap passes (or none): no decision
            continue
        z = z[len(prompt) - 1:]
        top2 = z[torch.isfinite(z).all(-1)].topk(2, dim=-1).values  # the positions this readout decides
        gap = top2[:, 0] - top2[:, 1]
        margin = gap if th is None else (gap - th).abs()
        if len(margin):
            assert margin.min().item() > 2 * bound, f"near-tie ({margin.min().item():.2e}) in {mode}: pick another prompt"


@pytest.mark.parametrize("mode", list(TURN_MODES))
def test_a_chats_next_turn_reuses_the_reply_with_the_same_tokens_in_every_mode(served, mode):
    """Turn 2 repeats turn 1's prompt and reply: with the cache it reuses the reply's blocks
    (turn 1's row left them as it finished) and gives the tokens it gives without."""
    from poelm.serve.prefix_cache import BLOCK, PrefixCache

    poe, first = TURN_MODES[mode], chat_prompts(served)[0]
    more = served.engine.encode_prompt(" User: and more?", add_bos=False)
    turns = [first, lambda replies: first + replies[0] + more]
    plain = asyncio.run(decode(served, turns, mode, None, max_new=40, poe=poe))
    cache = PrefixCache(1 << 24)
    cached = asyncio.run(decode(served, turns, mode, cache, max_new=40, poe=poe))
    assert cached == plain
    assert_decisive_turn(served.model, mode, poe, first + plain[0] + more, plain[1])
    hits = cache.hits  # all turn 2's: turn 1 found the cache empty
    through_reply = (len(first) + len(plain[0]) - 1) // BLOCK * BLOCK  # the reply's last token was pending
    assert hits > (len(first) - 1) // BLOCK * BLOCK  # more than the prompt alone
    if mode == "wand":  # its tail whose deeper stages wait for their back-fill is not cached
        assert through_reply - 2 * BLOCK <= hits <= through_reply
    else:
        assert hits == through_reply


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_wand_reports_complete_only_the_positions_its_back_fill_will_not_touch(served, factor):
    """WAND's computed(): positions before its lagging tail are final (a flush leaves their K/V
    bit-identical), every position of the tail is not (the flush writes its deeper layers); at
    factor 0 every token exits at stage 0, so nothing past the prompt is complete."""
    from poelm.engine import make_decoder

    prompt = chat_prompts(served)[0]
    dec = make_decoder(served.model, served.engine.options(dict(mode="wand", wand_factor=factor, max_new_tokens=64)), 256)
    with torch.no_grad():
        h = dec.add_rows([prompt])[0]
        while len(dec.row(h).seq) < len(prompt) + 16 or not max(dec.lag):
            dec.step()
        n, end = dec.computed(h), len(dec.row(h).seq) - 1
        before = dec.kv(h, 0, end)  # (2, layers, heads, end, dim)
        dec.flush()
        after = dec.kv(h, 0, end)
    assert n < end
    assert torch.equal(before[:, :, :, :n], after[:, :, :, :n])
    changed = (before[:, :, :, n:] != after[:, :, :, n:]).transpose(2, 3).flatten(3).any(-1).any(1).any(0)  # (end - n,)
    assert changed.all()
    if factor == 0.0:
        assert n == len(prompt) - 1


def test_speculative_reports_complete_no_rejected_draft(served):
    """Speculative's computed(): the row's own ids up to its pending one, never the rejected
    drafts the verify pass wrote past them."""
    from poelm.engine import make_decoder

    prompt = chat_prompts(served)[0]
    dec = make_decoder(served.model, served.engine.options(dict(mode="speculative", draft_stage=0, gamma=3,
                                                                max_new_tokens=64)), 256)
    rejecting = 0  # passes that rejected a draft: it sits in the slot right past the complete positions
    with torch.no_grad():
        h = dec.add_rows([prompt])[0]
        for _ in range(12):
            refused = dec.stats.drafted - dec.stats.accepted
            dec.step()
            r, n = dec.row(h), dec.computed(h)
            assert n == len(r.seq) - 1
            assert dec.cache.tokens[0, r.pad:r.pad + n].tolist() == r.seq[:n]
            if dec.stats.drafted - dec.stats.accepted > refused:
                rejecting += 1
                assert dec.cache.tokens[0, r.pad + n].item() != r.seq[n]  # greedy: the target's token differs
    assert rejecting > 0


def test_prefix_cache_stays_within_its_budget_and_evicts_the_least_recent(served):
    from poelm.serve.prefix_cache import BLOCK, PrefixCache, add_rows, cache_row
    from poelm.engine import make_decoder

    model = served.model
    opts = served.engine.options(dict(max_new_tokens=4))
    block_bytes = 2 * model.config.n_layer * model.config.n_kv_head * BLOCK * model.config.head_dim * 4
    cache = PrefixCache(3 * block_bytes)
    a, b = list(range(1, 50)), list(range(100, 149))  # 3 full blocks each before the pending token
    dec = make_decoder(model, opts, model.config.sequence_len)
    with torch.no_grad():
        add_rows(dec, [a], cache, ("tiny", None))
        assert cache.bytes == 3 * block_bytes and len(cache.blocks) == 3
        add_rows(dec, [b], cache, ("tiny", None))
    assert cache.bytes <= cache.budget and len(cache.blocks) == 3
    assert cache.lookup(("tiny", None, dec.end_layer), a + [7]) is None  # a's blocks went first
    assert cache.lookup(("tiny", None, dec.end_layer), b + [7]).shape[3] == 3 * BLOCK
    with torch.no_grad():  # b's row generates two more blocks and leaves: its chain is cut from the tail
        for _ in range(2 * BLOCK):
            dec.step()
        row = dec.rows[1]
        cache_row(dec, row.handle, row.seq, cache, ("tiny", None))
    assert cache.bytes <= cache.budget and len(cache.blocks) == 3
    assert cache.lookup(("tiny", None, dec.end_layer), row.seq).shape[3] == 3 * BLOCK
    cache.budget = 5 * block_bytes  # room for it: prompt and generated blocks, all but the pending token
    cache_row(dec, row.handle, row.seq, cache, ("tiny", None))
    assert cache.bytes == cache.budget and cache.lookup(("tiny", None, dec.end_layer), row.seq).shape[3] == 5 * BLOCK
    with pytest.raises(ValueError, match="--kv-cache-bytes"):
        PrefixCache(-1)


def test_a_cancelled_request_leaves_the_decoder_at_once_and_its_tokens_in_the_cache(served):
    """A plain-mode row that finishes stays as a dead row until a compaction; a cancelled one
    leaves now, its cache rows freed, its prompt and the tokens it got so far left in the prefix cache."""
    from poelm.serve.metrics import Metrics
    from poelm.serve.prefix_cache import BLOCK, PrefixCache
    from poelm.serve.scheduler import Job, Scheduler

    cache = PrefixCache(1 << 20)

    async def run() -> tuple[int, int, list[int]]:
        scheduler = Scheduler(max_batch=4, max_queue=4, metrics=Metrics(), prefix_cache=cache)
        scheduler.start()
        opts = served.engine.options(dict(max_new_tokens=200, stop_token_ids=[]))
        jobs = [Job(served, served.model, [served.engine.encode_prompt(f"row {i}")], opts, set(),
                    asyncio.get_running_loop(), stream=True) for i in range(3)]
        for job in jobs:
            scheduler.submit(job)
        for job in jobs:
            assert (await job.events.get())[0] == "chunk"
        while len(jobs[0].collector.tokens[0]) < 2 * BLOCK:  # mid-stream, past a block of its own tokens
            assert (await jobs[0].events.get())[0] == "chunk"
        jobs[0].cancelled = True
        while (await jobs[0].events.get())[0] != "end":
            pass
        with scheduler.cond:
            decoder = jobs[1].batch.decoder
            rows, cache_rows = len(decoder.rows), decoder.cache.k[0].shape[0]
        scheduler.stop()
        return rows, cache_rows, jobs[0].rows[0] + jobs[0].collector.tokens[0]

    rows, cache_rows, ids = asyncio.run(run())
    assert rows == cache_rows == 2
    kv = cache.lookup(("tiny", served.model.config.head_mode, served.model.config.n_layer), ids + [0])
    assert kv.shape[3] == (len(ids) - 1) // BLOCK * BLOCK >= 2 * BLOCK  # all but its pending token


def test_the_engine_side_speaks_json_and_rows_a_stop_string_ended_leave(served):
    """The engine's scheduler over a socket pair: a submit, one message per step with every row's
    tokens, a row the server ended (stop string) gets no more, and the job ends with its PoE stats."""
    import dataclasses
    import socket
    from multiprocessing.connection import Connection

    from poelm.serve.engine_proc import EngineScheduler, Link
    from poelm.serve.metrics import Metrics
    from poelm.serve.models import ModelRegistry

    ours, theirs = socket.socketpair()
    engine, server = Link(Connection(ours.detach())), Link(Connection(theirs.detach()))
    scheduler = EngineScheduler(engine, ModelRegistry([served]), 4, 4, Metrics())
    step = scheduler._step
    scheduler._step = lambda batch: time.sleep(0.005) or step(batch)  # this test reads as fast as it decodes
    scheduler.start()
    opts = served.engine.options(dict(max_new_tokens=200, stop_token_ids=[]))
    enc = served.engine.encode_prompt
    scheduler.accept(json.loads(json.dumps({
        "op": "submit", "id": 7, "model": "tiny", "head_mode": None, "rows": [enc("one"), enc("two")],
        "opts": {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}, "stop_ids": [], "logprobs": None,
        "timeout": 60})))
    try:
        first = server.recv()
        assert first["adm"] == [7] and sorted(r[1] for r in first["t"]) == [0, 1]
        scheduler.finish(7, [0])
        # the steps already sent or running when the finish arrived still carry row 0 (how many
        # depends on the scheduling); once a step without it comes, row 0 never returns
        rows = [sorted(r[1] for r in server.recv()["t"]) for _ in range(40)]
        gone = rows.index([1])
        assert all(r == [0, 1] for r in rows[:gone]) and rows[gone:] == [[1]] * (40 - gone)
        scheduler.finish(7, [1])
        msg = server.recv()
        while not msg["end"]:
            msg = server.recv()
        assert msg["end"][0][0] == 7 and msg["end"][0][1]["mode"] == "final"
    finally:
        scheduler.stop()


def test_a_bug_in_the_scheduler_loop_fails_its_requests_at_once_and_refuses_later_ones(served):
    """A bug outside any decoder (here in the padding step of the loop) ends the scheduler's thread:
    the request it held fails with a 500 naming the error (not a wait for its timeout), the thread
    is no longer alive (/health: unhealthy) and a later submit is a 503."""
    from poelm.serve.metrics import Metrics
    from poelm.serve.protocol import ApiError
    from poelm.serve.scheduler import Job, Scheduler

    class Broken(Scheduler):
        def _pad(self, batch):
            raise RuntimeError("boom")

    async def run():
        scheduler = Broken(max_batch=4, max_queue=4, metrics=Metrics())
        loop = asyncio.get_running_loop()
        job = Job(served, served.model, [served.engine.encode_prompt("one")],
                  served.engine.options(dict(max_new_tokens=4, stop_token_ids=[])), set(), loop)
        scheduler.submit(job)
        scheduler.start()
        kind, error = await asyncio.wait_for(job.events.get(), 30)
        scheduler.thread.join(10)
        return scheduler, kind, error

    scheduler, kind, error = asyncio.run(run())
    assert kind == "error" and error.status == 500
    assert error.message == "internal error in the scheduler: RuntimeError: boom"
    assert not scheduler.alive()
    with pytest.raises(ApiError) as refused:
        scheduler.submit(Job(served, served.model, [[1, 2]], served.engine.options({}), set(), None))
    assert refused.value.status == 503


def test_a_bug_in_the_engine_schedulers_loop_reports_its_requests_then_ends_the_engine(served, monkeypatch):
    """In the engine process the same bug sends its requests' 500s to the server, then ends the
    process (os._exit, recorded here), so the server sees its engine gone."""
    import dataclasses
    import socket
    from multiprocessing.connection import Connection

    from poelm.serve import engine_proc
    from poelm.serve.engine_proc import EngineScheduler, Link
    from poelm.serve.metrics import Metrics
    from poelm.serve.models import ModelRegistry

    exits = []
    monkeypatch.setattr(engine_proc.os, "_exit", exits.append)
    ours, theirs = socket.socketpair()
    engine, server = Link(Connection(ours.detach())), Link(Connection(theirs.detach()))
    scheduler = EngineScheduler(engine, ModelRegistry([served]), 4, 4, Metrics())
    scheduler._pad = lambda batch: 1 / 0
    opts = served.engine.options(dict(max_new_tokens=4, stop_token_ids=[]))
    scheduler.accept({"op": "submit", "id": 3, "model": "tiny", "head_mode": None,
                      "rows": [served.engine.encode_prompt("one")], "stop_ids": [], "logprobs": None, "timeout": 60,
                      "opts": {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}})
    scheduler.start()
    msg = server.recv()
    while not msg["err"]:
        msg = server.recv()
    scheduler.thread.join(10)
    assert msg["err"][0][:3] == [3, 500, "internal error in the scheduler: ZeroDivisionError: division by zero"]
    assert exits == [70]


# -----------------------------------------------------------------------------
# `poelm serve` with its engine process


@pytest.fixture(scope="module")
def model_dir(served, tmp_path_factory):
    from poelm.checkpoint import save_model

    root = tmp_path_factory.mktemp("engine") / "tiny"
    save_model(served.model, root, served.engine.tokenizer)
    return root


def engine_pid(server) -> int:
    children = open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read().split()
    assert len(children) == 1, children
    return int(children[0])


def metric(url: str, name: str) -> float:
    import httpx

    lines = httpx.get(url + "/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name + " "))


def test_engine_process_answers_like_generate_and_reuses_a_chats_earlier_turns(model_dir, served):
    import httpx
    from test_serve import Server

    from poelm.chat import render_prompt

    def expected(messages: list[dict]) -> str:
        ids = render_prompt(served.engine.tokenizer, messages)
        return served.engine.generate(ids, max_new_tokens=10).text

    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "what is a product of experts?"}]
    body = {"model": "tiny", "max_tokens": 10, "temperature": 0}
    srv = Server(str(model_dir))
    try:
        assert engine_pid(srv)  # the default decodes in a child process
        first = httpx.post(srv.url + "/v1/chat/completions", json={**body, "messages": messages}).json()
        turn = messages + [first["choices"][0]["message"], {"role": "user", "content": "and a colour?"}]
        second = httpx.post(srv.url + "/v1/chat/completions", json={**body, "messages": turn}).json()
        assert first["choices"][0]["message"]["content"] == expected(messages)
        assert second["choices"][0]["message"]["content"] == expected([{"role": m["role"], "content": m["content"]}
                                                                       for m in turn])
        # the second turn reuses the first turn's prompt (over 100 tokens) in blocks of 16
        queries, hits = metric(srv.url, "poelm:prefix_cache_queries_total"), metric(srv.url, "poelm:prefix_cache_hits_total")
        assert queries > hits >= 96
        # a stop string ends its row in the server process: one finishing chunk per row, the text cut
        two = {**body, "prompt": ["Once upon", "A product"], "max_tokens": 24}
        texts = [c["text"] for c in httpx.post(srv.url + "/v1/completions", json=two).json()["choices"]]
        at = next(i for i in range(1, len(texts[0]) - 1) if "\ufffd" not in texts[0][i:i + 2] and texts[0][i:i + 2] not in
                  texts[1] and texts[0][i:i + 2] not in texts[0][:i + 1])  # its first occurrence
        stop = texts[0][at:at + 2]
        chunks = [json.loads(line[6:]) for line in
                  httpx.post(srv.url + "/v1/completions", json={**two, "stop": stop, "stream": True}).text.splitlines()
                  if line.startswith("data: {")]
        finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks
                    if c["choices"][0]["finish_reason"]]
        assert sorted(finishes) == [(0, "stop"), (1, "length")]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"][0]["index"] == 0) == texts[0][:at]
        # a client that leaves mid-stream frees its rows
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "prompt": "x", "max_tokens": 200, "stream": True}) as r:
            next(r.iter_lines())
        deadline = time.monotonic() + 5
        while httpx.get(srv.url + "/health").json()["running_rows"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(srv.url + "/health").json()["running_rows"] == 0
        # SIGTERM to the engine alone: it drains and exits, the server says so once and is unhealthy
        os.kill(engine_pid(srv), signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(srv.url + "/health").status_code == 503
    finally:
        assert srv.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its graceful exit
    assert srv.proc.stderr.read().count("the engine process drained and exited after SIGTERM") == 1


def test_a_two_turn_chat_through_the_openai_client_reuses_the_first_reply(model_dir, served):
    """Turn 2 of a chat (the openai client, a real server with its engine process) finds turn 1's
    prompt and reply in the cache, through the reply's last full block. The reply is kept to
    lowercase ASCII (guided_regex) so the chat template re-encodes it to the ids generated (a
    byte tokenizer; see README: a BPE reply re-encodes alike when the model's split is the canonical one)."""
    import openai
    from test_serve import Server

    from poelm.chat import render_prompt
    from poelm.serve.prefix_cache import BLOCK

    tok = served.engine.tokenizer
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "what is a product of experts?"}]
    srv = Server(str(model_dir))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=40, temperature=0,
                                               extra_body={"guided_regex": "[a-z ]{40}"})
        reply = first.choices[0].message.content
        turn = messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and a colour?"}]
        before = metric(srv.url, "poelm:prefix_cache_hits_total")
        second = client.chat.completions.create(model="tiny", messages=turn, max_tokens=10, temperature=0)
        hits = metric(srv.url, "poelm:prefix_cache_hits_total") - before
    finally:
        srv.stop()
    prompt, prompt2 = render_prompt(tok, messages), render_prompt(tok, turn)
    assert prompt2[:len(prompt) + 40] == prompt + tok.encode(reply) and len(reply) == 40  # the ids turn 1 generated
    assert hits == (len(prompt) + 40 - 1) // BLOCK * BLOCK > (len(prompt) - 1) // BLOCK * BLOCK  # its last id was pending
    expected = served.engine.generate(prompt2, max_new_tokens=10)
    assert_decisive_turn(served.model, "final", {}, prompt2, expected.tokens)
    assert second.choices[0].message.content == expected.text


def test_an_engine_crash_is_503_for_requests_in_flight_and_an_unhealthy_server(model_dir):
    import httpx
    from test_serve import Server

    srv = Server(str(model_dir), "--max-batch", "4")
    try:
        body = {"model": "tiny", "prompt": "Once", "max_tokens": 250, "temperature": 0, "n": 2}
        with ThreadPoolExecutor(1) as pool:
            whole = pool.submit(httpx.post, srv.url + "/v1/completions", json=body, timeout=30)
            with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
                lines = r.iter_lines()
                next(lines)
                os.kill(engine_pid(srv), signal.SIGKILL)
                rest = [line for line in lines if line]
            assert whole.result().status_code == 503
        assert rest[-1] == "data: [DONE]" and "engine process exited" in json.loads(rest[-2][6:])["error"]["message"]
        health = httpx.get(srv.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert httpx.post(srv.url + "/v1/completions", json=body).status_code == 503
    finally:
        srv.stop()
    err = srv.proc.stderr.read()
    assert err.count("the engine process exited with code -9") == 1 and "Traceback" not in err, err


def resident_bytes(pid: int) -> int:
    line = next(line for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_the_http_process_holds_no_weights(tmp_path):
    """`poelm serve` of a model of 111 MiB: the engine process holds the weights, the HTTP process
    (configs on the meta device) none. What else differs between the two (the engine's load and
    decode buffers, the server's HTTP stack) is tens of MiB: with a copy of the weights in each
    process their RSS differed by 43 MiB (measured with this model), without one by 165 MiB."""
    import httpx
    from test_serve import Server

    from poelm.checkpoint import save_model
    from poelm.model import GPT, GPTConfig

    tok = byte_tokenizer(SPECIAL_TOKENS)
    model = GPT(GPTConfig(n_layer=4, n_embd=768, n_head=6, vocab_size=tok.vocab_size, sequence_len=64, poe_every=1))
    model.init_weights()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())  # float32
    save_model(model.eval(), tmp_path / "wide", tok)
    del model
    srv = Server(str(tmp_path / "wide"))
    try:
        body = {"model": "wide", "prompt": "Once", "max_tokens": 2, "temperature": 0}
        assert httpx.post(srv.url + "/v1/completions", json=body, timeout=60).status_code == 200
        http, engine = resident_bytes(srv.proc.pid), resident_bytes(engine_pid(srv))
        assert engine - http > weights, f"HTTP {http >> 20} MiB, engine {engine >> 20} MiB, weights {weights >> 20} MiB"
    finally:
        srv.stop()
