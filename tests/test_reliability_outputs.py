"""Reliability round 2 (issue [14], items 2 and 8): an output replaces only what poelm wrote,
recognised by its marker (.poelm-output.json) and the files it lists, never by file names;
`poelm tokenizer train --out` never replaces a model's tokenizer; weights with NaN or inf
refuse to load, naming the file and the tensor.

Bad input is asserted the way users see it: exit status 2 and exactly one line
`poelm: error: ...` naming the directory or file and the fix.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tiktoken
import torch

from conftest import tiny_model
from poelm.checkpoint import load_model, save_model, save_nanochat_dir
from poelm.cli import main
from poelm.outputs import MARKER_NAME, foreign_content, read_marker
from poelm.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer


def byte_tokenizer() -> Tokenizer:
    enc = tiktoken.Encoding(name="bytes", pat_str=SPLIT_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)})
    return Tokenizer(enc)


@pytest.fixture
def src(tmp_path) -> Path:
    """A tiny PoE model directory with its (byte) tokenizer."""
    tok = byte_tokenizer()
    return save_model(tiny_model(seed=0, vocab_size=tok.vocab_size), tmp_path / "src", tok)


def cli(argv: list, capsys) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(rc: int, err: str, out: Path, *words: str) -> None:
    assert rc == 2 and err.count("\n") == 1 and err.startswith("poelm: error: "), err
    assert str(out) in err and "--overwrite" in err, err
    for word in words:
        assert word in err, (word, err)


def hf_llama_folder(path: Path) -> Path:
    """What `hf download` leaves: a Llama config, weights and tokenizer files, all standard names."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                  "hidden_size": 64, "num_hidden_layers": 2}))
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (path / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizerFast"}')
    (path / "special_tokens_map.json").write_text('{"bos_token": "<s>"}')
    (path / "generation_config.json").write_text('{"bos_token_id": 1}')
    return path


# -----------------------------------------------------------------------------
# Item 2: a folder that is not a previous poelm output is never replaced


def test_export_and_save_model_refuse_a_downloaded_hf_llama_folder(src, tmp_path, capsys):
    llama = hf_llama_folder(tmp_path / "llama")
    before = tree(llama)
    rc, err = cli(["export", src, "--out", llama], capsys)
    assert_refused(rc, err, llama, "not a poelm model directory", MARKER_NAME)
    with pytest.raises(ValueError, match="not a poelm model directory"):
        save_model(tiny_model(), llama)
    rc, err = cli(["specialist", "attach", src, "--layers", "1", "--out", llama], capsys)
    assert_refused(rc, err, llama, "not a poelm model directory")
    assert tree(llama) == before
    assert cli(["export", src, "--out", llama, "--overwrite"], capsys)[0] == 0  # explicit: replaced
    assert json.loads((llama / "config.json").read_text())["model_type"] == "cognica_poe"
    assert foreign_content(llama, ("export",)) is None


def test_a_tokenizer_json_directory_is_foreign(src, tmp_path, capsys):
    plain = tmp_path / "plain"  # poelm's file names, one of them a directory of the user's
    (plain / "tokenizer.json").mkdir(parents=True)
    (plain / "tokenizer.json" / "mine.txt").write_text("keep me")
    (plain / "config.json").write_text("{}")
    rc, err = cli(["export", src, "--out", plain], capsys)
    assert_refused(rc, err, plain, "tokenizer.json")
    assert (plain / "tokenizer.json" / "mine.txt").read_text() == "keep me"

    model = tmp_path / "model"  # a previous save_model output whose tokenizer.json became a directory
    tok = byte_tokenizer()
    save_model(tiny_model(vocab_size=tok.vocab_size), model, tok)
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").mkdir()
    (model / "tokenizer.json" / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="tokenizer.json is a directory where poelm wrote a file"):
        save_model(tiny_model(), model)
    assert (model / "tokenizer.json" / "mine.txt").read_text() == "keep me"


def test_user_files_under_pycache_are_foreign_python_bytecode_is_not(src, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli(["export", src, "--out", out], capsys)[0] == 0
    cache = out / "__pycache__"
    cache.mkdir()
    (cache / "modeling_cognica_poe.cpython-311.pyc").write_bytes(b"\x00" * 16)  # Python's own, of the remote code
    (cache / "poe_model.cpython-312.opt-1.pyc").write_bytes(b"\x00" * 16)
    assert cli(["export", src, "--out", out], capsys)[0] == 0  # still a previous export: replaced
    assert not (out / "__pycache__").exists()

    cache.mkdir()
    (cache / "results.csv").write_text("1,2")
    rc, err = cli(["export", src, "--out", out], capsys)
    assert_refused(rc, err, out, "__pycache__/")
    assert (cache / "results.csv").read_text() == "1,2"

    (cache / "results.csv").unlink()
    (cache / "other_module.cpython-311.pyc").write_bytes(b"\x00")  # bytecode of a file poelm did not write
    assert_refused(*cli(["export", src, "--out", out], capsys), out, "__pycache__/")

    bare = tmp_path / "bare"  # no marker: the name __pycache__ proves nothing
    (bare / "__pycache__").mkdir(parents=True)
    (bare / "__pycache__" / "mine.txt").write_text("x")
    (bare / "config.json").write_text("{}")
    assert_refused(*cli(["export", src, "--out", bare], capsys), bare)
    assert (bare / "__pycache__" / "mine.txt").exists()


def test_reexport_onto_a_previous_export_or_model_needs_no_overwrite(src, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli(["export", src, "--out", out, "--dtype", "fp32"], capsys)[0] == 0
    marker = read_marker(out)
    assert marker["kind"] == "export" and MARKER_NAME not in marker["files"]
    assert set(marker["files"]) == {p.name for p in out.iterdir()} - {MARKER_NAME}
    assert all((out / n).stat().st_size == s for n, s in marker["files"].items())
    first = sorted(p.name for p in out.iterdir())
    assert cli(["export", src, "--out", out, "--dtype", "bf16"], capsys)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == first

    model = tmp_path / "model"
    save_model(tiny_model(), model)
    assert read_marker(model)["kind"] == "model"
    save_model(tiny_model(seed=1), model)  # its own output
    assert cli(["export", src, "--out", model], capsys)[0] == 0  # a model directory becomes an export
    assert read_marker(model)["kind"] == "export"


def test_a_calibrated_export_stays_replaceable(src, tmp_path, capsys):
    """calibrate rewrites generation_config.json inside an export: the marker follows it."""
    from poelm.engine import save_calibration

    out = tmp_path / "hf"
    assert cli(["export", src, "--out", out], capsys)[0] == 0
    save_calibration(out, {"wand_bounds": [0.5] * 4, "wand_quantile": 0.99})
    assert read_marker(out)["files"]["generation_config.json"] == (out / "generation_config.json").stat().st_size
    assert cli(["export", src, "--out", out], capsys)[0] == 0

    (out / "notes.txt").write_text("mine")  # a foreign file first: calibrating does not bless it
    save_calibration(out, {"wand_bounds": [0.25] * 4, "wand_quantile": 0.9})
    assert_refused(*cli(["export", src, "--out", out], capsys), out, "notes.txt")


def test_changed_missing_or_forged_content_is_refused(src, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli(["export", src, "--out", out], capsys)[0] == 0
    cfg = out / "config.json"
    original = cfg.read_bytes()
    cfg.write_bytes(original + b"\n")  # the user edited it
    assert_refused(*cli(["export", src, "--out", out], capsys), out, "config.json has changed")
    cfg.write_bytes(original)
    (out / "poe_chat.py").unlink()
    assert_refused(*cli(["export", src, "--out", out], capsys), out, "poe_chat.py, which poelm wrote, is missing")
    (out / MARKER_NAME).write_text("{not json")
    assert_refused(*cli(["export", src, "--out", out], capsys), out, f"unreadable {MARKER_NAME}")
    forged = {"format": "poelm-output-v1", "kind": "export", "files": {"../src/config.json": 1}}
    (out / MARKER_NAME).write_text(json.dumps(forged))
    assert read_marker(out) is None
    assert_refused(*cli(["export", src, "--out", out], capsys), out)


def test_a_link_where_poelm_wrote_a_file_is_refused(src, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli(["export", src, "--out", out], capsys)[0] == 0
    weights = out / "model.safetensors"
    kept = tmp_path / "elsewhere.safetensors"
    weights.rename(kept)
    weights.symlink_to(kept)  # same name, same size, but a link
    assert_refused(*cli(["export", src, "--out", out], capsys), out, "model.safetensors is not a regular file")
    assert weights.is_symlink() and kept.exists()


def test_output_of_an_older_poelm_without_marker_needs_overwrite(src, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli(["export", src, "--out", out], capsys)[0] == 0
    (out / MARKER_NAME).unlink()
    assert_refused(*cli(["export", src, "--out", out], capsys), out, f"no {MARKER_NAME} marker")
    assert cli(["export", src, "--out", out, "--overwrite"], capsys)[0] == 0
    assert read_marker(out)["kind"] == "export"


def test_existing_refusals_still_hold(src, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file.bin"
    a_file.write_bytes(b"x")
    rc, err = cli(["export", src, "--out", a_file], capsys)
    assert rc == 2 and "is a file" in err and a_file.read_bytes() == b"x"
    for out, word in ((src, "is the source"), (src / "hf", "lies inside the source"),
                      (tmp_path, "contains the source")):
        rc, err = cli(["export", src, "--out", out, "--overwrite"], capsys)
        assert rc == 2 and err.count("\n") == 1 and word in err, (out, err)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    rc, err = cli(["export", src, "--out", ".", "--overwrite"], capsys)
    assert rc == 2 and "working directory" in err
    assert cli(["export", src, "--out", empty / "sub"], capsys)[0] == 0  # new
    assert cli(["export", src, "--out", tmp_path / "made-empty"], capsys)[0] == 0


def test_specialist_attach_and_save_delta_replace_only_their_own_outputs(src, tmp_path, capsys):
    spec = tmp_path / "spec"
    assert cli(["specialist", "attach", src, "--layers", "1", "--out", spec], capsys)[0] == 0
    marker = read_marker(spec)
    assert marker["kind"] == "model" and "specialist.json" in marker["files"]  # the lineage is in the marker
    assert cli(["specialist", "attach", src, "--layers", "2", "--out", spec], capsys)[0] == 0  # its own output
    before = tree(src)
    rc, err = cli(["specialist", "attach", src, "--layers", "1", "--out", src], capsys)  # a poelm model, but the base
    assert rc == 2 and err.count("\n") == 1 and "is the source" in err and tree(src) == before, err

    delta = tmp_path / "delta"
    assert cli(["specialist", "save-delta", spec, "--out", delta], capsys)[0] == 0
    assert read_marker(delta)["kind"] == "delta"
    assert cli(["specialist", "save-delta", spec, "--out", delta], capsys)[0] == 0  # a previous delta
    rc, err = cli(["specialist", "save-delta", spec, "--out", spec], capsys)
    assert rc == 2 and "is the source" in err, err
    rc, err = cli(["specialist", "attach", src, "--layers", "1", "--out", delta], capsys)
    assert_refused(rc, err, delta, "poelm delta output")

    user = tmp_path / "user"
    user.mkdir()
    (user / "delta.json").write_text("{}")  # a delta's file name, not a delta poelm wrote
    assert_refused(*cli(["specialist", "save-delta", spec, "--out", user], capsys), user, "not a poelm delta directory")
    assert (user / "delta.json").read_text() == "{}"
    assert cli(["specialist", "save-delta", spec, "--out", user, "--overwrite"], capsys)[0] == 0


# -----------------------------------------------------------------------------
# Item 8: tokenizer train --out never replaces a model's tokenizer


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    from poelm.corpus import write_corpus

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north"]
    docs = [" ".join(rng.choices(words, k=40)) for _ in range(60)]
    write_corpus(docs, tmp_path / "data", n_train_shards=2, row_group_docs=16)
    return tmp_path / "data"


def tokenizer_train(corpus: Path, out: Path, capsys, *extra) -> tuple[int, str]:
    return cli(["tokenizer", "train", "--data", corpus, "--vocab-size", "300", "--out", out, *extra], capsys)


def test_tokenizer_train_refuses_a_model_run_or_foreign_directory(src, corpus_dir, tmp_path, capsys):
    before = tree(src)
    rc, err = tokenizer_train(corpus_dir, src, capsys)
    assert_refused(rc, err, src, "not a poelm tokenizer directory", "poelm model output")
    assert tree(src) == before

    run = tmp_path / "run"
    save_model(tiny_model(), run / "step_000002")
    (run / "latest").write_text("step_000002")
    (run / "metrics.jsonl").write_text("{}\n")
    assert_refused(*tokenizer_train(corpus_dir, run, capsys), run, "latest")
    assert (run / "latest").read_text() == "step_000002"

    user = tmp_path / "user"
    user.mkdir()
    (user / "tokenizer.pkl").write_bytes(b"mine")  # a tokenizer file name proves nothing
    assert_refused(*tokenizer_train(corpus_dir, user, capsys), user, f"no {MARKER_NAME} marker")
    assert (user / "tokenizer.pkl").read_bytes() == b"mine"

    rc, err = tokenizer_train(corpus_dir, corpus_dir / "tok", capsys, "--overwrite")
    assert rc == 2 and "lies inside the source" in err, err


def test_tokenizer_train_writes_a_marked_directory_and_replaces_its_own(src, corpus_dir, tmp_path, capsys):
    out = tmp_path / "tok"
    assert tokenizer_train(corpus_dir, out, capsys)[0] == 0
    assert read_marker(out)["kind"] == "tokenizer"
    assert set(read_marker(out)["files"]) == {"tokenizer.json", "tokenizer.pkl", "token_bytes.pt"}
    assert Tokenizer.load(out).vocab_size == 300
    assert tokenizer_train(corpus_dir, out, capsys)[0] == 0  # a previous tokenizer output: replaced
    empty = tmp_path / "empty"
    empty.mkdir()
    assert tokenizer_train(corpus_dir, empty, capsys)[0] == 0
    (out / "notes.txt").write_text("mine")
    assert_refused(*tokenizer_train(corpus_dir, out, capsys), out, "notes.txt")
    rc, err = cli(["export", src, "--out", empty], capsys)  # a tokenizer is not a model directory
    assert_refused(rc, err, empty, "poelm tokenizer output")


# -----------------------------------------------------------------------------
# Item 8: NaN / inf weights refuse to load


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_model_directory_with_nonfinite_weights_is_refused(tmp_path, capsys, bad):
    model = tiny_model()
    with torch.no_grad():
        model.transformer.h[1].attn.c_q.weight[3, 5] = bad
    d = save_model(model, tmp_path / "m")
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor transformer\.h\.1\.attn\.c_q\.weight holds NaN"):
        load_model(d)
    rc, err = cli(["generate", d, "1 2 3", "--max-new-tokens", "2"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "transformer.h.1.attn.c_q.weight" in err and str(d) in err, err


def test_a_nanochat_checkpoint_with_nonfinite_weights_is_refused(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    save_nanochat_dir(model, tmp_path / "nc", step=1)
    with pytest.raises(ValueError, match=r"model_000001\.pt: tensor lm_head\.weight holds NaN"):
        load_model(tmp_path / "nc")


def test_a_delta_with_nonfinite_weights_is_refused(tmp_path):
    from poelm.specialist import attach, base_content_hash, load_delta, save_delta

    base = tiny_model()
    spec = attach(base, 1)
    with torch.no_grad():
        spec.lm_head_stage.weight[2, 1] = float("inf")
    save_delta(spec, tmp_path / "d", "base", base_content_hash(base))
    with pytest.raises(ValueError, match=r"delta\.safetensors: tensor lm_head_stage\.weight holds NaN or infinite"):
        load_delta(base, tmp_path / "d")
