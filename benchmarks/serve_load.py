"""Load benchmark of `poelm serve`: N concurrent streaming clients on loopback, continuous batching
against one request at a time, and the PoE modes under load.

    .venv/bin/python benchmarks/serve_load.py                       # random-init d8 PoE model (~2 min on 2 cores)
    .venv/bin/python benchmarks/serve_load.py --model runs/tiny --max-tokens 64 --json

It starts `poelm serve` in a subprocess on a free 127.0.0.1 port (without --model: a random
depth-8 PoE model, 4 stages of 2 layers, byte tokenizer, WAND-calibrated on random tokens, in a
temporary directory), then for N = 1, 8, 32 clients runs a bounded number of greedy streaming
completions (each client sends --requests-per-client requests of --max-tokens tokens, one
after another; all clients run on one event loop in one thread) and reports: throughput
(generated tokens / wall time), time to first token and latency p50/p99, errors (must be 0),
the CPU cores the client and the server used (the client shares the machine's cores) and the
CPU milliseconds per generated token of the server's HTTP process and of its engine process
(/proc/PID/stat: less sensitive than tokens/s to other work on the box, though contention
still inflates it). --clients-only stops there.
The gain of continuous batching (goal >= 5x) is N = 32's throughput over the same requests
sent one at a time ("in sequence": the same prompts, so the same token counts and early
stops). Streaming's cost: N = 32 streamed against the same requests answered whole (goal <= 1.2x).
The server decodes in its engine process (the default; --in-process: in the HTTP process);
its CPU counts both processes, and the box's load average is reported (other work on the
machine slows every figure; the same ratios per server CPU second are less sensitive to it). Then the PoE modes (stage 0, Log-OP, WAND, speculative) at N = 32. Every request has
a timeout and the server is stopped (SIGTERM) at the end, whatever happens. A random model's speculative
acceptance and WAND exits say nothing about a trained one; this measures the serving path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = {"final": None, "stage 0": {"mode": "stage", "stage": 0}, "logop 0+last": {"mode": "logop", "stages": [0, 3]},
         "wand": {"mode": "wand"}, "speculative g4": {"mode": "speculative", "draft_stage": 0, "gamma": 4}}


def random_model(out: Path, depth: int, width: int, context: int) -> Path:
    """A random-init PoE model with a byte tokenizer (chat specials included), WAND-calibrated."""
    import tiktoken

    from poelm.checkpoint import save_model
    from poelm.engine import calibrate, save_calibration
    from poelm.model import GPT, GPTConfig
    from poelm.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

    enc = tiktoken.Encoding(name="bytes", pat_str=SPLIT_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)})
    tok = Tokenizer(enc)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=depth, n_embd=width, n_head=max(1, width // 64), vocab_size=tok.vocab_size,
                          sequence_len=context, poe_every=depth // 4))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = save_model(model.eval(), out / "model", tok)
    batches = [torch.randint(0, 256, (4, 64)) for _ in range(4)]
    save_calibration(path, calibrate(model, batches))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, threads: int | None, max_batch: int, in_process: bool,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """`poelm serve model` (extra: more of its flags, e.g. --compile; threads None: serve's own
    default) on a free loopback port, once /health answers 200 (a compiling server warms up
    first: up to 15 minutes)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    chosen = []
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
        chosen = ["--threads", str(threads)]
    proc = subprocess.Popen([sys.executable, "-m", "poelm", "serve", str(model), "--name", "bench", "--port", str(port),
                             *chosen, "--max-batch", str(max_batch), "--max-queue", "256",
                             *(["--in-process"] if in_process else []), *extra], env=env)
    url = f"http://127.0.0.1:{port}"
    wait = 900 if "--compile" in extra else 120
    deadline = time.monotonic() + wait
    with httpx.Client(timeout=1) as client:  # one client: each httpx.get would build an SSL context
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SystemExit(f"poelm serve exited with status {proc.returncode}")
            try:
                if client.get(url + "/health").status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            time.sleep(0.3)  # 503 while it warms up: poll, do not spin
    proc.kill()
    raise SystemExit(f"poelm serve did not answer /health within {wait} s")


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int, poe: dict | None,
                      stream: bool = True) -> dict:
    """A greedy completion, streamed or whole -> {ttft (None when whole), latency, tokens} or {error}."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if poe:
        body["poe"] = poe
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    if not stream:
        try:
            r = await client.post(url + "/v1/completions", json=body)
        except httpx.HTTPError as e:
            return {"error": f"{type(e).__name__}: {e}"}
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.text[:200]!r}"}
        return {"ttft": None, "latency": time.perf_counter() - t0, "tokens": r.json()["usage"]["completion_tokens"]}
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return {"error": chunk["error"]["message"]}
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif ttft is None:
                    ttft = time.perf_counter() - t0
    except httpx.HTTPError as e:
        return {"error": f"{type(e).__name__}: {e}"}
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process pid alone so far (Linux /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process pid and its live children so far (Linux /proc): the
    server and its engine process."""
    return own_cpu_seconds(pid) + children_cpu_seconds(pid)


def children_cpu_seconds(pid: int) -> float:
    """CPU seconds of pid's live children and theirs (the server's engine process)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = children.read_text().split() if children.exists() else []
    return sum(cpu_seconds(int(k)) for k in kids)


def workload(clients: int, per_client: int) -> list[list[str]]:
    """Each client's prompts, in the order it sends them."""
    return [[f"client {c} request {r}: once upon a time" for r in range(per_client)] for c in range(clients)]


async def clients_run(url: str, prompts: list[list[str]], max_tokens: int, poe: dict | None, timeout: float,
                      stream: bool = True) -> list[dict]:
    """One concurrent client per prompt list, all on one event loop (one thread: the client's own
    CPU stays small and is measured), each sending its prompts one after another."""
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        async def client_loop(mine: list[str]) -> list[dict]:
            return [await one_request(client, url, prompt, max_tokens, poe, stream) for prompt in mine]

        return [out for outs in await asyncio.gather(*(client_loop(mine) for mine in prompts)) for out in outs]


def load(url: str, prompts: list[list[str]], max_tokens: int, poe: dict | None, timeout: float,
         server_pid: int | None = None, stream: bool = True) -> dict:
    t0, cpu0 = time.perf_counter(), time.process_time()
    http0, engine0 = (own_cpu_seconds(server_pid), children_cpu_seconds(server_pid)) if server_pid else (0.0, 0.0)
    results = asyncio.run(clients_run(url, prompts, max_tokens, poe, timeout, stream))
    wall = time.perf_counter() - t0
    client_cores = (time.process_time() - cpu0) / wall
    http_s = own_cpu_seconds(server_pid) - http0 if server_pid else float("nan")
    engine_s = children_cpu_seconds(server_pid) - engine0 if server_pid else float("nan")
    server_cores = (http_s + engine_s) / wall
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    tokens = max(sum(r["tokens"] for r in ok), 1)
    ttft, lat = [r["ttft"] for r in ok if r["ttft"] is not None], [r["latency"] for r in ok]
    return {"clients": len(prompts), "requests": len(results), "errors": len(errors), "first_error": errors[0] if errors else None,
            "tokens": sum(r["tokens"] for r in ok), "wall_s": wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "latency_p50_s": percentile(lat, 0.5), "latency_p99_s": percentile(lat, 0.99),
            "client_cpu_cores": client_cores, "server_cpu_cores": server_cores,
            "tokens_per_server_cpu_s": sum(r["tokens"] for r in ok) / max(server_cores * wall, 1e-9),
            "http_cpu_ms_per_token": 1e3 * http_s / tokens, "engine_cpu_ms_per_token": 1e3 * engine_s / tokens}


def row(name: str, r: dict) -> str:
    return (f"{name:>16} {r['clients']:>3} {r['requests']:>4} {r['tokens_per_s']:>8.1f} {r['ttft_p50_s'] * 1e3:>8.0f} "
            f"{r['ttft_p99_s'] * 1e3:>8.0f} {r['latency_p50_s']:>7.2f} {r['latency_p99_s']:>7.2f} {r['errors']:>4} "
            f"{r['client_cpu_cores']:>6.2f} {r['server_cpu_cores']:>6.2f} {r['http_cpu_ms_per_token']:>6.3f} "
            f"{r['engine_cpu_ms_per_token']:>6.3f}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="serve this MODEL (default: a random d8 PoE model)")
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--clients", default="1,8,32", help="comma list of concurrent client counts")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1,
                   help="the server's torch threads (1: the other core serves HTTP and the client)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    p.add_argument("--no-modes", action="store_true", help="skip the PoE modes under load")
    p.add_argument("--in-process", action="store_true", help="serve with --in-process (no engine process)")
    p.add_argument("--clients-only", action="store_true",
                   help="only the --clients runs (no in-sequence, whole or PoE-mode runs): the quick CPU-per-token check")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else random_model(Path(tmp), args.depth, args.width, 256)
        load_before = os.getloadavg()[0]
        proc, url = start_server(model, args.threads, max(counts), args.in_process)
        try:
            load(url, workload(max(counts), 1), 4, None, args.timeout)  # warm-up, at every batch size up to N
            by_clients, step_rows = {}, {}
            for n in counts:
                before = _step_rows(httpx.get(url + "/metrics", timeout=10).text)
                by_clients[n] = load(url, workload(n, args.requests_per_client), args.max_tokens, None, args.timeout,
                                     proc.pid)
                after = _step_rows(httpx.get(url + "/metrics", timeout=10).text)
                step_rows[n] = (after[0] - before[0]) / max(after[1] - before[1], 1.0)
            if args.clients_only:
                return clients_report(by_clients, step_rows, load_before, args.json)
            most = workload(max(counts), args.requests_per_client)
            one_at_a_time = load(url, [[p for mine in most for p in mine]], args.max_tokens, None, args.timeout, proc.pid)
            whole = load(url, most, args.max_tokens, None, args.timeout, proc.pid, stream=False)
            modes = {} if args.no_modes else {name: load(url, most, args.max_tokens, poe, args.timeout, proc.pid)
                                              for name, poe in MODES.items()}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    ratio = by_clients[max(counts)]["tokens_per_s"] / one_at_a_time["tokens_per_s"]
    streaming_cost = whole["tokens_per_s"] / by_clients[max(counts)]["tokens_per_s"]
    per_cpu = {"batching_gain": by_clients[max(counts)]["tokens_per_server_cpu_s"] / one_at_a_time["tokens_per_server_cpu_s"],
               "streaming_cost": whole["tokens_per_server_cpu_s"] / by_clients[max(counts)]["tokens_per_server_cpu_s"]}
    out = {"by_clients": by_clients, "one_at_a_time": one_at_a_time, "whole": whole, "modes": modes,
           "batching_gain": ratio, "streaming_cost": streaming_cost, "per_server_cpu_s": per_cpu,
           "errors": sum(r["errors"] for r in [*by_clients.values(), one_at_a_time, whole, *modes.values()]),
           "load_average": [load_before, os.getloadavg()[0]],
           "setup": {"model": args.model or f"random d{args.depth} w{args.width}", "max_tokens": args.max_tokens,
                     "requests_per_client": args.requests_per_client, "server_threads": args.threads,
                     "engine": "in-process" if args.in_process else "engine process"}}
    out["step_rows_mean"] = step_rows
    if args.json:
        print(json.dumps(out, indent=2))
        return out
    print(HEADER)
    for n, r in by_clients.items():
        print(row("final", r))
    print(row("in sequence", one_at_a_time))
    print(row("not streamed", whole))
    for name, r in modes.items():
        print(row(name, r))
    print(f"continuous batching: {ratio:.1f}x the throughput of one request at a time "
          f"({max(counts)} clients vs their {len(most) * args.requests_per_client} requests in sequence); mean rows per decode step {step_rows[max(counts)]:.1f}; "
          f"errors {out['errors']}")
    print(f"streaming costs {streaming_cost:.2f}x not streaming ({max(counts)} clients); {out['setup']['engine']}; "
          f"load average {load_before:.1f} before, {out['load_average'][1]:.1f} after (on {os.cpu_count()} cores)")
    print(f"per server CPU second (less sensitive to other work on the box): batching {per_cpu['batching_gain']:.1f}x, "
          f"streaming costs {per_cpu['streaming_cost']:.2f}x")
    return out


HEADER = (f"{'':>16} {'N':>3} {'reqs':>4} {'tok/s':>8} {'ttft50':>8} {'ttft99':>8} {'lat50':>7} {'lat99':>7} {'err':>4} "
          f"{'client':>6} {'server':>6} {'http':>6} {'engine':>6}   (ms for ttft, s for latency, CPU cores used by "
          "the client and the server, CPU ms per generated token of the server's HTTP and engine processes)")


def clients_report(by_clients: dict, step_rows: dict, load_before: float, as_json: bool) -> dict:
    """--clients-only: the table of the client counts' runs and the load."""
    out = {"by_clients": by_clients, "step_rows_mean": step_rows, "load_average": [load_before, os.getloadavg()[0]]}
    if as_json:
        print(json.dumps(out, indent=2))
        return out
    print(HEADER)
    for r in by_clients.values():
        print(row("final", r))
    print(f"load average {load_before:.1f} before, {out['load_average'][1]:.1f} after (on {os.cpu_count()} cores)")
    return out


def _step_rows(metrics: str) -> tuple[float, float]:
    """(rows summed over decode steps, decode steps) so far, from /metrics."""
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line.startswith("poelm_step_rows_")}
    return values.get("poelm_step_rows_sum", 0.0), values.get("poelm_step_rows_count", 0.0)


if __name__ == "__main__":
    main()
