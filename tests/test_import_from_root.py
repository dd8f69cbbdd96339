"""The repository's ``kernels/`` folder never stands in for the PyPI package ``kernels``.

transformers (5.25 and later) depends on the PyPI package ``kernels`` and imports names from it whenever it is
installed. Python started in the repository's root puts the root first on ``sys.path``, so a root folder that were a
regular package (one with ``__init__.py``) would be found before the installed package, and every import of a
transformers model class would fail there (``python -m pytest``, ``python -c``, a notebook, ``python -m
softprompt.cli``). The folder has no ``__init__.py``: a bare folder is only a namespace portion, which the import
system uses only when no regular package of that name is anywhere on the path. softprompt reaches it as
``softprompt.kernels`` (installed from it by ``package-dir``, and through the ``softprompt/kernels`` link in a
checkout). These tests start fresh interpreters in the root, as a user does.
"""

from __future__ import annotations

import importlib.metadata
import importlib.machinery
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_in_root(*arguments: str) -> subprocess.CompletedProcess:
    """A fresh interpreter with the repository root as its working directory (and so first on its path)."""
    return subprocess.run([sys.executable, *arguments], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_test_environment_has_the_pypi_kernels_package():
    # Without it the tests below would pass for the wrong reason: nothing to be shadowed.
    assert importlib.metadata.version("kernels")


def test_transformers_model_classes_and_softprompt_import_from_the_repository_root():
    code = """
import json
import softprompt
from transformers import AutoModelForCausalLM, BloomForCausalLM, LlamaForCausalLM
from transformers.utils.import_utils import is_kernels_available
import kernels
import softprompt.kernels.fused_linear_cross_entropy as fused
print(json.dumps({"kernels": kernels.__file__, "fused": fused.__file__, "available": is_kernels_available()}))
"""
    result = run_in_root("-c", code)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert not Path(found["kernels"]).resolve().is_relative_to(ROOT), found  # the PyPI package, not our folder
    assert Path(found["fused"]).resolve() == ROOT / "kernels" / "fused_linear_cross_entropy.py"


def test_the_folder_is_never_a_regular_package_on_the_path():
    # Searched on the root alone, `kernels` is at most a namespace portion (no origin, no loader of its own), which
    # ranks below a regular package anywhere else on the path; and nothing of ours is importable as its attribute.
    assert not (ROOT / "kernels" / "__init__.py").exists()
    spec = importlib.machinery.PathFinder.find_spec("kernels", [str(ROOT)])
    assert spec is None or (spec.origin is None and spec.loader is None)


def test_the_command_line_runs_from_the_repository_root():
    result = run_in_root("-m", "softprompt.cli", "params", "--model", "bigscience/bloomz-560m")
    assert result.returncode == 0, result.stderr
    assert "trainable params: 8,192 || all params: 559,222,784" in result.stdout


def test_python_m_pytest_collects_every_test_module_from_the_root():
    result = run_in_root("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "error" not in result.stdout.splitlines()[-1].lower()
