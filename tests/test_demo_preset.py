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
from poelm.inference_bench import measure_modes
from poelm.tokenizer import Tokenizer
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
                      repeats=1, bp_model=bp, compile=False)
    assert set(r["sets"]) == {"validation", "outside"} and r["threads"] == 1 and 0 < r["cpu_share"] <= 1.5
    for rep in r["sets"].values():
        plain = rep["modes"]["plain"]
        assert plain["path"] == rep["best_plain"] == "plain:eager" and plain["speedup"] == 1.0
        assert set(rep["modes"]) == {"plain", "stage0", "wand", "speculative"}
        # every speed is over the best plain path; speculative greedy is exact
        for name, row in rep["paths"].items():
            assert row["speedup"] == pytest.approx(row["tokens_per_s"] / plain["tokens_per_s"])
            assert row["ttft_s"] > 0 and row["tpot_s"] > 0
        assert all(row["identical_to_plain"] for row in rep["speculative_sweep"])
        assert [row["draft_stage"] for row in rep["speculative_sweep"]] == [0, 1, 2]
        assert 0.0 <= rep["modes"]["wand"]["agreement"] <= 1.0 and rep["agreement"]["tokens"] > 0
        assert rep["bp_plain"]["path"] == "bp_plain:eager"
        assert "exit_stage_counts" in rep["paths"]["wand:eager"]
    assert r["sets"]["outside"]["source"].startswith("poelm/outside_text.py")
    assert r["sets"]["outside"]["prompts"] == 2 and r["sets"]["outside"]["prompt_tokens"] == 8
