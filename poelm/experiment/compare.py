"""`poelm compare`: several models side by side on the same validation data (bpb of the final
readout, every stage and the Log-OP; α; the gap of the final bpb to the first BP model (else the
first model), positive = worse; the PoE modes each supports), as a table, JSON and PNG.

    poelm compare runs/exp/arms/bp runs/exp/arms/poe --data data/default
"""

from __future__ import annotations

import json
from pathlib import Path

from poelm.checkpoint import resolve_run_dir

# -----------------------------------------------------------------------------
# compare


def compare_models(specs: list[str], data: str, tokens: int | None = None, seq_len: int | None = None,
                   batch_size: int = 8, device: str = "cpu", tokenizer_dir: str | None = None) -> dict:
    """bpb (final / per stage / Log-OP), parameters and supported modes of several models on
    the same validation documents (tokens None: the device's default budget)."""
    from poelm.checkpoint import load_model
    from poelm.dataloader import default_eval_tokens, val_batches
    from poelm.evaluate import evaluate_bpb

    rows, vocabs = [], set()
    for spec in specs:
        model, tok = load_model(spec, device=device, tokenizer_dir=tokenizer_dir)
        if tok is None:
            raise ValueError(f"{spec} has no tokenizer: pass --tokenizer DIR (bpb needs token_bytes.pt)")
        T = seq_len or min(model.config.sequence_len, 1024)
        if T > model.config.sequence_len:
            raise ValueError(f"--seq-len {T} is longer than {spec}'s context of {model.config.sequence_len} tokens; "
                             f"use --seq-len {model.config.sequence_len} or less")
        batches = val_batches(data, tok, batch_size, T, tokens, device=device)
        r = evaluate_bpb(model, batches, tok.token_bytes())
        vocabs.add(json.dumps(tok.to_json(), sort_keys=True))
        rows.append({"model": spec, "params": model.num_params(), "poe_mode": model.config.poe_mode,
                     "poe_alpha": model.config.poe_alpha, "stages": list(model.config.poe_stage_layers), "bpb": r["bpb"], "stage_bpb": r["stages"],
                     "logop": r["logop"], "tokens": r["tokens"], "modes": supported_modes(model, spec)})
    reference = gap_reference(rows)
    for r in rows:
        r["gap_pct"] = 100 * (r["bpb"] / reference["bpb"] - 1)
    note = None
    if len(vocabs) > 1:
        note = ("the models use different tokenizers: bpb is still comparable (it is normalised by bytes), "
                "token-level metrics such as perplexity or top-1 agreement are not")
    return {"models": rows, "gap_reference": reference["model"], "data": data, "tokens_budget": default_eval_tokens(device) if tokens is None else tokens, "note": note}


def gap_reference(rows: list[dict]) -> dict:
    """The row every gap is measured against: the first BP model (poe_mode none), else the first model."""
    return next((r for r in rows if r["poe_mode"] == "none"), rows[0])


def supported_modes(model, spec: str) -> list[str]:
    """The decoding modes the registry accepts for `model` (default options), a mode that needs a
    calibration marked where `spec` has none."""
    from poelm.engine import MODES, DecodeOptions, ModeRefused, capabilities, load_calibration, validate_options

    path = (resolve_run_dir(Path(spec)) or Path(spec)) if Path(spec).is_dir() else None
    calibrated = path is not None and load_calibration(path) is not None
    modes = []
    for mode in MODES:
        try:
            validate_options(DecodeOptions(mode=mode), model)
        except ModeRefused:
            continue
        modes.append(mode if calibrated or not capabilities(mode).needs_calibration else f"{mode} (needs `poelm calibrate`)")
    return modes


# -----------------------------------------------------------------------------
# compare on downstream tasks


def compare_tasks(specs: list[str], tasks: list[str], include_path: str | None = None, limit: int | None = None,
                  device: str = "cpu", batch_size: int = 8, manager=None) -> dict:
    """The paper's table of downstream tasks: each model's final readout per task (its primary
    metric, in points), the last model minus the first, and every readout of each model beside
    (poelm.downstream.evaluate_tasks)."""
    from poelm.downstream import evaluate_tasks, task_manager

    manager = manager or task_manager(tasks, include_path)
    runs = [evaluate_tasks(spec, tasks, include_path, limit, device, batch_size, manager=manager) for spec in specs]
    rows = []
    for task in tasks:
        metric = runs[0]["primary"][task]
        points = [100 * run["tasks"][task]["final"].get(metric, float("nan")) for run in runs]
        rows.append({"task": task, "metric": metric, "points": points, "difference": points[-1] - points[0]})
    return {"models": [str(s) for s in specs], "rows": rows, "runs": runs}


def task_compare_table(result: dict) -> str:
    names = [Path(m).name[-14:] for m in result["models"]]
    lines = [f"{'task':<24} {'metric':<12} " + " ".join(f"{n:>14}" for n in names) + f" {'difference':>11}"]
    for row in result["rows"]:
        lines.append(f"{row['task']:<24} {str(row['metric']):<12} " + " ".join(f"{p:>14.2f}" for p in row["points"])
                     + f" {row['difference']:>+11.2f}")
    lines.append(f"(points = 100 x the metric of the final readout; difference = {names[-1]} - {names[0]})")
    return "\n".join(lines)
