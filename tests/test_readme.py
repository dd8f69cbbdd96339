"""The README's Python examples run as written, on a tiny local BLOOM in place of the hub model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from softprompt.quickstart import save_tiny_bloom

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_NAME = 'model_name = "bigscience/bloomz-560m"'


def runnable_examples() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [block for block in blocks if HUB_NAME in block]


def test_readme_has_an_example_per_method():
    examples = runnable_examples()
    for config in ("PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig"):
        assert any(config in block for block in examples), config


@pytest.mark.parametrize("index", range(len(runnable_examples())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    model_directory = save_tiny_bloom(tmp_path / "tiny-bloom")
    monkeypatch.chdir(tmp_path)
    code = runnable_examples()[index].replace(HUB_NAME, f"model_name = {str(model_directory)!r}")
    exec(compile(code, f"README.md example {index}", "exec"), {"__name__": "__readme__"})
