"""One house (issue 15): library messages name the parameter and the command line says the flag
(poelm.runtime.SettingError, rendered by poelm.cli.main.error_line); the experiment's
specialist stage takes its training settings from the field metadata like the arms do.
Run: .venv/bin/pytest -q tests/test_house.py"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from poelm.cli.main import error_line
from poelm.experiment.config import ArmTraining, load_config
from poelm.experiment.specialist import specialist_train_config
from poelm.model import GPTConfig
from poelm.runtime import SettingError
from poelm.specialist import planned_config
from poelm.stage_parallel import check_mesh
from poelm.train import changed_settings_error, resume_settings_diff
from test_settings import other_value


def test_values_of_a_setting_error_are_never_read_as_a_template():
    e = SettingError("data", "{data} {path} does not exist ({n:,} tries)", path="/tmp/{odd}", n=1234)
    assert str(e) == "data /tmp/{odd} does not exist (1,234 tries)"
    assert error_line(e) == "--data /tmp/{odd} does not exist (1,234 tries)"


def test_a_resume_with_other_settings_names_them_as_parameters_or_flags(tmp_path):
    saved = {"num_iterations": 8, "seed": 1, "model_note": {"a": 1}, "device": "cpu"}
    now = {"num_iterations": 12, "seed": 1, "model_note": {"a": 2}, "device": "cuda"}
    changed = resume_settings_diff(saved, now, mutable={"device"})
    assert changed == [("model_note", {"a": 1}, {"a": 2}), ("num_iterations", 8, 12)]
    e = changed_settings_error(tmp_path, changed)
    assert str(e).startswith(f"resume: {tmp_path} was started with other settings: model_note {{'a': 1}} (now "
                             "{'a': 2}); num_iterations 8 (now 12); resume with")
    assert str(e).endswith("or extend_to N to change the horizon") and "--" not in str(e)
    line = error_line(e)
    assert line.startswith(f"--resume: {tmp_path} was started with other settings: --model-note")
    assert "--num-iterations 8 (now 12)" in line and line.endswith("or --extend-to N to change the horizon")


def test_check_mesh_names_the_parameters(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    config = GPTConfig(n_layer=2, n_embd=64, n_head=2, vocab_size=256, sequence_len=32, poe_every=1)
    with pytest.raises(SettingError) as e:
        check_mesh(config, 1)
    assert str(e.value).startswith("stage_parallel runs one process per stage: launch it with torchrun, e.g. "
                                   "`torchrun --nproc_per_node 2 -m poelm train --stage-parallel ...`")
    assert error_line(e.value).startswith("--stage-parallel runs one process per stage")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(SettingError) as e:
        check_mesh(dataclasses.replace(config, poe_mode="hier"), 1)
    assert str(e.value).startswith("stage_parallel trains poe_mode flat only: with hier")
    assert error_line(e.value).startswith("--stage-parallel trains --poe-mode flat only: with hier")
    with pytest.raises(SettingError) as e:
        check_mesh(config, 1, compile=True)
    assert error_line(e.value).startswith("--compile is not supported with --stage-parallel")


def test_planned_config_names_n_layers_or_the_given_source():
    parent = GPTConfig(n_layer=2, n_embd=64, n_head=2, vocab_size=256, sequence_len=32, poe_every=1)
    with pytest.raises(SettingError) as e:
        planned_config(parent, 100000)
    assert str(e.value).startswith("n_layers 100000: n_layer must be at most")
    assert error_line(e.value).startswith("--layers 100000: n_layer must be at most")
    with pytest.raises(ValueError, match="^lineage.json new_layers=100000: n_layer must be at most"):
        planned_config(parent, 100000, "lineage.json new_layers=100000")
    assert planned_config(parent, 1).n_layer == 3


def test_the_specialist_stage_takes_every_experiment_training_setting_but_its_own():
    stage_own = {"total_batch_size", "device_batch_size", "num_iterations", "eval_every", "save_every",
                 "warmup_steps", "stage_parallel", "extend_to"}
    overrides = {f.name: other_value(ArmTraining, f) for f in dataclasses.fields(ArmTraining)
                 if f.name not in stage_own}
    cfg = load_config("tiny", {**overrides, "stage_parallel": True, "extend_to": 900, "out": "x"})
    tc, sft = specialist_train_config(cfg)
    assert {k: getattr(tc, k) for k in overrides} == overrides
    assert (tc.stage_parallel, tc.extend_to, tc.resume) == (False, None, True)
    assert (tc.init, tc.out) == (str(Path("x/arms/poe")), str(Path("x/specialist")))
    assert (tc.num_iterations, tc.device_batch_size, tc.total_batch_size) == (200, 16, 16 * 96)
    assert sft.attach_layers == cfg.specialist_layers


def test_the_readme_layout_puts_every_module_on_its_floor():
    """README "Layout": each numbered floor names its top-level modules (sub-modules go in
    parentheses); every module of poelm/ is named once, on the floor FLOORS gives it."""
    import re

    from test_layering import FLOORS

    root = Path(__file__).resolve().parent.parent
    layout = (root / "README.md").read_text().split("## Layout\n", 1)[1].split("\n## ", 1)[0]
    items = re.split(r"\n(?=\d\. )", layout.split("\n\n", 1)[1].strip())
    named: dict[str, int] = {}
    for item in items:
        floor = int(item[0])
        text = " ".join(item.split())
        while re.search(r"\([^()]*\)", text):
            text = re.sub(r"\([^()]*\)", "", text)
        for name in re.findall(r"`([a-z_]+)(?:\.py|/)`", text):
            assert name not in named, name
            named[name] = floor
    on_disk = {p.stem if p.is_file() else p.name for p in (root / "poelm").iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert set(named) == on_disk
    for name, floor in named.items():
        assert FLOORS[f"poelm.{name}"] == floor, name
