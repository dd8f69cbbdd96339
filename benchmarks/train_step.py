"""One full training step (forward, backward, AdamW step), softprompt vs PEFT, for each of the three methods.

Command (from the repository root):

    python benchmarks/train_step.py                      # CPU: the "cpu" config; CUDA: "gpu-16x64" and "gpu-8x512"
    python benchmarks/train_step.py --configs cpu-padded  # the seed recipe's fixed-length padding (see below)

Writes ``benchmarks/results/train_step_<config>.json`` / ``.md`` (one table per config, with the machine).

Configs (random weights of the bloomz-560m shape: C 1024, H 16, V 250880; 3 label tokens at the end of each row):

- ``cpu``: cut to 4 layers, fp32, batch 8 x 64 tokens, every row full (no padding to skip).
- ``cpu-padded``: as ``cpu``, but rows of 16..40 real tokens left-padded to 64, as the seed recipe pads to
  ``max_length=64``; shows what dropping all-padding columns is worth.
- ``gpu-16x64`` / ``gpu-8x512``: all 24 layers, bf16 weights (both libraries; prompt parameters stay fp32), batch
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
import os

import peft
import torch
from peft import TaskType, get_peft_model

import harness
import softprompt
from softprompt import SoftPromptModel

CONFIGS = {
    "cpu": dict(device="cpu", num_layers=4, dtype=torch.float32, batch_size=8, num_tokens=64, min_tokens=None),
    "cpu-padded": dict(device="cpu", num_layers=4, dtype=torch.float32, batch_size=8, num_tokens=64, min_tokens=16,
                       max_tokens=40),
    "gpu-16x64": dict(device="cuda", num_layers=None, dtype=torch.bfloat16, batch_size=16, num_tokens=64,
                      min_tokens=None),
    "gpu-8x512": dict(device="cuda", num_layers=None, dtype=torch.bfloat16, batch_size=8, num_tokens=512,
                      min_tokens=None),
}
NUM_LABEL_TOKENS = 3

METHODS = {
    "prompt tuning (8)": (
        softprompt.PromptTuningConfig(num_virtual_tokens=8),
        peft.PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=8),
    ),
    "p-tuning MLP (20, h=128)": (
        softprompt.PromptEncoderConfig(num_virtual_tokens=20, encoder_hidden_size=128),
        peft.PromptEncoderConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20, encoder_hidden_size=128),
    ),
    "prefix tuning (20)": (
        softprompt.PrefixTuningConfig(num_virtual_tokens=20),
        peft.PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=20),
    ),
}


def required_flops(config, batch: dict, num_virtual: int, method: str) -> float:
    """The matrix-product FLOPs of one training step that no implementation can avoid (see the module docstring)."""
    hidden, layers, vocab = config.hidden_size, config.n_layer, config.vocab_size
    lengths = batch["attention_mask"].sum(dim=1).tolist()  # real tokens per row
    linear_per_position = 2 * 12 * hidden * hidden * layers  # QKV 3C^2, dense C^2, MLP 8C^2
    positions = sum(lengths) + (num_virtual if method != "prefix tuning (20)" else 0)
    # Attention, per query: scores and context, 2 * 2 * C FLOPs per visible key (keys = prefix + earlier tokens).
    attention = sum(4 * hidden * layers * sum(num_virtual + k + 1 for k in range(n)) for n in lengths)
    attention += 4 * hidden * layers * sum(k + 1 for k in range(num_virtual)) if method != "prefix tuning (20)" else 0
    # Column 0's label is predicted only by a last virtual token (prompt tuning, p-tuning).
    labels = batch["labels"] if method != "prefix tuning (20)" else batch["labels"][:, 1:]
    num_labels = int((labels != -100).sum())
    head = 2 * num_labels * hidden * vocab
    return 2 * linear_per_position * positions + 3 * attention + 2 * head


def prepare_batch(setup: dict, vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The config's batch: random ids, left-padded, the last NUM_LABEL_TOKENS real tokens of each row labelled."""
    batch = harness.random_batch(
        setup["batch_size"], setup["num_tokens"], vocab_size, NUM_LABEL_TOKENS,
        min_tokens=setup["min_tokens"], device=device, seed=0,
    )
    if setup.get("max_tokens"):  # rows of min..max real tokens in a batch padded to num_tokens
        keep = setup["num_tokens"] - setup["max_tokens"]
        batch["attention_mask"][:, :keep] = 0
        batch["input_ids"][:, :keep] = 3
        batch["labels"][:, :keep] = -100
    return batch


def main() -> None:
    """Runs the benchmark for the configs and methods on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=None, help=f"of {sorted(CONFIGS)}; default: by device")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="default: all three")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each library first")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps of each library")
    parser.add_argument("--implementation", default=None, help="compute_loss implementation (default: by device)")
    parser.add_argument("--virtual-token-layout", default="prefix", choices=["prefix", "sequence"],
                        help="compute_loss's virtual_token_layout (prompt tuning, p-tuning)")
    parser.add_argument("--compile", default=None, metavar="MODE",
                        help="torch.compile softprompt's decoder passes with this mode (e.g. reduce-overhead, "
                             "default); PEFT's step as well with --compile-peft")
    parser.add_argument("--compile-peft", action="store_true", help="with --compile: compile PEFT's forward too")
    parser.add_argument("--wait-idle", type=float, default=60.0,
                        help="CPU: wait up to this many seconds for other processes to go quiet before each method")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    config_names = args.configs or (["gpu-16x64", "gpu-8x512"] if cuda else ["cpu"])

    for config_name in config_names:
        setup = CONFIGS[config_name]
        device = torch.device(setup["device"])
        sync = harness.default_sync(device)
        implementation = args.implementation or ("triton" if device.type == "cuda" else "torch")
        machine = harness.machine_info(device)
        machine["load_average_before"] = os.getloadavg()
        peak_gflops = harness.matmul_peak_gflops(device, torch.float32 if device.type == "cpu" else setup["dtype"])
        print(f"== {config_name}: GEMM peak {peak_gflops:.0f} GFLOP/s; load {machine['load_average_before']}",
              flush=True)

        base = harness.build_random_bloom("560m", setup["num_layers"], setup["dtype"], device, seed=0)
        batch = prepare_batch(setup, base.config.vocab_size, device)
        num_token_slots = batch["input_ids"].numel()

        rows = []
        for method in args.methods:
            our_config, peft_config = METHODS[method]
            torch.manual_seed(0)
            ours = SoftPromptModel(base, our_config)
            theirs = get_peft_model(base, peft_config)
            # The same initial adapter weights (PEFT's state-dict names are ours under prompt_encoder.default.).
            state = {f"prompt_encoder.default.{k}": v for k, v in ours.prompts["default"].state_dict().items()}
            theirs.load_state_dict(state, strict=False)
            if args.compile:
                ours.compile_decoder(mode=args.compile, dynamic=False)
                if args.compile_peft:
                    theirs.forward = torch.compile(theirs.forward, mode=args.compile, dynamic=False)
            our_optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-3)
            their_optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-3)

            def our_step() -> float:
                if args.compile:
                    torch.compiler.cudagraph_mark_step_begin()  # a new step: earlier graph outputs are dead
                our_optimizer.zero_grad(set_to_none=True)
                loss = ours.compute_loss(**batch, implementation=implementation,
                                         virtual_token_layout=args.virtual_token_layout)
                loss.backward()
                our_optimizer.step()
                return loss.item()

            def their_step() -> float:
                if args.compile_peft:
                    torch.compiler.cudagraph_mark_step_begin()
                their_optimizer.zero_grad(set_to_none=True)
                loss = theirs(**batch).loss
                loss.backward()
                their_optimizer.step()
                return loss.item()

            if device.type == "cpu":
                harness.wait_until_idle(max_wait_s=args.wait_idle)
            first_losses = (our_step(), their_step())  # also the first warm-up step
            timings = harness.time_alternating(
                {"softprompt": our_step, "PEFT": their_step}, max(args.warmup - 1, 0), args.repeats, sync
            )
            memory = {}
            for name, step in (("softprompt", our_step), ("PEFT", their_step)):
                gc.collect()
                memory[name] = harness.measure_peak_memory(step, device)
            flops = required_flops(base.config, batch, our_config.num_virtual_tokens, method)
            print(f"{method}: first-step loss softprompt {first_losses[0]:.5f} PEFT {first_losses[1]:.5f}", flush=True)
            for name in ("softprompt", "PEFT"):
                timing = timings[name]
                row = {
                    "method": method,
                    "library": name,
                    "step s (median)": timing.median,
                    "spread s": timing.spread,
                    "tokens/s": num_token_slots / timing.median,
                    "speedup vs PEFT": timings["PEFT"].median / timing.median,
                    "peak MiB": memory[name] / 2**20,
                    "memory vs PEFT": memory[name] / memory["PEFT"],
                    "required GFLOP": flops / 1e9,
                    "% of matmul peak": 100 * flops / timing.median / (peak_gflops * 1e9),
                    "samples s": [round(s, 4) for s in timing.samples],
                    "first-step loss": first_losses[0 if name == "softprompt" else 1],
                }
                rows.append(row)
                print("  " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
                                       if k not in ("method",)), flush=True)
            del ours, theirs, our_optimizer, their_optimizer
            gc.collect()

        machine["load_average_after"] = os.getloadavg()
        columns = ["method", "library", "step s (median)", "spread s", "tokens/s", "speedup vs PEFT", "peak MiB",
                   "memory vs PEFT", "required GFLOP", "% of matmul peak"]
        table = harness.markdown_table(rows, columns)
        print(table)
        command = f"python benchmarks/train_step.py --configs {config_name} --repeats {args.repeats}"
        suffix = ""
        if args.compile:
            command += f" --compile {args.compile}" + (" --compile-peft" if args.compile_peft else "")
            suffix = f"_compiled-{args.compile}" + ("-both" if args.compile_peft else "")
        if args.virtual_token_layout != "prefix":
            command += f" --virtual-token-layout {args.virtual_token_layout}"
            suffix += f"_{args.virtual_token_layout}-layout"
        harness.write_results(
            f"train_step_{config_name}{suffix}",
            rows,
            machine,
            table + f"\n\nMeasured GEMM peak: {peak_gflops:.0f} GFLOP/s "
            f"({'fp32' if device.type == 'cpu' else 'bf16'}). "
            f"Batch {setup['batch_size']} x {setup['num_tokens']}, {NUM_LABEL_TOKENS} label tokens per row, "
            f"{base.config.n_layer} layers, {str(setup['dtype']).removeprefix('torch.')}, compute_loss implementation "
            f"'{implementation}'."
            + (f" softprompt's decoder passes compiled: torch.compile mode '{args.compile}'"
               + (", PEFT's forward too." if args.compile_peft else "; PEFT eager.") if args.compile else ""),
            extra={"config": {k: str(v) for k, v in setup.items()}, "matmul_peak_gflops": peak_gflops,
                   "implementation": implementation, "compile": args.compile,
                   "compile_peft": args.compile_peft},
            command=command,
        )
        del base
        gc.collect()


if __name__ == "__main__":
    main()
