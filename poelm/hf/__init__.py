"""The Hugging Face remote code of the Cognica BP / PoE models, importable natively too.

    from poelm.hf import CognicaPoEConfig, CognicaPoEForCausalLM, CognicaPoETokenizer
    from poelm.hf import register; register()      # AutoConfig / AutoModelForCausalLM / AutoTokenizer
                                                   # then load exports without trust_remote_code

The three `*_cognica_poe.py` files are what `poelm export` writes into a model directory, next
to copies of `poelm/model.py` (as `poe_model.py`), `poelm/tokenizer.py` (as `poe_tokenizer.py`)
and `poelm/chat.py` (as `poe_chat.py`) that they import relatively; here those three names are
thin modules that re-export poelm's own. Importing this package does not import transformers; the classes load
on first use.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
# remote-code file name in an export -> the file it is copied from
REMOTE_CODE_FILES = {
    "configuration_cognica_poe.py": HERE / "configuration_cognica_poe.py",
    "modeling_cognica_poe.py": HERE / "modeling_cognica_poe.py",
    "tokenization_cognica_poe.py": HERE / "tokenization_cognica_poe.py",
    "poe_model.py": HERE.parent / "model.py",
    "poe_tokenizer.py": HERE.parent / "tokenizer.py",
    "poe_chat.py": HERE.parent / "chat.py",
}
CONFIG_CLASS = "configuration_cognica_poe.CognicaPoEConfig"
MODEL_CLASS = "modeling_cognica_poe.CognicaPoEForCausalLM"
TOKENIZER_CLASS = "tokenization_cognica_poe.CognicaPoETokenizer"

_LAZY = {
    "CognicaPoEConfig": "configuration_cognica_poe",
    "CognicaPoEForCausalLM": "modeling_cognica_poe",
    "CognicaPoEPreTrainedModel": "modeling_cognica_poe",
    "PoECache": "modeling_cognica_poe",
    "CognicaPoETokenizer": "tokenization_cognica_poe",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register the classes with transformers' Auto classes (model_type "cognica_poe")."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .configuration_cognica_poe import CognicaPoEConfig
    from .modeling_cognica_poe import CognicaPoEForCausalLM
    from .tokenization_cognica_poe import CognicaPoETokenizer

    AutoConfig.register(CognicaPoEConfig.model_type, CognicaPoEConfig, exist_ok=True)
    AutoModelForCausalLM.register(CognicaPoEConfig, CognicaPoEForCausalLM, exist_ok=True)
    AutoTokenizer.register(CognicaPoEConfig, slow_tokenizer_class=CognicaPoETokenizer, exist_ok=True)
