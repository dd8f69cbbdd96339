"""Memory of the frozen base's weights per process with ``--fsdp`` (FSDP2), measured on CPU with 1, 2 and 4
processes, and the largest bloomz / Llama shape that fits a per-device budget at N devices, worked out from it.

Command (from the repository root; it starts ``torchrun`` itself, once per process count):

    python benchmarks/fsdp_memory.py

Writes ``benchmarks/results/fsdp_memory_cpu.json`` and ``.md``.

What is measured, in each process of ``torchrun --nproc_per_node N`` (gloo, one thread each), on two shapes scaled
down to run on a laptop CPU (fp32, 8 layers, C 1024, V 32768): a Llama (grouped-query attention, untied head) and
a BLOOM (tied head):

- at rest: the bytes of the base's weights the process holds, i.e. its shards (``DTensor.to_local()``); with N = 1,
  the whole base without FSDP, as every process holds it without ``--fsdp``;
- during one training step (prompt tuning, forward and backward, batch 1 x 8 tokens, so that activations are a
  few MB): the peak of the bytes allocated by the step, from torch's own CPU allocator through the profiler's memory
  events (exact, not sampled), in two phases: while the root group (embeddings, head, norms) is gathered, before
  the first layer's gather; and from there to the end of the backward pass. What FSDP gathers, plus the
  activations: the activations alone are the same step's peak on the whole base (N = 1, nothing gathered),
  subtracted from the second phase.

FSDP2 gathers a group into a flat all-gather buffer and copies it out into the group's weights, so a group is
twice in memory while it is gathered; the root stays whole for the call (`softprompt.training.fsdp`); in the
backward pass the next layer is gathered while the current one works. So the peak is
``base / N + max(r x root, root + c x layer)``, with r and c measured here (r = 2, c about 3): the ``model``
column applies it to the measured shapes, then to the published ones (counted on the meta device) in bf16
(2 bytes per weight), against a stated budget for the base's weights per device.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import torch
from transformers import BloomConfig, LlamaConfig

MEASURED_SHAPES = {
    "Llama (untied head)": LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                       num_attention_heads=16, num_key_value_heads=4, vocab_size=32768,
                                       tie_word_embeddings=False),
    "BLOOM (tied head)": BloomConfig(hidden_size=1024, n_layer=8, n_head=16, vocab_size=32768),
}
"""Small enough that 4 processes each build one whole before sharding it (about 0.6 GB in fp32)."""

PUBLISHED_SHAPES = {
    "bigscience/bloomz-560m": BloomConfig(hidden_size=1024, n_layer=24, n_head=16, vocab_size=250880),
    "bigscience/bloomz-1b7": BloomConfig(hidden_size=2048, n_layer=24, n_head=16, vocab_size=250880),
    "bigscience/bloomz-3b": BloomConfig(hidden_size=2560, n_layer=30, n_head=32, vocab_size=250880),
    "bigscience/bloomz-7b1": BloomConfig(hidden_size=4096, n_layer=30, n_head=32, vocab_size=250880),
    "bigscience/bloomz (176B)": BloomConfig(hidden_size=14336, n_layer=70, n_head=112, vocab_size=250880),
    "meta-llama/Llama-2-7b-hf": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                            num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "meta-llama/Llama-2-13b-hf": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                             num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "meta-llama/Llama-2-70b-hf": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                             num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "meta-llama/Meta-Llama-3-8B": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                              num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "meta-llama/Meta-Llama-3-70B": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                               num_attention_heads=64, num_key_value_heads=8, vocab_size=128256),
    "meta-llama/Llama-3.1-405B": LlamaConfig(hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                                             num_attention_heads=128, num_key_value_heads=8, vocab_size=128256),
}
"""From the models' published ``config.json`` (the fields that set the parameter count)."""

PROCESS_COUNTS = (1, 2, 4)
PROJECTED_COUNTS = (1, 2, 4, 8, 16, 32)
BUDGET_GIB = 60.0
"""The stated per-device budget for the base's weights: an 80 GB H100 less 20 GiB for activations, the adapters,
the CUDA context and the allocator's slack."""


def parts(config) -> dict[str, int]:
    """Parameter counts of a base: ``layer`` (one decoder layer), ``root`` (everything outside the layers, tied
    weights once), ``base`` (all), counted on the meta device."""
    from softprompt.params import meta_base_model
    from softprompt.training.fsdp import decoder_layers

    model = meta_base_model(config)
    layers = decoder_layers(model, config.num_hidden_layers)
    base = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    in_layers = sum(p.numel() for layer in layers for p in layer.parameters())
    return {"layer": in_layers // len(layers), "root": base - in_layers, "base": base}


def model_bytes(counts: dict[str, int], processes: int, bytes_per_weight: int, root_factor: float,
                layer_factor: float) -> int:
    """The peak bytes of the base's weights per process, ``base / N + max(r x root, root + c x layer)`` (module
    docstring); one process holds the whole base without FSDP."""
    if processes == 1:
        return counts["base"] * bytes_per_weight
    gathered = max(root_factor * counts["root"], counts["root"] + layer_factor * counts["layer"])
    return round(bytes_per_weight * (-(-counts["base"] // processes) + gathered))


def worker(output: Path) -> None:
    """One process of ``torchrun``: measures each shape, writes ``<shape index>-<rank>.json``."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from softprompt import PromptTuningConfig, SoftPromptModel
    from softprompt.training.fsdp import process_mesh, shard_frozen_base

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    sharded = world_size > 1  # one process: the whole base, as without --fsdp
    for index, config in enumerate(MEASURED_SHAPES.values()):
        base = harness.build_random_model(config)
        model = SoftPromptModel(base, PromptTuningConfig(num_virtual_tokens=4))
        if sharded:
            shard_frozen_base(model, process_mesh(torch.device("cpu")))
        held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size()
                   for name, p in model.named_parameters() if not name.startswith("prompts."))
        input_ids = torch.randint(4, 1000, (1, 8), generator=torch.Generator().manual_seed(rank))
        labels = input_ids.masked_fill(torch.arange(8) < 6, -100)  # 2 labelled tokens

        training_step(model, input_ids, labels)  # FSDP's lazy initialization, first allocations
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
            training_step(model, input_ids, labels)
        with tempfile.TemporaryDirectory() as directory:
            trace = Path(directory) / "trace.json"
            profiler.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        # The root's events are FSDP::... without a module name; the first with one is a layer's gather.
        peaks, phase, total = [0, 0], 0, 0
        for event in sorted((e for e in events if "ts" in e), key=lambda e: float(e["ts"])):
            if event.get("name") == "[memory]":
                total = event["args"]["Total Allocated"]
                peaks[phase] = max(peaks[phase], total)
            elif event.get("name", "").startswith("FSDP::") and "(" in event["name"]:
                phase = 1
        name = f"{index}-{world_size}-{'fsdp' if sharded else 'whole'}-{rank}.json"
        (output / name).write_text(json.dumps({"held_bytes": held, "root_phase_peak_bytes": peaks[0],
                                               "layer_phase_peak_bytes": peaks[1]}))
        del model, base
    dist.destroy_process_group()


def training_step(model, input_ids: torch.Tensor, labels: torch.Tensor) -> None:
    """Forward and backward of the label-only loss (the sequence layout: one pass)."""
    model.zero_grad()
    model.summed_loss(input_ids, None, labels, virtual_token_layout="sequence")[0].backward()


def measure(processes: int, output: Path) -> None:
    """Runs `worker` in `processes` processes (``torchrun``)."""
    completed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
         __file__, "--worker", str(output)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
    )
    if completed.returncode != 0:
        sys.exit(completed.stderr[-4000:])


def main() -> None:
    machine = harness.machine_info("cpu")
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        output = Path(directory)
        for processes in PROCESS_COUNTS:
            measure(processes, output)
        for index, (shape, config) in enumerate(MEASURED_SHAPES.items()):
            counts = parts(config)
            whole = json.loads((output / f"{index}-1-whole-0.json").read_text())
            activations = max(whole["root_phase_peak_bytes"], whole["layer_phase_peak_bytes"])
            for processes in PROCESS_COUNTS:
                for rank in range(processes):
                    kind = "whole" if processes == 1 else "fsdp"
                    found = json.loads((output / f"{index}-{processes}-{kind}-{rank}.json").read_text())
                    root_phase = found["root_phase_peak_bytes"] if processes > 1 else 0
                    layer_phase = found["layer_phase_peak_bytes"] - activations if processes > 1 else 0
                    rows.append({
                        "shape": shape, "processes": processes, "rank": rank, "counts": counts,
                        "base_MiB": round(counts["base"] * 4 / 2**20, 1),
                        "root_MiB": round(counts["root"] * 4 / 2**20, 1),
                        "layer_MiB": round(counts["layer"] * 4 / 2**20, 1),
                        "held_at_rest_MiB": round(found["held_bytes"] / 2**20, 1),
                        "held_over_base": round(found["held_bytes"] / (counts["base"] * 4), 4),
                        "root_phase_MiB": round(root_phase / 2**20, 1),
                        "layer_phase_MiB": round(layer_phase / 2**20, 1),
                        "r": round(root_phase / (counts["root"] * 4), 3) if processes > 1 else None,
                        "c": round((layer_phase - counts["root"] * 4) / (counts["layer"] * 4), 3)
                        if processes > 1 else None,
                        "peak_weights_MiB": round((found["held_bytes"] + max(root_phase, layer_phase)) / 2**20, 1),
                    })
    elapsed = time.perf_counter() - started
    root_factor = max(row["r"] for row in rows if row["r"] is not None)
    layer_factor = max(row["c"] for row in rows if row["c"] is not None)
    for row in rows:
        predicted = model_bytes(row.pop("counts"), row["processes"], 4, root_factor, layer_factor)
        row["model_MiB"] = round(predicted / 2**20, 1)
        row["measured_over_model"] = round(row["peak_weights_MiB"] / row["model_MiB"], 3)

    projections = []
    for name, config in PUBLISHED_SHAPES.items():
        counts = parts(config)
        row = {"model": name, "parameters_B": round(counts["base"] / 1e9, 2),
               "layer_GiB": round(counts["layer"] * 2 / 2**30, 2), "root_GiB": round(counts["root"] * 2 / 2**30, 2)}
        for processes in PROJECTED_COUNTS:
            row[f"N={processes} GiB"] = round(model_bytes(counts, processes, 2, root_factor, layer_factor) / 2**30, 1)
        projections.append(row)
    largest = []
    for processes in PROJECTED_COUNTS:
        entry = {"devices": processes}
        for family in ("bloomz", "Llama"):
            fitting = [row for row in projections
                       if family.lower() in row["model"].lower() and row[f"N={processes} GiB"] <= BUDGET_GIB]
            largest_fitting = max(fitting, key=lambda row: row["parameters_B"]) if fitting else {"model": "none"}
            entry[f"largest {family}"] = largest_fitting["model"]
        largest.append(entry)

    command = "python " + " ".join(shlex.quote(argument) for argument in sys.argv)
    table = "\n\n".join([
        ("Measured (fp32, CPU, gloo; MiB per process): `held_at_rest` = the process's shards of the base (N = 1: "
         "the whole base, no FSDP); `root_phase` = the step's allocations while the root group is gathered; "
         "`layer_phase` = the step's allocations from the first layer's gather to the end of the backward, less "
         "the activations (the same step's peak on the whole base); `r` = root_phase / root, `c` = (layer_phase - "
         "root) / layer; `peak_weights` = held_at_rest + the larger phase:"),
        harness.markdown_table(rows),
        (f"Projected peak of the base's weights per device in bf16 (GiB; N = 1: the whole base, no FSDP); model "
         f"`base / N + max({root_factor:g} x root, root + {layer_factor:g} x layer)` with the largest r and c "
         "measured above:"),
        harness.markdown_table(projections),
        (f"Largest published shape whose weights fit {BUDGET_GIB:g} GiB per device (an 80 GB H100 less 20 GiB for "
         "activations, adapters, the CUDA context and the allocator):"),
        harness.markdown_table(largest),
        f"Measurement wall time: {elapsed:.0f} s (3 torchrun launches, 7 processes in all, on this machine).",
    ])
    harness.write_results("fsdp_memory_cpu", rows, machine, table,
                          extra={"projections": projections, "largest": largest, "budget_gib": BUDGET_GIB,
                                 "root_factor": root_factor, "layer_factor": layer_factor,
                                 "wall_seconds": round(elapsed, 1)},
                          command=command)
    print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.worker is not None:
        worker(arguments.worker)
    else:
        main()
