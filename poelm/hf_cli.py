"""`poelm export`: write MODEL as a Hugging Face directory (registered by poelm/cli.py).

    poelm export runs/tiny --out out/tiny-hf                  # bf16 weights, like the releases
    poelm export runs/tiny --out out/tiny-hf --dtype fp32
    poelm export tiny --tokenizer data/tokenizer --out out/x   # a preset needs a tokenizer dir

The result loads with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`,
`AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)` and as MODEL in every poelm
command. See poelm/export.py for the files.
"""

from __future__ import annotations

import argparse
import sys


def cmd_export(args) -> int:
    from poelm.checkpoint import load_model
    from poelm.cli import emit, parse_dtype
    from poelm.export import export_model, source_generation_config

    dtype = parse_dtype(args.dtype)
    model, tokenizer = load_model(args.model, tokenizer_dir=args.tokenizer)
    if tokenizer is None:
        print(f"poelm: warning: {args.model} has no tokenizer (pass --tokenizer DIR); the export will have no "
              "tokenizer files and AutoTokenizer will not load it", file=sys.stderr)
    out = export_model(model, tokenizer, args.out, dtype=dtype, generation_config=source_generation_config(args.model),
                       sources=(args.model, args.tokenizer), overwrite=args.overwrite)
    files = sorted(p.name for p in out.iterdir())
    result = {"out": str(out), "dtype": str(dtype).replace("torch.", ""), "files": files,
              "tensors": len(model.state_dict()), "params": model.num_params(),
              "tokenizer": tokenizer is not None}
    emit(args, result, f"exported {args.model} to {out} ({result['dtype']}, {len(files)} files)")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write MODEL as a Hugging Face directory (transformers + poelm load it)")
    p.add_argument("model", help="MODEL: preset, model directory, nanochat checkpoint dir, training run or hub id")
    p.add_argument("--out", required=True, help="output directory (replaced atomically; an existing one only if it "
                   "is a previous poelm export, or with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out that is not a poelm export")
    p.add_argument("--dtype", default="bf16", help="weight dtype: bf16 (default, as the releases) or fp32")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory when MODEL has none")
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")
    p.set_defaults(func=cmd_export)
