"""Reliability and security of run and model directories (issue [6]): nothing read from a
run or model directory executes code, no output replaces what it must not, a dangling
`latest` never restarts a run, one writer per run, resume refuses changed settings, and
kill -9 at random points of a save is followed by an exact resume.

Bad input is asserted the way users see it: exit status 2 and exactly one line
`poelm: error: ...` naming the file or flag.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from poelm.checkpoint import save_model
from poelm.rundir import LOCK_NAME, RunDir
from test_train import ROOT, base_run, env, expect_error, latest, records, run, snapshot, train_args, weights  # noqa: F401


class Payload:
    """Unpickling this creates `marker`: proof that loading ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def subprocess_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def poelm_cmd(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "poelm", *map(str, argv)]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -----------------------------------------------------------------------------
# 1. Nothing read from a run or model directory executes code


def test_malicious_optimizer_shard_is_refused(env, base_run, tmp_path, capsys):
    out = copy_run(base_run, tmp_path / "run")
    marker = tmp_path / "pwned"
    ckpt = out / latest(out)
    torch.save({"optimizer": Payload(marker), "rng": {}}, ckpt / "optim_rank0.pt")
    expect_error(train_args(env, out, resume=True, **{"num-iterations": 8}), capsys,
                 "optim_rank0.pt is not a readable optimizer shard")
    assert not marker.exists()


def test_genuine_shards_load_without_pickle_code(base_run):
    ckpt = base_run / latest(base_run)
    blob = RunDir(base_run).read_shard(ckpt)
    assert set(blob) == {"optimizer", "rng"} and blob["optimizer"]["state"]


def test_truncated_optimizer_shard_is_one_line(env, base_run, tmp_path, capsys):
    out = copy_run(base_run, tmp_path / "run")
    shard = out / latest(out) / "optim_rank0.pt"
    shard.write_bytes(shard.read_bytes()[:200])
    expect_error(train_args(env, out, resume=True), capsys, "optim_rank0.pt is not a readable optimizer shard")


def test_malicious_nanochat_model_file_is_refused(tmp_path, capsys):
    from conftest import tiny_model
    from poelm.checkpoint import save_nanochat_dir
    from poelm.cli import main

    d = tmp_path / "nc"
    save_nanochat_dir(tiny_model(), d, step=5)
    marker = tmp_path / "pwned"
    torch.save({"transformer.wte.weight": Payload(marker)}, d / "model_000005.pt")
    rc = main(["generate", str(d), "1 2 3", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "model_000005.pt" in err, err
    assert not marker.exists()


def model_dir_of(base_run: Path, dst: Path) -> Path:
    shutil.copytree(base_run / latest(base_run), dst)
    for f in ("optim_rank0.pt", "loader_rank0.json", "trainer.json"):
        (dst / f).unlink()
    return dst


def test_malicious_tokenizer_pickle_is_refused(base_run, tmp_path, capsys):
    import pickle

    from poelm.cli import main

    model_dir = model_dir_of(base_run, tmp_path / "m")
    marker = tmp_path / "pwned"
    (model_dir / "tokenizer.json").unlink()  # force the pickle path
    (model_dir / "tokenizer.pkl").write_bytes(pickle.dumps(Payload(marker)))
    rc = main(["eval", str(model_dir), "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "tokenizer.pkl" in err, err
    assert not marker.exists()


def test_malicious_token_bytes_is_refused(base_run, tmp_path):
    """token_bytes.pt is read by the exported tokenizer (poelm computes lengths from the vocab)."""
    from poelm.tokenizer import load_token_bytes

    model_dir = model_dir_of(base_run, tmp_path / "m")
    marker = tmp_path / "pwned"
    torch.save(Payload(marker), model_dir / "token_bytes.pt")
    with pytest.raises(ValueError, match="token_bytes.pt is not a readable token-bytes tensor"):
        load_token_bytes(model_dir)
    assert not marker.exists()
    genuine = load_token_bytes(base_run / latest(base_run))
    assert genuine.dtype == torch.int32 and genuine.ndim == 1 and int(genuine.max()) > 1


# -----------------------------------------------------------------------------
# 2. Outputs never replace what they must not


def export(argv: list[str], capsys) -> tuple[int, str]:
    from poelm.cli import main

    rc = main(["export", *map(str, argv)])
    return rc, capsys.readouterr().err


def test_export_refuses_foreign_directories_files_and_its_source(base_run, tmp_path, capsys, monkeypatch):
    src = copy_run(base_run, tmp_path / "run")
    before = snapshot(src)
    user = tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    (user / "sub" / "important.csv").write_text("1,2")
    rc, err = export([src, "--out", user], capsys)
    assert rc == 2 and err.count("\n") == 1 and "not a poelm model directory" in err and "--overwrite" in err, err
    assert (user / "notes.txt").read_text() == "mine" and (user / "sub" / "important.csv").exists()

    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"x")
    rc, err = export([src, "--out", a_file], capsys)
    assert rc == 2 and "is a file" in err and a_file.read_bytes() == b"x"

    for out, word in ((src, "is the source"), (src / "hf", "lies inside the source"),
                      (tmp_path, "contains the source")):
        rc, err = export([src, "--out", out, "--overwrite"], capsys)
        assert rc == 2 and err.count("\n") == 1 and word in err, (out, err)
    monkeypatch.chdir(user)
    rc, err = export([src, "--out", ".", "--overwrite"], capsys)
    assert rc == 2 and "working directory" in err
    assert snapshot(src) == before and (user / "notes.txt").exists()


def test_export_replaces_a_previous_export_and_overwrite_is_explicit(base_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export([base_run, "--out", out, "--dtype", "fp32"], capsys)[0] == 0
    first = sorted(p.name for p in out.iterdir())
    assert export([base_run, "--out", out, "--dtype", "fp32"], capsys)[0] == 0  # a previous export: replaced
    assert sorted(p.name for p in out.iterdir()) == first
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert export([base_run, "--out", user, "--overwrite"], capsys)[0] == 0
    assert not (user / "notes.txt").exists() and (user / "config.json").exists()


def test_save_model_refuses_a_foreign_directory(tmp_path):
    from conftest import tiny_model

    d = tmp_path / "d"
    d.mkdir()
    (d / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a poelm model directory"):
        save_model(tiny_model(), d)
    assert (d / "keep.txt").exists()
    save_model(tiny_model(), tmp_path / "m")
    save_model(tiny_model(seed=1), tmp_path / "m")  # its own output: fine


# -----------------------------------------------------------------------------
# 3. A dangling `latest`


def test_dangling_latest_resumes_from_newest_complete_checkpoint(env, base_run, tmp_path, capsys):
    out = copy_run(base_run, tmp_path / "run")
    shutil.rmtree(out / "step_000008")  # `latest` now names a missing directory
    lines = (out / "metrics.jsonl").read_text().splitlines()
    rc, stdout, err = run(train_args(env, out, resume=True, quiet=False), capsys)
    assert rc == 0, err
    assert "resuming from step_000004, the newest complete checkpoint" in stdout
    for name, want in weights(base_run / "step_000008").items():
        assert torch.equal(want, weights(out / "step_000008")[name]), name
    assert [r["step"] for r in records(out, "train")] == list(range(1, 9))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(lines)


def test_incomplete_checkpoints_only_refuse_and_keep_history(env, base_run, tmp_path, capsys):
    out = copy_run(base_run, tmp_path / "run")
    for step in ("step_000004", "step_000008"):
        (out / step / "trainer.json").unlink()
    before = snapshot(out)
    expect_error(train_args(env, out, resume=True), capsys, "none is complete", "step_000004, step_000008")
    assert snapshot(out) == before


def test_fresh_restart_never_truncates_history(env, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 9.0}\n')
    rc, _, err = run(train_args(env, out, resume=True, **{"num-iterations": 2, "save-every": 0, "eval-every": 0}),
                     capsys)
    assert rc == 0, err
    assert (out / "metrics.orphaned-1.jsonl").read_text() == '{"type": "train", "step": 1, "loss": 9.0}\n'


# -----------------------------------------------------------------------------
# 4. One writer per run directory


def wait_for(predicate, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> None:
    t0 = time.time()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.005)


def test_second_trainer_on_the_same_run_is_refused_and_kill9_lock_is_stale(env, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_args(env, out, **{"num-iterations": 400, "save-every": 0, "eval-every": 0})
    first = subprocess.Popen(poelm_cmd(argv[:]), env=subprocess_env(), cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (out / LOCK_NAME).exists() and (out / LOCK_NAME).read_text().strip() == str(first.pid),
                 proc=first)
        err = expect_error(argv, capsys, f"is in use by another poelm process (pid {first.pid})")
        assert "--out" in err
        assert first.poll() is None  # the first one is unharmed
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
    assert (out / LOCK_NAME).exists()  # left by kill -9; flock died with the process
    rc, stdout, err = run(train_args(env, out, resume=True, quiet=False,
                                     **{"num-iterations": 2, "save-every": 0, "eval-every": 0}), capsys)
    assert rc == 0, err
    assert f"cleared the stale lock of pid {first.pid}" in stdout
    assert not (out / LOCK_NAME).exists()


def test_lock_is_released_on_errors(env, tmp_path, capsys):
    out = tmp_path / "run"
    expect_error(train_args(env, out, data=tmp_path / "missing"), capsys, "does not exist")
    assert not out.exists()  # nothing written on bad input


# -----------------------------------------------------------------------------
# 5. Resume honours or refuses changed settings


def test_resume_refuses_changed_settings_and_extend_to_is_recorded(env, base_run, tmp_path, capsys):
    out = copy_run(base_run, tmp_path / "run")
    before = snapshot(out)
    expect_error(train_args(env, out, resume=True, **{"num-iterations": 12}), capsys,
                 "--num-iterations 8 (now 12)", "--extend-to")
    other = tmp_path / "otherdata"
    shutil.copytree(env / "data", other)
    expect_error(train_args(env, out, resume=True, data=other), capsys, "--data")
    expect_error(train_args(env, out, resume=True, **{"matrix-lr": 0.03}), capsys, "--matrix-lr")
    assert snapshot(out) == before
    rc, _, err = run(train_args(env, out, resume=True, **{"extend-to": 12}), capsys)
    assert rc == 0, err
    assert latest(out) == "step_000012"
    trainer = json.loads((out / "step_000012" / "trainer.json").read_text())
    assert trainer["num_iterations"] == 12 and trainer["extended"] == [{"at_step": 8, "from": 8, "to": 12}]
    assert json.loads((out / "train_config.json").read_text())["extend_to"] == 12
    assert [r["step"] for r in records(out, "train")] == list(range(1, 13))


# -----------------------------------------------------------------------------
# 6. kill -9 at random points of a save, then an exact resume


KILL_AT_REPLACE = """
    # Run `poelm` and SIGKILL it at its Nth os.replace (N from POELM_TEST_KILL_AT): with
    # --save-every 1 every replace after start-up belongs to a checkpoint save (a model file,
    # an optimizer or loader shard, trainer.json, the step directory, `latest`), so the kill
    # lands inside a save at a point fixed by N, not by the scheduler.
    import os, signal, sys
    from poelm.cli import main

    kill_at, calls, real_replace = int(os.environ["POELM_TEST_KILL_AT"]), [0], os.replace

    def replace(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(*args, **kwargs)

    os.replace = replace
    sys.exit(main(sys.argv[1:]))
"""


def test_kill9_during_saves_then_exact_resume(env, base_run, tmp_path):
    """Saves every step; each attempt SIGKILLs itself at a seeded, random os.replace inside
    a save (before or after any file, directory or `latest` moves into place). After every
    kill the newest complete checkpoint loads; the last resume runs to the end and equals the
    straight run bit for bit. (The kill used to be timed from outside: a poll for a temporary
    directory plus a random sleep, which under load could miss every save and never kill.)"""
    rng = random.Random(1234)
    out = tmp_path / "run"
    wrapper = tmp_path / "kill_at_replace.py"
    wrapper.write_text(textwrap.dedent(KILL_AT_REPLACE))
    argv = train_args(env, out, **{"save-every": 1, "keep-checkpoints": 2})
    for attempt in range(3):
        kill_at = rng.randint(2, 14)
        cmd = [sys.executable, str(wrapper), *map(str, argv + (["--resume"] if attempt else []))]
        proc = subprocess.run(cmd, env={**subprocess_env(), "POELM_TEST_KILL_AT": str(kill_at)}, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, (attempt, kill_at, proc.stderr[-2000:])
        point = RunDir(out).resume_point()
        if point is not None:  # whatever was killed, the newest complete checkpoint is loadable
            assert weights(point.path)
    rc = subprocess.run(poelm_cmd(argv + ["--resume"]), env=subprocess_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr[-2000:]
    want, got = weights(base_run / "step_000008"), weights(out / "step_000008")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert [r["loss"] for r in records(out, "train")] == [r["loss"] for r in records(base_run, "train")]
    assert not list(out.glob(".*tmp*")) and not (out / LOCK_NAME).exists()
