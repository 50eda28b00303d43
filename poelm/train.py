"""Train a BP or PoE model from scratch: MuonAdamW, the released schedule, best-fit
packed data, bits-per-byte of every stage, atomic checkpoints and exact resume.

    poelm train --data data/default --tokenizer data/tokenizer --out runs/tiny \\
        --depth 4 --n-embd 128 --n-head 2 --seq-len 256 --poe-mode flat --poe-every 1 \\
        --total-batch-size 8192 --device-batch-size 16 --num-iterations 300 --eval-every 100
    torchrun --nproc_per_node 2 -m poelm train ...      # many processes (gloo on CPU, NCCL on GPU)
    torchrun --nproc_per_node K -m poelm train --stage-parallel ...   # one rank per PoE stage
    poelm train ... --resume                            # continue the run in --out exactly

The LR and weight-decay flags are nanochat's d12 / 2^19-token values, scaled per run as in
docs/training.md "Scaling rules" (the start of every run prints the effective values);
`--lr-scaling off` takes them literally (small CPU runs, e.g. the `tiny` experiment preset).

A run directory holds `metrics.jsonl`, `step_NNNNNN/` checkpoints (model directory +
optimizer, loader and RNG state), `latest` (the newest complete checkpoint) and PNG plots.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from poelm.atomic import atomic_write_json
from poelm.checkpoint import (CONFIG_NAME, TRAINER_NAME, WEIGHTS_NAME, build_model, check_tokenizer, load_state_into,
                              read_safetensors)
from poelm.flags import resume_mutable, setting
from poelm.model import ATTENTION_BACKENDS, GPT, GPTConfig
from poelm.optim import LR_SCALING
from poelm.progress import progress
from poelm.rundir import METRICS_NAME, RESULT_NAME, SETTINGS_NAME, MetricsLog, RunDir, set_rng_state
from poelm.runtime import (RunStopped, SettingError, check_bf16, check_compiler, parse_device, parse_dtype,
                           pin_inductor_vec_isa)
from poelm.tracking import TRACKERS, Tracker, open_tracker, resolve_tracker

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@dataclass
class TrainConfig:
    """Every setting of a training run, declared once: `poelm train`'s flags (poelm.cli.train),
    `poelm sft`'s shared ones, an experiment's training settings and the torchrun argv of its
    arms are all generated from these fields; `resume=True` marks the settings a resumed run may
    change (they do not alter the trajectory of the weights). The task's own settings (SFT's:
    poelm.sft.SftSettings) live with the task."""
    data: str = setting("data/default", "corpus directory of parquet shards (last shard = validation)")
    tokenizer: str | None = setting(None, "tokenizer directory (tokenizer.pkl/json + token_bytes.pt)",
                                    shown="none; give it", resume=True)
    out: str = setting("runs/train", "run directory (checkpoints, metrics.jsonl, plots)", resume=True)
    # the model: every architecture and objective field (vocab_size is the tokenizer's); a resume
    # compares it field by field with the checkpoint's own config.json instead
    model: GPTConfig = setting(help="the model (its own flags: GPTConfig's fields)", default_factory=GPTConfig,
                               resume=True)
    init: str | None = setting(None, "MODEL whose weights the run starts from (same architecture; a fresh optimizer "
                                     "and schedule), e.g. an ordinary run's checkpoint")
    # batch and horizon
    total_batch_size: int = setting(2 ** 20, "tokens per optimizer step (all ranks)")
    device_batch_size: int = setting(32, "rows per forward pass per rank")
    num_iterations: int = setting(-1, "optimizer steps; -1 = derive from --target-tokens or "
                                      "--target-param-data-ratio")
    stop_at: int | None = setting(None, "stop after this step, under the learning-rate schedule of the whole "
                                        "horizon (a run cut short; its checkpoint is the one compared)",
                                  shown="the horizon", resume=True)
    target_tokens: int = setting(-1, "training tokens; -1 = use the ratio below")
    target_param_data_ratio: float = setting(20.0, "tokens per total parameter (released runs: 20)")
    # optimizer
    matrix_lr: float = setting(0.02, "Muon lr of the matrices at d12 / 2^19 tokens")
    embedding_lr: float = setting(0.3, "AdamW lr of wte at d12 / 2^19 tokens")
    unembedding_lr: float = setting(0.008, "AdamW lr of lm_head at d12 / 2^19 tokens")
    scalar_lr: float = setting(0.5, "AdamW lr of x0_lambdas at d12 / 2^19 tokens")
    weight_decay: float = setting(0.28, "Muon weight decay at d12 / 2^19 tokens, scaled to this run's start value")
    lr_scaling: str = setting("nanochat", "nanochat: scale LRs and weight decay with batch, width and model size "
                                          "(docs/training.md); off: take them literally, for small CPU runs",
                              choices=LR_SCALING)
    warmup_steps: int = setting(40, "linear learning-rate warmup steps")
    warmdown_frac: float = setting(0.65, "fraction of the run spent warming down")
    final_lr_frac: float = setting(0.05, "learning-rate multiplier at the last step")
    # evaluation, sampling, saving
    eval_every: int = setting(250, "validation bpb every this many steps, 0 = never", resume=True)
    eval_tokens: int | None = setting(None, "validation tokens per evaluation, capped at the split",
                                      shown="80 x 2^19 on CUDA, 2^16 on CPU", resume=True)
    sample_every: int = setting(0, "print a greedy sample every this many steps, 0 = never", resume=True)
    sample_prompt: str = setting("The ", "prompt of those samples", shown=repr("The "), resume=True)
    save_every: int = setting(0, "checkpoint every this many steps, 0 = only at the end", resume=True)
    keep_checkpoints: int = setting(2, "newest checkpoints to keep, 0 = all", resume=True)
    # runtime
    seed: int = setting(42, "seed of the initialisation")
    device: str = setting("auto", "auto (cuda if visible, else cpu), cpu, cuda or cuda:N", resume=True)
    dtype: str = setting("auto", "auto (bf16 on capable GPUs, else fp32), fp32/float32 or bf16/bfloat16", resume=True)
    compile: bool | None = setting(None, "torch.compile the training step",
                                   shown="on for CUDA, off on the CPU", resume=True)
    attention_backend: str = setting("auto", "kernel of the sliding-window layers: auto = flash-attn if installed, "
                                             "else FlexAttention on CUDA; the masked SDPA reference on the CPU",
                                     choices=ATTENTION_BACKENDS, resume=True)
    stage_parallel: bool = setting(False, "under torchrun: one rank per PoE stage (flat), world = stages x "
                                          "data-parallel replicas; only forward activations cross stages "
                                          "(docs/stage_parallel.md)")
    resume: bool = setting(False, "continue the run in --out from its newest complete checkpoint", resume=True)
    extend_to: int | None = setting(None, "with --resume: change the horizon to N steps (recorded)", resume=True)
    quiet: bool = setting(False, "no progress bar or log lines", resume=True)
    tracker: str | None = setting(None, "also log the metrics and the config to TensorBoard (RUN/tensorboard) or "
                                        "Weights & Biases (RUN/wandb; WANDB_MODE=offline works): pip install "
                                        "'poelm[track]'", choices=TRACKERS, shown="$POELM_TRACKER, else none",
                                  resume=True)

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The model of this run with the tokenizer's vocabulary."""
        return dataclasses.replace(self.model, vocab_size=vocab_size)


class NonFiniteLoss(RunStopped):
    """The loss or the weights became non-finite: the run stops (its last good checkpoint is
    intact). Not bad input, so not a ValueError: the CLI says it in one line, exit status 1."""


def check_config(tc: TrainConfig, task: Task | None = None) -> None:
    """Refuse obviously bad settings with one line naming the setting (the CLI says its flag)."""
    if tc.num_iterations == 0 or tc.num_iterations < -1:
        raise SettingError("num_iterations", f"{{num_iterations}} {tc.num_iterations} would train no steps: give a "
                           "step count >= 1, or -1 to derive the horizon from {target_tokens} or "
                           "{target_param_data_ratio}")
    if tc.stop_at is not None and (tc.stop_at < 1 or 0 < tc.num_iterations < tc.stop_at):
        raise SettingError("stop_at", f"{{stop_at}} {tc.stop_at}: give a step between 1 and the horizon "
                           "({num_iterations})")
    if tc.target_tokens == 0 or tc.target_tokens < -1:
        raise SettingError("target_tokens", f"{{target_tokens}} {tc.target_tokens} would train on no tokens: give a "
                           "count >= 1, or -1 to use {target_param_data_ratio}")
    at_least = [("total_batch_size", 1), ("device_batch_size", 1), ("eval_every", 0), ("sample_every", 0),
                ("save_every", 0), ("keep_checkpoints", 0), ("warmup_steps", 0)]
    if tc.eval_tokens is not None:
        at_least.append(("eval_tokens", 1))
    # the model's own fields are checked by GPTConfig itself
    for name, low in at_least:
        value = getattr(tc, name)
        if not value >= low:  # also refuses NaN
            raise SettingError(name, lambda n, off, value=value, low=low: f"{n} {value}: must be >= {low}")
    for name in ("warmdown_frac", "final_lr_frac"):
        value = getattr(tc, name)
        if not 0.0 <= value <= 1.0:
            raise SettingError(name, lambda n, off, value=value: f"{n} {value}: must be between 0 and 1")
    resolve_tracker(tc.tracker)  # its package is installed, before anything starts
    if tc.stage_parallel:
        from poelm.stage_parallel import check_mesh

        check_mesh(tc.model, int(os.environ.get("WORLD_SIZE", 1)), task=task, compile=tc.compile is True)


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
    rt.device = parse_device(tc.device)
    if rt.device.type == "cuda":
        rt.device = torch.device("cuda", rt.local_rank if rt.world > 1 else rt.device.index or 0)
        torch.cuda.set_device(rt.device)
    if rt.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo")
    if tc.dtype == "auto":
        dtype = torch.bfloat16 if rt.device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = parse_dtype(tc.dtype)
    if dtype not in (torch.float32, torch.bfloat16):
        raise SettingError("dtype", lambda n, off: f"{n} {tc.dtype}: training runs in fp32 (float32) or bf16 (bfloat16)")
    if dtype == torch.bfloat16:
        check_bf16(rt.device)
    rt.autocast_dtype = torch.bfloat16 if dtype == torch.bfloat16 else None
    return rt


def use_compile(tc: TrainConfig, device: torch.device) -> bool:
    """--compile / --no-compile, or by default: on for CUDA (not with --stage-parallel); a missing compiler is refused."""
    on = tc.compile if tc.compile is not None else device.type == "cuda" and not tc.stage_parallel
    if on:
        check_compiler(device)
    return on


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# -----------------------------------------------------------------------------
# Checks around checkpoints


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
# Evaluation and samples


@dataclass
class BpbEvaluator:
    """Pretraining's evaluation: bits per byte of the final readout, every stage and the Log-OP
    on fixed validation batches (poelm.sft.ChatEvaluator is SFT's, with the same interface)."""
    val: list
    token_bytes: torch.Tensor
    autocast_dtype: torch.dtype | None = None

    def __call__(self, model: GPT) -> dict:
        from poelm.evaluate import evaluate_bpb

        return evaluate_bpb(model, self.val, self.token_bytes, autocast_dtype=self.autocast_dtype)

    @staticmethod
    def line(step: int, r: dict) -> str:
        stages = " ".join(f"{b:.4f}" for b in r["stages"])
        return f"step {step:>6} | val bpb {r['bpb']:.4f} | stages [{stages}] | log-op {r['logop']:.4f}"


@torch.no_grad()
def greedy_sample(model: GPT, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """A greedy continuation through the inference engine (final readout)."""
    from poelm.engine import Engine

    text = Engine(model, tokenizer).generate(prompt, max_new_tokens=max_new_tokens, stop_token_ids=[]).text
    model.train()  # Engine puts the model in eval mode
    return prompt + text


# -----------------------------------------------------------------------------
# Tasks: what a run trains; the trainer below never asks which one it runs


class Task:
    """A task of the trainer: its model, data loader, horizon and evaluation. Pretraining (a new
    model on a corpus) is `Pretraining` below; SFT (a specialist on chat data) is
    poelm.sft.SftTask. `name` is recorded with the run (a resume must run the same task);
    `settings` holds the task's own settings (a dataclass declared like TrainConfig, or None)."""
    name: str
    data_hint: str  # how to build the --data this task reads
    stage_parallel: bool = False  # whether `--stage-parallel` can train it (poelm.stage_parallel)
    settings: object | None = None

    def record(self) -> dict:
        """What the run records of its task (trainer.json's train_config, compared on resume)."""
        return {"task": self.name, **(dataclasses.asdict(self.settings) if self.settings is not None else {})}

    def resume_mutable(self) -> set[str]:
        """The task's settings a resumed run may change."""
        return resume_mutable(type(self.settings)) if self.settings is not None else set()

    def start(self, tc: TrainConfig, rt: Runtime) -> tuple[object, GPTConfig, int]:
        """(tokenizer, model config, tokens per row), before the batch arithmetic is checked."""
        raise NotImplementedError

    def build(self, tc: TrainConfig, rt: Runtime, config: GPTConfig) -> GPT:
        """The model to train."""
        raise NotImplementedError

    def horizon(self, tc: TrainConfig, rt: Runtime, model: GPT, tokenizer, seq_len: int,
                grad_accum: int) -> tuple[int, str]:
        """(optimizer steps, the line that says which rule set them) of a fresh run."""
        raise NotImplementedError

    def loader(self, tc: TrainConfig, rt: Runtime, tokenizer, seq_len: int, rank: int, world: int,
               state: dict | None):
        """The training batches of this data-parallel rank (resumed from `state`)."""
        raise NotImplementedError

    def evaluator(self, tc: TrainConfig, setup: "RunSetup", rt: Runtime):
        """The run's evaluation (a callable on the model with a `line`); bad validation data fails
        here, before anything is written."""
        raise NotImplementedError

    def begin(self, out: Path) -> None:
        """Write what this task keeps beside the run (rank 0, once the run directory is locked)."""

    def finish(self, tc: TrainConfig, model: GPT, tokenizer, say) -> dict:
        """Results this task adds at the end of the run."""
        return {}


class Pretraining(Task):
    """A new model of tc.model on a corpus (or from --init's weights), bits per byte as evaluation."""
    name = "pretrain"
    data_hint = "a corpus with `poelm data build --out DIR`"
    stage_parallel = True

    def start(self, tc: TrainConfig, rt: Runtime) -> tuple[object, GPTConfig, int]:
        from poelm.tokenizer import Tokenizer

        if not tc.tokenizer:
            raise SettingError("tokenizer", "{tokenizer} DIR is required (train one with `poelm tokenizer train "
                                            "--data DIR --out DIR`)")
        tokenizer = Tokenizer.load(tc.tokenizer)
        config = tc.model_config(tokenizer.vocab_size)
        check_tokenizer(tokenizer, config, tc.tokenizer)
        return tokenizer, config, config.sequence_len

    def build(self, tc: TrainConfig, rt: Runtime, config: GPTConfig) -> GPT:
        model = build_model(config, device=rt.device, init=True)
        if tc.init:  # pretraining from the weights of a model of this architecture (an ordinary checkpoint)
            init_from(model, tc.init)
        return model

    def horizon(self, tc: TrainConfig, rt: Runtime, model: GPT, tokenizer, seq_len: int,
                grad_accum: int) -> tuple[int, str]:
        from poelm.schedule import resolve_horizon

        return resolve_horizon(tc.num_iterations, tc.target_tokens, tc.target_param_data_ratio, model.num_params(),
                               tc.total_batch_size)

    def loader(self, tc: TrainConfig, rt: Runtime, tokenizer, seq_len: int, rank: int, world: int,
               state: dict | None):
        from poelm.dataloader import BestFitLoader

        return BestFitLoader(tc.data, tokenizer, tc.device_batch_size, seq_len, split="train", rank=rank,
                             world_size=world, device=rt.device, state=state)

    def evaluator(self, tc: TrainConfig, setup: "RunSetup", rt: Runtime) -> BpbEvaluator:
        from poelm.dataloader import val_batches

        val = list(val_batches(tc.data, setup.tokenizer, tc.device_batch_size, setup.seq_len, tc.eval_tokens,
                               rank=rt.rank, world_size=rt.world, device=rt.device)) if tc.eval_every > 0 else []
        return BpbEvaluator(val, setup.tokenizer.token_bytes(), rt.autocast_dtype)


# -----------------------------------------------------------------------------
# The run


@dataclass
class RunSetup:
    """What `prepare` builds: everything the training loop needs, fresh or resumed."""
    tokenizer: object
    model: GPT
    optimizer: object
    loader: object
    grad_accum: int
    num_iterations: int
    rule: str  # which rule set the horizon (printed)
    start_step: int
    state: dict  # trainer.json of the resumed checkpoint ({} for a fresh run)
    resumed: bool
    lrs: object  # poelm.optim.EffectiveLRs: what the optimizer was built with
    seq_len: int  # tokens per row
    stage_parallel: object | None = None  # --stage-parallel: this rank's poelm.stage_parallel.StageParallel
    rng: dict | None = None  # resumed: the checkpoint's RNG states, set just before the first step


def prepare(tc: TrainConfig, task: Task, rt: Runtime, run: RunDir) -> RunSetup:
    """Tokenizer, model, optimizer, loader and horizon of a run (fresh or resumed); the
    caller holds the run directory's lock."""
    from poelm.optim import build_optimizer, effective_hparams

    if not Path(tc.data).is_dir():
        raise SettingError("data", "{data} {path} does not exist; build {hint}", path=tc.data, hint=task.data_hint)
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    tokenizer, config, seq_len = task.start(tc, rt)
    mesh = None
    if tc.stage_parallel:
        from poelm.stage_parallel import StageParallel, make_mesh

        mesh = make_mesh(config, rt.rank, rt.world)
    dp_rank, dp_world = (mesh.replica, mesh.replicas) if mesh else (rt.rank, rt.world)  # data parallelism
    tokens_per_micro = tc.device_batch_size * seq_len * dp_world
    if tc.total_batch_size % tokens_per_micro:
        raise SettingError("total_batch_size", lambda n, off: f"{n} {tc.total_batch_size} is not a multiple of "
                           f"device batch x seq len x {'replicas' if mesh else 'ranks'} = {tc.device_batch_size} x "
                           f"{seq_len} x {dp_world} = {tokens_per_micro}")
    grad_accum = tc.total_batch_size // tokens_per_micro
    lrs = effective_hparams(config, tc.total_batch_size, tc)
    model = task.build(tc, rt, config)
    sp = StageParallel(model, mesh) if mesh else None  # keeps only this stage's tensors
    optimizer = build_optimizer(model, lrs)  # SFT: only the specialist's tensors require grad
    if sp:
        optimizer = sp.optimizer(optimizer)
    num_iterations, rule = task.horizon(tc, rt, model, tokenizer, seq_len, grad_accum)
    start_step, loader_state, state, rng = 0, None, {}, None
    point = run.resume_point()
    if point is not None and not tc.resume:
        raise SettingError("resume", "{run} already holds a run (checkpoint {point}); pass {resume} to continue it or "
                           "choose another {out}", run=run.path, point=point.path.name)
    say = print if rt.master and not tc.quiet else (lambda *a, **k: None)
    if tc.resume and point is None:
        say(f"--resume: no checkpoint in {run.path} yet; starting a fresh run", flush=True)
    if tc.extend_to is not None and point is None:
        raise SettingError("extend_to", "{extend_to} N changes the horizon of a run being resumed; this run has no "
                           "checkpoint yet (set the horizon with {num_iterations} instead)")
    if tc.resume and point is not None:
        if point.note:
            say(f"--resume: {point.note}", flush=True)
        state, loader_state, rng = resume_into(run, point, tc, task, rt, tokenizer, config, model, optimizer)
        start_step, num_iterations = state["step"], state["num_iterations"]
        rule = f"horizon: {num_iterations:,} steps (resumed from {point.path.name})"
        if tc.extend_to is not None and tc.extend_to != num_iterations:
            if tc.extend_to < start_step:
                raise SettingError("extend_to", "{extend_to} {steps} is below the checkpoint's step {start}; give a "
                                   "horizon of at least {start} steps", steps=tc.extend_to, start=start_step)
            rule = (f"horizon: {num_iterations:,} -> {tc.extend_to:,} steps (--extend-to, resumed from "
                    f"{point.path.name}; the LR schedule is re-laid over the new horizon)")
            state["extended"] = state.get("extended", []) + [{"at_step": start_step, "from": num_iterations,
                                                              "to": tc.extend_to}]
            num_iterations = state["num_iterations"] = tc.extend_to
    loader = task.loader(tc, rt, tokenizer, seq_len, dp_rank, dp_world, loader_state)
    return RunSetup(tokenizer, model, optimizer, loader, grad_accum, num_iterations, rule, start_step, state,
                    resumed=point is not None and tc.resume, lrs=lrs, seq_len=seq_len, stage_parallel=sp, rng=rng)


def init_from(model: GPT, spec: str) -> None:
    """Copy the weights of MODEL `spec` (a model or run directory) into `model`; same architecture."""
    from poelm.checkpoint import load_model

    start, _ = load_model(spec)
    diff = config_diff(start.config, model.config)
    if diff:
        raise SettingError("init", "{init} {spec} has another architecture ({diff}); give the model settings it was "
                           "trained with", spec=spec, diff="; ".join(diff))
    load_state_into(model, start.state_dict(), spec)


def resume_settings_diff(saved: dict, now: dict, mutable: set[str] | None = None) -> list[tuple[str, object, object]]:
    """(setting, recorded value, value now) of each trajectory setting that differs between the
    run's record and this invocation; `mutable`: those a resume may change (default:
    TrainConfig's fields marked so)."""
    mutable = resume_mutable(TrainConfig) if mutable is None else mutable
    diff = []
    for key in sorted(set(saved) & set(now)):
        if key in mutable:
            continue
        a, b = saved[key], now[key]
        if key == "data" and a and b:
            a, b = os.path.realpath(a), os.path.realpath(b)
        if isinstance(a, list | tuple) or isinstance(b, list | tuple):
            a, b = list(a) if a is not None else None, list(b) if b is not None else None
        if a != b:
            diff.append((key, saved[key], now[key]))
    return diff


def changed_settings_error(path: Path, changed: list[tuple[str, object, object]]) -> SettingError:
    """The refusal of a resume whose trajectory settings differ from the run's record: each
    setting named (the CLI says its flag) with its recorded value and this invocation's."""
    said = "; ".join(f"{{{key}}} {{was_{i}}} (now {{now_{i}}})" for i, (key, _, _) in enumerate(changed))
    values = {k: repr(v) for i, (_, a, b) in enumerate(changed) for k, v in ((f"was_{i}", a), (f"now_{i}", b))}
    hint = " or {extend_to} N to change the horizon" if any(key == "num_iterations" for key, _, _ in changed) else ""
    return SettingError("resume", "{resume}: {path} was started with other settings: " + said + "; resume with the "
                        "run's own settings (see {record})" + hint, path=path, record=path / SETTINGS_NAME,
                        **values)


def resume_into(run: RunDir, point, tc: TrainConfig, task: Task, rt: Runtime, tokenizer, config: GPTConfig,
                model: GPT, optimizer) -> tuple[dict, dict, dict]:
    """Check a checkpoint against this invocation and load it into model/optimizer.
    Returns (trainer state, this rank's loader state, its RNG states: the caller sets them
    last, so nothing that runs while the run is set up draws from them)."""
    from poelm.codec import from_config_json
    from poelm.tokenizer import Tokenizer, has_tokenizer

    ckpt = point.path
    saved_config = from_config_json(run.read_json(ckpt / CONFIG_NAME))
    if saved_config.vocab_size != config.vocab_size:
        raise SettingError("resume", "{resume}: tokenizer {tokenizer} has {vocab} tokens but the model in {ckpt} was "
                           "trained with a {saved}-token tokenizer; pass the run's own tokenizer (it is saved in "
                           "every checkpoint)", tokenizer=tc.tokenizer, vocab=config.vocab_size, ckpt=ckpt,
                           saved=saved_config.vocab_size)
    if has_tokenizer(ckpt) and not same_tokenizer(Tokenizer.load(ckpt), tokenizer):
        raise SettingError("resume", "{resume}: tokenizer {tokenizer} does not match the one {ckpt} was trained with "
                           "(same size, different merges or specials); pass the run's own tokenizer",
                           tokenizer=tc.tokenizer, ckpt=ckpt)
    diff = config_diff(saved_config, config)
    if diff:
        raise SettingError("resume", "{resume}: {ckpt} was trained with another architecture ({diff})", ckpt=ckpt,
                           diff="; ".join(diff))
    shards = run.shards_of(ckpt)
    if shards != rt.world:
        raise SettingError("resume", "{resume}: {ckpt} was written by {shards} process(es), this run has {world}; "
                           "resume with the same number of processes (optimizer state is sharded per rank)",
                           ckpt=ckpt, shards=shards, world=rt.world)
    state = run.read_json(ckpt / TRAINER_NAME)
    saved_settings = state.get("train_config")
    if saved_settings is None and (run.path / SETTINGS_NAME).is_file():  # runs of poelm 0.1
        saved_settings = run.read_json(run.path / SETTINGS_NAME)
    changed = resume_settings_diff(saved_settings or {}, {**dataclasses.asdict(tc), **task.record()},
                                   resume_mutable(TrainConfig) | task.resume_mutable())
    if changed:
        raise changed_settings_error(run.path, changed)
    load_state_into(model, read_safetensors(ckpt / WEIGHTS_NAME), str(ckpt))
    blob = run.read_shard(ckpt)  # on the CPU: RNG states must be; the optimizer moves its state to the params
    optimizer.load_state_dict(blob["optimizer"])
    loader_state = run.read_json(ckpt / f"loader_rank{rt.rank}.json")
    return state, loader_state, blob["rng"]


def train(tc: TrainConfig, task: Task | None = None) -> dict:
    """Run (or resume) training, holding the run directory's lock; returns the final metrics.
    `task` defaults to pretraining; SFT passes poelm.sft.SftTask(SftSettings(...))."""
    task = task or Pretraining()
    check_config(tc, task)
    rt = setup_runtime(tc)
    run = RunDir(tc.out, rt.rank, rt.world)
    with run.locked():
        return run_locked(tc, task, rt, run)


def run_locked(tc: TrainConfig, task: Task, rt: Runtime, run: RunDir) -> dict:
    """The training loop of `train`, inside the run directory's lock."""
    from poelm.schedule import apply_schedules

    setup = prepare(tc, task, rt, run)
    tokenizer, model, optimizer, loader = setup.tokenizer, setup.model, setup.optimizer, setup.loader
    grad_accum, num_iterations, rule, start_step, state = (setup.grad_accum, setup.num_iterations, setup.rule,
                                                           setup.start_step, setup.state)
    lrs = setup.lrs
    sp = setup.stage_parallel
    whole = (lambda: sp.full_model(step)) if sp else (lambda: model)  # the complete model (a collective with sp)
    evaluate = task.evaluator(tc, setup, rt)
    out = run.path
    settings = {**dataclasses.asdict(tc), **task.record(), "model": model.config.to_dict(),  # the model as built
                "effective": dataclasses.asdict(lrs)}
    run_id = f"{os.getpid()}"
    if rt.world > 1:  # one temporary-name suffix for every rank of this run: rank 0's pid
        pid = torch.tensor([os.getpid()])
        dist.broadcast(pid, 0)
        run_id = str(int(pid))
    if rt.master:
        atomic_write_json(out / SETTINGS_NAME, settings)
        task.begin(out)
    log = MetricsLog(out / METRICS_NAME, rt.master, resumed_step=start_step if setup.resumed else None)
    say = (lambda *a: print(*a, flush=True)) if rt.master and not tc.quiet else (lambda *a: None)
    if getattr(run, "stale_lock_pid", None):
        say(f"cleared the stale lock of pid {run.stale_lock_pid} on {out} (that process is gone)")
    if log.moved_to is not None:
        say(f"{out / METRICS_NAME} had no checkpoint to match it: kept as {log.moved_to.name}")
    cfg = model.config
    say(f"model: {cfg.n_layer} layers x {cfg.n_embd} wide, stages {list(cfg.poe_stage_layers)}, "
        f"poe_mode={cfg.poe_mode} alpha={cfg.poe_alpha}, {model.num_params():,} params")
    say(f"batch: {tc.total_batch_size:,} tokens/step = {tc.device_batch_size} x {setup.seq_len} x {rt.world} ranks "
        f"x {grad_accum} accumulation steps; {rule}")
    say(lrs.line())
    if sp:
        from poelm.stage_parallel import balance_line

        say(f"{balance_line(cfg)} x {sp.mesh.replicas} data-parallel replica(s)")
    model.attention_backend = tc.attention_backend
    if use_compile(tc, rt.device):
        pin_inductor_vec_isa()  # inductor's FX graph cache would mix up CPU vector widths (runtime.py)
        train_model = torch.compile(model)
    else:
        train_model = model
    flops_per_step = model.flops_per_token(setup.seq_len) * tc.total_batch_size
    peak = peak_flops(rt.device)
    ema = state.get("ema_loss", 0.0)
    last_eval: dict = state.get("last_eval", {})
    step = start_step
    total_time = state.get("train_seconds", 0.0)
    model.train()

    def trainer_state(step: int) -> dict:
        return {"step": step, "num_iterations": num_iterations, "ema_loss": ema, "last_eval": last_eval,
                "train_seconds": total_time, "model_config": cfg.to_dict(), "train_config": settings,
                **({"extended": state["extended"]} if "extended" in state else {})}

    def do_eval(step: int) -> None:
        nonlocal last_eval
        result = evaluate(whole())
        model.train()
        last_eval = {"step": step, **result}
        log.write({"type": "eval", **last_eval})
        tracker.log({"type": "eval", **result}, step)
        say(evaluate.line(step, result))

    stop = min(tc.stop_at or num_iterations, num_iterations)
    if stop < num_iterations:
        say(f"stopping at step {stop:,} of the {num_iterations:,}-step schedule (--stop-at)")
    with progress(f"train {out.name}", stop, start_step, rt.master and not tc.quiet) as bar, \
            (open_tracker(tc.tracker, out, settings) if rt.master else Tracker()) as tracker:
        if setup.rng is not None:  # the last thing before the first step (imports and set-up may draw)
            set_rng_state(setup.rng)
        while True:
            last = step == stop
            if tc.eval_every > 0 and (step % tc.eval_every == 0 or last) and (step > start_step or step == 0 or last) \
                    and last_eval.get("step") != step:
                do_eval(step)
            if tc.sample_every > 0 and step > 0 and (step % tc.sample_every == 0 or last):
                full = whole()
                if rt.master:
                    say(f"sample: {greedy_sample(full, tokenizer, tc.sample_prompt)!r}")
            if step > start_step and (last or (tc.save_every > 0 and step % tc.save_every == 0)):
                full = whole()
                if not params_finite(full):  # the same weights on every rank: all ranks stop together
                    raise NonFiniteLoss(f"parameters became non-finite before the checkpoint of step {step}; stopping. "
                                        f"The last good checkpoint in {out} is intact (lower the learning rates or "
                                        "check the data)")
                run.save_checkpoint(step, full, optimizer, loader, tokenizer, trainer_state(step),
                                    tc.keep_checkpoints, run_id)
            if last:
                break
            t0 = time.time()
            loss_sum, stage_sum = (0.0, None) if sp is None else sp.accumulate(loader, grad_accum, rt.autocast_dtype)
            for _ in range(grad_accum if sp is None else 0):  # (stage-parallel: the pipeline above)
                x, y = next(loader)  # drawn just before use, so a checkpoint's loader state is exact
                with torch.autocast(rt.device.type, dtype=rt.autocast_dtype, enabled=rt.autocast_dtype is not None):
                    loss, stage_losses = train_model(x, y, return_stage_losses=True)
                (loss / grad_accum).backward()
                loss_sum += loss.detach().float().item() / grad_accum
                stage_sum = stage_losses / grad_accum if stage_sum is None else stage_sum + stage_losses / grad_accum
            if rt.world > 1 and sp is None:  # mean over ranks, so a non-finite loss on any rank stops every rank
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
            if sp:
                record.update(sp.step_metrics(dt, optimizer))
            log.write(record)
            tracker.log({**record, "lr": {k: lrm * v for k, v in dataclasses.asdict(lrs).items()
                                          if isinstance(v, float) and k != "muon_weight_decay"}}, step)
            status = f"loss {debiased:.4f} lr {lrm:.3f} {tok_s:,.0f} tok/s MFU " + (f"{100 * mfu:.1f}%" if mfu else "n/a")
            bar.update(step, status)
    final_loss = ema / (1 - 0.9 ** step) if step > 0 else None
    result = {"step": step, "num_iterations": num_iterations, "train_seconds": total_time, "final_loss": final_loss,
              "eval": last_eval, "out": str(out), "cropped_fraction": getattr(loader, "cropped_fraction", None)}
    result.update(task.finish(tc, model, tokenizer, say))
    if rt.master:
        atomic_write_json(out / RESULT_NAME, result)
        try:
            from poelm.plots import plot_run
            plot_run(out)
        except Exception as e:  # plots are a convenience; never fail a finished run on them
            say(f"(plots skipped: {e})")
    return result
