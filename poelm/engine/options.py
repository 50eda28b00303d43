"""Decoding options, results and their validation (one line per bad value).

    from poelm.engine.options import DecodeOptions, validate_options
    validate_options(DecodeOptions(mode="speculative", gamma=4), model)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from poelm.model import GPT, KVCache

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


class ContextLengthError(ValueError):
    """A prompt longer than the model's context (`context` tokens; it has `tokens`)."""

    def __init__(self, tokens: int, context: int):
        self.tokens, self.context = tokens, context
        super().__init__(f"prompt has {tokens} tokens but the context holds {context}; shorten it")


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



def refuse_bp(model: GPT, what: str, force: bool) -> None:
    if not model.config.is_poe() and not force:
        raise ValueError(BP_REFUSAL.format(what=what))
