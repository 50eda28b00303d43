"""The marker poelm leaves in each output directory it writes, and the test of whether an
existing directory may be replaced: only an empty one, or one whose marker says poelm wrote
exactly what is there now.

    from poelm.outputs import mark_output, foreign_content, amending
    mark_output(tmp, "export")                 # last step of writing an output directory
    foreign_content(out, ("model", "export"))  # None: replaceable; else what is not poelm's
    with amending(model_dir, "generation_config.json"):   # poelm rewrites one file later on
        atomic_write_json(model_dir / "generation_config.json", gen)

The marker `.poelm-output.json` records the kind of output and the name and size of every
file poelm wrote beside it. A directory matches its marker when it holds those files and
nothing else, each a regular file (not a link, not a directory) of the recorded size; the one
exception is a `__pycache__` directory of compiled copies of the output's own `.py` files
(Python writes it when the remote code is imported from the directory). File names decide
nothing by themselves: a downloaded Hugging Face folder, or an output a user has added to, is
foreign. A training checkpoint (a run's step directory, written by save_model) holds more than
its marker lists (optimizer and loader state), so no output replaces it. This module is
poelm's side only: the remote code copied into exports never imports it.
"""

from __future__ import annotations

import json
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from poelm.atomic import atomic_write_json

MARKER_NAME = ".poelm-output.json"
MARKER_FORMAT = "poelm-output-v1"
MODEL_KIND = "model"  # save_model, poelm specialist attach
EXPORT_KIND = "export"  # poelm export
MODEL_KINDS = (MODEL_KIND, EXPORT_KIND)  # either may replace the other
DELTA_KIND = "delta"  # poelm specialist save-delta
TOKENIZER_KIND = "tokenizer"  # poelm tokenizer train
MARKER_LIMIT = 1 << 20  # bytes of a marker read at most (it lists a handful of files)
PYCACHE = "__pycache__"


def _listing(directory: Path) -> dict[str, int]:
    """name -> size of the regular files in `directory` (the marker excluded)."""
    files = {}
    for entry in sorted(directory.iterdir()):
        if entry.name == MARKER_NAME:
            continue
        mode = entry.lstat().st_mode
        if not stat.S_ISREG(mode):
            raise RuntimeError(f"{entry} is not a regular file: an output directory holds only files")
        files[entry.name] = entry.lstat().st_size
    return files


def mark_output(directory: str | os.PathLike, kind: str) -> None:
    """Write the marker of `directory` (the last step of writing it): its kind and the name
    and size of every file in it."""
    directory = Path(directory)
    atomic_write_json(directory / MARKER_NAME, {"format": MARKER_FORMAT, "kind": kind, "files": _listing(directory)})


def read_marker(directory: Path) -> dict | None:
    """The marker of `directory` as written by mark_output, or None when it is missing or not one."""
    path = directory / MARKER_NAME
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return None
        with open(path, "rb") as f:
            text = f.read(MARKER_LIMIT + 1)
        marker = json.loads(text) if len(text) <= MARKER_LIMIT else None
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT or not isinstance(marker.get("kind"), str):
        return None
    files = marker.get("files")
    if not isinstance(files, dict) or not all(_is_name(n) and _is_size(s) for n, s in files.items()):
        return None
    return marker


def _is_name(name: str) -> bool:
    """A plain entry name of the directory itself (no path, not the marker)."""
    return name not in ("", ".", "..", MARKER_NAME) and "/" not in name and "\0" not in name


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _only_bytecode_of(entry: Path, files: dict[str, int]) -> bool:
    """Whether `entry` is a __pycache__ directory of compiled copies of the listed .py files only."""
    if entry.name != PYCACHE or not stat.S_ISDIR(entry.lstat().st_mode):
        return False
    stems = {name[:-3] for name in files if name.endswith(".py")}
    for f in entry.iterdir():
        m = re.fullmatch(r"(.+?)\.[\w-]+(\.opt-\d)?\.pyc", f.name)
        if m is None or m.group(1) not in stems or not stat.S_ISREG(f.lstat().st_mode):
            return False
    return True


def _mismatch(directory: Path, files: dict[str, int]) -> str | None:
    """What in `directory` differs from the files its marker lists, or None."""
    extra = []
    for entry in sorted(directory.iterdir()):
        if entry.name == MARKER_NAME or entry.name in files or _only_bytecode_of(entry, files):
            continue
        extra.append(entry.name + ("/" if entry.is_dir() else ""))
    if extra:
        return f"it holds {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}, which poelm did not write there"
    for name, size in files.items():
        path = directory / name
        try:
            st = path.lstat()
        except FileNotFoundError:
            return f"{name}, which poelm wrote, is missing"
        if not stat.S_ISREG(st.st_mode):
            return f"{name} is {'a directory' if stat.S_ISDIR(st.st_mode) else 'not a regular file'} where poelm wrote a file"
        if st.st_size != size:
            return f"{name} has changed since poelm wrote it ({st.st_size} bytes, not {size})"
    return None


def foreign_content(directory: str | os.PathLike, kinds: tuple[str, ...]) -> str | None:
    """None when `directory` may be replaced by an output of one of `kinds` (it is empty, or
    its marker is of such a kind and matches what is there); otherwise what is foreign in it."""
    directory = Path(directory)
    names = sorted(p.name for p in directory.iterdir())
    if not names:
        return None
    marker = read_marker(directory)
    if marker is None:
        shown = f"{', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
        what = "an unreadable" if MARKER_NAME in names else "no"
        return f"it holds {shown} and {what} {MARKER_NAME} marker of a poelm output"
    if marker["kind"] not in kinds:
        return f"it is a poelm {marker['kind']} output"
    return _mismatch(directory, marker["files"])


@contextmanager
def amending(directory: str | os.PathLike, name: str) -> Iterator[None]:
    """Around a later write of file `name` into an output directory: a marker that matched
    the directory before the write is updated to the file's new size (otherwise it is left
    as it was, and the directory stays foreign)."""
    directory = Path(directory)
    marker = read_marker(directory) if directory.is_dir() else None
    if marker is not None and _mismatch(directory, marker["files"]) is not None:
        marker = None
    yield
    if marker is not None:
        marker["files"][name] = (directory / name).lstat().st_size
        atomic_write_json(directory / MARKER_NAME, marker)
