"""The `poelm` command line: every command, its flags and one error policy.

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

Every command is one `Command` in COMMANDS: its name, a one-line help, the function that
adds its flags and its implementation as "module:function". Only the chosen command's flags
are built and only its implementation is imported, so `poelm --help` loads neither torch nor
matplotlib. Every flag has a one-line help that shows its default. Bad input (ValueError,
CliError, OSError) ends with `poelm: error: <one line>` on stderr and exit status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


class CliError(ValueError):
    """Bad input to show the user as one line."""


# -----------------------------------------------------------------------------
# Shared parsing helpers


def emit(args: argparse.Namespace, result: dict, text: str | None = None) -> None:
    """Print `result` as JSON with --json, else the human text (or pretty JSON)."""
    if getattr(args, "json", False) or text is None:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(text)


DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def parse_dtype(name: str, flag: str = "--dtype"):
    """fp32/bf16/fp16 or torch's names (float32, bfloat16, float16) -> torch.dtype."""
    import torch

    if name not in DTYPES:
        raise CliError(f"{flag} {name!r} is not a dtype; use fp32 (float32), bf16 (bfloat16) or fp16 (float16)")
    return getattr(torch, DTYPES[name])


def parse_device(name: str, flag: str = "--device"):
    """auto, cpu, cuda, cuda:N or mps -> torch.device, refusing devices this machine lacks."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"{flag} {name!r} is not a device; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"{flag} {name} but no CUDA GPU is visible; use {flag} cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"{flag} {name} but only {torch.cuda.device_count()} CUDA GPU(s) are visible; "
                           f"use {flag} cuda:0")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise CliError(f"{flag} {name} but MPS is not available here; use {flag} cpu")
    elif device.type != "cpu":
        raise CliError(f"{flag} {name!r} is not supported; use cpu, cuda, cuda:N, mps or auto")
    return device


def check_bf16(device, flag: str = "--dtype") -> None:
    """Refuse bf16 on a CUDA GPU without bfloat16 support (the CPU computes it, slowly)."""
    import torch

    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise CliError(f"{flag} bf16 but {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                       f"use {flag} fp32")


def check_compiler(device, flag: str = "--compile") -> None:
    """Refuse torch.compile where it cannot work: no dynamo for this Python, no triton (CUDA) or no C++ compiler (CPU)."""
    import importlib.util
    import shutil

    import torch

    if not torch._dynamo.is_dynamo_supported():
        raise CliError(f"{flag}: torch.compile does not support this Python or platform; pass --no-compile")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise CliError(f"{flag} on CUDA needs triton (pip install triton); pass --no-compile to run eagerly")
    if device.type == "cpu" and not (os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++"))):
        raise CliError(f"{flag} on the CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX); pass --no-compile")


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def finite_float(text: str) -> float:
    """An argparse type: a float that is not NaN (inf allowed)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value:
        raise argparse.ArgumentTypeError("must be a number, got nan")
    return value


def comma_ints(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers such as 12,5,4,3."""
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give comma-separated integers such as 12,5,4,3, got {text!r}") from None


def first_line(error: BaseException) -> str:
    """The first line of an error's message (never altered), else its type's name."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# -----------------------------------------------------------------------------
# Flags of each command


def inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="preset name or MODEL")


def data_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="default", help="'default' (Shakespeare, Milton, King James) or a PATH")
    p.add_argument("--out", default="data/default", help="output directory of shards")


def data_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True,
                   help="recall (King James verses), dialogue (speech -> next speech in the plays) or a JSONL file "
                        "of {\"messages\": [...]}")
    p.add_argument("--out", required=True, help="output directory of chat shards (last shard = held out)")


def data_climbmix_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", type=at_least(1), required=True, help="number of training shards")
    p.add_argument("--out", default="data/climbmix", help="output directory of shards")
    p.add_argument("--base-url", default=None, help="mirror URL of the shard files (default: the hub dataset)")


def tokenizer_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="corpus directory (parquet shards)")
    p.add_argument("--vocab-size", type=int, default=32768, help="tokens in the vocabulary (256 bytes + merges + 9 specials)")
    p.add_argument("--max-chars", type=at_least(1), default=2_000_000_000, help="train on at most this many characters")
    p.add_argument("--out", required=True, help="tokenizer directory to write (replaced atomically; an existing one only "
                   "if it is a previous `poelm tokenizer train` output, or with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a poelm tokenizer")


def eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="MODEL")
    p.add_argument("--data", required=True, help="corpus directory (its last shard is validation)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: MODEL's own)")
    p.add_argument("--tokens", type=at_least(1), default=None,
                   help="validation token budget, capped at the split (default: 80 x 2^19 on CUDA, 2^16 on CPU)")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="rows per forward pass")
    p.add_argument("--seq-len", type=at_least(1), default=None, help="tokens per row (default: MODEL's sequence_len)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--backout-both", action="store_true",
                   help="PoE: also report the final bpb with the other backout setting")
    p.add_argument("--delta", default=None, help="specialist delta directory to load onto MODEL (its base)")
    p.add_argument("--compose", default=None, metavar="DELTA1,DELTA2",
                   help="sibling deltas on MODEL: bits per assistant token of each and of their Log-OP on the "
                        "held-out split of --data (a chat data directory)")


def decoding_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    """The readout / decoding mode and sampling flags of generate and chat."""
    from poelm.engine import MODES

    p.add_argument("--mode", choices=MODES, default="final", help="readout / decoding mode")
    p.add_argument("--stage", type=at_least(0), default=None, help="--mode stage: read out at this stage (default: 0)")
    p.add_argument("--stages", default=None, help="--mode logop: comma list of stages (default: all)")
    p.add_argument("--draft-stage", type=at_least(0), default=0, help="--mode speculative: the drafting stage")
    p.add_argument("--gamma", type=at_least(1), default=4, help="--mode speculative: drafted tokens per verify pass")
    p.add_argument("--wand-factor", type=finite_float, default=1.0, help="--mode wand: exit factor F (inf = full depth)")
    p.add_argument("--max-new-tokens", type=at_least(0), default=max_new_tokens, help="tokens to generate at most")
    p.add_argument("--temperature", type=finite_float, default=0.0, help="sampling temperature, 0 = greedy")
    p.add_argument("--top-k", type=at_least(0), default=0, help="sample from the k likeliest tokens, 0 = off")
    p.add_argument("--top-p", type=finite_float, default=1.0, help="nucleus sampling mass, 1 = off")
    p.add_argument("--repetition-penalty", type=finite_float, default=1.0, help="penalty on repeated tokens, 1 = off")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")
    p.add_argument("--force", action="store_true", help="allow PoE modes on a BP model (research)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="plain modes: decode with an inductor-compiled step (faster at small batch; the first "
                        "call compiles for ~10-20 s)")
    p.add_argument("--delta", default=None, help="specialist delta directory to load onto MODEL (its base)")
    p.add_argument("--head-mode", choices=("dual", "base", "spec"), default=None,
                   help="specialist readout: dual = both heads, base = lm_head, spec = lm_head_stage "
                        "(default: the model's own, dual)")
    p.add_argument("--compose", default=None, metavar="DELTA1,DELTA2",
                   help="sibling deltas on MODEL: decode from the Log-OP of their readouts (uncached)")


def specialist_attach_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the base MODEL (a PoE model; with --delta: the base of the parent delta)")
    p.add_argument("--layers", type=int, required=True, help="new layers to append (>= 1)")
    p.add_argument("--out", required=True, help="model directory to write (config.json, weights, specialist.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a poelm model directory")
    p.add_argument("--delta", default=None, help="parent delta: stack the new specialist on it (a cascade)")
    p.add_argument("--force", action="store_true", help="attach to a BP base anyway (research)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")


def specialist_save_delta_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the trained specialist (a run directory or model directory)")
    p.add_argument("--out", required=True, help="delta directory to write (delta.safetensors + delta.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a poelm delta")
    p.add_argument("--base", default=None, help="its base MODEL, when the specialist has no specialist.json")


def generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="MODEL")
    p.add_argument("prompt", help="prompt text (space-separated token ids when the model has no tokenizer)")
    p.add_argument("--chat", action="store_true",
                   help="render the prompt as one user turn of the chat format and stop at <|assistant_end|>")
    decoding_arguments(p)


def chat_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="MODEL (its tokenizer must have the chat special tokens)")
    p.add_argument("--system", default=None, help="system message, merged into the first user turn")
    decoding_arguments(p, max_new_tokens=256)


def serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the base MODEL (served as --name)")
    p.add_argument("--delta", action="append", default=None, metavar="NAME=DIR",
                   help="a specialist delta on MODEL, served as model id BASE+NAME (repeatable)")
    p.add_argument("--name", default=None, help="model id of MODEL (default: its directory name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes the server to the network)")
    p.add_argument("--port", type=at_least(1), default=8000, help="TCP port")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: the POELM_API_KEY environment variable, else none)")
    p.add_argument("--max-batch", type=at_least(1), default=32, help="rows (choices) decoded together at most")
    p.add_argument("--max-queue", type=at_least(0), default=64, help="requests waiting at most; beyond: 503 + Retry-After")
    p.add_argument("--request-timeout", type=finite_float, default=600.0, help="seconds a request may take, queue included")
    p.add_argument("--max-tokens", type=at_least(1), default=None, help="max_tokens a request may ask (default: the context)")
    p.add_argument("--max-prompt-tokens", type=at_least(1), default=None, help="prompt tokens at most (default: the context)")
    p.add_argument("--max-n", type=at_least(1), default=8, help="choices (n) per request at most")
    p.add_argument("--max-body-bytes", type=at_least(1), default=1 << 20, help="request body bytes at most (413 beyond)")
    p.add_argument("--threads", type=at_least(0), default=0, help="torch CPU threads, 0 = torch's default")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="warning",
                   help="uvicorn's log level")


def calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="MODEL (a directory: the bounds are written into it)")
    p.add_argument("--data", required=True, help="corpus directory (parquet shards; the validation split is read)")
    p.add_argument("--tokens", type=at_least(1), default=65536, help="calibration tokens")
    p.add_argument("--quantile", type=finite_float, default=0.99, help="quantile of the per-token swings")
    p.add_argument("--force", action="store_true", help="allow calibrating a BP model (research)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="MODEL")
    p.add_argument("--out", required=True, help="output directory (replaced atomically; an existing one only if it "
                   "is a previous poelm export, or with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a poelm export")
    p.add_argument("--dtype", default="bf16", help="weight dtype: bf16 (as the releases), fp32, fp16 or torch's names")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: MODEL's own)")
    p.add_argument("--stages", type=at_least(1), default=None, help="elastic depth: write a standalone model of "
                   "the first K stages (its logits are stage K-1's readout of MODEL)")


# GPTConfig fields that a model gets from elsewhere, never from training flags: the tokenizer's
# vocabulary, a specialist's attach (poelm.specialist), a cut by `poelm export --stages`
NOT_TRAINING_FLAGS = ("vocab_size", "frozen_layers", "base_n_layer", "head_mode", "source_n_layer")


def train_arguments(p: argparse.ArgumentParser) -> None:
    from poelm.codec import add_model_flags

    p.add_argument("--data", default="data/default", help="corpus directory of parquet shards (last shard = validation)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (tokenizer.pkl/json + token_bytes.pt) "
                                                     "(default: none; give it)")
    p.add_argument("--init", default=None, help="MODEL whose weights the run starts from (same architecture; a "
                   "fresh optimizer and schedule), e.g. an ordinary run's checkpoint")
    p.add_argument("--stage-parallel", action="store_true",
                   help="under torchrun: one rank per PoE stage (flat), world = stages x data-parallel replicas; "
                        "only forward activations cross stages (docs/stage_parallel.md)")
    trainer_arguments(p)
    add_model_flags(p, exclude=NOT_TRAINING_FLAGS)  # a specialist is attached to a base, not trained from scratch


def sft_arguments(p: argparse.ArgumentParser) -> None:
    from poelm.train import TrainConfig

    d = TrainConfig()
    p.add_argument("model", help="MODEL: a PoE base (new layers are attached) or a `poelm specialist attach` output")
    p.add_argument("--data", required=True, help="chat data directory (`poelm data chat`; last shard = held out)")
    p.add_argument("--layers", dest="attach_layers", type=at_least(1), default=d.attach_layers,
                   help="new layers attached to a base")
    p.add_argument("--force", action="store_true", help="attach to a BP base anyway (its stages were never trained "
                                                        "to predict: docs/poe.md section 6)")
    p.add_argument("--row-len", type=at_least(1), default=None,
                   help="tokens per conversation row (default: the model's context)")
    p.add_argument("--eval-prompts", type=at_least(0), default=d.eval_prompts,
                   help="held-out prompts scored by exact match of the greedy answer, 0 = off")
    trainer_arguments(p)


def trainer_arguments(p: argparse.ArgumentParser) -> None:
    """The flags `poelm train` and `poelm sft` share (their one trainer, poelm/train.py)."""
    from poelm.model import ATTENTION_BACKENDS
    from poelm.optim import LR_SCALING
    from poelm.train import TrainConfig

    d = TrainConfig()
    a = p.add_argument
    a("--out", default=d.out, help="run directory (checkpoints, metrics.jsonl, plots)")
    a("--total-batch-size", type=int, default=d.total_batch_size, help="tokens per optimizer step (all ranks)")
    a("--device-batch-size", type=int, default=d.device_batch_size, help="rows per forward pass per rank")
    a("--num-iterations", type=int, default=d.num_iterations,
      help="optimizer steps; -1 = derive from --target-tokens or --target-param-data-ratio")
    a("--target-tokens", type=int, default=d.target_tokens, help="training tokens; -1 = use the ratio below")
    a("--target-param-data-ratio", type=float, default=d.target_param_data_ratio,
      help="tokens per total parameter (released runs: 20)")
    a("--matrix-lr", type=float, default=d.matrix_lr, help="Muon lr of the matrices at d12 / 2^19 tokens")
    a("--embedding-lr", type=float, default=d.embedding_lr, help="AdamW lr of wte at d12 / 2^19 tokens")
    a("--unembedding-lr", type=float, default=d.unembedding_lr, help="AdamW lr of lm_head at d12 / 2^19 tokens")
    a("--scalar-lr", type=float, default=d.scalar_lr, help="AdamW lr of x0_lambdas at d12 / 2^19 tokens")
    a("--weight-decay", type=float, default=d.weight_decay,
      help="Muon weight decay at d12 / 2^19 tokens, scaled to this run's start value")
    a("--lr-scaling", default=d.lr_scaling, choices=LR_SCALING,
      help="nanochat: scale LRs and weight decay with batch, width and model size (docs/training.md); "
           "off: take them literally, for small CPU runs")
    a("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warmup steps")
    a("--warmdown-frac", type=float, default=d.warmdown_frac, help="fraction of the run spent warming down")
    a("--final-lr-frac", type=float, default=d.final_lr_frac, help="learning-rate multiplier at the last step")
    a("--eval-every", type=int, default=d.eval_every, help="validation bpb every this many steps, 0 = never")
    a("--eval-tokens", type=int, default=d.eval_tokens,
      help="validation tokens per evaluation, capped at the split (default: 80 x 2^19 on CUDA, 2^16 on CPU)")
    a("--sample-every", type=int, default=d.sample_every, help="print a greedy sample every this many steps, 0 = never")
    a("--sample-prompt", default=d.sample_prompt, help="prompt of those samples (default: %(default)r)")
    a("--save-every", type=int, default=d.save_every, help="checkpoint every this many steps, 0 = only at the end")
    a("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="newest checkpoints to keep, 0 = all")
    a("--seed", type=int, default=d.seed, help="seed of the initialisation")
    a("--device", default=d.device, help="auto (cuda if visible, else cpu), cpu, cuda or cuda:N")
    a("--dtype", default=d.dtype, help="auto (bf16 on capable GPUs, else fp32), fp32/float32 or bf16/bfloat16")
    a("--compile", action=argparse.BooleanOptionalAction, default=None,
      help="torch.compile the training step (default: on for CUDA, off on the CPU)")
    a("--attention-backend", default=d.attention_backend, choices=ATTENTION_BACKENDS,
      help="kernel of the sliding-window layers: auto = flash-attn if installed, else FlexAttention on CUDA; "
           "the masked SDPA reference on the CPU")
    a("--resume", action="store_true", help="continue the run in --out from its newest complete checkpoint")
    a("--extend-to", type=int, default=None, help="with --resume: change the horizon to N steps (recorded)")
    a("--quiet", action="store_true", help="no progress bar or log lines")


def experiment_arguments(p: argparse.ArgumentParser) -> None:
    from poelm.codec import add_model_flags
    from poelm.experiment import PRESETS

    p.add_argument("config", nargs="?", default="tiny", help=f"preset ({', '.join(PRESETS)}) or a TOML/YAML file")
    preset = " (default: the preset's)"
    for flag, kind, text in (
            ("--out", str, "experiment directory"), ("--data", str, "corpus directory (built when missing)"),
            ("--data-source", str, "default, a folder, or climbmix:N"),
            ("--tokenizer", str, "tokenizer directory (trained when missing)"),
            ("--vocab-size", int, "tokenizer vocabulary"), ("--total-batch-size", int, "tokens per step"),
            ("--device-batch-size", int, "rows per forward pass"), ("--num-iterations", int, "steps per arm"),
            ("--target-tokens", int, "training tokens per arm"), ("--eval-every", int, "steps between evals"),
            ("--eval-tokens", int, "validation tokens per eval"), ("--save-every", int, "steps between checkpoints"),
            ("--seed", int, "seed of every arm"), ("--device", str, "auto, cpu, cuda or cuda:N"),
            ("--dtype", str, "auto, fp32/float32 or bf16/bfloat16"), ("--nproc", int, "processes per arm (torchrun)"),
            ("--decode-tokens", int, "new tokens per prompt when timing the inference modes")):
        p.add_argument(flag, type=kind, default=None, help=text + preset)
    add_model_flags(p, exclude=NOT_TRAINING_FLAGS + ("poe_mode", "poe_alpha"), defaults_note="the preset's")


def compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", help="MODEL ...")
    p.add_argument("--data", required=True, help="corpus directory (its last shard is validation)")
    p.add_argument("--tokens", type=at_least(1), default=None,
                   help="validation token budget per model, capped at the split (default: 80 x 2^19 on CUDA, 2^16 on CPU)")
    p.add_argument("--seq-len", type=at_least(1), default=None,
                   help="tokens per row (default: each model's sequence_len, at most 1024)")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="rows per forward pass")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: each MODEL's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--plot", default=None, help="write a PNG of bpb per stage here (default: no plot)")


# -----------------------------------------------------------------------------
# The commands


@dataclass(frozen=True)
class Command:
    name: str  # "eval", or "data build" for a subcommand of a group
    help: str  # one line
    arguments: Callable[[argparse.ArgumentParser], None]
    run: str  # "module:function", imported only when the command runs


COMMANDS: tuple[Command, ...] = (
    Command("inspect", "tensors, parameters and stages of a preset or model", inspect_arguments, "poelm.cli:cmd_inspect"),
    Command("data build", "build a corpus from the default texts or a folder of txt/jsonl/parquet",
            data_build_arguments, "poelm.cli:cmd_data_build"),
    Command("data chat", "build chat data (recall, dialogue or a JSONL file) for specialist SFT", data_chat_arguments,
            "poelm.chatdata:cmd_data_chat"),
    Command("data climbmix", "download ClimbMix shards (needs a network)", data_climbmix_arguments,
            "poelm.cli:cmd_data_climbmix"),
    Command("tokenizer train", "train the byte-level BPE tokenizer on a corpus directory", tokenizer_train_arguments,
            "poelm.cli:cmd_tokenizer_train"),
    Command("train", "train a BP or PoE model from scratch (or --resume)", train_arguments, "poelm.train:cmd_train"),
    Command("sft", "train a post-hoc specialist on chat data (attached to a frozen PoE base)", sft_arguments,
            "poelm.sft:cmd_sft"),
    Command("eval", "bits per byte of the final readout, every stage and the Log-OP", eval_arguments,
            "poelm.cli:cmd_eval"),
    Command("generate", "generate text: final, stage, logop, wand or speculative decoding", generate_arguments,
            "poelm.cli:cmd_generate"),
    Command("chat", "chat with MODEL in the terminal (multi-turn, streamed; /reset, /quit)", chat_arguments,
            "poelm.chat_cli:cmd_chat"),
    Command("serve", "an OpenAI-compatible HTTP server: continuous batching, PoE modes per request, specialists",
            serve_arguments, "poelm.serve:cmd_serve"),
    Command("calibrate", "calibrate WAND swing bounds and store them with the model", calibrate_arguments,
            "poelm.cli:cmd_calibrate"),
    Command("export", "write MODEL as a Hugging Face directory (transformers + poelm load it)", export_arguments,
            "poelm.cli:cmd_export"),
    Command("experiment", "the BP-vs-PoE 3-way experiment end to end (report, plots, results.json)",
            experiment_arguments, "poelm.experiment:cmd_experiment"),
    Command("compare", "several models side by side on the same validation data", compare_arguments,
            "poelm.experiment:cmd_compare"),
    Command("specialist attach", "append new layers and a zero head to a frozen PoE base (or to a specialist)",
            specialist_attach_arguments, "poelm.specialist:cmd_specialist_attach"),
    Command("specialist save-delta", "write a trained specialist's added/changed tensors as a bf16 delta",
            specialist_save_delta_arguments, "poelm.specialist:cmd_specialist_save_delta"),
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
            cmd.arguments(p)
            p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
        p.set_defaults(run=cmd.run)
    return parser


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
        return int(func(args) or 0)
    except (ValueError, OSError) as e:  # bad input (CliError is a ValueError); any other error is a bug
        print(f"poelm: error: {first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("poelm: interrupted", file=sys.stderr)
        return 130


# -----------------------------------------------------------------------------
# inspect


def model_summary(model) -> dict:
    cfg = model.config
    return {
        "tensors": len(list(model.parameters())),
        "params": model.num_params(),
        "stages": list(cfg.poe_stage_layers),
        "stage_ends": cfg.stage_ends,
        "poe_mode": cfg.poe_mode,
        "poe_alpha": cfg.poe_alpha,
        "per_stage_head": cfg.per_stage_head,
        "backout": cfg.backout,
        "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
        "sequence_len": cfg.sequence_len, "windows": model.windows,
        "value_embed_layers": [int(i) for i in model.value_embeds.keys()],
        "flops_per_token": model.flops_per_token(training_heads=False),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch
    from poelm.checkpoint import CONFIG_NAME, load_model, read_config_file, resolve_run_dir
    from poelm.model import GPT
    from poelm.presets import PRESETS, get_preset

    name, path = args.model, Path(args.model)
    if name in PRESETS and not path.exists():
        config = get_preset(name)
    else:  # read only the config: no weights are loaded
        if path.is_dir() and resolve_run_dir(path) is not None:
            path = resolve_run_dir(path)
        cfg_file = path / CONFIG_NAME
        if cfg_file.exists():
            config = read_config_file(cfg_file)
        else:
            config = load_model(name)[0].config
    with torch.device("meta"):
        model = GPT(config)
    summary = model_summary(model)
    emit(args, summary, "\n".join(f"{k:>20}: {v}" for k, v in summary.items()))
    return 0


# -----------------------------------------------------------------------------
# data / tokenizer


def cmd_data_build(args: argparse.Namespace) -> int:
    from poelm import corpus

    stats = corpus.build_corpus(args.source, args.out)
    emit(args, stats, f"corpus written to {args.out}: {json.dumps(stats, default=str)}")
    return 0


def cmd_data_climbmix(args: argparse.Namespace) -> int:
    from poelm import corpus

    kw = {"base_url": args.base_url} if args.base_url else {}
    stats = corpus.download_climbmix(args.shards, args.out, **kw)
    emit(args, stats if isinstance(stats, dict) else {"out": args.out}, f"ClimbMix shards in {args.out}")
    return 0


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import time
    from poelm import corpus
    from poelm.atomic import atomic_dir
    from poelm.checkpoint import check_replaceable
    from poelm.outputs import TOKENIZER_KIND, mark_output
    from poelm.tokenizer import Tokenizer

    check_replaceable(args.out, sources=(args.data,), overwrite=args.overwrite, kinds=(TOKENIZER_KIND,))
    train_files, _ = corpus.list_shards(args.data)
    texts = _cap_chars(corpus.iter_documents(train_files), args.max_chars)
    t0 = time.time()
    tok = Tokenizer.train(texts, args.vocab_size)
    with atomic_dir(args.out) as tmp:
        tok.save(tmp)
        mark_output(tmp, TOKENIZER_KIND)
    result = {"out": args.out, "vocab_size": tok.vocab_size, "seconds": round(time.time() - t0, 2)}
    emit(args, result, f"tokenizer with {tok.vocab_size} tokens written to {args.out} in {result['seconds']} s")
    return 0


def _cap_chars(texts, max_chars: int):
    seen = 0
    for t in texts:
        if seen >= max_chars:
            return
        seen += len(t)
        yield t


# -----------------------------------------------------------------------------
# eval


def check_seq_len(seq_len: int, model, spec: str) -> None:
    """Refuse rows longer than the model's context before anything is allocated for them."""
    context = model.config.sequence_len
    if seq_len > context:
        raise CliError(f"--seq-len {seq_len} is longer than {spec}'s context of {context} tokens; "
                       f"use --seq-len {context} or less")


def cmd_eval(args: argparse.Namespace) -> int:
    from poelm.checkpoint import load_model
    from poelm.dataloader import val_batches
    from poelm.evaluate import evaluate_bpb

    if args.compose:
        from poelm.specialist import cmd_eval_compose
        return cmd_eval_compose(args)
    device = parse_device(args.device)
    model, tokenizer = load_model(args.model, device=device, tokenizer_dir=args.tokenizer, delta=args.delta)
    if tokenizer is None:
        raise CliError(f"{args.model} has no tokenizer: pass --tokenizer DIR (bpb needs token_bytes.pt)")
    T = args.seq_len or model.config.sequence_len
    check_seq_len(T, model, args.model)

    def batches():
        return val_batches(args.data, tokenizer, args.batch_size, T, args.tokens, device=device)

    result = evaluate_bpb(model, batches(), tokenizer.token_bytes())
    result["model"] = str(args.model)
    if model.config.is_poe() and args.backout_both:
        model.config.backout = not model.config.backout
        other = evaluate_bpb(model, batches(), tokenizer.token_bytes())
        result["bpb_with_backout" if model.config.backout else "bpb_without_backout"] = other["bpb"]
    lines = [f"final bpb: {result['bpb']:.4f}", *(f"stage {k} bpb: {v:.4f}" for k, v in enumerate(result["stages"])),
             f"log-op bpb: {result['logop']:.4f}", f"({result['tokens']} tokens)"]
    emit(args, result, "\n".join(lines))
    return 0


# -----------------------------------------------------------------------------
# generate / calibrate


def model_dir(spec: str) -> Path | None:
    """The directory that holds MODEL's config.json (a run dir resolves to its latest checkpoint)."""
    from poelm.checkpoint import CONFIG_NAME, resolve_run_dir

    path = Path(spec)
    if not path.is_dir():
        return None
    path = resolve_run_dir(path) or path
    return path if (path / CONFIG_NAME).exists() or any(path.glob("model_*.pt")) else None


def check_model(spec: str) -> None:
    """Raise the one-line error load_model would, without loading anything (hub ids pass)."""
    from poelm.checkpoint import looks_like_hub_id
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


def parse_stages(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise CliError(f"--stages must be a comma list of stage indices like 0,3, got {text!r}") from None


def format_stats(stats: dict) -> str:
    parts = []
    for k, v in stats.items():
        if v is not None:
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def load_engine(args: argparse.Namespace):
    """MODEL on --device as an Engine (with its WAND calibration for --mode wand)."""
    from poelm.checkpoint import load_model
    from poelm.engine import COMPILABLE_MODES, Engine, capabilities, load_calibration

    device = parse_device(args.device)
    compile = getattr(args, "compile", False)
    if compile:
        check_compiler(device)
        if not capabilities(args.mode).compilable:
            raise CliError(f"--compile applies to the plain modes ({', '.join(COMPILABLE_MODES)}); --mode {args.mode} "
                           f"decodes eagerly: drop --compile")
    model, tokenizer = load_model(args.model, device=device, delta=getattr(args, "delta", None))
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


def decode_options(args: argparse.Namespace) -> dict:
    """The Engine.generate / Engine.stream options of the decoding flags."""
    return dict(mode=args.mode, stage=args.stage, stages=parse_stages(args.stages), draft_stage=args.draft_stage,
                gamma=args.gamma, wand_factor=args.wand_factor, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, force=args.force)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.compose:
        from poelm.specialist import cmd_generate_compose

        return cmd_generate_compose(args)
    engine = load_engine(args)
    tokenizer = engine.tokenizer
    options = decode_options(args)
    if args.chat:
        from poelm.chat import render_prompt
        from poelm.chat_cli import chat_stop_ids

        options["stop_token_ids"] = chat_stop_ids(tokenizer, args.model)
        prompt = render_prompt(tokenizer, [{"role": "user", "content": decode_prompt(args.prompt)}])
    else:
        prompt = parse_prompt(args.prompt, tokenizer)
    if args.json or tokenizer is None:
        out = engine.generate(prompt, **options)
        if args.json:
            print(json.dumps(out.to_json(), indent=2))
        else:
            print(" ".join(str(t) for t in out.tokens))
            print(format_stats(out.stats), file=sys.stderr)
        return 0
    stream = engine.stream(prompt, **options)
    for delta in stream:
        print(delta, end="", flush=True)
    print()
    print(format_stats(stream.result.stats), file=sys.stderr)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from poelm.checkpoint import load_model
    from poelm.dataloader import val_batches
    from poelm.engine import calibrate, save_calibration

    device = parse_device(args.device)
    model, tokenizer = load_model(args.model, device=device)
    if tokenizer is None:
        raise CliError(f"{args.model} has no tokenizer: calibration reads text from --data and needs one")
    seq_len = min(model.config.sequence_len, args.tokens)
    batch_size = max(1, min(8, args.tokens // seq_len))
    batches = val_batches(args.data, tokenizer, batch_size, seq_len, args.tokens, device=device)
    calib = calibrate(model, batches, quantile=args.quantile, force=args.force)
    directory = model_dir(args.model)
    saved = str(save_calibration(directory, calib)) if directory is not None else None
    result = dict(calib, saved_to=saved)
    bounds = ", ".join(f"{b:.3f}" for b in calib["wand_bounds"])
    where = f"saved to {saved}" if saved else f"not saved: {args.model} is not a model directory"
    emit(args, result, f"WAND bounds (p{100 * args.quantile:g} over {calib['wand_calibration_tokens']:,} tokens): "
                       f"[{bounds}]; {where}")
    return 0


# -----------------------------------------------------------------------------
# export


def cmd_export(args: argparse.Namespace) -> int:
    from poelm.checkpoint import load_model
    from poelm.export import export_model, source_generation_config

    dtype = parse_dtype(args.dtype)
    model, tokenizer = load_model(args.model, tokenizer_dir=args.tokenizer)
    if tokenizer is None:
        print(f"poelm: warning: {args.model} has no tokenizer (pass --tokenizer DIR); the export will have no "
              "tokenizer files and AutoTokenizer will not load it", file=sys.stderr)
    gen = source_generation_config(args.model)
    if args.stages is not None:
        from poelm.engine import CALIBRATION_KEYS
        from poelm.export import truncate

        model = truncate(model, args.stages)
        gen = {k: v for k, v in gen.items() if k not in CALIBRATION_KEYS}  # WAND bounds were for every stage
    out = export_model(model, tokenizer, args.out, dtype=dtype, generation_config=gen,
                       sources=(args.model, args.tokenizer), overwrite=args.overwrite)
    files = sorted(p.name for p in out.iterdir())
    result = {"out": str(out), "dtype": str(dtype).replace("torch.", ""), "files": files,
              "tensors": len(model.state_dict()), "params": model.num_params(), "tokenizer": tokenizer is not None,
              "stages": model.config.n_stages, "n_layer": model.config.n_layer,
              "bytes": sum(p.stat().st_size for p in out.glob("*.safetensors"))}
    what = f", first {args.stages} stages ({model.config.n_layer} layers)" if args.stages is not None else ""
    emit(args, result, f"exported {args.model}{what} to {out} ({result['dtype']}, {len(files)} files, "
                       f"{result['bytes'] / 1e6:.1f} MB of weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
