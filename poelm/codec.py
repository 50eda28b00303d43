"""GPTConfig to and from the files a model's settings are written in: config.json (poelm's
model directories and the Hugging Face exports) and the PoE fork's nanochat `meta_*.json`.
GPTConfig (poelm/model.py) is the one source; this module is its codec (its command-line
flags are poelm/flags.py's).

    from poelm.codec import to_config_json, read_config_json, from_nanochat_meta
    d = to_config_json(config, dtype="bfloat16")     # GPTConfig fields + the standard HF names
    config = read_config_json("out/model/config.json")
    config = from_nanochat_meta(json.load(open("meta_026430.json")))

A new GPTConfig field appears in all of these without another edit: config.json carries
`to_dict()`, and a nanochat meta written by poelm carries every field the fork's own does
not define.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from poelm.jsonfile import read_json_object
from poelm.model import STANDARD_NAMES, GPTConfig

MODEL_TYPE = "cognica_poe"
# Fields written next to GPTConfig's own for transformers (read back only by transformers).
HF_FIELDS = ("model_type", "architectures", "auto_map", "num_hidden_layers", "hidden_size", "num_attention_heads",
             "num_key_value_heads", "max_position_embeddings", "torch_dtype", "dtype", "bos_token_id",
             "eos_token_id", "pad_token_id", "transformers_version", "tie_word_embeddings", "use_cache",
             "_name_or_path",
             # what transformers' save_pretrained may add (PretrainedConfig's own attributes, 4.x and 5.x)
             "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
             "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "id2label",
             "label2id", "problem_type", "tokenizer_class", "prefix", "task_specific_params", "torchscript",
             "pruned_heads", "finetuning_task", "sep_token_id", "decoder_start_token_id", "tf_legacy_loss",
             "use_bfloat16", "attn_implementation", "chat_template")


# -----------------------------------------------------------------------------
# config.json (poelm model directories and Hugging Face exports)


def to_config_json(config: GPTConfig, dtype: str = "float32") -> dict:
    d = config.to_dict()
    d.update({
        "model_type": MODEL_TYPE,
        "architectures": ["CognicaPoEForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_cognica_poe.CognicaPoEConfig",
            "AutoModelForCausalLM": "modeling_cognica_poe.CognicaPoEForCausalLM",
        },
        **{name: getattr(config, field) for field, name in STANDARD_NAMES.items()},
        "torch_dtype": dtype,
    })
    return d


def from_config_json(d: dict) -> GPTConfig:
    """GPTConfig from config.json; the standard transformers names fill in missing fields
    (num_hidden_layers is the HF-side runtime depth and may be smaller than n_layer)."""
    if not isinstance(d, dict):
        raise ValueError(f"config must be a JSON object of fields, got {json.dumps(d)[:40]} ({type(d).__name__})")
    d = dict(d)
    for field, name in STANDARD_NAMES.items():
        if d.get(field) is None and d.get(name) is not None:
            d[field] = d[name]
    config = GPTConfig.from_dict({k: v for k, v in d.items() if k not in HF_FIELDS})
    for field, name in STANDARD_NAMES.items():
        if name != "num_hidden_layers" and d.get(name) is not None and d[name] != getattr(config, field):
            raise ValueError(f"config {name}={d[name]} disagrees with {field}={getattr(config, field)}; fix one of them")
    return config


def read_config_json(path: str | Path) -> GPTConfig:
    """GPTConfig from a config.json file (a bounded read); every error is one line that starts with its path."""
    d = read_json_object(path, "a model config", "re-export the model or fix the file")
    try:
        return from_config_json(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# -----------------------------------------------------------------------------
# nanochat meta_*.json (docs/formats.md "nanochat checkpoints")

# What the PoE fork's base_train.py writes into meta_*.json: model_config is asdict() of its
# GPTConfig; user_config is vars(args) of its flags.
NANOCHAT_ARCH = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern",
                 "per_stage_head", "poe_every", "intermediate_size")
SPECIALIST_FIELDS = ("dual_head", "frozen_layers", "base_model_dir")
# The GPTConfig fields the fork's model_config does not define: poelm writes them there so
# that its own reload restores them (the fork never writes them).
POELM_MODEL_FIELDS = tuple(f.name for f in fields(GPTConfig) if f.name not in NANOCHAT_ARCH)
# everything else in a meta (step, val_bpb, loop_state, dataloader state, batch sizes, the other
# training flags of user_config) only matters to resuming training and is ignored on purpose


def from_nanochat_meta(meta: dict, poe_mode: str | None = None) -> GPTConfig:
    """GPTConfig from a nanochat meta_*.json as the PoE fork writes it. The imported model
    reproduces the fork's own forward: backout on the plain final path (BP and PoE alike), and
    for per-stage-head models the Log-OP of all stages, weight 1/K (the fork's forward leaves
    its poe_alpha argument at 0 outside training), recorded as final_readout="logop"."""
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise ValueError("a nanochat meta must be a JSON object with a model_config object")
    mc, user = meta["model_config"], meta.get("user_config") or {}
    if not isinstance(user, dict):
        raise ValueError(f"user_config must be a JSON object of training flags, got {type(user).__name__}")
    for key in SPECIALIST_FIELDS:
        value = mc.get(key) or user.get(key) or meta.get(key)
        if value:
            raise ValueError(f"nanochat checkpoint has {key}={value!r}: it is a PoE-fork specialist, whose "
                             "state-dict layout poelm does not know; import its base and attach a poelm "
                             "specialist (`poelm specialist attach`, deltas via --delta)")
    unknown = sorted(set(mc) - set(NANOCHAT_ARCH) - set(SPECIALIST_FIELDS) - set(POELM_MODEL_FIELDS))
    if unknown:
        raise ValueError(f"model_config has unknown field(s) {', '.join(unknown)}, which may change the forward; "
                         f"poelm reads {', '.join(NANOCHAT_ARCH + POELM_MODEL_FIELDS)} and ignores on purpose the "
                         "training-only fields (step, val_bpb, loop_state, dataloader_state_dict, batch sizes, "
                         "user_config flags other than poe_mode / poe_alpha / poe_every)")
    mode = poe_mode or mc.get("poe_mode") or user.get("poe_mode") or "none"
    kw = {k: mc[k] for k in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern",
                             "per_stage_head") + POELM_MODEL_FIELDS
          if k not in ("poe_mode", "poe_stage_layers") and mc.get(k) is not None}
    if mc.get("intermediate_size"):  # the fork's 0 means 4 * n_embd, GPTConfig's default
        kw["intermediate_size"] = mc["intermediate_size"]
    if "poe_alpha" not in kw and user.get("poe_alpha") is not None:
        kw["poe_alpha"] = user["poe_alpha"]
    every = user.get("poe_every", mc.get("poe_every"))
    if mc.get("poe_stage_layers") is not None:
        kw["poe_stage_layers"] = mc["poe_stage_layers"]
    elif every and (mode != "none" or kw.get("per_stage_head")):  # BP: the default stage layout
        n_layer = mc.get("n_layer")
        if isinstance(every, int) and isinstance(n_layer, int) and every > 0 and n_layer % every:
            kw["poe_stage_layers"] = [every] * (n_layer // every) + [n_layer % every]  # the fork's last short stage
        else:
            kw["poe_every"] = every
    if kw.get("per_stage_head") and "final_readout" not in kw:
        kw.update(final_readout="logop", final_logop_alpha=0.0)
    if "backout" not in kw:
        kw["backout"] = kw.get("final_readout", "last") == "last"
    return GPTConfig.from_dict({"poe_mode": mode, **kw})


def to_nanochat_meta(config: GPTConfig) -> dict:
    """model_config + user_config the way the fork writes them, plus every GPTConfig field the
    fork does not define (so poelm's own reload restores them)."""
    d = config.to_dict()
    mc = {k: d[k] for k in NANOCHAT_ARCH}
    mc.update(dual_head=False, frozen_layers=0, poe_every=config.poe_every or 0)
    mc.update({k: d[k] for k in POELM_MODEL_FIELDS if k not in ("poe_mode", "poe_alpha")})
    user = {"poe_mode": config.poe_mode, "poe_alpha": config.poe_alpha, "poe_every": config.poe_every or 1}
    return {"model_config": mc, "user_config": user}
