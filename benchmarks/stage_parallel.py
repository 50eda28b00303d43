"""Stage-parallel PoE training (`poelm train --stage-parallel`) on this CPU: K = 2 stage ranks
vs one process with the same total threads, and vs 2-rank data parallelism, on the same
model, global batch and data. Then the expected figures for K = 4 GPUs at the released d24.

    .venv/bin/python benchmarks/stage_parallel.py                  # ~2 min on 2 cores
    .venv/bin/python benchmarks/stage_parallel.py --steps 12 --depth 4 --n-embd 256

Each arm is a real `poelm train` run (torchrun --standalone for the two 2-rank arms, gloo):
- one     1 process, torch threads = 2 (the same total threads as the 2-rank arms)
- stage   --stage-parallel, 2 ranks x 1 thread: stage 0 = layers 0..L/2-1, stage 1 = the rest
- dp      plain data parallelism, 2 ranks x 1 thread, each half the micro-batches

Reported per arm: tokens/s (median over the steps after the first two), peak RSS per rank
(ru_maxrss at exit: weights, optimizer state, activations and the torch runtime), bytes each
rank sends per step (stage: the boundary residuals it sends, counted, plus the optimizer's
reduce-scatter + all-gather of the shared tensors and its stage group, estimated as 2(n-1)/n
of the gradient bytes; dp: the same estimate for every gradient), and the pipeline idle
fraction (time a stage rank is blocked on activations or on the other stage at the step's
end, over the step time, mean over ranks). Ratios are printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WRAPPER = """
    import json, os, resource, sys
    from poelm.cli import main
    rc = main(sys.argv[1:])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with open(os.path.join(os.environ["BENCH_OUT"], f"rss_rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump({"peak_rss": rss}, f)
    sys.exit(rc)
"""


def make_data(root: Path, vocab: int) -> tuple[Path, Path]:
    from poelm.corpus import write_corpus
    from poelm.tokenizer import Tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrst") for _ in range(rng.randint(2, 7))) for _ in range(400)]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))) + "." for _ in range(3000)]
    write_corpus(docs, root / "data", n_train_shards=2, row_group_docs=100)
    Tokenizer.train(docs[:1000], vocab).save(root / "tok")
    return root / "data", root / "tok"


def train_argv(a, data: Path, tok: Path, out: Path, micro: int) -> list[str]:
    return ["train", "--data", str(data), "--tokenizer", str(tok), "--out", str(out), "--depth", str(a.depth),
            "--n-embd", str(a.n_embd), "--n-head", str(a.n_embd // 64), "--seq-len", str(a.seq_len),
            "--window-pattern", "L", "--poe-mode", "flat", "--poe-every", str(a.depth // 2),
            "--total-batch-size", str(a.micro_batch * a.seq_len * a.grad_accum), "--device-batch-size", str(micro),
            "--num-iterations", str(a.steps), "--eval-every", "0", "--save-every", "0", "--lr-scaling", "off",
            "--device", "cpu", "--dtype", "fp32", "--quiet"]


def run_arm(name: str, argv: list[str], nproc: int, threads: int, root: Path) -> dict:
    out = root / name
    out.mkdir()
    wrapper = root / "wrapper.py"
    wrapper.write_text(textwrap.dedent(WRAPPER))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "BENCH_OUT": str(out), "PYTHONPATH": str(ROOT)}
    if nproc == 1:
        cmd = [sys.executable, str(wrapper), *argv]
    else:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(nproc),
               str(wrapper), *argv]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    run_dir = Path(argv[argv.index("--out") + 1])
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r["type"] == "train"][2:]
    rss = [json.loads((out / f"rss_rank{r}.json").read_text())["peak_rss"] for r in range(nproc)]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in train), "peak_rss_per_rank": rss,
            "records": train}


def grad_bytes(a, vocab: int) -> int:
    """Every trainable parameter's bytes (fp32), as data parallelism reduces them."""
    from poelm.model import GPT, GPTConfig
    import torch

    cfg = GPTConfig(n_layer=a.depth, n_embd=a.n_embd, n_head=a.n_embd // 64, vocab_size=vocab,
                    sequence_len=a.seq_len, window_pattern="L", poe_every=a.depth // 2)
    with torch.device("meta"):
        model = GPT(cfg)
    return sum(p.numel() for n, p in model.named_parameters() if n != "backout_lambda") * 4


def expected_d24(tokens_per_step: int = 2 ** 19, mfu: float = 0.4, peak: float = 989e12) -> dict:
    """K = 4 GPUs (H100-class) at the released d24 shape (poe-1.3b: 4 x 6 layers, vocab 32768,
    T 2048), one replica, from the FLOPs model (6 x matmul params + attention, per stage with
    its own readout) and the tensor sizes: fp32 boundary residuals (under bf16 autocast the
    residual stream stays fp32) and fp32 shared gradients (wte, lm_head, smear, lambdas)."""
    import torch

    from poelm.model import GPT, GPTConfig
    from poelm.presets import PRESETS

    cfg = GPTConfig(**PRESETS["poe-1.3b"])
    with torch.device("meta"):
        model = GPT(cfg)
    d, V, T = cfg.n_embd, cfg.padded_vocab_size, cfg.sequence_len
    stages = []
    for k, n in enumerate(cfg.poe_stage_layers):
        first = sum(cfg.poe_stage_layers[:k])
        blocks = sum(p.numel() for i in range(first, first + n) for p in model.transformer.h[i].parameters())
        attn = sum(12 * cfg.n_head * cfg.head_dim * min(w, T) for w in model.windows[first:first + n])
        flops = (6 * (blocks + V * d) + attn) * tokens_per_step
        stages.append({"stage": k, "tflop_per_step": flops / 1e12, "seconds_at_mfu": flops / (mfu * peak)})
    residual = tokens_per_step * d * 4
    shared = sum(p.numel() for n, p in model.named_parameters()
                 if n in ("transformer.wte.weight", "lm_head.weight", "smear_gate.weight", "smear_lambda",
                          "resid_lambdas", "x0_lambdas")) * 4
    K = cfg.n_stages
    shared_sent = 2 * (K - 1) / K * shared
    dp_sent = 2 * (K - 1) / K * model.num_params() * 4
    links = {"nvlink_450GBps": 450e9, "ethernet_100Gbps": 12.5e9}
    return {"stages": stages, "residual_bytes_per_boundary": residual, "shared_grad_bytes_sent_per_rank": shared_sent,
            "dp4_grad_bytes_sent_per_rank": dp_sent,
            "seconds": {link: {"activations_per_boundary": residual / bw, "shared_allreduce": shared_sent / bw,
                               "dp4_allreduce": dp_sent / bw} for link, bw in links.items()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4, help="rows per micro-batch of the one-process and stage arms")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step (one-process and stage arms)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data, tok = make_data(root, a.vocab)
        from poelm.tokenizer import Tokenizer
        vocab = Tokenizer.load(tok).vocab_size
        arms = {
            "one": run_arm("one", train_argv(a, data, tok, root / "one" / "run", a.micro_batch), 1, 2, root),
            "stage": run_arm("stage", train_argv(a, data, tok, root / "stage" / "run", a.micro_batch)
                             + ["--stage-parallel"], 2, 1, root),
            "dp": run_arm("dp", train_argv(a, data, tok, root / "dp" / "run", a.micro_batch), 2, 1, root),
        }
    stage_rec = arms["stage"].pop("records")
    arms["one"].pop("records"), arms["dp"].pop("records")
    arms["one"]["bytes_sent_per_rank"] = 0
    arms["stage"]["bytes_sent_per_rank"] = (statistics.median(r["bytes_p2p_per_rank"] for r in stage_rec)
                                            + stage_rec[0]["bytes_collective_per_rank"])
    arms["stage"]["bytes_p2p_per_rank"] = statistics.median(r["bytes_p2p_per_rank"] for r in stage_rec)
    arms["stage"]["pipeline_idle"] = statistics.median(r["pipeline_idle"] for r in stage_rec)
    arms["dp"]["bytes_sent_per_rank"] = int(2 * (2 - 1) / 2 * grad_bytes(a, vocab))
    print(f"model: depth {a.depth} x {a.n_embd}, 2 stages, T {a.seq_len}, vocab {vocab}, "
          f"{a.micro_batch * a.seq_len * a.grad_accum} tokens/step in {a.grad_accum} micro-batches of {a.micro_batch}")
    for name, r in arms.items():
        rss = " / ".join(f"{b / 2 ** 20:.0f}" for b in r["peak_rss_per_rank"])
        extra = f" | pipeline idle {100 * r['pipeline_idle']:.1f}%" if "pipeline_idle" in r else ""
        print(f"{name:>6}: {r['tokens_per_s']:>9,.0f} tok/s | peak RSS per rank {rss} MB | "
              f"sent per rank per step {r['bytes_sent_per_rank'] / 2 ** 20:.2f} MiB{extra}")
    d24 = expected_d24()
    print("expected, K=4 GPUs at d24 (poe-1.3b), 2^19 tokens/step, 40% MFU of 989 TFLOP/s:")
    for s in d24["stages"]:
        print(f"  stage {s['stage']}: {s['tflop_per_step']:.0f} TFLOP/step = {s['seconds_at_mfu']:.2f} s")
    print(f"  boundary residual {d24['residual_bytes_per_boundary'] / 1e9:.2f} GB/step per boundary; shared "
          f"gradients {d24['shared_grad_bytes_sent_per_rank'] / 1e9:.2f} GB/rank vs DP-4 full gradients "
          f"{d24['dp4_grad_bytes_sent_per_rank'] / 1e9:.2f} GB/rank")
    for link, s in d24["seconds"].items():
        print(f"  {link}: activations {s['activations_per_boundary']:.3f} s, shared all-reduce "
              f"{s['shared_allreduce']:.3f} s, DP-4 all-reduce {s['dp4_allreduce']:.3f} s per step")
    one, st, dp = arms["one"], arms["stage"], arms["dp"]
    ratios = {"stage/one tokens_per_s": st["tokens_per_s"] / one["tokens_per_s"],
              "stage/dp tokens_per_s": st["tokens_per_s"] / dp["tokens_per_s"],
              "stage/one peak_rss_per_rank": max(st["peak_rss_per_rank"]) / one["peak_rss_per_rank"][0],
              "stage/dp peak_rss_per_rank": max(st["peak_rss_per_rank"]) / max(dp["peak_rss_per_rank"]),
              "stage/dp bytes_sent_per_rank": st["bytes_sent_per_rank"] / dp["bytes_sent_per_rank"]}
    print("ratios:")
    for k, v in ratios.items():
        print(f"  {k}: {v:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"arms": arms, "d24": d24, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
