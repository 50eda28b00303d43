"""`poelm specialist attach|save-delta`: a specialist's new layers on a frozen PoE base, and
its delta file (the library: poelm/specialist.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from poelm.cli.common import CliError, emit


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


def cmd_specialist_attach(args: argparse.Namespace) -> int:
    from poelm.checkpoint import check_replaceable, load_model, save_model
    from poelm.runtime import parse_device
    from poelm.specialist import (attach, base_content_hash, lineage, load_delta, trainable_parameters,
                                  write_lineage)

    if args.layers < 1:
        raise CliError(f"--layers {args.layers}: a specialist needs at least 1 new layer")
    check_replaceable(args.out, sources=(args.model, args.delta), overwrite=args.overwrite)
    base, tokenizer = load_model(args.model, device=parse_device(args.device))
    base_hash = base_content_hash(base)
    parent = load_delta(base, args.delta, base_hash) if args.delta else base
    model = attach(parent, args.layers, force=args.force)
    save_model(model, args.out, tokenizer, overwrite=args.overwrite)
    write_lineage(args.out, lineage(args.model, base_hash, args.delta))
    params = sum(p.numel() for p in trainable_parameters(model).values())
    result = {"out": args.out, "frozen_layers": model.config.frozen_layers, "new_layers": args.layers,
              "trainable_params": params, "base_hash": base_hash}
    emit(args, result, f"specialist: {args.layers} new layers on {model.config.frozen_layers} frozen, "
                       f"{params:,} trainable parameters -> {args.out}")
    return 0


def cmd_specialist_save_delta(args: argparse.Namespace) -> int:
    from poelm.checkpoint import load_model, resolve_run_dir
    from poelm.specialist import (LINEAGE_NAME, base_content_hash, check_delta_out, delta_size, find_lineage, lineage,
                                  save_delta)

    model, _ = load_model(args.model)
    if not model.config.is_specialist():
        raise CliError(f"{args.model} is not a specialist (frozen_layers=0); attach one with `poelm specialist attach`")
    run = Path(args.model)
    info = find_lineage(resolve_run_dir(run) if run.is_dir() else None, run if run.is_dir() else None)
    if args.base is not None:
        info = lineage(args.base, base_content_hash(load_model(args.base)[0]), info and info.get("parent"))
    if info is None:
        raise CliError(f"{args.model} has no {LINEAGE_NAME} naming its base: pass --base BASE")
    check_delta_out(args.out, sources=(args.model,), overwrite=args.overwrite)
    save_delta(model, args.out, info["base"], info["base_hash"], info.get("parent"), overwrite=args.overwrite)
    n, size = delta_size(model)
    emit(args, {"out": args.out, "tensors": n, "bytes": size, "base": info["base"], "base_hash": info["base_hash"]},
         f"delta: {n} tensors, {size / 2 ** 20:.1f} MiB (bf16) -> {args.out}")
    return 0
