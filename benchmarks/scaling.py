"""Training-step time as the virtual tokens, the sequence length and the batch grow: softprompt vs PEFT.

Command (from the repository root):

    python benchmarks/scaling.py --sweep cpu --repeats 2   # the committed scaling_cpu results
    python benchmarks/scaling.py                           # the "cpu" sweep on CPU, "gpu" when CUDA is available

Writes ``benchmarks/results/scaling_<sweep>.json`` / ``.md`` and ``scaling_<sweep>.png`` (three panels, log-log).

One training step (forward, backward, AdamW) of prompt tuning, and of prefix tuning in the virtual-token sweep,
timed like ``benchmarks/train_step.py`` (``harness.training_steps``: same base weights, same initial adapter
weights, same batch, the two libraries alternating; median of the repeats after one warm-up step each); 3 label
tokens at the end of each row. Each sweep varies one quantity from a base point:

- ``gpu``: the full bloomz-560m shape (24 layers, bf16), base point B 8, T 64, P 8; P in 1..200, T in 64..1024,
  B in 1..64.
- ``cpu``: two CPU cores cannot run that in minutes, so a narrower model with BLOOM's full vocabulary (the head is
  what PEFT pays for at every position): C 256, 2 layers, 4 heads, V 250880, fp32; base point B 4, T 64, P 8;
  P in 1..200, T in 64..1024 (at B 1), B in 1..16.
"""

from __future__ import annotations

import argparse
import gc
import shlex
import sys

import torch
from transformers import BloomConfig

import harness
import softprompt

SWEEPS = {
    "cpu": dict(
        device="cpu",
        model=BloomConfig(vocab_size=250880, hidden_size=256, n_layer=2, n_head=4, tie_word_embeddings=True),
        dtype=torch.float32,
        base=dict(batch_size=4, num_tokens=64, num_virtual=8),
        virtual=[1, 10, 50, 100, 200],
        tokens=([64, 128, 256, 512, 1024], 1),  # (lengths, batch size)
        batch=[1, 2, 4, 8, 16],
    ),
    "gpu": dict(
        device="cuda",
        model="560m",
        dtype=torch.bfloat16,
        base=dict(batch_size=8, num_tokens=64, num_virtual=8),
        virtual=[1, 10, 50, 100, 200],
        tokens=([64, 128, 256, 512, 1024], 8),
        batch=[1, 4, 16, 64],
    ),
}
CONFIG_CLASSES = {"prompt tuning": softprompt.PromptTuningConfig, "prefix tuning": softprompt.PrefixTuningConfig}


def time_point(base, method: str, batch_size: int, num_tokens: int, num_virtual: int, implementation: str,
               repeats: int) -> dict[str, float]:
    """Median step seconds of both libraries at one point."""
    device = base.device
    batch = harness.random_batch(batch_size, num_tokens, base.config.vocab_size, harness.NUM_LABEL_TOKENS,
                                 device=device)
    steps, _ = harness.training_steps(base, CONFIG_CLASSES[method](num_virtual_tokens=num_virtual), batch,
                                   implementation)
    timings = harness.time_alternating(steps, 1, repeats, harness.default_sync(device))
    del steps
    gc.collect()
    return {name: timing.median for name, timing in timings.items()}


def main() -> None:
    """Runs the sweep on the command line and writes its table and chart."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default=None, choices=sorted(SWEEPS), help="default: by device")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per library and point")
    args = parser.parse_args()

    sweep_name = args.sweep or ("gpu" if torch.cuda.is_available() else "cpu")
    sweep = SWEEPS[sweep_name]
    device = torch.device(sweep["device"])
    implementation = harness.default_implementation(device)
    machine = harness.machine_info(device)
    if device.type == "cpu":
        harness.wait_until_idle(max_wait_s=60)
    base = harness.build_random_bloom(sweep["model"], dtype=sweep["dtype"], device=device, seed=0)
    point = sweep["base"]
    lengths, length_batch = sweep["tokens"]
    # (axis, value, method, B, T, P)
    points = [("virtual tokens P", num_virtual, method, point["batch_size"], point["num_tokens"], num_virtual)
              for num_virtual in sweep["virtual"] for method in ("prompt tuning", "prefix tuning")]
    points += [("sequence length T", num_tokens, "prompt tuning", length_batch, num_tokens, point["num_virtual"])
               for num_tokens in lengths]
    points += [("batch B", batch_size, "prompt tuning", batch_size, point["num_tokens"], point["num_virtual"])
               for batch_size in sweep["batch"]]

    rows = []
    for axis, value, method, batch_size, num_tokens, num_virtual in points:
        seconds = time_point(base, method, batch_size, num_tokens, num_virtual, implementation, args.repeats)
        row = {"sweep": axis, "value": value, "method": method, "B": batch_size, "T": num_tokens, "P": num_virtual,
               "softprompt s": seconds["softprompt"], "PEFT s": seconds["PEFT"],
               "speedup": seconds["PEFT"] / seconds["softprompt"]}
        rows.append(row)
        print(", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)

    panels = []
    for axis, xlabel in (("virtual tokens P", "P"), ("sequence length T", "T"), ("batch B", "B")):
        series = {}
        for method in ("prompt tuning", "prefix tuning"):
            method_rows = [row for row in rows if row["sweep"] == axis and row["method"] == method]
            if method_rows:
                for library in ("softprompt", "PEFT"):
                    series[f"{library}, {method}"] = ([row["value"] for row in method_rows],
                                                      [row[f"{library} s"] for row in method_rows])
        panels.append(harness.Panel(f"step time vs {axis}", xlabel, "seconds per step", series, logx=True, logy=True))
    model_text = (f"C {base.config.hidden_size}, {base.config.n_layer} layers, V {base.config.vocab_size}, "
                  f"{str(sweep['dtype']).removeprefix('torch.')}")
    chart = harness.line_chart(harness.RESULTS_DIR / f"scaling_{sweep_name}.png", panels,
                               suptitle=f"training step, {model_text}, {machine['device']}")
    table = harness.markdown_table(rows)
    print(table)
    harness.write_results(
        f"scaling_{sweep_name}",
        rows,
        machine,
        table + f"\n\nModel: {model_text}; base point {point}; median of {args.repeats} alternating steps per "
        f"library. Chart: `{chart.name}`.",
        extra={"model": model_text, "base_point": point, "chart": chart.name},
        command="python " + shlex.join(sys.argv),
    )


if __name__ == "__main__":
    main()
