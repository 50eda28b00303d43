"""`poelm serve MODEL [--delta NAME=DIR ...]`: the OpenAI-compatible HTTP server (poelm/serve/)
on a base model and its specialists."""

from __future__ import annotations

import argparse
import os
import sys
import threading

from poelm.flags import at_least, int_range, seconds


def serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the base MODEL (served as --name)")
    p.add_argument("--delta", action="append", default=None, metavar="NAME=DIR",
                   help="a specialist delta on MODEL, served as model id BASE+NAME (repeatable)")
    p.add_argument("--name", default=None, help="model id of MODEL (default: its directory name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=int_range(1, 65535), default=8000, help="TCP port (1..65535)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: the POELM_API_KEY environment variable, else none)")
    p.add_argument("--max-batch", type=at_least(1), default=32, help="rows (choices) decoded together at most")
    p.add_argument("--max-queue", type=at_least(1), default=64, help="requests waiting at most; beyond: 503 + Retry-After")
    p.add_argument("--request-timeout", type=seconds(86400), default=600.0,
                   help="seconds a request may take, queue included (at most a day)")
    p.add_argument("--header-timeout", type=seconds(3600), default=10.0,
                   help="seconds a client may take to send a request (header and body), counted from connecting or "
                        "from its previous response; idle connections close after it")
    p.add_argument("--max-connections", type=at_least(1), default=None,
                   help="open client connections at most; beyond, the oldest idle one is closed (default: 1024, "
                        "fewer when `ulimit -Hn` is lower)")
    p.add_argument("--max-tokens", type=at_least(1), default=None, help="max_tokens a request may ask (default: the context)")
    p.add_argument("--max-prompt-tokens", type=at_least(1), default=None, help="prompt tokens at most (default: the context)")
    p.add_argument("--max-n", type=at_least(1), default=8, help="choices (n) per request at most")
    p.add_argument("--max-body-bytes", type=at_least(1), default=1 << 20, help="request body bytes at most (413 beyond)")
    p.add_argument("--kv-cache-bytes", type=at_least(0), default=256 << 20,
                   help="bytes of K/V (prompts and the replies to them) kept for prefix caching "
                        "(least recently used evicted; 0 = off)")
    p.add_argument("--in-process", action="store_true",
                   help="decode in the HTTP process (one process) instead of an engine process beside it")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="decode every mode with compiled static-shape steps, batches padded to powers of two; "
                        "the graphs compile at start-up, before /health says ready (default: on for CUDA)")
    p.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # tests: aot_eager
    # the model's torch threads leave one core to the HTTP side (vLLM's CPU backend keeps one per rank for its
    # front end too): on 2 cores, 2 threads beside a busy HTTP process and its clients ran slower than 1
    p.set_defaults(reserved_cores=1)
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="warning",
                   help="uvicorn's log level")


def cmd_serve(args: argparse.Namespace) -> int:
    import torch
    import uvicorn

    from poelm.runtime import check_compiler, parse_device
    from poelm.serve.app import API_KEY_ENV, ServeConfig, create_app
    from poelm.serve.engine_proc import EngineProcess
    from poelm.serve.guard import BACKLOG, MAX_HEADER_BYTES, ConnectionGuard, bind_socket, fit_fd_limit
    from poelm.serve.metrics import Metrics
    from poelm.serve.models import ModelRegistry, load_models, parse_deltas
    from poelm.serve.compiled import warm_up
    from poelm.serve.prefix_cache import PrefixCache
    from poelm.serve.scheduler import Scheduler

    device = parse_device(args.device)
    compile = args.compile if args.compile is not None else device.type == "cuda"
    if compile:
        check_compiler(device)
    backend = args.compile_backend if compile else None
    max_connections = fit_fd_limit(args.max_connections)
    sock = bind_socket(args.host, args.port)  # before the model loads: a busy port or bad host fails at once
    scheduler = None
    try:
        if not args.in_process:
            torch.set_num_threads(1)  # this process never runs the model; the engine gets the --threads chosen
        sys.setswitchinterval(0.0005)  # the scheduler or reader thread gets the GIL back sooner from the event loop
        api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
        deltas = parse_deltas(args.delta or [])
        registry = ModelRegistry([], loading=True)  # /health answers 503 "loading" until load() is done
        metrics = Metrics()
        if args.in_process:
            cache = PrefixCache(args.kv_cache_bytes) if args.kv_cache_bytes else None
            scheduler = Scheduler(args.max_batch, args.max_queue, metrics, prefix_cache=cache, compile=backend)
        else:
            choice = getattr(args, "thread_choice", None)
            threads = choice.threads if choice is not None else 0
            spec = dict(model=args.model, deltas=deltas, name=args.name, device=args.device, threads=threads,
                        kv_cache_bytes=args.kv_cache_bytes, compile=backend)
            scheduler = EngineProcess(spec, args.max_batch, args.max_queue, metrics)
            scheduler.start()  # it imports torch while this process reads the models' configs
        config = ServeConfig(api_key=api_key, max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens,
                             max_prompt_tokens=args.max_prompt_tokens, max_n=args.max_n,
                             request_timeout=args.request_timeout, header_timeout=args.header_timeout)
        guard = ConnectionGuard(max_connections, args.header_timeout)
        app = create_app(registry, scheduler, metrics, config, guard)
        server = uvicorn.Server(uvicorn.Config(app, http=guard.protocol(), log_level=args.log_level, backlog=BACKLOG,
                                               timeout_keep_alive=args.header_timeout,
                                               h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                                               timeout_graceful_shutdown=int(args.request_timeout) + 5))
        failed: list[BaseException] = []

        def load() -> None:
            try:
                # with an engine process, configs on the meta device (no weights): tokenizers and option checks only
                models = load_models(args.model, deltas, name=args.name, device=device if args.in_process else "meta")
                if not args.in_process:  # the engine loads the weights (checks a delta's base hash) and warms up
                    scheduler.connect()  # requests go to it from now on
                elif backend:
                    warm_up(models, args.max_batch, backend)
                registry.loaded(models)
            except BaseException as e:  # said by main() once the server has stopped
                failed.append(e)
                server.should_exit = True
                return
            print(f"poelm serve: http://{args.host}:{args.port} models {', '.join(registry.models)}"
                  f"{' (API key required)' if api_key else ''}; {args.thread_choice.line()}", file=sys.stderr, flush=True)

        threading.Thread(target=load, name="poelm-load", daemon=True).start()
        server.run(sockets=[sock])
    finally:
        sock.close()
        if isinstance(scheduler, EngineProcess) and not scheduler.stopping:  # the server never ran its lifespan
            scheduler.drain()
            scheduler.stop()
    if failed:
        raise failed[0]
    return 0
