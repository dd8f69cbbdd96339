"""Serving many soft prompts: softprompt's one mixed batch against PEFT's switch-per-adapter loop (issue 5).

N adapters of mixed methods (prompt tuning, p-tuning MLP/LSTM, prefix tuning plain/projected) on one frozen base,
M prompts spread round-robin over them, K new tokens each, greedy:

- softprompt: one call, ``model.generate(input_ids, attention_mask, adapter_names=[one name per prompt])``.
- PEFT: a PeftModel holds one adapter type only ("Cannot combine adapters with different peft types"), so there is
  one PeftModel per method family (prompt tuning, p-tuning, prefix tuning), all wrapping the SAME base object (one
  copy of the weights). Each adapter is exported by softprompt (``save_peft_adapter``) and loaded with PEFT's
  ``PeftModel.from_pretrained`` / ``load_adapter``: the same weights. The loop is what a PEFT user writes:
  ``set_adapter(name)``, then ``generate`` on that adapter's prompts (left-padded to their own longest).

Both sides generate the same new ids (checked per prompt and recorded; random weights give near-uniform logits, so a
rare rounding tie may flip a token). Tokens/s = M * K / wall time, median of alternating repeats. The N sweep keeps M
fixed: PEFT's cost grows with the number of generate calls, ours only with the longest prefix. The median is the
figure; the fastest repeat of each side is recorded too, since other load on a shared machine only adds time.

Config (the issue's CPU benchmark): bloomz-560m shape cut to 4 layers (C 1024, H 16, V 250880), random weights,
fp32, 64 prompts of 8 to 32 tokens, 20 new tokens, N in 1, 2, 4, 8. Run from the repository root (about 10 minutes
on an idle 2-core CPU):

    python benchmarks/serve.py

Results: benchmarks/results/serve_cpu.{json,md,png}.

Shapes: B batch, T tokens, P virtual tokens, C hidden, V vocab.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import PeftModel

import harness
import softprompt
from softprompt import SoftPromptModel
from softprompt.routes import prefix_for_rows

NUM_LAYERS = 4
NUM_PROMPTS = 64  # M
NEW_TOKENS = 20  # K
ADAPTER_COUNTS = [1, 2, 4, 8]  # N
MIN_TOKENS, MAX_TOKENS = 8, 32
WARMUP, REPEATS = 0, 3  # the same-ids pass before the timing is the warm-up of both sides
# Mixed methods and lengths; the first N are used. Ordered so that N = 2 already mixes two methods and N = 4 all
# three families.
ADAPTERS = {
    "prompt-8": softprompt.PromptTuningConfig(num_virtual_tokens=8),
    "prefix-20": softprompt.PrefixTuningConfig(num_virtual_tokens=20),
    "p-mlp-20": softprompt.PromptEncoderConfig(num_virtual_tokens=20, encoder_hidden_size=128),
    "prefix-proj-10": softprompt.PrefixTuningConfig(
        num_virtual_tokens=10, prefix_projection=True, encoder_hidden_size=128
    ),
    "p-lstm-20": softprompt.PromptEncoderConfig(
        num_virtual_tokens=20, encoder_hidden_size=128, encoder_reparameterization_type="LSTM"
    ),
    "prompt-16": softprompt.PromptTuningConfig(num_virtual_tokens=16),
    "prefix-8": softprompt.PrefixTuningConfig(num_virtual_tokens=8),
    "p-mlp-12": softprompt.PromptEncoderConfig(num_virtual_tokens=12, encoder_hidden_size=128),
}
GREEDY = dict(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=3)  # no EOS: all K tokens

machine = harness.machine_info("cpu")
torch.manual_seed(0)
base = harness.build_random_bloom("560m", num_layers=NUM_LAYERS)
names = list(ADAPTERS)
model = SoftPromptModel(base, ADAPTERS[names[0]], adapter_name=names[0])
for name in names[1:]:
    model.add_adapter(name, ADAPTERS[name])
model.eval()

# PEFT: one PeftModel per method family on the same base object, each adapter loaded from softprompt's PEFT export.
export_dir = Path(tempfile.mkdtemp(prefix="serve_peft_"))
peft_models: dict[str, PeftModel] = {}
peft_model_of: dict[str, PeftModel] = {}
for name in names:
    model.save_pretrained(export_dir, selected_adapters=[name], format="peft")  # export_dir/<name> (not "default")
    family = ADAPTERS[name].method
    if family not in peft_models:
        peft_models[family] = PeftModel.from_pretrained(base, export_dir / name, adapter_name=name).eval()
    else:
        peft_models[family].load_adapter(export_dir / name, adapter_name=name)
    peft_model_of[name] = peft_models[family]

batch = harness.random_batch(NUM_PROMPTS, MAX_TOKENS, base.config.vocab_size, None, min_tokens=MIN_TOKENS, seed=1)
input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # [M, T], left-padded


def softprompt_generate(row_names: list[str]) -> torch.Tensor:
    """All M prompts in one mixed batch; returns the new ids ``[M, K]``."""
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, adapter_names=row_names, **GREEDY)
    return output[:, input_ids.shape[1] :]


def peft_generate(row_names: list[str]) -> torch.Tensor:
    """PEFT's loop: per adapter, set_adapter then generate its prompts (padded to their own longest)."""
    new_ids = torch.empty(NUM_PROMPTS, NEW_TOKENS, dtype=torch.long)
    for name in dict.fromkeys(row_names):
        rows = [row for row, n in enumerate(row_names) if n == name]
        mask = attention_mask[rows]
        width = int(mask.sum(dim=1).max())  # drop the columns that are padding in every one of these rows
        peft_model = peft_model_of[name]
        peft_model.set_adapter(name)
        output = peft_model.generate(input_ids=input_ids[rows, -width:], attention_mask=mask[:, -width:], **GREEDY)
        new_ids[rows] = output[:, width:]
    return new_ids


rows = []
for num_adapters in ADAPTER_COUNTS:
    row_names = [names[row % num_adapters] for row in range(NUM_PROMPTS)]
    same_ids = (softprompt_generate(row_names) == peft_generate(row_names)).all(dim=1).float().mean().item()
    start = time.perf_counter()
    with torch.no_grad():
        layout = model.row_layout(NUM_PROMPTS, row_names)
        prefix_for_rows(model.frozen, layout.as_prefix, model._entries(layout, None), torch.float32)
    prefix_seconds = time.perf_counter() - start
    timings = harness.time_alternating(
        {"softprompt": lambda: softprompt_generate(row_names), "peft": lambda: peft_generate(row_names)},
        warmup=WARMUP,
        repeats=REPEATS,
    )
    new_tokens = NUM_PROMPTS * NEW_TOKENS
    rows.append(
        {
            "adapters": num_adapters,
            "methods": len({ADAPTERS[n].method for n in row_names}),
            "prompts": NUM_PROMPTS,
            "new_tokens": NEW_TOKENS,
            "softprompt_s": timings["softprompt"].median,
            "softprompt_spread_s": timings["softprompt"].spread,
            "softprompt_prefix_s": prefix_seconds,
            "peft_s": timings["peft"].median,
            "peft_spread_s": timings["peft"].spread,
            "peft_generate_calls": num_adapters,
            "softprompt_tokens_per_s": new_tokens / timings["softprompt"].median,
            "peft_tokens_per_s": new_tokens / timings["peft"].median,
            "speedup": timings["peft"].median / timings["softprompt"].median,
            # Other load on a shared machine only ever adds time: the fastest repeats are the least disturbed.
            "softprompt_min_s": min(timings["softprompt"].samples),
            "peft_min_s": min(timings["peft"].samples),
            "speedup_of_min": min(timings["peft"].samples) / min(timings["softprompt"].samples),
            "same_ids": same_ids,
        }
    )
    print(harness.markdown_table(rows[-1:]), flush=True)

command = "python " + shlex.join(sys.argv)
columns = [
    "adapters", "methods", "prompts", "new_tokens", "softprompt_s", "softprompt_prefix_s", "peft_s",
    "softprompt_tokens_per_s", "peft_tokens_per_s", "speedup", "speedup_of_min", "same_ids",
]
harness.write_results(
    "serve_cpu",
    rows,
    machine,
    harness.markdown_table(rows, columns),
    extra={
        "config": {
            "base": f"bloomz-560m shape, first {NUM_LAYERS} layers, random weights, fp32",
            "adapters": {name: f"{type(config).__name__}({config})" for name, config in ADAPTERS.items()},
            "prompt_tokens": [MIN_TOKENS, MAX_TOKENS],
            "warmup": WARMUP,
            "repeats": REPEATS,
            "peft": "one PeftModel per method family on the same base object; set_adapter + generate per adapter",
        }
    },
    command=command,
)
counts = [row["adapters"] for row in rows]
harness.line_chart(
    harness.RESULTS_DIR / "serve_cpu.png",
    [
        harness.Panel(
            "Throughput, M=64 prompts x K=20 tokens",
            "adapters N",
            "new tokens / s",
            {
                "softprompt (one mixed batch)": (counts, [row["softprompt_tokens_per_s"] for row in rows]),
                "PEFT (set_adapter + generate per adapter)": (counts, [row["peft_tokens_per_s"] for row in rows]),
            },
            logx=True,
        ),
        harness.Panel(
            "Wall time",
            "adapters N",
            "seconds",
            {
                "softprompt": (counts, [row["softprompt_s"] for row in rows]),
                "PEFT": (counts, [row["peft_s"] for row in rows]),
            },
            logx=True,
        ),
    ],
    suptitle="Serving many soft prompts (bloomz-560m shape, 4 layers, CPU fp32)",
)
