"""Self-speculative decoding, batched (docs/poe.md §5).

    dec = SpeculativeDecoder(model, DecodeOptions(mode="speculative", draft_stage=0, gamma=4), capacity)
    dec.add_rows(prompts); new = dec.step()          # {handle: [accepted drafts..., next token]}

Stage d drafts up to gamma tokens per row through layers <= d's boundary; one verify pass
runs only the deeper layers over [pending, drafts] of every row, reusing the draft K/V and
boundary residuals. Greedy: token-identical to plain greedy. Sampling: the Leviathan/Chen
rule (the output distribution equals the target's). Both hold with every logit processor: the
draft and the target at position i count the drafts before i as emitted (repetition penalty's
seen ids, presence/frequency counts, min_tokens' generated length: drafted_states), and the
next pass counts only what was accepted. Rows accept different numbers of drafts
and advance by different amounts (ragged slots); rejected slots are simply overwritten by
the row's next step. The cache holds `gamma + 1` scratch slots past the capacity so drafts
of one row never depend on another row's room.

With `adaptive`, a DraftChooser picks every pass's draft stage and gamma (0 = a plain pass:
the pending token through every layer, no drafts, run as the plain decoder's step) from the
acceptance measured so far in this decoder, the measured stage costs and the measured overhead
of a speculative pass (speculative_overhead); it drafts only where that is expected to beat
plain decoding by MARGIN. The tokens stay those of plain decoding (greedy) or distributed as
the target (sampling) whatever it picks.

Compiled (compile_step), a pass is one graph and a plain pass the compiled plain step, and
compiling saves the two unlike amounts. So the chooser weighs compiled costs: the eager pass
costs scaled by compiled / eager pass, the plain step by compiled / eager plain step, both
measured once per model, backend, mode and reference (draft stage, gamma) by compiled_pass_costs,
before any row joins.
"""

from __future__ import annotations

import torch

from poelm.engine.constrain import masked
from poelm.engine.costs import (TIMING_PROMPT, device_sync, measure_costs, measured, step_overhead, step_times,
                                timing_prompt)
from poelm.engine.decoders import Capabilities, Decoder, PlainDecoder, compiled_cache_len
from poelm.engine.options import MAX_GAMMA, DecodeOptions, ModeRefused, _check, row_options
from poelm.engine.sampling import NonFiniteLogits, Sampler
from poelm.engine.wand import wand_overhead
from poelm.model import GPT


EMA_WEIGHT = 0.1  # weight of each drafted token's outcome in a stage's acceptance estimate
MARGIN = 0.05  # drafting runs only where its expected speed-up over plain exceeds 1 + MARGIN
# graphs the compiled pass may hold: one per (draft stage, gamma) that adaptive decoding tries,
# times greedy / sampled and the batch sizes seen; past dynamo's default (8 per function) a
# fullgraph compile fails hard instead of falling back
PASS_GRAPHS = 64


def speculative_overhead(model: GPT, repeats: int = 5, steps: int = 16) -> float:
    """Seconds per pass that the speculative decoder's own work costs beyond a plain step: a pass
    that drafts nothing (the pending token through the draft and the verify layers, the final
    readout, the acceptance read and the row updates) timed against plain steps (step_overhead)."""
    n = repeats * steps
    spec = SpeculativeDecoder(model, DecodeOptions(mode="speculative", gamma=1), len(TIMING_PROMPT) + 2 * n + 1)
    spec.add_rows([timing_prompt(model)])
    spec.rows[0].gamma = 0  # no drafts: every pass is a verify pass of the pending token alone
    return max(0.0, step_overhead(model, spec, n, device_sync(model)))


@torch.inference_mode()
def compiled_pass_costs(model: GPT, backend, mode: str | None, d: int, gamma: int, repeats: int = 5,
                        steps: int = 16) -> dict:
    """Seconds at batch 1 on this machine, compiled with this torch.compile backend and mode:
    {"eager_plain_s", "compiled_plain_s": the plain step, "eager_pass_s", "compiled_pass_s": a
    greedy pass drafting gamma tokens from stage d}. One row each, timed alternately (step_times;
    its warm-up steps include the compiles), every row rolled back after each step so every step
    runs at the prompt's context whatever a pass accepts; the compiled decoders share one cache
    length, so their graphs attend over as many slots."""
    n = repeats * steps
    capacity = len(TIMING_PROMPT) + 2 * n + 1
    scratch = compiled_cache_len(capacity + gamma + 1, model.config.sequence_len) - capacity
    opts = DecodeOptions(mode="speculative", draft_stage=d, gamma=gamma)
    decoders = [PlainDecoder(model, DecodeOptions(), capacity, scratch),
                SpeculativeDecoder(model, opts, capacity, scratch), SpeculativeDecoder(model, opts, capacity, scratch)]
    decoders[0].compile_step(backend, mode)
    decoders[2].compile_step(backend, mode)
    for dec in decoders:
        dec.add_rows([timing_prompt(model)])
    eager, plain, eager_pass, compiled_pass = step_times(model, decoders, n, device_sync(model), rewind=True)
    return {"eager_plain_s": eager, "compiled_plain_s": plain, "eager_pass_s": eager_pass,
            "compiled_pass_s": compiled_pass}


def decode_costs(model: GPT) -> dict:
    """measure_costs(model) with "wand_overhead_s" (wand_overhead) and "speculative_overhead_s"
    where the model decodes speculatively (its final readout is the last stage's): what `poelm
    calibrate` stores."""
    costs = measure_costs(model)
    costs["wand_overhead_s"] = wand_overhead(model, sum(t[0] for t in costs["test_s"][:-1]))
    if model.config.final_readout == "last":
        costs["speculative_overhead_s"] = speculative_overhead(model)
    return costs


def with_draft(generated: tuple[torch.Tensor, torch.Tensor], token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """generated (counts (B, V), lengths (B,)) with one drafted token (B,) per row counted as emitted."""
    counts, lengths = generated
    return counts.scatter_add(1, token[:, None], torch.ones_like(counts[:, :1])), lengths + 1


def drafted_states(drafts: torch.Tensor, seen: torch.Tensor | None, generated: tuple[torch.Tensor, torch.Tensor] | None):
    """The sampler's state at each verify position i, the drafts before i counted as emitted (so
    the target's penalties and min_tokens mask at i are the draft's at i, and a plain step's after
    those drafts): drafts (B, G), seen (B, V) bool (None: no repetition penalty), generated
    (counts (B, V), lengths (B,); None: no presence/frequency penalty or min_tokens) ->
    (seen (B, G+1, V) or None, (counts (B, G+1, V), lengths (B, G+1)) or None)."""
    if seen is None and generated is None:
        return None, None
    B, G = drafts.shape
    V = (seen if seen is not None else generated[0]).shape[-1]
    hot = torch.nn.functional.one_hot(drafts, V)  # (B, G, V)
    before = torch.cat([hot.new_zeros(B, 1, V), hot.cumsum(1)], 1)  # (B, G+1, V): each id's drafts before i
    if seen is not None:
        seen = seen[:, None] | (before > 0)
    if generated is not None:
        counts, lengths = generated
        generated = (counts[:, None] + before.to(counts.dtype),
                     lengths[:, None] + torch.arange(G + 1, device=drafts.device))
    return seen, generated


def expected_tokens(a: float, gamma: int) -> float:
    """Tokens one verify pass yields with gamma drafts each accepted with probability a: (1 - a^(g+1)) / (1 - a)."""
    return gamma + 1.0 if a >= 1 else (1 - a ** (gamma + 1)) / (1 - a)


class DraftChooser:
    """The (draft stage, gamma) of each adaptive pass: the most expected tokens per second.

    Costs are decode_costs' (batch 1): a pass drafting g tokens from stage d costs (g + 1)
    positions through stages 0..d one at a time, g readouts of stage d, one verify pass of
    stages d+1..K-1 and the final readout over g + 1 positions (interpolated between the measured
    position counts), and the speculative pass's own overhead; g = 0 is a plain step, speed-up 1.
    Acceptance per stage is an exponential moving average over drafted tokens, starting from the
    calibration's stage agreement (or unknown: the first pass from draft_stage drafts the full
    gamma to measure it). When no choice beats plain by MARGIN, plain steps run, and every
    `probe` of them one drafting pass measures again. Compiled decoding: compiled() rescales
    the costs."""

    def __init__(self, costs: dict, stages: list[int], gamma_max: int, priors: list[float] | None, probe: int):
        self.stage_s, self.test_s, self.positions = costs["stage_s"], costs["test_s"], costs["positions"]
        self.overhead_s = costs.get("speculative_overhead_s", 0.0)
        self.stages, self.gamma_max, self.probe = stages, gamma_max, probe
        self.acceptance: dict[int, float | None] = {d: priors[d] if priors else None for d in stages}
        K = len(self.stage_s)
        self.plain_s = sum(self._cost(self.stage_s, k, 1) for k in range(K)) + self._cost(self.test_s, K - 1, 1)
        self.pass_s = {(d, g): self._pass_cost(d, g) for d in stages for g in range(1, gamma_max + 1)}
        self.plain_run = 0  # plain passes since the last drafting pass
        self.counts = {"passes": 0, "fallback_passes": 0, "probes": 0}
        self.choice: tuple[int, int, float] | None = None
        self.why = ""  # the kind of the last choice: "unmeasured", "drafts", "plain" or "probe"
        self.best: tuple[int, int, float] | None = None  # the best drafting (_best) at the last choice
        self.basis = "eager costs"
        self._best_cached: tuple[int, int, float] | None = None  # until an acceptance estimate moves
        self.spent_s = self.yielded = 0.0  # predicted seconds of the passes so far, their tokens per row

    def compiled(self, costs: dict, d: int, g: int) -> None:
        """Weigh compiled costs (compiled_pass_costs, measured with a pass drafting g from stage d):
        every pass's predicted seconds times compiled / eager pass, the plain step's times compiled
        / eager plain step (compiling saves a pass's many layer calls and its host work unlike a
        plain step's few; the one measured ratio stands for every (stage, gamma))."""
        pass_ratio = costs["compiled_pass_s"] / costs["eager_pass_s"]
        plain_ratio = costs["compiled_plain_s"] / costs["eager_plain_s"]
        self.plain_s *= plain_ratio
        self.pass_s = {k: s * pass_ratio for k, s in self.pass_s.items()}
        self._best_cached = None
        self.basis = f"compiled costs: the eager pass x {pass_ratio:.2f} (compiled / eager pass, d{d}/γ{g}), the " \
                     f"plain step x {plain_ratio:.2f} (compiled / eager plain step)"

    def _cost(self, table: list[list[float]], k: int, n: int) -> float:
        """Seconds of table[k] at n positions, linear between the first and last measured counts."""
        (p0, p1), (c0, c1) = (self.positions[0], self.positions[-1]), (table[k][0], table[k][-1])
        slope = max(0.0, (c1 - c0) / (p1 - p0)) if p1 > p0 else 0.0
        return c0 + slope * (n - p0)

    def _pass_cost(self, d: int, g: int) -> float:
        """Predicted seconds of a pass drafting g >= 1 tokens from stage d."""
        K = len(self.stage_s)
        draft = (g + 1) * sum(self._cost(self.stage_s, k, 1) for k in range(d + 1)) + g * self._cost(self.test_s, d, 1)
        verify = sum(self._cost(self.stage_s, k, g + 1) for k in range(d + 1, K)) + self._cost(self.test_s, K - 1, g + 1)
        return draft + verify + self.overhead_s

    def speedup(self, d: int, g: int, a: float) -> float:
        """Expected tokens per second of a (d, g) pass over plain decoding's (g = 0: a plain step, 1)."""
        return 1.0 if g == 0 else self.plain_s * expected_tokens(a, g) / max(self.pass_s[d, g], 1e-12)

    def _best(self) -> tuple[int, int, float]:
        """The drafting (d, g >= 1) of the highest expected speed-up; an unmeasured stage: its full gamma."""
        unknown = [d for d in self.stages if self.acceptance[d] is None]
        if unknown:
            return unknown[0], self.gamma_max, float("nan")
        if self._best_cached is None:
            self._best_cached = max(((d, g, self.speedup(d, g, self.acceptance[d])) for d, g in self.pass_s),
                                    key=lambda c: c[2])
        return self._best_cached

    def next_pass(self) -> tuple[int, int]:
        """(draft stage, gamma) of the next pass; gamma 0: a plain step."""
        d, g, speedup = self._best()
        self.counts["passes"] += 1
        self.best, self.why = (d, g, speedup), "unmeasured" if speedup != speedup else "drafts"
        if speedup <= 1 + MARGIN:  # nan (an unmeasured stage) drafts
            if self.plain_run < self.probe:
                self.plain_run += 1
                self.counts["fallback_passes"] += 1
                self.choice, self.why = (d, 0, 1.0), "plain"
                self.spent_s += self.plain_s
                return d, 0
            self.counts["probes"] += 1
            self.why = "probe"
        self.plain_run = 0
        self.choice = (d, g, speedup)
        self.spent_s += self.pass_s[d, g]
        return d, g

    def passed(self, tokens_per_row: float) -> None:
        """The pass just chosen yielded this many tokens per row (on average over the batch)."""
        self.yielded += tokens_per_row

    def observe(self, d: int, proposed: int, accepted: int) -> None:
        """One row's pass: `accepted` of `proposed` drafts from stage d (the first rejection ends it)."""
        outcomes = [1.0] * accepted + ([0.0] if accepted < proposed else [])
        if not outcomes:
            return
        a = self.acceptance[d]
        self._best_cached = None
        if a is None:
            a = sum(outcomes) / len(outcomes)
        else:
            for o in outcomes:
                a += EMA_WEIGHT * (o - a)
        self.acceptance[d] = a

    def report(self) -> dict:
        d, g, speedup = self.choice
        return dict(self.counts, draft_stage=d, gamma=g, expected_speedup=None if speedup != speedup else speedup,
                    acceptance={str(s): a for s, a in self.acceptance.items()},
                    predicted_speedup=self.yielded * self.plain_s / self.spent_s if self.spent_s else None,
                    reason=self.reason(), costs=self.basis)

    def reason(self) -> str:
        """Why the last pass drafted or ran plain."""
        d, g, speedup = self.best
        return {"unmeasured": f"drafts d{d}/γ{g} to measure stage {d}'s acceptance",
                "drafts": f"drafts d{d}/γ{g}: expected {speedup:.2f}x over plain, above 1 + margin ({1 + MARGIN:.2f}x)",
                "probe": f"probes d{d}/γ{g} after {self.probe} plain passes (expected {speedup:.2f}x over plain)",
                "plain": f"plain: the best drafting, d{d}/γ{g}, is expected at {speedup:.2f}x over plain, within "
                         f"1 + margin ({1 + MARGIN:.2f}x)"}[self.why]


class SpeculativeDecoder(Decoder):
    modes = {"speculative": Capabilities("speculative drafting from a stage", compilable=True, needs_stages=True,
                                         options=("draft_stage", "gamma", "adaptive_gamma", "adaptive", "adaptive_probe",
                                                  "draft_threshold"))}

    @classmethod
    def check_options(cls, opts: DecodeOptions, model: GPT) -> None:
        cfg = model.config
        K = cfg.n_stages
        if K < 2:
            raise ModeRefused("speculative decoding needs a model with at least 2 stages")
        if cfg.final_readout != "last":
            raise ModeRefused("speculative decoding verifies with the last stage's readout; this model's final readout "
                              "is the Log-OP of all stages (final_readout=logop): use mode final, logop or wand")
        d = opts.draft_stage
        _check(isinstance(d, int) and 0 <= d < K - 1, f"draft stage {d!r} is out of range: use 0..{K - 2} (the last stage is the target)", "draft_stage")
        g = opts.gamma
        _check(isinstance(g, int) and 1 <= g <= MAX_GAMMA, f"gamma must be an integer in 1..{MAX_GAMMA}, got {g!r}", "gamma")
        th = opts.draft_threshold
        _check(th is None or (isinstance(th, (int, float)) and 0 <= th <= 1), f"draft_threshold must lie in [0, 1], got {th!r}", "draft_threshold")
        _check(isinstance(opts.adaptive, bool), f"adaptive must be true or false, got {opts.adaptive!r}", "adaptive")
        _check(not (opts.adaptive and opts.adaptive_gamma), "adaptive and adaptive_gamma both choose gamma: pass one of them", "adaptive")
        p = opts.adaptive_probe
        _check(isinstance(p, int) and not isinstance(p, bool) and p >= 1, f"adaptive_probe must be an integer >= 1, got {p!r}", "adaptive_probe")

    @classmethod
    def min_scratch(cls, opts: DecodeOptions) -> int:
        return (MAX_GAMMA if opts.adaptive_gamma else opts.gamma) + 1

    def __init__(self, model: GPT, opts: DecodeOptions, capacity: int, scratch: int = 0):
        super().__init__(model, opts, capacity, max(scratch, self.min_scratch(opts)))
        cfg = model.config
        self.end_layer = cfg.n_layer
        self.d = opts.draft_stage
        self.split = cfg.stage_ends[self.d] + 1
        self.bl = cfg.backout_layer if cfg.backout else -1
        self.stats.draft_stage, self.stats.stages_per_token, self.stats.gamma = self.d, cfg.n_stages, opts.gamma
        self.chooser = self._chooser() if opts.adaptive else None
        self.reads_rows = bool(row_options(opts))  # presence/frequency penalty or min_tokens: counts per position

    def _chooser(self) -> DraftChooser:
        """Adaptive: costs and stage agreement from the calibration; costs it lacks are measured now
        (once per model and process)."""
        calib = self.opts.calibration or {}
        costs = calib.get("decode_costs")
        if costs is None:
            costs = measured(self.model, "costs", lambda: decode_costs(self.model))
        elif "speculative_overhead_s" not in costs:  # a calibration written before it was measured
            costs = dict(costs, speculative_overhead_s=measured(self.model, "overhead",
                                                                 lambda: speculative_overhead(self.model)))
        priors = calib.get("stage_agreement")
        stages = list(range(self.cfg.n_stages - 1)) if priors else [self.d]
        return DraftChooser(costs, stages, self.opts.gamma, priors, self.opts.adaptive_probe)

    def compile_step(self, backend: str = "inductor", mode: str | None = None) -> None:
        """The pass and the plain step compiled. Adaptive: the chooser weighs compiled costs
        (compiled_pass_costs for this decoder's draft stage and gamma, measured once per model,
        backend and mode, before any row joins: the tokens of a run never depend on its own
        timings)."""
        super().compile_step(backend, mode)
        if self.chooser is not None:
            d, g = self.opts.draft_stage, self.opts.gamma
            key = ("compiled_pass_costs", backend, mode, d, g)
            self.chooser.compiled(measured(self.model, key, lambda: compiled_pass_costs(self.model, backend, mode, d, g)),
                                  d, g)

    def _choose(self) -> int:
        """Adaptive: this pass's draft stage and gamma (every row's) -> gamma."""
        self.d, gamma = self.chooser.next_pass()
        self.split = self.cfg.stage_ends[self.d] + 1
        for r in self.rows:
            r.gamma = gamma
        return gamma

    def _plain_pass(self) -> dict[int, list[int]]:
        """Adaptive, drafting does not pay: the plain decoder's step (every layer, the final readout, the pick)."""
        L = self.cfg.n_layer
        if self._compiled is not None and not self.constrained():
            logits = self._static_plain_step(self._compiled[1])
        else:
            logits = self._plain_logits(self.pending(), self.starts())
        self._count(layer_passes=L, layer_calls=L, verify_passes=1)
        out = self._emit(self.sampler.pick(masked(logits, self.allowed()), self.seen))
        self.chooser.passed(1.0)
        self.stats.gamma, self.stats.draft_stage = 0, self.d
        self.stats.speculative_choice = self.chooser.report()
        return out

    def _plain_logits(self, ids: torch.Tensor, start, key_slots: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, 1) at `start` through every layer -> the final readout (B, V). key_slots: a static
        step's attended keys (Decoder._key_slots)."""
        x = x0 = self.model.embed(ids, self.cache, start)
        x, kept = self.model.run_layers(x, x0, ids, 0, self.cfg.n_layer, self.cache, start,
                                        keep={self.bl} if self.bl >= 0 else set(), key_slots=key_slots)
        mid = kept.get(self.bl)
        return self.model.readout(x[:, -1], None, mid[:, -1] if mid is not None else None)

    def _step(self) -> dict[int, list[int]]:
        if self.chooser is not None and self._choose() == 0:
            return self._plain_pass()
        if self._compiled is not None and not self.constrained():  # a constraint's masks come from the host per draft
            return self._static_pass()
        model, opts, sampler = self.model, self.opts, self.sampler
        B, L, split, bl = len(self.rows), self.cfg.n_layer, self.split, self.bl
        mid_in_draft = 0 <= bl < split
        slot0 = [r.slots for r in self.rows]
        n_max = [max(0, min(r.gamma, self.capacity - r.slots - 1, opts.max_new_tokens - r.produced - 1))
                 for r in self.rows]
        proposed = [0] * B
        drafting = [n > 0 for n in n_max]
        draft_seen = self.seen.clone()
        generated = self._generated()  # before draft j: the drafts 0..j-1 counted as emitted
        generated0 = generated
        feed = self.pending()  # (B, 1)
        xs, x0s, mids, drafts, qs = [], [], [], [], []
        allowed = []  # a constraint's (B, V) mask at each position: the drafts advance the rows' matchers
        while True:  # draft: layers [0, split), one position per row at a time
            j = len(drafts)
            start = slot0[0] + j if all(s == slot0[0] for s in slot0) else [s + j for s in slot0]
            x = x0 = model.embed(feed, self.cache, start)
            x, kept = model.run_layers(x, x0, feed, 0, split, self.cache, start, keep={bl} if mid_in_draft else set())
            self._count(layer_passes=split, layer_calls=split)
            xs.append(x), x0s.append(x0), mids.append(kept.get(bl))
            allowed.append(self.allowed())
            if not any(drafting):
                break
            q_logits = masked(sampler.penalise(model.readout(x[:, -1], self.d), draft_seen, generated),
                              allowed[j])  # (B, V)
            if opts.greedy:
                token, q = q_logits.argmax(-1), None
                top_prob = q_logits.softmax(-1).gather(1, token[:, None])[:, 0] if opts.draft_threshold else None
            else:
                q = sampler.probs(q_logits)
                token = sampler.draw(q)
                top_prob = q.max(-1).values
            low = (top_prob < opts.draft_threshold).tolist() if opts.draft_threshold is not None else [False] * B
            for b in range(B):
                if drafting[b]:
                    if low[b]:
                        drafting[b] = False
                    else:
                        proposed[b] += 1
                        drafting[b] = proposed[b] < n_max[b]
            if not any(p > j for p in proposed):  # no row proposed this draft: verify what there is
                break
            self._advance_drafts(token, [p > j for p in proposed])
            drafts.append(token), qs.append(q)
            draft_seen.scatter_(1, token[:, None], True)
            if generated is not None:
                generated = with_draft(generated, token)
            feed = token[:, None]
        n = len(drafts)
        # verify: layers [split, L) on [pending, drafts] of every row in one pass
        idx = torch.cat([self.pending()] + [t[:, None] for t in drafts], 1)  # (B, n+1)
        start = slot0[0] if all(s == slot0[0] for s in slot0) else slot0
        x, kept = model.run_layers(torch.cat(xs[:n + 1], 1), torch.cat(x0s[:n + 1], 1), idx, split, L, self.cache,
                                   start, keep={bl} if bl >= split else set())
        self._count(layer_passes=(L - split) * (n + 1), layer_calls=L - split)
        x_mid = torch.cat(mids[:n + 1], 1) if mid_in_draft else kept.get(bl)
        p_logits = model.readout(x, None, x_mid)  # (B, n+1, V)
        p_logits = sampler.penalise(p_logits, *drafted_states(idx[:, 1:], self._seen_if_penalised(), generated0))
        if allowed[0] is not None:  # the target at each position is masked like the draft there
            p_logits = masked(p_logits, torch.stack(allowed, 1))
        drafts_host = torch.stack(drafts, 1).tolist() if n else [[] for _ in range(B)]  # (B, n)
        outcomes = []
        for b in range(B):
            row_drafts = drafts_host[b][:proposed[b]]
            n_acc, token = self._accept(row_drafts, [q[b] if q is not None else None for q in qs[:proposed[b]]], p_logits[b, :proposed[b] + 1],
                                        sampler, opts)
            self.seen[b, torch.tensor(row_drafts[:n_acc] + [token], device=self.device)] = True
            outcomes.append((row_drafts, proposed[b], n_acc, token))
        return self._advance(slot0, outcomes)

    def _generated(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rows' generated counts and lengths (Sampler.generated) where an option reads them; else None."""
        return self.sampler.generated(self.cfg.vocab_size, torch.float32, self.device) if self.reads_rows else None

    def _seen_if_penalised(self) -> torch.Tensor | None:
        """seen (B, V) where a repetition penalty reads it; else None."""
        return self.seen if self.opts.repetition_penalty != 1.0 else None

    def _advance(self, slot0: list[int], outcomes: list[tuple[list[int], int, int, int]]) -> dict[int, list[int]]:
        """Every row's pass outcome (its drafts, how many it proposed and accepted, the next token)
        -> the rows advanced, the statistics and chooser updated, {handle: new ids}."""
        out = {}
        for r, s0, (row_drafts, proposed, n_acc, token) in zip(self.rows, slot0, outcomes):
            accepted = row_drafts[:n_acc] + [token]
            if r.matcher is not None:  # back from the drafts it took to the accepted ones, then the next token
                r.matcher.rollback(proposed - n_acc)
                r.matcher.advance(token)
            r.slots = s0 + 1 + n_acc  # rejected drafts' slots are rewritten by the next step
            r.seq += accepted
            r.produced += len(accepted)
            self._count([r], drafted=proposed, accepted=n_acc, verify_passes=1)
            if self.chooser is not None:
                self.chooser.observe(self.d, proposed, n_acc)
            if self.opts.adaptive_gamma:
                r.gamma = min(r.gamma + 2, MAX_GAMMA) if (proposed and n_acc == proposed) else max(1, r.gamma - 1)
            out[r.handle] = accepted
        self.stats.gamma, self.stats.draft_stage = self.rows[0].gamma, self.d
        if self.chooser is not None:
            self.chooser.passed(sum(map(len, out.values())) / len(out))
            self.stats.speculative_choice = self.chooser.report()
        return out

    def _advance_drafts(self, token: torch.Tensor, took: list[bool]) -> None:
        """The constrained rows that took this draft advance their matchers by it (rolled back on rejection)."""
        if self.constrained():
            for r, t, ok in zip(self.rows, token.tolist(), took):
                if ok and r.matcher is not None:
                    r.matcher.advance(t)

    @staticmethod
    def _accept(drafts: list[int], qs: list, p_logits: torch.Tensor, sampler: Sampler,
                opts: DecodeOptions) -> tuple[int, int]:
        """(accepted drafts, next token) from one row's penalised target logits (n+1, V)."""
        n = len(drafts)
        if opts.greedy:
            target = p_logits.argmax(-1).tolist()
            n_acc = 0
            while n_acc < n and drafts[n_acc] == target[n_acc]:
                n_acc += 1
            return n_acc, target[n_acc]
        p = sampler.probs(p_logits)  # (n+1, V)
        for i, t in enumerate(drafts):
            if sampler.uniform() * qs[i][t].item() < p[i, t].item():  # accept with min(1, p/q)
                continue
            residual = (p[i] - qs[i]).clamp(min=0)
            if residual.sum().item() <= 0:  # p == q up to rounding: the rejection was numerical noise
                residual = p[i]
            return i, sampler.draw((residual / residual.sum())[None])[0].item()
        return n, sampler.draw(p[n][None])[0].item()

    # --- the compiled pass -----------------------------------------------------------------
    def _compile_graphs(self, compiler):
        """Two graphs: a pass (G draft steps from stage d, each stage d's layers over one position,
        its readout and the pick, then the verify pass: the last draft through stage d's layers,
        the deeper layers over [pending, drafts], the final readout and every row's acceptance),
        and, for adaptive decoding's plain passes, the plain step (compiled when first called).
        One graph per pass: every compiled call pays the same fixed dispatch (guards, wrappers),
        so a pass costs one of them, as a plain step does. Raises dynamo's graphs-per-function
        limit to PASS_GRAPHS (never lowers it)."""
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, PASS_GRAPHS)
        return compiler(self._pass_graph), compiler(self._plain_logits)

    def _width(self) -> int:
        """Drafts per compiled pass (every row drafts as many; a row proposes at most its own
        gamma): the pass's gamma, or with adaptive_gamma the rows' largest as a power of two, so
        the pass graphs are few."""
        g = max(r.gamma for r in self.rows)
        return min(1 << (g - 1).bit_length(), MAX_GAMMA) if self.opts.adaptive_gamma and g else g

    def _noise(self, *shape: int) -> torch.Tensor | None:
        """Exponential noise from the decoder's generator (sampling: argmax(p / noise) draws from p); None when greedy."""
        if self.opts.greedy:
            return None
        return torch.empty(shape, device=self.device).exponential_(generator=self.sampler.gen)

    def _static_pass(self) -> dict[int, list[int]]:
        """One pass as one compiled graph (G draft steps, the verify pass), one host read."""
        opts, B, G, V = self.opts, len(self.rows), self._width(), self.cfg.vocab_size
        self._begin_static()
        slot0 = [r.slots for r in self.rows]
        n_max = [max(0, min(r.gamma, G, self.capacity - r.slots - 1, opts.max_new_tokens - r.produced - 1))
                 for r in self.rows]
        noises = [self._noise(B, V) for _ in range(G)]  # the generator's draws in the eager pass's order
        u = torch.rand(B, G, device=self.device, generator=self.sampler.gen) if not opts.greedy else None
        packed, new_ids = self._compiled[0](self.d, G, self.pending(), torch.tensor(slot0, device=self.device),
                                            torch.tensor(n_max, device=self.device), self.seen,
                                            self._seen_if_penalised(), self._generated(), noises, u,
                                            self._noise(B, V), self._key_slots(max(slot0) + G + 1))
        self.seen.scatter_(1, new_ids, True)
        host = packed.tolist()  # the one host read of the pass
        if host and host[0][-1]:
            raise NonFiniteLogits()
        L, split = self.cfg.n_layer, self.split
        self._count(layer_passes=L * (G + 1), layer_calls=split * (G + 1) + L - split)
        self._static_written(max(slot0) + G + 1, all(s == slot0[0] for s in slot0))
        return self._advance(slot0, [(row[:G], row[G + 2], row[G], row[G + 1]) for row in host])

    def _pass_graph(self, d: int, G: int, pending: torch.Tensor, starts: torch.Tensor, n_max: torch.Tensor,
                    seen: torch.Tensor, seen_penalised: torch.Tensor | None,
                    generated: tuple[torch.Tensor, torch.Tensor] | None, noises: list, u: torch.Tensor | None,
                    noise: torch.Tensor | None, key_slots: torch.Tensor | None = None):
        """G draft steps from stage d (each row's from its pending (B, 1) at slots starts (B,); each
        draft counts the ones before it as emitted), then their verify pass (seen_penalised,
        generated: the rows' state before the pass, None where no option reads it) ->
        _verify_graph's (packed, new_ids). key_slots: the keys every step attends (Decoder._key_slots)."""
        feed, draft_seen, draft_generated, steps = pending, seen, generated, []
        for j in range(G):
            *step, draft_seen, draft_generated = self._draft_graph(d, feed, starts + j, draft_seen, draft_generated,
                                                                   noises[j], key_slots)
            steps.append(step)  # x, x0, mid, token, q, top
            feed = step[3][:, None]
        xs, x0s, mids, drafts, qs, tops = (list(col) for col in zip(*steps)) if steps else ([] for _ in range(6))
        return self._verify_graph(d, pending, feed, starts, xs, x0s, mids, drafts, qs, tops, n_max, seen_penalised,
                                  generated, u, noise, key_slots)

    def _draft_layers(self, feed: torch.Tensor, starts: torch.Tensor, key_slots: torch.Tensor | None = None):
        """feed (B, 1) at slots starts (B,) through layers [0, split) -> x, x0, the backout residual (or None)."""
        bl = self.bl
        x = x0 = self.model.embed(feed, self.cache, starts)
        x, kept = self.model.run_layers(x, x0, feed, 0, self.split, self.cache, starts,
                                        keep={bl} if 0 <= bl < self.split else set(), key_slots=key_slots)
        return x, x0, kept.get(bl)

    def _draft_graph(self, d: int, feed: torch.Tensor, starts: torch.Tensor, seen: torch.Tensor,
                     generated: tuple[torch.Tensor, torch.Tensor] | None, noise: torch.Tensor | None,
                     key_slots: torch.Tensor | None = None):
        """One draft step from stage d -> x, x0, mid, the draft token (B,), its distribution q
        (sampling; else None), the draft's top probability (B,; greedy: only for draft_threshold),
        seen with the token added (only with a repetition penalty), generated with the token
        counted (only with presence/frequency penalty or min_tokens; else None)."""
        x, x0, mid = self._draft_layers(feed, starts, key_slots)
        sampler = self.sampler
        z = sampler.penalise(self.model.readout(x[:, -1], d), seen, generated)  # (B, V)
        if self.opts.greedy:
            token, q = z.argmax(-1), None
            top = z.softmax(-1).gather(1, token[:, None])[:, 0] if self.opts.draft_threshold is not None else None
        else:
            q = sampler.probs(z)
            token = (q / noise).argmax(-1)
            top = q.amax(-1)
        if self.opts.repetition_penalty != 1.0:
            seen = seen.scatter(1, token[:, None], True)
        return x, x0, mid, token, q, top, seen, with_draft(generated, token) if generated is not None else None

    def _verify_graph(self, d: int, pending: torch.Tensor, last: torch.Tensor, starts: torch.Tensor, xs: list,
                      x0s: list, mids: list, drafts: list, qs: list, tops: list, n_max: torch.Tensor,
                      seen: torch.Tensor | None, generated: tuple[torch.Tensor, torch.Tensor] | None,
                      u: torch.Tensor | None, noise: torch.Tensor | None, key_slots: torch.Tensor | None = None):
        """The verify pass of G = len(drafts) drafts (seen, generated: the rows' before the pass,
        None where no option reads them) -> (packed (B, G + 4): the drafts, accepted count, next
        token, proposed count, non-finite flag; the ids to mark seen (B, G + 1))."""
        model, sampler, opts = self.model, self.sampler, self.opts
        G, L, split, bl = len(drafts), self.cfg.n_layer, self.split, self.bl
        x, x0, mid = self._draft_layers(last, starts + G, key_slots)
        B = x.shape[0]
        D = torch.stack(drafts, 1) if G else pending.new_zeros(B, 0)  # (B, G)
        idx = torch.cat([pending, D], 1)  # (B, G+1)
        h, kept = model.run_layers(torch.cat(xs + [x], 1), torch.cat(x0s + [x0], 1), idx, split, L, self.cache,
                                   starts, keep={bl} if bl >= split else set(), key_slots=key_slots)
        z = model.readout(h, None, torch.cat(mids + [mid], 1) if 0 <= bl < split else kept.get(bl))  # (B, G+1, V)
        z = sampler.penalise(z, *drafted_states(D, seen, generated))  # position i counts the drafts before it
        ok = torch.ones(B, G, dtype=torch.long, device=z.device)
        if opts.draft_threshold is not None and G:  # a row stops drafting at its first unsure draft
            ok = (torch.stack(tops, 1) >= opts.draft_threshold).long()
        proposed = torch.minimum(ok.cumprod(1).sum(1), n_max)  # (B,)
        valid = torch.arange(G, device=z.device) < proposed[:, None]  # (B, G)
        if opts.greedy:
            target = z.argmax(-1)  # (B, G+1)
            n_acc = ((D == target[:, :G]) & valid).long().cumprod(1).sum(1)
            token = target.gather(1, n_acc[:, None])[:, 0]
            bad = torch.zeros((), dtype=torch.bool, device=z.device)
        else:
            token, n_acc, bad = self._accept_sampled(sampler.probs(z), D, qs, valid, proposed, u, noise)
        new = torch.cat([D, token[:, None]], 1)
        new_ids = torch.where(torch.arange(G + 1, device=z.device) < n_acc[:, None], new, token[:, None])
        packed = torch.cat([D, n_acc[:, None], token[:, None], proposed[:, None], bad.long().expand(B, 1)], 1)
        return packed, new_ids

    @staticmethod
    def _accept_sampled(p: torch.Tensor, D: torch.Tensor, qs: list, valid: torch.Tensor, proposed: torch.Tensor,
                        u: torch.Tensor, noise: torch.Tensor):
        """The Leviathan/Chen rule for every row at once: draft i is accepted when u_i q_i(x_i) <
        p_i(x_i); at the first rejection the token is drawn from normalise(max(0, p - q)) (p where
        that is zero), after all proposed drafts from p -> (token, accepted count, non-finite flag)."""
        B, G1, V = p.shape
        Q = torch.stack(qs, 1) if qs else p.new_zeros(B, 0, V)  # (B, G, V)
        at = D[..., None]
        n_acc = ((u * Q.gather(2, at)[..., 0] < p[:, :G1 - 1].gather(2, at)[..., 0]) & valid).long().cumprod(1).sum(1)
        pick = n_acc[:, None, None].expand(B, 1, V)
        p_n = p.gather(1, pick)[:, 0]  # (B, V)
        q_n = torch.cat([Q, torch.zeros_like(p[:, :1])], 1).gather(1, pick)[:, 0]
        residual = (p_n - q_n).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p_n)
        weights = torch.where((n_acc < proposed)[:, None], residual, p_n)
        bad = ~(torch.isfinite(p).all() & torch.isfinite(Q).all())
        return (weights / noise).argmax(-1), n_acc, bad
