"""A training run directory: one writer at a time, complete checkpoints only, exact resume.

    run = RunDir("runs/tiny", rank=0, world=1)
    with run.locked():                       # exclusive for the run's life (flock; freed by any exit)
        point = run.resume_point()           # newest complete checkpoint, or None
        ...
        run.save_checkpoint(step, model, optimizer, loader, tokenizer, trainer_state, keep=2)

Layout (formats of poelm's own runs):

    .lock                 pid of the process that holds the run (flock'ed while it runs,
                          removed at exit; one left by kill -9 is stale and taken over)
    train_config.json     the settings the run uses (updated only with changes it honours)
    metrics.jsonl         one JSON line per logged step / eval
    step_NNNNNN/          a model directory (config.json, model.safetensors, tokenizer) plus
                          optim_rank{r}.pt, loader_rank{r}.json and trainer.json (written last)
    latest                the name of the newest complete step directory
    result.json           the final metrics, written when the run finishes

A checkpoint is written into a per-process temporary directory and renamed into place, and
`latest` moves only after that, so a crash or `kill -9` at any point leaves the previous
checkpoint loadable; pruning renames a checkpoint to a hidden name before deleting it, so a
reader sees it whole or not at all. `resume_point` never trusts `latest` blindly: when it names
a missing or incomplete directory, or anything but a step directory inside the run, the newest
complete one is used (and named). Nothing read from a run directory can execute code
(optimizer shards load with `torch.load(weights_only=True)`) or lead outside it: links are
never followed (the lock and metrics are opened with O_NOFOLLOW, checkpoints holding links are
not complete), and a failed save (a full disk) names the checkpoint that survives.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
import stat
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from poelm.atomic import atomic_write_bytes, atomic_write_json, clear_stale, owner, replace_dir
from poelm.checkpoint import (LATEST_NAME, TRAINER_NAME, atomic_torch_save, is_complete_checkpoint, read_run_file,
                              run_checkpoint, run_step_dirs, save_model, step_of)
from poelm.jsonfile import parse_json_object

LOCK_NAME = ".lock"
METRICS_NAME = "metrics.jsonl"
SETTINGS_NAME = "train_config.json"
RESULT_NAME = "result.json"


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (a full disk, most often); the previous one survives."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _not_a_link(path: Path, fix: str) -> None:
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; poelm never follows links inside a run directory: {fix}")


@dataclass
class ResumePoint:
    """The checkpoint a resumed run continues from, and why it was chosen."""
    path: Path
    step: int
    note: str | None = None  # set when `latest` could not be used


# -----------------------------------------------------------------------------
# RNG state (saved with every rank's optimizer shard)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# The run directory


class RunDir:
    """One `poelm train --out` directory, seen from one rank."""

    def __init__(self, path: str | os.PathLike, rank: int = 0, world: int = 1):
        self.path, self.rank, self.world = Path(path), rank, world
        self._lock_file = None

    # ---- lock -------------------------------------------------------------------

    @contextmanager
    def locked(self):
        """Hold the run's exclusive lock (rank 0 takes it; every rank learns the outcome).
        flock is released by the kernel on any exit, kill -9 included, so a lock left by a
        dead process is never in the way: its pid is only reported as cleared."""
        error = None
        if self.rank == 0:
            try:
                self._acquire()
            except ValueError as e:
                error = e
        if self.world > 1:  # all ranks stop together when rank 0 could not lock
            flag = torch.tensor([0 if error is None else 1])
            dist.broadcast(flag, 0)
            if int(flag) and error is None:
                raise ValueError(f"{self.path} is in use by another poelm process (see rank 0's error)")
        if error is not None:
            raise error
        try:
            yield self
        except BaseException:
            self._release()
            self._remove_if_untouched()
            raise
        self._release()

    def _acquire(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {self.path} is a file; a run needs a directory (choose another --out)")
        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        metrics = self.path / METRICS_NAME  # the one run file poelm appends to in place
        _not_a_link(metrics, "replace it with a copy of the file it points to (or delete it) and run again")
        lock = self.path / LOCK_NAME
        while True:  # the lock file is removed on release: make sure we locked the file that is there now
            f = self._open_lock(lock)
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                f.close()
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise ValueError(f"{self.path} is in use by another poelm process (pid {holder}); wait for it to "
                                 "finish or choose another --out") from None
            try:
                if os.lstat(lock).st_ino == os.fstat(f.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            f.close()
        f.seek(0)
        stale = f.read().strip()  # left by a process that was killed: flock died with it
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self._lock_file = f
        self.stale_lock_pid = int(stale) if stale.isdigit() else None
        self._clear_temporaries()

    @staticmethod
    def _open_lock(lock: Path):
        """The lock file, opened (created) without following a link, even a dangling one."""
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError:
            _not_a_link(lock, f"delete it (rm {lock}) and run again")
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError(f"{lock} is not a regular file; delete it (rm -r {lock}) and run again")
        return os.fdopen(fd, "r+")

    def _release(self) -> None:
        if self._lock_file is not None:
            (self.path / LOCK_NAME).unlink(missing_ok=True)
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def _remove_if_untouched(self) -> None:
        """A run that failed before writing anything leaves no directory behind."""
        if self.rank == 0 and getattr(self, "_created", False) and self.path.is_dir() \
                and not any(self.path.iterdir()):
            shutil.rmtree(self.path, ignore_errors=True)

    def _clear_temporaries(self) -> None:
        """What killed writers left: half-written and half-pruned checkpoints (safe: we hold
        the lock, and only its holder writes them) and the temporaries of dead processes."""
        for tmp in [*self.path.glob(".*step_*.tmp*"), *self.path.glob(".step_*.pruned-*")]:
            if not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
        clear_stale(self.path)

    # ---- checkpoints ------------------------------------------------------------

    @staticmethod
    def shards_of(ckpt: Path) -> int:
        return len(list(ckpt.glob("optim_rank*.pt")))

    def step_dirs(self) -> list[Path]:
        """Every step_NNNNNN directory (never a link), oldest first (complete or not)."""
        return run_step_dirs(self.path)

    def complete_checkpoints(self) -> list[Path]:
        return [p for p in self.step_dirs() if is_complete_checkpoint(p)]

    def resume_point(self) -> ResumePoint | None:
        """The newest complete checkpoint inside the run. `latest` is used when it names one;
        otherwise the newest complete step directory, with a note saying so. A run whose
        step directories are all incomplete, or whose `latest` names nothing usable while no
        checkpoint is complete, is refused rather than restarted."""
        ckpt, why = run_checkpoint(self.path)
        if ckpt is not None:
            note = why and f"{why}; resuming from {ckpt.name}, the newest complete checkpoint"
            return ResumePoint(ckpt, step_of(ckpt.name), note)
        dirs = self.step_dirs()
        if dirs:
            raise ValueError(f"{self.path} has checkpoint directories ({', '.join(p.name for p in dirs)}) but none is "
                             "complete (each needs trainer.json, config.json, model.safetensors and its optimizer "
                             "and loader shards, none of them a link); restore one or choose another --out")
        if why is not None:
            raise ValueError(f"{self.path / LATEST_NAME}: {why}, and the run has no checkpoint; delete it to start "
                             "the run afresh, or choose another --out")
        return None

    def read_shard(self, ckpt: Path, device: torch.device | str = "cpu") -> dict:
        """This rank's optimizer + RNG shard, loaded without executing code or following a link."""
        path = ckpt / f"optim_rank{self.rank}.pt"
        try:
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), "rb") as f:
                blob = torch.load(f, map_location=device, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # truncated file, or a pickle that is not plain tensors and containers
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{path} is not a readable optimizer shard ({type(e).__name__}: {first[:200]}); "
                             "it may be truncated or foreign: resume from another checkpoint or start a new run") from None
        if not isinstance(blob, dict) or "optimizer" not in blob or "rng" not in blob:
            raise ValueError(f"{path} is not a poelm optimizer shard (no optimizer/rng state); "
                             "resume from another checkpoint or start a new run")
        return blob

    def read_json(self, path: Path) -> dict:
        """A JSON object of the run (never read through a link)."""
        return parse_json_object(read_run_file(path), path, "a run file", "resume from another checkpoint")

    def save_checkpoint(self, step: int, model, optimizer, loader, tokenizer, trainer_state: dict, keep: int,
                        run_id: str) -> Path:
        """Every rank writes its optimizer/loader shard into a temporary directory named by
        the run (`run_id` is the same on every rank, distinct per process); rank 0 writes the
        model and trainer.json, renames the directory into place and only then moves `latest`.
        A failed write (a full disk) removes the temporary directory and raises
        CheckpointSaveError, naming the checkpoint that survives."""
        final = self.path / step_dir_name(step)
        tmp = self.path / f".{final.name}.tmp-{run_id}"
        try:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                save_model(model, tmp, tokenizer)
            self._barrier()
            atomic_torch_save({"optimizer": optimizer.state_dict(), "rng": rng_state()},
                              tmp / f"optim_rank{self.rank}.pt")
            atomic_write_json(tmp / f"loader_rank{self.rank}.json", loader.state_dict())
            self._barrier()
            if self.rank == 0:
                atomic_write_json(tmp / TRAINER_NAME, trainer_state)
                replace_dir(tmp, final)
                atomic_write_bytes(self.path / LATEST_NAME, final.name.encode())
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)  # what a full disk needs back first
            raise self._save_failed(final, e) from None
        if self.rank == 0:
            self.prune(keep)
        self._barrier()
        return final

    def _save_failed(self, final: Path, e: OSError) -> CheckpointSaveError:
        good, _ = run_checkpoint(self.path)
        kept = f"the last good checkpoint {good.name} is intact" if good else "the run has no checkpoint yet"
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        return CheckpointSaveError(
            f"could not save checkpoint {final.name} in {self.path} ({'the disk is full: ' if full else ''}"
            f"{e.strerror or e}); {kept}; {'free disk space' if full else 'fix that'}, then run the same "
            "command with --resume to continue")

    def prune(self, keep: int) -> None:
        """Keep the newest `keep` complete checkpoints (and always `latest`); incomplete
        directories are left for the user to inspect. Each is renamed to a hidden name before
        it is deleted, so a reader loads it whole or finds it gone, never half-deleted."""
        if keep <= 0:
            return
        latest = read_run_file(self.path / LATEST_NAME, limit=256).decode().strip()
        for old in self.complete_checkpoints()[:-keep]:
            if old.name != latest:
                gone = old.with_name(f".{old.name}.pruned-{owner()}")
                os.replace(old, gone)
                shutil.rmtree(gone, ignore_errors=True)

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


# -----------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """Append-only JSONL of every logged step and eval (rank 0 only).

    On resume the lines past the checkpoint's step (work that was thrown away) are dropped.
    A run that restarts without any checkpoint never truncates history: an existing log is
    kept beside the new one as metrics.orphaned-N.jsonl."""

    def __init__(self, path: Path, enabled: bool, resumed_step: int | None):
        self.path, self.enabled = path, enabled
        self.moved_to: Path | None = None
        if not enabled or not path.exists() or path.stat().st_size == 0:
            return
        if resumed_step is None:
            n = 1
            while path.with_name(f"metrics.orphaned-{n}.jsonl").exists():
                n += 1
            self.moved_to = path.with_name(f"metrics.orphaned-{n}.jsonl")
            os.replace(path, self.moved_to)
            return
        kept = [line for line in path.read_text().splitlines() if line and _line_step(line) <= resumed_step]
        atomic_write_bytes(path, ("\n".join(kept) + "\n").encode() if kept else b"")

    def write(self, record: dict) -> None:
        if self.enabled:  # never through a link (one made after the run started included)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "a") as f:
                f.write(json.dumps(record) + "\n")


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # an unreadable (torn) line is dropped with the lost work
