"""The decoder protocol every mode implements, and the plain decoder (final / stage / logop).

A decoder owns a KV cache and a batch of rows; a scheduler drives it step by step:

    dec = make_decoder(model, opts, capacity)        # registry.py: the decoder class of opts.mode
    handles = dec.add_rows([[1, 2, 3], [4, 5]])     # prefill (rows may be added between steps)
    new = dec.step()                                 # {handle: [new token ids]}: one, or several (speculative)
    dec.remove_row(handles[0]); dec.rollback(handles[1], 2)
    dec.stats.to_dict(); dec.is_full(handle)
    dec.kv(handle, 0, dec.computed(handle))         # a row's complete K/V (a prefix cache keeps it)

A row's last token is pending: prefill runs the prompt but its last token, and every step
feeds each row's pending token(s) and samples the next. Rows are ragged: each keeps its own
slot count, and steps where all rows agree use the uniform (slice, mask-free) path.

Every decoder class declares the modes it decodes and what each supports (`modes`:
mode -> Capabilities) and checks a mode's own options (`check`); registry.py collects them.
"""

from __future__ import annotations

import copy
import inspect
import types
import weakref
from dataclasses import dataclass, field, fields, replace
from itertools import zip_longest

import torch

from poelm.engine.constrain import masked, masks, row_matcher
from poelm.engine.options import DecodeOptions, _check, refuse_bp, shown
from poelm.engine.sampling import Sampler, logop
from poelm.model import GPT, KVCache
from poelm.runtime import pin_inductor_vec_isa

MIN_KEY_SLOTS = 16  # a static step attends at least this many key slots (a dynamic size never 0 or 1)


def new_cache(model: GPT, batch_size: int, capacity: int, pad: torch.Tensor | None = None,
              n_layers: int | None = None, zeroed: bool = True) -> KVCache:
    """A KV cache with K/V for the first n_layers layers only (default all); zeroed=False: its
    unwritten K/V slots are not zero-filled (KVCache: only for a cache whose rows are appended)."""
    cfg = model.config
    if n_layers is not None and n_layers < cfg.n_layer:
        cfg = copy.copy(cfg)  # the cache reads n_layer, n_kv_head, head_dim; deeper layers get no memory
        cfg.n_layer = n_layers
    p = model.lm_head.weight
    return KVCache(cfg, batch_size, capacity, p.device, p.dtype, pad, zeroed)


@dataclass(frozen=True)
class Capabilities:
    """What a decoding mode supports and needs."""

    description: str  # what the mode reads out, as a BP refusal names it
    compilable: bool = False  # the step can run as one compiled static-shape graph (compile_step)
    logprobs: bool = False  # one token per row per step from one readout: its log-probabilities are reported
    needs_calibration: bool = False  # WAND swing bounds (calibrate.py)
    needs_stages: bool = False  # reads out intermediate stages: refused on a BP model unless forced
    options: tuple[str, ...] = ()  # the DecodeOptions fields this mode reads that the other modes ignore


@dataclass
class Row:
    """One sequence in a decoder: prompt + generated ids; the last id is pending (not in the cache)."""

    handle: int
    seq: list[int]
    slots: int  # cache slots this row fills (its left padding included)
    pad: int = 0
    produced: int = 0
    gamma: int = 0  # speculative: drafted tokens per verify pass (adaptive per row)
    matcher: object = None  # constrain.RowMatcher: the row's structured-output constraint (None: free)
    counts: "RowCounts" = field(default_factory=lambda: RowCounts())  # its share of the decoder's counters


@dataclass
class RowCounts:
    """One row's share of its decoder's DecodeStats counters: the work the decoder ran for that row
    (a batched pass counts for every row in it) and what the mode decided for it (its WAND exits,
    its drafts and accepted drafts). A request's statistics are its rows' counts, exact whatever
    else shared the batch."""

    layer_passes: int = 0
    layer_calls: int = 0
    backfilled: int = 0
    tests_skipped: int = 0
    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0
    exit_stage_counts: list[int] = field(default_factory=list)

    def add(self, other: RowCounts) -> None:
        for name in COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.exit_stage_counts = [a + b for a, b in zip_longest(self.exit_stage_counts, other.exit_stage_counts,
                                                                fillvalue=0)]


COUNTERS = tuple(f.name for f in fields(RowCounts) if f.name != "exit_stage_counts")  # the scalar counters


@dataclass
class DecodeStats:
    """Decode-phase work (prefill excluded) and, per mode, what the mode decided."""

    mode: str
    stages_per_token: float = 0.0  # plain modes: stages every token runs
    layer_passes: int = 0  # layer x position executions per row (compute)
    layer_calls: int = 0  # sequential layer invocations (latency on overhead-bound hardware)
    exit_stage_counts: list[int] = field(default_factory=list)  # WAND: tokens that exited after stage k
    backfilled: int = 0  # WAND: (slot, stage) pairs run lazily
    tests_skipped: int = 0  # WAND: exit tests skipped (no gap can pass, or the test does not pay)
    wand_tested_stages: list[int] = field(default_factory=list)  # WAND: the stages whose exit test runs
    wand_reason: str | None = None  # WAND: why those stages (the cost model's figures)
    draft_stage: int | None = None  # speculative
    drafted: int = 0
    accepted: int = 0
    verify_passes: int = 0  # per row
    gamma: int | None = None
    speculative_choice: dict | None = None  # adaptive speculative: the draft stage and gamma chosen, fallbacks

    def of_rows(self, counts: RowCounts) -> "DecodeStats":
        """These stats (the mode's decisions, e.g. WAND's tested stages) with the counters of some
        rows (RowCounts summed over them) in place of the decoder's totals."""
        exits = [a for a, _ in zip_longest(counts.exit_stage_counts, self.exit_stage_counts, fillvalue=0)]
        return replace(self, **{name: getattr(counts, name) for name in COUNTERS}, exit_stage_counts=exits)

    def to_dict(self, n_new: int) -> dict:
        out: dict = {"mode": self.mode}
        if n_new:
            out["mean_layers_per_token"] = self.layer_passes / n_new
            out["mean_layer_calls_per_token"] = self.layer_calls / n_new
        if self.mode == "wand":
            n = sum(self.exit_stage_counts)
            out.update(mean_stages_per_token=sum((k + 1) * c for k, c in enumerate(self.exit_stage_counts)) / max(n, 1),
                       exit_stage_counts=list(self.exit_stage_counts), backfilled=self.backfilled,
                       exit_tests_skipped=self.tests_skipped, wand_tested_stages=list(self.wand_tested_stages),
                       wand_reason=self.wand_reason)
        else:
            out["mean_stages_per_token"] = self.stages_per_token
        if self.mode == "speculative":
            out.update(draft_stage=self.draft_stage, drafted=self.drafted, accepted=self.accepted,
                       verify_passes=self.verify_passes, gamma=self.gamma,
                       acceptance_rate=self.accepted / self.drafted if self.drafted else None,
                       tokens_per_verify=n_new / self.verify_passes if self.verify_passes else None)
            if self.speculative_choice is not None:
                out["speculative_choice"] = dict(self.speculative_choice)
        return out


class Decoder:
    """The protocol: add_rows (prefill), step, remove_row(s), replace_rows (joined rows into
    leaving rows' places), rollback, is_full, stats; computed and kv read a row's finished K/V
    out (a prefix cache).

    Subclasses set `end_layer` (layers the prefill runs), implement `_step`, and may extend
    `_append` / `_keep` for per-row state of their own."""

    end_layer: int
    modes: dict[str, Capabilities] = {}  # the modes this class decodes

    @classmethod
    def check(cls, opts: DecodeOptions, model: GPT) -> None:
        """Raise ValueError (one line) where opts.mode cannot decode `model` with opts: the mode's
        own options, then ModeRefused on a BP model for a mode that reads out stages."""
        cls.check_options(opts, model)
        caps = cls.modes[opts.mode]
        if caps.needs_stages:
            refuse_bp(model, caps.description, opts.force)

    @classmethod
    def check_options(cls, opts: DecodeOptions, model: GPT) -> None:
        """The mode's own options (ValueError), or ModeRefused where the model cannot run it at all."""

    def __init__(self, model: GPT, opts: DecodeOptions, capacity: int, scratch: int = 0):
        self.model, self.cfg, self.opts = model, model.config, opts
        self.capacity = capacity  # a row that fills this many slots is full (the context limit)
        self.max_len = capacity + scratch  # speculative drafts may run past a row's capacity
        self.device = model.lm_head.weight.device
        self.sampler = Sampler(opts, self.device, self.cfg.vocab_size)
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self.seen = torch.zeros(0, self.cfg.vocab_size, dtype=torch.bool, device=self.device)  # (B, V)
        self.stats = DecodeStats(opts.mode)
        self._next_handle = 0
        self._compiled = None  # compile_step: the compiled graph(s) of the step
        self._cuda_graphs, self._marked = False, None

    @classmethod
    def min_scratch(cls, opts: DecodeOptions) -> int:
        """Cache slots past a row's capacity that the mode writes (speculative drafts)."""
        return 0

    # --- rows ------------------------------------------------------------------------
    def add_rows(self, prompts: list[list[int]], grammars: list | None = None) -> list[int]:
        """Prefill rows (left-padded together) and add them to the batch -> their handles.
        grammars: each row's compiled constraint (constrain.Grammar or None; default opts.constraint)."""
        P = max(len(p) for p in prompts) - 1  # the last token of each prompt stays pending
        pad = torch.tensor([P - len(p) + 1 for p in prompts], device=self.device)
        cache = new_cache(self.model, len(prompts), self.max_len, pad if P > 0 else None, n_layers=self.end_layer,
                          zeroed=not self._appends())
        x0 = self._prefill(cache, prompts, P) if P > 0 else None
        rows = []
        for p, n_pad in zip(prompts, pad.tolist() if P > 0 else [0] * len(prompts)):
            rows.append(Row(self._next_handle, list(p), P if P > 0 else 0, n_pad if P > 0 else 0, gamma=self.opts.gamma))
            self._next_handle += 1
        for r, g in zip(rows, grammars or [self.opts.constraint] * len(rows)):
            r.matcher = row_matcher(g)
        seen = torch.zeros(len(prompts), self.cfg.vocab_size, dtype=torch.bool, device=self.device)
        for b, p in enumerate(prompts):
            seen[b, torch.tensor(p, device=self.device)] = True
        self._append(cache, rows, seen, x0)
        return [r.handle for r in rows]

    def add_prefixed_row(self, prompt: list[int], prefix: torch.Tensor, grammar=None) -> int:
        """Add one row whose first m positions already have K/V (prefix: (2, end_layer, kv heads,
        m, head_dim), e.g. from a prefix cache; m < len(prompt)): only the rest of the prompt is
        prefilled -> its handle. The row continues exactly as add_rows([prompt], [grammar]) would
        (grammar: its compiled constraint; None: opts.constraint)."""
        m = prefix.shape[3]
        cache = new_cache(self.model, 1, self.max_len, n_layers=self.end_layer, zeroed=not self._appends())
        for layer in range(self.end_layer):
            cache.k[layer][0, :, :m] = prefix[0, layer]
            cache.v[layer][0, :, :m] = prefix[1, layer]
        cache.tokens[0, :m] = torch.tensor(prompt[:m], device=self.device)
        cache.lengths, cache.n_tokens = [m] * self.end_layer, m
        if len(prompt) - 1 > m:  # the last token stays pending
            idx = torch.tensor([prompt[m:-1]], device=self.device)
            x = x0 = self.model.embed(idx, cache, m)
            self.model.run_layers(x, x0, idx, 0, self.end_layer, cache, m)
        row = Row(self._next_handle, list(prompt), len(prompt) - 1, gamma=self.opts.gamma)
        row.matcher = row_matcher(grammar if grammar is not None else self.opts.constraint)
        self._next_handle += 1
        seen = torch.zeros(1, self.cfg.vocab_size, dtype=torch.bool, device=self.device)
        seen[0, torch.tensor(prompt, device=self.device)] = True
        self._append(cache, [row], seen, None)
        return row.handle

    def computed(self, handle: int) -> int:
        """How many leading ids of a row's seq have K/V in every layer this decoder runs: all but
        the pending one (a mode that defers layers, WAND, subtracts the positions they still lack)."""
        r = self.row(handle)
        return r.slots - r.pad

    def kv(self, handle: int, start: int, end: int) -> torch.Tensor:
        """K/V of a row's positions start..end-1, (2, end_layer, kv heads, end - start, head_dim), a
        copy (e.g. for a prefix cache); final below computed(handle)."""
        b = next(i for i, r in enumerate(self.rows) if r.handle == handle)
        lo, hi, c = self.rows[b].pad + start, self.rows[b].pad + end, self.cache  # the positions' slots
        return torch.stack([torch.stack([c.k[i][b, :, lo:hi], c.v[i][b, :, lo:hi]]) for i in range(self.end_layer)], 1)

    def _prefill(self, cache: KVCache, prompts: list[list[int]], P: int):
        idx = torch.tensor([[0] * (P - len(p) + 1) + p[:-1] for p in prompts], device=self.device)  # (B, P)
        x = x0 = self.model.embed(idx, cache, 0)
        self.model.run_layers(x, x0, idx, 0, self.end_layer, cache, 0)
        return x0

    def _appends(self) -> bool:
        """Whether new rows' cache is appended to this decoder's (its written slots copied: they
        need no zero-filled cache of their own), or becomes it."""
        return self.cache is not None and bool(self.rows)

    def _append(self, cache: KVCache, rows: list[Row], seen: torch.Tensor, x0) -> None:
        if not self._appends():
            self.cache = cache
        else:
            self.cache.append_rows(cache)
        self.rows += rows
        self.seen = torch.cat([self.seen, seen])

    def remove_row(self, handle: int) -> None:
        self.remove_rows([handle])

    def remove_rows(self, handles: list[int]) -> None:
        """Drop rows from the batch (one compaction of the cache for all of them)."""
        gone = set(handles)
        unknown = gone - {r.handle for r in self.rows}
        if unknown:
            raise ValueError(f"no row {sorted(unknown)[0]} in this decoder")
        if not gone:  # nothing leaves: no compaction (it would copy the whole cache)
            return
        self._keep([b for b, r in enumerate(self.rows) if r.handle not in gone])

    def replace_rows(self, leaving: list[int], joined: list[int]) -> None:
        """Rows `joined` (added last) take the batch places of rows `leaving`, which leave, pair by
        pair (joined rows beyond len(leaving) stay where they are): only the joined rows' cache is
        copied, where removing `leaving` would shift every row after the first of them."""
        if len(joined) < len(leaving):
            raise ValueError(f"{len(leaving)} rows cannot leave in place of {len(joined)} joined rows")
        place = {r.handle: b for b, r in enumerate(self.rows)}
        unknown = (set(leaving) | set(joined)) - place.keys()
        if unknown:
            raise ValueError(f"no row {sorted(unknown)[0]} in this decoder")
        taker = dict(zip(leaving, joined))
        moved = set(joined[:len(leaving)])
        self._keep([place[taker.get(r.handle, r.handle)] for r in self.rows if r.handle not in moved])

    def _keep(self, keep: list[int]) -> None:
        self.rows = [self.rows[b] for b in keep]
        self.seen = self.seen[keep]  # (len(keep), V): empty when the last row leaves, so add_rows appends cleanly
        if self.rows:
            self.cache.keep_rows(keep)

    def row(self, handle: int) -> Row:
        return next(r for r in self.rows if r.handle == handle)

    def _count(self, rows: list[Row] | None = None, **per_row: int) -> None:
        """Add each counter's amount per row to every row of `rows` (default: the batch) and, times
        their number, to the decoder's totals."""
        rows = self.rows if rows is None else rows
        for name, amount in per_row.items():
            setattr(self.stats, name, getattr(self.stats, name) + amount * len(rows))
            for r in rows:
                setattr(r.counts, name, getattr(r.counts, name) + amount)

    def _exited(self, row: Row, stage: int) -> None:
        """A token of `row` exited after `stage` (WAND)."""
        self.stats.exit_stage_counts[stage] += 1
        mine = row.counts.exit_stage_counts
        if len(mine) <= stage:
            mine.extend([0] * (stage + 1 - len(mine)))
        mine[stage] += 1

    def rollback(self, handle: int, n: int) -> None:
        """Drop the last n ids of a row (generated or prompt, keeping at least one)."""
        r = self.row(handle)
        if not 0 <= n < len(r.seq):
            raise ValueError(f"cannot roll back {n} of the {len(r.seq)} ids of row {handle}")
        if n:
            if r.matcher is not None:
                r.matcher.rollback(min(n, r.produced))
            r.seq = r.seq[:-n]
            r.slots = r.pad + len(r.seq) - 1
            r.produced = max(0, r.produced - n)
            b = self.rows.index(r)
            self.seen[b] = False
            self.seen[b, torch.tensor(r.seq, device=self.device)] = True

    def is_full(self, handle: int) -> bool:
        return self._full(self.row(handle))

    def full_rows(self) -> set[int]:
        """The handles of the rows that are full (is_full), in one pass over the rows."""
        return {r.handle for r in self.rows if self._full(r)}

    def _full(self, r: Row) -> bool:
        return r.slots >= self.capacity

    def finish(self) -> KVCache:
        """The cache, complete for every row (one row: lengths set to its slots)."""
        if len(self.rows) == 1:
            self.cache.crop(self.rows[0].slots)
        return self.cache

    # --- steps ---------------------------------------------------------------------
    def starts(self) -> int | list[int]:
        """Every row's next slot: an int when they agree (the uniform fast path)."""
        s = [r.slots for r in self.rows]
        return s[0] if all(v == s[0] for v in s) else s

    def pending(self) -> torch.Tensor:
        return torch.tensor([[r.seq[-1]] for r in self.rows], device=self.device)  # (B, 1)

    def constrained(self) -> bool:
        """Whether some row has a structured-output constraint."""
        return any(r.matcher is not None for r in self.rows)

    def allowed(self) -> torch.Tensor | None:
        """(B, V) bool: the tokens each row's constraint allows next (None: no row is constrained)."""
        return masks([r.matcher for r in self.rows], self.cfg.vocab_size, self.device)

    def step(self) -> dict[int, list[int]]:
        """Feed every row's pending token -> {handle: new ids}."""
        if not self.rows:
            return {}
        return self._step()

    def _emit(self, tokens: torch.Tensor) -> dict[int, list[int]]:
        """Record one sampled token (B,) per row."""
        self.seen.scatter_(1, tokens[:, None], True)
        out = {}
        for r, t in zip(self.rows, tokens.tolist()):  # the one host sync of a step
            r.seq.append(t)
            r.slots += 1
            r.produced += 1
            if r.matcher is not None:
                r.matcher.advance(t)
            out[r.handle] = [t]
        return out

    def _step(self) -> dict[int, list[int]]:
        raise NotImplementedError

    # --- the compiled step ------------------------------------------------------------
    def compile_step(self, backend: str = "inductor", mode: str | None = None) -> None:
        """Run every later step as compiled static-shape graphs (torch.compile; mode
        "reduce-overhead" replays them as CUDA graphs). The graphs attend over every slot of the
        cache through a mask and take the rows' slots as a tensor, so one graph serves every
        position of a batch: they compile once per batch size and never across steps."""
        self._cuda_graphs = mode is not None and "reduce-overhead" in mode or mode == "max-autotune"
        self._marked = None
        self._compiled = self._compile_graphs(lambda method: CompiledMethod(method, backend, mode, not self._cuda_graphs))

    def _compile_graphs(self, compiler):
        """The compiled graph(s) of this decoder's step (compiler: a method of the decoder -> its
        compiled form, called like the method)."""
        raise NotImplementedError

    def _begin_static(self) -> None:
        """Before a step's compiled graphs: the pad mask always applied (rows without padding have
        pad 0, so it changes nothing: one graph whether or not rows are padded), the cache tensors
        as static graph inputs (CUDA graphs)."""
        self.cache.has_pad = True
        if not self._cuda_graphs:
            return
        cache = self.cache
        if self._marked is not cache:  # the cache tensors keep their addresses: graph inputs
            for t in cache.k + cache.v + [cache.tokens, cache.pad]:
                torch._dynamo.mark_static_address(t)
            self._marked = cache
        torch.compiler.cudagraph_mark_step_begin()

    def _static_plain_step(self, graph) -> torch.Tensor:
        """One compiled single-position step: graph(pending ids (B, 1), the rows' slots (B,), the key
        slots) -> its output; keeps the cache's host lengths (the graph does not)."""
        self._begin_static()
        slots = [r.slots for r in self.rows]
        end = max(slots) + 1
        out = graph(self.pending(), torch.tensor(slots, device=self.device), self._key_slots(end))
        self._static_written(end, min(slots) == end - 1)
        return out

    def _key_slots(self, end: int) -> torch.Tensor | None:
        """The key slots a static step attends, 0 ... n-1 with n >= end (every row's slots so far),
        as a dynamic dimension of its graph: one graph serves every n, and a step reads the keys
        written so far rather than the whole cache. None (every slot, a static graph) for one row,
        whose static graph was faster than the dynamic one on the demo's model (its attention
        over a whole cache is small), and under CUDA graphs, whose replays need fixed shapes."""
        if self._cuda_graphs or len(self.rows) == 1:
            return None
        keys = torch.arange(min(self.cache.max_len, max(end, MIN_KEY_SLOTS)), device=self.device)
        torch._dynamo.maybe_mark_dynamic(keys, 0)
        return keys

    def _static_written(self, end: int, uniform: bool) -> None:
        """After a static step that wrote slots up to `end` (exclusive): the cache's host lengths
        (the graphs keep none); uniform: every row's slots now end there."""
        cache = self.cache
        cache.lengths = [max(n, end) for n in cache.lengths]
        if uniform:
            cache.n_tokens = end


class CompiledMethod:
    """A decoder's method compiled as its function (torch.compile, full graph, static shapes but for
    the dimensions its caller marks dynamic: a batched step's key slots) and called on the decoder
    through a weak reference. The decoder holds its compiled graphs; were
    they to hold the decoder (a compiled bound method), the cycle would keep a dropped decoder and
    its KV cache until Python's cyclic collector ran, which a long-running server seldom does.

    Dispatch: torch.compile checks a call's guards against each graph it built for the function
    and runs the first that passes, through its frame-evaluation hook, which costs ~100 us per call
    on CPU, as much as a 2-layer stage's whole step. This makes the same check itself (dynamo's
    live cache entries for the function, built by the one torch.compile of this function, backend
    and mode; each entry's guards; ~15 us) and calls the passing entry's transformed code directly.
    When no entry passes, the call goes through torch.compile, which builds one. CUDA graphs (mode
    reduce-overhead) always go through torch.compile."""

    COMPILED: dict[tuple, object] = {}  # (function, backend, mode) -> its torch.compile: one per key, so its entries are known
    BACKENDS: dict[tuple, object] = {}  # (function, backend, mode) -> the backend object its entries carry

    def __init__(self, method, backend, mode: str | None = None, direct: bool = True):
        fn = method.__func__
        self.owner = weakref.ref(method.__self__)
        self.key = (fn, backend, mode)
        if self.key not in self.COMPILED:
            if backend == "inductor":
                pin_inductor_vec_isa()  # the FX graph cache would mix up CPU vector widths
            self.COMPILED[self.key] = torch.compile(fn, backend=backend, mode=mode, dynamic=False, fullgraph=True)
        self.compiled, self.fn = self.COMPILED[self.key], fn
        self.direct = direct  # False: CUDA graphs, which torch.compile's dispatch replays
        params = inspect.signature(fn).parameters
        self.names = list(params)
        self.defaults = {k: v.default for k, v in params.items() if v.default is not inspect.Parameter.empty}
        self.functions: dict = {}  # an entry's transformed code -> it as a function

    def __call__(self, *args):
        owner = self.owner()
        if not self.direct:
            return self.compiled(owner, *args)
        backend = self.BACKENDS.get(self.key)
        entries = _cache_entries(self.fn.__code__)
        if backend is not None:
            local = dict(self.defaults)
            local.update(zip(self.names, (owner, *args)))
            for entry in entries:
                if entry.backend is backend and entry.guard_manager.check(local):
                    return self._function(entry.code)(owner, *args)
        known = {id(e.code) for e in entries}
        out = self.compiled(owner, *args)  # builds the graph of these arguments
        built = [e for e in _cache_entries(self.fn.__code__) if id(e.code) not in known]
        if built:
            self.BACKENDS[self.key] = built[0].backend
        return out

    def _function(self, code):
        fn = self.functions.get(code)
        if fn is None:
            f = self.fn
            fn = self.functions[code] = types.FunctionType(code, f.__globals__, f.__name__, f.__defaults__, f.__closure__)
            fn.__kwdefaults__ = f.__kwdefaults__
        return fn


def _cache_entries(code) -> list:
    """dynamo's live cache entries of a function's code (its compiled graphs with their guards)."""
    return torch._C._dynamo.eval_frame._debug_get_cache_entry_list(code)


class PlainDecoder(Decoder):
    """final / stage / logop: one token per row per step through a fixed layer range."""

    modes = {"final": Capabilities("the final readout", compilable=True, logprobs=True),
             "stage": Capabilities("prefix pruning / a stage readout", compilable=True, logprobs=True, needs_stages=True,
                                   options=("stage",)),
             "logop": Capabilities("a Log-OP of stages", compilable=True, logprobs=True, needs_stages=True,
                                   options=("stages",))}

    @classmethod
    def check_options(cls, opts: DecodeOptions, model: GPT) -> None:
        K = model.config.n_stages
        if opts.mode == "stage":
            stage = 0 if opts.stage is None else opts.stage
            _check(isinstance(stage, int) and 0 <= stage < K, f"stage {shown(stage)} is out of range: this model has stages 0..{K - 1}", "stage")
        if opts.mode == "logop":
            stages = list(range(K)) if opts.stages is None else list(opts.stages)
            _check(len(stages) > 0, "logop needs at least one stage", "stages")
            _check(all(isinstance(s, int) and 0 <= s < K for s in stages), f"logop stages {shown(stages)} out of range: this model has stages 0..{K - 1}", "stages")
            _check(len(set(stages)) == len(stages), f"logop stages {shown(stages)} repeat a stage", "stages")

    def __init__(self, model: GPT, opts: DecodeOptions, capacity: int, scratch: int = 0):
        super().__init__(model, opts, capacity, scratch)
        cfg = model.config
        self.mode = self.readout_mode(opts)
        self.stage = (opts.stage or 0) if self.mode == "stage" else None
        self.stages = sorted(opts.stages if opts.stages is not None else range(cfg.n_stages))
        self.alpha = cfg.poe_alpha if opts.logop_alpha is None else opts.logop_alpha
        if self.mode == "final":
            self.end_layer, self.keep = cfg.n_layer, model.final_keep()
            self.stats.stages_per_token = cfg.n_stages
        elif self.mode == "stage":
            self.end_layer, self.keep = cfg.stage_ends[self.stage] + 1, set()
            self.stats.stages_per_token = self.stage + 1
        else:  # logop
            self.end_layer = cfg.stage_ends[max(self.stages)] + 1
            self.keep = {cfg.stage_ends[k] for k in self.stages}
            self.stats.stages_per_token = max(self.stages) + 1

    @staticmethod
    def readout_mode(opts: DecodeOptions) -> str:
        """The plain mode (final / stage / logop) whose readout this decoder takes its tokens from."""
        return opts.mode

    def forward(self, idx: torch.Tensor, start: int | list[int] | torch.Tensor | None = None,
                last_only: bool = True, key_slots: torch.Tensor | None = None) -> torch.Tensor:
        """Feed idx (B, T) at `start` (default: the cache's next slot; a (B,) tensor of slots:
        the static-shape step, attending `key_slots`) -> logits (B, V) of the last position, or (B, T, V)."""
        cache, model = self.cache, self.model
        start = cache.n_tokens if start is None else start
        x = x0 = model.embed(idx, cache, start)
        x, kept = model.run_layers(x, x0, idx, 0, self.end_layer, cache, start, keep=self.keep, key_slots=key_slots)
        sel = (lambda t: t[:, -1]) if last_only else (lambda t: t)  # noqa: E731
        if self.mode == "final":
            mid = kept.get(self.cfg.backout_layer)
            stage_x = [sel(kept[e]) if e in kept else None for e in self.cfg.stage_ends]
            return model.readout(sel(x), None, sel(mid) if mid is not None else None, stage_x)
        if self.mode == "stage":
            return model.readout(sel(x), self.stage)
        zs = [model.readout(sel(kept[self.cfg.stage_ends[k]]), k) for k in self.stages]
        return logop(zs, self.alpha)

    def _compile_graphs(self, compiler):
        return compiler(self.forward)

    def _static_step(self) -> torch.Tensor:
        """One compiled step -> logits (B, V)."""
        return self._static_plain_step(lambda ids, starts, keys: self._compiled(ids, starts, True, keys))

    def _step(self) -> dict[int, list[int]]:
        logits = self._static_step() if self._compiled is not None else self.forward(self.pending(), self.starts())  # (B, V)
        self._count(layer_passes=self.end_layer, layer_calls=self.end_layer)
        return self._emit(self.sampler.pick(masked(logits, self.allowed()), self.seen))


def compiled_cache_len(capacity: int, sequence_len: int) -> int:
    """Cache slots of a compiled decoder: the next power of two (>= 64), so that the graphs of
    one batch size are few (the compiled step attends over every slot; shapes are static)."""
    return max(capacity, min(max(64, 1 << (capacity - 1).bit_length()), sequence_len))
