"""Command-line flags that are not one command's own: argparse types (at_least,
finite_float, int_range, seconds, comma_ints), settings declared once as dataclass fields
(`setting`: help, choices, flag names, whether a resume may change it) and the flags generated
from them, for GPTConfig (poelm.model), TrainConfig (poelm.train) and SftSettings (poelm.sft),
so a new field becomes a flag without another edit.

    p.add_argument("--batch-size", type=at_least(1))
    add_model_flags(parser)                          # --n-layer/--depth, --n-embd, ... from the fields
    config = config_from_flags(model_kwargs(args))   # an error names the flag it is about
    argv = model_flags(config)                       # the flags that rebuild `config` (torchrun)
    add_setting_flags(parser, TrainConfig, exclude=("model",))   # one flag per field
    argv = setting_flags(tc, exclude=("model",))     # the flags that rebuild those fields

It imports no torch until a GPTConfig function runs, so `poelm --help` stays light.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, field, fields

if typing.TYPE_CHECKING:
    from poelm.model import GPTConfig


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def finite_float(text: str) -> float:
    """An argparse type: a float that is not NaN (inf allowed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value:
        raise argparse.ArgumentTypeError("must be a number, got nan")
    return value


def int_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in low..high."""

    def parse(text: str) -> int:
        value = at_least(low)(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value

    parse.__name__ = f"integer in {low}..{high}"
    return parse


def seconds(high: float) -> Callable[[str], float]:
    """An argparse type: a number of seconds > 0 and <= high."""

    def parse(text: str) -> float:
        value = finite_float(text)
        if not 0 < value <= high:
            raise argparse.ArgumentTypeError(f"must be > 0 and <= {high:g} seconds, got {text}")
        return value

    parse.__name__ = "seconds"
    return parse


def comma_ints(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers such as 12,5,4,3."""
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give comma-separated integers such as 12,5,4,3, got {text!r}") from None


def id_floats(text: str) -> dict[int, float]:
    """An argparse type: comma-separated ID=NUMBER pairs such as 12=-100,7=2.5."""
    out: dict[int, float] = {}
    for pair in text.replace(" ", "").split(","):
        key, _, value = pair.partition("=")
        try:
            out[int(key)] = float(value)  # no "=": float("") fails
        except ValueError:
            raise argparse.ArgumentTypeError(f"give comma-separated ID=NUMBER pairs such as 12=-100,7=2.5, "
                                             f"got {text!r}") from None
    return out


# -----------------------------------------------------------------------------
# Settings: one dataclass field each, its flag generated


def setting(default=None, help: str = "", *, choices: tuple[str, ...] | None = None, flags: tuple[str, ...] = (),
            type: Callable[[str], object] | None = None, shown: str | None = None, resume: bool = False,
            default_factory=None, **more):
    """A settings field with its one-line help; `flags`: its flag names when they are not
    --field-name (the first is the one said in messages), `type`: the argparse type when the
    field's own type is not enough (e.g. at_least(1)), `shown`: the default as --help says it,
    `resume`: a resumed run may change it (it does not alter the weights' trajectory); `more`:
    metadata of the class's own (DecodeOptions: where the server's request carries the field)."""
    meta = {"help": help, "choices": choices, "flags": flags, "type": type, "shown": shown, "resume": resume, **more}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def setting_flag_names(f: Field) -> tuple[str, ...]:
    """The flags of a settings field: its own `flags`, else --field-name."""
    return f.metadata.get("flags") or (flag_name(f.name),)


def add_setting_flags(parser, cls, exclude: tuple[str, ...] = (), defaults_note: str | None = None,
                      choices: dict[str, tuple[str, ...]] | None = None) -> None:
    """One flag per field of the settings dataclass `cls` (its help, choices and type from the
    field; `choices` gives those known only above `cls`, e.g. the decoding modes). The default is
    the field's, or, with defaults_note (e.g. "the preset's"), None = "not given", and a boolean
    flag then takes --no-X too. A list field without a `type` is a repeatable flag (None: not given)."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in exclude:
            continue
        kind = _base_type(hints[f.name])
        default = None if defaults_note or f.default is MISSING else f.default
        help = f.metadata.get("help", f.name)
        shown = defaults_note or f.metadata.get("shown")
        kw: dict = {"dest": f.name, "default": default,
                    "help": help.replace("%", "%%") + (f" (default: {shown})" if shown else "")}
        allowed = (choices or {}).get(f.name) or f.metadata.get("choices")
        if kind is bool:
            kw["action"] = "store_true" if default is False else argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list and not f.metadata.get("type"):
            kw.update(action="append", type=typing.get_args(kind)[0])
        else:
            kw["type"] = f.metadata.get("type") or kind
            if allowed:
                kw["choices"] = allowed
        parser.add_argument(*setting_flag_names(f), **kw)


def setting_kwargs(args: argparse.Namespace, cls, exclude: tuple[str, ...] = ()) -> dict:
    """The fields of `cls` found on the parsed flags."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if f.name not in exclude and hasattr(args, f.name)}


def setting_flags(obj, exclude: tuple[str, ...] = ()) -> list[str]:
    """The flags that rebuild the fields of the settings dataclass `obj` (None: left unset)."""
    argv: list[str] = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in exclude or value is None:
            continue
        flag = setting_flag_names(f)[0]
        if isinstance(value, bool):
            argv += [flag] if value else ([] if f.default is False else ["--no-" + flag[2:]])
        else:
            argv += [flag, str(value)]
    return argv


def resume_mutable(cls) -> set[str]:
    """The fields of `cls` a resumed run may change."""
    return {f.name for f in fields(cls) if f.metadata.get("resume")}


# -----------------------------------------------------------------------------
# GPTConfig: one flag per field

# nanochat's own flag names, accepted beside the field names
FLAG_ALIASES = {"n_layer": ("--depth",), "sequence_len": ("--seq-len",)}


def _base_type(hint):
    """int | None -> int; tuple[int, ...] stays."""
    if isinstance(hint, types.UnionType):
        return next(h for h in typing.get_args(hint) if h is not type(None))
    return hint


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_model_flags(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ("vocab_size",),
                    defaults_note: str | None = None) -> None:
    """One flag per GPTConfig field (its help from the field). Every flag defaults to None,
    i.e. "not given": GPTConfig's own default (shown) or derivation applies. defaults_note
    replaces the shown default (e.g. "the preset's")."""
    from poelm.model import GPTConfig

    group = parser.add_argument_group("model (GPTConfig; sizes left unset are derived)")
    hints = typing.get_type_hints(GPTConfig)
    for f in fields(GPTConfig):
        if f.name in exclude:
            continue
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not MISSING else None
        shown = defaults_note or ("derived" if default is None else default)
        kw: dict = {"dest": f.name, "default": None, "help": f"{f.metadata.get('help', f.name)} (default: {shown})"}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            kw.update(type=comma_ints, metavar="N,N,...")
        else:
            kw["type"] = kind
            choices = f.metadata.get("choices")
            if choices:
                kw["choices"] = choices
        group.add_argument(flag_name(f.name), *FLAG_ALIASES.get(f.name, ()), **kw)


def untrained_fields() -> tuple[str, ...]:
    """GPTConfig fields a model gets from elsewhere, never from training flags (the tokenizer's
    vocabulary, a specialist's attach, a cut by `poelm export --stages`)."""
    from poelm.model import GPTConfig

    return tuple(f.name for f in fields(GPTConfig) if not f.metadata.get("trained", True))


def model_kwargs(args: argparse.Namespace) -> dict:
    """The GPTConfig fields given on the command line (flags left unset are absent)."""
    from poelm.model import GPTConfig

    return {f.name: getattr(args, f.name) for f in fields(GPTConfig) if getattr(args, f.name, None) is not None}


def config_from_flags(kwargs: dict) -> GPTConfig:
    """GPTConfig from model flags; a validation error names the flag it is about."""
    from poelm.model import GPTConfig

    try:
        return GPTConfig(**kwargs)
    except ValueError as e:
        msg = str(e)
        named = next((f.name for f in fields(GPTConfig) if msg.startswith(f.name)), None)
        if named is None:
            named = next((f.name for f in fields(GPTConfig) if f.name in msg), None)
        if named is None:
            raise
        flags = " / ".join((flag_name(named), *FLAG_ALIASES.get(named, ())))
        raise ValueError(f"{flags}: {msg}") from None


def model_flags(config: GPTConfig, exclude: tuple[str, ...] = ("vocab_size",)) -> list[str]:
    """Flags that rebuild `config` exactly (e.g. for a torchrun child process)."""
    argv: list[str] = []
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in exclude or value is None or (f.name == "poe_every"):  # the stage sizes say it all
            continue
        if isinstance(value, bool):
            argv.append(flag_name(f.name) if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, (tuple, list)):
            argv += [flag_name(f.name), ",".join(map(str, value))]
        else:
            argv += [flag_name(f.name), str(value)]
    return argv
