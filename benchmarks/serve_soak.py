"""Soak of `poelm serve`: N streaming clients kept busy for M minutes; memory must stay bounded and
no request may fail.

    .venv/bin/python benchmarks/serve_soak.py                          # 10 minutes, 32 clients
    .venv/bin/python benchmarks/serve_soak.py --minutes 1 --clients 8 --json
    .venv/bin/python benchmarks/serve_soak.py --poelm-args=--compile     # compiled steps

Serves the random PoE model of benchmarks/guidellm_run.py (8 layers, 192 wide, vocab 4096) with
its engine process (the default) on a free 127.0.0.1 port. Each client sends greedy streamed
completions of --max-tokens tokens one after another until the time is up; every prompt starts
with one of a few shared preambles and ends with a counter, so the prefix cache both hits and
fills to its budget (--kv-cache-bytes) and evicts. Every 10 s it samples the resident memory
(RSS) of the server's processes, the HTTP one and its engine child, and the box's load average.
It ends (SIGTERM to the server) with the request, token and error counts, the distinct error
messages, and RSS at the first sample, at the end, and at most, in MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guidellm_run import build_model  # noqa: E402  (benchmarks/ is this script's directory)
from serve_load import one_request, start_server  # noqa: E402

PREAMBLES = ["You are a careful assistant. Answer briefly and exactly.",
             "The following is a transcript of a long meeting about the harbour budget.",
             "Translate the sentence below into plain words, keeping its meaning."]


def rss_bytes(pid: int) -> tuple[int, int]:
    """Resident memory of process pid and of its live children and their descendants (Linux
    /proc), in bytes: (the HTTP process, the engine process) for `poelm serve`."""
    own = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = children.read_text().split() if children.exists() else []
    return own, sum(sum(rss_bytes(int(k))) for k in kids)


async def soak(url: str, clients: int, seconds: float, max_tokens: int, pid: int, timeout: float) -> dict:
    """clients streaming loops until seconds pass, beside a sampler of RSS every 10 s."""
    deadline = time.monotonic() + seconds
    errors: Counter[str] = Counter()
    counts = {"requests": 0, "tokens": 0}
    samples: list[dict] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client: httpx.AsyncClient, c: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            prompt = f"{PREAMBLES[(c + n) % len(PREAMBLES)]} Client {c}, request {n}: once upon a time"
            out = await one_request(client, url, prompt, max_tokens, None)
            counts["requests"] += 1
            if "error" in out:
                errors[out["error"][:160]] += 1
            else:
                counts["tokens"] += out["tokens"]
            n += 1

    async def sampler() -> None:
        t0 = time.monotonic()
        while True:
            http, engine = rss_bytes(pid)
            samples.append({"t_s": round(time.monotonic() - t0), "rss_mib": (http + engine) / 2**20,
                            "http_mib": http / 2**20, "engine_mib": engine / 2**20,
                            "load1": os.getloadavg()[0], "requests": counts["requests"]})
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(min(10.0, max(0.0, deadline - time.monotonic())))

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        await asyncio.gather(sampler(), *(client_loop(client, c) for c in range(clients)))
    rss = [s["rss_mib"] for s in samples]
    return {**counts, "errors": sum(errors.values()), "error_messages": dict(errors), "samples": samples,
            "rss_start_mib": rss[0], "rss_end_mib": rss[-1], "rss_max_mib": max(rss),
            "load1_mean": sum(s["load1"] for s in samples) / len(samples)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds one request may take")
    ap.add_argument("--poelm-args", default="", help="more flags for `poelm serve`, e.g. --poelm-args=--compile")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="poelm-soak-") as tmp:
        model, _ = build_model(Path(tmp))
        proc, url = start_server(model, args.threads, args.clients, False, tuple(args.poelm_args.split()))
        try:
            result = asyncio.run(soak(url, args.clients, args.minutes * 60, args.max_tokens, proc.pid, args.timeout))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    result["server_exit"] = proc.returncode
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for s in result["samples"]:
            print(f"t={s['t_s']:>4}s  rss {s['rss_mib']:7.1f} MiB (http {s['http_mib']:6.1f}, engine "
                  f"{s['engine_mib']:7.1f})  load {s['load1']:5.2f}  requests {s['requests']}")
        for message, n in result["error_messages"].items():
            print(f"error x{n}: {message}")
        print(f"poelm serve {args.poelm_args or '(defaults)'}; "
              f"{args.clients} clients, {args.minutes:g} min: {result['requests']} requests, {result['tokens']} "
              f"tokens, {result['errors']} errors, server exit {result['server_exit']}; "
              f"mean load {result['load1_mean']:.2f}")
        print(f"RSS (HTTP + engine) start {result['rss_start_mib']:.1f} MiB, end {result['rss_end_mib']:.1f} MiB, "
              f"max {result['rss_max_mib']:.1f} MiB")
    return result


if __name__ == "__main__":
    main()
