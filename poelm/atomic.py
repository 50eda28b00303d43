"""Atomic, durable file writes: the one writer behind every file poelm saves.

    from poelm.atomic import atomic_path, atomic_write_bytes, atomic_write_json
    atomic_write_json("runs/x/result.json", {"step": 8})
    with atomic_path("model.safetensors") as tmp:   # any library that writes to a path
        save_file(state, tmp)
    with atomic_dir("out/model") as tmp:            # a whole directory, replaced in one rename
        write_files_into(tmp)

A file is written under a per-process temporary name in its own directory, flushed to disk
(fsync), renamed over the final name in one step and the directory entry synced, so a crash
or kill -9 leaves either the old file or the new one, never a torn one. Files and directories get
the modes open() and mkdir() would give them under the user's umask (not mkstemp's 0600).

Temporary names say who writes them: `.NAME.tmp-<pid>-<host>-<random>` (and `.NAME.old-<pid>-<host>`
for a directory being replaced), where <host> is 8 hex digits naming the machine and its PID
namespace. Every writer first clears what dead writers on this machine left in the directory
(`clear_stale`), so a kill -9 leaves nothing behind for good; a live process's are never touched.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})(?:-.*)?", re.DOTALL)


@functools.lru_cache(maxsize=1)
def _host() -> str:
    """8 hex digits naming this machine and PID namespace: a pid means something only there."""
    ident = socket.gethostname()
    try:
        ident += f":{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc (macOS): the host name alone
        pass
    return hashlib.sha256(ident.encode()).hexdigest()[:8]


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    """This process's umask (read once: setting it back at once is the only portable way to read it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def owner() -> str:
    """`<pid>-<host>`: the part of a temporary name that names its writer."""
    return f"{os.getpid()}-{_host()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, ValueError):  # no such pid can exist
        return False
    return True


def clear_stale(directory: str | os.PathLike) -> None:
    """Remove the temporaries that dead writers on this machine left in `directory`: a
    `.NAME.tmp-*` is deleted; a `.NAME.old-*` is moved back onto NAME when NAME is missing
    (the writer died between its two renames), else deleted."""
    directory = Path(directory)
    try:
        with os.scandir(directory) as entries:
            names = [e.name for e in entries if e.name.startswith(".")]
    except OSError:
        return
    for name in names:
        m = TEMP_NAME.fullmatch(name)
        if m is None or m["host"] != _host() or _alive(int(m["pid"])):
            continue
        path, final = directory / name, directory / m["name"]
        try:
            if m["kind"] == "old" and not os.path.lexists(final):
                os.replace(path, final)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:  # another writer cleared it first, or it is not ours to remove
            pass


def _fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it is synced and renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{owner()}-")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 -> what open() would give under the user's umask
    try:
        yield tmp
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_path(path.parent, directory=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written tmp_dir onto final_dir (the old one is removed only after; a link
    there is replaced, never followed)."""
    final_dir = Path(final_dir)
    old = None
    if os.path.lexists(final_dir):
        old = final_dir.with_name(f".{final_dir.name}.old-{owner()}")
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None and old.is_symlink():
        old.unlink()
    elif old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a new temporary directory beside `path`; on success it replaces `path` in one
    rename, on any failure it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(path.parent)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-{owner()}-"))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> what mkdir would give under the user's umask
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
