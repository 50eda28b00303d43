"""The `poelm` command line: the command registry, the parser and the one error policy.

    poelm inspect poe-1.3b --json
    poelm data build --source default --out data/default
    poelm tokenizer train --data data/default --vocab-size 4096 --out data/tokenizer
    poelm train --data data/default --tokenizer data/tokenizer --out runs/tiny --depth 4
    poelm eval runs/tiny --data data/default --json
    poelm generate runs/tiny "To be, or not to be"
    poelm chat runs/sft --system "Be brief."
    poelm export runs/tiny --out out/tiny-hf

MODEL is anything `poelm.checkpoint.load_model` takes: a preset, a model directory, a
nanochat checkpoint directory, a `poelm train --out` directory or a hub id.

Every command is one `Command` in COMMANDS: its name, a one-line help and the module of
poelm/cli/ that holds its flags and its handler. Only the chosen command's module is
imported, so `poelm --help` loads neither torch nor matplotlib. Every flag has a one-line
help that shows its default. Errors:
- bad input (ValueError, which CliError is, or OSError): `poelm: error: <one line>` on
  stderr and exit status 2; a SettingError (poelm.runtime) is said with its flags' names (cli/common.py);
- a run that stopped itself (poelm.runtime.RunStopped: its loss diverged): the same one
  line and exit status 1;
- anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass

from poelm.cli.common import flag_of, flag_off
from poelm.flags import at_least
from poelm.runtime import RunStopped, SettingError


@dataclass(frozen=True)
class Command:
    name: str  # "eval", or "data build" for a subcommand of a group
    help: str  # one line
    module: str  # the module of poelm/cli/ that holds the two functions below
    arguments: str  # adds the command's flags to its parser
    handler: str  # runs the command
    threads: bool = False  # runs torch on the CPU: gets the shared --threads flag (set before the handler runs)

    @property
    def run(self) -> str:
        """"module:function" of the handler, imported only when the command runs."""
        return f"poelm.cli.{self.module}:{self.handler}"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        getattr(importlib.import_module(f"poelm.cli.{self.module}"), self.arguments)(parser)


COMMANDS: tuple[Command, ...] = (
    Command("inspect", "tensors, parameters and stages of a preset or model", "inspect", "inspect_arguments",
            "cmd_inspect"),
    Command("data build", "build a corpus from the default texts or a folder of txt/jsonl/parquet", "data",
            "data_build_arguments", "cmd_data_build"),
    Command("data chat", "build chat data (recall, dialogue or a JSONL file) for specialist SFT", "data",
            "data_chat_arguments", "cmd_data_chat"),
    Command("data climbmix", "download ClimbMix shards (needs a network)", "data", "data_climbmix_arguments",
            "cmd_data_climbmix"),
    Command("tokenizer train", "train the byte-level BPE tokenizer on a corpus directory", "data",
            "tokenizer_train_arguments", "cmd_tokenizer_train"),
    Command("train", "train a BP or PoE model from scratch (or --resume)", "train", "train_arguments", "cmd_train",
            threads=True),
    Command("sft", "train a post-hoc specialist on chat data (attached to a frozen PoE base)", "train",
            "sft_arguments", "cmd_sft", threads=True),
    Command("eval", "bits per byte of the final readout, every stage and the Log-OP", "eval", "eval_arguments",
            "cmd_eval", threads=True),
    Command("generate", "generate text: final, stage, logop, wand or speculative decoding", "generate",
            "generate_arguments", "cmd_generate", threads=True),
    Command("chat", "chat with MODEL in the terminal (multi-turn, streamed; /reset, /quit)", "chat",
            "chat_arguments", "cmd_chat", threads=True),
    Command("serve", "an OpenAI-compatible HTTP server: continuous batching, PoE modes per request, specialists",
            "serve", "serve_arguments", "cmd_serve", threads=True),
    Command("calibrate", "calibrate WAND swing bounds and store them with the model", "generate",
            "calibrate_arguments", "cmd_calibrate", threads=True),
    Command("export", "write MODEL as a Hugging Face directory (transformers + poelm load it)", "export",
            "export_arguments", "cmd_export"),
    Command("experiment", "the BP-vs-PoE 3-way experiment end to end (report, plots, results.json)", "experiment",
            "experiment_arguments", "cmd_experiment", threads=True),
    Command("compare", "several models side by side on the same validation data", "experiment",
            "compare_arguments", "cmd_compare", threads=True),
    Command("specialist attach", "append new layers and a zero head to a frozen PoE base (or to a specialist)",
            "specialist", "specialist_attach_arguments", "cmd_specialist_attach"),
    Command("specialist save-delta", "write a trained specialist's added/changed tensors as a bf16 delta",
            "specialist", "specialist_save_delta_arguments", "cmd_specialist_save_delta"),
)
GROUPS = {"data": "build corpora (parquet shards with a text column)", "tokenizer": "train the BPE tokenizer",
          "specialist": "post-hoc specialists on a frozen PoE base (attach, delta files)"}


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, or says it is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "(default" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if action.nargs == 0 and action.default is False:  # store_true
            return f"{text} (default: off)"
        if action.default is None:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse with the help formatter above and one-line usage errors."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"poelm: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser (only=None), or one where just the top-level command `only` gets its
    flags and the others are listed by name, so building it imports nothing heavy."""
    parser = Parser(prog="poelm", description="Product-of-Experts language models: train, evaluate, compare and "
                    "serve PoE models and their backprop controls. Bad input exits with status 2.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        top, _, leaf = cmd.name.partition(" ")
        where = sub
        if leaf:
            if top not in groups:
                group = sub.add_parser(top, help=GROUPS[top], description=GROUPS[top])
                groups[top] = group.add_subparsers(dest=f"{top}_command", metavar="SUBCOMMAND")
            where = groups[top]
        p = where.add_parser(leaf or top, help=cmd.help, description=cmd.help)
        if only is None or only == top:
            cmd.add_arguments(p)
            p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
            if cmd.threads:
                p.add_argument("--threads", type=at_least(1), default=None,
                               help="torch CPU threads (default: the free cores, i.e. the usable cores less the "
                                    "1-minute load average, at most torch's default, less one core for the HTTP "
                                    "side in `poelm serve`; said in the output)")
        p.set_defaults(run=cmd.run)
    return parser


def error_line(error: BaseException) -> str:
    """The first line of an error's message (never altered; a SettingError says its flag:
    --device, --no-compile), else its type's name."""
    text = str(error)
    if isinstance(error, SettingError):
        text = error.render(flag_of, flag_off)
    lines = text.strip().splitlines()
    return lines[0] if lines else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command or "")  # "": no command's flags (plain `poelm --help`)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error already printed as one line (2)
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "run", None):
        if args.command is None:
            parser.print_help()
            return 0
        print(f"poelm: error: `poelm {args.command}` needs a subcommand (see `poelm {args.command} --help`)",
              file=sys.stderr)
        return 2
    module, _, name = args.run.partition(":")
    func = getattr(importlib.import_module(module), name)
    try:
        if hasattr(args, "threads"):
            from poelm.runtime import set_threads

            # the handler says it (poelm.cli.common.threads_note); reserved_cores: a command's own work beside the model
            args.thread_choice = set_threads(args.threads, getattr(args, "reserved_cores", 0))
        return int(func(args) or 0)
    except (ValueError, OSError) as e:  # bad input (CliError is a ValueError); any other error is a bug
        print(f"poelm: error: {error_line(e)}", file=sys.stderr)
        return 2
    except RunStopped as e:  # not bad input: the run ended itself (what it wrote is intact)
        print(f"poelm: error: {error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("poelm: interrupted", file=sys.stderr)
        return 130
