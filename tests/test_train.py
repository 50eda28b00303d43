"""`poelm train` end to end on tiny models: run layout and metrics, atomic checkpoints,
exact resume, non-finite stops, every objective, bad input, and torchrun (gloo, 2 ranks).

Everything goes through `poelm.cli.main([...])` (or `torchrun -m poelm train` in a
subprocess) on a synthetic corpus built once per session. Training runs use one torch
thread: on a shared 2-core box two OpenMP threads per process get descheduled and the
tiny steps become tens of times slower.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from poelm.checkpoint import load_model, read_safetensors
from poelm.cli import main
from poelm.corpus import write_corpus
from poelm.dataloader import val_batches
from poelm.evaluate import evaluate_bpb
from poelm.outputs import MARKER_NAME
from poelm.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = Path(sys.executable).parent / "torchrun"
VOCAB = 320


# -----------------------------------------------------------------------------
# Fixtures: one corpus, three tokenizers, one finished run


def synthetic_docs(n: int, seed: int, n_words: int = 120) -> list[str]:
    """Learnable text: each word picks its successor from 3 choices, so a tiny model's loss
    falls fast from ln(V)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrst") for _ in range(rng.randint(2, 6))) for _ in range(n_words)]
    docs = []
    for _ in range(n):
        w, out = rng.randrange(n_words), []
        for _ in range(rng.randint(4, 40)):
            w = (5 * w + rng.randint(1, 3)) % n_words
            out.append(words[w])
        docs.append(" ".join(out) + ".")
    return docs


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    docs = synthetic_docs(400, seed=0)
    write_corpus(docs, root / "data", n_train_shards=2, row_group_docs=16)
    Tokenizer.train(docs, VOCAB).save(root / "tok")
    Tokenizer.train(docs, VOCAB + 16).save(root / "tok_bigger")
    Tokenizer.train(synthetic_docs(400, seed=1), VOCAB).save(root / "tok_other")  # same size, other merges
    return root


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_args(env: Path, out: Path, quiet: bool = True, **over) -> list[str]:
    """A tiny flat PoE run: 2 layers x 32 wide, 2 stages, 128 tokens/step in 2 micro-batches.
    Literal LRs (--lr-scaling off; nanochat's rules would divide them by 64 at 128 tokens per
    step): the flags x (32/768)^-0.5 that this fixture used before the rules were exact, with
    --scalar-lr 0.05 x 4.9 (a larger x0_lambdas lr makes the loss spike after a few steps)."""
    opts = {"data": env / "data", "tokenizer": env / "tok", "out": out, "depth": 2, "n-embd": 32, "n-head": 2,
            "seq-len": 32, "window-pattern": "L", "poe-mode": "flat", "poe-every": 1, "total-batch-size": 128,
            "device-batch-size": 2, "num-iterations": 8, "eval-every": 4, "eval-tokens": 256, "save-every": 4,
            "warmup-steps": 1, "lr-scaling": "off", "unembedding-lr": 0.0392, "embedding-lr": 1.47,
            "scalar-lr": 0.245, "weight-decay": 0.2, "seed": 3, "device": "cpu", "dtype": "fp32"}
    flags = [k for k, v in over.items() if v is True]
    opts.update({k: v for k, v in over.items() if v is not True})
    argv = ["train"]
    for k, v in opts.items():
        if v is not None:
            argv += [f"--{k}", str(v)]
    return argv + [f"--{f}" for f in flags] + ["--quiet"] * quiet


def run(argv: list[str], capsys=None) -> tuple[int, str, str]:
    rc = main(argv)
    if capsys is None:
        return rc, "", ""
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path / "model.safetensors")


def snapshot(d: Path) -> dict[str, tuple[str, int]]:
    """Every file under d (hidden ones too): content hash and mtime."""
    return {str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


def latest(out: Path) -> str:
    return (out / "latest").read_text().strip()


@pytest.fixture(scope="session")
def base_run(env):
    """8 steps of flat PoE, checkpoints at 4 and 8 (the straight run of the resume test)."""
    out = env / "base"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run(train_args(env, out)) == (0, "", "")
    finally:
        torch.set_num_threads(threads)
    return out


# -----------------------------------------------------------------------------
# A run: layout, metrics, plots, checkpoints


def test_flags_of_the_issue():
    from poelm.cli import build_parser
    from poelm.cli.train import config_from_args

    argv = ("train --data D --tokenizer T --out O --depth 6 --n-embd 96 --n-head 3 --n-kv-head 1 --seq-len 128 "
            "--window-pattern SL --poe-mode hier --poe-alpha 0.5 --poe-stage-layers 3,2,1 "
            "--per-stage-head --total-batch-size 4096 --device-batch-size 8 --num-iterations 7 --target-tokens 9 "
            "--target-param-data-ratio 11 --eval-every 5 --eval-tokens 512 --save-every 3 --seed 1 --device cpu "
            "--dtype bf16 --compile --resume").split()
    tc = config_from_args(build_parser().parse_args(argv))
    m = tc.model  # the model flags are GPTConfig's fields (nanochat's --depth / --seq-len are aliases)
    assert (tc.data, tc.tokenizer, tc.out, m.n_layer, m.n_embd, m.n_head, m.n_kv_head, m.sequence_len) == \
        ("D", "T", "O", 6, 96, 3, 1, 128)
    assert (m.window_pattern, m.poe_mode, m.poe_alpha, m.poe_stage_layers, m.per_stage_head) == \
        ("SL", "hier", 0.5, (3, 2, 1), True)
    same = config_from_args(build_parser().parse_args(
        "train --n-layer 6 --n-embd 96 --n-head 3 --n-kv-head 1 --sequence-len 128 --window-pattern SL "
        "--poe-mode hier --poe-alpha 0.5 --poe-stage-layers 3,2,1 --per-stage-head".split()))
    assert same.model == m
    every = config_from_args(build_parser().parse_args("train --depth 6 --poe-every 2 --no-backout".split())).model
    assert every.poe_stage_layers == (2, 2, 2) and every.backout is False
    assert (tc.total_batch_size, tc.device_batch_size, tc.num_iterations, tc.target_tokens,
            tc.target_param_data_ratio) == (4096, 8, 7, 9, 11.0)
    assert (tc.eval_every, tc.eval_tokens, tc.save_every, tc.seed, tc.device, tc.dtype, tc.compile, tc.resume) == \
        (5, 512, 3, 1, "cpu", "bf16", True, True)


def test_run_layout_metrics_and_checkpoints(env, base_run):
    out = base_run
    assert latest(out) == "step_000008"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step_")) == ["step_000004", "step_000008"]
    assert not [p for p in out.rglob(".*") if p.name != MARKER_NAME], "temporary files left behind"  # atomic: tmp dirs renamed away
    for step in ("step_000004", "step_000008"):
        names = {p.name for p in (out / step).iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "token_bytes.pt", "optim_rank0.pt",
                "loader_rank0.json", "trainer.json"} <= names
        blob = torch.load(out / step / "optim_rank0.pt", weights_only=False)
        assert {"optimizer", "rng"} <= set(blob) and blob["optimizer"]["state"]
        loader = json.loads((out / step / "loader_rank0.json").read_text())
        assert loader["rank"] == 0 and loader["world_size"] == 1 and loader["rows"] == int(step[5:]) * 4
    assert json.loads((out / "step_000008" / "trainer.json").read_text())["step"] == 8

    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(1, 9))
    for r in train:
        assert {"loss", "stage_losses", "lr_mult", "tokens_per_s", "mfu", "dt"} <= set(r)
        assert len(r["stage_losses"]) == 2 and r["tokens_per_s"] > 0
        assert r["loss"] == pytest.approx(sum(r["stage_losses"]) / 2, rel=1e-5)  # alpha = 0: mean of the stages
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [0, 4, 8]
    for r in evals:
        assert len(r["stages"]) == 2 and r["logop"] > 0
        assert r["bpb"] == pytest.approx(r["stages"][-1])  # PoE: the final readout is the last stage (no backout)
    assert evals[-1]["bpb"] < evals[0]["bpb"]
    for png in ("loss.png", "bpb.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((out / "result.json").read_text())
    assert result["step"] == 8 and result["eval"]["step"] == 8

    # the logged eval is what the saved model gives on the same validation batches
    model, tok = load_model(out)
    assert tok is not None and tok.vocab_size == VOCAB
    again = evaluate_bpb(model, val_batches(env / "data", tok, 2, 32, 256), tok.token_bytes())
    for key in ("bpb", "logop"):
        assert again[key] == pytest.approx(evals[-1][key], rel=1e-6)
    assert again["stages"] == pytest.approx(evals[-1]["stages"], rel=1e-6)


def test_eval_budget_defaults_to_the_device_and_is_capped(env):
    """No --eval-tokens: the CPU budget (2^16), capped at this small validation split (one warning)."""
    from types import SimpleNamespace

    from poelm.cli.train import config_from_args
    from poelm.train import Pretraining, Runtime
    from poelm.cli import build_parser

    tc = config_from_args(build_parser().parse_args(["train", "--data", str(env / "data")]))
    assert tc.eval_tokens is None
    tc = dataclasses.replace(tc, device_batch_size=2)
    tok = Tokenizer.load(env / "tok")
    with pytest.warns(UserWarning, match=r"holds only [\d,]+ tokens at seq_len 32, less than the 65,536-token"):
        val = Pretraining().evaluator(tc, SimpleNamespace(tokenizer=tok, seq_len=32), Runtime()).val
    one_pass = list(val_batches(env / "data", tok, 2, 32, 10 ** 9))
    assert sum(y.numel() for _, y in val) == sum(y.numel() for _, y in one_pass) < 2 ** 16
    assert all(torch.equal(a[1], b[1]) for a, b in zip(val, one_pass))


def test_progress_bar_and_horizon_lines(env, tmp_path, capsys):
    rc, out, err = run(train_args(env, tmp_path / "run", **{"num-iterations": None, "target-tokens": 512,
                                                             "eval-every": 0}, quiet=False), capsys)
    assert rc == 0, err
    assert "horizon: 4 steps from --target-tokens" in out
    # the effective LRs: literal here (--lr-scaling off), printed and kept beside the flags
    assert ("effective lr (off): lm_head 0.0392 | wte 1.47 | value_embeds 0.735 | resid_lambdas 0.00245 | "
            "x0_lambdas 0.245 | smear/backout 0.2 | muon 0.02 (x max(1, m/n)^0.5) | muon wd start 0.2") in out
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["lr_scaling"] == "off" and saved["effective"]["wte"] == 1.47
    bar = out.strip().splitlines()[-1]
    for word in ("4/4", "loss", "lr", "tok/s", "MFU", "ETA"):
        assert word in bar, bar
    assert not records(tmp_path / "run", "eval")  # --eval-every 0: no eval


# -----------------------------------------------------------------------------
# Exact resume


def test_resume_is_exact(env, base_run, tmp_path, monkeypatch, capsys):
    """N/2 steps, resume, N/2 steps == N steps straight, bit for bit (torch.equal). The
    first process is killed during step 7, so steps 5-6 ran past its step-4 checkpoint and
    must be thrown away: the resumed run restarts from the model, optimizer, loader and RNG
    state of step 4."""
    import poelm.schedule

    out = tmp_path / "killed"
    real = poelm.schedule.apply_schedules

    def killer(optimizer, step, *a, **kw):
        if step == 6:
            raise KeyboardInterrupt
        return real(optimizer, step, *a, **kw)

    monkeypatch.setattr(poelm.schedule, "apply_schedules", killer)
    rc, _, err = run(train_args(env, out), capsys)
    assert rc == 130 and "interrupted" in err
    assert latest(out) == "step_000004" and not (out / "step_000008").exists()
    assert [r["step"] for r in records(out, "train")] == list(range(1, 7))  # steps 5, 6 are lost work
    monkeypatch.setattr(poelm.schedule, "apply_schedules", real)

    rc, _, err = run(train_args(env, out, resume=True), capsys)
    assert rc == 0, err
    want, got = weights(base_run / "step_000008"), weights(out / "step_000008")
    assert want.keys() == got.keys()
    start = weights(base_run / "step_000004")
    for name in want:
        assert torch.equal(want[name], got[name]), name
    assert any(not torch.equal(want[n], start[n]) for n in want)
    # the optimizer state and the loader position are the same too
    a = torch.load(base_run / "step_000008" / "optim_rank0.pt", weights_only=False)["optimizer"]["state"]
    b = torch.load(out / "step_000008" / "optim_rank0.pt", weights_only=False)["optimizer"]["state"]
    assert a.keys() == b.keys()
    for k in a:
        for key, t in a[k].items():
            assert torch.equal(t, b[k][key]) if torch.is_tensor(t) else t == b[k][key]
    assert (json.loads((base_run / "step_000008" / "loader_rank0.json").read_text())
            == json.loads((out / "step_000008" / "loader_rank0.json").read_text()))
    # metrics: every step once, and the resumed steps log the straight run's losses
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(1, 9))
    assert [r["loss"] for r in train] == [r["loss"] for r in records(base_run, "train")]
    assert [r["step"] for r in records(out, "eval")] == [0, 4, 8]

    # resuming a finished run does nothing and repeats nothing
    before = (out / "metrics.jsonl").read_text()
    assert run(train_args(env, out, resume=True), capsys)[0] == 0
    assert (out / "metrics.jsonl").read_text() == before and latest(out) == "step_000008"


# -----------------------------------------------------------------------------
# Non-finite loss / weights: stop, keep the last good checkpoint


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(env, tmp_path, monkeypatch, capsys):
    """An absurd learning rate from the 5th update on (after the step-4 checkpoint): the
    loss of step 6 is not finite, the run stops with one line, `latest` still names step 4."""
    import poelm.schedule

    real = poelm.schedule.apply_schedules

    def absurd(optimizer, step, *a, **kw):
        lrm = real(optimizer, step, *a, **kw)
        if step >= 4:
            for group in optimizer.param_groups:
                group["lr"] = 1e30
        return lrm

    monkeypatch.setattr(poelm.schedule, "apply_schedules", absurd)
    out = tmp_path / "nan"
    rc, _, err = run(train_args(env, out, **{"save-every": 2}), capsys)
    assert rc == 1  # a diverged run is not bad input (2)
    assert err.count("\n") == 1 and "loss became nan at step 6" in err and "last good checkpoint" in err, err
    assert latest(out) == "step_000004"
    assert sorted(p.name for p in out.glob("step_*")) == ["step_000002", "step_000004"]
    model, _ = load_model(out)  # the checkpoint `latest` names loads and is finite
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert records(out, "train")[-1]["step"] == 5  # the non-finite step was never logged

    # and it resumes from there (with sane learning rates)
    monkeypatch.setattr(poelm.schedule, "apply_schedules", real)
    assert run(train_args(env, out, resume=True, **{"save-every": 2}), capsys)[0] == 0
    assert latest(out) == "step_000008"


def test_nonfinite_weights_are_never_checkpointed(env, tmp_path, monkeypatch, capsys):
    """A step whose loss was finite but whose update made the weights inf: the checkpoint
    that would follow is refused, so `latest` never points at broken weights."""
    from poelm.optim import MuonAdamW

    real_step, calls = MuonAdamW.step, []

    def poison(self, closure=None):
        out = real_step(self, closure)
        calls.append(1)
        if len(calls) == 4:  # the update of step index 3 -> the weights saved at step 4
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(MuonAdamW, "step", poison)
    out = tmp_path / "inf"
    rc, _, err = run(train_args(env, out, **{"save-every": 2}), capsys)
    assert rc == 1 and "parameters became non-finite before the checkpoint of step 4" in err, err
    assert latest(out) == "step_000002" and not (out / "step_000004").exists()
    assert not [p for p in out.rglob(".*") if p.name != MARKER_NAME]
    model, _ = load_model(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -----------------------------------------------------------------------------
# Every objective trains end to end


@pytest.mark.parametrize("opts", [
    {"poe-mode": "none"},
    {"poe-mode": "flat", "poe-alpha": 0.0},
    {"poe-mode": "flat", "poe-alpha": 0.5},
    {"poe-mode": "flat", "poe-alpha": 1.0},
    {"poe-mode": "hier", "n-kv-head": 1},
    {"poe-mode": "residual_logop"},
    {"poe-mode": "flat", "per-stage-head": True},
    {"poe-mode": "residual_logop", "depth": 3, "poe-every": None, "poe-stage-layers": "2,1", "per-stage-head": True},
], ids=["none", "flat-a0", "flat-a0.5", "flat-a1", "hier-gqa", "residual_logop", "flat-per-stage-head",
        "residual_logop-2,1-heads"])
def test_objectives_train(env, tmp_path, capsys, opts):
    out = tmp_path / "run"
    over = {"num-iterations": 12, "eval-every": 12, "save-every": 0, **opts}
    rc, _, err = run(train_args(env, out, **over), capsys)
    assert rc == 0, err
    train = records(out, "train")
    losses = [r["loss"] for r in train]
    assert all(map(lambda v: v == v and v < 1e3, losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses  # it learns
    mode = opts["poe-mode"]
    K = 1 if mode == "none" else 2
    assert all(len(r["stage_losses"]) == K for r in train)
    if mode != "none":  # the logged loss is sum(stage losses) / K^(1 - alpha)
        alpha = float(opts.get("poe-alpha", 0.0))
        r = train[-1]
        assert r["loss"] == pytest.approx(sum(r["stage_losses"]) / K ** (1 - alpha), rel=1e-5)
    evals = records(out, "eval")
    ev = evals[-1]
    assert [e["step"] for e in evals] == [0, 12] and ev["bpb"] < evals[0]["bpb"]
    assert len(ev["stages"]) == 2 and all(v == v for v in [ev["bpb"], ev["logop"], *ev["stages"]])
    model, _ = load_model(out)
    assert model.config.poe_mode == mode and model.config.n_stages == 2
    if opts.get("per-stage-head"):  # zero-initialised stage heads got trained
        assert all(h.weight.abs().sum() > 0 for h in model.lm_head_stages)
    if mode == "none":  # BP: the final readout uses backout, the stage readouts are not trained predictors
        assert model.config.backout


# -----------------------------------------------------------------------------
# Bad input: one line on stderr, exit 2, nothing written or overwritten


def expect_error(argv, capsys, *fragments) -> str:
    rc, out, err = run(argv, capsys)
    assert rc == 2, (rc, out, err)
    assert err.startswith("poelm: error: ") and err.count("\n") == 1, err
    for frag in fragments:
        assert frag in err, err
    return err


def test_bad_data(env, tmp_path, capsys):
    out = tmp_path / "out"
    expect_error(train_args(env, out, data=tmp_path / "missing"), capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    expect_error(train_args(env, out, data=tmp_path / "empty"), capsys, "no .parquet shards")
    bad = tmp_path / "notext"
    bad.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"content": ["some words here"] * 4}), bad / f"shard_{i:05d}.parquet")
    expect_error(train_args(env, out, data=bad), capsys, "notext: no corpus.json beside its parquet shards")
    (bad / "corpus.json").write_text(json.dumps({"shards": ["shard_00000.parquet", "shard_00001.parquet"]}))
    expect_error(train_args(env, out, data=bad), capsys, "no 'text' column")
    # a bad validation shard is found before anything is written too
    mixed = tmp_path / "badval"
    shutil.copytree(env / "data", mixed)
    pq.write_table(pa.table({"content": ["x"]}), mixed / "shard_99999.parquet")
    expect_error(train_args(env, out, data=mixed), capsys, "shard_99999.parquet is not one of the 3 shards")
    manifest = json.loads((mixed / "corpus.json").read_text())
    (mixed / "corpus.json").write_text(json.dumps({"shards": manifest["shards"] + ["shard_99999.parquet"]}))
    expect_error(train_args(env, out, data=mixed), capsys, "shard_99999.parquet has no 'text' column")
    assert not out.exists()


def test_bad_batch_sizes_and_settings(env, tmp_path, capsys):
    out = tmp_path / "out"
    expect_error(train_args(env, out, **{"total-batch-size": 100}), capsys,
                 "--total-batch-size 100 is not a multiple of", "2 x 32 x 1 = 64")
    expect_error(train_args(env, out, **{"device-batch-size": 0}), capsys, "must be >= 1")
    expect_error(train_args(env, out, dtype="fp16"), capsys, "--dtype fp16: training runs in fp32 (float32) or bf16 (bfloat16)")
    expect_error(train_args(env, out, **{"poe-every": 3}), capsys, "poe_every=3 does not divide n_layer=2")
    expect_error(train_args(env, out, **{"num-iterations": -1, "target-param-data-ratio": 0}), capsys, "no horizon")
    expect_error(train_args(env, out, **{"weight-decay": -0.1}), capsys, "--weight-decay -0.1: must be a finite")
    expect_error(train_args(env, out, **{"matrix-lr": "nan"}), capsys, "--matrix-lr nan: must be a finite")
    if not torch.cuda.is_available():
        expect_error(train_args(env, out, device="cuda"), capsys, "no CUDA GPU")
    expect_error(train_args(env, out, tokenizer=None), capsys, "--tokenizer DIR is required")
    assert not out.exists()


def test_existing_run_needs_resume(env, base_run, capsys):
    before = snapshot(base_run)
    expect_error(train_args(env, base_run), capsys, "already holds a run (checkpoint step_000008)", "--resume")
    assert snapshot(base_run) == before


def test_resume_with_another_architecture_or_tokenizer(env, base_run, tmp_path, capsys):
    before = snapshot(base_run)
    expect_error(train_args(env, base_run, depth=3, resume=True), capsys, "another architecture", "n_layer")
    expect_error(train_args(env, base_run, **{"n-embd": 48}, resume=True), capsys, "another architecture",
                 "n_embd: checkpoint 32 vs now 48")
    expect_error(train_args(env, base_run, **{"poe-mode": "none"}, resume=True), capsys, "poe_mode")
    expect_error(train_args(env, base_run, tokenizer=env / "tok_bigger", resume=True), capsys,
                 f"has {VOCAB + 16} tokens", f"{VOCAB}-token tokenizer")
    expect_error(train_args(env, base_run, tokenizer=env / "tok_other", resume=True), capsys,
                 "does not match the one", "different merges")
    expect_error(train_args(env, base_run, tokenizer=tmp_path / "nope"), capsys, "tokenizer directory")
    assert snapshot(base_run) == before


# -----------------------------------------------------------------------------
# torchrun: 2 gloo ranks on CPU


def torchrun(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to python")


@needs_torchrun
def test_torchrun_two_ranks(env, tmp_path, capsys):
    """`torchrun --nproc_per_node 2 -m poelm train`: each rank reads its own row groups,
    the optimizer state and the loader state are sharded per rank, eval sums over ranks."""
    out = tmp_path / "ddp"
    argv = train_args(env, out, **{"device-batch-size": 1})  # 128 = 1 x 32 x 2 ranks x 2 accumulation steps
    proc = torchrun(["-m", "poelm", *argv], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert latest(out) == "step_000008"
    for step in ("step_000004", "step_000008"):
        names = {p.name for p in (out / step).iterdir()}
        assert {"optim_rank0.pt", "optim_rank1.pt", "loader_rank0.json", "loader_rank1.json"} <= names
        states = [json.loads((out / step / f"loader_rank{r}.json").read_text()) for r in (0, 1)]
        assert [(s["rank"], s["world_size"]) for s in states] == [(0, 2), (1, 2)]
        assert all(s["rows"] == int(step[5:]) * 2 for s in states)  # 2 micro-batches of 1 row per step
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(1, 9))
    assert sum(r["loss"] for r in train[-3:]) < sum(r["loss"] for r in train[:3])
    # the logged eval (summed over both ranks' validation shards) is what the saved model gives
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [0, 4, 8]
    model, tok = load_model(out)
    batches = [b for r in (0, 1) for b in val_batches(env / "data", tok, 1, 32, 256, rank=r, world_size=2)]
    again = evaluate_bpb(model, batches, tok.token_bytes())
    assert again["tokens"] == evals[-1]["tokens"]
    assert again["bpb"] == pytest.approx(evals[-1]["bpb"], rel=1e-6)
    assert again["logop"] == pytest.approx(evals[-1]["logop"], rel=1e-6)

    # its optimizer state is sharded over 2 ranks: a 1-process resume is refused cleanly
    before = snapshot(out)
    expect_error(train_args(env, out, **{"device-batch-size": 1, "total-batch-size": 64}, resume=True), capsys,
                 "written by 2 process(es), this run has 1")
    assert snapshot(out) == before


SAME_BATCH_HELPER = """
    # Run `poelm train` under torchrun where every rank trains on its slice of the global
    # batch a single process would see (each rank reads the global best-fit stream), from
    # the noisy init below, and dump every rank's final parameters.
    import sys, torch
    import poelm.dataloader as dl, poelm.model as pm, poelm.train as tr
    from poelm.cli import main

    class GlobalSlice(dl.BestFitLoader):
        def __init__(self, data_dir, tokenizer, batch_size, seq_len, split="train", rank=0, world_size=1, **kw):
            self.slice = None
            if split == "train":
                self.slice = slice(rank * batch_size, (rank + 1) * batch_size)
                batch_size, rank, world_size = batch_size * world_size, 0, 1
            super().__init__(data_dir, tokenizer, batch_size, seq_len, split=split, rank=rank,
                             world_size=world_size, **kw)

        def __next__(self):
            x, y = super().__next__()
            return (x, y) if self.slice is None else (x[self.slice], y[self.slice])

    import poelm.rundir as rd
    from conftest import noisy_projections
    real_init, real_save = pm.GPT.init_weights, rd.RunDir.save_checkpoint

    def noisy_init(self):
        real_init(self)
        noisy_projections(self)

    def save(run, step, model, *a, **kw):
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, run.path.parent / f"rank{run.rank}_{step}.pt")
        return real_save(run, step, model, *a, **kw)

    dl.BestFitLoader, pm.GPT.init_weights, rd.RunDir.save_checkpoint = GlobalSlice, noisy_init, save
    sys.exit(main(sys.argv[1:]))
"""


def micro_batches(loader_class):
    """A 1-process loader class that reads the same global batch of 2 x rows as the helper's
    two ranks and hands it out as two micro-batches: rank 0's rows, then rank 1's."""

    class Halves(loader_class):
        def __init__(self, data_dir, tokenizer, batch_size, seq_len, split="train", **kw):
            self.half_rows = batch_size if split == "train" else None
            super().__init__(data_dir, tokenizer, 2 * batch_size if self.half_rows else batch_size, seq_len, split=split,
                             **kw)
            self.pending = []

        def __next__(self):
            if self.half_rows is None:
                return super().__next__()
            if not self.pending:
                x, y = super().__next__()
                self.pending = [(x[self.half_rows:], y[self.half_rows:]), (x[:self.half_rows], y[:self.half_rows])]
            return self.pending.pop()

    return Halves


@needs_torchrun
def test_torchrun_matches_one_process_on_the_same_global_batch(env, tmp_path, monkeypatch, capsys):
    """A 2-rank run equals, bit for bit, a 1-process run that computes the same thing: each
    rank's micro-batch (2 rows) is one of the 1-process run's two accumulation micro-batches,
    with the same shapes, so every forward and backward kernel sees the same operands. The
    gradients then meet as (g0 + g1) / 2 on both sides: the 1-process run accumulates
    g0/2 + g1/2 (loss / grad_accum; halving is exact in binary floating point) and the ranks
    reduce g0 + g1 and divide by 2 (a two-term sum is commutative). The sharded optimizer
    updates each rank's slice with the same per-matrix / per-element operations. Only the
    logged loss differs: the ranks average in fp32, the 1-process run in Python floats, one
    rounding of a sum apart (relative 2**-24).

    Both runs start from an init with noisy (not zero) c_proj: at the standard init every
    block is the identity and every readout is RMS-normed, so the gradients of
    resid_lambdas/x0_lambdas are zero in exact arithmetic and AdamW (eps 1e-10) turns their
    fp32 rounding noise into a full +-lr first step."""
    import poelm.dataloader as dl
    from poelm.model import GPT

    helper = tmp_path / "same_batch.py"
    helper.write_text(textwrap.dedent(SAME_BATCH_HELPER))
    steps = 6
    over = {"num-iterations": steps, "save-every": 0, "eval-every": 0, "device-batch-size": 2}
    proc = torchrun([str(helper), *train_args(env, tmp_path / "two" / "run", **over)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    from conftest import noisy_projections

    real_init = GPT.init_weights

    def noisy_init(self):  # the helper's init, for the 1-process run
        real_init(self)
        noisy_projections(self)

    monkeypatch.setattr(GPT, "init_weights", noisy_init)
    monkeypatch.setattr(dl, "BestFitLoader", micro_batches(dl.BestFitLoader))
    one = tmp_path / "one"
    rc, _, err = run(train_args(env, one, **over), capsys)  # 128 = 2 rows x 32 x 2 accumulation steps
    assert rc == 0, err
    torch.manual_seed(3)  # --seed 3: the init both runs started from
    init = GPT(load_model(one)[0].config)
    init.init_weights()
    init = init.state_dict()

    r0, r1 = (torch.load(tmp_path / "two" / f"rank{r}_{steps}.pt") for r in (0, 1))
    for name in r0:  # the all-gather leaves every rank with the same weights
        assert torch.equal(r0[name], r1[name]), name
    saved, ref = weights(tmp_path / "two" / "run" / f"step_{steps:06d}"), weights(one / f"step_{steps:06d}")
    for name in ref:  # the checkpoint holds rank 0's model, and it is the 1-process model
        assert torch.equal(saved[name], r0[name]), name
        assert torch.equal(saved[name], ref[name]), name
        if name == "backout_lambda":  # flat PoE: no stage loss uses backout, so it gets no gradient
            assert torch.equal(ref[name], init[name])
        else:
            assert not torch.equal(ref[name], init[name]), f"{name} never moved"
    two_loss = [r["loss"] for r in records(tmp_path / "two" / "run", "train")]
    one_loss = [r["loss"] for r in records(one, "train")]
    assert two_loss == pytest.approx(one_loss, rel=2 ** -23)
