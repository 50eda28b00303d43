"""`poelm export MODEL --out DIR`: MODEL as a Hugging Face directory (transformers and poelm
load it), optionally cut to its first K stages."""

from __future__ import annotations

import argparse
import sys

from poelm.cli.common import emit
from poelm.flags import at_least


def export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="MODEL")
    p.add_argument("--out", required=True, help="output directory (replaced atomically; an existing one only if it "
                   "is a previous poelm export, or with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a poelm export")
    p.add_argument("--dtype", default="bf16", help="weight dtype: bf16 (as the releases), fp32, fp16 or torch's names")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: MODEL's own)")
    p.add_argument("--stages", type=at_least(1), default=None, help="elastic depth: write a standalone model of "
                   "the first K stages (its logits are stage K-1's readout of MODEL)")


def cmd_export(args: argparse.Namespace) -> int:
    from poelm.checkpoint import load_model
    from poelm.export import export_model, source_generation_config
    from poelm.runtime import parse_dtype

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
