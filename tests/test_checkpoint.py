"""Model directories, nanochat imports and the errors for broken ones."""

import json

import pytest
import torch

from conftest import tiny_model
from poelm.codec import from_nanochat_meta
from poelm.checkpoint import (load_model, load_state_into, normalize_state_dict, save_model,
                              save_nanochat_dir)
from poelm.cli import main
from poelm.model import GPT, GPTConfig, rmsnorm


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


@pytest.mark.parametrize("layout", ["model dir", "nanochat dir", "preset"])
def test_a_load_on_the_meta_device_reads_the_config_alone(tmp_path, layout):
    """On the meta device (what `poelm serve`'s HTTP process holds) MODEL is the config the real
    load gives, every tensor without storage, and no weight is read: it loads with its weights
    file broken, which the real load refuses."""
    from poelm.presets import get_preset

    model = tiny_model(per_stage_head=True).eval()
    if layout == "model dir":
        save_model(model, tmp_path / "m")
        weights = tmp_path / "m" / "model.safetensors"
    elif layout == "nanochat dir":
        save_nanochat_dir(model, tmp_path / "m", step=3)
        weights = tmp_path / "m" / "model_000003.pt"
    spec, config = (tmp_path / "m", model.config) if layout != "preset" else ("tiny", get_preset("tiny"))
    if layout != "preset":
        weights.write_bytes(b"garbage, not weights")
        with pytest.raises(ValueError, match="not a readable"):
            load_model(spec)
    held, _ = load_model(spec, device="meta")
    assert held.config == config and not held.training
    assert all(t.is_meta for t in [*held.parameters(), *held.buffers()])


# --- metas written the way the PoE fork writes them ------------------------------------------
# jaepil/nanochat scripts/base_train.py, save_checkpoint(..., meta_data): "model_config" is
# asdict() of nanochat/gpt.py's GPTConfig, built from the flags: sequence_len (--max-seq-len),
# vocab_size, n_layer (--depth), n_head = n_kv_head = n_embd // --head-dim, n_embd, window_pattern,
# per_stage_head (--per-stage-head), poe_every (--poe-every, default 1 even for BP),
# intermediate_size (--intermediate-size, default 0 = 4 * n_embd) and the specialist fields
# dual_head (False) / frozen_layers (0). "user_config" is vars(args): --poe-mode (none | flat |
# hier, default none), --poe-every, --poe-alpha (default 0.0) and the training-only flags.
# The other meta fields (step, val_bpb, batch sizes, dataloader_state_dict, loop_state) are
# bookkeeping for resuming. Its forward (nanochat/gpt.py GPT.forward, no poe_mode at eval):
# - no per-stage heads: x = x_L - backout_lambda * x_mid (x_mid = residual after block
#   n_layer // 2), logits = softcap(lm_head(norm(x)))[:vocab], for BP and PoE alike;
# - per-stage heads: stage boundaries after every poe_every-th block and the last block;
#   returns sum_k log_softmax(softcap(lm_head(n_k) + lm_head_stages[k](n_k))) / K, n_k = norm(x_k)
#   (its poe_alpha argument stays 0.0 outside training).
FORK = dict(n_layer=8, n_embd=64, n_head=4, vocab_size=300, sequence_len=1024)  # short window 256 < T


def fork_meta(poe_mode="none", poe_every=1, poe_alpha=0.0, per_stage_head=False, intermediate_size=0) -> dict:
    F = FORK
    model_config = {"sequence_len": F["sequence_len"], "vocab_size": F["vocab_size"], "n_layer": F["n_layer"],
                    "n_head": F["n_head"], "n_kv_head": F["n_head"], "n_embd": F["n_embd"], "window_pattern": "SSSL",
                    "dual_head": False, "frozen_layers": 0, "per_stage_head": per_stage_head, "poe_every": poe_every,
                    "intermediate_size": intermediate_size}
    user_config = {"run": "dummy", "depth": F["n_layer"], "aspect_ratio": 8, "head_dim": 16, "max_seq_len": F["sequence_len"],
                   "window_pattern": "SSSL", "intermediate_size": intermediate_size, "num_iterations": 20,
                   "device_batch_size": 2, "total_batch_size": 2048, "poe_mode": poe_mode, "poe_every": poe_every,
                   "poe_alpha": poe_alpha, "per_stage_head": per_stage_head, "kd_logits_dir": "", "kd_alpha": 0.5,
                   "pipeline_rank": -1}
    return {"step": 20, "val_bpb": 3.1, "model_config": model_config, "user_config": user_config,
            "device_batch_size": 2, "max_seq_len": F["sequence_len"], "total_batch_size": 2048,
            "dataloader_state_dict": {"pq_idx": 0, "rg_idx": 3, "epoch": 1},
            "loop_state": {"min_val_bpb": 3.1, "smooth_train_loss": 5.0, "total_training_time": 1.0}}


def write_fork_dir(directory, meta: dict, per_stage_layers=None, prefix: str = ""):
    """model_000020.pt (random weights, noise on every tensor) + the hand-written meta; returns
    the reference model: the same weights in a GPT whose readouts the tests compute by hand."""
    cfg = GPTConfig(**FORK, poe_mode="none", short_window=None, poe_stage_layers=per_stage_layers,
                    per_stage_head=per_stage_layers is not None)
    torch.manual_seed(7)
    ref = GPT(cfg)
    ref.init_weights()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({prefix + k: v for k, v in ref.state_dict().items()}, directory / "model_000020.pt")
    (directory / "meta_000020.json").write_text(json.dumps(meta, indent=2))
    return ref.eval()


def _residuals(model, idx, layers):
    x = x0 = model.embed(idx)
    return model.run_layers(x, x0, idx, 0, model.config.n_layer, keep=set(layers))[1]


def fork_plain_logits(ref, idx):
    """The fork's plain final path: backout, norm, shared head, softcap."""
    L, V = ref.config.n_layer, ref.config.vocab_size
    kept = _residuals(ref, idx, {L - 1, L // 2})
    x = kept[L - 1] - ref.backout_lambda * kept[L // 2]
    return 15 * torch.tanh((rmsnorm(x) @ ref.lm_head.weight.t())[..., :V].float() / 15)


def fork_stage_head_logits(ref, idx, every):
    """The fork's per-stage-head forward: the mean of the stages' log-probs (heads added after projection)."""
    L, V = ref.config.n_layer, ref.config.vocab_size
    ends = [i for i in range(L) if (i + 1) % every == 0 or i == L - 1]
    kept = _residuals(ref, idx, ends)
    total = 0
    for k, e in enumerate(ends):
        n = rmsnorm(kept[e])
        z = n @ ref.lm_head.weight.t() + n @ ref.lm_head_stages[k].weight.t()
        total = total + torch.log_softmax(15 * torch.tanh(z[..., :V].float() / 15), dim=-1)
    return total / len(ends)


def _max_diff(a, b):
    return (a - b).abs().max().item()


IDX = torch.randint(0, 300, (2, 300), generator=torch.Generator().manual_seed(0))


def test_fork_bp_meta_default_stages_and_mlp_width(tmp_path):
    ref = write_fork_dir(tmp_path / "bp", fork_meta(poe_mode="none", poe_every=1, intermediate_size=0))
    model, _ = load_model(tmp_path / "bp")
    cfg = model.config
    assert cfg.poe_mode == "none" and cfg.intermediate_size == 4 * 64 and cfg.poe_stage_layers == (2, 2, 2, 2)
    assert cfg.backout and cfg.final_readout == "last"
    with torch.no_grad():
        assert _max_diff(model(IDX), fork_plain_logits(ref, IDX)) <= 1e-6


@pytest.mark.parametrize("prefix", ["", "_orig_mod."])
def test_fork_poe_meta_keeps_alpha_and_backout(tmp_path, prefix):
    ref = write_fork_dir(tmp_path / "poe", fork_meta(poe_mode="flat", poe_every=4, poe_alpha=0.5), prefix=prefix)
    model, _ = load_model(tmp_path / "poe")
    cfg = model.config
    assert cfg.poe_mode == "flat" and cfg.poe_alpha == 0.5 and cfg.poe_stage_layers == (4, 4)
    assert cfg.backout is True and cfg.final_readout == "last"  # the fork's 0.7209 bpb path
    with torch.no_grad():
        assert _max_diff(model(IDX), fork_plain_logits(ref, IDX)) <= 1e-6
        # the cached path reads out the same way
        cached = model.forward_cached(IDX, model.new_cache(2, 300))
        assert _max_diff(cached, fork_plain_logits(ref, IDX)) <= 1e-5


def test_fork_per_stage_head_meta_logop_readout(tmp_path):
    meta = fork_meta(poe_mode="flat", poe_every=3, poe_alpha=0.5, per_stage_head=True)
    ref = write_fork_dir(tmp_path / "psh", meta, per_stage_layers=(3, 3, 2))  # the fork's short last stage
    model, _ = load_model(tmp_path / "psh")
    cfg = model.config
    assert cfg.poe_stage_layers == (3, 3, 2) and cfg.per_stage_head and cfg.poe_alpha == 0.5
    assert cfg.final_readout == "logop" and cfg.final_logop_alpha == 0.0
    expected = fork_stage_head_logits(ref, IDX, every=3)
    with torch.no_grad():
        assert _max_diff(model(IDX), expected) <= 1e-6
        nats = model.token_nats(IDX[:, :-1], IDX[:, 1:])
    # bpb/nats use the renormalised Log-OP: the same distribution as the fork's unnormalised mean
    renorm = expected.log_softmax(-1)[:, :-1].gather(-1, IDX[:, 1:, None]).squeeze(-1)
    assert _max_diff(nats["final"], -renorm) <= 1e-5


@pytest.mark.parametrize("per_stage_head", [False, True])
def test_fork_readout_survives_save_and_export(tmp_path, per_stage_head):
    from poelm.export import export_model
    meta = fork_meta(poe_mode="flat", poe_every=4, per_stage_head=per_stage_head)
    write_fork_dir(tmp_path / "ck", meta, per_stage_layers=(4, 4) if per_stage_head else None)
    model, _ = load_model(tmp_path / "ck")
    with torch.no_grad():
        want = model(IDX)
        for d in (save_model(model, tmp_path / "saved"), export_model(model, None, tmp_path / "hf", dtype=torch.float32)):
            again, _ = load_model(d)
            assert again.config == model.config
            assert (again.config.backout, again.config.final_readout) == ((False, "logop") if per_stage_head else (True, "last"))
            assert torch.equal(again(IDX), want)
        save_nanochat_dir(model, tmp_path / "nc", step=5)  # poelm's writer records its settings
        again, _ = load_model(tmp_path / "nc")
        assert again.config == model.config and torch.equal(again(IDX), want)


def test_poelm_models_keep_their_own_readout():
    from poelm.model import GPTConfig as C
    cfg = C(n_layer=4, n_embd=64, n_head=4, poe_mode="flat")
    assert cfg.backout is False and cfg.final_readout == "last"
    assert C(n_layer=4, n_embd=64, n_head=4, poe_mode="none").backout is True


def test_fork_meta_refusals(tmp_path, capsys):
    meta = fork_meta(poe_mode="flat", poe_every=2)
    for where, key, value in (("model_config", "frozen_layers", 8), ("model_config", "dual_head", True),
                              ("user_config", "base_model_dir", "/ckpt/base")):
        bad = json.loads(json.dumps(meta))
        bad[where][key] = value
        with pytest.raises(ValueError, match=f"{key}=.*specialist"):
            from_nanochat_meta(bad)
    bad = json.loads(json.dumps(meta))
    bad["model_config"].update(rope_theta=5e5, mlp_kind="swiglu")
    write_fork_dir(tmp_path / "ck", bad)
    assert main(["inspect", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "meta_000020.json" in err
    assert "unknown field(s) mlp_kind, rope_theta" in err and "ignores on purpose" in err
    bad["model_config"] = dict(meta["model_config"], n_layer="8")
    with pytest.raises(ValueError, match="n_layer='8' .*must be an integer"):
        from_nanochat_meta(bad)


def test_corrupt_nanochat_model_file(tmp_path, capsys):
    write_fork_dir(tmp_path / "ck", fork_meta())
    f = tmp_path / "ck" / "model_000020.pt"
    f.write_bytes(f.read_bytes()[:5000])
    for argv in (["inspect", str(tmp_path / "ck")], ["eval", str(tmp_path / "ck"), "--data", str(tmp_path)],
                 ["generate", str(tmp_path / "ck"), "hi"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{f} is not a readable torch checkpoint" in err and "re-download" in err
    f.write_bytes(b"garbage, not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        load_model(tmp_path / "ck")


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "must be a JSON object, got a list"),
    ("null", "must be a JSON object, got null"),
    (None, r"n_layer='4' \(str\) must be an integer"),
])
def test_config_json_decoding_errors(tmp_path, capsys, content, message):
    d = save_model(tiny_model(), tmp_path / "m")
    if content is None:
        cfg = json.loads((d / "config.json").read_text())
        cfg["n_layer"] = "4"
        content = json.dumps(cfg)
    (d / "config.json").write_text(content)
    with pytest.raises(ValueError, match=f"^{d / 'config.json'}: .*{message}"):
        load_model(d)
    for argv in (["inspect", str(d)], ["eval", str(d), "--data", str(tmp_path)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{d / 'config.json'}: " in err


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
