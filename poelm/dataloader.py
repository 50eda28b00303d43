"""
Best-fit packing data loader over a directory of parquet shards (see poelm/corpus.py).

Every document is tokenised on the fly with `<|bos|>` prepended (no EOS). Rows of T+1
tokens are packed by best fit: keep a buffer of >= buffer_docs tokenised documents; to fill
a row, repeatedly place the largest document that still fits; when none fits, crop the
shortest one to fill the row exactly (the rest of it is dropped). So every row starts with
BOS and there is no padding. A batch is inputs = rows[:, :-1], targets = rows[:, 1:]. Each epoch is one full pass:
the buffer drains before the next pass starts, so no document repeats inside a pass.
cropped_fraction is the share of the tokens of the documents placed so far that cropping
dropped; above CROP_WARN_FRACTION (one half: best fit on web text at T=2048 crops about a
third) the documents are far longer than a row, and the loader warns once.

Validation (val_batches): a fixed token budget read from the start of the split, never
wrapping around: a budget larger than the split evaluates each of its tokens once (with a
warning). The default budget suits the device: nanochat's 80 x 2^19 tokens on CUDA, 2^16
on CPU (an eval of a depth-4, 128-wide model on 2 CPU cores: ~5 s at vocab 1k and T 256,
~17 s at vocab 4k and T 2048, ~2.8 min at vocab 32k).

Sharding: the split's row groups are numbered across files; rank r reads those with
index % world_size == r (if the split has fewer row groups than ranks, every rank reads all
of them and keeps documents index % world_size == r instead).

Resume: state_dict() is a small JSON-able dict (epoch, file, row group, plus the buffer as
references (row group, document index)); a loader built with it yields exactly the batches
the original would have yielded next (same data, split, rank and world size; otherwise it
resumes approximately at the saved file / row group, with a warning).

Usage:
    loader = BestFitLoader("data/default", tok, batch_size=8, seq_len=512)
    for step, (x, y) in zip(range(100), loader): ...   # x, y: LongTensor (B, T)
    ckpt["loader"] = loader.state_dict()
"""

import bisect
import itertools
import math
import os
import warnings
from collections.abc import Iterator

import torch

from poelm.corpus import list_shards, read_row_group, row_group_counts

STATE_VERSION = 1
CROP_WARN_FRACTION = 0.5
CUDA_EVAL_TOKENS = 80 * 2 ** 19  # nanochat's validation budget on GPUs
CPU_EVAL_TOKENS = 2 ** 16


class BestFitLoader:
    """Iterator of (inputs, targets) LongTensor (B, T) batches, packed by best fit."""

    def __init__(self, data_dir: str | os.PathLike, tokenizer, batch_size: int, seq_len: int,
                 split: str = "train", rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", state: dict | None = None,
                 buffer_docs: int = 1000, tokenizer_threads: int = 4,
                 loop: bool | None = None, max_rows: int | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        train, val = list_shards(data_dir)
        self.data_dir = data_dir
        self.paths = train if split == "train" else [val]
        self.tok, self.B, self.T = tokenizer, batch_size, seq_len
        self.split, self.rank, self.world_size = split, rank, world_size
        self.device = torch.device(device)
        self.buffer_docs, self.threads = max(1, buffer_docs), tokenizer_threads
        self.loop = (split == "train") if loop is None else loop
        self.max_rows = max_rows

        units = [(f, g) for f, n in enumerate(row_group_counts(self.paths)) for g in range(n)]
        if not units:
            raise ValueError(f"the {split} shards of {data_dir} have no row groups; rebuild the corpus")
        self.doc_split = len(units) < world_size  # too few row groups: split by document instead
        self.units = units if self.doc_split else units[rank::world_size]  # [(file, row group)]

        self.next_unit = 0  # row groups read so far by this rank, counted across epochs
        self.buffer: list[tuple[int, int, int]] = []  # sorted (n_tokens, unit, doc index)
        self.docs: dict[tuple[int, int], list[int]] = {}  # (unit, doc index) -> tokens
        self.rows = self.tokens_emitted = self.tokens_cropped = 0
        self._empty_units = 0
        self._crop_warned = False
        if state is not None:
            self.load_state_dict(state)

    # ------------------------------------------------------------------ reading
    def _read_unit(self, k: int, keep: set[int] | None = None) -> list[tuple[int, list[int]]]:
        """Tokenised documents (doc index, tokens) of the k-th row group this rank reads."""
        f, g = self.units[k % len(self.units)]
        texts = read_row_group(self.paths[f], g)
        idx = [i for i in range(len(texts))
               if (not self.doc_split or i % self.world_size == self.rank) and (keep is None or i in keep)]
        toks = self.tok.encode_batch([texts[i] for i in idx], prepend_bos=True, num_threads=self.threads)
        return list(zip(idx, toks))

    def _add(self, k: int, i: int, toks: list[int]) -> None:
        bisect.insort(self.buffer, (len(toks), k, i))
        self.docs[(k, i)] = toks

    def _refill(self) -> bool:
        """Read the next row group into the buffer; False when the split is exhausted."""
        n = len(self.units)
        if self.next_unit > 0 and self.next_unit % n == 0 and (not self.loop or self.buffer):
            return False  # epoch boundary: drain the buffer before starting the next pass
        k = self.next_unit
        docs = self._read_unit(k)
        self.next_unit += 1
        for i, toks in docs:
            self._add(k, i, toks)
        self._empty_units = 0 if docs else self._empty_units + 1
        if self._empty_units > len(self.units):
            raise ValueError(f"the {self.split} split has no documents for rank {self.rank}; "
                             "use fewer ranks or more data")
        return True

    # ------------------------------------------------------------------ packing
    def _next_row(self) -> list[int] | None:
        """One row of T+1 tokens, or None when a non-looping split runs out."""
        row: list[int] = []
        need = self.T + 1
        while len(row) < need:
            while len(self.buffer) < self.buffer_docs and self._refill():
                pass
            if not self.buffer:
                return None
            room = need - len(row)
            j = bisect.bisect_right(self.buffer, (room, math.inf, math.inf)) - 1  # largest that fits
            if j >= 0:
                _, k, i = self.buffer.pop(j)
                row += self.docs.pop((k, i))
            else:  # nothing fits: crop the shortest document to fill the row exactly
                _, k, i = self.buffer.pop(0)
                toks = self.docs.pop((k, i))
                row += toks[:room]
                self.tokens_cropped += len(toks) - room
        return row

    def __iter__(self) -> "BestFitLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.max_rows is not None and self.rows + self.B > self.max_rows:
            raise StopIteration
        rows = []
        for _ in range(self.B):
            row = self._next_row()
            if row is None:
                raise StopIteration
            rows.append(row)
        self.rows += self.B
        self.tokens_emitted += self.B * (self.T + 1)
        self._warn_if_cropping()
        x = torch.tensor(rows, dtype=torch.long)  # (B, T+1)
        return to_device(x[:, :-1].contiguous(), x[:, 1:].contiguous(), self.device)  # (B, T) each

    def _warn_if_cropping(self) -> None:
        if not self._crop_warned and self.cropped_fraction > CROP_WARN_FRACTION:
            self._crop_warned = True
            warnings.warn(f"{self.split} split of {self.data_dir}: cropping has dropped {self.cropped_fraction:.1%} "
                          f"of the tokens of the documents packed so far (documents far longer than a row of "
                          f"{self.T + 1} tokens); split them into smaller documents (`poelm data build` does so "
                          "for .txt files) or raise --seq-len")

    # ------------------------------------------------------------------ stats and state
    @property
    def epoch(self) -> int:
        return self.next_unit // len(self.units)

    @property
    def cropped_fraction(self) -> float:
        """Tokens dropped by cropping / tokens of the documents placed in rows so far."""
        return self.tokens_cropped / max(1, self.tokens_cropped + self.tokens_emitted)

    def state_dict(self) -> dict:
        f, g = self.units[self.next_unit % len(self.units)]
        runs: list[list[int]] = []  # buffer as [unit, first doc index, count] runs
        for k, i in sorted(self.docs):
            if runs and runs[-1][0] == k and runs[-1][1] + runs[-1][2] == i:
                runs[-1][2] += 1
            else:
                runs.append([k, i, 1])
        return {
            "version": STATE_VERSION, "split": self.split, "rank": self.rank,
            "world_size": self.world_size, "n_units": len(self.units),
            "epoch": self.epoch, "file": self.paths[f].name, "file_index": f, "row_group": g,
            "next_unit": self.next_unit, "buffer": runs, "rows": self.rows,
            "tokens_emitted": self.tokens_emitted, "tokens_cropped": self.tokens_cropped,
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError("loader state is not a BestFitLoader state (version "
                             f"{STATE_VERSION}); start the data from scratch by passing state=None")
        self.rows = state["rows"]
        self.tokens_emitted, self.tokens_cropped = state["tokens_emitted"], state["tokens_cropped"]
        self.buffer, self.docs = [], {}
        same = all(state.get(key) == val for key, val in [
            ("split", self.split), ("rank", self.rank), ("world_size", self.world_size),
            ("n_units", len(self.units))])
        if not same:
            self._resume_approximately(state)
            return
        self.next_unit = state["next_unit"]
        wanted: dict[int, set[int]] = {}
        for k, i, n in state["buffer"]:
            wanted.setdefault(k, set()).update(range(i, i + n))
        for k, keep in wanted.items():
            docs = self._read_unit(k, keep)
            if len(docs) != len(keep):
                raise ValueError("loader state does not match the shards on disk "
                                 "(data changed?); start the data from scratch with state=None")
            for i, toks in docs:
                self._add(k, i, toks)

    def _resume_approximately(self, state: dict) -> None:
        pos = (state.get("file_index", 0), state.get("row_group", 0))
        j = next((n for n, u in enumerate(self.units) if u >= pos), len(self.units))
        self.next_unit = state.get("epoch", 0) * len(self.units) + j
        warnings.warn(f"loader state was saved for split={state.get('split')} rank={state.get('rank')} "
                      f"world_size={state.get('world_size')}; resuming approximately at epoch "
                      f"{self.epoch}, file {pos[0]}, row group {pos[1]} with an empty buffer")


def to_device(inputs: torch.Tensor, targets: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU (inputs, targets) onto device (pinned first for an asynchronous copy to a GPU)."""
    if device.type == "cuda":
        inputs, targets = inputs.pin_memory(), targets.pin_memory()
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def _device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_eval_tokens(device: str | torch.device) -> int:
    """The validation budget for a device: 80 x 2^19 tokens on CUDA, 2^16 elsewhere ("auto": CUDA if available)."""
    return CUDA_EVAL_TOKENS if _device(device).type == "cuda" else CPU_EVAL_TOKENS


def val_batches(data_dir: str | os.PathLike, tokenizer, batch_size: int, seq_len: int,
                n_tokens: int | None = None, rank: int = 0, world_size: int = 1,
                device: str | torch.device = "cpu", **kw) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed budget of validation batches: n_tokens // (B*T*world_size) steps (>= 1) per rank;
    n_tokens None: default_eval_tokens(device).

    The split is re-read from its start each call and read at most once: when it is smaller
    than the budget, each of its tokens is evaluated once (the last batch may have fewer
    rows) and rank 0 warns, naming the budget and the split's size. Ranks may then yield
    different numbers of batches (evaluate_bpb sums over ranks after its loop).
    """
    if n_tokens is None:
        n_tokens = default_eval_tokens(device)
    if n_tokens < 1:
        raise ValueError(f"eval token budget must be >= 1, got {n_tokens}; leave it out for the device default")
    steps = max(1, n_tokens // (batch_size * seq_len * world_size))
    device = _device(device)
    loader = BestFitLoader(data_dir, tokenizer, 1, seq_len, split="val", rank=rank, world_size=world_size,
                           loop=False, **kw)  # rows one at a time (on the CPU), so a last, short batch is kept
    for _ in range(steps):
        rows = list(itertools.islice(loader, batch_size))  # [(inputs, targets) (1, T) each]
        if rows:
            yield to_device(torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows]), device)  # (b, T)
        if len(rows) < batch_size:
            if loader.rows == 0:
                raise ValueError(f"the validation split of {data_dir} holds less than one row of seq_len + 1 = "
                                 f"{seq_len + 1} tokens{f' for rank {rank}' if world_size > 1 else ''}; "
                                 "use a shorter --seq-len or a bigger validation shard")
            if rank == 0:
                split = f"{loader.rows * seq_len:,} tokens at seq_len {seq_len}" + (" on rank 0" if world_size > 1 else "")
                warnings.warn(f"validation split of {data_dir} holds only {split}, less than the {n_tokens:,}-token "
                              "eval budget: each of its tokens is evaluated once")
            return
