"""Inference engine for PoE models: cached decoding with stage readouts, Log-OP, WAND
adaptive depth and self-speculative decoding (docs/poe.md §2-6).

    from poelm.engine import Engine, calibrate, save_calibration
    engine = Engine(model, tokenizer)
    out = engine.generate("The capital of France is", max_new_tokens=32)      # final readout, greedy
    out.text, out.tokens, out.stats                                          # stats: tokens/s, ...
    engine.generate(prompt, mode="stage", stage=0)                           # prefix pruning
    engine.generate(prompt, mode="logop", stages=[0, 3])                     # Log-OP of stages
    engine.generate(prompt, mode="speculative", draft_stage=0, gamma=4)      # token-identical to greedy
    engine.generate(prompt, mode="speculative", adaptive=True)   # stage and gamma chosen by cost; plain if none pays
    engine.calibration = calibrate(model, batches); engine.generate(prompt, mode="wand")
    for delta in engine.stream(prompt, temperature=0.8, top_p=0.9): print(delta, end="")
    Engine(model, tokenizer, compile=True)   # every mode: inductor-compiled static-shape steps (--compile)

    poelm generate MODEL "Once upon a time" --mode speculative --gamma 4
    poelm calibrate MODEL --data DIR

Modes
- final        every layer, the final readout of config.final_readout (the last stage, with
               backout when config.backout, or the Log-OP of all stages).
- stage K      prefix pruning: only the layers up to stage K's boundary run (the KV cache is
               allocated for those layers only), read out at stage K.
- logop S      renormalised Log-OP `s = sum_k w_k l_k`, w_k = 1/|S|^(1-alpha), of the stages in S;
               layers deeper than max(S) never run.
- wand         per token, stop at the first stage k whose leader cannot be overtaken:
               top1 - top2 of r_k > F * sum_{j>k} b_j (bounds b_j from `calibrate`). Exited
               tokens keep their boundary residual and x0; a later token that goes deeper first
               back-fills every pending position through the missing stage in one batched pass
               (together with itself), so the cache is exactly the full-depth cache.
- speculative  stage d drafts gamma tokens through layers <= d's boundary; one verify pass runs
               only the deeper layers over [last accepted token, drafts] reusing the draft K/V and
               boundary residuals. Greedy: token-identical to plain greedy. Sampling: the
               Leviathan/Chen rule (output distribution equals the target's). Rejected positions
               are cropped from every layer.
Every mode is a decoder of one protocol (decoders.py: add_rows / step / remove_row /
rollback / stats) and decodes a batch of rows together (a list of prompts); finished rows
leave the batch between steps (with compile they stay, so the batch keeps its compiled shape). Package layout: options.py (DecodeOptions, the
shared checks), sampling.py, decoders.py (protocol, plain), wand.py, speculative.py, registry.py (mode ->
decoder class and its capabilities, validation, make_decoder), calibrate.py, costs.py (measured costs),
stream.py.

Prompts: text (needs a tokenizer) or token ids; with a tokenizer `<|bos|>` is prepended when
missing. A prompt longer than config.sequence_len is an error (no silent truncation);
generation stops (stop_reason "context") when the context fills up.
Sampling follows transformers: repetition penalty (every id seen in the row, prompt included:
logit/penalty if > 0 else logit*penalty), then temperature (0 = greedy), top-k, top-p; around
them OpenAI's and vLLM's presence/frequency penalty, logit_bias, min_tokens and min_p (sampling.py).
Stop token ids end generation and appear in `tokens` but not in `text`; a stop string cuts
`text` before it. With a tokenizer the default stop ids are `<|bos|>` and `<|assistant_end|>`.
`constraint` (constrain.py: JSON object / JSON Schema / regex / grammar / choice) masks every
mode's logits to the tokens the constraint allows; the stop ids end it.
"""

from __future__ import annotations

import numbers
import time

import torch

from poelm.chat import ASSISTANT_END, BOS
from poelm.checkpoint import GENERATION_CONFIG_NAME
from poelm.contention import CpuClock
from poelm.engine.calibrate import (calibrate, check_calibration, check_cost_model, load_calibration,
                                    running_readouts, save_calibration, stage_swings, wand_teacher_forced)
from poelm.engine.constrain import Constraint, ConstraintError, compile_constraint
from poelm.engine.costs import measure_costs
from poelm.engine.decoders import Capabilities, Decoder, DecodeStats, PlainDecoder, Row, new_cache
from poelm.engine.options import (BP_REFUSAL, CALIBRATION_KEYS, MAX_GAMMA, WAND_TARGETS,
                                  ContextLengthError, DecodeOptions, Generation, ModeRefused, OptionError, _check,
                                  refuse_bp)
from poelm.engine.registry import (COMPILABLE_MODES, DECODERS, LOGPROB_MODES, MODE_OPTIONS, MODES, capabilities,
                                   ignored_options, make_decoder, modes_reading, modes_with, validate_options)
from poelm.engine.sampling import NonFiniteLogits, Sampler, logop, top_gap
from poelm.engine.speculative import SpeculativeDecoder
from poelm.engine.stream import TextStream, Collector
from poelm.engine.wand import WandDecoder, wand_exit_rule
from poelm.model import GPT

__all__ = ["Engine", "Session", "Decoder", "DecodeStats", "PlainDecoder", "WandDecoder", "SpeculativeDecoder", "Row",
           "make_decoder", "new_cache", "DecodeOptions", "Generation", "OptionError", "validate_options", "Sampler",
           "NonFiniteLogits", "logop",
           "top_gap", "TextStream", "calibrate", "check_calibration", "load_calibration", "save_calibration",
           "running_readouts", "stage_swings", "wand_exit_rule", "wand_teacher_forced", "measure_costs", "refuse_bp", "MODES",
           "WAND_TARGETS", "MAX_GAMMA", "BP_REFUSAL", "CALIBRATION_KEYS", "GENERATION_CONFIG_NAME",
           "Collector", "Capabilities", "ModeRefused", "DECODERS", "COMPILABLE_MODES", "LOGPROB_MODES",
           "capabilities", "modes_with", "modes_reading", "ignored_options", "MODE_OPTIONS", "ContextLengthError",
           "Constraint", "ConstraintError", "compile_constraint"]


class Engine:
    def __init__(self, model: GPT, tokenizer=None, calibration: dict | None = None, compile: bool | str = False):
        """compile: decode with compiled steps, True = inductor, or a torch.compile backend name
        (static-shape graphs per batch size and cache bucket, the first call of each pays the
        compile): the plain modes and WAND-as-plain one graph per step, speculative one graph per
        pass (its drafts and the verify); WAND's staged step (where an exit test pays) runs eagerly."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.calibration = calibration
        self.compile = "inductor" if compile is True else compile or None

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    # --- prompts -------------------------------------------------------------
    def bos_id(self) -> int | None:
        return getattr(self.tokenizer, "bos_token_id", None) if self.tokenizer is not None else None

    def encode_prompt(self, prompt, add_bos: bool = True) -> list[int]:
        """Text or ids -> ids, with <|bos|> prepended (when a tokenizer is known and it is missing)."""
        if isinstance(prompt, str):
            _check(self.tokenizer is not None, "a text prompt needs a tokenizer; pass token ids instead")
            _check(len(prompt) > 0, "empty prompt: give at least one character or token")
            ids = list(self.tokenizer.encode(prompt))
        else:
            ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
            _check(len(ids) > 0, "empty prompt: give at least one character or token")
        V = self.model.config.vocab_size
        _check(all(isinstance(i, numbers.Integral) and 0 <= i < V for i in ids), f"prompt token ids must be integers in [0, {V})")
        ids = [int(i) for i in ids]
        bos = self.bos_id()
        if add_bos and bos is not None and ids[0] != bos:
            ids = [bos] + ids
        T = self.model.config.sequence_len
        if len(ids) > T:
            raise ContextLengthError(len(ids), T)
        return ids

    def _rows(self, prompt, add_bos: bool) -> tuple[list[list[int]], bool]:
        """(rows of ids, whether the caller passed a single prompt)."""
        if isinstance(prompt, (str, torch.Tensor)) or (isinstance(prompt, (list, tuple)) and prompt
                                                       and isinstance(prompt[0], numbers.Integral)):
            return [self.encode_prompt(prompt, add_bos)], True
        _check(isinstance(prompt, (list, tuple)) and len(prompt) > 0, "empty prompt: give a string, token ids or a list of them")
        return [self.encode_prompt(p, add_bos) for p in prompt], False

    def stop_ids(self, opts: DecodeOptions) -> set[int]:
        """The token ids that end a row: the caller's, else <|bos|> and <|assistant_end|> (none of
        those with ignore_eos)."""
        if opts.stop_token_ids is not None or opts.ignore_eos:
            return set(opts.stop_token_ids or ())
        if self.tokenizer is None:
            return set()
        specials = getattr(self.tokenizer, "special_tokens", {}) or {}
        ids = {specials[n] for n in (BOS, ASSISTANT_END) if n in specials}
        if self.bos_id() is not None:
            ids.add(self.bos_id())
        return ids

    # --- public API ------------------------------------------------------------
    def generate(self, prompt, **options) -> Generation | list[Generation]:
        """Generate from one prompt (-> Generation) or a list of prompts (-> list)."""
        opts = self.options(options)
        rows, single = self._rows(prompt, opts.add_bos)
        session = Session(self, rows, opts)
        while session.advance():
            pass
        out = session.results()
        return out[0] if single else out

    def stream(self, prompt, **options) -> TextStream:
        """Text deltas of one prompt as they are generated (needs a tokenizer)."""
        opts = self.options(options)
        _check(self.tokenizer is not None, "streaming text needs a tokenizer")
        rows, single = self._rows(prompt, opts.add_bos)
        _check(single, "stream takes one prompt")
        return TextStream(Session(self, rows, opts))

    def options(self, options: dict) -> DecodeOptions:
        """DecodeOptions from keyword options (validated: a bad one is one line)."""
        try:
            opts = DecodeOptions(**options)
        except TypeError as e:
            raise ValueError(f"unknown generation option: {e}") from None
        validate_options(opts, self.model)
        if opts.stop_strings:
            _check(self.tokenizer is not None, "stop strings need a tokenizer")
        if opts.min_tokens:  # the sampler masks the stop ids until then: it needs them spelt out
            opts.stop_token_ids = sorted(self.stop_ids(opts))
        if capabilities(opts.mode).needs_calibration:
            opts.calibration = check_calibration(opts.calibration or self.calibration, self.model)
        elif opts.adaptive and (opts.calibration or self.calibration):  # adaptive speculative's cost model
            opts.calibration = opts.calibration or self.calibration
            check_cost_model(opts.calibration, self.model.config.n_stages)
        if opts.constraint is not None:
            opts.constraint = compile_constraint(opts.constraint, self.tokenizer, self.stop_ids(opts),
                                                 self.model.config.vocab_size)
        return opts


class Session:
    """One generate/stream call: a decoder driven step by step, the stop conditions of every
    row, and the Generations at the end. advance() runs one step (False when every row is done)."""

    def __init__(self, engine: Engine, rows: list[list[int]], opts: DecodeOptions):
        self.engine, self.rows, self.opts = engine, rows, opts
        self.t0 = time.perf_counter()
        self.clock = CpuClock.start()
        self.cpu: dict = {}  # on the CPU: threads, CPU share of wall x threads, contention (poelm.contention)
        self.collector = Collector(len(rows), opts, engine.tokenizer, engine.stop_ids(opts))
        self.first_token_s: float | None = None
        self.wall: float | None = None
        capacity = min(engine.model.config.sequence_len, max(len(r) for r in rows) + opts.max_new_tokens)
        with torch.inference_mode():
            self.decoder = make_decoder(engine.model, opts, capacity, compile=engine.compile)
            self.index = {h: b for b, h in enumerate(self.decoder.add_rows(rows))} if opts.max_new_tokens > 0 else {}
        self.cache = None
        if opts.max_new_tokens == 0:
            self._close("max_new_tokens")

    @torch.inference_mode()
    def advance(self) -> bool:
        if self.wall is not None:
            return False
        new = self.decoder.step()
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.t0
        col, leaving = self.collector, []
        for handle, tokens in new.items():
            b = self.index[handle]
            col.add(b, tokens)
            full = self.decoder.is_full(handle)
            if col.reason[b] is None and full:
                col.reason[b] = "context"
            if (col.reason[b] is not None and not (self.opts.keep_cache or self.engine.compile)) or full:
                leaving.append(handle)  # keep_cache / compile (a fixed batch shape): finished rows stay while they have room
        if col.done:
            self._close("context")
            return True
        self.decoder.remove_rows(leaving)
        if not self.decoder.rows:
            self._close("context")
        return True

    def _close(self, reason: str) -> None:
        for b in range(len(self.rows)):
            if self.collector.reason[b] is None:
                self.collector.reason[b] = reason
        if self.opts.keep_cache and self.opts.max_new_tokens > 0:
            dec = self.decoder
            for r in list(dec.rows):  # rows that went on after their stop: back to what they report
                b = self.index[r.handle]
                extra = len(r.seq) - len(self.rows[b]) - len(self.collector.tokens[b])
                if extra > 0:
                    dec.rollback(r.handle, extra)
            self.cache = dec.finish()
        self.wall = time.perf_counter() - self.t0
        if self.engine.device.type == "cpu":
            self.cpu = self.clock.report(torch.get_num_threads())

    def results(self) -> list[Generation]:
        col, n_new = self.collector, sum(len(t) for t in self.collector.tokens)
        stats = self.decoder.stats.to_dict(n_new)
        stats.update({"new_tokens": n_new, "wall_s": self.wall, "tokens_per_s": n_new / self.wall if self.wall > 0 else 0.0,
                      "time_to_first_token_s": self.first_token_s, "batch_size": len(self.rows), **self.cpu})
        if self.opts.mode == "wand":
            stats["wand_factor"] = self.opts.wand_factor
        return [Generation(col.text(b), col.tokens[b], dict(stats, new_tokens=len(col.tokens[b]), stop_reason=col.reason[b]),
                           row, self.cache) for b, row in enumerate(self.rows)]
