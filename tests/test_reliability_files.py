"""Files that lie fail fast (issue [14] items 5 and 7): every settings file poelm reads (config.json,
a nanochat meta_*.json, delta.json, specialist.json, generation_config.json, experiment YAML/TOML)
is read with a bound, checked field by field at the boundary, and the size of the model it implies
is checked against memory before anything is built. Each bad file is one ValueError line naming
the file and the field (at the CLI `poelm: error: ...` and exit 2), returned in well under a second.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_config, tiny_model

from poelm import memory
from poelm.checkpoint import load_model, save_model, save_nanochat_dir
from poelm.cli import main
from poelm.engine import load_calibration, save_calibration
from poelm.experiment.config import load_config
from poelm.jsonfile import check_field, read_json_object
from poelm.model import GPT, MAX_LAYERS, GPTConfig
from poelm.specialist import attach, base_content_hash, load_delta, save_delta

FAST = 1.0  # seconds: every refusal here is arithmetic on a few KB, never a build or an allocation


def fails_fast(fn, *args, match: str, error=ValueError, **kwargs) -> str:
    """fn(*args) raises `error` with a one-line message matching `match`, in under FAST seconds."""
    t0 = time.perf_counter()
    with pytest.raises(error, match=match) as info:
        fn(*args, **kwargs)
    elapsed = time.perf_counter() - t0
    message = str(info.value)
    assert elapsed < FAST, (elapsed, message)
    assert "\n" not in message, message
    return message


def cli_fails_fast(argv: list, capsys, *needles: str) -> str:
    """`poelm ARGV` exits 2 with one line `poelm: error: ...` holding every needle, in under FAST seconds."""
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = main([str(a) for a in argv])
    elapsed = time.perf_counter() - t0
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    assert err.startswith("poelm: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert elapsed < FAST, (elapsed, err)
    return err


def edit_json(path: Path, **fields) -> None:
    d = json.loads(path.read_text())
    d.update(fields)
    path.write_text(json.dumps(d))


# -----------------------------------------------------------------------------
# The bounded reader and the field checker


def test_reader_refuses_a_link_to_dev_zero_a_fifo_and_an_oversized_file(tmp_path):
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    fails_fast(read_json_object, zero, match=f"^{zero} is not a regular file")
    if hasattr(os, "mkfifo"):
        fifo = tmp_path / "fifo.json"
        os.mkfifo(fifo)
        fails_fast(read_json_object, fifo, match=f"^{fifo} is not a regular file")  # no writer: would block forever
    big = tmp_path / "big.json"
    with open(big, "wb") as f:
        f.truncate(2 ** 40)  # a sparse terabyte
    fails_fast(read_json_object, big, match=f"^{big} holds 1,099,511,627,776 bytes, more than")
    fails_fast(read_json_object, big, max_bytes=10, match="more than the 10 bytes")
    real = tmp_path / "real.json"
    real.write_text('{"a": 1}')
    link = tmp_path / "link.json"
    link.symlink_to(real)  # a link to a regular file (the hub cache's layout) reads as the file
    assert read_json_object(link) == {"a": 1}


@pytest.mark.parametrize("text, match", [
    ("[" * 100_000 + "]" * 100_000, "is nested too deeply to be a model config"),
    ("[1, 2]", "a model config must be a JSON object, got a list"),
    ("5", "must be a JSON object, got a number"),
    ("{'a': 1}", "is not valid JSON"),
    (b"\xff\xfe{}", "is not UTF-8 text"),
])
def test_reader_names_the_file_for_anything_but_an_object(tmp_path, text, match):
    f = tmp_path / "config.json"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    message = fails_fast(read_json_object, f, "a model config", "fix it", match=match)
    assert message.startswith(str(f))


def test_check_field_names_the_file_and_field():
    d = {"n": 3, "flag": True, "x": float("nan"), "s": "spec", "none": None}
    assert check_field(d, "n", int, "f.json", low=1, high=3) == 3
    assert check_field(d, "none", str, "f.json", required=False) is None
    cases = [("missing", int, {}, "f.json: field 'missing' is missing \\(it must be an integer\\)"),
             ("flag", int, {}, "f.json: field 'flag' must be an integer, got true"),
             ("x", float, {}, "f.json: field 'x' must be a number, got NaN"),
             ("n", int, {"low": 4}, "f.json: field 'n' must be >= 4, got 3"),
             ("s", str, {"choices": ("dual", "base")}, "f.json: field 's' must be one of dual, base, got \"spec\""),
             ("none", str, {}, "field 'none' is missing")]
    for name, kind, kw, match in cases:
        fails_fast(check_field, d, name, kind, "f.json", "the fix", match=match + ".*; the fix$", **kw)


# -----------------------------------------------------------------------------
# GPTConfig: its invariants, and the size it implies by arithmetic


def test_config_param_count_is_the_built_models():
    configs = [tiny_config(), tiny_config(poe_mode="none", n_kv_head=1, intermediate_size=100),
               tiny_config(n_layer=6, per_stage_head=True, final_readout="logop", poe_every=2),
               tiny_config(n_layer=6, frozen_layers=4, poe_every=None, poe_stage_layers=(1, 1, 1, 1, 2)),
               tiny_config(n_layer=3, source_n_layer=8, poe_every=None, poe_stage_layers=(3,))]
    for cfg in configs:
        with torch.device("meta"):
            model = GPT(cfg)
        assert cfg.num_params() == model.num_params(), cfg
        assert cfg.rotary_numel() == 2 * 2 * cfg.sequence_len * cfg.head_dim // 2


@pytest.mark.parametrize("fields, match", [
    ({"n_layer": "abc"}, "^config field n_layer='abc' \\(str\\) must be an integer"),
    ({"n_layer": 4.0}, "^config field n_layer=4.0 \\(float\\) must be an integer"),
    ({"poe_alpha": float("nan")}, "^config field poe_alpha=nan \\(float\\) must be a number"),
    ({"n_embd": 0}, "^n_embd must be >= 1, got 0"),
    ({"n_layer": MAX_LAYERS + 4, "n_embd": 64}, f"^n_layer must be at most {MAX_LAYERS}"),
])
def test_config_invariants_are_one_line_errors(fields, match):
    fails_fast(GPTConfig, match=match, **{**dict(n_layer=4, n_embd=64, n_head=4), **fields})


def test_absurd_sizes_are_arithmetic_not_allocation():
    cfg = GPTConfig(n_layer=4, aspect_ratio=10 ** 400)  # float arithmetic would overflow here
    assert cfg.n_embd % cfg.head_dim == 0 and cfg.num_params() > 10 ** 800
    assert memory.format_bytes(memory.implied_bytes(cfg)) == "more than 1,024 EiB"
    assert memory.format_bytes(1536) == "1.5 KiB" and memory.format_bytes(1023) == "1,023.0 B"
    fails_fast(memory.check_fits, cfg, "settings", match="^settings: n_layer=4, n_embd=.* more than 1,024 EiB")
    memory.check_fits(cfg, "settings", "meta")  # the meta device holds no data


def test_available_memory_is_read_from_the_platform():
    have = memory.available_bytes()
    assert 0 < have
    if Path("/proc/meminfo").exists():
        assert have != memory.FALLBACK_AVAILABLE


# -----------------------------------------------------------------------------
# config.json and nanochat meta files that ask for more than the machine has


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return save_model(tiny_model(), tmp_path / "m")


@pytest.mark.parametrize("fields, named", [
    ({"n_embd": 1_000_000, "hidden_size": 1_000_000, "head_dim": 250_000, "intermediate_size": 4_000_000},
     "n_embd=1000000"),
    ({"sequence_len": 10 ** 12, "max_position_embeddings": 10 ** 12}, "sequence_len=1000000000000"),
    ({"n_layer": 4096, "num_hidden_layers": 4096, "poe_every": None, "poe_stage_layers": [1024] * 4,
      "n_embd": 1_000_000, "hidden_size": 1_000_000, "intermediate_size": 4_000_000}, "n_layer=4096"),
])
def test_config_json_too_large_for_memory_is_refused_before_building(model_dir, capsys, fields, named):
    cfg = model_dir / "config.json"
    edit_json(cfg, **fields)
    message = fails_fast(load_model, model_dir, match=f"^{cfg}: .*{named}.* imply .* more than the .* of memory "
                                                      "available on cpu; fix those fields")
    assert "PiB" in message or "TiB" in message or "EiB" in message
    cli_fails_fast(["generate", model_dir, "1 2"], capsys, str(cfg), named, "memory available")


def test_config_json_deeper_than_any_model_is_refused(model_dir, capsys):
    cfg = model_dir / "config.json"
    edit_json(cfg, n_layer=100_000, num_hidden_layers=100_000, n_embd=1_000_000, hidden_size=1_000_000)
    fails_fast(load_model, model_dir, match=f"^{cfg}: n_layer must be at most {MAX_LAYERS}")
    cli_fails_fast(["inspect", model_dir], capsys, str(cfg), "n_layer must be at most")


def test_config_json_linked_to_dev_zero_is_refused(model_dir, capsys):
    cfg = model_dir / "config.json"
    cfg.unlink()
    cfg.symlink_to("/dev/zero")
    fails_fast(load_model, model_dir, match=f"^{cfg} is not a regular file")
    cli_fails_fast(["inspect", model_dir], capsys, f"{cfg} is not a regular file")


def test_nanochat_meta_too_large_for_memory_is_refused(tmp_path, capsys):
    save_nanochat_dir(tiny_model(), tmp_path / "ck", step=5)
    meta = tmp_path / "ck" / "meta_000005.json"
    d = json.loads(meta.read_text())
    d["model_config"].update(n_embd=1_000_000, head_dim=250_000, intermediate_size=4_000_000)
    meta.write_text(json.dumps(d))
    fails_fast(load_model, tmp_path / "ck", match=f"^{meta}: .*n_embd=1000000.* more than")
    meta.write_text("[" * 100_000)
    fails_fast(load_model, tmp_path / "ck", match=f"^{meta} is nested too deeply to be a nanochat meta file")
    meta.write_text('{"model_config": 5}')
    cli_fails_fast(["inspect", tmp_path / "ck"], capsys, str(meta), "model_config object")


# -----------------------------------------------------------------------------
# delta.json and specialist.json


@pytest.fixture
def delta(tmp_path):
    """(base model, delta directory of a 1-layer specialist on it)."""
    base = tiny_model()
    spec = attach(base, 1)
    save_delta(spec, tmp_path / "d", base_ref="base", base_hash=base_content_hash(base))
    return base, tmp_path / "d"


@pytest.mark.parametrize("edit, match", [
    ({"base_hash": None}, "field 'base_hash' is missing"),
    ({"frozen_layers": None}, "field 'frozen_layers' is missing"),
    ({"frozen_layers": "4"}, "field 'frozen_layers' must be an integer, got \"4\""),
    ({"new_layers": 0}, "field 'new_layers' must be >= 1, got 0"),
    ({"head_mode": "both"}, "field 'head_mode' must be one of dual, base, spec"),
    ({"parent": "."}, "field 'parent' '.' leads back to .* \\(a cycle\\)"),
    ({"frozen_layers": 3}, "fields frozen_layers=3, base_n_layer=4 disagree with its base's 4, 4"),
    ({"new_layers": 3000}, "field 'new_layers' is 3000 but delta.safetensors holds 1 new layer"),
])
def test_delta_json_fields_are_checked_before_building(delta, edit, match):
    base, d = delta
    meta = d / "delta.json"
    data = json.loads(meta.read_text())
    data.update(edit)
    meta.write_text(json.dumps({k: v for k, v in data.items() if v is not None}))
    fails_fast(load_delta, base, d, match=f"^{meta}: {match}")


def test_delta_json_cycle_through_two_directories(delta, tmp_path):
    base, d = delta
    other = tmp_path / "other"
    other.mkdir()
    for name in ("delta.json", "delta.safetensors"):
        (other / name).write_bytes((d / name).read_bytes())
    edit_json(d / "delta.json", parent="../other")
    edit_json(other / "delta.json", parent="../d")
    fails_fast(load_delta, base, d, match=f"other/delta.json: field 'parent' '../d' leads back to {d}, a delta of this "
                                         "cascade \\(a cycle\\)")


def test_delta_json_that_is_not_an_object_and_memory_names_new_layers(delta, monkeypatch):
    base, d = delta
    (d / "delta.json").write_text("[]")
    fails_fast(load_delta, base, d, match=f"^{d / 'delta.json'}: a poelm-specialist-delta-v1 file must be a JSON object")
    (d / "delta.json").unlink()
    save_delta(attach(base, 1), d.parent / "d2", base_ref="base", base_hash=base_content_hash(base))
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1024)
    fails_fast(load_delta, base, d.parent / "d2", match=f"^{d.parent / 'd2' / 'delta.json'} new_layers=1: .* more than "
                                                        "the 1.0 KiB of memory available")


@pytest.fixture
def cli_dirs(tmp_path):
    """A saved base with a tokenizer, a specialist attached to it (with specialist.json) and its delta."""
    import tiktoken

    from poelm.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

    enc = tiktoken.Encoding(name="bytes", pat_str=SPLIT_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)})
    tok = Tokenizer(enc)
    save_model(tiny_model(vocab_size=tok.vocab_size), tmp_path / "base", tok)
    assert main(["specialist", "attach", tmp_path / "base", "--layers", "1", "--out", tmp_path / "spec"]) == 0
    assert main(["specialist", "save-delta", tmp_path / "spec", "--out", tmp_path / "d"]) == 0
    return tmp_path


@pytest.mark.parametrize("content, match", [
    ("[]", "a specialist lineage file must be a JSON object, got a list"),
    ("{}", "field 'base' is missing"),
    ('{"base": "b", "base_hash": 5}', "field 'base_hash' must be a string, got 5"),
])
def test_malformed_specialist_json_is_one_line_in_save_delta(cli_dirs, capsys, content, match):
    lineage = cli_dirs / "spec" / "specialist.json"
    lineage.write_text(content)
    err = cli_fails_fast(["specialist", "save-delta", cli_dirs / "spec", "--out", cli_dirs / "new"], capsys,
                         str(lineage), match)
    assert "as `poelm specialist attach` writes it" in err and not (cli_dirs / "new").exists()


def test_attach_layers_too_many_is_refused_before_building(cli_dirs, capsys, monkeypatch):
    out = cli_dirs / "big"
    cli_fails_fast(["specialist", "attach", cli_dirs / "base", "--layers", "100000", "--out", out], capsys,
                   "--layers 100000: n_layer must be at most")
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 100 * 2 ** 20)
    cli_fails_fast(["specialist", "attach", cli_dirs / "base", "--layers", "5000", "--out", out], capsys,
                   "--layers 5000: n_layer=5004, n_embd=64", "more than the 100.0 MiB of memory available")
    assert not out.exists()


def test_delta_json_at_the_cli_names_the_file(cli_dirs, capsys):
    meta = cli_dirs / "d" / "delta.json"
    edit_json(meta, new_layers=3000)
    cli_fails_fast(["generate", cli_dirs / "base", "--delta", cli_dirs / "d", "hi"], capsys, str(meta), "'new_layers'")


# -----------------------------------------------------------------------------
# generation_config.json


GENERATION_CASES = [
    ("5", "a generation config must be a JSON object, got a number"),
    ('{"wand_bounds": "x"}', "field 'wand_bounds' must be a list, got \"x\""),
    ('{"wand_bounds": [0, -1]}', "field 'wand_bounds' must be a list of numbers >= 0"),
    ('{"wand_bounds": [0, 1], "wand_target": "best"}', "field 'wand_target' must be one of final, logop"),
]


@pytest.mark.parametrize("content, match", GENERATION_CASES)
def test_generation_config_is_checked_wherever_it_is_read(model_dir, content, match):
    gen = model_dir / "generation_config.json"
    gen.write_text(content)
    fails_fast(load_calibration, model_dir, match=f"^{gen}: {match}")
    fails_fast(save_calibration, model_dir, {"wand_bounds": [0.0] * 4}, match=f"^{gen}: {match}")
    assert gen.read_text() == content


def test_generation_config_that_is_a_number_is_refused_by_save_model(model_dir):
    gen = model_dir / "generation_config.json"
    gen.write_text("5")
    fails_fast(save_model, tiny_model(), model_dir, overwrite=True,  # a changed file is not poelm's without it
               match=f"^{gen}: a generation config must be a JSON object")
    assert gen.read_text() == "5"


@pytest.mark.parametrize("content, match", GENERATION_CASES[:2])
def test_generation_config_at_generate_export_and_serve_start_up(cli_dirs, capsys, content, match):
    from poelm.serve.models import load_models

    gen = cli_dirs / "base" / "generation_config.json"
    gen.write_text(content)
    cli_fails_fast(["generate", cli_dirs / "base", "--mode", "wand", "hi"], capsys, f"{gen}: {match}")
    cli_fails_fast(["export", cli_dirs / "base", "--out", cli_dirs / "exp"], capsys, f"{gen}: {match}")
    assert not (cli_dirs / "exp").exists()
    fails_fast(load_models, str(cli_dirs / "base"), match=f"^{gen}: ")


# -----------------------------------------------------------------------------
# Experiment files


@pytest.mark.parametrize("name, text, needle", [
    ("bad.yaml", "a: [1\n", "is not valid YAML (while parsing a flow sequence"),
    ("bad.toml", "x = \n", "is not valid TOML (Invalid value"),
    ("list.yaml", "- 1\n- 2\n", ": expected a table of settings at the top level"),
    ("under.yaml", "experiment: [1]\n", ": expected a table of settings"),
    ("iters.yaml", "num_iterations: abc\n", ": field 'num_iterations' must be an integer, got \"abc\""),
    ("iters.toml", "[experiment]\nnum_iterations = \"abc\"\n", ": field 'num_iterations' must be an integer"),
    ("ratio.yaml", "target_param_data_ratio: .nan\n", ": field 'target_param_data_ratio' must be a number"),
    ("arms.yaml", "arms: [1]\n", ": field 'arms' must be a list of strings"),
    ("model.yaml", "model: [1]\n", ": field 'model' must be an object"),
    ("depth.yaml", "depth: abc\n", ": model: config field n_layer='abc' (str) must be an integer"),
    ("deep.toml", "a = " + "[" * 5_000, "is nested too deeply for an experiment file"),
])
def test_experiment_files_are_one_line_naming_file_and_field(tmp_path, capsys, name, text, needle):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ValueError) as info:
        load_config(str(f), {})
    assert str(info.value).startswith(str(f)) and needle in str(info.value) and "\n" not in str(info.value)
    cli_fails_fast(["experiment", f], capsys, str(f), needle)


def test_deeply_nested_yaml_is_one_line(tmp_path):
    f = tmp_path / "deep.yaml"
    f.write_text("[" * 1_200)  # past the parser's recursion (PyYAML takes ~0.4 s to get there: no timing asserted)
    with pytest.raises(ValueError, match=f"^{f} is nested too deeply for an experiment file$"):
        load_config(str(f), {})
