"""Inside poelm: the tokenizer module the remote code imports relatively (`from .poe_tokenizer import ...`).

`poelm export` writes the real `poelm/tokenizer.py` under this name beside the remote-code
files, so the exported tokenizer and poelm share one implementation (and one safe unpickler).
"""

from poelm.tokenizer import SPECIAL_TOKENS, Tokenizer, _encoding_from_pickle, load_token_bytes  # noqa: F401
