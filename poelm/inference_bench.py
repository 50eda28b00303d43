"""Measure a PoE model's inference modes against the best plain path in one run: tokens/s of
plain (eager and compiled), stage 0 (prefix pruning), WAND and self-speculative decoding
(every draft stage), on two prompt sets: the validation split and English text from outside
the corpus (poelm.outside_text). Every speedup is over the faster plain path of the same
run; agreement is teacher-forced top-1 agreement with full depth on held-out text of the
set (the WAND bounds are calibrated on other validation tokens).

    from poelm.inference_bench import measure_modes
    report = measure_modes(model, tokenizer, "data/default", n_prompts=4, max_new_tokens=128)
    report["sets"]["outside"]["modes"]["speculative"]["speedup"]

Used by `poelm experiment` and benchmarks/decode.py. All paths decode the same prompts
greedily, batch 1, one torch thread, the same number of new tokens; each path is warmed up
with a full-length generation (a compiled path compiles there), then the paths are timed
interleaved, median of `repeats`. A path the engine refuses (a mode it cannot compile) is
left out, so the measurement covers whatever compiled modes the engine offers.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from poelm.engine import Engine, calibrate, load_calibration, save_calibration, wand_teacher_forced
from poelm.model import GPT
from poelm.outside_text import PARAGRAPHS

OUTSIDE_SOURCE = "poelm/outside_text.py (English prose outside the corpus)"


def heldout_batches(data_dir: str, tokenizer, seq_len: int, n_tokens: int, batch_size: int = 4) -> list:
    from poelm.dataloader import val_batches

    return [x for x, _ in val_batches(data_dir, tokenizer, batch_size, seq_len, n_tokens)]


def prompts_from(batches: list[torch.Tensor], n_prompts: int, prompt_len: int) -> list[list[int]]:
    rows = torch.cat(batches)[:n_prompts, :prompt_len]
    return [r.tolist() for r in rows]


def outside_set(tokenizer, seq_len: int, n_prompts: int, prompt_len: int) -> tuple[list[list[int]], torch.Tensor]:
    """(prompts, held-out rows) from the outside text: each paragraph opens with <|bos|>; a
    prompt is a paragraph's first prompt_len tokens, the rows are the whole text in rows of seq_len."""
    docs = [[tokenizer.bos_token_id, *tokenizer.encode(p)] for p in PARAGRAPHS]
    prompts = [d[:prompt_len] for d in docs[:n_prompts]]
    stream = [t for d in docs for t in d]
    n_rows = max(1, len(stream) // seq_len)
    width = min(seq_len, len(stream))
    return prompts, torch.tensor(stream[:n_rows * width]).view(n_rows, width)


def timed_paths(paths: dict[str, tuple[Engine, dict]], prompts: list[list[int]], new_tokens: int,
                repeats: int = 1) -> tuple[dict[str, dict], dict[str, list[list[int]]]]:
    """Greedy-decode every prompt on every path (an engine and its generate kwargs), batch 1;
    the paths are interleaved per repeat and the median repeat kept, so load on the machine hits
    every path alike. A path whose engine refuses its kwargs (ValueError) is dropped.
    Returns (per path: tokens/s and the mode's stats, per path: the generated ids)."""
    usable = {}
    for name, (engine, kw) in paths.items():  # warm-up at full length: compiled paths compile here
        try:
            engine.generate(prompts[0], max_new_tokens=new_tokens, stop_token_ids=[], **kw)
        except ValueError:
            continue
        usable[name] = (engine, kw)
    runs: dict[str, list[float]] = {name: [] for name in usable}
    stats: dict[str, list[dict]] = {}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(repeats):
        for name, (engine, kw) in usable.items():
            tokens = wall = 0
            stats[name], outputs[name] = [], []
            for prompt in prompts:
                out = engine.generate(prompt, max_new_tokens=new_tokens, stop_token_ids=[], **kw)
                tokens, wall = tokens + len(out.tokens), wall + out.stats["wall_s"]
                stats[name].append(out.stats)
                outputs[name].append(out.tokens)
            runs[name].append(tokens / wall)
    return {name: {"tokens_per_s": statistics.median(rs), "tokens_per_s_runs": rs, **summary(stats[name])}
            for name, rs in runs.items()}, outputs


def summary(stats: list[dict]) -> dict:
    """What a mode decided over the prompts: stages per token, WAND exits, speculative acceptance."""
    out = {"mean_stages_per_token": statistics.mean(s.get("mean_stages_per_token", 0) for s in stats),
           "ttft_s": statistics.median(s["time_to_first_token_s"] for s in stats),
           "tpot_s": statistics.median((s["wall_s"] - s["time_to_first_token_s"]) / max(s["new_tokens"] - 1, 1)
                                       for s in stats)}
    if "exit_stage_counts" in stats[0]:
        out["exit_stage_counts"] = [sum(c) for c in zip(*(s["exit_stage_counts"] for s in stats))]
    if "drafted" in stats[0]:
        out["acceptance"] = sum(s["accepted"] for s in stats) / max(sum(s["drafted"] for s in stats), 1)
        out["tokens_per_verify"] = (sum(s["new_tokens"] for s in stats) /
                                    max(sum(s["verify_passes"] for s in stats), 1))
    return out


@torch.no_grad()
def agreement(model: GPT, heldout: torch.Tensor, calib: dict, factor: float) -> dict:
    """Teacher-forced top-1 agreement with full depth of stage 0 and of WAND on heldout (B, T)."""
    final, stage_logits = model(heldout, return_stage_logits=True)
    full = final.argmax(-1)
    tf = wand_teacher_forced(model, heldout, calib, factor)
    return {"stage0": (stage_logits[0].argmax(-1) == full).float().mean().item(),
            "wand": (tf["pred"] == full).float().mean().item(),
            "wand_stages_per_token": tf["depth"].float().mean().item(), "tokens": heldout.numel()}


def poe_paths(model: GPT, tokenizer, calib: dict, gamma: int, wand_factor: float, bp_model: GPT | None = None,
              compile: bool = True, extra_modes: dict[str, dict] | None = None) -> dict[str, tuple[Engine, dict]]:
    """Every path to time: each mode eager and (with compile) compiled where the engine compiles
    it, every draft stage, extra_modes (name -> Engine.generate kwargs), the BP model's plain paths."""
    kinds = {"eager": False, **({"compiled": True} if compile else {})}
    modes = {"plain": dict(mode="final"), "stage0": dict(mode="stage", stage=0),
             "wand": dict(mode="wand", wand_factor=wand_factor),
             **{f"speculative_d{k}": dict(mode="speculative", draft_stage=k, gamma=gamma)
                for k in range(model.config.n_stages - 1)}, **(extra_modes or {})}
    paths = {}
    for kind, c in kinds.items():
        engine = Engine(model, tokenizer, calibration=calib, compile=c)
        paths.update({f"{name}:{kind}": (engine, dict(kw, add_bos=False))  # every prompt starts with <|bos|>
                      for name, kw in modes.items()})
        if bp_model is not None:
            paths[f"bp_plain:{kind}"] = (Engine(bp_model, tokenizer, compile=c), dict(mode="final", add_bos=False))
    return dict(sorted(paths.items(), key=lambda kv: list(modes).index(kv[0].split(":")[0])
                       if kv[0].split(":")[0] in modes else len(modes)))


def best_path(timing: dict[str, dict], mode: str) -> str | None:
    """The fastest measured path of a mode (eager or compiled)."""
    names = [n for n in timing if n.split(":")[0] == mode]
    return max(names, key=lambda n: timing[n]["tokens_per_s"]) if names else None


def set_report(timing: dict[str, dict], outputs: dict, agree: dict, model: GPT, wand_factor: float) -> dict:
    """One prompt set: every path, the best plain path and each mode's best path against it."""
    plain = best_path(timing, "plain")
    reference = outputs["plain:eager"]
    for name, row in timing.items():  # a sampled path (name@T) is compared with plain sampling
        sampled = "@" in name
        ref = best_path(timing, "plain@" + name.split("@")[1].split(":")[0]) if sampled else plain
        row["speedup"] = row["tokens_per_s"] / timing[ref or plain]["tokens_per_s"]
        row["identical_to_plain"] = None if sampled or name.startswith("bp_") else outputs[name] == reference
    cfg = model.config
    sweep = [dict(timing[p], draft_stage=k, path=p) for k in range(cfg.n_stages - 1)
             if (p := best_path(timing, f"speculative_d{k}"))]
    modes = {"plain": dict(timing[plain], path=plain, agreement=1.0)}
    if p := best_path(timing, "stage0"):
        modes["stage0"] = dict(timing[p], path=p, agreement=agree["stage0"],
                               note=f"layers run per token: {cfg.poe_stage_layers[0]} of {cfg.n_layer}")
    if p := best_path(timing, "wand"):
        modes["wand"] = dict(timing[p], path=p, agreement=agree["wand"],
                             note=f"mean stages per token {agree['wand_stages_per_token']:.2f} of {cfg.n_stages} "
                                  f"teacher-forced (F={wand_factor})")
    if sweep:
        modes["speculative"] = dict(max(sweep, key=lambda r: r["tokens_per_s"]))
        modes["speculative"]["note"] = f"best draft stage {modes['speculative']['draft_stage']}"
    out = {"best_plain": plain, "modes": modes, "speculative_sweep": sweep, "agreement": agree,
           "paths": {n: r for n, r in timing.items() if not n.startswith("bp_")}}
    if bp := best_path(timing, "bp_plain"):
        out["bp_plain"] = dict(timing[bp], path=bp)
    return out


def measure_sets(model: GPT, tokenizer, sets: dict[str, tuple], calib: dict, max_new_tokens: int = 128,
                 gamma: int = 4, wand_factor: float = 1.0, repeats: int = 3, bp_model: GPT | None = None,
                 threads: int = 1, compile: bool = True, extra_modes: dict[str, dict] | None = None) -> dict:
    """Time every path on each prompt set (name -> (prompts, held-out rows (B, T), source)) with
    `threads` torch threads, and measure agreement on the set's held-out rows."""
    paths = poe_paths(model, tokenizer, calib, gamma, wand_factor, bp_model, compile, extra_modes)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        report = {}
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for name, (prompts, heldout, source) in sets.items():
            timing, outputs = timed_paths(paths, prompts, max_new_tokens, repeats)
            agree = agreement(model, heldout, calib, wand_factor)
            report[name] = dict(set_report(timing, outputs, agree, model, wand_factor), source=source,
                                prompts=len(prompts), prompt_tokens=len(prompts[0]), max_new_tokens=max_new_tokens)
        cpu_share = (time.process_time() - cpu0) / (time.perf_counter() - wall0) / threads
    finally:
        torch.set_num_threads(saved_threads)
    return {"sets": report, "threads": threads, "repeats": repeats, "gamma": gamma, "cpu_share": cpu_share,
            "wand_bounds": calib["wand_bounds"]}


def measure_modes(model: GPT, tokenizer, data_dir: str, n_prompts: int = 4, max_new_tokens: int = 128,
                  prompt_len: int = 32, heldout_tokens: int = 2 ** 14, model_dir: str | Path | None = None,
                  **options) -> dict:
    """Every mode of a PoE model (and the BP model's plain paths, with bp_model=) on validation
    prompts and outside-text prompts (measure_sets' options). WAND is calibrated on the first half
    of heldout_tokens validation tokens (stored in model_dir if given, reused from there when
    present); agreement on the validation set is measured on the second half."""
    seq = min(model.config.sequence_len, 256)
    batches = heldout_batches(data_dir, tokenizer, seq, heldout_tokens)
    half = max(1, len(batches) // 2)
    calib = load_calibration(model_dir) if model_dir else None
    if calib is None:
        calib = calibrate(model, batches[:half])
        if model_dir:
            save_calibration(model_dir, calib)
    rest = batches[half:] or batches
    sets = {"validation": (prompts_from(rest, n_prompts, prompt_len), torch.cat(rest), "the validation split")}
    if tokenizer is not None:
        sets["outside"] = (*outside_set(tokenizer, seq, n_prompts, prompt_len), OUTSIDE_SOURCE)
    return measure_sets(model, tokenizer, sets, calib, max_new_tokens, **options)


def bp_refusals(model: GPT, tokenizer) -> dict[str, str]:
    """The error each PoE mode gives on a BP model (empty when the model is PoE)."""
    engine = Engine(model, tokenizer)
    prompt = [tokenizer.bos_token_id] if tokenizer is not None else [0]
    out = {}
    for mode, kw in {"stage": {"stage": 0}, "logop": {}, "wand": {"calibration": {"wand_bounds": [0.0] * model.config.n_stages}},
                     "speculative": {}}.items():
        try:
            engine.generate(prompt, mode=mode, max_new_tokens=1, **kw)
        except ValueError as e:
            out[mode] = str(e)
    return out
