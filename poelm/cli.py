"""The `poelm` command line.

    poelm inspect poe-1.3b --json
    poelm data build --source default --out data/default
    poelm tokenizer train --data data/default --vocab-size 4096 --out data/tokenizer
    poelm train --data data/default --tokenizer data/tokenizer --out runs/tiny --depth 4
    poelm eval runs/tiny --data data/default --json
    poelm generate runs/tiny "To be, or not to be"

MODEL is anything `poelm.checkpoint.load_model` takes: a preset, a model directory, a
nanochat checkpoint directory, a `poelm train --out` directory or a hub id. Every command
has --help and --json. Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

# Modules that add their own subcommands through add_commands(subparsers).
COMMAND_MODULES = ("poelm.train", "poelm.engine_cli", "poelm.hf_cli", "poelm.experiment")


class CliError(Exception):
    """An error to show the user as one line."""


def emit(args: argparse.Namespace, result: dict, text: str | None = None) -> None:
    """Print `result` as JSON with --json, else the human text (or pretty JSON)."""
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    else:
        print(text if text is not None else json.dumps(result, indent=2, default=str))


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")


def parse_dtype(name: str):
    import torch

    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise CliError(f"unknown dtype {name!r}; use fp32 or bf16")
    return table[name]


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


def cmd_inspect(args) -> int:
    import torch
    from poelm.checkpoint import CONFIG_NAME, build_model, config_from_json, resolve_run_dir
    from poelm.presets import PRESETS, get_preset

    name, path = args.model, Path(args.model)
    if name in PRESETS and not path.exists():
        config = get_preset(name)
    else:  # read only the config: no weights are loaded
        if path.is_dir() and resolve_run_dir(path) is not None:
            path = resolve_run_dir(path)
        cfg_file = path / CONFIG_NAME
        if cfg_file.exists():
            config = config_from_json(json.loads(cfg_file.read_text()))
        else:
            from poelm.checkpoint import load_model
            model, _ = load_model(name)
            config = model.config
    with torch.device("meta"):
        from poelm.model import GPT
        model = GPT(config)
    summary = model_summary(model)
    text = "\n".join(f"{k:>20}: {v}" for k, v in summary.items())
    emit(args, summary, text)
    return 0


# -----------------------------------------------------------------------------
# data / tokenizer


def cmd_data_build(args) -> int:
    from poelm import corpus

    stats = corpus.build_corpus(args.source, args.out)
    emit(args, stats, f"corpus written to {args.out}: {json.dumps(stats, default=str)}")
    return 0


def cmd_data_climbmix(args) -> int:
    from poelm import corpus

    kw = {"base_url": args.base_url} if args.base_url else {}
    stats = corpus.download_climbmix(args.shards, args.out, **kw)
    emit(args, stats if isinstance(stats, dict) else {"out": args.out}, f"ClimbMix shards in {args.out}")
    return 0


def cmd_tokenizer_train(args) -> int:
    import time
    from poelm import corpus
    from poelm.tokenizer import Tokenizer

    train_files, _ = corpus.list_shards(args.data)
    texts = corpus.iter_documents(train_files)
    if args.max_chars:
        texts = _cap_chars(texts, args.max_chars)
    t0 = time.time()
    tok = Tokenizer.train(texts, args.vocab_size)
    tok.save(args.out)
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


def cmd_eval(args) -> int:
    from poelm.checkpoint import load_model
    from poelm.dataloader import val_batches
    from poelm.evaluate import evaluate_bpb

    model, tokenizer = load_model(args.model, device=args.device, tokenizer_dir=args.tokenizer)
    if tokenizer is None:
        raise CliError(f"{args.model} has no tokenizer: pass --tokenizer DIR (bpb needs token_bytes.pt)")
    T = args.seq_len or model.config.sequence_len

    def batches():
        return val_batches(args.data, tokenizer, args.batch_size, T, args.tokens, device=args.device)

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
# parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poelm", description="Product-of-Experts language models: train, evaluate, "
                                     "compare and serve PoE models and their backprop controls.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="tensors, parameters and stages of a preset or model")
    p.add_argument("model", help="preset name or MODEL")
    add_json(p)
    p.set_defaults(func=cmd_inspect)

    data = sub.add_parser("data", help="build corpora (parquet shards with a text column)")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    p = data_sub.add_parser("build", help="build a corpus from the default texts or a folder of txt/jsonl/parquet")
    p.add_argument("--source", default="default", help="'default' (Shakespeare, Milton, King James) or a PATH")
    p.add_argument("--out", default="data/default", help="output directory of shards")
    add_json(p)
    p.set_defaults(func=cmd_data_build)
    p = data_sub.add_parser("climbmix", help="download ClimbMix shards (needs a network)")
    p.add_argument("--shards", type=int, required=True, help="number of training shards")
    p.add_argument("--out", default="data/climbmix")
    p.add_argument("--base-url", default=None, help="mirror URL of the shard files")
    add_json(p)
    p.set_defaults(func=cmd_data_climbmix)

    tok = sub.add_parser("tokenizer", help="train the byte-level BPE tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    p = tok_sub.add_parser("train", help="train a tokenizer on a corpus directory")
    p.add_argument("--data", required=True, help="corpus directory (parquet shards)")
    p.add_argument("--vocab-size", type=int, default=32768)
    p.add_argument("--max-chars", type=int, default=2_000_000_000, help="train on at most this many characters")
    p.add_argument("--out", required=True)
    add_json(p)
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("eval", help="bits per byte of the final readout, every stage and the Log-OP")
    p.add_argument("model", help="MODEL")
    p.add_argument("--data", required=True, help="corpus directory (its last shard is validation)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory when MODEL has none")
    p.add_argument("--tokens", type=int, default=None, help="validation token budget (default: 80 x 2^19 on CUDA, "
                   "2^16 on CPU; capped at the validation split)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backout-both", action="store_true", help="PoE: also report the final bpb with the other backout setting")
    add_json(p)
    p.set_defaults(func=cmd_eval)

    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except (CliError, ValueError, OSError, KeyError) as e:
        msg = str(e).strip().strip("'\"").splitlines()
        print(f"poelm: error: {msg[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("poelm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
