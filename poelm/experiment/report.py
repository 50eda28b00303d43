"""The experiment's report.md and PNG plots, computed from its results (never hand-written).

    from poelm.experiment.report import render_report, experiment_plots
"""

from __future__ import annotations

from pathlib import Path

from poelm.experiment.config import PAPER
from poelm.experiment.seeds import gap_bands, measured_noise_report, seed_report
from poelm.experiment.specialist import specialist_report
from poelm.plots import plot_experiment, plot_specialist, plot_speedups

# -----------------------------------------------------------------------------
# Report and plots


def final_eval(evals: list[dict]) -> dict | None:
    return evals[-1] if evals else None


def experiment_plots(out: Path, results: dict) -> list[Path]:
    """The experiment's PNGs (drawn in poelm.plots): bpb curves, bpb per stage, the gap (with the
    seeds' band), the decoding speed-ups and the specialist."""
    written = plot_experiment(out, results, PAPER["gap_pct_final"], gap_bands(results["seeds"]) if results.get("seeds") else [])
    sets = ((results.get("inference") or {}).get("poe") or {}).get("sets", {})
    if sets:
        written.append(plot_speedups(out, sets))
    if results.get("specialist"):
        written.append(plot_specialist(out, results["specialist"]))
    return written


def bpb_at(evals: dict, arm: str, step: int) -> float | None:
    return next((r["bpb"] for r in evals.get(arm, []) if r["step"] == step), None)


def headline(results: dict) -> list[str]:
    """The paper's headline from this run: what PoE costs in bpb and what it buys in decode speed,
    against the best plain path, per prompt set; the BP arm's plain speed beside it."""
    evals = results["evals"]
    bp, poe = final_eval(evals.get("bp", [])), final_eval(evals.get("poe", []))
    sets = ((results.get("inference") or {}).get("poe") or {}).get("sets", {})
    if not (bp and poe and sets):
        return []
    cost = 100 * (poe["bpb"] / bp["bpb"] - 1)
    lines = []
    for name, rep in sets.items():
        m = rep["modes"]
        spec, adaptive, wand, plain = m.get("speculative"), m.get("speculative_adaptive"), m.get("wand"), m["plain"]
        buys = []
        if spec:
            buys.append(f"**{spec['speedup']:.2f}×** decode (speculative, {_exact(spec)}: draft stage "
                        f"{spec['draft_stage']}, {100 * spec['acceptance']:.0f} % acceptance)")
        if adaptive:
            buys.append(f"**{adaptive['speedup']:.2f}×** (adaptive speculative, {_exact(adaptive)}: "
                        f"{_adaptive_choice(adaptive)})")
        if wand:
            buys.append(f"**{wand['speedup']:.2f}×** (WAND at {100 * wand['agreement']:.1f} % agreement; "
                        f"{wand['gate']})")
        if sampled := m.get("speculative_sampled"):
            buys.append(f"**{sampled['speedup']:.2f}×** sampled at T = {rep['sampled']['temperature']:g} "
                        f"(speculative, exact in distribution, against plain sampling)")
        if batched := m.get("speculative_batched"):
            buys.append(f"**{batched['speedup']:.2f}×** at batch {batched['batch_size']} (speculative, "
                        f"{_exact(batched)}, against plain batch {batched['batch_size']})")
        if stage0 := m.get("stage0"):
            buys.append(f"**{stage0['speedup']:.2f}×** (stage 0 alone at {100 * stage0['agreement']:.1f} % agreement)")
        bp_plain = rep.get("bp_plain")
        bp_line = (f"; the BP arm's plain path: {bp_plain['tokens_per_s']:.0f} tok/s ({bp_plain['path']}, "
                   f"{bp_plain['speedup']:.2f}× the PoE arm's)" if bp_plain else "")
        lines.append(f"- Prompts from {rep['source']}: PoE costs **{cost:+.2f} %** bpb and buys {' and '.join(buys)}, "
                     f"the greedy batch-1 speeds over the best plain path ({plain['path']}, {plain['tokens_per_s']:.0f} tok/s)"
                     f"{bp_line}.")
    lines.append(f"- Paper (d24, A100s): PoE costs +{PAPER['gap_pct_final']} % bpb and buys "
                 f"{PAPER['speculative_speedup']}× (speculative, {int(100 * PAPER['speculative_acceptance'])} % "
                 f"acceptance) and {PAPER['wand_speedup']}× (WAND at {int(100 * PAPER['wand_agreement'])} % agreement).")
    return lines


def _exact(row: dict) -> str:
    return "exact" if row["identical_to_plain"] else "OUTPUT DIFFERS"


def _adaptive_choice(row: dict) -> str:
    """What adaptive speculative decoding chose: the (draft stage, gamma) each prompt ended on and
    the passes that fell back to plain."""
    a = row.get("adaptive") or {}
    ends = ", ".join(f"d{d}/γ{g}" if g else "plain" for d, g in a.get("last_choice", []))
    return (f"ended on {ends}; {a.get('fallback_passes', 0)} of {a.get('passes', 0)} passes plain, "
            f"{100 * row['acceptance']:.0f} % acceptance")


def stopped_arm_line(results: dict) -> str | None:
    """The alpha=0.5 arm against the others at the step it stopped at."""
    a = results.get("alpha05_at_stop")
    if not a or a["step"] >= a["horizon"]:
        return None
    gaps = ", ".join(f"{arm} {a['bpb'][arm]:.4f}" + (f" ({a['gap_pct'][arm]:+.2f} % vs BP)" if arm in a["gap_pct"] else "")
                     for arm in a["bpb"])
    return (f"The α=0.5 arm stopped at step {a['step']} of {a['horizon']} ({100 * a['fraction']:.0f} %, under the "
            f"full schedule), as the paper's run stopped at step {PAPER['alpha05_stop_step']:,} of "
            f"{PAPER['horizon_steps']:,}; every arm at step {a['step']}: {gaps}.")


def reuse_line(results: dict) -> str:
    """Which parts an earlier call finished (and when), so a rerun's timings are not mistaken for a full
    run's, and the commit of the code that wrote the results."""
    commit = f" Code: commit {results['commit']}." if results.get("commit") else ""
    return _reuse(results) + commit


def _reuse(results: dict) -> str:
    reused = results.get("reused") or {}
    if not reused:
        return f"Every part was run by this call (started {results.get('started', '?')})."
    parts = ", ".join(f"{name} (finished {when})" for name, when in reused.items())
    return (f"Reused from an earlier call: {parts}; this call (started {results.get('started', '?')}) ran the rest "
            f"in {results['wall_seconds'] / 60:.1f} min.")


def render_report(results: dict) -> str:
    cfg, model, evals = results["config"], results["model"], results["evals"]
    lines = [f"# BP vs PoE: the 3-way experiment (`{cfg['name']}`)", "",
             f"Machine: {results['machine']}. "
             + ("" if results.get("reused") else f"Wall time: {results['wall_seconds'] / 60:.1f} min. ") +
             f"Model: depth {model['n_layer']}, width {model['n_embd']}, stages {model['poe_stage_layers']}, "
             f"seq {model['sequence_len']}, "
             f"vocab {cfg['vocab_size']}, {cfg['total_batch_size']:,} tokens/step. Data: `{cfg['data_source']}`. "
             + reuse_line(results), ""]
    top = headline(results)
    if top:
        lines += ["## Headline", ""] + top + [""]
    lines += ["## Final validation bits per byte", "",
             "| arm | steps | tokens | final bpb | " + " | ".join(f"stage {k}" for k in range(_n_stages(evals))) +
             " | Log-OP | gap vs BP |", "|---|---|---|---|" + "---|" * (_n_stages(evals) + 2)]
    bp_last = final_eval(evals.get("bp", []))
    for arm, recs in evals.items():
        last = final_eval(recs)
        if not last:
            continue
        arm_result = results["arms"].get(arm, {})
        steps = arm_result.get("step", last["step"])
        bp_then = bpb_at(evals, "bp", last["step"])  # an arm stopped early compares at its own step
        gap = f"{100 * (last['bpb'] / bp_then - 1):+.2f} %" if bp_then and arm != "bp" else "—"
        stages = " | ".join(f"{b:.4f}" for b in last["stages"])
        lines.append(f"| {arm} | {steps} | {steps * cfg['total_batch_size']:,} | {last['bpb']:.4f} | {stages} | "
                     f"{last['logop']:.4f} | {gap} |")
    for arm, row in (results.get("backout_compat") or {}).items():
        lines.append(f"- `{arm}` final readout without backout (default for PoE) {row['without_backout']:.4f} bpb; "
                     f"with the reference code's backout {row['with_backout']:.4f} bpb.")
    lines += ["", f"Paper (d24, 27.7 B tokens): BP {PAPER['bp_bpb']}, PoE α=0 {PAPER['poe_bpb']} "
              f"(+{PAPER['gap_pct_final']} %); the gap grew from +{PAPER['gap_pct_step1000']} % at step 1000.", ""]
    for line in (stopped_arm_line(results), alpha_ordering(results)):
        if line:
            lines += [line, ""]
    if results["gap"]:
        lines += ["## Gap trajectory (PoE α=0 vs BP)", "", "| step | BP bpb | PoE bpb | gap |", "|---|---|---|---|"]
        lines += [f"| {g['step']} | {g['bp']:.4f} | {g['poe']:.4f} | {g['gap_pct']:+.2f} % |" for g in results["gap"]]
        lines.append("")
    inf = results.get("inference") or {}
    if inf.get("poe"):
        lines += inference_section(inf["poe"])
    if inf.get("bp_refusals"):
        lines += ["## The BP model refuses the PoE modes", ""]
        lines += [f"- `{mode}`: {msg}" for mode, msg in inf["bp_refusals"].items()]
        lines.append("")
    lines += seed_report(results.get("seeds")) if results.get("seeds") else measured_noise_report(
        results["config"], results["evals"])
    if results.get("specialist"):
        lines += specialist_report(results["specialist"])
    lines += ["## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in results.get("plots", [])]
    lines += ["", "Per arm (training loss and per-stage losses; the α=0.5 arm's total loss is √K times the α=0 "
              "form's, so it is drawn beside the per-stage losses at a different scale): "
              + ", ".join(f"[{arm}](arms/{arm}/loss.png)" for arm in evals)]
    lines += ["", "## What this run shows and what it does not", "",
              "- It reproduces the experiment's *protocol* exactly: same architecture, data order, seed, optimizer "
              "and schedule for the three arms, evaluated on the same fixed validation tokens.",
              "- At this scale the absolute bpb is far from the paper's and the gap's size is not the paper's; "
              "what carries over is the direction (does BP beat PoE per FLOP?) and how every PoE stage is a "
              "usable predictor while BP's intermediate stages are not.",
              "- CPU decoding speedups are bounded by per-step Python/dispatch overhead at tiny width, not by FLOPs; "
              "the paper's GPU figures are listed for reference.", ""]
    return "\n".join(lines)


def inference_section(poe: dict) -> list[str]:
    """report.md's tables of every decoding path, per prompt set."""
    lines = ["## Inference modes of the PoE model (one run, against the best plain path)", "",
             f"Greedy, batch 1, {poe['threads']} torch thread(s), interleaved, median of {poe['repeats']}"
             + _cpu_note(poe.get("cpu") or {})
             + ". Agreement: teacher-forced top-1 agreement with full depth on held-out text of the set "
             "(WAND calibrated on other validation tokens); identical: the same greedy tokens as eager plain. "
             "Paths named @T0.8 sample at T = 0.8 (seeded; speculative sampling is exact in distribution, not in "
             "tokens) and paths named @B8 decode 8 prompts together; each is timed beside, and compared with, the "
             "plain path of its own setting (identical: the batch's tokens are plain's of the same batch).", ""]
    for name, rep in poe["sets"].items():
        lines += [f"### Prompts from {rep['source']}: {rep['prompts']} × {rep['prompt_tokens']} tokens, "
                  f"{rep['max_new_tokens']} new tokens each", "",
                  "| path | tokens/s | vs best plain | agreement | identical | acceptance | tokens per verify | "
                  "stages per token |", "|---|---|---|---|---|---|---|---|"]
        agree = {"stage0": rep["agreement"]["stage0"], "wand": rep["agreement"]["wand"]}
        for path, r in rep["paths"].items():
            a = agree.get(path.split(":")[0])
            lines.append(f"| {path} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}× | "
                         f"{'—' if a is None else f'{100 * a:.1f} %'} | {_identical(r['identical_to_plain'])} | "
                         f"{_pct(r.get('acceptance'))} | {_num(r.get('tokens_per_verify'))} | "
                         f"{r['mean_stages_per_token']:.2f} |")
        if rep.get("bp_plain"):
            b = rep["bp_plain"]
            lines.append(f"| BP arm, {b['path']} | {b['tokens_per_s']:.1f} | {b['speedup']:.2f}× | — | — | — | — | — |")
        lines += [""] + mode_notes(rep["modes"]) + [""]
    lines += weight_bound(poe.get("weight_bytes"))
    lines += [f"Paper (1.3B on GPU): speculative {PAPER['speculative_speedup']}x at "
              f"{int(100 * PAPER['speculative_acceptance'])} % acceptance, WAND {PAPER['wand_speedup']}x at 100 % "
              "agreement, stage 0 about 4x cheaper per token.", ""]
    return lines


def weight_bound(w: dict | None) -> list[str]:
    """What bounds stage 0's batch-1 speed-up: the weights a step reads at its depth and at full depth."""
    if not w:
        return []
    return [f"Weights read per batch-1 step: stage 0 {w['stage0'] / 1e6:.2f} MB ({w['stage0_layers']} of "
            f"{w['n_layer']} layers and the lm_head), full depth {w['full'] / 1e6:.2f} MB: even a bandwidth-bound "
            f"step gives stage 0 at most {w['full'] / w['stage0']:.2f}×, and the fixed cost of every step (dispatch, "
            "host work), which stage 0 pays in full, keeps it below that.", ""]


def _identical(same: bool | None) -> str:
    """A path's "identical" cell: None where tokens are not compared (sampling, the batch's own plain path)."""
    return "—" if same is None else "yes" if same else "no"


def _cpu_note(cpu: dict) -> str:
    """How much of its cores the timing got (the machine may be shared)."""
    if not cpu:
        return ""
    share = cpu["cpu_share"]
    return (f"; the process got {100 * share:.0f} % of a core per thread while timing"
            + (" (the machine was busy: ratios hold, absolute speeds are low)" if share < 0.9 else ""))


def mode_notes(modes: dict) -> list[str]:
    """What WAND's cost gate and adaptive speculative decoding decided on their best paths."""
    notes = []
    if wand := modes.get("wand"):
        notes.append(f"- WAND ({wand['path']}): {wand['note']}; exits per stage (generated tokens): "
                     f"{wand['exit_stage_counts']}. Gate: {wand['wand_reason']}.")
    if adaptive := modes.get("speculative_adaptive"):
        notes.append(f"- Adaptive speculative ({adaptive['path']}): {_adaptive_choice(adaptive)}.")
    for key, what in (("speculative_sampled", "Sampled"), ("speculative_batched", "Batched")):
        if row := modes.get(key):
            notes.append(f"- {what} speculative ({row['path']}, the best fixed draft stage of the greedy rows): "
                         f"{row['tokens_per_s']:.0f} tok/s against {row['baseline_tokens_per_s']:.0f} of "
                         f"{row['baseline']}, {row['speedup']:.2f}×, {_pct(row.get('acceptance'))} acceptance.")
    return notes


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def alpha_ordering(results: dict) -> str | None:
    """The final-bpb ordering of the three arms against the paper's (BP < PoE α=0 < PoE α=0.5);
    None without all three arms."""
    bpb = {arm: recs[-1]["bpb"] for arm, recs in results["evals"].items() if recs}
    stop = results.get("alpha05_at_stop")
    where = "final bpb"
    if stop and stop["step"] < stop["horizon"]:  # the alpha=0.5 arm stopped early: compare where it stopped
        bpb, where = stop["bpb"], f"bpb at step {stop['step']}, where the α=0.5 arm stopped"
    if not {"bp", "poe", "poe_a05"} <= set(bpb):
        return None
    bp, a0, a05 = bpb["bp"], bpb["poe"], bpb["poe_a05"]
    alpha = ("α=0 better than α=0.5, as in the paper" if a0 < a05 else
             "α=0.5 better than α=0, not as in the paper (there α=0 is better)")
    base = ("BP better than both PoE arms, as in the paper" if bp < min(a0, a05) else
            "BP not better than both PoE arms, not as in the paper (there BP is better)")
    k = len(results["evals"]["poe"][-1]["stages"])
    return (f"Ordering of the {where} (BP {bp:.4f}, PoE α=0 {a0:.4f}, PoE α=0.5 {a05:.4f}): {alpha}; {base}. "
            f"The two α arms differ only in the loss scale ({k} stages: α=0.5 is {k ** 0.5:g}x the α=0 loss), which "
            "Muon and AdamW normalise away (their per-step losses agree to 4 digits over the first steps), so "
            f"their {abs(100 * (a05 / a0 - 1)):.1f} % difference measures how far tiny rounding differences "
            "carry through this short run, not the √K scaling.")


def _n_stages(evals: dict) -> int:
    for recs in evals.values():
        if recs:
            return len(recs[-1]["stages"])
    return 0


