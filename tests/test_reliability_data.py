"""Reliability of corpora and chat data sets (issue [14]): `kill -9` during `poelm data build` or
`poelm data chat` never loses the old data and the rerun succeeds; shards that do not match
their manifest (missing, extra, cut short) are refused when read; a JSONL source that is not
UTF-8 or is nested too deeply for the parser fails in one line naming the file and the line.

Kills are deterministic: a wrapper script patches the shard writer (or the swap) of a real
`poelm` subprocess to SIGKILL itself at a chosen point.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from poelm import chatdata
from poelm.cli import main
from poelm.corpus import iter_documents, list_shards, write_corpus
from poelm.dataloader import BestFitLoader

ROOT = Path(__file__).resolve().parent.parent

KILLER = """
import os, signal, sys
from poelm import corpus
from poelm.cli import main

point, at = sys.argv[1].split(":")
calls = 0


def die_at(n):
    global calls
    calls += 1
    if calls == n:
        os.kill(os.getpid(), signal.SIGKILL)


if point == "shard":  # killed right after writing shard number `at`
    write = corpus._write_shard

    def write_then_die(table, path, rows):
        write(table, path, rows)
        die_at(int(at))

    corpus._write_shard = write_then_die
else:  # "swap": killed between replace_dir's two renames (the old output moved aside, the new one not in)
    rename = os.replace

    def rename_or_die(src, dst):
        if ".build-" in os.path.basename(src):  # the build directory itself (not a file inside it)
            die_at(1)
        rename(src, dst)

    os.replace = rename_or_die
sys.exit(main(sys.argv[2:]))
"""


def killed_poelm(tmp_path: Path, point: str, argv: list[str]) -> None:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), point, *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def expect_error(argv: list, capsys, *fragments: str) -> str:
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("poelm: error: ") and err.count("\n") == 1, err
    for frag in fragments:
        assert frag in err, err
    return err


def source_folder(root: Path, word: str, n: int = 40) -> Path:
    root.mkdir()
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": f"{word} document {i}: " + "words " * 20}) + "\n"
                                             for i in range(n)))
    return root


def chat_source(path: Path, word: str, n: int = 12) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"{word} question {i}"},
                          {"role": "assistant", "content": f"{word} answer {i}"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def corpus_docs(out: Path) -> set[str]:
    train, val = list_shards(out)
    return set(iter_documents(train + [val]))


# -----------------------------------------------------------------------------
# kill -9 during a build keeps the old data, and the rerun succeeds


@pytest.mark.parametrize("point", ["shard:1", "shard:2"])
def test_kill9_during_data_build_keeps_the_old_corpus(tmp_path, capsys, point):
    out = tmp_path / "corpus"
    old_src, new_src = source_folder(tmp_path / "old", "old"), source_folder(tmp_path / "new", "new")
    assert main(["data", "build", "--source", str(old_src), "--out", str(out)]) == 0
    before, old_docs = snapshot(out), corpus_docs(out)
    assert len(before) == 3  # 1 train shard + 1 validation shard + corpus.json

    killed_poelm(tmp_path, point, ["data", "build", "--source", new_src, "--out", out])
    assert snapshot(out) == before and corpus_docs(out) == old_docs  # intact and readable
    assert len(siblings(out)) == 1 and siblings(out)[0].startswith(".corpus.build-")  # the dead build's leftover

    capsys.readouterr()
    assert main(["data", "build", "--source", str(new_src), "--out", str(out)]) == 0
    assert siblings(out) == []  # the leftover of the dead process is gone
    assert {d.split(":")[0] for d in corpus_docs(out)} == {f"new document {i}" for i in range(40)}


def test_kill9_between_the_renames_of_the_swap_restores_the_old_corpus(tmp_path, capsys):
    out = tmp_path / "corpus"
    old_src, new_src = source_folder(tmp_path / "old", "old"), source_folder(tmp_path / "new", "new")
    assert main(["data", "build", "--source", str(old_src), "--out", str(out)]) == 0
    before = snapshot(out)
    killed_poelm(tmp_path, "swap:1", ["data", "build", "--source", new_src, "--out", out])
    assert not out.exists() and len(siblings(out)) == 2  # moved aside + the complete new build
    old = next(tmp_path / n for n in siblings(out) if ".old-" in n)
    assert snapshot(old) == before

    capsys.readouterr()
    assert main(["data", "build", "--source", str(old_src), "--out", str(out)]) == 0
    assert "already up to date" in capsys.readouterr().out  # the old corpus was put back, not rebuilt
    assert snapshot(out) == before and siblings(out) == []


def test_kill9_during_data_chat_keeps_the_old_chat_set(tmp_path, capsys):
    out = tmp_path / "chat"
    old_src, new_src = chat_source(tmp_path / "old.jsonl", "old"), chat_source(tmp_path / "new.jsonl", "new")
    assert main(["data", "chat", "--source", str(old_src), "--out", str(out)]) == 0
    before = snapshot(out)
    killed_poelm(tmp_path, "shard:1", ["data", "chat", "--source", new_src, "--out", out])
    assert snapshot(out) == before
    train, val = chatdata.list_shards(out)
    assert all(c[0]["content"].startswith("old") for p in train + [val] for c in chatdata.read_conversations(p))

    assert main(["data", "chat", "--source", str(new_src), "--out", str(out)]) == 0
    assert siblings(out) == []
    train, val = chatdata.list_shards(out)
    assert all(c[0]["content"].startswith("new") for p in train + [val] for c in chatdata.read_conversations(p))


def test_a_dead_build_inside_the_source_is_neither_read_nor_kept(tmp_path, capsys):
    src = source_folder(tmp_path / "src", "real")
    out = src / "corpus"  # the output inside its own source: its build directories are too
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = src / f".corpus.build-{proc.pid}"
    stale.mkdir()
    write_corpus([f"stray {i}" for i in range(5)], stale / "inner")
    assert main(["data", "build", "--source", str(src), "--out", str(out)]) == 0
    assert not stale.exists() and siblings(out) == []
    assert {d.split(":")[0] for d in corpus_docs(out)} == {f"real document {i}" for i in range(40)}


# -----------------------------------------------------------------------------
# shards that do not match the manifest are refused when read


def test_corpus_whose_shards_do_not_match_its_manifest_is_refused(tmp_path, capsys):
    out = tmp_path / "corpus"
    write_corpus([f"document {i} " + "text " * 30 for i in range(60)], out, n_train_shards=2)
    args = ["tokenizer", "train", "--data", out, "--vocab-size", 300, "--out", tmp_path / "tok"]
    good = snapshot(out)

    (out / "shard_00002.parquet").unlink()  # killed after 2 of 3 shards: a train shard would pose as validation
    expect_error(args, capsys, f"{out}: corpus.json lists 3 shards but shard_00002.parquet is missing",
                 "rebuild it with `poelm data build")
    with pytest.raises(ValueError, match="shard_00002.parquet is missing"):
        BestFitLoader(out, None, batch_size=1, seq_len=8, split="val")

    (out / "shard_00002.parquet").write_bytes(good["shard_00002.parquet"][:-100])  # cut short
    expect_error(args, capsys, "shard_00002.parquet is", "bytes but corpus.json recorded")

    (out / "shard_00002.parquet").write_bytes(good["shard_00002.parquet"])
    (out / "shard_00003.parquet").write_bytes(good["shard_00001.parquet"])  # one more than it lists
    expect_error(args, capsys, "shard_00003.parquet is not one of the 3 shards corpus.json lists")

    (out / "shard_00003.parquet").unlink()
    (out / "corpus.json").unlink()
    expect_error(args, capsys, "no corpus.json beside its parquet shards")
    (out / "corpus.json").write_text("[" * 100_000 + "]" * 100_000)
    expect_error(args, capsys, "corpus.json: JSON nested too deeply to parse")
    assert not (tmp_path / "tok").exists()


def test_chat_set_whose_shards_do_not_match_chat_json_is_refused(tmp_path):
    out = tmp_path / "chat"
    chatdata.build_chat_data(str(chat_source(tmp_path / "c.jsonl", "x")), out)
    (out / "shard_00001.parquet").unlink()
    for read in (lambda: chatdata.ChatLoader(out, None, 2, 16), lambda: next(chatdata.chat_batches(out, None, 2, 16))):
        with pytest.raises(ValueError, match=r"chat.json lists 2 shards but shard_00001.parquet is missing; "
                                             r"rebuild it with `poelm data chat"):
            read()


# -----------------------------------------------------------------------------
# the output directory: nothing else in it is replaced, a symlink keeps pointing at it


def test_build_refuses_an_output_holding_other_files_and_follows_a_symlink(tmp_path, capsys):
    src = source_folder(tmp_path / "src", "some")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "notes.txt").write_text("mine")
    expect_error(["data", "build", "--source", src, "--out", mixed], capsys, f"--out {mixed} holds 'notes.txt'")
    assert snapshot(mixed) == {"notes.txt": b"mine"}

    fake = tmp_path / "fake"  # a manifest does not make a directory named like a shard poelm's to replace
    (fake / "shard_00000.parquet").mkdir(parents=True)
    (fake / "shard_00000.parquet" / "mine.txt").write_text("mine")
    (fake / "corpus.json").write_text(json.dumps({"shards": []}))
    expect_error(["data", "build", "--source", src, "--out", fake], capsys, "holds 'shard_00000.parquet'")
    assert (fake / "shard_00000.parquet" / "mine.txt").read_text() == "mine"

    target, link = tmp_path / "disk" / "corpus", tmp_path / "link"
    target.parent.mkdir()
    link.symlink_to(target)
    assert main(["data", "build", "--source", str(src), "--out", str(link)]) == 0
    assert link.is_symlink() and (target / "corpus.json").is_file() and len(corpus_docs(link)) == 40


# -----------------------------------------------------------------------------
# JSONL sources that are not UTF-8 or are nested too deeply: one line naming the file and line


def test_chat_jsonl_not_utf8_or_too_deep_is_one_line(tmp_path, capsys):
    good = json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes((good + "\n" + '{"messages": [{"role": "user", "content": "caf\xe9"}]}\n').encode("latin-1"))
    expect_error(["data", "chat", "--source", latin, "--out", tmp_path / "o"], capsys,
                 f"{latin}:2: not UTF-8 text (byte 0xe9 at column", "convert the file to UTF-8")
    deep = tmp_path / "deep.jsonl"
    deep.write_text(good + "\n\n" + '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    expect_error(["data", "chat", "--source", deep, "--out", tmp_path / "o"], capsys,
                 f"{deep}:3: JSON nested too deeply to parse")
    assert not (tmp_path / "o").exists()


def test_corpus_jsonl_not_utf8_or_too_deep_is_one_line(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    bad = src / "x.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    expect_error(["data", "build", "--source", src, "--out", tmp_path / "o"], capsys,
                 f"{bad}:2: not UTF-8 text (byte 0xe9 at column 14)")
    bad.write_text('{"text": "fine"}\n' + '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    expect_error(["data", "build", "--source", src, "--out", tmp_path / "o"], capsys,
                 f"{bad}:2: JSON nested too deeply to parse")
    assert not (tmp_path / "o").exists()
