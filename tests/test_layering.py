"""The import graph of poelm/ reads as the architecture: floors (model -> engine/training ->
specialists/serving -> experiment -> cli) with every import pointing down, no cycle, and
nothing below the command line importing it. Every import counts: module level and inside
functions, absolute and relative. Run: .venv/bin/pytest -q tests/test_layering.py"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "poelm"

# The floor of every module (the first prefix that matches, longest first). A module may import
# its own floor and the floors below it.
FLOORS = {
    # 0: foundations that import nothing of poelm's but each other
    "poelm": 0, "poelm.model": 0, "poelm.atomic": 0, "poelm.runtime": 0, "poelm.chat": 0, "poelm.schedule": 0,
    "poelm.jsonfile": 0, "poelm.memory": 0, "poelm.contention": 0, "poelm.progress": 0,
    # 1: files, data and settings around the model
    "poelm.flags": 1, "poelm.codec": 1, "poelm.presets": 1, "poelm.tokenizer": 1, "poelm.outputs": 1,
    "poelm.corpus": 1, "poelm.dataloader": 1, "poelm.chatdata": 1, "poelm.outside_text": 1, "poelm.plots": 1, "poelm.checkpoint": 1,
    "poelm.evaluate": 1, "poelm.optim": 1, "poelm.hf": 1, "poelm.tracking": 1,
    # 2: inference and training
    "poelm.engine": 2, "poelm.inference_bench": 2, "poelm.train": 2, "poelm.rundir": 2, "poelm.stage_parallel": 2,
    # 3: specialists, serving and export
    "poelm.specialist": 3, "poelm.sft": 3, "poelm.serve": 3, "poelm.export": 3, "poelm.lm_eval_model": 3,
    "poelm.downstream": 3,
    # 4: the experiment
    "poelm.experiment": 4,
    # 5: the command line
    "poelm.cli": 5, "poelm.__main__": 5,
}


def module_name(path: Path) -> tuple[str, bool]:
    """(dotted name, whether it is a package's __init__)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def modules() -> dict[str, tuple[Path, bool]]:
    return {name: (path, is_pkg) for path in sorted(PACKAGE.rglob("*.py")) for name, is_pkg in [module_name(path)]}


def imported_names(tree: ast.AST, name: str, is_pkg: bool) -> set[str]:
    """Every poelm name an `import` or `from ... import` anywhere in the tree refers to (relative
    imports resolved; `from P import X` gives P.X, which may be a module or a name in P)."""
    package = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            found.update(f"{source}.{a.name}" for a in node.names)
            found.add(source)
    return {n for n in found if n == "poelm" or n.startswith("poelm.")}


def owner(name: str, known: dict) -> str | None:
    """The module a dotted name lives in: the longest prefix that is a module of poelm."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, (path, is_pkg) in known.items():
        targets = {owner(n, known) for n in imported_names(ast.parse(path.read_text()), name, is_pkg)}
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def floor(name: str) -> int:
    prefix = max((p for p in FLOORS if name == p or name.startswith(p + ".")), key=len, default=None)
    assert prefix is not None, f"{name} has no floor: add it to FLOORS in tests/test_layering.py"
    return FLOORS[prefix]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [node])
                if cycle:
                    return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [])
            if cycle:
                return cycle
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_every_kind_of_import(graph):
    """The parser itself: imports inside functions, relative imports and `from P import module`."""
    assert "poelm.train" in graph["poelm.cli.train"]  # imported inside cmd_train
    assert "poelm.serve.app" in graph["poelm.serve"]  # `from poelm.serve.app import ...` in a package
    tree = ast.parse("from . import decoders\nfrom .options import X\ndef f():\n    from ..model import GPT\n")
    assert imported_names(tree, "poelm.engine.wand", False) >= {"poelm.engine.decoders", "poelm.engine.options",
                                                                "poelm.model"}
    assert imported_names(tree, "poelm.engine", True) >= {"poelm.engine.decoders", "poelm.model.GPT"}


def test_no_import_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_outside_the_cli_imports_it(graph):
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                   if floor(t) == FLOORS["poelm.cli"] and floor(m) != FLOORS["poelm.cli"])
    assert not wrong, "the command line is the top floor; these import it: " + ", ".join(wrong)


def test_model_imports_no_poelm_module(graph):
    """model.py is the one file copied into exports: it stands alone."""
    assert graph["poelm.model"] == set()


def test_every_import_points_down(graph):
    up = sorted(f"{m} ({floor(m)}) -> {t} ({floor(t)})" for m, targets in graph.items() for t in targets
                if floor(t) > floor(m))
    assert not up, "imports that reach a higher floor: " + ", ".join(up)


def test_every_module_has_a_floor(graph):
    for name in graph:
        floor(name)


# -----------------------------------------------------------------------------
# Errors with types: the library raises them, the CLI and the server map them at their edge


def fail_with(monkeypatch, error: BaseException) -> None:
    """Make `poelm inspect` raise `error`."""
    from poelm.cli import inspect as cli_inspect

    def fail(args):
        raise error

    monkeypatch.setattr(cli_inspect, "cmd_inspect", fail)


def test_a_setting_error_names_the_parameter_and_the_cli_names_the_flag(monkeypatch, capsys):
    from poelm.cli import main
    from poelm.runtime import SettingError, parse_dtype

    error = SettingError("compile", lambda name, off: f"{name} on the CPU needs a C++ compiler; pass {off}")
    assert isinstance(error, ValueError) and str(error) == "compile on the CPU needs a C++ compiler; pass compile=False"
    fail_with(monkeypatch, error)
    assert main(["inspect", "tiny"]) == 2
    assert capsys.readouterr().err == "poelm: error: --compile on the CPU needs a C++ compiler; pass --no-compile\n"
    with pytest.raises(SettingError, match=r"^dtype 'fp8' is not a dtype"):
        parse_dtype("fp8")


def test_a_diverged_run_is_not_bad_input(monkeypatch, capsys):
    """NonFiniteLoss is a RunStopped, not a ValueError: one line, exit status 1 (bad input is 2)."""
    from poelm.cli import main
    from poelm.train import NonFiniteLoss

    assert not issubclass(NonFiniteLoss, ValueError)
    fail_with(monkeypatch, NonFiniteLoss("loss became nan at step 6; stopping"))
    assert main(["inspect", "tiny"]) == 1
    assert capsys.readouterr().err == "poelm: error: loss became nan at step 6; stopping\n"


def test_the_server_maps_the_context_length_error_by_its_type():
    from types import SimpleNamespace

    from poelm.engine import ContextLengthError
    from poelm.serve.app import encode
    from poelm.serve.protocol import ApiError

    def served(error: Exception):
        def encode_prompt(prompt):
            raise error
        return SimpleNamespace(engine=SimpleNamespace(encode_prompt=encode_prompt))

    too_long = ContextLengthError(300, 128)
    assert isinstance(too_long, ValueError) and (too_long.tokens, too_long.context) == (300, 128)
    with pytest.raises(ApiError) as e:
        encode(served(too_long), "x", "prompt")
    assert (e.value.status, e.value.code, e.value.param) == (400, "context_length_exceeded", "prompt")
    assert "the context holds 128" in e.value.message
    with pytest.raises(ApiError) as e:  # the same words in another error are not that error
        encode(served(ValueError("the context holds nothing")), "x", "prompt")
    assert e.value.code is None


def test_the_engine_raises_the_context_length_error():
    from poelm.engine import ContextLengthError, Engine
    from poelm.model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, vocab_size=64, sequence_len=16, poe_every=1))
    with pytest.raises(ContextLengthError) as e:
        Engine(model).encode_prompt(list(range(20)))
    assert (e.value.tokens, e.value.context) == (20, 16)


def test_python_m_poelm_is_the_command_line():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "poelm", "--help"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 0 and "usage: poelm" in out.stdout and "specialist" in out.stdout
