"""Sampling (transformers' order: repetition penalty, temperature, top-k, top-p; around it
OpenAI's and vLLM's logit processors) and the readout helpers every decoder shares (Log-OP of
stages, top1 - top2 gap).

    sampler = Sampler(DecodeOptions(temperature=0.8, top_p=0.9, seed=0), device)
    tokens = sampler.pick(logits, seen)            # (N,) from logits (N, V)

The logits of a row are processed in this order: repetition penalty (ids seen in the row,
prompt included), presence and frequency penalty (ids the row generated: Sampler.rows, which
poelm.engine.registry attaches to the decoder's rows), logit_bias, and while a row has fewer
than min_tokens new tokens its stop ids are masked; then temperature, min_p, top-k, top-p.

Every temperature > 0 and repetition penalty > 0 keeps the distribution finite: penalised
logits are clamped to the dtype's finite range, and temperature divides the logits after
their row maximum is moved to 0, so a temperature too small for the dtype (1e-300) turns
every non-maximal logit into -inf and samples among the maxima (greedy) instead of 0/0.
Non-finite logits (a model with NaN weights) raise NonFiniteLogits instead of sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from poelm.engine.options import DecodeOptions, row_options
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

    def __init__(self, opts: DecodeOptions, device: torch.device, vocab_size: int | None = None):
        """vocab_size: build the logit_bias and stop-id vectors now (a compiled graph then reads
        them rather than building them on its first call and recompiling on its second)."""
        self.opts = opts
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(opts.seed if opts.seed is not None else int(torch.randint(2 ** 62, ()).item()))
        self.rows: Callable[[], list] | None = None  # -> the decoder's rows (.seq, .produced), one per logits row
        self._bias: torch.Tensor | None = None  # (V,) of logit_bias
        self._stop: torch.Tensor | None = None  # (V,) bool of stop_token_ids (the min_tokens mask)
        if vocab_size is not None and (opts.logit_bias or (opts.min_tokens and opts.stop_token_ids)):
            like = torch.empty(0, vocab_size, device=device)  # fp32, as the model's readouts
            if opts.logit_bias:
                self.bias(like)
            if opts.min_tokens and opts.stop_token_ids:
                self.stop_mask(like)

    def penalise(self, logits: torch.Tensor, seen: torch.Tensor | None,
                 generated: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """logits (N, V) or (N, T, V), seen alike (bool) -> the processed logits: repetition penalty
        (logit/penalty if > 0 else logit*penalty on seen ids), then the presence/frequency penalties
        and the min_tokens mask (row_penalties), then logit_bias. generated: (counts, lengths) of the
        ids each row generated before each position, shaped like logits and logits[..., 0]
        (default: the rows' now, `generated`; a speculative pass counts its drafts too)."""
        rp = self.opts.repetition_penalty
        if rp != 1.0 and seen is not None:
            big = torch.finfo(logits.dtype).max  # a tiny penalty would divide a positive logit to inf
            logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp).clamp(-big, big), logits)
        if row_options(self.opts):
            if generated is None:
                generated = self.generated(logits.shape[-1], logits.dtype, logits.device)
            logits = self.row_penalties(logits, generated)
        if self.opts.logit_bias:
            logits = logits + self.bias(logits)
        return logits

    def generated(self, vocab: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (counts (N, V) of the ids each row generated, in dtype; the rows' generated lengths
        (N,)) from the decoder's rows."""
        if self.rows is None:
            raise RuntimeError("presence/frequency penalty and min_tokens read the decoder's rows: make the decoder "
                               "with poelm.engine.registry.make_decoder")
        rows = self.rows()
        counts = torch.zeros(len(rows), vocab, dtype=dtype, device=device)
        for b, r in enumerate(rows):
            if r.produced:
                ids = torch.tensor(r.seq[len(r.seq) - r.produced:], device=device)
                counts[b].index_add_(0, ids, torch.ones(len(ids), dtype=dtype, device=device))
        return counts, torch.tensor([r.produced for r in rows], device=device)

    def row_penalties(self, logits: torch.Tensor, generated: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """logits (..., V) - frequency * count - presence * [count > 0] of each row's generated ids,
        and -inf at the stop ids where the row has fewer than min_tokens new tokens; generated:
        (counts (..., V), lengths (...)) at these positions."""
        o = self.opts
        counts, lengths = generated
        logits = logits - o.frequency_penalty * counts - o.presence_penalty * (counts > 0).to(logits.dtype)
        if o.min_tokens and o.stop_token_ids:
            logits = logits.masked_fill((lengths < o.min_tokens)[..., None] & self.stop_mask(logits), float("-inf"))
        return logits

    def stop_mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(V,) bool: the stop ids (built once, on the logits' device)."""
        if self._stop is None or self._stop.device != logits.device:
            stop = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            stop[torch.tensor(list(self.opts.stop_token_ids), device=logits.device)] = True
            self._stop = stop
        return self._stop

    def bias(self, logits: torch.Tensor) -> torch.Tensor:
        """The (V,) logit_bias vector on the logits' device and dtype (built once)."""
        if self._bias is None or self._bias.device != logits.device or self._bias.dtype != logits.dtype:
            bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
            ids = list(self.opts.logit_bias)
            bias[torch.tensor(ids, device=logits.device)] = torch.tensor([float(self.opts.logit_bias[i]) for i in ids],
                                                                         dtype=logits.dtype, device=logits.device)
            self._bias = bias
        return self._bias

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalised logits (N, V) -> sampling distribution (N, V) after temperature/top-k/top-p."""
        logits = tempered(logits, self.opts.temperature)  # the row maximum is 0
        if self.opts.min_p > 0:  # p < min_p * p_max  <=>  logit < log(min_p) + max logit
            logits = logits.masked_fill(logits < math.log(self.opts.min_p), float("-inf"))
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
        """probs (N, V) -> (N,) samples (NonFiniteLogits when probs hold NaN or inf), by inverse CDF:
        one uniform u per row, the first token whose running sum passes u x the row's total. In
        float64 (but on MPS) u x total stays below the total, so a token of probability 0 (masked
        by top-k/top-p/min-p or a constraint) is never drawn. torch.multinomial draws the same
        distribution but took ~118 us per row at V = 4,096 on this CPU (a tenth of a served
        engine's time at temperature 1); this takes ~3 us per row."""
        probs = check_finite(probs)
        exact = torch.float32 if probs.device.type == "mps" else torch.float64
        cdf = probs.to(exact).cumsum(-1)  # (N, V)
        u = torch.rand(probs.shape[0], 1, generator=self.gen, device=probs.device, dtype=exact)  # (N, 1)
        picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (N, 1)
        return picked.squeeze(-1).clamp_(max=probs.shape[-1] - 1)

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


