"""poelm as an lm-evaluation-harness model: every readout of a PoE model (each stage, the
Log-OP of all stages and the final readout) scored from ONE trunk pass per batch.

    import poelm.lm_eval_model                        # registers the model "poelm" with lm-eval
    lm = PoelmLM(pretrained="runs/poe", readout="stage0")
    lm_eval.simple_evaluate(model=lm, tasks=["piqa"])
    python -m poelm.lm_eval_model run --model poelm --model_args pretrained=runs/poe,readout=logop --tasks piqa
    poelm eval runs/poe --tasks piqa,lambada_openai   # every readout at once (poelm.downstream)

lm-eval's CLI finds only the models it ships, so `lm_eval --model poelm` needs this module
imported first: `python -m poelm.lm_eval_model ...` does that and then runs lm-eval's own CLI.

How one pass serves K+2 readouts: lm-eval's API returns one score per request, so the harness
runs once per readout, each run with its own `PoelmLM` and all of them sharing one
`ReadoutScorer`. For a batch of requests it has not seen, the scorer runs the trunk once and
reads the log-probabilities of the continuation under every readout (gathered at the
continuation's positions only), and keeps the K+2 results per request. The first readout's run
fills that cache; the later readouts' runs are served from it without a forward pass
(`ReadoutScorer.passes` counts the trunk passes). Greedy generation diverges per readout, so
generate_until decodes once per readout (poelm.engine, the readout's own decoding mode).

Scoring follows lm-eval's causal-model convention: <|bos|> first, trailing spaces of the
context move to the continuation, the continuation's tokens are those of the whole text after
the context's, and rows longer than the model's context keep their last tokens. A BP model's
stages were never trained to predict: it gives its final readout only, unless force=True
(then its stages and Log-OP are labelled as BP's).
"""

from __future__ import annotations

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from poelm.model import GPT, logop_weight

LlResult = tuple[float, bool]  # (sum of log-probs of the continuation, whether greedy decoding gives it)


def readout_names(model: GPT, force: bool = False) -> list[str]:
    """The readouts scored: "stage0".."stage{K-1}", "logop" and "final" of a PoE model; a BP
    model's "final" only (its stages and Log-OP too with force)."""
    K = model.config.n_stages
    if model.config.is_poe() or force:
        return [*(f"stage{k}" for k in range(K)), "logop", "final"]
    return ["final"]


def readout_label(name: str, model: GPT) -> str:
    """A table's column name: a BP model's stages and Log-OP say that they are BP's (no predictors)."""
    return name if name == "final" or model.config.is_poe() else f"{name} (BP, not a predictor)"


class ReadoutScorer:
    """The log-likelihoods of requests under every readout, one trunk pass per batch, cached."""

    def __init__(self, model: GPT, tokenizer, batch_size: int = 8, force: bool = False):
        if tokenizer is None:
            raise ValueError("lm-eval scores text: the model needs its tokenizer (pass one with the model directory)")
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.readouts = readout_names(model, force)
        self.force = force
        self.passes = 0  # trunk passes run so far
        self._pairs: dict[tuple[str, str], dict[str, LlResult]] = {}
        self._rolling: dict[str, dict[str, float]] = {}

    # --- tokenisation as lm-eval's causal models do it ---------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        bos = [self.tokenizer.bos_token_id]
        if not context:
            return bos, self.tokenizer.encode(continuation)
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        whole = self.tokenizer.encode(stripped + continuation)
        n_ctx = len(self.tokenizer.encode(stripped))
        return bos + whole[:n_ctx], whole[n_ctx:]

    # --- the three request kinds --------------------------------------------------
    def loglikelihood(self, pairs: list[tuple[str, str]], readout: str) -> list[LlResult]:
        todo = [p for p in dict.fromkeys(pairs) if p not in self._pairs]
        encoded = [self.encode_pair(*p) for p in todo]
        for pair, result in zip(todo, self.score_tokens(encoded)):
            self._pairs[pair] = result
        return [self._pairs[p][readout] for p in pairs]

    def loglikelihood_rolling(self, texts: list[str], readout: str) -> list[float]:
        """Whole texts in windows of the model's context, every token predicted once (lm-eval's rule)."""
        T = self.model.config.sequence_len
        for text in dict.fromkeys(texts):
            if text in self._rolling:
                continue
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tokenizer.encode(text), prefix_token=self.tokenizer.bos_token_id, max_seq_len=T, context_len=1)]
            scores = self.score_tokens([(list(c), list(t)) for c, t in windows])
            self._rolling[text] = {r: sum(s[r][0] for s in scores) for r in self.readouts}
        return [self._rolling[t][readout] for t in texts]

    @torch.no_grad()
    def score_tokens(self, rows: list[tuple[list[int], list[int]]]) -> list[dict[str, LlResult]]:
        """{readout: (log-likelihood, greedy)} of each (context ids, continuation ids), batch by batch."""
        out: list[dict[str, LlResult]] = []
        for start in range(0, len(rows), self.batch_size):
            out += self._score_batch(rows[start:start + self.batch_size])
        return out

    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[dict[str, LlResult]]:
        """One trunk pass over the right-padded batch; each readout on the continuation's positions."""
        model, T = self.model, self.model.config.sequence_len
        device = model.lm_head.weight.device
        inputs, spans, targets = [], [], []
        for ctx, cont in rows:
            whole = (ctx + cont)[-(T + 1):]
            n = min(len(cont), len(whole) - 1)
            inputs.append(whole[:-1])
            spans.append((len(whole) - 1 - n, n))  # (first predicting position, tokens predicted)
            targets += whole[len(whole) - n:]
        width = max(len(r) for r in inputs)
        idx = torch.tensor([r + [0] * (width - len(r)) for r in inputs], device=device)
        stage_x, x_mid = model.trunk(idx)
        self.passes += 1
        b = torch.tensor([i for i, (_, n) in enumerate(spans) for _ in range(n)], device=device, dtype=torch.long)
        t = torch.tensor([p + j for p, n in spans for j in range(n)], device=device, dtype=torch.long)
        xs = [x[b, t] for x in stage_x]  # (N, d): the positions that predict continuation tokens
        mid = x_mid[b, t] if x_mid is not None else None
        logps = self.readout_logprobs(xs, mid)
        target = torch.tensor(targets, device=device).unsqueeze(1)
        results: list[dict[str, LlResult]] = [{} for _ in rows]
        for name, logp in logps.items():
            picked = logp.gather(1, target).squeeze(1).double()
            hit = logp.argmax(-1) == target.squeeze(1)
            at = 0
            for i, (_, n) in enumerate(spans):
                results[i][name] = (float(picked[at:at + n].sum()), bool(hit[at:at + n].all()))
                at += n
        return results

    def readout_logprobs(self, xs: list[torch.Tensor], mid: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Log-probabilities (N, V) of every readout scored, from the stage residuals at N positions."""
        model = self.model
        K = model.config.n_stages
        out = {"final": model.readout(xs[-1], None, mid, xs).float().log_softmax(-1)}
        if self.readouts == ["final"]:
            return out
        stages = [model.readout(x, k).float().log_softmax(-1) for k, x in enumerate(xs)]
        w = logop_weight(K, model.config.poe_alpha)
        out.update({f"stage{k}": s for k, s in enumerate(stages)})
        out["logop"] = sum(w * s for s in stages).log_softmax(-1)
        return out

    def generate(self, context: str, until: list[str], max_new_tokens: int, readout: str) -> str:
        """A greedy continuation of `context` in `readout`'s decoding mode, cut at the first of `until`."""
        from poelm.engine import Engine

        mode, stage = ("stage", int(readout[5:])) if readout.startswith("stage") else (readout, None)
        text = Engine(self.model, self.tokenizer).generate(
            context, mode=mode, stage=stage, max_new_tokens=max_new_tokens, temperature=0.0, stop_strings=until,
            force=self.force).text
        cuts = [text.index(u) for u in until if u and u in text]
        return text[:min(cuts)] if cuts else text


@register_model("poelm")
class PoelmLM(LM):
    """One readout of a poelm model as lm-eval's LM. pretrained: MODEL (what
    poelm.checkpoint.load_model takes); readout: "final", "logop" or "stageK"; scorer: a
    ReadoutScorer shared with the other readouts' PoelmLM (then pretrained is not loaded)."""

    def __init__(self, pretrained: str | None = None, readout: str = "final", batch_size: int | str = 8,
                 max_batch_size: int | None = None, device: str | None = None, force: bool | str = False,
                 scorer: ReadoutScorer | None = None, max_gen_toks: int = 256):
        super().__init__()
        force = force in (True, "True", "true", "1")
        if scorer is None:
            scorer = load_scorer(pretrained, device or "cpu", parse_batch_size(batch_size, max_batch_size), force)
        if readout not in scorer.readouts:
            raise ValueError(f"readout={readout!r}: this model has {', '.join(scorer.readouts)}"
                             + ("" if scorer.model.config.is_poe() else " (a BP model's stages need force=True)"))
        self.scorer, self.readout, self.max_gen_toks = scorer, readout, int(max_gen_toks)

    def loglikelihood(self, requests) -> list[LlResult]:
        return self.scorer.loglikelihood([tuple(r.args) for r in requests], self.readout)

    def loglikelihood_rolling(self, requests) -> list[float]:
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests], self.readout)

    def generate_until(self, requests) -> list[str]:
        out = []
        for r in requests:
            context, kwargs = r.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            out.append(self.scorer.generate(context, until, int(kwargs.get("max_gen_toks", self.max_gen_toks)),
                                            self.readout))
        return out

    @property
    def tokenizer_name(self) -> str:
        return "poelm"


def parse_batch_size(batch_size: int | str, max_batch_size: int | None) -> int:
    """lm-eval's --batch_size (an integer, or "auto": 8) capped by --max_batch_size."""
    size = 8 if str(batch_size).startswith("auto") else int(batch_size)
    return min(size, max_batch_size) if max_batch_size else size


def load_scorer(spec: str | None, device: str, batch_size: int, force: bool) -> ReadoutScorer:
    """A ReadoutScorer of MODEL `spec` on `device`."""
    from poelm.checkpoint import load_model
    from poelm.runtime import parse_device

    if not spec:
        raise ValueError("the poelm model needs pretrained=MODEL (a preset, model or run directory, or a hub id)")
    model, tokenizer = load_model(spec, device=parse_device(device))
    return ReadoutScorer(model, tokenizer, batch_size, force)


if __name__ == "__main__":  # lm-eval's own CLI, with the model "poelm" registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
