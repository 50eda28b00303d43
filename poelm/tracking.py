"""Experiment trackers: what metrics.jsonl logs (loss, per-stage losses, bpb per stage and of the
Log-OP, learning rates, tokens/s, MFU where known) and the run's full config, also sent to
TensorBoard (local event files in RUN/tensorboard) or Weights & Biases (RUN/wandb; offline with
WANDB_MODE=offline), one tracker run per training run (an experiment: one per arm).

    poelm train ... --tracker tensorboard            # or POELM_TRACKER=wandb in the environment
    with open_tracker("tensorboard", "runs/tiny", config) as tracker:
        tracker.log({"type": "train", "step": 1, "loss": 3.2, "stage_losses": [3.4, 3.2]}, step=1)

Neither package is a dependency of poelm: `pip install 'poelm[track]'` brings both.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

TRACKERS = ("none", "tensorboard", "wandb")
ENV = "POELM_TRACKER"
PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb"}


def resolve_tracker(name: str | None) -> str:
    """The tracker to use: `name`, else $POELM_TRACKER, else none; refused when its package is missing."""
    source = "--tracker"
    if name is None:
        name, source = os.environ.get(ENV) or "none", ENV
    if name not in TRACKERS:
        raise ValueError(f"{source}={name!r}: choose one of {', '.join(TRACKERS)}")
    package = PACKAGE.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(f"{source} {name} needs the {package} package, which is not installed: "
                         "pip install 'poelm[track]'")
    return name


def flatten(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as scalar series: "train/loss", "train/stage_losses/0", "eval/bpb",
    "eval/stages/2", "eval/logop", "train/lr/matrix" ...; non-numbers and None are left out."""
    prefix = record.get("type", "metrics")
    out: dict[str, float] = {}

    def put(name: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                put(f"{name}/{k}", v)
        elif isinstance(value, (list, tuple)):
            for k, v in enumerate(value):
                put(f"{name}/{k}", v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)

    for key, value in record.items():
        if key not in ("type", "step"):
            put(f"{prefix}/{key}", value)
    return out


class Tracker:
    """No tracker (--tracker none); the base of the others. A context manager that closes the run."""

    def log(self, record: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TensorBoardTracker(Tracker):
    def __init__(self, out: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, record: dict, step: int) -> None:
        for name, value in flatten(record).items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    def __init__(self, out: Path, config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "poelm"), name=str(out), dir=str(out),
                              config=config, reinit="finish_previous")

    def log(self, record: dict, step: int) -> None:
        self.run.log(flatten(record), step=step)

    def close(self) -> None:
        self.run.finish()


def open_tracker(name: str | None, out: str | Path, config: dict) -> Tracker:
    """The tracker run of a training run in `out` (name None: $POELM_TRACKER, else none)."""
    kind = resolve_tracker(name)
    out = Path(out)
    if kind == "tensorboard":
        return TensorBoardTracker(out, config)
    if kind == "wandb":
        return WandbTracker(out, config)
    return Tracker()
