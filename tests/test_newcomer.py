"""What a newcomer trips over (issue [19]): --threads on every torch command and contention
said beside timed figures, plain progress lines in a log file, a MODEL's calibration found
from its run directory, a specialist's bits per assistant token from `poelm eval`, decoding
flags the chosen mode ignores, compare's alpha/gap columns and integer ticks, output files
under the user's umask, calibrate saying what it replaced."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from poelm.cli import main
from test_specialist import cli_env, one_line_error  # noqa: F401
from test_train import base_run, env, run  # noqa: F401


def test_threads_default_is_the_free_cores(monkeypatch):
    from poelm import runtime

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(runtime, "free_cores", lambda: (4, 2.6))
    assert runtime.choose_threads(None, ceiling=8).threads == 1  # 4 cores less a load of 3
    assert runtime.choose_threads(None, ceiling=8).why.startswith("free cores: 4 usable cores, 1-minute load 2.6")
    assert runtime.choose_threads(3, ceiling=1).threads == 3  # --threads wins
    monkeypatch.setattr(runtime, "free_cores", lambda: (16, 0.2))
    assert runtime.choose_threads(None, ceiling=8).threads == 8  # at most torch's default
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert runtime.choose_threads(None, ceiling=8).threads == 4  # 16 free cores shared by 4 ranks
    monkeypatch.setattr(runtime, "free_cores", lambda: (2, 7.0))
    assert runtime.choose_threads(None, ceiling=8).threads == 1  # never below 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setattr(runtime, "free_cores", lambda: (4, 0.0))
    served = runtime.choose_threads(None, ceiling=8, reserved=1)  # poelm serve keeps a core for its HTTP side
    assert served.threads == 3 and "1 kept for the HTTP side" in served.why
    from poelm.cli.main import build_parser
    assert build_parser().parse_args(["serve", "m"]).reserved_cores == 1  # what main() passes for serve
    assert not hasattr(build_parser().parse_args(["generate", "m", "hi"]), "reserved_cores")


def test_contention_compares_cpu_time_with_wall_times_threads(monkeypatch):
    from poelm import contention

    clock = contention.CpuClock(wall=0.0, cpu=0.0)
    monkeypatch.setattr(contention.time, "perf_counter", lambda: 10.0)
    monkeypatch.setattr(contention.time, "process_time", lambda: 6.2)
    assert clock.report(2) == {"threads": 2, "cpu_share": 0.31, "contended": "contended: CPU time 0.31 of wall x threads"}
    assert clock.report(1)["contended"] is None  # 6.2 s of CPU in 10 s on one thread: not contended


def test_every_torch_command_has_threads_and_says_them(env, base_run, capsys):
    from poelm.cli.generate import format_stats
    from poelm.cli.main import COMMANDS, build_parser

    for name in ("train", "sft", "eval", "generate", "chat", "calibrate", "experiment", "compare", "serve"):
        assert next(c for c in COMMANDS if c.name == name).threads, name
        sub = build_parser(only=name)._subparsers._group_actions[0].choices[name]
        threads = next(a for a in sub._actions if "--threads" in a.option_strings)
        assert threads.default is None and threads.type("2") == 2, name
    before = torch.get_num_threads()
    try:
        rc, out, err = run(["eval", str(base_run), "--data", str(env / "data"), "--tokens", "256", "--threads", "1",
                            "--json"], capsys)
        assert rc == 0, err
        assert json.loads(out)["threads"] == 1 and torch.get_num_threads() == 1
        rc, out, err = run(["eval", str(base_run), "--data", str(env / "data"), "--tokens", "256", "--threads", "1"],
                           capsys)
        assert "torch threads: 1 (--threads)" in out
        rc, out, err = run(["generate", str(base_run), "ab", "--max-new-tokens", "3", "--json", "--threads", "1"], capsys)
        stats = json.loads(out)["stats"]
        assert stats["threads"] == 1 and 0 < stats["cpu_share"] and "contended" in stats
    finally:
        torch.set_num_threads(before)
    text = format_stats({"tokens_per_s": 2.9, "threads": 2, "contended": "contended: CPU time 0.31 of wall x threads"})
    assert text.splitlines()[0] == "tokens_per_s=2.9 threads=2"
    assert text.splitlines()[1].startswith("poelm: warning: contended: CPU time 0.31 of wall x threads")


def test_measure_modes_reports_the_cpu_share(env, base_run):
    from poelm.checkpoint import load_model
    from poelm.inference_bench import measure_modes

    model, tok = load_model(base_run)
    report = measure_modes(model, tok, str(env / "data"), n_prompts=1, max_new_tokens=2, prompt_len=4,
                           heldout_tokens=256, compile=False)  # (compiled decoders: tests/test_compiled_modes.py)
    assert set(report["cpu"]) == {"threads", "cpu_share", "contended"} and report["cpu"]["cpu_share"] > 0


# -----------------------------------------------------------------------------
# 2. progress in a log file


def test_plain_progress_lines_when_stdout_is_not_a_terminal(env, tmp_path, capsys, monkeypatch):
    from poelm import progress
    from test_train import train_args

    stream = io.StringIO()
    bar = progress.PlainProgress("eval", total=4, every=0, stream=stream, tokens_per_item=100)
    for n in range(1, 5):
        bar.update(n)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("eval: step 1/4 (25%) | ") and "tok/s" in lines[0]
    assert "ETA" in lines[0]
    monkeypatch.setattr(progress, "PLAIN_EVERY", 0.0)
    rc, out, err = run(train_args(env, tmp_path / "run", quiet=False), capsys)  # capsys: stdout is not a tty
    assert rc == 0, err
    steps = [line for line in out.splitlines() if line.startswith("train run: step ")]
    assert [s.split()[3] for s in steps] == [f"{k}/8" for k in range(1, 9)], out
    assert all("tok/s" in s and "ETA" in s and "loss" in s for s in steps)
    assert "\x1b[" not in out  # no terminal control codes in a log file
    rc, out, err = run(["eval", str(tmp_path / "run"), "--data", str(env / "data"), "--tokens", "512",
                        "--batch-size", "2", "--seq-len", "32"], capsys)
    assert rc == 0, err
    assert [line for line in out.splitlines() if line.startswith("eval: step 1/8 (12%)")], out


# -----------------------------------------------------------------------------
# 4. a run directory's calibration; 7. calibrate says what it replaced


def test_calibration_of_a_run_directory_and_its_replacement(env, base_run, tmp_path, capsys):
    from poelm.checkpoint import load_model
    from poelm.engine import Engine, load_calibration

    runs = shutil.copytree(base_run, tmp_path / "run", symlinks=True)
    assert load_calibration(runs) is None
    argv = ["calibrate", str(runs), "--data", str(env / "data"), "--tokens", "256", "--threads", "1"]
    rc, out, err = run(argv, capsys)
    assert rc == 0, err
    assert "replaced" not in out and "torch threads: 1" in out
    calib = load_calibration(runs)  # the run directory, as load_model takes it
    assert calib is not None and calib == load_calibration(runs / "step_000008")
    model, tok = load_model(runs)
    assert Engine(model, tok, calibration=calib).generate("ab", mode="wand", max_new_tokens=2).tokens
    rc, out, err = run(argv[:-2] + ["--quantile", "0.5", "--json"], capsys)
    result = json.loads(out)
    assert result["replaced"] == calib["wand_bounds"] and result["wand_bounds"] != calib["wand_bounds"]
    rc, out, err = run(argv, capsys)
    assert "replaced the earlier bounds [" in out and "(p50 over" in out


# -----------------------------------------------------------------------------
# 5. a specialist's bits per assistant token


def test_eval_of_one_specialist_on_chat_data(cli_env, capsys):
    root = cli_env
    assert main(["specialist", "attach", str(root / "base"), "--layers", "1", "--out", str(root / "s")]) == 0
    assert main(["specialist", "save-delta", str(root / "s"), "--out", str(root / "d")]) == 0
    capsys.readouterr()
    argv = ["eval", str(root / "base"), "--data", str(root / "chat"), "--threads", "1", "--json"]
    assert main(argv + ["--delta", str(root / "d")]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["assistant_tokens"] > 0 and one["assistant_bits"] > 0 and one["delta"] == str(root / "d")
    assert main(argv + ["--compose", str(root / "d")]) == 0  # one delta composed: that specialist alone
    assert json.loads(capsys.readouterr().out)["assistant_bits"] == one["assistant_bits"]
    assert main(argv) == 0  # the base on chat data
    assert json.loads(capsys.readouterr().out)["assistant_bits"] > 0
    line = one_line_error(["generate", root / "base", "the", "--compose", root / "d"], capsys, "names one delta")
    assert f"--delta {root / 'd'}" in line


# -----------------------------------------------------------------------------
# 6. flags the chosen mode ignores


def test_flags_the_mode_ignores_are_refused(base_run, capsys):
    from poelm.engine import DecodeOptions, ignored_options, modes_reading

    assert ignored_options(DecodeOptions(mode="final", stage=2, gamma=8)) == ["stage", "gamma"]
    assert ignored_options(DecodeOptions(mode="speculative", gamma=8, adaptive=True)) == []
    assert modes_reading("wand_factor") == ("wand",)
    line = one_line_error(["generate", base_run, "ab", "--stage", "1"], capsys, "--stage applies to --mode stage")
    assert "--mode final ignores it" in line
    one_line_error(["generate", base_run, "ab", "--mode", "stage", "--gamma", "2"], capsys, "--gamma applies to --mode speculative")
    one_line_error(["chat", base_run, "--wand-factor", "2"], capsys, "--wand-factor applies to --mode wand")
    rc, out, err = run(["generate", str(base_run), "ab", "--mode", "stage", "--stage", "1", "--max-new-tokens", "2",
                        "--threads", "1"], capsys)
    assert rc == 0, err


# -----------------------------------------------------------------------------
# 7. compare, file modes, README


def test_compare_has_alpha_gap_and_integer_stage_ticks(env, base_run, tmp_path, capsys, monkeypatch):
    from poelm import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    rc, out, err = run(["compare", str(base_run), str(base_run), "--data", str(env / "data"), "--tokens", "256",
                        "--threads", "1", "--plot", str(tmp_path / "c.png")], capsys)
    assert rc == 0, err
    header, row = out.splitlines()[:2]
    assert "alpha" in header and "gap" in header and "+0.00%" in row
    assert f"gap: final bpb vs {base_run} (positive = worse than it)" in out
    ticks = figures[0].axes[0].get_xticks()
    assert all(float(t).is_integer() for t in ticks)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_follow_the_umask(tmp_path, mask, mode):
    from poelm import atomic

    old = os.umask(mask)
    atomic._umask.cache_clear()
    try:
        atomic.atomic_write_json(tmp_path / "x.json", {"a": 1})
        with atomic.atomic_dir(tmp_path / "d") as d:
            (d / "f").write_text("x")
    finally:
        os.umask(old)
        atomic._umask.cache_clear()
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == mode
    assert (tmp_path / "d").stat().st_mode & 0o777 == mode | (0o111 & ~mask)


def test_readme_lists_serve():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert "\npoelm serve runs/poe " in readme
