"""`poelm train` (a BP or PoE model from scratch, or --resume) and `poelm sft` (a post-hoc
specialist on chat data): their flags and the one trainer they share (poelm/train.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from poelm.flags import add_model_flags, at_least, config_from_flags, model_kwargs

if typing.TYPE_CHECKING:
    from poelm.train import TrainConfig

# GPTConfig fields that a model gets from elsewhere, never from training flags: the tokenizer's
# vocabulary, a specialist's attach (poelm.specialist), a cut by `poelm export --stages`
NOT_TRAINING_FLAGS = ("vocab_size", "frozen_layers", "base_n_layer", "head_mode", "source_n_layer")


def train_arguments(p: argparse.ArgumentParser) -> None:
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
    a("--stop-at", type=int, default=None,
      help="stop after step N under the schedule of the whole horizon (a run cut short, as the paper's alpha=0.5 run)")
    a("--quiet", action="store_true", help="no progress bar or log lines")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """TrainConfig from `poelm train` / `poelm sft` flags: the model flags build its GPTConfig."""
    from poelm.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    return TrainConfig(model=config_from_flags(model_kwargs(args)), **{k: v for k, v in vars(args).items() if k in names})


def cmd_train(args: argparse.Namespace) -> int:
    return run_trainer(args)


def cmd_sft(args: argparse.Namespace) -> int:
    """`poelm sft MODEL --data CHATDIR --out RUN ...`: `poelm train`'s trainer with the SFT task."""
    from poelm.sft import SftTask

    args.task, args.init = "sft", args.model
    return run_trainer(args, SftTask())


def run_trainer(args: argparse.Namespace, task=None) -> int:
    """poelm.train.train on the flags (`task`: pretraining when None); --json prints its result."""
    import torch.distributed as dist

    from poelm.train import train

    result = train(config_from_args(args), task)
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
