"""Rewrite the demo results in README.md from a `poelm experiment` results.json, so the
tables cannot go stale: the 3-way table, the gap trajectory, the α ordering, the inference
modes and the wall time, between the `<!-- demo-results:start -->` and
`<!-- demo-results:end -->` markers. The plots beside results.json are copied to docs/.

    python scripts/readme_results.py runs/demo/results.json            # or: make readme-results
    python scripts/readme_results.py runs/demo/results.json --readme README.md --docs docs
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from poelm.atomic import atomic_write_bytes
from poelm.experiment import PAPER, alpha_ordering
from poelm.experiment.report import bpb_at, headline, inference_section, reuse_line, stopped_arm_line
from poelm.experiment.seeds import measured_noise_report, seed_report
from poelm.experiment.specialist import specialist_report

START, END = "<!-- demo-results:start -->", "<!-- demo-results:end -->"
LABELS = {"bp": "BP (`none`)", "poe": "PoE `flat` α=0", "poe_a05": "PoE `flat` α=0.5"}
PAPER_COLUMN = {"bp": f"{PAPER['bp_bpb']:.4f}", "poe": f"{PAPER['poe_bpb']:.4f} (+{PAPER['gap_pct_final']} %)",
                "poe_a05": f"tracked worse than α=0, stopped at step {PAPER['alpha05_stop_step']:,} of "
                           f"{PAPER['horizon_steps']:,}"}
PLOTS = {"bpb_per_stage.png": "demo_bpb_per_stage.png", "bpb_curves.png": "demo_bpb_curves.png",
         "speedups.png": "demo_speedups.png", "specialist.png": "demo_specialist.png"}


def results_section(results: dict) -> str:
    """The markdown between the markers (without them)."""
    cfg, evals = results["config"], results["evals"]
    # the model as built (results of poelm 0.1 kept its fields flat in the config)
    model = results.get("model") or {"n_layer": cfg["depth"], "n_embd": cfg["n_embd"], "sequence_len": cfg["seq_len"]}
    lasts = {arm: recs[-1] for arm, recs in evals.items() if recs}
    tokens_per_arm = cfg["total_batch_size"] * max((results["arms"].get(a, {}).get("step", r["step"])
                                                    for a, r in lasts.items()), default=0)
    val = f"{cfg['eval_tokens']:,} validation tokens" if cfg.get("eval_tokens") else "validation tokens"
    train_min = sum(r.get("train_seconds", 0.0) for r in results["arms"].values()) / 60
    if results.get("reused") or results.get("resumed_arms"):  # this call's wall time is not a full run's
        timing = f"Training of the {len(lasts)} arms: **{train_min:.1f} minutes**. {reuse_line(results)} "
    else:
        timing = (f"**{results['wall_seconds'] / 60:.1f} minutes wall time** for the `poelm experiment` call that "
                  f"wrote these numbers (corpus, tokenizer, {len(lasts)} arms, inference modes, specialist; "
                  f"{train_min:.1f} of them training the arms). "
                  + (f"Code: commit {results['commit']}. " if results.get("commit") else ""))
    lines = [f"Machine: {results['machine']}. " + timing + f"Depth {model['n_layer']}, width {model['n_embd']}, vocab "
             f"{cfg['vocab_size']:,}, sequence {model['sequence_len']}, {tokens_per_arm:,} tokens per arm "
             f"({cfg['total_batch_size']:,} per step), corpus `{cfg['data_source']}`; LRs matrix "
             f"{cfg['matrix_lr']:g}, embedding {cfg['embedding_lr']:g}, unembedding {cfg['unembedding_lr']:g}, "
             f"scalar {cfg['scalar_lr']:g} (scaling `{cfg['lr_scaling']}`), Muon wd {cfg['weight_decay']:g}; "
             f"the same fixed {val} for every eval.", ""]
    top = headline(results)
    if top:
        lines += ["**Headline** (PoE α=0 against BP, final step; speeds against the best plain path of the same run):",
                  ""] + top + [""]
    lines += three_way_table(lasts, results["evals"])
    for key, name in (("gap", "α=0"), ("gap_alpha05", "α=0.5")):
        if results.get(key):
            steps = ", ".join(f"{g['gap_pct']:+.1f} % ({g['step']})" for g in results[key])
            lines += ["", f"Gap of PoE {name} over BP by step: {steps}."]
    for line in (stopped_arm_line(results), alpha_ordering(results)):
        if line:
            lines += ["", line]
    lines += ["", f"Paper (d24, 27.7 B tokens): the gap of α=0 went from +{PAPER['gap_pct_step1000']} % at "
              f"step 1000 to +{PAPER['gap_pct_final']} % at the end."]
    noise = seed_report(results["seeds"]) if results.get("seeds") else measured_noise_report(results["config"],
                                                                                             results["evals"])
    if noise:  # the same text as the run's report.md
        lines += [""] + ["##" + line if line.startswith("## ") else line for line in noise]
    lines += ["", "![bpb per stage](docs/demo_bpb_per_stage.png)", "", "![bpb curves](docs/demo_bpb_curves.png)"]
    for arm, row in (results.get("backout_compat") or {}).items():
        lines += ["", f"`{arm}` final readout with the reference code's backout on the plain path (never trained "
                  f"that way; off by default): {row['with_backout']:.4f} bpb vs {row['without_backout']:.4f} without."]
    lines += inference_table((results.get("inference") or {}).get("poe"))
    if (results.get("inference") or {}).get("poe"):
        lines += ["![decode speeds](docs/demo_speedups.png)", ""]
    if results.get("specialist"):  # the same text as the run's report.md
        lines += [""] + ["#" + line if line.startswith("## ") else line
                         for line in specialist_report(results["specialist"])]
        lines += ["![specialist](docs/demo_specialist.png)", ""]
    return "\n".join(lines)


def three_way_table(lasts: dict[str, dict], evals: dict) -> list[str]:
    n = max((len(r["stages"]) for r in lasts.values()), default=0)
    columns = {"final": {a: r["bpb"] for a, r in lasts.items()}, "logop": {a: r["logop"] for a, r in lasts.items()},
               **{k: {a: r["stages"][k] for a, r in lasts.items()} for k in range(n)}}
    best = {c: min(v.values()) for c, v in columns.items()}

    def cell(c, arm):  # the best arm of each column in bold
        v = columns[c][arm]
        return f"**{v:.4f}**" if v == best[c] and len(lasts) > 1 else f"{v:.4f}"

    rows = ["| arm | final bpb | " + " | ".join(f"stage {k}" for k in range(n)) + " | Log-OP | gap vs BP | "
            "paper (d24, 27.7 B tokens) |", "|---|---|" + "---|" * n + "---|---|---|"]
    for arm, r in lasts.items():
        bp_then = bpb_at(evals, "bp", r["step"])  # an arm stopped early compares at its own step
        gap = f"{100 * (r['bpb'] / bp_then - 1):+.2f} % (step {r['step']})" if bp_then and arm != "bp" else "—"
        rows.append(f"| {LABELS.get(arm, arm)} | {cell('final', arm)} | "
                    + " | ".join(cell(k, arm) for k in range(n))
                    + f" | {cell('logop', arm)} | {gap} | {PAPER_COLUMN.get(arm, '—')} |")
    return rows


def inference_table(poe: dict | None) -> list[str]:
    """report.md's inference tables, one heading level down."""
    if not poe:
        return []
    return [""] + ["#" + line if line.startswith("##") else line for line in inference_section(poe)]


def rewrite(readme: str, section: str) -> str:
    """readme with the text between the markers replaced by section; the rest untouched."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(START) > readme.index(END):
        raise ValueError(f"README needs exactly one {START} followed by one {END}")
    head, rest = readme.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{section}\n{END}{tail}"


def copy_plots(results_path: Path, docs: Path) -> list[Path]:
    copied = []
    for src, dst in PLOTS.items():
        if (results_path.parent / src).exists():
            docs.mkdir(parents=True, exist_ok=True)
            copied.append(Path(shutil.copyfile(results_path.parent / src, docs / dst)))
    return copied


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="results.json of a `poelm experiment` run")
    p.add_argument("--readme", default="README.md", help="README to rewrite between the markers")
    p.add_argument("--docs", default="docs", help="folder the plots are copied to")
    args = p.parse_args(argv)
    results_path, readme = Path(args.results), Path(args.readme)
    results = json.loads(results_path.read_text())
    atomic_write_bytes(readme, rewrite(readme.read_text(), results_section(results)).encode())
    for path in copy_plots(results_path, Path(args.docs)):
        print(f"copied {path}")
    print(f"rewrote the demo results in {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
