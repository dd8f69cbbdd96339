"""Trainable / all parameter counts: softprompt beside PEFT, every seed configuration on every BLOOM size and on a
real model of every other family.

Both libraries build the base model on the ``meta`` device (shapes, no storage, nothing downloaded), from the
configs softprompt knows offline, so a 7B model is counted in about a second. softprompt counts with
`SoftPromptModel.num_parameters` (through ``softprompt.params.parameter_counts``), PEFT with
``get_peft_model(...).get_nb_trainable_parameters()``; tied weights count once in both. One known difference is
reported, not hidden: PEFT sizes virtual tokens by the hidden size, so on opt-350m (512-wide word embeddings under a
1024 hidden size) its prompt-tuning and p-tuning counts are those of a table it cannot run; the ``PEFT, token_dim = C``
column gives PEFT's count with the embedding width set, which is what must equal ours. PEFT refuses adaption prompt
beyond Llama, Mistral and GPT-2: those rows say so and count ours only. Exits with status 1 if any other row
differs.

Command (from the repository root):

    python benchmarks/params.py

Writes ``benchmarks/results/params.json`` and ``benchmarks/results/params.md`` (``params_<sizes>`` with ``--sizes``
naming only some sizes).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from peft import get_peft_model

import harness
import peft_reference
from softprompt.families import FAMILIES, family_of
from softprompt.families.bloom import BLOOM_SHAPES, bloom_config
from softprompt.methods import method_of
from softprompt.params import SEED_CONFIGS, base_model_config, meta_base_model, parameter_counts

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--sizes", nargs="*", default=list(BLOOM_SHAPES), help="BLOOM sizes (default: all)")
parser.add_argument("--no-families", action="store_true", help="BLOOM sizes only")
args = parser.parse_args()

models = {f"bloom-{size}": bloom_config(*BLOOM_SHAPES[size]) for size in args.sizes}
if not args.no_families:
    models.update({name: base_model_config(name) for family in FAMILIES if family.name != "BLOOM"
                   for name in sorted(family.known_configs) if name != "openai-community/gpt2"})

machine = harness.machine_info("cpu")
rows = []
for model_name, base_config in models.items():
    ours = parameter_counts(base_config, SEED_CONFIGS)
    shape = family_of(base_config).shape(base_config)
    for count, config in zip(ours, SEED_CONFIGS.values()):
        row = {"model": model_name, "config": count.label, "softprompt trainable": count.trainable}
        refusal = peft_reference.peft_refusal(config, base_config.model_type)
        if refusal is not None:
            rows.append({**row, "softprompt all": count.total, "trainable %": count.trainable_percent,
                         "equal": f"PEFT refuses: {refusal}"})
            continue
        peft_default = get_peft_model(meta_base_model(base_config), peft_reference.peft_config_for(config))
        peft_trainable, peft_total = peft_default.get_nb_trainable_parameters()
        peft_config = peft_reference.peft_config_for(config)
        virtual_tokens = method_of(config).enters_as == "virtual_tokens"
        if virtual_tokens and shape.embedding_width != shape.hidden_size:
            peft_config.token_dim = shape.embedding_width  # what PEFT needs to run on narrow embeddings
        fixed = get_peft_model(meta_base_model(base_config), peft_config).get_nb_trainable_parameters()
        rows.append({**row, "PEFT trainable": peft_trainable, "PEFT, token_dim = C": fixed[0],
                     "softprompt all": count.total, "PEFT all": peft_total, "trainable %": count.trainable_percent,
                     "equal": (count.trainable, count.total) == fixed})

table = harness.markdown_table(rows)
print(table)
harness.write_results(
    "params" + ("" if args.sizes == list(BLOOM_SHAPES) and not args.no_families else "_" + "_".join(args.sizes)),
    rows,
    machine,
    table,
    command="python " + shlex.join(sys.argv),
    extra={"note": "bloom-X and bloomz-X share a shape; counts are of the meta-device models (no weights); "
                   "the other families' configs are their published config.json files, known offline."},
)
equal = [row for row in rows if row["equal"] is True]
unequal = [row for row in rows if row["equal"] is False]
refused = len(rows) - len(equal) - len(unequal)
print(f"\n{len(equal)}/{len(rows)} rows equal, {refused} refused by PEFT, {len(unequal)} different")
sys.exit(1 if unequal else 0)
