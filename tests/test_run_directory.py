"""A run's directory: one process at a time (the lock), Ctrl-C, a refused --resume that changes nothing, and a
metrics log lost before a resume.

(The refusals themselves, each with its message and an unchanged directory, are in tests/test_bad_inputs.py; a
run killed during every kind of write is in tests/test_training.py.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from softprompt.cli import main
from softprompt.training import read_metrics
from softprompt.training.checkpoint import complete_checkpoint_directories, load_checkpoint
from softprompt.training.run_lock import LOCK_FILE, acquire_run_lock

FLAGS = ["--split", "train[:24]", "--num-generations", "0", "--no-progress"]
"""19 training rows (3 optimizer steps per epoch) and 5 held-out rows of the shipped complaints data."""


def test_a_second_run_is_refused_while_one_holds_the_directory_and_ctrl_c_stops_cleanly(tmp_path, capsys):
    """Defect 2: two runs on one directory both went ahead (interleaved metrics; a --resume deleted the running
    run's checkpoint in the making). Now the second is refused, naming the first; Ctrl-C on the first stops it with
    exit status 130, a message saying how to resume, no traceback, and its lock released."""
    run = tmp_path / "run"
    flags = [*FLAGS, "--num-epochs", "500", "--save-every", "1", "--output-dir", str(run)]  # runs until stopped
    process = subprocess.Popen([sys.executable, "-m", "softprompt.cli", "train", *flags],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900  # a hang guard only
        while not complete_checkpoint_directories(run):
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint after 900 s: the run hangs"
            time.sleep(0.05)
        metrics = (run / "metrics.jsonl").read_bytes()
        for second in (flags, [*flags, "--resume"], [*flags, "--overwrite"]):
            code = main(["train", *second])
            error = capsys.readouterr().err
            assert code == 2, error
            assert f"is in use by another softprompt run: pid {process.pid} on " in error, error
            assert f"Fix: wait for it to end (or stop it: kill {process.pid})" in error
        assert process.poll() is None, "the first run stopped"
        assert (run / "metrics.jsonl").read_bytes().startswith(metrics)  # its log was not cut by the others

        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "softprompt train: Interrupted at step " in stderr and "is complete: continue from it with" in stderr, stderr
    assert f"softprompt train --config {run / 'train_config.json'} --resume" in stderr, stderr
    assert not (run / LOCK_FILE).exists(), stderr
    acquire_run_lock(run).release()  # free
    load_checkpoint(complete_checkpoint_directories(run)[-1])  # the newest checkpoint is whole


def test_ctrl_c_before_the_run_writes_anything_leaves_nothing(tmp_path, monkeypatch, capsys):
    import softprompt.training.loop as loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "prepare_run_data", interrupted)
    assert main(["train", *FLAGS, "--output-dir", str(tmp_path / "run")]) == 130
    assert "Interrupted before training began; nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "finished"
    assert main(["train", *FLAGS, "--num-epochs", "2", "--output-dir", str(run)]) == 0
    return run


def test_a_refused_resume_changes_nothing_and_the_recovery_recipe_still_works(finished_run, tmp_path, capsys):
    """Defect 1: a --resume refused for its settings used to overwrite train_config.json with them, so the README's
    recovery recipe failed too, and eval silently scored another held-out split."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    assert main(["eval", "--adapter", str(run / "adapter"), "--json"]) == 0
    evaluation = json.loads(capsys.readouterr().out)
    settings = (run / "train_config.json").read_bytes()

    assert main(["train", *FLAGS, "--num-epochs", "2", "--output-dir", str(run), "--resume", "--seed", "3"]) == 2
    assert "seed: 0 in the checkpoint, 3 now" in capsys.readouterr().err
    assert (run / "train_config.json").read_bytes() == settings
    assert main(["train", "--config", str(run / "train_config.json"), "--resume"]) == 0
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run / "adapter"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == evaluation


def test_a_metrics_log_deleted_before_a_resume_is_not_padded_and_reports_no_false_first_evaluation(
        finished_run, tmp_path, capsys):
    """Defect 8: the resumed log was padded with NUL bytes up to the checkpoint's recorded length, and "eval before
    training" then reported the final evaluation."""
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(finished_run, run)
    first, last = complete_checkpoint_directories(run)  # after epochs 1 and 2
    shutil.rmtree(last)  # as if killed right after the first epoch's checkpoint
    shutil.rmtree(run / "adapter")
    recorded = load_checkpoint(first).state["metrics_bytes"]
    (run / "metrics.jsonl").unlink()

    assert main(["train", *FLAGS, "--num-epochs", "2", "--output-dir", str(run), "--resume"]) == 0
    output = capsys.readouterr().out
    assert b"\x00" not in (run / "metrics.jsonl").read_bytes()
    assert "eval before training" not in output
    records = read_metrics(run / "metrics.jsonl")
    assert [(r["event"], r["step"]) for r in records] == [("train", 4), ("train", 5), ("train", 6), ("eval", 6)]
    assert f"eval after training:  loss {records[-1]['loss']:.4f}" in output
    assert f"metrics.jsonl holds 0 bytes where the checkpoint recorded {recorded}: records up to step 3 are lost" in output


def test_a_lock_file_left_by_a_dead_process_is_taken_over_and_removed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "elsewhere", "started": "yesterday"}))
    assert main(["train", *FLAGS, "--num-epochs", "1", "--output-dir", str(run)]) == 0
    assert not (run / LOCK_FILE).exists()
    assert (run / "adapter" / "adapter.safetensors").is_file()


def test_the_lock_names_its_holder_and_is_free_once_released(tmp_path):
    lock = acquire_run_lock(tmp_path)
    holder = json.loads((tmp_path / LOCK_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] and holder["started"] and "command" in holder
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()
    acquire_run_lock(tmp_path).release()
