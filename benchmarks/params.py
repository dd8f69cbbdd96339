"""Trainable / all parameter counts: softprompt beside PEFT, every seed configuration on every BLOOM size.

Both libraries build the base model on the ``meta`` device (shapes, no storage, nothing downloaded), so bloom-7b1 is
counted in about a second. softprompt counts with `SoftPromptModel.num_parameters` (through
``softprompt.params.parameter_counts``), PEFT with ``get_peft_model(...).get_nb_trainable_parameters()``; tied
weights count once in both. Exits with status 1 if any row differs.

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
from softprompt.families.bloom import BLOOM_SHAPES, bloom_config
from softprompt.params import SEED_CONFIGS, meta_base_model, parameter_counts

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--sizes", nargs="*", default=list(BLOOM_SHAPES), help="BLOOM sizes (default: all)")
args = parser.parse_args()

machine = harness.machine_info("cpu")
rows = []
for size in args.sizes:
    base_config = bloom_config(*BLOOM_SHAPES[size])
    ours = parameter_counts(base_config, SEED_CONFIGS)
    for count, config in zip(ours, SEED_CONFIGS.values()):
        peft_trainable, peft_total = get_peft_model(
            meta_base_model(base_config), harness.peft_config_for(config)
        ).get_nb_trainable_parameters()
        rows.append(
            {
                "model": f"bloom-{size}",
                "config": count.label,
                "softprompt trainable": count.trainable,
                "PEFT trainable": peft_trainable,
                "softprompt all": count.total,
                "PEFT all": peft_total,
                "trainable %": count.trainable_percent,
                "equal": count.trainable == peft_trainable and count.total == peft_total,
            }
        )

table = harness.markdown_table(rows)
print(table)
harness.write_results(
    "params" + ("" if args.sizes == list(BLOOM_SHAPES) else "_" + "_".join(args.sizes)),
    rows,
    machine,
    table,
    command="python " + shlex.join(sys.argv),
    extra={"note": "bloom-X and bloomz-X share a shape; counts are of the meta-device models (no weights)."},
)
unequal = [row for row in rows if not row["equal"]]
print(f"\n{len(rows) - len(unequal)}/{len(rows)} rows equal")
sys.exit(1 if unequal else 0)
