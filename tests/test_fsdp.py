"""The frozen base sharded over 2 gloo processes with FSDP2 (``--fsdp``): the same losses, gradients, generations
and trained adapters as one process holding the whole base, and a run killed mid-way resumes to the same adapter.

The processes are started by ``torchrun``, as users start them: the killed and resumed run by the command line,
the per-call checks and the training of each method by this file run as a script (``python -m
torch.distributed.run ... tests/test_fsdp.py DIR``, the ``__main__`` block at the end), which writes what each
process measured as JSON for the tests to read.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from softprompt import PromptTuningConfig, SoftPromptModel, enable_activation_checkpointing
from softprompt.methods import METHODS as METHOD_REGISTRY
from softprompt.methods import method_named
from softprompt.multi_task import make_trainable
from softprompt.quickstart import build_tiny_model, shipped_dataset_path
from softprompt.training import (
    ConfigError,
    TrainConfig,
    read_metrics,
    shard_frozen_base,
    train,
)
from softprompt.training.fsdp import process_mesh
from softprompt.training.optimizer_step import STAND_IN, optimizer_step
from softprompt.training.prepared import label_loss

METHODS = tuple(spec.cli_name for spec in METHOD_REGISTRY.values())
"""Every method of the registry: one added later is checked sharded with no change here (unless it needs settings
of its own: `TRAINING_NEEDS`, `CALL_NEEDS`)."""

SETTINGS = {"split": "train[:55]", "num_epochs": 2, "batch_size": 4, "save_every": 2, "num_generations": 2,
            "progress": False, "device": "cpu"}
"""44 training rows: with 2 processes x 4 rows, 6 optimizer steps per epoch, 12 in all, the last of each epoch with
4 rows, all process 0's (process 1 runs a stand-in: its passes gather weights for process 0's); an evaluation
(loss and generated labels) before training and at each epoch end, a checkpoint every 2 steps, 2 generations at
the end."""

TASK_DATA = "tasks.jsonl"
"""The shipped complaints with a ``task`` column (`write_data`), in the `sharded_runs` directory."""
CORPUS = "corpus.txt"
"""A short text for context distillation (`write_data`), in the `sharded_runs` directory."""

TRAINING_NEEDS = {
    # What a run needs beyond SETTINGS, by its name (a method's, trained with the defaults on the shipped data).
    "adaption-prompt": {"adapter_len": 4, "adapter_layers": 2},  # required fields (PEFT's too), no defaults
    # Task ids from a task column (2 tasks), so that a step's rows, and each process's, mix the tasks' prompts.
    "multitask-prompt-tuning": {"dataset": [TASK_DATA], "text_column": ["Tweet text"], "label_column": "text_label",
                                "task_column": "task"},
    "cpt": {"context_examples": 2},  # its context from 2 training rows (not 4: fewer virtual tokens, a faster run)
    # Started from the base's own keys and values of a text: the init runs the base, before it is sharded.
    "cartridge": {"num_virtual_tokens": 6, "init_text": "Tweet text : the crew was lovely and kind today"},
    # Cartridge's own recipe, whose loss runs the frozen passes itself: 12 small conversations (10 trained on, the
    # last micro-batch of 2 rows process 0's), the teacher's targets, the cartridge started from the corpus.
    "context-distillation": {"method": "cartridge", "recipe": "context-distillation", "corpus": CORPUS,
                             "split": "train", "num_virtual_tokens": 4, "num_conversations": 12,
                             "max_answer_tokens": 12, "chunk_tokens": 24, "max_length": 48, "top_k": 5},
}

RUNS = (*METHODS, "context-distillation")
"""The training runs of `sharded_runs`: every method, and cartridge's context-distillation recipe."""

CALL_NEEDS = {
    # The per-call checks' adapters beside 4 virtual tokens (where a method takes slots) on the 64-token vocabulary.
    "p-tuning": {"encoder_hidden_size": 16},  # a small encoder (the default is the hidden size)
    "adaption-prompt": {"adapter_len": 4, "adapter_layers": 2},
    "multitask-prompt-tuning": {"num_tasks": 2},  # rows of both tasks in a call (`TASK_IDS`)
    # A context of 2 examples (types 4k+1..4k+4): its label tokens are scored as the text's labels are.
    "cpt": {"cpt_token_ids": [5, 6, 7, 8, 9, 10, 11, 12], "cpt_tokens_type_mask": [1, 2, 3, 4, 5, 6, 7, 8]},
}

TASK_IDS = torch.tensor([1, 0, 0])
"""Each row's task in the per-call checks, for a method that takes task ids (the other adapter ignores them)."""


def run_settings(run: str, directory: Path) -> dict:
    """SETTINGS with run `run`'s method and what it needs (`TRAINING_NEEDS`; files named relative to `directory`)."""
    needs = dict(TRAINING_NEEDS.get(run, {}))
    if "dataset" in needs:
        needs["dataset"] = [str(directory / name) for name in needs["dataset"]]
    if "corpus" in needs:
        needs["corpus"] = str(directory / needs["corpus"])
    return {**SETTINGS, "method": run, **needs}


def write_data(directory: Path) -> None:
    """`TASK_DATA` (the shipped complaints' first 60 rows, alternately of task ``even`` and ``odd``) and `CORPUS`."""
    with shipped_dataset_path("complaints").open(newline="") as file:
        rows = list(csv.DictReader(file))[:60]
    lines = [json.dumps({**row, "task": ("even", "odd")[index % 2]}) + "\n" for index, row in enumerate(rows)]
    (directory / TASK_DATA).write_text("".join(lines))
    corpus = ("Tweet text : my flight was cancelled again and the crew was lovely and kind today . thanks for the "
              "coffee , the dinner was late but the pilot was great . ")
    (directory / CORPUS).write_text(corpus * 2)


def adapter_config(method: str):
    """`method`'s adapter in the per-call checks: 4 virtual tokens where it takes them, and `CALL_NEEDS`."""
    spec = method_named(method)
    slots = {"num_virtual_tokens": 4} if spec.default_num_virtual_tokens is not None else {}
    return spec.config_class(**slots, **CALL_NEEDS.get(method, {}))


LOSS_CASES = {
    False: (("torch", "prefix"), ("torch", "sequence"), ("triton", "prefix"), ("full", "sequence")),
    True: (("torch", "prefix"), ("torch", "sequence")),
}
"""By gradient checkpointing: the label-only head in both layouts (the one-pass CPU head), the fused Triton loss
(under Triton's CPU interpreter) and the full-logits reference; with checkpointing, the layers recomputed in the
backward pass gather their weights again."""


def torchrun(*arguments: str, **options) -> subprocess.Popen:
    """``torchrun --standalone --nproc_per_node 2`` with `arguments`, one thread per process (2 cores)."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *arguments],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        **options,
    )


def finished(process: subprocess.Popen, timeout: float = 300) -> str:
    """Waits for `process`; fails with its error output unless it succeeded; returns its standard output."""
    stdout, stderr = process.communicate(timeout=timeout)
    assert process.returncode == 0, stderr[-4000:]
    return stdout


def tiny_model(model_type: str, method: str, checkpointing: bool) -> SoftPromptModel:
    """A tiny random base of `model_type` (seeded) with two adapters, `method`'s and a prompt-tuning one, both
    trainable (a batch can mix them), each trained tensor moved off its init: some start at zero (adaption prompt's
    gates, CPT's deltas), where the output would not depend on the rest."""
    torch.manual_seed(0)
    base = build_tiny_model(model_type, vocab_size=64, seed=0)
    if checkpointing:
        enable_activation_checkpointing(base)
    model = SoftPromptModel(base, adapter_config(method))
    model.add_adapter("other", PromptTuningConfig(num_virtual_tokens=3))
    make_trainable(model, ["default", "other"])
    with torch.no_grad():
        for parameter in trained(model):
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def trained(model: SoftPromptModel) -> list[torch.nn.Parameter]:
    """The adapters' trained tensors (not CPT's context embeddings or a cartridge's frozen first positions)."""
    return [parameter for parameter in model.prompts.parameters() if parameter.requires_grad]


def per_call_checks(output: Path) -> None:
    """Sharded against whole, call by call, in each process; writes ``calls-<rank>.json``."""
    rank = dist.get_rank()
    mesh = process_mesh(torch.device("cpu"))
    generator = torch.Generator().manual_seed(100 + rank)  # each process its own rows, as in training
    input_ids = torch.randint(4, 64, (3, 9), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # one left-padded row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100
    names = ["default", "other", "default"]
    records = []
    for model_type in ("bloom", "llama"):  # a tied head, an untied one
        for method in METHODS:
            tasks = {"task_ids": TASK_IDS} if method_named(method).takes_task_ids else {}
            for checkpointing in (False, True):
                whole = tiny_model(model_type, method, checkpointing)
                sharded = tiny_model(model_type, method, checkpointing)
                shard_frozen_base(sharded, mesh)
                base_parameters = [p for name, p in sharded.named_parameters() if not name.startswith("prompts.")]
                for implementation, layout in LOSS_CASES[checkpointing]:
                    losses, gradients = [], []
                    for model in (whole, sharded):
                        model.zero_grad()
                        if implementation == "full":
                            loss = model.compute_loss(input_ids, attention_mask, labels, names, implementation="full",
                                                      **tasks)
                        else:
                            loss = model.summed_loss(input_ids, attention_mask, labels, names, **tasks,
                                                     implementation=implementation, virtual_token_layout=layout)[0]
                        loss.backward()
                        losses.append(float(loss.detach()))
                        gradients.append([p.grad.clone() for p in trained(model)])
                    records.append({
                        "case": f"{model_type} {method} checkpointing={checkpointing} {implementation} {layout}",
                        "loss": losses,
                        "gradient_difference": max(float((a - b).abs().max()) for a, b in zip(*gradients)),
                        "gradient_scale": max(float(a.abs().max()) for a in gradients[0]),
                    })
                # Processes stop at different lengths: transformers must keep both stepping (synced_gpus).
                with torch.no_grad():
                    new_tokens = 2 + 3 * rank
                    expected, generated = (model.generate(input_ids, attention_mask, adapter_names=names,
                                                          max_new_tokens=new_tokens, do_sample=False, **tasks)
                                           for model in (whole, sharded))
                records.append({"case": f"{model_type} {method} checkpointing={checkpointing} generate",
                                "generated_equal": torch.equal(expected, generated),
                                "local_base_elements": sum(p.to_local().numel() for p in base_parameters),
                                "base_elements": sum(p.numel() for p in base_parameters)})
    (output / f"calls-{rank}.json").write_text(json.dumps(records))


def train_each_method(output: Path) -> None:
    """Every run of `RUNS` trained with ``fsdp=True`` through the Python API, in each process; writes
    ``train-<rank>.json`` (each run's generations)."""
    generations = {}
    for run in RUNS:
        config = TrainConfig.from_dict({**run_settings(run, output), "fsdp": True, "output_dir": str(output / run)})
        generations[run] = train(config).generations
    (output / f"train-{dist.get_rank()}.json").write_text(json.dumps(generations))


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> Path:
    """What 2 processes measured with the base sharded: the per-call checks, then each method trained with
    ``--fsdp`` (2 x 4 rows per step); one ``torchrun`` for both (each start costs seconds of imports)."""
    output = tmp_path_factory.mktemp("fsdp")
    write_data(output)
    finished(torchrun(__file__, str(output)), timeout=600)
    return output


def test_sharded_calls_match_the_whole_base(sharded_runs):
    for rank in (0, 1):
        records = json.loads((sharded_runs / f"calls-{rank}.json").read_text())
        assert len(records) == 2 * len(METHODS) * (sum(len(cases) for cases in LOSS_CASES.values()) + 2)
        for record in records:
            if "generated_equal" in record:
                assert record["generated_equal"], record["case"]
                # Half the base's weights each (FSDP cuts each tensor's first dimension in two); the sum is the base.
                assert record["local_base_elements"] <= 0.55 * record["base_elements"], record["case"]
                continue
            # The gathered weights are exact copies and the ops the same: measured bitwise equal in every case. The
            # tolerance leaves room for a BLAS whose kernels depend on memory alignment; the per-process rows differ,
            # so a process that used the other's weights would be off by the scale of the loss itself.
            whole, sharded = record["loss"]
            assert abs(whole - sharded) <= 1e-6 * abs(whole), record["case"]
            assert record["gradient_difference"] <= 1e-5 * max(1.0, record["gradient_scale"]), record["case"]
    sizes = [json.loads((sharded_runs / f"calls-{rank}.json").read_text())[-1] for rank in (0, 1)]
    assert sizes[0]["local_base_elements"] + sizes[1]["local_base_elements"] == sizes[0]["base_elements"]


@pytest.mark.parametrize("run", RUNS)
def test_sharded_training_gives_the_one_process_adapter(sharded_runs, tmp_path, run):
    # One process, the same micro-batches (4 rows, 2 accumulated = the 2 processes' 8): the same global batch.
    one = train(TrainConfig.from_dict({**run_settings(run, sharded_runs), "gradient_accumulation_steps": 2,
                                       "output_dir": str(tmp_path / "one-process")}))
    sharded = load_file(str(sharded_runs / run / "adapter" / "adapter.safetensors"))
    alone = load_file(str(tmp_path / "one-process" / "adapter" / "adapter.safetensors"))
    assert sharded.keys() == alone.keys()
    for name, tensor in sharded.items():
        # Measured: bitwise equal (the all-reduce adds the same two partial sums that accumulation adds, and a
        # stand-in's passes add zeros).
        torch.testing.assert_close(tensor, alone[name], rtol=0, atol=1e-5, msg=name)

    # Evaluation ran on both processes (each pass needs both) and rank 0 logged it once: the one-process figures;
    # each step's loss too, the steps whose last micro-batch only process 0 had rows in included.
    records = read_metrics(sharded_runs / run / "metrics.jsonl")
    expected = read_metrics(tmp_path / "one-process" / "metrics.jsonl")
    assert [r["epoch"] for r in records if r["event"] == "eval"] == [0, 1, 2]
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, one.global_step + 1))
    for event in ("eval", "train"):
        got, want = ([r for r in log if r["event"] == event] for log in (records, expected))
        assert len(got) == len(want)
        for measured, reference in zip(got, want):
            assert measured["loss"] == pytest.approx(reference["loss"], rel=1e-6), (event, measured["step"])
            assert measured.get("accuracy") == reference.get("accuracy")
    # The final generations, on both processes, are the one-process ones.
    for rank in (0, 1):
        assert json.loads((sharded_runs / f"train-{rank}.json").read_text())[run] == one.generations
    assert len(one.generations) == 2


def test_killed_process_leaves_a_checkpoint_that_resumes_to_the_same_adapter(sharded_runs, tmp_path):
    output = tmp_path / "killed"
    flags = ["-m", "softprompt.cli", "train", "--fsdp", "--method", "prompt-tuning", "--split", SETTINGS["split"],
             "--num-epochs", str(SETTINGS["num_epochs"]), "--batch-size", "4", "--save-every", "2",
             "--num-generations", "2", "--no-progress", "--device", "cpu", "--output-dir", str(output)]
    run = torchrun(*flags)
    first = output / "checkpoints" / "step-00000002" / "manifest.json"  # written last: the checkpoint is complete
    deadline = time.monotonic() + 240
    while not first.exists():
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()[1][-4000:]
        time.sleep(0.02)
    os.kill(worker_of_rank(run.pid, 1), signal.SIGKILL)  # a process (a node) dies mid-run
    run.communicate(timeout=120)
    assert run.returncode != 0, "the run ended before the kill"
    assert not (output / "adapter").exists(), "the run ended before the kill"

    resumed = finished(torchrun(*flags, "--resume"))
    assert "base sharded (FSDP2)" in resumed and "resumed from" in resumed
    steps = [r["step"] for r in read_metrics(output / "metrics.jsonl") if r["event"] == "train"]
    assert steps == list(range(1, 13))  # each step logged once: what the killed run logged after its checkpoint
    expected = load_file(str(sharded_runs / "prompt-tuning" / "adapter" / "adapter.safetensors"))
    for name, tensor in load_file(str(output / "adapter" / "adapter.safetensors")).items():
        assert torch.equal(tensor, expected[name]), name  # bit for bit the uninterrupted run's


def worker_of_rank(launcher: int, rank: int) -> int:
    """The pid of `launcher`'s (torchrun's) worker process whose ``RANK`` is `rank`."""
    for _ in range(500):
        children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
        for child in children:
            environment = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environment:
                return int(child)
        time.sleep(0.01)
    raise AssertionError(f"no worker of rank {rank} under pid {launcher}")


def test_a_sharded_step_runs_every_micro_batch_and_learns_only_from_its_labels():
    """Sharded, a process must make the passes the others make (each gathers weights from all): a micro-batch
    without labels and a stand-in (a process without rows) run forward and backward, and add exact zeros."""
    torch.manual_seed(0)
    model = SoftPromptModel(build_tiny_model("llama", vocab_size=64, seed=0), PromptTuningConfig(num_virtual_tokens=4))
    make_trainable(model, ["default"])
    input_ids = torch.randint(4, 64, (2, 6))
    labels = input_ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels,
             "task": ["default", "default"]}
    unlabelled = {**batch, "labels": torch.full_like(labels, -100)}
    stand_in = {**batch, STAND_IN: True}
    passes = []

    def loss_function(model, batch, **options):
        loss, per_row = label_loss(model, batch, **options)
        loss.register_hook(lambda gradient: passes.append("backward"))
        passes.append("forward")
        return loss, per_row

    def step(micro_batches, sharded):
        with torch.no_grad():
            model.prompts["default"].embedding.weight.copy_(start)
        parameters = {"default": trained(model)}
        optimizer = torch.optim.AdamW(parameters["default"], lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        result = optimizer_step(model, parameters, optimizer, scheduler, micro_batches, {}, 1.0,
                                contextlib.nullcontext, loss_function=loss_function, sharded=sharded)
        return result, model.prompts["default"].embedding.weight.detach().clone()

    start = model.prompts["default"].embedding.weight.detach().clone()
    alone, expected = step([batch, unlabelled], sharded=False)
    assert passes == ["forward", "backward"]  # the unlabelled micro-batch is skipped: no pass at all
    passes.clear()
    result, trained_weight = step([batch, unlabelled, stand_in], sharded=True)
    assert passes == ["forward", "backward"] * 3
    assert torch.equal(trained_weight, expected) and not torch.equal(expected, start)
    measured = ("loss", "grad_norm", "tokens", "skipped_micro_batches")
    assert [getattr(result, name) for name in measured] == [getattr(alone, name) for name in measured]
    assert (result.tokens, result.skipped_micro_batches) == (2 * 12, 1)  # the stand-in's tokens are not counted


def test_fsdp_setting_is_checked():
    with pytest.raises(ConfigError, match="fsdp='yes': expected true or false"):
        TrainConfig.from_dict({"fsdp": "yes"})
    assert TrainConfig.from_dict({"fsdp": True}).execution.fsdp is True


if __name__ == "__main__":  # each process of `sharded_runs`
    dist.init_process_group("gloo")  # train() uses the group it finds and leaves it open
    per_call_checks(Path(sys.argv[1]))
    train_each_method(Path(sys.argv[1]))
    dist.destroy_process_group()
