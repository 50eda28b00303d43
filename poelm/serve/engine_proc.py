"""The engine process of `poelm serve`: the scheduler and its decoders run in a process of their
own, so HTTP, tokenisation and streaming (the server's process) never wait for the model's GIL.

    engine = EngineProcess(spec, max_batch=32, max_queue=64, metrics=Metrics())   # the HTTP side
    engine.start()       # spawns `python -m poelm.serve.engine_proc FD` (it imports torch meanwhile)
    engine.connect()     # sends it the spec; returns once its models loaded (EngineStartError: refused)
    engine.submit(job)   # the Scheduler's interface: check_rows, submit, drain, stop, alive, load

Messages cross a socket pair as length-prefixed JSON (multiprocessing.connection's framing of
bytes; nothing is pickled). To the engine: {"op": "submit"} (the job's rows and options),
"cancel" (the client left), "finish" (stop strings ended these rows: they leave the batch, and a
job whose rows all ended ends with its PoE statistics), "stop". From the engine, one message per scheduler loop: every row's new
tokens with their logprobs and finish reason ("t"), the jobs admitted from the queue ("adm"),
ended with their PoE statistics ("end") or failed ("err"), the rows of each step ("steps"), the
load and the prefix cache's counters ("pc"). The HTTP side keeps each request's Collector: it
detokenises, cuts stop strings and streams; the engine ends rows at stop tokens, max_tokens and
the context. When the HTTP side falls behind, the messages waiting go to the event loops in one
call, so a stream writes the tokens of several steps at once.

The HTTP side holds its models on the meta device (configs, tokenizers, calibration: no
weights; poelm/serve/models.py). What needs the weights, such as a delta's base hash, the
engine checks while it loads: its first message is {"ready": true}, or {"error": one line} for
bad input found there (EngineStartError: `poelm serve` says the line and exits 2).

If the engine process dies, the HTTP side writes one line, fails every request in flight with a
503 error object and /health answers 503. SIGTERM to the server drains it, then stops the
engine; SIGTERM to the engine alone makes it refuse new work and exit once idle.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from poelm.engine import Collector, DecodeOptions, compile_constraint
from poelm.serve.protocol import ApiError
from poelm.serve.scheduler import Job, Scheduler, TokenLogprob, check_rows, deliver, stream_chunk

POLL_S = 0.05  # how often the HTTP side looks for requests whose client left
MAX_COALESCED = 16  # engine messages handed to the event loops together when the HTTP side fell behind


class EngineStartError(ValueError):
    """The engine process refused its models at start-up: bad input that only the weights show
    (a delta made for another base, a weights file that does not match its config); the message
    is the engine's one line."""


class Link:
    """Length-prefixed JSON messages over a Connection (send_bytes / recv_bytes only: never pickle)."""

    def __init__(self, conn: Connection):
        self.conn, self.lock = conn, threading.Lock()

    def send(self, msg: dict) -> None:
        data = json.dumps(msg, separators=(",", ":")).encode()
        with self.lock:
            self.conn.send_bytes(data)

    def recv(self) -> dict:
        return json.loads(self.conn.recv_bytes())

    def poll(self, timeout: float) -> bool:
        return self.conn.poll(timeout)


# -----------------------------------------------------------------------------
# The HTTP side


class EngineProcess:
    """The Scheduler's interface to a scheduler in an engine process (one per server)."""

    def __init__(self, spec: dict, max_batch: int, max_queue: int, metrics, retry_after_s: int = 1):
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be >= 1 (--max-batch, --max-queue), got {max_batch} and {max_queue}")
        # spec: what the engine loads and runs (model, deltas, name, device, threads, kv_cache_bytes, compile)
        self.spec = dict(spec, max_batch=max_batch, max_queue=max_queue)
        self.max_batch, self.max_queue, self.metrics, self.retry_after_s = max_batch, max_queue, metrics, retry_after_s
        self.lock = threading.Lock()  # jobs and pending, between the event loop and the reader thread
        self.jobs: dict[int, Job] = {}  # in flight, by id
        self.pending: set[int] = set()  # ids sent but not yet admitted into a batch (the queue)
        self.told: set[int] = set()  # ids whose cancel the engine has been sent
        self.ids = itertools.count()
        self.draining = self.stopping = self.dead = False
        self.running_rows = self.decoders = self.queued = 0  # as the engine last said
        self.counted = (0, 0)  # prefix cache queries and hits already in the metrics
        self.proc: subprocess.Popen | None = None
        self.reader = threading.Thread(target=self._read, name="poelm-engine-reader", daemon=True)

    def start(self) -> None:
        """Start the engine process (once): it imports torch while this process reads the models' configs."""
        if self.proc is not None:
            return
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-m", "poelm.serve.engine_proc", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()])
        theirs.close()
        self.link = Link(Connection(ours.detach()))

    def connect(self) -> None:
        """Send the engine its spec and wait until it has loaded its models and compiled their graphs
        (compile; EngineStartError if it refused them, OSError if it exits first)."""
        self.start()
        try:
            self.link.send(self.spec)
            answer = self.link.recv()  # {"ready": true} or {"error": one line}
        except (EOFError, OSError):
            raise OSError(f"the engine process exited with code {self.proc.wait()} while loading the models "
                          "(its error is above)") from None
        if "error" in answer:
            raise EngineStartError(answer["error"])
        self.reader.start()

    def alive(self) -> bool:
        return self.reader.is_alive() and not self.dead

    def check_rows(self, rows: int) -> None:
        check_rows(rows, self.max_batch)

    def submit(self, job: Job) -> None:
        self.check_rows(len(job.rows))
        with self.lock:
            if self.dead:
                raise ApiError(503, "the engine process has stopped; this server answers no requests until restarted")
            if self.draining:
                raise ApiError(503, "the server is shutting down", retry_after=self.retry_after_s)
            waiting = self._waiting()
            if waiting >= self.max_queue:
                self.metrics.rejected.inc()
                raise ApiError(503, f"the server is busy: {self.running_rows} rows running and {waiting} "
                               "requests queued (--max-queue); retry later", retry_after=self.retry_after_s)
            rid = next(self.ids)
            self.jobs[rid] = job
            self.pending.add(rid)
        opts = {f.name: getattr(job.opts, f.name) for f in dataclasses.fields(job.opts)}
        opts["stop_strings"] = []  # cut here, in the HTTP process
        if job.opts.constraint is not None:  # compiled here; the engine compiles its own from the same spec
            c = job.opts.constraint.constraint
            opts["constraint"] = {"kind": c.kind, "spec": c.spec}
        try:
            self.link.send({"op": "submit", "id": rid, "model": job.served.id, "head_mode": job.model.config.head_mode,
                            "rows": job.rows, "opts": opts, "stop_ids": sorted(job.stop_ids), "logprobs": job.logprobs,
                            "timeout": job.timeout_s})
        except OSError:  # the engine just died: the reader fails what was in flight
            with self.lock:
                self.jobs.pop(rid, None)
                self.pending.discard(rid)
            raise ApiError(503, "the engine process has stopped; this server answers no requests until restarted") from None

    def _waiting(self) -> int:
        """The requests in the engine's queue once it has admitted what fits (under the lock): the
        jobs sent but not yet admitted, less those whose rows fit beside the running ones (FIFO)."""
        used = sum(len(job.rows) for rid, job in self.jobs.items() if rid not in self.pending)
        waiting = 0
        for rid, job in self.jobs.items():  # in the order they came
            if rid in self.pending:
                if waiting == 0 and used + len(job.rows) <= self.max_batch:
                    used += len(job.rows)
                else:
                    waiting += 1
        return waiting

    def drain(self) -> None:
        self.draining = True

    def stop(self, timeout: float = 10.0) -> None:
        """After the HTTP side has drained: the engine finishes and exits (killed after timeout)."""
        self.stopping = True
        if self.proc is None:
            return
        if not self.reader.is_alive():  # never started: it has loaded nothing
            self.proc.kill()
            self.proc.wait()
            return
        try:
            self.link.send({"op": "stop"})
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.reader.is_alive():
            self.reader.join(timeout)

    def load(self) -> dict:
        return {"running_rows": self.running_rows, "queued": self.queued, "decoders": self.decoders}

    # --- the reader thread ---------------------------------------------------------
    def _read(self) -> None:
        bye = None
        try:
            while True:
                if self.link.poll(POLL_S):
                    out: list[tuple[Job, tuple]] = []
                    for _ in range(MAX_COALESCED):  # what waits goes to the event loops in one call
                        msg = self.link.recv()
                        bye = msg.get("bye", bye)
                        out += self._apply(msg)
                        if not self.link.poll(0):
                            break
                    self._deliver(out)
                self._tell_gone()
        except (EOFError, OSError):
            pass
        finally:  # a bug here keeps its traceback, and still no request waits forever
            self._gone(bye)

    def _tell_gone(self) -> None:
        """Cancel in the engine the jobs whose client left."""
        with self.lock:
            gone = [rid for rid, job in self.jobs.items() if job.cancelled and rid not in self.told]
            self.told.update(gone)
        for rid in gone:
            self.link.send({"op": "cancel", "id": rid})

    def _apply(self, msg: dict) -> list[tuple[Job, tuple]]:
        """One message of the engine: tokens into the collectors -> the events for the event loops."""
        out: list[tuple[Job, tuple]] = []
        ends = dict(msg.get("end", ()))
        with self.lock:
            self.pending.difference_update(msg.get("adm", ()))
            jobs = {rid: self.jobs.get(rid) for rid in {t[0] for t in msg.get("t", ())} | set(ends)}
        for rid, poe in ends.items():
            if jobs[rid] is not None:
                jobs[rid].poe = poe
        touched = self._tokens(msg.get("t", ()), jobs)
        for job, rows in touched.items():
            if job.stream:
                chunk = stream_chunk(job, rows)
                if chunk:
                    out.append((job, ("chunk", chunk)))
        for rid, job in jobs.items():  # rows a stop string ended here leave the engine's batch
            stopped = [row for row in touched.get(job, ()) if job.collector.reason[row] == "stop_string"]
            if stopped and rid not in ends:
                self.link.send({"op": "finish", "id": rid, "rows": stopped})
        out += self._endings(ends, msg.get("err", ()))
        self._observe(msg)
        return out

    def _tokens(self, rows: list, jobs: dict) -> dict[Job, list[int]]:
        now, touched = time.monotonic(), {}
        for rid, row, tokens, reason, entries in rows:
            job = jobs[rid]
            if job is None or job.collector.reason[row] is not None:  # a stop string ended the row here
                continue
            col = job.collector
            before = len(col.tokens[row])
            col.add(row, tokens)
            added = len(col.tokens[row]) - before
            if reason is not None and col.reason[row] is None:  # the context ended it
                col.reason[row] = reason
            if entries:
                job.entries[row] += [TokenLogprob(t, lp, [tuple(x) for x in top]) for t, lp, top in entries]
            if job.t_first is None and tokens:
                job.t_first = now
                self.metrics.first_token(now - job.t_submit)
            elif added and job.t_last is not None:
                self.metrics.next_tokens(now - job.t_last, added)
            touched.setdefault(job, []).append(row)
        for job in touched:
            job.t_last = now
        return touched

    def _endings(self, ends: dict, errors: list) -> list[tuple[Job, tuple]]:
        out = []
        with self.lock:
            done = [(rid, self.jobs.pop(rid, None)) for rid in ends] + [(e[0], self.jobs.pop(e[0], None)) for e in errors]
            for rid, _ in done:
                self.pending.discard(rid)
                self.told.discard(rid)
        for (rid, job), error in zip(done, [None] * len(ends) + list(errors)):
            if job is None:
                continue
            job.done = True
            if error is None:
                if not job.cancelled:
                    self.metrics.finished(job)
                out.append((job, ("end", None)))
            else:
                _, status, message, param, code, retry_after = error
                self.metrics.failed(job, status)
                out.append((job, ("error", ApiError(status, message, param, code, retry_after))))
        return out

    def _observe(self, msg: dict) -> None:
        if "load" in msg:
            self.running_rows, self.decoders, self.queued, requests = msg["load"]
            self.metrics.batch(requests, self.queued, self.running_rows, self.max_batch)
            self.metrics.batch_rows.set(self.running_rows)
            self.metrics.decoders.set(self.decoders)
            self.metrics.queue_depth.set(self.queued)
        for rows in msg.get("steps", ()):
            self.metrics.step_rows.observe(rows)
        if "pc" in msg:
            queries, hits = msg["pc"]
            self.metrics.prefix_cache(queries - self.counted[0], hits - self.counted[1])
            self.counted = (queries, hits)

    def _deliver(self, items: list[tuple[Job, tuple]]) -> None:
        """One call per event loop, not one per event."""
        by_loop: dict = {}
        for job, event in items:
            by_loop.setdefault(job.loop, []).append((job, event))
        for loop, events in by_loop.items():
            loop.call_soon_threadsafe(deliver, events)

    def _gone(self, bye: str | None) -> None:
        """The engine's end: after stop(), quietly; else one line, and every request in flight fails with 503."""
        self.dead = True
        if self.stopping:
            return
        code = self.proc.wait()
        why = f"drained and exited after {bye}" if bye else f"exited with code {code}"
        print(f"poelm serve: the engine process {why}; requests in flight fail with 503 and /health reports "
              "unhealthy until the server is restarted", file=sys.stderr, flush=True)
        with self.lock:
            jobs, self.jobs = list(self.jobs.values()), {}
            self.pending.clear()
        error = ApiError(503, f"the engine process {why}; this server answers no requests until restarted")
        for job in jobs:
            job.done = True
            self.metrics.failed(job, 503)
        self._deliver([(job, ("error", error)) for job in jobs])


# -----------------------------------------------------------------------------
# The engine side


class Unrecorded:
    """The engine process's metrics: none. The HTTP process keeps the server's (from the messages),
    so what the scheduler reports here would cost CPU per token for nobody: every metric, method
    and update (.labels(...).inc(), .observe(x), .set(x), first_token(s), ...) is a no-op."""

    def __getattr__(self, name: str) -> "Unrecorded":
        return self

    def __call__(self, *args, **kwargs) -> "Unrecorded":
        return self


class RecordingCollector(Collector):
    """A Collector that notes the rows it got tokens for (the next message carries them)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.dirty: set[int] = set()

    def add(self, row: int, new: list[int]) -> None:
        super().add(row, new)
        self.dirty.add(row)


@dataclass(eq=False)
class EngineJob(Job):
    rid: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.collector = RecordingCollector(len(self.rows), self.opts, self.served.engine.tokenizer, self.stop_ids)
        self.sent_tokens = [0] * len(self.rows)
        self.stopped: set[int] = set()  # rows a stop string ended in the server (they leave before the next step)


class EngineScheduler(Scheduler):
    """The scheduler whose events go to the HTTP process, one message per loop."""

    def __init__(self, link: Link, registry, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.link, self.registry = link, registry
        self.jobs: dict[int, EngineJob] = {}
        self.admitted: list[int] = []
        self.steps: list[int] = []

    def accept(self, msg: dict) -> None:
        """A submit message -> a job in the queue (or its error back at once)."""
        served = self.registry.get(msg["model"])
        opts = DecodeOptions(**msg["opts"])
        if opts.logit_bias is not None:  # JSON object keys are strings
            opts.logit_bias = {int(k): v for k, v in opts.logit_bias.items()}
        if opts.constraint is not None:
            opts.constraint = compile_constraint(opts.constraint, served.engine.tokenizer, set(msg["stop_ids"]),
                                                 served.model.config.vocab_size)
        job = EngineJob(served, served.variant(msg["head_mode"]), msg["rows"], opts,
                        set(msg["stop_ids"]), None, logprobs=msg["logprobs"], timeout_s=msg["timeout"], rid=msg["id"])
        try:
            with self.cond:
                self.submit(job)
                self.jobs[job.rid] = job
        except ApiError as e:
            self.link.send({"err": [[job.rid, e.status, e.message, e.param, e.code, e.retry_after]]})

    def cancel(self, rid: int) -> None:
        job = self.jobs.get(rid)
        if job is not None:
            job.cancelled = True

    def finish(self, rid: int, rows: list[int]) -> None:
        with self.cond:
            job = self.jobs.get(rid)
            if job is not None:
                job.stopped.update(rows)

    def idle(self) -> bool:
        with self.cond:
            return not self.queue and not self.batches

    def _admit(self) -> list[Job]:
        jobs = super()._admit()
        self.admitted += [job.rid for job in jobs]
        return jobs

    def _step(self, batch) -> None:
        self.steps.append(len(batch.rows))
        super()._step(batch)

    def _drop_gone(self, batch) -> None:
        """Rows a stop string ended leave like finished rows (their job ends once all did), then
        those of cancelled and expired jobs."""
        with self.cond:
            stopped = {job: job.stopped for job, _ in batch.rows.values() if job.stopped}
            for job in stopped:
                job.stopped = set()
        for job, rows in stopped.items():
            col = job.collector
            for row in rows:
                col.reason[row] = col.reason[row] or "stop_string"
            self._leave(batch, [h for h, (j, row) in batch.rows.items() if j is job and row in rows])
            self._poe_stats(job, batch)
            if job.live == 0:
                self._end(job)
        super()._drop_gone(batch)

    def _crash(self, error: ApiError) -> None:
        """A bug in the loop: its requests' errors go to the server, then this process ends, so the
        server sees its engine gone (/health unhealthy, later requests 503, one log line)."""
        super()._crash(error)
        sys.stderr.flush()
        os._exit(70)

    def _flush(self) -> None:
        with self.cond:
            jobs = list(self.jobs.values())
        rows = []
        for job in jobs:
            col = job.collector
            for row in sorted(col.dirty):
                tokens, entries = col.tokens[row][job.sent_tokens[row]:], job.entries[row][job.sent_entries[row]:]
                job.sent_tokens[row] += len(tokens)
                job.sent_entries[row] += len(entries)
                rows.append([job.rid, row, tokens, col.reason[row], [[e.token, e.logprob, e.top] for e in entries]])
            col.dirty.clear()
        ends, errors = [], []
        for job, (kind, payload) in self.outbox:
            if kind == "end":
                ends.append([job.rid, job.poe])
            else:
                errors.append([job.rid, payload.status, payload.message, payload.param, payload.code, payload.retry_after])
            self.jobs.pop(job.rid, None)
        self.outbox = []
        if not (rows or ends or errors or self.admitted or self.steps):
            return
        msg = {"t": rows, "end": ends, "err": errors, "adm": self.admitted, "steps": self.steps,
               "load": [self.running_rows, self._running_decoders(), len(self.queue),
                        len({job for batch in self.batches.values() for job, _ in batch.rows.values()})]}
        if self.prefix_cache is not None:
            msg["pc"] = [self.prefix_cache.queries, self.prefix_cache.hits]
        self.admitted, self.steps = [], []
        try:
            self.link.send(msg)
        except OSError:  # the server is gone; serve() returns at its end of the socket
            pass


def serve(link: Link, scheduler: EngineScheduler, term: threading.Event) -> None:
    """Handle the HTTP side's messages until it says stop or goes away, or SIGTERM and idle."""
    while True:
        if term.is_set():
            scheduler.drain()
            if scheduler.idle():
                link.send({"bye": "SIGTERM"})
                return
        if not link.poll(0.1):
            continue
        try:
            msg = link.recv()
        except (EOFError, OSError):  # the server is gone
            return
        op = msg["op"]
        if op == "submit":
            scheduler.accept(msg)
        elif op == "cancel":
            scheduler.cancel(msg["id"])
        elif op == "finish":
            scheduler.finish(msg["id"], msg["rows"])
        elif op == "stop":
            return


def main(fd: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the server, which drains and then stops us
    term = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: term.set())
    import torch  # while the server reads the models' configs: the spec comes once it has checked them

    from poelm.runtime import parse_device
    from poelm.serve.compiled import warm_up
    from poelm.serve.models import load_models
    from poelm.serve.prefix_cache import PrefixCache

    sys.setswitchinterval(0.0005)  # a message from the server waits less for the GIL of a decode step
    link = Link(Connection(fd))
    try:
        spec = link.recv()
    except EOFError:  # the server failed before it needed us
        return 0
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    try:
        registry = load_models(spec["model"], spec["deltas"], name=spec["name"], device=parse_device(spec["device"]))
    except (ValueError, OSError) as e:  # bad input the server could not see without the weights: one line back
        link.send({"error": (str(e).strip().splitlines() or [type(e).__name__])[0]})
        return 2
    cache = PrefixCache(spec["kv_cache_bytes"]) if spec["kv_cache_bytes"] else None
    # the server keeps its queue within --max-queue; here, what it sent before hearing of admissions fits too
    queue = spec["max_queue"] + spec["max_batch"]
    compile = spec["compile"]
    if compile:
        warm_up(registry, spec["max_batch"], compile)
    scheduler = EngineScheduler(link, registry, spec["max_batch"], queue, Unrecorded(), prefix_cache=cache, compile=compile)
    scheduler.start()
    link.send({"ready": True})
    try:
        serve(link, scheduler, term)
    finally:
        scheduler.drain()
        scheduler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
