"""The `make demo` miniature: its stage layout, the alpha=0.5 arm stopped at 53 % of the schedule,
the trainer's stop and plain progress lines, the inference measurement against the best plain
path on validation and outside-text prompts, the report's headline and reuse line, and the
decode benchmark's JSON summary."""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path

import pytest
import torch

from poelm import corpus
from poelm import experiment as exp
from poelm.experiment.config import alpha05_stop
from poelm.experiment.report import headline, render_report, reuse_line
from poelm.experiment.run import torchrun_argv
from poelm.flags import resume_mutable
from poelm.inference_bench import measure_modes
from poelm.tokenizer import Tokenizer
from poelm.train import TrainConfig
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_preset_stages_hold_two_layers_and_alpha05_stops_at_53_percent():
    cfg = exp.load_config("tiny", {})
    model = cfg.model_config("flat", 0.0)
    assert model.n_stages == 4 and min(model.poe_stage_layers) >= 2 and model.n_layer == 8
    stop = exp.arm_train_config(cfg, "poe_a05").stop_at
    assert stop == 120 and stop % cfg.eval_every == 0  # every arm has an eval there
    assert abs(stop / cfg.num_iterations - 14000 / 26430) < 0.01  # the paper's 53 %
    assert exp.arm_train_config(cfg, "bp").stop_at is None and exp.arm_train_config(cfg, "poe").stop_at is None
    assert exp.arm_train_config(cfg, "poe_a05").num_iterations == cfg.num_iterations  # the full schedule
    # stop_at is a TrainConfig setting: a resume may change it, and the torchrun argv carries it
    argv = torchrun_argv(exp.arm_train_config(cfg, "poe_a05"), 2)
    assert argv[argv.index("--stop-at") + 1] == "120" and "stop_at" in resume_mutable(TrainConfig)
    assert "--stop-at" not in torchrun_argv(exp.arm_train_config(cfg, "poe"), 2)
    # the LRs tuned on the BP arm stay as they were
    assert (cfg.matrix_lr, cfg.embedding_lr, cfg.unembedding_lr, cfg.scalar_lr) == (0.04, 1.47, 0.0392, 2.45)


def test_alpha05_stop_rounds_to_an_eval_step_and_can_be_off():
    cfg = exp.load_config("tiny", {"num_iterations": 600, "eval_every": 100})
    assert alpha05_stop(cfg, 600) == 300  # 318 rounds to the nearest eval step
    full = exp.load_config("tiny", {"alpha05_stop_fraction": 1.0})
    assert exp.arm_train_config(full, "poe_a05").stop_at is None
    with pytest.raises(ValueError, match="alpha05_stop_fraction"):
        exp.load_config("tiny", {"alpha05_stop_fraction": 1.5})


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A corpus with a validation shard and a 300-token tokenizer trained on it."""
    root = tmp_path_factory.mktemp("demo")
    rng = random.Random(0)
    words = ["the", "river", "light", "stone", "walks", "under", "green", "house", "old", "song", "a", "of"]
    src = root / "texts"
    src.mkdir()
    for i in range(200):
        (src / f"d{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(30, 80))) + ".")
    corpus.build_corpus(str(src), root / "data")
    train, _ = corpus.list_shards(root / "data")
    tok = Tokenizer.train(corpus.iter_documents(train), 300)
    return root / "data", tok


def test_measure_modes_against_the_best_plain_path_on_both_prompt_sets(tiny_data):
    data, tok = tiny_data
    torch.set_num_threads(1)
    model = tiny_model(vocab_size=tok.vocab_size, sequence_len=64).eval()
    bp = tiny_model(seed=1, vocab_size=tok.vocab_size, sequence_len=64, poe_mode="none").eval()
    r = measure_modes(model, tok, str(data), n_prompts=2, max_new_tokens=6, prompt_len=8, heldout_tokens=1024,
                      repeats=1, bp_model=bp, compile=False, batch_size=3)
    assert set(r["sets"]) == {"validation", "outside"} and r["threads"] == 1 and 0 < r["cpu"]["cpu_share"] <= 1.5
    assert r["decode_costs"]["threads"] == 1  # the calibration's costs were measured at the timed threads
    layers = [sum(p.numel() * 4 for p in block.parameters()) for block in model.transformer.h]  # fp32
    head = model.lm_head.weight.numel() * 4
    k = model.config.stage_ends[0] + 1  # stage 0's blocks and the head, against every block and the head
    assert k < model.config.n_layer and r["weight_bytes"] == {"stage0": sum(layers[:k]) + head,
                                                              "full": sum(layers) + head, "stage0_layers": k,
                                                              "n_layer": model.config.n_layer}
    for rep in r["sets"].values():
        plain = rep["modes"]["plain"]
        assert plain["path"] == rep["best_plain"] == "plain:eager" and plain["speedup"] == 1.0
        assert set(rep["modes"]) == {"plain", "stage0", "wand", "speculative", "speculative_adaptive",
                                     "speculative_sampled", "speculative_batched"}
        # the sampled and batched settings: the best fixed draft stage against plain of the same setting
        d = rep["modes"]["speculative"]["draft_stage"]
        sampled, batched = rep["modes"]["speculative_sampled"], rep["modes"]["speculative_batched"]
        assert sampled["path"] == f"speculative_d{d}@T0.8:eager" and sampled["baseline"] == "plain@T0.8:eager"
        assert batched["path"] == f"speculative_d{d}@B3:eager" and batched["baseline"] == "plain@B3:eager"
        assert rep["batch_size"] == batched["batch_size"] == 3 and sampled["batch_size"] == 1
        assert rep["sampled"] == {"temperature": 0.8, "seed": 0, "prompts": 2}
        for mode in (sampled, batched):
            base = rep["paths"][mode["baseline"]]
            assert mode["baseline_tokens_per_s"] == base["tokens_per_s"] and base["speedup"] == 1.0
            assert mode["speedup"] == pytest.approx(mode["tokens_per_s"] / base["tokens_per_s"])
        assert sampled["identical_to_plain"] is None and rep["paths"]["plain@B3:eager"]["identical_to_plain"] is None
        assert batched["identical_to_plain"]  # greedy: the batch's tokens are plain's of the same batch
        assert sampled["acceptance"] is not None and batched["tokens_per_verify"] >= 1
        adaptive = rep["modes"]["speculative_adaptive"]
        assert adaptive["identical_to_plain"] and adaptive["adaptive"]["passes"] > 0  # exact, and it chose
        wand = rep["modes"]["wand"]  # the cost gate decided, and says so
        assert wand["wand_reason"] and wand["gate"] in wand["note"]
        if not wand["wand_tested_stages"]:  # plain: the same tokens, full depth
            assert wand["gate"].endswith("decodes as plain") and wand["agreement"] == 1.0
            assert rep["agreement"]["wand_stages_per_token"] == 4.0
        # every greedy batch-1 speed is over the best plain path; speculative greedy is exact
        for name, row in rep["paths"].items():
            if "@" not in name:
                assert row["speedup"] == pytest.approx(row["tokens_per_s"] / plain["tokens_per_s"])
            assert row["ttft_s"] > 0 and row["tpot_s"] > 0
        assert all(row["identical_to_plain"] for row in rep["speculative_sweep"])
        assert [row["draft_stage"] for row in rep["speculative_sweep"]] == [0, 1, 2]
        assert 0.0 <= rep["modes"]["wand"]["agreement"] <= 1.0 and rep["agreement"]["tokens"] > 0
        assert rep["bp_plain"]["path"] == "bp_plain:eager"
        assert "exit_stage_counts" in rep["paths"]["wand:eager"]
    assert r["sets"]["outside"]["source"].startswith("poelm/outside_text.py")
    assert r["sets"]["outside"]["prompts"] == 2 and r["sets"]["outside"]["prompt_tokens"] == 8


def fake_results(reused: dict | None = None) -> dict:
    """A results.json of the shape run_experiment writes, with round numbers."""
    def ev(step, bpb):
        return {"step": step, "bpb": bpb, "stages": [bpb + 0.3, bpb + 0.2, bpb + 0.1, bpb], "logop": bpb + 0.05}

    def path(tps, **kw):
        return {"tokens_per_s": tps, "speedup": tps / 400.0, "identical_to_plain": True, "mean_stages_per_token": 4.0,
                "ttft_s": 0.01, "tpot_s": 0.002, **kw}

    def one_set(source, spec_tps, wand_tps, agree):
        gate = "exit tests at stage(s) 0, 1"
        paths = {"plain:eager": path(200.0), "plain:compiled": path(400.0), "stage0:eager": path(500.0),
                 "wand:eager": path(wand_tps, exit_stage_counts=[10, 5, 0, 497], wand_tested_stages=[0, 1],
                                    wand_reason="tested where the expected saving exceeds the test's cost"),
                 "speculative_d0:eager": path(spec_tps, acceptance=0.6, tokens_per_verify=3.1),
                 "speculative_adaptive:compiled": path(440.0, acceptance=0.5, tokens_per_verify=2.0,
                                                       adaptive={"last_choice": [[0, 4], [1, 0]], "passes": 90,
                                                                 "fallback_passes": 30, "probes": 2})}
        paths.update({"plain@T0.8:compiled": path(380.0), "speculative_d0@T0.8:compiled": path(494.0, acceptance=0.5),
                      "plain@B8:compiled": path(1600.0),
                      "speculative_d0@B8:compiled": path(2080.0, acceptance=0.55, batch_size=8)})
        for name, base in (("plain@T0.8:compiled", 380.0), ("speculative_d0@T0.8:compiled", 380.0),
                           ("plain@B8:compiled", 1600.0), ("speculative_d0@B8:compiled", 1600.0)):
            paths[name]["speedup"] = paths[name]["tokens_per_s"] / base
        paths["plain@T0.8:compiled"]["identical_to_plain"] = paths["speculative_d0@T0.8:compiled"]["identical_to_plain"] = None
        paths["plain@B8:compiled"]["identical_to_plain"] = None
        sweep = [dict(paths["speculative_d0:eager"], draft_stage=0, path="speculative_d0:eager")]
        return {"source": source, "prompts": 4, "prompt_tokens": 32, "max_new_tokens": 128, "batch_size": 8,
                "sampled": {"temperature": 0.8, "seed": 0, "prompts": 4},
                "best_plain": "plain:compiled", "paths": paths, "speculative_sweep": sweep,
                "agreement": {"stage0": 0.7, "wand": agree, "wand_stages_per_token": 3.9, "tokens": 8192},
                "bp_plain": dict(path(410.0), path="bp_plain:compiled"),
                "modes": {"plain": dict(paths["plain:compiled"], path="plain:compiled", agreement=1.0),
                          "stage0": dict(paths["stage0:eager"], path="stage0:eager", agreement=0.7),
                          "wand": dict(paths["wand:eager"], path="wand:eager", agreement=agree, gate=gate,
                                       note=f"{gate}; mean stages per token 3.90 of 4"),
                          "speculative": dict(sweep[0]),
                          "speculative_adaptive": dict(paths["speculative_adaptive:compiled"],
                                                       path="speculative_adaptive:compiled"),
                          "speculative_sampled": dict(paths["speculative_d0@T0.8:compiled"], draft_stage=0,
                                                      path="speculative_d0@T0.8:compiled",
                                                      baseline="plain@T0.8:compiled", baseline_tokens_per_s=380.0),
                          "speculative_batched": dict(paths["speculative_d0@B8:compiled"], draft_stage=0,
                                                      path="speculative_d0@B8:compiled",
                                                      baseline="plain@B8:compiled", baseline_tokens_per_s=1600.0)}}

    evals = {"bp": [ev(0, 3.5), ev(120, 1.70), ev(226, 1.60)], "poe": [ev(0, 3.5), ev(120, 1.72), ev(226, 1.616)],
             "poe_a05": [ev(0, 3.5), ev(120, 1.73)]}
    return {"config": dataclasses_config(), "model": {"n_layer": 8, "n_embd": 128, "poe_stage_layers": [2, 2, 2, 2],
                                                      "sequence_len": 256},
            "arms": {"bp": {"step": 226, "num_iterations": 226, "train_seconds": 600.0},
                     "poe": {"step": 226, "num_iterations": 226, "train_seconds": 620.0},
                     "poe_a05": {"step": 120, "num_iterations": 226, "train_seconds": 330.0}},
            "evals": evals, "gap": [], "gap_alpha05": [], "backout_compat": {},
            "alpha05_at_stop": {"step": 120, "horizon": 226, "fraction": 120 / 226,
                                "bpb": {"bp": 1.70, "poe": 1.72, "poe_a05": 1.73},
                                "gap_pct": {"poe": 100 * (1.72 / 1.70 - 1), "poe_a05": 100 * (1.73 / 1.70 - 1)}},
            "inference": {"poe": {"threads": 1, "repeats": 3, "gamma": 4, "wand_bounds": [1, 1, 1, 0],
                                  "weight_bytes": {"stage0": 2_100_000, "full": 6_820_000, "stage0_layers": 2,
                                                   "n_layer": 8},
                                  "cpu": {"threads": 1, "cpu_share": 0.47, "contended": "contended: CPU time 0.47"},
                                  "sets": {"validation": one_set("the validation split", 600.0, 380.0, 0.999),
                                           "outside": one_set("poelm/outside_text.py", 520.0, 360.0, 0.998)}}},
            "specialist": None, "wall_seconds": 1500.0, "machine": "2 CPU cores", "reused": reused or {},
            "resumed_arms": [a for a in (reused or {}) if a != "specialist"], "started": "2026-01-02 10:00",
            "commit": "abc1234",
            "paper": exp.PAPER}


def dataclasses_config() -> dict:
    import dataclasses

    return dataclasses.asdict(exp.load_config("tiny", {}))


def test_report_headline_reuse_and_stop_on_fake_results(tmp_path):
    results = fake_results({"bp": "2026-01-02 09:10", "poe": "2026-01-02 09:25"})
    top = headline(results)
    # PoE costs +1.00 % bpb (1.616 / 1.60) and buys 1.50x speculative (600 / 400), 1.10x adaptive
    # (440 / 400) and 0.95x WAND at 99.9 %
    assert top[0].startswith("- Prompts from the validation split: PoE costs **+1.00 %** bpb and buys **1.50×** decode "
                             "(speculative, exact: draft stage 0, 60 % acceptance) and **1.10×** (adaptive "
                             "speculative, exact: ended on d0/γ4, plain; 30 of 90 passes plain, 50 % acceptance) and "
                             "**0.95×** (WAND at 99.9 % agreement; exit tests at stage(s) 0, 1) and **1.30×** "
                             "sampled at T = 0.8 (speculative, exact in distribution, against plain sampling) and "
                             "**1.30×** at batch 8 (speculative, exact, against plain batch 8) and **1.25×** (stage 0 "
                             "alone at 70.0 % agreement), the greedy batch-1 speeds over the best plain path "
                             "(plain:compiled, 400 tok/s); the BP arm's plain path: 410 tok/s (bp_plain:compiled")
    assert "**1.30×** decode" in top[1] and "WAND at 99.8 % agreement" in top[1]  # the outside-text prompts
    assert reuse_line(results).startswith("Reused from an earlier call: bp (finished 2026-01-02 09:10), poe "
                                          "(finished 2026-01-02 09:25); this call (started 2026-01-02 10:00)")
    assert reuse_line(results).endswith("Code: commit abc1234.")
    assert reuse_line(fake_results()).startswith("Every part was run by this call")
    report = render_report(results)
    assert "## Headline" in report and "stopped at step 120 of 226 (53 %" in report
    assert "poe_a05 1.7300 (+1.76 % vs BP)" in report
    assert "| poe_a05 | 120 | 983,040 | 1.7300 |" in report and "+1.76 % |" in report  # gap at its own step
    assert "Ordering of the bpb at step 120, where the α=0.5 arm stopped" in report
    assert "| plain:compiled | 400.0 | 1.00× |" in report and "| BP arm, bp_plain:compiled | 410.0 |" in report
    assert "the process got 47 % of a core per thread while timing (the machine was busy" in report
    assert "- WAND (wand:eager): exit tests at stage(s) 0, 1; mean stages per token 3.90 of 4; exits per stage " \
           "(generated tokens): [10, 5, 0, 497]. Gate: tested where the expected saving" in report
    assert "- Adaptive speculative (speculative_adaptive:compiled): ended on d0/γ4, plain;" in report
    assert "| speculative_d0@T0.8:compiled | 494.0 | 1.30× | — | — | 50 % |" in report  # sampled: not compared
    assert "| plain@B8:compiled | 1600.0 | 1.00× | — | — |" in report
    assert ("Weights read per batch-1 step: stage 0 2.10 MB (2 of 8 layers and the lm_head), full depth 6.82 MB: "
            "even a bandwidth-bound step gives stage 0 at most 3.25×") in report
    assert "| speculative_d0@B8:compiled | 2080.0 | 1.30× | — | yes | 55 % |" in report
    assert ("- Batched speculative (speculative_d0@B8:compiled, the best fixed draft stage of the greedy rows): "
            "2080 tok/s against 1600 of plain@B8:compiled, 1.30×, 55 % acceptance.") in report
    # the README section says the same, from the same functions
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import readme_results
    finally:
        sys.path.pop(0)
    section = readme_results.results_section(copy.deepcopy(results))
    assert top[0] in section and "Reused from an earlier call: bp (finished 2026-01-02 09:10)" in section


def test_decode_benchmark_json_summary_on_real_text(tiny_data, tmp_path, capsys):
    data, tok = tiny_data
    tok.save(tmp_path / "tok")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import decode
    finally:
        sys.path.pop(0)
    decode.main(["--data", str(data), "--tokenizer", str(tmp_path / "tok"), "--steps", "2", "--depth", "4",
                 "--width", "64", "--prompts", "2", "--new-tokens", "6", "--repeats", "1", "--no-compile",
                 "--shape-batches", "", "--out", str(tmp_path / "d.png")])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the JSON summary is the last line
    assert summary["trained_on"].startswith("trained here on") and summary["memory_bandwidth_gb_s"] > 0
    assert set(summary["sets"]) == {"validation", "outside"}
    for s in summary["sets"].values():
        assert s["best_plain"] == "plain:eager" and s["speedups"]["plain:eager"] == 1.0
        assert {"plain", "stage0", "wand", "speculative", "speculative_adaptive"} <= set(s["modes"])
        assert s["modes"]["wand"]["gate"] and s["modes"]["speculative_adaptive"]["identical_to_plain"] is True
        assert s["modes"]["speculative"]["identical_to_plain"] is True
        roof = s["roofline"]
        assert roof["bytes_per_step"] > 0 and roof["ceiling_tokens_per_s"] > 0 and 0 < roof["mbu"]
        assert roof["ttft_ms"] > 0 and roof["tpot_ms"] > 0
        d = s["modes"]["speculative"]["path"].split(":")[0]  # the best fixed draft stage, sampled and batched
        assert f"{d}@T0.8:eager" in s["speedups"] and "logop{0,1}:eager" in s["speedups"]
        assert s["modes"]["speculative_sampled"]["path"] == f"{d}@T0.8:eager"
        batched = s["modes"]["speculative_batched"]  # batch 8, or every prompt the set has if fewer
        n = batched["path"].split("@B")[1].split(":")[0]
        assert batched["path"] == f"{d}@B{n}:eager" and 2 <= int(n) <= 8 and batched["baseline"] == f"plain@B{n}:eager"
        assert s["speedups"][batched["baseline"]] == 1.0


def test_train_stop_at_keeps_the_whole_schedule(tiny_data, tmp_path, capsys):
    """`poelm train --stop-at 2 --num-iterations 4`: two steps under the 4-step schedule (the LR of
    step 2 is the 4-step schedule's), the last eval and checkpoint at step 2, plain progress lines."""
    from poelm.cli import main
    from poelm.schedule import lr_multiplier

    data, tok = tiny_data
    tok.save(tmp_path / "tok")
    argv = ["train", "--data", str(data), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "run"),
            "--depth", "2", "--n-embd", "32", "--n-head", "2", "--seq-len", "32", "--window-pattern", "L",
            "--poe-mode", "flat", "--poe-every", "1", "--total-batch-size", "64", "--device-batch-size", "2",
            "--num-iterations", "4", "--stop-at", "2", "--eval-every", "2", "--eval-tokens", "128",
            "--warmup-steps", "1", "--warmdown-frac", "1.0", "--lr-scaling", "off", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "stopping at step 2 of the 4-step schedule (--stop-at)" in out
    assert any(line.startswith("train run: step 2/2 (100%) | loss ") for line in out.splitlines())  # plain lines
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["step"] == 2 and result["num_iterations"] == 4 and result["eval"]["step"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr_mult"] for r in records if r["type"] == "train"]
    assert lrs == [lr_multiplier(s, 4, 1, 1.0, 0.05) for s in range(2)] and lrs[1] > 0.05
    assert main(argv[:-2] + ["--stop-at", "5", "--device", "cpu"]) == 2  # beyond the horizon: one line
    assert "--stop-at 5" in capsys.readouterr().err


def test_wand_teacher_forced_exits_only_at_the_gated_stages():
    """Agreement is measured at the exit tests WAND's cost gate runs: none -> full depth, the
    final readout's tokens; one stage -> exits there or at the last stage only."""
    from poelm.engine import wand_teacher_forced

    model = tiny_model().eval()
    K = model.config.n_stages
    idx = torch.randint(model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    calib = {"wand_bounds": [0.0] * K}  # every gap passes: ungated, (almost) every position exits at stage 0
    assert (wand_teacher_forced(model, idx, calib)["depth"] == 1).float().mean() > 0.9
    none = wand_teacher_forced(model, idx, calib, stages=[])
    assert (none["depth"] == K).all() and torch.equal(none["pred"], none["full"])
    one = wand_teacher_forced(model, idx, calib, stages=[1])
    assert set(one["depth"].unique().tolist()) <= {2, K} and (one["depth"] == 2).any()
