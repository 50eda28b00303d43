"""The `poelm` command line as a whole: one error policy (bad input -> one line + exit 2,
bugs keep their traceback), input validation at the boundary, help with defaults on every
flag, and a `poelm --help` that imports neither torch nor matplotlib.
Run: .venv/bin/pytest -q tests/test_cli.py"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from poelm import runtime
from poelm.cli import inspect as cli_inspect
from poelm.cli.common import CliError
from poelm.cli.main import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny PoE model directory with a byte-level tokenizer (context 64) and a corpus."""
    import tiktoken

    from poelm.checkpoint import save_model
    from poelm.corpus import write_corpus
    from poelm.model import GPT, GPTConfig
    from poelm.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

    root = tmp_path_factory.mktemp("cli")
    enc = tiktoken.Encoding(name="bytes", pat_str=SPLIT_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)})
    tok = Tokenizer(enc)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=tok.vocab_size, sequence_len=64, poe_every=1))
    model.init_weights()
    save_model(model, root / "model", tok)
    rng = random.Random(0)
    write_corpus([" ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat"]) for _ in range(40)) for _ in range(60)],
                 root / "data")
    return root


def one_line_error(argv: list, capsys, flag: str) -> str:
    """main(argv) exits 2 with exactly one stderr line, `poelm: error: ...`, naming `flag`."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("poelm: error: ") and flag in lines[0], lines[0]
    return lines[0]


# -----------------------------------------------------------------------------
# Bad input: one line naming the flag, exit 2


BAD_EVAL = [
    (["--batch-size", "0"], "--batch-size"),  # was a ZeroDivisionError
    (["--batch-size", "x"], "--batch-size"),
    (["--tokens", "0"], "--tokens"),  # was a silent 2,041-token evaluation
    (["--tokens", "-5"], "--tokens"),
    (["--seq-len", "100000"], "--seq-len"),  # the model's context is 64
    (["--device", "bogus"], "--device"),
]


@pytest.mark.parametrize("extra,flag", BAD_EVAL)
def test_eval_refuses_bad_flags(env, capsys, extra, flag):
    line = one_line_error(["eval", env / "model", "--data", env / "data", *extra], capsys, flag)
    if flag == "--seq-len":
        assert "context of 64 tokens" in line and "--seq-len 64" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["eval", "generate", "calibrate", "compare", "train"])
def test_device_cuda_without_cuda(env, tmp_path, capsys, command):
    argv = {"eval": ["eval", env / "model", "--data", env / "data"],
            "generate": ["generate", env / "model", "hi"],
            "calibrate": ["calibrate", env / "model", "--data", env / "data"],
            "compare": ["compare", env / "model", "--data", env / "data"],
            "train": ["train", "--out", tmp_path / "run", "--tokenizer", env / "model", "--data", env / "data"]}[command]
    line = one_line_error(argv + ["--device", "cuda"], capsys, "--device")
    assert "no CUDA GPU" in line and "use --device cpu" in line


BAD_TRAIN = [
    (["--num-iterations", "0"], "--num-iterations"),  # was a silent 17,280-step run
    (["--num-iterations", "-2"], "--num-iterations"),
    (["--target-tokens", "0"], "--target-tokens"),
    (["--device-batch-size", "0"], "--device-batch-size"),
    (["--total-batch-size", "-1"], "--total-batch-size"),
    (["--seq-len", "0"], "--seq-len"),
    (["--eval-every", "-1"], "--eval-every"),
    (["--save-every", "-1"], "--save-every"),
    (["--keep-checkpoints", "-1"], "--keep-checkpoints"),
    (["--eval-tokens", "0"], "--eval-tokens"),
    (["--matrix-lr", "-0.1"], "--matrix-lr"),
    (["--warmdown-frac", "1.5"], "--warmdown-frac"),
    (["--poe-stage-layers", "2,0"], "--poe-stage-layers"),
    (["--poe-stage-layers", "2,x"], "--poe-stage-layers"),
    (["--device", "bogus"], "--device"),
    (["--dtype", "int8"], "--dtype"),
    (["--dtype", "fp16"], "--dtype"),
]


@pytest.mark.parametrize("extra,flag", BAD_TRAIN)
def test_train_refuses_bad_flags(env, tmp_path, capsys, extra, flag):
    out = tmp_path / "run"
    one_line_error(["train", "--data", env / "data", "--tokenizer", env / "model", "--out", out, *extra], capsys, flag)
    assert not out.exists()


def test_train_checks_reach_the_python_api():
    from poelm.train import TrainConfig, train

    with pytest.raises(ValueError, match=r"^num_iterations 0 would train no steps: give a step count >= 1, or -1 to derive the horizon from target_tokens"):
        train(TrainConfig(num_iterations=0))


@pytest.mark.parametrize("argv,flag", [
    (["generate", "MODEL", "hi", "--gamma", "0"], "--gamma"),
    (["generate", "MODEL", "hi", "--mode", "nope"], "--mode"),
    (["generate", "MODEL", "hi", "--device", "bogus"], "--device"),
    (["generate", "MODEL", "hi", "--stages", "0,x"], "--stages"),
    (["calibrate", "MODEL", "--data", "DATA", "--tokens", "0"], "--tokens"),
    (["export", "MODEL", "--out", "OUT", "--dtype", "int3"], "--dtype"),
    (["eval", "MODEL"], "--data"),  # a missing required flag
    (["data", "climbmix", "--shards", "0"], "--shards"),
])
def test_other_bad_flags(env, tmp_path, capsys, argv, flag):
    subs = {"MODEL": env / "model", "DATA": env / "data", "OUT": tmp_path / "out"}
    one_line_error([subs.get(a, a) for a in argv], capsys, flag)
    assert not (tmp_path / "out").exists()


def test_compare_checks_every_model_before_evaluating(env, tmp_path, capsys, monkeypatch):
    from poelm import experiment

    def evaluated(*a, **k):
        raise AssertionError("compare evaluated a model before checking the others")

    monkeypatch.setattr(experiment, "compare_models", evaluated)
    missing = tmp_path / "no-such-run"
    line = one_line_error(["compare", env / "model", "tiny", missing, "--data", env / "data"], capsys, str(missing))
    assert "neither a preset" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(["compare", env / "model", empty, "--data", env / "data"], capsys, str(empty))
    one_line_error(["compare", env / "model", env / "model" / "config.json", "--data", env / "data"], capsys, "is a file")


def test_non_utf8_prompt_warns(env, capsys):
    # argv bytes that are not UTF-8 reach Python as surrogate escapes: b"\xff abc" -> "\udcff abc"
    assert main(["generate", str(env / "model"), "\udcff abc", "--max-new-tokens", "2", "--json"]) == 0
    captured = capsys.readouterr()
    assert "poelm: warning: the prompt has bytes that are not UTF-8" in captured.err
    assert len(json.loads(captured.out)["tokens"]) == 2
    assert main(["generate", str(env / "model"), "plain abc", "--max-new-tokens", "1", "--json"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_tokenizer_pickle_hint_fits_exports_and_runs(tmp_path):
    from poelm.tokenizer import Tokenizer

    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(os.system))  # a pickle that would run code
    with pytest.raises(ValueError) as e:
        Tokenizer.load(tmp_path)
    message = str(e.value)
    assert "refusing to unpickle" in message and "poelm export" in message
    assert "tokenizer.json" in message and "poelm tokenizer train" in message
    assert "use tokenizer.json" not in message


# -----------------------------------------------------------------------------
# The error policy of main


@pytest.mark.parametrize("error,line", [
    (ValueError("bad value '0,x'"), "poelm: error: bad value '0,x'"),  # quotes at the end are kept
    (CliError('"quoted" start'), 'poelm: error: "quoted" start'),
    (ValueError("first line\nsecond line"), "poelm: error: first line"),
    (FileNotFoundError(2, "No such file or directory", "x.json"), "poelm: error: [Errno 2] No such file or directory: 'x.json'"),
    (PermissionError("cannot write out/"), "poelm: error: cannot write out/"),
    (OSError(), "poelm: error: OSError"),
])
def test_bad_input_is_one_line_and_exit_2(monkeypatch, capsys, error, line):
    def fail(args):
        raise error

    monkeypatch.setattr(cli_inspect, "cmd_inspect", fail)
    assert main(["inspect", "tiny"]) == 2
    assert capsys.readouterr().err == line + "\n"


@pytest.mark.parametrize("error", [KeyError("stage"), TypeError("x"), RuntimeError("x"), AssertionError("x")])
def test_bugs_keep_their_traceback(monkeypatch, error):
    def fail(args):
        raise error

    monkeypatch.setattr(cli_inspect, "cmd_inspect", fail)
    with pytest.raises(type(error)):
        main(["inspect", "tiny"])


def test_group_without_subcommand(capsys):
    assert main(["data"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "poelm: error: `poelm data` needs a subcommand (see `poelm data --help`)"]


# -----------------------------------------------------------------------------
# Help, defaults and dtypes


def all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from all_parsers(sub)


def test_every_flag_has_one_line_help_with_its_default():
    parsers = list(all_parsers(build_parser()))
    names = {p.prog for p in parsers}
    for cmd in COMMANDS:
        assert f"poelm {cmd.name}" in names
    checked = 0
    for parser in parsers:
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            where = f"{parser.prog} {action.option_strings or action.dest}"
            assert action.help and "\n" not in action.help, f"{where}: needs a one-line help"
            if action.option_strings:
                shown = formatter._get_help_string(action) % {"default": action.default}
                assert "(default" in shown or shown.endswith("(required)"), f"{where}: {shown!r} hides its default"
                checked += 1
    assert checked > 100


def test_train_help_lists_defaults(capsys):
    assert main(["train", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's wrapping
    for text in ("--num-iterations NUM_ITERATIONS optimizer steps; -1 = derive", "(default: -1)",
                 "--device-batch-size DEVICE_BATCH_SIZE rows per forward pass per rank (default: 32)",
                 "--resume continue the run in --out from its newest complete checkpoint (default: off)"):
        assert text in out


def test_dtype_names():
    from poelm.train import TrainConfig, setup_runtime

    for name, dtype in (("fp32", torch.float32), ("float32", torch.float32), ("bf16", torch.bfloat16),
                        ("bfloat16", torch.bfloat16), ("fp16", torch.float16), ("float16", torch.float16)):
        assert runtime.parse_dtype(name) == dtype
    assert setup_runtime(TrainConfig(device="cpu", dtype="float32")).autocast_dtype is None
    assert setup_runtime(TrainConfig(device="cpu", dtype="bfloat16")).autocast_dtype == torch.bfloat16
    assert setup_runtime(TrainConfig(device="cpu", dtype="bf16")).autocast_dtype == torch.bfloat16
    assert runtime.parse_device("cpu") == torch.device("cpu")


def test_help_and_inspect_import_no_matplotlib():
    code = ("import sys, contextlib, io\n"
            "from poelm.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    rc = main(['--help'])\n"
            "print(rc, 'torch' in sys.modules, 'matplotlib' in sys.modules)\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    rc = main(['inspect', 'tiny', '--json'])\n"
            "print(rc, 'matplotlib' in sys.modules)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["0 False False", "0 False"]
