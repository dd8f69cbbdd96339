r"""One full training step (forward, backward, AdamW step), softprompt vs PEFT, for each of the three methods.

Commands (from the repository root); these produced the committed results (file stem after ``#``):

    python benchmarks/train_step.py --configs cpu --repeats 5          # train_step_cpu
    python benchmarks/train_step.py --configs gpu-16x64 --repeats 20   # train_step_gpu-16x64
    python benchmarks/train_step.py --configs gpu-8x512 --repeats 20   # train_step_gpu-8x512
    python benchmarks/train_step.py --configs gpu-16x64 --repeats 20 --compile reduce-overhead \
        --methods 'prompt tuning (8)' 'p-tuning MLP (20, h=128)'
        # train_step_gpu-16x64_compiled-reduce-overhead_prompt-tuning_p-tuning
    python benchmarks/train_step.py --configs gpu-16x64 --repeats 20 --compile reduce-overhead \
        --methods 'prefix tuning (20)'
        # train_step_gpu-16x64_compiled-reduce-overhead_prefix-tuning
    python benchmarks/train_step.py --configs gpu-16x64 --repeats 20 --virtual-token-layout sequence \
        --methods 'prompt tuning (8)' 'p-tuning MLP (20, h=128)'
        # train_step_gpu-16x64_sequence-layout_prompt-tuning_p-tuning

Without ``--configs`` it runs ``cpu`` on CPU, ``gpu-16x64`` and ``gpu-8x512`` on CUDA; ``--configs cpu-padded``
runs the seed recipe's fixed-length padding (see below):

    python benchmarks/train_step.py --configs cpu-padded --repeats 5   # train_step_cpu-padded

Writes ``benchmarks/results/train_step_<config><suffix>.json`` / ``.md`` (one table per config, with the machine
and the exact command line). The suffix names what differs from a default run, so runs do not overwrite each
other: ``_compiled-<mode>`` (``-both`` with ``--compile-peft``), ``_<layout>-layout``, ``_<name>-implementation``
(an ``--implementation`` other than the device's default), and the methods run (``_prompt-tuning``, ``_p-tuning``,
``_prefix-tuning``) when ``--methods`` leaves one out. The GPU results above were measured on an H100 with torch
2.11 (see each file's machine).

Configs (random weights of a real model's shape; 3 label tokens at the end of each row):

- ``cpu``: bloomz-560m (C 1024, H 16, V 250880) cut to 4 layers, fp32, batch 8 x 64 tokens, every row full (no
  padding to skip).
- ``cpu-qwen2.5``: the same for a grouped-query family, Qwen2.5-0.5B (C 896, 14 query heads sharing 2 key/value
  heads of 64, a gated MLP of 4864, V 151936) cut to 4 layers:

      python benchmarks/train_step.py --configs cpu-qwen2.5 --repeats 5   # train_step_cpu-qwen2.5
- ``cpu-padded``: as ``cpu``, but rows of 16..40 real tokens left-padded to 64, as the seed recipe pads to
  ``max_length=64``; shows what dropping all-padding columns is worth.
- ``gpu-16x64`` / ``gpu-8x512``: bloomz-560m, all 24 layers, bf16 weights (both libraries; prompt parameters stay fp32), batch
  16 x 64 (the seed recipe) and 8 x 512.

Both libraries run on the same frozen base model (one copy, shared), the same batch and dtype, with the same initial
adapter weights (their first-step losses are printed side by side as a check that they compute the same thing).
softprompt's step is ``model.compute_loss(...)`` (``--implementation``: ``torch`` on CPU, ``triton`` on CUDA by
default); PEFT's is ``peft_model(input_ids=..., attention_mask=..., labels=...).loss``, its documented training
call. The two steps alternate, repeat by repeat, after warm-up steps (which also create AdamW's state), so slow drifts
of a shared machine hit both alike; the median of the repeats is reported, with the spread (max - min).

Reported per method and library:

- tokens/s: B * T (the batch's token slots) / median step time; the ratio softprompt / PEFT.
- peak memory: what one step adds on top of the model, the batch and the optimizer state. CUDA:
  ``torch.cuda.max_memory_allocated`` (exact). CPU: the growth of the process's resident set size (RSS) during the
  step, sampled every millisecond, with glibc told to return every freed block of 64 KiB or more to the OS so that
  a freed tensor leaves the RSS (`harness.PeakMemory`); that setting costs page faults, so it is on only for the
  memory-measuring step, never while timing. torch's CPU tensors bypass Python's allocator, so ``tracemalloc``
  would see none of them. With ``--compile reduce-overhead`` (CUDA graphs) softprompt's activations live in the
  graphs' private memory pool, allocated when the graphs are recorded in the warm-up steps, so "what one step
  adds" undercounts them: compare memory on the eager runs.
- matmul-peak fraction: required FLOPs / step time / the measured GEMM rate (fp32 on CPU, bf16 on CUDA;
  `harness.matmul_peak_gflops`). Required FLOPs are the matrix products a step cannot avoid, counted the same for
  both libraries: the layers over the B * T real-token positions plus the P virtual tokens once (their keys and
  values do not depend on the input), attention over causal keys, and the LM head at the N labelled positions only,
  forward and backward. The backward of a frozen layer needs only its input gradient: the same FLOPs as the forward
  for the linear layers, twice for attention. Small terms (LayerNorms, GeLU, the p-tuning encoder) are left out. So a
  fraction says how close a step comes to doing only the necessary work at the machine's GEMM rate (the issue's
  count, 141 GFLOP for prompt tuning on ``cpu``, counts the virtual tokens once per row: 130 GFLOP here).
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys

import torch

import harness
from harness import METHODS, NUM_LABEL_TOKENS, STEP_CONFIGS


def required_flops(model, batch: dict, num_virtual: int, method: str) -> float:
    """The matrix-product FLOPs of one training step that no implementation can avoid (see the module docstring).

    Counted from the model itself, so it holds for every family: each layer's matrices (every 2-D weight of one
    decoder layer: BLOOM's 12 C^2; a grouped-query layer's q, k, v, o and gated MLP), attention over the causal keys
    (2 * 2 * H * D FLOPs per query and visible key), and the head at the labelled positions (2 * C * V each).

    Args:
        model: the base model.
        batch: the step's batch.
        num_virtual: P.
        method: the softprompt config's ``method`` (prefix tuning adds no virtual positions to the layers).
    """
    from softprompt.families import family_of

    shape = family_of(model.config).shape(model.config)
    layer = next(module for module in model.modules() if hasattr(module, "_can_checkpoint_with_cache"))
    linear_per_position = 2 * sum(p.numel() for p in layer.parameters() if p.dim() == 2) * shape.num_layers
    attention_per_key = 4 * shape.num_heads * shape.head_dim * shape.num_layers
    prefix_tuning = method == "prefix_tuning"
    lengths = batch["attention_mask"].sum(dim=1).tolist()  # real tokens per row
    positions = sum(lengths) + (0 if prefix_tuning else num_virtual)
    attention = sum(attention_per_key * sum(num_virtual + k + 1 for k in range(n)) for n in lengths)
    attention += 0 if prefix_tuning else attention_per_key * sum(k + 1 for k in range(num_virtual))
    # Column 0's label is predicted only by a last virtual token (prompt tuning, p-tuning).
    labels = batch["labels"][:, 1:] if prefix_tuning else batch["labels"]
    num_labels = int((labels != -100).sum())
    head = 2 * num_labels * shape.embedding_width * shape.vocab_size
    return 2 * linear_per_position * positions + 3 * attention + 2 * head


def results_suffix(args: argparse.Namespace, implementation: str, device: torch.device) -> str:
    """What the run's file name adds to ``train_step_<config>`` (see the module docstring)."""
    suffix = ""
    if args.compile:
        suffix += f"_compiled-{args.compile}" + ("-both" if args.compile_peft else "")
    if args.virtual_token_layout != "auto":
        suffix += f"_{args.virtual_token_layout}-layout"
    if implementation != harness.default_implementation(device):
        suffix += f"_{implementation}-implementation"
    if set(args.methods) != set(METHODS):
        suffix += "".join("_" + METHODS[label]().method.replace("_", "-") for label in METHODS if label in args.methods)
    return suffix


def main() -> None:
    """Runs the benchmark for the configs and methods on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=None, choices=list(STEP_CONFIGS),
                        help="default: cpu on CPU, gpu-16x64 and gpu-8x512 on CUDA")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS),
                        help="default: all three")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each library first")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps of each library")
    parser.add_argument("--implementation", default=None, help="compute_loss implementation (default: by device)")
    parser.add_argument("--virtual-token-layout", default="auto", choices=["auto", "prefix", "sequence"],
                        help="compute_loss's virtual_token_layout (prompt tuning, p-tuning); auto: the library's choice")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="torch.compile softprompt's decoder passes with this mode (e.g. reduce-overhead, "
                             "default); PEFT's step as well with --compile-peft")
    parser.add_argument("--compile-peft", action="store_true", help="with --compile: compile PEFT's forward too")
    parser.add_argument("--wait-idle", type=float, default=60.0,
                        help="CPU: wait up to this many seconds for other processes to go quiet before each method")
    args = parser.parse_args()
    command = "python " + shlex.join(sys.argv)

    config_names = args.configs or (["gpu-16x64", "gpu-8x512"] if torch.cuda.is_available() else ["cpu"])
    for config_name in config_names:
        setup = STEP_CONFIGS[config_name]
        device = torch.device(setup["device"])
        sync = harness.default_sync(device)
        implementation = args.implementation or harness.default_implementation(device)
        machine = harness.machine_info(device)
        peak_gflops = harness.matmul_peak_gflops(device, torch.float32 if device.type == "cpu" else setup["dtype"])
        print(f"== {config_name}: GEMM peak {peak_gflops:.0f} GFLOP/s; load {machine['load_average_before']}",
              flush=True)

        base = harness.build_random_model(setup["model"], setup["num_layers"], setup["dtype"], device, seed=0)
        batch = harness.prepare_batch(setup, base.config.vocab_size, device)
        num_token_slots = batch["input_ids"].numel()

        rows = []
        for method in args.methods:
            our_config = METHODS[method]()
            steps, layout = harness.training_steps(base, our_config, batch, implementation, args.virtual_token_layout,
                                           args.compile, args.compile_peft)
            if device.type == "cpu":
                harness.wait_until_idle(max_wait_s=args.wait_idle)
            first_losses = {name: step() for name, step in steps.items()}  # also the first warm-up step
            ops = {name: harness.ops_per_call(step) for name, step in steps.items()}  # a second warm-up step
            timings = harness.time_alternating(steps, max(args.warmup - 1, 0), args.repeats, sync)
            memory = {}
            for name, step in steps.items():
                gc.collect()
                memory[name] = harness.measure_peak_memory(step, device)
            flops = required_flops(base, batch, our_config.num_virtual_tokens, our_config.method)
            print(f"{method}: first-step loss softprompt {first_losses['softprompt']:.5f} "
                  f"PEFT {first_losses['PEFT']:.5f}", flush=True)
            for name in ("softprompt", "PEFT"):
                timing = timings[name]
                row = {
                    "method": method,
                    "library": name,
                    "layout": layout if name == "softprompt" else "sequence",
                    "ops/step": ops[name],
                    "ops vs PEFT": ops[name] / ops["PEFT"],
                    "step s (median)": timing.median,
                    "spread s": timing.spread,
                    "tokens/s": num_token_slots / timing.median,
                    "speedup vs PEFT": timings["PEFT"].median / timing.median,
                    "peak MiB": memory[name] / 2**20,
                    "memory vs PEFT": memory[name] / memory["PEFT"],
                    "required GFLOP": flops / 1e9,
                    "% of matmul peak": 100 * flops / timing.median / (peak_gflops * 1e9),
                    "samples s": [round(s, 4) for s in timing.samples],
                    "first-step loss": first_losses[name],
                }
                rows.append(row)
                print("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                                       if k not in ("method",)), flush=True)
            del steps
            gc.collect()

        columns = ["method", "library", "layout", "ops/step", "ops vs PEFT", "step s (median)", "spread s",
                   "tokens/s", "speedup vs PEFT", "peak MiB", "memory vs PEFT", "required GFLOP", "% of matmul peak"]
        table = harness.markdown_table(rows, columns)
        print(table)
        harness.write_results(
            f"train_step_{config_name}{results_suffix(args, implementation, device)}",
            rows,
            machine,
            table + f"\n\nMeasured GEMM peak: {peak_gflops:.0f} GFLOP/s "
            f"({'fp32' if device.type == 'cpu' else 'bf16'}). "
            f"Batch {setup['batch_size']} x {setup['num_tokens']}, {NUM_LABEL_TOKENS} label tokens per row, "
            f"{setup.get('label', setup['model'])} shape, {base.config.num_hidden_layers} layers, {str(setup['dtype']).removeprefix('torch.')}, "
            f"compute_loss implementation "
            f"'{implementation}', virtual-token layout '{args.virtual_token_layout}'; median of {args.repeats} "
            f"alternating steps after {args.warmup} warm-up step(s) of each library."
            + (f" softprompt's decoder passes compiled: torch.compile mode '{args.compile}'"
               + (", PEFT's forward too." if args.compile_peft else "; PEFT eager.") if args.compile else ""),
            extra={"config": {k: str(v) for k, v in setup.items()}, "matmul_peak_gflops": peak_gflops,
                   "implementation": implementation, "virtual_token_layout": args.virtual_token_layout,
                   "compile": args.compile, "compile_peft": args.compile_peft, "warmup": args.warmup,
                   "repeats": args.repeats},
            command=command,
        )
        del base
        gc.collect()


if __name__ == "__main__":
    main()
