"""Two processes (torchrun, gloo on CPU) train the same adapter as one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from softprompt.cli import main
from softprompt.training import read_metrics

FLAGS = ["--split", "train[:60]", "--num-epochs", "2", "--method", "p-tuning", "--num-generations", "0",
         "--no-progress", "--device", "cpu"]
"""48 training rows: 6 optimizer steps of 8 rows per epoch, an evaluation and a checkpoint at each epoch end."""


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    two = tmp_path / "two-processes"
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "softprompt.cli", "train", *FLAGS, "--batch-size", "4", "--output-dir", str(two)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count("finished 12 steps") == 1  # only rank 0 reports
    records = read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 13))  # only rank 0 logs
    assert [r["epoch"] for r in records if r["event"] == "eval"] == [0, 1, 2]

    # Same rows per micro-batch as the two processes (4 each), summed by accumulation instead of all_reduce: the
    # gradient is g0 + g1 in both cases, a single float addition, so the adapters are bitwise equal.
    assert main(["train", *FLAGS, "--batch-size", "4", "--gradient-accumulation-steps", "2",
                 "--output-dir", str(tmp_path / "accumulated")]) == 0
    # One 8-row batch: the same global batch, but padded to the longest of 8 rows instead of 4 and summed over rows
    # in another order, which changes the gradients by ~1e-7 relative; AdamW's normalization lets that grow over the
    # 12 steps. Measured: max |difference| / max |value| of each tensor at most 6e-5. Each process training on its
    # own 4 rows without the all-reduce gives 0.1 to 2.5. The tolerance, 1e-3 of each tensor's scale, sits 15x above
    # the first and 100x below the second.
    assert main(["train", *FLAGS, "--batch-size", "8", "--output-dir", str(tmp_path / "one-batch")]) == 0

    distributed = load_file(str(two / "adapter" / "adapter.safetensors"))
    accumulated = load_file(str(tmp_path / "accumulated" / "adapter" / "adapter.safetensors"))
    one_batch = load_file(str(tmp_path / "one-batch" / "adapter" / "adapter.safetensors"))
    assert distributed.keys() == accumulated.keys() == one_batch.keys()
    for name, tensor in distributed.items():
        assert torch.equal(tensor, accumulated[name]), name
        scale = float(one_batch[name].abs().max())
        assert float((tensor - one_batch[name]).abs().max()) <= 1e-3 * scale, name

    # --overwrite with several processes: every process must get past the output-directory check (one deletes).
    overwritten = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "softprompt.cli", "train", *FLAGS, "--batch-size", "4", "--output-dir", str(two),
         "--split", "train[:20]", "--num-epochs", "1", "--overwrite"],  # later flags win: 16 rows, 2 steps
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert overwritten.returncode == 0, overwritten.stderr[-3000:]
    assert [r["step"] for r in read_metrics(two / "metrics.jsonl") if r["event"] == "train"] == [1, 2]
