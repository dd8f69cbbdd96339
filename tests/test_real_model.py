"""A real pretrained model end to end: SmolLM2-135M-Instruct as a Q4_1 GGUF file (scripts/real_model.py prepares it).

``softprompt train --model FILE.gguf`` loads the file as the Llama it is and records it (path and SHA-256); the base
answers a question; ``eval`` and ``generate`` reload the file from that record; a file changed since is refused;
without the gguf package the message names the extra to install, and a pinned SHA-256 is checked. The tests that need
the prepared model take the ``real_model_files`` fixture (skipped where it cannot be prepared, a failure on CI).

Time: transformers reads a GGUF file in about 20 s of one core (metadata parsed in Python, tensors dequantized), and
three commands must each read it (train, then eval and generate), so eval and generate run at once, in two
processes; everything else uses the prepared transformers directory, which loads in about a second.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import softprompt
from softprompt.cli import main
from softprompt.training import ConfigError, TrainConfig, load_base_model
from softprompt.training.base_model import BASE_MODEL_DIR
from softprompt.training.gguf_base import GGUF_INSTALL

from helpers import RealModelFiles
from real_model import GGUF_SHA256

QUESTION = "What is the capital of France?"
SHIPPED_ROWS = Path(softprompt.__file__).parent / "data" / "sms_spam.csv"
"""Real labelled messages (softprompt/data/ATTRIBUTION.md); the run trains on a few of them."""
BASE_PARAMETERS = 134_515_008
"""SmolLM2-135M's parameters, the tied embedding table (49152 x 576) counted once; untied would add 28,311,552."""
SUBPROCESS_TIMEOUT = 600
"""Only a hang guard: a command takes 20 to 40 s on 2 busy cores, most of it transformers reading the GGUF file."""


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One torch thread in this process (and `start_command`'s): on two cores shared by two processes, or with other
    work, two OpenMP threads each are several times slower than one."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def gguf_run(real_model_files: RealModelFiles, tmp_path_factory) -> tuple[Path, str]:
    """``softprompt train --model base.gguf`` on a copy of the GGUF file (the copy is what the tests may change):
    two prompt-tuning steps on 8 short rows of the shipped SMS data (4 ham, 4 spam). Returns (folder, what the
    command printed); the folder holds ``base.gguf``, ``data.csv`` and ``run/``."""
    folder = tmp_path_factory.mktemp("gguf-run")
    shutil.copyfile(real_model_files.gguf, folder / "base.gguf")
    rows: dict[str, list[dict[str, str]]] = {"ham": [], "spam": []}
    with SHIPPED_ROWS.open(newline="", encoding="utf-8") as file:
        for row in csv.DictReader(file):
            if len(row["text"]) <= 80 and len(rows[row["label"]]) < 4:
                rows[row["label"]].append(row)
    with (folder / "data.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows["ham"] + rows["spam"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["train", "--model", str(folder / "base.gguf"), "--dataset", str(folder / "data.csv"),
                       "--text-column", "text", "--label-column", "label", "--num-epochs", "1", "--batch-size", "4",
                       "--num-virtual-tokens", "4", "--num-generations", "0", "--no-progress", "--num-threads", "1",
                       "--output-dir", str(folder / "run")])
    assert status == 0, printed.getvalue()
    return folder, printed.getvalue()


def test_the_gguf_file_loads_as_the_llama_it_is(gguf_run, real_model_files):
    """What `softprompt train` loaded from the file, as its adapter records it, and as the prepared directory (the
    same loader's output, saved) holds it."""
    folder, printed = gguf_run
    recorded = json.loads((folder / "run" / "adapter" / "adapter_config.json").read_text())["base_model"]
    assert recorded == {"name_or_path": str((folder / "base.gguf").resolve()), "model_type": "llama",
                        "num_layers": 30, "hidden_size": 576, "embedding_width": 576, "num_heads": 9,
                        "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152}
    assert f"trainable params: 2,304 || all params: {BASE_PARAMETERS + 2_304:,d}" in printed, printed  # tied head
    config = json.loads((real_model_files.transformers_directory / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    # Dequantized to float32 with no quantization record (save_pretrained refuses a model that keeps one).
    assert config["dtype"] == "float32" and "quantization_config" not in config


def test_the_base_answers_with_paris(real_model_files):
    """The prepared directory: the GGUF file's weights as softprompt's loader dequantized them."""
    model, tokenizer = load_base_model(str(real_model_files.transformers_directory))
    assert sum(parameter.numel() for parameter in model.parameters()) == BASE_PARAMETERS
    assert model.lm_head.weight is model.get_input_embeddings().weight
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_a_run_records_the_gguf_file_and_eval_and_generate_reload_it(gguf_run):
    folder, _ = gguf_run
    base, run = folder / "base.gguf", folder / "run"
    settings = json.loads((run / "train_config.json").read_text())
    assert settings["model"] == str(base) and settings["model_sha256"] == GGUF_SHA256
    assert not (run / BASE_MODEL_DIR).exists()  # the file is the record: no copy of the base in the run

    prompt = "text : Free entry to win a prize, text now Label : "
    adapter = str(run / "adapter")
    commands = {"eval": ["eval", "--adapter", adapter, "--json"],
                "generate": ["generate", "--adapter", adapter, "--prompt", prompt, "--max-new-tokens", "2"]}
    processes = {name: start_command(arguments, folder / f"{name}.log") for name, arguments in commands.items()}
    outputs = {name: finish_command(process, folder / f"{name}.log") for name, process in processes.items()}

    result = json.loads(outputs["eval"])
    assert result["base_model"] == str(base.resolve()) and result["examples"] == 2
    last = [line for line in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if line["event"] == "eval"][-1]
    assert result["loss"] == pytest.approx(last["loss"], rel=1e-5)  # the same base, adapter and rows
    assert outputs["generate"].startswith(f"[adapter] {prompt}")


def test_a_changed_gguf_file_is_refused_on_reload(gguf_run, capsys):
    folder, _ = gguf_run
    base, adapter = folder / "base.gguf", folder / "run" / "adapter"
    flip_last_byte(base)
    try:
        capsys.readouterr()
        for command in (["eval", "--adapter", str(adapter)],
                        ["generate", "--adapter", str(adapter), "--prompt", "text : hi Label : "]):
            assert main(command) == 2
            message = capsys.readouterr().err
            assert f"{base.resolve()}: SHA-256 " in message, message
            assert f"recorded {GGUF_SHA256} (model_sha256): the file has changed since" in message, message
            assert "Fix: put the original file back at that path, or pass --model" in message, message
    finally:
        flip_last_byte(base)


def test_without_the_gguf_package_the_message_names_the_extra(tmp_path, monkeypatch, capsys):
    """No real model needed: the check comes before anything is read or written."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` fails, as it does where it is not installed
    with pytest.raises(ValueError) as error:
        load_base_model(str(gguf))
    assert "needs the package(s) gguf, which are not installed" in str(error.value)
    assert f"Fix: {GGUF_INSTALL}." in str(error.value) and GGUF_INSTALL == 'pip install "softprompt[gguf]"'

    output = tmp_path / "run"
    assert main(["train", "--model", str(gguf), "--output-dir", str(output), "--no-progress"]) == 2
    assert GGUF_INSTALL in capsys.readouterr().err
    assert not output.exists()


def test_a_pinned_sha256_is_checked_before_anything_is_written(tmp_path, capsys):
    """--model-sha256: only with a .gguf base, and a file with other bytes is refused before the run starts."""
    with pytest.raises(ConfigError, match="expected the 64 lowercase hex digits of a .gguf base's SHA-256"):
        TrainConfig(model="some/model", model_sha256="0" * 64)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    output = tmp_path / "run"
    assert main(["train", "--model", str(gguf), "--model-sha256", "0" * 64, "--output-dir", str(output)]) == 2
    message = capsys.readouterr().err
    actual = hashlib.sha256(b"GGUF").hexdigest()
    assert f"{gguf}: SHA-256 {actual}, but the settings (--model-sha256) recorded {'0' * 64}" in message, message
    assert not output.exists()


def start_command(arguments: list[str], log: Path) -> subprocess.Popen:
    """``softprompt ARGUMENTS`` in a subprocess on one thread, its stdout to `log`, its stderr to `log`.err."""
    with log.open("w") as output, log.with_suffix(".err").open("w") as errors:
        return subprocess.Popen([sys.executable, "-m", "softprompt.cli", *arguments], stdout=output, stderr=errors,
                                text=True, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def finish_command(process: subprocess.Popen, log: Path) -> str:
    """Waits for a `start_command` process; returns its stdout, failing the test (with its stderr) if it failed."""
    try:
        process.wait(timeout=SUBPROCESS_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, log.with_suffix(".err").read_text()[-3000:]
    return log.read_text()


def flip_last_byte(path: Path) -> None:
    """Inverts the file's last byte in place (twice restores it)."""
    with path.open("r+b") as file:
        file.seek(-1, 2)
        last = file.read(1)[0]
        file.seek(-1, 2)
        file.write(bytes([last ^ 0xFF]))
