"""PNG plots of runs and experiments (matplotlib, Agg backend: no display needed).

    from poelm.plots import plot_run
    plot_run("runs/tiny")        # runs/tiny/loss.png and runs/tiny/bpb.png from metrics.jsonl
                                 # (an SFT run: assistant_bits.png)
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(train records, eval records) of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []
    return [r for r in records if r.get("type") == "train"], [r for r in records if r.get("type") == "eval"]


def plot_run(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    train, evals = read_metrics(run_dir)
    written = []
    if train:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in train]
        n_stages = len(train[0].get("stage_losses") or [])
        if n_stages > 1:
            for k in range(n_stages):
                ax.plot(steps, [r["stage_losses"][k] for r in train], lw=0.8, label=f"stage {k}")
        ax.plot(steps, [r["loss"] for r in train], lw=1.2, color="black", label="training loss")
        ax.set_xlabel("step"), ax.set_ylabel("loss (nats)"), ax.set_title(f"training loss: {run_dir.name}")
        ax.legend(), ax.grid(alpha=0.3)
        written.append(save_figure(fig, run_dir / "loss.png"))
    if evals and "assistant_bits" in evals[0]:  # an SFT run (poelm.sft)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([r["step"] for r in evals], [r["assistant_bits"] for r in evals], marker="o", color="black",
                label="specialist")
        base = evals[0].get("base")
        if base:
            ax.axhline(base["assistant_bits"], color="gray", ls="--", label="base")
        ax.set_xlabel("step"), ax.set_ylabel("held-out bits per assistant token")
        ax.set_title(f"SFT: {run_dir.name}"), ax.legend(), ax.grid(alpha=0.3)
        written.append(save_figure(fig, run_dir / "assistant_bits.png"))
    elif evals:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in evals]
        for k in range(len(evals[0]["stages"])):
            ax.plot(steps, [r["stages"][k] for r in evals], marker="o", ms=3, label=f"stage {k}")
        ax.plot(steps, [r["logop"] for r in evals], ls="--", label="Log-OP")
        ax.plot(steps, [r["bpb"] for r in evals], color="black", lw=1.5, label="final readout")
        ax.set_xlabel("step"), ax.set_ylabel("val bits per byte"), ax.set_title(f"validation bpb: {run_dir.name}")
        ax.legend(), ax.grid(alpha=0.3)
        written.append(save_figure(fig, run_dir / "bpb.png"))
    return written


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG (atomically) and close."""
    from poelm.atomic import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_compare(result: dict, path: Path) -> Path:
    """`poelm compare`'s figure: bpb per stage of every model, its final readout dotted."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in result["models"]:
        ks = list(range(len(row["stage_bpb"])))
        ax.plot(ks, row["stage_bpb"], marker="o", label=f"{Path(row['model']).name} stages")
        ax.axhline(row["bpb"], ls=":", lw=0.8, color=ax.lines[-1].get_color())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # stages are whole numbers
    ax.set_xlabel("stage"), ax.set_ylabel("val bits per byte"), ax.set_title("bpb per stage (dotted: final readout)")
    ax.grid(alpha=0.3), ax.legend()
    return save_figure(fig, path)


def plot_specialist(out: Path, s: dict) -> Path:
    """The experiment's specialist figure: held-out bits per assistant token over SFT steps."""
    fig, ax = plt.subplots(figsize=(7, 4))
    curve = s["curve"]
    ax.plot([r["step"] for r in curve], [r["assistant_bits"] for r in curve], marker="o", label="base + specialist")
    if s.get("base"):
        ax.axhline(s["base"]["assistant_bits"], color="gray", ls="--", label="base (PoE arm)")
    ax.set_xlabel("SFT step"), ax.set_ylabel("held-out bits per assistant token")
    ax.set_title("specialist on the frozen PoE base (recall)"), ax.grid(alpha=0.3), ax.legend()
    return save_figure(fig, out / "specialist.png")


def plot_task_compare(result: dict, path: Path) -> Path:
    """Grouped bars of each model's points per task (poelm.experiment.compare.compare_tasks), the
    difference of the last model from the first written above each group."""
    rows, models = result["rows"], [Path(m).name for m in result["models"]]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(rows) + 2), 4))
    width = 0.8 / len(models)
    for i, name in enumerate(models):
        ax.bar([j + i * width for j in range(len(rows))], [r["points"][i] for r in rows], width, label=name)
    for j, r in enumerate(rows):
        top = max(r["points"]) if all(p == p for p in r["points"]) else 0
        ax.annotate(f"{r['difference']:+.1f}", (j + 0.4 - width / 2, top), ha="center", va="bottom", fontsize=8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r["task"] for r in rows], rotation=20)
    ax.set_ylabel("points (final readout)"), ax.set_title(f"downstream tasks: {models[-1]} - {models[0]} above")
    ax.grid(alpha=0.3, axis="y"), ax.legend()
    return save_figure(fig, Path(path))


def plot_experiment(out: Path, results: dict, paper_gap_pct: float, bands: list[tuple]) -> list[Path]:
    """The 3-way experiment's bpb curves, bpb per stage readout and PoE-vs-BP gap (with `bands`:
    (steps, low, high, label) of the seeds' mean +- std) -> the PNGs written."""
    written = []
    evals = results["evals"]
    labels = {"bp": "BP (none)", "poe": "PoE flat α=0", "poe_a05": "PoE flat α=0.5"}
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, recs in evals.items():
        if recs:
            ax.plot([r["step"] for r in recs if r["step"] > 0], [r["bpb"] for r in recs if r["step"] > 0],
                    marker="o", ms=3, label=labels.get(arm, arm))
    ax.set_xlabel("step"), ax.set_ylabel("val bits per byte"), ax.set_title("3-way experiment: final readout")
    ax.grid(alpha=0.3), ax.legend()
    written.append(save_figure(fig, out / "bpb_curves.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(evals))
    lasts = {arm: recs[-1] for arm, recs in evals.items() if recs}
    values_all = []
    for j, (arm, last) in enumerate(lasts.items()):
        values = last["stages"] + [last["logop"], last["bpb"]]
        values_all += values
        ax.bar([i + j * width for i in range(len(values))], values, width, label=labels.get(arm, arm))
    n = max((len(last["stages"]) for last in lasts.values()), default=0)
    ax.set_xticks([i + width * (len(lasts) - 1) / 2 for i in range(n + 2)],
                  [f"stage {k}" for k in range(n)] + ["Log-OP", "final"])
    if values_all:
        lo, hi = min(values_all), max(values_all)
        ax.set_ylim(lo - 0.15 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
    ax.set_ylabel("val bits per byte"), ax.set_title("bpb per stage readout (final step)")
    ax.grid(alpha=0.3, axis="y"), ax.legend()
    written.append(save_figure(fig, out / "bpb_per_stage.png"))

    if results["gap"]:
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([g["step"] for g in results["gap"]], [g["gap_pct"] for g in results["gap"]], marker="o",
                label="PoE α=0 vs BP (this run)")
        if results.get("gap_alpha05"):
            ax.plot([g["step"] for g in results["gap_alpha05"]], [g["gap_pct"] for g in results["gap_alpha05"]],
                    marker="s", label="PoE α=0.5 vs BP (this run)")
        for steps, low, high, label in bands:
            ax.fill_between(steps, low, high, alpha=0.2, label=label)
        ax.axhline(paper_gap_pct, ls="--", color="gray", label=f"paper final gap (+{paper_gap_pct:.2f} %)")
        ax.set_xlabel("step"), ax.set_ylabel("bpb gap (%, positive: PoE worse)"), ax.set_title("PoE-vs-BP gap trajectory")
        ax.grid(alpha=0.3), ax.legend()
        written.append(save_figure(fig, out / "gap.png"))

    return written


def plot_speedups(out: Path, sets: dict) -> Path:
    """Each decoding path's speed over the best plain path, per prompt set, labelled with its tokens/s."""
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(sets)
    names = list(next(iter(sets.values()))["paths"])
    for j, (set_name, rep) in enumerate(sets.items()):
        xs = [i + j * width for i in range(len(names))]
        values = [rep["paths"].get(n, {}).get("speedup", 0.0) for n in names]
        bars = ax.bar(xs, values, width, label=f"{set_name} prompts")
        for bar, n in zip(bars, names):
            if n in rep["paths"]:
                ax.annotate(f"{rep['paths'][n]['tokens_per_s']:.0f}", (bar.get_x() + bar.get_width() / 2,
                            bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([i + width * (len(sets) - 1) / 2 for i in range(len(names))], names, rotation=30, ha="right")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_ylabel("speed over the best plain path (labels: tok/s)")
    ax.set_title("PoE decoding paths, greedy batch 1 (@T: sampled, @B: batched, each over plain of its setting),"
                 " 1 thread", fontsize=9)
    ax.legend()
    return save_figure(fig, out / "speedups.png")
