"""Modes that know their cost (docs/poe.md §4-5): the calibration's measured costs and exit rates,
WAND testing only where a test pays (else decoding as plain), speculative decoding choosing its
draft stage and gamma from measured acceptance and falling back to plain where drafting does not
pay; and the compiled modes giving the eager modes' tokens."""

from __future__ import annotations

import json
import math

import pytest
import torch

from poelm.engine import DecodeOptions, Engine, WandDecoder, calibrate, load_calibration, save_calibration
from poelm.engine.calibrate import EXIT_RATE_FACTORS, exit_rates, read_generation_config
from poelm.engine.costs import COST_POSITIONS
from poelm.engine.wand import exit_rates_at
from tests.conftest import tiny_model

K = 4  # the tiny model's stages (one layer each)


def prompts() -> list[list[int]]:
    return [list(range(3, 15)), [7, 8, 9, 10, 11], [40, 41, 42, 43, 44, 45, 46]]


def costs(stage: float = 1e-3, test: float = 1e-4) -> dict:
    """A cost model: every stage's layers cost `stage` s, every exit test `test` s (1 and 8 positions alike)."""
    return {"device": "cpu", "threads": 1, "positions": list(COST_POSITIONS),
            "stage_s": [[stage, stage] for _ in range(K)], "test_s": [[test, test] for _ in range(K)]}


def wand_calib(rates: list[float], bounds=(0.0, 0.3, 0.3, 0.3), **cost) -> dict:
    return {"wand_bounds": list(bounds), "wand_exit_rates": {"factors": [1.0], "rates": [rates]},
            "decode_costs": costs(**cost)}


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3).eval()


# -----------------------------------------------------------------------------
# Calibration: costs, exit rates, agreement


def test_calibration_measures_costs_rates_and_agreement(model, tmp_path):
    batches = [torch.randint(300, (2, 32), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    calib = calibrate(model, batches)
    c = calib["decode_costs"]
    assert c["positions"] == [1, 8] and c["device"] == "cpu" and c["threads"] == torch.get_num_threads()
    assert len(c["stage_s"]) == K and len(c["test_s"]) == K
    assert all(len(r) == 2 and all(0 < t < 1 for t in r) for r in c["stage_s"] + c["test_s"])
    assert 0 <= c["wand_overhead_s"] < 1
    table = calib["wand_exit_rates"]
    assert table["factors"] == list(EXIT_RATE_FACTORS) and all(len(r) == K - 1 for r in table["rates"])
    assert all(0 <= a <= 1 for a in calib["stage_agreement"]) and len(calib["stage_agreement"]) == K - 1
    # a factor of 0 exits every position whose top two differ, at stage 0
    assert table["rates"][0][0] > 0.9
    (tmp_path / "generation_config.json").write_text("{}")
    save_calibration(tmp_path, calib)
    assert load_calibration(tmp_path) == calib


def test_exit_rates_are_conditional_on_reaching_the_stage():
    gaps = [torch.tensor([5.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 5.0, 0.0, 0.0])]
    assert exit_rates(gaps, [1.0, 1.0]) == [0.25, 1 / 3]
    table = {"factors": [0.5, 1.0, 2.0], "rates": [[0.9], [0.5], [0.1]]}
    assert exit_rates_at(table, 1.0) == [0.5] and exit_rates_at(table, 1.5) == [0.1]  # the next factor up
    assert exit_rates_at(table, 0.0) == [0.9] and exit_rates_at(table, 3.0) == [0.0]


@pytest.mark.parametrize("field,value,message", [
    ("decode_costs", {"positions": [1, 8], "stage_s": [[1e-3]], "test_s": []}, "'stage_s' must hold, per stage, 2"),
    ("decode_costs", {"positions": [0], "stage_s": [], "test_s": []}, "'positions' must be a list of integers >= 1"),
    ("wand_exit_rates", {"factors": [1.0], "rates": [[1.5]]}, "'wand_exit_rates' must hold factors >= 0"),
    ("stage_agreement", [0.5, -1], "'stage_agreement' must be a list of numbers from 0 to 1"),
])
def test_bad_cost_fields_are_one_line(tmp_path, field, value, message):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"wand_bounds": [0.0, 1.0], field: value}))
    with pytest.raises(ValueError, match=message) as e:
        read_generation_config(path)
    assert "\n" not in str(e.value) and "poelm calibrate" in str(e.value)


def test_a_calibration_for_other_stages_is_refused(model):
    calib = dict(wand_calib([0.5] * (K - 1)), stage_agreement=[0.5])
    with pytest.raises(ValueError, match="stage_agreement must hold 3 numbers; re-run `poelm calibrate`"):
        Engine(model, calibration=calib).generate([1, 2, 3], mode="wand")


# -----------------------------------------------------------------------------
# WAND tests only where a test pays


def wand(model, calib, rows=None, n=24, **kw):
    rows = rows or prompts()
    return Engine(model, calibration=calib).generate(rows, mode="wand", max_new_tokens=n, stop_token_ids=[], **kw)


def test_wand_where_no_test_pays_decodes_as_plain(model):
    """Exit rate 0 at every stage: no test runs, the tokens are plain greedy's, one pass per step."""
    plain = Engine(model).generate(prompts(), max_new_tokens=24, stop_token_ids=[])
    out = wand(model, wand_calib([0.0] * (K - 1)))
    assert [g.tokens for g in out] == [g.tokens for g in plain]
    stats = out[0].stats
    assert stats["wand_tested_stages"] == [] and "no exit test pays" in stats["wand_reason"]
    assert stats["exit_stage_counts"] == [0, 0, 0, 3 * 24] and stats["mean_stages_per_token"] == K
    assert stats["mean_layer_calls_per_token"] == plain[0].stats["mean_layer_calls_per_token"]
    dec = WandDecoder(model, DecodeOptions(mode="wand", calibration=wand_calib([0.0] * (K - 1))), 64)
    dec.add_rows(prompts())
    assert dec.x0 is None  # no kept inputs: nothing ever lags


def test_wand_tests_exactly_where_saving_exceeds_cost(model):
    """Stage k's saving is rate_k x (K-1-k) stages x 1 ms against a 0.5 ms test: stage 0 (rate 0.1,
    0.3 ms) and stage 2 (rate 0.4, 0.4 ms) do not pay, stage 1 (rate 0.5, 1 ms) does."""
    calib = wand_calib([0.1, 0.5, 0.4], test=5e-4)
    out = wand(model, calib)
    stats = out[0].stats
    assert stats["wand_tested_stages"] == [1] and "stage 1: exit rate 0.50, saving 1000 us vs test 500 us" in \
        stats["wand_reason"]
    assert stats["exit_stage_counts"][0] == 0 and stats["exit_stage_counts"][2] == 0


def test_wand_staging_overhead_can_outweigh_every_test(model):
    """Stage 1's test pays alone (1 ms saved vs 0.5 ms) but not with the staged step's 1 ms overhead."""
    calib = wand_calib([0.1, 0.5, 0.4], test=5e-4)
    calib["decode_costs"]["wand_overhead_s"] = 1e-3
    out = wand(model, calib)
    assert out[0].stats["wand_tested_stages"] == [] and "does not cover their cost and the staged step's " \
        "overhead (1500 us" in out[0].stats["wand_reason"]
    plain = Engine(model).generate(prompts(), max_new_tokens=24, stop_token_ids=[])
    assert [g.tokens for g in out] == [g.tokens for g in plain]


def test_wand_saving_counts_the_back_fill(model):
    """A skipped stage is run later with the next deep position: its saving is its one-position
    cost less the cost of one more position (here 1 ms at 1 position, 1.7 ms at 8: 0.9 ms)."""
    calib = wand_calib([0.0, 0.0, 1.0], test=8.5e-4)
    calib["decode_costs"]["stage_s"][3] = [1e-3, 1.7e-3]
    assert "stage 2: exit rate 1.00, saving 900 us vs test 850 us" in wand(model, calib, n=2)[0].stats["wand_reason"]


@pytest.mark.parametrize("factor", [0.0, 0.5])
def test_wand_where_every_test_pays_gives_the_tokens_of_before(model, factor):
    """Every test pays: the decisions (tokens, exit histogram) are those WAND made before it knew costs."""
    before = wand(model, {"wand_bounds": [0.0, 0.3, 0.3, 0.3]}, wand_factor=factor)
    assert "no measured costs" in before[0].stats["wand_reason"]
    paid = {"wand_bounds": [0.0, 0.3, 0.3, 0.3], "decode_costs": costs(),
            "wand_exit_rates": {"factors": [8.0], "rates": [[1.0] * (K - 1)]}}
    out = wand(model, paid, wand_factor=factor)
    assert [g.tokens for g in out] == [g.tokens for g in before]
    assert out[0].stats["exit_stage_counts"] == before[0].stats["exit_stage_counts"]
    assert out[0].stats["wand_tested_stages"] == [0, 1, 2] and sum(out[0].stats["exit_stage_counts"][:-1]) > 0


def test_wand_rates_past_the_largest_calibrated_factor_test_nothing(model):
    out = wand(model, wand_calib([1.0] * (K - 1)), wand_factor=2.0)  # rates stored at factor 1 only
    assert out[0].stats["wand_tested_stages"] == []


# -----------------------------------------------------------------------------
# Adaptive speculative decoding


def spec_calib(agreement: list[float], stage: float = 1e-3, test: float = 1e-5) -> dict:
    return {"decode_costs": costs(stage, test), "stage_agreement": agreement}


def test_expected_tokens_and_the_chooser_arithmetic():
    from poelm.engine.speculative import DraftChooser, expected_tokens

    assert expected_tokens(0.0, 4) == 1 and expected_tokens(1.0, 4) == 5
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    chooser = DraftChooser(costs(1e-3, 0.0), [0, 1, 2], 8, [0.0, 0.0, 0.0], probe=3)
    # plain: 4 stages; (d=0, g=1): 2 x stage 0 + stages 1..3 = 5 stages for 1 token
    assert chooser.speedup(0, 1, 0.0) == pytest.approx(4 / 5) and chooser.speedup(0, 0, 0.3) == pytest.approx(1)
    assert [chooser.next_pass()[1] for _ in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]  # plain, probing every 3
    assert chooser.report()["fallback_passes"] == 6 and chooser.report()["probes"] == 2
    sure = DraftChooser(costs(1e-3, 0.0), [0, 1, 2], 8, [1.0, 1.0, 1.0], probe=3)
    assert sure.next_pass() == (0, 8)  # every draft accepted: the cheapest stage, the longest draft
    sure.observe(0, 8, 0)  # a rejection moves stage 0's estimate by EMA_WEIGHT
    assert sure.acceptance[0] == pytest.approx(0.9)


PENALTIES = dict(presence_penalty=1.0, frequency_penalty=0.5)  # plain passes and drafting passes count alike


@pytest.mark.parametrize("calib,regime,opts", [(spec_calib([0.95, 0.95, 0.95]), "drafts", {}),
                                               (spec_calib([0.0, 0.0, 0.0]), "falls back", {}),
                                               (None, "measures", {}),
                                               (spec_calib([0.0, 0.0, 0.0]), "falls back", PENALTIES)])
def test_adaptive_speculative_greedy_is_plain_greedy(model, calib, regime, opts):
    plain = Engine(model).generate(prompts(), max_new_tokens=30, stop_token_ids=[], **opts)
    out = Engine(model, calibration=calib).generate(prompts(), mode="speculative", adaptive=True, gamma=4,
                                                    adaptive_probe=4, max_new_tokens=30, stop_token_ids=[], **opts)
    assert [g.tokens for g in out] == [g.tokens for g in plain]
    choice = out[0].stats["speculative_choice"]
    assert set(choice) >= {"draft_stage", "gamma", "expected_speedup", "fallback_passes", "probes", "acceptance"}
    if regime == "falls back":
        assert choice["fallback_passes"] > 0 and choice["probes"] > 0 and out[0].stats["drafted"] > 0
    else:
        assert out[0].stats["drafted"] > 0


def test_adaptive_speculative_sampling_while_falling_back_is_plain_sampling(model):
    """Plain passes draw the target's token with the sampler's generator exactly as plain decoding does."""
    opts = dict(temperature=0.9, top_k=20, seed=5, max_new_tokens=20, stop_token_ids=[])
    plain = Engine(model).generate(prompts()[0], **opts)
    out = Engine(model, calibration=spec_calib([0.0] * (K - 1))).generate(
        prompts()[0], mode="speculative", adaptive=True, adaptive_probe=1000, **opts)
    assert out.tokens == plain.tokens and out.stats["drafted"] == 0


@pytest.mark.parametrize("kw,message", [(dict(adaptive=True, adaptive_gamma=True), "adaptive and adaptive_gamma"),
                                        (dict(adaptive=True, adaptive_probe=0), "adaptive_probe must be an integer >= 1"),
                                        (dict(adaptive="yes"), "adaptive must be true or false")])
def test_adaptive_options_are_checked(model, kw, message):
    with pytest.raises(ValueError, match=message):
        Engine(model).generate([1, 2, 3], mode="speculative", **kw)
