"""Reliability of run directories, round 2 (issue [14]): nothing in a run directory (a linked
`.lock` or metrics.jsonl, a `latest` naming a foreign or linked checkpoint, links inside a
checkpoint) makes poelm read or write outside the run; temporaries left by kill -9 carry their
writer's pid and are cleared by later writers; resume restores Python's `random` after all
set-up; a load never reads a half-pruned checkpoint; a full disk during a checkpoint save is
one line naming the checkpoint that survives.

Bad input is asserted the way users see it: exit status 2 and one line `poelm: error: ...`.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from poelm.atomic import TEMP_NAME, atomic_write_json, owner
from poelm.checkpoint import load_model
from poelm.rundir import LOCK_NAME, RunDir
from test_reliability import copy_run, subprocess_env
from test_train import (ROOT, base_run, env, expect_error, latest, one_thread, records, run, snapshot,  # noqa: F401
                        train_args, weights)

SHORT = {"num-iterations": 4, "eval-every": 0, "save-every": 4}  # one checkpoint, at step 4


def equal_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def run_at_step4(base_run: Path, dst: Path) -> Path:
    """A copy of the base run as it was after its step-4 checkpoint (step 8 not yet saved)."""
    out = copy_run(base_run, dst)
    shutil.rmtree(out / "step_000008")
    (out / "latest").write_text("step_000004")
    return out


# -----------------------------------------------------------------------------
# Links and foreign paths in a run directory


def test_linked_lock_is_refused_and_nothing_is_written_through_it(env, base_run, tmp_path, capsys):
    out = copy_run(base_run, tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / LOCK_NAME).symlink_to(victim)
    expect_error(train_args(env, out, resume=True), capsys, f"{out / LOCK_NAME} is a symbolic link", "rm ")
    assert victim.read_text() == "precious\n"

    (out / LOCK_NAME).unlink()
    dangling = tmp_path / "created.txt"
    (out / LOCK_NAME).symlink_to(dangling)  # O_CREAT must not create the link's target
    expect_error(train_args(env, out, resume=True), capsys, "is a symbolic link")
    assert not dangling.exists() and (out / LOCK_NAME).is_symlink()


def test_linked_metrics_log_is_refused(env, base_run, tmp_path, capsys):
    out = copy_run(base_run, tmp_path / "run")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(victim)
    expect_error(train_args(env, out, resume=True, **{"extend-to": 9}), capsys, "metrics.jsonl is a symbolic link")
    assert victim.read_text() == "precious\n" and not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("pointer", ["../other/step_000008", "ABS", "link"])
def test_latest_never_leads_outside_the_run(env, base_run, tmp_path, capsys, pointer):
    """`latest` naming another run's checkpoint (relative, absolute, or a step directory of
    this run that is a link to it): the resume falls back to the newest complete checkpoint
    inside the run, says so, and ends exactly like the straight run; the other run is untouched."""
    other = copy_run(base_run, tmp_path / "other")
    before = snapshot(other)
    out = run_at_step4(base_run, tmp_path / "run")
    if pointer == "link":
        (out / "step_000008").symlink_to(other / "step_000008")
        pointer = "step_000008"
    (out / "latest").write_text(str(other / "step_000008") if pointer == "ABS" else pointer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tokenizer = load_model(out)  # a reader takes the same checkpoint, with a warning
    assert "loading step_000004, the newest complete checkpoint" in str(caught[-1].message)
    assert all(torch.equal(p, weights(out / "step_000004")[n]) for n, p in model.state_dict().items())
    rc, stdout, err = run(train_args(env, out, resume=True, quiet=False), capsys)
    assert rc == 0, err
    assert "`latest`" in stdout and "resuming from step_000004, the newest complete checkpoint" in stdout
    assert equal_weights(out / "step_000008", base_run / "step_000008") and latest(out) == "step_000008"
    assert not (out / "step_000008").is_symlink() and not list(out.glob(".*"))  # the link replaced, not followed
    assert snapshot(other) == before


def test_latest_naming_nothing_usable_without_a_checkpoint_is_refused(env, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "latest").write_text("../elsewhere/step_000002")
    expect_error(train_args(env, out, resume=True, **SHORT), capsys, f"{out / 'latest'}: `latest` holds",
                 "not the name of a step directory inside the run", "delete it")
    assert sorted(p.name for p in out.iterdir()) == ["latest"]
    (out / "latest").unlink()
    (tmp_path / "pointer").write_text("step_000002")
    (out / "latest").symlink_to(tmp_path / "pointer")  # never read through
    expect_error(train_args(env, out, resume=True, **SHORT), capsys, "`latest` is a symbolic link")


def test_links_inside_a_checkpoint_make_it_incomplete(env, base_run, tmp_path, capsys):
    """A step directory whose files are links (here its tokenizer, to another tokenizer) is
    not a checkpoint of this run: resume and load use the newest complete one."""
    out = copy_run(base_run, tmp_path / "run")
    (out / "step_000008" / "tokenizer.json").unlink()
    (out / "step_000008" / "tokenizer.json").symlink_to(env / "tok_other" / "tokenizer.json")
    point = RunDir(out).resume_point()
    assert point.path.name == "step_000004" and "step_000008, which is missing or incomplete" in point.note
    (out / "step_000004" / "trainer.json").unlink()
    (out / "step_000004" / "trainer.json").symlink_to(base_run / "step_000004" / "trainer.json")
    expect_error(train_args(env, out, resume=True), capsys, "none is complete", "none of them a link")


# -----------------------------------------------------------------------------
# Temporaries of killed writers


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_names_carry_the_writer_pid(tmp_path, monkeypatch):
    import poelm.atomic as atomic

    seen = []
    real = atomic.os.replace
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (seen.append(Path(a).name), real(a, b)))
    atomic_write_json(tmp_path / "x.json", {"a": 1})
    m = TEMP_NAME.fullmatch(seen[0])
    assert m and m["name"] == "x.json" and m["kind"] == "tmp" and f"{m['pid']}-{m['host']}" == owner()
    assert int(m["pid"]) == os.getpid()


def test_later_writers_clear_what_dead_writers_left_but_never_a_live_ones(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    host = owner().split("-")[1]
    dead, live = dead_pid(), os.getpid()
    (d / f".x.json.tmp-{dead}-{host}-ab12").write_text("half")
    (d / f".model.tmp-{dead}-{host}-cd34").mkdir()
    (d / f".model.tmp-{dead}-{host}-cd34" / "w").write_text("half")
    (d / f".gone.old-{dead}-{host}").mkdir()  # killed between its two renames: the only copy of `gone`
    (d / f".gone.old-{dead}-{host}" / "keep").write_text("old")
    (d / "kept").mkdir()
    (d / f".kept.old-{dead}-{host}").mkdir()
    (d / f".y.json.tmp-{live}-{host}-ef56").write_text("in progress")
    (d / f".z.json.tmp-{dead}-0000beef-aa").write_text("another machine's")  # pids of other hosts: unknown
    (d / f".model.tmp-{dead}-{host}-cd34" / "w").chmod(0o644)
    atomic_write_json(d / "result.json", {"ok": True})
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [f".y.json.tmp-{live}-{host}-ef56", f".z.json.tmp-{dead}-0000beef-aa", "gone", "kept", "result.json"])
    assert (d / "gone" / "keep").read_text() == "old"


KILLED_WRITER = """
import sys, time
from poelm.atomic import atomic_dir
with atomic_dir(sys.argv[1]) as tmp:
    (tmp / "weights").write_bytes(b"x" * 1000)
    print("ready", flush=True)
    time.sleep(120)
"""


def test_kill9_during_a_directory_write_leaves_only_what_the_next_writer_clears(tmp_path):
    out = tmp_path / "export"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], env=subprocess_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".export.tmp-{proc.pid}-"), left
    atomic_write_json(tmp_path / "export" / "config.json", {})  # a later write into the same directory...
    atomic_write_json(tmp_path / "other.json", {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "other.json"]  # ...clears it


# -----------------------------------------------------------------------------
# Python's `random` after resume


def test_resume_restores_python_random_after_set_up(env, tmp_path, monkeypatch):
    """Something drawing from `random` while the run is set up (a loader, an import) must not
    shift the draws of the resumed steps: each step's draw equals the straight run's."""
    import poelm.dataloader
    import poelm.schedule

    draws: list[float] = []
    real = poelm.schedule.apply_schedules

    def drawing(*a, **kw):
        draws.append(random.random())
        return real(*a, **kw)

    class DrawingLoader(poelm.dataloader.BestFitLoader):
        def __init__(self, *a, **kw):
            random.random()  # stands for any set-up code that draws
            super().__init__(*a, **kw)

    monkeypatch.setattr(poelm.schedule, "apply_schedules", drawing)
    monkeypatch.setattr(poelm.dataloader, "BestFitLoader", DrawingLoader)
    straight = tmp_path / "straight"
    assert run(train_args(env, straight, **{"eval-every": 0}))[0] == 0
    want = draws[4:]
    out = run_at_step4(straight, tmp_path / "resumed")
    draws.clear()
    assert run(train_args(env, out, resume=True, **{"eval-every": 0}))[0] == 0
    assert draws == want and len(want) == 4
    assert equal_weights(out / "step_000008", straight / "step_000008")


# -----------------------------------------------------------------------------
# Pruning and readers


def test_prune_moves_a_checkpoint_away_whole_before_deleting_it(base_run, tmp_path, monkeypatch):
    import poelm.rundir

    out = copy_run(base_run, tmp_path / "run")
    removed = []
    real = poelm.rundir.shutil.rmtree
    monkeypatch.setattr(poelm.rundir.shutil, "rmtree",
                        lambda p, **kw: (removed.append((Path(p).name, (out / "step_000004").exists())), real(p, **kw)))
    RunDir(out).prune(1)
    assert len(removed) == 1
    name, visible = removed[0]
    assert name.startswith(".step_000004.pruned-") and not visible
    assert sorted(p.name for p in out.glob("*step_*")) == ["step_000008"]


def test_load_of_a_run_during_pruning_reads_a_whole_checkpoint(base_run, tmp_path, monkeypatch):
    """A reader read `latest` (step 4); before it read the weights, the trainer saved step 8
    and pruned step 4. The load must give step 8 whole (with its tokenizer), not a half-pruned
    step 4 or a misleading missing-file error."""
    import poelm.checkpoint

    out = run_at_step4(base_run, tmp_path / "run")
    shutil.copytree(base_run / "step_000008", out / "step_000008")
    real = poelm.checkpoint.read_safetensors
    calls = []

    def racing(path):
        if not calls:
            (out / "latest").write_text("step_000008")
            RunDir(out).prune(1)
        calls.append(path.parent.name)
        return real(path)

    monkeypatch.setattr(poelm.checkpoint, "read_safetensors", racing)
    model, tokenizer = load_model(out)
    assert calls == ["step_000004", "step_000008"]
    assert tokenizer is not None
    assert all(torch.equal(p, weights(base_run / "step_000008")[n]) for n, p in model.state_dict().items())
    assert not (out / "step_000004").exists() and not list(out.glob(".*"))


def test_killed_prune_leftover_is_cleared_by_the_next_run(base_run, tmp_path):
    out = copy_run(base_run, tmp_path / "run")
    os.replace(out / "step_000004", out / f".step_000004.pruned-{dead_pid()}-{owner().split('-')[1]}")
    with RunDir(out).locked():
        pass
    assert not list(out.glob(".*")) and RunDir(out).resume_point().path.name == "step_000008"


# -----------------------------------------------------------------------------
# A full disk during a checkpoint save


def test_full_disk_during_a_checkpoint_save_is_one_line_and_resumes(env, base_run, tmp_path, monkeypatch, capsys):
    import poelm.rundir

    real = poelm.rundir.atomic_torch_save

    def full_at_step8(obj, path):
        if "step_000008" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, path)

    monkeypatch.setattr(poelm.rundir, "atomic_torch_save", full_at_step8)
    out = tmp_path / "run"
    err = expect_error(train_args(env, out), capsys, "could not save checkpoint step_000008", "the disk is full",
                       "the last good checkpoint step_000004 is intact", "free disk space", "--resume")
    assert "Traceback" not in err
    assert latest(out) == "step_000004" and not list(out.glob(".*")) and not (out / "step_000008").exists()
    monkeypatch.setattr(poelm.rundir, "atomic_torch_save", real)
    rc, _, err = run(train_args(env, out, resume=True), capsys)
    assert rc == 0, err
    assert equal_weights(out / "step_000008", base_run / "step_000008")
    assert [r["step"] for r in records(out, "train")] == list(range(1, 9))


def test_full_disk_in_safetensors_is_an_oserror_naming_the_first_checkpoint(env, tmp_path, monkeypatch, capsys):
    """safetensors reports a full disk as SafetensorError('... (os error 28)'): it becomes
    OSError(ENOSPC), and the first checkpoint's failure says the run has none yet."""
    import safetensors.torch

    def full(*a, **kw):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    out = tmp_path / "run"
    expect_error(train_args(env, out, **SHORT), capsys, "could not save checkpoint step_000004", "the disk is full",
                 "the run has no checkpoint yet", "--resume")
    assert not list(out.glob(".*")) and not list(out.glob("step_*"))
    assert json.loads((out / "train_config.json").read_text())["num_iterations"] == 4


def test_full_disk_in_torch_save_keeps_its_errno(tmp_path, monkeypatch):
    """torch.save writing to a path reports a full disk as an opaque RuntimeError; through a
    Python file it is OSError(ENOSPC), and the old file is kept."""
    import io

    import poelm.checkpoint
    from poelm.checkpoint import atomic_torch_save

    class Full(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    target = tmp_path / "optim_rank0.pt"
    target.write_bytes(b"old")
    monkeypatch.setattr(poelm.checkpoint, "open", lambda path, mode: Full(), raising=False)
    with pytest.raises(OSError) as caught:
        atomic_torch_save({"a": torch.zeros(4)}, target)
    assert caught.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["optim_rank0.pt"]
