"""Exact prefix caching: prompts that begin with tokens already prefilled (a shared system
prompt, the earlier turns of a chat) reuse their keys and values instead of recomputing them.

    cache = PrefixCache(budget_bytes=256 << 20)
    handles = add_rows(decoder, prompts, cache, ("base", None), grammars)   # prefill only what is new
    cache.queries, cache.hits                                          # prompt tokens asked / reused

The cache holds blocks of BLOCK tokens: a block's key is a BLAKE2 digest chained over the root
(model, head mode, the layers the decoder keeps) and every token up to the block's end, so a
block is found only after the very same tokens; its value is the K/V of those positions in
every layer the decoder runs, copied out of the decoder right after a prefill (prompt positions
are then complete in every mode: WAND's lazy back-fill and speculative's scratch slots only ever
touch positions after the prompt). A joining row takes the longest chain of cached blocks
before its pending token and prefills only the rest (Decoder.add_prefixed_row). The blocks'
bytes stay within the budget: the least recently used go first, and a hit refreshes the later
blocks of its chain before the earlier ones, so a chain is cut from its tail.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

BLOCK = 16  # tokens per cached block


class PrefixCache:
    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"the prefix cache budget must be >= 0 bytes (--kv-cache-bytes), got {budget_bytes}")
        self.budget = budget_bytes
        self.blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # digest -> (2, layers, heads, BLOCK, dim)
        self.bytes = 0
        self.queries = 0  # prompt tokens looked up (each row's prompt but its pending token)
        self.hits = 0  # of them, the tokens whose K/V came from the cache

    @staticmethod
    def digests(root: tuple, tokens: list[int]) -> list[bytes]:
        """The chained key of every full block of `tokens`."""
        h = hashlib.blake2b(repr(root).encode(), digest_size=16).digest()
        out = []
        for i in range(len(tokens) // BLOCK):
            block = tokens[i * BLOCK:(i + 1) * BLOCK]
            h = hashlib.blake2b(h + b"".join(t.to_bytes(4, "little") for t in block), digest_size=16).digest()
            out.append(h)
        return out

    def lookup(self, root: tuple, prompt: list[int]) -> torch.Tensor | None:
        """K/V of the longest cached prefix of prompt (its pending last token excluded), or None."""
        usable = prompt[:-1]
        self.queries += len(usable)
        found = []
        for d in self.digests(root, usable):
            if d not in self.blocks:
                break
            found.append(d)
        if not found:
            return None
        for d in reversed(found):  # the chain's head ends up the most recent: eviction cuts tails first
            self.blocks.move_to_end(d)
        self.hits += len(found) * BLOCK
        return torch.cat([self.blocks[d] for d in found], dim=3)

    def insert(self, root: tuple, prompt: list[int], kv_of) -> None:
        """Cache the full blocks of prompt's computed positions; kv_of(n) -> their K/V (first n positions)."""
        if not self.budget:
            return
        digests = self.digests(root, prompt[:-1])
        new = [i for i, d in enumerate(digests) if d not in self.blocks]
        if not new:
            return
        kv = kv_of(len(digests) * BLOCK)
        for i in new:
            block = kv[:, :, :, i * BLOCK:(i + 1) * BLOCK].clone()
            self.blocks[digests[i]] = block
            self.bytes += block.numel() * block.element_size()
        for d in reversed(digests[:new[0]]):
            self.blocks.move_to_end(d)
        self.evict()

    def evict(self) -> None:
        while self.bytes > self.budget and self.blocks:
            _, block = self.blocks.popitem(last=False)
            self.bytes -= block.numel() * block.element_size()


def add_rows(decoder, prompts: list[list[int]], cache: PrefixCache | None, root: tuple,
             grammars: list | None = None) -> list[int]:
    """decoder.add_rows(prompts, grammars), reusing and filling `cache` (None: no caching) -> handles in order."""
    if cache is None or not cache.budget:
        return decoder.add_rows(prompts, grammars)
    grammars = grammars or [decoder.opts.constraint] * len(prompts)
    root = (*root, decoder.end_layer)
    prefixes = [cache.lookup(root, p) for p in prompts]
    handles: list[int | None] = [None] * len(prompts)
    misses = [i for i, kv in enumerate(prefixes) if kv is None]
    if misses:
        for i, h in zip(misses, decoder.add_rows([prompts[i] for i in misses], [grammars[i] for i in misses])):
            handles[i] = h
    for i, kv in enumerate(prefixes):
        if kv is not None:
            handles[i] = decoder.add_prefixed_row(prompts[i], kv, grammars[i])
    for p, h in zip(prompts, handles):
        cache.insert(root, p, lambda n, h=h: decoder.prompt_kv(h, n))
    return handles
