"""The LM head's skinny product on CPU, alone and in a greedy decoding step: ``h @ W.T`` against ``W @ h.T`` forms.

Command (from the repository root):

    python benchmarks/head_product.py --repeats 10

Writes ``benchmarks/results/head_product_cpu.json`` / ``.md``.

At every decoding step the LM head multiplies R rows ``h [R, C]`` by BLOOM's head weight ``W [V, C]`` (C 1024,
V 250880: bloomz-560m's, fp32, random values). Three forms of the same product, under ``torch.no_grad``:

- ``h @ W.T``: ``torch.nn.functional.linear(h, W)``, what ``nn.Linear`` (transformers' ``lm_head``) computes.
- ``(W @ h.T).T view``: ``torch.mm(W, h.t()).t()``, the weight as the left BLAS operand, returned as a transposed
  view (softprompt's ``generate`` did this until the blockwise form).
- ``blockwise (W @ h.T).T``: ``softprompt.generation.HeadWithWeightOnTheLeft``, what softprompt's ``generate`` uses on
  CPU: the weight on the left, block by block into contiguous ``[R, V]`` logits.

Each is timed alone ("product") and followed by what transformers' greedy search does with the logits ("greedy
step": a float32 copy that keeps the strides, then the argmax over the vocabulary), since a transposed view makes
those slow. The forms alternate, repeat by repeat, after warm-up calls; the median is reported, with the spread
(max - min), the rate (2 R C V FLOPs per product) and two speedups over ``h @ W.T`` of the same kind: the ratio of
the medians, and the median of the per-repeat ratios (repeat i of one form runs right after repeat i of the
others, so a burst of other load on a shared machine slows both of a pair and cancels in their ratio).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys

import torch

import harness
from softprompt.families.bloom import BLOOM_SHAPES, BLOOM_VOCAB_SIZE
from softprompt.generation import HeadWithWeightOnTheLeft

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--rows", type=int, nargs="*", default=[8, 64], help="R, rows per product")
parser.add_argument("--warmup", type=int, default=2, help="untimed calls of each form first")
parser.add_argument("--repeats", type=int, default=10, help="timed calls of each form")
args = parser.parse_args()

machine = harness.machine_info("cpu")
hidden, vocab = BLOOM_SHAPES["560m"][0], BLOOM_VOCAB_SIZE
generator = torch.Generator().manual_seed(0)
weight = torch.randn(vocab, hidden, generator=generator)  # W [V, C]
lm_head = torch.nn.Linear(hidden, vocab, bias=False)
lm_head.weight = torch.nn.Parameter(weight, requires_grad=False)  # shares W
blockwise_head = HeadWithWeightOnTheLeft(lm_head)

FORMS = {
    "h @ W.T": lambda h: torch.nn.functional.linear(h, weight),
    "(W @ h.T).T view": lambda h: torch.mm(weight, h.t()).t(),
    "blockwise (W @ h.T).T": lambda h: blockwise_head(h),
}


def greedy_step(logits: torch.Tensor) -> torch.Tensor:
    """What transformers' greedy search does with the last position's logits: an fp32 copy, then the argmax."""
    return logits.to(copy=True, dtype=torch.float32).argmax(dim=-1)


harness.wait_until_idle(max_wait_s=60)  # a shared machine: start when the other processes are quiet
rows = []
with torch.no_grad():
    for num_rows in args.rows:
        hidden_states = torch.randn(num_rows, hidden, generator=generator)  # h [R, C]
        expected = greedy_step(FORMS["h @ W.T"](hidden_states))
        for name, form in FORMS.items():  # the same ids from every form, or the timing compares different work
            assert torch.equal(greedy_step(form(hidden_states)), expected), name
        steps = {}
        for name, form in FORMS.items():
            steps[("product", name)] = lambda h=hidden_states, form=form: form(h)
            steps[("greedy step", name)] = lambda h=hidden_states, form=form: greedy_step(form(h))
        timings = harness.time_alternating(steps, args.warmup, args.repeats)
        flops = 2 * num_rows * hidden * vocab
        for (kind, name), timing in timings.items():
            reference = timings[(kind, "h @ W.T")]
            rows.append({
                "rows R": num_rows,
                "timed": kind,
                "form": name,
                "median s": timing.median,
                "spread s": timing.spread,
                "GFLOP/s": flops / timing.median / 1e9,
                "speedup vs h @ W.T": reference.median / timing.median,
                "paired speedup (median)": statistics.median(
                    r / s for r, s in zip(reference.samples, timing.samples)
                ),
                "samples s": [round(s, 4) for s in timing.samples],
            })
            print(harness.markdown_table(rows[-1:]), flush=True)

columns = ["rows R", "timed", "form", "median s", "spread s", "GFLOP/s", "speedup vs h @ W.T", "paired speedup (median)"]
table = harness.markdown_table(rows, columns)
print(table)
harness.write_results(
    "head_product_cpu",
    rows,
    machine,
    table + f"\n\nW [{vocab}, {hidden}] fp32, h [R, {hidden}] fp32, torch.no_grad; median of {args.repeats} "
    f"alternating calls after {args.warmup} warm-up call(s) of each; {torch.get_num_threads()} torch threads.",
    extra={"hidden_size": hidden, "vocab_size": vocab, "warmup": args.warmup, "repeats": args.repeats},
    command="python " + shlex.join(sys.argv),
)
