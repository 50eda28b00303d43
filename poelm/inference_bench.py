"""Measure a PoE model's inference modes against plain decoding in one run: tokens/s and
speedup of stage 0 (prefix pruning), WAND and self-speculative decoding, top-1 agreement
with full depth on held-out text, acceptance and tokens per verify pass.

    from poelm.inference_bench import measure_modes
    report = measure_modes(model, tokenizer, "data/default", n_prompts=4, max_new_tokens=96)
    report["modes"]["speculative"]["speedup"]

Used by `poelm experiment` and benchmarks/decode.py. All modes decode the same prompts
greedily with the same number of new tokens; each mode is warmed up once before timing.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from poelm.engine import Engine, calibrate, load_calibration, save_calibration, wand_teacher_forced
from poelm.model import GPT


def heldout_batches(data_dir: str, tokenizer, seq_len: int, n_tokens: int, batch_size: int = 4) -> list:
    from poelm.dataloader import val_batches

    return [x for x, _ in val_batches(data_dir, tokenizer, batch_size, seq_len, n_tokens)]


def prompts_from(batches: list[torch.Tensor], n_prompts: int, prompt_len: int) -> list[list[int]]:
    rows = torch.cat(batches)[:n_prompts, :prompt_len]
    return [r.tolist() for r in rows]


def time_mode(engine: Engine, prompts: list[list[int]], **options) -> dict:
    engine.generate(prompts[0], **{**options, "max_new_tokens": 4})  # warm-up
    tokens, outputs, stats = 0, [], []
    t0 = time.perf_counter()
    for p in prompts:
        g = engine.generate(p, **options)
        outputs.append(g.tokens)
        stats.append(g.stats)
        tokens += len(g.tokens)
    wall = time.perf_counter() - t0
    return {"tokens_per_s": tokens / wall, "new_tokens": tokens, "wall_s": wall, "outputs": outputs, "stats": stats}


@torch.no_grad()
def top1_agreement(model: GPT, batches: list[torch.Tensor], stage: int) -> float:
    agree = total = 0
    for idx in batches:
        final, stage_logits = model(idx, return_stage_logits=True)
        agree += (stage_logits[stage].argmax(-1) == final.argmax(-1)).sum().item()
        total += idx.numel()
    return agree / total


def measure_modes(model: GPT, tokenizer, data_dir: str, n_prompts: int = 4, max_new_tokens: int = 96,
                  prompt_len: int = 32, gamma: int = 4, draft_stage: int = 0, wand_factor: float = 1.0,
                  heldout_tokens: int = 2 ** 14, model_dir: str | Path | None = None) -> dict:
    """Plain, stage 0, WAND and speculative greedy decoding of the same prompts, timed in
    this process; WAND is calibrated on held-out text (and stored in model_dir if given)."""
    seq = min(model.config.sequence_len, 256)
    batches = heldout_batches(data_dir, tokenizer, seq, heldout_tokens)
    prompts = prompts_from(batches, n_prompts, prompt_len)
    calib = load_calibration(model_dir) if model_dir else None
    if calib is None:
        calib = calibrate(model, batches)
        if model_dir:
            save_calibration(model_dir, calib)
    engine = Engine(model, tokenizer, calibration=calib)
    common = dict(max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=[], add_bos=False)
    plain = time_mode(engine, prompts, mode="final", **common)
    runs = {
        "stage0": time_mode(engine, prompts, mode="stage", stage=0, **common),
        "wand": time_mode(engine, prompts, mode="wand", wand_factor=wand_factor, **common),
    }
    wand_tf = [wand_teacher_forced(model, idx, calib, wand_factor) for idx in batches]
    wand_agree = sum((r["pred"] == r["full"]).sum().item() for r in wand_tf) / sum(r["pred"].numel() for r in wand_tf)
    wand_depth = sum(r["depth"].float().sum().item() for r in wand_tf) / sum(r["depth"].numel() for r in wand_tf)
    modes = {"plain": {"tokens_per_s": plain["tokens_per_s"], "speedup": 1.0, "agreement": 1.0}}
    modes["stage0"] = {"tokens_per_s": runs["stage0"]["tokens_per_s"],
                       "agreement": top1_agreement(model, batches, 0),
                       "note": f"layers run per token: {model.config.poe_stage_layers[0]} of {model.config.n_layer}"}
    modes["wand"] = {"tokens_per_s": runs["wand"]["tokens_per_s"], "agreement": wand_agree,
                     "note": f"mean stages per token {wand_depth:.2f} of {model.config.n_stages} (F={wand_factor})",
                     "identical_to_plain": runs["wand"]["outputs"] == plain["outputs"]}
    # speculative: every draft stage is measured; `modes` reports the requested one
    sweep = []
    for stage in sorted({draft_stage, *range(model.config.n_stages - 1)}):
        run = time_mode(engine, prompts, mode="speculative", draft_stage=stage, gamma=gamma, **common)
        sweep.append(speculative_summary(run, plain, stage, gamma))
    modes["speculative"] = next(s for s in sweep if s["draft_stage"] == draft_stage)
    for m in modes.values():
        m["speedup"] = m["tokens_per_s"] / plain["tokens_per_s"]
    return {"modes": modes, "speculative_sweep": sweep, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
            "wand_bounds": calib["wand_bounds"]}


def speculative_summary(run: dict, plain: dict, draft_stage: int, gamma: int) -> dict:
    accepted = [s["acceptance_rate"] for s in run["stats"] if s.get("acceptance_rate") is not None]
    per_verify = [s["tokens_per_verify"] for s in run["stats"] if s.get("tokens_per_verify") is not None]
    return {"tokens_per_s": run["tokens_per_s"], "speedup": run["tokens_per_s"] / plain["tokens_per_s"],
            "draft_stage": draft_stage, "gamma": gamma,
            "acceptance": sum(accepted) / len(accepted) if accepted else None,
            "tokens_per_verify": sum(per_verify) / len(per_verify) if per_verify else None,
            "identical_to_plain": run["outputs"] == plain["outputs"],
            "note": f"draft stage {draft_stage}, gamma {gamma}"}


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
