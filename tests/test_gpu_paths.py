"""The GPU paths, checked on the CPU: sliding-window attention backends against the masked
reference, bf16 autocast training, the compiled static-shape decode step, the bad-input
lines of --compile / --dtype bf16 / --device cuda, and the --cpu dry run of
benchmarks/gpu_check.py.  Run: .venv/bin/pytest -q tests/test_gpu_paths.py"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import poelm.model as model_mod
from poelm.runtime import SettingError, check_bf16, check_compiler, parse_device
from poelm.engine import Engine, PlainDecoder, DecodeOptions
from poelm.model import GPT, GPTConfig, StepPlan, resolve_attention_backend, softcap_cross_entropy

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 8  # the S layers' window: every test sequence is longer, so it crosses the S boundary


# one torch thread: tests/conftest.py sets it for every test module


def random_model(seed: int = 0, **kw) -> GPT:
    cfg = dict(n_layer=4, n_embd=64, n_head=4, n_kv_head=2, vocab_size=200, sequence_len=64, short_window=WINDOW,
               poe_every=1)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**cfg, **kw}))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():  # zero-init projections would make every layer trivial
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_auto_backend_and_refusals():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_attention_backend("auto", cpu, torch.float32) == "sdpa_mask"
    expected = "flash" if model_mod.FLASH_ATTN is not None else "flex"
    assert resolve_attention_backend("auto", cuda, torch.bfloat16) == expected
    assert resolve_attention_backend("auto", cuda, torch.float32) == "flex"
    with pytest.raises(ValueError, match="attention backend flash needs flash-attn"):
        resolve_attention_backend("flash", cpu, torch.float32)
    with pytest.raises(ValueError, match="'dense' is not one of auto, sdpa_mask, flex, flash"):
        resolve_attention_backend("dense", cpu, torch.float32)


def test_flex_plan_holds_no_dense_mask():
    model = random_model()
    model.attention_backend = "flex"
    with torch.no_grad():  # (FlexAttention has no backward on the CPU)
        plan = StepPlan(model, 2, 40, torch.float32, torch.device("cpu"), None, 0, set(model.windows))
    lo, mask, causal, kernel = plan.keys[WINDOW]
    assert kernel == "flex" and not isinstance(mask, torch.Tensor)  # a BlockMask, built once per shape
    assert plan.keys[64][1:] == (None, True, "sdpa")  # the L layers: SDPA's causal path, no mask
    assert model.block_mask(40, WINDOW, "cpu") is mask


def test_flex_equals_masked_reference_in_training():
    """Logits and the loss of a PoE model; fp32, T = 40 > window 8 (and < 64 = the L window). On the
    CPU FlexAttention has no backward (refused with one line); its gradients are checked on a GPU."""
    idx = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(1))
    results = {}
    for backend in ("sdpa_mask", "flex"):
        model = random_model(poe_mode="residual_logop")
        model.attention_backend = backend
        with torch.no_grad():
            results[backend] = (model(idx), model(idx[:, :-1], idx[:, 1:]))
    (l0, loss0), (l1, loss1) = results["sdpa_mask"], results["flex"]
    assert (l0 - l1).abs().max().item() <= 1e-5
    assert abs(loss0.item() - loss1.item()) <= 1e-5
    with pytest.raises(ValueError, match="attention backend flex has no backward on the CPU"):
        model(idx[:, :-1], idx[:, 1:])


def test_backends_agree_on_prefill_decode_and_verification():
    """Cached prefill from slot 0 (the backend's kernel), then one-token decode steps and
    speculative verification chunks (the cache-aware path) give the reference's logits and tokens."""
    prompt = torch.randint(0, 200, (1, 30), generator=torch.Generator().manual_seed(2))
    logits, tokens = {}, {}
    for backend in ("sdpa_mask", "flex"):
        model = random_model(seed=3).eval()
        model.attention_backend = backend
        with torch.no_grad():
            cache = model.new_cache(1, 64)
            first = model.forward_cached(prompt, cache)  # (1, 30, V)
            step = model.forward_cached(first[:, -1:].argmax(-1), cache)
            chunk = model.forward_cached(torch.tensor([[5, 6, 7, 8]]), cache)  # a verification-sized chunk
        logits[backend] = torch.cat([first, step, chunk], 1)
        engine = Engine(model)
        tokens[backend] = [engine.generate(prompt[0].tolist(), max_new_tokens=20, **kw).tokens
                           for kw in ({}, dict(mode="speculative", draft_stage=0, gamma=3), dict(mode="stage", stage=1))]
    assert (logits["sdpa_mask"] - logits["flex"]).abs().max().item() <= 1e-5
    assert tokens["sdpa_mask"] == tokens["flex"]


def test_flash_call_contract(monkeypatch):
    """The flash kernel is called in flash-attn's (B, T, H, D) layout with window_size=(w, 0): a stand-in
    with flash-attn's documented semantics (key j visible iff i - w <= j <= i) gives the reference."""
    def fake_flash(q, k, v, causal, window_size):  # (B, T, H, D), GQA by head repetition
        assert causal and window_size == (WINDOW, 0)
        T, rep = q.shape[1], q.shape[2] // k.shape[2]
        i = torch.arange(T)
        visible = (i[:, None] - i[None] >= 0) & (i[:, None] - i[None] <= window_size[0])
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(rep, 1),
                                           v.transpose(1, 2).repeat_interleave(rep, 1), attn_mask=visible)
        return y.transpose(1, 2)

    monkeypatch.setattr(model_mod, "FLASH_ATTN", fake_flash)
    model = random_model()
    plan = StepPlan(model, 2, 40, torch.float32, torch.device("cpu"), None, 0, {WINDOW})
    q, k, v = torch.randn(2, 4, 40, 16), torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    ref = plan.attend(q, k, v, WINDOW)
    plan.keys[WINDOW] = (0, None, False, "flash")
    assert (plan.attend(q, k, v, WINDOW) - ref).abs().max().item() <= 1e-5


# -----------------------------------------------------------------------------
# bf16 (autocast: fp32 master weights, bf16 matmuls, fp32 logits / soft cap / loss)


def test_bf16_autocast_loss_grads_and_learning():
    model = random_model(poe_mode="flat")
    idx = torch.randint(0, 200, (4, 33), generator=torch.Generator().manual_seed(4))
    x, y = idx[:, :-1], idx[:, 1:]
    loss32 = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss16 = model(x, y)
    assert loss16.dtype == torch.float32
    assert abs(loss16.item() - loss32.item()) / loss32.item() < 0.02  # the stated tolerance: 2 % of the loss
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):  # one batch, learnt in bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05 and all(p.dtype == torch.float32 for p in model.parameters())


def test_fused_softcap_loss_under_bf16():
    """The chunked loss and its custom autograd in bf16 autocast (several chunks, a prior, masked
    targets) against fp32: same loss within 1 %, gradients within 2 % of their norm."""
    g = torch.Generator().manual_seed(5)
    h, w = torch.randn(48, 32, generator=g), 0.3 * torch.randn(128, 32, generator=g)
    prior = (torch.randn(48, 32, generator=g), 0.3 * torch.randn(128, 32, generator=g))
    tgt = torch.randint(0, 120, (48,), generator=g)
    tgt[::7] = -1
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = softcap_cross_entropy(hh, ww, tgt, 120, [prior], chunk_elems=120 * 16)  # 3 chunks
        loss.backward()
        assert loss.dtype == torch.float32 and hh.grad.dtype == ww.grad.dtype == torch.float32
        out[dtype] = (loss.item(), hh.grad, ww.grad)
    (l32, gh32, gw32), (l16, gh16, gw16) = out[torch.float32], out[torch.bfloat16]
    assert abs(l16 - l32) / l32 < 0.01
    assert (gh16 - gh32).norm() / gh32.norm() < 0.02 and (gw16 - gw32).norm() / gw32.norm() < 0.02


# -----------------------------------------------------------------------------
# The compiled decode step


def decode(model: GPT, prompts: list[list[int]], n: int, compiled: bool, **opts) -> list[list[int]]:
    dec = PlainDecoder(model, DecodeOptions(max_new_tokens=n, **opts), 64)
    with torch.no_grad():
        handles = dec.add_rows(prompts)
        if compiled:
            dec.compile_step(backend="aot_eager")
        steps = [dec.step() for _ in range(n)]
    return [[s[h][0] for s in steps] for h in handles]


@pytest.mark.parametrize("prompts,opts", [([list(range(3, 15)), [7, 8, 9, 10, 11]], {}),  # left-padded rows
                                          ([list(range(40, 52))], dict(mode="stage", stage=1))])
def test_compiled_decode_step_same_tokens_no_recompiles(prompts, opts):
    from torch._dynamo.utils import counters

    model = random_model(seed=6).eval()
    eager = decode(model, prompts, 24, compiled=False, **opts)  # 24 steps run far past the window of 8
    torch._dynamo.reset()
    counters.clear()
    assert decode(model, prompts, 24, compiled=True, **opts) == eager
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every position: no recompilation


def test_engine_compile_same_tokens_one_graph(capsys, monkeypatch):
    """Engine(compile=...) decodes with the compiled step: the tokens of eager decoding, rows that
    stop early stay in the batch (one graph); speculative decoding compiles too."""
    from torch._dynamo.utils import counters

    from poelm.cli import main

    model = random_model(seed=6).eval()
    prompts = [list(range(3, 15)), [7, 8, 9, 10, 11]]
    eager = [g.tokens for g in Engine(model).generate(prompts, max_new_tokens=20, stop_token_ids=[])]
    stop = eager[1][5]  # row 1 stops after 6 tokens (row 0 may stop too, wherever it samples it)
    eager_stop = [g.tokens for g in Engine(model).generate(prompts, max_new_tokens=20, stop_token_ids=[stop])]
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(model, compile="aot_eager")
    assert [g.tokens for g in engine.generate(prompts, max_new_tokens=20, stop_token_ids=[])] == eager
    assert [g.tokens for g in engine.generate(prompts, max_new_tokens=20, stop_token_ids=[stop])] == eager_stop
    assert len(eager_stop[1]) == 6 and counters["stats"]["unique_graphs"] == 1
    spec = engine.generate(prompts, mode="speculative", max_new_tokens=20, stop_token_ids=[])  # compiled too
    assert [g.tokens for g in spec] == eager
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert main(["generate", "no-such-model", "1 2", "--compile"]) == 2  # checked before the model loads
    assert "--compile on the CPU needs a C++ compiler" in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Bad input: one line naming the problem and the fix


def test_bad_runtime_input(monkeypatch):
    from poelm.train import TrainConfig, use_compile

    if not torch.cuda.is_available():
        with pytest.raises(SettingError, match="device cuda but no CUDA GPU is visible; use device cpu"):
            parse_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(SettingError, match="dtype bf16 but Tesla V100 has no bfloat16 support; use dtype fp32"):
        check_bf16(torch.device("cuda"))
    check_bf16(torch.device("cpu"))  # the CPU computes bf16 (slowly)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(SettingError, match=r"compile on the CPU needs a C\+\+ compiler .*; pass compile=False"):
        check_compiler(torch.device("cpu"))
    assert use_compile(TrainConfig(), torch.device("cpu")) is False  # the default: off on the CPU
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(SettingError, match="compile on CUDA needs triton"):  # the default: on for CUDA
        use_compile(TrainConfig(), torch.device("cuda"))
    assert use_compile(TrainConfig(compile=False), torch.device("cuda")) is False


def test_compile_flags():
    from poelm.cli import build_parser
    from poelm.cli.train import config_from_args

    parse = lambda extra: config_from_args(build_parser().parse_args(["train", *extra]))  # noqa: E731
    assert parse([]).compile is None and parse(["--compile"]).compile is True
    assert parse(["--no-compile"]).compile is False
    assert parse(["--attention-backend", "flex"]).attention_backend == "flex"


# -----------------------------------------------------------------------------
# benchmarks/gpu_check.py


def test_gpu_check_cpu_dry_run(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu", "--json",
                           str(tmp_path / "check.json")], capture_output=True, text=True, timeout=120, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    report = json.loads((tmp_path / "check.json").read_text())
    assert set(report) >= {"train", "projection", "decode", "agreement", "hf", "ratios"}
    for row in report["train"]:
        assert row["tokens_per_s"] > 0 and row["mfu"] is None  # no peak FLOPs on the CPU
    assert {r["mode"] for r in report["decode"]} == {"plain", "plain_compiled", "stage0", "speculative", "wand"}
    assert {a["path"] for a in report["agreement"]} >= {"speculative", "plain_compiled", "prefill_flex"}
    assert all(a["tokens_equal"] for a in report["agreement"])
    assert report["hf"]["tokens_equal"]
    assert proc.stdout.rstrip().splitlines()[-1].startswith("ratios")
