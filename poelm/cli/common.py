"""What the commands share: their bad-input error, the output of --json, MODEL checks, the
prompt and the decoding flags turned into an Engine and its options.

Nothing here imports torch at import time; the handlers import what they run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class CliError(ValueError):
    """Bad input to show the user as one line."""


# Parameters whose flag is not --parameter-name (the library names the parameter; the command
# line says the flag: poelm.runtime.SettingError)
FLAG_OF_PARAMETER = {"attach_layers": "--layers", "n_layers": "--layers"}


def flag_of(parameter: str) -> str:
    """The flag that sets a library parameter (num_iterations -> --num-iterations)."""
    return FLAG_OF_PARAMETER.get(parameter) or "--" + parameter.replace("_", "-")


def flag_off(parameter: str) -> str:
    """The flag that turns a boolean parameter off (compile -> --no-compile)."""
    return "--no-" + flag_of(parameter)[2:]


def emit(args: argparse.Namespace, result: dict, text: str | None = None) -> None:
    """Print `result` as JSON with --json, else the human text (or pretty JSON)."""
    if getattr(args, "json", False) or text is None:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(text)


def checked_tasks(args, models: list[str]) -> tuple[list[str], object]:
    """`--tasks` (and `--include-path`) of eval/compare checked before any model loads: an unknown
    task or a broken task file is refused, as is a MODEL that does not resolve -> (tasks, manager)."""
    from poelm.downstream import parse_tasks, require_lm_eval, task_manager

    tasks = parse_tasks(args.tasks)
    require_lm_eval()
    manager = task_manager(tasks, args.include_path)
    for spec in models:
        check_model(spec)
    return tasks, manager


def check_model(spec: str) -> None:
    """Raise the one-line error load_model would, without loading anything (hub ids pass)."""
    from poelm.checkpoint import looks_like_hub_id, model_dir
    from poelm.presets import PRESETS

    path = Path(spec)
    if (spec in PRESETS and not path.exists()) or looks_like_hub_id(spec):
        return
    if not path.exists():
        raise FileNotFoundError(f"MODEL {spec!r} is neither a preset ({', '.join(PRESETS)}), a directory nor a hub id")
    if not path.is_dir():
        raise CliError(f"MODEL {spec} is a file; pass the directory that holds it")
    if model_dir(spec) is None:
        raise FileNotFoundError(f"MODEL {spec} holds no config.json, no model_*.pt and no training run")


def check_seq_len(seq_len: int, model, spec: str) -> None:
    """Refuse rows longer than the model's context before anything is allocated for them."""
    context = model.config.sequence_len
    if seq_len > context:
        raise CliError(f"--seq-len {seq_len} is longer than {spec}'s context of {context} tokens; "
                       f"use --seq-len {context} or less")


def parse_compose(text: str) -> list[str]:
    """--compose D1,D2: the delta directories, each with a readable delta.json."""
    from poelm.specialist import read_delta_meta

    dirs = [d for d in text.split(",") if d]
    if len(dirs) == 1:
        raise CliError(f"--compose {text} names one delta: composing needs two or more, comma separated; for "
                       f"one specialist pass --delta {dirs[0]}")
    if len(dirs) < 2:
        raise ValueError(f"--compose {text!r}: give at least two delta directories, comma separated")
    for d in dirs:
        read_delta_meta(d)
    return dirs


def chat_stop_ids(tokenizer, spec: str) -> list[int]:
    """<|assistant_end|> and <|bos|>, after checking that `tokenizer` has the chat specials."""
    from poelm.chat import ASSISTANT_END, check_chat_tokenizer

    check_chat_tokenizer(tokenizer, spec)
    return [tokenizer.encode_special(ASSISTANT_END), tokenizer.bos_token_id]


def decode_prompt(prompt: str) -> str:
    """argv bytes that are not UTF-8 arrive as surrogate escapes: replace them by U+FFFD, saying so."""
    if not any("\udc80" <= c <= "\udcff" for c in prompt):
        return prompt
    print("poelm: warning: the prompt has bytes that are not UTF-8; they were replaced by U+FFFD", file=sys.stderr)
    return prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def parse_prompt(prompt: str, tokenizer) -> str | list[int]:
    if tokenizer is not None:
        return decode_prompt(prompt)
    try:
        ids = [int(t) for t in prompt.split()]
    except ValueError:
        raise CliError("this model has no tokenizer: give the prompt as space-separated token ids, e.g. \"1 2 3\"") from None
    if not ids:
        raise CliError("empty prompt: give at least one token id")
    return ids


def load_engine(args: argparse.Namespace):
    """MODEL on --device as an Engine (with its WAND calibration for --mode wand)."""
    from poelm.checkpoint import model_dir
    from poelm.engine import COMPILABLE_MODES, Engine, capabilities, load_calibration
    from poelm.runtime import check_compiler, parse_device
    from poelm.specialist import load_with_delta

    refuse_ignored_flags(args)
    device = parse_device(args.device)
    compile = getattr(args, "compile", False)
    if compile:
        check_compiler(device)
        if not capabilities(args.mode).compilable:
            raise CliError(f"--compile applies to the compilable modes ({', '.join(COMPILABLE_MODES)}); --mode "
                           f"{args.mode} decodes eagerly: drop --compile")
    model, tokenizer = load_with_delta(args.model, getattr(args, "delta", None), device=device)
    if getattr(args, "head_mode", None) is not None:
        from poelm.specialist import with_head_mode
        with_head_mode(model, args.head_mode)
    calib = None
    if capabilities(args.mode).needs_calibration:
        directory = model_dir(args.model)
        calib = load_calibration(directory) if directory is not None else None
        if calib is None:
            raise CliError(f"WAND needs calibrated swing bounds and {args.model} has none: "
                           f"run `poelm calibrate {args.model} --data DIR` first")
    return Engine(model, tokenizer, calibration=calib, compile=compile)


def refuse_ignored_flags(args: argparse.Namespace) -> None:
    """A decoding flag that --mode does not read (`--stage 2` without `--mode stage`): one line naming
    the flag and the modes that read it (the engine's registry says which: Capabilities.options)."""
    from poelm.engine import MODE_OPTIONS, DecodeOptions, ignored_options, modes_reading

    given = {o: getattr(args, o) for o in MODE_OPTIONS if hasattr(args, o)}
    for option in ignored_options(DecodeOptions(mode=args.mode, **given)):
        modes = modes_reading(option)
        raise CliError(f"{flag_of(option)} applies to --mode {' or '.join(modes)} and --mode {args.mode} ignores it: "
                       f"add --mode {modes[0]} or drop {flag_of(option)}")


def python_only_options() -> tuple[str, ...]:
    """The DecodeOptions fields without a flag (a calibration dict, the returned KV cache)."""
    from dataclasses import fields

    from poelm.engine.options import DecodeOptions

    return tuple(f.name for f in fields(DecodeOptions) if f.metadata["request"] is None)


def decode_kwargs(args: argparse.Namespace) -> dict:
    """The Engine.generate / Engine.stream keyword arguments of the decoding flags (one per
    DecodeOptions field; a repeatable flag not given is left to its default)."""
    from poelm.engine.options import DecodeOptions
    from poelm.flags import setting_kwargs

    return {k: v for k, v in setting_kwargs(args, DecodeOptions, exclude=python_only_options()).items()
            if v is not None}


def decode_options(engine, options: dict):
    """engine.options(options) with a bad value said as its flag: `--top-k: top_k must be ...`."""
    from dataclasses import fields

    from poelm.engine import DecodeOptions, OptionError
    from poelm.flags import setting_flag_names

    flags = {f.name: setting_flag_names(f)[0] for f in fields(DecodeOptions)}
    try:
        return engine.options(options)
    except OptionError as e:
        if e.option not in flags:
            raise
        if e.template is not None:  # the message names its fields: say each as its flag
            raise CliError(e.said(lambda name: flags.get(name, name))) from None
        raise CliError(f"{flags[e.option]}: {e}") from None


def val_progress(args: argparse.Namespace, batches, what: str, batch_size: int, seq_len: int, tokens: int | None,
                 device):
    """`batches` of val_batches with progress (plain lines in a log file; none with --json)."""
    from poelm.dataloader import default_eval_tokens
    from poelm.progress import track

    budget = default_eval_tokens(device) if tokens is None else tokens
    return track(batches, what, total=max(1, budget // (batch_size * seq_len)), enabled=not getattr(args, "json", False),
                 tokens_per_item=batch_size * seq_len)


def threads_note(args: argparse.Namespace) -> str | None:
    """The line that says the torch threads main() chose for this command (None: not run by main)."""
    choice = getattr(args, "thread_choice", None)
    return choice.line() if choice is not None else None


def with_threads(args: argparse.Namespace, result: dict, lines: list[str]) -> None:
    """Add the torch threads to a command's --json result and to its text lines."""
    choice = getattr(args, "thread_choice", None)
    if choice is not None:
        result["threads"] = choice.threads
        lines.append(choice.line())
