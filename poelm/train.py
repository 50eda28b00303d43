"""Train a BP or PoE model from scratch: MuonAdamW, the released schedule, best-fit
packed data, bits-per-byte of every stage, atomic checkpoints and exact resume.

    poelm train --data data/default --tokenizer data/tokenizer --out runs/tiny \\
        --depth 4 --n-embd 128 --n-head 2 --seq-len 256 --poe-mode flat --poe-every 1 \\
        --total-batch-size 8192 --device-batch-size 16 --num-iterations 300 --eval-every 100
    torchrun --nproc_per_node 2 -m poelm train ...      # many processes (gloo on CPU, NCCL on GPU)
    poelm train ... --resume                            # continue the run in --out exactly

A run directory holds `metrics.jsonl`, `step_NNNNNN/` checkpoints (model directory +
optimizer, loader and RNG state), `latest` (the newest complete checkpoint) and PNG plots.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from poelm.checkpoint import (LATEST_NAME, atomic_torch_save, atomic_write_bytes, atomic_write_json, build_model,
                              check_tokenizer, load_state_into, read_safetensors, replace_dir, save_model)
from poelm.model import POE_MODES, GPT, GPTConfig

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class TrainConfig:
    data: str = "data/default"
    tokenizer: str | None = None
    out: str = "runs/train"
    # model (None: derived or GPTConfig default)
    depth: int = 24
    n_embd: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    head_dim: int = 128
    intermediate_size: int | None = None
    seq_len: int = 2048
    window_pattern: str = "SSSL"
    short_window: int | None = None
    poe_mode: str = "flat"
    poe_alpha: float = 0.0
    poe_every: int | None = None
    poe_stage_layers: tuple[int, ...] | None = None
    per_stage_head: bool = False
    # batch and horizon
    total_batch_size: int = 2 ** 20
    device_batch_size: int = 32
    num_iterations: int = -1
    target_tokens: int = -1
    target_param_data_ratio: float = 20.0
    # optimizer
    matrix_lr: float = 0.02
    embedding_lr: float = 0.3
    unembedding_lr: float = 0.008
    scalar_lr: float = 0.5
    weight_decay: float = 0.2
    warmup_steps: int = 40
    warmdown_frac: float = 0.65
    final_lr_frac: float = 0.05
    # evaluation, sampling, saving
    eval_every: int = 250
    eval_tokens: int | None = None  # None: the device's default (dataloader.default_eval_tokens)
    sample_every: int = 0
    sample_prompt: str = "The "
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    # runtime
    seed: int = 42
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    resume: bool = False
    quiet: bool = False

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(n_layer=self.depth, n_embd=self.n_embd, n_head=self.n_head, n_kv_head=self.n_kv_head,
                         head_dim=self.head_dim, intermediate_size=self.intermediate_size,
                         sequence_len=self.seq_len, vocab_size=vocab_size, window_pattern=self.window_pattern,
                         short_window=self.short_window, poe_mode=self.poe_mode, poe_alpha=self.poe_alpha,
                         poe_every=self.poe_every,
                         poe_stage_layers=tuple(self.poe_stage_layers) if self.poe_stage_layers else None,
                         per_stage_head=self.per_stage_head)


class NonFiniteLoss(ValueError):
    pass


# -----------------------------------------------------------------------------
# Runtime: distributed, device, precision


@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    autocast_dtype: torch.dtype | None = None

    @property
    def master(self) -> bool:
        return self.rank == 0


def setup_runtime(tc: TrainConfig) -> Runtime:
    rt = Runtime()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        rt.rank, rt.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        rt.local_rank = int(os.environ.get("LOCAL_RANK", rt.rank))
    want = tc.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA GPU is visible; use --device cpu")
        rt.device = torch.device("cuda", rt.local_rank if rt.world > 1 else torch.device(want).index or 0)
        torch.cuda.set_device(rt.device)
    else:
        rt.device = torch.device(want)
    if rt.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo")
    dtype = tc.dtype
    if dtype == "auto":
        dtype = "bf16" if rt.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"--dtype {dtype!r} is not fp32 or bf16")
    rt.autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
    return rt


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# -----------------------------------------------------------------------------
# Checkpoints of a run


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / LATEST_NAME
    if not pointer.is_file():
        return None
    path = out / pointer.read_text().strip()
    return path if (path / "trainer.json").exists() else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(rt: Runtime, out: Path, step: int, model: GPT, optimizer, loader, tokenizer,
                    trainer_state: dict, keep: int) -> Path:
    """Every rank writes its optimizer/loader shard into a temporary directory; rank 0
    writes the model, renames the directory into place and only then moves `latest`."""
    if not params_finite(model):  # the same weights on every rank: all ranks stop together
        raise NonFiniteLoss(f"parameters became non-finite before the checkpoint of step {step}; stopping. "
                            f"The last good checkpoint in {out} is intact (lower the learning rates or check the data)")
    final = out / step_dir_name(step)
    tmp = out / f".{final.name}.tmp"
    if rt.master:
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(model, tmp, tokenizer)
    barrier(rt)
    atomic_torch_save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / f"optim_rank{rt.rank}.pt")
    atomic_write_json(tmp / f"loader_rank{rt.rank}.json", loader.state_dict())
    barrier(rt)
    if rt.master:
        atomic_write_json(tmp / "trainer.json", trainer_state)
        replace_dir(tmp, final)
        atomic_write_bytes(out / LATEST_NAME, final.name.encode())
        prune_checkpoints(out, keep)
    barrier(rt)
    return final


def prune_checkpoints(out: Path, keep: int) -> None:
    dirs = sorted(p for p in out.glob("step_*") if p.is_dir())
    latest = (out / LATEST_NAME).read_text().strip()
    for old in dirs[:-keep] if keep > 0 else []:
        if old.name != latest:
            shutil.rmtree(old, ignore_errors=True)


def barrier(rt: Runtime) -> None:
    if rt.world > 1:
        dist.barrier()


def params_finite(model: GPT) -> bool:
    """True when every parameter is finite (checked before a checkpoint is written, so a
    step that finished with a finite loss but produced inf/NaN weights is never saved)."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def same_tokenizer(a, b) -> bool:
    """Same merges and special tokens (not just the same vocabulary size)."""
    strip = lambda t: {k: v for k, v in t.to_json().items() if k != "name"}  # noqa: E731
    return strip(a) == strip(b)


def config_diff(a: GPTConfig, b: GPTConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: checkpoint {da[k]!r} vs now {db[k]!r}" for k in da if da[k] != db[k]]


# -----------------------------------------------------------------------------
# Metrics and progress


class MetricsLog:
    """Append-only JSONL of every logged step and eval (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool, truncate_after_step: int | None = None):
        self.path, self.enabled = path, enabled
        if enabled and truncate_after_step is not None and path.exists():  # drop lines past the resumed step
            kept = [l for l in path.read_text().splitlines()
                    if l and truncate_after_step > 0 and json.loads(l).get("step", 0) <= truncate_after_step]
            atomic_write_bytes(path, ("\n".join(kept) + "\n").encode() if kept else b"")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def make_progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"),
                    TimeRemainingColumn(), disable=not enabled, transient=False)


# -----------------------------------------------------------------------------
# Evaluation and samples


def run_eval(model: GPT, val: list, token_bytes: torch.Tensor, rt: Runtime) -> dict:
    from poelm.evaluate import evaluate_bpb

    return evaluate_bpb(model, val, token_bytes, autocast_dtype=rt.autocast_dtype)


@torch.no_grad()
def greedy_sample(model: GPT, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """A greedy continuation through the inference engine (final readout)."""
    from poelm.engine import Engine

    text = Engine(model, tokenizer).generate(prompt, max_new_tokens=max_new_tokens, stop_token_ids=[]).text
    model.train()  # Engine puts the model in eval mode
    return prompt + text


# -----------------------------------------------------------------------------
# The run


def prepare(tc: TrainConfig, rt: Runtime):
    """Tokenizer, model, optimizer, loader and horizon of a run (fresh or resumed)."""
    from poelm.dataloader import BestFitLoader
    from poelm.optim import build_optimizer
    from poelm.schedule import resolve_horizon
    from poelm.tokenizer import Tokenizer

    if not tc.tokenizer:
        raise ValueError("--tokenizer DIR is required (train one with `poelm tokenizer train --data DIR --out DIR`)")
    if not Path(tc.data).is_dir():
        raise FileNotFoundError(f"--data {tc.data} does not exist; build a corpus with `poelm data build --out DIR`")
    tokenizer = Tokenizer.load(tc.tokenizer)
    config = tc.model_config(tokenizer.vocab_size)
    check_tokenizer(tokenizer, config, tc.tokenizer)
    if tc.device_batch_size < 1 or tc.seq_len < 1 or tc.total_batch_size < 1:
        raise ValueError(f"--device-batch-size, --seq-len and --total-batch-size must be >= 1 (got "
                         f"{tc.device_batch_size}, {tc.seq_len}, {tc.total_batch_size})")
    tokens_per_micro = tc.device_batch_size * tc.seq_len * rt.world
    if tc.total_batch_size % tokens_per_micro:
        raise ValueError(f"--total-batch-size {tc.total_batch_size} is not a multiple of device batch x seq len x "
                         f"ranks = {tc.device_batch_size} x {tc.seq_len} x {rt.world} = {tokens_per_micro}")
    grad_accum = tc.total_batch_size // tokens_per_micro
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    model = build_model(config, device=rt.device, init=True)
    optimizer = build_optimizer(model, unembedding_lr=tc.unembedding_lr, embedding_lr=tc.embedding_lr,
                                matrix_lr=tc.matrix_lr, scalar_lr=tc.scalar_lr, weight_decay=tc.weight_decay)
    num_iterations, rule = resolve_horizon(tc.num_iterations, tc.target_tokens, tc.target_param_data_ratio,
                                           model.num_params(), tc.total_batch_size)
    out = Path(tc.out)
    start_step, loader_state, state = 0, None, {}
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not tc.resume:
        raise ValueError(f"{out} already holds a run (checkpoint {ckpt.name}); pass --resume to continue it "
                         "or choose another --out")
    if tc.resume and ckpt is None and rt.master and not tc.quiet:
        print(f"--resume: no checkpoint in {out} yet; starting a fresh run", flush=True)
    if tc.resume and ckpt is not None:
        saved = json.loads((ckpt / "config.json").read_text())
        from poelm.checkpoint import config_from_json
        saved_config = config_from_json(saved)
        if saved_config.vocab_size != config.vocab_size:
            raise ValueError(f"--resume: tokenizer {tc.tokenizer} has {config.vocab_size} tokens but the model in "
                             f"{ckpt} was trained with a {saved_config.vocab_size}-token tokenizer; pass the run's "
                             "own tokenizer (it is saved in every checkpoint)")
        if any((ckpt / n).exists() for n in ("tokenizer.json", "tokenizer.pkl")) and \
                not same_tokenizer(Tokenizer.load(ckpt), tokenizer):
            raise ValueError(f"--resume: tokenizer {tc.tokenizer} does not match the one {ckpt} was trained with "
                             "(same size, different merges or specials); pass the run's own tokenizer")
        diff = config_diff(saved_config, config)
        if diff:
            raise ValueError(f"--resume: {ckpt} was trained with another architecture ({'; '.join(diff)})")
        load_state_into(model, read_safetensors(ckpt / "model.safetensors"), str(ckpt))
        shards = len(list(ckpt.glob("optim_rank*.pt")))
        if shards != rt.world:
            raise ValueError(f"--resume: {ckpt} was written by {shards} process(es), this run has {rt.world}; "
                             "resume with the same number of processes (optimizer state is sharded per rank)")
        shard = ckpt / f"optim_rank{rt.rank}.pt"
        blob = torch.load(shard, map_location=rt.device, weights_only=False)
        optimizer.load_state_dict(blob["optimizer"])
        state = json.loads((ckpt / "trainer.json").read_text())
        loader_state = json.loads((ckpt / f"loader_rank{rt.rank}.json").read_text())
        start_step = state["step"]
        num_iterations = state["num_iterations"]
        rule = f"horizon: {num_iterations:,} steps (resumed from {ckpt.name})"
        set_rng_state(blob["rng"])
    loader = BestFitLoader(tc.data, tokenizer, tc.device_batch_size, tc.seq_len, split="train", rank=rt.rank,
                           world_size=rt.world, device=rt.device, state=loader_state)
    return tokenizer, model, optimizer, loader, grad_accum, num_iterations, rule, start_step, state


def load_val(tc: TrainConfig, tokenizer, rt: Runtime) -> list:
    from poelm.dataloader import val_batches

    return list(val_batches(tc.data, tokenizer, tc.device_batch_size, tc.seq_len, tc.eval_tokens,
                            rank=rt.rank, world_size=rt.world, device=rt.device))


def train(tc: TrainConfig) -> dict:
    """Run (or resume) training; returns the final metrics."""
    from poelm.schedule import apply_schedules

    rt = setup_runtime(tc)
    tokenizer, model, optimizer, loader, grad_accum, num_iterations, rule, start_step, state = prepare(tc, rt)
    val = load_val(tc, tokenizer, rt) if tc.eval_every > 0 else []  # bad validation data fails before any write
    out = Path(tc.out)
    if rt.master:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "train_config.json", dataclasses.asdict(tc))
    log = MetricsLog(out / "metrics.jsonl", rt.master, truncate_after_step=start_step)
    say = (lambda *a: print(*a, flush=True)) if rt.master and not tc.quiet else (lambda *a: None)
    cfg = model.config
    say(f"model: {cfg.n_layer} layers x {cfg.n_embd} wide, stages {list(cfg.poe_stage_layers)}, "
        f"poe_mode={cfg.poe_mode} alpha={cfg.poe_alpha}, {model.num_params():,} params")
    say(f"batch: {tc.total_batch_size:,} tokens/step = {tc.device_batch_size} x {tc.seq_len} x {rt.world} ranks "
        f"x {grad_accum} accumulation steps; {rule}")
    token_bytes = tokenizer.token_bytes()
    train_model = torch.compile(model) if tc.compile else model
    flops_per_step = model.flops_per_token(tc.seq_len) * tc.total_batch_size
    peak = peak_flops(rt.device)
    ema = state.get("ema_loss", 0.0)
    last_eval: dict = state.get("last_eval", {})
    step = start_step
    total_time = state.get("train_seconds", 0.0)
    model.train()

    def trainer_state(step: int) -> dict:
        return {"step": step, "num_iterations": num_iterations, "ema_loss": ema, "last_eval": last_eval,
                "train_seconds": total_time, "model_config": cfg.to_dict()}

    def do_eval(step: int) -> None:
        nonlocal last_eval
        result = run_eval(model, val, token_bytes, rt)
        last_eval = {"step": step, **result}
        log.write({"type": "eval", **last_eval})
        stages = " ".join(f"{b:.4f}" for b in result["stages"])
        say(f"step {step:>6} | val bpb {result['bpb']:.4f} | stages [{stages}] | log-op {result['logop']:.4f}")

    with make_progress(rt.master and not tc.quiet) as progress:
        task = progress.add_task(f"train {out.name}", total=num_iterations, completed=start_step, status="")
        while True:
            last = step == num_iterations
            if tc.eval_every > 0 and (step % tc.eval_every == 0 or last) and (step > start_step or step == 0 or last) \
                    and last_eval.get("step") != step:
                do_eval(step)
            if rt.master and tc.sample_every > 0 and step > 0 and (step % tc.sample_every == 0 or last):
                say(f"sample: {greedy_sample(model, tokenizer, tc.sample_prompt)!r}")
            if step > start_step and (last or (tc.save_every > 0 and step % tc.save_every == 0)):
                save_checkpoint(rt, out, step, model, optimizer, loader, tokenizer, trainer_state(step),
                                tc.keep_checkpoints)
            if last:
                break
            t0 = time.time()
            loss_sum, stage_sum = 0.0, None
            for _ in range(grad_accum):
                x, y = next(loader)  # drawn just before use, so a checkpoint's loader state is exact
                with torch.autocast(rt.device.type, dtype=rt.autocast_dtype, enabled=rt.autocast_dtype is not None):
                    loss, stage_losses = train_model(x, y, return_stage_losses=True)
                (loss / grad_accum).backward()
                loss_sum += loss.detach().float().item() / grad_accum
                stage_sum = stage_losses / grad_accum if stage_sum is None else stage_sum + stage_losses / grad_accum
            if rt.world > 1:  # mean over ranks, so a non-finite loss on any rank stops every rank
                both = torch.cat([torch.tensor([loss_sum], device=stage_sum.device), stage_sum.float()])
                dist.all_reduce(both)
                both /= rt.world
                loss_sum, stage_sum = both[0].item(), both[1:]
            if not math.isfinite(loss_sum):
                raise NonFiniteLoss(f"loss became {loss_sum} at step {step + 1}; stopping. The last good checkpoint "
                                    f"in {out} is intact (lower the learning rates or check the data)")
            lrm = apply_schedules(optimizer, step, num_iterations, warmup_steps=tc.warmup_steps,
                                  warmdown_frac=tc.warmdown_frac, final_lr_frac=tc.final_lr_frac)
            optimizer.step()
            model.zero_grad(set_to_none=True)
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            step += 1
            total_time += dt
            ema = 0.9 * ema + 0.1 * loss_sum
            debiased = ema / (1 - 0.9 ** step)
            tok_s = tc.total_batch_size / dt
            mfu = flops_per_step / dt / (peak * rt.world) if peak else None
            record = {"type": "train", "step": step, "loss": loss_sum, "stage_losses": stage_sum.tolist(),
                      "lr_mult": lrm, "tokens_per_s": tok_s, "dt": dt, "mfu": mfu,
                      "cropped_fraction": getattr(loader, "cropped_fraction", None)}
            log.write(record)
            status = f"loss {debiased:.4f} lr {lrm:.3f} {tok_s:,.0f} tok/s MFU " + (f"{100 * mfu:.1f}%" if mfu else "n/a")
            progress.update(task, completed=step, status=status)
    final_loss = ema / (1 - 0.9 ** step) if step > 0 else None
    result = {"step": step, "num_iterations": num_iterations, "train_seconds": total_time, "final_loss": final_loss,
              "eval": last_eval, "out": str(out), "cropped_fraction": getattr(loader, "cropped_fraction", None)}
    if rt.master:
        atomic_write_json(out / "result.json", result)
        try:
            from poelm.plots import plot_run
            plot_run(out)
        except Exception as e:  # plots are a convenience; never fail a finished run on them
            say(f"(plots skipped: {e})")
    return result


# -----------------------------------------------------------------------------
# CLI


def _stage_layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--poe-stage-layers {text!r}: give comma-separated layer counts, e.g. 12,5,4,3")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    a = p.add_argument
    a("--data", default=d.data, help="corpus directory of parquet shards (last shard = validation)")
    a("--tokenizer", default=d.tokenizer, help="tokenizer directory (tokenizer.pkl/json + token_bytes.pt)")
    a("--out", default=d.out, help="run directory (checkpoints, metrics.jsonl, plots)")
    a("--depth", type=int, default=d.depth, help="number of layers (sizes derive from it)")
    a("--n-embd", type=int, default=None, help="width (default: depth x 64 rounded to head_dim)")
    a("--n-head", type=int, default=None)
    a("--n-kv-head", type=int, default=None, help="KV heads (GQA); default n_head")
    a("--head-dim", type=int, default=d.head_dim)
    a("--intermediate-size", type=int, default=None, help="MLP width (default 4 x n_embd)")
    a("--seq-len", type=int, default=d.seq_len)
    a("--window-pattern", default=d.window_pattern)
    a("--short-window", type=int, default=None, help="S window (default seq_len/4 rounded up to 128)")
    a("--poe-mode", default=d.poe_mode, choices=POE_MODES)
    a("--poe-alpha", type=float, default=d.poe_alpha)
    a("--poe-every", type=int, default=None, help="uniform stages of this many layers")
    a("--poe-stage-layers", type=_stage_layers, default=None, help="explicit stage sizes, e.g. 12,5,4,3")
    a("--per-stage-head", action="store_true")
    a("--total-batch-size", type=int, default=d.total_batch_size, help="tokens per optimizer step (all ranks)")
    a("--device-batch-size", type=int, default=d.device_batch_size, help="rows per forward pass per rank")
    a("--num-iterations", type=int, default=d.num_iterations)
    a("--target-tokens", type=int, default=d.target_tokens)
    a("--target-param-data-ratio", type=float, default=d.target_param_data_ratio,
      help="tokens per total parameter (released runs: 20)")
    a("--matrix-lr", type=float, default=d.matrix_lr)
    a("--embedding-lr", type=float, default=d.embedding_lr)
    a("--unembedding-lr", type=float, default=d.unembedding_lr)
    a("--scalar-lr", type=float, default=d.scalar_lr)
    a("--weight-decay", type=float, default=d.weight_decay, help="Muon start weight decay")
    a("--warmup-steps", type=int, default=d.warmup_steps)
    a("--warmdown-frac", type=float, default=d.warmdown_frac)
    a("--final-lr-frac", type=float, default=d.final_lr_frac)
    a("--eval-every", type=int, default=d.eval_every)
    a("--eval-tokens", type=int, default=d.eval_tokens, help="validation token budget (default: 80 x 2^19 on "
      "CUDA, 2^16 on CPU; capped at the validation split)")
    a("--sample-every", type=int, default=d.sample_every)
    a("--save-every", type=int, default=d.save_every, help="0: save only at the end")
    a("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    a("--seed", type=int, default=d.seed)
    a("--device", default=d.device, help="auto, cpu or cuda")
    a("--dtype", default=d.dtype, help="auto (bf16 on capable GPUs, else fp32), fp32 or bf16")
    a("--compile", action="store_true", help="torch.compile the model")
    a("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    a("--quiet", action="store_true")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def cmd_train(args: argparse.Namespace) -> int:
    result = train(config_from_args(args))
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2, default=str))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train a BP or PoE model from scratch (or --resume)")
    add_train_arguments(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)
