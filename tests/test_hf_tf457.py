"""transformers 4.57 as a client: the `test_client_*` tests of tests/test_hf.py and tests/test_chat.py, run again by
the Python of a second virtual environment that has transformers 4.57.x (and the same torch).

    python3 -m venv .venv-tf457
    .venv-tf457/bin/pip install torch==2.13.0 "transformers==4.57.*" safetensors tiktoken rustbpe==0.1.0 \
        numpy pytest hypothesis

Skipped when that environment does not exist. POELM_TF457_PYTHON names another interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(os.environ.get("POELM_TF457_PYTHON", ROOT / ".venv-tf457" / "bin" / "python"))


def _transformers_version(python: Path) -> str | None:
    try:
        out = subprocess.run([str(python), "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def test_client_tests_under_transformers_457():
    if not PYTHON.exists():
        pytest.skip(f"{PYTHON} not found: create .venv-tf457 (see this file's docstring) to test transformers 4.57")
    version = _transformers_version(PYTHON)
    if version is None or not version.startswith("4.57"):
        pytest.skip(f"{PYTHON} has transformers {version}, not 4.57.x")
    env = {k: v for k, v in os.environ.items() if k != "HF_MODULES_CACHE"}  # the child picks its own
    env.update({"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([str(PYTHON), "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           str(ROOT / "tests" / "test_hf.py"), str(ROOT / "tests" / "test_chat.py"), "-k", "client"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"transformers {version}:\n{tail}"
    assert " passed" in proc.stdout and "failed" not in proc.stdout, tail
    print(f"transformers {version}: {proc.stdout.strip().splitlines()[-1]}", file=sys.stderr)
