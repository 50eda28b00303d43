"""`poelm train --stage-parallel` under torchrun (gloo, CPU): the same training as one
process, exactly in fp64 and to fp32 summation order in fp32; per-stage checkpoints that
load as ordinary models and resume exactly after kill -9; the refusals.

Every stage-parallel run is `torchrun --standalone --nproc_per_node N` of HELPER (which patches
the init and, for fp64, the dtype) on the tiny flat run of tests/test_train.py: 2 layers x 32
wide cut into 2 stages of 1 layer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from poelm.checkpoint import load_model
from test_train import ROOT, TORCHRUN, env, expect_error, latest, one_thread, records, run, train_args, weights  # noqa: F401

needs_torchrun = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to python")

HELPER = """
    # `poelm train` from a noisy init (in fp64 when POELM_TEST_FP64=1); with POELM_TEST_KILL_AT=N
    # the rank POELM_TEST_KILL_RANK kills itself (SIGKILL) as step N begins its optimizer update.
    import os, signal, sys, torch
    import poelm.model as pm, poelm.schedule as ps
    from conftest import noisy_projections
    from poelm.cli import main

    real_init, real_schedules = pm.GPT.init_weights, ps.apply_schedules

    def noisy_init(self):
        real_init(self)
        noisy_projections(self)
        if os.environ.get("POELM_TEST_FP64") == "1":
            self.double()

    def schedules(optimizer, step, *a, **kw):
        if step + 1 == int(os.environ.get("POELM_TEST_KILL_AT", -1)) and \\
                os.environ.get("RANK") == os.environ.get("POELM_TEST_KILL_RANK", "0"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_schedules(optimizer, step, *a, **kw)

    pm.GPT.init_weights, ps.apply_schedules = noisy_init, schedules
    sys.exit(main(sys.argv[1:]))
"""


def helper(tmp_path: Path) -> Path:
    path = tmp_path / "helper.py"
    path.write_text(textwrap.dedent(HELPER))
    return path


def torchrun(args: list[str], cwd: Path, nproc: int = 2, timeout: int = 300, **extra_env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **extra_env}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", str(nproc), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def in_process(argv: list[str], capsys, fp64: bool) -> None:
    """The one-process reference run, from the helper's init."""
    from conftest import noisy_projections
    from poelm.model import GPT

    real_init = GPT.init_weights

    def noisy_init(self):
        real_init(self)
        noisy_projections(self)
        if fp64:
            self.double()

    GPT.init_weights = noisy_init
    try:
        rc, _, err = run(argv, capsys)
    finally:
        GPT.init_weights = real_init
    assert rc == 0, err


STEPS = 4
OVER = {"num-iterations": STEPS, "save-every": 2, "eval-every": 0}


def max_rel_diff(a: dict, b: dict, init: dict) -> float:
    """max over tensors of |a - b| / |b - init| (the size of the update the runs agree on)."""
    worst = 0.0
    for name in b:
        moved = (b[name] - init[name]).double().norm()
        if moved == 0:  # backout_lambda: flat PoE never reads it
            assert torch.equal(a[name], b[name]), name
            continue
        worst = max(worst, float((a[name] - b[name]).double().norm() / moved))
    return worst


def start_weights(seed: int, config, fp64: bool) -> dict:
    from poelm.model import GPT

    torch.manual_seed(seed)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:
            for lin in (block.attn.c_proj, block.mlp.c_proj):
                lin.weight.normal_(0.0, 0.02)
    return {k: v.double() if fp64 else v for k, v in model.state_dict().items()}


@needs_torchrun
@pytest.mark.parametrize("fp64", [True, False], ids=["fp64", "fp32"])
def test_stage_parallel_is_the_one_process_flat_run(env, tmp_path, capsys, fp64):
    """2 stage ranks (K=2, R=1) train exactly the weights one process trains on the same
    batches: in fp64 to <= 1e-12 of each tensor's update (only the order in which the
    stages' contributions to the shared wte / smear / lm_head gradients are summed differs),
    in fp32 to <= 1e-4 (observed 2.7e-14 and 4.8e-6). The checkpoint is an ordinary model directory."""
    sp = tmp_path / "sp"
    proc = torchrun([str(helper(tmp_path)), *train_args(env, sp, **OVER), "--stage-parallel"], cwd=tmp_path,
                    POELM_TEST_FP64=str(int(fp64)))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    one = tmp_path / "one"
    in_process(train_args(env, one, **OVER), capsys, fp64)

    assert latest(sp) == latest(one) == f"step_{STEPS:06d}"
    names = {p.name for p in (sp / latest(sp)).iterdir()}
    assert {"optim_rank0.pt", "optim_rank1.pt", "loader_rank0.json", "loader_rank1.json"} <= names
    model, tok = load_model(sp)  # an ordinary model: the whole of both stages
    ref = weights(one / latest(one))
    got = weights(sp / latest(sp))
    assert set(got) == set(ref) and got["lm_head.weight"].dtype == (torch.float64 if fp64 else torch.float32)
    init = start_weights(3, model.config, fp64)
    bound = 1e-12 if fp64 else 1e-4
    worst = max_rel_diff(got, ref, init)
    assert worst <= bound
    for step in (2, 4):  # the per-stage blocks too, at every checkpoint
        assert max_rel_diff(weights(sp / f"step_{step:06d}"), weights(one / f"step_{step:06d}"), init) <= bound
    sp_train, one_train = records(sp, "train"), records(one, "train")
    assert [r["loss"] for r in sp_train] == pytest.approx([r["loss"] for r in one_train], rel=1e-5)
    assert all(0.0 <= r["pipeline_idle"] < 1.0 for r in sp_train)
    # 2 micro-batches of (2, 32, 32) residuals leave stage 0 per step, in the params' dtype
    assert [r["bytes_p2p_per_rank"] for r in sp_train] == [2 * 2 * 32 * 32 * (8 if fp64 else 4)] * STEPS


@needs_torchrun
def test_ordinary_checkpoint_starts_it_and_kill_9_resumes_exactly(env, tmp_path, capsys):
    """An ordinary (one-process) run's checkpoint starts a stage-parallel run (--init), which
    then trains what one process trains from it (fp64, <= 1e-12); killed with SIGKILL on
    stage 1 in step 3, the run resumes from step 2's per-stage shards to bit-identical weights."""
    fp64 = {"POELM_TEST_FP64": "1"}
    ordinary = tmp_path / "ordinary"
    in_process(train_args(env, ordinary, **{**OVER, "num-iterations": 2}), capsys, fp64=True)
    over = {**OVER, "init": ordinary}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    script = str(helper(tmp_path))
    proc = torchrun([script, *train_args(env, straight, **over), "--stage-parallel"], cwd=tmp_path, **fp64)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    one = tmp_path / "one"
    in_process(train_args(env, one, **over), capsys, fp64=True)
    start = weights(ordinary / latest(ordinary))
    assert max_rel_diff(weights(straight / latest(straight)), weights(one / latest(one)), start) <= 1e-12

    proc = torchrun([script, *train_args(env, killed, **over), "--stage-parallel"], cwd=tmp_path,
                    POELM_TEST_KILL_AT="3", POELM_TEST_KILL_RANK="1", **fp64)
    assert proc.returncode != 0 and latest(killed) == "step_000002"
    proc = torchrun([script, *train_args(env, killed, **over), "--stage-parallel", "--resume"], cwd=tmp_path, **fp64)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert latest(killed) == f"step_{STEPS:06d}"
    done, want = weights(killed / latest(killed)), weights(straight / latest(straight))
    assert all(torch.equal(done[k], want[k]) for k in want)
    assert [r["loss"] for r in records(killed, "train")] == [r["loss"] for r in records(straight, "train")]


def test_bad_input_is_one_line(env, tmp_path, capsys, monkeypatch):
    """Refused before any process group or file exists: no torchrun, a poe_mode that sends
    gradients or readouts across stages, a world that is not a multiple of K, SFT, --compile."""
    out = tmp_path / "bad"
    argv = train_args(env, out, **OVER) + ["--stage-parallel"]
    expect_error(argv, capsys, "--stage-parallel runs one process per stage: launch it with torchrun",
                 "--nproc_per_node 2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    expect_error(argv, capsys, "the world of 3 process(es) is not a multiple of the 2 stages [1, 1]")
    for mode, why in (("none", "backprop sends gradients back"), ("hier", "does not detach the residual"),
                      ("residual_logop", "earlier stage's logits")):
        expect_error(train_args(env, out, **{**OVER, "poe-mode": mode}) + ["--stage-parallel"], capsys,
                     "--stage-parallel trains --poe-mode flat only", why)
    expect_error(argv + ["--compile"], capsys, "--compile is not supported with --stage-parallel")
    assert not out.exists()


def test_stages_of_different_sizes_say_how_work_is_balanced():
    from poelm.model import GPTConfig
    from poelm.stage_parallel import balance_line, owner_stage

    even = GPTConfig(n_layer=4, n_embd=32, n_head=2, vocab_size=64, poe_every=2)
    assert balance_line(even) == "stage-parallel: 2 stages of [2, 2] layers, one per rank"
    uneven = GPTConfig(n_layer=4, n_embd=32, n_head=2, vocab_size=64, poe_stage_layers=(3, 1), per_stage_head=True)
    assert "not rebalanced: the pipeline runs at the pace of the 3-layer stage (~33% of the block compute idles" \
        in balance_line(uneven)
    assert [owner_stage(n, uneven) for n in ("transformer.h.2.mlp.c_fc.weight", "transformer.h.3.attn.c_q.weight",
                                             "value_embeds.1.weight", "lm_head_stages.1.weight", "lm_head.weight",
                                             "transformer.wte.weight", "resid_lambdas")] == [0, 1, 0, 1, None, None, None]


@needs_torchrun
def test_two_stages_by_two_replicas_is_the_data_parallel_run(env, tmp_path):
    """K=2 x R=2 (4 ranks): replica r reads the row groups of rank r of a 2-rank data-parallel
    run, so both see the same micro-batches; the weights agree to <= 1e-12 of the update in
    fp64 (the 2-rank run equals one process on the same global batch: tests/test_train.py)."""
    fp64, script = {"POELM_TEST_FP64": "1"}, str(helper(tmp_path))
    over = {**OVER, "num-iterations": 2, "save-every": 0, "device-batch-size": 1}  # 128 = 1 x 32 x 2 x 2 micro
    mesh, dp = tmp_path / "mesh", tmp_path / "dp"
    proc = torchrun([script, *train_args(env, mesh, **over), "--stage-parallel"], cwd=tmp_path, nproc=4, **fp64)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    proc = torchrun([script, *train_args(env, dp, **over)], cwd=tmp_path, nproc=2, **fp64)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert len(list((mesh / latest(mesh)).glob("optim_rank*.pt"))) == 4
    init = start_weights(3, load_model(dp)[0].config, fp64=True)
    assert max_rel_diff(weights(mesh / latest(mesh)), weights(dp / latest(dp)), init) <= 1e-12
