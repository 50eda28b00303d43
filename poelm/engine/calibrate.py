"""WAND calibration (per-stage swing bounds, docs/poe.md §4) with what the modes' cost models
need (teacher-forced exit rates and stage agreement, the measured cost of every stage and exit
test on this machine), its storage in generation_config.json, the exit rule and the
teacher-forced WAND decision.

    from poelm.engine import calibrate, save_calibration
    calib = calibrate(model, batches); save_calibration("runs/tiny", calib)
    measure_costs(model)["stage_s"]                  # K x [seconds at 1 position, at 8]
    poelm calibrate MODEL --data DIR
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from poelm.atomic import atomic_write_json
from poelm.checkpoint import GENERATION_CONFIG_NAME, resolve_run_dir
from poelm.engine.options import CALIBRATION_KEYS, WAND_TARGETS, _check, refuse_bp
from poelm.engine.sampling import top_gap
from poelm.engine.speculative import decode_costs
from poelm.engine.wand import wand_exit_rule
from poelm.jsonfile import check_field, read_json_object
from poelm.outputs import amending
from poelm.model import GPT, logop_weight


def running_readouts(stage_logits: list[torch.Tensor], final_logits: torch.Tensor, target: str,
                     alpha: float) -> list[torch.Tensor]:
    """r_0 ... r_{K-1} in the target readout's space (each (..., V)).

    target "final": r_k = z_k for k < K-1 and r_{K-1} = the final readout. target "logop":
    r_k = sum_{j<=k} w l_j, the running (unnormalised) Log-OP of all K stages. Only logit
    differences matter for the exit rule, so unnormalised is fine."""
    K = len(stage_logits)
    if target == "final":
        return stage_logits[:-1] + [final_logits]
    w = logop_weight(K, alpha)
    out, r = [], 0
    for z in stage_logits:
        r = r + w * z.log_softmax(-1)
        out.append(r)
    return out


def stage_swings(running: list[torch.Tensor]) -> list[torch.Tensor]:
    """For j >= 1: max_v [(r_j - r_{j-1})[v] - (r_j - r_{j-1})[a]], a = argmax r_{j-1}: K-1 tensors (...)."""
    swings = []
    for prev, cur in zip(running[:-1], running[1:]):
        delta = cur - prev
        leader = prev.argmax(-1, keepdim=True)
        swings.append(delta.max(-1).values - delta.gather(-1, leader).squeeze(-1))
    return swings


@torch.inference_mode()
def calibrate(model: GPT, token_batches: Iterable, quantile: float = 0.99, target: str = "final",
              logop_alpha: float | None = None, max_tokens: int | None = None, force: bool = False,
              chunk: int = 512) -> dict:
    """Per-stage WAND swing bounds b_j (docs/poe.md §4) from calibration text.

    token_batches yields LongTensor (B, T) (or (inputs, targets) pairs). Returns the dict stored
    in generation_config.json: {"wand_bounds": [0.0, b_1, ..., b_{K-1}], "wand_quantile",
    "wand_target", "wand_calibration_tokens", "wand_exit_rates": {"factors": EXIT_RATE_FACTORS,
    "rates": per factor, P(exit at k | reached k) for k < K-1 under teacher forcing},
    "stage_agreement": how often z_k's argmax is the final readout's (k < K-1),
    "decode_costs": measure_costs(model) with speculative_overhead_s (speculative.decode_costs)}."""
    refuse_bp(model, "WAND calibration", force)
    _check(0 < quantile <= 1, f"quantile must lie in (0, 1], got {quantile!r}")
    _check(target in WAND_TARGETS, f"WAND target must be one of {', '.join(WAND_TARGETS)}, got {target!r}")
    cfg = model.config
    K = cfg.n_stages
    _check(K >= 2, "WAND needs a model with at least 2 stages")
    alpha = cfg.poe_alpha if logop_alpha is None else logop_alpha
    device = model.lm_head.weight.device
    swings: list[list[torch.Tensor]] = [[] for _ in range(K - 1)]
    gaps: list[list[torch.Tensor]] = [[] for _ in range(K - 1)]
    agree = [0] * (K - 1)
    n_tokens = 0
    for batch in token_batches:
        idx = batch[0] if isinstance(batch, (tuple, list)) else batch
        idx = idx.to(device)
        stage_x, x_mid = model.trunk(idx)
        d = stage_x[0].shape[-1]
        flat_x = [x.reshape(-1, d) for x in stage_x]
        flat_mid = x_mid.reshape(-1, d) if x_mid is not None else None
        for s in range(0, flat_x[0].shape[0], chunk):
            xs = [x[s:s + chunk] for x in flat_x]
            zs = [model.readout(x, k) for k, x in enumerate(xs)]  # K x (n, V)
            mid = flat_mid[s:s + chunk] if flat_mid is not None else None
            final = model.readout(xs[-1], None, mid, xs)
            running = running_readouts(zs, final, target, alpha)
            for j, sw in enumerate(stage_swings(running)):
                swings[j].append(sw.float().cpu())
            leader = final.argmax(-1)
            for k in range(K - 1):
                gaps[k].append(top_gap(running[k]).float().cpu())
                agree[k] += int((zs[k].argmax(-1) == leader).sum())
        n_tokens += idx.numel()
        if max_tokens is not None and n_tokens >= max_tokens:
            break
    _check(n_tokens > 0, "calibration got no tokens")
    bounds = [0.0] + [float(np.quantile(torch.cat(s).numpy(), quantile)) for s in swings]
    n_read = sum(len(g) for g in gaps[0])
    return {"wand_bounds": bounds, "wand_quantile": float(quantile), "wand_target": target,
            "wand_calibration_tokens": n_tokens,
            "wand_exit_rates": {"factors": list(EXIT_RATE_FACTORS),
                                "rates": [exit_rates([torch.cat(g) for g in gaps], wand_exit_rule(bounds, f))
                                          for f in EXIT_RATE_FACTORS]},
            "stage_agreement": [a / n_read for a in agree], "decode_costs": decode_costs(model)}


EXIT_RATE_FACTORS = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # wand_factor values the exit rates are stored at


def exit_rates(gaps: list[torch.Tensor], thresholds: list[float]) -> list[float]:
    """P(exit at k | reached k) for every stage k < K-1, from the top1 - top2 gaps (n,) of r_k at
    the same n positions (teacher forcing) and the exit thresholds."""
    reached = torch.ones_like(gaps[0], dtype=torch.bool)
    rates = []
    for gap, threshold in zip(gaps, thresholds):
        n = int(reached.sum())
        exits = reached & (gap > threshold)
        rates.append(int(exits.sum()) / n if n else 0.0)
        reached &= ~exits
    return rates


def check_calibration(calib: dict | None, model: GPT) -> dict:
    if not calib or "wand_bounds" not in calib:
        raise ValueError("WAND needs calibrated swing bounds and this model has none: run "
                         "`poelm calibrate MODEL --data DIR` (or pass calibration=calibrate(model, batches))")
    bounds = calib["wand_bounds"]
    K = model.config.n_stages
    _check(isinstance(bounds, list) and len(bounds) == K and all(isinstance(b, (int, float)) and b >= 0 for b in bounds),
           f"wand_bounds must be {K} numbers >= 0 (one per stage), got {bounds!r}; re-run `poelm calibrate`")
    _check(calib.get("wand_target", "final") in WAND_TARGETS, f"unknown wand_target {calib.get('wand_target')!r}")
    check_cost_model(calib, K)
    return calib


def check_cost_model(calib: dict, K: int) -> None:
    """The cost-model fields of a calibration, where present, describe K stages (ValueError)."""
    fix = "re-run `poelm calibrate`"
    agreement, table = calib.get("stage_agreement"), calib.get("wand_exit_rates")
    _check(agreement is None or len(agreement) == K - 1, f"stage_agreement must hold {K - 1} numbers; {fix}")
    _check(table is None or all(len(r) == K - 1 for r in table["rates"]),
           f"wand_exit_rates must hold {K - 1} rates per factor (one per stage but the last); {fix}")
    costs = calib.get("decode_costs")
    if costs is not None:
        _check(len(costs["stage_s"]) == K and len(costs["test_s"]) == K,
               f"decode_costs must describe {K} stages; {fix}")


def read_generation_config(path: str | os.PathLike) -> dict:
    """A generation_config.json (a bounded read): a JSON object whose calibration fields are checked."""
    fix = "fix it, or delete it and re-run `poelm calibrate`"
    gen = read_json_object(path, "a generation config", fix)
    bounds = check_field(gen, "wand_bounds", list, path, fix, required=False)
    if bounds is not None and not all(_is_bound(b) for b in bounds):
        raise ValueError(f"{path}: field 'wand_bounds' must be a list of numbers >= 0; {fix}")
    check_field(gen, "wand_quantile", float, path, fix, required=False, low=0, high=1)
    check_field(gen, "wand_target", str, path, fix, required=False, choices=WAND_TARGETS)
    check_field(gen, "wand_calibration_tokens", int, path, fix, required=False, low=0)
    agreement = check_field(gen, "stage_agreement", list, path, fix, required=False)
    if agreement is not None and not _fractions(agreement):
        raise ValueError(f"{path}: field 'stage_agreement' must be a list of numbers from 0 to 1; {fix}")
    table = check_field(gen, "wand_exit_rates", dict, path, fix, required=False)
    if table is not None:
        factors = check_field(table, "factors", list, f"{path}: wand_exit_rates", fix)
        rates = check_field(table, "rates", list, f"{path}: wand_exit_rates", fix)
        if not (factors and all(map(_is_bound, factors)) and len(rates) == len(factors)
                and all(isinstance(r, list) and r and _fractions(r) for r in rates)):
            raise ValueError(f"{path}: field 'wand_exit_rates' must hold factors >= 0 and, per factor, a list "
                             f"of rates from 0 to 1; {fix}")
    costs = check_field(gen, "decode_costs", dict, path, fix, required=False)
    if costs is not None:
        _check_costs(costs, path, fix)
    return gen


def _check_costs(costs: dict, path, fix: str) -> None:
    positions = check_field(costs, "positions", list, f"{path}: decode_costs", fix)
    if not positions or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 1 for p in positions):
        raise ValueError(f"{path}: decode_costs field 'positions' must be a list of integers >= 1; {fix}")
    for key in ("wand_overhead_s", "speculative_overhead_s"):
        check_field(costs, key, float, f"{path}: decode_costs", fix, required=False, low=0)
    for key in ("stage_s", "test_s"):
        rows = check_field(costs, key, list, f"{path}: decode_costs", fix)
        if not all(isinstance(r, list) and len(r) == len(positions) and all(map(_is_bound, r)) for r in rows):
            raise ValueError(f"{path}: decode_costs field {key!r} must hold, per stage, {len(positions)} "
                             f"seconds >= 0 (one per position count); {fix}")


def _fractions(values: list) -> bool:
    return all(_is_bound(v) and v <= 1 for v in values)


def _is_bound(b) -> bool:
    return isinstance(b, (int, float)) and not isinstance(b, bool) and math.isfinite(b) and b >= 0


def calibration_dir(model: str | os.PathLike) -> Path:
    """The directory that holds MODEL's generation_config.json: a training run (`poelm train --out`)
    resolves to its newest complete checkpoint, as load_model does."""
    path = Path(model)
    return (resolve_run_dir(path) or path) if path.is_dir() else path


def save_calibration(model_dir: str | os.PathLike, calib: dict) -> Path:
    """Merge the calibration keys into MODEL_DIR/generation_config.json (atomic write; a training
    run's newest complete checkpoint)."""
    model_dir = calibration_dir(model_dir)
    path = Path(model_dir) / GENERATION_CONFIG_NAME
    _check(Path(model_dir).is_dir(), f"{model_dir} is not a model directory: cannot store the calibration")
    gen = read_generation_config(path) if path.exists() else {}
    gen.update({k: calib[k] for k in CALIBRATION_KEYS if k in calib})
    with amending(model_dir, GENERATION_CONFIG_NAME):  # an output marker follows the new file
        atomic_write_json(path, gen)
    return path


def load_calibration(model_dir: str | os.PathLike) -> dict | None:
    """The WAND calibration stored in MODEL_DIR/generation_config.json (a model directory or a
    training run: its newest complete checkpoint), or None."""
    path = calibration_dir(model_dir) / GENERATION_CONFIG_NAME
    if not path.exists():
        return None
    gen = read_generation_config(path)
    if "wand_bounds" not in gen:
        return None
    return {k: gen[k] for k in CALIBRATION_KEYS if k in gen}


@torch.inference_mode()
def wand_teacher_forced(model: GPT, idx: torch.Tensor, calib: dict, factor: float = 1.0,
                        logop_alpha: float | None = None, stages: list[int] | None = None) -> dict[str, torch.Tensor]:
    """The WAND decision at every position of idx (B, T) under teacher forcing, exits tested at
    `stages` only (those the decoder's cost gate tests: DecodeStats.wand_tested_stages; None: every
    stage but the last): {"pred": (B, T) WAND argmax, "depth": (B, T) stages used, "full": (B, T)
    target argmax}."""
    calib = check_calibration(calib, model)
    cfg = model.config
    alpha = cfg.poe_alpha if logop_alpha is None else logop_alpha
    final, stage_logits = model(idx, return_stage_logits=True)
    running = running_readouts(stage_logits, final, calib.get("wand_target", "final"), alpha)
    thresholds = wand_exit_rule(calib["wand_bounds"], factor)
    pred = running[-1].argmax(-1)
    depth = torch.full_like(pred, cfg.n_stages)
    decided = torch.zeros_like(pred, dtype=torch.bool)
    for k, r in enumerate(running[:-1]):
        if stages is not None and k not in stages:
            continue
        exits = ~decided & (top_gap(r) > thresholds[k])
        pred = torch.where(exits, r.argmax(-1), pred)
        depth = torch.where(exits, torch.full_like(depth, k + 1), depth)
        decided |= exits
    return {"pred": pred, "depth": depth, "full": running[-1].argmax(-1)}


