"""The guides as scripts (``examples/``) run as a user runs them, in a fresh process, offline: ``--offline`` swaps
bigscience/bloomz-560m and the hub datasets for a tiny random BLOOM written locally and the shipped data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from softprompt import AutoSoftPromptModelForCausalLM, SoftPromptModel

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_offline(script: str, directory: Path) -> str:
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(directory / "hf-home"),  # nothing read from or written to the user's caches
        "OMP_NUM_THREADS": "1",  # a tiny model: threads only contend (see softprompt.training.base_model)
    }
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--offline"],
        cwd=directory, env=environment, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def test_twitter_complaints_example_runs_offline(tmp_path, monkeypatch):
    output = run_offline("twitter_complaints.py", tmp_path)
    monkeypatch.chdir(tmp_path)  # the adapter records its base as the script named it, relative to where it ran
    run = Path("runs") / "twitter-complaints"
    assert "trainable params:" in output
    assert sum("Label : " in line and "| expected: " in line for line in output.splitlines()) == 3
    # The saved adapter is the best checkpoint's (load_best_model_at_end) and reloads with its recorded base.
    model = AutoSoftPromptModelForCausalLM.from_pretrained(run / "adapter")
    assert model.base_model.config._name_or_path == str(Path("runs/twitter-complaints/tiny-bloom"))
    checkpoints = sorted(run.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    best = min(checkpoints, key=_eval_loss)
    saved = load_file(best / "model.safetensors")
    assert all(torch.equal(model.state_dict()[key], value) for key, value in saved.items())


def _eval_loss(checkpoint: Path) -> float:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return [entry["eval_loss"] for entry in history if "eval_loss" in entry][-1]


def test_two_adapters_example_runs_offline(tmp_path, monkeypatch):
    output = run_offline("two_adapters.py", tmp_path)
    lines = {line.split(":")[0] for line in output.splitlines() if ":" in line}
    assert {"prompts", "quotes", "one batch"} <= lines
    monkeypatch.chdir(tmp_path)
    run = Path("runs") / "two-adapters"
    base = AutoSoftPromptModelForCausalLM.from_pretrained(run / "peft_outputs_prompt").base_model
    model = SoftPromptModel.from_pretrained(base, run / "peft_outputs_prompt")
    model.load_adapter(run / "peft_outputs_sentences", "quotes")
    assert sorted(model.prompts) == ["default", "quotes"]
    assert not torch.equal(model.prompts["default"].embedding.weight, model.prompts["quotes"].embedding.weight)


def test_every_example_is_run_above():
    assert sorted(path.name for path in EXAMPLES.glob("*.py")) == ["twitter_complaints.py", "two_adapters.py"], (
        "a new example needs its offline run in this file"
    )
