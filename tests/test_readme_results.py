"""scripts/readme_results.py: the README section between the demo-results markers is rebuilt
from a results.json (numbers, α ordering, wall time) and nothing outside the markers moves."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "readme_results.py"
spec = importlib.util.spec_from_file_location("readme_results", SCRIPT)
readme_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_results)


def _eval(step, bpb, stages, logop):
    return {"step": step, "bpb": bpb, "stages": stages, "logop": logop}


def _results(a0: float, a05: float) -> dict:
    cfg = dict(name="tiny", model=dict(n_layer=4, n_embd=128, sequence_len=256), vocab_size=1024, total_batch_size=8192,
               data_source="default", eval_tokens=65536, matrix_lr=0.04, embedding_lr=1.47, unembedding_lr=0.0392,
               scalar_lr=2.45, lr_scaling="off", weight_decay=0.2)
    evals = {"bp": [_eval(150, 1.9, [2.5, 2.2, 2.0, 1.92], 2.1), _eval(300, 1.6123, [2.4, 2.1, 1.9, 1.6201], 1.95)],
             "poe": [_eval(150, 2.0, [2.1, 2.0, 2.0, 2.0], 2.0), _eval(300, a0, [1.8, 1.75, 1.72, a0], 1.7111)],
             "poe_a05": [_eval(150, 2.1, [2.2, 2.1, 2.1, 2.1], 2.3), _eval(300, a05, [1.9, 1.8, 1.78, a05], 2.2)]}
    arms = {arm: {"step": 300, "train_seconds": 400.0} for arm in evals}
    gap = [{"step": 150, "bp": 1.9, "poe": 2.0, "gap_pct": 5.263}, {"step": 300, "bp": 1.6123, "poe": a0,
                                                                    "gap_pct": 100 * (a0 / 1.6123 - 1)}]
    def path(tps, speedup, **kw):
        return {"tokens_per_s": tps, "speedup": speedup, "identical_to_plain": True, "mean_stages_per_token": 4.0,
                "ttft_s": 0.01, "tpot_s": 0.003, **kw}

    speculative = path(320.0, 1.1, acceptance=0.44, tokens_per_verify=2.7)
    wand = path(232.6, 0.8, exit_stage_counts=[0, 0, 0, 384], wand_tested_stages=[],
                wand_reason="no exit test pays (...): decodes as plain")
    sampled = path(410.0, 1.32, acceptance=0.41, tokens_per_verify=2.5, identical_to_plain=None)
    batched = path(1850.0, 1.25, acceptance=0.43, tokens_per_verify=2.6, batch_size=8)
    paths = {"plain:eager": path(290.9, 1.0), "stage0:eager": path(888.8, 3.055), "wand:eager": wand,
             "speculative_d0:eager": speculative, "plain@T0.8:eager": path(310.6, 1.0, identical_to_plain=None),
             "speculative_d0@T0.8:eager": sampled, "plain@B8:eager": path(1480.0, 1.0, identical_to_plain=None),
             "speculative_d0@B8:eager": batched}
    validation = {"source": "the validation split", "prompts": 4, "prompt_tokens": 32, "max_new_tokens": 96,
                  "batch_size": 8, "sampled": {"temperature": 0.8, "seed": 0, "prompts": 4},
                  "best_plain": "plain:eager", "paths": paths, "agreement": {"stage0": 0.681, "wand": 1.0},
                  "speculative_sweep": [dict(speculative, draft_stage=0, path="speculative_d0:eager")],
                  "modes": {"plain": dict(paths["plain:eager"], path="plain:eager", agreement=1.0),
                            "stage0": dict(paths["stage0:eager"], path="stage0:eager", agreement=0.681),
                            "wand": dict(wand, path="wand:eager", agreement=1.0, gate="no exit test pays: decodes as plain",
                                         note="no exit test pays: decodes as plain; mean stages per token 4.00 of 4"),
                            "speculative": dict(speculative, draft_stage=0, path="speculative_d0:eager"),
                            "speculative_sampled": dict(sampled, draft_stage=0, path="speculative_d0@T0.8:eager",
                                                        baseline="plain@T0.8:eager", baseline_tokens_per_s=310.6),
                            "speculative_batched": dict(batched, draft_stage=0, path="speculative_d0@B8:eager",
                                                        baseline="plain@B8:eager", baseline_tokens_per_s=1480.0)}}
    inference = {"poe": {"threads": 1, "repeats": 3, "gamma": 4, "cpu": {"threads": 1, "cpu_share": 0.95, "contended": None},
                         "wand_bounds": [1.0, 1.0, 1.0, 0.0],
                         "sets": {"validation": validation}}}
    return {"config": cfg, "model": {**cfg["model"], "poe_stage_layers": [1, 1, 1, 1]}, "evals": evals, "arms": arms, "gap": gap, "gap_alpha05": [], "inference": inference,
            "backout_compat": {"poe": {"without_backout": a0, "with_backout": 1.6999}},
            "wall_seconds": 1234.5, "machine": "2 CPU cores (x86_64), torch 2.13.0, fp32"}


README = "# poelm\n\nintro text 1.8065\n\n<!-- demo-results:start -->\nold table 9.9999\n<!-- demo-results:end -->\n\n## Layout\nrest\n"


def test_section_rewritten_from_results_and_outside_untouched(tmp_path):
    results_path, readme = tmp_path / "results.json", tmp_path / "README.md"
    results_path.write_text(json.dumps(_results(1.6543, 1.6789)))
    readme.write_text(README)
    assert readme_results.main([str(results_path), "--readme", str(readme), "--docs", str(tmp_path / "docs")]) == 0
    text = readme.read_text()
    head, rest = text.split("<!-- demo-results:start -->")
    section, tail = rest.split("<!-- demo-results:end -->")
    assert head == "# poelm\n\nintro text 1.8065\n\n" and tail == "\n\n## Layout\nrest\n"
    assert "9.9999" not in section
    assert "| BP (`none`) | **1.6123** | 2.4000 | 2.1000 | 1.9000 | **1.6201** | 1.9500 | — |" in section
    assert "| PoE `flat` α=0 | 1.6543 | **1.8000** |" in section and "| +2.60 % (step 300) |" in section
    assert "| PoE `flat` α=0.5 | 1.6789 |" in section and "| +4.13 % (step 300) |" in section
    assert "+5.3 % (150), +2.6 % (300)" in section
    assert "α=0 better than α=0.5, as in the paper; BP better than both PoE arms, as in the paper" in section
    assert "**20.6 minutes wall time**" in section and "20.0 of them training" in section
    assert "| stage0:eager | 888.8 | 3.06× | 68.1 % | yes |" in section
    assert "| speculative_d0:eager | 320.0 | 1.10× | — | yes | 44 % | 2.70 |" in section
    assert "PoE costs **+2.60 %** bpb and buys **1.10×** decode (speculative, exact" in section
    assert "**0.80×** (WAND at 100.0 % agreement; no exit test pays: decodes as plain)" in section
    # the sampled and batch-8 rows, each against plain of its own setting
    assert ("**1.32×** sampled at T = 0.8 (speculative, exact in distribution, against plain sampling) and "
            "**1.25×** at batch 8 (speculative, exact, against plain batch 8)") in section
    assert "| speculative_d0@T0.8:eager | 410.0 | 1.32× | — | — | 41 % | 2.50 |" in section
    assert "| plain@B8:eager | 1480.0 | 1.00× | — | — |" in section
    assert "| speculative_d0@B8:eager | 1850.0 | 1.25× | — | yes | 43 % | 2.60 |" in section
    assert "- Sampled speculative (speculative_d0@T0.8:eager, the best fixed draft stage of the greedy rows): " \
           "410 tok/s against 311 of plain@T0.8:eager, 1.32×, 41 % acceptance." in section
    assert "1.6999 bpb vs 1.6543 without" in section
    # one seed: the preset's recorded seed noise (poelm/experiment/seed_noise.json), which these
    # made-up settings were not measured with
    assert "#### Seed noise of the `tiny` preset (measured: " in section and "does not apply here" in section
    assert not (tmp_path / "docs").exists()  # no plots beside this results.json: nothing copied

    # a second run on other numbers replaces the section again, and says when α=0.5 wins
    results_path.write_text(json.dumps(_results(1.7000, 1.6500)))
    readme_results.main([str(results_path), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith(head) and text.endswith(tail) and "1.6543" not in text
    assert "α=0.5 better than α=0, not as in the paper" in text

    # several seeds: their own mean ± std, as in the run's report
    from poelm.experiment.seeds import seed_summary
    several = _results(1.7000, 1.6500)
    several["seeds"] = seed_summary([several["evals"], _results(1.7100, 1.6600)["evals"]], [42, 43])
    results_path.write_text(json.dumps(several))
    readme_results.main([str(results_path), "--readme", str(readme)])
    assert "#### Seeds: mean ± std over 2 seeds (42, 43)" in readme.read_text()


def test_readme_without_markers_refused():
    with pytest.raises(ValueError, match="demo-results:start"):
        readme_results.rewrite("# no markers\n", "section")
