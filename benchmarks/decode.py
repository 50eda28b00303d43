"""Decode-speed benchmark, in one run, ratios and a JSON summary last:

1. plain decoding against transformers: poelm's engine vs transformers `generate` on poelm's
   own export (remote code) and on a stock `LlamaForCausalLM` of the same depth, width, heads,
   vocabulary and MLP width (random weights), batch 1 / 8 / 32, greedy (--shape-*; default the
   issue's d4 x 128, vocab 4,096, 200 new tokens), and "plain, compiled" (Engine(compile=True):
   the inductor-compiled step; its first call per batch size, the compile, is reported apart);
2. every PoE mode on a model trained on real text (the default corpus: Shakespeare, Milton,
   King James; or --model RUN): plain eager and compiled, stage k prefix pruning, Log-OP of
   stages {0, 1}, WAND, speculative from every draft stage (greedy; the fastest one also
   sampled at T = 0.8 and at batch 8), each eager and compiled where the engine compiles it, on
   prompts from the validation split and from English text outside the corpus
   (poelm/outside_text.py). Every ratio is over the best plain path of the same run (sampled and
   batch-8 rows: over plain sampling / plain batch 8, poelm.inference_bench), with top-1
   agreement with full depth on held-out text of the set (teacher-forced), WAND's exits,
   acceptance and tokens per verify pass;
3. the roofline of the plain and stage-0 paths: bytes of weights + KV cache read per decode
   step, the batch-1 ceiling they imply at this machine's measured memory bandwidth, MBU (the
   share of that bandwidth the path uses), TTFT and TPOT;
4. elastic depth on disk: size and plain decode speed of `poelm export --stages K` models of
   the trained model next to the full model.

    .venv/bin/python benchmarks/decode.py                         # trains a PoE model on data/default
    .venv/bin/python benchmarks/decode.py --model runs/demo/arms/poe --data data/default
    .venv/bin/python benchmarks/decode.py --corpus synthetic      # the synthetic language (labelled)
    .venv/bin/python benchmarks/decode.py --steps 400 --gamma 6 --out runs/bench/decode.png --json

Without --model it trains a depth-8 PoE model (4 stages of 2 layers, flat, alpha 0) for a few
hundred AdamW steps on the default corpus (built into --data and a --vocab tokenizer trained
into --tokenizer when missing). `--corpus synthetic` trains on a synthetic token language
instead: a sparse Markov chain plus phrases copied from earlier in the document; it loops, so
greedy acceptance there (~100 %) says nothing about text. Every timing interleaves the paths
it compares over --repeats and reports the median repeat (the machine may be shared).
Speculative greedy output is checked to equal plain greedy; poelm's greedy output is checked
to equal transformers' on the export.
"""


from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from poelm.engine import Engine, calibrate  # noqa: E402
from poelm.experiment.report import mode_notes  # noqa: E402
from poelm.inference_bench import (BATCH_SIZE, OUTSIDE_SOURCE, heldout_batches, measure_sets, outside_set,  # noqa: E402
                                   prompts_from, setting_of, weight_bytes)
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
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(speedups)), 3.5))
    names, values = list(speedups), list(speedups.values())
    bars = ax.bar(names, values, color="#4C72B0")
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_ylim(0, max(values) * 1.18)
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("tokens/s relative to plain")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def median_runs(sides: dict, repeats: int) -> dict[str, float]:
    """Time every side (name -> () -> tokens decoded) `repeats` times, interleaved -> median tokens/s."""
    runs: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            n = fn()
            runs[name].append(n / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in runs.items()}


def mbu(bytes_per_step: int, batch: int, tokens_per_s: float) -> dict:
    per_token = bytes_per_step / batch
    return {"weight_bytes_per_token": per_token, "us_per_token": 1e6 / tokens_per_s,
            "weight_gb_per_s": per_token * tokens_per_s / 1e9}


# -----------------------------------------------------------------------------
# 1. plain decoding against transformers, batch 1 / 8 / 32


def compiled_engine(model: GPT) -> Engine | None:
    """An Engine with the inductor-compiled plain step, or None (one line why) without a compiler."""
    from poelm.runtime import SettingError, check_compiler

    try:
        check_compiler(model.lm_head.weight.device)
    except SettingError as e:
        print(f"plain, compiled: skipped ({e})")
        return None
    return Engine(model, compile=True)


@torch.no_grad()
def shape_section(args) -> dict:
    """poelm plain vs transformers generate (poelm export; stock Llama) on a random model of the shape."""
    import tempfile

    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from poelm.checkpoint import load_model
    from poelm.export import export_model

    torch.manual_seed(args.seed)
    d, L, V = args.shape_width, args.shape_depth, args.shape_vocab
    config = GPTConfig(n_layer=L, n_embd=d, n_head=max(1, d // 64), vocab_size=V, sequence_len=512)
    source = GPT(config)
    source.init_weights()
    for p in source.parameters():  # nanochat's init zeroes the projections; noise makes the blocks do work
        p.add_(torch.randn_like(p) * 0.02)
    with tempfile.TemporaryDirectory(prefix="poelm-decode-bench-") as tmp:
        export_dir = export_model(source, None, Path(tmp) / "model", dtype=torch.float32)
        model, _ = load_model(export_dir)
        hf = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32).eval()
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=d, intermediate_size=config.intermediate_size, num_hidden_layers=L,
                                         num_attention_heads=config.n_head, num_key_value_heads=config.n_kv_head,
                                         vocab_size=V, max_position_embeddings=512, tie_word_embeddings=False)).eval()
    engine = Engine(model)
    compiled = compiled_engine(model)
    rng = random.Random(args.seed)
    N = args.shape_new_tokens

    def hf_decode(m, rows):
        ids = torch.tensor(rows)
        out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, min_new_tokens=N,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
        return out[:, ids.shape[1]:].tolist()

    def poelm_decode(rows, e=engine):
        return [g.tokens for g in e.generate(rows, max_new_tokens=N, stop_token_ids=[], add_bos=False)]

    result = {"shape": {"n_layer": L, "n_embd": d, "n_head": config.n_head, "vocab_size": V,
                        "intermediate_size": config.intermediate_size},
              "transformers": transformers.__version__, "new_tokens": N, "batches": {}}
    step_bytes = weight_bytes(model)
    for B in args.shape_batches:
        rows = [[rng.randrange(1, V) for _ in range(16)] for _ in range(B)]
        plain = poelm_decode(rows)
        same = plain == hf_decode(hf, rows)  # also the warm-up
        hf_decode(llama, rows)
        sides = {"poelm": lambda: B * len(poelm_decode(rows)[0]),
                 "hf_export": lambda: B * len(hf_decode(hf, rows)[0]),
                 "hf_llama": lambda: B * len(hf_decode(llama, rows)[0])}
        extra = {}
        if compiled is not None:  # the first call compiles this batch size: timed apart
            t0 = time.perf_counter()
            extra["compiled_identical"] = poelm_decode(rows, compiled) == plain
            extra["compile_s"] = time.perf_counter() - t0
            sides["poelm_compiled"] = lambda: B * len(poelm_decode(rows, compiled)[0])
        tps = median_runs(sides, args.repeats)
        result["batches"][B] = {**tps, "identical_to_hf_export": same, **extra, "mbu": mbu(step_bytes, B, tps["poelm"])}
        note = (f"  compiled {tps['poelm_compiled']:8.0f} tok/s (first call {extra['compile_s']:.1f} s, same tokens: "
                f"{extra['compiled_identical']})") if compiled is not None else ""
        print(f"batch {B:2d}: poelm {tps['poelm']:8.0f}  transformers/export {tps['hf_export']:8.0f}  "
              f"transformers/Llama {tps['hf_llama']:8.0f} tok/s  (poelm == transformers on the export: {same}){note}",
              flush=True)
    return result


# -----------------------------------------------------------------------------
# 2. PoE modes on the trained benchmark model


def extra_modes(cfg) -> dict[str, dict]:
    """The modes this benchmark times beyond inference_bench's (Engine.generate kwargs)."""
    modes = {f"stage{k}": dict(mode="stage", stage=k) for k in range(1, cfg.n_stages - 1)}
    modes["logop{0,1}"] = dict(mode="logop", stages=[0, 1])
    return modes


@torch.no_grad()
def teacher_forced_agreement(model: GPT, heldout: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement with full depth on held-out text of every stage readout and of Log-OP {0, 1}."""
    from poelm.engine import logop

    final, stage_logits = model(heldout, return_stage_logits=True)
    full = final.argmax(-1)
    agree = lambda logits: (logits.argmax(-1) == full).float().mean().item()  # noqa: E731
    out = {f"stage{k}": agree(z) for k, z in enumerate(stage_logits[:-1])}
    out["logop{0,1}"] = agree(logop(stage_logits[:2], model.config.poe_alpha))
    return out


def synthetic_setup(args):
    """(model, tokenizer None, calibration batches, prompt sets) on the synthetic language."""
    lang = SyntheticLanguage(args.vocab, seed=args.seed)
    rng = random.Random(args.seed)

    def batches():
        while True:
            b = lang.batch(rng, args.batch_size, 128)
            yield b[:, :-1], b[:, 1:]

    model = train_tiny(args, lang.vocab_size, batches())
    rng_eval = random.Random(args.seed + 1)
    calib = [lang.batch(rng_eval, 8, 128)[:, :-1] for _ in range(2)]
    heldout = lang.batch(rng_eval, 8, 128)[:, :-1]
    prompts = [row[:16].tolist() for row in lang.batch(rng_eval, max(args.prompts, BATCH_SIZE), 32)[:, :-1]]
    source = "the synthetic language (it loops: acceptance and agreement are inflated)"
    return model, None, calib, {"synthetic": (prompts, heldout, source)}


def ensure_corpus(args) -> tuple[Path, object]:
    """The default corpus in --data and a --vocab tokenizer in --tokenizer, built when missing."""
    from poelm import corpus
    from poelm.tokenizer import Tokenizer

    data, tok_dir = Path(args.data), Path(args.tokenizer)
    if not any(data.glob("*.parquet")):
        print(f"building the default corpus into {data} ...", flush=True)
        corpus.build_corpus("default", data)
    if not any((tok_dir / n).exists() for n in ("tokenizer.json", "tokenizer.pkl")):
        print(f"training a {args.vocab}-token tokenizer into {tok_dir} ...", flush=True)
        Tokenizer.train(corpus.iter_documents(corpus.list_shards(data)[0]), args.vocab).save(tok_dir)
    return data, Tokenizer.load(tok_dir)


def text_sets(args, model: GPT, tokenizer, data: Path) -> tuple[list, dict]:
    """(calibration batches, prompt sets): half the validation tokens calibrate WAND, the other
    half give prompts and agreement; the outside text is the second set."""
    T = min(128, model.config.sequence_len)
    val = heldout_batches(str(data), tokenizer, T, 8 * T * 4, batch_size=8)
    half = max(1, len(val) // 2)
    rest = val[half:] or val
    n = max(args.prompts, BATCH_SIZE)  # the batch-8 rows decode the first 8
    return val[:half], {"validation": (prompts_from(rest, n, 16), torch.cat(rest), f"the validation split of {data}"),
                        "outside": (*outside_set(tokenizer, T, n, 16), OUTSIDE_SOURCE)}


def poe_setup(args):
    """(model, tokenizer, calibration batches, prompt sets, what the model was trained on)."""
    from poelm.checkpoint import load_model
    from poelm.dataloader import BestFitLoader

    if args.corpus == "synthetic":
        return *synthetic_setup(args), "synthetic language (labelled option)"
    if args.model:
        model, tokenizer = load_model(args.model)
        if tokenizer is None:
            raise SystemExit(f"--model {args.model} has no tokenizer: the text prompts need one")
        return model, tokenizer, *text_sets(args, model, tokenizer, Path(args.data)), f"model {args.model}"
    data, tokenizer = ensure_corpus(args)
    model = train_tiny(args, tokenizer.vocab_size, iter(BestFitLoader(data, tokenizer, args.batch_size, 128,
                                                                      split="train")))
    return model, tokenizer, *text_sets(args, model, tokenizer, data), f"trained here on {data}"


def measure_bandwidth(n_bytes: int = 2 ** 27, repeats: int = 5) -> float:
    """This machine's memory bandwidth in bytes/s as this process sees it (a copy reads and writes
    n_bytes; the best of `repeats`, with the current torch threads)."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best


def kv_bytes(model: GPT, n_layers: int, context: float) -> float:
    """Bytes of K and V one decode step reads over n_layers at this context (windows respected)."""
    cfg = model.config
    per_position = 2 * cfg.n_kv_head * cfg.head_dim * model.lm_head.weight.element_size()
    return sum(min(context, w) for w in cfg.window_sizes()[:n_layers]) * per_position


def roofline(model: GPT, n_layers: int, row: dict, prompt_tokens: int, new_tokens: int, bandwidth: float) -> dict:
    """Bytes read per step (weights + KV at the mean context), the batch-1 ceiling at `bandwidth`,
    MBU, TTFT and TPOT of a measured path."""
    w = weight_bytes(model, n_layers)
    kv = kv_bytes(model, n_layers, prompt_tokens + new_tokens / 2)
    step = w + kv
    return {"weight_bytes": w, "kv_bytes": kv, "bytes_per_step": step, "ceiling_tokens_per_s": bandwidth / step,
            "tokens_per_s": row["tokens_per_s"], "mbu": step * row["tokens_per_s"] / bandwidth,
            "ttft_ms": 1e3 * row["ttft_s"], "tpot_ms": 1e3 * row["tpot_s"]}


def poe_section(args) -> dict:
    model, tokenizer, calib_batches, sets, trained_on = poe_setup(args)
    cfg = model.config
    calib = calibrate(model, calib_batches)
    measured = measure_sets(model, tokenizer, sets, calib, args.new_tokens, gamma=args.gamma,
                            wand_factor=args.wand_factor, repeats=args.repeats, threads=args.threads,
                            compile=not args.no_compile, extra_modes=extra_modes(cfg), n_prompts=args.prompts)
    bandwidth = measure_bandwidth()
    layers_of = {"plain": cfg.n_layer, "stage0": cfg.stage_ends[0] + 1}
    for name, rep in measured["sets"].items():
        rep["agreement"].update(teacher_forced_agreement(model, sets[name][1]))
        rep["roofline"] = {p: roofline(model, layers_of[p.split(":")[0]], r, rep["prompt_tokens"],
                                       rep["max_new_tokens"], bandwidth)
                           for p, r in rep["paths"].items() if p.split(":")[0] in layers_of}
    return {"trained_on": trained_on, "memory_bandwidth_bytes_per_s": bandwidth,
            "model": {"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "stages": list(cfg.poe_stage_layers),
                      "vocab_size": cfg.vocab_size, "params": model.num_params()},
            "new_tokens": args.new_tokens, "wand_factor": args.wand_factor, **measured}, model, sets


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="benchmark this PoE model (with --data) instead of training one")
    p.add_argument("--data", default="data/default", help="corpus dir: training text (built when missing) and "
                                                          "held-out validation text")
    p.add_argument("--corpus", default="default", choices=("default", "synthetic"),
                   help="train on the default corpus (in --data), or on the synthetic language (labelled as such)")
    p.add_argument("--tokenizer", default="data/tokenizer-1k", help="tokenizer dir (trained with --vocab when missing)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--width", type=int, default=192)
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary of the tokenizer or synthetic language")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--wand-factor", type=float, default=1.0)
    p.add_argument("--no-compile", action="store_true", help="time the eager paths only")
    p.add_argument("--shape-depth", type=int, default=4, help="section 1: depth of the random model")
    p.add_argument("--shape-width", type=int, default=128, help="section 1: width (heads of 64)")
    p.add_argument("--shape-vocab", type=int, default=4096, help="section 1: vocabulary")
    p.add_argument("--shape-new-tokens", type=int, default=200, help="section 1: new tokens per row")
    p.add_argument("--shape-batches", default="1,8,32", help="section 1: batch sizes; empty: skip the section")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models are overhead-bound, and "
                                                         "OpenMP threads stall badly when the CPU is shared)")
    p.add_argument("--out", default="runs/bench/decode.png")
    p.add_argument("--json", action="store_true", help="also write the results next to --out as .json")
    args = p.parse_args(argv)
    args.shape_batches = [int(b) for b in args.shape_batches.split(",") if b]

    torch.set_num_threads(args.threads)
    results: dict = {"threads": args.threads}
    if args.shape_batches:
        print("== 1. plain decoding vs transformers (random weights) ==", flush=True)
        results["vs_transformers"] = shape_section(args)

    print("== 2. PoE modes on a model trained on text ==", flush=True)
    results["poe_modes"], model, sets = poe_section(args)
    results["elastic_depth"] = elastic_depth(args, model, next(iter(sets.values()))[0])
    report(args, results)
    first = next(iter(results["poe_modes"]["sets"].values()))
    out = Path(args.out)
    plot({name: r["speedup"] for name, r in first["paths"].items()}, out,
         f"{model.config.n_layer}x{model.config.n_embd} PoE, CPU {args.threads} thread(s), batch 1, {first['source']}; "
         "over the best plain path (@T0.8 / @B8: over plain of that setting)")
    if args.json:
        out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str))
    report_elastic(results)
    print(f"chart: {out}")
    ratios(results)
    print(json.dumps(summary(results), default=str))
    return results


@torch.no_grad()
def elastic_depth(args, model: GPT, prompts: list[list[int]]) -> dict:
    """The full model against standalone exports of its first K stages (`poelm export --stages K`):
    size of the weights and plain greedy tokens/s, interleaved."""
    from poelm.export import truncate

    models = {f"full ({model.config.n_stages} stages)": model}
    models.update({f"first {k} stage(s)": truncate(model, k) for k in range(1, model.config.n_stages)})
    engines = {name: Engine(m) for name, m in models.items()}

    def decode(engine):
        return lambda: sum(len(engine.generate(q, max_new_tokens=args.new_tokens, stop_token_ids=[]).tokens)
                           for q in prompts)

    for e in engines.values():
        e.generate(prompts[0], max_new_tokens=8, stop_token_ids=[])
    tps = median_runs({name: decode(e) for name, e in engines.items()}, args.repeats)
    return {name: {"n_layer": m.config.n_layer, "params": m.num_params(),
                   "fp32_bytes": sum(p.numel() * p.element_size() for p in m.parameters()), "tokens_per_s": tps[name]}
            for name, m in models.items()}


def report(args, results: dict) -> None:
    vs = results.get("vs_transformers")
    if vs:
        sh = vs["shape"]
        print(f"\n1. plain decode, random d{sh['n_layer']} x {sh['n_embd']}, vocab {sh['vocab_size']}, "
              f"{vs['new_tokens']} new tokens, greedy, {args.threads} thread(s), transformers {vs['transformers']}")
        print(f"{'batch':>5} {'poelm':>9} {'compiled':>9} {'hf export':>10} {'hf Llama':>9} {'MB/token':>9} "
              f"{'us/token':>9} {'GB/s':>6}")
        for B, r in vs["batches"].items():
            m, c = r["mbu"], r.get("poelm_compiled")
            print(f"{B:5d} {r['poelm']:9.0f} {'' if c is None else f'{c:.0f}':>9} {r['hf_export']:10.0f} "
                  f"{r['hf_llama']:9.0f} {m['weight_bytes_per_token'] / 1e6:9.3f} {m['us_per_token']:9.1f} "
                  f"{m['weight_gb_per_s']:6.2f}")
    pm = results["poe_modes"]
    mdl = pm["model"]
    print(f"\n2. {mdl['n_layer']} layers x {mdl['n_embd']}, stages {mdl['stages']}, {mdl['params'] / 1e6:.2f}M params "
          f"({pm['trained_on']}); batch 1, {pm['threads']} thread(s), median of {pm['repeats']}, the process got "
          f"{100 * pm['cpu']['cpu_share']:.0f} % of a core per thread")
    if pm["cpu"].get("contended"):
        print(f"warning: {pm['cpu']['contended']}: these tokens/s are below this machine's", file=sys.stderr)
    print(f"WAND bounds {[round(b, 3) for b in pm['wand_bounds']]} (F={pm['wand_factor']})")
    for rep in pm["sets"].values():
        agree = rep["agreement"]
        print(f"\nprompts from {rep['source']}: {rep['prompts']} x {rep['prompt_tokens']} tokens, "
              f"{rep['max_new_tokens']} new; best plain path {rep['best_plain']} "
              f"({rep['modes']['plain']['tokens_per_s']:.0f} tok/s)")
        print(f"{'path':<26} {'tok/s':>7} {'vs best':>8} {'top-1 agr':>9} {'stages/tok':>10} {'accept':>7} "
              f"{'tok/verify':>10} {'same as greedy':>14}")
        for name, r in rep["paths"].items():
            a = agree.get(name.split(":")[0])
            acc, tpv = r.get("acceptance"), r.get("tokens_per_verify")
            print(f"{name:<26} {r['tokens_per_s']:7.0f} {r['speedup']:7.2f}x {'' if a is None else f'{a:.4f}':>9} "
                  f"{r['mean_stages_per_token']:10.2f} {'' if acc is None else f'{acc:.3f}':>7} "
                  f"{'' if tpv is None else f'{tpv:.2f}':>10} {str(r.get('identical_to_plain', '')):>14}")
        for line in mode_notes(rep["modes"]):
            print(line[2:])
        print(f"\n3. roofline at {pm['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s measured memory bandwidth "
              f"(copy), batch 1, KV at the mean context")
        for name, r in rep["roofline"].items():
            print(f"{name:<18} weights {r['weight_bytes'] / 1e6:.2f} MB + KV {r['kv_bytes'] / 1e6:.3f} MB per step -> "
                  f"ceiling {r['ceiling_tokens_per_s']:,.0f} tok/s; measured {r['tokens_per_s']:,.0f} tok/s, "
                  f"MBU {100 * r['mbu']:.2f} %, TTFT {r['ttft_ms']:.2f} ms, TPOT {r['tpot_ms']:.3f} ms")


def report_elastic(results: dict) -> None:
    print("\n4. elastic depth on disk (poelm export --stages K), plain greedy, batch 1")
    for name, r in results["elastic_depth"].items():
        print(f"{name:<20} {r['n_layer']:2d} layers {r['fp32_bytes'] / 1e6:7.2f} MB fp32 {r['tokens_per_s']:8.0f} tok/s")


def ratios(results: dict) -> None:
    print("\nratios")
    vs = results.get("vs_transformers")
    if vs:
        b = vs["batches"]
        for B, r in b.items():
            print(f"batch {B}: poelm/transformers(export) {r['poelm'] / r['hf_export']:.2f}  "
                  f"poelm/transformers(Llama) {r['poelm'] / r['hf_llama']:.2f}")
            if "poelm_compiled" in r:
                print(f"batch {B}: poelm compiled/poelm {r['poelm_compiled'] / r['poelm']:.2f}  "
                      f"poelm compiled/transformers(Llama) {r['poelm_compiled'] / r['hf_llama']:.2f}")
        if 1 in b and max(b) > 1:
            print(f"poelm batch {max(b)} / batch 1 tokens_per_s: {b[max(b)]['poelm'] / b[1]['poelm']:.2f}")
            if "poelm_compiled" in b[1]:
                print(f"poelm compiled batch {max(b)} / batch 1 tokens_per_s: "
                      f"{b[max(b)]['poelm_compiled'] / b[1]['poelm_compiled']:.2f}")
    for set_name, rep in results["poe_modes"]["sets"].items():
        for name, r in rep["paths"].items():
            base = rep["best_plain"] if setting_of(name) is None else f"best plain@{setting_of(name)}"
            print(f"{set_name}: {name}/{base} tokens_per_s: {r['speedup']:.2f}")
    elastic = list(results["elastic_depth"].values())
    for name, r in list(results["elastic_depth"].items())[1:]:
        print(f"export {name}/full tokens_per_s: {r['tokens_per_s'] / elastic[0]['tokens_per_s']:.2f}")


def summary(results: dict) -> dict:
    """The JSON line printed last: per prompt set, the best plain path and each mode's best path
    over it, agreement, and the plain path's roofline."""
    pm = results["poe_modes"]
    out = {"trained_on": pm["trained_on"], "model": pm["model"], "threads": pm["threads"],
           "cpu_share": pm["cpu"]["cpu_share"], "memory_bandwidth_gb_s": pm["memory_bandwidth_bytes_per_s"] / 1e9,
           "sets": {}}
    for name, rep in pm["sets"].items():
        plain = rep["best_plain"]
        out["sets"][name] = {
            "source": rep["source"], "best_plain": plain,
            "best_plain_tokens_per_s": rep["modes"]["plain"]["tokens_per_s"],
            "modes": {m: {k: r[k] for k in ("path", "tokens_per_s", "speedup", "agreement", "acceptance",
                                            "identical_to_plain", "gate", "adaptive", "baseline") if k in r}
                      for m, r in rep["modes"].items()},
            "speedups": {p: round(r["speedup"], 3) for p, r in rep["paths"].items()},
            "roofline": {k: rep["roofline"][plain][k] for k in ("bytes_per_step", "ceiling_tokens_per_s", "mbu",
                                                                 "ttft_ms", "tpot_ms")}}
    return out


if __name__ == "__main__":
    main()
