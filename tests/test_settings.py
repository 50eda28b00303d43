"""Settings declared once (issue 15): TrainConfig's fields (and SFT's SftSettings) carry their
help, choices, flag names and whether a resume may change them; the flags of `poelm train` /
`poelm sft` / `poelm experiment`, the resume check, an experiment's arms and the torchrun argv
of its arms all come from those fields. Run: .venv/bin/pytest -q tests/test_settings.py"""

from __future__ import annotations

import argparse
import dataclasses
import typing

import pytest

from poelm.cli import build_parser
from poelm.cli.main import error_line
from poelm.cli.train import config_from_args
from poelm.experiment.config import EXPERIMENT_OWN, ArmTraining, load_config
from poelm.experiment.run import arm_train_config, torchrun_argv
from poelm.flags import resume_mutable, setting_flag_names
from poelm.model import GPTConfig
from poelm.runtime import SettingError
from poelm.sft import SftSettings, SftTask
from poelm.train import Pretraining, TrainConfig, check_config, resume_settings_diff


def other_value(cls, f: dataclasses.Field):
    """A value of field f of `cls` that differs from its default and passes its flag's type."""
    hint = typing.get_type_hints(cls)[f.name]
    kind = next(h for h in typing.get_args(hint) if h is not type(None)) if typing.get_args(hint) else hint
    default = f.default
    if kind is bool:
        return not default if default is not None else False
    if f.metadata.get("choices"):
        return next(c for c in f.metadata["choices"] if c != default)
    if kind is int:
        return 7 if default is None or default < 0 else default + 3
    if kind is float:
        return default / 2 + 0.125
    if kind is str:
        return (default or "") + "x"
    raise AssertionError(f"no other value for {f.name}: {hint}")


def actions(argv0: list[str]) -> dict[str, argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[argv0[0]]._actions}


@pytest.mark.parametrize("command,cls,own", [("train", TrainConfig, ("model",)),
                                             ("sft", TrainConfig, ("model", "data", "tokenizer", "init",
                                                                   "stage_parallel")),
                                             ("sft", SftSettings, ())])
def test_every_field_is_a_flag_with_its_help_and_default(command, cls, own):
    from poelm.cli.train import SFT_BATCH

    found = actions([command])
    for f in dataclasses.fields(cls):
        if f.name in own:
            continue
        action = found[f.name]
        assert tuple(action.option_strings[:len(setting_flag_names(f))]) == setting_flag_names(f), f.name
        if command == "sft" and f.name in SFT_BATCH:  # sft inherits the base run's batch unless given
            assert action.default is None and "the base run's" in action.help, f.name
            continue
        assert action.help.startswith(f.metadata["help"].replace("%", "%%")), f.name
        assert action.default == f.default, f.name
        assert action.choices == f.metadata["choices"], f.name
    assert found["attach_layers" if cls is SftSettings else "out"].option_strings[0] == \
        ("--layers" if cls is SftSettings else "--out")


def test_train_model_flags_are_the_trained_gptconfig_fields():
    found = actions(["train"])
    for f in dataclasses.fields(GPTConfig):
        assert (f.name in found) == f.metadata["trained"], f.name


def test_resume_refuses_exactly_the_fields_not_marked_mutable():
    for task in (Pretraining(), SftTask()):
        saved = {**dataclasses.asdict(TrainConfig()), **task.record()}
        mutable = resume_mutable(TrainConfig) | task.resume_mutable()
        for cls, obj in ((TrainConfig, TrainConfig()), (type(task.settings), task.settings)):
            if obj is None:
                continue
            for f in dataclasses.fields(cls):
                if f.name == "model":  # compared field by field with the checkpoint's config.json
                    assert f.metadata["resume"]
                    continue
                now = {**saved, f.name: other_value(cls, f)}
                diff = resume_settings_diff(saved, now, mutable)
                assert bool(diff) == (not f.metadata["resume"]), (task.name, f.name, diff)
        assert resume_settings_diff(saved, {**saved, "task": "other"}, mutable)  # a run resumes its own task
    assert {"out", "device", "eval_every", "extend_to"} <= resume_mutable(TrainConfig)
    assert not {"seed", "matrix_lr", "data", "num_iterations"} & resume_mutable(TrainConfig)


def test_an_experiment_override_of_every_field_reaches_the_arms():
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(fields) == {f.name for f in dataclasses.fields(ArmTraining)} | set(EXPERIMENT_OWN)
    overrides = {f.name: other_value(ArmTraining, f) for f in dataclasses.fields(ArmTraining)}
    cfg = load_config("tiny", {**overrides, "data": "d", "tokenizer": "t"})
    for arm in ("bp", "poe"):
        tc = arm_train_config(cfg, arm)
        assert {k: getattr(tc, k) for k in overrides} == overrides
        assert (tc.data, tc.tokenizer, tc.resume) == ("d", "t", True)
    # the same through `poelm experiment` flags (generated from the same fields)
    from poelm.cli.experiment import experiment_config
    from poelm.flags import setting_flags

    argv = ["experiment", "tiny", *setting_flags(ArmTraining(**overrides))]
    tc = arm_train_config(experiment_config(build_parser().parse_args(argv)), "poe")
    assert {k: getattr(tc, k) for k in overrides} == overrides


def test_unset_experiment_flags_keep_the_preset():
    from poelm.cli.experiment import experiment_config

    cfg = experiment_config(build_parser().parse_args(["experiment", "tiny"]))
    assert (cfg.total_batch_size, cfg.num_iterations, cfg.lr_scaling, cfg.compile) == (8192, 226, "off", None)


@pytest.mark.parametrize("changed", [False, True])
def test_torchrun_argv_rebuilds_the_train_config(changed):
    tc = TrainConfig(data="D", tokenizer="T", out="O", model=GPTConfig(n_layer=6, n_embd=96, n_head=3,
                                                                      poe_stage_layers=(3, 2, 1), poe_alpha=0.5))
    if changed:
        tc = dataclasses.replace(tc, **{f.name: other_value(TrainConfig, f) for f in dataclasses.fields(TrainConfig)
                                        if f.name != "model"})
    argv = torchrun_argv(tc, 2)
    assert argv[1:3] == ["-m", "torch.distributed.run"] and argv[argv.index("poelm") + 1] == "train"
    rebuilt = config_from_args(build_parser().parse_args(argv[argv.index("poelm") + 1:]))
    assert dataclasses.replace(rebuilt, model=tc.model) == tc
    assert rebuilt.model.to_dict() == tc.model.to_dict()


def test_library_names_parameters_and_the_cli_says_flags():
    with pytest.raises(SettingError) as e:
        check_config(TrainConfig(num_iterations=0))
    assert str(e.value).startswith("num_iterations 0 would train no steps")
    assert str(e.value).endswith("from target_tokens or target_param_data_ratio")
    assert error_line(e.value).startswith("--num-iterations 0 would train no steps")
    assert error_line(e.value).endswith("from --target-tokens or --target-param-data-ratio")
    with pytest.raises(SettingError) as e:
        check_config(TrainConfig(warmdown_frac=1.5))
    assert (str(e.value), error_line(e.value)) == ("warmdown_frac 1.5: must be between 0 and 1",
                                                   "--warmdown-frac 1.5: must be between 0 and 1")


def test_stage_parallel_asks_the_task(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    tc = TrainConfig(stage_parallel=True, model=GPTConfig(n_layer=4, n_embd=64, n_head=2, poe_every=1))
    check_config(tc, Pretraining())  # a mesh of 4 stages x 1 replica

    class Other(Pretraining):
        name, stage_parallel = "other", False

    with pytest.raises(ValueError, match="task other is not supported"):
        check_config(tc, Other())


def test_chat_specials_are_declared_once_and_the_tokenizer_agrees():
    from poelm import chat, specialist
    from poelm.tokenizer import SPECIAL_TOKENS

    assert chat.CHAT_SPECIALS == (chat.BOS, *chat.TURN_SPECIALS) and chat.ASSISTANT_END in chat.TURN_SPECIALS
    assert SPECIAL_TOKENS[:len(chat.CHAT_SPECIALS)] == list(chat.CHAT_SPECIALS)  # its standalone copy agrees
    V = 300
    assert specialist.chat_token_ids(V) == [V - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index(t) for t in
                                            chat.TURN_SPECIALS]


def test_one_name_for_each_fact():
    import poelm.engine as engine
    from poelm import checkpoint, experiment

    assert engine.GENERATION_CONFIG_NAME is checkpoint.GENERATION_CONFIG_NAME
    assert "_check" not in engine.__all__
    assert not hasattr(experiment.config, "PRESETS") and not hasattr(experiment.config, "read_config_file")


def test_run_files_share_the_json_reader(tmp_path):
    from poelm.rundir import RunDir

    run = RunDir(tmp_path / "run", 0, 1)
    bad = tmp_path / "bad.json"
    for text, message in (("[1]", "a run file must be a JSON object, got a list; resume from another"),
                          ("{", "is not valid JSON")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            run.read_json(bad)
