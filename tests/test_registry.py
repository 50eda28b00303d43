"""The mode registry (poelm/engine/registry.py): the engine's import graph has no cycle, and
every capability a mode declares agrees with what its decoder does.
Run: .venv/bin/pytest -q tests/test_registry.py"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from poelm.engine import (DECODERS, MODES, DecodeOptions, Engine, ModeRefused, capabilities, logop, make_decoder,
                          validate_options)
from poelm.experiment.compare import supported_modes
from poelm.serve.scheduler import LogprobSampler

ENGINE = Path(__file__).resolve().parent.parent / "poelm" / "engine"
PROMPT = [5, 17, 42, 9, 3]


def module_name(path: Path, root: Path, package: str) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [package, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of `package` it imports anywhere (functions included), by ast."""
    paths = {module_name(p, root, package): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in paths and t != name}
    return graph


def test_import_graph_sees_imports_inside_functions(tmp_path):
    (tmp_path / "a.py").write_text("import pkg.b\n")
    (tmp_path / "b.py").write_text("def f():\n    from pkg import a\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    with pytest.raises(graphlib.CycleError):
        tuple(graphlib.TopologicalSorter(graph).static_order())


def test_engine_imports_form_no_cycle():
    graph = import_graph(ENGINE, "poelm.engine")
    assert {"poelm.engine.decoders", "poelm.engine.registry", "poelm.engine.wand"} <= set(graph)
    tuple(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    assert not graph["poelm.engine.decoders"] & {"poelm.engine.wand", "poelm.engine.speculative", "poelm.engine.registry"}


def test_every_mode_has_one_decoder_declaring_it():
    assert MODES == ("final", "stage", "logop", "wand", "speculative")
    for mode, cls in DECODERS.items():
        assert capabilities(mode) is cls.modes[mode]


# -----------------------------------------------------------------------------
# declarations agree with behaviour


def calibration(model) -> dict:
    return {"wand_bounds": [1.0] * model.config.n_stages}


@pytest.mark.parametrize("mode", MODES)
def test_bp_model_refused_exactly_when_the_mode_needs_stages(mode):
    bp = tiny_model(poe_mode="none").eval()
    engine = Engine(bp, calibration=calibration(bp))
    if capabilities(mode).needs_stages:
        with pytest.raises(ModeRefused, match="never trained to predict"):
            engine.generate(PROMPT, mode=mode, max_new_tokens=2)
    else:
        assert len(engine.generate(PROMPT, mode=mode, max_new_tokens=2).tokens) == 2
    assert len(engine.generate(PROMPT, mode=mode, max_new_tokens=2, force=True).tokens) == 2


@pytest.mark.parametrize("mode", MODES)
def test_uncalibrated_model_refused_exactly_when_the_mode_needs_calibration(mode):
    model = tiny_model().eval()
    if capabilities(mode).needs_calibration:
        with pytest.raises(ValueError, match="WAND needs calibrated swing bounds"):
            Engine(model).generate(PROMPT, mode=mode, max_new_tokens=2)
    else:
        assert len(Engine(model).generate(PROMPT, mode=mode, max_new_tokens=2).tokens) == 2
    assert len(Engine(model, calibration=calibration(model)).generate(PROMPT, mode=mode, max_new_tokens=2).tokens) == 2


@pytest.mark.parametrize("mode", MODES)
def test_compile_accepted_exactly_for_compilable_modes(mode):
    model = tiny_model().eval()
    opts = DecodeOptions(mode=mode, calibration=calibration(model))
    if capabilities(mode).compilable:
        dec = make_decoder(model, opts, 16, compile="eager")  # torch.compile is lazy: nothing compiles here
        assert dec._compiled is not None and dec.max_len == 64  # a compiled cache is a power-of-two bucket
    else:
        with pytest.raises(ValueError, match=f"mode {mode} decodes eagerly"):
            make_decoder(model, opts, 16, compile="eager")


def reference_readout(model, seq: list[int], mode: str) -> torch.Tensor:
    """The log-probabilities a full forward gives the next token of seq in a plain mode."""
    with torch.no_grad():
        final, stages = model(torch.tensor([seq]), return_stage_logits=True)
    z = {"final": final, "stage": stages[0], "logop": None}[mode]
    if z is None:
        return logop([s[0, -1] for s in stages], model.config.poe_alpha).float().log_softmax(-1)
    return z[0, -1].float().log_softmax(-1)


@pytest.mark.parametrize("mode", [m for m in MODES if capabilities(m).logprobs])
def test_logprob_modes_report_the_logprobs_of_their_readout(mode):
    model = tiny_model().eval()
    opts = DecodeOptions(mode=mode)
    validate_options(opts, model)
    dec = make_decoder(model, opts, 32)
    dec.sampler = LogprobSampler(opts, dec.device)
    dec.sampler.top = 2
    (handle,) = dec.add_rows([PROMPT])
    for _ in range(3):
        seq = list(dec.row(handle).seq)
        with torch.no_grad():
            (token,) = dec.step()[handle]  # one token per step
        (entry,) = dec.sampler.last
        ref = reference_readout(model, seq, mode)
        assert entry.token == token == ref.argmax().item()
        assert entry.logprob == pytest.approx(ref[token].item(), abs=1e-4)
        assert [i for i, _ in entry.top] == ref.topk(2).indices.tolist()


def test_validation_refuses_what_compare_does_not_list(tmp_path):
    """compare lists the modes the registry accepts: no speculative for a Log-OP final readout
    (its verify pass needs the last stage's readout), only final for a BP model."""
    poe = tiny_model(final_readout="logop").eval()
    with pytest.raises(ModeRefused, match="final_readout=logop"):
        validate_options(DecodeOptions(mode="speculative"), poe)
    assert supported_modes(poe, str(tmp_path)) == ["final", "stage", "logop", "wand (needs `poelm calibrate`)"]
    assert supported_modes(tiny_model(poe_mode="none"), str(tmp_path)) == ["final"]
    (tmp_path / "generation_config.json").write_text('{"wand_bounds": [1.0, 1.0, 1.0, 1.0]}')
    assert "wand" in supported_modes(tiny_model(), str(tmp_path))


def test_compare_does_not_swallow_a_broken_calibration_file(tmp_path):
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        supported_modes(tiny_model(), str(tmp_path))


def test_a_parameter_error_is_not_a_refusal():
    """ModeRefused means the mode cannot run on this model; a bad option value is a plain ValueError."""
    model = tiny_model().eval()
    with pytest.raises(ValueError) as e:
        validate_options(DecodeOptions(mode="speculative", gamma=0), model)
    assert not isinstance(e.value, ModeRefused)
    with pytest.raises(ModeRefused, match="at least 2 stages"):
        validate_options(DecodeOptions(mode="speculative"), tiny_model(poe_every=4))
