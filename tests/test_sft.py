"""`poelm sft` end to end on a tiny PoE base: the trainer of `poelm train` (metrics, atomic
checkpoints, exact resume), bits per assistant token and exact match beside the base, the
base's Δlogit exactly 0, save-delta + `--delta` reproducing the run, and the bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from poelm.chatdata import build_chat_data
from poelm.checkpoint import load_model, read_safetensors, save_model
from poelm.cli import main
from poelm.model import GPT, GPTConfig
from poelm.tokenizer import Tokenizer

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]


def recall_jsonl(path: Path, n: int = 60) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            answer = " ".join(rng.choice(WORDS) for _ in range(4))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Recite verse {i}."},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    texts = [f"Recite verse {i}. " + " ".join(WORDS) for i in range(40)]
    tok = Tokenizer.train(texts, 300)
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=tok.vocab_size, sequence_len=32, poe_every=1,
                    window_pattern="L")
    base = GPT(cfg)
    base.init_weights()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_model(base, root / "base", tok)
    bp = GPT(GPTConfig(**{**cfg.to_dict(), "poe_mode": "none", "backout": None}))
    bp.init_weights()
    save_model(bp, root / "bp", tok)
    build_chat_data(str(recall_jsonl(root / "recall.jsonl")), root / "chat", val_fraction=0.1)
    return root


def sft_args(env: Path, out: Path, **over) -> list[str]:
    opts = {"data": env / "chat", "out": out, "layers": 1, "total-batch-size": 128, "device-batch-size": 2,
            "num-iterations": 6, "eval-every": 3, "save-every": 3, "eval-prompts": 2, "warmup-steps": 1,
            "lr-scaling": "off", "seed": 5, "device": "cpu", "dtype": "fp32"}
    flags = [k for k, v in over.items() if v is True]
    opts.update({k: v for k, v in over.items() if v is not True})
    argv = ["sft", str(over.pop("model", env / "base"))]
    for k, v in opts.items():
        if k != "model":
            argv += [f"--{k}", str(v)]
    return argv + [f"--{f}" for f in flags] + ["--quiet"]


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


@pytest.fixture(scope="module")
def straight(env):
    out = env / "straight"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(sft_args(env, out) + ["--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_sft_run_reports_and_preserves_the_base(env, straight):
    result = json.loads((straight / "result.json").read_text())
    assert result["base_delta_logit"] == 0.0 and result["step"] == 6
    evals = records(straight, "eval")
    assert [r["step"] for r in evals] == [0, 3, 6]
    for r in evals:
        assert r["assistant_bits"] > 0 and 0 <= r["exact_match"] <= 1 and r["exact_match_n"] == 2
        assert r["base"]["assistant_bits"] > 0  # the base's score on the same held-out chats
    assert evals[-1]["assistant_bits"] < evals[0]["assistant_bits"]  # it learns the answers
    model, _ = load_model(straight)
    assert model.config.frozen_layers == 2 and model.config.n_layer == 3
    assert (straight / "specialist.json").exists()
    assert (straight / "assistant_bits.png").read_bytes()[:4] == b"\x89PNG"


def test_sft_resume_is_exact(env, straight, tmp_path, monkeypatch):
    import poelm.schedule

    out = tmp_path / "killed"
    real = poelm.schedule.apply_schedules

    def killer(optimizer, step, *a, **kw):
        if step == 4:
            raise KeyboardInterrupt
        return real(optimizer, step, *a, **kw)

    monkeypatch.setattr(poelm.schedule, "apply_schedules", killer)
    assert main(sft_args(env, out)) == 130
    monkeypatch.setattr(poelm.schedule, "apply_schedules", real)
    assert main(sft_args(env, out, resume=True)) == 0
    want = read_safetensors(straight / "step_000006" / "model.safetensors")
    got = read_safetensors(out / "step_000006" / "model.safetensors")
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert [r["loss"] for r in records(out, "train")] == [r["loss"] for r in records(straight, "train")]


def test_save_delta_then_generate_with_delta_equals_the_run(env, straight, tmp_path, capsys):
    delta = tmp_path / "delta"
    assert main(["specialist", "save-delta", str(straight), "--out", str(delta)]) == 0
    capsys.readouterr()
    prompt = ["Recite verse 1.", "--max-new-tokens", "6", "--json", "--chat"]
    assert main(["generate", str(env / "base"), *prompt, "--delta", str(delta)]) == 0
    with_delta = json.loads(capsys.readouterr().out)
    full, _ = load_model(straight)
    for p in full.parameters():  # the delta stores bf16: compare against the run's bf16-rounded tensors
        p.data = p.data.to(torch.bfloat16).float()
    ref = tmp_path / "ref"
    tok = Tokenizer.load(straight / "step_000006")
    save_model(full, ref, tok)
    assert main(["generate", str(ref), *prompt]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == with_delta["tokens"]


def test_sft_bad_input(env, tmp_path, capsys):
    def error(argv, *fragments):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, err
        for f in fragments:
            assert f in err, err

    error(sft_args(env, tmp_path / "a", model=env / "bp"), "BP")
    error(sft_args(env, tmp_path / "b", layers=0), "--layers")
    error(sft_args(env, tmp_path / "c", data=tmp_path / "nope"), "--data", "poelm data chat")
    long = tmp_path / "long.jsonl"
    long.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"{i} " + "word " * 80},
                                                       {"role": "assistant", "content": "ok"}]}) for i in range(8)))
    build_chat_data(str(long), tmp_path / "longchat", val_fraction=0.25)
    error(sft_args(env, tmp_path / "d", data=tmp_path / "longchat"), "no assistant tokens")
    assert not any((tmp_path / n).exists() for n in "abcd")
