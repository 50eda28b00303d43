"""Every compilable mode on the compiled path (docs/poe.md "Decoding options"): compiled and eager
decoding give the same greedy tokens at batch 1 and batch > 1 (speculative also with presence /
frequency penalty, logit_bias and min_tokens: plain greedy's tokens), the graphs compile once (no
recompilation across steps), compiled speculative sampling follows the target distribution (its
logits processed per position), and the registry's `compilable` is what make_decoder accepts.

The compiled side uses the "aot_eager" backend: the traced graph runs the same aten kernels as
eager decoding (only the compiled attention's three q/k/v matmuls differ from eager's one fused
matmul, by rounding), so greedy tokens agree wherever the eager top-1/top-2 gap is decisive;
every comparison below checks that gap first."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch._dynamo.utils import counters

from poelm.engine import Engine, capabilities, make_decoder, speculative
from poelm.engine.options import DecodeOptions
from poelm.engine.registry import COMPILABLE_MODES, MODE_OPTIONS, MODES
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
         ("speculative", dict(gamma=3, presence_penalty=1.5, frequency_penalty=0.5, logit_bias={40: 1.0})),
         ("wand", dict(calibration=WAND_PLAIN)), ("wand", dict(calibration=WAND_STAGED, wand_factor=1.0))]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3).eval()


def generate(model, prompts, compiled: bool, **opts) -> list:
    engine = Engine(model, compile=BACKEND if compiled else False)
    return engine.generate(prompts, max_new_tokens=N_NEW, stop_token_ids=[], **opts)


@torch.no_grad()
def assert_decisive(model, prompt: list[int], tokens: list[int], **opts) -> None:
    """Every greedy token wins the full forward's readout, processed as a plain step processes it
    at its position (opts: the penalties, logit_bias, min_tokens), by more than cross-shape rounding."""
    T, V = len(tokens), model.config.vocab_size
    logits = model(torch.tensor([prompt + tokens[:-1]]))[0][len(prompt) - 1:]  # (T, V)
    before = torch.zeros(T, V)  # counts of the tokens generated before each position
    for i in range(1, T):
        before[i] = before[i - 1]
        before[i, tokens[i - 1]] += 1
    seen = before > 0
    seen[:, prompt] = True
    sampling = {k: v for k, v in opts.items() if k not in MODE_OPTIONS}
    logits = Sampler(DecodeOptions(**sampling), torch.device("cpu")).penalise(logits, seen, (before, torch.arange(T)))
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
        # one pass graph (drafts and verify) per batch size (rows advance unevenly: a row that fills
        # its context leaves first) and per width (adaptive_gamma: powers of two, <= 4 here)
        assert graphs <= batch * (3 if opts.get("adaptive_gamma") else 1) and compiled[0].stats["drafted"] > 0
        plain = generate(model, prompts, False, **{k: v for k, v in opts.items() if k not in MODE_OPTIONS})
        assert [g.tokens for g in compiled] == [g.tokens for g in plain]  # and so plain greedy's
    elif mode == "wand" and opts["calibration"] is WAND_STAGED:
        # staged: a segment per stage and width (1 for stage 0; 1, 2, 4, 8 for the others), exits early
        assert 0 < graphs <= 1 + 4 * 3 and sum(compiled[0].stats["exit_stage_counts"][:-1]) > 0
        assert compiled[0].stats["exit_stage_counts"] == eager[0].stats["exit_stage_counts"]
    else:
        assert graphs == 1  # one graph for every step: no recompilation
    for p, g in zip(prompts, eager):
        assert_decisive(model, p, g.tokens, **(opts if mode == "speculative" else {}))


@pytest.mark.parametrize("batch", [1, 2])
def test_compiled_speculative_min_tokens_masks_stop_ids_per_position(model, batch):
    """A stop id that greedy takes wherever it is allowed ends every row right at min_tokens, the
    boundary inside the compiled pass (gamma 4: positions 0..4): compiled, eager and plain agree."""
    prompts, stop = PROMPTS[:batch], 40
    opts = dict(logit_bias={stop: 100.0}, max_new_tokens=N_NEW, stop_token_ids=[stop])
    for min_tokens in (2, 7):
        eager = Engine(model).generate(prompts, mode="speculative", gamma=4, min_tokens=min_tokens, **opts)
        plain = Engine(model).generate(prompts, min_tokens=min_tokens, **opts)
        torch._dynamo.reset()  # a fresh recompile budget (the graphs' code objects are shared by every decoder)
        compiled = Engine(model, compile=BACKEND).generate(prompts, mode="speculative", gamma=4, min_tokens=min_tokens,
                                                           **opts)
        assert [g.tokens for g in compiled] == [g.tokens for g in eager] == [g.tokens for g in plain]
        for p, g in zip(prompts, plain):
            assert g.tokens[-1] == stop and len(g.tokens) == min_tokens + 1
            assert_decisive(model, p, g.tokens, min_tokens=min_tokens, **opts)


def test_compiled_step_compiles_once_across_passes(model):
    """A second generate of the same shapes reuses the graphs: nothing compiles again."""
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, compile=BACKEND)
    first = engine.generate(PROMPTS, mode="speculative", gamma=3, max_new_tokens=N_NEW, stop_token_ids=[])
    graphs = counters["stats"]["unique_graphs"]
    again = engine.generate(PROMPTS, mode="speculative", gamma=3, max_new_tokens=N_NEW, stop_token_ids=[])
    assert [g.tokens for g in again] == [g.tokens for g in first]
    assert counters["stats"]["unique_graphs"] == graphs == 1  # one graph per pass: the drafts and the verify


def test_adaptive_compiled_pass_holds_more_graphs_than_dynamos_default(model, monkeypatch):
    """Adaptive decoding compiles a pass graph per (draft stage, gamma) it tries: 3 x 4 here, more
    than dynamo's default of 8 per function, past which a fullgraph compile fails hard. (Its
    compiled costs are given: tests/test_never_lose.py measures them.)"""
    monkeypatch.setattr(speculative, "compiled_pass_costs", lambda m, backend, mode, d, g: dict.fromkeys(
        ("eager_plain_s", "compiled_plain_s", "eager_pass_s", "compiled_pass_s"), 1e-3))
    before = torch._dynamo.config.recompile_limit
    try:
        torch._dynamo.config.recompile_limit = 8
        make_decoder(model, DecodeOptions(mode="speculative", adaptive=True, gamma=4), 16, compile=BACKEND)
        assert torch._dynamo.config.recompile_limit >= 3 * 4 * 2  # every (stage, gamma), greedy and sampled
    finally:
        torch._dynamo.config.recompile_limit = before


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


@pytest.mark.parametrize("opts", [dict(temperature=0.9, top_k=6, repetition_penalty=1.3),
                                  dict(temperature=0.9, presence_penalty=1.2, frequency_penalty=0.8, min_tokens=1,
                                       stop_token_ids=[2])], ids=["repetition", "presence-frequency-min_tokens"])
@torch.no_grad()
def test_compiled_speculative_sampling_matches_target_distribution(opts):
    """Leviathan/Chen in the compiled verify pass, every row of a large batch at once: the
    empirical joint of the first two tokens equals the target's (processed at each position as
    a plain step's: the penalties count the tokens before it, the stop id is masked before
    min_tokens), and the draft's own differs."""
    V, N = 8, 3000
    model = tiny_model(seed=11, noise=0.3, n_layer=2, n_embd=32, vocab_size=V).eval()
    prompt = [0, 3, 5]
    sampler = Sampler(DecodeOptions(**opts), torch.device("cpu"))

    def dist(prefix: list[int], stage: int | None = None) -> torch.Tensor:
        idx = torch.tensor([prefix])
        logits = model(idx)[0, -1] if stage is None else model(idx, return_stage_logits=True)[1][stage][0, -1]
        seen = torch.zeros(1, V, dtype=torch.bool)
        seen[0, prefix] = True
        new = prefix[len(prompt):]
        counts = torch.zeros(1, V).index_add_(1, torch.tensor(new, dtype=torch.long), torch.ones(1, len(new)))
        return sampler.probs(sampler.penalise(logits[None], seen, (counts, torch.tensor([len(new)]))))[0]

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
    assert counts[exact == 0].sum() == 0  # impossible pairs (the masked stop id first) never appear
    keep = exact.flatten() * N >= 5  # Pearson's chi-square over cells expected >= 5 times, the rest pooled
    obs = torch.cat([counts.flatten()[keep], counts.flatten()[~keep].sum()[None]])
    exp = torch.cat([exact.flatten()[keep], exact.flatten()[~keep].sum()[None]]) * N
    chi2 = ((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum().item()
    dof = obs.numel() - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5  # ~5 sigma of the chi-square's spread
    tv = 0.5 * (counts / N - exact).abs().sum().item()
    assert 0.5 * (joint(stage=0) - exact).abs().sum().item() > 3 * tv  # the test has power


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("compiled", [False, True])
@torch.no_grad()
def test_a_dropped_decoder_frees_its_cache_at_once(model, mode, compiled):
    """Every mode, eager and compiled: a decoder no one holds is freed by reference counting (with
    the cyclic collector off), its KV cache with it. A cycle through the decoder (its sampler's view
    of its rows, a compiled bound method) kept every dropped decoder until the cyclic collector ran,
    which a busy server's engine process seldom does. The compiled case steps a first decoder of the
    same shapes, so its graphs exist and the second one traces nothing (tracing leaves garbage)."""
    if compiled and not capabilities(mode).compilable:
        pytest.skip(f"{mode} decodes eagerly")
    opts = DecodeOptions(mode=mode, calibration=WAND_STAGED if mode == "wand" else None)
    for _ in range(2 if compiled else 1):
        dec = make_decoder(model, opts, 64, compile=BACKEND if compiled else None)
        dec.add_rows(PROMPTS)
        dec.step()
        dec.step()
    decoder, cache = weakref.ref(dec), weakref.ref(dec.cache)
    gc.disable()
    try:
        del dec
        alive = decoder() is not None, cache() is not None
    finally:
        gc.enable()
    assert alive == (False, False)


def counting_dispatch(monkeypatch) -> list:
    """Record every call that goes through torch.compile's own dispatch (CompiledMethod.COMPILED)."""
    from poelm.engine.decoders import CompiledMethod
    calls = []
    for key, fn in list(CompiledMethod.COMPILED.items()):
        def counted(*args, _fn=fn, _key=key):
            calls.append(_key[0].__name__)
            return _fn(*args)
        monkeypatch.setitem(CompiledMethod.COMPILED, key, counted)
    return calls


def test_compiled_steps_skip_torch_compile_dispatch_once_built(model, monkeypatch):
    """After a graph is built, steps check its guards themselves and call it directly: only the
    first step of each variant goes through torch.compile (stage 1, then stage 2, whose guards
    differ on the stage: each variant runs its own graph, the tokens are eager's); after
    torch._dynamo.reset() the graph is built again (the old one is never called)."""
    prompts = PROMPTS[:1]
    eager = {s: generate(model, prompts, False, mode="stage", stage=s)[0].tokens for s in (1, 2)}
    assert eager[1] != eager[2]
    torch._dynamo.reset()
    generate(model, prompts, True, mode="stage", stage=1)  # registers the shared torch.compile of the step
    calls = counting_dispatch(monkeypatch)
    for s in (1, 2, 1, 2):
        assert generate(model, prompts, True, mode="stage", stage=s)[0].tokens == eager[s]
    assert calls == ["forward"]  # stage 2's first step; every other step (79 of them) went direct
    torch._dynamo.reset()
    calls.clear()
    assert generate(model, prompts, True, mode="stage", stage=2)[0].tokens == eager[2]
    assert calls == ["forward"]


def test_inductor_step_decodes_as_eager(model):
    """The inductor graphs of a decoder give eager's greedy tokens (inductor's fused kernels round
    differently from eager's: the tokens are checked decisive, as above), and steps after the
    first call the graph directly. Inductor's CPU vector width is pinned in its config: torch's
    FX graph cache would otherwise serve a graph cached by a process of another ISA (an AVX-512
    graph under ATEN_CPU_CAPABILITY=avx2 returned NaN logits from its second step)."""
    from poelm.engine.decoders import CompiledMethod, PlainDecoder
    torch._dynamo.reset()
    prompt = PROMPTS[0]
    eager = generate(model, [prompt], False)[0].tokens
    compiled = Engine(model, compile=True).generate([prompt], max_new_tokens=N_NEW, stop_token_ids=[])[0].tokens
    assert compiled == eager
    assert_decisive(model, prompt, eager)
    assert (PlainDecoder.forward, "inductor", None) in CompiledMethod.COMPILED
    assert torch._inductor.config.cpp.simdlen is not None  # the ISA in the FX graph cache key (runtime.pin_inductor_vec_isa)


@pytest.mark.parametrize("mode,opts", [("final", {}), ("speculative", dict(gamma=3))])
def test_batched_compiled_steps_attend_the_written_keys_in_one_graph(model, mode, opts, monkeypatch):
    """A compiled step of several rows attends key slots 0 ... n-1, n covering every row's slots so
    far (not the whole cache), with n a dynamic size of one graph; a single row keeps its static
    whole-cache graph. Tokens are eager's (checked above for the same cases)."""
    from poelm.engine.decoders import MIN_KEY_SLOTS, Decoder

    seen, real = [], Decoder._key_slots

    def recording(self, end):
        keys = real(self, end)
        seen.append((len(self.rows), end, None if keys is None else keys.shape[0], self.cache.max_len))
        return keys

    monkeypatch.setattr(Decoder, "_key_slots", recording)
    torch._dynamo.reset()
    counters.clear()
    compiled = generate(model, PROMPTS, True, mode=mode, **opts)
    assert [g.tokens for g in compiled] == [g.tokens for g in generate(model, PROMPTS, False, mode=mode, **opts)]
    batched = [(end, n, max_len) for rows, end, n, max_len in seen if rows > 1]
    assert len({n for _, n, _ in batched}) > 3  # the span grows step by step ...
    assert all(n == max(end, MIN_KEY_SLOTS) and n < max_len for end, n, max_len in batched)  # ... and no further
    assert all(n is None for rows, _, n, _ in seen if rows == 1)
    assert counters["stats"]["unique_graphs"] <= 2  # the batch's one graph (+ a row alone once the other left)
