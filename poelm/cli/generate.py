"""`poelm generate MODEL PROMPT` (every decoding mode, --chat for one chat turn, --compose for
sibling specialists) and `poelm calibrate MODEL --data DIR` (WAND's swing bounds). The
decoding flags are shared with `poelm chat` (poelm/cli/chat.py)."""

from __future__ import annotations

import argparse
import json
import sys

from poelm.cli.common import (CliError, chat_stop_ids, decode_kwargs, decode_options, decode_prompt, emit, load_engine,
                              parse_compose, parse_prompt, python_only_options, val_progress, with_threads)
from poelm.flags import add_setting_flags, at_least, finite_float


def decoding_arguments(p: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    """The decoding flags of generate and chat: one per DecodeOptions field (poelm/engine/options.py
    declares each, with its help), then the model and device flags."""
    from poelm.engine.options import DecodeOptions
    from poelm.engine.registry import option_choices
    from poelm.model import HEAD_MODES

    add_setting_flags(p.add_argument_group("decoding (DecodeOptions)"), DecodeOptions, exclude=python_only_options(),
                      choices=option_choices())
    p.set_defaults(max_new_tokens=max_new_tokens)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="every mode: decode with static-shape compiled steps (plain step, WAND's per-stage "
                        "segments, one speculative pass); faster at small batch, the first call compiles for "
                        "~10-20 s")
    p.add_argument("--delta", default=None, help="specialist delta directory to load onto MODEL (its base)")
    p.add_argument("--head-mode", choices=HEAD_MODES, default=None,
                   help="specialist readout: dual = both heads, base = lm_head, spec = lm_head_stage "
                        "(default: the model's own, dual)")
    p.add_argument("--compose", default=None, metavar="DELTA1,DELTA2",
                   help="sibling deltas on MODEL: decode from the Log-OP of their readouts (uncached)")


def generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="MODEL")
    p.add_argument("prompt", help="prompt text (space-separated token ids when the model has no tokenizer)")
    p.add_argument("--chat", action="store_true",
                   help="render the prompt as one user turn of the chat format and stop at <|assistant_end|>")
    decoding_arguments(p)


def calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="MODEL (a directory: the bounds are written into it)")
    p.add_argument("--data", required=True, help="corpus directory (parquet shards; the validation split is read)")
    p.add_argument("--tokens", type=at_least(1), default=65536, help="calibration tokens")
    p.add_argument("--quantile", type=finite_float, default=0.99, help="quantile of the per-token swings")
    p.add_argument("--force", action="store_true", help="allow calibrating a BP model (research)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")


def format_stats(stats: dict) -> str:
    """key=value of the stats, then a line saying when the CPU was contended (poelm.contention)."""
    parts = []
    for k, v in stats.items():
        if v is not None and k != "contended":
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    text = " ".join(parts)
    if stats.get("contended"):
        text += (f"\npoelm: warning: {stats['contended']}: other processes share these cores, so tokens/s is "
                 "below this machine's; pass a smaller --threads or measure on a quiet machine")
    return text


def cmd_generate(args: argparse.Namespace) -> int:
    if args.compose:
        return generate_compose(args)
    engine = load_engine(args)
    tokenizer = engine.tokenizer
    options = decode_kwargs(args)
    if args.chat:
        from poelm.chat import render_prompt

        options.setdefault("stop_token_ids", chat_stop_ids(tokenizer, args.model))
        prompt = render_prompt(tokenizer, [{"role": "user", "content": decode_prompt(args.prompt)}])
    else:
        prompt = parse_prompt(args.prompt, tokenizer)
    decode_options(engine, options)
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


def generate_compose(args: argparse.Namespace) -> int:
    """`poelm generate BASE --compose D1,D2 PROMPT`: plain decoding from the Log-OP."""
    from poelm.checkpoint import load_model
    from poelm.runtime import parse_device
    from poelm.specialist import compose, generate_composed

    if args.mode != "final":
        raise CliError(f"--compose decodes the Log-OP of the branches' final readouts; --mode {args.mode} is not "
                       "available with it")
    dirs = parse_compose(args.compose)
    base, tokenizer = load_model(args.model, device=parse_device(args.device))
    comp = compose(base, dirs)
    prompt = parse_prompt(args.prompt, tokenizer)
    ids = tokenizer.encode(prompt, prepend_bos=True) if isinstance(prompt, str) else prompt
    stop = tokenizer.encode_special("<|assistant_end|>") if tokenizer is not None else None
    out = generate_composed(comp, ids, args.max_new_tokens, args.temperature, stop, args.seed)
    if args.json or tokenizer is None:
        print(json.dumps({"tokens": out}) if args.json else " ".join(map(str, out)))
    else:
        print(tokenizer.decode(out))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from poelm.checkpoint import load_model, model_dir
    from poelm.dataloader import val_batches
    from poelm.engine import calibrate, load_calibration, save_calibration
    from poelm.runtime import parse_device

    device = parse_device(args.device)
    model, tokenizer = load_model(args.model, device=device)
    if tokenizer is None:
        raise CliError(f"{args.model} has no tokenizer: calibration reads text from --data and needs one")
    seq_len = min(model.config.sequence_len, args.tokens)
    batch_size = max(1, min(8, args.tokens // seq_len))
    batches = val_progress(args, val_batches(args.data, tokenizer, batch_size, seq_len, args.tokens, device=device),
                           "calibrate", batch_size, seq_len, args.tokens, device)
    calib = calibrate(model, batches, quantile=args.quantile, force=args.force)
    directory = model_dir(args.model)
    old = load_calibration(directory) if directory is not None else None
    saved = str(save_calibration(directory, calib)) if directory is not None else None
    result = dict(calib, saved_to=saved, replaced=old["wand_bounds"] if old else None)
    bounds = ", ".join(f"{b:.3f}" for b in calib["wand_bounds"])
    where = f"saved to {saved}" if saved else f"not saved: {args.model} is not a model directory"
    lines = [f"WAND bounds (p{100 * args.quantile:g} over {calib['wand_calibration_tokens']:,} tokens): "
             f"[{bounds}]; {where}"]
    if old and saved:
        was = ", ".join(f"{b:.3f}" for b in old["wand_bounds"])
        lines.append(f"replaced the earlier bounds [{was}] (p{100 * old.get('wand_quantile', 0):g} over "
                     f"{old.get('wand_calibration_tokens', 0):,} tokens)")
    with_threads(args, result, lines)
    emit(args, result, "\n".join(lines))
    return 0
