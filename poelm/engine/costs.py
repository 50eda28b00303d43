"""What decoding costs on this machine: the measured seconds of each stage's layers and each exit
test at batch 1 (docs/poe.md §4), and the step timings the modes' own overheads are measured
with (wand.wand_overhead, wand.compiled_step_costs, speculative.speculative_overhead,
speculative.compiled_pass_costs). The cost models of WAND (which exit tests pay) and adaptive
speculative decoding (which draft stage and gamma) read them; `poelm calibrate` stores them
with the bounds.

    costs = measure_costs(model)       # {"stage_s": K x [s at 1, 8 positions], "test_s": ..., ...}
    measured(model, "key", measure)    # measure() once per model and process
"""

from __future__ import annotations

import time
import weakref

import numpy as np
import torch

from poelm.engine.decoders import PlainDecoder, new_cache
from poelm.engine.options import DecodeOptions
from poelm.engine.sampling import top_gap
from poelm.model import GPT

COST_POSITIONS = (1, 8)  # positions per timed pass: a decode step, and a verify pass's order of size
_MEASURED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: what was measured}


@torch.inference_mode()
def measure_costs(model: GPT, repeats: int = 5, context: int = 32) -> dict:
    """What the pieces of a cached decode step cost on this machine, in seconds at batch 1
    (the median of `repeats` timed passes after a warm-up), at each of COST_POSITIONS positions
    per pass: {"device", "threads", "positions", "stage_s": K x [seconds per position count]
    (stage k's layers; stage 0's include the embedding), "test_s": K x [...] (stage k's exit
    test: its readout, top-2 and the host read; the last stage's: the final readout's)}
    (speculative.decode_costs adds the modes' overheads). The figures hold for this machine only: `poelm calibrate` measures them again."""
    cfg, device = model.config, model.lm_head.weight.device
    K, wide = cfg.n_stages, COST_POSITIONS[-1]
    context = max(1, min(context, cfg.sequence_len - wide))
    ids = torch.randint(cfg.vocab_size, (1, context + wide), generator=torch.Generator().manual_seed(0)).to(device)
    cache = new_cache(model, 1, context + wide)
    x = model.embed(ids[:, :context], cache, 0)
    model.run_layers(x, x, ids[:, :context], 0, cfg.n_layer, cache, 0)
    sync = device_sync(model)
    stage_s, test_s = [[] for _ in range(K)], [[] for _ in range(K)]
    for n in COST_POSITIONS:
        laps = [_timed_pass(model, cache, ids[:, context:context + n], context, sync) for _ in range(repeats + 1)][1:]
        for k in range(K):
            stage_s[k].append(float(np.median([lap[k] for lap in laps])))
            test_s[k].append(float(np.median([lap[K + k] for lap in laps])))
    return {"device": device.type, "threads": torch.get_num_threads(), "positions": list(COST_POSITIONS),
            "stage_s": stage_s, "test_s": test_s}


def _timed_pass(model: GPT, cache, idx: torch.Tensor, start: int, sync) -> list[float]:
    """One pass over idx (1, n) at `start` -> seconds of the K stages, then of the K exit tests."""
    cfg = model.config
    bl = cfg.backout_layer if cfg.backout else -1
    laps, lasts, x_mid, first = [], [], None, 0
    sync()
    t = time.perf_counter()
    x = x0 = model.embed(idx, cache, start)
    for end in cfg.stage_ends:
        x, kept = model.run_layers(x, x0, idx, first, end + 1, cache, start, keep={bl} if bl >= 0 else set())
        x_mid, first = kept.get(bl, x_mid), end + 1
        lasts.append(x)
        sync()
        laps.append(time.perf_counter() - t)
        t = time.perf_counter()
    for k, last in enumerate(lasts):
        r = model.readout(last, k) if k < len(lasts) - 1 else model.readout(x, None, x_mid, lasts)
        top_gap(r).tolist()
        laps.append(time.perf_counter() - t)
        t = time.perf_counter()
    return laps


TIMING_PROMPT = range(1, 17)  # the token ids (mod the vocabulary) of the overhead timings' one row


def timing_prompt(model: GPT) -> list[int]:
    return [i % model.config.vocab_size for i in TIMING_PROMPT]


def step_overhead(model: GPT, other, n: int, sync) -> float:
    """Seconds a step of decoder `other` (one row of timing_prompt, room for 2n more steps) costs
    beyond a plain step of the same row (step_times)."""
    plain, theirs = step_times(model, [other], n, sync)
    return theirs - plain


def step_times(model: GPT, others: list, n: int, sync, rewind: bool = False) -> list[float]:
    """Seconds of an eager plain step of one row of timing_prompt, then of a step of each decoder
    in `others` (each holding that row, room for 2n more steps). The decoders' steps alternate (a
    busy machine slows all alike); after n steps of each as warm-up (a fresh decoder's first
    steps run slow on the CPU; a compiled one's first compiles), the medians of n steps of each.
    rewind: after each step (untimed) every row is rolled back by what the step emitted, so every
    step of every decoder runs at the same context, however many tokens a step emits."""
    plain = PlainDecoder(model, DecodeOptions(), len(TIMING_PROMPT) + 2 * n + 1)
    plain.add_rows([timing_prompt(model)])
    decoders = [plain, *others]
    times: list[list[float]] = [[] for _ in decoders]
    for i in range(2 * n):
        for dec, t in zip(decoders, times):
            sync()
            t0 = time.perf_counter()
            new = dec.step()
            sync()
            if i >= n:
                t.append(time.perf_counter() - t0)
            for handle, ids in new.items() if rewind else ():
                dec.rollback(handle, len(ids))
    return [float(np.median(t)) for t in times]


def device_sync(model: GPT):
    """A function that waits for the model's device (CUDA), else does nothing."""
    return torch.cuda.synchronize if model.lm_head.weight.device.type == "cuda" else (lambda: None)


def measured(model: GPT, key, measure) -> object:
    """measure() once per model, key and process (costs a model's calibration lacks)."""
    done = _MEASURED.setdefault(model, {})
    if key not in done:
        done[key] = measure()
    return done[key]
