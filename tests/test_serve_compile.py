"""`poelm serve --compile` (poelm/serve/compiled.py): the scheduler's compiled decoders answer
greedy requests like the eager ones in every mode while rows join and leave (a batch of three
live rows runs padded to four), and the warm-up compiles every graph those requests use (none
is compiled after it).

The compiled side uses dynamo's "eager" backend (the traced graphs, run by the same kernels as
eager decoding: guards, recompiles and padding as with inductor, and the warm-up stays short),
on a two-layer model.
Run: .venv/bin/pytest -q tests/test_serve_compile.py"""

from __future__ import annotations

import asyncio

import pytest
import torch

from poelm.engine.registry import MODES
from poelm.serve.compiled import bucket, buckets, graphs_compiled, warm_up
from poelm.tokenizer import SPECIAL_TOKENS
from test_chat_cli import byte_tokenizer, noisy_model  # noqa: E402  (tests/ is on sys.path, like conftest)

BACKEND = "eager"
MAX_BATCH = 4  # buckets 1, 2, 4: three live rows run with one padding row
# every stage tested, exits at the first stage whose gap is positive (the staged WAND step)
CALIBRATION = {"wand_bounds": [0.0, 1.0], "wand_quantile": 0.99, "wand_target": "final", "wand_calibration_tokens": 1}


@pytest.fixture(scope="module")
def served():
    from poelm.engine import Engine
    from poelm.serve.models import ServedModel

    tok = byte_tokenizer(SPECIAL_TOKENS)
    return ServedModel("tiny", Engine(noisy_model(tok, n_layer=2), tok, CALIBRATION))


@pytest.fixture(scope="module")
def warmed(served):
    """The dynamo graphs a greedy warm-up compiles for every mode at every bucket -> their count."""
    from poelm.serve.models import ModelRegistry

    torch._dynamo.reset()
    return warm_up(ModelRegistry([served]), MAX_BATCH, BACKEND, temperatures=(0.0,))


def test_buckets_are_powers_of_two_up_to_max_batch():
    assert buckets(32) == [1, 2, 4, 8, 16, 32]
    assert buckets(6) == [1, 2, 4, 6] and buckets(1) == [1]
    assert [bucket(n, 6) for n in range(1, 7)] == [1, 2, 4, 4, 6, 6]


async def run_jobs(served, mode: str, compile: str | None) -> tuple[list[list[int]], list[int]]:
    """Jobs A (two rows, 8 tokens) and B (one row, 16) start together (three live rows: queued
    before the scheduler starts, so no machine is too slow for B to join A); once A has left, C
    (one row, 5) joins B's running decoder -> every row's tokens, and the decoder sizes seen."""
    from poelm.serve.metrics import Metrics
    from poelm.serve.scheduler import Job, Scheduler

    scheduler = Scheduler(max_batch=MAX_BATCH, max_queue=8, metrics=Metrics(), join_wait_s=0.0, compile=compile)
    sizes: list[int] = []
    step = scheduler._step
    scheduler._step = lambda batch: (sizes.append(len(batch.decoder.rows)), step(batch))
    enc = served.engine.tokenizer.encode

    def job(prompts: list[str], max_new: int) -> Job:
        opts = served.engine.options(dict(mode=mode, temperature=0.0, max_new_tokens=max_new, stop_token_ids=[]))
        return Job(served, served.model, [enc(p) for p in prompts], opts, set(), asyncio.get_running_loop())

    async def ended(j: Job) -> None:
        while True:
            kind, payload = await j.events.get()
            assert kind != "error", payload
            if kind == "end":
                return

    try:
        a, b, c = job(["Once upon a time", "The cat"], 8), job(["A product of experts"], 16), job(["Hello"], 5)
        scheduler.submit(a)
        scheduler.submit(b)
        scheduler.start()
        await ended(a)
        scheduler.submit(c)
        await ended(b)
        await ended(c)
    finally:
        scheduler.stop()
    return [col for j in (a, b, c) for col in j.collector.tokens], sizes


@pytest.mark.parametrize("mode", MODES)
def test_compiled_server_answers_like_the_eager_one_without_compiling_after_warm_up(served, warmed, mode):
    eager, _ = asyncio.run(run_jobs(served, mode, None))
    before = graphs_compiled()
    compiled, sizes = asyncio.run(run_jobs(served, mode, BACKEND))
    assert compiled == eager
    assert [len(t) for t in compiled] == [8, 8, 16, 5]
    assert set(sizes) <= set(buckets(MAX_BATCH)) and 4 in sizes  # three live rows ran padded to four
    assert graphs_compiled() == before  # the warm-up compiled every graph these requests use
    if mode != "wand":  # the staged WAND step runs eagerly
        assert warmed > 0


def test_warm_up_leaves_no_decoder_cache_behind(served):
    """Tracing leaves cyclic garbage holding the warm-up decoders' KV caches (every bucket's rows x
    the context, per mode): the warm-up collects it, so the engine process does not keep that memory
    until Python's cyclic collector next runs. Runs last: it resets dynamo to trace again."""
    import gc

    from poelm.model import KVCache
    from poelm.serve.models import ModelRegistry

    torch._dynamo.reset()
    gc.disable()
    try:
        warm_up(ModelRegistry([served]), 2, BACKEND, temperatures=(0.0,))
        alive = sum(type(o) is KVCache for o in gc.get_objects())  # type(): dynamo's dead weak proxies raise on isinstance
    finally:
        gc.enable()
    assert alive == 0


@pytest.mark.parametrize("mode,compile", [("final", None), ("final", BACKEND), ("speculative", BACKEND)])
def test_a_joining_request_takes_a_finished_rows_place_without_a_compaction(served, warmed, mode, compile):
    """Four rows run (a full bucket) and one finishes, staying as a dead row; a request submitted
    then joins and takes its place: the decoder keeps four rows, none leaves by compaction while
    the others run, and every request gets the tokens it gets alone."""
    from poelm.serve.metrics import Metrics
    from poelm.serve.scheduler import Job, Scheduler

    sizes, compactions, late = [], [], []

    class Watched(Scheduler):
        def _step(self, batch):
            if batch.dead and late:  # the first step with a finished row: the late request arrives
                self.submit(late.pop())
            sizes.append(len(batch.decoder.rows))
            super()._step(batch)

        def _compact(self, batch):
            compactions.append(len(sizes))
            super()._compact(batch)

    texts = ["Once upon a time", "The cat", "A product of experts", "Hello", "Late"]
    lengths = [24, 24, 24, 3, 6]

    async def run() -> list[list[int]]:
        scheduler = Watched(max_batch=MAX_BATCH, max_queue=8, metrics=Metrics(), join_wait_s=0.0, compile=compile)
        loop = asyncio.get_running_loop()
        jobs = [Job(served, served.model, [served.engine.encode_prompt(text)],
                    served.engine.options(dict(mode=mode, temperature=0.0, max_new_tokens=n, stop_token_ids=[])),
                    set(), loop) for text, n in zip(texts, lengths)]
        late.append(jobs[4])
        try:
            for job in jobs[:4]:
                scheduler.submit(job)
            scheduler.start()
            for job in jobs:
                while (await job.events.get())[0] != "end":
                    pass
        finally:
            scheduler.stop()
        return [job.collector.tokens[0] for job in jobs]

    got = asyncio.run(run())
    alone = [served.engine.generate(t, mode=mode, max_new_tokens=n, stop_token_ids=[]).tokens
             for t, n in zip(texts, lengths)]
    assert got == alone
    assert not late  # the late request arrived while a finished row was dead
    assert sizes[:12] == [4] * 12  # the late request (6 tokens) ran in the finished row's place
    assert all(at >= 12 for at in compactions)  # nothing compacted until the short rows were done


@pytest.mark.parametrize("mode", ["final", "speculative"])
def test_a_compiled_decoder_whose_rows_all_left_waits_idle_for_the_next_request(served, warmed, mode):
    """Three requests finish; the compiled decoder stays, idle (its four rows dead, not counted as a
    running decoder), and the next request of the same options joins it: the same decoder and cache
    storage, cut to that request's bucket of one row, and every request gets the tokens it gets alone.
    A seeded request's decoder is its own and is dropped when it ends."""
    from poelm.serve.metrics import Metrics
    from poelm.serve.scheduler import Job, Scheduler

    texts, n = ["Once upon a time", "The cat", "A product of experts", "Hello"], 5
    seen = []

    async def run() -> list[list[int]]:
        scheduler = Scheduler(max_batch=MAX_BATCH, max_queue=8, metrics=Metrics(), join_wait_s=0.0, compile=BACKEND)
        loop = asyncio.get_running_loop()
        opts = served.engine.options(dict(mode=mode, temperature=0.0, max_new_tokens=n, stop_token_ids=[]))
        jobs = [Job(served, served.model, [served.engine.encode_prompt(t)], opts, set(), loop) for t in texts]
        scheduler.start()
        try:
            for job in jobs[:3]:
                scheduler.submit(job)
            for job in jobs[:3]:
                while (await job.events.get())[0] != "end":
                    pass
            await asyncio.sleep(0.05)
            (batch,) = scheduler.batches.values()
            seen.append((batch.idle, len(batch.decoder.rows), scheduler.load()["decoders"]))
            decoder, storage = batch.decoder, batch.decoder.cache.k[0].untyped_storage().data_ptr()
            scheduler.submit(jobs[3])
            while (await jobs[3].events.get())[0] != "end":
                pass
            seen.append((jobs[3].batch is batch, batch.decoder is decoder,
                         decoder.cache.k[0].untyped_storage().data_ptr() == storage, len(decoder.rows)))
            seeded = Job(served, served.model, [served.engine.encode_prompt("Seed")],
                         served.engine.options(dict(mode=mode, temperature=1.0, seed=3, max_new_tokens=2,
                                                    stop_token_ids=[])), set(), loop)
            scheduler.submit(seeded)
            while (await seeded.events.get())[0] != "end":
                pass
            await asyncio.sleep(0.05)
            seen.append(sorted(b.key == seeded.key for b in scheduler.batches.values()))
        finally:
            scheduler.stop()
        return [job.collector.tokens[0] for job in jobs]

    got = asyncio.run(run())
    assert got == [served.engine.generate(t, mode=mode, max_new_tokens=n, stop_token_ids=[]).tokens for t in texts]
    idle, rows, running = seen[0]
    assert idle and running == 0 and rows == (4 if mode == "final" else 1)  # final: all four rows stay, dead
    assert seen[1] == (True, True, True, 1)  # the same decoder and cache storage, cut to one row
    assert seen[2] == [False]  # the seeded request's decoder left; the idle one stays


@pytest.mark.parametrize("mode,compile", [("wand", None), ("speculative", None), ("wand", BACKEND),
                                          ("speculative", BACKEND)])
def test_each_requests_poe_statistics_count_its_own_rows_alone(served, warmed, mode, compile):
    """Two requests of 3 and 12 tokens share one decoder: each one's statistics are its own rows'
    (every WAND token exits once: its exits sum to its tokens; every speculative pass gives the
    accepted drafts plus one token), where a batch-scoped window would give the short request the
    long one's exits too; eager (no padding rows), the two requests' counts sum to the decoder's."""
    from poelm.serve.metrics import Metrics
    from poelm.serve.scheduler import Job, Scheduler

    texts, lengths = ["Once upon a time", "A product of experts"], [3, 12]

    async def run() -> list[Job]:
        scheduler = Scheduler(max_batch=MAX_BATCH, max_queue=8, metrics=Metrics(), join_wait_s=0.0, compile=compile)
        loop = asyncio.get_running_loop()
        jobs = [Job(served, served.model, [served.engine.encode_prompt(t)],
                    served.engine.options(dict(mode=mode, temperature=0.0, max_new_tokens=n, stop_token_ids=[])),
                    set(), loop) for t, n in zip(texts, lengths)]
        for job in jobs:
            scheduler.submit(job)
        scheduler.start()
        try:
            for job in jobs:
                while (await job.events.get())[0] != "end":
                    pass
        finally:
            scheduler.stop()
        return jobs

    jobs = asyncio.run(run())
    assert jobs[0].batch is jobs[1].batch  # they shared a decoder
    for job, n in zip(jobs, lengths):
        assert job.decoded >= n == len(job.collector.tokens[0])
        if mode == "wand":
            assert sum(job.poe["exit_stage_counts"]) == job.decoded
        else:
            assert job.counts.accepted + job.counts.verify_passes == job.decoded
            assert job.poe["verify_passes"] == job.counts.verify_passes and job.poe["accepted"] == job.counts.accepted
    if compile is None:
        total = jobs[0].batch.decoder.stats
        for name in ("layer_passes", "layer_calls", "backfilled", "tests_skipped", "drafted", "accepted", "verify_passes"):
            assert getattr(jobs[0].counts, name) + getattr(jobs[1].counts, name) == getattr(total, name), name
        if mode == "wand":
            assert [a + b for a, b in zip(jobs[0].poe["exit_stage_counts"], jobs[1].poe["exit_stage_counts"])] == \
                total.exit_stage_counts
