"""Sampling (transformers' order: repetition penalty, temperature, top-k, top-p) and the
readout helpers every decoder shares (Log-OP of stages, top1 - top2 gap).

    sampler = Sampler(DecodeOptions(temperature=0.8, top_p=0.9, seed=0), device)
    tokens = sampler.pick(logits, seen)            # (N,) from logits (N, V)

Every temperature > 0 and repetition penalty > 0 keeps the distribution finite: penalised
logits are clamped to the dtype's finite range, and temperature divides the logits after
their row maximum is moved to 0, so a temperature too small for the dtype (1e-300) turns
every non-maximal logit into -inf and samples among the maxima (greedy) instead of 0/0.
Non-finite logits (a model with NaN weights) raise NonFiniteLogits instead of sampling.
"""

from __future__ import annotations

import torch

from poelm.engine.options import DecodeOptions
from poelm.model import logop_weight


class NonFiniteLogits(ValueError):
    """The model's logits hold NaN or inf: no token can be picked from them."""

    def __init__(self):
        super().__init__("the model's logits hold NaN or inf, so no token can be sampled; check that its weights "
                         "are finite (a NaN or inf tensor in the checkpoint)")


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits (..., V) / temperature > 0 with each row's maximum at 0: finite maxima, never NaN."""
    shifted = logits - logits.amax(-1, keepdim=True)
    return torch.where(shifted == 0, shifted, shifted / temperature)


def check_finite(probs: torch.Tensor) -> torch.Tensor:
    """probs, or NonFiniteLogits when any is NaN or inf (torch.multinomial would fail, on CUDA fatally)."""
    if not bool(torch.isfinite(probs).all()):
        raise NonFiniteLogits()
    return probs


class Sampler:
    """Repetition penalty, temperature, top-k, top-p and a seeded generator (transformers' order)."""

    def __init__(self, opts: DecodeOptions, device: torch.device):
        self.opts = opts
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(opts.seed if opts.seed is not None else int(torch.randint(2 ** 62, ()).item()))

    def penalise(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """logits (N, V), seen (N, V) bool: logit/penalty if > 0 else logit*penalty on seen ids."""
        rp = self.opts.repetition_penalty
        if rp == 1.0 or seen is None:
            return logits
        big = torch.finfo(logits.dtype).max  # a tiny penalty would divide a positive logit to inf
        return torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp).clamp(-big, big), logits)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalised logits (N, V) -> sampling distribution (N, V) after temperature/top-k/top-p."""
        logits = tempered(logits, self.opts.temperature)
        k = self.opts.top_k
        if 0 < k < logits.shape[-1]:
            kth = logits.topk(k, dim=-1).values[..., -1:]  # (N, 1)
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.opts.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(-1)
            mass_before = sorted_probs.cumsum(-1) - sorted_probs  # keep the smallest head reaching top_p
            drop_sorted = mass_before >= self.opts.top_p
            drop_sorted[..., 0] = False
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits.softmax(-1)

    def draw(self, probs: torch.Tensor) -> torch.Tensor:
        """probs (N, V) -> (N,) samples (NonFiniteLogits when probs hold NaN or inf)."""
        return torch.multinomial(check_finite(probs), 1, generator=self.gen).squeeze(-1)

    def uniform(self) -> float:
        return torch.rand((), generator=self.gen, device=self.gen.device).item()

    def pick(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """logits (N, V) -> (N,) next tokens (greedy argmax when temperature is 0)."""
        logits = self.penalise(logits, seen)
        if self.opts.greedy:
            return logits.argmax(-1)
        return self.draw(self.probs(logits))


def logop(stage_logits: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Renormalised Log-OP sum_k w_k log_softmax(z_k), w_k = 1/|S|^(1-alpha): (..., V) log-probs."""
    w = logop_weight(len(stage_logits), alpha)
    s = sum(w * z.log_softmax(-1) for z in stage_logits)
    return s - s.logsumexp(-1, keepdim=True)


def top_gap(r: torch.Tensor) -> torch.Tensor:
    """top1 - top2 of r (..., V) -> (...)."""
    top = r.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


