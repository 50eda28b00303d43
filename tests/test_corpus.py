"""Corpus building (folders, default sdists), shard listing and the resumable ClimbMix download."""

import http.server
import json
import random
import re
import threading
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from poelm import corpus
from poelm.corpus import (build_corpus, cut_at_whitespace, download_climbmix, iter_documents, list_shards,
                          split_paragraphs, strip_gutenberg, write_corpus)

SDIST_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "sdist"


def make_folder(root: Path) -> set[str]:
    """txt / jsonl / parquet sources; returns the documents they hold (long txt aside)."""
    (root / "sub" / "deeper").mkdir(parents=True)
    docs = {f"short text number {i}." for i in range(3)}
    for i, d in enumerate(sorted(docs)):
        (root / "sub" / f"t{i}.txt").write_text(d)
    rows = [{"text": f"jsonl doc {i} ünïcode 😀"} for i in range(5)]
    (root / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs |= {r["text"] for r in rows}
    pq.write_table(pa.table({"text": [f"parquet doc {i}" for i in range(4)], "id": list(range(4))}),
                   root / "sub" / "deeper" / "p.parquet")
    docs |= {f"parquet doc {i}" for i in range(4)}
    (root / "ignored.csv").write_text("text\nnot a doc\n")
    return docs


def test_build_from_folder(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    docs = make_folder(src)
    paras = [f"Paragraph {i}. " + "word " * 400 + "end." for i in range(30)]  # ~60 KB: gets split
    (src / "long.txt").write_text("\n\n".join(paras))
    stats = build_corpus(str(src), out, row_group_docs=4)
    assert not stats["skipped"] and stats["val_docs"] >= 1
    train, val = list_shards(out)
    assert [p.name for p in train + [val]] == [f"shard_{i:05d}.parquet" for i in range(len(train) + 1)]
    got = list(iter_documents(train)) + list(iter_documents(val))
    assert len(got) == stats["docs"] == len(set(got))
    assert docs <= set(got)
    long_parts = [d for d in got if d.startswith("Paragraph")]
    assert len(long_parts) > 3 and all(len(d) <= 16384 for d in long_parts)
    assert "\n\n".join(sorted(long_parts, key=lambda d: int(d.split()[1][:-1]))) == "\n\n".join(paras)
    assert pq.ParquetFile(train[0]).num_row_groups >= 2  # row groups of 4 docs
    again = build_corpus(str(src), out, row_group_docs=4)  # idempotent
    assert again["skipped"] and again["fingerprint"] == stats["fingerprint"]
    assert list(iter_documents(train)) + list(iter_documents(val)) == got
    build_corpus(str(src), src / "nested_out")  # output inside the source is not re-read
    assert build_corpus(str(src), src / "nested_out")["skipped"]


def test_shuffle_is_deterministic(tmp_path):
    docs = [f"doc {i}" for i in range(100)]
    write_corpus(docs, tmp_path / "a", n_train_shards=3)
    write_corpus(docs, tmp_path / "b", n_train_shards=3)
    for a, b in zip(sorted((tmp_path / "a").glob("*.parquet")), sorted((tmp_path / "b").glob("*.parquet"))):
        assert list(iter_documents(a)) == list(iter_documents(b))
    train, val = list_shards(tmp_path / "a")
    assert len(train) == 3 and len(list(iter_documents(val))) == 5
    assert list(iter_documents(train)) != docs[:95]  # shuffled


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_corpus(str(tmp_path / "nope"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt, .jsonl or .parquet"):
        build_corpus(str(tmp_path / "empty"), tmp_path / "out")
    bad = tmp_path / "badparquet"
    bad.mkdir()
    pq.write_table(pa.table({"content": ["a", "b"]}), bad / "x.parquet")
    with pytest.raises(ValueError, match="no 'text' column"):
        build_corpus(str(bad), tmp_path / "out")
    badj = tmp_path / "badjsonl"
    badj.mkdir()
    (badj / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: no string 'text' field"):
        build_corpus(str(badj), tmp_path / "out")
    (badj / "x.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2: invalid JSON"):
        build_corpus(str(badj), tmp_path / "out")
    with pytest.raises(ValueError, match="at least 2 documents"):
        write_corpus(["only one"], tmp_path / "out")
    foreign = tmp_path / "foreign"  # parquet files we did not write are never overwritten
    foreign.mkdir()
    pq.write_table(pa.table({"text": ["x"]}), foreign / "mine.parquet")
    with pytest.raises(ValueError, match="not written by poelm"):
        write_corpus(["a", "b"], foreign)


def test_list_shards_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list_shards(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no .parquet shards"):
        list_shards(tmp_path)
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "shard_00000.parquet")
    with pytest.raises(ValueError, match="no corpus.json beside its parquet shards"):
        list_shards(tmp_path)
    (tmp_path / "corpus.json").write_text(json.dumps({"shards": ["shard_00000.parquet"]}))
    with pytest.raises(ValueError, match="only 1 parquet shard"):
        list_shards(tmp_path)
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "shard_00001.parquet")
    with pytest.raises(ValueError, match="shard_00001.parquet is not one of the 1 shards corpus.json lists"):
        list_shards(tmp_path)
    (tmp_path / "corpus.json").write_text(json.dumps({"shards": ["shard_00000.parquet", "shard_00001.parquet"]}))
    train, val = list_shards(tmp_path)
    with pytest.raises(ValueError, match="no 'text' column"):
        list(iter_documents(val))


def test_text_helpers():
    g = "\ufeffjunk header\r\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\nBody text.\r\n" \
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\r\nlicense"
    assert strip_gutenberg(g) == "Body text."
    assert strip_gutenberg("plain\r\ntext") == "plain\ntext"
    assert split_paragraphs("short") == ["short"] and split_paragraphs("  \n ") == []
    parts = split_paragraphs("\n\n".join(["x" * 100] * 50), 1000, 2000)
    assert all(len(p) <= 2000 for p in parts) and "".join(parts).count("x") == 5000


def test_cut_at_whitespace_keeps_the_text():
    rng = random.Random(0)
    text = "".join(rng.choice(["ab", "c", " ", "\t", "\n"] + ["xyzzy" * 9] * 8) for _ in range(20_000))
    pieces = cut_at_whitespace(text, 100, 200)
    assert len(pieces) > 50 and all(100 <= len(p) < 200 for p in pieces[:-1]) and len(pieces[-1]) <= 200
    pos, kinds = 0, []  # pieces + the one whitespace character dropped at each cut give back the text
    for p in pieces[:-1]:
        assert text.startswith(p, pos)
        if any(c.isspace() for c in text[pos + 100:pos + 200]):  # cut at the first whitespace after 100
            assert text[pos + len(p)].isspace() and not any(c.isspace() for c in text[pos + 100:pos + len(p)])
            pos, kinds = pos + len(p) + 1, kinds + ["space"]
        else:  # no whitespace in the window: a hard cut at 100
            assert len(p) == 100
            pos, kinds = pos + 100, kinds + ["hard"]
    assert text[pos:] == pieces[-1] and {"space", "hard"} <= set(kinds)
    solid = "x" * 1050  # no whitespace: hard cuts, nothing dropped
    assert cut_at_whitespace(solid, 100, 200) == ["x" * 100] * 9 + ["x" * 150]
    assert cut_at_whitespace("short text", 100, 200) == ["short text"]
    with pytest.raises(ValueError, match="size <= limit"):
        cut_at_whitespace(solid, 0, 200)


def test_single_huge_line_becomes_many_documents(tmp_path):
    """A 2 MB one-line .txt (and a 1 MB one without any whitespace) -> documents of about the
    8,192-character target; joined in order they give back the text."""
    words = [f"w{i}" for i in range(260_000)]
    line = " ".join(words)  # ~2 MB, no newline at all
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "line.txt").write_text(line)
    stats = build_corpus(str(tmp_path / "src"), tmp_path / "out")
    train, val = list_shards(tmp_path / "out")
    docs = list(iter_documents(train)) + list(iter_documents(val))
    assert stats["docs"] == len(docs) > 200
    docs.sort(key=lambda d: int(d.split(" ", 1)[0][1:]))  # back in text order
    assert all(8192 <= len(d) < 8200 for d in docs[:-1]) and len(docs[-1]) <= 16384
    assert " ".join(docs) == line

    rng = random.Random(1)
    solid = "".join(rng.choice("abcdefgh") for _ in range(1_000_000))
    (tmp_path / "solid").mkdir()
    (tmp_path / "solid" / "solid.txt").write_text(solid)
    build_corpus(str(tmp_path / "solid"), tmp_path / "out2")
    train, val = list_shards(tmp_path / "out2")
    docs = list(iter_documents(train)) + list(iter_documents(val))
    docs.sort(key=solid.index)
    assert [len(d) for d in docs[:-1]] == [8192] * (len(docs) - 1) and len(docs[-1]) <= 16384  # hard cuts
    assert "".join(docs) == solid


def test_undecodable_txt_warns(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "image.txt").write_bytes(random.Random(0).randbytes(200_000))
    (tmp_path / "src" / "fine.txt").write_text("ünïcode text 😀 " * 1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_corpus(str(tmp_path / "src"), tmp_path / "out")
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and re.fullmatch(
        re.escape(str(tmp_path / "src" / "image.txt")) + r": \d\d% of its characters are undecodable bytes "
        r"\(U\+FFFD after UTF-8 decoding\): it does not look like UTF-8 text; convert it to UTF-8 or leave it out",
        msgs[0]), msgs


@pytest.mark.skipif(not all((SDIST_CACHE / f"{n}-{v}.tar.gz").is_file() for n, v in corpus.DEFAULT_SDISTS),
                    reason="default corpus sdists not cached")
def test_default_corpus(tmp_path):
    stats = build_corpus("default", tmp_path / "d", cache_dir=SDIST_CACHE)
    assert stats["docs"] > 5000 and 9_000_000 < stats["chars"] < 12_000_000
    train, val = list_shards(tmp_path / "d")
    assert len(train) == 4 and stats["val_docs"] == len(list(iter_documents(val)))
    text = "\n".join(iter_documents(train + [val]))
    for needle in ("In the beginning God created the heaven and the earth.",
                   "Who's there?", "Of Mans First Disobedience"):
        assert needle in text
    assert "Project Gutenberg" not in text[:2000]
    assert build_corpus("default", tmp_path / "d", cache_dir=SDIST_CACHE)["skipped"]


# ---------------------------------------------------------------------- download
class Server:
    """Loopback HTTP server over a folder, with Range support and injectable failures."""

    def __init__(self, root: Path):
        self.root, self.log, self.fail = root, [], {}  # fail: name -> list of modes
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                name = self.path.rsplit("/", 1)[-1]
                rng = self.headers.get("Range")
                outer.log.append((name, rng))
                path = outer.root / name
                if not path.is_file():
                    return self.send_error(404)
                data = path.read_bytes()
                mode = outer.fail.get(name, []).pop(0) if outer.fail.get(name) else None
                if mode == "500":
                    return self.send_error(500)
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                if start >= len(data) and rng:
                    return self.send_error(416)
                self.send_response(206 if rng else 200)
                if rng:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if mode == "truncate":  # promise the whole body, send half, hang up
                    body = body[:len(body) // 2]
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/resolve/main"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "remote"
    root.mkdir()
    for i in [0, 1, 2, 9]:  # shard 9 plays the validation shard
        texts = [f"shard {i} doc {j} " + "filler " * (j % 50) for j in range(3000)]
        pq.write_table(pa.table({"text": texts}), root / f"shard_{i:05d}.parquet", row_group_size=1000)
    s = Server(root)
    yield s
    s.close()


def test_download_retry_and_resume(server, tmp_path):
    out = tmp_path / "climb"
    server.fail = {"shard_00000.parquet": ["500"], "shard_00001.parquet": ["truncate"]}
    paths = download_climbmix(3, out, base_url=server.url, val_shard=9, backoff=0.01, workers=2)
    assert [p.name for p in paths] == ["shard_00000.parquet", "shard_00001.parquet",
                                       "shard_00002.parquet", "shard_00009.parquet"]
    for p in paths:
        assert p.read_bytes() == (server.root / p.name).read_bytes()
    assert not list(out.glob("*.part"))
    log1 = [r for n, r in server.log if n == "shard_00001.parquet"]
    assert log1[0] is None and log1[1].startswith("bytes=") and not log1[1].startswith("bytes=0-")
    assert [n for n, _ in server.log].count("shard_00000.parquet") == 2  # 500, then success
    train, val = list_shards(out)
    assert val.name == "shard_00009.parquet" and len(train) == 3
    n = len(server.log)
    download_climbmix(3, out, base_url=server.url, val_shard=9)  # all present: no requests
    assert len(server.log) == n


def test_download_resumes_existing_part(server, tmp_path):
    out = tmp_path / "climb"
    out.mkdir()
    data = (server.root / "shard_00002.parquet").read_bytes()
    (out / "shard_00002.parquet.part").write_bytes(data[:1000])
    corpus.download_file(f"{server.url}/shard_00002.parquet", out / "shard_00002.parquet", backoff=0.01)
    assert server.log == [("shard_00002.parquet", "bytes=1000-")]
    assert (out / "shard_00002.parquet").read_bytes() == data


def test_download_errors(server, tmp_path):
    with pytest.raises(FileNotFoundError, match="HTTP 404"):
        download_climbmix(4, tmp_path / "c", base_url=server.url, val_shard=9, backoff=0.01)
    server.fail = {"shard_00000.parquet": ["500"] * 3}
    with pytest.raises(ConnectionError, match="after 2 attempts"):
        corpus.download_file(f"{server.url}/shard_00000.parquet", tmp_path / "x.parquet",
                             retries=1, backoff=0.01)
    with pytest.raises(ValueError, match="n_shards"):
        download_climbmix(0, tmp_path / "c")
