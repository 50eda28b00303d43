"""The models a server holds: one base in memory and its specialists by model id.

    registry = load_models("runs/base", deltas={"chat": "out/chat"})   # ids: base, base+chat
    served = registry.get("base+chat")                                 # -> ServedModel (404 if unknown)
    served.engine, served.variant("spec")                              # head_mode variants share weights

A specialist is rebuilt on the base with poelm.specialist.load_delta, which copies the base
tensors; `share_base` then points every specialist tensor that is bit-identical to the base's
at the base's own tensor, so the frozen trunk (blocks, lm_head, value embeddings) exists once
in memory whatever the number of specialists. What a delta changes (its new blocks,
lm_head_stage, wte with its warm chat rows, the extended lambdas) stays the specialist's own.

    load_models("runs/base", deltas, device="meta")    # configs, tokenizer, calibration: no weights

On the meta device (the HTTP process beside an engine process, which never runs a model) each
model is its config alone, every parameter without storage: enough to check requests, tokenise
and answer /v1/models. A delta's base hash needs the weights: the engine process checks it.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from poelm.engine import Engine
from poelm.model import GPT

MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class ServedModel:
    id: str
    engine: Engine
    delta: str | None = None  # the delta directory of a specialist
    created: int = field(default_factory=lambda: int(time.time()))
    _variants: dict = field(default_factory=dict)

    @property
    def model(self) -> GPT:
        return self.engine.model

    def variant(self, head_mode: str | None) -> GPT:
        """The model read out with head_mode (None: its own); parameters shared with the model."""
        if head_mode is None or head_mode == self.model.config.head_mode:
            return self.model
        if head_mode not in self._variants:
            from poelm.specialist import with_head_mode

            self._variants[head_mode] = with_head_mode(copy.copy(self.model), head_mode, "poe.head_mode")  # same tensors
        return self._variants[head_mode]

    def card(self) -> dict:
        cfg = self.model.config
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "poelm",
                "max_model_len": cfg.sequence_len,  # vLLM's name for the context
                "poe": {"poe_mode": cfg.poe_mode, "stages": cfg.n_stages, "layers": cfg.n_layer,
                        "context": cfg.sequence_len, "specialist": self.delta is not None,
                        "wand_calibrated": self.engine.calibration is not None}}


class ModelRegistry:
    def __init__(self, models: list[ServedModel], loading: bool = False):
        """loading: the models are still being loaded (`loaded` ends it); requests get 503 until then."""
        self.models = {m.id: m for m in models}
        self.loading = loading

    def loaded(self, other: ModelRegistry) -> None:
        """Take the models of `other` (loaded in the background) and start answering."""
        self.models, self.loading = other.models, False

    def first(self) -> ServedModel:
        """The base model (the one a request that names none is for)."""
        self.check_loaded()
        return next(iter(self.models.values()))

    def check_loaded(self) -> None:
        from poelm.serve.protocol import ApiError

        if self.loading:
            raise ApiError(503, "the server is still loading its models; retry shortly", retry_after=1)

    def get(self, model_id: str) -> ServedModel:
        from poelm.serve.protocol import ApiError

        self.check_loaded()
        if model_id not in self.models:
            raise ApiError(404, f"model {model_id!r} does not exist; this server has {', '.join(self.models)}",
                           param="model", code="model_not_found")
        return self.models[model_id]


def share_base(spec: GPT, base: GPT) -> int:
    """Point each tensor of `spec` that equals (same name, shape, dtype and values) the base's at
    the base's tensor -> the number of tensors now shared. Frozen, so sharing is safe."""
    own = dict(base.named_parameters())
    shared = 0
    for module_name, module in spec.named_modules():
        for name, p in list(module._parameters.items()):
            full = f"{module_name}.{name}" if module_name else name
            b = own.get(full)
            if p is None or b is None or b.shape != p.shape or b.dtype != p.dtype or b.data_ptr() == p.data_ptr():
                continue
            if torch.equal(b, p):
                module._parameters[name] = b
                shared += 1
    return shared


def parse_deltas(items: list[str]) -> dict[str, str]:
    """["chat=out/chat", ...] -> {"chat": "out/chat"} (one line per bad item)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep or not name or not directory:
            raise ValueError(f"--delta {item!r}: give NAME=DIR, e.g. --delta chat=out/chat")
        if not MODEL_ID.match(name):
            raise ValueError(f"--delta {item!r}: NAME must be letters, digits, '.', '_' or '-' (at most 64)")
        if name in out:
            raise ValueError(f"--delta {name} is given twice; each specialist needs its own NAME")
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"--delta {item!r}: {directory} is not a directory")
        out[name] = directory
    return out


def load_models(spec: str, deltas: dict[str, str] | None = None, name: str | None = None, device="cpu") -> ModelRegistry:
    """MODEL as `name` (default: its directory name) and each delta as `name+NAME`; on device
    "meta", their configs alone (no weight is read, a delta's base hash is not checked)."""
    from poelm.checkpoint import load_model, model_dir, on_meta
    from poelm.engine import load_calibration
    from poelm.specialist import base_content_hash, load_delta

    base_id = name or Path(str(spec).rstrip("/")).name or "model"
    if not MODEL_ID.match(base_id):
        raise ValueError(f"--name {base_id!r}: a model id is letters, digits, '.', '_' or '-' (at most 64)")
    model, tokenizer = load_model(spec, device=device)
    if tokenizer is None:
        raise ValueError(f"MODEL {spec} has no tokenizer; the server speaks text and needs one")
    directory = model_dir(str(spec))
    calibration = load_calibration(directory) if directory is not None else None
    served = [ServedModel(base_id, Engine(model, tokenizer, calibration))]
    weights = not on_meta(device)
    base_hash = base_content_hash(model) if deltas and weights else None
    for delta_name, delta_dir in (deltas or {}).items():
        spec_model = load_delta(model, delta_dir, base_hash).eval()
        if weights:
            share_base(spec_model, model)
        served.append(ServedModel(f"{base_id}+{delta_name}", Engine(spec_model, tokenizer), delta=str(delta_dir)))
    return ModelRegistry(served)
