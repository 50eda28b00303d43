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

A checkpoint is written into a per-process temporary directory and renamed into place, and
`latest` moves only after that, so a crash or `kill -9` at any point leaves the previous
checkpoint loadable. `resume_point` never trusts `latest` blindly: when it names a missing or
incomplete directory, the newest complete one is used (and named). Nothing read from a run
directory can execute code: optimizer shards load with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from poelm.atomic import atomic_write_bytes, atomic_write_json, replace_dir
from poelm.checkpoint import CONFIG_NAME, LATEST_NAME, WEIGHTS_NAME, atomic_torch_save, save_model

LOCK_NAME = ".lock"
METRICS_NAME = "metrics.jsonl"
TRAINER_NAME = "trainer.json"  # written last: its presence marks a complete checkpoint


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step_"):
        return None
    try:
        return int(name[len("step_"):])
    except ValueError:
        return None


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
        lock = self.path / LOCK_NAME
        while True:  # the lock file is removed on release: make sure we locked the file that is there now
            f = open(lock, "a+")
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
                if os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino:
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
        """Half-written checkpoints of a killed process (safe: we hold the lock)."""
        for tmp in self.path.glob(".*step_*.tmp*"):
            shutil.rmtree(tmp, ignore_errors=True)

    # ---- checkpoints ------------------------------------------------------------

    def is_complete(self, ckpt: Path) -> bool:
        """All files of a checkpoint written by `world` ranks are present."""
        if not (ckpt / TRAINER_NAME).is_file() or not (ckpt / CONFIG_NAME).is_file():
            return False
        if not (ckpt / WEIGHTS_NAME).is_file():
            return False
        return all((ckpt / n).is_file() for r in range(self.shards_of(ckpt))
                   for n in (f"optim_rank{r}.pt", f"loader_rank{r}.json"))

    @staticmethod
    def shards_of(ckpt: Path) -> int:
        return len(list(ckpt.glob("optim_rank*.pt")))

    def step_dirs(self) -> list[Path]:
        """Every step_* directory, oldest first (complete or not)."""
        dirs = [p for p in self.path.glob("step_*") if p.is_dir() and _step_of(p) is not None]
        return sorted(dirs, key=_step_of)

    def complete_checkpoints(self) -> list[Path]:
        return [p for p in self.step_dirs() if self.is_complete(p)]

    def resume_point(self) -> ResumePoint | None:
        """The newest complete checkpoint. `latest` is used when it names a complete one;
        otherwise the newest complete step directory, with a note saying so. A run whose
        step directories are all incomplete is refused rather than restarted."""
        pointer = self.path / LATEST_NAME
        named = pointer.read_text().strip() if pointer.is_file() else None
        if named:
            path = self.path / named
            if path.is_dir() and _step_of(path) is not None and self.is_complete(path):
                return ResumePoint(path, _step_of(path))
        complete = self.complete_checkpoints()
        if complete:
            best = complete[-1]
            why = f"`latest` names {named}, which is missing or incomplete" if named else "`latest` is missing"
            return ResumePoint(best, _step_of(best), f"{why}; resuming from {best.name}, the newest complete checkpoint")
        dirs = self.step_dirs()
        if dirs:
            raise ValueError(f"{self.path} has checkpoint directories ({', '.join(p.name for p in dirs)}) but none is "
                             "complete (each needs trainer.json, config.json, model.safetensors and its optimizer "
                             "and loader shards); restore one or choose another --out")
        return None

    def read_shard(self, ckpt: Path, device: torch.device | str = "cpu") -> dict:
        """This rank's optimizer + RNG shard, loaded without executing code."""
        path = ckpt / f"optim_rank{self.rank}.pt"
        try:
            blob = torch.load(path, map_location=device, weights_only=True)
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
        try:
            value = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e}); resume from another checkpoint") from None
        if not isinstance(value, dict):
            raise ValueError(f"{path} holds {type(value).__name__}, not a JSON object; resume from another checkpoint")
        return value

    def save_checkpoint(self, step: int, model, optimizer, loader, tokenizer, trainer_state: dict, keep: int,
                        run_id: str) -> Path:
        """Every rank writes its optimizer/loader shard into a temporary directory named by
        the run (`run_id` is the same on every rank, distinct per process); rank 0 writes the
        model and trainer.json, renames the directory into place and only then moves `latest`."""
        final = self.path / step_dir_name(step)
        tmp = self.path / f".{final.name}.tmp-{run_id}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            save_model(model, tmp, tokenizer)
        self._barrier()
        atomic_torch_save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / f"optim_rank{self.rank}.pt")
        atomic_write_json(tmp / f"loader_rank{self.rank}.json", loader.state_dict())
        self._barrier()
        if self.rank == 0:
            atomic_write_json(tmp / TRAINER_NAME, trainer_state)
            replace_dir(tmp, final)
            atomic_write_bytes(self.path / LATEST_NAME, final.name.encode())
            self.prune(keep)
        self._barrier()
        return final

    def prune(self, keep: int) -> None:
        """Keep the newest `keep` complete checkpoints (and always `latest`); incomplete
        directories are left for the user to inspect."""
        if keep <= 0:
            return
        latest = (self.path / LATEST_NAME).read_text().strip()
        for old in self.complete_checkpoints()[:-keep]:
            if old.name != latest:
                shutil.rmtree(old, ignore_errors=True)

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
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # an unreadable (torn) line is dropped with the lost work
