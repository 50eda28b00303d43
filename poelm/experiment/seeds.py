"""Seeds with error bars: `poelm experiment --seeds N` trains every arm N times (seed, seed+1,
...); this module lays out the extra seeds' runs, and summarises all of them: mean ± std of every
final bpb (final readout, each stage, Log-OP) and of each PoE arm's gap to BP, the gap's per-step
band, and whether the BP-vs-PoE and α orderings exceed the seed noise.

    out/arms/ARM                      the first seed (the experiment's own layout)
    out/seeds/seedS/arms/ARM          seed S = seed + 1, seed + 2, ...

An ordering exceeds the seed noise when the mean of its per-seed (paired) difference is more
than two standard errors from zero; with one seed there is no noise estimate.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

from poelm.experiment.config import trajectory_settings

# The seed noise of each preset, measured by a multi-seed run (scripts/record_seed_noise.py writes
# it); a one-seed run of the same settings (`make demo`) states it in its report.
MEASURED_NOISE = Path(__file__).with_name("seed_noise.json")

GAP_ARMS = {"poe": "PoE α=0", "poe_a05": "PoE α=0.5"}


def extra_seed_configs(cfg) -> list:
    """The ExperimentConfig of each seed after the first (same settings, its own seed and out)."""
    return [dataclasses.replace(cfg, seed=cfg.seed + i, out=str(Path(cfg.out) / "seeds" / f"seed{cfg.seed + i}"))
            for i in range(1, cfg.seeds)]


def mean_std(values: list[float]) -> dict:
    """{"mean", "std" (sample; 0 for one value), "n", "values"}."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def bpb_at(evals: dict[str, list[dict]], arm: str, step: int) -> float:
    """The final-readout bpb of `arm` at its eval of `step` (the experiments eval every arm there)."""
    for e in evals[arm]:
        if e["step"] == step:
            return e["bpb"]
    raise LookupError(f"{arm} has no eval at step {step}")


def final_gap_pct(evals: dict[str, list[dict]], arm: str) -> float:
    """The gap (%) of `arm` to BP at `arm`'s last eval step: an arm stopped early (the α=0.5 arm
    stops at 53 % of the schedule) is compared with BP at the step it stopped at, not at BP's end."""
    step = evals[arm][-1]["step"]
    return 100 * (evals[arm][-1]["bpb"] / bpb_at(evals, "bp", step) - 1)


def ordering(diffs: list[float], better: str, worse: str) -> dict:
    """Whether `better` beats `worse` beyond the seed noise, from per-seed differences (worse - better)."""
    stats = mean_std(diffs)
    n = stats["n"]
    if n < 2:
        return {**stats, "verdict": "one seed: no noise estimate"}
    se = stats["std"] / math.sqrt(n)
    exceeds = abs(stats["mean"]) > 2 * se
    sign = f"{better} better than {worse}" if stats["mean"] > 0 else f"{worse} better than {better}"
    return {**stats, "se": se, "exceeds_noise": exceeds,
            "verdict": f"{sign} by {abs(stats['mean']):.4f} bpb, " +
                       (f"beyond the seed noise (|mean| > 2 standard errors = {2 * se:.4f})" if exceeds else
                        f"within the seed noise (|mean| <= 2 standard errors = {2 * se:.4f})")}


def seed_summary(runs: list[dict[str, list[dict]]], seeds: list[int]) -> dict:
    """Summary of each seed's eval records per arm ({arm: [eval records]}, one dict per seed)."""
    arms = [a for a in runs[0] if all(r.get(a) for r in runs)]
    finals = {}
    for arm in arms:
        lasts = [r[arm][-1] for r in runs]
        finals[arm] = {"final": mean_std([e["bpb"] for e in lasts]), "logop": mean_std([e["logop"] for e in lasts]),
                       "stages": [mean_std([e["stages"][k] for e in lasts]) for k in range(len(lasts[0]["stages"]))]}
    gaps = {arm: mean_std([final_gap_pct(r, arm) for r in runs]) for arm in GAP_ARMS if arm in arms and "bp" in arms}
    band = {arm: gap_band(runs, arm) for arm in gaps}
    orders = {}
    if "bp" in arms and "poe" in arms:
        orders["bp_vs_poe"] = ordering([r["poe"][-1]["bpb"] - r["bp"][-1]["bpb"] for r in runs], "BP", "PoE α=0")
    if "poe" in arms and "poe_a05" in arms:  # at the step the α=0.5 arm stopped at
        orders["alpha"] = ordering([r["poe_a05"][-1]["bpb"] - bpb_at(r, "poe", r["poe_a05"][-1]["step"])
                                    for r in runs], "PoE α=0", "PoE α=0.5")
    steps = {arm: runs[0][arm][-1]["step"] for arm in arms}
    return {"seeds": seeds, "finals": finals, "final_steps": steps, "gap_pct": gaps, "gap_band": band,
            "orderings": orders}


def gap_band(runs: list[dict[str, list[dict]]], arm: str) -> list[dict]:
    """Per eval step that every seed has: mean and std of the gap (%) of `arm` to BP."""
    per_seed = []
    for r in runs:
        bp = {e["step"]: e["bpb"] for e in r["bp"]}
        per_seed.append({e["step"]: 100 * (e["bpb"] / bp[e["step"]] - 1) for e in r[arm]
                         if e["step"] in bp and e["step"] > 0})
    steps = sorted(set.intersection(*(set(s) for s in per_seed)))
    return [{"step": s, **{k: v for k, v in mean_std([g[s] for g in per_seed]).items() if k != "values"}}
            for s in steps]


def gap_bands(summary: dict) -> list[tuple[list, list, list, str]]:
    """The gap's mean +- std over the seeds, per arm: (steps, low, high, label) for the gap plot."""
    bands = []
    for arm, band in summary["gap_band"].items():
        if band:
            mean = [b["mean"] for b in band]
            bands.append(([b["step"] for b in band], [m - b["std"] for m, b in zip(mean, band)],
                          [m + b["std"] for m, b in zip(mean, band)],
                          f"{GAP_ARMS[arm]} vs BP: mean ± std over {len(summary['seeds'])} seeds"))
    return bands


def seed_report(summary: dict | None) -> list[str]:
    """The report's section on the seeds (nothing with one seed)."""
    if not summary:
        return []
    n = len(summary["seeds"])
    seeds = ", ".join(map(str, summary["seeds"]))
    lines = [f"## Seeds: mean ± std over {n} seeds ({seeds})", "",
             "| arm | final | " + " | ".join(f"stage {k}" for k in range(_stages(summary))) + " | Log-OP |",
             "|---|---|" + "---|" * (_stages(summary) + 1)]
    for arm, f in summary["finals"].items():
        cells = [_pm(f["final"]), *(_pm(s) for s in f["stages"]), _pm(f["logop"])]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines.append("")
    steps = summary.get("final_steps", {})
    at = lambda arm: f" (step {steps[arm]})" if arm in steps else ""  # noqa: E731
    for arm, g in summary["gap_pct"].items():
        lines.append(f"- final gap {GAP_ARMS[arm]} vs BP{at(arm)}: {g['mean']:+.2f} % ± {g['std']:.2f} %")
    names = {"bp_vs_poe": "BP vs PoE α=0", "alpha": "α=0 vs α=0.5" + at("poe_a05")}
    for key, o in summary["orderings"].items():
        lines.append(f"- {names[key]}: {o['verdict']}")
    return lines + [""]


def measured_noise(config: dict) -> dict | None:
    """The recorded multi-seed summary of this experiment's preset (config: dataclasses.asdict of
    its ExperimentConfig), with "applies": whether it was measured with these very settings."""
    if not MEASURED_NOISE.exists():
        return None
    record = json.loads(MEASURED_NOISE.read_text()).get(config.get("name"))
    if record is None:
        return None
    return {**record, "applies": record["settings"] == trajectory_settings(config)}


def measured_noise_report(config: dict, evals: dict[str, list[dict]]) -> list[str]:
    """The report's section for a one-seed run: how large the seed noise of its preset was in a
    measured multi-seed run, and whether this run's gaps stand out from it."""
    m = measured_noise(config)
    if m is None:
        return []
    s = m["summary"]
    head = (f"## Seed noise of the `{config['name']}` preset (measured: {len(s['seeds'])} seeds, "
            f"{m['measured']}, commit {m['commit']})")
    if not m["applies"]:
        return [head, "", "This run's settings differ from those the noise was measured with, so it does not "
                "apply here; run `poelm experiment --seeds N` to measure it.", ""]
    lines = [head, "", "| arm | final bpb, mean ± std over the seeds |", "|---|---|"]
    lines += [f"| {arm} | {_pm(f['final'])} |" for arm, f in s["finals"].items()]
    lines.append("")
    names = {"bp_vs_poe": "BP vs PoE α=0", "alpha": "α=0 vs α=0.5"}
    for arm, g in s["gap_pct"].items():
        here = final_gap_pct(evals, arm) if evals.get(arm) and evals.get("bp") else None
        verdict = "" if here is None else (
            f"; this run's {here:+.2f} % is " +
            ("within" if abs(here - g["mean"]) <= 2 * g["std"] else "outside") + " 2 std of that mean")
        lines.append(f"- gap {GAP_ARMS[arm]} vs BP: {g['mean']:+.2f} % ± {g['std']:.2f} % over the seeds{verdict}")
    for key, o in s["orderings"].items():
        lines.append(f"- {names[key]}: {o['verdict']}")
    if evals.get("poe_a05") and "alpha" not in s["orderings"]:
        lines.append("- the α=0.5 arm was not in the measured run: the α ordering has no noise estimate")
    return lines + [""]


def _pm(s: dict) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def _stages(summary: dict) -> int:
    return len(next(iter(summary["finals"].values()))["stages"]) if summary["finals"] else 0
