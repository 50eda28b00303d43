"""Inside poelm: the model definition the remote code imports relatively (`from .poe_model import ...`).

`poelm export` writes the real `poelm/model.py` under this name beside the remote-code files,
so an exported directory and poelm share one architecture definition.
"""

from poelm.model import STANDARD_NAMES, GPT, GPTConfig, KVCache, rmsnorm, softcap  # noqa: F401
