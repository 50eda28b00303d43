"""Modes that never lose to plain decoding (docs/poe.md §4-5): the speculative decoder's own
per-pass overhead, measured and stored with the calibration, enters adaptive drafting's cost
model, which drafts only where it expects to beat plain by a margin and otherwise runs the plain
step; compiled, adaptive drafting weighs the compiled pass against the compiled plain step; and
compiled WAND weighs its staged step against the compiled plain step, not the eager one. Decisions are asserted from injected costs and acceptances (never from wall-clock time)."""

from __future__ import annotations

import json

import pytest
import torch

from poelm.engine import Engine, load_calibration, save_calibration
from poelm.engine import speculative, wand
from poelm.engine.calibrate import read_generation_config
from poelm.engine.costs import COST_POSITIONS
from poelm.engine.speculative import MARGIN, DraftChooser, speculative_overhead
from tests.conftest import tiny_model
from tests.test_compiled_modes import assert_decisive

K = 4  # the tiny model's stages (one layer each)
N_NEW = 60


def costs(stage=(1e-3, 1.5e-3), test=(2e-4, 5e-4), overhead: float | None = 2e-4) -> dict:
    """A cost model shaped like a measured one: every stage's layers `stage`, every test `test` (1, 8 positions)."""
    out = {"device": "cpu", "threads": 1, "positions": list(COST_POSITIONS),
           "stage_s": [list(stage) for _ in range(K)], "test_s": [list(test) for _ in range(K)]}
    if overhead is not None:
        out["speculative_overhead_s"] = overhead
    return out


def prompts() -> list[list[int]]:
    return [list(range(3, 15)), [7, 8, 9, 10, 11]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3).eval()


# -----------------------------------------------------------------------------
# The chooser's arithmetic


def test_the_pass_overhead_enters_the_expected_speed():
    flat = costs(stage=(1e-3, 1e-3), test=(0.0, 0.0), overhead=None)
    free = DraftChooser(flat, [0], 4, [0.5], probe=8)
    taxed = DraftChooser(dict(flat, speculative_overhead_s=1e-3), [0], 4, [0.5], probe=8)
    # plain: 4 stages; (d=0, g=1): 2 x stage 0 + stages 1..3 = 5 stages (+ 1 of overhead) for 1.5 tokens
    assert free.speedup(0, 1, 0.5) == pytest.approx(4 * 1.5 / 5)
    assert taxed.speedup(0, 1, 0.5) == pytest.approx(4 * 1.5 / 6)


@pytest.mark.parametrize("overhead,drafts", [(0.0, True), (1e-3, False)])
def test_the_overhead_can_turn_drafting_into_plain(overhead, drafts):
    """At acceptance 0.42, (d=0, g=1) is 4 x 1.42 / 5 = 1.14x without the pass overhead and
    4 x 1.42 / 6 = 0.95x with one stage's worth of it."""
    chooser = DraftChooser(costs(stage=(1e-3, 1e-3), test=(0.0, 0.0), overhead=overhead), [0], 1, [0.42], probe=8)
    assert chooser.speedup(0, 1, 0.42) == pytest.approx(4 * 1.42 / (6 if overhead else 5))
    assert chooser.next_pass() == ((0, 1) if drafts else (0, 0))


def test_a_gain_inside_the_margin_runs_plain():
    # 4 (1 + a) / 5 = 1.04 at a = 0.3: more than plain, less than 1 + MARGIN
    chooser = DraftChooser(costs(stage=(1e-3, 1e-3), test=(0.0, 0.0), overhead=0.0), [0], 1, [0.3], probe=100)
    assert 1 < chooser.speedup(0, 1, 0.3) < 1 + MARGIN
    assert [chooser.next_pass()[1] for _ in range(5)] == [0] * 5


# -----------------------------------------------------------------------------
# A random-weight model: low acceptance


@pytest.fixture(scope="module")
def random_model():
    return tiny_model(seed=3, noise=0.2).eval()  # stages that agree with the last on 4 - 22 % of drafts


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("prior", [None, [0.05, 0.05, 0.2]])
def test_random_model_adaptive_runs_plain_and_keeps_plain_speed(random_model, batch, prior):
    """Acceptance on a random model is low: with measured-like costs, and the acceptance measured
    by its first pass or the calibration's agreement as the prior, the chooser runs the plain step
    for most passes, and its predicted speed over the passes it ran (with the acceptance they
    met) stays within 10 % of plain; greedy tokens stay plain greedy's."""
    calib = {"decode_costs": costs()} | ({"stage_agreement": prior} if prior else {})
    rows = prompts()[:batch]
    plain = Engine(random_model).generate(rows, max_new_tokens=N_NEW, stop_token_ids=[])
    out = Engine(random_model, calibration=calib).generate(rows, mode="speculative", adaptive=True, gamma=4,
                                                    max_new_tokens=N_NEW, stop_token_ids=[])
    assert [g.tokens for g in out] == [g.tokens for g in plain]
    choice = out[0].stats["speculative_choice"]
    assert choice["fallback_passes"] >= 0.75 * choice["passes"] and out[0].stats["drafted"] > 0
    assert choice["acceptance"][str(choice["draft_stage"])] < 0.6  # the estimate came down to what drafting measured
    assert choice["predicted_speedup"] >= 0.9


@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_adaptive_plain_passes_run_the_compiled_plain_step(random_model, batch, monkeypatch):
    """Compiled, a pass that does not draft is the compiled plain step: the tokens are eager plain greedy's."""
    monkeypatch.setattr(speculative, "compiled_pass_costs", lambda m, backend, mode, d, g: pass_costs(0.5, 0.5))
    rows = prompts()[:batch]
    calib = {"decode_costs": costs(), "stage_agreement": [0.05, 0.05, 0.2]}
    plain = Engine(random_model).generate(rows, max_new_tokens=20, stop_token_ids=[])
    torch._dynamo.reset()
    out = Engine(random_model, calibration=calib, compile="aot_eager").generate(
        rows, mode="speculative", adaptive=True, gamma=4, max_new_tokens=20, stop_token_ids=[])
    assert [g.tokens for g in out] == [g.tokens for g in plain]
    assert out[0].stats["speculative_choice"]["fallback_passes"] > 0
    for p, g in zip(rows, plain):
        assert_decisive(random_model, p, g.tokens)


def pass_costs(pass_ratio: float, plain_ratio: float) -> dict:
    """compiled_pass_costs' figures: the compiled pass and plain step at these fractions of the eager ones."""
    return {"eager_plain_s": 4e-3, "compiled_plain_s": 4e-3 * plain_ratio,
            "eager_pass_s": 1e-2, "compiled_pass_s": 1e-2 * pass_ratio}


def test_compiled_costs_scale_the_speedup_by_the_two_compile_savings():
    """Compiled / eager: pass 0.25, plain step 0.5, so every choice's speed-up doubles, and the
    predicted speed-up is counted against the compiled plain step."""
    eager = DraftChooser(costs(), [0, 1, 2], 4, [0.6] * 3, probe=8)
    compiled = DraftChooser(costs(), [0, 1, 2], 4, [0.6] * 3, probe=8)
    compiled.compiled(pass_costs(0.25, 0.5), 0, 4)
    for d, g in eager.pass_s:
        assert compiled.speedup(d, g, 0.6) == pytest.approx(2 * eager.speedup(d, g, 0.6))
    assert compiled.next_pass() == eager.next_pass()
    compiled.passed(2.0)
    assert compiled.report()["predicted_speedup"] == pytest.approx(2 * compiled.plain_s / compiled.pass_s[0, 1])
    assert compiled.report()["costs"] == "compiled costs: the eager pass x 0.25 (compiled / eager pass, d0/γ4), " \
                                         "the plain step x 0.50 (compiled / eager plain step)"


@pytest.mark.parametrize("agreement,pass_ratio,drafts", [(0.9, 1.0, False), (0.4, 0.25, True)])
def test_compiled_adaptive_weighs_the_compiled_pass_against_compiled_plain(monkeypatch, agreement, pass_ratio, drafts):
    """At agreement 0.9 the eager costs expect 1.68x from d0/γ4, but a pass that compiling does
    not speed up against a plain step it halves gives 0.84x: compiled adaptive decoding runs the
    compiled plain step, with plain greedy's tokens. At 0.4 the eager costs expect 1.00x (plain),
    but a pass compiled to a quarter against a plain step halved gives 2.01x: it drafts."""
    model = tiny_model(seed=5).eval()  # a fresh model: the compiled costs are measured once per model
    monkeypatch.setattr(speculative, "compiled_pass_costs",
                        lambda m, backend, mode, d, g: pass_costs(pass_ratio, 0.5))
    calib = {"decode_costs": costs(), "stage_agreement": [agreement] * (K - 1)}
    eager_speedup = DraftChooser(costs(), [0, 1, 2], 4, [agreement] * 3, probe=8)._best()[2]
    assert (eager_speedup > 1 + MARGIN) != drafts
    plain = Engine(model).generate(prompts(), max_new_tokens=20, stop_token_ids=[])
    torch._dynamo.reset()
    out = Engine(model, calibration=calib, compile="aot_eager").generate(
        prompts(), mode="speculative", adaptive=True, gamma=4, adaptive_probe=1000, max_new_tokens=20,
        stop_token_ids=[])
    assert [g.tokens for g in out] == [g.tokens for g in plain]
    stats = out[0].stats
    choice = stats["speculative_choice"]
    assert choice["costs"].startswith(f"compiled costs: the eager pass x {pass_ratio:.2f}")
    if drafts:
        assert stats["drafted"] > 0 and choice["fallback_passes"] < choice["passes"]
    else:
        assert stats["drafted"] == 0 and choice["fallback_passes"] == choice["passes"]
        assert choice["reason"] == "plain: the best drafting, d0/γ4, is expected at 0.84x over plain, within " \
                                   "1 + margin (1.05x)"
    for p, g in zip(prompts(), plain):
        assert_decisive(model, p, g.tokens)


def test_compiled_pass_costs_are_measured_once_per_model_backend_and_reference(monkeypatch):
    model = tiny_model(seed=6).eval()
    calls = []
    monkeypatch.setattr(speculative, "compiled_pass_costs",
                        lambda m, backend, mode, d, g: calls.append((backend, d, g)) or pass_costs(0.5, 0.5))
    calib = {"decode_costs": costs(), "stage_agreement": [0.0] * (K - 1)}
    for backend, gamma in (("aot_eager", 4), ("aot_eager", 4), ("eager", 4), ("eager", 2)):
        torch._dynamo.reset()
        Engine(model, calibration=calib, compile=backend).generate([1, 2, 3], mode="speculative", adaptive=True,
                                                                   gamma=gamma, max_new_tokens=2, stop_token_ids=[])
    Engine(model, calibration=calib, compile="eager").generate([1, 2, 3], mode="speculative", gamma=4,
                                                               max_new_tokens=2, stop_token_ids=[])  # not adaptive
    assert calls == [("aot_eager", 0, 4), ("eager", 0, 4), ("eager", 0, 2)]


def test_compiled_pass_costs_are_measured(model):
    torch._dynamo.reset()
    measured = speculative.compiled_pass_costs(model, "eager", None, 1, 2, repeats=1, steps=4)
    assert set(measured) == {"eager_plain_s", "compiled_plain_s", "eager_pass_s", "compiled_pass_s"}
    assert all(isinstance(t, float) and 0 < t < 1 for t in measured.values())


def test_predicted_speed_accounts_every_pass():
    chooser = DraftChooser(costs(stage=(1e-3, 1e-3), test=(0.0, 0.0), overhead=0.0), [0], 1, [1.0], probe=8)
    assert chooser.next_pass() == (0, 1)  # 5 stages' time for the pass
    chooser.passed(2.0)  # both tokens
    assert chooser.report()["predicted_speedup"] == pytest.approx(2 * 4 / 5)


# -----------------------------------------------------------------------------
# The overhead: measured, stored, validated, measured once per model without a calibration


def test_speculative_overhead_is_measured_and_stored(model, tmp_path):
    overhead = speculative_overhead(model, repeats=1, steps=4)
    assert isinstance(overhead, float) and 0 <= overhead < 1
    calib = {"wand_bounds": [0.0, 0.3, 0.3, 0.3], "decode_costs": costs(overhead=overhead)}
    (tmp_path / "generation_config.json").write_text("{}")
    save_calibration(tmp_path, calib)
    assert load_calibration(tmp_path)["decode_costs"]["speculative_overhead_s"] == overhead


def test_a_bad_stored_overhead_is_one_line(tmp_path):
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"wand_bounds": [0.0, 0.3], "decode_costs": costs(overhead=-1.0)}))
    with pytest.raises(ValueError, match="field 'speculative_overhead_s' must be >= 0") as err:
        read_generation_config(path)
    assert "\n" not in str(err.value) and "poelm calibrate" in str(err.value)


def test_a_calibration_without_the_overhead_measures_it_once_per_model(monkeypatch):
    model = tiny_model(seed=4).eval()
    calls = []
    monkeypatch.setattr(speculative, "speculative_overhead", lambda m: calls.append(m) or 3e-4)
    engine = Engine(model, calibration={"decode_costs": costs(overhead=None), "stage_agreement": [0.0] * (K - 1)})
    for _ in range(2):
        engine.generate([1, 2, 3], mode="speculative", adaptive=True, max_new_tokens=4, stop_token_ids=[])
    assert calls == [model]


# -----------------------------------------------------------------------------
# Compiled WAND: the gate on compiled costs


def wand_calib() -> dict:
    """Stage 1 alone exits (rate 0.5): its test saves 0.5 x 2 stages x 929 us (1 ms less the 71 us
    a back-filled position adds to the next deep pass) = 929 us per token against its 200 us and
    100 us of staging, so on eager costs the staged step beats plain by 629 us per token."""
    return {"wand_bounds": [0.0, 0.3, 0.3, 0.3], "wand_exit_rates": {"factors": [1.0], "rates": [[0.0, 0.5, 0.0]]},
            "decode_costs": dict(costs(overhead=None), wand_overhead_s=1e-4)}


def compiled_costs(staged_s: float) -> dict:
    """compiled_step_costs' figures: the compiled plain step at half the eager one's 4 ms."""
    return {"eager_plain_s": 4e-3, "compiled_plain_s": 2e-3, "staged_s": staged_s}


def wand_generate(model, compiled: bool) -> list:
    engine = Engine(model, calibration=wand_calib(), compile="aot_eager" if compiled else False)
    return engine.generate(prompts(), mode="wand", max_new_tokens=20, stop_token_ids=[])


@pytest.mark.parametrize("staged_s,staged", [(2.6e-3, False), (2.3e-3, True)])
def test_compiled_wand_weighs_the_staged_step_against_compiled_plain(monkeypatch, staged_s, staged):
    """Eager, stage 1's test pays. Compiled, its saving scales with the compiled / eager plain step
    (929 x 0.5 = 464 us per token) and its cost is what the compiled staged step, exiting
    nowhere, measured over the compiled plain step: at 600 us compiled WAND decodes as compiled
    plain, with plain greedy's tokens and no exit; at 300 us the staged step runs."""
    model = tiny_model(seed=3).eval()  # a fresh model: the costs are measured once per model
    monkeypatch.setattr(wand, "compiled_step_costs", lambda m, backend, mode, tested: compiled_costs(staged_s))
    assert wand_generate(model, False)[0].stats["wand_tested_stages"] == [1]
    torch._dynamo.reset()
    out = wand_generate(model, True)
    stats = out[0].stats
    figures = f"per token 464 us saved (the eager 929 us x 0.50, the compiled / eager plain step) vs " \
              f"{1e6 * (staged_s - 2e-3):.0f} us that the compiled staged step's tests and staging cost"
    assert stats["wand_tested_stages"] == ([1] if staged else []) and figures in stats["wand_reason"]
    if staged:
        assert stats["wand_reason"].startswith("compiled: tested where the expected saving exceeds the test's cost")
        return
    assert stats["wand_reason"].startswith("compiled: ") and stats["wand_reason"].endswith("decodes as compiled plain")
    assert stats["exit_stage_counts"][:-1] == [0] * (K - 1)
    plain = Engine(model).generate(prompts(), max_new_tokens=20, stop_token_ids=[])
    assert [g.tokens for g in out] == [g.tokens for g in plain]
    for p, g in zip(prompts(), plain):
        assert_decisive(model, p, g.tokens)


@pytest.mark.parametrize("forgone,tested", [(1e-3, False), (5e-4, True)])
def test_an_eager_staged_step_also_forgoes_the_compiled_plain_saving(forgone, tested):
    """Where the staged step runs eagerly (target logop), it must also win back what the compiled
    plain step saves over the eager one: 929 us saved vs 300 us + 1 ms does not pay, vs 300 us +
    500 us does."""
    compiled = {"eager_plain_s": 4e-3, "compiled_plain_s": 4e-3 - forgone}
    plan, why = wand.compiled_plan([False, True, False], 929e-6, 300e-6, "", compiled)
    assert plan == [False, tested, False]
    assert f"929 us saved vs 300 us of tests and staging + {1e6 * forgone:.0f} us that the compiled plain step " \
           f"saves over the eager one" in why


def test_compiled_costs_are_measured_once_per_model_backend_and_plan(monkeypatch):
    """Measured where the eager costs make a test pay, once per model, backend, mode and plan; never
    where they choose plain decoding already (compiled WAND then is compiled plain anyway)."""
    model = tiny_model(seed=4).eval()
    calls = []
    monkeypatch.setattr(wand, "compiled_step_costs",
                        lambda m, backend, mode, tested: calls.append((backend, tested)) or compiled_costs(2.3e-3))
    for backend in ("aot_eager", "aot_eager", "eager"):
        torch._dynamo.reset()
        Engine(model, calibration=wand_calib(), compile=backend).generate([1, 2, 3], mode="wand", max_new_tokens=2,
                                                                          stop_token_ids=[])
    plain_calib = dict(wand_calib(), wand_exit_rates={"factors": [1.0], "rates": [[0.0, 0.0, 0.0]]})
    Engine(model, calibration=plain_calib, compile="aot_eager").generate([1, 2, 3], mode="wand", max_new_tokens=2,
                                                                         stop_token_ids=[])
    assert calls == [("aot_eager", [False, True, False]), ("eager", [False, True, False])]


def test_compiled_step_costs_are_measured(model):
    torch._dynamo.reset()
    measured = wand.compiled_step_costs(model, "eager", None, [False, True, False], repeats=1, steps=4)
    assert set(measured) == {"eager_plain_s", "compiled_plain_s", "staged_s"}
    assert all(isinstance(t, float) and 0 < t < 1 for t in measured.values())
