"""
Training schedules and the training horizon (docs/training.md, "Schedule and horizon").

- lr_multiplier: linear warmup (40 steps), flat, linear warmdown over the last 65 % of the
  run down to final_lr_frac (0.05). Where warmup and warmdown overlap (very short runs) the
  smaller of the two wins.
- muon_momentum: 0.85 -> 0.97 over the first 400 steps, 0.97 -> 0.90 during warmdown (again
  the smaller of the two where they overlap).
- muon_weight_decay: cosine from its start value to 0 over the run. AdamW decays stay fixed.
- resolve_horizon: --num-iterations > --target-tokens > --target-param-data-ratio.

Usage:
    num_iterations, rule = resolve_horizon(-1, None, 20.0, total_params, tokens_per_step)
    print(rule)
    for step in range(num_iterations):
        apply_schedules(optimizer, step, num_iterations)   # before optimizer.step()
"""

import math

import torch


def lr_multiplier(step: int, num_iterations: int, warmup_steps: int = 40,
                  warmdown_frac: float = 0.65, final_lr_frac: float = 0.05) -> float:
    """Multiplier on every group's initial_lr at `step` (0-based)."""
    warmup = (step + 1) / warmup_steps if warmup_steps > 0 else 1.0
    warmdown_steps = round(warmdown_frac * num_iterations)
    warmdown = 1.0
    if warmdown_steps > 0 and step > num_iterations - warmdown_steps:
        progress = max(0.0, (num_iterations - step) / warmdown_steps)   # 1 -> 0
        warmdown = progress + (1 - progress) * final_lr_frac
    return min(1.0, warmup, warmdown)


def muon_momentum(step: int, num_iterations: int, warmdown_frac: float = 0.65,
                  ramp_steps: int = 400) -> float:
    """0.85 -> 0.97 linearly over ramp_steps, then 0.97 -> 0.90 linearly during warmdown."""
    ramp = 0.85 + 0.12 * min(1.0, step / ramp_steps)
    warmdown_steps = round(warmdown_frac * num_iterations)
    start = num_iterations - warmdown_steps
    if warmdown_steps <= 0 or step <= start:
        return ramp
    progress = min(1.0, (step - start) / warmdown_steps)                # 0 -> 1
    return min(ramp, 0.97 - 0.07 * progress)


def muon_weight_decay(step: int, num_iterations: int, wd0: float) -> float:
    """Cosine from wd0 at step 0 to 0 at num_iterations."""
    t = min(1.0, max(0.0, step / max(1, num_iterations)))
    return wd0 * 0.5 * (1 + math.cos(math.pi * t))


def apply_schedules(optimizer: torch.optim.Optimizer, step: int, num_iterations: int, *,
                    warmup_steps: int = 40, warmdown_frac: float = 0.65,
                    final_lr_frac: float = 0.05) -> float:
    """Set lr (all groups), momentum and weight decay (Muon groups) for `step`; returns the
    lr multiplier. Groups need `initial_lr` (and Muon `initial_weight_decay`)."""
    lrm = lr_multiplier(step, num_iterations, warmup_steps, warmdown_frac, final_lr_frac)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * lrm
        if group.get("kind") == "muon":
            group["momentum"] = muon_momentum(step, num_iterations, warmdown_frac)
            group["weight_decay"] = muon_weight_decay(step, num_iterations, group["initial_weight_decay"])
    return lrm


def resolve_horizon(num_iterations: int | None, target_tokens: int | None,
                    target_param_data_ratio: float | None, total_params: int,
                    tokens_per_step: int) -> tuple[int, str]:
    """Number of optimizer steps and a line saying which rule set it.
    Precedence: num_iterations (> 0) > target_tokens (> 0) > target_param_data_ratio (> 0),
    the ratio counting tokens per TOTAL parameter (the released runs: 20). None or a value
    <= 0 (e.g. -1) means unset. Token targets round down to whole steps (at least 1)."""
    if num_iterations is not None and num_iterations > 0:
        return num_iterations, f"horizon: {num_iterations:,} steps from --num-iterations"
    if target_tokens is not None and target_tokens > 0:
        n = max(1, target_tokens // tokens_per_step)
        return n, (f"horizon: {n:,} steps from --target-tokens {target_tokens:,} "
                   f"/ {tokens_per_step:,} tokens per step")
    if target_param_data_ratio is not None and target_param_data_ratio > 0:
        tokens = int(target_param_data_ratio * total_params)
        n = max(1, tokens // tokens_per_step)
        return n, (f"horizon: {n:,} steps from --target-param-data-ratio {target_param_data_ratio:g} "
                   f"x {total_params:,} total params = {tokens:,} tokens "
                   f"/ {tokens_per_step:,} tokens per step")
    raise ValueError("no horizon: set --num-iterations, --target-tokens or --target-param-data-ratio")
