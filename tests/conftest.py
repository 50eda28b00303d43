"""Shared fixtures: tiny models (~1 M parameters or less) that run in seconds on 2 cores."""

import pytest
import torch

from poelm.model import GPT, GPTConfig

torch.set_num_threads(1)  # tiny models: one thread is faster and immune to a busy second core


def tiny_config(**overrides) -> GPTConfig:
    base = dict(n_layer=4, n_embd=64, n_head=4, n_kv_head=2, vocab_size=300, sequence_len=64, short_window=8,
                poe_every=1, poe_mode="flat")
    base.update(overrides)
    return GPTConfig(**base)


def tiny_model(seed: int = 0, noise: float = 0.05, **overrides) -> GPT:
    """A random-init model with noise on every parameter (the zero-init projections
    would otherwise make every block an identity)."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model


def noisy_projections(model: GPT) -> None:
    """N(0, 0.02) on the zero-initialised c_proj weights. At the standard init every block is the
    identity and every readout RMS-normed, so some gradients are exactly zero and AdamW (eps 1e-10)
    turns their rounding noise into full +-lr steps whose sign depends on summation order: runs
    compared across processes start from this init instead."""
    with torch.no_grad():
        for block in model.transformer.h:
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.normal_(0.0, 0.02)


@pytest.fixture
def make_model():
    return tiny_model
