"""poelm's eager plain decode against karpathy/nanochat's own Engine on the same weights, in one
process, interleaved, ratio printed last.

    git clone https://github.com/karpathy/nanochat /tmp/nanochat
    .venv/bin/python benchmarks/nanochat_engine.py --nanochat /tmp/nanochat --model runs/demo/arms/bp

nanochat is not on PyPI: the benchmark imports `nanochat.gpt` and `nanochat.engine` from the
checkout given by --nanochat (it needs only torch, filelock, tiktoken and rustbpe, all in poelm's
venv). The model's weights go into nanochat's GPT unchanged (the fork's checkpoint keys are
nanochat's); a model without backout (a PoE arm) gets nanochat's backout_lambda set to 0, which
makes nanochat's readout the same computation. Greedy, batch 1, --threads threads (1 by default),
--prompts prompts of the validation split x --new-tokens tokens, no stop token on either side.
Each repeat times every side once, in turn; the figures are medians over --repeats. Tokens are
compared: the two implementations order their floating-point work differently (attention through
different masks and slices), so a near-tie can flip an argmax; the agreement is printed.
Sides: nanochat's Engine.generate, poelm's eager Engine, and poelm's compiled step (its best plain
path, for scale).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from poelm.checkpoint import load_model  # noqa: E402
from poelm.engine import Engine  # noqa: E402
from poelm.inference_bench import heldout_batches, prompts_from  # noqa: E402
from poelm.model import GPT  # noqa: E402


class NoSpecials:
    """The tokenizer face nanochat's Engine needs: every special token it watches for is an id no
    model produces (-1), so no row stops early and no tool call is parsed."""

    def encode_special(self, name: str) -> int:
        return -1

    def get_bos_token_id(self) -> int:
        return -1


def nanochat_model(model: GPT):
    """nanochat's GPT holding `model`'s weights (fp32, eval)."""
    from nanochat.gpt import GPT as NanoGPT, GPTConfig as NanoConfig  # the checkout's own code

    c = model.config
    if (c.n_embd // c.n_head != c.head_dim or c.intermediate_size not in (None, 4 * c.n_embd) or c.per_stage_head
            or c.final_readout != "last" or c.short_window is not None):
        raise ValueError("nanochat's GPT has head_dim = n_embd / n_head, a 4x MLP, the default short window, no "
                         "stage heads and the last layer's readout; pick a model of that shape")
    config = NanoConfig(sequence_len=c.sequence_len, vocab_size=c.vocab_size, n_layer=c.n_layer, n_head=c.n_head,
                        n_kv_head=c.n_kv_head, n_embd=c.n_embd, window_pattern=c.window_pattern)
    nano = NanoGPT(config)
    state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    if not c.backout:
        state["backout_lambda"] = torch.zeros_like(state["backout_lambda"])
    missing, unexpected = nano.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k not in ("cos", "sin")]:
        raise ValueError(f"the model's keys differ from nanochat's GPT (missing {missing}, unexpected {unexpected}): "
                         "is the checkout a nanochat of the same architecture?")
    return nano.float().eval()


def nanochat_decode(engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list]:
    """-> (seconds per generated token, every prompt's tokens) through nanochat's Engine.generate."""
    t0, out = time.perf_counter(), []
    for p in prompts:
        row = [column[0] for column, _ in engine.generate(p, num_samples=1, max_tokens=new_tokens, temperature=0.0)]
        out.append(row)
    return (time.perf_counter() - t0) / sum(map(len, out)), out


def poelm_decode(engine: Engine, prompts: list[list[int]], new_tokens: int) -> tuple[float, list]:
    """-> (seconds per generated token, every prompt's tokens) through poelm's Engine."""
    t0, out = time.perf_counter(), []
    for p in prompts:
        out.append(engine.generate(p, max_new_tokens=new_tokens, stop_token_ids=[]).tokens)
    return (time.perf_counter() - t0) / sum(map(len, out)), out


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Fraction of positions up to each row's first difference (a flipped argmax changes the rest)."""
    same = 0
    for x, y in zip(a, b):
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        same += n
    return same / sum(map(len, a))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--nanochat", required=True, type=Path, help="a checkout of github.com/karpathy/nanochat")
    ap.add_argument("--model", required=True, help="a poelm model directory (e.g. runs/demo/arms/bp)")
    ap.add_argument("--data", default="data/default", help="its corpus directory (prompts from the validation split)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts decoded per repeat")
    ap.add_argument("--prompt-len", type=int, default=32, help="tokens per prompt")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per prompt")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (the median is reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--no-compiled", action="store_true", help="leave out poelm's compiled step")
    ap.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = ap.parse_args(argv)
    if not (args.nanochat / "nanochat" / "engine.py").is_file():
        ap.error(f"{args.nanochat} is not a nanochat checkout (no nanochat/engine.py): clone "
                 "https://github.com/karpathy/nanochat and pass its path")
    torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    model.eval()
    sys.path.insert(0, str(args.nanochat))
    from nanochat.engine import Engine as NanoEngine  # the checkout's own code

    try:
        nano = NanoEngine(nanochat_model(model), NoSpecials())
    except ValueError as e:
        ap.error(str(e))
    prompts = prompts_from(heldout_batches(args.data, tok, model.config.sequence_len, 8192), args.prompts,
                           args.prompt_len)
    sides = {"nanochat": lambda: nanochat_decode(nano, prompts, args.new_tokens),
             "poelm eager": lambda: poelm_decode(Engine(model, tok), prompts, args.new_tokens)}
    if not args.no_compiled:
        compiled = Engine(model, tok, compile=True)
        poelm_decode(compiled, prompts[:1], args.new_tokens)  # build the graphs before timing
        sides["poelm compiled"] = lambda: poelm_decode(compiled, prompts, args.new_tokens)
    times: dict[str, list[float]] = {s: [] for s in sides}
    tokens: dict[str, list] = {}
    for s, run in sides.items():  # warm every side once (allocator, first-call dispatch)
        run()
    for r in range(args.repeats):
        for s, run in sides.items():
            seconds, tokens[s] = run()
            times[s].append(seconds)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{s} {1e3 * t[-1]:.3f} ms/token" for s, t in times.items()),
              flush=True)
    med = {s: statistics.median(t) for s, t in times.items()}
    result = {"threads": args.threads, "prompts": args.prompts, "new_tokens": args.new_tokens,
              "ms_per_token": {s: 1e3 * m for s, m in med.items()},
              "agreement_with_nanochat": {s: agreement(tokens["nanochat"], tokens[s]) for s in sides if s != "nanochat"},
              "poelm_eager_over_nanochat": med["nanochat"] / med["poelm eager"]}
    if "poelm compiled" in med:
        result["poelm_compiled_over_nanochat"] = med["nanochat"] / med["poelm compiled"]
    print(f"\n{args.prompts} prompts x {args.new_tokens} tokens, greedy, batch 1, {args.threads} thread(s), "
          f"median of {args.repeats}:")
    for s, m in med.items():
        agree = result["agreement_with_nanochat"].get(s)
        print(f"  {s:>15}: {1e3 * m:.3f} ms/token, {1 / m:,.0f} tok/s"
              + ("" if agree is None else f", tokens as nanochat's: {100 * agree:.1f} %"))
    if args.json:
        print(json.dumps(result, indent=1))
    print(f"poelm eager over nanochat's Engine: {result['poelm_eager_over_nanochat']:.2f}x"
          + (f" (poelm compiled: {result['poelm_compiled_over_nanochat']:.2f}x)" if "poelm compiled" in med else ""))
    return result


if __name__ == "__main__":
    main()
