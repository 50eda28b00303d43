"""Bits per byte of every readout: the final one, each stage, and the renormalised Log-OP.

    from poelm.evaluate import evaluate_bpb
    result = evaluate_bpb(model, val_batches, token_bytes)   # {"bpb", "stages", "logop", "tokens"}
    poelm eval MODEL --data DIR --json

bpb = sum of nats over targets / (ln 2 * sum of the targets' bytes); targets of 0 bytes
(the special tokens) are left out of both sums (docs/training.md). Sums are all-reduced across
ranks when torch.distributed is initialised, so every rank returns the same figures.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist

from poelm.model import GPT


@torch.no_grad()
def evaluate_bpb(model: GPT, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], token_bytes: torch.Tensor,
                 logop_alpha: float | None = None, autocast_dtype: torch.dtype | None = None) -> dict:
    """Returns {"bpb": final readout, "stages": [bpb per stage], "logop": Log-OP bpb,
    "tokens": targets counted, "bytes": their bytes}."""
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    token_bytes = token_bytes.to(device)
    K = model.config.n_stages
    nats = torch.zeros(K + 2, dtype=torch.float64, device=device)  # final, stages..., logop
    n_bytes = torch.zeros((), dtype=torch.float64, device=device)
    n_tokens = torch.zeros((), dtype=torch.float64, device=device)
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            per_token = model.token_nats(inputs, targets, logop_alpha)
        safe = targets.clamp(min=0)
        tb = torch.where(targets >= 0, token_bytes[safe], torch.zeros_like(safe)).to(torch.float64)  # (B, T)
        counted = tb > 0
        rows = [per_token["final"], *per_token["stages"], per_token["logop"]]
        nats += torch.stack([(r.double() * counted).sum() for r in rows])
        n_bytes += tb.sum()
        n_tokens += counted.sum()
    if dist.is_available() and dist.is_initialized():
        for t in (nats, n_bytes, n_tokens):
            dist.all_reduce(t)
    model.train(was_training)
    if n_bytes.item() == 0:
        raise ValueError("no validation targets with a byte length: the validation data is empty")
    bpb = (nats / (math.log(2) * n_bytes)).tolist()
    return {"bpb": bpb[0], "stages": bpb[1:-1], "logop": bpb[-1], "tokens": int(n_tokens.item()),
            "bytes": int(n_bytes.item())}
