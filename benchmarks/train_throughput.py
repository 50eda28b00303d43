"""Training throughput and memory: BP (`poe_mode=none`) vs PoE `flat` on the same config, in
one run, plus a naive PoE arm that keeps K full logit tensors for backward.

    .venv/bin/python benchmarks/train_throughput.py                    # tiny + trunk configs (~1-2 min on CPU)
    .venv/bin/python benchmarks/train_throughput.py --configs trunk,scale --steps 5
    .venv/bin/python benchmarks/train_throughput.py --device cuda --configs scale --json out.json

Each arm is one full optimizer step exactly as `poelm train` runs it: forward with
`return_stage_losses`, backward, `apply_schedules`, `MuonAdamW.step`, `zero_grad`, on the
same random token batches (data loading is identical for every arm, so it is left out).

- bp         `poe_mode=none`: one fused soft-capped CE on the final readout (with backout).
- poe        `poe_mode=flat`, alpha 0: K stage losses through `softcap_cross_entropy`, the
             chunked CE that computes its gradients chunk by chunk in the forward pass and
             keeps only (N, d) + (V, d) of them, never the (N, V) logits.
- poe-naive  the same objective written plainly: K soft-capped (B, T, V) fp32 logit tensors,
             `F.cross_entropy` on each, all kept alive for backward (checked against `poe`).

Arms run round-robin (step i of every arm, then step i+1), so background load on a shared
machine hits them alike; the median step is reported. Step time is the process CPU time of
the step on a single-threaded CPU run (the default: wall time on a shared, oversubscribed
box also counts the time the process sat descheduled, which swung the ratio by +-0.2 between
identical runs) and wall-clock time otherwise (CUDA, or --threads > 1); both are printed.

Memory (one extra step per arm), reported for forward + backward (where the loss and its
logits live: the figure the fused CE is about) and for the whole step (the optimizer's
transients, Muon's stacked matrices, can dominate at small batch):
- CPU: peak bytes of live tensors allocated during the step, above what existed before it
  (weights, optimizer state), tracked exactly with a TorchDispatchMode that sees every op
  output's storage (forward, backward and optimizer) and a finalizer on each storage: the
  allocator-independent quantity the "never K (B,T,V) tensors" claim is about. As a cross
  check, peak RSS growth during the step ("peak RSS MB"), measured in a child process run
  with MALLOC_MMAP_THRESHOLD_=65536 (freed tensors go straight back to the OS, so RSS
  follows live memory) after resetting VmHWM through /proc/self/clear_refs. The timings
  are NOT taken under that setting: the mmap/munmap per tensor costs ~50 % extra step
  time (mostly system time) and shrinks the measured ratio toward 1.
- CUDA: torch.cuda.max_memory_allocated() above the allocation before the step.

Predicted ratio: `model.flops_per_token` (6 x matmul params + attention, plus the K-1 extra
head projections PoE training runs): a forward + backward figure, so compare it with the
fwd+bwd ratio. The full step also holds MuonAdamW, whose cost (Polar Express on every
matrix) does not depend on the batch: at these CPU batches of 512-1024 tokens it is a large
share of a step and pulls the step ratio toward 1, while at scale (2^20 tokens per step) it
is amortised away and the step ratio approaches the fwd+bwd ratio. At small d and large V the head dominates, so tiny
configs are far from the at-scale ratio: the `trunk` config (vocab 2048, n_embd 256, depth 8)
and `scale` (vocab 2048, n_embd 512, depth 12) are trunk dominated. The last line printed is
the PoE/BP step-time ratio of the last config: `poe/bp step_time: 1.xx`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from poelm.model import GPT, GPTConfig  # noqa: E402
from poelm.optim import build_optimizer  # noqa: E402
from poelm.schedule import apply_schedules  # noqa: E402

CONFIGS = {
    # head dominated: 6*V*d is a large share of the FLOPs, the elementwise CE work larger still
    "tiny": dict(n_layer=4, n_embd=64, n_head=2, vocab_size=512, sequence_len=128, poe_every=1, batch=8),
    # trunk dominated (the example): K = 4 stages of 2 layers
    "trunk": dict(n_layer=8, n_embd=256, n_head=4, vocab_size=2048, sequence_len=256, poe_every=2, batch=4),
    # more so: predicted ratio ~1.08
    "scale": dict(n_layer=12, n_embd=512, n_head=4, vocab_size=2048, sequence_len=256, poe_every=3, batch=2),
}
ARMS = ("bp", "poe", "poe-naive")


# -----------------------------------------------------------------------------
# Memory


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created while active and still alive. Outputs that
    share a storage with an input (views, in-place ops) are not new allocations."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self.live:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_memory(arm: "Arm", x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Peak memory (MB) above the state before the step: (forward + backward, whole step
    with the optimizer). Live tensor bytes on CPU, CUDA allocated bytes on GPU."""
    import gc

    gc.collect()
    marks = []
    if x.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        arm.step(x, y, after_backward=lambda: marks.append(torch.cuda.max_memory_allocated()))
        torch.cuda.synchronize()
        return (marks[0] - base) / 2 ** 20, (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    with LiveTensorBytes() as tracker:
        arm.step(x, y, after_backward=lambda: marks.append(tracker.peak))
    return marks[0] / 2 ** 20, tracker.peak / 2 ** 20


def measure_rss(arm: "Arm", x: torch.Tensor, y: torch.Tensor) -> tuple[float, float] | None:
    """Peak RSS growth (MB) during forward + backward and the whole step; meaningful only
    under a fixed mmap threshold."""
    import gc

    gc.collect()
    if not _reset_peak_rss():
        return None
    marks = []
    before = _rss_kb("VmRSS")
    arm.step(x, y, after_backward=lambda: marks.append(_rss_kb("VmHWM")))
    peak = _rss_kb("VmHWM")
    if None in (before, peak, *marks):
        return None
    return (marks[0] - before) / 1024, (peak - before) / 1024


def rss_in_child(name: str, args) -> dict[str, float | None]:
    """Run this script for one config as a child with MALLOC_MMAP_THRESHOLD_=65536; its
    last stdout line is {arm: peak RSS MB}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--configs", name, "--rss-child", "--seed", str(args.seed),
           "--threads", str(args.threads)] + (["--batch", str(args.batch)] if args.batch else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"   (peak RSS child failed: {proc.stderr.strip().splitlines()[-1:] or proc.returncode})")
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -----------------------------------------------------------------------------
# Arms


def naive_poe_loss(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The flat PoE objective with K full (B, T, V) soft-capped fp32 logits kept for backward."""
    cfg = model.config
    stage_x, _ = model.trunk(idx)
    losses = [F.cross_entropy(model.readout(x, k).reshape(-1, cfg.vocab_size), targets.reshape(-1), ignore_index=-1)
              for k, x in enumerate(stage_x)]
    return sum(losses) / cfg.n_stages ** (1 - cfg.poe_alpha)


class Arm:
    def __init__(self, name: str, config: GPTConfig, device: torch.device, seed: int, horizon: int,
                 autocast: torch.dtype | None):
        self.name, self.device, self.autocast = name, device, autocast
        torch.manual_seed(seed)
        with torch.device(device):
            self.model = GPT(config)
        self.model.init_weights()
        self.optimizer = build_optimizer(self.model)
        self.horizon, self.n = horizon, 0
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.fb_times: list[float] = []  # forward + backward only
        self.fb_cpu_times: list[float] = []

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            if self.name == "poe-naive":
                return naive_poe_loss(self.model, x, y)
            return self.model(x, y, return_stage_losses=True)[0]

    def step(self, x: torch.Tensor, y: torch.Tensor, after_backward=None) -> float:
        loss = self.loss(x, y)
        loss.backward()
        if after_backward is not None:
            after_backward()
        apply_schedules(self.optimizer, self.n % self.horizon, self.horizon, warmup_steps=1)
        self.optimizer.step()
        self.model.zero_grad(set_to_none=True)
        self.n += 1
        return loss.item()

    def timed_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        marks = []

        def mark():
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            marks.append((time.perf_counter(), time.process_time()))

        t0, c0 = time.perf_counter(), time.process_time()
        self.step(x, y, after_backward=mark)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - t0)
        self.cpu_times.append(time.process_time() - c0)
        self.fb_times.append(marks[0][0] - t0)
        self.fb_cpu_times.append(marks[0][1] - c0)


def check_naive_matches(config: GPTConfig, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> float:
    """|fused - naive| of the loss on the same weights (the two PoE arms compute one objective)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        return abs(model(x, y).item() - naive_poe_loss(model, x, y).item())


# -----------------------------------------------------------------------------
# One config


def setup(name: str, args, device: torch.device, autocast, n_batches: int):
    spec = dict(CONFIGS[name])
    B = args.batch or spec["batch"]
    del spec["batch"]
    T, V = spec["sequence_len"], spec["vocab_size"]
    configs = {arm: GPTConfig(**spec, poe_mode="none" if arm == "bp" else "flat") for arm in ARMS}
    arms = [Arm(a, configs[a], device, args.seed, n_batches + 4, autocast) for a in ARMS]
    gen = torch.Generator().manual_seed(args.seed)
    batches = [(torch.randint(0, V, (B, T), generator=gen).to(device), torch.randint(0, V, (B, T), generator=gen).to(device))
               for _ in range(n_batches)]
    return spec, B, T, configs, arms, batches


def rss_child(name: str, args) -> None:
    spec, B, T, configs, arms, batches = setup(name, args, torch.device("cpu"), None, 1)
    for arm in arms:
        arm.step(*batches[0])  # optimizer state exists before the measured step
    print(json.dumps({arm.name: measure_rss(arm, *batches[0]) for arm in arms}))


def run_config(name: str, args, device: torch.device, autocast) -> dict:
    spec, B, T, configs, arms, batches = setup(name, args, device, autocast, args.warmup + args.steps)

    bp_model, poe_model = arms[0].model, arms[1].model
    flops_bp = bp_model.flops_per_token(T)
    flops_poe = poe_model.flops_per_token(T)
    head = 6 * bp_model.lm_head.weight.numel()
    cfg = poe_model.config
    print(f"\n== {name}: depth {cfg.n_layer}, n_embd {cfg.n_embd}, vocab {cfg.vocab_size}, K = {cfg.n_stages} stages "
          f"{list(cfg.poe_stage_layers)}, batch {B} x {T} tokens, {poe_model.num_params() / 1e6:.2f} M params, "
          f"{device.type}{'' if device.type == 'cuda' else f', {torch.get_num_threads()} thread(s)'}")
    print(f"   FLOPs/token: bp {flops_bp / 1e6:.1f} M, poe {flops_poe / 1e6:.1f} M; head share of bp "
          f"{100 * head / flops_bp:.1f} %; predicted poe/bp {flops_poe / flops_bp:.3f}")
    diff = check_naive_matches(configs["poe"], device, *batches[0])
    print(f"   naive vs fused PoE loss on the same weights: |diff| = {diff:.2e}")

    for i, (x, y) in enumerate(batches):  # round-robin: every arm sees the same background load
        for arm in arms:
            if i < args.warmup:
                arm.step(x, y)
            else:
                arm.timed_step(x, y)
    memory = {arm.name: measure_memory(arm, *batches[0]) for arm in arms}
    rss = rss_in_child(name, args) if device.type == "cpu" and not args.no_rss else {}

    result = {"config": name, "spec": {**spec, "batch": B}, "device": str(device),
                        "threads": torch.get_num_threads(), "flops_per_token": {"bp": flops_bp, "poe": flops_poe},
                        "predicted_ratio": flops_poe / flops_bp, "head_share": head / flops_bp, "arms": {}}
    use_cpu_time = device.type == "cpu" and torch.get_num_threads() == 1
    result["step_time"] = "process CPU time" if use_cpu_time else "wall clock"
    print(f"   {'arm':<10} {'step ms':>9} {'fwd+bwd':>9} {'optim':>7} {'wall ms':>9} {'tokens/s':>10}"
          f" {'peak MB fwd+bwd':>16} {'step':>7} {'RSS MB fwd+bwd':>15} {'step':>7}")
    for arm in arms:
        wall, cpu = statistics.median(arm.times), statistics.median(arm.cpu_times)
        step_s = cpu if use_cpu_time else wall
        fb_s = statistics.median(arm.fb_cpu_times if use_cpu_time else arm.fb_times)
        tok_s = B * T / step_s
        fb, whole = memory[arm.name]
        r = rss.get(arm.name) or (None, None)
        rss_text = ["n/a" if v is None else f"{v:.1f}" for v in r]
        print(f"   {arm.name:<10} {1e3 * step_s:9.1f} {1e3 * fb_s:9.1f} {1e3 * (step_s - fb_s):7.1f} {1e3 * wall:9.1f}"
              f" {tok_s:10,.0f} {fb:16.1f} {whole:7.1f} {rss_text[0]:>15} {rss_text[1]:>7}")
        result["arms"][arm.name] = {"step_s": step_s, "fwd_bwd_s": fb_s, "wall_s": wall, "cpu_s": cpu,
                                    "wall_steps_s": arm.times, "cpu_steps_s": arm.cpu_times, "tokens_per_s": tok_s,
                                    "peak_mb": fb, "peak_step_mb": whole, "rss_mb": r[0], "rss_step_mb": r[1]}
    a = result["arms"]
    result["ratio"] = a["poe"]["step_s"] / a["bp"]["step_s"]
    result["wall_ratio"] = a["poe"]["wall_s"] / a["bp"]["wall_s"]
    result["fwd_bwd_ratio"] = a["poe"]["fwd_bwd_s"] / a["bp"]["fwd_bwd_s"]
    result["optimizer_share"] = 1 - a["bp"]["fwd_bwd_s"] / a["bp"]["step_s"]
    result["naive_ratio"] = a["poe-naive"]["step_s"] / a["bp"]["step_s"]
    result["memory_ratio"] = a["poe"]["peak_mb"] / a["bp"]["peak_mb"]
    result["naive_memory_ratio"] = a["poe-naive"]["peak_mb"] / a["bp"]["peak_mb"]
    print(f"   poe/bp: step time {result['ratio']:.3f} ({result['step_time']}; wall {result['wall_ratio']:.3f}), "
          f"fwd+bwd time {result['fwd_bwd_ratio']:.3f} (FLOPs model {result['predicted_ratio']:.3f}; the optimizer is "
          f"{100 * result['optimizer_share']:.0f} % of a BP step here), fwd+bwd peak memory {result['memory_ratio']:.2f}x")
    print(f"   naive/bp: step time {result['naive_ratio']:.3f}, fwd+bwd peak memory {result['naive_memory_ratio']:.2f}x")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,trunk", help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps per arm")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per arm first")
    p.add_argument("--batch", type=int, default=None, help="rows per step (default: per config)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: stable timings on a shared machine)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--no-rss", action="store_true", help="skip the peak-RSS cross check (a child process per config)")
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        p.error(f"unknown config(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(CONFIGS)}")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no CUDA GPU is visible")
    torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(names[0], args)
        return
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    autocast = torch.bfloat16 if dtype == "bf16" else None
    results = [run_config(n, args, device, autocast) for n in names]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print()
    for r in results:
        print(f"{r['config']}: bp {r['arms']['bp']['tokens_per_s']:,.0f} tok/s, poe {r['arms']['poe']['tokens_per_s']:,.0f} "
              f"tok/s; poe/bp step {r['ratio']:.3f}, fwd+bwd {r['fwd_bwd_ratio']:.3f} (FLOPs model "
              f"{r['predicted_ratio']:.3f}); fwd+bwd peak MB bp "
              f"{r['arms']['bp']['peak_mb']:.1f} / poe {r['arms']['poe']['peak_mb']:.1f} / naive "
              f"{r['arms']['poe-naive']['peak_mb']:.1f}")
    print(f"poe/bp step_time: {results[-1]['ratio']:.2f}")


if __name__ == "__main__":
    main()
