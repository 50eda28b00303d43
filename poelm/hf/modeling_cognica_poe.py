"""transformers causal LM for the Cognica BP / PoE models (remote code).

    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    out = model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=16)
    model.generate(**inputs, assistant_early_exit=6)     # self-speculation: drafts read out after 6 layers

The architecture is not defined here. `poe_model.py` beside this file is a copy of poelm's
`poelm/model.py` (inside poelm it re-exports `poelm.model`), and this wrapper only drives its
public pieces: `GPT.embed`, `GPT.run_layers`, `GPT.readout` and the `KVCache`. The wrapped
`GPT` is the `model` submodule (`base_model_prefix`); the checkpoint's tensor names are
poelm's (docs/model.md), with or without the leading `model.`.

Depth and readout. Every forward pass runs `config.num_hidden_layers` layers, read at call
time (transformers' `assistant_early_exit` lowers it while the draft runs). The logits then
come from:
- all layers: the model's final readout (`final_readout`: the last stage, with backout when
  the config says so, or the Log-OP of all stages);
- a stage boundary (the last layer of a stage): that stage's readout, the shared head plus
  the stage's own head when the model has per-stage heads, never backout. On a PoE model
  this is a trained predictor, so early exit at a boundary gives good drafts;
- any other layer: the shared `lm_head` on the normed residual, soft-capped. Nothing was
  trained to read out there, so drafts are poorer, never wrong: the full-depth verify pass
  decides every token, and greedy output equals plain greedy generation at any exit layer.

Cache. The model keeps its keys and values in poelm's own `KVCache` (per-layer lengths,
left padding, the token history the smear needs), wrapped in `PoECache`, which offers the
cache calls transformers' generation loop makes (`get_seq_length`, `crop`, the batch
reorders). A `DynamicCache` that transformers creates and passes in empty is replaced by a
`PoECache` in the output (a non-empty foreign cache is refused). `crop(-n)` drops the last n
positions (transformers 5); `crop(n)` with n > 0 keeps n positions (transformers 4). The
cache grows by doubling, so it holds any length the rotary table covers. Attention masks
are read for left padding only (the generate convention); right padding is harmless for a
causal model; holes in the middle of a row are refused. `position_ids` and
`cache_position` are ignored: positions follow from the mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_cognica_poe import CognicaPoEConfig
from .poe_model import GPT, GPTConfig, KVCache, rmsnorm, softcap

_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])
_WRAPPER_PREFIXES = r"^(?:_orig_mod\.|module\.)+"  # torch.compile / DDP wrappers, stripped on load


class _DepthLinkedConfig(GPTConfig):
    """The GPTConfig of the wrapped GPT, whose `num_hidden_layers` is the transformers config's.

    transformers' early exit sets `base_model.config.num_hidden_layers`, and the base model is
    the GPT; this keeps both configs on one value."""

    @property
    def num_hidden_layers(self) -> int:
        return self._hf_config.num_hidden_layers

    @num_hidden_layers.setter
    def num_hidden_layers(self, value: int) -> None:
        self._hf_config.num_hidden_layers = value


def _linked_gpt_config(config: CognicaPoEConfig) -> _DepthLinkedConfig:
    base = config.to_gpt_config()
    linked = _DepthLinkedConfig(**base.to_dict())
    linked._hf_config = config
    return linked


class PoECache:
    """poelm's KVCache behind the cache calls of transformers' generation loop."""

    is_compileable = False
    is_croppable = True

    def __init__(self, model: GPT, batch_size: int, pad: torch.Tensor | None = None, capacity: int = 64):
        capacity = max(64, 1 << (max(capacity, 1) - 1).bit_length())
        self.kv: KVCache = model.new_cache(batch_size, max_len=capacity, pad=pad)

    # --- what transformers calls ---------------------------------------------------
    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        return self.kv.n_tokens

    def get_max_cache_shape(self) -> int:
        return -1

    def get_max_length(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self.kv.k)

    def crop(self, n: int) -> None:
        """n < 0: drop the last -n positions (transformers 5); n > 0: keep the first n positions
        (transformers 4). n == 0 is `crop(-0)` on transformers 5 (nothing to drop) and "keep 0"
        on transformers 4."""
        n = int(n)
        if n < 0:
            keep = max(self.kv.n_tokens + n, 0)
        elif n == 0 and _TRANSFORMERS_MAJOR >= 5:
            return
        else:
            keep = n
        self.kv.crop(keep)

    def activate_past_recording(self) -> None:  # a growing cache can always roll back
        pass

    def reset(self) -> None:
        self.kv.crop(0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._rows(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def _rows(self, fn) -> None:
        """Apply a batch-dimension map (beam reorder, selection, repeat) to every per-row tensor."""
        kv = self.kv
        kv.k = [fn(t) for t in kv.k]
        kv.v = [fn(t) for t in kv.v]
        kv.tokens = fn(kv.tokens)
        kv.pad = fn(kv.pad)

    # --- growth ----------------------------------------------------------------------
    def reserve(self, length: int) -> None:
        """Make room for `length` slots (doubling the capacity)."""
        kv = self.kv
        if length <= kv.max_len:
            return
        new_len = max(length, 2 * kv.max_len)

        def grow(t: torch.Tensor, dim: int) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = new_len
            out = t.new_zeros(shape)
            out.narrow(dim, 0, t.shape[dim]).copy_(t)
            return out

        kv.k = [grow(t, 2) for t in kv.k]
        kv.v = [grow(t, 2) for t in kv.v]
        kv.tokens = grow(kv.tokens, 1)
        kv.max_len = new_len


class CognicaPoEPreTrainedModel(PreTrainedModel):
    config_class = CognicaPoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False
    _no_split_modules = ["Block"]

    def _init_weights(self, module: torch.nn.Module) -> None:
        # The nanochat initialisation runs once in __init__ (GPT.init_weights); loading a
        # checkpoint must never re-initialise what it loaded, so nothing happens here.
        pass


class CognicaPoEForCausalLM(CognicaPoEPreTrainedModel, GenerationMixin):
    def __init__(self, config: CognicaPoEConfig):
        super().__init__(config)
        self.model = GPT(_linked_gpt_config(config))
        self.model.init_weights()
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader, made strict: weights that do not cover the config exactly are an
        error naming the keys (never a silently uninitialised tensor). Tensor names may carry a
        leading `model.` (what save_pretrained writes), `_orig_mod.` or `module.`."""
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("key_mapping", {_WRAPPER_PREFIXES: ""})
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model._materialize_buffers()
        problems = []
        for label, key in (("missing", "missing_keys"), ("unexpected", "unexpected_keys")):
            names = sorted(str(k) for k in info.get(key) or ())
            if names:
                problems.append(f"{label} keys: {', '.join(names)}")
        wrong = [f"{k[0]} {tuple(k[1])} vs {tuple(k[2])}" for k in info.get("mismatched_keys") or ()]
        if wrong:
            problems.append(f"wrong shapes: {', '.join(sorted(wrong))}")
        if problems:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path", "")
            raise ValueError(f"{where}: the weights do not match config.json ({'; '.join(problems)})")
        return (model, info) if want_info else model

    def _materialize_buffers(self) -> None:
        """transformers 4 leaves non-persistent buffers (the rotary tables, never saved) on the
        meta device, and `.to(device)` then fails: make them empty tables, rebuilt on first use."""
        device = self.model.lm_head.weight.device
        for module in self.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.is_meta:
                    module._buffers[name] = torch.empty(0, dtype=buf.dtype, device=device)
        self.model._rotary_len = 0

    # --- transformers plumbing ---------------------------------------------------------
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    @property
    def gpt(self) -> GPT:
        """The poelm model (the same object as `self.model`)."""
        return self.model

    def depth(self) -> int:
        """Layers a forward pass runs now: config.num_hidden_layers, read at call time."""
        depth = int(self.config.num_hidden_layers)
        n_layer = self.model.config.n_layer
        if not 1 <= depth <= n_layer:
            raise ValueError(f"config.num_hidden_layers={depth} must be between 1 and n_layer={n_layer}")
        return depth

    # --- forward ----------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                past_key_values=None, use_cache: bool | None = None, labels: torch.LongTensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, inputs_embeds: torch.Tensor | None = None,
                return_dict: bool | None = None, **kwargs) -> CausalLMOutputWithPast:
        if inputs_embeds is not None:
            raise ValueError("this model takes input_ids, not inputs_embeds "
                             "(its smear and value embeddings read token ids)")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if use_cache is None:  # transformers' default, except when training or computing a loss
            use_cache = bool(self.config.use_cache) and not self.training and labels is None
        depth = self.depth()
        cache = past_key_values if isinstance(past_key_values, PoECache) else None
        foreign = past_key_values is not None and cache is None
        if foreign and (not hasattr(past_key_values, "get_seq_length") or past_key_values.get_seq_length() > 0):
            raise ValueError(f"past_key_values is a {type(past_key_values).__name__} with content; this model keeps "
                             "its keys and values in a PoECache: pass the past_key_values it returned")
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        pad = self._left_padding(attention_mask, B, past, T)
        if cache is None and (use_cache or pad is not None):
            cache = PoECache(self.model, B, pad, capacity=past + T)
        if cache is None:
            x, kept = self._run(input_ids, depth)
        else:
            x, kept = self._run_cached(input_ids, depth, cache)
        if isinstance(logits_to_keep, int):
            if logits_to_keep > 0:
                x = x[:, -logits_to_keep:]
                kept = {i: t[:, -logits_to_keep:] for i, t in kept.items()}
        else:
            x = x[:, logits_to_keep]
            kept = {i: t[:, logits_to_keep] for i, t in kept.items()}
        logits = self._readout(x, kept, depth)
        loss = None
        if labels is not None:
            targets = labels[:, 1:].reshape(-1).to(logits.device)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets, ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache if use_cache else None)

    def _left_padding(self, mask: torch.Tensor | None, B: int, past: int, T: int) -> torch.Tensor | None:
        """Leading pad slots per row (None: no padding) from a (B, past+T) attention mask."""
        if mask is None:
            return None
        if mask.dim() != 2 or mask.shape[0] != B or mask.shape[1] != past + T:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected ({B}, {past + T}) "
                             f"({past} cached + {T} new positions)")
        if past > 0:  # the cache already knows its rows' padding
            return None
        m = mask.to(torch.bool)
        if bool(m.all()):
            return None
        pad = (m.long().cumsum(1) == 0).sum(1)
        count = m.sum(1)
        slots = torch.arange(m.shape[1], device=m.device).unsqueeze(0)
        inside = (slots >= pad.unsqueeze(1)) & (slots < (pad + count).unsqueeze(1))
        if not bool((m == inside).all()):
            raise ValueError("attention_mask has zeros between real tokens; only left (or right) padding is supported")
        return pad if bool((pad > 0).any()) else None

    def _run(self, idx: torch.Tensor, depth: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Full-sequence pass through the first `depth` layers (no cache, no padding): the last
        residual and those the final readout needs."""
        m = self.model
        x = x0 = m.embed(idx)
        return m.run_layers(x, x0, idx, 0, depth, keep=self._keep(depth))

    def _run_cached(self, idx: torch.Tensor, depth: int, cache: PoECache) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        m, kv = self.model, cache.kv
        start, T = kv.n_tokens, idx.shape[1]
        for i in range(depth):
            if kv.lengths[i] < start:
                raise ValueError(f"this cache holds layer {i} for {kv.lengths[i]} of {start} positions: it was filled "
                                 f"with fewer layers (num_hidden_layers); start a new cache for a deeper pass")
            kv.lengths[i] = start
        cache.reserve(start + T)
        x = x0 = m.embed(idx, kv)
        return m.run_layers(x, x0, idx, 0, depth, kv, start, keep=self._keep(depth))

    def _keep(self, depth: int) -> set[int]:
        return self.model.final_keep() if depth == self.model.config.n_layer else set()

    def _readout(self, x: torch.Tensor, kept: dict[int, torch.Tensor], depth: int) -> torch.Tensor:
        m, cfg = self.model, self.model.config
        if depth == cfg.n_layer:
            return m.readout(x, None, kept.get(cfg.backout_layer), [kept.get(e) for e in cfg.stage_ends])
        if depth - 1 in cfg.stage_ends:
            return m.readout(x, cfg.stage_ends.index(depth - 1))
        logits = rmsnorm(x) @ m.lm_head.weight.t()  # shared head only: no stage head belongs here
        return softcap(logits[..., : cfg.vocab_size].float())

    # --- generation -------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values=None,
                                      attention_mask: torch.Tensor | None = None, inputs_embeds=None,
                                      use_cache: bool = True, logits_to_keep=None, next_sequence_length=None,
                                      **kwargs) -> dict:
        """The positions the cache has not seen yet (counted from the cache itself, not cache_position)."""
        if inputs_embeds is not None:
            raise ValueError("this model generates from input_ids, not inputs_embeds")
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past > 0:
            if attention_mask is not None:
                new = attention_mask.shape[1] - past
            elif next_sequence_length is not None:
                new = int(next_sequence_length)
            else:
                new = input_ids.shape[1] - past
            if new < 1:
                raise ValueError(f"the cache already holds {past} positions of a {input_ids.shape[1]}-token input; "
                                 "crop it or pass new tokens")
            input_ids = input_ids[:, -new:]
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "past_key_values": past_key_values,
                  "use_cache": use_cache}
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    def _reorder_cache(self, past_key_values, beam_idx):  # transformers 4 beam search
        past_key_values.reorder_cache(beam_idx)
        return past_key_values
