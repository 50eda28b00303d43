"""Inference engine for PoE models: cached decoding with stage readouts, Log-OP, WAND
adaptive depth and self-speculative decoding (poe.md §2-6).

    from poelm.engine import Engine, calibrate, save_calibration
    engine = Engine(model, tokenizer)
    out = engine.generate("The capital of France is", max_new_tokens=32)      # final readout, greedy
    out.text, out.tokens, out.stats                                          # stats: tokens/s, ...
    engine.generate(prompt, mode="stage", stage=0)                           # prefix pruning
    engine.generate(prompt, mode="logop", stages=[0, 3])                     # Log-OP of stages
    engine.generate(prompt, mode="speculative", draft_stage=0, gamma=4)      # token-identical to greedy
    engine.calibration = calibrate(model, batches); engine.generate(prompt, mode="wand")
    for delta in engine.stream(prompt, temperature=0.8, top_p=0.9): print(delta, end="")

    poelm generate MODEL "Once upon a time" --mode speculative --gamma 4
    poelm calibrate MODEL --data DIR

Modes
- final        every layer, the final readout of config.final_readout (the last stage, with
               backout when config.backout, or the Log-OP of all stages).
- stage K      prefix pruning: only the layers up to stage K's boundary run (the KV cache is
               allocated for those layers only), read out at stage K.
- logop S      renormalised Log-OP `s = sum_k w_k l_k`, w_k = 1/|S|^(1-alpha), of the stages in S;
               layers deeper than max(S) never run.
- wand         per token, stop at the first stage k whose leader cannot be overtaken:
               top1 - top2 of r_k > F * sum_{j>k} b_j (bounds b_j from `calibrate`). Exited
               tokens keep their boundary residual and x0; a later token that goes deeper first
               back-fills every pending position through the missing stage in one batched pass
               (together with itself), so the cache is exactly the full-depth cache.
- speculative  stage d drafts gamma tokens through layers <= d's boundary; one verify pass runs
               only the deeper layers over [last accepted token, drafts] reusing the draft K/V and
               boundary residuals. Greedy: token-identical to plain greedy. Sampling: the
               Leviathan/Chen rule (output distribution equals the target's). Rejected positions
               are cropped from every layer.
wand and speculative decode one prompt at a time (a list of prompts runs row after row);
final/stage/logop decode a left-padded batch together.

Prompts: text (needs a tokenizer) or token ids; with a tokenizer `<|bos|>` is prepended when
missing. A prompt longer than config.sequence_len is an error (no silent truncation);
generation stops (stop_reason "context") when the context fills up.
Sampling follows transformers: repetition penalty (every id seen in the row, prompt included:
logit/penalty if > 0 else logit*penalty), then temperature (0 = greedy), top-k, top-p.
Stop token ids end generation and appear in `tokens` but not in `text`; a stop string cuts
`text` before it. With a tokenizer the default stop ids are `<|bos|>` and `<|assistant_end|>`.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from poelm.checkpoint import atomic_write_json
from poelm.model import GPT, KVCache, logop_weight

MODES = ("final", "stage", "logop", "wand", "speculative")
WAND_TARGETS = ("final", "logop")
GENERATION_CONFIG_NAME = "generation_config.json"
CALIBRATION_KEYS = ("wand_bounds", "wand_quantile", "wand_target", "wand_calibration_tokens")
MAX_GAMMA = 64
BP_REFUSAL = ("this is a BP model (poe_mode='none'): its intermediate stages were never trained to predict, "
              "so {what} would read out meaningless stages; pass force=True (--force) to run it anyway")


# -----------------------------------------------------------------------------
# Options and results


@dataclass
class DecodeOptions:
    """Everything `Engine.generate` / `Engine.stream` accept as keyword arguments."""

    mode: str = "final"
    stage: int | None = None  # mode=stage: the stage to read out at (default 0)
    stages: list[int] | None = None  # mode=logop: the stage set (default all stages)
    logop_alpha: float | None = None  # mode=logop / wand target logop: alpha (default config.poe_alpha)
    draft_stage: int = 0  # mode=speculative
    gamma: int = 4  # drafted tokens per verify pass (the maximum when adaptive)
    adaptive_gamma: bool = False  # grow gamma by 2 after a fully accepted pass, shrink by 1 otherwise
    draft_threshold: float | None = None  # stop drafting when the draft's top probability falls below
    wand_factor: float = 1.0  # F of the exit rule (larger is safer, inf = full depth)
    calibration: dict | None = None  # overrides Engine.calibration for this call
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None  # None: <|bos|> / <|assistant_end|> of the tokenizer
    stop_strings: list[str] = field(default_factory=list)
    add_bos: bool = True
    force: bool = False  # allow PoE modes on a BP model
    keep_cache: bool = False  # attach the final KV cache (complete: WAND back-fills pending slots)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Generation:
    text: str | None  # None without a tokenizer
    tokens: list[int]  # the new token ids (a stop token included)
    stats: dict
    prompt_tokens: list[int] = field(default_factory=list)
    cache: KVCache | None = None  # with keep_cache=True

    def to_json(self) -> dict:
        return {"text": self.text, "tokens": self.tokens, "stats": self.stats}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate_options(opts: DecodeOptions, model: GPT) -> None:
    """Raise ValueError (one line) for bad parameters, bad stages and refused modes."""
    cfg = model.config
    K = cfg.n_stages
    _check(opts.mode in MODES, f"unknown mode {opts.mode!r}; choose one of {', '.join(MODES)}")
    _check(isinstance(opts.max_new_tokens, int) and opts.max_new_tokens >= 0,
           f"max_new_tokens must be an integer >= 0, got {opts.max_new_tokens!r}")
    t = opts.temperature
    _check(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0, f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
    _check(isinstance(opts.top_k, int) and opts.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {opts.top_k!r}")
    p = opts.top_p
    _check(isinstance(p, (int, float)) and 0 < p <= 1, f"top_p must lie in (0, 1], got {p!r}")
    rp = opts.repetition_penalty
    _check(isinstance(rp, (int, float)) and math.isfinite(rp) and rp > 0, f"repetition_penalty must be a finite number > 0 (1 = off), got {rp!r}")
    _check(opts.seed is None or isinstance(opts.seed, int), f"seed must be an integer, got {opts.seed!r}")
    if opts.stop_token_ids is not None:
        _check(all(isinstance(i, int) and 0 <= i < cfg.vocab_size for i in opts.stop_token_ids),
               f"stop_token_ids must be token ids in [0, {cfg.vocab_size})")
    _check(all(isinstance(s, str) and s for s in opts.stop_strings), "stop_strings must be non-empty strings")
    if opts.mode == "stage":
        stage = 0 if opts.stage is None else opts.stage
        _check(isinstance(stage, int) and 0 <= stage < K, f"stage {stage!r} is out of range: this model has stages 0..{K - 1}")
    if opts.mode == "logop":
        stages = list(range(K)) if opts.stages is None else list(opts.stages)
        _check(len(stages) > 0, "logop needs at least one stage")
        _check(all(isinstance(s, int) and 0 <= s < K for s in stages), f"logop stages {stages} out of range: this model has stages 0..{K - 1}")
        _check(len(set(stages)) == len(stages), f"logop stages {stages} repeat a stage")
    if opts.logop_alpha is not None:
        _check(math.isfinite(opts.logop_alpha), f"logop_alpha must be finite, got {opts.logop_alpha!r}")
    if opts.mode == "speculative":
        _check(K >= 2, "speculative decoding needs a model with at least 2 stages")
        _check(cfg.final_readout == "last", "speculative decoding verifies with the last stage's readout; this "
               "model's final readout is the Log-OP of all stages (final_readout=logop): use mode final, logop or wand")
        d = opts.draft_stage
        _check(isinstance(d, int) and 0 <= d < K - 1, f"draft stage {d!r} is out of range: use 0..{K - 2} (the last stage is the target)")
        g = opts.gamma
        _check(isinstance(g, int) and 1 <= g <= MAX_GAMMA, f"gamma must be an integer in 1..{MAX_GAMMA}, got {g!r}")
        th = opts.draft_threshold
        _check(th is None or (isinstance(th, (int, float)) and 0 <= th <= 1), f"draft_threshold must lie in [0, 1], got {th!r}")
    if opts.mode == "wand":
        f = opts.wand_factor
        _check(isinstance(f, (int, float)) and not math.isnan(f) and f >= 0, f"wand_factor must be >= 0 (inf = full depth), got {f!r}")
    if opts.mode != "final" and not cfg.is_poe() and not opts.force:
        what = {"stage": "prefix pruning / a stage readout", "logop": "a Log-OP of stages", "wand": "WAND adaptive depth",
                "speculative": "speculative drafting from a stage"}[opts.mode]
        raise ValueError(BP_REFUSAL.format(what=what))


# -----------------------------------------------------------------------------
# Sampling


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
        return torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Penalised logits (N, V) -> sampling distribution (N, V) after temperature/top-k/top-p."""
        logits = logits / self.opts.temperature
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
        """probs (N, V) -> (N,) samples."""
        return torch.multinomial(probs, 1, generator=self.gen).squeeze(-1)

    def uniform(self) -> float:
        return torch.rand((), generator=self.gen, device=self.gen.device).item()

    def pick(self, logits: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """logits (N, V) -> (N,) next tokens (greedy argmax when temperature is 0)."""
        logits = self.penalise(logits, seen)
        if self.opts.greedy:
            return logits.argmax(-1)
        return self.draw(self.probs(logits))


# -----------------------------------------------------------------------------
# Small model helpers


def new_cache(model: GPT, batch_size: int, capacity: int, pad: torch.Tensor | None = None,
              n_layers: int | None = None) -> KVCache:
    """A KV cache with K/V for the first n_layers layers only (default all)."""
    cfg = model.config
    if n_layers is not None and n_layers < cfg.n_layer:
        cfg = copy.copy(cfg)  # the cache reads n_layer, n_kv_head, head_dim; deeper layers get no memory
        cfg.n_layer = n_layers
    p = model.lm_head.weight
    return KVCache(cfg, batch_size, capacity, p.device, p.dtype, pad)


def logop(stage_logits: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """Renormalised Log-OP sum_k w_k log_softmax(z_k), w_k = 1/|S|^(1-alpha): (..., V) log-probs."""
    w = logop_weight(len(stage_logits), alpha)
    s = sum(w * z.log_softmax(-1) for z in stage_logits)
    return s - s.logsumexp(-1, keepdim=True)


def top_gap(r: torch.Tensor) -> torch.Tensor:
    """top1 - top2 of r (..., V) -> (...)."""
    top = r.topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def refuse_bp(model: GPT, what: str, force: bool) -> None:
    if not model.config.is_poe() and not force:
        raise ValueError(BP_REFUSAL.format(what=what))


# -----------------------------------------------------------------------------
# WAND: calibration, bounds on disk, the exit rule


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


@torch.no_grad()
def calibrate(model: GPT, token_batches: Iterable, quantile: float = 0.99, target: str = "final",
              logop_alpha: float | None = None, max_tokens: int | None = None, force: bool = False,
              chunk: int = 512) -> dict:
    """Per-stage WAND swing bounds b_j (poe.md §4) from calibration text.

    token_batches yields LongTensor (B, T) (or (inputs, targets) pairs). Returns
    {"wand_bounds": [0.0, b_1, ..., b_{K-1}], "wand_quantile", "wand_target",
    "wand_calibration_tokens"} — the dict stored in generation_config.json."""
    refuse_bp(model, "WAND calibration", force)
    _check(0 < quantile <= 1, f"quantile must lie in (0, 1], got {quantile!r}")
    _check(target in WAND_TARGETS, f"WAND target must be one of {', '.join(WAND_TARGETS)}, got {target!r}")
    cfg = model.config
    K = cfg.n_stages
    _check(K >= 2, "WAND needs a model with at least 2 stages")
    alpha = cfg.poe_alpha if logop_alpha is None else logop_alpha
    device = model.lm_head.weight.device
    swings: list[list[torch.Tensor]] = [[] for _ in range(K - 1)]
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
            for j, sw in enumerate(stage_swings(running_readouts(zs, final, target, alpha))):
                swings[j].append(sw.float().cpu())
        n_tokens += idx.numel()
        if max_tokens is not None and n_tokens >= max_tokens:
            break
    _check(n_tokens > 0, "calibration got no tokens")
    bounds = [0.0] + [float(np.quantile(torch.cat(s).numpy(), quantile)) for s in swings]
    return {"wand_bounds": bounds, "wand_quantile": float(quantile), "wand_target": target,
            "wand_calibration_tokens": n_tokens}


def check_calibration(calib: dict | None, model: GPT) -> dict:
    if not calib or "wand_bounds" not in calib:
        raise ValueError("WAND needs calibrated swing bounds and this model has none: run "
                         "`poelm calibrate MODEL --data DIR` (or pass calibration=calibrate(model, batches))")
    bounds = calib["wand_bounds"]
    K = model.config.n_stages
    _check(isinstance(bounds, list) and len(bounds) == K and all(isinstance(b, (int, float)) and b >= 0 for b in bounds),
           f"wand_bounds must be {K} numbers >= 0 (one per stage), got {bounds!r}; re-run `poelm calibrate`")
    _check(calib.get("wand_target", "final") in WAND_TARGETS, f"unknown wand_target {calib.get('wand_target')!r}")
    return calib


def save_calibration(model_dir: str | os.PathLike, calib: dict) -> Path:
    """Merge the calibration keys into MODEL_DIR/generation_config.json (atomic write)."""
    path = Path(model_dir) / GENERATION_CONFIG_NAME
    _check(Path(model_dir).is_dir(), f"{model_dir} is not a model directory: cannot store the calibration")
    gen = json.loads(path.read_text()) if path.exists() else {}
    gen.update({k: calib[k] for k in CALIBRATION_KEYS if k in calib})
    atomic_write_json(path, gen)
    return path


def load_calibration(model_dir: str | os.PathLike) -> dict | None:
    """The WAND calibration stored in MODEL_DIR/generation_config.json, or None."""
    path = Path(model_dir) / GENERATION_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        gen = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if "wand_bounds" not in gen:
        return None
    return {k: gen[k] for k in CALIBRATION_KEYS if k in gen}


def wand_exit_rule(bounds: list[float], factor: float) -> list[float]:
    """Threshold after each stage k: F * sum_{j>k} b_j (inf for every stage but the last when F = inf)."""
    K = len(bounds)
    if math.isinf(factor):
        return [math.inf] * (K - 1) + [-math.inf]
    return [factor * sum(bounds[k + 1:]) for k in range(K - 1)] + [-math.inf]


@torch.no_grad()
def wand_teacher_forced(model: GPT, idx: torch.Tensor, calib: dict, factor: float = 1.0,
                        logop_alpha: float | None = None) -> dict[str, torch.Tensor]:
    """The WAND decision at every position of idx (B, T) under teacher forcing:
    {"pred": (B, T) WAND argmax, "depth": (B, T) stages used, "full": (B, T) target argmax}."""
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
        exits = ~decided & (top_gap(r) > thresholds[k])
        pred = torch.where(exits, r.argmax(-1), pred)
        depth = torch.where(exits, torch.full_like(depth, k + 1), depth)
        decided |= exits
    return {"pred": pred, "depth": depth, "full": running[-1].argmax(-1)}


# -----------------------------------------------------------------------------
# Decoders: own a KV cache and turn tokens into next-token logits


class PlainDecoder:
    """Batched cached decoding for final / stage / logop readouts (left-padded rows)."""

    def __init__(self, model: GPT, opts: DecodeOptions, batch_size: int, capacity: int,
                 pad: torch.Tensor | None = None):
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.mode = opts.mode
        self.stage = (opts.stage or 0) if opts.mode == "stage" else None
        self.stages = sorted(opts.stages if opts.stages is not None else range(cfg.n_stages))
        self.alpha = cfg.poe_alpha if opts.logop_alpha is None else opts.logop_alpha
        if self.mode == "final":
            self.end_layer = cfg.n_layer
            self.keep = model.final_keep()
        elif self.mode == "stage":
            self.end_layer = cfg.stage_ends[self.stage] + 1
            self.keep = set()
        else:  # logop
            self.end_layer = cfg.stage_ends[max(self.stages)] + 1
            self.keep = {cfg.stage_ends[k] for k in self.stages}
        self.cache = new_cache(model, batch_size, capacity, pad, n_layers=self.end_layer)
        self.layer_passes = 0  # layer x position executions (compute)
        self.layer_calls = 0  # sequential layer invocations (latency on overhead-bound hardware)

    def forward(self, idx: torch.Tensor, last_only: bool = True) -> torch.Tensor:
        """Feed idx (B, T) -> logits (B, V) of the last position, or (B, T, V)."""
        cache, model = self.cache, self.model
        start = cache.n_tokens
        x = x0 = model.embed(idx, cache)
        x, kept = model.run_layers(x, x0, idx, 0, self.end_layer, cache, start, keep=self.keep)
        self.layer_passes += self.end_layer * idx.shape[1]
        self.layer_calls += self.end_layer
        sel = (lambda t: t[:, -1]) if last_only else (lambda t: t)  # noqa: E731
        if self.mode == "final":
            mid = kept.get(self.cfg.backout_layer)
            stage_x = [sel(kept[e]) if e in kept else None for e in self.cfg.stage_ends]
            return model.readout(sel(x), None, sel(mid) if mid is not None else None, stage_x)
        if self.mode == "stage":
            return model.readout(sel(x), self.stage)
        zs = [model.readout(sel(kept[self.cfg.stage_ends[k]]), k) for k in self.stages]
        return logop(zs, self.alpha)

    @property
    def stages_per_token(self) -> int:
        return self.cfg.n_stages if self.mode == "final" else (self.stage + 1 if self.mode == "stage" else max(self.stages) + 1)


class WandDecoder:
    """Batch-size-1 adaptive-depth decoding with exact lazy KV back-fill (poe.md §4).

    Stage s's layers all hold the same number of slots L_s, with L_0 >= L_1 >= ...; slots
    [L_s, n) are pending for stage s and their input (the boundary residual of stage s-1)
    and x0 are kept. A token that must run stage s runs it on [L_s, t] in one pass."""

    def __init__(self, model: GPT, capacity: int, calib: dict, factor: float, alpha: float | None = None):
        cfg = model.config
        self.model, self.cfg, self.K = model, cfg, cfg.n_stages
        self.target = calib.get("wand_target", "final")
        self.alpha = cfg.poe_alpha if alpha is None else alpha
        self.thresholds = wand_exit_rule(calib["wand_bounds"], factor)
        self.cache = new_cache(model, 1, capacity)
        p = model.lm_head.weight
        d = cfg.n_embd
        self.x0 = torch.zeros(1, capacity, d, device=p.device, dtype=p.dtype)
        self.boundary = [torch.zeros(1, capacity, d, device=p.device, dtype=p.dtype) for _ in range(self.K - 1)]
        self.first_layer = [0] + [e + 1 for e in cfg.stage_ends[:-1]]
        self.depths: list[int] = []
        self.layer_passes = 0
        self.layer_calls = 0
        self.backfilled = 0  # (slot, stage) pairs run lazily

    def prefill(self, ids: torch.Tensor) -> None:
        """Run ids (1, T) through every layer (the prompt is always full depth)."""
        start = self.cache.n_tokens
        x = x0 = self.model.embed(ids, self.cache)
        self.model.run_layers(x, x0, ids, 0, self.cfg.n_layer, self.cache, start)
        self.layer_passes += self.cfg.n_layer * ids.numel()

    def _run_stage(self, s: int, lo: int, hi: int, x: torch.Tensor, keep: set[int]) -> tuple[torch.Tensor, dict]:
        """Run stage s on slots [lo, hi) with input residual x (1, hi-lo, d); store its boundary."""
        first, end = self.first_layer[s], self.cfg.stage_ends[s] + 1
        out, kept = self.model.run_layers(x, self.x0[:, lo:hi], self.cache.tokens[:, lo:hi], first, end,
                                          self.cache, lo, keep=keep)
        if s < self.K - 1:
            self.boundary[s][:, lo:hi] = out
        self.layer_passes += (end - first) * (hi - lo)
        self.layer_calls += end - first
        return out, kept

    def step(self, token: int) -> tuple[torch.Tensor, int]:
        """Feed one token -> (readout logits (V,) at the exit, stages used). Target final: the
        exit stage's readout. Target logop: the Log-OP of the stages used (k+1 of them); the
        exit rule itself reads the running Log-OP in the space of all K stages."""
        model, cfg, cache = self.model, self.cfg, self.cache
        t = cache.n_tokens
        idx = torch.tensor([[token]], device=cache.tokens.device)
        x = model.embed(idx, cache)  # (1, 1, d)
        self.x0[:, t] = x[:, 0]
        x_mid, r, used, lasts = None, 0, [], []
        bl = cfg.backout_layer if cfg.backout else -1
        for s in range(self.K):
            lo = cache.lengths[self.first_layer[s]]  # stage s holds slots < lo; [lo, t) are pending
            inp = x if s == 0 else self.boundary[s - 1][:, lo:t + 1]
            keep = {bl} if self.first_layer[s] <= bl <= cfg.stage_ends[s] else set()
            out, kept = self._run_stage(s, lo, t + 1, inp, keep)
            self.backfilled += t - lo
            if bl in kept:
                x_mid = kept[bl][:, -1]
            last = out[:, -1]  # (1, d)
            lasts.append(last)
            if self.target == "final":  # r_k = z_k; the last stage reads out like the final readout
                r = model.readout(last, None, x_mid, lasts) if s == self.K - 1 else model.readout(last, s)
            else:
                used.append(model.readout(last, s))
                r = r + logop_weight(self.K, self.alpha) * used[-1].log_softmax(-1)
            if s == self.K - 1 or top_gap(r).item() > self.thresholds[s]:
                self.depths.append(s + 1)
                return (r if self.target == "final" else logop(used, self.alpha))[0], s + 1
        raise AssertionError("unreachable")

    def flush(self) -> None:
        """Back-fill every pending slot through every stage: the cache becomes the full-depth cache."""
        n = self.cache.n_tokens
        for s in range(1, self.K):
            lo = self.cache.lengths[self.first_layer[s]]
            if lo < n:
                self._run_stage(s, lo, n, self.boundary[s - 1][:, lo:n], set())
                self.backfilled += n - lo


# -----------------------------------------------------------------------------
# Stop conditions and incremental text


class _Collector:
    """Per-row new tokens, stop conditions and the (stop-string cut) text."""

    def __init__(self, n_rows: int, opts: DecodeOptions, tokenizer, stop_ids: set[int]):
        self.opts, self.tok, self.stop_ids = opts, tokenizer, stop_ids
        self.tokens: list[list[int]] = [[] for _ in range(n_rows)]
        self.reason: list[str | None] = [None] * n_rows
        self.cut: list[int | None] = [None] * n_rows  # text length where a stop string begins

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.reason)

    def add(self, row: int, new: list[int]) -> None:
        for t in new:
            if self.reason[row] is not None:
                return
            self.tokens[row].append(t)
            if t in self.stop_ids:
                self.reason[row] = "stop_token"
            elif self.opts.stop_strings and self._find_stop(row):
                self.reason[row] = "stop_string"
            elif len(self.tokens[row]) >= self.opts.max_new_tokens:
                self.reason[row] = "max_new_tokens"

    def _find_stop(self, row: int) -> bool:
        text = self.raw_text(row)
        hits = [i for i in (text.find(s) for s in self.opts.stop_strings) if i >= 0]
        if hits:
            self.cut[row] = min(hits)
        return bool(hits)

    def raw_text(self, row: int) -> str:
        ids = self.tokens[row]
        if ids and ids[-1] in self.stop_ids and self.reason[row] == "stop_token":
            ids = ids[:-1]
        return self.tok.decode(ids)

    def text(self, row: int) -> str | None:
        if self.tok is None:
            return None
        text = self.raw_text(row)
        return text[: self.cut[row]] if self.cut[row] is not None else text

    def stable_text(self, row: int) -> str:
        """The text that can no longer change: no trailing incomplete UTF-8 character (U+FFFD)
        and no tail that could still become a stop string."""
        if self.reason[row] is not None:
            return self.text(row)
        text = self.raw_text(row).rstrip("\ufffd")
        hold = 0
        for s in self.opts.stop_strings:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        return text[: len(text) - hold]


class TextStream:
    """Iterator of text deltas for one prompt; `.result` holds the Generation afterwards.
    Deltas never split a character and concatenate to `.result.text`."""

    def __init__(self, session: Iterator, row: int = 0):
        self.session, self.row = session, row
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        emitted = ""
        while True:
            try:
                collector = next(self.session)
            except StopIteration as stop:
                self.result = stop.value[0]
                break
            stable = collector.stable_text(self.row)
            if len(stable) > len(emitted) and stable.startswith(emitted):
                yield stable[len(emitted):]
                emitted = stable
        final = self.result.text or ""
        if len(final) > len(emitted) and final.startswith(emitted):
            yield final[len(emitted):]


# -----------------------------------------------------------------------------
# The engine


class Engine:
    def __init__(self, model: GPT, tokenizer=None, calibration: dict | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.calibration = calibration

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    # --- prompts -------------------------------------------------------------
    def bos_id(self) -> int | None:
        return getattr(self.tokenizer, "bos_token_id", None) if self.tokenizer is not None else None

    def encode_prompt(self, prompt, add_bos: bool = True) -> list[int]:
        """Text or ids -> ids, with <|bos|> prepended (when a tokenizer is known and it is missing)."""
        if isinstance(prompt, str):
            _check(self.tokenizer is not None, "a text prompt needs a tokenizer; pass token ids instead")
            _check(len(prompt) > 0, "empty prompt: give at least one character or token")
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
            _check(len(ids) > 0, "empty prompt: give at least one character or token")
        V = self.model.config.vocab_size
        _check(all(isinstance(i, numbers.Integral) and 0 <= i < V for i in ids), f"prompt token ids must be integers in [0, {V})")
        ids = [int(i) for i in ids]
        bos = self.bos_id()
        if add_bos and bos is not None and ids[0] != bos:
            ids = [bos] + ids
        T = self.model.config.sequence_len
        _check(len(ids) <= T, f"prompt has {len(ids)} tokens but the context holds {T}; shorten it")
        return ids

    def _rows(self, prompt, add_bos: bool) -> tuple[list[list[int]], bool]:
        """(rows of ids, whether the caller passed a single prompt)."""
        if isinstance(prompt, (str, torch.Tensor)) or (isinstance(prompt, (list, tuple)) and prompt
                                                       and isinstance(prompt[0], numbers.Integral)):
            return [self.encode_prompt(prompt, add_bos)], True
        _check(isinstance(prompt, (list, tuple)) and len(prompt) > 0, "empty prompt: give a string, token ids or a list of them")
        return [self.encode_prompt(p, add_bos) for p in prompt], False

    def _stop_ids(self, opts: DecodeOptions) -> set[int]:
        if opts.stop_token_ids is not None:
            return set(opts.stop_token_ids)
        if self.tokenizer is None:
            return set()
        specials = getattr(self.tokenizer, "special_tokens", {}) or {}
        ids = {specials[n] for n in ("<|bos|>", "<|assistant_end|>") if n in specials}
        if self.bos_id() is not None:
            ids.add(self.bos_id())
        return ids

    def _seen(self, rows: list[list[int]]) -> torch.Tensor:
        """(B, V) bool: the ids each row has seen (prompt included, padding excluded)."""
        seen = torch.zeros(len(rows), self.model.config.vocab_size, dtype=torch.bool, device=self.device)
        for b, row in enumerate(rows):
            seen[b, torch.tensor(row, device=self.device)] = True
        return seen

    # --- public API ------------------------------------------------------------
    def generate(self, prompt, **options) -> Generation | list[Generation]:
        """Generate from one prompt (-> Generation) or a list of prompts (-> list)."""
        opts = self._options(options)
        rows, single = self._rows(prompt, opts.add_bos)
        if opts.mode in ("wand", "speculative") and len(rows) > 1:  # batch size 1 modes: row after row
            out = [_exhaust(self._session([row], opts))[0] for row in rows]
        else:
            out = _exhaust(self._session(rows, opts))
        return out[0] if single else out

    def stream(self, prompt, **options) -> TextStream:
        """Text deltas of one prompt as they are generated (needs a tokenizer)."""
        opts = self._options(options)
        _check(self.tokenizer is not None, "streaming text needs a tokenizer")
        rows, single = self._rows(prompt, opts.add_bos)
        _check(single, "stream takes one prompt")
        return TextStream(self._session(rows, opts))

    def _options(self, options: dict) -> DecodeOptions:
        try:
            opts = DecodeOptions(**options)
        except TypeError as e:
            raise ValueError(f"unknown generation option: {e}") from None
        validate_options(opts, self.model)
        if opts.stop_strings:
            _check(self.tokenizer is not None, "stop strings need a tokenizer")
        if opts.mode == "wand":
            opts.calibration = check_calibration(opts.calibration or self.calibration, self.model)
        return opts

    # --- the generation loop -------------------------------------------------------
    @torch.no_grad()
    def _session(self, rows: list[list[int]], opts: DecodeOptions):
        """Drive a token producer and the stop conditions; yields the collector after every
        chunk of new tokens, returns the list of Generations."""
        t0 = time.perf_counter()
        collector = _Collector(len(rows), opts, self.tokenizer, self._stop_ids(opts))
        stats: dict = {"mode": opts.mode}
        state: dict = {}
        first_token_s = None
        if opts.max_new_tokens > 0:
            producer = {"wand": self._wand_tokens, "speculative": self._speculative_tokens}.get(opts.mode, self._plain_tokens)
            for chunk in producer(rows, opts, stats, state):
                if first_token_s is None:
                    first_token_s = time.perf_counter() - t0
                for b, new in enumerate(chunk):
                    collector.add(b, new)
                yield collector
                if collector.done:
                    break
        for b in range(len(rows)):
            if collector.reason[b] is None:
                collector.reason[b] = "context" if opts.max_new_tokens > 0 else "max_new_tokens"
        if opts.keep_cache and "flush" in state:
            state["flush"]()
        wall = time.perf_counter() - t0
        return self._results(rows, collector, opts, stats, state, wall, first_token_s)

    def _results(self, rows, collector, opts, stats, state, wall, first_token_s) -> list[Generation]:
        n_new = sum(len(t) for t in collector.tokens)
        stats.update({
            "new_tokens": n_new,
            "wall_s": wall,
            "tokens_per_s": n_new / wall if wall > 0 else 0.0,
            "time_to_first_token_s": first_token_s,
            "batch_size": len(rows),
        })
        if "layer_passes" in stats and n_new:  # decode-phase work per new token (per row for a batch)
            stats["mean_layers_per_token"] = stats.pop("layer_passes") * len(rows) / n_new
            stats["mean_layer_calls_per_token"] = stats.pop("layer_calls") * len(rows) / n_new
        out = []
        for b, row in enumerate(rows):
            row_stats = dict(stats, new_tokens=len(collector.tokens[b]), stop_reason=collector.reason[b])
            out.append(Generation(collector.text(b), collector.tokens[b], row_stats, row,
                                  state.get("cache") if opts.keep_cache else None))
        return out

    def _capacity(self, prompt_len: int, opts: DecodeOptions) -> int:
        return min(self.model.config.sequence_len, prompt_len + opts.max_new_tokens)

    # --- producers: each yields, per step, a list (one entry per row) of new token lists ---
    def _plain_tokens(self, rows, opts, stats, state) -> Iterator[list[list[int]]]:
        B, P = len(rows), max(len(r) for r in rows)
        pad = torch.tensor([P - len(r) for r in rows], device=self.device)
        idx = torch.tensor([[0] * (P - len(r)) + r for r in rows], device=self.device)  # (B, P) left-padded
        capacity = self._capacity(P, opts)
        dec = PlainDecoder(self.model, opts, B, capacity, pad)
        state["cache"] = dec.cache
        sampler, seen = Sampler(opts, self.device), self._seen(rows)
        stats["mean_stages_per_token"] = dec.stages_per_token
        logits = dec.forward(idx)  # (B, V)
        dec.layer_passes = dec.layer_calls = 0  # count decode work only
        arange = torch.arange(B, device=self.device)
        while True:
            token = sampler.pick(logits, seen)  # (B,)
            seen[arange, token] = True
            stats.update(layer_passes=dec.layer_passes, layer_calls=dec.layer_calls)
            yield [[t] for t in token.tolist()]
            if dec.cache.n_tokens >= capacity:
                return
            logits = dec.forward(token[:, None])

    def _wand_tokens(self, rows, opts, stats, state) -> Iterator[list[list[int]]]:
        row = rows[0]
        capacity = self._capacity(len(row), opts)
        dec = WandDecoder(self.model, capacity, opts.calibration, opts.wand_factor, opts.logop_alpha)
        state["cache"], state["flush"] = dec.cache, dec.flush
        if len(row) > 1:
            dec.prefill(torch.tensor([row[:-1]], device=self.device))
        dec.layer_passes = dec.layer_calls = 0
        sampler, seen = Sampler(opts, self.device), self._seen(rows)
        token = row[-1]
        while True:
            r, _ = dec.step(token)
            token = sampler.pick(r[None], seen)[0].item()
            seen[0, token] = True
            K = self.model.config.n_stages
            stats.update(mean_stages_per_token=sum(dec.depths) / len(dec.depths), layer_passes=dec.layer_passes,
                         layer_calls=dec.layer_calls,
                         exit_stage_counts=[dec.depths.count(k + 1) for k in range(K)], backfilled=dec.backfilled,
                         wand_factor=opts.wand_factor)
            yield [[token]]
            if dec.cache.n_tokens >= capacity:
                return

    def _speculative_tokens(self, rows, opts, stats, state) -> Iterator[list[list[int]]]:
        model, cfg, device = self.model, self.model.config, self.device
        row = rows[0]
        d = opts.draft_stage
        split, L = cfg.stage_ends[d] + 1, cfg.n_layer
        bl = cfg.backout_layer if cfg.backout else -1
        mid_in_draft = 0 <= bl < split
        capacity = self._capacity(len(row), opts)
        cache = new_cache(model, 1, capacity)
        state["cache"] = cache
        if len(row) > 1:  # the prompt but its last token, full depth; the last one is the first pending token
            ids = torch.tensor([row[:-1]], device=device)
            x = x0 = model.embed(ids, cache)
            model.run_layers(x, x0, ids, 0, L, cache, 0)
        sampler, seen = Sampler(opts, device), self._seen(rows)[0]  # (V,)
        pending, produced, gamma = row[-1], 0, opts.gamma
        n_drafted = n_accepted = n_verify = layer_passes = layer_calls = 0
        while True:
            slot0 = cache.n_tokens
            n_max = max(0, min(gamma, capacity - slot0 - 1, opts.max_new_tokens - produced - 1))
            # draft: layers [0, split) one token at a time; keep boundary residual, x0 (and x_mid)
            xs, x0s, mids, drafts, qs = [], [], [], [], []
            draft_seen = seen.clone()
            feed = pending
            while True:
                idx = torch.tensor([[feed]], device=device)
                x = x0 = model.embed(idx, cache)
                x, kept = model.run_layers(x, x0, idx, 0, split, cache, cache.n_tokens - 1,
                                           keep={bl} if mid_in_draft else set())
                layer_passes, layer_calls = layer_passes + split, layer_calls + split
                xs.append(x), x0s.append(x0), mids.append(kept.get(bl))
                if len(drafts) == n_max:
                    break
                q_logits = sampler.penalise(model.readout(x[:, -1], d), draft_seen[None])  # (1, V)
                if opts.greedy:
                    token = q_logits.argmax(-1)[0].item()
                    top_prob = q_logits.softmax(-1)[0, token].item() if opts.draft_threshold else 1.0
                    q = None
                else:
                    q = sampler.probs(q_logits)[0]
                    token = sampler.draw(q[None])[0].item()
                    top_prob = q.max().item()
                if opts.draft_threshold is not None and top_prob < opts.draft_threshold:
                    break
                drafts.append(token), qs.append(q)
                draft_seen[token] = True
                feed = token
            n = len(drafts)
            # verify: layers [split, L) on [pending, drafts] in one pass
            idx = torch.tensor([[pending] + drafts], device=device)  # (1, n+1)
            x, kept = model.run_layers(torch.cat(xs, 1), torch.cat(x0s, 1), idx, split, L, cache, slot0,
                                       keep={bl} if bl >= split else set())
            layer_passes, layer_calls = layer_passes + (L - split) * (n + 1), layer_calls + L - split
            x_mid = torch.cat(mids, 1) if mid_in_draft else kept.get(bl)
            p_logits = model.readout(x[0], None, x_mid[0] if x_mid is not None else None)  # (n+1, V)
            rows_seen = seen.expand(n + 1, -1).clone()
            for i, t in enumerate(drafts):
                rows_seen[i + 1:, t] = True
            p_logits = sampler.penalise(p_logits, rows_seen)
            n_acc, token = self._accept(drafts, qs, p_logits, sampler, opts)
            accepted = drafts[:n_acc] + [token]
            cache.crop(slot0 + 1 + n_acc)  # roll back rejected drafts in every layer
            for t in accepted:
                seen[t] = True
            pending, produced = token, produced + len(accepted)
            n_drafted, n_accepted, n_verify = n_drafted + n, n_accepted + n_acc, n_verify + 1
            if opts.adaptive_gamma:
                gamma = min(gamma + 2, MAX_GAMMA) if (n and n_acc == n) else max(1, gamma - 1)
            stats.update(draft_stage=d, drafted=n_drafted, accepted=n_accepted, verify_passes=n_verify,
                         acceptance_rate=n_accepted / n_drafted if n_drafted else None,
                         tokens_per_verify=produced / n_verify, layer_passes=layer_passes, layer_calls=layer_calls,
                         mean_stages_per_token=cfg.n_stages, gamma=gamma)
            yield [accepted]
            if cache.n_tokens >= capacity:
                return

    @staticmethod
    def _accept(drafts: list[int], qs: list, p_logits: torch.Tensor, sampler: Sampler,
                opts: DecodeOptions) -> tuple[int, int]:
        """(accepted drafts, next token) from the penalised target logits (n+1, V)."""
        n = len(drafts)
        if opts.greedy:
            target = p_logits.argmax(-1).tolist()
            n_acc = 0
            while n_acc < n and drafts[n_acc] == target[n_acc]:
                n_acc += 1
            return n_acc, target[n_acc]
        p = sampler.probs(p_logits)  # (n+1, V)
        for i, t in enumerate(drafts):
            if sampler.uniform() * qs[i][t].item() < p[i, t].item():  # accept with min(1, p/q)
                continue
            residual = (p[i] - qs[i]).clamp(min=0)
            if residual.sum().item() <= 0:  # p == q up to rounding: the rejection was numerical noise
                residual = p[i]
            return i, sampler.draw((residual / residual.sum())[None])[0].item()
        return n, sampler.draw(p[n][None])[0].item()


def _exhaust(session) -> list[Generation]:
    while True:
        try:
            next(session)
        except StopIteration as stop:
            return stop.value
