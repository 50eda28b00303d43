"""Every compilable mode on the compiled path (docs/poe.md "Decoding options"): compiled and eager
decoding give the same greedy tokens at batch 1 and batch > 1, the graphs compile once (no
recompilation across steps), compiled speculative sampling follows the target distribution, and
the registry's `compilable` is what make_decoder accepts.

The compiled side uses the "aot_eager" backend: the traced graph runs the same aten kernels as
eager decoding (only the compiled attention's three q/k/v matmuls differ from eager's one fused
matmul, by rounding), so greedy tokens agree wherever the eager top-1/top-2 gap is decisive;
every comparison below checks that gap first."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from poelm.engine import Engine, capabilities, make_decoder
from poelm.engine.options import DecodeOptions
from poelm.engine.registry import COMPILABLE_MODES, MODES
from poelm.engine.sampling import Sampler
from tests.conftest import tiny_model

BACKEND = "aot_eager"
PROMPTS = [list(range(3, 15)), [7, 8, 9, 10, 11]]  # ragged: left-padded rows
N_NEW = 20
WAND_PLAIN = {"wand_bounds": [0.0, 0.3, 0.3, 0.3], "wand_exit_rates": {"factors": [1.0], "rates": [[0.0, 0.0, 0.0]]},
              "decode_costs": {"device": "cpu", "threads": 1, "positions": [1, 8], "stage_s": [[1e-3, 1e-3]] * 4,
                               "test_s": [[1e-4, 1e-4]] * 4}}  # no exit test pays: WAND decodes as plain
WAND_STAGED = {"wand_bounds": [0.0, 0.02, 0.02, 0.02]}  # no costs: every stage is tested (low bounds: some exit)

CASES = [("final", {}), ("stage", dict(stage=1)), ("logop", dict(stages=[0, 2])),
         ("speculative", dict(gamma=3)), ("speculative", dict(gamma=2, draft_stage=1, repetition_penalty=1.3)),
         ("speculative", dict(gamma=2, adaptive_gamma=True)),
         ("wand", dict(calibration=WAND_PLAIN)), ("wand", dict(calibration=WAND_STAGED, wand_factor=1.0))]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3).eval()


def generate(model, prompts, compiled: bool, **opts) -> list:
    engine = Engine(model, compile=BACKEND if compiled else False)
    return engine.generate(prompts, max_new_tokens=N_NEW, stop_token_ids=[], **opts)


@torch.no_grad()
def assert_decisive(model, prompt: list[int], tokens: list[int], penalty: float = 1.0) -> None:
    """Every greedy token wins the full forward's readout by more than cross-shape rounding
    (with a repetition penalty the readout differs per position: not checked)."""
    if penalty != 1.0:
        return
    logits = model(torch.tensor([prompt + tokens[:-1]]))[0][len(prompt) - 1:]
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min().item() > 1e-4


@pytest.mark.parametrize("mode,opts", CASES, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CASES)])
@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_greedy_tokens_equal_eager_without_recompiling(model, mode, opts, batch):
    prompts = PROMPTS[:batch]
    eager = generate(model, prompts, False, mode=mode, **opts)
    torch._dynamo.reset()
    counters.clear()
    compiled = generate(model, prompts, True, mode=mode, **opts)
    assert [g.tokens for g in compiled] == [g.tokens for g in eager]
    assert all(len(g.tokens) == N_NEW for g in compiled)
    graphs = counters["stats"]["unique_graphs"]
    if mode == "speculative":
        # a draft and a verify graph per batch size (rows advance unevenly: a row that fills its
        # context leaves first) and per width (adaptive_gamma: powers of two, <= 4 here)
        assert graphs <= 2 * batch * (3 if opts.get("adaptive_gamma") else 1) and compiled[0].stats["drafted"] > 0
        plain = generate(model, prompts, False, repetition_penalty=opts.get("repetition_penalty", 1.0))
        assert [g.tokens for g in compiled] == [g.tokens for g in plain]  # and so plain greedy's
    elif mode == "wand" and opts["calibration"] is WAND_STAGED:
        # staged: a segment per stage and width (1 for stage 0; 1, 2, 4, 8 for the others), exits early
        assert 0 < graphs <= 1 + 4 * 3 and sum(compiled[0].stats["exit_stage_counts"][:-1]) > 0
        assert compiled[0].stats["exit_stage_counts"] == eager[0].stats["exit_stage_counts"]
    else:
        assert graphs == 1  # one graph for every step: no recompilation
    for p, g in zip(prompts, eager):
        assert_decisive(model, p, g.tokens, opts.get("repetition_penalty", 1.0))


def test_compiled_step_compiles_once_across_passes(model):
    """A second generate of the same shapes reuses the graphs: nothing compiles again."""
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, compile=BACKEND)
    first = engine.generate(PROMPTS, mode="speculative", gamma=3, max_new_tokens=N_NEW, stop_token_ids=[])
    graphs = counters["stats"]["unique_graphs"]
    again = engine.generate(PROMPTS, mode="speculative", gamma=3, max_new_tokens=N_NEW, stop_token_ids=[])
    assert [g.tokens for g in again] == [g.tokens for g in first]
    assert counters["stats"]["unique_graphs"] == graphs == 2


@pytest.mark.parametrize("mode", MODES)
def test_registry_compilable_is_what_make_decoder_accepts(model, mode):
    opts = DecodeOptions(mode=mode, calibration=WAND_PLAIN)
    assert capabilities(mode).compilable == (mode in COMPILABLE_MODES)
    if capabilities(mode).compilable:
        dec = make_decoder(model, opts, 16, compile="eager")
        assert dec._compiled is not None and dec.max_len == 64  # a power-of-two bucket of capacity + scratch
    else:
        with pytest.raises(ValueError, match=f"mode {mode} decodes eagerly"):
            make_decoder(model, opts, 16, compile="eager")
    assert set(COMPILABLE_MODES) == set(MODES)  # every mode has a compiled path


@torch.no_grad()
def test_compiled_speculative_sampling_matches_target_distribution():
    """Leviathan/Chen in the compiled verify pass, every row of a large batch at once: the
    empirical joint of the first two tokens equals the target's, and the draft's own differs."""
    V, N = 8, 3000
    model = tiny_model(seed=11, noise=0.3, n_layer=2, n_embd=32, vocab_size=V).eval()
    prompt = [0, 3, 5]
    opts = dict(temperature=0.9, top_k=6, repetition_penalty=1.3)
    sampler = Sampler(DecodeOptions(**opts), torch.device("cpu"))

    def dist(prefix: list[int], stage: int | None = None) -> torch.Tensor:
        idx = torch.tensor([prefix])
        logits = model(idx)[0, -1] if stage is None else model(idx, return_stage_logits=True)[1][stage][0, -1]
        seen = torch.zeros(1, V, dtype=torch.bool)
        seen[0, prefix] = True
        return sampler.probs(sampler.penalise(logits[None], seen))[0]

    def joint(stage=None) -> torch.Tensor:
        p1 = dist(prompt, stage)
        return torch.stack([p1[a] * dist(prompt + [a], stage) for a in range(V)])

    exact = joint()
    dec = make_decoder(model, DecodeOptions(mode="speculative", gamma=3, max_new_tokens=2, seed=0, **opts), 8,
                       compile="eager")
    handles = dec.add_rows([prompt] * N)
    new = dec.step()  # one pass: 1 draft (max_new_tokens - 1) and its verification
    got = {h: list(new[h]) for h in handles}
    while any(len(t) < 2 for t in got.values()):
        for h, t in dec.step().items():
            got[h] += t
    counts = torch.zeros(V, V)
    for t in got.values():
        counts[t[0], t[1]] += 1
    assert 0.05 < dec.stats.accepted / dec.stats.drafted < 0.95  # both the accept and the resample paths ran
    keep = exact.flatten() * N >= 5  # Pearson's chi-square over cells expected >= 5 times, the rest pooled
    obs = torch.cat([counts.flatten()[keep], counts.flatten()[~keep].sum()[None]])
    exp = torch.cat([exact.flatten()[keep], exact.flatten()[~keep].sum()[None]]) * N
    chi2 = ((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum().item()
    dof = obs.numel() - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5  # ~5 sigma of the chi-square's spread
    tv = 0.5 * (counts / N - exact).abs().sum().item()
    assert 0.5 * (joint(stage=0) - exact).abs().sum().item() > 3 * tv  # the test has power
