"""The decoding modes: each mode's decoder class and what it supports, in one place.

    from poelm.engine.registry import MODES, capabilities, make_decoder, validate_options
    capabilities("wand").needs_calibration           # True
    validate_options(opts, model)                    # ValueError (ModeRefused: the mode cannot run here)
    dec = make_decoder(model, opts, capacity)        # the decoder of opts.mode

The CLI, the server, compare and the engine ask this module about a mode instead of naming
modes themselves: a new mode is one decoder class with its `modes` declaration, listed here.
"""

from __future__ import annotations

import weakref

from poelm.engine.decoders import Capabilities, Decoder, PlainDecoder, compiled_cache_len
from poelm.engine.options import DecodeOptions, _check, check_common
from poelm.engine.speculative import SpeculativeDecoder
from poelm.engine.wand import WandDecoder
from poelm.model import GPT

DECODERS: dict[str, type[Decoder]] = {mode: cls for cls in (PlainDecoder, WandDecoder, SpeculativeDecoder)
                                      for mode in cls.modes}
MODES = tuple(DECODERS)


def capabilities(mode: str) -> Capabilities:
    """What `mode` supports and needs (a mode of MODES)."""
    return DECODERS[mode].modes[mode]


def modes_with(**wanted: bool) -> tuple[str, ...]:
    """The modes whose capabilities have these values, e.g. modes_with(compilable=True)."""
    return tuple(m for m in MODES if all(getattr(capabilities(m), k) == v for k, v in wanted.items()))


def modes_reading(option: str) -> tuple[str, ...]:
    """The modes that read a mode-specific DecodeOptions field (Capabilities.options)."""
    return tuple(m for m in MODES if option in capabilities(m).options)


MODE_OPTIONS = tuple(dict.fromkeys(o for m in MODES for o in capabilities(m).options))  # read by some modes only


def ignored_options(opts: DecodeOptions) -> list[str]:
    """The mode-specific fields of `opts` set away from their defaults that opts.mode does not read
    (`--stage 2` without `--mode stage`)."""
    defaults = DecodeOptions()
    own = capabilities(opts.mode).options if opts.mode in DECODERS else ()
    return [o for o in MODE_OPTIONS if o not in own and getattr(opts, o) != getattr(defaults, o)]


COMPILABLE_MODES = modes_with(compilable=True)
LOGPROB_MODES = modes_with(logprobs=True)


def option_choices() -> dict[str, tuple[str, ...]]:
    """The values of DecodeOptions fields that only the registry knows (mode: MODES)."""
    return {"mode": MODES}


def validate_options(opts: DecodeOptions, model: GPT) -> None:
    """Raise ValueError (one line) for bad parameters and bad stages, ModeRefused (a ValueError)
    where the mode cannot decode this model (a BP model's stages unless forced, ...). A WAND
    calibration is checked where one is chosen (Engine.options)."""
    _check(opts.mode in DECODERS, f"unknown mode {opts.mode!r}; choose one of {', '.join(MODES)}", "mode")
    check_common(opts, model)
    DECODERS[opts.mode].check(opts, model)


def make_decoder(model: GPT, opts: DecodeOptions, capacity: int, compile: str | None = None) -> Decoder:
    """The decoder of opts.mode (opts already validated); compile (a torch.compile backend): a
    compilable mode's step runs as compiled static-shape graphs (Decoder.compile_step)."""
    cls = DECODERS[opts.mode]
    if not compile:
        return attached(cls(model, opts, capacity))
    _check(capabilities(opts.mode).compilable, f"compile applies to the modes {', '.join(COMPILABLE_MODES)}; "
           f"mode {opts.mode} decodes eagerly: drop compile / --compile")
    slots = compiled_cache_len(capacity + cls.min_scratch(opts), model.config.sequence_len)
    dec = cls(model, opts, capacity, slots - capacity)
    dec.compile_step(compile)
    return attached(dec)


def attached(dec: Decoder) -> Decoder:
    """dec, its sampler reading the decoder's rows (the generated tokens of ROW_OPTIONS) through a
    weak reference: a decoder -> sampler -> decoder cycle would keep a dropped decoder and its KV
    cache until Python's cyclic collector ran, which a long-running server seldom does."""
    owner = weakref.ref(dec)
    dec.sampler.rows = lambda: owner().rows
    return dec
