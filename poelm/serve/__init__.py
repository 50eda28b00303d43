"""`poelm serve`: an OpenAI-compatible HTTP server for PoE models, with continuous batching,
every PoE decoding mode per request and specialists by model name.

    poelm serve runs/base --delta chat=out/chat            # models "base" and "base+chat" on 127.0.0.1:8000
    curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"model": "base", "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0,
              "poe": {"mode": "speculative", "draft_stage": 0, "gamma": 4}}'

Parts: models.py (the base and its specialists, base weights shared; beside an engine process the
HTTP side holds their configs alone, on the meta device), protocol.py (request
and response shapes, OpenAI error objects), scheduler.py (the continuous-batching thread that
drives the engine's decoder protocol), prefix_cache.py (prompts reuse the K/V of prefixes
already computed, earlier replies included), engine_proc.py (the scheduler in an engine process beside the HTTP one: the
default of `poelm serve`), metrics.py (Prometheus), app.py (routes, API key, limits, streaming;
the command is poelm/cli/serve.py). Benchmark: benchmarks/serve_load.py.
"""

from poelm.serve.app import create_app

__all__ = ["create_app"]
