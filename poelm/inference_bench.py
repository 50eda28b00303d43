"""Measure a PoE model's inference modes against plain decoding in one run: tokens/s and
speedup of stage 0 (prefix pruning), WAND and self-speculative decoding, top-1 agreement
with full depth on held-out text, acceptance and tokens per verify pass.

    from poelm.inference_bench import measure_modes
    report = measure_modes(model, tokenizer, "data/default", n_prompts=4, max_new_tokens=96)
    report["modes"]["speculative"]["speedup"]

Used by `poelm experiment` and benchmarks/decode.py. All modes decode the same prompts
greedily with the same number of new tokens; each mode is warmed up once, then the modes
are timed interleaved (median of `repeats`).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from poelm.contention import CpuClock
from poelm.engine import (Engine, calibrate, capabilities, load_calibration, modes_with, save_calibration,
                          wand_teacher_forced)
from poelm.model import GPT
from poelm.progress import progress


def heldout_batches(data_dir: str, tokenizer, seq_len: int, n_tokens: int, batch_size: int = 4) -> list:
    from poelm.dataloader import val_batches

    return [x for x, _ in val_batches(data_dir, tokenizer, batch_size, seq_len, n_tokens)]


def prompts_from(batches: list[torch.Tensor], n_prompts: int, prompt_len: int) -> list[list[int]]:
    rows = torch.cat(batches)[:n_prompts, :prompt_len]
    return [r.tolist() for r in rows]


def timed_modes(engine: Engine, prompts: list[list[int]], modes: dict[str, dict], new_tokens: int,
                repeats: int = 1, show_progress: bool = False) -> dict[str, dict]:
    """Greedy-decode every prompt in every mode (kwargs of Engine.generate per mode name);
    the modes are interleaved per repeat and the median repeat is kept, so load on the
    machine hits every mode alike. result["_outputs"][name] holds the generated ids. show_progress:
    plain progress lines when stdout is not a terminal (poelm.progress)."""
    for kw in modes.values():  # warm-up
        engine.generate(prompts[0], max_new_tokens=8, stop_token_ids=[], **kw)
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    outputs: dict[str, list[list[int]]] = {}
    with progress("inference timing", repeats * len(modes) * len(prompts), enabled=show_progress, tokens_per_item=new_tokens,
                  final=False) as shown:
        done = 0
        for _ in range(repeats):
            for name, kw in modes.items():
                tokens = wall = 0
                stats, outs = [], []
                for prompt in prompts:
                    out = engine.generate(prompt, max_new_tokens=new_tokens, stop_token_ids=[], **kw)
                    tokens, wall = tokens + len(out.tokens), wall + out.stats["wall_s"]
                    stats.append(out.stats)
                    outs.append(out.tokens)
                    done += 1
                    shown.update(done, name)
                runs[name].append({"tokens_per_s": tokens / wall, "stats": stats})
                outputs[name] = outs
    result = {}
    for name, rs in runs.items():
        stats = rs[0]["stats"]
        entry = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                 "tokens_per_s_runs": [r["tokens_per_s"] for r in rs],
                 "mean_layers_per_token": statistics.mean(s.get("mean_layers_per_token", 0) for s in stats),
                 "mean_layer_calls_per_token": statistics.mean(s.get("mean_layer_calls_per_token", 0) for s in stats),
                 "mean_stages_per_token": statistics.mean(s.get("mean_stages_per_token", 0) for s in stats)}
        if modes[name].get("mode") == "speculative":
            drafted = sum(s["drafted"] for s in stats)
            entry["acceptance_rate"] = sum(s["accepted"] for s in stats) / max(drafted, 1)
            entry["tokens_per_verify"] = sum(s["new_tokens"] for s in stats) / sum(s["verify_passes"] for s in stats)
        result[name] = entry
    result["_outputs"] = outputs
    return result


@torch.no_grad()
def agreement(model: GPT, heldout: torch.Tensor, calib: dict, factor: float) -> dict:
    """Teacher-forced top-1 agreement with full depth of stage 0 and of WAND on heldout (B, T)."""
    final, stage_logits = model(heldout, return_stage_logits=True)
    full = final.argmax(-1)
    tf = wand_teacher_forced(model, heldout, calib, factor)
    return {"stage0_top1_agreement": (stage_logits[0].argmax(-1) == full).float().mean().item(),
            "wand_top1_agreement": (tf["pred"] == full).float().mean().item(),
            "wand_teacher_forced_stages_per_token": tf["depth"].float().mean().item()}


def measure_modes(model: GPT, tokenizer, data_dir: str, n_prompts: int = 4, max_new_tokens: int = 96,
                  prompt_len: int = 32, gamma: int = 4, draft_stage: int = 0, wand_factor: float = 1.0,
                  heldout_tokens: int = 2 ** 14, model_dir: str | Path | None = None, repeats: int = 1,
                  show_progress: bool = False) -> dict:
    """Plain, stage 0, WAND and speculative greedy decoding (every draft stage) of the same
    prompts, timed in this process (result["cpu"]: the timed span's CPU share of wall x threads and
    whether other processes contended for the cores, poelm.contention); WAND is calibrated on held-out text (and stored in
    model_dir if given). modes["speculative"] is the requested draft stage."""
    seq = min(model.config.sequence_len, 256)
    batches = heldout_batches(data_dir, tokenizer, seq, heldout_tokens)
    prompts = prompts_from(batches, n_prompts, prompt_len)
    calib = load_calibration(model_dir) if model_dir else None
    if calib is None:
        calib = calibrate(model, batches)
        if model_dir:
            save_calibration(model_dir, calib)
    engine = Engine(model, tokenizer, calibration=calib)
    draft_stages = sorted({draft_stage, *range(model.config.n_stages - 1)})
    modes = {"plain": dict(mode="final"), "stage0": dict(mode="stage", stage=0),
             "wand": dict(mode="wand", wand_factor=wand_factor),
             **{f"speculative_d{k}": dict(mode="speculative", draft_stage=k, gamma=gamma) for k in draft_stages}}
    for kw in modes.values():
        kw["add_bos"] = False  # held-out rows already start with <|bos|>
    clock = CpuClock.start()
    timing = timed_modes(engine, prompts, modes, max_new_tokens, repeats, show_progress)
    cpu = clock.report(torch.get_num_threads()) if engine.device.type == "cpu" else {}  # contended? (CPU only)
    outputs = timing.pop("_outputs")
    agree = agreement(model, torch.cat(batches), calib, wand_factor)
    base = timing["plain"]["tokens_per_s"]
    cfg = model.config
    result = {
        "plain": {"tokens_per_s": base, "agreement": 1.0},
        "stage0": {"tokens_per_s": timing["stage0"]["tokens_per_s"], "agreement": agree["stage0_top1_agreement"],
                   "note": f"layers run per token: {cfg.poe_stage_layers[0]} of {cfg.n_layer}"},
        "wand": {"tokens_per_s": timing["wand"]["tokens_per_s"], "agreement": agree["wand_top1_agreement"],
                 "identical_to_plain": outputs["wand"] == outputs["plain"],
                 "note": f"mean stages per token {agree['wand_teacher_forced_stages_per_token']:.2f} of "
                         f"{cfg.n_stages} (F={wand_factor})"},
    }
    sweep = [{"draft_stage": k, "gamma": gamma, "tokens_per_s": timing[f"speculative_d{k}"]["tokens_per_s"],
              "acceptance": timing[f"speculative_d{k}"]["acceptance_rate"],
              "tokens_per_verify": timing[f"speculative_d{k}"]["tokens_per_verify"],
              "identical_to_plain": outputs[f"speculative_d{k}"] == outputs["plain"],
              "note": f"draft stage {k}, gamma {gamma}"} for k in draft_stages]
    for row in [*result.values(), *sweep]:
        row["speedup"] = row["tokens_per_s"] / base
    result["speculative"] = next(r for r in sweep if r["draft_stage"] == draft_stage)
    return {"modes": result, "speculative_sweep": sweep, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
            "wand_bounds": calib["wand_bounds"], "cpu": cpu}


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
