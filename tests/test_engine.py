"""Tests of poelm/engine/: cached decoding, stage pruning, Log-OP, WAND, self-speculative
decoding, sampling, stops, streaming and the CLI.  Run: .venv/bin/pytest -q tests/test_engine.py"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from poelm import checkpoint, corpus
from poelm import tokenizer as tokenizer_mod
from poelm.engine import (Engine, PlainDecoder, DecodeOptions, Sampler, TextStream, Collector, calibrate,
                          load_calibration, new_cache, save_calibration, wand_teacher_forced)
from poelm.model import GPT, GPTConfig

BOS, ASSISTANT_END = 256, 257
BYTE_VOCAB = 258


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models decode fastest (and least noisily on a shared box) on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class ByteTokenizer:
    """ids 0..255 = UTF-8 bytes, 256 = <|bos|>, 257 = <|assistant_end|>."""

    bos_token_id = BOS
    special_tokens = {"<|bos|>": BOS, "<|assistant_end|>": ASSISTANT_END}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        out = bytearray()
        for i in ids:
            out += bytes([i]) if i < 256 else {BOS: b"<|bos|>", ASSISTANT_END: b"<|assistant_end|>"}[i]
        return out.decode("utf-8", errors="replace")


def tiny_config(**kw) -> GPTConfig:
    base = dict(n_layer=4, n_embd=64, n_head=2, vocab_size=BYTE_VOCAB, sequence_len=128, short_window=16, poe_every=1)
    return GPTConfig(**{**base, **kw})


def random_model(seed: int = 0, noise: float = 0.05, **kw) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(**kw))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # zero-init projections make a fresh model trivial
            p.add_(noise * torch.randn_like(p))
    return model.eval()


WORDS = ["the", "cat", "dog", "sat", "on", "mat", "café", "naïve", "日本", "ran", "to", "a", "big", "red", "house"]


def synthetic_text(rng: random.Random) -> str:
    """Structured sentences: easy for the first stage, a bit more for the deeper ones."""
    s = []
    for _ in range(8):
        s.append(f"the {rng.choice(['big', 'red', 'naïve'])} {rng.choice(['cat', 'dog', 'café'])} "
                 f"{rng.choice(['sat', 'ran'])} {rng.choice(['on', 'to'])} the {rng.choice(['mat', 'house', '日本'])}. ")
    return "".join(s)


def train_batch(rng: random.Random, B: int, T: int) -> torch.Tensor:
    rows = []
    for _ in range(B):
        ids = [BOS] + list(synthetic_text(rng).encode())
        while len(ids) < T + 1:
            ids += [BOS] + list(synthetic_text(rng).encode())
        rows.append(ids[: T + 1])
    return torch.tensor(rows)


@pytest.fixture(scope="module")
def trained() -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny_config())
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-3, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(0)
    model.train()
    for _ in range(150):
        batch = train_batch(rng, 16, 64)
        loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def rand_model() -> GPT:
    return random_model()


def prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[BOS] + [rng.randrange(256) for _ in range(n)] for n in (3, 20, 41)]


def text_prompt_ids(s: str) -> list[int]:
    return [BOS] + list(s.encode())


@torch.no_grad()
def full_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids]))[0]  # (T, V)


# Token-identity claims between computations of different shapes (speculative verify vs one
# step, a batch vs a row alone) rest on the logits agreeing to the cross-shape bound that the
# cached-vs-uncached tests below assert (|dlogit| <= 1e-5): greedy tokens then agree wherever
# the reference's top-1/top-2 gap exceeds twice that. DECISIVE checks the gap (on this CPU's
# own kernels), so a near-tie shows up as itself, not as a flaky mismatch.
CROSS_SHAPE_BOUND = 1e-5


@torch.no_grad()
def assert_decisive(model: GPT, prompt: list[int], tokens: list[int], readout=None) -> None:
    """Every greedy token of `tokens` after `prompt` wins its full-forward readout by > 2 x bound."""
    logits = full_logits(model, prompt + tokens[:-1])[len(prompt) - 1:] if readout is None else readout
    top2 = logits.topk(2, dim=-1).values
    gap = (top2[:, 0] - top2[:, 1]).min().item()
    assert gap > 2 * CROSS_SHAPE_BOUND, f"near-tie (top-2 gap {gap:.2e}) in the reference: pick another prompt"


# -----------------------------------------------------------------------------
# cached == uncached


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_head=1), dict(backout=True),
                                dict(per_stage_head=True, final_readout="logop", final_logop_alpha=0.0)])
@torch.no_grad()
def test_cached_matches_uncached_left_padded_batch(kw):
    model = random_model(seed=3, **kw)
    rows = prompts()
    P = max(len(r) for r in rows)
    pad = torch.tensor([P - len(r) for r in rows])
    idx = torch.tensor([[0] * (P - len(r)) + r for r in rows])
    dec = PlainDecoder(model, DecodeOptions(), 128)
    dec.cache = new_cache(model, len(rows), 128, pad)
    logits = dec.forward(idx, last_only=False)  # (B, P, V)
    seqs = [list(r) for r in rows]
    for b, r in enumerate(rows):
        ref = full_logits(model, r)
        assert (logits[b, P - len(r):] - ref).abs().max().item() <= 1e-5
    nxt = logits[:, -1].argmax(-1)
    for _ in range(30):  # decode steps cross the short window (16) for every row
        for b in range(len(rows)):
            seqs[b].append(nxt[b].item())
        step = dec.forward(nxt[:, None])  # (B, V)
        for b in range(len(rows)):
            assert (step[b] - full_logits(model, seqs[b])[-1]).abs().max().item() <= 1e-5
        nxt = step.argmax(-1)


@torch.no_grad()
def test_cached_stage_and_logop_readouts_match_uncached(rand_model):
    rows = prompts()
    final, stage_logits = rand_model(torch.tensor([rows[2]]), return_stage_logits=True)
    for k in range(4):
        dec = PlainDecoder(rand_model, DecodeOptions(mode="stage", stage=k), 128)
        dec.cache = new_cache(rand_model, 1, 128, n_layers=dec.end_layer)
        assert (dec.forward(torch.tensor([rows[2]]), last_only=False)[0] - stage_logits[k][0]).abs().max() <= 1e-5
    dec = PlainDecoder(rand_model, DecodeOptions(mode="logop", stages=[0, 2]), 128)
    dec.cache = new_cache(rand_model, 1, 128, n_layers=dec.end_layer)
    s = 0.5 ** 1.0 * (stage_logits[0][0].log_softmax(-1) + stage_logits[2][0].log_softmax(-1))  # alpha 0
    ref = s - s.logsumexp(-1, keepdim=True)
    assert (dec.forward(torch.tensor([rows[2]]), last_only=False)[0] - ref).abs().max() <= 1e-5


def test_batch_generation_equals_rows_alone(rand_model):
    engine = Engine(rand_model)
    rows = prompts()
    batch = engine.generate(rows, max_new_tokens=25)
    for r, out in zip(rows, batch):
        assert_decisive(rand_model, r, out.tokens)
        assert out.tokens == engine.generate(r, max_new_tokens=25).tokens


def test_training_after_generation_matches_a_model_that_never_generated():
    """Decoding runs under torch.inference_mode (tables and fused weights it builds are inference
    tensors): the same model must still train afterwards, with the gradients of a copy that never
    decoded (the same computation on both sides: equal exactly), and decode again."""
    used, fresh = random_model(3), random_model(3)
    engine = Engine(used)
    first = engine.generate([5, 6, 7], max_new_tokens=150, keep_cache=True)  # past sequence_len: longer rotary tables
    engine.generate([1, 2], max_new_tokens=4, mode="speculative", draft_stage=0, gamma=2)
    idx = torch.randint(0, BYTE_VOCAB, (2, 128), generator=torch.Generator().manual_seed(0))
    for m in (used, fresh):
        m.train()
        m(idx[:, :-1], idx[:, 1:]).backward()
    grads = [(name, a.grad, b.grad) for (name, a), b in zip(used.named_parameters(), fresh.parameters())]
    assert sum(g is not None for _, g, _ in grads) > len(grads) // 2
    for name, a, b in grads:
        assert (a is None and b is None) or torch.equal(a, b), name
    used.eval()
    assert engine.generate([5, 6, 7], max_new_tokens=len(first.tokens)).tokens == first.tokens


# -----------------------------------------------------------------------------
# speculative decoding


@pytest.mark.parametrize("which", ["random", "trained"])
def test_speculative_greedy_token_identical(which, rand_model, trained):
    model = rand_model if which == "random" else trained
    engine = Engine(model)
    rows = prompts()[1:] + [text_prompt_ids("the red cat sat on")]
    for row in rows:
        plain = engine.generate(row, max_new_tokens=48).tokens
        assert_decisive(model, row, plain)
        for gamma in (1, 2, 4, 7):
            for draft in (0, 1):
                out = engine.generate(row, mode="speculative", gamma=gamma, draft_stage=draft, max_new_tokens=48)
                assert out.tokens == plain, (which, gamma, draft)
                assert out.stats["tokens_per_verify"] >= 1.0
        out = engine.generate(row, mode="speculative", gamma=3, adaptive_gamma=True, draft_threshold=0.3, max_new_tokens=48)
        assert out.tokens == plain


def test_speculative_trained_model_accepts_often(trained):
    out = Engine(trained).generate(text_prompt_ids("the big dog ran to"), mode="speculative", gamma=4, max_new_tokens=60)
    assert out.stats["acceptance_rate"] > 0.3
    assert out.stats["tokens_per_verify"] > 1.5


@pytest.mark.parametrize("draft_stage", [0, 2])  # backout layer 2: produced by verify / kept from drafting
def test_speculative_greedy_with_backout_and_penalty(draft_stage):
    model = random_model(seed=5, backout=True)
    engine = Engine(model)
    row = prompts()[1]
    for rp in (1.0, 1.4):
        plain = engine.generate(row, max_new_tokens=40, repetition_penalty=rp).tokens
        out = engine.generate(row, mode="speculative", draft_stage=draft_stage, gamma=3, max_new_tokens=40,
                              repetition_penalty=rp)
        assert out.tokens == plain


@torch.no_grad()
def processed_readout(model: GPT, prompt: list[int], tokens: list[int], **opts) -> torch.Tensor:
    """The full forward's final readout at each position of `tokens` (T, V), processed as a plain
    step there processes it: seen = the prompt and the tokens before, generated = the tokens before."""
    T, V = len(tokens), model.config.vocab_size
    logits = full_logits(model, prompt + tokens[:-1])[len(prompt) - 1:]
    before = torch.zeros(T, V)  # (T, V): counts of the tokens generated before each position
    for i in range(1, T):
        before[i] = before[i - 1]
        before[i, tokens[i - 1]] += 1
    seen = before > 0
    seen[:, prompt] = True
    return Sampler(DecodeOptions(**opts), torch.device("cpu")).penalise(logits, seen, (before, torch.arange(T)))


ROW_PENALTIES = [dict(presence_penalty=1.5), dict(frequency_penalty=0.8),
                 dict(presence_penalty=-0.5, frequency_penalty=0.7, repetition_penalty=1.2, logit_bias={65: 1.5})]


@pytest.mark.parametrize("opts", ROW_PENALTIES)
def test_speculative_greedy_with_presence_frequency_penalty_is_plain_greedy(opts, rand_model):
    """Each verify position counts the drafts before it as generated, and a rejected draft leaves
    the counts: greedy speculative gives plain greedy's tokens, row by row and in a ragged batch."""
    engine = Engine(rand_model)
    rows = prompts()[1:] + [text_prompt_ids("the red cat sat on")]
    plain = [engine.generate(row, max_new_tokens=40, **opts).tokens for row in rows]
    for row, tokens in zip(rows, plain):
        assert tokens != engine.generate(row, max_new_tokens=40).tokens  # the penalties change every row
        assert_decisive(rand_model, row, tokens, processed_readout(rand_model, row, tokens, **opts))
    for gamma, draft in ((2, 0), (5, 1)):
        kw = dict(mode="speculative", gamma=gamma, draft_stage=draft, max_new_tokens=40, **opts)
        alone = [engine.generate(row, **kw) for row in rows]
        assert [g.tokens for g in alone] == plain
        assert all(g.stats["acceptance_rate"] < 1 for g in alone)  # drafts were rejected: their counts rolled back
        assert [g.tokens for g in engine.generate(rows, **kw)] == plain


def test_speculative_min_tokens_masks_stop_ids_per_position(rand_model):
    """A stop id that greedy takes wherever it is allowed (logit_bias +100) ends the row right at
    min_tokens, wherever that falls in a draft/verify pass; speculative gives plain's tokens."""
    engine = Engine(rand_model)
    rows = prompts()[1:]
    stop = 65
    opts = dict(logit_bias={stop: 100.0}, stop_token_ids=[stop, 66], max_new_tokens=20)
    for min_tokens in (1, 3, 6, 9):  # the first, inside and last positions of passes of gamma 3 and 4
        plain = [engine.generate(row, min_tokens=min_tokens, **opts).tokens for row in rows]
        for row, tokens in zip(rows, plain):
            assert tokens[-1] == stop and len(tokens) == min_tokens + 1
            assert_decisive(rand_model, row, tokens, processed_readout(rand_model, row, tokens, min_tokens=min_tokens,
                                                                       **opts))
        for gamma in (3, 4):
            kw = dict(mode="speculative", gamma=gamma, min_tokens=min_tokens, **opts)
            assert [engine.generate(row, **kw).tokens for row in rows] == plain
            assert [g.tokens for g in engine.generate(rows, **kw)] == plain


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_speculative_drafts_apply_the_targets_rule_at_each_position(temperature):
    """On a model whose blocks are identities the draft stage reads out the target's logits, so
    a draft that penalises and masks as the target does at its position is always accepted (a
    draft counting only the tokens before the pass is rejected as soon as its drafts repeat)."""
    model = random_model(seed=5, noise=0.0)
    engine = Engine(model)
    tied = {65: 10.0, 66: 10.0, 67: 9.0}  # the likeliest tokens by far: the penalties choose among them
    for opts in (dict(logit_bias=tied, presence_penalty=1.0, frequency_penalty=0.6),
                 dict(logit_bias={**tied, 70: 30.0}, min_tokens=3, stop_token_ids=[70])):
        out = engine.generate(prompts()[1], mode="speculative", gamma=4, max_new_tokens=30, temperature=temperature,
                              seed=0, **opts)
        assert out.stats["acceptance_rate"] == 1.0 and out.stats["drafted"] >= 3
        if "min_tokens" in opts:
            assert out.tokens[3:] == [70]  # the stop id, masked at the first three positions of the first pass
        else:
            assert len(set(out.tokens[:4])) > 1  # the penalties moved the first pass off its first token


@torch.no_grad()
def full_depth_cache(model: GPT, ids: list[int]):
    cache = new_cache(model, 1, 128)
    model.forward_cached(torch.tensor([ids]), cache)
    return cache


def assert_cache_equal(cache, ref, n: int, layers=None):
    for i in layers if layers is not None else range(len(ref.k)):
        assert cache.lengths[i] >= n
        assert (cache.k[i][:, :, :n] - ref.k[i][:, :, :n]).abs().max().item() <= 1e-5, f"layer {i} K"
        assert (cache.v[i][:, :, :n] - ref.v[i][:, :, :n]).abs().max().item() <= 1e-5, f"layer {i} V"


def test_speculative_rollback_leaves_full_depth_cache(rand_model):
    engine = Engine(rand_model)
    row = prompts()[1]
    out = engine.generate(row, mode="speculative", gamma=5, max_new_tokens=30, keep_cache=True)
    assert out.stats["acceptance_rate"] < 1.0  # some drafts were rejected and rolled back
    fed = row + out.tokens[:-1]
    assert out.cache.n_tokens == len(fed) and all(n == len(fed) for n in out.cache.lengths)
    assert_cache_equal(out.cache, full_depth_cache(rand_model, fed), len(fed))


SAMPLED = [dict(temperature=0.9, top_k=6, repetition_penalty=1.3),
           dict(temperature=0.9, presence_penalty=1.2, frequency_penalty=0.8, min_tokens=2, stop_token_ids=[2])]


@pytest.mark.parametrize("opts", SAMPLED, ids=["repetition", "presence-frequency-min_tokens"])
@torch.no_grad()
def test_speculative_sampling_matches_target_distribution(opts):
    """Leviathan/Chen: the first tokens' empirical distribution equals the target's, its logits
    processed at each position as a plain step's (the penalties count the tokens before it, the
    stop id is masked before min_tokens), over the rows of one batch."""
    V = 8
    model = random_model(seed=11, noise=0.3, n_layer=2, n_embd=32, vocab_size=V)
    engine = Engine(model)
    prompt = [0, 3, 5]
    sampler = Sampler(DecodeOptions(**opts), torch.device("cpu"))

    def target(prefix: list[int], stage: int | None = None, sampler: Sampler = sampler) -> torch.Tensor:
        idx = torch.tensor([prefix])
        logits = model(idx)[0, -1] if stage is None else model(idx, return_stage_logits=True)[1][stage][0, -1]
        seen = torch.zeros(1, V, dtype=torch.bool)
        seen[0, prefix] = True
        new = prefix[len(prompt):]
        counts = torch.zeros(1, V).index_add_(1, torch.tensor(new, dtype=torch.long), torch.ones(1, len(new)))
        return sampler.probs(sampler.penalise(logits[None], seen, (counts, torch.tensor([len(new)]))))[0]

    def joint(**kw) -> torch.Tensor:  # (V, V) p(t1, t2)
        p1 = target(prompt, **kw)
        return torch.stack([p1[a] * target(prompt + [a], **kw) for a in range(V)])

    exact = joint()
    exact3 = torch.zeros(V)
    for a in range(V):
        for b in range(V):
            if exact[a, b] > 0:
                exact3 += exact[a, b] * target(prompt + [a, b])
    N = 3000
    out = engine.generate([prompt] * N, mode="speculative", gamma=3, max_new_tokens=3, seed=0, **opts)
    counts, counts3 = torch.zeros(V, V), torch.zeros(V)
    for g in out:
        a, b, c = g.tokens
        counts[a, b] += 1
        counts3[c] += 1
    assert 0.05 < out[0].stats["acceptance_rate"] < 0.95  # both the accept and the resample paths ran
    assert chi2(counts.flatten(), exact.flatten(), N) < chi2_limit(counts.numel())
    assert chi2(counts3, exact3, N) < chi2_limit(V)
    # the test has power: the draft's own distribution and the unprocessed target's are far from
    # the target (and from the samples)
    tv_samples = 0.5 * (counts / N - exact).abs().sum().item()
    assert 0.5 * (joint(stage=0) - exact).abs().sum().item() > 3 * tv_samples
    unprocessed = joint(sampler=Sampler(DecodeOptions(temperature=opts["temperature"]), torch.device("cpu")))
    assert 0.5 * (unprocessed - exact).abs().sum().item() > 3 * tv_samples


def test_sampler_draws_each_rows_distribution_and_never_a_zero_probability_token():
    """Sampler.draw (inverse CDF in float64): per row, the counts of 60,000 draws fit the row's
    distribution (chi-square), tokens of probability 0 (the first and last, masked ones between)
    never come, a one-hot row always gives its token, and a seed gives the same draws again."""
    from poelm.engine.sampling import Sampler

    torch.manual_seed(3)
    V, n = 50, 60_000
    probs = torch.randn(3, V).mul(2).softmax(-1)
    probs[0, [0, 7, 8, V - 1]] = 0.0
    probs[1, :] = 0.0
    probs[1, V - 1] = 1.0
    probs[2, ::3] = 0.0
    probs /= probs.sum(-1, keepdim=True)
    sampler = Sampler(DecodeOptions(temperature=1.0, seed=5), torch.device("cpu"))
    draws = torch.cat([sampler.draw(probs.repeat(100, 1)).view(100, 3) for _ in range(n // 100)])  # (n, 3)
    for row in range(3):
        counts = torch.bincount(draws[:, row], minlength=V)
        assert chi2(counts, probs[row], n) < chi2_limit(V)
    assert (draws[:, 1] == V - 1).all()
    again = Sampler(DecodeOptions(temperature=1.0, seed=5), torch.device("cpu"))
    assert torch.equal(again.draw(probs), Sampler(DecodeOptions(temperature=1.0, seed=5), torch.device("cpu")).draw(probs))


def chi2(observed: torch.Tensor, expected_probs: torch.Tensor, n: int) -> float:
    """Pearson chi-square; cells with expected count < 5 are pooled; impossible cells must be empty."""
    expected = expected_probs.double() * n
    observed = observed.double()
    assert observed[expected_probs == 0].sum() == 0
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    return (((obs - exp) ** 2)[keep] / exp[keep]).sum().item()


def chi2_limit(cells: int, z: float = 4.0) -> float:
    """~1e-5 upper tail of chi-square with cells-1 dof (Wilson-Hilferty)."""
    k = max(cells - 1, 1)
    return k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3


# -----------------------------------------------------------------------------
# WAND


@pytest.fixture(scope="module")
def trained_calib(trained):
    """The bounds and exit rates of a calibration, without its measured decode costs: WAND's cost
    gate reads those timings of this machine (a busy machine measures a staging overhead that
    gates every test off: WAND then decodes as plain), and these tests exercise the staged path
    itself, whatever the load. The gate is tested on fixed costs in tests/test_never_lose.py."""
    rng = random.Random(7)
    calib = calibrate(trained, [train_batch(rng, 8, 64)[:, :-1] for _ in range(2)])
    assert calib.pop("decode_costs")["stage_s"]  # measured, and left out here
    return calib


def test_calibration_shape(trained, trained_calib):
    b = trained_calib["wand_bounds"]
    assert len(b) == 4 and b[0] == 0.0 and all(x >= 0 for x in b)
    assert trained_calib["wand_quantile"] == 0.99 and trained_calib["wand_calibration_tokens"] == 2 * 8 * 64


@pytest.mark.parametrize("which", ["random", "trained"])
def test_wand_infinite_factor_equals_full_depth(which, rand_model, trained, trained_calib):
    model = rand_model if which == "random" else trained
    engine = Engine(model, calibration=trained_calib)
    for row in prompts()[1:]:
        plain = engine.generate(row, max_new_tokens=40)
        out = engine.generate(row, mode="wand", wand_factor=math.inf, max_new_tokens=40)
        assert out.tokens == plain.tokens
        assert out.stats["mean_stages_per_token"] == 4


def test_logop_final_readout_in_wand_calibrate_and_speculative(rand_model):
    model = random_model(seed=4, per_stage_head=True, final_readout="logop")
    engine = Engine(model, calibration=calibrate(model, [torch.tensor([prompts()[2]])]))
    row = prompts()[1]
    plain = engine.generate(row, max_new_tokens=20)
    seq = list(row)
    for _ in range(20):  # greedy from the uncached final readout (the Log-OP of all stages)
        seq.append(full_logits(model, seq)[-1].argmax().item())
    assert plain.tokens == seq[len(row):]
    assert engine.generate(row, mode="wand", wand_factor=math.inf, max_new_tokens=20).tokens == plain.tokens
    with pytest.raises(ValueError, match="final_readout=logop"):
        engine.generate(row, mode="speculative", max_new_tokens=4)


@pytest.mark.parametrize("factor", [0.0, 0.05, 0.5])
def test_wand_lazy_backfill_gives_full_depth_cache(factor, trained, trained_calib):
    engine = Engine(trained, calibration=trained_calib)
    row = text_prompt_ids("the naïve cat sat on the")
    out = engine.generate(row, mode="wand", wand_factor=factor, max_new_tokens=50, keep_cache=True)
    assert out.stats["mean_stages_per_token"] < 4  # tokens exited early
    fed = row + out.tokens[:-1]
    assert out.cache.n_tokens == len(fed)
    assert_cache_equal(out.cache, full_depth_cache(trained, fed), len(fed))


def test_wand_cache_before_flush_has_no_holes(rand_model):
    calib = {"wand_bounds": [0.0, 0.3, 0.3, 0.3]}
    engine = Engine(rand_model, calibration=calib)
    row = prompts()[1]
    out = engine.generate(row, mode="wand", wand_factor=0.5, max_new_tokens=40)
    assert out.stats["backfilled"] > 0 and 1 < out.stats["mean_stages_per_token"] < 4
    # replay the run: after every step each layer's filled slots equal full depth; deeper layers may lag
    from poelm.engine import WandDecoder
    dec = WandDecoder(rand_model, DecodeOptions(mode="wand", calibration=calib, wand_factor=0.5), 128)
    (handle,) = dec.add_rows([row])
    fed = row + out.tokens[:-1]
    ref = full_depth_cache(rand_model, fed)
    lagged = 0
    for t in range(len(row) - 1, len(fed)):
        assert dec.step() == {handle: [fed[t + 1] if t + 1 < len(fed) else out.tokens[-1]]}
        lengths = dec.cache.lengths
        assert lengths == sorted(lengths, reverse=True) and lengths[0] == t + 1
        lagged += min(lengths) < t + 1  # pending slots (their inputs are kept), never holes
        for i, n in enumerate(lengths):
            assert_cache_equal(dec.cache, ref, n, layers=[i])
    assert lagged > 0


def test_wand_logop_target_infinite_factor_equals_logop(trained, trained_calib):
    calib = dict(trained_calib, wand_target="logop")
    engine = Engine(trained, calibration=calib)
    row = text_prompt_ids("the red dog")
    ref = engine.generate(row, mode="logop", max_new_tokens=30).tokens
    assert engine.generate(row, mode="wand", wand_factor=math.inf, max_new_tokens=30).tokens == ref


@pytest.mark.parametrize("alpha", [0.0, 0.5])
@pytest.mark.parametrize("bounds,n_used", [([0.0, 0.0, 0.0, 0.0], 1), ([0.0, 1e9, 0.0, 0.0], 2)],
                         ids=["exit-stage0", "exit-stage1"])
def test_wand_logop_target_samples_from_logop_of_stages_used(rand_model, alpha, bounds, n_used):
    """An exit after k+1 stages samples from the Log-OP of those stages (weights 1/(k+1)^(1-alpha)),
    not from the running sum weighted for all K stages (at alpha 0 and stage 0: z_0 / K)."""
    from poelm.engine import WandDecoder, logop
    opts = DecodeOptions(mode="wand", calibration={"wand_bounds": bounds, "wand_target": "logop"}, logop_alpha=alpha)
    dec = WandDecoder(rand_model, opts, 64)
    row = prompts()[1]
    dec.add_rows([row])
    seen = []
    dec.sampler.pick = lambda logits, _: seen.append(logits) or logits.argmax(-1)  # the logits sampled from
    dec.step()
    assert dec.stats.exit_stage_counts[n_used - 1] == 1
    r = seen[0][0]
    _, stage_logits = rand_model(torch.tensor([row]), return_stage_logits=True)
    last = [z[0, -1] for z in stage_logits]
    torch.testing.assert_close(r.log_softmax(-1), logop(last[:n_used], alpha), rtol=1e-5, atol=1e-5)
    if n_used == 1:  # one stage: its own softmax, whatever alpha
        torch.testing.assert_close(r.softmax(-1), last[0].softmax(-1), rtol=1e-5, atol=1e-6)


def test_wand_teacher_forced_agreement(trained, trained_calib):
    idx = train_batch(random.Random(99), 4, 64)[:, :-1]
    tf = wand_teacher_forced(trained, idx, trained_calib, factor=1.0)
    agree = (tf["pred"] == tf["full"]).float().mean().item()
    assert agree > 0.9 and tf["depth"].float().mean().item() <= 4
    tf = wand_teacher_forced(trained, idx, trained_calib, factor=math.inf)
    assert bool((tf["pred"] == tf["full"]).all()) and bool((tf["depth"] == 4).all())


def test_wand_without_calibration_says_how(rand_model):
    with pytest.raises(ValueError, match="poelm calibrate MODEL --data DIR"):
        Engine(rand_model).generate([1, 2], mode="wand")


def test_calibration_saved_with_the_model(tmp_path, trained_calib):
    (tmp_path / "generation_config.json").write_text(json.dumps({"bos_token_id": 256}))
    save_calibration(tmp_path, trained_calib)
    stored = json.loads((tmp_path / "generation_config.json").read_text())
    assert stored["bos_token_id"] == 256 and stored["wand_bounds"] == trained_calib["wand_bounds"]
    assert load_calibration(tmp_path) == trained_calib
    assert load_calibration(tmp_path / "nothing") is None


# -----------------------------------------------------------------------------
# pruning, BP refusal


def count_block_calls(model: GPT):
    calls = [0] * len(model.transformer.h)
    hooks = [block.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, block in enumerate(model.transformer.h)]
    return calls, hooks


@pytest.mark.parametrize("kw,deepest", [(dict(mode="stage", stage=0), 0), (dict(mode="stage", stage=2), 2),
                                         (dict(mode="logop", stages=[0, 1]), 1)])
def test_prefix_pruning_runs_no_deeper_layer(kw, deepest, rand_model):
    calls, hooks = count_block_calls(rand_model)
    try:
        out = Engine(rand_model).generate(prompts()[1], max_new_tokens=20, keep_cache=True, **kw)
    finally:
        for h in hooks:
            h.remove()
    assert all(c > 0 for c in calls[: deepest + 1]) and all(c == 0 for c in calls[deepest + 1:])
    assert len(out.cache.k) == deepest + 1  # K/V allocated for the pruned prefix only
    assert out.stats["mean_stages_per_token"] == deepest + 1


def test_stage_mode_matches_uncached_stage_argmax(rand_model):
    row = prompts()[1]
    out = Engine(rand_model).generate(row, mode="stage", stage=1, max_new_tokens=20)
    seq = list(row)
    for t in out.tokens:
        with torch.no_grad():
            z = rand_model(torch.tensor([seq]), return_stage_logits=True)[1][1][0, -1]
        assert t == z.argmax().item()
        seq.append(t)


def test_bp_model_refuses_poe_modes_unless_forced():
    model = random_model(seed=2, poe_mode="none")
    engine = Engine(model, calibration={"wand_bounds": [0.0, 1.0, 1.0, 1.0]})
    row = prompts()[1]
    plain = engine.generate(row, max_new_tokens=30).tokens
    for kw in (dict(mode="stage", stage=0), dict(mode="logop"), dict(mode="wand"), dict(mode="speculative")):
        with pytest.raises(ValueError, match="never trained to predict"):
            engine.generate(row, max_new_tokens=5, **kw)
        engine.generate(row, max_new_tokens=5, force=True, **kw)
    assert engine.generate(row, mode="speculative", force=True, max_new_tokens=30).tokens == plain  # backout path
    with pytest.raises(ValueError, match="never trained to predict"):
        calibrate(model, [torch.tensor([row])])
    calibrate(model, [torch.tensor([row])], force=True)


# -----------------------------------------------------------------------------
# sampling semantics


def test_repetition_penalty_hand_computed():
    sampler = Sampler(DecodeOptions(repetition_penalty=2.0), torch.device("cpu"))
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -4.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    assert torch.equal(sampler.penalise(logits, seen), torch.tensor([[1.0, -2.0, 0.5, 3.0, -8.0]]))


@torch.no_grad()
def test_repetition_penalty_end_to_end_includes_prompt(rand_model):
    row = [BOS, 7, 7, 9, 200, 7]
    logits = rand_model(torch.tensor([row]))[0, -1].clone()
    for t in set(row):
        logits[t] = logits[t] / 1.7 if logits[t] > 0 else logits[t] * 1.7
    out = Engine(rand_model).generate(row, max_new_tokens=1, repetition_penalty=1.7)
    assert out.tokens == [logits.argmax().item()]


def test_top_k_top_p_and_seeds(rand_model):
    sampler = Sampler(DecodeOptions(temperature=1.0, top_k=3, top_p=0.7), torch.device("cpu"))
    probs = sampler.probs(torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.05]])))
    assert torch.allclose(probs, torch.tensor([[0.625, 0.375, 0, 0, 0]]))
    engine, row = Engine(rand_model), prompts()[1]
    greedy = engine.generate(row, max_new_tokens=15).tokens
    assert engine.generate(row, max_new_tokens=15, temperature=1.0, top_k=1, seed=3).tokens == greedy
    a = engine.generate(row, max_new_tokens=15, temperature=1.0, seed=3).tokens
    assert a == engine.generate(row, max_new_tokens=15, temperature=1.0, seed=3).tokens
    assert a != engine.generate(row, max_new_tokens=15, temperature=1.0, seed=4).tokens


# -----------------------------------------------------------------------------
# prompts, stops, streaming


def test_bos_prepended_once(trained):
    engine = Engine(trained, ByteTokenizer())
    assert engine.generate("the", max_new_tokens=1).prompt_tokens == [BOS] + list(b"the")
    assert engine.generate([BOS, 1, 2], max_new_tokens=1).prompt_tokens == [BOS, 1, 2]
    assert engine.generate([1, 2], max_new_tokens=1).prompt_tokens == [BOS, 1, 2]
    assert engine.generate([1, 2], max_new_tokens=1, add_bos=False).prompt_tokens == [1, 2]
    assert Engine(trained).generate([1, 2], max_new_tokens=1).prompt_tokens == [1, 2]  # no tokenizer: as given


def test_stop_strings_and_stop_tokens(trained):
    engine = Engine(trained, ByteTokenizer())
    full = engine.generate("the big", max_new_tokens=40, stop_token_ids=[])
    text = full.text
    start = next(i for i in range(3, len(text) - 2) if text[i] == " ")
    stop = text[start:start + 3]
    out = engine.generate("the big", max_new_tokens=40, stop_strings=[stop], stop_token_ids=[])
    assert out.stats["stop_reason"] == "stop_string"
    assert out.text == text[: text.find(stop)]
    assert out.tokens == full.tokens[: len(out.tokens)] and len(out.tokens) < 40
    stop_id = full.tokens[5]
    out = engine.generate("the big", max_new_tokens=40, stop_token_ids=[stop_id])
    k = full.tokens.index(stop_id)
    assert out.tokens == full.tokens[: k + 1] and out.stats["stop_reason"] == "stop_token"
    assert out.text == ByteTokenizer().decode(full.tokens[:k])
    for mode in ("speculative", "stage"):
        out = engine.generate("the big", mode=mode, max_new_tokens=40, stop_strings=[stop], stop_token_ids=[])
        assert stop not in out.text


def scripted_stream(tokens: list[int], stop_strings=()) -> TextStream:
    tok = ByteTokenizer()
    opts = DecodeOptions(max_new_tokens=len(tokens), stop_strings=list(stop_strings))

    class ScriptedSession:  # the Session interface: advance(), collector, results()
        collector = Collector(1, opts, tok, {BOS})
        script = iter(tokens)

        def advance(self) -> bool:
            t = next(self.script, None)
            if t is None or self.collector.done:
                return False
            self.collector.add(0, [t])
            return True

        def results(self):
            from poelm.engine import Generation
            return [Generation(self.collector.text(0), self.collector.tokens[0], {})]

    return TextStream(ScriptedSession())


def test_stream_never_splits_a_character():
    text = "héllo 日本語 ok 🎉!"
    stream = scripted_stream(list(text.encode()))
    deltas = list(stream)
    assert "".join(deltas) == text == stream.result.text
    assert all("\ufffd" not in d for d in deltas)
    assert "日" in deltas or any(d.endswith("日") or d.startswith("日") for d in deltas)
    stream = scripted_stream(list("ab STOP cd".encode()), stop_strings=["STOP"])
    deltas = list(stream)
    assert "".join(deltas) == "ab " == stream.result.text  # the partial "ST", "STO" were held back


def test_stream_end_to_end(trained):
    engine = Engine(trained, ByteTokenizer())
    multibyte = 0
    for seed in range(4):
        for mode in ("final", "speculative"):
            stream = engine.stream("the naïve café", mode=mode, temperature=1.0, seed=seed, max_new_tokens=40)
            deltas = list(stream)
            assert "".join(deltas) == stream.result.text
            multibyte += sum(len(c.encode()) > 1 and c != "\ufffd" for c in stream.result.text)
    assert multibyte > 0  # the check above covered multi-byte characters


# -----------------------------------------------------------------------------
# bad inputs, limits


@pytest.mark.parametrize("prompt,kw,match", [
    ("", {}, "empty prompt"), ([], {}, "empty prompt"),
    ([1], dict(temperature=-0.1), "temperature"), ([1], dict(top_p=0.0), "top_p"), ([1], dict(top_p=1.5), "top_p"),
    ([1], dict(top_k=-1), "top_k"), ([1], dict(repetition_penalty=0.0), "repetition_penalty"),
    ([1], dict(max_new_tokens=-1), "max_new_tokens"), ([1], dict(mode="stage", stage=4), "out of range"),
    ([1], dict(mode="stage", stage=-1), "stage must be an integer >= 0"), ([1], dict(mode="speculative", draft_stage=3), "out of range"),
    ([1], dict(mode="logop", stages=[0, 9]), "out of range"), ([1], dict(mode="nope"), "unknown mode"),
    ([1], dict(mode="speculative", gamma=0), "gamma"), ([1], dict(bogus=1), "unknown generation option"),
    ([1], dict(mode="wand", wand_factor=-1.0), "wand_factor"), ([BYTE_VOCAB], {}, "token ids"),
    ([1] * 129, {}, "context holds 128"),
])
def test_bad_inputs_one_line_value_error(prompt, kw, match, rand_model):
    engine = Engine(rand_model, ByteTokenizer() if isinstance(prompt, str) else None,
                    calibration={"wand_bounds": [0.0, 1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match=match) as err:
        engine.generate(prompt, **kw)
    assert "\n" not in str(err.value)


def test_text_prompt_without_tokenizer(rand_model):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        Engine(rand_model).generate("hello")


@pytest.mark.parametrize("mode", ["final", "speculative", "wand"])
def test_generation_stops_when_the_context_is_full(mode, rand_model):
    engine = Engine(rand_model, calibration={"wand_bounds": [0.0, 1.0, 1.0, 1.0]})
    row = [1] * 125
    out = engine.generate(row, mode=mode, max_new_tokens=10)
    assert len(out.tokens) == 4 and out.stats["stop_reason"] == "context"
    assert engine.generate(row, mode=mode, max_new_tokens=0).tokens == []


def test_stats_present(rand_model, trained_calib):
    engine = Engine(rand_model, calibration=trained_calib)
    for mode in ("final", "stage", "logop", "wand", "speculative"):
        s = engine.generate(prompts()[1], mode=mode, max_new_tokens=10).stats
        for key in ("tokens_per_s", "new_tokens", "wall_s", "mean_stages_per_token", "mean_layers_per_token"):
            assert key in s, (mode, key)
    s = engine.generate(prompts()[1], mode="speculative", max_new_tokens=10).stats
    assert "acceptance_rate" in s and "tokens_per_verify" in s


# -----------------------------------------------------------------------------
# CLI


@pytest.mark.filterwarnings("ignore:validation split")
def test_cli_generate_and_calibrate(tmp_path, trained, capsys):
    import importlib

    import tiktoken

    from poelm import cli
    from poelm.cli.common import parse_prompt

    enc = tiktoken.Encoding(name="bytes", pat_str=tokenizer_mod.SPLIT_PATTERN,
                            mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={s: 256 + i for i, s in enumerate(tokenizer_mod.SPECIAL_TOKENS)})
    tok = tokenizer_mod.Tokenizer(enc)
    model = GPT(tiny_config(vocab_size=tok.vocab_size))
    model.init_weights()
    model_dir = tmp_path / "model"
    checkpoint.save_model(model, model_dir, tok)
    parser = cli.build_parser()

    def run(*argv) -> int:
        args = parser.parse_args([str(a) for a in argv])
        module, _, name = args.run.partition(":")
        assert module == "poelm.cli.generate"
        return getattr(importlib.import_module(module), name)(args)

    assert run("generate", model_dir, "the cat", "--max-new-tokens", 5, "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"text", "tokens", "stats"} and len(out["tokens"]) == 5
    with pytest.raises(ValueError, match="poelm calibrate"):
        run("generate", model_dir, "the cat", "--mode", "wand")
    rng = random.Random(0)
    corpus.write_corpus([synthetic_text(rng) for _ in range(40)], tmp_path / "data")
    capsys.readouterr()
    assert run("calibrate", model_dir, "--data", tmp_path / "data", "--tokens", 512, "--json") == 0
    calib = json.loads(capsys.readouterr().out)
    assert len(calib["wand_bounds"]) == 4 and load_calibration(model_dir)["wand_bounds"] == calib["wand_bounds"]
    assert run("generate", model_dir, "the cat", "--mode", "wand", "--max-new-tokens", 4) == 0
    assert run("generate", model_dir, "the", "--mode", "speculative", "--gamma", 2, "--seed", 1,
               "--temperature", 0.8, "--top-p", 0.9, "--max-new-tokens", 6, "--json") == 0
    capsys.readouterr()
    with pytest.raises(ValueError, match="out of range"):
        run("generate", model_dir, "the", "--mode", "logop", "--stages", "0,7")
    args = parser.parse_args(["generate", "tiny", "1 2 x"])
    with pytest.raises(ValueError, match="space-separated token ids"):
        parse_prompt(args.prompt, None)


# -----------------------------------------------------------------------------
# the decoder protocol: batches, ragged rows, add/remove/rollback


BATCH_MODES = [dict(mode="final"), dict(mode="stage", stage=1), dict(mode="logop", stages=[0, 2]),
               dict(mode="wand", wand_factor=0.5), dict(mode="speculative", gamma=3),
               dict(mode="speculative", gamma=2, draft_stage=1, draft_threshold=0.2),
               dict(mode="speculative", gamma=3, adaptive_gamma=True)]


@pytest.mark.parametrize("kw", BATCH_MODES, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_every_mode_batch_gives_each_row_its_tokens_alone(kw, trained, trained_calib):
    engine = Engine(trained, calibration=trained_calib)
    rows = [text_prompt_ids("the red cat"), text_prompt_ids("a big dog ran to the"), [BOS], text_prompt_ids("the")]
    batch = engine.generate(rows, max_new_tokens=30, **kw)
    for r, out in zip(rows, batch):
        assert out.tokens == engine.generate(r, max_new_tokens=30, **kw).tokens, kw
    if kw["mode"] == "speculative":
        assert batch[0].stats["tokens_per_verify"] >= 1.0


@torch.no_grad()
def test_rows_added_between_steps_are_ragged_and_exact(rand_model):
    """A row joins a running batch; every step's logits equal the full forward of the row (1e-5)."""
    from poelm.engine import make_decoder
    opts = DecodeOptions()
    dec = make_decoder(rand_model, opts, 120)
    seen_logits = []
    dec.sampler.pick = lambda logits, _: seen_logits.append(logits) or logits.argmax(-1)
    a, b = prompts()[1], prompts()[0]
    (ha,) = dec.add_rows([a])
    for _ in range(5):
        dec.step()
    (hb,) = dec.add_rows([b])
    for _ in range(20):  # ragged: the rows sit at different slots (crossing the window of 16)
        dec.step()
    for h in (ha, hb):
        seq = dec.row(h).seq
        ref = full_logits(rand_model, seq[:-1])[-1]
        assert ref.argmax().item() == seq[-1]
    last = seen_logits[-1]
    for i, h in enumerate((ha, hb)):
        assert (last[i] - full_logits(rand_model, dec.row(h).seq[:-1])[-1]).abs().max().item() <= 1e-5
    dec.remove_row(ha)
    dec.rollback(hb, 4)
    got = dec.step()[hb]
    seq = dec.row(hb).seq
    assert got == [full_logits(rand_model, seq[:-1])[-1].argmax().item()]


@pytest.mark.parametrize("kw", [dict(mode="wand", wand_factor=0.5), dict(mode="speculative", gamma=4)])
def test_poe_decoders_add_rows_mid_run(kw, trained, trained_calib):
    """WAND and speculative rows added between steps get the tokens they get alone."""
    from poelm.engine import make_decoder
    engine = Engine(trained, calibration=trained_calib)
    opts = engine.options(dict(kw, max_new_tokens=40))
    a, b = text_prompt_ids("the red cat"), text_prompt_ids("a big dog")
    dec = make_decoder(trained, opts, 100)
    (ha,) = dec.add_rows([a])
    for _ in range(3):
        dec.step()
    (hb,) = dec.add_rows([b])
    while len(dec.row(hb).seq) < len(b) + 20:
        dec.step()
    for h, p in ((ha, a), (hb, b)):
        got = dec.row(h).seq[len(p):]
        alone = engine.generate(p, max_new_tokens=len(got), stop_token_ids=[], **kw).tokens
        assert got[:len(alone)] == alone


@pytest.mark.parametrize("kw", [dict(mode="final"), dict(mode="wand", wand_factor=0.5), dict(mode="speculative", gamma=3)],
                         ids=lambda kw: kw["mode"])
def test_joining_rows_never_read_their_unzeroed_cache(kw, trained, trained_calib, monkeypatch):
    """Rows that join a running decoder prefill into a cache that is not zero-filled (only its
    written slots are copied): poisoned with NaN, every row still gets the tokens of a zeroed run."""
    import poelm.model
    from poelm.engine import make_decoder

    opts = Engine(trained, calibration=trained_calib).options(dict(kw, max_new_tokens=40))
    first, joining = [text_prompt_ids("the red cat")], [text_prompt_ids("a big dog ran to the"), [BOS]]

    def run() -> list[list[int]]:
        dec = make_decoder(trained, opts, 100)
        handles = dec.add_rows(first)
        for _ in range(3):
            dec.step()
        handles += dec.add_rows(joining)  # left-padded, ragged against the first row
        handles.append(dec.add_prefixed_row(joining[0], dec.kv(handles[1], 0, 4)))
        for _ in range(12):
            dec.step()
        return [dec.row(h).seq for h in handles]

    zeroed = run()
    init, poisoned = poelm.model.KVCache.__init__, []

    def nan_filled(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not kwargs.get("zeroed", args[6] if len(args) > 6 else True):
            poisoned.append(self)
            for t in self.k + self.v:
                t.fill_(float("nan"))

    monkeypatch.setattr(poelm.model.KVCache, "__init__", nan_filled)
    assert run() == zeroed and len(poisoned) == 2  # the joins' caches, never the decoder's own


@pytest.mark.parametrize("kw", [dict(mode="final", repetition_penalty=1.3), dict(mode="wand", wand_factor=0.5),
                                dict(mode="speculative", gamma=3)], ids=lambda kw: kw["mode"])
def test_joining_rows_take_the_places_of_leaving_rows(kw, trained, trained_calib):
    """replace_rows: a joined row takes a leaving row's batch place (the serving scheduler's join
    into a dead row): the other rows keep their places and their cache, and every row, the joined
    ones included, gets the tokens it gets alone. A joined row longer than the running rows keeps
    all its K/V through a replacement or a removal before the next step."""
    from poelm.engine import make_decoder

    engine = Engine(trained, calibration=trained_calib)
    opts = engine.options(dict(kw, max_new_tokens=40))
    first = [text_prompt_ids("the red cat"), text_prompt_ids("a dog"), text_prompt_ids("one two three")]
    joining = [text_prompt_ids("a big dog ran to the"), text_prompt_ids("and then the small cat sat")]
    dec = make_decoder(trained, opts, 100)
    handles = dec.add_rows(first)
    for _ in range(3):
        dec.step()
    last = dec.cache.k[0][2].clone()
    (joined,) = dec.add_rows(joining[:1])
    dec.replace_rows([handles[1]], [joined])
    assert [r.handle for r in dec.rows] == [handles[0], joined, handles[2]] and dec.seen.shape[0] == 3
    assert torch.equal(dec.cache.k[0][2], last)  # the row after the replaced one kept its place
    with pytest.raises(ValueError, match="no row"):
        dec.replace_rows([handles[1]], [joined])  # it left
    (later,) = dec.add_rows(joining[1:])
    dec.remove_rows([handles[0]])  # a compaction before the joined row's first step
    while len(dec.row(later).seq) < len(joining[1]) + 16:
        dec.step()
    for h, p in ((joined, joining[0]), (handles[2], first[2]), (later, joining[1])):
        got = dec.row(h).seq[len(p):]
        alone = engine.generate(p, max_new_tokens=len(got), stop_token_ids=[], **kw).tokens
        assert got[:len(alone)] == alone


def test_wand_reports_exit_histogram_and_skips_impossible_tests(trained, trained_calib, monkeypatch):
    engine = Engine(trained, calibration=trained_calib)
    s = engine.generate(text_prompt_ids("the red cat"), mode="wand", max_new_tokens=20).stats
    assert sum(s["exit_stage_counts"]) == 20 and len(s["exit_stage_counts"]) == 4
    plain = engine.generate(text_prompt_ids("the red cat"), max_new_tokens=5).tokens
    stages_read = []
    readout = trained.readout
    monkeypatch.setattr(trained, "readout", lambda x, stage=None, *a, **k: stages_read.append(stage) or readout(x, stage, *a, **k))
    huge = Engine(trained, calibration={"wand_bounds": [0.0, 40.0, 40.0, 40.0]})
    out = huge.generate(text_prompt_ids("the red cat"), mode="wand", max_new_tokens=5)
    s = out.stats
    assert s["exit_stage_counts"] == [0, 0, 0, 5] and s["exit_tests_skipped"] == 5 * 3  # gaps are < 30
    assert stages_read == [None] * 5 and out.tokens == plain  # a skipped test reads nothing out


def test_removing_no_rows_leaves_the_cache_alone(rand_model):
    """Session removes the finished rows after every step; an empty removal must not copy the cache."""
    from poelm.engine import make_decoder
    dec = make_decoder(rand_model, DecodeOptions(), 64)
    dec.add_rows([prompts()[0], prompts()[1]])
    k0 = dec.cache.k[0]
    dec.step()
    dec.remove_rows([])
    assert dec.cache.k[0] is k0 and len(dec.rows) == 2


@torch.no_grad()
def test_decoder_reused_after_its_last_row_left(rand_model):
    """Rows leave until none is left, then new ones join: each gets what it gets in a fresh decoder
    (the repetition-penalty memory `seen` shrinks with the rows)."""
    from poelm.engine import make_decoder
    opts = DecodeOptions(repetition_penalty=1.3)
    dec = make_decoder(rand_model, opts, 64)
    (h,) = dec.add_rows([prompts()[0]])
    dec.step()
    dec.remove_rows([h])
    assert dec.rows == [] and dec.seen.shape[0] == 0
    handles = dec.add_rows([prompts()[1], prompts()[0]])
    for _ in range(6):
        dec.step()
    fresh = make_decoder(rand_model, opts, 64)
    ref = fresh.add_rows([prompts()[1], prompts()[0]])
    for _ in range(6):
        fresh.step()
    assert [dec.row(x).seq for x in handles] == [fresh.row(x).seq for x in ref]
