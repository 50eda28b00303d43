"""Measure a PoE model's inference modes against the best plain path in one run: tokens/s of
plain, stage 0 (prefix pruning), WAND (its cost gate deciding which exit tests run) and
self-speculative decoding (every fixed draft stage, and adaptive: draft stage and gamma chosen
per pass from measured acceptance and costs), each eager and compiled, on two prompt sets: the
validation split and English text from outside the corpus (poelm.outside_text). Every speedup
is over the faster plain path of the same run; agreement is teacher-forced top-1 agreement with
full depth on held-out text of the set (the WAND bounds and decode costs are calibrated on other
validation tokens, at the threads the paths are timed with).

Beside the greedy batch-1 paths, two settings of the best fixed speculative path: sampled at
SAMPLED_TEMPERATURE ("name@T0.8": exact in distribution; against plain sampling at that
temperature, same seeds and prompts) and batched ("name@B8": BATCH_SIZE prompts decoded
together; against plain decoding of the same batch), each timed beside its own plain path on
the kind (eager or compiled) of the best plain path and of the best speculative path.

    from poelm.inference_bench import measure_modes
    report = measure_modes(model, tokenizer, "data/default", n_prompts=4, max_new_tokens=128)
    report["sets"]["outside"]["modes"]["speculative"]["speedup"]

Used by `poelm experiment` and benchmarks/decode.py. All paths decode the same prompts, one
torch thread, the same number of new tokens (greedy and batch 1 unless their name says @T or
@B); each path is warmed up with a full-length generation (a compiled path compiles there),
then the paths of one setting are timed interleaved, median of `repeats`. A path the engine
refuses (ValueError: e.g. speculative on a model whose final readout is a Log-OP) is left out.
report["cpu"] says whether other processes took the cores while timing (poelm.contention).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from poelm.contention import CpuClock
from poelm.engine import (Engine, calibrate, capabilities, load_calibration, modes_with, save_calibration,
                          wand_teacher_forced)
from poelm.model import GPT
from poelm.outside_text import PARAGRAPHS
from poelm.progress import progress

OUTSIDE_SOURCE = "poelm/outside_text.py (English prose outside the corpus)"
SAMPLED_TEMPERATURE = 0.8  # the sampled setting's temperature
SAMPLING_SEED = 0  # every sampled path starts every prompt from this seed
BATCH_SIZE = 8  # prompts decoded together in the batched setting


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


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU threads set to n inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def timed_paths(paths: dict[str, tuple[Engine, dict]], prompts: list[list[int]], new_tokens: int,
                repeats: int = 1, show_progress: bool = False,
                batch: int = 1) -> tuple[dict[str, dict], dict[str, list[list[int]]]]:
    """Decode every prompt on every path (an engine and its generate kwargs), `batch` prompts
    per generate call; the paths are interleaved per repeat and the median repeat kept, so load
    on the machine hits every path alike. A path whose engine refuses its kwargs (ValueError) is
    dropped. show_progress: plain progress lines when stdout is not a terminal (poelm.progress).
    Returns (per path: tokens/s and the mode's stats, per path: the generated ids per prompt)."""
    calls = [prompts[i:i + batch] for i in range(0, len(prompts), batch)] if batch > 1 else prompts
    usable = {}
    for name, (engine, kw) in paths.items():  # warm-up at full length: compiled paths compile here
        try:
            engine.generate(calls[0], max_new_tokens=new_tokens, stop_token_ids=[], **kw)
        except ValueError:
            continue
        usable[name] = (engine, kw)
    runs: dict[str, list[float]] = {name: [] for name in usable}
    stats: dict[str, list[dict]] = {}
    outputs: dict[str, list[list[int]]] = {}
    with progress("inference timing", repeats * len(usable) * len(calls), enabled=show_progress,
                  tokens_per_item=new_tokens * batch, final=False) as shown:
        done = 0
        for _ in range(repeats):
            for name, (engine, kw) in usable.items():
                tokens = wall = 0
                stats[name], outputs[name] = [], []
                for call in calls:
                    out = engine.generate(call, max_new_tokens=new_tokens, stop_token_ids=[], **kw)
                    rows = out if batch > 1 else [out]  # a batch's rows share its decoder's stats and wall time
                    n_new = sum(len(g.tokens) for g in rows)
                    tokens, wall = tokens + n_new, wall + rows[0].stats["wall_s"]
                    stats[name].append(dict(rows[0].stats, new_tokens=n_new))
                    outputs[name] += [g.tokens for g in rows]
                    done += 1
                    shown.update(done, name)
                runs[name].append(tokens / wall)
    return {name: {"tokens_per_s": statistics.median(rs), "tokens_per_s_runs": rs, **summary(stats[name])}
            for name, rs in runs.items()}, outputs


def summary(stats: list[dict]) -> dict:
    """What a mode did over the generate calls (one stats dict each; new_tokens: of every row of
    the call): stages and layers per token, TTFT/TPOT (TPOT per step of a row); WAND: its exits
    and which exit tests its cost gate ran (and why); speculative: acceptance, and adaptive: the
    (draft stage, gamma) each prompt ended on and how many passes fell back to plain."""
    out = {"mean_stages_per_token": statistics.mean(s.get("mean_stages_per_token", 0) for s in stats),
           "mean_layers_per_token": statistics.mean(s.get("mean_layers_per_token", 0) for s in stats),
           "ttft_s": statistics.median(s["time_to_first_token_s"] for s in stats),
           "tpot_s": statistics.median((s["wall_s"] - s["time_to_first_token_s"])
                                       / max(s["new_tokens"] / s.get("batch_size", 1) - 1, 1) for s in stats),
           "batch_size": stats[0].get("batch_size", 1)}
    if "exit_stage_counts" in stats[0]:
        out["exit_stage_counts"] = [sum(c) for c in zip(*(s["exit_stage_counts"] for s in stats))]
        out["wand_tested_stages"], out["wand_reason"] = stats[0]["wand_tested_stages"], stats[0]["wand_reason"]
    if "drafted" in stats[0]:
        out["acceptance"] = sum(s["accepted"] for s in stats) / max(sum(s["drafted"] for s in stats), 1)
        out["tokens_per_verify"] = (sum(s["new_tokens"] for s in stats) /
                                    max(sum(s["verify_passes"] for s in stats), 1))
    choices = [s["speculative_choice"] for s in stats if s.get("speculative_choice")]
    if choices:
        out["adaptive"] = {"last_choice": [[c["draft_stage"], c["gamma"]] for c in choices],
                           "passes": sum(c["passes"] for c in choices),
                           "fallback_passes": sum(c["fallback_passes"] for c in choices),
                           "probes": sum(c["probes"] for c in choices)}
    return out


@torch.no_grad()
def agreement(model: GPT, heldout: torch.Tensor, calib: dict, factor: float,
              wand_stages: list[int] | None = None) -> dict:
    """Teacher-forced top-1 agreement with full depth on heldout (B, T): of stage 0, of WAND as
    its cost gate runs it (exit tests at wand_stages only; None: every stage), and of WAND under
    the bounds alone (every stage tested)."""
    final, stage_logits = model(heldout, return_stage_logits=True)
    full = final.argmax(-1)
    gated = wand_teacher_forced(model, heldout, calib, factor, stages=wand_stages)
    bounds = wand_teacher_forced(model, heldout, calib, factor)
    return {"stage0": (stage_logits[0].argmax(-1) == full).float().mean().item(),
            "wand": (gated["pred"] == full).float().mean().item(),
            "wand_stages_per_token": gated["depth"].float().mean().item(),
            "wand_bounds_only": (bounds["pred"] == full).float().mean().item(),
            "wand_bounds_only_stages_per_token": bounds["depth"].float().mean().item(), "tokens": heldout.numel()}


def poe_paths(model: GPT, tokenizer, calib: dict, gamma: int, wand_factor: float, bp_model: GPT | None = None,
              compile: bool = True, extra_modes: dict[str, dict] | None = None) -> dict[str, tuple[Engine, dict]]:
    """Every path to time: each mode eager and (with compile) compiled, speculative from every
    draft stage with a fixed gamma and adaptive (gamma its largest), extra_modes (name ->
    Engine.generate kwargs), the BP model's plain paths."""
    kinds = {"eager": False, **({"compiled": True} if compile else {})}
    modes = {"plain": dict(mode="final"), "stage0": dict(mode="stage", stage=0),
             "wand": dict(mode="wand", wand_factor=wand_factor),
             **{f"speculative_d{k}": dict(mode="speculative", draft_stage=k, gamma=gamma)
                for k in range(model.config.n_stages - 1)},
             "speculative_adaptive": dict(mode="speculative", adaptive=True, gamma=gamma), **(extra_modes or {})}
    paths = {}
    for kind, c in kinds.items():
        engine = Engine(model, tokenizer, calibration=calib, compile=c)
        paths.update({f"{name}:{kind}": (engine, dict(kw, add_bos=False))  # every prompt starts with <|bos|>
                      for name, kw in modes.items()})
        if bp_model is not None:
            paths[f"bp_plain:{kind}"] = (Engine(bp_model, tokenizer, compile=c), dict(mode="final", add_bos=False))
    return dict(sorted(paths.items(), key=lambda kv: list(modes).index(kv[0].split(":")[0])
                       if kv[0].split(":")[0] in modes else len(modes)))


def weight_bytes(model: GPT, n_layers: int | None = None) -> int:
    """Bytes of weights a batch-1 decode step reads: the first n_layers blocks (default all) and
    the lm_head (the embedding and value-embedding rows it reads are negligible)."""
    blocks = model.transformer.h[: n_layers or model.config.n_layer]
    n = sum(p.numel() * p.element_size() for p in blocks.parameters())
    return n + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def best_path(timing: dict[str, dict], mode: str) -> str | None:
    """The fastest measured path of a mode (eager or compiled)."""
    names = [n for n in timing if n.split(":")[0] == mode]
    return max(names, key=lambda n: timing[n]["tokens_per_s"]) if names else None


def wand_gate(row: dict) -> str:
    """What WAND's cost gate decided on a path: the stages it tests, or plain."""
    tested = row.get("wand_tested_stages") or []
    return f"exit tests at stage(s) {', '.join(map(str, tested))}" if tested else "no exit test pays: decodes as plain"


def setting_of(name: str) -> str | None:
    """The setting of a path name ("speculative_d1@T0.8:compiled" -> "T0.8"); None: greedy, batch 1."""
    mode = name.split(":")[0]
    return mode.split("@")[1] if "@" in mode else None


def identical(name: str, outputs: dict, reference: list[list[int]]) -> bool | None:
    """Whether a path's tokens equal its reference's: greedy batch 1, eager plain's; batched,
    plain's of the same batch and kind (None for that plain path itself); sampled and the BP
    model's paths: None (sampling is exact in distribution, not in tokens)."""
    setting = setting_of(name)
    if name.startswith("bp_") or (setting or "").startswith("T"):
        return None
    if setting is None:
        return outputs[name] == reference
    same_batch = f"plain@{setting}:{name.split(':')[1]}"
    return None if name == same_batch else outputs[name] == outputs[same_batch]


def setting_modes(timing: dict[str, dict]) -> dict[str, dict]:
    """The speculative path of each setting (sampled, batched) with the plain path it is compared with."""
    modes = {}
    for key, prefix in (("speculative_sampled", "T"), ("speculative_batched", "B")):
        names = [n for n in timing if (setting_of(n) or "").startswith(prefix) and n.startswith("speculative")]
        if names:
            p = max(names, key=lambda n: timing[n]["tokens_per_s"])
            base = best_path(timing, f"plain@{setting_of(p)}")
            modes[key] = dict(timing[p], path=p, draft_stage=int(p.split("@")[0].removeprefix("speculative_d")),
                              baseline=base, baseline_tokens_per_s=timing[base]["tokens_per_s"])
    return modes


def set_report(timing: dict[str, dict], outputs: dict, agree: dict, model: GPT, wand_factor: float) -> dict:
    """One prompt set: every path, the best plain path and each mode's best path against it
    (a sampled or batched path: against the best plain path of its setting)."""
    plain = best_path(timing, "plain")
    reference = outputs["plain:eager"]
    for name, row in timing.items():
        setting = setting_of(name)
        ref = best_path(timing, f"plain@{setting}") if setting else plain
        row["speedup"] = row["tokens_per_s"] / timing[ref]["tokens_per_s"]
        row["identical_to_plain"] = identical(name, outputs, reference)
    cfg = model.config
    sweep = [dict(timing[p], draft_stage=k, path=p) for k in range(cfg.n_stages - 1)
             if (p := best_path(timing, f"speculative_d{k}"))]
    modes = {"plain": dict(timing[plain], path=plain, agreement=1.0)}
    if p := best_path(timing, "stage0"):
        modes["stage0"] = dict(timing[p], path=p, agreement=agree["stage0"],
                               note=f"layers run per token: {cfg.poe_stage_layers[0]} of {cfg.n_layer}")
    if p := best_path(timing, "wand"):
        modes["wand"] = dict(timing[p], path=p, agreement=agree["wand"], gate=wand_gate(timing[p]),
                             note=f"{wand_gate(timing[p])}; mean stages per token "
                                  f"{agree['wand_stages_per_token']:.2f} of {cfg.n_stages} teacher-forced "
                                  f"(F={wand_factor}; the bounds alone: {agree['wand_bounds_only_stages_per_token']:.2f}"
                                  f" at {100 * agree['wand_bounds_only']:.1f} % agreement)")
    if sweep:
        modes["speculative"] = dict(max(sweep, key=lambda r: r["tokens_per_s"]))
        modes["speculative"]["note"] = f"best fixed draft stage {modes['speculative']['draft_stage']}"
    if p := best_path(timing, "speculative_adaptive"):
        modes["speculative_adaptive"] = dict(timing[p], path=p)
    modes.update(setting_modes(timing))
    out = {"best_plain": plain, "modes": modes, "speculative_sweep": sweep, "agreement": agree,
           "paths": {n: r for n, r in timing.items() if not n.startswith("bp_")}}
    if bp := best_path(timing, "bp_plain"):
        out["bp_plain"] = dict(timing[bp], path=bp)
    return out


def setting_paths(paths: dict[str, tuple[Engine, dict]], timing: dict[str, dict], prompts: list[list[int]],
                  n_prompts: int, batch_size: int) -> dict[str, tuple[list[list[int]], int, dict]]:
    """The sampled and batched settings after the greedy batch-1 timing: setting -> (its prompts,
    prompts per generate call, its paths): plain and the fastest fixed speculative path's draft
    stage, on the kinds (eager / compiled) of the best plain and the best speculative path. The
    batched setting needs at least 2 prompts."""
    spec = max((n for n in timing if n.startswith("speculative_d")), key=lambda n: timing[n]["tokens_per_s"], default=None)
    if spec is None:
        return {}
    modes = ("plain", spec.split(":")[0])
    kinds = sorted({best_path(timing, "plain").split(":")[1], spec.split(":")[1]})
    sampled = dict(temperature=SAMPLED_TEMPERATURE, seed=SAMPLING_SEED)
    batch = min(batch_size, len(prompts))
    settings = {f"T{SAMPLED_TEMPERATURE:g}": (prompts[:n_prompts], 1, sampled)}
    if batch >= 2:
        settings[f"B{batch}"] = (prompts[:batch], batch, {})
    return {setting: (rows, per_call, {f"{m}@{setting}:{k}": (paths[f"{m}:{k}"][0], dict(paths[f"{m}:{k}"][1], **kw))
                                       for k in kinds for m in modes})
            for setting, (rows, per_call, kw) in settings.items()}


def measure_sets(model: GPT, tokenizer, sets: dict[str, tuple], calib: dict, max_new_tokens: int = 128,
                 gamma: int = 4, wand_factor: float = 1.0, repeats: int = 3, bp_model: GPT | None = None,
                 threads: int = 1, compile: bool = True, extra_modes: dict[str, dict] | None = None,
                 show_progress: bool = False, n_prompts: int | None = None, batch_size: int = BATCH_SIZE) -> dict:
    """Time every path on each prompt set (name -> (prompts, held-out rows (B, T), source)) with
    `threads` torch threads: greedy batch 1 on the first n_prompts prompts (None: all), then the
    sampled setting on those and the batched one on the first batch_size (setting_paths); and
    measure agreement on the set's held-out rows (WAND's at the exit tests its gate ran)."""
    paths = poe_paths(model, tokenizer, calib, gamma, wand_factor, bp_model, compile, extra_modes)
    report = {}
    with torch_threads(threads):
        clock = CpuClock.start()
        for name, (prompts, heldout, source) in sets.items():
            n_timed = n_prompts or len(prompts)
            timing, outputs = timed_paths(paths, prompts[:n_timed], max_new_tokens, repeats, show_progress)
            for rows, per_call, setting in setting_paths(paths, timing, prompts, n_timed, batch_size).values():
                t, o = timed_paths(setting, rows, max_new_tokens, repeats, show_progress, per_call)
                timing.update(t), outputs.update(o)
            tested = next((r["wand_tested_stages"] for n, r in timing.items() if n.split(":")[0] == "wand"), None)
            agree = agreement(model, heldout, calib, wand_factor, tested)
            report[name] = dict(set_report(timing, outputs, agree, model, wand_factor), source=source,
                                prompts=n_timed, prompt_tokens=len(prompts[0]), max_new_tokens=max_new_tokens,
                                sampled={"temperature": SAMPLED_TEMPERATURE, "seed": SAMPLING_SEED, "prompts": n_timed},
                                batch_size=min(batch_size, len(prompts)))
        cpu = clock.report(threads) if model.lm_head.weight.device.type == "cpu" else {}  # contended? (CPU only)
    stage0_layers = model.config.stage_ends[0] + 1
    return {"sets": report, "threads": threads, "repeats": repeats, "gamma": gamma, "cpu": cpu,
            "wand_bounds": calib["wand_bounds"], "decode_costs": calib.get("decode_costs"),
            "weight_bytes": {"stage0": weight_bytes(model, stage0_layers), "full": weight_bytes(model),
                             "stage0_layers": stage0_layers, "n_layer": model.config.n_layer}}


def bench_calibration(model: GPT, batches: list[torch.Tensor], model_dir: str | Path | None, threads: int) -> dict:
    """The calibration stored in model_dir when its decode costs were measured at `threads`
    threads, else a new one from batches (bounds, exit rates and costs measured now, at those
    threads), stored in model_dir if given."""
    calib = load_calibration(model_dir) if model_dir else None
    if calib is None or (calib.get("decode_costs") or {}).get("threads") != threads:
        with torch_threads(threads):
            calib = calibrate(model, batches)
        if model_dir:
            save_calibration(model_dir, calib)
    return calib


def measure_modes(model: GPT, tokenizer, data_dir: str, n_prompts: int = 4, max_new_tokens: int = 128,
                  prompt_len: int = 32, heldout_tokens: int = 2 ** 14, model_dir: str | Path | None = None,
                  threads: int = 1, **options) -> dict:
    """Every mode of a PoE model (and the BP model's plain paths, with bp_model=) on validation
    prompts and outside-text prompts (measure_sets' options). WAND and the adaptive speculative
    decoder use a calibration of the first half of heldout_tokens validation tokens
    (bench_calibration); agreement on the validation set is measured on the second half."""
    seq = min(model.config.sequence_len, 256)
    batches = heldout_batches(data_dir, tokenizer, seq, heldout_tokens)
    half = max(1, len(batches) // 2)
    calib = bench_calibration(model, batches[:half], model_dir, threads)
    rest = batches[half:] or batches
    wanted = max(n_prompts, options.get("batch_size", BATCH_SIZE))  # the batched setting's prompts too
    sets = {"validation": (prompts_from(rest, wanted, prompt_len), torch.cat(rest), "the validation split")}
    if tokenizer is not None:
        sets["outside"] = (*outside_set(tokenizer, seq, wanted, prompt_len), OUTSIDE_SOURCE)
    return measure_sets(model, tokenizer, sets, calib, max_new_tokens, threads=threads, n_prompts=n_prompts, **options)


def bp_refusals(model: GPT, tokenizer) -> dict[str, str]:
    """The error each PoE mode (one that reads out stages) gives on a BP model (empty when the
    model is PoE)."""
    engine = Engine(model, tokenizer)
    prompt = [tokenizer.bos_token_id] if tokenizer is not None else [0]
    out = {}
    for mode in modes_with(needs_stages=True):
        needs_bounds = capabilities(mode).needs_calibration
        kw = {"calibration": {"wand_bounds": [0.0] * model.config.n_stages}} if needs_bounds else {}
        try:
            engine.generate(prompt, mode=mode, max_new_tokens=1, **kw)
        except ValueError as e:
            out[mode] = str(e)
    return out
