"""Bounded reads of the small settings files poelm trusts nothing in (config.json, a nanochat
meta_*.json, delta.json, specialist.json, generation_config.json, experiment YAML/TOML), and
the check of each field as it is taken: every error is one ValueError line that names the file,
the field and the fix.

    from poelm.jsonfile import read_json_object, check_field
    meta = read_json_object(path, "a specialist delta file", fix="re-save it with `poelm specialist save-delta`")
    layers = check_field(meta, "new_layers", int, path, low=1)

A file is opened once and checked to be a regular file before a byte is read (a link to
/dev/zero or a FIFO is refused without blocking on it), and never more than max_bytes of it is
read, so a file that lies about its size cannot make poelm read without bound.
"""

from __future__ import annotations

import json
import math
import os
import stat

MAX_SETTINGS_BYTES = 16 * 2 ** 20  # settings files are a few KB; the largest legitimate ones are far below this


def read_bounded(path: str | os.PathLike, max_bytes: int = MAX_SETTINGS_BYTES) -> bytes:
    """The bytes of a regular file of at most max_bytes (links are followed to their target)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO opens without waiting for a writer
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file (a device, FIFO or socket, or a link to one); "
                             "replace it with the file itself")
        if info.st_size > max_bytes:
            raise ValueError(f"{path} holds {info.st_size:,} bytes, more than the {max_bytes:,} bytes a settings "
                             "file may have; check that it is the file poelm wrote")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew while being read
        raise ValueError(f"{path} is longer than the {max_bytes:,} bytes a settings file may have")
    return data


def read_text(path: str | os.PathLike, max_bytes: int = MAX_SETTINGS_BYTES) -> str:
    """read_bounded decoded as UTF-8."""
    try:
        return read_bounded(path, max_bytes).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None


def read_json_object(path: str | os.PathLike, what: str = "a JSON object", fix: str = "",
                     max_bytes: int = MAX_SETTINGS_BYTES) -> dict:
    """The JSON object in `path`; anything else (not JSON, nested past the parser's depth, a
    list or a number) is one ValueError naming the file, `what` it should be and `fix`."""
    return parse_json_object(read_text(path, max_bytes), path, what, fix)


def parse_json_object(text: str | bytes, path: str | os.PathLike, what: str = "a JSON object", fix: str = "") -> dict:
    """The JSON object in `text` read from `path` (by read_json_object, or by a caller with its own
    way of opening files); anything else is one ValueError naming the file, `what` and `fix`."""
    hint = f"; {fix}" if fix else ""
    try:
        data = json.loads(text)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}){hint}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}){hint}") from None
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be {what}{hint}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got {_kind_of(data)}{hint}")
    return data


def _kind_of(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list",
             dict: "an object", type(None): "null"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _has_kind(value, kind: type | tuple[type, ...]) -> bool:
    """isinstance, except that a bool is not a number and an int is a float (a finite one)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, (int, float)) and float in kinds:
        return math.isfinite(value)
    return isinstance(value, kinds)


def check_field(data: dict, name: str, kind: type | tuple[type, ...], source: str | os.PathLike, fix: str = "", *,
                required: bool = True, low: float | None = None, high: float | None = None,
                choices: tuple | None = None):
    """data[name], checked to be a `kind` (a bool is no number; numbers are finite) within
    [low, high] and among choices; absent or null gives None unless required. An error is one
    ValueError line "SOURCE: NAME ... got VALUE; FIX"."""
    hint = f"; {fix}" if fix else ""
    value = data.get(name)
    if value is None:
        if required:
            raise ValueError(f"{source}: field {name!r} is missing (it must be {_kind_name(kind)}){hint}")
        return None
    shown = json.dumps(value)[:60] if isinstance(value, (str, int, float, bool)) else _kind_of(value)
    if not _has_kind(value, kind):
        raise ValueError(f"{source}: field {name!r} must be {_kind_name(kind)}, got {shown}{hint}")
    if choices is not None and value not in choices:
        raise ValueError(f"{source}: field {name!r} must be one of {', '.join(map(str, choices))}, got {shown}{hint}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"from {low} to {high}" if low is not None and high is not None else \
            (f">= {low}" if low is not None else f"<= {high}")
        raise ValueError(f"{source}: field {name!r} must be {bounds}, got {shown}{hint}")
    return value

