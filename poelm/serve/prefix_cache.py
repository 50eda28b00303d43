"""Exact prefix caching: prompts that begin with tokens already computed (a shared system
prompt, the earlier turns of a chat, the replies to them) reuse their keys and values instead
of recomputing them.

    cache = PrefixCache(budget_bytes=256 << 20)
    handles = add_rows(decoder, prompts, cache, ("base", None), grammars)   # prefill only what is new
    cache_row(decoder, handle, tokens, cache, ("base", None))          # a finished row: prompt + reply
    cache.queries, cache.hits                                          # prompt tokens asked / reused

The cache holds blocks of BLOCK tokens: a block's key is a BLAKE2 digest chained over the root
(model, head mode, the layers the decoder keeps) and every token up to the block's end, so a
block is found only after the very same tokens; its value is the K/V of those positions in
every layer the decoder runs. New blocks are copied out of the decoder at two moments: after
a row's prefill (the prompt), and when the row leaves (finished, stopped, cancelled or expired:
prompt + generated tokens, so a chat's next turn, whose prompt repeats the reply, reuses it).
Only positions the decoder reports complete (Decoder.computed) are taken: never the pending
last token (no K/V yet), never WAND's positions whose deeper stages still wait for their lazy
back-fill, never speculative's rejected draft slots (past the row's slots). Cached K/V are those
a prefill would compute, up to the rounding of a computation of another shape (a reply's came
from decode steps, a prompt's from a prefill of another length): the logits move by no more
than test_engine.py's cross-shape bound, so no token changes where its decision is wider than
that (tests/test_engine_process.py checks both).

A joining row takes the longest chain of cached blocks before its pending token and prefills
only the rest (Decoder.add_prefixed_row). The blocks' bytes stay within the budget: the least
recently used go first, and a hit or an insert refreshes the later blocks of its chain before
the earlier ones, so a chain is cut from its tail.
"""

from __future__ import annotations

import hashlib
import struct
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
            h = hashlib.blake2b(h + struct.pack(f"<{BLOCK}I", *block), digest_size=16).digest()
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

    def insert(self, root: tuple, tokens: list[int], kv_of) -> None:
        """Cache the full blocks of `tokens`, every one of them computed; kv_of(start, end) -> the
        K/V of positions start..end-1 (only the blocks not yet cached are read)."""
        if not self.budget:
            return
        digests = self.digests(root, tokens)
        new = [i for i, d in enumerate(digests) if d not in self.blocks]
        if new:
            first = new[0] * BLOCK
            kv = kv_of(first, len(digests) * BLOCK)  # (2, layers, heads, positions from the first new block, dim)
            for i in new:
                block = kv[:, :, :, i * BLOCK - first:(i + 1) * BLOCK - first].clone()
                self.blocks[digests[i]] = block
                self.bytes += block.numel() * block.element_size()
        for d in reversed(digests):  # the chain's head ends up the most recent: eviction cuts tails first
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
        cache.insert(root, p[:-1], lambda a, b, h=h: decoder.kv(h, a, b))  # the pending last token has no K/V
    return handles


def cache_row(decoder, handle: int, tokens: list[int], cache: PrefixCache | None, root: tuple) -> None:
    """Cache the full blocks of a row's ids `tokens` (prompt + the generated ids the caller kept,
    a prefix of the decoder's row) as far as the decoder has computed them: once, as the row leaves."""
    if cache is None or not cache.budget:
        return
    n = min(len(tokens), decoder.computed(handle))
    cache.insert((*root, decoder.end_layer), tokens[:n], lambda a, b: decoder.kv(handle, a, b))

