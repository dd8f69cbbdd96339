"""Training-step time as the virtual tokens, the sequence length and the batch grow: softprompt vs PEFT.

Command (from the repository root):

    python benchmarks/scaling.py            # the "cpu" sweep on CPU, the "gpu" sweep when CUDA is available

Writes ``benchmarks/results/scaling_<sweep>.json`` / ``.md`` and ``scaling_<sweep>.png`` (three panels, log-log).

One training step (forward, backward, AdamW) of prompt tuning, and of prefix tuning in the virtual-token sweep,
timed like ``benchmarks/train_step.py`` (same base weights, same batch, the two libraries alternating; median of
the repeats); 3 label tokens at the end of each row. Each sweep varies one quantity from a base point:

- ``gpu``: the full bloomz-560m shape (24 layers, bf16), base point B 8, T 64, P 8; P in 1..200, T in 64..1024,
  B in 1..64.
- ``cpu``: two CPU cores cannot run that in minutes, so a narrower model with BLOOM's full vocabulary (the head is
  what PEFT pays for at every position): C 256, 2 layers, 4 heads, V 250880, fp32; base point B 4, T 64, P 8;
  P in 1..200, T in 64..1024 (at B 1), B in 1..16.
"""

from __future__ import annotations

import argparse
import gc
import os

import peft
import torch
from peft import TaskType, get_peft_model
from transformers import BloomConfig

import harness
import softprompt
from softprompt import SoftPromptModel

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
NUM_LABEL_TOKENS = 3


def configs(method: str, num_virtual: int):
    """softprompt's and PEFT's configuration of a method."""
    if method == "prompt tuning":
        return (
            softprompt.PromptTuningConfig(num_virtual_tokens=num_virtual),
            peft.PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual),
        )
    return (
        softprompt.PrefixTuningConfig(num_virtual_tokens=num_virtual),
        peft.PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=num_virtual),
    )


def time_point(base, method: str, batch_size: int, num_tokens: int, num_virtual: int) -> dict[str, float]:
    """Median step seconds of both libraries at one point."""
    our_config, peft_config = configs(method, num_virtual)
    torch.manual_seed(0)
    ours = SoftPromptModel(base, our_config)
    theirs = get_peft_model(base, peft_config)
    batch = harness.random_batch(batch_size, num_tokens, base.config.vocab_size, NUM_LABEL_TOKENS, device=device)
    our_optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad])
    their_optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad])

    def our_step() -> None:
        our_optimizer.zero_grad(set_to_none=True)
        ours.compute_loss(**batch, implementation=implementation).backward()
        our_optimizer.step()

    def their_step() -> None:
        their_optimizer.zero_grad(set_to_none=True)
        theirs(**batch).loss.backward()
        their_optimizer.step()

    timings = harness.time_alternating({"softprompt": our_step, "PEFT": their_step}, 1, args.repeats, sync)
    del ours, theirs
    gc.collect()
    return {name: timing.median for name, timing in timings.items()}


parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--sweep", default=None, choices=sorted(SWEEPS), help="default: by device")
parser.add_argument("--repeats", type=int, default=2, help="timed steps per library and point")
args = parser.parse_args()

sweep_name = args.sweep or ("gpu" if torch.cuda.is_available() else "cpu")
sweep = SWEEPS[sweep_name]
device = torch.device(sweep["device"])
sync = harness.default_sync(device)
implementation = "triton" if device.type == "cuda" else "torch"
machine = harness.machine_info(device)
machine["load_average_before"] = os.getloadavg()
if device.type == "cpu":
    harness.wait_until_idle(max_wait_s=60)
base = harness.build_random_bloom(sweep["model"], dtype=sweep["dtype"], device=device, seed=0)
point = sweep["base"]

rows = []


def record(axis: str, value: int, method: str, batch_size: int, num_tokens: int, num_virtual: int) -> None:
    seconds = time_point(base, method, batch_size, num_tokens, num_virtual)
    row = {"sweep": axis, "value": value, "method": method, "B": batch_size, "T": num_tokens, "P": num_virtual,
           "softprompt s": seconds["softprompt"], "PEFT s": seconds["PEFT"],
           "speedup": seconds["PEFT"] / seconds["softprompt"]}
    rows.append(row)
    print(", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)


for num_virtual in sweep["virtual"]:
    for method in ("prompt tuning", "prefix tuning"):
        record("virtual tokens P", num_virtual, method, point["batch_size"], point["num_tokens"], num_virtual)
lengths, length_batch = sweep["tokens"]
for num_tokens in lengths:
    record("sequence length T", num_tokens, "prompt tuning", length_batch, num_tokens, point["num_virtual"])
for batch_size in sweep["batch"]:
    record("batch B", batch_size, "prompt tuning", batch_size, point["num_tokens"], point["num_virtual"])
machine["load_average_after"] = os.getloadavg()

panels = []
for axis, xlabel in (("virtual tokens P", "P"), ("sequence length T", "T"), ("batch B", "B")):
    series = {}
    for method in ("prompt tuning", "prefix tuning"):
        points = [row for row in rows if row["sweep"] == axis and row["method"] == method]
        if points:
            for library in ("softprompt", "PEFT"):
                series[f"{library}, {method}"] = ([p["value"] for p in points], [p[f"{library} s"] for p in points])
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
    table + f"\n\nModel: {model_text}; base point {point}; median of {args.repeats} alternating steps per library. "
    f"Chart: `{chart.name}`.",
    extra={"model": model_text, "base_point": point, "chart": chart.name},
    command=f"python benchmarks/scaling.py --sweep {sweep_name} --repeats {args.repeats}",
)
