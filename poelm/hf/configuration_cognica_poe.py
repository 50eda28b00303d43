"""transformers configuration of the Cognica BP / PoE models (remote code).

    from transformers import AutoConfig
    config = AutoConfig.from_pretrained("path/to/export", trust_remote_code=True)
    config.to_gpt_config()          # the poelm GPTConfig the model is built from

The architecture is poelm's `GPTConfig` (`poe_model.py` beside this file is a copy of
`poelm/model.py`): every GPTConfig field is an attribute of this config, with GPTConfig's
defaults and derivations (sizes from depth, stage layout, backout). On top of them this class
keeps the standard names transformers reads:

    num_hidden_layers        the depth a forward pass runs (default n_layer). transformers'
                             `assistant_early_exit` lowers it while drafting; the model reads it
                             at call time (see modeling_cognica_poe.py for the readout it uses)
    hidden_size              n_embd
    num_attention_heads      n_head
    num_key_value_heads      n_kv_head
    max_position_embeddings  sequence_len
    vocab_size, intermediate_size, head_dim   the same names in both

A config that only has the standard names (no n_layer, n_embd, ...) is accepted: they fill
in the missing GPTConfig fields. Weights are never tied (`tie_word_embeddings=False`).
"""

from dataclasses import fields

from transformers import PretrainedConfig

from .poe_model import STANDARD_NAMES, GPTConfig  # STANDARD_NAMES: field -> transformers name

GPT_FIELDS = tuple(f.name for f in fields(GPTConfig))


class CognicaPoEConfig(PretrainedConfig):
    model_type = "cognica_poe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, **kwargs):
        arch = {name: kwargs.pop(name) for name in GPT_FIELDS if name in kwargs}
        standard = {name: kwargs.pop(name, None) for name in STANDARD_NAMES.values()}
        for field, name in STANDARD_NAMES.items():
            if arch.get(field) is None and standard[name] is not None:
                arch[field] = standard[name]
        if arch.get("poe_stage_layers") is not None:
            arch["poe_stage_layers"] = tuple(arch["poe_stage_layers"])
        gpt = GPTConfig(**arch)  # validates and derives every size
        for name, value in gpt.to_dict().items():
            setattr(self, name, value)
        depth = standard["num_hidden_layers"]
        self.num_hidden_layers = gpt.n_layer if depth is None else int(depth)
        if not 1 <= self.num_hidden_layers <= gpt.n_layer:
            raise ValueError(f"num_hidden_layers={self.num_hidden_layers} must be between 1 and n_layer={gpt.n_layer}")
        self.hidden_size = gpt.n_embd
        self.num_attention_heads = gpt.n_head
        self.num_key_value_heads = gpt.n_kv_head
        self.max_position_embeddings = gpt.sequence_len
        self.use_cache = kwargs.pop("use_cache", True)
        kwargs["tie_word_embeddings"] = False  # lm_head and wte are separate tensors
        super().__init__(**kwargs)

    def to_gpt_config(self) -> GPTConfig:
        """The poelm GPTConfig of this model (num_hidden_layers is not part of it)."""
        arch = {name: getattr(self, name) for name in GPT_FIELDS}
        if arch.get("poe_stage_layers") is not None:
            arch["poe_stage_layers"] = tuple(arch["poe_stage_layers"])
        return GPTConfig(**arch)
