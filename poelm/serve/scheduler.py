"""Continuous batching: one scheduler thread drives the decoder protocol (poelm/engine) for
every request the server holds.

    scheduler = Scheduler(max_batch=32, max_queue=64, metrics=Metrics()); scheduler.start()
    scheduler.submit(job)          # ApiError(503, Retry-After) when the queue is full
    ... job.events (an asyncio.Queue on the caller's loop) gets ("chunk", ...) / ("end", ...)
    scheduler.stop()               # after the HTTP side has drained

Rows (a request's n choices, for each of its prompts) join and leave the running batch
between steps. Requests that decode the same way share one decoder, so one step is one
batched forward pass for all of them; the key is (model, head mode, PoE mode and its
options, sampling options). A sampled request with a seed gets a decoder (and generator) of
its own, so its output depends on its seed only, never on what else is running; greedy and
unseeded rows with equal options share. Each loop: drop cancelled (client gone) and expired
(per-request timeout) rows, admit queued requests FIFO while the rows fit in max_batch
(prefilled together per decoder), then step every decoder once. A decoder whose rows have all
left is dropped (compiled: kept idle, below). Any error inside a decoder fails that decoder's
requests with 500 (the traceback goes to stderr; a model whose logits are NaN or inf gets one
line naming that instead) and the server goes on. A bug in the loop itself fails every request it holds with 500
at once and ends the loop (later requests 503, /health unhealthy; an engine process exits).

Joining prefills and leaving compacts, so both are batched: while rows are running, queued
requests wait until they fill the free rows or the oldest has waited a time that grows with the
running rows (join_wait_s at a full batch: _join_now), then join in one prefill. In the plain
modes (final/stage/logop, whose rows never affect each other) a finished row stays in the
decoder as a dead row (its tokens are ignored) until a joining row takes its place (only the
joining row's cache is copied), half the rows are dead, or it would reach the context; then all
dead rows leave in one compaction. Rows of a cancelled or expired request leave at once (with
the dead rows). Each loop hands each event loop its requests' events in one call.

With a prefix cache (prefix_cache.py), a joining row reuses the K/V of the longest prefix of
its prompt already computed and prefills only the rest; a leaving row (finished, stopped,
cancelled or expired) leaves the K/V of its prompt and generated tokens there before its
decoder drops it, so a chat's next turn reuses the reply too. With compile (a torch.compile
backend: `poelm serve --compile`), decoders run their compiled steps; every mode keeps finished
rows as dead rows, and before each step a decoder's batch is padded with dead rows to its
bucket (compiled.py), so its graphs are one per bucket, compiled by the warm-up; rows that join
a compiled decoder take the places of its dead rows, so its batch keeps its bucket. A compiled
decoder whose rows have all left stays, idle (one at most), for the next request of its key,
which keeps the first bucket of its dead rows to join into: its cache is not allocated again.
In a server with an engine process (engine_proc.py) this scheduler runs there and its events
become one message per loop.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field, fields

import torch

from poelm.engine import LOGPROB_MODES, DecodeOptions, NonFiniteLogits, Sampler, Collector, make_decoder
from poelm.engine.decoders import RowCounts
from poelm.serve.compiled import PAD_TOKEN, allow_graphs, bucket
from poelm.serve.prefix_cache import PrefixCache, add_rows, cache_row
from poelm.serve.protocol import FINISH_REASONS, ApiError


# DecodeOptions fields that are not the decoder's: applied per row (the Collector), spent on the
# prompt, or the same for every request of a model; and those that matter only when sampling
PER_ROW = {"max_new_tokens", "stop_strings", "seed", "add_bos", "keep_cache", "calibration"}
SAMPLED_ONLY = ("temperature", "top_k", "top_p", "min_p")


def hashable(value):
    """A DecodeOptions value as part of a dict key (lists -> tuples, dicts -> sorted item tuples)."""
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    return tuple(value) if isinstance(value, list) else value


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # (id, logprob), likeliest first


class LogprobSampler(Sampler):
    """The decoder's sampler, also keeping the readout's log-softmax at the picked token and its
    `top` alternatives for each row of the last pick (rows in decoder order); NonFiniteLogits
    rather than a NaN or inf logprob (JSON has no such numbers)."""

    def __init__(self, opts: DecodeOptions, device: torch.device):
        super().__init__(opts, device)
        self.top: int | None = None  # None: nothing recorded
        self.last: list[TokenLogprob] | None = None

    def pick(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        tokens = super().pick(logits, seen)  # (N,)
        self.last = None
        if self.top is not None:
            lp = logits.float().log_softmax(-1)  # (N, V)
            chosen = lp.gather(-1, tokens[:, None])[:, 0].tolist()
            if self.top:
                values, ids = lp.topk(self.top, dim=-1)
                tops = [[(t, x) for t, x in zip(i, v) if x != -math.inf]  # a constraint's masked tokens are no alternatives
                        for i, v in zip(ids.tolist(), values.tolist())]
            else:
                tops = [[] for _ in chosen]
            if not all(math.isfinite(v) for v in chosen + [v for top in tops for _, v in top]):
                raise NonFiniteLogits()
            self.last = [TokenLogprob(t, c, top) for t, c, top in zip(tokens.tolist(), chosen, tops)]
        return tokens


@dataclass(eq=False)
class Job:
    """One HTTP request: rows = its prompts' ids, each repeated n times (choices in order)."""

    served: object  # poelm.serve.models.ServedModel
    model: object  # the GPT to decode with (a head-mode variant of served.model)
    rows: list[list[int]]
    opts: DecodeOptions  # validated; max_new_tokens and stop_strings apply per row
    stop_ids: set[int]
    loop: asyncio.AbstractEventLoop
    stream: bool = False
    logprobs: int | None = None  # None: off, else the number of alternatives
    timeout_s: float = 600.0
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # set by the HTTP side when the client goes away

    def __post_init__(self):
        self.t_submit = time.monotonic()
        self.deadline = self.t_submit + self.timeout_s
        self.t_first: float | None = None
        self.t_last: float | None = None  # when its rows last got tokens
        self.collector = Collector(len(self.rows), self.opts, self.served.engine.tokenizer, self.stop_ids)
        self.sent = [""] * len(self.rows)  # text already streamed per row
        self.sent_entries = [0] * len(self.rows)  # logprob entries already streamed per row
        self.entries: list[list[TokenLogprob]] = [[] for _ in self.rows]
        self.handles: dict[int, int] = {}  # decoder handle -> row
        self.live = 0  # rows still in the decoder
        self.batch: Batch | None = None
        self.counts = RowCounts()  # the decoder's counters of this job's rows that left (its poe statistics)
        self.decoded = 0  # tokens the decoder produced for those rows
        self.poe: dict | None = None
        self.done = False

    @property
    def key(self) -> tuple:
        o = self.opts
        sampler = None if o.greedy else (*(getattr(o, f) for f in SAMPLED_ONLY), id(self) if o.seed is not None else None)
        decoder = tuple(hashable(getattr(o, f.name)) for f in fields(DecodeOptions)
                        if f.name not in PER_ROW and f.name not in SAMPLED_ONLY)
        return (self.served.id, self.model.config.head_mode, decoder, sampler)

    def finish_reason(self, row: int) -> str:
        return FINISH_REASONS[self.collector.reason[row]]

    def text(self, row: int) -> str:
        return self.collector.text(row) or ""

    def logprob_entries(self, row: int) -> list[TokenLogprob]:
        n = len(self.collector.tokens[row])
        if self.collector.reason[row] == "stop_token":
            n -= 1  # the stop token is not part of the text
        return self.entries[row][:n]


@dataclass
class Batch:
    """One decoder and the rows of the jobs it runs."""

    key: tuple
    decoder: object
    rows: dict[int, tuple[Job, int]] = field(default_factory=dict)  # handle -> (job, row), live rows
    lazy: bool = False  # finished rows stay as dead rows until one compaction (plain modes)
    dead: set[int] = field(default_factory=set)  # handles of rows still in the decoder whose job left
    idle: bool = False  # every row left and the decoder stays, all rows dead, for its key's next request
    keeps_idle: bool = False  # it may (compiled, and its key is not one seeded request's own): _idle


def decoder_error(e: Exception, doing: str) -> ApiError:
    """The 500 of the requests of a decoder that raised: non-finite logits are the model's fault
    (one line on stderr, the message names it), anything else is a bug (its traceback)."""
    if isinstance(e, NonFiniteLogits):
        print(f"poelm serve: {e}", file=sys.stderr, flush=True)
        return ApiError(500, str(e), code="non_finite_logits")
    traceback.print_exc()
    return ApiError(500, f"internal error while {doing}: {type(e).__name__}: {e}")


def check_rows(rows: int, max_batch: int) -> None:
    """ApiError(400) for a request of more rows (prompts x n) than one batch holds."""
    if rows > max_batch:
        raise ApiError(400, f"this request needs {rows} rows (prompts x n) but the server runs at most "
                       f"{max_batch} (--max-batch); lower n or send fewer prompts", param="n")


def stream_chunk(job: Job, rows: list[int]) -> list[tuple]:
    """What rows of a streamed job add since the last chunk: the payload of one ("chunk", ...)
    event, [(row, text offset, text delta, logprob entries, finish reason or None)] (may be empty)."""
    col, chunk = job.collector, []
    for row in rows:
        finished = col.reason[row] is not None
        text = (col.text(row) if finished else col.stable_text(row)) or ""
        start = len(job.sent[row])
        delta = text[start:] if text.startswith(job.sent[row]) else ""
        job.sent[row] += delta
        entries = (job.logprob_entries(row) if finished else job.entries[row])[job.sent_entries[row]:]
        job.sent_entries[row] += len(entries)
        if delta or entries or finished:
            chunk.append((row, start, delta, entries, job.finish_reason(row) if finished else None))
    return chunk


def deliver(items: list[tuple[Job, tuple]]) -> None:
    """On the event loop: put each event on its job's queue."""
    for job, event in items:
        job.events.put_nowait(event)


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int, metrics, retry_after_s: int = 1, join_wait_s: float = 0.05,
                 prefix_cache: PrefixCache | None = None, compile: str | None = None):
        if max_batch < 1 or max_queue < 1:  # a request always waits in the queue, if only until the next loop
            raise ValueError(f"max_batch and max_queue must be >= 1 (--max-batch, --max-queue), got {max_batch} and {max_queue}")
        self.max_batch, self.max_queue, self.metrics, self.retry_after_s = max_batch, max_queue, metrics, retry_after_s
        self.join_wait_s = join_wait_s  # the longest a queued request waits for others to join with it (a full batch)
        self.prefix_cache = prefix_cache  # None: every prompt is prefilled whole
        self.compile = compile  # a torch.compile backend: decoders run compiled steps at bucketed batch sizes
        self.cond = threading.Condition()
        self.queue: deque[Job] = deque()
        self.batches: dict[tuple, Batch] = {}
        self.running_rows = 0  # live rows
        self.outbox: list[tuple[Job, tuple]] = []  # events of this loop, handed over once per loop
        self.draining = False
        self.stopping = False
        self.crashed = False  # the loop ended on a bug (_crash)
        self.thread = threading.Thread(target=self._run, name="poelm-scheduler", daemon=True)

    # --- the HTTP side ---------------------------------------------------------
    def start(self) -> None:
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def check_rows(self, rows: int) -> None:
        check_rows(rows, self.max_batch)

    def submit(self, job: Job) -> None:
        self.check_rows(len(job.rows))
        with self.cond:
            if self.draining:
                raise ApiError(503, "the server is shutting down", retry_after=self.retry_after_s)
            if self.crashed:
                raise ApiError(503, "the scheduler stopped on an internal error (its traceback is in the server's "
                               "log): restart the server")
            if len(self.queue) >= self.max_queue:
                self.metrics.rejected.inc()
                raise ApiError(503, f"the server is busy: {self.running_rows} rows running and {len(self.queue)} "
                               "requests queued (--max-queue); retry later", retry_after=self.retry_after_s)
            self.queue.append(job)
            self.metrics.queue_depth.set(len(self.queue))
            self.cond.notify()

    def drain(self) -> None:
        with self.cond:
            self.draining = True

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    def load(self) -> dict:
        return {"running_rows": self.running_rows, "queued": len(self.queue), "decoders": self._running_decoders()}

    def _running_decoders(self) -> int:
        return sum(1 for batch in self.batches.values() if batch.rows)

    # --- the loop --------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._loop()
        except Exception as e:  # a bug in this loop (a decoder's errors are caught per decoder): its traceback
            traceback.print_exc()
            self._crash(ApiError(500, f"internal error in the scheduler: {type(e).__name__}: {e}"))

    def _crash(self, error: ApiError) -> None:
        """After a bug in the loop: every request it holds fails with `error` at once (none waits for
        its timeout), later ones get 503, and the loop's thread ends (/health: unhealthy)."""
        with self.cond:
            self.crashed = True
            jobs = list(self.queue) + list({job: None for b in self.batches.values() for job, _ in b.rows.values()})
            self.queue.clear()
            self.batches.clear()
        for job in jobs:
            self._fail(job, error)
        self._flush()

    def _loop(self) -> None:
        if self.compile is not None:
            allow_graphs(self.max_batch)  # dynamo's settings are per thread
        while True:
            with self.cond:
                while not self.stopping and not self.queue and not any(b.rows for b in self.batches.values()):
                    self.cond.wait()
                if self.stopping:
                    for job in list(self.queue):
                        self._fail(job, ApiError(503, "the server stopped before this request ran"))
                    self.queue.clear()
                    self._flush()
                    return
                admitted = self._admit()
            with torch.inference_mode():
                self._prefill(admitted)
                for batch in list(self.batches.values()):
                    self._drop_gone(batch)
                    if batch.rows:
                        if batch.dead and not batch.dead.isdisjoint(batch.decoder.full_rows()):
                            self._compact(batch)  # a dead row must not step past the context
                        self._pad(batch)
                        self._step(batch)
                    if not batch.rows and not batch.idle:
                        del self.batches[batch.key]
            self._flush()
            self.metrics.batch_rows.set(self.running_rows)
            self.metrics.decoders.set(self._running_decoders())
            running = {job for batch in self.batches.values() for job, _ in batch.rows.values()}
            self.metrics.batch(len(running), len(self.queue), self.running_rows, self.max_batch)

    def _admit(self) -> list[Job]:
        """Pop queued jobs FIFO while their rows fit (under the lock); expired/cancelled ones end."""
        now, admitted = time.monotonic(), []
        for job in list(self.queue):
            if job.cancelled or now > job.deadline:
                self.queue.remove(job)
                self._end_gone(job)
        if self.queue and self.running_rows and not self._join_now(now):
            return admitted
        while self.queue and self.running_rows + len(self.queue[0].rows) <= self.max_batch:
            job = self.queue.popleft()
            self.running_rows += len(job.rows)
            admitted.append(job)
        self.metrics.queue_depth.set(len(self.queue))
        return admitted

    def _join_now(self, now: float) -> bool:
        """Queued requests join running rows once they fill the free rows or the oldest has waited
        join_wait_s x the running share of max_batch: a join's prefill delays every running row's
        next token, and prefilling rows together costs less per token than one by one, so the more
        rows run, the longer queued requests wait to join together (on 2 cores, 8 streaming clients
        were faster joining at once and 32 waiting 50 ms)."""
        queued_rows = sum(len(job.rows) for job in self.queue)
        wait = self.join_wait_s * self.running_rows / self.max_batch
        return queued_rows >= self.max_batch - self.running_rows or now - self.queue[0].t_submit >= wait

    def _prefill(self, jobs: list[Job]) -> None:
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            groups.setdefault(job.key, []).append(job)
        for key, group in groups.items():
            batch = self.batches.get(key)
            try:
                if batch is None:
                    job = group[0]
                    decoder = make_decoder(job.model, job.opts, job.model.config.sequence_len, compile=self.compile)
                    if job.opts.mode in LOGPROB_MODES:
                        rows, decoder.sampler = decoder.sampler.rows, LogprobSampler(job.opts, decoder.device)
                        decoder.sampler.rows = rows
                    lazy = job.opts.mode in LOGPROB_MODES or self.compile is not None
                    seeded = not job.opts.greedy and job.opts.seed is not None  # a key of its own (Job.key)
                    batch = self.batches[key] = Batch(key, decoder, lazy=lazy,
                                                      keeps_idle=self.compile is not None and not seeded)
                new_rows = sum(len(job.rows) for job in group)
                if batch.idle:
                    self._wake(batch, new_rows)
                places = self._free_places(batch, new_rows)
                handles = self._add_rows(batch, [row for job in group for row in job.rows],
                                         [job.opts.constraint for job in group for _ in job.rows])
                if places:  # joining rows take dead rows' places: no copy of the rows that stay
                    batch.decoder.replace_rows(places, handles)
                    batch.dead.difference_update(places)
            except Exception as e:  # a bug or a broken model: its requests fail, the server goes on
                error = decoder_error(e, "prefilling")
                for job in group:
                    self.running_rows -= len(job.rows)
                    self._fail(job, error)
                if batch is not None and not batch.rows:
                    self.batches.pop(key, None)
                continue
            it = iter(handles)
            for job in group:
                job.batch, job.live = batch, len(job.rows)
                for row in range(len(job.rows)):
                    h = next(it)
                    job.handles[h] = row
                    batch.rows[h] = (job, row)
            self._want_logprobs(batch)

    def _free_places(self, batch: Batch, new_rows: int) -> list[int]:
        """The dead rows whose places new_rows joining rows take (the longest first: a batched
        compiled step attends as many key slots as its longest row holds). The decoder never
        grows past max_batch rows: with enough dead rows it keeps its size, else it ends with its
        live rows plus the joining ones, which admission keeps within max_batch."""
        return sorted(batch.dead, key=lambda h: -batch.decoder.row(h).slots)[:new_rows]

    def _add_rows(self, batch: Batch, rows: list[list[int]], grammars: list) -> list[int]:
        """Prefill rows (each with its compiled constraint or None) into a batch's decoder, through
        the prefix cache (its counters go to the metrics)."""
        pc = self.prefix_cache
        before = (pc.queries, pc.hits) if pc is not None else (0, 0)
        handles = add_rows(batch.decoder, rows, pc, batch.key[:2], grammars)
        if pc is not None:
            self.metrics.prefix_cache(pc.queries - before[0], pc.hits - before[1])
        return handles

    def _want_logprobs(self, batch: Batch) -> None:
        sampler = batch.decoder.sampler
        if isinstance(sampler, LogprobSampler):
            wanted = [job.logprobs for job, _ in batch.rows.values() if job.logprobs is not None]
            sampler.top = max(wanted) if wanted else None

    def _drop_gone(self, batch: Batch) -> None:
        """Rows of jobs whose client left or whose time ran out leave the decoder before the step, at
        once (not as dead rows: a cancelled request frees its rows and their cache now)."""
        now = time.monotonic()
        gone = {job for job, _ in batch.rows.values() if job.cancelled or now > job.deadline}
        if gone:
            self._leave(batch, [h for h, (j, _) in batch.rows.items() if j in gone], at_once=True)
        for job in gone:
            self._end_gone(job)

    def _leave(self, batch: Batch, handles: list[int], at_once: bool = False) -> None:
        if not handles:
            return
        for h in handles:
            job, row = batch.rows.pop(h)
            self._cache_row(batch, h, job, row)
            leaving = batch.decoder.row(h)
            job.counts.add(leaving.counts)
            job.decoded += leaving.produced
            job.live -= 1
            self.running_rows -= 1
        if not at_once and batch.lazy and batch.rows and len(batch.dead) + len(handles) < len(batch.rows):
            batch.dead.update(handles)
        elif batch.rows:
            batch.decoder.remove_rows(handles + sorted(batch.dead))
            batch.dead.clear()
        elif not at_once and batch.keeps_idle:
            self._idle(batch, handles)
        # else a decoder without live rows is dropped whole, with its batch
        self._want_logprobs(batch)

    def _idle(self, batch: Batch, handles: list[int]) -> None:
        """Keep a compiled batch whose last rows finished, every row dead, as the one idle decoder for
        its key's next request (an older idle one is dropped): a new decoder would allocate a zeroed
        cache and grow it row by row as requests join (at 32 rows x 512 slots, some 200 MB zeroed and
        copied: a tenth of an engine's time under a closed-loop load whose requests end together)."""
        batch.dead.update(handles)
        batch.idle = True
        for other in [b for b in self.batches.values() if b.idle and b is not batch]:
            del self.batches[other.key]

    def _wake(self, batch: Batch, new_rows: int) -> None:
        """An idle batch takes new_rows joining rows: it keeps the first bucket(new_rows) of its
        dead rows for them (a prefix of its rows: nothing is copied; its cache buffers keep their
        size), so a small request does not step the whole earlier batch."""
        rows = batch.decoder.rows
        size = bucket(min(new_rows, self.max_batch), self.max_batch)
        if size < len(rows):
            batch.decoder.remove_rows([r.handle for r in rows[size:]])
        batch.dead = {r.handle for r in batch.decoder.rows}
        batch.idle = False

    def _cache_row(self, batch: Batch, handle: int, job: Job, row: int) -> None:
        """A leaving row's prompt + generated ids (those its job kept: none past a stop token) go
        to the prefix cache as far as the decoder computed their K/V, for a next turn that repeats them."""
        if self.prefix_cache is not None:
            kept = len(job.rows[row]) + len(job.collector.tokens[row])
            cache_row(batch.decoder, handle, batch.decoder.row(handle).seq[:kept], self.prefix_cache, batch.key[:2])

    def _pad(self, batch: Batch) -> None:
        """Compiled: dead rows fill the decoder's batch up to its bucket (one prefill-free join)."""
        if self.compile is None:
            return
        n = len(batch.decoder.rows)
        missing = bucket(n, self.max_batch) - n
        if missing:
            batch.dead.update(batch.decoder.add_rows([[PAD_TOKEN]] * missing))

    def _compact(self, batch: Batch) -> None:
        """Dead rows leave the decoder (one copy of its cache)."""
        if batch.dead:
            batch.decoder.remove_rows(sorted(batch.dead))
            batch.dead.clear()

    def _step(self, batch: Batch) -> None:
        dec = batch.decoder
        try:
            order = [r.handle for r in dec.rows]
            self.metrics.step_rows.observe(len(batch.rows))
            new = dec.step()
        except Exception as e:  # a bug or a broken model: this decoder's requests fail, the server goes on
            error = decoder_error(e, "decoding")
            jobs = {job for job, _ in batch.rows.values()}
            for job in jobs:
                self.running_rows -= job.live
                job.live = 0
                self._fail(job, error)
            batch.rows.clear()
            dec.rows = []  # the decoder is dropped with its batch
            return
        picked = getattr(dec.sampler, "last", None)
        lps = dict(zip(order, picked)) if picked is not None else {}
        now, full = time.monotonic(), dec.full_rows()
        touched: dict[Job, list[int]] = {}
        leaving = []
        for handle, tokens in new.items():
            if handle in batch.dead:
                continue
            job, row = batch.rows[handle]
            col = job.collector
            before = len(col.tokens[row])
            col.add(row, tokens)
            added = len(col.tokens[row]) - before
            if job.t_first is None:
                job.t_first = now
                self.metrics.first_token(now - job.t_submit)
            elif added and job.t_last is not None:
                self.metrics.next_tokens(now - job.t_last, added)
            if handle in lps and added:
                job.entries[row].append(lps[handle])
            if col.reason[row] is None and handle in full:
                col.reason[row] = "context"
            if col.reason[row] is not None:
                leaving.append(handle)
            touched.setdefault(job, []).append(row)
        for job in touched:
            job.t_last = now
        self._leave(batch, leaving)
        for job in touched:
            self._poe_stats(job, batch)
        for job, rows in touched.items():
            if job.stream:
                self._push_deltas(job, rows)
            if job.live == 0 and not job.done:
                self._end(job)

    def _poe_stats(self, job: Job, batch: Batch) -> None:
        """Once a job's last rows have left the batch: its PoE statistics, its rows' counters."""
        if job.live == 0 and job.poe is None:
            job.poe = batch.decoder.stats.of_rows(job.counts).to_dict(job.decoded)

    def _push_deltas(self, job: Job, rows: list[int]) -> None:
        chunk = stream_chunk(job, rows)
        if chunk:
            self.outbox.append((job, ("chunk", chunk)))

    # --- endings ---------------------------------------------------------------
    def _timeout(self, job: Job) -> ApiError:
        return ApiError(504, f"the request ran past the per-request timeout of {job.timeout_s:g} s (--request-timeout)")

    def _end_gone(self, job: Job) -> None:
        if job.cancelled:
            self._end(job)
        else:
            self._fail(job, self._timeout(job))

    def _end(self, job: Job) -> None:
        if job.done:
            return
        job.done = True
        if not job.cancelled:
            self.metrics.finished(job)
        self.outbox.append((job, ("end", None)))

    def _fail(self, job: Job, error: ApiError) -> None:
        if job.done:
            return
        job.done = True
        self.metrics.failed(job, error.status)
        self.outbox.append((job, ("error", error)))

    def _flush(self) -> None:
        """Hand this loop's events to their event loops: one call per loop, not one per event."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, tuple]]] = {}
        for job, event in self.outbox:
            by_loop.setdefault(job.loop, []).append((job, event))
        self.outbox = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(deliver, items)
