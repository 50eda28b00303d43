"""`poelm generate` and `poelm calibrate`: the engine's subcommands (registered by poelm/cli.py).

    poelm generate runs/tiny "To be, or not to be" --max-new-tokens 64
    poelm generate runs/tiny "To be" --mode speculative --draft-stage 0 --gamma 4 --json
    poelm generate runs/tiny "To be" --mode stage --stage 0          # prefix pruning
    poelm generate runs/tiny "To be" --mode logop --stages 0,3
    poelm calibrate runs/tiny --data data/default                   # WAND bounds -> generation_config.json
    poelm generate runs/tiny "To be" --mode wand --wand-factor 1.0
    poelm generate tiny "1 2 3"                                      # a preset has no tokenizer: ids

Without --json the text streams to stdout and the stats go to stderr; with --json one object
{text, tokens (the new ids), stats} is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from poelm.engine import MODES, Engine, calibrate, load_calibration, save_calibration


def model_dir(spec: str) -> Path | None:
    """The directory that holds MODEL's config.json (a run dir resolves to its latest checkpoint)."""
    from poelm.checkpoint import CONFIG_NAME, resolve_run_dir

    path = Path(spec)
    if not path.is_dir():
        return None
    run = resolve_run_dir(path)
    path = run if run is not None else path
    return path if (path / CONFIG_NAME).exists() or any(path.glob("model_*.pt")) else None


def parse_prompt(prompt: str, tokenizer) -> str | list[int]:
    if tokenizer is not None:
        return prompt
    try:
        ids = [int(t) for t in prompt.split()]
    except ValueError:
        raise ValueError("this model has no tokenizer: give the prompt as space-separated token ids, e.g. \"1 2 3\"") from None
    if not ids:
        raise ValueError("empty prompt: give at least one token id")
    return ids


def parse_stages(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--stages must be a comma list of stage indices like 0,3, got {text!r}") from None


def load(args):
    from poelm.checkpoint import load_model

    return load_model(args.model, device=args.device)


# -----------------------------------------------------------------------------
# generate


def cmd_generate(args: argparse.Namespace) -> int:
    model, tokenizer = load(args)
    calib = None
    if args.mode == "wand":
        directory = model_dir(args.model)
        calib = load_calibration(directory) if directory is not None else None
        if calib is None:
            raise ValueError(f"WAND needs calibrated swing bounds and {args.model} has none: "
                             f"run `poelm calibrate {args.model} --data DIR` first")
    engine = Engine(model, tokenizer, calibration=calib)
    options = dict(mode=args.mode, stage=args.stage, stages=parse_stages(args.stages), draft_stage=args.draft_stage,
                   gamma=args.gamma, wand_factor=args.wand_factor, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   repetition_penalty=args.repetition_penalty, seed=args.seed, force=args.force)
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


def format_stats(stats: dict) -> str:
    parts = []
    for k, v in stats.items():
        if v is None:
            continue
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


# -----------------------------------------------------------------------------
# calibrate


def cmd_calibrate(args: argparse.Namespace) -> int:
    from poelm.dataloader import val_batches

    model, tokenizer = load(args)
    if tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer: calibration reads text from --data and needs one")
    if args.tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    seq_len = min(model.config.sequence_len, args.tokens)
    batch_size = max(1, min(8, args.tokens // seq_len))
    batches = val_batches(args.data, tokenizer, batch_size, seq_len, args.tokens, device=args.device)
    calib = calibrate(model, batches, quantile=args.quantile, force=args.force)
    directory = model_dir(args.model)
    saved = str(save_calibration(directory, calib)) if directory is not None else None
    result = dict(calib, saved_to=saved)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        bounds = ", ".join(f"{b:.3f}" for b in calib["wand_bounds"])
        where = f"saved to {saved}" if saved else f"not saved: {args.model} is not a model directory"
        print(f"WAND bounds (p{100 * args.quantile:g} over {calib['wand_calibration_tokens']:,} tokens): [{bounds}]; {where}")
    return 0


# -----------------------------------------------------------------------------
# registration


def _nonneg_float(text: str) -> float:
    value = float(text)
    if math.isnan(value):
        raise argparse.ArgumentTypeError("must be a number")
    return value


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text: final, stage, logop, wand or speculative decoding",
                              description="Generate a continuation of PROMPT with MODEL.")
    p.add_argument("model", help="preset, model directory, nanochat checkpoint dir, training run or hub id")
    p.add_argument("prompt", help="prompt text (space-separated token ids when the model has no tokenizer)")
    p.add_argument("--mode", choices=MODES, default="final", help="readout / decoding mode (default final)")
    p.add_argument("--stage", type=int, default=None, help="--mode stage: read out at this stage (default 0)")
    p.add_argument("--stages", default=None, help="--mode logop: comma list of stages (default all)")
    p.add_argument("--draft-stage", type=int, default=0, help="--mode speculative: the drafting stage (default 0)")
    p.add_argument("--gamma", type=int, default=4, help="--mode speculative: drafted tokens per verify pass")
    p.add_argument("--wand-factor", type=_nonneg_float, default=1.0, help="--mode wand: exit factor F (inf = full depth)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--force", action="store_true", help="allow PoE modes on a BP model (research)")
    p.add_argument("--json", action="store_true", help="print {text, tokens, stats} as JSON")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_generate)

    p = subparsers.add_parser("calibrate", help="calibrate WAND swing bounds and store them with the model",
                              description="Compute the per-stage WAND swing bounds on validation text and write "
                                          "them into MODEL's generation_config.json.")
    p.add_argument("model")
    p.add_argument("--data", required=True, help="corpus directory (parquet shards; the validation split is read)")
    p.add_argument("--tokens", type=int, default=65536, help="calibration tokens (default 65,536)")
    p.add_argument("--quantile", type=float, default=0.99, help="quantile of the per-token swings (default 0.99)")
    p.add_argument("--force", action="store_true", help="allow calibrating a BP model (research)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_calibrate)
