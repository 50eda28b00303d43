"""`poelm experiment` and `poelm compare` end to end on a micro configuration: results,
report and plots, resume after an interruption, and the errors for bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from poelm.chatdata import build_chat_data
from poelm.cli import main
from poelm import experiment as exp

MICRO = dict(model=dict(n_layer=2, n_embd=32, n_head=2, sequence_len=32, poe_every=1), vocab_size=300, total_batch_size=256,
             device_batch_size=8, num_iterations=4, eval_every=2, eval_tokens=512, save_every=2,
             decode_tokens=8, decode_prompts=2, decode_compile=False, device="cpu", dtype="fp32",
             specialist_steps=4, specialist_batch_rows=4, specialist_eval_prompts=2)


def _texts(folder: Path, n: int = 300) -> Path:
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 5))) for _ in range(60)]
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"doc{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(rng.randint(20, 60))) + ".")
    return folder


@pytest.fixture
def micro(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: one thread beats two on a shared 2-core box
    src = _texts(tmp_path / "texts")
    chat = tmp_path / "chat.jsonl"  # a small recall-style chat set (the real one is built from the sdist)
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Recite verse {i}."},
                                                      {"role": "assistant", "content": f"verse {i} says {i * 7}"}]})
                              for i in range(40)))
    build_chat_data(str(chat), tmp_path / "recall", val_fraction=0.1)
    yield exp.load_config("tiny", dict(MICRO, out=str(tmp_path / "exp"), data_source=str(src),
                                       data=str(tmp_path / "data"), tokenizer=str(tmp_path / "tok"),
                                       specialist_data=str(tmp_path / "recall")))
    torch.set_num_threads(threads)


def test_experiment_end_to_end_and_resume(micro, monkeypatch):
    real_run_arm = exp.run_arm

    def interrupted(cfg, arm, say):
        if arm == "poe_a05":
            raise KeyboardInterrupt
        return real_run_arm(cfg, arm, say)

    monkeypatch.setattr(exp.run, "run_arm", interrupted)
    with pytest.raises(KeyboardInterrupt):
        exp.run_experiment(micro, quiet=True)
    out = Path(micro.out)
    bp_result = (out / "arms" / "bp" / "result.json").read_bytes()
    assert not (out / "arms" / "poe_a05" / "result.json").exists()

    monkeypatch.setattr(exp.run, "run_arm", real_run_arm)
    said = []
    monkeypatch.setattr("builtins.print", lambda *a, **k: said.append(" ".join(map(str, a))))
    results = exp.run_experiment(micro)
    assert any("[bp] finished earlier: skipped" in s for s in said)
    assert any("[poe] finished earlier: skipped" in s for s in said)
    # stdout is not a terminal: plain progress lines; the alpha=0.5 arm runs 2 of the 4 steps' schedule
    assert any(s.startswith("stopping at step 2 of the 4-step schedule") for s in said)
    assert any(s.startswith("train poe_a05: step 2/2 (100%) | loss ") and "tok/s" in s and "| ETA 0s" in s
               for s in said)
    assert (out / "arms" / "bp" / "result.json").read_bytes() == bp_result  # not retrained

    saved = json.loads((out / "results.json").read_text())
    assert set(saved["arms"]) == {"bp", "poe", "poe_a05"}
    for arm in ("bp", "poe", "poe_a05"):
        evals = saved["evals"][arm]  # the alpha=0.5 arm stops at the eval step nearest 53 % (2 of 4)
        assert [r["step"] for r in evals] == ([0, 2] if arm == "poe_a05" else [0, 2, 4])
        assert len(evals[-1]["stages"]) == 2 and evals[-1]["logop"] > 0
    # identical architecture, data and seed: step-0 evaluations agree across arms
    assert saved["evals"]["bp"][0]["stages"] == saved["evals"]["poe"][0]["stages"]
    assert [g["step"] for g in saved["gap"]] == [2, 4]
    sets = saved["inference"]["poe"]["sets"]  # validation and outside-text prompts
    assert set(sets) == {"validation", "outside"} and "bp_plain" in sets["validation"]
    modes = sets["validation"]["modes"]
    assert set(modes) == {"plain", "stage0", "wand", "speculative", "speculative_adaptive", "speculative_sampled",
                          "speculative_batched"}  # the fastest fixed draft stage also at T = 0.8 and batch 8
    assert modes["speculative"]["identical_to_plain"] is True
    assert set(saved["reused"]) == {"bp", "poe"}  # finished by the interrupted call
    assert set(saved["inference"]["bp_refusals"]) == {"stage", "logop", "wand", "speculative"}
    report = (out / "report.md").read_text()
    assert "| poe |" in report and "gap vs BP" in report and "refuses" in report
    assert "## Headline" in report and "Reused from an earlier call: bp (finished " in report
    # the arms compared where the alpha=0.5 arm stopped (step 2)
    final = {arm: next(r["bpb"] for r in saved["evals"][arm] if r["step"] == 2) for arm in ("bp", "poe", "poe_a05")}
    assert saved["alpha05_at_stop"]["bpb"] == final and saved["alpha05_at_stop"]["step"] == 2
    alpha = "α=0 better than α=0.5, as in" if final["poe"] < final["poe_a05"] else "α=0.5 better than α=0, not as in"
    assert f"(BP {final['bp']:.4f}, PoE α=0 {final['poe']:.4f}, PoE α=0.5 {final['poe_a05']:.4f}): {alpha}" in report
    spec = saved["specialist"]  # the specialist stage on the PoE arm
    assert spec["base_delta_logit"] == 0.0 and spec["steps"] == 4 and spec["delta_tensors"] == 10
    assert spec["specialist"]["assistant_bits"] > 0 and spec["base"]["assistant_bits"] > 0
    assert (out / "specialist" / "delta" / "delta.safetensors").exists()
    assert "post-hoc specialist on the frozen PoE base" in report and "Δlogit" in report
    for png in ("bpb_curves.png", "bpb_per_stage.png", "gap.png", "speedups.png", "specialist.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["wall_seconds"] > 0


def test_compare_models(micro, tmp_path, capsys):
    micro.arms = ["bp", "poe"]
    exp.run_experiment(micro, quiet=True)
    arms = Path(micro.out) / "arms"
    plot = tmp_path / "cmp.png"
    capsys.readouterr()
    assert main(["compare", str(arms / "bp"), str(arms / "poe"), "--data", micro.data, "--tokens", "512",
                 "--seq-len", "32", "--plot", str(plot), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {Path(r["model"]).name: r for r in result["models"]}
    assert rows["bp"]["modes"] == ["final"] and "speculative" in rows["poe"]["modes"]
    assert len(rows["poe"]["stage_bpb"]) == 2 and result["note"] is None
    assert plot.exists()
    # no --tokens: the CPU default budget, capped like --tokens 512 at the micro validation split (480 tokens)
    with pytest.warns(UserWarning, match="less than the 65,536-token eval budget"):
        assert main(["compare", str(arms / "bp"), "--data", micro.data, "--seq-len", "32", "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert whole["tokens_budget"] == 2 ** 16 and whole["models"][0]["tokens"] == rows["bp"]["tokens"] < 512
    # the same checkpoints through `poelm eval` give the same bpb
    assert main(["eval", str(arms / "poe"), "--data", micro.data, "--tokens", "512", "--seq-len", "32",
                 "--batch-size", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bpb"] == pytest.approx(rows["poe"]["bpb"], rel=1e-6)


def test_bad_input(tmp_path, capsys):
    assert main(["experiment", "no-such-preset"]) == 2
    assert "unknown experiment preset" in capsys.readouterr().err
    cfg = tmp_path / "exp.toml"
    cfg.write_text('depth = 2\nmystery_knob = 3\n')
    assert main(["experiment", str(cfg)]) == 2
    assert "mystery_knob" in capsys.readouterr().err
    data = tmp_path / "data"
    data.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["only one shard"]}), data / "shard_00000.parquet")
    assert main(["experiment", "tiny", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "shard" in capsys.readouterr().err


def test_presets_are_valid():
    for name in exp.EXPERIMENTS:
        cfg = exp.load_config(name, {})
        tc = exp.arm_train_config(cfg, "poe")
        assert tc.model_config(cfg.vocab_size).n_stages >= 2
    paper = exp.load_config("paper-d24", {})
    assert paper.total_batch_size == 2 ** 20 and paper.model_config("flat", 0.0).n_layer == 24 and paper.target_param_data_ratio == 20


def test_preset_learning_rates():
    """CPU presets take literal LRs (tiny: twice the effective values it trained with before the
    scaling rules were exact, from its BP sweep); the GPU presets use nanochat's rules, d24 at
    the released values."""
    from poelm.optim import effective_hparams

    def effective(name):
        cfg = exp.load_config(name, {})
        tc = exp.arm_train_config(cfg, "poe")
        return effective_hparams(tc.model_config(cfg.vocab_size), tc.total_batch_size, tc)

    tiny = effective("tiny")
    assert tiny.scaling == "off" and (tiny.lm_head, tiny.wte, tiny.x0_lambdas, tiny.matrix, tiny.muon_weight_decay) \
        == pytest.approx((2 * 0.008 * 6 ** 0.5, 2 * 0.3 * 6 ** 0.5, 2 * 0.5 * 6 ** 0.5, 0.04, 0.2), rel=1e-3)
    assert effective("cpu-long").scaling == "off"
    d24 = effective("paper-d24")
    assert d24.scaling == "nanochat" and (d24.matrix, d24.muon_weight_decay) == pytest.approx((0.0283, 0.0597), rel=2e-3)
    d12 = effective("gpu-small")  # the reference itself: the flags as they are
    assert (d12.lm_head, d12.wte, d12.matrix, d12.muon_weight_decay) == pytest.approx((0.008, 0.3, 0.02, 0.28))
