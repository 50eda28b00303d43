"""`poelm train` (a BP or PoE model from scratch, or --resume) and `poelm sft` (a post-hoc
specialist on chat data): their flags and the one trainer they share (poelm/train.py)."""

from __future__ import annotations

import argparse
import json
import os
import typing

from poelm.flags import (add_model_flags, add_setting_flags, at_least, config_from_flags, model_kwargs,
                         setting_kwargs, untrained_fields)

if typing.TYPE_CHECKING:
    from poelm.train import TrainConfig

# `poelm sft`'s MODEL is the run's init and brings its tokenizer; stage-parallel trains pretraining
# only (poelm.sft.SftTask.stage_parallel); its --data is its own (chat data, required)
SFT_OWN = ("model", "data", "tokenizer", "init", "stage_parallel")
# `poelm sft`'s batch flags default to the base run's batch (or the chat set's size): poelm.sft.sft_batch
SFT_BATCH = ("total_batch_size", "device_batch_size")


def train_arguments(p: argparse.ArgumentParser) -> None:
    """Every TrainConfig field is a flag; the model's are GPTConfig's fields."""
    from poelm.train import TrainConfig

    add_setting_flags(p, TrainConfig, exclude=("model",))
    add_model_flags(p, exclude=untrained_fields())  # a specialist is attached to a base, not trained from scratch


def sft_arguments(p: argparse.ArgumentParser) -> None:
    """SftSettings' fields and TrainConfig's (less SFT_OWN) are flags."""
    from poelm.sft import SftSettings
    from poelm.train import TrainConfig

    p.add_argument("model", help="MODEL: a PoE base (new layers are attached) or a `poelm specialist attach` output")
    p.add_argument("--data", required=True, help="chat data directory (`poelm data chat`; last shard = held out)")
    add_setting_flags(p, SftSettings)
    add_setting_flags(p, TrainConfig, exclude=SFT_OWN + SFT_BATCH)
    p.add_argument("--total-batch-size", type=at_least(1), default=None,
                   help="tokens per optimizer step (all ranks) (default: the base run's, saved with its checkpoint; "
                        "else derived from the chat set's size)")
    p.add_argument("--device-batch-size", type=at_least(1), default=None,
                   help="rows per forward pass per rank (default: the base run's, at most the rows of a step; else "
                        "derived from the chat set's size)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from `poelm train` / `poelm sft` flags: the model flags build its GPTConfig."""
    from poelm.train import TrainConfig

    return TrainConfig(model=config_from_flags(model_kwargs(args)), **setting_kwargs(args, TrainConfig, ("model",)))


def cmd_train(args: argparse.Namespace) -> int:
    return run_trainer(args)


def cmd_sft(args: argparse.Namespace) -> int:
    """`poelm sft MODEL --data CHATDIR --out RUN ...`: `poelm train`'s trainer with the SFT task."""
    from poelm.sft import SftSettings, SftTask

    args.init = args.model
    inherit_batch(args)
    return run_trainer(args, SftTask(SftSettings(**setting_kwargs(args, SftSettings))))


def inherit_batch(args: argparse.Namespace) -> None:
    """--total-batch-size / --device-batch-size not given: the base run's, else derived from the chat set."""
    from poelm.sft import sft_batch

    total, device_batch, source = sft_batch(args.model, args.data, args.row_len, int(os.environ.get("WORLD_SIZE", 1)),
                                            args.total_batch_size, args.device_batch_size)
    if (args.total_batch_size, args.device_batch_size) != (total, device_batch) and not args.quiet \
            and int(os.environ.get("RANK", "0")) == 0:
        print(f"batch: {total:,} tokens per step, device batch {device_batch}, from {source}", flush=True)
    args.total_batch_size, args.device_batch_size = total, device_batch


def run_trainer(args: argparse.Namespace, task=None) -> int:
    """poelm.train.train on the flags (`task`: pretraining when None); --json prints its result."""
    import torch.distributed as dist

    from poelm.cli.common import threads_note
    from poelm.train import train

    note = threads_note(args)
    if note and not args.quiet and int(os.environ.get("RANK", "0")) == 0:
        print(note, flush=True)
    result = train(config_from_args(args), task)
    if note:
        result["threads"] = args.thread_choice.threads
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
