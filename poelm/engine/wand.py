"""WAND adaptive depth, batched, with exact lazy KV back-fill (docs/poe.md §4).

    dec = WandDecoder(model, DecodeOptions(mode="wand", calibration=calib), capacity)
    dec.add_rows(prompts); new = dec.step()          # {handle: [token]}
    dec.stats.exit_stage_counts                      # the exit histogram per stage

Per token and row: stop at the first stage k whose leader cannot be overtaken, top1 - top2
of r_k > F * sum_{j>k} b_j. A step runs stage s for the whole batch while any row has not
exited; the exit test reads out only the rows still active, and is skipped at stages where
no gap can reach the threshold (soft-capped logits: a gap is < 2 x 15 per readout), the
readout too when the target is the final readout. Every
row of the batch lags stage s by the same `lag[s]` slots, whose inputs (the boundary
residual of stage s-1, and x0) are kept; the next step that runs stage s runs it on those
slots together with the new one, so the cache becomes exactly the full-depth cache. Rows
exit on their own, so each row gets the token it gets alone.

A test runs only where it pays (exit_plan): where the calibration measured costs, at stage k
when P(exit at k | reached k) x the cost of the stages after k exceeds the test's cost. With no
stage tested the decoder is the plain decoder of the target readout (one pass over every layer,
no kept residuals), so WAND never pays for tests that cannot save.

Compiled (compile_step), that plain decoder runs the compiled plain step, and the staged step
(target final, no constrained row) runs as one compiled segment per stage: its layers over the
stage's lagging slots and the new one (static widths 1, 2, 4, 8: the slots after the new one are
scratch that a later pass overwrites before any query sees them; a longer lag is back-filled
eagerly first), its readout and exit test, one host read of the exits. The gate is then taken
on compiled costs (compiled_step_costs, measured once per model, backend, mode and plan), so
compiled WAND never runs a staged step that loses to the compiled plain step.
"""

from __future__ import annotations

import math

import torch

from poelm.engine.constrain import masked
from poelm.engine.costs import TIMING_PROMPT, device_sync, measured, step_overhead, step_times, timing_prompt
from poelm.engine.decoders import Capabilities, PlainDecoder, Row, compiled_cache_len
from poelm.engine.options import DecodeOptions, _check
from poelm.engine.sampling import logop, top_gap
from poelm.model import GPT, KVCache, SOFTCAP, RowBuffers, StepPlan, logop_weight


def wand_exit_rule(bounds: list[float], factor: float) -> list[float]:
    """Threshold after each stage k: F * sum_{j>k} b_j (inf for every stage but the last when F = inf)."""
    K = len(bounds)
    if math.isinf(factor):
        return [math.inf] * (K - 1) + [-math.inf]
    return [factor * sum(bounds[k + 1:]) for k in range(K - 1)] + [-math.inf]


def exit_rates_at(table: dict, factor: float) -> list[float]:
    """The stored exit rates at the smallest calibrated factor >= `factor` (rates fall as the factor
    grows, so this errs towards fewer exits); zeros past the largest."""
    for f, rates in sorted(zip(table["factors"], table["rates"])):
        if f >= factor:
            return rates
    return [0.0] * len(table["rates"][0])


def exit_plan(calib: dict, factor: float, thresholds: list[float], max_gap: list[float],
              compiled: dict | None = None) -> tuple[list[bool], str]:
    """Whether each stage k < K-1 runs its exit test, and why. A test runs where some gap can pass
    it and, when the calibration holds exit rates and measured costs, where its expected saving
    (P(exit at k | reached k) at this factor x the cost of stages k+1 ... K-1 at batch 1, less
    what back-filling the skipped position adds to the next deep pass) exceeds its cost (stage
    k's readout, top-2 and host read); and only if, per token, the tests' expected saving
    covers their expected cost plus the staged step's own overhead (else none runs).
    compiled (compiled decoding, compiled_step_costs): that last check is taken on compiled
    costs instead (compiled_plan)."""
    K = len(thresholds)
    possible = [thresholds[k] < max_gap[k] for k in range(K - 1)]
    table, costs = calib.get("wand_exit_rates"), calib.get("decode_costs")
    if table is None or costs is None:
        return possible, "the calibration holds no measured costs: every stage that can exit is tested " \
                         "(re-run `poelm calibrate` to measure them)"
    rates = exit_rates_at(table, factor)
    span = costs["positions"][-1] - costs["positions"][0]
    skipped = [c[0] - max(0.0, (c[-1] - c[0]) / span if span else 0.0) for c in costs["stage_s"]]  # run lazily
    test = [c[0] for c in costs["test_s"]]
    saving = [rates[k] * sum(skipped[k + 1:]) for k in range(K - 1)]
    tested = [possible[k] and saving[k] > test[k] for k in range(K - 1)]
    figures = "; ".join(f"stage {k}: exit rate {rates[k]:.2f}, saving {1e6 * saving[k]:.0f} us vs test "
                        f"{1e6 * test[k]:.0f} us" for k in range(K - 1))
    overhead, reach, gain, spend = costs.get("wand_overhead_s", 0.0), 1.0, 0.0, 0.0
    for k in (k for k in range(K - 1) if tested[k]):
        gain, spend, reach = gain + reach * saving[k], spend + reach * test[k], reach * (1 - rates[k])
    if any(tested) and compiled is not None:
        return compiled_plan(tested, gain, spend + overhead, figures, compiled)
    if any(tested) and gain > spend + overhead:
        return tested, f"tested where the expected saving exceeds the test's cost ({figures}; per token " \
                       f"{1e6 * gain:.0f} us saved vs {1e6 * (spend + overhead):.0f} us of tests and staging)"
    if any(tested):
        return [False] * (K - 1), f"the tests' expected saving ({1e6 * gain:.0f} us per token) does not cover " \
                                  f"their cost and the staged step's overhead ({1e6 * (spend + overhead):.0f} us; " \
                                  f"{figures}): decodes as plain"
    return tested, f"no exit test pays ({figures}): decodes as plain"


def compiled_plan(tested: list[bool], gain: float, spend: float, figures: str,
                  compiled: dict) -> tuple[list[bool], str]:
    """The gate of compiled decoding: the tested stages (some test pays on eager costs: gain and
    spend, seconds per token saved and spent on tests and staging), or none, against the compiled
    plain step. compiled: compiled_step_costs; with "staged_s" the staged step is compiled, its
    saving the eager one scaled by compiled / eager plain step and its cost what the compiled
    staged step, exiting nowhere, measured over the compiled plain step; without, the staged step
    runs eagerly and also forgoes what the compiled plain step saves over the eager one."""
    eager, plain = compiled["eager_plain_s"], compiled["compiled_plain_s"]
    us = lambda t: f"{1e6 * t:.0f} us"  # noqa: E731
    if "staged_s" in compiled:
        saved, cost = gain * plain / eager, compiled["staged_s"] - plain
        why = f"per token {us(saved)} saved (the eager {us(gain)} x {plain / eager:.2f}, the compiled / eager " \
              f"plain step) vs {us(cost)} that the compiled staged step's tests and staging cost"
    else:
        saved, cost = gain, spend + eager - plain
        why = f"the staged step runs eagerly: per token {us(gain)} saved vs {us(spend)} of tests and staging + " \
              f"{us(eager - plain)} that the compiled plain step saves over the eager one"
    if saved > cost:
        return tested, f"compiled: tested where the expected saving exceeds the test's cost; {why} ({figures})"
    return [False] * len(tested), f"compiled: {why} ({figures}): decodes as compiled plain"


def never_exits(K: int) -> DecodeOptions:
    """WAND options whose every threshold sits just under the largest gap a soft-capped readout can
    have: each test runs and none passes (the timed staged steps)."""
    return DecodeOptions(mode="wand", calibration={"wand_bounds": [0.0] * (K - 1) + [2 * SOFTCAP * (1 - 1e-6)]})


def wand_overhead(model: GPT, tests_s: float, repeats: int = 5, steps: int = 16) -> float:
    """Seconds per token that a WAND step testing every stage but exiting nowhere costs beyond a
    plain step, its tests (`tests_s` together) excluded: the kept inputs and one layer call per
    stage (step_overhead compares the steps)."""
    n = repeats * steps
    wand = WandDecoder(model, never_exits(model.config.n_stages), len(TIMING_PROMPT) + 2 * n + 1)
    wand.add_rows([timing_prompt(model)])
    return max(0.0, step_overhead(model, wand, n, device_sync(model)) - tests_s)


def compiled_step_costs(model: GPT, backend, mode: str | None = None, tested: list[bool] | None = None,
                        repeats: int = 5, steps: int = 16) -> dict:
    """Seconds of a step at batch 1 on this machine, compiled with this torch.compile backend and
    mode: {"eager_plain_s": the eager plain step, "compiled_plain_s": the compiled plain step,
    "staged_s" (given `tested`): the compiled staged step running the exit tests of `tested` and
    exiting nowhere}. One row each, timed alternately (step_times; its warm-up steps include the
    compiles)."""
    n = repeats * steps
    capacity = len(TIMING_PROMPT) + 2 * n + 1
    scratch = compiled_cache_len(capacity, model.config.sequence_len) - capacity
    decoders = [PlainDecoder(model, DecodeOptions(), capacity, scratch)]
    if tested is not None:
        staged = WandDecoder(model, never_exits(model.config.n_stages), capacity, scratch)
        staged.tested = list(tested)  # these tests only
        decoders.append(staged)
    for dec in decoders:
        dec.compile_step(backend, mode)
        dec.add_rows([timing_prompt(model)])
    eager, plain, *staged_s = step_times(model, decoders, n, device_sync(model))
    return {"eager_plain_s": eager, "compiled_plain_s": plain, **({"staged_s": staged_s[0]} if staged_s else {})}


SEGMENT_WIDTHS = (1, 2, 4, 8)  # slots a compiled stage segment runs: the new one and up to 7 lagging


class WandDecoder(PlainDecoder):
    modes = {"wand": Capabilities("WAND adaptive depth", compilable=True, needs_calibration=True, needs_stages=True,
                                  options=("wand_factor",))}

    @classmethod
    def check_options(cls, opts: DecodeOptions, model: GPT) -> None:
        f = opts.wand_factor
        _check(isinstance(f, (int, float)) and not math.isnan(f) and f >= 0, f"wand_factor must be >= 0 (inf = full depth), got {f!r}", "wand_factor")

    @staticmethod
    def readout_mode(opts: DecodeOptions) -> str:
        """The target: the final readout, or the Log-OP of every stage."""
        return "final" if opts.calibration.get("wand_target", "final") == "final" else "logop"

    def __init__(self, model: GPT, opts: DecodeOptions, capacity: int, scratch: int = 0):
        super().__init__(model, opts, capacity, scratch)
        cfg = model.config
        self.K = cfg.n_stages
        calib = opts.calibration
        self.target = calib.get("wand_target", "final")
        self.thresholds = wand_exit_rule(calib["wand_bounds"], opts.wand_factor)
        # the compiled segments' thresholds: inputs, not constants (one graph for every wand_factor)
        self._threshold_t = torch.tensor(self.thresholds, dtype=torch.float32, device=self.device)
        w = logop_weight(self.K, self.alpha)
        # the largest gap r_k can have: each soft-capped readout spans < 2 x SOFTCAP
        self.max_gap = [2 * SOFTCAP if self.target == "final" else 2 * SOFTCAP * w * (k + 1) for k in range(self.K)]
        self.first_layer = [0] + [e + 1 for e in cfg.stage_ends[:-1]]
        self.lag = [0] * self.K  # slots every row's stage s still has to run
        self.x0 = self.boundary = None  # (B, max_len, d) and K-1 of them
        self._row_buffers = RowBuffers([1] * self.K)  # their rows: joined and removed in place
        self.stats.exit_stage_counts = [0] * self.K
        self._segments = None  # compiled: the staged step's segment (_segment)
        self._columns = None  # its slot columns (_segment_slots)
        self._plan(None)

    def _plan(self, compiled: dict | None) -> None:
        """The stages whose exit test runs (exit_plan), and whether the step is staged at all."""
        self.tested, self.stats.wand_reason = exit_plan(self.opts.calibration, self.opts.wand_factor,
                                                        self.thresholds, self.max_gap, compiled)
        self.stats.wand_tested_stages = [k for k, t in enumerate(self.tested) if t]
        self.staged = any(self.tested)  # else: the plain decoder of the target

    def compile_step(self, backend: str = "inductor", mode: str | None = None) -> None:
        """The plain step and (target final) the staged step's segments compiled. Where the eager
        costs make some test pay, the gate is taken again on compiled costs (compiled_step_costs,
        measured once per model, backend, mode and plan, before any row joins: the tokens of a
        run never depend on its own timings)."""
        super().compile_step(backend, mode)
        if self.staged and self.opts.calibration.get("decode_costs") is not None:
            self.flush()
            tested = self.tested if self.target == "final" else None  # logop: the staged step runs eagerly
            key = ("compiled_step_costs", backend, mode, None if tested is None else tuple(tested))
            self._plan(measured(self.model, key, lambda: compiled_step_costs(self.model, backend, mode, tested)))

    def _compile_graphs(self, compiler):
        """The compiled plain step (no test pays) and the staged step's segment: one graph per stage,
        width and batch size; dynamo's limit of graphs per function is raised to 8 batch sizes' worth."""
        graphs = 1 + len(SEGMENT_WIDTHS) * (self.K - 1)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 8 * graphs)
        self._segments = compiler(self._segment)
        return super()._compile_graphs(compiler)

    # --- rows ------------------------------------------------------------------------
    def _append(self, cache: KVCache, rows: list[Row], seen: torch.Tensor, x0) -> None:
        if self.staged:
            self._append_inputs(len(rows))
        super()._append(cache, rows, seen, x0)

    def _append_inputs(self, n: int) -> None:
        """Room for n new rows' kept inputs (x0 and the stage boundary residuals)."""
        if self.rows:
            self.flush()  # the new rows start with no lag; so must the old ones
        d, p = self.cfg.n_embd, self.model.lm_head.weight
        if self.x0 is None or not self.rows:
            self.x0, *self.boundary = [torch.zeros(n, self.max_len, d, device=p.device, dtype=p.dtype)
                                       for _ in range(self.K)]
        else:  # zero rows joined into free row slots: inputs are kept for lagging slots only, none after the flush
            self.x0, *self.boundary = self._row_buffers.append([self.x0, *self.boundary], None, self._filled(), 0, n=n)

    def _keep(self, keep: list[int]) -> None:
        super()._keep(keep)
        if self.rows and self.staged:
            self.x0, *self.boundary = self._row_buffers.keep([self.x0, *self.boundary], keep, self._filled())

    def _filled(self) -> int:
        """Slots that may hold kept inputs: a stage's inputs are kept where its layers wrote K/V."""
        return max(self.cache.lengths, default=0) if self.cache is not None else 0

    def computed(self, handle: int) -> int:
        """Positions with K/V in every layer: not the last max(lag) ones, whose deeper stages wait
        for their back-fill (the same count for every row)."""
        return super().computed(handle) - max(self.lag)

    def rollback(self, handle: int, n: int) -> None:
        self.flush()
        super().rollback(handle, n)

    def finish(self) -> KVCache:
        self.flush()
        return super().finish()

    # --- stages ------------------------------------------------------------------------
    def _chunk(self, ends: list[int], T: int):
        """The last T slots before each row's end -> (start, slots): an int start and no slot
        tensor when the rows agree (slices), else the starts and the (B, T) slot indices to gather."""
        starts = [e - T for e in ends]
        if all(s == starts[0] for s in starts):
            return starts[0], None
        return starts, torch.tensor(starts, device=self.device).unsqueeze(1) + torch.arange(T, device=self.device)

    def _gather(self, buf: torch.Tensor, start, slots: torch.Tensor | None, T: int) -> torch.Tensor:
        if slots is None:
            return buf[:, start:start + T]
        return buf[torch.arange(buf.shape[0], device=self.device).unsqueeze(1), slots]

    def _run_stage(self, s: int, ends: list[int], T: int, x: torch.Tensor | None, keep: set[int],
                   plan: StepPlan | None = None):
        """Run stage s on the last T slots of every row (input: x, or the kept boundary of stage
        s-1); plan: the step's one-slot plan, shared by every stage that has no lag."""
        start, slots = self._chunk(ends, T)
        first, end = self.first_layer[s], self.cfg.stage_ends[s] + 1
        inp = x if x is not None else self._gather(self.boundary[s - 1], start, slots, T)
        x0 = self._gather(self.x0, start, slots, T)
        idx = self._gather(self.cache.tokens, start, slots, T)
        out, kept = self.model.run_layers(inp, x0, idx, first, end, self.cache, start, keep=keep,
                                          plan=plan if T == 1 else None)
        if s < self.K - 1:
            if slots is None:
                self.boundary[s][:, start:start + T] = out
            else:
                self.boundary[s][torch.arange(len(ends), device=self.device).unsqueeze(1), slots] = out
        self._count(layer_passes=(end - first) * T, layer_calls=end - first)  # ends: every row's
        return out, kept

    def flush(self) -> None:
        """Back-fill every lagging stage: the cache becomes the full-depth cache."""
        if not self.rows:
            return
        ends = [r.slots for r in self.rows]
        for s in range(1, self.K):
            if self.lag[s]:
                self._run_stage(s, ends, self.lag[s], None, set())
                self._count(backfilled=self.lag[s])
                self.lag[s] = 0

    def _step(self) -> dict[int, list[int]]:
        if not self.staged:  # every token takes the target's readout after the last stage
            new = super()._step()
            for r in self.rows:
                self._exited(r, self.K - 1)
            self._count(tests_skipped=self.K - 1)
            return new
        if self._segments is not None and self.target == "final" and not self.constrained():
            return self._compiled_step()
        model, cfg = self.model, self.cfg
        B = len(self.rows)
        start = self.starts()
        ids = self.pending()
        x = model.embed(ids, self.cache, start)  # (B, 1, d)
        if isinstance(start, int):
            self.x0[:, start] = x[:, 0]
        else:
            self.x0[torch.arange(B, device=self.device), torch.tensor(start, device=self.device)] = x[:, 0]
        ends = [r.slots + 1 for r in self.rows]
        bl = cfg.backout_layer if cfg.backout else -1
        active = list(range(B))  # rows that have not exited
        allowed = self.allowed()  # (B, V) of a constraint: exits are decided among the allowed tokens
        out_logits: list[torch.Tensor | None] = [None] * B
        running = None  # logop target: the running Log-OP of the active rows (A, V)
        used: list[torch.Tensor] = []  # logop target: stage readouts (B, V)
        lasts: list[torch.Tensor] = []  # last residual at every stage boundary (B, d)
        x_mid = None
        plan = StepPlan(model, B, 1, x.dtype, x.device, self.cache, start, set(model.windows))
        for s in range(self.K):
            keep = {bl} if self.first_layer[s] <= bl <= cfg.stage_ends[s] else set()
            out, kept = self._run_stage(s, ends, self.lag[s] + 1, x if s == 0 else None, keep, plan)
            self._count(backfilled=self.lag[s])
            self.lag[s] = 0
            if bl in kept:
                x_mid = kept[bl][:, -1]
            lasts.append(out[:, -1])
            last = s == self.K - 1
            if not last and not self.tested[s]:  # no gap can pass, or the test does not pay: no test
                self._count([self.rows[b] for b in active], tests_skipped=1)
                if self.target == "final":  # nor a readout (the logop target sums every stage's)
                    continue
            act = torch.tensor(active, device=self.device) if len(active) < B else None
            sel = lambda t: t if act is None else t.index_select(0, act)  # noqa: E731
            if self.target == "final":
                if s == self.K - 1:
                    r = model.readout(sel(lasts[-1]), None, sel(x_mid) if x_mid is not None else None,
                                      [sel(t) for t in lasts])
                else:
                    r = model.readout(sel(lasts[-1]), s)
            else:
                z = model.readout(sel(lasts[-1]), s)
                used.append(z)
                step_r = logop_weight(self.K, self.alpha) * z.log_softmax(-1)
                running = step_r if running is None else running + step_r
                r = running
            r = masked(r, allowed, act)
            if last:
                exits = [True] * len(active)
            elif not self.tested[s]:
                exits = [False] * len(active)
            else:
                exits = (top_gap(r) > self.thresholds[s]).tolist()
            still = []
            for a, (b, ex) in enumerate(zip(active, exits)):
                if ex:
                    out_logits[b] = r[a] if self.target == "final" else logop([u[a] for u in used], self.alpha)
                    self._exited(self.rows[b], s)
                else:
                    still.append(a)
            if self.target == "logop" and still and len(still) < len(active):
                keep_a = torch.tensor(still, device=self.device)
                running = running.index_select(0, keep_a)
                used = [u.index_select(0, keep_a) for u in used]
            active = [active[a] for a in still]
            if not active:
                for j in range(s + 1, self.K):
                    self.lag[j] += 1
                break
        return self._emit(self.sampler.pick(masked(torch.stack(out_logits), allowed), self.seen))

    # --- the compiled staged step --------------------------------------------------------
    def _compiled_step(self) -> dict[int, list[int]]:
        """The staged step as compiled segments (target final, no constraint): stage by stage while
        some row has not exited, one segment (the stage's lagging slots and the new one, its readout
        and exit test) and one host read of its exits."""
        B, cur = len(self.rows), [r.slots for r in self.rows]
        self._begin_static()
        new_slots = torch.tensor(cur, device=self.device)  # (B,)
        active = torch.ones(B, dtype=torch.bool, device=self.device)  # rows that have not exited
        still, out_logits, lasts, x_mid = list(range(B)), [None] * B, [], None
        for s in range(self.K):
            slots, at = self._segment_slots(s, cur, new_slots)
            last, x_mid, r, exits = self._segments(s, self.pending() if s == 0 else None, slots, at, active,
                                                   self._threshold_t[s], x_mid, lasts)
            self._segment_written(s, cur)
            lasts.append(last)
            if exits is None:  # an untested stage: no readout
                self._count([self.rows[b] for b in still], tests_skipped=1)
                continue
            passed = [True] * B if s == self.K - 1 else exits.tolist()  # the stage's one host read
            for b in still:
                if passed[b]:
                    out_logits[b] = r[b]
                    self._exited(self.rows[b], s)
            still = [b for b in still if not passed[b]]
            if not still:
                for j in range(s + 1, self.K):
                    self.lag[j] += 1
                break
            active = active & ~exits
        return self._emit(self.sampler.pick(torch.stack(out_logits), self.seen))

    def _segment_slots(self, s: int, cur: list[int], new_slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage s's slots this step, (B, W) of the narrowest SEGMENT_WIDTHS width that holds its
        lagging slots and the new one (`cur`, on the device `new_slots`), and the new slot's column
        (1,). A lag past the widest width, or one the cache has no room to pad, is back-filled
        eagerly first (the new slot alone)."""
        lag = self.lag[s]
        width = next((w for w in SEGMENT_WIDTHS if w > lag), None)
        if width is None or max(cur) - lag + width > self.max_len:
            if lag:
                self._run_stage(s, cur, lag, None, set())
            lag, width = 0, 1
        self._count(backfilled=self.lag[s])
        self.lag[s] = 0
        n = self.cfg.stage_ends[s] + 1 - self.first_layer[s]
        self._count(layer_passes=n * (lag + 1), layer_calls=n)
        if self._columns is None:  # made once: (W,) 0 ... W-1 per width, (1,) [lag] per lag
            self._columns = ({w: torch.arange(w, device=self.device) for w in SEGMENT_WIDTHS},
                             [torch.tensor([k], device=self.device) for k in range(SEGMENT_WIDTHS[-1])])
        columns, at = self._columns
        return (new_slots - lag).unsqueeze(1) + columns[width], at[lag]

    def _segment(self, s: int, ids: torch.Tensor | None, slots: torch.Tensor, at: torch.Tensor, active: torch.Tensor,
                 threshold: torch.Tensor, x_mid: torch.Tensor | None, lasts: list[torch.Tensor]):
        """Stage s of the compiled staged step (static shapes): its layers over every row's slots
        (B, W), the new slot at column `at` (1,) and scratch slots after it, then at the new slot its
        readout and exit test (gap > threshold, a 0-d tensor). ids: the pending tokens (B, 1) that
        stage 0 embeds (W = 1); a later stage reads the kept boundary residuals of stage s-1. lasts:
        the earlier stages' residuals at the new slot (B, d) -> (its residual (B, d), x_mid, readout
        (B, V) or None (untested), exits (B,): the active rows whose test passes, every active row
        at the last stage)."""
        model, cfg = self.model, self.cfg
        rows = torch.arange(slots.shape[0], device=slots.device).unsqueeze(1)  # (B, 1)
        if s == 0:
            self.x0[rows, slots] = model.embed(ids, self.cache, slots[:, 0])
        x0, idx = self.x0[rows, slots], self.cache.tokens[rows, slots]  # (B, W, d), (B, W)
        x = x0 if s == 0 else self.boundary[s - 1][rows, slots]
        first, end = self.first_layer[s], cfg.stage_ends[s] + 1
        bl = cfg.backout_layer if cfg.backout else -1
        out, kept = model.run_layers(x, x0, idx, first, end, self.cache, slots[:, 0],
                                     keep={bl} if first <= bl < end else set())
        if bl in kept:
            x_mid = kept[bl].index_select(1, at)[:, 0]
        last = out.index_select(1, at)[:, 0]
        if s == self.K - 1:
            return last, x_mid, model.readout(last, None, x_mid, [*lasts, last]), active
        self.boundary[s][rows, slots] = out
        if not self.tested[s]:
            return last, x_mid, None, None
        r = model.readout(last, s)
        return last, x_mid, r, active & (top_gap(r) > threshold)

    def _segment_written(self, s: int, cur: list[int]) -> None:
        """After stage s's segment: its layers' host lengths (the graph keeps none) up to the new
        slots, and after stage 0's embedding, the cache's token count where the rows agree."""
        end = max(cur) + 1
        lengths = self.cache.lengths
        for i in range(self.first_layer[s], self.cfg.stage_ends[s] + 1):
            lengths[i] = max(lengths[i], end)
        if s == 0 and min(cur) == end - 1:
            self.cache.n_tokens = end
