"""Where a training step's time goes: torch.profiler over a few steps of one method, softprompt and PEFT.

Command (from the repository root):

    python benchmarks/profile_step.py --config cpu --method "prompt tuning (8)"
    python benchmarks/profile_step.py --config gpu-16x64 --implementation torch

Uses `train_step.py`'s configs, models and batches. Prints, per library, the step's wall time and the operators
that take the most time (self time: CPU on CPU, device time on CUDA), and writes each profile as a Chrome trace to
``--trace-dir`` when given (open it in https://ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from peft import get_peft_model
from torch.profiler import ProfilerActivity, profile

import harness
from softprompt import SoftPromptModel
from train_step import CONFIGS, METHODS, NUM_LABEL_TOKENS, prepare_batch

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="cpu", choices=sorted(CONFIGS))
parser.add_argument("--method", default="prompt tuning (8)", choices=list(METHODS))
parser.add_argument("--implementation", default=None, help="compute_loss implementation (default: by device)")
parser.add_argument("--compile", default=None, metavar="MODE", help="torch.compile softprompt's decoder passes")
parser.add_argument("--libraries", nargs="*", default=["softprompt", "PEFT"])
parser.add_argument("--steps", type=int, default=3, help="profiled steps (after three warm-up steps)")
parser.add_argument("--rows", type=int, default=25, help="operators listed per library")
parser.add_argument("--trace-dir", type=Path, default=None)
args = parser.parse_args()

setup = CONFIGS[args.config]
device = torch.device(setup["device"])
sync = harness.default_sync(device)
implementation = args.implementation or ("triton" if device.type == "cuda" else "torch")
base = harness.build_random_bloom("560m", setup["num_layers"], setup["dtype"], device, seed=0)
batch = prepare_batch(setup, base.config.vocab_size, device)
our_config, peft_config = METHODS[args.method]

for library in args.libraries:
    if library == "softprompt":
        model = SoftPromptModel(base, our_config)
        if args.compile:
            model.compile_decoder(mode=args.compile, dynamic=False)

        def loss_fn() -> torch.Tensor:
            return model.compute_loss(**batch, implementation=implementation)
    else:
        model = get_peft_model(base, peft_config)

        def loss_fn() -> torch.Tensor:
            return model(**batch).loss

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step() -> None:
        if args.compile:
            torch.compiler.cudagraph_mark_step_begin()
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    for _ in range(3):  # warm-up (and compilation)
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as profiler:
        for _ in range(args.steps):
            step()
        sync()
    seconds = (time.perf_counter() - start) / args.steps
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n== {library}, {args.method}, {args.config} ({implementation}): {seconds * 1e3:.1f} ms per step "
          f"(profiled; batch {setup['batch_size']} x {setup['num_tokens']}, {NUM_LABEL_TOKENS} labels per row)")
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    if args.trace_dir is not None:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(args.trace_dir / f"{library}_{args.config}.json"))
    del model, optimizer
