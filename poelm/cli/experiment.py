"""`poelm experiment [PRESET|FILE]` (the BP-vs-PoE experiment end to end, poelm/experiment/)
and `poelm compare MODEL ...` (several models on the same validation data)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from poelm.cli.common import CliError, check_model, checked_tasks, emit, threads_note, with_threads
from poelm.flags import add_model_flags, add_setting_flags, at_least, model_kwargs, untrained_fields


def experiment_arguments(p: argparse.ArgumentParser) -> None:
    """The experiment's own flags, then one per training setting of its arms (TrainConfig's fields)
    and per model field, each defaulting to the preset's."""
    from poelm.experiment.config import EXPERIMENTS, ArmTraining

    p.add_argument("config", nargs="?", default="tiny", help=f"preset ({', '.join(EXPERIMENTS)}) or a TOML/YAML file")
    preset = " (default: the preset's)"
    for flag, kind, text in (
            ("--out", str, "experiment directory"), ("--data", str, "corpus directory (built when missing)"),
            ("--data-source", str, "default, a folder, or climbmix:N"),
            ("--tokenizer", str, "tokenizer directory (trained when missing)"),
            ("--vocab-size", int, "tokenizer vocabulary"), ("--nproc", int, "processes per arm (torchrun)"),
            ("--decode-tokens", int, "new tokens per prompt when timing the inference modes")):
        p.add_argument(flag, type=kind, default=None, help=text + preset)
    p.add_argument("--seeds", type=at_least(1), default=None,
                   help="train each arm N times (seed, seed+1, ...): the report gives mean ± std and says whether "
                        "the orderings exceed the seed noise (default: the preset's, 1)")
    add_setting_flags(p, ArmTraining, defaults_note="the preset's")
    add_model_flags(p, exclude=untrained_fields() + ("poe_mode", "poe_alpha"), defaults_note="the preset's")


def compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", help="MODEL ...")
    p.add_argument("--data", default=None, help="corpus directory (its last shard is validation); required "
                                                 "unless --tasks")
    p.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="lm-eval tasks instead of bpb: the final readout per task in points and the last MODEL's "
                        "difference from the first (the paper's table), with a PNG")
    p.add_argument("--include-path", default=None, metavar="DIR", help="with --tasks: a directory of task YAML files")
    p.add_argument("--limit", type=at_least(1), default=None, help="with --tasks: at most N examples per task")
    p.add_argument("--tokens", type=at_least(1), default=None,
                   help="validation token budget per model, capped at the split (default: 80 x 2^19 on CUDA, 2^16 on CPU)")
    p.add_argument("--seq-len", type=at_least(1), default=None,
                   help="tokens per row (default: each model's sequence_len, at most 1024)")
    p.add_argument("--batch-size", type=at_least(1), default=8, help="rows per forward pass")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: each MODEL's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--plot", default=None, help="write a PNG of bpb per stage here (default: no plot; with --tasks: "
                                                 "compare_tasks.png)")


def experiment_config(args: argparse.Namespace):
    """The ExperimentConfig of the preset or file with the flags given on top."""
    from poelm.experiment.config import ExperimentConfig, load_config

    keys = {f.name for f in dataclasses.fields(ExperimentConfig)} - {"name", "model"}
    overrides = {k: v for k, v in vars(args).items() if k in keys}
    overrides["model"] = model_kwargs(args)
    return load_config(args.config, overrides)


def cmd_experiment(args: argparse.Namespace) -> int:
    from poelm.experiment.run import run_experiment

    cfg = experiment_config(args)
    note = threads_note(args)
    if note and not args.json:
        print(note, flush=True)
    results = run_experiment(cfg, quiet=args.json)
    if args.json:
        out = {k: results[k] for k in ("arms", "gap", "inference", "wall_seconds", "plots")}
        with_threads(args, out, [])
        print(json.dumps(out, default=str))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from poelm.experiment.compare import compare_models
    from poelm.plots import plot_compare
    from poelm.runtime import parse_device

    if args.tasks:
        return compare_on_tasks(args)
    if args.data is None:
        raise CliError("give --data DIR (bits per byte) or --tasks T1,T2 (lm-eval tasks)")
    for spec in args.models:  # every MODEL resolves before the first one is evaluated
        check_model(spec)
    device = parse_device(args.device)
    result = compare_models(args.models, args.data, args.tokens, args.seq_len, args.batch_size, device, args.tokenizer)
    if args.plot:
        result["plot"] = str(plot_compare(result, Path(args.plot)))
    header = (f"{'model':<36} {'params':>12} {'mode':>6} {'alpha':>5} {'final':>7} {'gap':>8} {'stages':<32} "
              f"{'Log-OP':>7}  modes")
    lines = [header]
    for r in result["models"]:
        stages = " ".join(f"{b:.4f}" for b in r["stage_bpb"])
        lines.append(f"{r['model'][-36:]:<36} {r['params']:>12,} {r['poe_mode']:>6} {r['poe_alpha']:>5g} "
                     f"{r['bpb']:>7.4f} {r['gap_pct']:>+7.2f}% {stages:<32} {r['logop']:>7.4f}  {', '.join(r['modes'])}")
    lines.append(f"gap: final bpb vs {result['gap_reference']} (positive = worse than it)")
    if result["note"]:
        lines.append(f"note: {result['note']}")
    with_threads(args, result, lines)
    emit(args, result, "\n".join(lines))
    return 0


def compare_on_tasks(args: argparse.Namespace) -> int:
    """`poelm compare BP POE --tasks T1,T2`: points per task and their difference, table and PNG."""
    from poelm.experiment.compare import compare_tasks, task_compare_table
    from poelm.plots import plot_task_compare

    tasks, manager = checked_tasks(args, args.models)
    result = compare_tasks(args.models, tasks, args.include_path, args.limit, args.device, args.batch_size, manager)
    result["plot"] = str(plot_task_compare(result, Path(args.plot or "compare_tasks.png")))
    emit(args, result, task_compare_table(result) + f"\nplot: {result['plot']}")
    return 0
