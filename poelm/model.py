"""The Cognica / nanochat GPT cut into Product-of-Experts stages: one definition for
training, native inference and the Hugging Face remote code.

    from poelm.model import GPT, GPTConfig
    model = GPT(GPTConfig(n_layer=4, n_embd=128, n_head=2, vocab_size=512, sequence_len=256))
    model.init_weights()
    loss = model(idx, targets)                       # the loss of config.poe_mode
    logits, stage_logits = model(idx, return_stage_logits=True)

Architecture (docs/model.md): weightless RMSNorm, smear (bigram mix of the
previous token's normed embedding), x0 blend before every block, rotary + QK-norm
attention with sliding windows ("SSSL", last layer always L), value embeddings on
alternating layers, relu^2 MLP, backout of the middle residual, soft-capped logits.
The layers are cut into K consecutive stages; every stage boundary has a readout through
the shared `lm_head` (plus an optional per-stage head). The final readout is a recorded
setting (`final_readout`, `backout`): the last stage's head, with or without backout, or the
Log-OP of all stages (what the PoE fork's per-stage-head models return). Training objectives
are those of docs/poe.md §1. The cached path (`KVCache`, `embed`, `run_layers`, `readout`) runs any layer
range on any chunk of positions, which the engine uses for pruning, WAND and
self-speculative decoding. A post-hoc specialist (config.frozen_layers > 0, built by
poelm/specialist.py) is the same model with new layers after its frozen base, one more
stage, and `lm_head_stage` read out by config.head_mode (docs/poe.md section 7).
"""

from __future__ import annotations

import functools
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

POE_MODES = ("none", "flat", "hier", "residual_logop")
FINAL_READOUTS = ("last", "logop")
HEAD_MODES = ("dual", "base", "spec")
SOFTCAP = 15.0
SMEAR_DIM = 24  # the smear gate reads the first 24 channels of the normed embedding
VE_GATE_DIM = 12  # the value-embedding gate reads the first 12 channels
QK_SCALE = 1.2


# -----------------------------------------------------------------------------
# Config

# GPTConfig field -> the standard transformers name of the same quantity (config.json carries both)
STANDARD_NAMES = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
                  "n_kv_head": "num_key_value_heads", "sequence_len": "max_position_embeddings"}


POSITIVE_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim",
                   "aspect_ratio", "intermediate_size", "short_window", "poe_every", "base_n_layer", "source_n_layer")
# GPT builds one Python module per layer (and a config one stage tuple entry per stage): deeper
# than any trained transformer by far, and a config past it is refused before anything is built
MAX_LAYERS = 2 ** 14
ROTARY_SPAN = 2  # the rotary tables cover this many times sequence_len positions (grown on demand past it)


def _f(default, help: str, choices: tuple[str, ...] | None = None, trained: bool = True):
    """A GPTConfig field with its one-line description (and allowed values); trained=False: a
    model gets it from elsewhere, never from a training flag."""
    return field(default=default, metadata={"help": help, "choices": choices, "trained": trained})


@dataclass
class GPTConfig:
    """Every architecture and objective setting. Sizes left as None are derived."""

    # Every field's `help` is its one description: the CLI flags (poelm.flags.add_model_flags),
    # config.json and the HF config are all generated from these fields.
    sequence_len: int = _f(2048, "context length: tokens per training row and the longest prompt + output")
    vocab_size: int = _f(32768, "vocabulary size (taken from the tokenizer when training)", trained=False)
    n_layer: int = _f(24, "number of transformer layers (the nanochat depth)")
    n_embd: int | None = _f(None, "width; default: ceil(n_layer x aspect_ratio / head_dim) x head_dim")
    n_head: int | None = _f(None, "attention heads; default: n_embd / head_dim")
    n_kv_head: int | None = _f(None, "key/value heads (GQA); default: n_head")
    head_dim: int = _f(128, "width of one attention head (derives n_head when n_head is unset)")
    aspect_ratio: int = _f(64, "width per layer when n_embd is derived from the depth")
    intermediate_size: int | None = _f(None, "MLP width; default: 4 x n_embd")
    window_pattern: str = _f("SSSL", "per-layer attention windows, repeated; S = short, L = long (last layer L)")
    short_window: int | None = _f(None, "S window; default: sequence_len / 4 rounded up to 128")
    poe_mode: str = _f("flat", "objective: none = BP, flat | hier | residual_logop = PoE (docs/poe.md section 1)",
                       POE_MODES)
    poe_alpha: float = _f(0.0, "stage losses summed / K^(1-alpha): 0 = their mean, 1 = their sum")
    poe_every: int | None = _f(None, "uniform stages of this many layers; default: 4 equal stages when the depth "
                                     "allows, else 1")
    poe_stage_layers: tuple[int, ...] | None = _f(None, "explicit stage sizes, e.g. 12,5,4,3 (instead of poe_every)")
    per_stage_head: bool = _f(False, "one extra unembedding per stage, added to the shared lm_head")
    backout: bool | None = _f(None, "the final 'last' readout subtracts backout_lambda x the middle residual; "
                                    "default: on for BP only")
    final_readout: str = _f("last", "final readout: last = the last stage's head, logop = the Log-OP of all stages",
                            FINAL_READOUTS)
    final_logop_alpha: float | None = _f(None, "alpha of the final Log-OP readout; default: poe_alpha")
    # post-hoc specialists (docs/poe.md section 7; built by poelm.specialist.attach, not trained from scratch)
    frozen_layers: int = _f(0, "specialist: leading layers frozen from its base (the base depth, plus earlier "
                               "cascade layers); 0 = not a specialist", trained=False)
    base_n_layer: int | None = _f(None, "specialist: depth of the original base (backout stays at its middle "
                                        "layer through cascades); default: frozen_layers", trained=False)
    source_n_layer: int | None = _f(None, "a truncated model (`poelm export --stages K`): depth of the model these "
                                          "are the first layers of; windows and value embeddings follow that depth",
                                   trained=False)
    head_mode: str = _f("dual", "specialist readout: dual = lm_head + lm_head_stage, base = lm_head only, "
                                "spec = lm_head_stage only", HEAD_MODES, trained=False)

    def __post_init__(self) -> None:
        hints = _field_hints()
        for f in fields(self):
            value = getattr(self, f.name)
            if not _has_type(value, hints[f.name]):
                raise ValueError(f"config field {f.name}={repr(value)[:60]} ({type(value).__name__}) must be "
                                 f"{_type_name(hints[f.name])}")
        for name in POSITIVE_FIELDS:
            value = getattr(self, name)
            if value is not None and not value >= 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.n_layer > MAX_LAYERS:
            raise ValueError(f"n_layer must be at most {MAX_LAYERS} (GPT builds a module per layer), got {self.n_layer}")
        if self.n_embd is None:
            hd = self.head_dim
            self.n_embd = _ceil_div(self.n_layer * self.aspect_ratio, hd) * hd
        if self.n_head is None:
            if self.n_embd % self.head_dim:
                raise ValueError(f"n_embd {self.n_embd} is not a multiple of head_dim {self.head_dim}: set n_head")
            self.n_head = self.n_embd // self.head_dim
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        self.head_dim = self.n_embd // self.n_head
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        if self.n_embd < SMEAR_DIM:
            raise ValueError(f"n_embd must be >= {SMEAR_DIM} (the smear gate reads 24 channels)")
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise ValueError(f"window_pattern {self.window_pattern!r} may only hold the letters S and L")
        self.window_pattern = self.window_pattern.upper()
        if self.poe_mode not in POE_MODES:
            raise ValueError(f"poe_mode {self.poe_mode!r} is not one of {', '.join(POE_MODES)}")
        if self.final_readout not in FINAL_READOUTS:
            raise ValueError(f"final_readout {self.final_readout!r} is not one of {', '.join(FINAL_READOUTS)}")
        if self.head_mode not in HEAD_MODES:
            raise ValueError(f"head_mode {self.head_mode!r} is not one of {', '.join(HEAD_MODES)}")
        if self.frozen_layers:
            self._check_specialist()
        elif self.head_mode != "dual":
            raise ValueError(f"head_mode={self.head_mode} needs a specialist head (lm_head_stage) and this model "
                             "has none (frozen_layers=0); attach one with `poelm specialist attach` or load --delta")
        elif self.base_n_layer is not None:
            raise ValueError(f"base_n_layer={self.base_n_layer} is only for specialists (frozen_layers > 0)")
        if self.source_n_layer is not None and (self.source_n_layer < self.n_layer or self.frozen_layers):
            raise ValueError(f"source_n_layer={self.source_n_layer} must be at least n_layer={self.n_layer} and "
                             "cannot be combined with a specialist (frozen_layers)")
        self._resolve_stages()
        if self.frozen_layers:
            ends = set(self.stage_ends)
            if self.base_n_layer - 1 not in ends or self.frozen_layers - 1 not in ends:
                raise ValueError(f"poe_stage_layers {self.poe_stage_layers} must end a stage at the base depth "
                                 f"{self.base_n_layer} and at frozen_layers={self.frozen_layers}")
        if self.backout is None:
            self.backout = self.poe_mode == "none"

    def _check_specialist(self) -> None:
        if not 0 < self.frozen_layers < self.n_layer:
            raise ValueError(f"frozen_layers={self.frozen_layers} must be between 1 and n_layer-1={self.n_layer - 1} "
                             "(a specialist adds at least one layer)")
        if self.base_n_layer is None:
            self.base_n_layer = self.frozen_layers
        if self.base_n_layer > self.frozen_layers:
            raise ValueError(f"base_n_layer={self.base_n_layer} must be at most frozen_layers={self.frozen_layers}")
        if self.per_stage_head or self.final_readout != "last":
            raise ValueError("a specialist reads out through lm_head + lm_head_stage at its last layer: it needs "
                             "per_stage_head=false and final_readout=last")

    def _resolve_stages(self) -> None:
        if self.poe_stage_layers is not None:
            layers = tuple(int(n) for n in self.poe_stage_layers)
            if any(n < 1 for n in layers) or sum(layers) != self.n_layer:
                raise ValueError(f"poe_stage_layers {layers} must be positive and sum to n_layer={self.n_layer}")
            if self.poe_every is not None and layers != (self.poe_every,) * len(layers):
                raise ValueError("set either poe_every or poe_stage_layers, not both")
        else:
            depth = self.base_n_layer if self.frozen_layers else self.n_layer  # a specialist: the base's stages
            every = self.poe_every
            if every is None:  # default: 4 equal stages when the depth allows, else one stage
                every = depth // 4 if depth % 4 == 0 else depth
            if every < 1 or depth % every:
                raise ValueError(f"poe_every={every} does not divide n_layer={depth}: use poe_stage_layers")
            layers = (every,) * (depth // every)
            if self.frozen_layers:  # then one stage of earlier cascade layers (if any) and one of the new layers
                layers += tuple(n for n in (self.frozen_layers - depth, self.n_layer - self.frozen_layers) if n)
        self.poe_stage_layers = layers
        self.poe_every = layers[0] if len(set(layers)) == 1 else None

    # --- derived quantities ---------------------------------------------------
    @property
    def n_stages(self) -> int:
        return len(self.poe_stage_layers)

    @property
    def stage_ends(self) -> list[int]:
        """Index of the last layer of each stage (d24, 4x6: [5, 11, 17, 23])."""
        ends, total = [], 0
        for n in self.poe_stage_layers:
            total += n
            ends.append(total - 1)
        return ends

    @property
    def padded_vocab_size(self) -> int:
        return _ceil_div(self.vocab_size, 64) * 64

    @property
    def backout_layer(self) -> int:
        """The middle layer whose residual backout subtracts (a specialist keeps its base's)."""
        return (self.base_n_layer if self.frozen_layers else self.n_layer) // 2

    def window_sizes(self) -> list[int]:
        """Window w of each layer: a query at t sees keys t-w ... t."""
        long = self.sequence_len
        short = self.short_window
        if short is None:
            short = _ceil_div(self.sequence_len // 4, 128) * 128
        short = min(short, long)
        sizes = [short if self.window_pattern[i % len(self.window_pattern)] == "S" else long
                 for i in range(self.n_layer)]
        if (self.source_n_layer or self.n_layer) == self.n_layer:  # a truncated model keeps its source's windows
            sizes[-1] = long
        if self.frozen_layers:  # the base's last layer, and each cascade level's, stay long as they were
            for end in self.stage_ends:
                if end >= self.base_n_layer - 1:
                    sizes[end] = long
        return sizes

    def has_value_embed(self, layer: int) -> bool:
        """Alternating layers ending at the last one (of the source, for a truncated model); a specialist's new
        layers have none."""
        depth = self.base_n_layer if self.frozen_layers else (self.source_n_layer or self.n_layer)
        return layer < min(depth, self.n_layer) and layer % 2 == (depth - 1) % 2

    def is_poe(self) -> bool:
        return self.poe_mode != "none"

    def num_params(self) -> int:
        """The parameters GPT(self) holds, by arithmetic: nothing is built (GPT.num_params counts them)."""
        V, d, L = self.padded_vocab_size, self.n_embd, self.n_layer
        kv = self.n_kv_head * self.head_dim
        heads = 1 + (self.n_stages if self.per_stage_head else 0) + (1 if self.frozen_layers else 0)
        ve_layers = sum(self.has_value_embed(i) for i in range(L))
        block = 2 * d * d + 2 * d * kv + 2 * d * self.intermediate_size  # c_q, c_proj; c_k, c_v; c_fc, c_proj
        return (V * d * (1 + heads) + L * block + ve_layers * (V * kv + VE_GATE_DIM * self.n_kv_head)
                + 2 * L + SMEAR_DIM + 2)  # wte + heads, blocks, value embeddings; lambdas, smear, backout

    def rotary_numel(self) -> int:
        """Elements of the rotary cos and sin tables GPT builds at its first forward."""
        return 2 * ROTARY_SPAN * self.sequence_len * (self.head_dim // 2)

    def is_specialist(self) -> bool:
        return self.frozen_layers > 0

    @property
    def final_alpha(self) -> float:
        return self.poe_alpha if self.final_logop_alpha is None else self.final_logop_alpha

    # --- serialisation --------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["poe_stage_layers"] = list(self.poe_stage_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict, *, ignore: tuple[str, ...] = ()) -> "GPTConfig":
        """GPTConfig from a dict (config.json); every value is checked against its field's type."""
        if not isinstance(d, dict):
            raise ValueError(f"a model config must be a JSON object of fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in known and k not in ignore)
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        kw = {k: v for k, v in d.items() if k in known}
        if isinstance(kw.get("poe_stage_layers"), list):
            kw["poe_stage_layers"] = tuple(kw["poe_stage_layers"])
        return cls(**kw)


def _ceil_div(a: int, b: int) -> int:
    """ceil(a / b) in integers (exact, and no float overflow for any size)."""
    return -(-a // b)


@functools.cache
def _field_hints() -> dict:
    """GPTConfig's field annotations, resolved once."""
    return typing.get_type_hints(GPTConfig)


def _has_type(value, hint) -> bool:
    """Whether a (JSON) value fits a field annotation (bool is not an int; an int is a float; numbers are finite)."""
    if isinstance(hint, types.UnionType):
        return any(_has_type(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is tuple:  # tuple[int, ...]: a JSON list
        item = typing.get_args(hint)[0]
        return isinstance(value, (list, tuple)) and all(_has_type(v, item) for v in value)
    if hint is float:
        return isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    if isinstance(hint, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(hint, hint.__name__)


# -----------------------------------------------------------------------------
# Small pieces


def rmsnorm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def gate_linear(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """lin applied to a column slice x (..., k) of the residual as ONE 2-D matmul (a view when the
    rows fold, else a copy). Handed a 3-D strided slice, torch.matmul picks mm or bmm by whether
    the weight requires grad, and the two round differently on some CPUs (AVX-512): a frozen and a
    trainable copy of the same weights must compute the same logits."""
    return F.linear(x.reshape(-1, x.shape[-1]), lin.weight).view(*x.shape[:-1], lin.out_features)


def softcap(logits: torch.Tensor) -> torch.Tensor:
    return SOFTCAP * torch.tanh(logits / SOFTCAP)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos/sin broadcastable to (B, T, 1, D/2). Half-split layout."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype; t itself when it already is (Tensor.to costs a dispatch even then, several per
    layer of an eager decode step)."""
    return t if t.dtype == dtype else t.to(dtype)


def logop_weight(n_stages: int, alpha: float) -> float:
    """Uniform Log-OP weight w = 1/|S|^(1-alpha) (docs/poe.md section 2)."""
    return 1.0 / n_stages ** (1.0 - alpha)


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Boolean mask (..., Tq, Tk): key visible iff q-window <= k <= q."""
    diff = q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)
    return (diff >= 0) & (diff <= window)


# -----------------------------------------------------------------------------
# Attention kernels of the sliding-window layers (a runtime choice, not a model setting:
# every backend computes the same attention; set GPT.attention_backend)

ATTENTION_BACKENDS = ("auto", "sdpa_mask", "flex", "flash")


def _import_flash_attn():
    """flash-attn's flash_attn_func (FA3's flash_attn_interface, else FA2's flash_attn), or None."""
    for module in ("flash_attn_interface", "flash_attn"):
        try:
            return getattr(__import__(module), "flash_attn_func")
        except (ImportError, AttributeError):
            continue
    return None


FLASH_ATTN = _import_flash_attn()  # looked up once (a compiled step reads it as a constant)


def resolve_attention_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel of the S layers' full-sequence attention (training, prefill from slot 0).
    auto: flash-attn when installed on CUDA in bf16/fp16, else FlexAttention on CUDA, else
    SDPA with a boolean window mask (on the CPU FlexAttention without torch.compile is an
    unfused kernel that builds the same score matrix and has no backward, and compiling it costs
    seconds per shape)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "auto":
        if device.type != "cuda":
            return "sdpa_mask"
        return "flash" if dtype in (torch.bfloat16, torch.float16) and FLASH_ATTN is not None else "flex"
    if name == "flash" and (device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or FLASH_ATTN is None):
        raise ValueError("attention backend flash needs flash-attn (pip install flash-attn) on a CUDA GPU in "
                         "bf16/fp16; use auto, flex or sdpa_mask")
    if name == "flex" and device.type == "cpu" and torch.is_grad_enabled():
        raise ValueError("attention backend flex has no backward on the CPU (torch's FlexAttention); train there with "
                         "auto or sdpa_mask")
    return name


_FLEX: dict[str, object] = {}  # device type -> flex_attention (compiled on CUDA)


def flex_attention(q, k, v, block_mask, enable_gqa: bool) -> torch.Tensor:
    """FlexAttention with a sliding-window block mask: compiled into one fused kernel on CUDA
    (inside a compiled model it is inlined); the unfused reference kernel elsewhere."""
    fn = _FLEX.get(q.device.type)
    if fn is None:
        from torch.nn.attention.flex_attention import flex_attention as flex

        fn = _FLEX[q.device.type] = torch.compile(flex, dynamic=False) if q.device.type == "cuda" else flex
    return fn(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


def window_block_mask(T: int, window: int, device) -> object:
    """FlexAttention's block mask of a causal window over T positions (key visible iff q-window <= k <= q)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def visible(b, h, q, k):
        return (q >= k) & (q - k <= window)

    return create_block_mask(visible, None, None, T, T, device=device)


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """Per-layer keys/values plus what the smear needs, for cached decoding; preallocated once.

    Rows may be left-padded (`pad[b]` leading pad slots): row b's token at slot s has
    position s - pad[b]. Each layer has its own filled length so WAND can leave deeper
    layers behind and back-fill them later; `crop(n)` rolls every layer back to n slots.
    Rows may also be ragged: `run_layers(..., start=[s_0, ..., s_{B-1}])` continues row b at
    slot s_b (the decoders keep each row's length; `lengths` then holds each layer's furthest
    filled slot over the rows, `n_tokens` the uniform case only). `keep_rows` / `append_rows`
    remove and add rows between steps, in place (RowBuffers).
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device=None,
                 dtype: torch.dtype = torch.float32, pad: torch.Tensor | None = None, zeroed: bool = True):
        """zeroed=False: K/V slots hold whatever memory held until written (no zero fill), for a
        cache whose written slots are only copied into another's rows (append_rows copies those
        alone): an attention may read unwritten slots under its mask, and 0 * NaN is NaN."""
        shape = (batch_size, config.n_kv_head, max_len, config.head_dim)
        alloc = torch.zeros if zeroed else torch.empty
        self.k = [alloc(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [alloc(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.lengths = [0] * config.n_layer
        self.tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.n_tokens = 0  # slots that went through embed()
        self.pad = pad.to(device) if pad is not None else torch.zeros(batch_size, dtype=torch.long, device=device)
        self.has_pad = pad is not None and bool((pad > 0).any())  # host flag: decode steps need no pad mask
        self.max_len = max_len
        self._rows = RowBuffers([2] * (2 * config.n_layer) + [None, None])

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def crop(self, n: int) -> None:
        self.lengths = [min(length, n) for length in self.lengths]
        self.n_tokens = min(self.n_tokens, n)

    def positions(self, start: int, count: int) -> torch.Tensor:
        """(B, count) positions of slots start ... start+count-1 of every row."""
        slots = torch.arange(start, start + count, device=self.tokens.device)
        return slots.unsqueeze(0) - self.pad.unsqueeze(1)

    def keep_rows(self, index: list[int]) -> None:
        """Keep only the rows in index (in that order), in place (RowBuffers.keep)."""
        self._set(self._rows.keep(self._tensors(), index, max(self.lengths, default=0)))

    def append_rows(self, other: "KVCache") -> None:
        """Append the rows of another cache of the same shape (its rows keep their own lengths)
        into free row slots (RowBuffers.append)."""
        if other.max_len != self.max_len or len(other.k) != len(self.k):
            raise ValueError(f"cannot append a cache of {other.max_len} slots x {len(other.k)} layers to one of "
                             f"{self.max_len} x {len(self.k)}")
        self._set(self._rows.append(self._tensors(), other._tensors(), max(self.lengths, default=0),
                                    max(other.lengths, default=0)))
        # the joined rows' slots count as filled: a keep_rows before the next step copies them whole
        self.lengths = [max(mine, theirs) for mine, theirs in zip(self.lengths, other.lengths)]

    def _tensors(self) -> list[torch.Tensor]:
        return self.k + self.v + [self.tokens, self.pad]

    def _set(self, tensors: list[torch.Tensor]) -> None:
        L = len(self.k)
        self.k, self.v, self.tokens, self.pad = tensors[:L], tensors[L:2 * L], tensors[2 * L], tensors[2 * L + 1]
        self.has_pad = bool((self.pad > 0).any())


class RowBuffers:
    """Per-row tensors (rows on dim 0) kept as views of the first B rows of larger buffers, so
    rows join into free row slots (the buffers double when full) and leave in place. Only
    slots [0, filled) of the slot dimension are copied (slot_dims[i]: tensor i's, None = copy
    it whole): the owner writes every later slot of a row before any unmasked read of it.
    Tensors replaced from outside (e.g. the HF cache's beam reorder) become the new buffers."""

    def __init__(self, slot_dims: list[int | None]):
        self.slot_dims, self.bufs = slot_dims, None

    def _buffers(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.bufs is None or any(t.data_ptr() != b.data_ptr() or t.shape[1:] != b.shape[1:] or not t.is_contiguous()
                                    for t, b in zip(views, self.bufs)):
            self.bufs = list(views)
        return self.bufs

    def _filled(self, t: torch.Tensor, dim: int | None, filled: int) -> torch.Tensor:
        return t if dim is None else t.narrow(dim, 0, filled)

    def keep(self, views: list[torch.Tensor], index: list[int], filled: int) -> list[torch.Tensor]:
        """Rows index (in that order) -> their views: only the rows that change place are copied
        (a row that takes the place of a leaving one moves alone; rows after a gap all shift)."""
        bufs = self._buffers(views)
        moved = [j for j, b in enumerate(index) if b != j]
        if moved:
            device = bufs[0].device
            sources = torch.tensor([index[j] for j in moved], dtype=torch.long, device=device)
            span = moved[-1] - moved[0] + 1 == len(moved)  # one run of rows: a slice write (faster than index_copy_)
            targets = None if span else torch.tensor(moved, dtype=torch.long, device=device)
            for b, dim in zip(bufs, self.slot_dims):  # gathered before the write: sources may overlap targets
                part = self._filled(b, dim, filled)
                if span:
                    part[moved[0]:moved[-1] + 1] = part.index_select(0, sources)
                else:
                    part.index_copy_(0, targets, part.index_select(0, sources))
        return [b[:len(index)] for b in bufs]

    def append(self, views: list[torch.Tensor], new: list[torch.Tensor] | None, filled: int,
               new_filled: int, n: int = 0) -> list[torch.Tensor]:
        """The views with the rows of `new` appended (or n zero rows when new is None)."""
        bufs, B = self._buffers(views), views[0].shape[0]
        n = new[0].shape[0] if new is not None else n
        if B + n > bufs[0].shape[0]:  # grow by doubling: the live rows move once
            grown = [b.new_zeros((max(B + n, 2 * b.shape[0]), *b.shape[1:])) for b in bufs]
            for g, b, dim in zip(grown, bufs, self.slot_dims):
                self._filled(g[:B], dim, filled).copy_(self._filled(b[:B], dim, filled))
            bufs = self.bufs = grown
        for i, (b, dim) in enumerate(zip(bufs, self.slot_dims)):
            if new is None:
                b[B:B + n].zero_()
            else:
                self._filled(b[B:B + n], dim, new_filled).copy_(self._filled(new[i], dim, new_filled))
        return [b[:B + n] for b in bufs]


class StepPlan:
    """What every layer of one `run_layers` call shares, built once per call: the slots the
    chunk writes, rotary cos/sin and, per distinct window, how to attend: (first key slot,
    mask, is_causal, kernel). A mask is None where a plain slice of keys or `is_causal` is
    exact (a one-token decode against a window, a causal L layer); a sliding window over a
    whole sequence (training, a prefill from slot 0) uses the model's attention backend:
    a FlexAttention block mask, flash-attn's window, or the reference (T, T) boolean mask.

    start: an int (every row continues at that slot), a list of per-row start slots (ragged
    rows; writes scatter to each row's own slots) or a (B,) tensor of them: the static-shape
    step (every key slot of the cache with a mask; no host ints, so a compiled step is one
    graph for every position; the caller keeps cache.lengths / n_tokens). `key_slots` (static
    step only): the key slots to attend, 0 ... n-1 as a tensor (n at least every row's end; its
    length may be a dynamic dimension of a compiled step: one graph for every n); default every
    slot of the cache."""

    def __init__(self, model: "GPT", B: int, T: int, dtype: torch.dtype, device, cache: "KVCache | None",
                 start: int | list[int] | torch.Tensor, windows: set[int], key_slots: torch.Tensor | None = None):
        self.cache, self.T, self.key_slots = cache, T, key_slots
        self.ragged = not isinstance(start, int)
        self.static = isinstance(start, torch.Tensor)
        if self.ragged:
            starts = start if self.static else torch.tensor(start, dtype=torch.long, device=device)  # (B,)
            self.slots = starts.unsqueeze(1) + torch.arange(T, device=device)  # (B, T)
            self.rows = torch.arange(B, device=device).unsqueeze(1)  # (B, 1)
            if self.static:  # keys [0, end)
                self.start, self.end = 0, cache.max_len if key_slots is None else key_slots.shape[0]
            else:
                self.start, self.end = min(start), max(start) + T
            positions = self.slots - cache.pad.unsqueeze(1)
            need = self.end
        else:
            self.start, self.end = start, start + T
            need = start + T
            positions = cache.positions(start, T) if cache is not None and cache.has_pad else None
        cos, sin = model._rotary(positions, need + 1) if positions is not None else model._rotary_span(start, T)
        self.cos, self.sin = as_dtype(cos, dtype), as_dtype(sin, dtype)
        self.backend = resolve_attention_backend(model.attention_backend, device, dtype)
        self.model = model
        self.keys: dict[int, tuple[int, object, bool, str]] = {w: self._plan(w, device) for w in windows}

    def _plan(self, window: int, device) -> tuple[int, object, bool, str]:
        """(first key slot, mask or None, is_causal, kernel "sdpa" | "flex" | "flash") for one window."""
        cache, T = self.cache, self.T
        lo = max(0, self.start - window)  # the earliest key any query of this chunk can see
        whole = cache is None or (not self.ragged and not cache.has_pad and self.start == 0)  # keys = queries
        if whole and window >= T - 1:
            return 0, None, True, "sdpa"
        if whole and T > 1:  # a window over the whole sequence: the backend's kernel
            if self.backend == "flash":
                return 0, None, False, "flash"
            if self.backend == "flex":
                return 0, self.model.block_mask(T, window, device), False, "flex"
            if cache is None:
                pos = torch.arange(T, device=device)
                return 0, window_mask(pos, pos, window), False, "sdpa"
        if not self.ragged and not cache.has_pad and T == 1:
            return lo, None, False, "sdpa"  # keys lo..start are exactly the window
        k_slot = self.key_slots if self.key_slots is not None else torch.arange(lo, self.end, device=device)
        if self.ragged:
            diff = self.slots.unsqueeze(-1) - k_slot  # (B, T, Tk)
            mask = (diff >= 0) & (diff <= window)
        else:
            q_slot = torch.arange(self.start, self.end, device=device)
            mask = window_mask(q_slot, k_slot, window).unsqueeze(0)  # (1, T, Tk)
        if cache.has_pad:
            mask = mask & (k_slot.unsqueeze(0) >= cache.pad.unsqueeze(1)).unsqueeze(1)  # (B, T, Tk)
            mask = mask | ~mask.any(-1, keepdim=True)  # pad-slot queries: attend anywhere, result unused
        return lo, mask.unsqueeze(1), False, "sdpa"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
        """q (B, H, T, D) against keys/values (B, Hk, Tk, D) from slot keys[window][0] on -> (B, H, T, D)."""
        _, mask, causal, kernel = self.keys[window]
        gqa = q.shape[1] != k.shape[1]
        if kernel == "flex":
            return flex_attention(q, k, v, mask, gqa)
        if kernel == "flash":  # (B, T, H, D) layout; a key is visible iff q - window <= k <= q
            y = FLASH_ATTN(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                  window_size=(window, 0))
            return (y[0] if isinstance(y, tuple) else y).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


# -----------------------------------------------------------------------------
# Blocks


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        d, hd = config.n_embd, config.head_dim
        self.c_q = nn.Linear(d, self.n_head * hd, bias=False)
        self.c_k = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.c_v = nn.Linear(d, self.n_kv_head * hd, bias=False)
        self.c_proj = nn.Linear(self.n_head * hd, d, bias=False)
        self.ve_gate = nn.Linear(VE_GATE_DIM, self.n_kv_head, bias=False) if config.has_value_embed(layer_idx) else None

        self._fused: tuple[tuple, torch.Tensor] | None = None  # (weight versions, [W_q; W_k; W_v])

    def qkv_weight(self) -> torch.Tensor:
        """[W_q; W_k; W_v] (one matmul), concatenated once per weight version; not a parameter,
        so the state dict keeps the released names c_q / c_k / c_v."""
        ws = (self.c_q.weight, self.c_k.weight, self.c_v.weight)
        key = (ws[0].data_ptr(), ws[0]._version, ws[1].data_ptr(), ws[1]._version, ws[2].data_ptr(), ws[2]._version,
               ws[0].dtype)
        if self._fused is None or self._fused[0] != key:
            self._fused = (key, torch.cat([w.detach() for w in ws]))
        return self._fused[1]

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, plan: StepPlan, window: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hk, D = self.n_head, self.n_kv_head, self.head_dim
        if torch.is_grad_enabled() or torch.compiler.is_compiling():  # training / a compiled step: three matmuls
            q = self.c_q(x).view(B, T, H, D)
            k = self.c_k(x).view(B, T, Hk, D)
            v = self.c_v(x).view(B, T, Hk, D)
            qk = torch.cat([q, k], dim=2)
        else:  # inference: one matmul; q and k are one slice of its heads
            qkv = (x @ self.qkv_weight().t()).view(B, T, H + 2 * Hk, D)
            qk, v = qkv[:, :, :H + Hk], qkv[:, :, H + Hk:]
        if ve is not None:
            gate = 3 * torch.sigmoid(gate_linear(self.ve_gate, x[..., :VE_GATE_DIM]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, Hk, D)
        qk = rmsnorm(apply_rotary(qk, plan.cos, plan.sin)) * QK_SCALE  # q and k rotated and normed together
        qk, v = qk.transpose(1, 2), v.transpose(1, 2)  # (B, H+Hk, T, D), (B, Hk, T, D)
        q, k = qk[:, :H], qk[:, H:]
        y = plan.attend(q, k, v, window) if plan.cache is None else self._attend_cached(q, k, v, window, plan)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.c_proj(y)

    def _attend_cached(self, q, k, v, window: int, plan: StepPlan) -> torch.Tensor:
        i, cache = self.layer_idx, plan.cache
        start, end = plan.start, plan.end
        if end > cache.max_len:
            raise ValueError(f"KV cache of {cache.max_len} slots is full; allocate a longer cache")
        ck, cv = cache.k[i], cache.v[i]
        if plan.ragged:  # each row writes its own slots
            ck[plan.rows, :, plan.slots] = k.transpose(1, 2).to(ck.dtype)
            cv[plan.rows, :, plan.slots] = v.transpose(1, 2).to(cv.dtype)
            if not plan.static:  # (a static step's caller keeps the lengths: no host ints in its graph)
                cache.lengths[i] = max(cache.lengths[i], end)
        else:
            if start > cache.lengths[i]:  # a chunk before the end rewrites (crops) the layer; after it is a hole
                raise RuntimeError(f"layer {i} cache holds {cache.lengths[i]} slots, chunk starts at {start}")
            ck[:, :, start:end] = k  # the copy casts to the cache's dtype
            cv[:, :, start:end] = v
            cache.lengths[i] = end
        lo = plan.keys[window][0]
        return plan.attend(q, as_dtype(ck[:, :, lo:end], q.dtype), as_dtype(cv[:, :, lo:end], q.dtype), window)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.intermediate_size, bias=False)
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    @torch.no_grad()
    def init_weights(self, s: float) -> None:
        """docs/model.md: q/k/v uniform(-s, s), c_fc uniform(-0.4s, 0.4s), both projections zero
        (so a new block starts as the identity), the value-embedding gate uniform(0, 0.02)."""
        for lin in (self.attn.c_q, self.attn.c_k, self.attn.c_v):
            nn.init.uniform_(lin.weight, -s, s)
        nn.init.uniform_(self.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
        nn.init.zeros_(self.attn.c_proj.weight)
        nn.init.zeros_(self.mlp.c_proj.weight)
        if self.attn.ve_gate is not None:
            nn.init.uniform_(self.attn.ve_gate.weight, 0.0, 0.02)

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, plan: StepPlan, window: int) -> torch.Tensor:
        x = x + self.attn(rmsnorm(x), ve, plan, window)
        return x + self.mlp(rmsnorm(x))


# -----------------------------------------------------------------------------
# Chunked soft-capped cross-entropy: never holds a full (N, V) logit tensor for backward


def _capped_logits(hidden: torch.Tensor, weight: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    raw = (hidden @ weight[:vocab].t()).float()  # (n, V)
    t = torch.tanh(raw / SOFTCAP)
    return SOFTCAP * t, t


class _SoftcapCrossEntropy(torch.autograd.Function):
    """Sum of token NLLs of softcap(hidden @ weight.T) (optionally the running Log-OP with
    detached earlier readouts). The gradients are computed chunk by chunk in the forward
    pass and only (N, d) + (V, d) of them are kept, not the (N, V) logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, priors, vocab, chunk, need_grad):
        n_terms = len(priors) + 1
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        for s in range(0, hidden.shape[0], chunk):
            h, tgt = hidden[s:s + chunk], targets[s:s + chunk]
            t = (h @ weight[:vocab].t()).float().mul_(1 / SOFTCAP).tanh_()  # (n, V)
            logq = (t * SOFTCAP).log_softmax(-1)
            if priors:
                total = logq + sum(_capped_logits(ph[s:s + chunk], pw, vocab)[0].log_softmax(-1) for ph, pw in priors)
                logq = (total / n_terms).log_softmax(-1)
            valid = tgt >= 0
            safe = tgt.clamp(min=0).unsqueeze(1)
            loss += -(logq.gather(1, safe).squeeze(1) * valid).sum()
            if need_grad:
                g = logq.exp_()  # softmax, in place: logq is not needed any more
                g.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=g.dtype))
                scale = valid.to(g.dtype).unsqueeze(1) / n_terms if not bool(valid.all()) or n_terms > 1 else None
                if scale is not None:
                    g.mul_(scale)
                g.mul_(t.square_().neg_().add_(1))  # through the soft cap: 1 - tanh^2
                g = g.to(h.dtype)
                grad_h[s:s + chunk] = g @ weight[:vocab]
                grad_w[:vocab].addmm_(g.t().float(), h.float())
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_grad else None)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None, None, None, None


def softcap_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab: int,
                          priors: list[tuple[torch.Tensor, torch.Tensor]] = (), chunk_elems: int = 2 ** 23) -> torch.Tensor:
    """Summed NLL over targets >= 0. hidden (N, d) already normed, weight (Vp, d), targets (N,)."""
    chunk = max(1, chunk_elems // vocab)
    need_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    priors = [(ph.detach(), pw.detach()) for ph, pw in priors]
    return _SoftcapCrossEntropy.apply(hidden, weight, targets, priors, vocab, chunk, need_grad)


# -----------------------------------------------------------------------------
# The model


def init_scale(config: GPTConfig) -> float:
    """The uniform bound s = sqrt(3 / n_embd) of the block matrices (docs/model.md)."""
    return math.sqrt(3) / math.sqrt(config.n_embd)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        V, d, L = config.padded_vocab_size, config.n_embd, config.n_layer
        kv_dim = config.n_kv_head * config.head_dim
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, d),
            h=nn.ModuleList([Block(config, i) for i in range(L)]),
        ))
        self.lm_head = nn.Linear(d, V, bias=False)
        if config.per_stage_head:
            self.lm_head_stages = nn.ModuleList([nn.Linear(d, V, bias=False) for _ in range(config.n_stages)])
        if config.frozen_layers:
            self.lm_head_stage = nn.Linear(d, V, bias=False)  # the specialist's own head, added to lm_head
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(L) if config.has_value_embed(i)})
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = nn.Linear(SMEAR_DIM, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.windows = config.window_sizes()
        self.attention_backend = "auto"  # the S layers' kernel (ATTENTION_BACKENDS); not a model setting
        self._block_masks: dict[tuple, object] = {}
        self._rotary_len = 0
        self.register_buffer("rotary_cos", torch.empty(0), persistent=False)
        self.register_buffer("rotary_sin", torch.empty(0), persistent=False)

    # --- init -----------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """The initialisation of docs/model.md (call after moving off the meta device)."""
        cfg = self.config
        s = init_scale(cfg)
        L = cfg.n_layer
        nn.init.normal_(self.transformer.wte.weight, 0.0, 0.8)
        nn.init.normal_(self.lm_head.weight, 0.0, 0.001)
        for block in self.transformer.h:
            block.init_weights(s)
        for emb in self.value_embeds.values():
            nn.init.uniform_(emb.weight, -s, s)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        self.smear_lambda.zero_()
        self.backout_lambda.fill_(0.2)
        frac = torch.arange(L, dtype=torch.float32) / max(L - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * frac)
        if self.config.per_stage_head:
            for head in self.lm_head_stages:
                nn.init.zeros_(head.weight)
        if cfg.frozen_layers:  # the layers after the base: plain residual, no x0 blend, zero head (docs/poe.md 7)
            self.resid_lambdas[cfg.base_n_layer:] = 1.0
            self.x0_lambdas[cfg.base_n_layer:] = 0.0
            nn.init.zeros_(self.lm_head_stage.weight)
        self.rotary_cos = torch.empty(0, device=self.lm_head.weight.device)
        self._rotary_len = 0

    # --- helpers --------------------------------------------------------------
    def _rotary_tables(self, need: int) -> None:
        """cos/sin tables (length, D/2) covering positions < need (rebuilt longer when not). Built as
        normal tensors even when decoding (under inference_mode) builds them: training saves them."""
        device = self.lm_head.weight.device
        if need > self._rotary_len or self.rotary_cos.device != device:
            length = max(need, self.config.sequence_len * ROTARY_SPAN)
            hd = self.config.head_dim
            with torch.inference_mode(False):
                inv_freq = 1.0 / (100000 ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
                angles = torch.outer(torch.arange(length, dtype=torch.float32, device=device), inv_freq)
                self.rotary_cos, self.rotary_sin = angles.cos(), angles.sin()
            self._rotary_len = length

    def _rotary(self, positions: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions (T,) or (B, T), all < need -> broadcastable to (B, T, 1, D/2)."""
        self._rotary_tables(need)
        pos = positions.clamp(min=0)
        cos, sin = self.rotary_cos[pos], self.rotary_sin[pos]
        if cos.dim() == 2:
            cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
        return cos.unsqueeze(2), sin.unsqueeze(2)

    def _rotary_span(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of positions start ... start+T-1 (every row alike), views of the tables -> (1, T, 1, D/2)."""
        self._rotary_tables(start + T + 1)
        return self.rotary_cos[None, start:start + T, None], self.rotary_sin[None, start:start + T, None]

    def block_mask(self, T: int, window: int, device) -> object:
        """The FlexAttention block mask of a window over T positions, built once per shape."""
        key = (T, window, str(device))
        if key not in self._block_masks:
            with torch.inference_mode(False):  # a mask first built while decoding serves training too
                self._block_masks[key] = window_block_mask(T, window, device)
        return self._block_masks[key]

    def stage_of_layer(self, layer: int) -> int:
        return next(k for k, end in enumerate(self.config.stage_ends) if layer <= end)

    def _detaches(self) -> bool:
        return self.config.poe_mode in ("flat", "residual_logop")

    def is_specialist_stage(self, stage: int) -> bool:
        return self.config.frozen_layers > 0 and stage == self.config.n_stages - 1

    def stage_head_weight(self, stage: int) -> torch.Tensor:
        """Effective head of stage k: the shared head plus its own head (when present); a
        specialist's last stage: the head of config.head_mode."""
        w = self.lm_head.weight
        if self.config.per_stage_head:
            w = w + self.lm_head_stages[stage].weight
        if self.is_specialist_stage(stage):
            w = {"dual": w + self.lm_head_stage.weight, "base": w, "spec": self.lm_head_stage.weight}[self.config.head_mode]
        return w

    # --- embedding and layers (shared by every path) ---------------------------
    def embed(self, idx: torch.Tensor, cache: KVCache | None = None,
              start: int | list[int] | torch.Tensor | None = None) -> torch.Tensor:
        """Normed, smeared token embeddings (B, T, d). With a cache, idx continues its slots
        (at cache.n_tokens, or at `start`: an int or per-row start slots for ragged rows)."""
        x = rmsnorm(self.transformer.wte(idx))  # (B, T, d)
        if cache is None:
            prev = x[:, :-1]
            gate = self.smear_lambda * torch.sigmoid(gate_linear(self.smear_gate, x[:, 1:, :SMEAR_DIM]))  # (B, T-1, 1)
            return torch.cat([x[:, :1], x[:, 1:] + gate * prev], dim=1)
        T = idx.shape[1]
        start = cache.n_tokens if start is None else start
        if isinstance(start, int):
            if start == 0:
                prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
            else:
                prev = torch.cat([rmsnorm(self.transformer.wte(cache.tokens[:, start - 1:start])), x[:, :-1]], dim=1)
            cache.tokens[:, start:start + T] = idx
            cache.n_tokens = start + T
            positions = cache.positions(start, T) if cache.has_pad else None  # no pad: prev is 0 at position 0
        else:  # ragged rows (a list, or a (B,) tensor: the static step): row b continues at slot start[b]
            starts = start if isinstance(start, torch.Tensor) else torch.tensor(start, dtype=torch.long, device=idx.device)
            prev_id = cache.tokens.gather(1, (starts - 1).clamp(min=0).unsqueeze(1))  # (B, 1)
            prev = torch.cat([rmsnorm(self.transformer.wte(prev_id)), x[:, :-1]], dim=1)
            slots = starts.unsqueeze(1) + torch.arange(T, device=idx.device)
            cache.tokens.scatter_(1, slots, idx)
            positions = slots - cache.pad.unsqueeze(1)
        gate = self.smear_lambda * torch.sigmoid(gate_linear(self.smear_gate, x[..., :SMEAR_DIM]))
        if positions is None:
            return x + gate * prev
        has_prev = (positions >= 1).unsqueeze(-1).to(x.dtype)  # (B, T, 1): a padded row's first token mixes nothing
        return x + gate * prev * has_prev

    def run_layers(self, x: torch.Tensor, x0: torch.Tensor, idx: torch.Tensor, start_layer: int, end_layer: int,
                   cache: KVCache | None = None, start: int | list[int] | torch.Tensor = 0, keep: set[int] = frozenset(),
                   detach_stages: bool = False, plan: StepPlan | None = None,
                   key_slots: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run layers [start_layer, end_layer) on x (B, T, d) at slots start ... start+T-1
        (start: one slot for every row, or a list of per-row start slots for ragged rows).

        Returns the new residual and the residual after every layer listed in `keep`.
        `detach_stages` cuts the residual (not x0) at every stage boundary (PoE flat). A
        specialist's layers after the frozen ones always see x and x0 detached. Rotary
        tables, the written slots and the masks are built once for all layers (StepPlan; or
        passed in, one for several calls at the same slots, covering their layers' windows).
        key_slots: a static step's attended key slots (StepPlan)."""
        B, T, _ = x.shape
        if plan is None:
            plan = StepPlan(self, B, T, x.dtype, x.device, cache, start, set(self.windows[start_layer:end_layer]),
                            key_slots)
        ends = set(self.config.stage_ends[:-1])
        resid, x0_mix = self._lambdas()
        kept = {}
        for i in range(start_layer, end_layer):
            if detach_stages and (i - 1) in ends:
                x = x.detach()
            if i == self.config.frozen_layers > 0:  # nothing flows back into the frozen base (docs/poe.md 7)
                x, x0 = x.detach(), x0.detach()
            x = resid[i] * x + x0_mix[i] * x0
            ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
            x = self.transformer.h[i](x, ve, plan, self.windows[i])
            if i in keep:
                kept[i] = x
        return x, kept

    def _lambdas(self):
        """resid/x0 lambdas: the parameters when training, host floats (cached per version) for inference."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.resid_lambdas, self.x0_lambdas
        key = (self.resid_lambdas._version, self.x0_lambdas._version, self.resid_lambdas.data_ptr())
        if getattr(self, "_lambda_cache", (None,))[0] != key:
            self._lambda_cache = (key, self.resid_lambdas.tolist(), self.x0_lambdas.tolist())
        return self._lambda_cache[1], self._lambda_cache[2]

    def final_keep(self) -> set[int]:
        """Layers whose residuals the final readout reads (run_layers' `keep` for it)."""
        cfg = self.config
        if cfg.final_readout == "logop":
            return set(cfg.stage_ends)
        return {cfg.backout_layer} if cfg.backout else set()

    def final_hidden(self, x: torch.Tensor, x_mid: torch.Tensor | None) -> torch.Tensor:
        """The last residual as the "last" final readout sees it: minus backout_lambda * x_mid when config.backout."""
        return x - self.backout_lambda * x_mid if self.config.backout else x

    def readout(self, x: torch.Tensor, stage: int | None = None, x_mid: torch.Tensor | None = None,
                stage_x: list[torch.Tensor] | None = None, head_mode: str | None = None) -> torch.Tensor:
        """fp32 logits (..., vocab). stage=k: stage k's soft-capped readout of x. stage=None:
        the final readout of config.final_readout —
          "last":  the last stage's head on final_hidden(x, x_mid) (backout when config.backout);
          "logop": w * sum_k log_softmax(z_k) over stage_x, the residuals at all K stage
                   boundaries, w = logop_weight(K, config.final_alpha); unnormalised log-probs
                   (softmax and argmax see the renormalised Log-OP).
        A specialist's last stage reads out by head_mode (default config.head_mode): dual =
        softcap(lm_head(n) + lm_head_stage(n)), base = lm_head only, spec = lm_head_stage only;
        its backout takes x_mid at the base's middle layer. Its earlier stages are the base's
        (lm_head only). `poelm.specialist.base_logits` is head_mode="base" on the frozen prefix."""
        cfg = self.config
        if stage is None and cfg.final_readout == "logop":
            if stage_x is None or len(stage_x) != cfg.n_stages or any(t is None for t in stage_x):
                raise RuntimeError("the Log-OP final readout needs the residual of every stage boundary (final_keep())")
            s = sum(self.readout(xk, k).log_softmax(-1) for k, xk in enumerate(stage_x))
            return logop_weight(cfg.n_stages, cfg.final_alpha) * s
        if stage is None:
            x, stage = self.final_hidden(x, x_mid), cfg.n_stages - 1
        n = rmsnorm(x)
        mode = (head_mode or cfg.head_mode) if self.is_specialist_stage(stage) else "base"
        logits = n @ self.lm_head.weight.t() if mode != "spec" else n @ self.lm_head_stage.weight.t()
        if mode == "dual":  # the specialist's head adds to the base head's logits
            logits = logits + n @ self.lm_head_stage.weight.t()
        if cfg.per_stage_head:  # the stage's own head adds to the shared head's logits
            logits = logits + n @ self.lm_head_stages[stage].weight.t()
        logits = logits[..., : cfg.vocab_size].float()
        if torch.is_grad_enabled():
            return softcap(logits)
        # inference: softcap() in place. A padded vocabulary leaves a strided slice, which is first
        # divided into a contiguous tensor as softcap() does: tanh's vector and scalar kernels round
        # differently, so it must see the same layout (the same tail elements) on both paths
        logits = logits.div_(SOFTCAP) if logits.is_contiguous() else logits / SOFTCAP
        return logits.tanh_().mul_(SOFTCAP)

    # --- full-sequence forward -------------------------------------------------
    def trunk(self, idx: torch.Tensor, upto_stage: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """One pass over the layers: the residual at every stage boundary (up to `upto_stage`)
        and x_mid (None when the backout layer was not reached)."""
        cfg = self.config
        last = cfg.n_stages - 1 if upto_stage is None else upto_stage
        ends = cfg.stage_ends[: last + 1]
        x = x0 = self.embed(idx)
        x, kept = self.run_layers(x, x0, idx, 0, ends[-1] + 1, keep=set(ends) | {cfg.backout_layer},
                                  detach_stages=self._detaches())
        return [kept[e] for e in ends], kept.get(cfg.backout_layer)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_stage_logits: bool = False,
                return_stage_losses: bool = False):
        """idx (B, T). With targets: the scalar loss of config.poe_mode (and the detached
        per-stage losses (K,) when return_stage_losses). Without: final logits (B, T, V)
        and, when return_stage_logits, the list of K stage logits from the same pass."""
        stage_x, x_mid = self.trunk(idx)
        if targets is None:
            logits = self.readout(stage_x[-1], None, x_mid, stage_x)
            if return_stage_logits:
                return logits, [self.readout(x, k) for k, x in enumerate(stage_x)]
            return logits
        loss, stage_losses = self._loss(stage_x, x_mid, targets)
        return (loss, stage_losses) if return_stage_losses else loss

    def _loss(self, stage_x: list[torch.Tensor], x_mid: torch.Tensor | None, targets: torch.Tensor):
        cfg = self.config
        tgt = targets.reshape(-1)
        count = (tgt >= 0).sum().clamp(min=1)
        flat = lambda x: rmsnorm(x).reshape(-1, x.shape[-1])  # noqa: E731  (B*T, d)
        if cfg.poe_mode == "none" or cfg.frozen_layers:  # BP, or a specialist: the final readout's loss only
            x = self.final_hidden(stage_x[-1], x_mid)
            loss = softcap_cross_entropy(flat(x), self.stage_head_weight(cfg.n_stages - 1), tgt, cfg.vocab_size) / count
            return loss, loss.detach().unsqueeze(0)
        normed = [flat(x) for x in stage_x]
        weights = [self.stage_head_weight(k) for k in range(cfg.n_stages)]
        losses = []
        for k in range(cfg.n_stages):
            priors = list(zip(normed[:k], weights[:k])) if cfg.poe_mode == "residual_logop" else []
            losses.append(softcap_cross_entropy(normed[k], weights[k], tgt, cfg.vocab_size, priors) / count)
        loss = sum(losses) / cfg.n_stages ** (1 - cfg.poe_alpha)
        return loss, torch.stack([l.detach() for l in losses])

    @torch.no_grad()
    def token_nats(self, idx: torch.Tensor, targets: torch.Tensor, logop_alpha: float | None = None,
                   chunk_elems: int = 2 ** 23) -> dict[str, torch.Tensor]:
        """Per-token NLL in nats of the final readout, every stage and the renormalised
        Log-OP of all stages: {"final": (B,T), "stages": (K,B,T), "logop": (B,T)}."""
        cfg = self.config
        stage_x, x_mid = self.trunk(idx)
        w = logop_weight(cfg.n_stages, cfg.poe_alpha if logop_alpha is None else logop_alpha)
        B, T = targets.shape
        tgt = targets.reshape(-1).clamp(min=0).unsqueeze(1)
        flat_x = [x.reshape(B * T, -1) for x in stage_x]  # K x (B*T, d)
        flat_mid = x_mid.reshape(B * T, -1) if x_mid is not None else None
        out = torch.empty(cfg.n_stages + 2, B * T, device=idx.device)
        chunk = max(1, chunk_elems // cfg.vocab_size)
        nll = lambda logp, s: -logp.gather(1, tgt[s:s + chunk]).squeeze(1)  # noqa: E731  (n,)
        for s in range(0, B * T, chunk):
            xs = [x[s:s + chunk] for x in flat_x]
            mid = flat_mid[s:s + chunk] if flat_mid is not None else None
            out[0, s:s + chunk] = nll(self.readout(xs[-1], None, mid, xs).log_softmax(-1), s)
            logop = 0
            for k, x in enumerate(xs):
                logp = self.readout(x, k).log_softmax(-1)
                out[1 + k, s:s + chunk] = nll(logp, s)
                logop = logop + w * logp
            out[-1, s:s + chunk] = nll(logop.log_softmax(-1), s)
        out = out.view(-1, B, T)
        return {"final": out[0], "stages": out[1:-1], "logop": out[-1]}

    # --- cached inference -------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int | None = None, pad: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len or self.config.sequence_len, p.device, dtype or p.dtype, pad)

    def forward_cached(self, idx: torch.Tensor, cache: KVCache, stage: int | None = None) -> torch.Tensor:
        """Continue every row of the cache with idx (B, T): logits (B, T, V) of the final
        readout, or of stage `stage` (then the deeper layers never run)."""
        start = cache.n_tokens
        x = x0 = self.embed(idx, cache)
        end_layer = self.config.n_layer if stage is None else self.config.stage_ends[stage] + 1
        keep = self.final_keep() if stage is None else set()
        x, kept = self.run_layers(x, x0, idx, 0, end_layer, cache, start, keep=keep)
        return self.readout(x, stage, kept.get(self.config.backout_layer), [kept.get(e) for e in self.config.stage_ends])

    # --- accounting ----------------------------------------------------------------
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def matmul_params(self) -> int:
        """Parameters that take part in matmuls (blocks and heads; not embeddings or scalars)."""
        n = sum(p.numel() for p in self.transformer.h.parameters())
        n += self.lm_head_stage.weight.numel() if self.config.frozen_layers else 0
        return n + self.lm_head.weight.numel()

    def flops_per_token(self, seq_len: int | None = None, training_heads: bool = True) -> float:
        """6 * matmul params + attention, plus the extra head projections PoE training runs."""
        cfg = self.config
        T = seq_len or cfg.sequence_len
        attn = sum(12 * cfg.n_head * cfg.head_dim * min(w, T) for w in self.windows)
        extra_heads = cfg.n_stages - 1 if (training_heads and cfg.is_poe()) else 0
        return 6 * (self.matmul_params() + extra_heads * self.lm_head.weight.numel()) + attn
