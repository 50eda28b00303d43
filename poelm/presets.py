"""Named model shapes: the released checkpoints and small ones for CPU work.

    from poelm.presets import get_preset
    config = get_preset("poe-1.3b")          # a GPTConfig
    poelm inspect poe-1.3b --json            # tensors / params / stages on the meta device
"""

from __future__ import annotations

from poelm.model import GPTConfig

PRESETS: dict[str, dict] = {
    # The released pair: nanochat d24, vocab 32,768, MHA, 4 x 6 stages (175 tensors, 1,384,122,122 params).
    "bp-1.3b": dict(n_layer=24, vocab_size=32768, poe_every=6, poe_mode="none"),
    "poe-1.3b": dict(n_layer=24, vocab_size=32768, poe_every=6, poe_mode="flat"),
    # The 1.5B family: GQA (6 KV heads), vocab 48,000, stages (12, 5, 4, 3), per-stage heads.
    "poe-1.5b": dict(n_layer=24, vocab_size=48000, n_kv_head=6, poe_stage_layers=(12, 5, 4, 3),
                     per_stage_head=True, poe_mode="residual_logop"),
    # The 3B: depth 32, width 2048, 16 heads / 8 KV heads, MLP 12,800, stages (16, 6, 5, 5).
    "poe-3b": dict(n_layer=32, n_embd=2048, n_head=16, n_kv_head=8, intermediate_size=12800, vocab_size=32768,
                   poe_stage_layers=(16, 6, 5, 5), per_stage_head=True, poe_mode="flat"),
    # Small shapes for CPU experiments and tests (vocab set by the tokenizer at train time).
    "tiny": dict(n_layer=4, n_embd=128, n_head=2, vocab_size=4096, sequence_len=256, poe_every=1),
    "small": dict(n_layer=8, n_embd=256, n_head=4, vocab_size=8192, sequence_len=512, poe_every=2),
}


def get_preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})
