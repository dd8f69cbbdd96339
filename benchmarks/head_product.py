"""The LM head's skinny product on CPU: ``h @ W.T`` (``nn.Linear``) against ``(W @ h.T).T`` (softprompt's generate).

Command (from the repository root):

    python benchmarks/head_product.py --repeats 10

Writes ``benchmarks/results/head_product_cpu.json`` / ``.md``.

At every decoding step the LM head multiplies R rows ``h [R, C]`` by BLOOM's head weight ``W [V, C]`` (C 1024,
V 250880: bloomz-560m's, fp32, random values). Two layouts of the same product, under ``torch.no_grad``:

- ``h @ W.T``: ``torch.nn.functional.linear(h, W)``, what ``nn.Linear`` (transformers' ``lm_head``) computes.
- ``(W @ h.T).T``: ``torch.mm(W, h.t()).t()``, the weight as the left BLAS operand, what softprompt's ``generate``
  uses on CPU (``softprompt.model._HeadWithWeightOnTheLeft``). The result is a transposed view; only the product is
  timed.

The two alternate, repeat by repeat, after warm-up calls; the median is reported, with the spread (max - min), the
rate (2 R C V FLOPs per product) and two speedups over ``h @ W.T``: the ratio of the medians, and the median of
the per-repeat ratios (repeat i of one layout runs right after repeat i of the other, so a burst of other load on a
shared machine slows both of a pair and cancels in their ratio, while it can put the two medians in different
modes).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys

import torch

import harness
from softprompt.bloom_family import BLOOM_SHAPES, BLOOM_VOCAB_SIZE

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rows", type=int, nargs="*", default=[8, 64], help="R, rows per product")
parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each layout first")
parser.add_argument("--repeats", type=int, default=10, help="timed calls of each layout")
args = parser.parse_args()

machine = harness.machine_info("cpu")
hidden, vocab = BLOOM_SHAPES["560m"][0], BLOOM_VOCAB_SIZE
generator = torch.Generator().manual_seed(0)
weight = torch.randn(vocab, hidden, generator=generator)  # W [V, C]

harness.wait_until_idle(max_wait_s=60)  # a shared machine: start when the other processes are quiet
rows = []
with torch.no_grad():
    for num_rows in args.rows:
        hidden_states = torch.randn(num_rows, hidden, generator=generator)  # h [R, C]
        timings = harness.time_alternating(
            {
                "h @ W.T": lambda h=hidden_states: torch.nn.functional.linear(h, weight),
                "(W @ h.T).T": lambda h=hidden_states: torch.mm(weight, h.t()).t(),
            },
            args.warmup,
            args.repeats,
        )
        flops = 2 * num_rows * hidden * vocab
        reference = timings["h @ W.T"].samples
        for layout, timing in timings.items():
            rows.append({
                "rows R": num_rows,
                "layout": layout,
                "median s": timing.median,
                "spread s": timing.spread,
                "GFLOP/s": flops / timing.median / 1e9,
                "speedup vs h @ W.T": timings["h @ W.T"].median / timing.median,
                "paired speedup (median)": statistics.median(r / s for r, s in zip(reference, timing.samples)),
                "samples s": [round(s, 4) for s in timing.samples],
            })
            print(harness.markdown_table(rows[-1:]), flush=True)

columns = ["rows R", "layout", "median s", "spread s", "GFLOP/s", "speedup vs h @ W.T", "paired speedup (median)"]
table = harness.markdown_table(rows, columns)
print(table)
harness.write_results(
    "head_product_cpu",
    rows,
    machine,
    table + f"\n\nW [{vocab}, {hidden}] fp32, h [R, {hidden}] fp32, torch.no_grad; median of {args.repeats} "
    f"alternating calls after {args.warmup} warm-up call(s) of each layout; {torch.get_num_threads()} torch threads.",
    extra={"hidden_size": hidden, "vocab_size": vocab, "warmup": args.warmup, "repeats": args.repeats},
    command="python " + shlex.join(sys.argv),
)
