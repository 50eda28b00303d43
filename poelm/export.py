"""Write a model as a Hugging Face directory (docs/formats.md, "Hugging Face layout").

    from poelm.export import export_model
    export_model(model, tokenizer, "out/hf", dtype=torch.bfloat16)

    poelm export runs/tiny --out out/hf [--dtype bf16|fp32]
    poelm export runs/tiny --out out/hf-s1 --stages 1       # elastic depth: the first stage alone

`--stages K` (`truncate(model, K)`) writes a standalone model of the first K stages (docs/poe.md §3):
its own config (n_layer, poe_stage_layers; source_n_layer keeps the windows and value
embeddings of the source) and only those layers' tensors; its final readout is stage K-1's
readout of the source (no backout), so its logits equal that stage's.

The directory then loads with transformers (`AutoConfig`, `AutoModelForCausalLM`,
`AutoTokenizer`, `trust_remote_code=True`) and with every poelm command:

    config.json                  GPTConfig fields + model_type, architectures, auto_map (strings
                                 only), num_hidden_layers, hidden_size, num_attention_heads,
                                 num_key_value_heads, max_position_embeddings, vocab_size, ...
    model.safetensors            docs/model.md's tensor names, in --dtype (bf16 like the releases)
    generation_config.json       bos / eos (<|bos|>, <|assistant_end|>) / pad ids, plus whatever
                                 the source directory stored there (WAND calibration)
    configuration_cognica_poe.py, modeling_cognica_poe.py, tokenization_cognica_poe.py
    poe_model.py, poe_tokenizer.py   copies of poelm/model.py and poelm/tokenizer.py, which the
                                 remote code imports relatively (one definition of each)
    tokenizer.pkl, token_bytes.pt, tokenizer_config.json (auto_map.AutoTokenizer =
                                 [slow class, null]), special_tokens_map.json
    .poelm-output.json           poelm's output marker (names and sizes of the files above): a
                                 later export replaces this directory only while it matches

No `tokenizer.json` is written: transformers would take it for a fast-tokenizer file.
Everything is written to a temporary directory first and renamed into place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from poelm.atomic import atomic_dir, atomic_write_json
from poelm.checkpoint import CONFIG_NAME, GENERATION_CONFIG_NAME, check_replaceable, save_model
from poelm.chat import ASSISTANT_END, BOS
from poelm.codec import to_config_json
from poelm.model import GPT, GPTConfig
from poelm.outputs import EXPORT_KIND, mark_output
from poelm.tokenizer import TOKENIZER_JSON_NAME


def hf_config(model: GPT, tokenizer=None, dtype: torch.dtype = torch.bfloat16) -> dict:
    """config.json of an export."""
    d = to_config_json(model.config, str(dtype).replace("torch.", ""))
    d.update({"tie_word_embeddings": False, "use_cache": True})
    if tokenizer is not None:
        bos = tokenizer.bos_token_id
        d.update({"bos_token_id": bos, "eos_token_id": bos, "pad_token_id": bos})
    return d


def tokenizer_files(tokenizer, sequence_len: int) -> dict[str, dict]:
    """tokenizer_config.json and special_tokens_map.json of an export; tokenizer_config.json
    carries poelm's chat format as `chat_template` when the tokenizer has its special tokens."""
    from poelm.chat import CHAT_SPECIALS, CHAT_TEMPLATE
    from poelm.hf import TOKENIZER_CLASS

    special = {"bos_token": BOS, "eos_token": BOS, "pad_token": BOS}
    specials = tokenizer.special_tokens
    added = {str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for name, i in sorted(specials.items(), key=lambda kv: kv[1])}
    config = {
        "tokenizer_class": TOKENIZER_CLASS.split(".")[-1],
        "auto_map": {"AutoTokenizer": [TOKENIZER_CLASS, None]},
        **special,
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "padding_side": "left",
        "model_max_length": sequence_len,
        "added_tokens_decoder": added,
    }
    if all(name in specials for name in CHAT_SPECIALS):
        config["chat_template"] = CHAT_TEMPLATE
    return {"tokenizer_config.json": config, "special_tokens_map.json": special}


def generation_defaults(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    bos = tokenizer.bos_token_id
    eos = [bos]
    end = tokenizer.special_tokens.get(ASSISTANT_END)
    if end is not None:
        eos.append(end)
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": bos}


def export_model(model: GPT, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16,
                 generation_config: dict | None = None, sources: tuple = (), overwrite: bool = False) -> Path:
    """Write the whole Hugging Face layout of `model` (+ `tokenizer`) into out_dir. An
    existing out_dir is replaced only when it is a previous poelm model directory unchanged
    since (its output marker, poelm.outputs) or with `overwrite`, and never when it is,
    contains or lies inside one of `sources`."""
    from poelm.hf import REMOTE_CODE_FILES

    check_replaceable(out_dir, sources=sources, overwrite=overwrite)

    if tokenizer is not None and tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"tokenizer vocab {tokenizer.vocab_size} != model vocab {model.config.vocab_size}; "
                         "export the model with the tokenizer it was trained with")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as stage:
        gen = {**(generation_config or {}), **generation_defaults(tokenizer)}
        save_model(model, stage, tokenizer, dtype=dtype, generation_config=gen)
        atomic_write_json(stage / CONFIG_NAME, hf_config(model, tokenizer, dtype))
        if not gen:
            (stage / GENERATION_CONFIG_NAME).unlink(missing_ok=True)
        (stage / TOKENIZER_JSON_NAME).unlink(missing_ok=True)
        if tokenizer is not None:
            for name, obj in tokenizer_files(tokenizer, model.config.sequence_len).items():
                atomic_write_json(stage / name, obj)
        for name, source in REMOTE_CODE_FILES.items():
            shutil.copyfile(source, stage / name)
        mark_output(stage, EXPORT_KIND)
        _share(stage)
    return out_dir


def truncate(model: GPT, n_stages: int) -> GPT:
    """A standalone model of the first n_stages stages: logits == stage n_stages-1's readout of model."""
    cfg = model.config
    if cfg.is_specialist():
        raise ValueError("--stages: truncating a specialist is not supported; truncate its base model instead")
    if not (isinstance(n_stages, int) and 1 <= n_stages < cfg.n_stages):
        raise ValueError(f"--stages {n_stages}: this model has {cfg.n_stages} stages; keep 1..{cfg.n_stages - 1} of them "
                         "(export the whole model without --stages)")
    n = cfg.stage_ends[n_stages - 1] + 1
    d = cfg.to_dict()
    d.update(n_layer=n, poe_stage_layers=list(cfg.poe_stage_layers[:n_stages]), poe_every=None,
             source_n_layer=cfg.source_n_layer or cfg.n_layer, final_readout="last", backout=False)
    small = GPT(GPTConfig.from_dict(d)).to(model.lm_head.weight.device, model.lm_head.weight.dtype)
    keep = small.state_dict()
    src = model.state_dict()
    state = {k: src[k][:n] if k in ("resid_lambdas", "x0_lambdas") else src[k] for k in keep}
    small.load_state_dict(state)
    if small.windows != model.windows[:n]:
        raise RuntimeError(f"truncated windows {small.windows} != source {model.windows[:n]}")
    return small.eval()


def _share(directory: Path) -> None:
    """Ordinary permissions (the temporary files are created private): rw-r--r-- under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o755 & ~umask)
    for f in directory.iterdir():
        f.chmod(0o644 & ~umask)


def source_generation_config(spec: str) -> dict:
    """generation_config.json of MODEL's directory (a run resolves to its latest checkpoint), or {}."""
    from poelm.checkpoint import resolve_run_dir
    from poelm.engine.calibrate import read_generation_config

    path = Path(spec)
    if not path.is_dir():
        return {}
    path = resolve_run_dir(path) or path
    file = path / GENERATION_CONFIG_NAME
    if not file.exists():
        return {}
    return read_generation_config(file)
