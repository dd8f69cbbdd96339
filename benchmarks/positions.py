"""Left padding and positions: how far each library's row of a left-padded batch is from the same row alone.

softprompt gives a row's real tokens positions P, P + 1, ... whatever its left padding (``softprompt/positions.py``);
PEFT's training forward gives them ``arange(T) + P``, its padding counted, for every family whose positions do not
come from the attention mask (rotary families, GPT-2). This script measures the consequence on a tiny random model
of each family: for prompt tuning (P = 4) and prefix tuning (P = 3), rows of 3 to 7 tokens left-padded to 7, the
largest absolute difference of any real position's logits between the padded row and the row alone, unpadded.

Command (from the repository root):

    python benchmarks/positions.py

Writes ``benchmarks/results/positions_cpu.json`` and ``.md``.
"""

from __future__ import annotations

import shlex
import sys

import torch

import harness
import peft_reference
import softprompt
from softprompt.families import FAMILIES
from softprompt.quickstart import build_tiny_model

VOCAB_SIZE, PAD_ID, LENGTHS = 300, 3, [7, 5, 3]
METHODS = {
    "prompt tuning (4)": lambda: softprompt.PromptTuningConfig(num_virtual_tokens=4),
    "prefix tuning (3)": lambda: softprompt.PrefixTuningConfig(num_virtual_tokens=3),
}

generator = torch.Generator().manual_seed(0)
width = max(LENGTHS)
input_ids = torch.full((len(LENGTHS), width), PAD_ID)
attention_mask = torch.zeros(len(LENGTHS), width, dtype=torch.long)
for row, n in enumerate(LENGTHS):
    input_ids[row, width - n :] = torch.randint(4, VOCAB_SIZE, (n,), generator=generator)
    attention_mask[row, width - n :] = 1

rows = []
for family in FAMILIES:
    for model_type in family.model_types:
        base = build_tiny_model(model_type, VOCAB_SIZE, seed=0)
        for label, make_config in METHODS.items():
            torch.manual_seed(1)
            ours = softprompt.SoftPromptModel(base, make_config())
            prefix = isinstance(ours.active_config, softprompt.PrefixTuningConfig)
            theirs = peft_reference.peft_twin(ours, base)  # OPT's narrow embeddings: token_dim set, as PEFT needs
            offset = 0 if prefix else ours.active_config.num_virtual_tokens
            worst = {"softprompt": 0.0, "PEFT": 0.0}
            with torch.no_grad():
                padded = {"softprompt": ours(input_ids, attention_mask).logits,
                          "PEFT": theirs(input_ids=input_ids, attention_mask=attention_mask).logits[:, offset:]}
                for row, n in enumerate(LENGTHS):
                    alone_ids = input_ids[row : row + 1, width - n :]
                    alone = {"softprompt": ours(alone_ids).logits[0],
                             "PEFT": theirs(input_ids=alone_ids).logits[0, offset:]}
                    for library in worst:
                        difference = (padded[library][row, width - n :] - alone[library]).abs().max().item()
                        worst[library] = max(worst[library], difference)
            rows.append({"family": family.name, "model_type": model_type, "method": label,
                         "positions": family.positions, "softprompt max |diff|": worst["softprompt"],
                         "PEFT max |diff|": worst["PEFT"]})
            print(rows[-1], flush=True)

table = harness.markdown_table(rows)
print(table)
harness.write_results(
    "positions_cpu", rows, harness.machine_info("cpu"),
    table + "\n\nLargest |logit difference| over the real positions of rows of 3, 5 and 7 tokens left-padded to 7, "
    "against each row alone; tiny random models (softprompt.quickstart.build_tiny_model), fp32. PEFT's "
    "training forward; its generate is broken on this transformers (see the README).",
    command="python " + shlex.join(sys.argv),
)
