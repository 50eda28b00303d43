"""Where a computation runs: the device, the dtype and torch.compile, each refused with one
line when this machine cannot give it.

    device = parse_device("auto")          # cuda if visible, else cpu
    dtype = parse_dtype("bf16")            # torch.bfloat16
    check_bf16(device); check_compiler(device)
    choice = set_threads(None)             # torch CPU threads: the free cores (choice.line() says why)

A refusal is a SettingError naming the setting (`device`, `dtype`, `compile`); the command
line prints the same sentence with the flag instead (`--device`, `--no-compile`). A run that
stops itself for a reason that is not bad input (it diverged) raises a RunStopped.
torch is imported only when a function runs.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable
from dataclasses import dataclass

DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


class SettingError(ValueError):
    """A bad value of one setting. Its message names settings as the caller says them: str()
    as Python parameters (`device`, `compile=False`), `render` as the caller says them (the
    CLI: `--device`, `--no-compile`). `say` is either say(name, off) of the one setting or a
    template whose fields are setting names ("{num_iterations} 0 ... from {target_tokens}"),
    except the fields given in `values`, which are put in as they are (paths, numbers: text
    that is never read as a template)."""

    def __init__(self, setting: str, say: Callable[[str, str], str] | str, **values):
        self.setting, self.say, self.values = setting, say, values
        super().__init__(self.render(lambda s: s, lambda s: f"{s}=False"))

    def render(self, name: Callable[[str], str], off: Callable[[str], str]) -> str:
        """The message with each setting s said as name(s) (a boolean turned off: off(s))."""
        if callable(self.say):
            return self.say(name(self.setting), off(self.setting))
        settings = {field for _, field, _, _ in string.Formatter().parse(self.say) if field} - set(self.values)
        return self.say.format_map({**{s: name(s) for s in settings}, **self.values})


class RunStopped(Exception):
    """A run stopped itself for a reason that is not bad input (its loss diverged); what it wrote
    before stays intact. The CLI reports it in one line with exit status 1."""


def parse_dtype(name: str):
    """fp32/bf16/fp16 or torch's names (float32, bfloat16, float16) -> torch.dtype."""
    import torch

    if name not in DTYPES:
        raise SettingError("dtype", lambda n, off: f"{n} {name!r} is not a dtype; use fp32 (float32), bf16 (bfloat16) "
                                                   "or fp16 (float16)")
    return getattr(torch, DTYPES[name])


def parse_device(name: str):
    """auto, cpu, cuda, cuda:N or mps -> torch.device, refusing devices this machine lacks."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SettingError("device", lambda n, off: f"{n} {name!r} is not a device; use cpu, cuda, cuda:N, mps or "
                                                    "auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SettingError("device", lambda n, off: f"{n} {name} but no CUDA GPU is visible; use {n} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise SettingError("device", lambda n, off: f"{n} {name} but only {count} CUDA GPU(s) are visible; "
                                                        f"use {n} cuda:0")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise SettingError("device", lambda n, off: f"{n} {name} but MPS is not available here; use {n} cpu")
    elif device.type != "cpu":
        raise SettingError("device", lambda n, off: f"{n} {name!r} is not supported; use cpu, cuda, cuda:N, mps or "
                                                    "auto")
    return device


def check_bf16(device) -> None:
    """Refuse bf16 on a CUDA GPU without bfloat16 support (the CPU computes it, slowly)."""
    import torch

    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        gpu = torch.cuda.get_device_name(device)
        raise SettingError("dtype", lambda n, off: f"{n} bf16 but {gpu} has no bfloat16 support; use {n} fp32")


def check_compiler(device) -> None:
    """Refuse torch.compile where it cannot work: no dynamo for this Python, no triton (CUDA) or no C++ compiler (CPU)."""
    import importlib.util
    import shutil

    import torch

    if not torch._dynamo.is_dynamo_supported():
        raise SettingError("compile", lambda n, off: f"{n}: torch.compile does not support this Python or platform; "
                                                     f"pass {off}")
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise SettingError("compile", lambda n, off: f"{n} on CUDA needs triton (pip install triton); pass {off} to "
                                                     "run eagerly")
    if device.type == "cpu" and not (os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++"))):
        raise SettingError("compile", lambda n, off: f"{n} on the CPU needs a C++ compiler (g++ or clang++ on PATH, "
                                                     f"or $CXX); pass {off}")


def pin_inductor_vec_isa() -> None:
    """Name the CPU vector ISA inductor compiles for in its config (cpp.simdlen: the bit width it
    would pick anyway, from $ATEN_CPU_CAPABILITY or the CPU) before an inductor compile.

    torch 2.13's FX graph cache leaves the ISA out of its key, while the kernel source it caches
    is written for one vector width and compiled again with the flags of whichever process loads
    it: a graph cached under AVX-512 and loaded with ATEN_CPU_CAPABILITY=avx2 returns NaN logits
    (its kernels load 16 floats into 8-float vectors), and the reverse aborts in malloc. The
    config is part of the key, so a set simdlen keeps each ISA's graphs apart. A simdlen already
    set is kept."""
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    if config.cpp.simdlen is None:
        config.cpp.simdlen = pick_vec_isa().bit_width()


@dataclass(frozen=True)
class ThreadChoice:
    """How many torch CPU threads a command runs with, and why."""

    threads: int
    why: str

    def line(self) -> str:
        return f"torch threads: {self.threads} ({self.why})"


def free_cores() -> tuple[int, float]:
    """(the cores this process may run on, the 1-minute load average of the machine)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks (macOS)
        usable = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return usable, load


def choose_threads(requested: int | None, ceiling: int, reserved: int = 0) -> ThreadChoice:
    """`requested`, else the free cores: the usable cores less the rounded 1-minute load (other
    processes; a process started just now adds none yet) and less `reserved` (cores the command
    keeps for its own work beside the model, e.g. the server's HTTP side), shared among the local
    ranks of a torchrun job, at least 1 and at most `ceiling` (torch's own default:
    OMP_NUM_THREADS or the physical cores)."""
    if requested is not None:
        return ThreadChoice(requested, "--threads")
    usable, load = free_cores()
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    threads = max(1, min(ceiling, (usable - round(load) - reserved) // ranks))
    why = (f"{usable} usable cores, 1-minute load {load:.1f}" + (f", {reserved} kept for the HTTP side" if reserved else "")
           + (f", {ranks} local ranks" if ranks > 1 else ""))
    return ThreadChoice(threads, f"free cores: {why}; pass --threads N to choose")


def set_threads(requested: int | None, reserved: int = 0) -> ThreadChoice:
    """Set torch's CPU threads to choose_threads(requested, reserved=reserved) and return the choice."""
    import torch

    choice = choose_threads(requested, torch.get_num_threads(), reserved)
    torch.set_num_threads(choice.threads)
    return choice
