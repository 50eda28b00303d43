"""`poelm eval MODEL --data DIR`: bits per byte of the final readout, every stage and the
Log-OP; with --compose, bits per assistant token of sibling specialists and their Log-OP; with
--tasks, lm-eval's downstream tasks on every readout at once (poelm.downstream)."""

from __future__ import annotations

import argparse

from poelm.cli.common import CliError, check_seq_len, checked_tasks, emit, parse_compose, val_progress, with_threads
from poelm.flags import at_least


def eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="MODEL")
    p.add_argument("--data", default=None, help="corpus directory (its last shard is validation); "
                                                 "required unless --tasks")
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
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="lm-eval tasks scored on every readout (stages, Log-OP, final) from one trunk pass per "
                        "batch; real tasks download their data once (see README)")
    p.add_argument("--include-path", default=None, metavar="DIR", help="with --tasks: a directory of task YAML files")
    p.add_argument("--limit", type=at_least(1), default=None, help="with --tasks: at most N examples per task")
    p.add_argument("--force", action="store_true",
                   help="with --tasks: a BP model's stages and Log-OP too (labelled: they were never trained to "
                        "predict)")


def cmd_eval(args: argparse.Namespace) -> int:
    from poelm.chatdata import is_chat_data
    from poelm.dataloader import val_batches
    from poelm.evaluate import evaluate_bpb
    from poelm.runtime import parse_device
    from poelm.specialist import load_with_delta

    if args.tasks:
        return eval_tasks(args)
    if args.data is None:
        raise CliError("give --data DIR (bits per byte) or --tasks T1,T2 (lm-eval tasks)")
    if args.compose and "," in args.compose.strip(","):
        return eval_compose(args)
    if args.compose:  # one delta: that specialist alone
        if args.delta:
            raise CliError(f"--compose {args.compose} names one delta and --delta another: pass both in --compose "
                           f"{args.compose.strip(',')},{args.delta} to compose them")
        args.delta = args.compose.strip(",")
    device = parse_device(args.device)
    model, tokenizer = load_with_delta(args.model, args.delta, device=device, tokenizer_dir=args.tokenizer)
    if tokenizer is None:
        raise CliError(f"{args.model} has no tokenizer: pass --tokenizer DIR (bpb needs token_bytes.pt)")
    T = args.seq_len or model.config.sequence_len
    check_seq_len(T, model, args.model)
    if is_chat_data(args.data):
        return eval_chat(args, model, tokenizer, T, device)

    def batches(what: str = "eval"):
        return val_progress(args, val_batches(args.data, tokenizer, args.batch_size, T, args.tokens, device=device),
                            what, args.batch_size, T, args.tokens, device)

    result = evaluate_bpb(model, batches(), tokenizer.token_bytes())
    result["model"] = str(args.model)
    if model.config.is_poe() and args.backout_both:
        model.config.backout = not model.config.backout
        other = evaluate_bpb(model, batches("eval, other backout"), tokenizer.token_bytes())
        result["bpb_with_backout" if model.config.backout else "bpb_without_backout"] = other["bpb"]
    lines = [f"final bpb: {result['bpb']:.4f}", *(f"stage {k} bpb: {v:.4f}" for k, v in enumerate(result["stages"])),
             f"log-op bpb: {result['logop']:.4f}", f"({result['tokens']} tokens)"]
    with_threads(args, result, lines)
    emit(args, result, "\n".join(lines))
    return 0


def eval_chat(args: argparse.Namespace, model, tokenizer, seq_len: int, device) -> int:
    """`poelm eval MODEL --data CHATDIR [--delta D]`: bits per assistant token of the final readout
    on the held-out split (a specialist: its own readout, per --delta)."""
    from poelm.chatdata import chat_batches
    from poelm.sft import assistant_bits

    batches = chat_batches(args.data, tokenizer, args.batch_size, seq_len, split="val", device=device)
    result = dict(assistant_bits(model, batches), model=str(args.model), delta=args.delta)
    lines = [f"bits per assistant token: {result['assistant_bits']:.4f} ({result['assistant_tokens']} tokens"
             f"{', delta ' + str(args.delta) if args.delta else ''})"]
    with_threads(args, result, lines)
    emit(args, result, "\n".join(lines))
    return 0


def eval_compose(args: argparse.Namespace) -> int:
    """`poelm eval BASE --compose D1,D2 --data CHATDIR`: bits per assistant token."""
    from poelm.chatdata import chat_batches
    from poelm.checkpoint import load_model
    from poelm.runtime import parse_device
    from poelm.specialist import bits_per_assistant_token, compose

    dirs = parse_compose(args.compose)
    device = parse_device(args.device)
    base, tokenizer = load_model(args.model, device=device, tokenizer_dir=args.tokenizer)
    if tokenizer is None:
        raise CliError(f"{args.model} has no tokenizer: pass --tokenizer DIR (chat data is rendered with it)")
    comp = compose(base, dirs)
    T = args.seq_len or base.config.sequence_len
    result = bits_per_assistant_token(comp, chat_batches(args.data, tokenizer, args.batch_size, T, split="val",
                                                         device=device))
    lines = [*(f"{name}: {v:.4f}" for name, v in result["branches"].items()), f"composition: {result['composition']:.4f}",
             f"(bits per assistant token, {result['assistant_tokens']} tokens)"]
    with_threads(args, result, lines)
    emit(args, result, "\n".join(lines))
    return 0


def eval_tasks(args: argparse.Namespace) -> int:
    """`poelm eval MODEL --tasks T1,T2 [--include-path DIR] [--limit N]`: a table task x readout."""
    from poelm.downstream import evaluate_tasks, task_table

    tasks, manager = checked_tasks(args, [args.model])
    result = evaluate_tasks(args.model, tasks, args.include_path, args.limit, args.device, args.batch_size,
                            args.force, manager=manager)
    emit(args, result, task_table(result))
    return 0
