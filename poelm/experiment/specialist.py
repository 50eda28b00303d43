"""The experiment's specialist stage (docs/poe.md §7): attach a small specialist to the trained PoE
arm, train it with `poelm sft` (the same trainer) on the *recall* chat set for a few CPU
minutes, save its delta, and report accuracy and bits per assistant token beside the base's,
the base's Δlogit (exactly 0) and the delta's size and tensor count.

    results["specialist"] = run_specialist(cfg, say)   # None when the preset has no specialist stage
"""

from __future__ import annotations

from pathlib import Path

from poelm.experiment.config import ExperimentConfig


def specialist_train_config(cfg: ExperimentConfig):
    """(TrainConfig, SftSettings) of the specialist stage: the experiment's training settings
    (ArmTraining's fields, as every arm takes them) but the batch, horizon and schedule of the
    stage, SFT from the PoE arm's weights in out/specialist, on one process (SFT trains no
    stage-parallel run), resumed when it has a checkpoint."""
    from poelm.sft import SftSettings
    from poelm.train import TrainConfig

    rows = cfg.specialist_batch_rows
    row_len = min(cfg.specialist_row_len, cfg.model_config("flat", 0.0).sequence_len)
    steps = cfg.specialist_steps
    stage = dict(total_batch_size=rows * row_len, device_batch_size=rows, num_iterations=steps,
                 eval_every=max(1, steps // 4), save_every=max(1, steps // 2), warmup_steps=min(10, steps // 10),
                 stage_parallel=False, extend_to=None)
    tc = TrainConfig(init=str(Path(cfg.out) / "arms" / "poe"), data=cfg.specialist_data,
                     out=str(Path(cfg.out) / "specialist"), resume=True, **{**cfg.training(), **stage})
    return tc, SftSettings(attach_layers=cfg.specialist_layers, row_len=row_len,
                           eval_prompts=cfg.specialist_eval_prompts)


def run_specialist(cfg: ExperimentConfig, say) -> dict | None:
    """Train (or resume, or skip when finished) the specialist; returns its summary."""
    if cfg.specialist_steps <= 0 or "poe" not in cfg.arms:
        return None
    from poelm.chatdata import MANIFEST, build_chat_data
    from poelm.checkpoint import load_model
    from poelm.jsonfile import read_json_object
    from poelm.plots import read_metrics
    from poelm.rundir import RESULT_NAME
    from poelm.sft import SftTask
    from poelm.specialist import DELTA_META, delta_size, find_lineage, save_delta, trainable_parameters
    from poelm.train import train

    if not (Path(cfg.specialist_data) / MANIFEST).is_file():
        say(f"building the recall chat set into {cfg.specialist_data} ...")
        build_chat_data("recall", cfg.specialist_data)
    tc, sft = specialist_train_config(cfg)
    out = Path(tc.out)
    done = out / RESULT_NAME
    if done.exists():
        say("[specialist] finished earlier: skipped")
        result = read_json_object(done, "the specialist's result")
    else:
        say(f"[specialist] {cfg.specialist_layers} new layer(s) on the PoE arm, {cfg.specialist_steps} SFT steps "
            f"on {cfg.specialist_data} -> {out}")
        result = train(tc, SftTask(sft))
    evals = read_metrics(out)[1]
    model, _ = load_model(out)
    delta_dir = out / "delta"
    if not (delta_dir / DELTA_META).exists():
        info = find_lineage(out)
        save_delta(model, delta_dir, info["base"], info["base_hash"])
    tensors, size = delta_size(model)
    last = result["eval"]
    return {"layers": cfg.specialist_layers, "steps": result["step"], "data": cfg.specialist_data,
            "specialist": {k: last[k] for k in ("assistant_bits", "exact_match", "exact_match_n") if k in last},
            "base": last.get("base"), "base_delta_logit": result.get("base_delta_logit"),
            "delta_tensors": tensors, "delta_bytes": size, "train_seconds": result["train_seconds"],
            "trainable_params": sum(p.numel() for p in trainable_parameters(model).values()),
            "curve": [{"step": r["step"], "assistant_bits": r["assistant_bits"],
                       "exact_match": r.get("exact_match")} for r in evals]}


def specialist_report(s: dict) -> list[str]:
    """report.md lines of the specialist stage."""
    base, spec = s.get("base") or {}, s["specialist"]
    acc = lambda r: f"{100 * r['exact_match']:.1f} % of {r['exact_match_n']}" if "exact_match" in r else "—"  # noqa: E731
    lines = ["## A post-hoc specialist on the frozen PoE base", "",
             f"{s['layers']} new layer(s) + a zero-initialised specialist head attached to the PoE arm, trained "
             f"{s['steps']} SFT steps ({s['train_seconds'] / 60:.1f} min) on `{s['data']}` (recall: \"Recite John "
             "3:16.\" -> the verse), loss on assistant tokens only; every base tensor frozen.", "",
             "| model | held-out bits per assistant token | exact match of greedy answers |", "|---|---|---|"]
    if base:
        lines.append(f"| base (PoE arm) | {base['assistant_bits']:.4f} | {acc(base)} |")
    lines.append(f"| base + specialist | {spec['assistant_bits']:.4f} | {acc(spec)} |")
    delta = s.get("base_delta_logit")
    lines += ["", f"Base preservation: max |Δlogit| of the base prefix + base head after SFT = "
                  f"{'n/a' if delta is None else f'{delta:.4f}'} (must be 0: the base's predictions are untouched). "
                  f"Delta: {s['delta_tensors']} tensors, {s['delta_bytes'] / 2 ** 20:.2f} MiB in bf16 "
                  f"({s['trainable_params']:,} trainable parameters). Bits per assistant token, not bits per byte "
                  "(what the released stage cards report).", ""]
    return lines
