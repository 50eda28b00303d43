"""Post-hoc specialists on a frozen PoE base (docs/poe.md section 7): attach, freeze, delta files,
cascades and sibling composition.

    from poelm.specialist import attach, trainable_parameters, save_delta, load_delta, load_with_delta, compose
    spec = attach(base, n_layers=2)                  # base weights copied, frozen; new blocks + zero head
    params = trainable_parameters(spec)              # what SFT updates (the new blocks and lm_head_stage)
    save_delta(spec, "out/chat", base_ref="runs/base", base_hash=base_content_hash(base))
    spec = load_delta(base, "out/chat")              # refuses a base whose content hash differs
    spec, tok = load_with_delta("runs/base", "out/chat")   # load_model, then its delta
    comp = compose(base, ["out/chat", "out/code"])   # siblings, Log-OP in one pass over the trunk

    poelm specialist attach BASE --layers 2 --out runs/chat-init [--delta PARENT] [--force]
    poelm specialist save-delta RUN --out out/chat [--base BASE]
    poelm generate BASE --delta out/chat "..." [--head-mode dual|base|spec]
    poelm eval BASE --compose out/chat,out/code --data data/recall    # bits per assistant token

A specialist is a GPT whose config has frozen_layers = the frozen depth (poelm/model.py): its
stages are the base's plus one stage of the new layers, so prefix pruning, WAND and
speculative decoding keep working (draft from a base stage, verify through the specialist).
The base is frozen entirely: every base tensor has requires_grad False and x, x0 are detached
after the last frozen layer, so nothing the SFT optimizer does can reach the base and its
predictions through the base prefix and base head (`base_logits`) stay bit-identical. The
four chat special tokens (<|user_start|>, <|user_end|>, <|assistant_start|>,
<|assistant_end|>; <|bos|> is the base's own) never occurred in pretraining, so their `wte`
rows are still random: `attach` warm-initialises them once (see warm_chat_rows) and then they
stay frozen too. Frozen rows, not trainable ones: with x and x0 detached no gradient reaches
wte at all, and identical rows in every sibling let siblings share the trunk in one pass.

Cascade: attach on a specialist A folds A's head into the base head (lm_head += A.lm_head_stage),
keeps A's blocks frozen and appends the new blocks and a new zero head; backout stays at the
original base's middle layer. A delta (delta.safetensors + delta.json) holds only the tensors a
specialist adds or changes, in bf16: its new blocks, lm_head_stage, wte (the warm rows) and the
extended resid_lambdas / x0_lambdas; delta.json names the base (reference + content hash), the
layer counts, the default head_mode and the parent delta of a cascade.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from poelm.chat import TURN_SPECIALS
from poelm.jsonfile import check_field, read_json_object
from poelm.model import GPT, GPTConfig, HEAD_MODES, init_scale, logop_weight
from poelm.runtime import SettingError
from poelm.tokenizer import SPECIAL_TOKENS

DELTA_WEIGHTS = "delta.safetensors"
DELTA_META = "delta.json"
DELTA_FORMAT = "poelm-specialist-delta-v1"
DELTA_FIX = "re-save the delta with `poelm specialist save-delta`"
BLOCK_NAME = re.compile(r"transformer\.h\.(\d+)\.")
LINEAGE_NAME = "specialist.json"  # beside a specialist's model files: its base and parent delta
WARM_DEVIATION = 0.5  # warm rows sit at this fraction of the median distance of ordinary rows from their mean


def is_specialist(config: GPTConfig) -> bool:
    return config.is_specialist()


def chat_token_ids(vocab_size: int) -> list[int]:
    """Ids of the four chat specials: the specials are the top ids of the vocab (docs/formats.md)."""
    first = vocab_size - len(SPECIAL_TOKENS)
    if first < 1:
        raise ValueError(f"vocab_size {vocab_size} has no room for the {len(SPECIAL_TOKENS)} special tokens")
    return [first + SPECIAL_TOKENS.index(s) for s in TURN_SPECIALS]


# -----------------------------------------------------------------------------
# Attach and freeze


def specialist_config(parent: GPTConfig, n_layers: int) -> GPTConfig:
    """parent (a base or a specialist) + n_layers new layers as one more stage."""
    d = parent.to_dict()
    d.update(n_layer=parent.n_layer + n_layers, frozen_layers=parent.n_layer, poe_every=None,
             base_n_layer=parent.base_n_layer if parent.frozen_layers else parent.n_layer,
             poe_stage_layers=list(parent.poe_stage_layers) + [n_layers], head_mode="dual")
    return GPTConfig.from_dict(d)


@torch.no_grad()
def warm_chat_rows(wte: torch.Tensor, vocab_size: int) -> None:
    """Move the chat specials' rows (never trained: random directions the base has never seen)
    into the base's input distribution: the mean of the ordinary token rows plus each row's own
    offset from it, rescaled to WARM_DEVIATION x the median offset of the ordinary rows. The
    mean keeps the base's input in distribution; the own offsets keep the four rows distinct so
    that the new layers can tell the tokens apart. Deterministic: every sibling gets the same rows."""
    ordinary = wte[: vocab_size - len(SPECIAL_TOKENS)].float()  # (n, d)
    mean = ordinary.mean(0)
    typical = (ordinary - mean).norm(dim=1).median()
    for i in chat_token_ids(vocab_size):
        offset = wte[i].float() - mean
        row = mean + offset * (WARM_DEVIATION * typical / offset.norm().clamp_min(1e-12))
        wte[i] = row.to(torch.bfloat16).to(wte.dtype)  # bf16 values: the bf16 delta holds them exactly


def planned_config(parent: GPTConfig, n_layers: int, source: str | None = None, device="cpu") -> GPTConfig:
    """specialist_config, refused when it is no valid config or cannot fit on device: naming
    `source` (where n_layers was read), else the setting n_layers (the CLI says --layers)."""
    from poelm.memory import fit_problem

    try:
        config = specialist_config(parent, n_layers)
    except ValueError as e:
        config, problem = None, str(e)
    else:
        problem = fit_problem(config, device)
    if problem is None:
        return config
    if source is None:
        raise SettingError("n_layers", "{n_layers} {n}: {problem}", n=n_layers, problem=problem)
    raise ValueError(f"{source}: {problem}")


def attach(base: GPT, n_layers: int, force: bool = False, source: str | None = None) -> GPT:
    """A specialist on `base`: base weights copied exactly, n_layers new blocks (no value
    embeddings, resid_lambda 1, x0_lambda 0, projections zero so they start as the identity) and
    a zero lm_head_stage, so the new model starts out predicting exactly what the base does (up
    to the warm chat rows). A base that is a specialist makes a cascade (its head folded into
    lm_head). Everything but the new blocks and lm_head_stage is frozen. A BP base is refused
    unless force (docs/poe.md section 6). source names where n_layers came from in errors (default:
    the setting n_layers)."""
    if not isinstance(n_layers, int) or n_layers < 1:
        raise SettingError("n_layers", lambda n, off: f"{n} {n_layers}: a specialist needs at least 1 new layer")
    if not base.config.is_poe() and not force:
        raise ValueError("the base is a BP model (poe_mode=none): a specialist reads out its frozen stages, which BP "
                         "never trained to predict (docs/poe.md section 6); pass --force (force=True) to attach anyway")
    if base.config.per_stage_head or base.config.final_readout != "last":
        raise ValueError("attach needs a base without per-stage heads whose final readout is its last stage "
                         f"(this one: per_stage_head={base.config.per_stage_head}, "
                         f"final_readout={base.config.final_readout})")
    ref = base.lm_head.weight
    config = planned_config(base.config, n_layers, source, ref.device)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device=ref.device)
    model.to(ref.dtype)
    F = base.config.n_layer
    with torch.no_grad():
        own = base.state_dict()
        for name, t in model.state_dict().items():
            if name in own and own[name].shape == t.shape:
                t.copy_(own[name])
        model.resid_lambdas[:F] = base.resid_lambdas
        model.resid_lambdas[F:] = 1.0
        model.x0_lambdas[:F] = base.x0_lambdas
        model.x0_lambdas[F:] = 0.0
        for block in model.transformer.h[F:]:
            block.init_weights(init_scale(config))
        nn.init.zeros_(model.lm_head_stage.weight)
        if base.config.frozen_layers:  # cascade: the parent's head becomes part of the base head
            model.lm_head.weight.copy_(base.lm_head.weight + base.lm_head_stage.weight)
        else:
            warm_chat_rows(model.transformer.wte.weight, config.vocab_size)
    model.rotary_cos = torch.empty(0, device=ref.device)
    model._rotary_len = 0
    freeze(model)
    return model.train(base.training)


def is_trainable(config: GPTConfig, name: str) -> bool:
    """Whether a specialist's parameter is one SFT updates: a new block's or lm_head_stage."""
    if name == "lm_head_stage.weight":
        return True
    if name.startswith("transformer.h."):
        return int(name.split(".")[2]) >= config.frozen_layers
    return False


def freeze(model: GPT) -> None:
    """requires_grad False on every tensor but the new blocks and lm_head_stage."""
    if not model.config.is_specialist():
        raise ValueError("freeze needs a specialist (frozen_layers > 0); use attach")
    for name, p in model.named_parameters():
        p.requires_grad_(is_trainable(model.config, name))


def trainable_parameters(model: GPT) -> dict[str, nn.Parameter]:
    """name -> parameter of everything SFT updates (the new blocks and lm_head_stage)."""
    return {name: p for name, p in model.named_parameters() if is_trainable(model.config, name)}


def base_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """(B, T, V) the base model's prediction: the frozen layers only, read out through the base
    head (lm_head, backout as the base had it). Bit-identical to the base's own logits."""
    cfg = model.config
    x = x0 = model.embed(idx)
    x, kept = model.run_layers(x, x0, idx, 0, cfg.frozen_layers, keep={cfg.backout_layer})
    return model.readout(x, None, kept.get(cfg.backout_layer), head_mode="base")


def with_head_mode(model: GPT, head_mode: str, name: str = "head_mode") -> GPT:
    """Set the readout of a specialist's last stage; a model without lm_head_stage refuses
    (a SettingError naming the setting `name`: the parameter, which the CLI says as --head-mode,
    or the server's request field)."""
    if head_mode not in HEAD_MODES:
        raise SettingError(name, lambda n, off: f"{n} {head_mode!r} is not one of {', '.join(HEAD_MODES)}")
    try:
        model.config = replace(model.config, head_mode=head_mode)
    except ValueError as e:
        raise SettingError(name, lambda n, off, e=e: f"{n} {head_mode}: {e}") from None
    return model


# -----------------------------------------------------------------------------
# Delta files


def base_content_hash(model: GPT) -> str:
    """sha256 over every tensor of the state dict: sorted names, each name, shape and its
    values rounded to bf16 (so fp32 and bf16 loads of the same bf16 release agree)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().to(torch.bfloat16).cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def delta_names(model: GPT) -> list[str]:
    """The tensors a specialist adds or changes, in state-dict order."""
    F = model.config.frozen_layers
    changed = ("lm_head_stage.weight", "transformer.wte.weight", "resid_lambdas", "x0_lambdas")
    return [name for name in model.state_dict()
            if name in changed or (name.startswith("transformer.h.") and int(name.split(".")[2]) >= F)]


def delta_size(model: GPT) -> tuple[int, int]:
    """(tensors, bytes in bf16) of the delta; works on the meta device."""
    state = model.state_dict()
    names = delta_names(model)
    return len(names), sum(state[n].numel() * 2 for n in names)


def check_delta_out(out_dir: str | os.PathLike, sources: tuple = (), overwrite: bool = False) -> None:
    """Refuse an --out that is not new, empty or a previous delta (poelm.checkpoint.check_replaceable)."""
    from poelm.checkpoint import check_replaceable
    from poelm.outputs import DELTA_KIND

    check_replaceable(out_dir, sources=sources, overwrite=overwrite, kinds=(DELTA_KIND,))


def save_delta(model: GPT, out_dir: str | os.PathLike, base_ref: str, base_hash: str, parent: str | None = None,
               overwrite: bool = False) -> Path:
    """Write delta.safetensors (the delta_names tensors in bf16), delta.json and the output
    marker into out_dir (a temporary directory renamed into place; an existing out_dir must be
    a previous delta unless `overwrite`). parent: the parent delta's directory (cascade),
    recorded relative to out_dir."""
    from safetensors.torch import save_file

    from poelm.atomic import atomic_dir, atomic_path, atomic_write_json
    from poelm.outputs import DELTA_KIND, mark_output

    cfg = model.config
    if not cfg.is_specialist():
        raise ValueError("save-delta needs a specialist (frozen_layers > 0); attach one first")
    if (parent is None) != (cfg.frozen_layers == cfg.base_n_layer):
        raise ValueError(f"a specialist with {cfg.frozen_layers} frozen layers on a base of {cfg.base_n_layer} "
                         f"{'is a cascade and needs its parent delta' if parent is None else 'has no parent delta'}")
    out_dir = Path(out_dir)
    check_delta_out(out_dir, overwrite=overwrite)
    state = model.state_dict()
    tensors = {n: state[n].detach().to(torch.bfloat16).cpu().contiguous() for n in delta_names(model)}
    meta = {"format": DELTA_FORMAT, "base": str(base_ref), "base_hash": base_hash,
            "frozen_layers": cfg.frozen_layers, "base_n_layer": cfg.base_n_layer,
            "new_layers": cfg.n_layer - cfg.frozen_layers, "head_mode": cfg.head_mode,
            "parent": os.path.relpath(Path(parent).resolve(), out_dir.resolve()) if parent else None,
            "tensors": list(tensors), "config": cfg.to_dict()}
    with atomic_dir(out_dir) as tmp:
        with atomic_path(tmp / DELTA_WEIGHTS) as path:
            save_file(tensors, path, metadata={"format": "pt", "base_hash": base_hash})
        atomic_write_json(tmp / DELTA_META, meta)
        mark_output(tmp, DELTA_KIND)
    return out_dir


def read_delta_meta(delta_dir: str | os.PathLike) -> dict:
    """delta.json of delta_dir (a bounded read), every field save_delta writes checked."""
    path = Path(delta_dir) / DELTA_META
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {delta_dir} is not a specialist delta directory")
    meta = read_json_object(path, f"a {DELTA_FORMAT} file", DELTA_FIX)
    if meta.get("format") != DELTA_FORMAT:
        raise ValueError(f"{path} is not a {DELTA_FORMAT} file (its field 'format' is not {DELTA_FORMAT!r}); "
                         f"{DELTA_FIX}")
    for name in ("base", "base_hash"):
        check_field(meta, name, str, path, DELTA_FIX)
    for name in ("frozen_layers", "base_n_layer", "new_layers"):
        check_field(meta, name, int, path, DELTA_FIX, low=1)
    check_field(meta, "head_mode", str, path, DELTA_FIX, required=False, choices=HEAD_MODES)
    check_field(meta, "parent", str, path, DELTA_FIX, required=False)
    return meta


def delta_layers(path: Path) -> list[int]:
    """Indices of the blocks a delta.safetensors holds, from its header alone (no tensor is read)."""
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a delta directory needs its weights ({DELTA_WEIGHTS})")
    try:
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
    except Exception as e:  # truncated or foreign files raise assorted errors
        raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}); {DELTA_FIX}") from None
    return sorted({int(m.group(1)) for m in map(BLOCK_NAME.match, names) if m})


def load_with_delta(spec: str, delta_dir: str | os.PathLike | None, **load_kw) -> tuple[GPT, object]:
    """(model, tokenizer) of MODEL `spec` (poelm.checkpoint.load_model with `load_kw`), with the
    specialist of `delta_dir` rebuilt on it when one is given (in eval mode)."""
    from poelm.checkpoint import load_model

    model, tokenizer = load_model(spec, **load_kw)
    if delta_dir is not None:
        model = load_delta(model, delta_dir).eval()
    return model, tokenizer


def load_delta(base: GPT, delta_dir: str | os.PathLike, base_hash: str | None = None) -> GPT:
    """The specialist of delta_dir rebuilt on `base` (its parent deltas first, for a cascade).
    The base must be the one the delta was made for (content hash). Weights come back as the
    bf16 values the delta holds; the base's own tensors (and the base rows of wte and of the
    lambdas) are the base's, untouched. delta.json is checked against the base and against the
    header of delta.safetensors before a layer is built. A base on the meta device (its config
    alone) gives the specialist on the meta device after those checks: no tensor is read and the
    content hash, which needs the base's weights, is left to the load that has them."""
    on_meta = base.lm_head.weight.is_meta
    return _load_delta(base, Path(delta_dir), None if on_meta else base_hash or base_content_hash(base), ())


def _load_delta(base: GPT, delta_dir: Path, have: str | None, children: tuple[Path, ...]) -> GPT:
    """have: the base's content hash (None: a base on the meta device, not checked)."""
    meta = read_delta_meta(delta_dir)
    path = delta_dir / DELTA_META
    if have is not None and have != meta["base_hash"]:
        raise ValueError(f"{delta_dir} is a delta for base {meta['base']} ({meta['base_hash']}) but the given base "
                         f"hashes to {have}; load it onto {meta['base']}")
    parent = base
    if meta.get("parent"):
        chain = children + (delta_dir.resolve(),)
        target = (delta_dir / meta["parent"]).resolve()
        if target in chain:
            raise ValueError(f"{path}: field 'parent' {meta['parent']!r} leads back to {target}, a delta of this "
                             "cascade (a cycle); set it to the parent delta's directory, relative to this one, or "
                             "null for a delta on the base")
        parent = _load_delta(base, delta_dir / meta["parent"], have, chain)
    pcfg = parent.config
    gives = (pcfg.n_layer, pcfg.base_n_layer if pcfg.frozen_layers else pcfg.n_layer)
    if (meta["frozen_layers"], meta["base_n_layer"]) != gives:
        raise ValueError(f"{path}: fields frozen_layers={meta['frozen_layers']}, base_n_layer={meta['base_n_layer']} "
                         f"disagree with its base's {gives[0]}, {gives[1]}; load it onto the base it was made for")
    new = meta["new_layers"]
    layers = delta_layers(delta_dir / DELTA_WEIGHTS)
    if layers != list(range(gives[0], gives[0] + new)):
        raise ValueError(f"{path}: field 'new_layers' is {new} but {DELTA_WEIGHTS} holds {len(layers)} new layer(s); "
                         f"{DELTA_FIX}")
    # a delta on a BP base was forced when it was made
    model = attach(parent, new, force=True, source=f"{path} new_layers={new}")
    if not model.lm_head.weight.is_meta:  # the meta device holds no weights to put in
        _put_delta_weights(model, delta_dir / DELTA_WEIGHTS)
    return with_head_mode(model, meta.get("head_mode") or "dual")


def _put_delta_weights(model: GPT, path: Path) -> None:
    """Copy a delta.safetensors into the specialist `model` just attached: every tensor it names
    (checked against delta_names and their shapes), of wte only the chat rows and of the
    lambdas only the new layers'."""
    from poelm.checkpoint import check_finite, read_safetensors

    cfg = model.config
    state = read_safetensors(path)
    expected = delta_names(model)
    own = model.state_dict()
    if sorted(state) != sorted(expected) or any(state[n].shape != own[n].shape for n in expected):
        raise ValueError(f"{path} does not hold this specialist's tensors "
                         f"({len(state)} found, {len(expected)} expected: {', '.join(expected[:3])} ...)")
    check_finite(state, str(path))
    F, rows = cfg.frozen_layers, chat_token_ids(cfg.vocab_size)
    with torch.no_grad():
        for name in expected:
            t = state[name].to(own[name].dtype)
            if name == "transformer.wte.weight":
                own[name][rows] = t[rows]
            elif name in ("resid_lambdas", "x0_lambdas"):
                own[name][F:] = t[F:]
            else:
                own[name].copy_(t)


# -----------------------------------------------------------------------------
# Lineage (what save-delta needs to know about a trained specialist)


def lineage(base_ref: str, base_hash: str, parent: str | None = None) -> dict:
    return {"base": str(base_ref), "base_hash": base_hash,
            "parent": str(Path(parent).resolve()) if parent else None}


def write_lineage(model_dir: str | os.PathLike, info: dict) -> None:
    """specialist.json beside a model (its output marker, if any, follows) or in a run directory."""
    from poelm.atomic import atomic_write_json
    from poelm.outputs import amending

    with amending(model_dir, LINEAGE_NAME):
        atomic_write_json(Path(model_dir) / LINEAGE_NAME, info)


def read_lineage(path: Path) -> dict:
    """specialist.json (a bounded read), its fields checked."""
    fix = "it needs base and base_hash (strings) and parent (a delta directory or null), as `poelm specialist attach` writes it"
    info = read_json_object(path, "a specialist lineage file", fix)
    return {"base": check_field(info, "base", str, path, fix), "base_hash": check_field(info, "base_hash", str, path, fix),
            "parent": check_field(info, "parent", str, path, fix, required=False)}


def find_lineage(*dirs: Path | None) -> dict | None:
    for d in dirs:
        if d is not None and (Path(d) / LINEAGE_NAME).exists():
            return read_lineage(Path(d) / LINEAGE_NAME)
    return None


# -----------------------------------------------------------------------------
# Siblings composed by Log-OP


class Composition:
    """Sibling specialists that share their frozen trunk (same base, same parent), evaluated
    in one pass over the trunk: each branch runs only its own new layers and head, and the
    composition is the renormalised Log-OP of the branches' readouts, weight logop_weight(n, alpha)."""

    def __init__(self, branches: list[GPT], names: list[str] | None = None, alpha: float = 0.0):
        if len(branches) < 2:
            raise ValueError("--compose needs at least two specialist deltas, comma separated")
        trunk = branches[0]
        F = trunk.config.frozen_layers
        if any(not b.config.is_specialist() or b.config.frozen_layers != F for b in branches):
            raise ValueError(f"composed specialists must share the same frozen trunk of {F} layers")
        own = trunk.state_dict()
        for b in branches[1:]:
            for name, t in b.state_dict().items():
                if not is_trainable(b.config, name) and name not in ("lm_head_stage.weight", "resid_lambdas",
                                                                      "x0_lambdas") and not torch.equal(t, own[name]):
                    raise ValueError(f"composed specialists must share their trunk; {name} differs")
        self.branches, self.alpha = branches, alpha
        self.names = names or [f"branch {i}" for i in range(len(branches))]

    def branch_logits(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Each branch's final readout (B, T, V), the trunk run once."""
        trunk = self.branches[0]
        cfg = trunk.config
        x = x0 = trunk.embed(idx)
        x, kept = trunk.run_layers(x, x0, idx, 0, cfg.frozen_layers, keep={cfg.backout_layer})
        x_mid = kept.get(cfg.backout_layer)
        out = []
        for b in self.branches:
            xb, _ = b.run_layers(x, x0, idx, cfg.frozen_layers, b.config.n_layer)
            out.append(b.readout(xb, None, x_mid))
        return out

    def logits(self, idx: torch.Tensor, branch_logits: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, T, V) log-probs of the renormalised Log-OP of the branches."""
        zs = branch_logits if branch_logits is not None else self.branch_logits(idx)
        s = logop_weight(len(zs), self.alpha) * sum(z.log_softmax(-1) for z in zs)
        return s.log_softmax(-1)


def compose(base: GPT, delta_dirs: list[str], alpha: float = 0.0) -> Composition:
    """Load sibling deltas onto one base (hashed once) and compose them."""
    h = base_content_hash(base)
    branches = [load_delta(base, d, h).eval() for d in delta_dirs]
    return Composition(branches, [str(d) for d in delta_dirs], alpha)


@torch.no_grad()
def bits_per_assistant_token(comp: Composition, batches) -> dict:
    """Bits per assistant token (targets >= 0) of every branch and of the composition, over
    (inputs, targets) batches such as poelm.chatdata.chat_batches(..., split="val")."""
    nats = torch.zeros(len(comp.branches) + 1, dtype=torch.float64)
    count = 0
    for inputs, targets in batches:
        zs = comp.branch_logits(inputs)
        valid = targets >= 0
        tgt = targets.clamp(min=0).unsqueeze(-1)
        for k, logp in enumerate([z.log_softmax(-1) for z in zs] + [comp.logits(inputs, zs)]):
            nats[k] += -(logp.gather(-1, tgt).squeeze(-1) * valid).sum().double()
        count += int(valid.sum())
    if count == 0:
        raise ValueError("the chat data has no assistant tokens to score")
    bits = (nats / count / math.log(2)).tolist()
    return {"unit": "bits per assistant token", "branches": dict(zip(comp.names, bits[:-1])),
            "composition": bits[-1], "assistant_tokens": count}


@torch.no_grad()
def generate_composed(comp: Composition, tokens: list[int], max_new_tokens: int, temperature: float = 0.0,
                      stop: int | None = None, seed: int | None = None) -> list[int]:
    """Plain (uncached) decoding from the composition: greedy, or sampling at `temperature`."""
    from poelm.engine.sampling import tempered

    device = comp.branches[0].lm_head.weight.device
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    out = list(tokens)
    limit = comp.branches[0].config.sequence_len
    for _ in range(max_new_tokens):
        idx = torch.tensor([out[-limit:]], device=device)
        logp = comp.logits(idx)[0, -1]
        if temperature > 0:
            nxt = int(torch.multinomial(tempered(logp, temperature).softmax(-1), 1, generator=gen))
        else:
            nxt = int(logp.argmax())
        out.append(nxt)
        if nxt == stop:
            break
    return out[len(tokens):]
