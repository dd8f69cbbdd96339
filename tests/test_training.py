"""The training loop: learning, checkpoints (atomic, rotated, never unpickled), bit-exact resume after SIGKILL, the
NaN stop, the config, and multi-adapter training.

Runs are kept short (a slice of the shipped complaints data, a few epochs on the embedded tiny BLOOM); each takes a
second or two on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softprompt.training.checkpoint import (
    CheckpointError,
    complete_checkpoint_directories,
    flatten_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    unflatten_optimizer_state,
)
from softprompt.cli import main
from softprompt.model import SoftPromptModel
from softprompt.training import (
    ConfigError,
    TrainConfig,
    TrainingDivergedError,
    epoch_order,
    prepare_data,
    read_metrics,
    train,
)

SHORT = ["--split", "train[:60]", "--num-generations", "0", "--no-progress"]
"""48 training rows (6 steps of 8 per epoch) and 12 held-out rows of the shipped complaints data."""


def short_config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(split="train[:60]", num_generations=0, progress=False, num_epochs=2,
                  output_dir=str(tmp_path / "run"))
    values.update(overrides)
    return TrainConfig.from_dict(values)


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "adapter.safetensors"))


def assert_bitwise_equal(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name in first:
        # Compared as raw bytes: equal values with different bits (-0.0 / 0.0, NaN payloads) would fail too.
        assert torch.equal(first[name].view(torch.uint8), second[name].view(torch.uint8)), name


# ------------------------------------------------------------------------------------------------ the loop


def test_a_short_run_learns_and_writes_everything(tmp_path):
    result = train(short_config(tmp_path, num_epochs=3, method="p-tuning", num_generations=2))
    run = tmp_path / "run"
    assert result.adapter_directories == {"default": run / "adapter"}
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = read_metrics(run / "metrics.jsonl")
    evaluations = [r for r in records if r["event"] == "eval"]
    assert [r["epoch"] for r in evaluations] == [0, 1, 2, 3]
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 19))
    assert evaluations[-1]["loss"] < evaluations[0]["loss"] - 1.0
    assert result.final_eval["loss"] == evaluations[-1]["loss"]
    # A classification run scores label accuracy at every evaluation (a short run's is still 0 here; the value itself
    # is checked against an independent computation in test_cli.py, on a run that gets some labels right).
    assert all(isinstance(r["accuracy"], float) and isinstance(r["rank_accuracy"], float) for r in evaluations)
    assert len(result.generations) == 2 and {"prompt", "output", "reference"} <= result.generations[0].keys()
    # The embedded base is saved beside the adapter, and the adapter points to it.
    recorded = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model"]["name_or_path"]
    assert Path(recorded) == (run / "base-model").resolve()


def test_runs_are_deterministic_on_cpu(tmp_path):
    first = train(short_config(tmp_path / "a", num_epochs=1, method="p-tuning"))
    second = train(short_config(tmp_path / "b", num_epochs=1, method="p-tuning"))
    assert_bitwise_equal(adapter_tensors(first.adapter_directories["default"]),
                         adapter_tensors(second.adapter_directories["default"]))


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """Token sums over the whole step: 2 x 4 rows accumulated is the 8-row batch, up to float summation order."""
    big = train(short_config(tmp_path / "big", num_epochs=1, padding="max_length"))
    accumulated = train(short_config(tmp_path / "acc", num_epochs=1, padding="max_length", batch_size=4,
                                     gradient_accumulation_steps=2))
    big_tensors = adapter_tensors(big.adapter_directories["default"])
    accumulated_tensors = adapter_tensors(accumulated.adapter_directories["default"])
    assert big_tensors.keys() == accumulated_tensors.keys() and big_tensors
    for name, tensor in big_tensors.items():
        # The two sums differ by ~1e-7 relative per step, and AdamW's normalization carries that into the 6 steps'
        # updates. Measured: max |difference| of each tensor at most 1.4e-6 of its largest entry (1.3e-5 with
        # p-tuning's MLP); taking 4-row steps without accumulation gives 0.25. Entry by entry the relative error says
        # little (p-tuning entries near 0 differ by up to 57%), so the bound is 1e-4 of the tensor's scale: 70x above
        # the measured error, 2500x below the mistake.
        scale = float(tensor.abs().max())
        torch.testing.assert_close(accumulated_tensors[name], tensor, rtol=0, atol=1e-4 * scale, msg=name)


def test_warmup_and_linear_decay(tmp_path):
    # No held-out rows: 60 rows in batches of 8 are 8 steps per epoch, 16 in all.
    result = train(short_config(tmp_path, num_epochs=2, warmup_steps=4, learning_rate=0.04, eval_fraction=0.0))
    assert result.global_step == 16 and result.final_eval is None
    rates = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "train"]
    # Logged after step k: the rate of the next step, lr * (k / 4 during warmup, then (16 - k) / 12).
    expected = [0.04 * (k / 4 if k < 4 else (16 - k) / 12) for k in range(1, 17)]
    assert rates == pytest.approx(expected, rel=1e-12)  # float64 products of the same factors: rounding only


def test_held_out_split_and_epoch_order_are_seeded(tokenizer):
    first = prepare_data(TrainConfig.from_dict({"split": "train[:60]"}), tokenizer)
    again = prepare_data(TrainConfig.from_dict({"split": "train[:60]"}), tokenizer)
    other = prepare_data(TrainConfig.from_dict({"split": "train[:60]", "seed": 1}), tokenizer)
    assert (len(first.train), len(first.eval), len(first.eval_prompts)) == (48, 12, 12)
    assert first.eval == again.eval and first.eval != other.eval
    # The accuracy prompts are the held-out rows' prompts: the loss examples minus the answer.
    for loss_row, prompt_row in zip(first.eval, first.eval_prompts):
        assert loss_row["input_ids"] == prompt_row["input_ids"] + prompt_row["label_ids"]
    # Rank classification chooses among the labels of every row, training rows included.
    labels = {(row["label_text"], tuple(row["label_ids"])) for row in first.eval_prompts}
    assert [(text, tuple(ids)) for text, ids in first.label_choices["default"]] == sorted(labels)
    assert [text for text, _ in first.label_choices["default"]] == ["complaint", "no complaint"]
    one_row = prepare_data(TrainConfig.from_dict({"split": "train[:59]", "eval_split": "train[59:60]"}), tokenizer)
    assert len(one_row.eval_prompts) == 1 and one_row.label_choices == first.label_choices  # both labels still
    assert epoch_order(48, 0, 3) == epoch_order(48, 0, 3) != epoch_order(48, 0, 4)


def test_several_datasets_train_one_adapter_each(tmp_path):
    from softprompt.quickstart import shipped_dataset_path

    result = train(TrainConfig.from_dict(dict(
        dataset=[str(shipped_dataset_path("quotes")), str(shipped_dataset_path("prompts"))],
        text_column=["quote", "prompt"], split="train[:40]", num_epochs=2, num_virtual_tokens=4,
        num_generations=2, progress=False, output_dir=str(tmp_path / "run"),
    )))
    assert set(result.adapter_directories) == {"quotes", "prompts"}
    for name, directory in result.adapter_directories.items():
        assert directory == tmp_path / "run" / "adapters" / name and (directory / "adapter.safetensors").is_file()
    final = result.final_eval
    assert set(final["loss_by_adapter"]) == {"quotes", "prompts"}
    assert final["accuracy"] is None and final["rank_accuracy"] is None
    assert final["loss"] < result.initial_eval["loss"]


def test_task_column_trains_one_adapter_per_task(tmp_path):
    rows = [{"text": f"row {i} about {'cats' if i % 2 else 'dogs'}", "task": "cats" if i % 2 else "dogs"}
            for i in range(24)]
    data = tmp_path / "tasks.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = train(TrainConfig.from_dict(dict(dataset=[str(data)], text_column=["text"], task_column="task",
                                              num_epochs=1, method="prefix-tuning", num_generations=0,
                                              progress=False, output_dir=str(tmp_path / "run"))))
    assert set(result.adapter_directories) == {"cats", "dogs"}
    assert set(result.final_eval["loss_by_adapter"]) == {"cats", "dogs"}
    dogs = adapter_tensors(result.adapter_directories["dogs"])
    cats = adapter_tensors(result.adapter_directories["cats"])
    assert not torch.equal(cats["materialized"], dogs["materialized"])


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_are_complete_rotated_and_never_pickled(tmp_path):
    train(short_config(tmp_path, num_epochs=2, save_every=4, keep_last=2, method="p-tuning"))
    directories = complete_checkpoint_directories(tmp_path / "run")
    # Steps 4, 6 (epoch end), 8, 12 (epoch end) were written; the last two are kept.
    assert [d.name for d in directories] == ["step-00000008", "step-00000012"]
    checkpoint = load_checkpoint(directories[-1])
    assert sorted(p.name for p in directories[-1].iterdir()) == ["adapters", "manifest.json", "state.json",
                                                                 "tensors.safetensors"]
    assert checkpoint.state["position"]["epoch"] == 2 and checkpoint.state["position"]["step_in_epoch"] == 0
    # The position is the start of epoch 2 (0-based), so the order recorded is that epoch's.
    assert checkpoint.state["position"]["order"] == epoch_order(48, 0, 2)
    assert checkpoint.tensors["rng.torch"].dtype == torch.uint8
    assert {"exp_avg", "exp_avg_sq", "step"} == {k.split(".", 2)[2] for k in checkpoint.tensors if k.startswith("optimizer.")}
    assert isinstance(checkpoint.state["rng"]["python"][1], list)
    sources = "".join(path.read_text() for path in (Path(__file__).parents[1] / "softprompt").rglob("*.py"))
    assert "torch.load(" not in sources and "import pickle" not in sources and "pickle.load" not in sources


def test_optimizer_state_round_trips_through_safetensors_and_json():
    parameter = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([parameter], lr=0.1, betas=(0.8, 0.95))
    parameter.grad = torch.ones(3, 2)
    optimizer.step()
    tensors, document = flatten_optimizer_state(optimizer.state_dict())
    document = json.loads(json.dumps(document))
    restored = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, 2))], lr=1.0)
    restored.load_state_dict(unflatten_optimizer_state(tensors, document))
    assert restored.param_groups[0]["betas"] == (0.8, 0.95) and restored.param_groups[0]["lr"] == 0.1
    for key, value in optimizer.state[parameter].items():
        assert torch.equal(restored.state[restored.param_groups[0]["params"][0]][key], value)


def test_a_damaged_or_unfinished_checkpoint_is_never_used(tmp_path):
    train(short_config(tmp_path, num_epochs=2, keep_last=3))
    run = tmp_path / "run"
    good, newest = complete_checkpoint_directories(run)
    # A crash mid-write leaves a temporary directory: it has no manifest, so it is not a checkpoint.
    (run / "checkpoints" / ".tmp-step-00000099-1").mkdir()
    (run / "checkpoints" / ".tmp-step-00000099-1" / "state.json").write_text("{}")
    # A newer checkpoint whose file no longer matches its manifest is skipped.
    with open(newest / "tensors.safetensors", "r+b") as file:
        file.seek(200)
        file.write(b"\x00\x01")
    with pytest.raises(CheckpointError, match="differs from the manifest"):
        load_checkpoint(newest)
    skipped = []
    assert latest_checkpoint(run, on_skip=lambda path, error: skipped.append(path)).directory == good
    assert skipped == [newest]


def test_resume_refuses_other_settings_and_a_used_output_dir(tmp_path, capsys):
    train(short_config(tmp_path, num_epochs=1))
    with pytest.raises(ConfigError, match="already holds a run"):
        train(short_config(tmp_path, num_epochs=1))
    with pytest.raises(ConfigError, match="learning_rate: 0.03 in the checkpoint, 0.01 now"):
        train(short_config(tmp_path, num_epochs=1, learning_rate=0.01, resume=True))
    assert main(["train", *SHORT, "--num-epochs", "1", "--output-dir", str(tmp_path / "run")]) == 2
    assert "--resume to continue it, --overwrite to start over" in capsys.readouterr().err


def test_resume_of_a_finished_run_changes_nothing(tmp_path):
    first = train(short_config(tmp_path, num_epochs=1))
    before = adapter_tensors(first.adapter_directories["default"])
    metrics = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    again = train(short_config(tmp_path, num_epochs=1, resume=True))
    assert again.resumed_from is not None and again.global_step == first.global_step
    assert_bitwise_equal(adapter_tensors(again.adapter_directories["default"]), before)
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == metrics


def test_resume_from_an_epoch_end_checkpoint_continues_with_the_next_epoch(tmp_path):
    """A run stopped right after an epoch-end checkpoint (here: the later checkpoint and the final adapter removed)
    resumes into the next epoch and ends bit for bit where the uninterrupted run ended."""
    uninterrupted = train(short_config(tmp_path, num_epochs=2, save_every=0, keep_last=2,
                                       output_dir=str(tmp_path / "uninterrupted")))
    train(short_config(tmp_path, num_epochs=2, save_every=0, keep_last=2))
    run = tmp_path / "run"
    epoch_one, epoch_two = complete_checkpoint_directories(run)
    assert load_checkpoint(epoch_one).state["position"]["epoch"] == 1
    shutil.rmtree(epoch_two)
    shutil.rmtree(run / "adapter")
    resumed = train(short_config(tmp_path, num_epochs=2, save_every=0, keep_last=2, resume=True))
    assert resumed.resumed_from == epoch_one and resumed.global_step == uninterrupted.global_step == 12
    assert_bitwise_equal(adapter_tensors(run / "adapter"), adapter_tensors(tmp_path / "uninterrupted" / "adapter"))


def test_sigkill_then_resume_gives_the_same_adapter_bit_for_bit(tmp_path):
    """Kill -9 a `softprompt train` process right after its first checkpoint appears, resume it, and compare with a
    run never interrupted: every tensor of the final adapter is bitwise equal, and the metrics hold no duplicates."""
    flags = [*SHORT, "--method", "p-tuning", "--num-epochs", "12", "--save-every", "3"]
    killed_dir = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "softprompt.cli", "train", *flags, "--output-dir", str(killed_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # Only a hang guard, not a speed check: the first checkpoint takes a few seconds even on a loaded machine.
        deadline = time.monotonic() + 900
        while not complete_checkpoint_directories(killed_dir):
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 900 s: the run hangs"
            time.sleep(0.01)
        assert process.poll() is None, "the run finished before it could be killed"
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = complete_checkpoint_directories(killed_dir)[-1].name
    assert not (killed_dir / "adapter").exists(), "killed too late: the final adapter was already written"

    assert main(["train", *flags, "--output-dir", str(killed_dir), "--resume"]) == 0
    assert main(["train", *flags, "--output-dir", str(tmp_path / "uninterrupted")]) == 0
    assert_bitwise_equal(adapter_tensors(killed_dir / "adapter"), adapter_tensors(tmp_path / "uninterrupted" / "adapter"))
    records = read_metrics(killed_dir / "metrics.jsonl")
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 12 * 6 + 1)), killed_at
    assert [r["epoch"] for r in records if r["event"] == "eval"] == list(range(13))


def test_sigkill_during_every_kind_of_write_then_resume_is_bit_identical_and_leaves_nothing(tmp_path):
    """One run killed six times, each time in the middle of another kind of write (the embedded base model, a
    checkpoint's file, a metrics line, a checkpoint's rename, the final adapter, the plot) and resumed each time,
    ends bit for bit where an uninterrupted run ends, with exactly its files: every temporary file and folder, and
    the lock file, gone. `tests/kill_during_write.py` installs the kill points; the library carries no test hook."""
    flags = ["--split", "train[:24]", "--num-epochs", "3", "--save-every", "2", "--num-generations", "0",
             "--no-progress", "--method", "p-tuning"]  # 19 training rows: 3 steps per epoch, checkpoints 2, 3, 4, 6, 8, 9
    kills = [
        {"call": "replace", "pattern": r"/\.base-model\.[^/]+/", "nth": 2},  # base-model/ half moved into place
        {"call": "fsync", "pattern": r"/\.tmp-step-00000003-[^/]+/\.tensors\.safetensors\.", "nth": 1},
        {"call": "append", "pattern": r"metrics\.jsonl$", "nth": 3},  # resumed at step 2: the step-4 line, torn
        {"call": "replace", "pattern": r"/\.tmp-step-00000004-\d+$", "nth": 1},  # complete, never renamed
        {"call": "replace", "pattern": r"/adapter/\.adapter\.safetensors\.", "nth": 1},
        {"call": "replace", "pattern": r"/\.curves\.png\.", "nth": 1},
    ]
    killed = tmp_path / "killed"
    completed = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("kill_during_write.py")), json.dumps(kills), str(killed), *flags],
        capture_output=True, text=True, timeout=900,  # a hang guard only
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout)
    assert [entry["ended"] for entry in report] == ["killed"] * len(kills), report
    # What each kill interrupted, as the next run found it.
    base, checkpoint, metrics, rename, adapter, plot = [entry["tree"] for entry in report]
    assert "base-model/config.json" in base and any(re.fullmatch(r"\.base-model\.\w{8}/model\.safetensors", p) for p in base)
    assert "train_config.json" not in base
    assert any(re.fullmatch(r"checkpoints/\.tmp-step-00000003-\d+/\.tensors\.safetensors\.\w{8}\.tmp", p) for p in checkpoint)
    assert "checkpoints/step-00000002/manifest.json" in checkpoint
    assert report[2]["metrics_torn"] and "checkpoints/step-00000003/manifest.json" in metrics
    assert any(re.fullmatch(r"checkpoints/\.tmp-step-00000004-\d+/manifest\.json", p) for p in rename)
    assert any(re.fullmatch(r"adapter/\.adapter\.safetensors\.\w{8}\.tmp", p) for p in adapter)
    assert "adapter/adapter.safetensors" not in adapter
    assert any(re.fullmatch(r"\.curves\.png\.\w{8}\.tmp", p) for p in plot) and "curves.png" not in plot

    assert main(["train", *flags, "--output-dir", str(killed), "--resume"]) == 0
    uninterrupted = tmp_path / "uninterrupted"
    assert main(["train", *flags, "--output-dir", str(uninterrupted)]) == 0
    assert_bitwise_equal(adapter_tensors(killed / "adapter"), adapter_tensors(uninterrupted / "adapter"))
    for step in ("step-00000008", "step-00000009"):
        assert_bitwise_equal(adapter_tensors(killed / "checkpoints" / step / "adapters" / "default"),
                             adapter_tensors(uninterrupted / "checkpoints" / step / "adapters" / "default"))

    def paths(root: Path) -> list[str]:
        return sorted(str(path.relative_to(root)) for path in root.rglob("*"))

    assert paths(killed) == paths(uninterrupted)  # no leftover, no lock file

    def records(run: Path) -> list[dict]:  # throughput and step time are timings, the rest must agree exactly
        timings = {"tokens_per_second", "seconds"}
        return [{k: v for k, v in r.items() if k not in timings} for r in read_metrics(run / "metrics.jsonl")]

    assert records(killed) == records(uninterrupted)
    assert [r["step"] for r in records(killed) if r["event"] == "train"] == list(range(1, 10))


# ------------------------------------------------------------------------------------------------ divergence


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"count": 0}
    original = SoftPromptModel.summed_loss  # what a training step calls

    def poisoned(self, *args, **kwargs):
        loss, counts = original(self, *args, **kwargs)
        if not self.training:  # evaluation
            return loss, counts
        calls["count"] += 1
        return (loss * float("nan") if calls["count"] == 5 else loss), counts  # the 5th micro-batch = step 5

    monkeypatch.setattr(SoftPromptModel, "summed_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 5 .*step-00000004, is untouched"):
        train(short_config(tmp_path, num_epochs=2, save_every=2))
    (last,) = complete_checkpoint_directories(run)[-1:]
    assert last.name == "step-00000004"
    load_checkpoint(last)  # still complete and matching its manifest
    assert not (run / "adapter").exists()


def test_an_absurd_learning_rate_stops_with_a_clear_message(tmp_path, capsys):
    code = main(["train", *SHORT, "--learning-rate", "1e30", "--save-every", "1", "--output-dir", str(tmp_path)])
    assert code == 1
    error = capsys.readouterr().err
    assert "became nan at step 2" in error and "Fix: lower --learning-rate" in error
    (checkpoint,) = complete_checkpoint_directories(tmp_path)
    assert checkpoint.name == "step-00000001"
    load_checkpoint(checkpoint)


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "values, message",
    [
        ({"method": "lora"}, "method='lora': expected one of prompt-tuning, p-tuning, prefix-tuning"),
        ({"learning_rate": 0}, "learning_rate=0: expected a positive finite number"),
        ({"batch_size": 0}, "batch_size=0: expected an integer >= 1"),
        ({"eval_fraction": 1.0}, "eval_fraction=1.0: expected a fraction in [0, 1)"),
        ({"padding": "right"}, "padding='right': expected one of longest, max_length"),
        ({"compile": "fast"}, "compile='fast': expected one of default, reduce-overhead"),
        ({"resume": True, "overwrite": True}, "pass only one of --resume / --overwrite"),
        ({"dataset": ["a.csv"]}, "without text_column"),
        ({"dataset": ["a.csv", "b.csv"], "text_column": ["x", "y", "z"]}, "one column for all datasets or one per"),
        ({"method": "prefix-tuning", "prompt_tuning_init": "TEXT"},
         "applies to prompt tuning / multitask prompt tuning only"),
        ({"prompt_tuning_init": "TEXT", "dataset": ["a.csv"], "text_column": ["t"]}, "prompt_tuning_init_text"),
    ],
)
def test_config_errors_name_the_value_and_the_fix(values, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        TrainConfig.from_dict(values)


def test_config_defaults_follow_the_seed_guides():
    prompt = TrainConfig().adapter
    assert (prompt.num_virtual_tokens, prompt.prompt_tuning_init.value) == (8, "TEXT")
    assert prompt.prompt_tuning_init_text == "Classify if the tweet is a complaint or not:"
    assert TrainConfig(method="p-tuning").adapter.num_virtual_tokens == 20
    assert TrainConfig(method="prefix-tuning").adapter.num_virtual_tokens == 20
    other_data = TrainConfig.from_dict({"dataset": ["q.jsonl"], "text_column": ["quote"]}).adapter
    assert other_data.prompt_tuning_init.value == "RANDOM"
    config = TrainConfig()
    assert (config.optimization.learning_rate, config.optimization.batch_size, config.data.max_length) == (3e-2, 8, 64)
    assert (config.data.resolved_text_columns, config.data.resolved_label_column) == (["Tweet text"], "text_label")
