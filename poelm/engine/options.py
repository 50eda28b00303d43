"""Decoding options, results and the checks of the mode-independent options (one line per bad
value); each mode's own checks belong to its decoder (registry.validate_options runs both).

    from poelm.engine.options import DecodeOptions, check_common
    check_common(DecodeOptions(temperature=0.8, top_p=0.9), model)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from poelm.flags import comma_ints, finite_float, id_floats, setting
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


POE, TOP, OPENAI = "poe", "top", "openai"  # where the server's request carries a DecodeOptions field


def option(default=None, help: str = "", request: str | None = POE, low: int | None = None, high: int | None = None,
           **kw):
    """A DecodeOptions field: its help, its CLI flag (poelm.flags.setting; None: Python API only),
    where a server request carries it: POE = in the `poe` object under its own name, TOP = a
    top-level field of its own name and default, OPENAI = OpenAI's own field (its name and
    default: `request_name`), None = the Python API only (no flag either); an integer field's
    bounds low..high (check_bounds, in every mode)."""
    return setting(default, help, request=request, low=low, high=high, **kw)


@dataclass
class DecodeOptions:
    """Everything `Engine.generate` / `Engine.stream` accept as keyword arguments. Each field is
    declared once here: the CLI's decoding flags and the server's request fields are generated
    from these declarations, and the one check of each value (check_common or the mode's
    decoder) answers all three."""

    mode: str = option("final", "readout / decoding mode")
    stage: int | None = option(None, "mode stage: the stage to read out at", shown="0", low=0)
    stages: list[int] | None = option(None, "mode logop: comma list of stages", type=comma_ints, shown="all")
    logop_alpha: float | None = option(None, "mode logop (and wand target logop): Log-OP alpha", type=finite_float,
                                       shown="the model's poe_alpha")
    draft_stage: int = option(0, "mode speculative: the drafting stage", low=0)
    gamma: int = option(4, "mode speculative: drafted tokens per verify pass (the maximum when adaptive)",
                       low=1, high=MAX_GAMMA)
    adaptive_gamma: bool = option(False, "mode speculative: grow gamma by 2 after a fully accepted pass, "
                                         "shrink it by 1 otherwise")
    adaptive: bool = option(False, "mode speculative: draft stage and gamma from measured acceptance and costs; "
                                   "plain decoding where drafting loses")
    adaptive_probe: int = option(16, "mode speculative with adaptive: plain passes before drafting is tried again",
                                 low=1)
    draft_threshold: float | None = option(None, "mode speculative: stop drafting when the draft's top probability "
                                                 "falls below this", type=finite_float, shown="off")
    wand_factor: float = option(1.0, "mode wand: exit factor F (larger is safer, inf = full depth)",
                                type=finite_float)
    calibration: dict | None = option(None, "overrides Engine.calibration for this call", request=None)
    max_new_tokens: int = option(64, "tokens to generate at most", request=OPENAI, request_name="max_tokens", low=0)
    temperature: float = option(0.0, "sampling temperature, 0 = greedy", type=finite_float, request=OPENAI)
    top_k: int = option(0, "sample from the k likeliest tokens, 0 = off", request=TOP, low=0)
    top_p: float = option(1.0, "nucleus sampling mass, 1 = off", type=finite_float, request=OPENAI)
    min_p: float = option(0.0, "drop tokens less likely than min_p times the likeliest one, 0 = off",
                          type=finite_float, request=TOP)
    repetition_penalty: float = option(1.0, "penalty on every token of the row (prompt included), 1 = off",
                                       type=finite_float, request=TOP)
    presence_penalty: float = option(0.0, "subtracted from the logit of each token generated before, 0 = off",
                                     type=finite_float, request=TOP)
    frequency_penalty: float = option(0.0, "subtracted from a token's logit once per time it was generated, 0 = off",
                                      type=finite_float, request=TOP)
    logit_bias: dict[int, float] | None = option(None, "added to these tokens' logits, e.g. 12=-100,7=2.5",
                                                 type=id_floats, request=TOP)
    seed: int | None = option(None, "sampling seed", request=TOP, shown="unseeded")
    stop_token_ids: list[int] | None = option(None, "token ids that end generation (comma list)", type=comma_ints,
                                              request=TOP, shown="<|bos|> and <|assistant_end|>")
    ignore_eos: bool = option(False, "go on past <|bos|> / <|assistant_end|> (stop_token_ids still stop)", request=TOP)
    min_tokens: int = option(0, "tokens generated before a stop token or stop string may end the row", request=TOP,
                          low=0)
    stop_strings: list[str] = option(help="stop before this text (repeatable)", flags=("--stop",), request=OPENAI,
                                     request_name="stop", default_factory=list)
    add_bos: bool = option(True, "prepend <|bos|> to a prompt that lacks it")
    force: bool = option(False, "allow PoE modes on a BP model (research)")
    keep_cache: bool = option(False, "attach the final KV cache (complete: WAND back-fills pending slots)",
                              request=None)
    constraint: object = option(None, "structured output: constrain.Constraint or {'kind', 'spec'} (Engine.options "
                                      "compiles it)", request=None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def request_fields(where: str) -> list:
    """The DecodeOptions fields a server request carries at `where` (POE, TOP or OPENAI)."""
    return [f for f in fields(DecodeOptions) if f.metadata["request"] == where]


def request_param(name: str | None) -> str | None:
    """The request field that sets DecodeOptions field `name`: `poe.gamma`, `top_k`, `max_tokens` (None: none)."""
    f = next((f for f in fields(DecodeOptions) if f.name == name), None)
    if f is None or f.metadata["request"] is None:
        return None
    key = f.metadata.get("request_name", f.name)
    return f"poe.{key}" if f.metadata["request"] == POE else key


# options that read each row's own generated tokens (Sampler.generated): off, they cost no work
ROW_OPTIONS = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "min_tokens": 0}


def row_options(opts: DecodeOptions) -> list[str]:
    """The options of ROW_OPTIONS that opts sets away from off."""
    return [name for name, off in ROW_OPTIONS.items() if getattr(opts, name) != off]


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
    """A bad decoding option, one line; `option` names its DecodeOptions field (None: no one field).
    `template`, where the message names other fields too: the message with each DecodeOptions
    field as {field}, so that an interface says them in its own names (said)."""

    def __init__(self, message: str, option: str | None = None, template: str | None = None):
        super().__init__(message)
        self.option, self.template = option, template

    def said(self, name: Callable[[str], str]) -> str:
        """The message with each DecodeOptions field it names spelt name(field) (the server: its request field)."""
        if self.template is None:
            return str(self)
        return self.template.format_map({f.name: name(f.name) for f in fields(DecodeOptions)})


def _check(ok: bool, message: str, option: str | None = None) -> None:
    if not ok:
        raise OptionError(message, option)


def _check_naming(ok: bool, template: str, option: str) -> None:
    """_check of a message that names DecodeOptions fields as {field} (OptionError.said)."""
    if not ok:
        raise OptionError(template.format_map({f.name: f.name for f in fields(DecodeOptions)}), option, template)


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


def check_bounds(opts: DecodeOptions) -> None:
    """Raise OptionError for an integer field outside its declared bounds (None passes: unset)."""
    for f in fields(opts):
        low, high, value = f.metadata.get("low"), f.metadata.get("high"), getattr(opts, f.name)
        if low is None or value is None:
            continue
        ok = isinstance(value, int) and not isinstance(value, bool) and low <= value <= (math.inf if high is None else high)
        _check(ok, f"{f.name} must be an integer {'>= ' + str(low) if high is None else f'in {low}..{high}'}, "
               f"got {shown(value)}", f.name)


def check_common(opts: DecodeOptions, model: GPT) -> None:
    """Raise ValueError (one line) for a bad value of an option every mode shares."""
    cfg = model.config
    check_bounds(opts)
    t = opts.temperature
    _check(isinstance(t, (int, float)) and math.isfinite(t) and t >= 0, f"temperature must be a finite number >= 0 (0 = greedy), got {shown(t)}", "temperature")
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
    mp = opts.min_p
    _check(isinstance(mp, (int, float)) and 0 <= mp <= 1, f"min_p must lie in [0, 1] (0 = off), got {shown(mp)}", "min_p")
    for name in ("presence_penalty", "frequency_penalty"):
        v = getattr(opts, name)
        _check(isinstance(v, (int, float)) and -2 <= v <= 2, f"{name} must lie in [-2, 2] (0 = off), got {shown(v)}", name)
    if opts.logit_bias is not None:
        _check(isinstance(opts.logit_bias, dict), "logit_bias must map token ids to numbers", "logit_bias")
        for i, b in opts.logit_bias.items():
            _check(isinstance(i, int) and 0 <= i < cfg.vocab_size,
                   f"logit_bias key {shown(i)} is not a token id of this model: ids lie in [0, {cfg.vocab_size})", "logit_bias")
            _check(isinstance(b, (int, float)) and -100 <= b <= 100, f"logit_bias values must lie in [-100, 100], "
                   f"got {shown(b)} for token {i}", "logit_bias")
    _check_naming(opts.min_tokens <= opts.max_new_tokens, f"{{min_tokens}} {opts.min_tokens} is above {{max_new_tokens}} "
                  f"{opts.max_new_tokens}: give {{min_tokens}} <= {{max_new_tokens}}", "min_tokens")
    if opts.logop_alpha is not None:
        _check(math.isfinite(opts.logop_alpha), f"logop_alpha must be finite, got {shown(opts.logop_alpha)}", "logop_alpha")


def refuse_bp(model: GPT, what: str, force: bool) -> None:
    if not model.config.is_poe() and not force:
        raise ModeRefused(BP_REFUSAL.format(what=what))
