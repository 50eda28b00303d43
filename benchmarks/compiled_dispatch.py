"""Compiled decoding's call dispatch: torch.compile's own (its frame hook checks the guards and
runs the graph) against poelm's (engine/decoders.py CompiledMethod: the same guards checked by
hand, the graph's code called directly), in one process, interleaved, ratio printed last.

    .venv/bin/python benchmarks/compiled_dispatch.py --model runs/demo/arms/poe --data data/default
    .venv/bin/python benchmarks/compiled_dispatch.py --model runs/demo/arms/poe --repeats 7 --json

Paths: plain (every layer), stage 0 alone, speculative from stage 0 with gamma 4; greedy, batch
1, 1 thread, --prompts prompts of the validation split x --new-tokens tokens. Both dispatches run
the same graphs (compiled once, before timing) and give the same tokens (checked). Each repeat
times every (path, dispatch) once, in turn; the figures are the medians over --repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from poelm.checkpoint import load_model  # noqa: E402
from poelm.engine import Engine  # noqa: E402
from poelm.engine.decoders import CompiledMethod  # noqa: E402
from poelm.inference_bench import heldout_batches, prompts_from  # noqa: E402

PATHS = {"plain": {}, "stage0": dict(mode="stage", stage=0), "speculative_d0": dict(mode="speculative", draft_stage=0,
                                                                                      gamma=4)}
DIRECT = CompiledMethod.__call__


def through_torch_compile(self, *args):
    """torch.compile's own dispatch of the same function (its frame hook: guards, then the graph)."""
    return self.compiled(self.owner(), *args)


def decode(engine: Engine, prompts: list[list[int]], new_tokens: int, opts: dict) -> tuple[float, list]:
    """-> (seconds per generated token, every prompt's tokens)."""
    t0, n, out = time.perf_counter(), 0, []
    for p in prompts:
        g = engine.generate(p, max_new_tokens=new_tokens, stop_token_ids=[], **opts)
        n += len(g.tokens)
        out.append(g.tokens)
    return (time.perf_counter() - t0) / n, out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a PoE model directory (e.g. runs/demo/arms/poe)")
    ap.add_argument("--data", default="data/default", help="its corpus directory (prompts from the validation split)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = load_model(args.model)
    model.eval()
    prompts = prompts_from(heldout_batches(args.data, tok, model.config.sequence_len, 8192), args.prompts,
                           args.prompt_len)
    engine = Engine(model, tok, compile=True)
    sides = {"torch.compile": through_torch_compile, "direct": DIRECT}
    times: dict[str, dict[str, list[float]]] = {p: {s: [] for s in sides} for p in PATHS}
    tokens: dict[str, dict[str, list]] = {p: {} for p in PATHS}
    for path, opts in PATHS.items():  # compile every graph before timing (the same cache bucket)
        decode(engine, prompts[:1], args.new_tokens, opts)
    try:
        for r in range(args.repeats):
            for path, opts in PATHS.items():
                for side, call in sides.items():
                    CompiledMethod.__call__ = call
                    s, out = decode(engine, prompts, args.new_tokens, opts)
                    times[path][side].append(s)
                    tokens[path][side] = out
            print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{p} {1e3 * t['torch.compile'][-1]:.3f} / {1e3 * t['direct'][-1]:.3f} ms" for p, t in times.items()),
                flush=True)
    finally:
        CompiledMethod.__call__ = DIRECT
    result = {}
    for path, t in times.items():
        assert tokens[path]["torch.compile"] == tokens[path]["direct"], f"{path}: the dispatches gave different tokens"
        tc, direct = statistics.median(t["torch.compile"]), statistics.median(t["direct"])
        result[path] = {"torch_compile_ms_per_token": 1e3 * tc, "direct_ms_per_token": 1e3 * direct, "ratio": tc / direct}
    plain = result["plain"]
    for side, key in (("torch.compile", "torch_compile_ms_per_token"), ("direct", "direct_ms_per_token")):
        result[f"stage0_over_plain_{'direct' if side == 'direct' else 'torch_compile'}"] = (
            plain[key] / result["stage0"][key])
        result[f"speculative_over_plain_{'direct' if side == 'direct' else 'torch_compile'}"] = (
            plain[key] / result["speculative_d0"][key])
    print(f"\n{args.prompts} prompts x {args.new_tokens} tokens, greedy, batch 1, 1 thread, median of {args.repeats}:")
    for path in PATHS:
        r = result[path]
        print(f"  {path:>15}: torch.compile dispatch {r['torch_compile_ms_per_token']:.3f} ms/token, direct "
              f"{r['direct_ms_per_token']:.3f} ms/token")
    print(f"  stage 0 over plain: {result['stage0_over_plain_torch_compile']:.2f}x -> "
          f"{result['stage0_over_plain_direct']:.2f}x; speculative d0 over plain: "
          f"{result['speculative_over_plain_torch_compile']:.2f}x -> {result['speculative_over_plain_direct']:.2f}x")
    if args.json:
        print(json.dumps(result, indent=1))
    print("direct over torch.compile dispatch, per token: " + ", ".join(
        f"{p} {result[p]['ratio']:.2f}x" for p in PATHS))
    return result


if __name__ == "__main__":
    main()
