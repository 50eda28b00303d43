"""Model directories, nanochat imports and the errors for broken ones."""

import json

import pytest
import torch

from conftest import tiny_model
from poelm.checkpoint import (load_model, load_state_into, normalize_state_dict, save_model, save_nanochat_dir)
from poelm.cli import main


def _same_logits(a, b):
    idx = torch.randint(0, 300, (2, 30))
    return torch.equal(a(idx), b(idx))


@pytest.mark.parametrize("overrides", [{}, {"per_stage_head": True, "poe_every": None, "poe_stage_layers": (1, 3)},
                                       {"poe_mode": "none"}])
def test_save_load_identical_logits(tmp_path, overrides):
    model = tiny_model(**overrides).eval()
    save_model(model, tmp_path / "m")
    loaded, tok = load_model(tmp_path / "m")
    assert tok is None and loaded.config == model.config
    assert _same_logits(model, loaded)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 4 and cfg["hidden_size"] == 64 and cfg["model_type"] == "cognica_poe"


def test_save_bf16_weights(tmp_path):
    from safetensors.torch import load_file
    model = tiny_model().eval()
    save_model(model, tmp_path / "m", dtype=torch.bfloat16)
    assert all(t.dtype == torch.bfloat16 for t in load_file(str(tmp_path / "m" / "model.safetensors")).values())
    loaded, _ = load_model(tmp_path / "m")
    assert loaded.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("prefix", ["", "_orig_mod."])
def test_nanochat_import_identical_logits(tmp_path, prefix):
    model = tiny_model(per_stage_head=True).eval()
    save_nanochat_dir(model, tmp_path / "ckpt", step=120, prefix=prefix)
    save_nanochat_dir(tiny_model(seed=1), tmp_path / "ckpt", step=60)  # an older step is ignored
    loaded, _ = load_model(tmp_path / "ckpt")
    assert loaded.config.poe_mode == "flat" and loaded.config.per_stage_head
    assert _same_logits(model, loaded)


def test_nanochat_meta_fields(tmp_path):
    from poelm.checkpoint import nanochat_config
    meta = {"model_config": {"sequence_len": 64, "vocab_size": 300, "n_layer": 4, "n_head": 4, "n_kv_head": 2,
                             "n_embd": 64, "window_pattern": "SSSL", "poe_every": 2, "per_stage_head": False,
                             "dual_head": False, "frozen_layers": 0, "intermediate_size": None}}
    cfg = nanochat_config(meta)
    assert cfg.poe_stage_layers == (2, 2) and cfg.poe_mode == "flat" and cfg.intermediate_size == 256
    meta["model_config"]["poe_every"] = 0
    assert nanochat_config(meta).poe_mode == "none"
    meta["model_config"]["frozen_layers"] = 4
    with pytest.raises(ValueError, match="specialist"):
        nanochat_config(meta)


def test_key_mismatch_names_keys():
    model = tiny_model()
    state = model.state_dict()
    state["bogus.weight"] = torch.zeros(1)
    del state["lm_head.weight"]
    with pytest.raises(ValueError, match=r"missing keys: lm_head.weight; unexpected keys: bogus.weight"):
        load_state_into(model, state)


def test_prefixes_are_stripped():
    state = {"model._orig_mod.lm_head.weight": 1, "_orig_mod.x0_lambdas": 2, "resid_lambdas": 3}
    assert set(normalize_state_dict(state)) == {"lm_head.weight", "x0_lambdas", "resid_lambdas"}


def test_broken_directories(tmp_path, capsys):
    model = tiny_model()
    d = save_model(model, tmp_path / "m")
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model(d)
    (d / "model.safetensors").write_bytes(b"PK\x03\x04 this is a zip, not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_model(d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(d)
    assert main(["eval", str(d), "--data", str(tmp_path)]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    cfg = json.loads((d / "config.json").read_text())
    cfg["mystery"] = 1
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown config field"):
        load_model(d)


def test_wrong_shape_is_named(tmp_path):
    save_model(tiny_model(), tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="c_fc.weight"):
        load_model(tmp_path / "m")


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    model = tiny_model()
    save_model(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()
    import poelm.checkpoint as ck

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(ck, "write_safetensors", boom)
    with pytest.raises(RuntimeError):
        save_model(tiny_model(seed=3), tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_cli_inspect_presets(capsys):
    assert main(["inspect", "poe-1.5b", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tensors"] == 179 and out["params"] == 1_507_591_082 and out["stages"] == [12, 5, 4, 3]
    assert out["poe_mode"] == "residual_logop"
    assert main(["inspect", "no-such-preset"]) == 2
    assert "neither a preset" in capsys.readouterr().err
