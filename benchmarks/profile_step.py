"""Where a training step's time goes: torch.profiler over a few steps of one method, softprompt and PEFT.

Command (from the repository root):

    python benchmarks/profile_step.py --config cpu --method "prompt tuning (8)"
    python benchmarks/profile_step.py --config gpu-16x64 --implementation torch

Uses the training-step configs, methods, batches and steps of ``train_step.py`` (from ``harness``: the same
weights for both libraries). Prints, per library, the step's wall time and the operators that take the most time
(self time: CPU on CPU, device time on CUDA, then CPU), and writes the summary to
``benchmarks/results/profile_<config>_<method>_<library><suffix>.json`` / ``.md`` (suffix as in ``train_step.py``:
``_compiled-<mode>``, ``_<name>-implementation``): per step, the wall time, the self CPU time of all operators and,
on CUDA, the device time of all kernels (a step whose CPU time exceeds its device time is bound by launches), and
the top operators. ``--trace-dir`` also writes each profile as a Chrome trace (open it in https://ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import harness
from harness import METHODS, NUM_LABEL_TOKENS, STEP_CONFIGS

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--config", default="cpu", choices=list(STEP_CONFIGS))
parser.add_argument("--method", default="prompt tuning (8)", choices=list(METHODS))
parser.add_argument("--implementation", default=None, help="compute_loss implementation (default: by device)")
parser.add_argument("--compile", default=None, metavar="MODE", help="torch.compile softprompt's decoder passes")
parser.add_argument("--libraries", nargs="*", default=["softprompt", "PEFT"], choices=["softprompt", "PEFT"])
parser.add_argument("--steps", type=int, default=3, help="profiled steps (after three warm-up steps)")
parser.add_argument("--rows", type=int, default=25, help="operators listed per library")
parser.add_argument("--trace-dir", type=Path, default=None)
args = parser.parse_args()

setup = STEP_CONFIGS[args.config]
device = torch.device(setup["device"])
cuda = device.type == "cuda"
sync = harness.default_sync(device)
implementation = args.implementation or harness.default_implementation(device)
machine = harness.machine_info(device)
base = harness.build_random_model(setup["model"], setup["num_layers"], setup["dtype"], device, seed=0)
batch = harness.prepare_batch(setup, base.config.vocab_size, device)
our_config = METHODS[args.method]()
steps, _ = harness.training_steps(base, our_config, batch, implementation, compile_mode=args.compile)
suffix = (f"_compiled-{args.compile}" if args.compile else "") + (
    f"_{implementation}-implementation" if implementation != harness.default_implementation(device) else "")

for library in args.libraries:
    step = steps[library]
    for _ in range(3):  # warm-up (and compilation)
        step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    start = time.perf_counter()
    with profile(activities=activities) as profiler:
        for _ in range(args.steps):
            step()
        sync()
    seconds = (time.perf_counter() - start) / args.steps
    events = profiler.key_averages()
    cpu_ms = sum(event.self_cpu_time_total for event in events) / args.steps / 1e3
    device_ms = sum(event.self_device_time_total for event in events) / args.steps / 1e3 if cuda else None
    summary = (f"{library}, {args.method}, {args.config} ({implementation}"
               + (f", compiled {args.compile}" if args.compile else "") + f"): {seconds * 1e3:.1f} ms per step "
               f"(profiled, mean of {args.steps}), self CPU time of all operators {cpu_ms:.1f} ms"
               + (f", device time of all kernels {device_ms:.1f} ms" if cuda else "")
               + f"; batch {setup['batch_size']} x {setup['num_tokens']}, {NUM_LABEL_TOKENS} labels per row")
    print(f"\n== {summary}")
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    print(events.table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))
    if cuda:
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    top = sorted(events, key=lambda event: getattr(event, sort_by), reverse=True)[: args.rows]
    rows = [{"operator": event.key, "calls per step": event.count / args.steps,
             "self CPU ms per step": event.self_cpu_time_total / args.steps / 1e3,
             **({"self device ms per step": event.self_device_time_total / args.steps / 1e3} if cuda else {})}
            for event in top]
    harness.write_results(
        f"profile_{args.config}_{our_config.method.replace('_', '-')}_{library.lower()}{suffix}",
        rows,
        machine,
        summary + ".\n\nTop operators by self " + ("device" if cuda else "CPU") + " time:\n\n"
        + harness.markdown_table(rows),
        extra={"library": library, "method": args.method, "config": {k: str(v) for k, v in setup.items()},
               "implementation": implementation, "compile": args.compile, "profiled_steps": args.steps,
               "step_ms": seconds * 1e3, "self_cpu_ms_per_step": cpu_ms, "device_ms_per_step": device_ms},
        command="python " + shlex.join(sys.argv),
    )
    if args.trace_dir is not None:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(args.trace_dir / f"{library}_{args.config}{suffix}.json"))
