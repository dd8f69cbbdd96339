"""The README's Python examples run as written, on a tiny local BLOOM in place of the hub model."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import HfApi

from softprompt.quickstart import save_tiny_bloom

from helpers import commit_to_cache

README = Path(__file__).resolve().parents[1] / "README.md"
HUB_NAME = 'model_name = "bigscience/bloomz-560m"'


def runnable_examples() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [block for block in blocks if HUB_NAME in block]


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """The hub as a local huggingface_hub cache: uploads are committed into it, downloads read it, offline."""
    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **options: None)

    def upload_folder(self, *, repo_id, folder_path, **options):
        copy = tmp_path / "uploads" / repo_id
        shutil.copytree(folder_path, copy, dirs_exist_ok=True)
        return commit_to_cache(cache, repo_id, copy)

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_readme_has_an_example_per_method():
    examples = runnable_examples()
    for config in ("PromptTuningConfig", "PromptEncoderConfig", "PrefixTuningConfig", "AdaptionPromptConfig"):
        assert any(config in block for block in examples), config


@pytest.mark.parametrize("index", range(len(runnable_examples())))
def test_readme_example_runs(index, tmp_path, monkeypatch, local_hub):
    model_directory = save_tiny_bloom(tmp_path / "tiny-bloom")
    monkeypatch.chdir(tmp_path)
    code = runnable_examples()[index].replace(HUB_NAME, f"model_name = {str(model_directory)!r}")
    exec(compile(code, f"README.md example {index}", "exec"), {"__name__": "__readme__"})


def coming_from_peft() -> tuple[list[tuple[str, str]], str]:
    """The "Coming from PEFT" table's rows (PEFT cell, softprompt cell) and the section's runnable example."""
    section = README.read_text().split("## Coming from PEFT\n")[1].split("\n## ")[0]
    rows = [line.split(" | ") for line in section.splitlines() if line.startswith("| `")]
    example = re.search(r"```python\n(.*?)```", section, flags=re.DOTALL).group(1)
    return [(peft.removeprefix("| "), ours.removesuffix(" |")) for peft, ours in rows], example


def test_every_line_of_the_coming_from_peft_table_runs_in_its_example():
    rows, example = coming_from_peft()
    assert len(rows) >= 12 and HUB_NAME in example  # the example is among those test_readme_example_runs runs
    for peft_cell, our_cell in rows:
        code = re.findall(r"`([^`]+)`", our_cell)
        if our_cell.startswith("the same"):
            code += re.findall(r"`([^`]+)`", peft_cell)
        assert code, (peft_cell, our_cell)
        for snippet in code:
            # Every name it calls or imports appears in the example, and every keyword it passes is passed there.
            names = [rf"\b{name}\(" for name in re.findall(r"(\w+)\(", snippet)]
            names += [rf"\b{name}=" for name in re.findall(r"(\w+)=", snippet)]
            if "import" in snippet:
                names += [rf"\b{name}\b" for name in re.findall(r"import (.*)", snippet)[0].split(", ")]
            missing = [name for name in names if not re.search(name, example)]
            assert not missing, (snippet, missing)


def test_the_readme_tables_restate_the_package_records():
    # The families table is generated from softprompt/families/ (scripts/readme_tables.py): one home per fact.
    import readme_tables

    text = README.read_text()
    assert readme_tables.with_tables(text) == text, "README.md is stale: run python scripts/readme_tables.py"
