"""Compiled decoding in the server (`poelm serve --compile`): batch buckets and the warm-up.

    sizes = buckets(32)                        # [1, 2, 4, 8, 16, 32]
    allow_graphs(32)                           # dynamo may keep a graph per bucket and option set
    warm_up(registry, 32, "inductor")          # every model, each mode's default options, every bucket

A compiled step is a static-shape graph per batch size, and continuous batching changes a
decoder's row count every few steps. The scheduler therefore pads a compiled decoder's batch
with inactive rows (dead rows: they step, nobody reads their tokens) up to the next bucket, so
each compiled function holds at most len(buckets(max_batch)) graphs per option set.
warm_up compiles those graphs for each mode's default options, greedy and sampled, before
the server says it is ready: the first requests pay no compile time.
"""

from __future__ import annotations

import gc

import torch
from torch._dynamo.utils import counters

from poelm.engine import MODES, make_decoder

OPTION_SETS = 8  # graphs per bucket one compiled function may hold (requests with other stages, gammas, ...)
PAD_TOKEN = 0  # the prompt of a padding row (any id: its tokens are never read)


def buckets(max_batch: int) -> list[int]:
    """The batch sizes a compiled decoder runs at: powers of two below max_batch, and max_batch."""
    return [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch] + [max_batch]


def bucket(rows: int, max_batch: int) -> int:
    """The smallest bucket that holds `rows` rows (rows <= max_batch)."""
    return next(b for b in buckets(max_batch) if b >= rows)


def allow_graphs(max_batch: int) -> None:
    """Let dynamo keep a graph per bucket and option set of each compiled function (its default
    limit, 8 per function, would send a server's later batch sizes back to eager decoding)."""
    limit = OPTION_SETS * len(buckets(max_batch))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)


def graphs_compiled() -> int:
    """The graphs dynamo compiled in this process so far (a later request that compiles raises it)."""
    return counters["stats"]["unique_graphs"]


def warm_options(served, temperatures: tuple[float, ...]) -> list:
    """The DecodeOptions a warm-up compiles for: each mode this model can decode with its
    defaults, at each temperature (the modes a model refuses, e.g. WAND uncalibrated, are skipped)."""
    out = []
    for mode in MODES:
        for temperature in temperatures:
            try:
                out.append(served.engine.options(dict(mode=mode, temperature=temperature, stop_token_ids=[])))
            except ValueError:  # this model cannot decode the mode (no calibration, a BP model's stages)
                break
    return out


@torch.inference_mode()
def warm_up(registry, max_batch: int, backend: str, temperatures: tuple[float, ...] = (0.0, 1.0)) -> int:
    """Compile every model's default-option graphs at every bucket (two steps each), greedy and
    sampled (OpenAI's default temperature is 1) -> the graphs compiled. Tracing leaves cyclic
    garbage that holds the warm-up decoders' KV caches: it is collected here, once, rather than
    whenever Python's cyclic collector next runs (seldom, in the engine process)."""
    allow_graphs(max_batch)
    before = graphs_compiled()
    for served in registry.models.values():
        model = served.model
        for opts in warm_options(served, temperatures):
            for size in buckets(max_batch):
                decoder = make_decoder(model, opts, model.config.sequence_len, compile=backend)
                decoder.add_rows([[PAD_TOKEN, PAD_TOKEN]] * size)
                decoder.step()
                decoder.step()
    gc.collect()
    return graphs_compiled() - before
