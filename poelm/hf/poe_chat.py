"""Inside poelm: the chat-format module the remote tokenizer imports relatively (`from .poe_chat import ...`).

`poelm export` writes the real `poelm/chat.py` under this name beside the remote-code files,
so transformers' apply_chat_template and poelm render conversations with one set of rules.
"""

from poelm.chat import CHAT_TEMPLATE, render_conversation, render_prompt  # noqa: F401
