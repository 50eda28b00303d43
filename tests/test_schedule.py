"""Tests for poelm.schedule: curve shapes at key steps and horizon precedence."""

import math

import pytest
import torch

from poelm.optim import MuonAdamW
from poelm.schedule import (apply_schedules, lr_multiplier, muon_momentum, muon_weight_decay,
                            resolve_horizon)


def test_lr_multiplier_shape():
    N = 1000                                         # warmdown: last 650 steps, from step 350
    assert lr_multiplier(0, N) == pytest.approx(1 / 40)
    assert lr_multiplier(19, N) == pytest.approx(0.5)
    assert lr_multiplier(39, N) == 1.0
    assert lr_multiplier(200, N) == 1.0
    assert lr_multiplier(350, N) == 1.0
    assert lr_multiplier(675, N) == pytest.approx(0.5 + 0.5 * 0.05)
    assert lr_multiplier(N, N) == pytest.approx(0.05)
    mults = [lr_multiplier(s, N) for s in range(N)]
    assert all(a >= b for a, b in zip(mults[39:], mults[40:]))   # never rises after warmup
    assert min(mults[40:]) > 0.05


def test_lr_multiplier_short_run_overlap():
    # warmup and warmdown overlap: the smaller wins, never above 1
    mults = [lr_multiplier(s, 20) for s in range(20)]
    assert max(mults) <= 1.0 and mults[0] == pytest.approx(1 / 40)


def test_muon_momentum_shape():
    N = 2000                                         # warmdown from step 700 (1300 steps)
    assert muon_momentum(0, N) == pytest.approx(0.85)
    assert muon_momentum(200, N) == pytest.approx(0.91)
    assert muon_momentum(400, N) == pytest.approx(0.97)
    assert muon_momentum(700, N) == pytest.approx(0.97)
    assert muon_momentum(1350, N) == pytest.approx(0.935)
    assert muon_momentum(N, N) == pytest.approx(0.90)
    short = [muon_momentum(s, 100) for s in range(101)]
    assert 0.85 <= min(short) and max(short) <= 0.97


def test_muon_weight_decay_cosine():
    N, wd0 = 1000, 0.2
    assert muon_weight_decay(0, N, wd0) == pytest.approx(wd0)
    assert muon_weight_decay(N // 2, N, wd0) == pytest.approx(wd0 / 2)
    assert muon_weight_decay(N // 4, N, wd0) == pytest.approx(wd0 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert muon_weight_decay(N, N, wd0) == pytest.approx(0.0, abs=1e-12)


def test_apply_schedules_sets_every_group():
    a, m = torch.zeros(3, requires_grad=True), torch.zeros(4, 4, requires_grad=True)
    opt = MuonAdamW([
        dict(kind="adamw", params=[a], lr=0.1, initial_lr=0.1, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.05),
        dict(kind="muon", params=[m], lr=0.02, initial_lr=0.02, momentum=0.85, weight_decay=0.2,
             initial_weight_decay=0.2),
    ])
    N = 2000
    lrm = apply_schedules(opt, 1350, N)
    adamw, muon = opt.param_groups
    assert lrm == lr_multiplier(1350, N)
    assert adamw["lr"] == pytest.approx(0.1 * lrm) and muon["lr"] == pytest.approx(0.02 * lrm)
    assert adamw["weight_decay"] == 0.05                             # AdamW decay stays fixed
    assert muon["momentum"] == pytest.approx(0.935)
    assert muon["weight_decay"] == pytest.approx(muon_weight_decay(1350, N, 0.2))


def test_resolve_horizon_precedence():
    P, tps = 1_384_122_122, 2 ** 20
    n, rule = resolve_horizon(100, 10 ** 9, 20.0, P, tps)
    assert n == 100 and "--num-iterations" in rule
    n, rule = resolve_horizon(-1, 10 * tps + 5, 20.0, P, tps)
    assert n == 10 and "--target-tokens" in rule
    n, rule = resolve_horizon(None, None, 20.0, P, tps)
    assert n == 20 * P // tps and "--target-param-data-ratio" in rule and "total params" in rule
    n, _ = resolve_horizon(-1, -1, 20.0, P, tps)                      # -1 means unset
    assert n == 20 * P // tps
    assert resolve_horizon(None, 5, None, P, tps)[0] == 1             # at least one step
    with pytest.raises(ValueError):
        resolve_horizon(-1, None, None, P, tps)
