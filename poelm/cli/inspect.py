"""`poelm inspect MODEL`: tensors, parameters and stages of a preset or model, read from its
config alone (no weights are loaded)."""

from __future__ import annotations

import argparse
from pathlib import Path

from poelm.cli.common import emit


def inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="preset name or MODEL")


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


def cmd_inspect(args: argparse.Namespace) -> int:
    import torch
    from poelm.checkpoint import CONFIG_NAME, load_model, read_config_json, resolve_run_dir
    from poelm.model import GPT
    from poelm.presets import PRESETS, get_preset

    name, path = args.model, Path(args.model)
    if name in PRESETS and not path.exists():
        config = get_preset(name)
    else:  # read only the config: no weights are loaded
        if path.is_dir() and resolve_run_dir(path) is not None:
            path = resolve_run_dir(path)
        cfg_file = path / CONFIG_NAME
        if cfg_file.exists():
            config = read_config_json(cfg_file)
        else:
            config = load_model(name)[0].config
    with torch.device("meta"):
        model = GPT(config)
    summary = model_summary(model)
    emit(args, summary, "\n".join(f"{k:>20}: {v}" for k, v in summary.items()))
    return 0
