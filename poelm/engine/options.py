"""Decoding options, results and the checks of the mode-independent options (one line per bad
value); each mode's own checks belong to its decoder (registry.validate_options runs both).

    from poelm.engine.options import DecodeOptions, check_common
    check_common(DecodeOptions(temperature=0.8, top_p=0.9), model)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from poelm.model import GPT, KVCache

WAND_TARGETS = ("final", "logop")
CALIBRATION_KEYS = ("wand_bounds", "wand_quantile", "wand_target", "wand_calibration_tokens", "wand_exit_rates",
                    "stage_agreement", "decode_costs")
MAX_GAMMA = 64
SEED_RANGE = (-2 ** 63, 2 ** 64)  # what torch.Generator.manual_seed takes
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
    adaptive: bool = False  # speculative: draft stage and gamma from measured acceptance and costs; plain where drafting loses
    adaptive_probe: int = 16  # adaptive: plain passes before drafting is tried again
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
    constraint: object = None  # structured output: constrain.Constraint or {"kind", "spec"} (Engine.options compiles it)

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


class OptionError(ValueError):
    """A bad decoding option, one line; `option` names its DecodeOptions field (None: no one field)."""

    def __init__(self, message: str, option: str | None = None):
        super().__init__(message)
        self.option = option


def _check(ok: bool, message: str, option: str | None = None) -> None:
    if not ok:
        raise OptionError(message, option)


class ContextLengthError(ValueError):
    """A prompt longer than the model's context (`context` tokens; it has `tokens`)."""

    def __init__(self, tokens: int, context: int):
        self.tokens, self.context = tokens, context
        super().__init__(f"prompt has {tokens} tokens but the context holds {context}; shorten it")


def shown(value, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, so an echoed value keeps a message one short line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


class ModeRefused(OptionError):
    """A decoding mode cannot run on this model (a BP model's stages, too few stages, ...)."""

    def __init__(self, message: str):
        super().__init__(message, "mode")


def check_common(opts: DecodeOptions, model: GPT) -> None:
    """Raise ValueError (one line) for a bad value of an option every mode shares."""
    cfg = model.config
    _check(isinstance(opts.max_new_tokens, int) and opts.max_new_tokens >= 0,
           f"max_new_tokens must be an integer >= 0, got {shown(opts.max_new_tokens)}", "max_new_tokens")
    t = opts.temperature
    _check(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0, f"temperature must be a finite number >= 0 (0 = greedy), got {shown(t)}", "temperature")
    _check(isinstance(opts.top_k, int) and opts.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {shown(opts.top_k)}", "top_k")
    p = opts.top_p
    _check(isinstance(p, (int, float)) and 0 < p <= 1, f"top_p must lie in (0, 1], got {shown(p)}", "top_p")
    rp = opts.repetition_penalty
    _check(isinstance(rp, (int, float)) and math.isfinite(rp) and rp > 0, f"repetition_penalty must be a finite number > 0 (1 = off), got {shown(rp)}", "repetition_penalty")
    _check(opts.seed is None or (isinstance(opts.seed, int) and SEED_RANGE[0] <= opts.seed < SEED_RANGE[1]),
           f"seed must be an integer in [-2**63, 2**64) (a torch generator's seed), got {shown(opts.seed)}", "seed")
    if opts.stop_token_ids is not None:
        _check(all(isinstance(i, int) and 0 <= i < cfg.vocab_size for i in opts.stop_token_ids),
               f"stop_token_ids must be token ids in [0, {cfg.vocab_size})", "stop_token_ids")
    _check(all(isinstance(s, str) and s for s in opts.stop_strings), "stop_strings must be non-empty strings", "stop_strings")
    if opts.logop_alpha is not None:
        _check(math.isfinite(opts.logop_alpha), f"logop_alpha must be finite, got {shown(opts.logop_alpha)}", "logop_alpha")


def refuse_bp(model: GPT, what: str, force: bool) -> None:
    if not model.config.is_poe() and not force:
        raise ModeRefused(BP_REFUSAL.format(what=what))
