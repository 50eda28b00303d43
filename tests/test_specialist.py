"""Tests of poelm/specialist.py and the specialist side of poelm/model.py (docs/poe.md section 7):
attach, freezing, base preservation, delta files, cascades, sibling composition, the CLI.
Run: .venv/bin/pytest -q tests/test_specialist.py"""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import tiny_model

from poelm.cli import main
from poelm.engine import Engine
from poelm.model import GPT, GPTConfig, logop_weight
from poelm.optim import EffectiveLRs, build_optimizer
from poelm.presets import get_preset
from poelm.specialist import (
    Composition, attach, base_content_hash, base_logits, bits_per_assistant_token, chat_token_ids, delta_names,
    delta_size, load_delta, save_delta, trainable_parameters, with_head_mode,
)
from poelm.tokenizer import SPECIAL_TOKENS

V = 300  # tiny_config's vocab: 291 ordinary ids, then the 9 specials
BOS = V - len(SPECIAL_TOKENS)


def ordinary_text(seed: int = 0, B: int = 2, T: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, BOS, (B, T), generator=g)
    idx[:, 0] = BOS
    return idx


def chat_text(seed: int = 0, B: int = 2, T: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """<|bos|> <|user_start|> ... <|user_end|> <|assistant_start|> ... <|assistant_end|>, targets on the answer."""
    us, ue, as_, ae = chat_token_ids(V)
    idx = ordinary_text(seed, B, T)
    idx[:, 1], idx[:, 8], idx[:, 9], idx[:, T - 2] = us, ue, as_, ae
    targets = torch.full_like(idx, -1)
    targets[:, 9:T - 2] = idx[:, 10:T - 1]
    return idx, targets


def sft_steps(model: GPT, steps: int = 3, seed: int = 0) -> None:
    opt = build_optimizer(model, EffectiveLRs(lm_head=0.05, matrix=0.05))
    for s in range(steps):
        idx, targets = chat_text(seed + s)
        model(idx, targets).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def round_trainable_bf16(model: GPT) -> None:
    with torch.no_grad():
        for p in trainable_parameters(model).values():
            p.copy_(p.to(torch.bfloat16).float())


@pytest.fixture
def base() -> GPT:
    """Frozen like a specialist's copy of it: on CPU, F.linear of a weight that requires grad
    may take another kernel (last-bit differences) even under no_grad."""
    return tiny_model(seed=0).requires_grad_(False)


# -----------------------------------------------------------------------------
# config and attach


def test_attach_config_layout(base):
    spec = attach(base, 2)
    cfg = spec.config
    assert (cfg.n_layer, cfg.frozen_layers, cfg.base_n_layer, cfg.head_mode) == (6, 4, 4, "dual")
    assert cfg.poe_stage_layers == (1, 1, 1, 1, 2) and cfg.is_specialist()
    assert cfg.backout_layer == base.config.backout_layer == 2
    assert spec.windows[:4] == base.windows and spec.windows[-1] == cfg.sequence_len
    assert sorted(spec.value_embeds) == sorted(base.value_embeds)
    assert all(b.attn.ve_gate is None for b in spec.transformer.h[4:])
    assert spec.resid_lambdas[4:].tolist() == [1.0, 1.0] and spec.x0_lambdas[4:].tolist() == [0.0, 0.0]
    assert not spec.lm_head_stage.weight.any()
    # the config round-trips through config.json's dict
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


def test_fresh_specialist_predicts_exactly_what_the_base_does(base):
    for backout in (False, True):
        base.config.backout = backout
        spec = attach(base, 2)
        idx = ordinary_text()
        with torch.no_grad():
            assert torch.equal(spec(idx), base(idx)), backout
            assert torch.equal(base_logits(spec, idx), base(idx))


def test_warm_chat_rows_move_only_the_four_chat_specials(base):
    spec = attach(base, 1)
    w0, w1 = base.transformer.wte.weight, spec.transformer.wte.weight
    rows = chat_token_ids(V)
    assert rows == [V - 8, V - 7, V - 6, V - 5]
    changed = (w0 != w1).any(1).nonzero().flatten().tolist()
    assert changed == rows
    assert len({tuple(w1[i].tolist()) for i in rows}) == 4  # distinct, so new layers can tell them apart
    ordinary = w0[:BOS]
    typical = (ordinary - ordinary.mean(0)).norm(dim=1).median()
    for i in rows:
        assert torch.isclose((w1[i] - ordinary.mean(0)).norm(), 0.5 * typical, rtol=1e-2)  # bf16-rounded rows
        assert torch.equal(w1[i], w1[i].to(torch.bfloat16).float())


def test_attach_refuses_bad_input(base):
    with pytest.raises(ValueError, match="^n_layers 0: a specialist needs"):  # the CLI says --layers 0
        attach(base, 0)
    bp = tiny_model(poe_mode="none").requires_grad_(False)
    with pytest.raises(ValueError, match="BP model.*--force"):
        attach(bp, 2)
    assert attach(bp, 2, force=True).config.poe_mode == "none"
    with pytest.raises(ValueError, match="per-stage heads"):
        attach(tiny_model(per_stage_head=True), 2)


def test_head_mode_needs_a_specialist_head(base):
    with pytest.raises(ValueError, match="head_mode=spec needs a specialist head"):
        GPTConfig(n_layer=4, n_embd=64, n_head=4, vocab_size=V, head_mode="spec")
    with pytest.raises(ValueError, match="^head_mode spec"):  # the CLI says --head-mode spec
        with_head_mode(base, "spec")
    with pytest.raises(ValueError, match="frozen_layers=6 must be between 1 and n_layer-1=5"):
        GPTConfig(n_layer=6, n_embd=64, n_head=4, vocab_size=V, frozen_layers=6)


def test_head_modes_read_the_heads_they_name(base):
    spec = attach(base, 2)
    with torch.no_grad():
        spec.lm_head_stage.weight.normal_(0, 0.05)
        idx = ordinary_text()
        stage_x, x_mid = spec.trunk(idx)
        n = torch.nn.functional.rms_norm(stage_x[-1], (64,))
        for mode, raw in (("dual", n @ spec.lm_head.weight.t() + n @ spec.lm_head_stage.weight.t()),
                          ("base", n @ spec.lm_head.weight.t()), ("spec", n @ spec.lm_head_stage.weight.t())):
            with_head_mode(spec, mode)
            assert torch.equal(spec(idx), 15 * torch.tanh(raw[..., :V] / 15)), mode


# -----------------------------------------------------------------------------
# trainable set, optimizer, base preservation


def test_released_shape_trainable_counts_on_meta():
    with torch.device("meta"):
        base = GPT(get_preset("poe-1.3b"))
    for layers, count in ((2, 106_954_752), (4, 163_577_856)):
        spec = attach(base, layers)
        params = trainable_parameters(spec)
        assert sum(p.numel() for p in params.values()) == count
        assert {n for n, p in spec.named_parameters() if p.requires_grad} == set(params)
        assert "transformer.wte.weight" not in params and "lm_head.weight" not in params


def test_released_shape_delta_sizes_on_meta():
    with torch.device("meta"):
        base = GPT(get_preset("poe-1.3b"))
    for layers, tensors, mib in ((2, 16, "300.0"), (4, 28, "408.0")):
        n, size = delta_size(attach(base, layers))
        assert (n, f"{size / 2 ** 20:.1f}") == (tensors, mib)


def test_optimizer_holds_only_the_trainable_parameters(base):
    spec = attach(base, 2)
    opt = build_optimizer(spec)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in trainable_parameters(spec).values()}
    new_matrices = {id(p) for n, p in spec.named_parameters() if n.startswith(("transformer.h.4.", "transformer.h.5."))}
    muon = {id(p) for g in opt.param_groups if g["kind"] == "muon" for p in g["params"]}
    assert muon == new_matrices
    assert [g["name"] for g in opt.param_groups if g["kind"] == "adamw"] == ["lm_head"]


def test_base_predictions_bit_identical_after_sft(base):
    spec = attach(base, 2)
    chat, _ = chat_text(7)
    with torch.no_grad():
        before_chat = base_logits(spec, chat)
        before_spec = spec(chat)
    frozen = {n: p.detach().clone() for n, p in spec.named_parameters() if not p.requires_grad}
    sft_steps(spec, steps=4)
    with torch.no_grad():
        idx = ordinary_text(3)
        assert torch.equal(base_logits(spec, idx), base(idx))  # the original base's own logits
        assert torch.equal(base_logits(spec, chat), before_chat)  # chat specials too: their rows are frozen
        assert not torch.allclose(spec(chat), before_spec)  # the specialist did learn something
    assert all(torch.equal(p, frozen[n]) for n, p in spec.named_parameters() if not p.requires_grad)


# -----------------------------------------------------------------------------
# delta files


def test_delta_round_trip_is_exact(base, tmp_path):
    spec = attach(base, 2)
    sft_steps(spec)
    round_trainable_bf16(spec)
    h = base_content_hash(base)
    save_delta(spec, tmp_path / "d", "runs/base", h)
    meta = json.loads((tmp_path / "d" / "delta.json").read_text())
    assert (meta["base"], meta["base_hash"], meta["frozen_layers"], meta["new_layers"], meta["head_mode"],
            meta["parent"]) == ("runs/base", h, 4, 2, "dual", None)
    assert meta["tensors"] == delta_names(spec) and len(meta["tensors"]) == 16
    back = load_delta(base, tmp_path / "d")
    assert back.config == spec.config
    sd = spec.state_dict()
    assert all(torch.equal(t, sd[n]) for n, t in back.state_dict().items())
    idx, _ = chat_text(1)
    with torch.no_grad():
        for mode in ("dual", "base", "spec"):
            assert torch.equal(with_head_mode(back, mode)(idx), with_head_mode(spec, mode)(idx))


def test_delta_on_the_wrong_base_refuses(base, tmp_path):
    spec = attach(base, 1)
    h = base_content_hash(base)
    save_delta(spec, tmp_path / "d", "runs/base", h)
    other = tiny_model(seed=1)
    with pytest.raises(ValueError) as e:
        load_delta(other, tmp_path / "d")
    msg = str(e.value)
    assert "\n" not in msg and h in msg and base_content_hash(other) in msg and "runs/base" in msg


def test_content_hash_ignores_load_dtype_and_sees_one_value(base):
    h = base_content_hash(base)
    with torch.no_grad():
        base.lm_head.weight.copy_(base.lm_head.weight.to(torch.bfloat16).float())
    h = base_content_hash(base)
    assert base_content_hash(tiny_model(seed=0).to(torch.bfloat16)) == base_content_hash(tiny_model(seed=0))
    with torch.no_grad():
        base.lm_head.weight[3, 5] += 1.0
    assert base_content_hash(base) != h


# -----------------------------------------------------------------------------
# cascades and siblings


def test_cascade_folds_the_parent_head_and_reloads_exactly(base, tmp_path):
    a = attach(base, 2)
    sft_steps(a, seed=0)
    round_trainable_bf16(a)
    b = attach(a, 1)
    cfg = b.config
    assert (cfg.n_layer, cfg.frozen_layers, cfg.base_n_layer, cfg.backout_layer) == (7, 6, 4, 2)
    assert cfg.poe_stage_layers == (1, 1, 1, 1, 2, 1)
    assert torch.equal(b.lm_head.weight, a.lm_head.weight + a.lm_head_stage.weight)
    assert set(trainable_parameters(b)) == {"lm_head_stage.weight"} | {n for n, _ in b.named_parameters()
                                                                       if n.startswith("transformer.h.6.")}
    idx = ordinary_text(2)
    with torch.no_grad():
        assert torch.allclose(b(idx), a(idx), atol=1e-5)  # the fresh cascade predicts what A does
        before = base_logits(b, idx)
    sft_steps(b, seed=5)
    round_trainable_bf16(b)
    with torch.no_grad():
        assert torch.equal(base_logits(b, idx), before)
    h = base_content_hash(base)
    save_delta(a, tmp_path / "a", "runs/base", h)
    with pytest.raises(ValueError, match="cascade and needs its parent delta"):
        save_delta(b, tmp_path / "b", "runs/base", h)
    save_delta(b, tmp_path / "b", "runs/base", h, parent=str(tmp_path / "a"))
    assert json.loads((tmp_path / "b" / "delta.json").read_text())["parent"] == "../a"
    back = load_delta(base, tmp_path / "b")
    sd = b.state_dict()
    assert back.config == b.config
    assert all(torch.equal(t, sd[n]) for n, t in back.state_dict().items())


def test_siblings_compose_in_one_pass(base, tmp_path):
    h = base_content_hash(base)
    dirs = []
    for k, layers in enumerate((1, 2)):
        s = attach(base, layers)
        sft_steps(s, seed=10 * k)
        round_trainable_bf16(s)
        save_delta(s, tmp_path / f"s{k}", "runs/base", h)
        dirs.append(tmp_path / f"s{k}")
    branches = [load_delta(base, d) for d in dirs]
    comp = Composition(branches, ["a", "b"])
    idx, targets = chat_text(4)
    with torch.no_grad():
        zs = comp.branch_logits(idx)
        for z, b in zip(zs, branches):
            assert torch.equal(z, b(idx))  # one pass over the shared trunk = each branch's own forward
        expected = (logop_weight(2, 0.0) * sum(z.log_softmax(-1) for z in zs)).log_softmax(-1)
        assert torch.equal(comp.logits(idx), expected)
        result = bits_per_assistant_token(comp, [(idx, targets)])
        valid = targets >= 0
        for name, z in (("a", zs[0]), ("b", zs[1])):
            nll = -z.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0][valid]
            assert result["branches"][name] == pytest.approx(float(nll.mean()) / 0.6931471805599453, rel=1e-6)
    assert result["unit"] == "bits per assistant token" and result["assistant_tokens"] == int(valid.sum())
    with pytest.raises(ValueError, match="share their trunk"):
        Composition([branches[0], attach(tiny_model(seed=3), 1)])


# -----------------------------------------------------------------------------
# engine modes on a specialist


def test_speculative_from_a_base_stage_matches_plain_greedy(base):
    spec = attach(base, 2)
    with torch.no_grad():
        for p in trainable_parameters(spec).values():
            p.add_(torch.randn_like(p) * 0.05)
    engine = Engine(spec.eval())
    prompt = ordinary_text(5, B=1, T=6)[0].tolist()
    plain = engine.generate(prompt, max_new_tokens=16).tokens
    for draft in (0, 3):
        assert engine.generate(prompt, mode="speculative", draft_stage=draft, gamma=3, max_new_tokens=16).tokens == plain
    pruned = engine.generate(prompt, mode="stage", stage=3, max_new_tokens=16).tokens  # the base's last stage
    assert pruned == Engine(base.eval()).generate(prompt, mode="stage", stage=3, max_new_tokens=16).tokens


# -----------------------------------------------------------------------------
# command line


@pytest.fixture
def cli_env(tmp_path):
    """A tiny PoE base model directory (byte tokenizer) and chat data."""
    import tiktoken

    from poelm.chatdata import write_chat_data
    from poelm.checkpoint import save_model
    from poelm.tokenizer import SPLIT_PATTERN, Tokenizer

    enc = tiktoken.Encoding(name="bytes", pat_str=SPLIT_PATTERN, mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)})
    tok = Tokenizer(enc)
    model = tiny_model(seed=0, vocab_size=tok.vocab_size)
    save_model(model, tmp_path / "base", tok)
    save_model(tiny_model(seed=1, vocab_size=tok.vocab_size, poe_mode="none"), tmp_path / "bp", tok)
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat"]
    items = [(f"c{i}", [{"role": "user", "content": " ".join(rng.choices(words, k=4))},
                        {"role": "assistant", "content": " ".join(rng.choices(words, k=5))}]) for i in range(40)]
    write_chat_data(items, tmp_path / "chat", val_fraction=0.25)
    return tmp_path


def one_line_error(argv: list, capsys, needle: str) -> str:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("poelm: error: ") and needle in lines[0], lines
    return lines[0]


def test_cli_attach_save_delta_generate_eval(cli_env, capsys):
    root = cli_env
    assert main(["specialist", "attach", str(root / "base"), "--layers", "2", "--out", str(root / "spec")]) == 0
    assert (root / "spec" / "specialist.json").exists()
    for k in (0, 1):  # two siblings: perturb each as if trained, then write its delta
        from poelm.checkpoint import load_model, save_model
        spec, tok = load_model(root / "spec")
        torch.manual_seed(k)
        with torch.no_grad():
            for p in trainable_parameters(spec).values():
                p.add_(torch.randn_like(p) * 0.05)
        save_model(spec, root / f"trained{k}", tok)
        (root / f"trained{k}" / "specialist.json").write_text((root / "spec" / "specialist.json").read_text())
        assert main(["specialist", "save-delta", str(root / f"trained{k}"), "--out", str(root / f"d{k}")]) == 0
    capsys.readouterr()
    argv = ["generate", str(root / "base"), "the cat", "--max-new-tokens", "4", "--json"]
    assert main(argv + ["--delta", str(root / "d0")]) == 0
    dual = json.loads(capsys.readouterr().out)["tokens"]
    assert main(argv + ["--delta", str(root / "d0"), "--head-mode", "base"]) == 0
    assert main(argv + ["--compose", f"{root / 'd0'},{root / 'd1'}"]) == 0
    capsys.readouterr()
    assert main(["eval", str(root / "base"), "--data", str(root / "chat"), "--compose",
                 f"{root / 'd0'},{root / 'd1'}", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["unit"] == "bits per assistant token" and result["assistant_tokens"] > 0
    assert set(result["branches"]) == {str(root / "d0"), str(root / "d1")} and result["composition"] > 0
    assert len(dual) == 4


def test_cli_bad_input_one_line_nothing_written(cli_env, capsys):
    root = cli_env
    one_line_error(["specialist", "attach", root / "base", "--layers", "0", "--out", root / "x"], capsys, "--layers 0")
    one_line_error(["specialist", "attach", root / "bp", "--layers", "2", "--out", root / "x"], capsys, "--force")
    assert not (root / "x").exists()
    one_line_error(["generate", root / "base", "the", "--head-mode", "spec"], capsys, "--head-mode spec")
    assert main(["specialist", "attach", root / "base", "--layers", "1", "--out", root / "s"]) == 0
    assert main(["specialist", "save-delta", root / "s", "--out", root / "d"]) == 0
    assert main(["specialist", "attach", root / "bp", "--layers", "1", "--out", root / "bps", "--force"]) == 0
    one_line_error(["generate", root / "bp", "the", "--delta", root / "d"], capsys, "is a delta for base")
