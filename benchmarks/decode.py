"""Decode-speed benchmark: plain vs stage-0 pruning vs WAND vs self-speculative greedy decoding,
all in one run on the same model and prompts.

    .venv/bin/python benchmarks/decode.py                        # trains a tiny PoE model on the fly (~5 min)
    .venv/bin/python benchmarks/decode.py --corpus synthetic     # no corpus needed (~3 min)
    .venv/bin/python benchmarks/decode.py --model runs/tiny --data data/default
    .venv/bin/python benchmarks/decode.py --steps 400 --gamma 6 --out runs/bench/decode.png --json

Without --model it trains a depth-8 PoE model (4 stages of 2 layers, flat, alpha 0) for a few
hundred AdamW steps, on the default corpus when data/default and data/tokenizer exist
(`poelm data build`, `poelm tokenizer train`), else on a synthetic but structured token
language: a sparse Markov chain (easy for the first stage) with phrases copied from earlier in
the document (which needs attention over the context, so deeper stages help). It then measures,
greedy and batch size 1:
- tokens/s of plain (final readout), stage 0 (prefix pruning), WAND and speculative decoding and
  their ratio to plain (modes interleaved over repeats; the median repeat is reported);
- teacher-forced top-1 agreement of stage 0 and of WAND with full depth on held-out text, and
  WAND's mean stages per token;
- speculative acceptance rate and tokens per verify pass (and that its output equals plain greedy).
The speedup ratios are printed last; a bar chart goes to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from poelm.engine import Engine, calibrate  # noqa: E402
from poelm.inference_bench import agreement, timed_modes  # noqa: E402
from poelm.model import GPT, GPTConfig  # noqa: E402

BOS = 0


# -----------------------------------------------------------------------------
# A synthetic, structured token language


class SyntheticLanguage:
    """Sparse Markov chain (4 successors per token, p = .70/.15/.10/.05) plus copied phrases."""

    def __init__(self, vocab_size: int, seed: int = 0):
        rng = random.Random(seed)
        self.vocab_size = vocab_size
        self.successors = [[rng.randrange(1, vocab_size) for _ in range(4)] for _ in range(vocab_size)]
        self.weights = [0.70, 0.15, 0.10, 0.05]

    def document(self, rng: random.Random, length: int) -> list[int]:
        doc = [BOS, rng.randrange(1, self.vocab_size)]
        while len(doc) < length:
            if len(doc) > 24 and rng.random() < 0.04:  # copy a phrase from earlier in the document
                start = rng.randrange(1, len(doc) - 12)
                doc += doc[start:start + 12]
            else:
                doc.append(rng.choices(self.successors[doc[-1]], self.weights)[0])
        return doc[:length]

    def batch(self, rng: random.Random, batch_size: int, seq_len: int) -> torch.Tensor:
        return torch.tensor([self.document(rng, seq_len + 1) for _ in range(batch_size)])  # (B, T+1)


def train_tiny(args, vocab_size: int, batches) -> GPT:
    """AdamW on (inputs, targets) batches (B, 128): warmup 20 steps, linear decay to 10 %."""
    torch.manual_seed(args.seed)
    config = GPTConfig(n_layer=args.depth, n_embd=args.width, n_head=args.width // 64, vocab_size=vocab_size,
                       sequence_len=256, short_window=64, poe_every=args.depth // 4, poe_mode="flat")
    model = GPT(config)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    t0 = time.perf_counter()
    for step in range(args.steps):
        lr_mult = min(1.0, (step + 1) / 20) * (1 - 0.9 * step / args.steps)
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_mult
        inputs, targets = next(batches)
        loss, stage_losses = model(inputs, targets, return_stage_losses=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            losses = " ".join(f"{x:.3f}" for x in stage_losses.tolist())
            print(f"train step {step:4d}  stage losses {losses}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    return model.eval()


# -----------------------------------------------------------------------------
# Measurements


def plot(speedups: dict[str, float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names, values = list(speedups), list(speedups.values())
    bars = ax.bar(names, values, color=["#888888", "#4C72B0", "#55A868", "#C44E52"][: len(names)])
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_ylim(0, max(values) * 1.18)
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.2f}x", ha="center", va="bottom")
    ax.set_ylabel("tokens/s relative to plain")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def synthetic_setup(args):
    lang = SyntheticLanguage(args.vocab, seed=args.seed)
    rng = random.Random(args.seed)

    def batches():
        while True:
            b = lang.batch(rng, args.batch_size, 128)
            yield b[:, :-1], b[:, 1:]

    model = train_tiny(args, lang.vocab_size, batches())
    rng_eval = random.Random(args.seed + 1)
    calib = [lang.batch(rng_eval, 8, 128)[:, :-1] for _ in range(2)]
    return model, calib, lang.batch(rng_eval, 8, 128)[:, :-1], lang.batch(rng_eval, args.prompts, 32)[:, :-1]


def corpus_setup(args, data_dir: Path, tokenizer_dir: Path):
    from poelm.dataloader import BestFitLoader, val_batches
    from poelm.tokenizer import Tokenizer

    tok = Tokenizer.load(tokenizer_dir)
    loader = BestFitLoader(data_dir, tok, args.batch_size, 128, split="train")
    model = train_tiny(args, tok.vocab_size, iter(loader))
    val = [x for x, _ in val_batches(data_dir, tok, 8, 128, 8 * 128 * 4)]
    return model, val[:2], val[2], val[3][: args.prompts]


def load_external(args):
    from poelm.checkpoint import load_model
    from poelm.dataloader import val_batches

    model, tokenizer = load_model(args.model)
    if args.data is None or tokenizer is None:
        raise SystemExit("--model needs --data DIR (held-out text) and a model with a tokenizer")
    T = min(128, model.config.sequence_len)
    batches = [x for x, _ in val_batches(args.data, tokenizer, 4, T, 4 * T * 4)]
    return model, batches[:2], batches[2], batches[3]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="benchmark this model instead of training one")
    p.add_argument("--data", default=None, help="with --model: corpus dir for calibration / held-out text")
    p.add_argument("--corpus", default="auto", help="training text: auto (data/default + data/tokenizer if they "
                                                    "exist, else synthetic), synthetic, or a corpus dir")
    p.add_argument("--tokenizer", default="data/tokenizer", help="tokenizer dir for --corpus DIR")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--draft-stage", type=int, default=0)
    p.add_argument("--wand-factor", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models are overhead-bound, and "
                                                         "OpenMP threads stall badly when the CPU is shared)")
    p.add_argument("--out", default="runs/bench/decode.png")
    p.add_argument("--json", action="store_true", help="also write the results next to --out as .json")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    corpus = args.corpus
    if corpus == "auto":
        corpus = "data/default" if Path("data/default").is_dir() and Path(args.tokenizer).is_dir() else "synthetic"
    if args.model:
        corpus = f"model {args.model}, data {args.data}"
        model, calib_batches, heldout, prompt_batch = load_external(args)
    elif corpus == "synthetic":
        model, calib_batches, heldout, prompt_batch = synthetic_setup(args)
    else:
        model, calib_batches, heldout, prompt_batch = corpus_setup(args, Path(corpus), Path(args.tokenizer))
    prompts = [row[:16].tolist() for row in prompt_batch[: args.prompts]]

    calib = calibrate(model, calib_batches)
    agree = agreement(model, heldout, calib, args.wand_factor)

    engine = Engine(model, calibration=calib)
    modes = {"plain": dict(mode="final"), "stage0": dict(mode="stage", stage=0),
             "wand": dict(mode="wand", wand_factor=args.wand_factor),
             "speculative": dict(mode="speculative", draft_stage=args.draft_stage, gamma=args.gamma)}
    timing = timed_modes(engine, prompts, modes, args.new_tokens, args.repeats)
    outputs = timing.pop("_outputs")
    identical = outputs["speculative"] == outputs["plain"]
    wand_same = sum(a == b for a, b in zip(outputs["wand"], outputs["plain"]))

    cfg = model.config
    base = timing["plain"]["tokens_per_s"]
    speedups = {name: r["tokens_per_s"] / base for name, r in timing.items()}
    results = {"corpus": corpus, "model": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "stages": list(cfg.poe_stage_layers),
                         "vocab_size": cfg.vocab_size, "params": model.num_params()},
               "threads": args.threads, "prompts": len(prompts), "new_tokens": args.new_tokens,
               "gamma": args.gamma, "draft_stage": args.draft_stage, "wand_factor": args.wand_factor,
               "wand_bounds": calib["wand_bounds"], **agree, "modes": timing,
               "speculative_identical_to_plain": identical, "wand_outputs_identical_to_plain": f"{wand_same}/{len(prompts)}",
               "speedups": speedups}

    print(f"\ncorpus: {corpus}")
    print(f"model: {cfg.n_layer} layers x {cfg.n_embd}, stages {list(cfg.poe_stage_layers)}, "
          f"{model.num_params() / 1e6:.2f}M params; {len(prompts)} prompts x {args.new_tokens} new tokens, "
          f"greedy, batch 1, {args.threads} thread(s), median of {args.repeats}")
    print(f"WAND bounds {[round(b, 3) for b in calib['wand_bounds']]} (F={args.wand_factor})")
    print(f"{'mode':<12} {'tokens/s':>9} {'layer calls/token':>18} {'layer x pos/token':>18} {'stages/token':>13}")
    for name, r in timing.items():
        print(f"{name:<12} {r['tokens_per_s']:9.1f} {r['mean_layer_calls_per_token']:18.2f} "
              f"{r['mean_layers_per_token']:18.2f} {r['mean_stages_per_token']:13.2f}")
    spec = timing["speculative"]
    print(f"stage 0 top-1 agreement with full depth (held-out, teacher-forced): {agree['stage0_top1_agreement']:.4f}")
    print(f"WAND top-1 agreement with full depth (held-out, teacher-forced):    {agree['wand_top1_agreement']:.4f} "
          f"at {agree['wand_teacher_forced_stages_per_token']:.2f} stages/token")
    print(f"WAND generations identical to plain greedy: {wand_same}/{len(prompts)}")
    print(f"speculative acceptance {spec['acceptance_rate']:.3f}, tokens per verify pass {spec['tokens_per_verify']:.2f}, "
          f"output identical to plain greedy: {identical}")
    title = (f"{cfg.n_layer}x{cfg.n_embd} PoE, CPU {args.threads} thread(s); spec d={args.draft_stage} "
             f"g={args.gamma} acc={spec['acceptance_rate']:.2f}; WAND F={args.wand_factor}")
    out = Path(args.out)
    plot(speedups, out, title)
    if args.json:
        out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    print(f"chart: {out}")
    for name in ("stage0", "wand", "speculative"):
        print(f"{name}/plain tokens_per_s: {speedups[name]:.2f}")
    return results


if __name__ == "__main__":
    main()
