"""Whether a model fits before it is built: the bytes a GPTConfig implies, by arithmetic (its
parameters in float32, the dtype every model is built in before a cast, and its rotary tables),
against the memory its device has available. A config file that asks for a model no machine
holds is refused in one line naming the file and its size fields, in microseconds, instead of
minutes of building and a traceback from the allocator.

    from poelm.memory import check_fits
    check_fits(config, "out/model/config.json", device="cpu")
"""

from __future__ import annotations

import torch

from poelm.model import GPTConfig

FLOAT32_BYTES = 4
# where the platform reports no available memory: refuse only what no machine could hold
FALLBACK_AVAILABLE = 2 ** 40
UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
SIZE_FIELDS = ("n_layer", "n_embd", "intermediate_size", "vocab_size", "sequence_len")


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Free memory of a CUDA device, else the host's MemAvailable (Linux /proc/meminfo), else FALLBACK_AVAILABLE."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return FALLBACK_AVAILABLE


def implied_bytes(config: GPTConfig) -> int:
    """Bytes the model of `config` takes once built and run: float32 parameters and rotary tables."""
    return FLOAT32_BYTES * (config.num_params() + config.rotary_numel())


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; any size prints (past EiB as 'more than')."""
    if n >= 1024 ** len(UNITS):
        return f"more than 1,024 {UNITS[-1]}"
    k = max(0, (n.bit_length() - 1) // 10)
    return f"{n / 1024 ** k:,.1f} {UNITS[k]}"


def fit_problem(config: GPTConfig, device: torch.device | str = "cpu") -> str | None:
    """Why the model of `config` does not fit in the memory its device has available (naming
    the size fields), or None; the meta device holds no data and always fits."""
    if torch.device(device).type == "meta":
        return None
    need, have = implied_bytes(config), available_bytes(device)
    if need <= have:
        return None
    sizes = ", ".join(f"{name}={getattr(config, name)}" for name in SIZE_FIELDS)
    return (f"{sizes} imply {format_bytes(need)} of float32 weights and rotary tables, more than the "
            f"{format_bytes(have)} of memory available on {torch.device(device)}; fix those fields or load it on a "
            "device with more memory")


def check_fits(config: GPTConfig, source: str, device: torch.device | str = "cpu") -> None:
    """Refuse (ValueError naming `source`, then fit_problem's sentence) a model larger than the
    memory its device has available."""
    problem = fit_problem(config, device)
    if problem is not None:
        raise ValueError(f"{source}: {problem}")
