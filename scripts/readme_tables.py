"""The README's tables that restate the package's own records, generated from them so they cannot drift.

- the methods (from ``softprompt/methods/``: each `MethodSpec`'s paper, what it trains, where it enters the model,
  and its trainable parameters on two bases, counted on the meta device for its first configuration in
  `softprompt.params.SEED_CONFIGS`);
- the output of ``softprompt params`` on bloomz-560m (what the command prints, from the same counts);
- the supported families (from ``softprompt/families/``: name, ``model_type``, the real models known offline, how
  positions reach the model, what supporting the family took).

Run ``python scripts/readme_tables.py`` to rewrite them in README.md (between their marker comments);
``tests/test_readme.py`` checks that README.md holds exactly what this script writes.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from softprompt.families import FAMILIES, family_of
from softprompt.methods import METHODS, SoftPromptConfig, method_of
from softprompt.params import SEED_CONFIGS, base_model_config, counts_text, parameter_counts

README = Path(__file__).resolve().parents[1] / "README.md"
COUNTED_ON = ("bigscience/bloomz-560m", "meta-llama/Llama-3.2-1B")
"""The bases of the methods table's counts: the reference model, and a grouped-query model PEFT runs every method on."""
PARAMS_EXAMPLE_MODEL = "bigscience/bloomz-560m"
ENTERS = {
    "virtual_tokens": "input embeddings: P virtual tokens in front of the text",
    "key_values": "key/value cache: P positions in every layer",
    "attention": "inside attention: a gated term in the adapted layers, no position",
}
"""How each kind of `softprompt.entries.Entry` reaches the model, in the README's words."""


def counted_configs() -> dict[str, tuple[str, SoftPromptConfig]]:
    """Each method's name -> its first ``(label, config)`` in `SEED_CONFIGS`: what the methods table counts.

    Raises:
        ValueError: a method has no configuration there.
    """
    configs = {}
    for spec in METHODS.values():
        labelled = [(label, config) for label, config in SEED_CONFIGS.items() if method_of(config) is spec]
        if not labelled:
            raise ValueError(f"method {spec.name!r} has no configuration in softprompt.params.SEED_CONFIGS. "
                             "Fix: add one (softprompt params prints it, the methods table counts it).")
        configs[spec.name] = labelled[0]
    return configs


def model_column(name: str) -> str:
    """A count column's header: the base and the shape letters its counts depend on."""
    config = base_model_config(name)
    shape = family_of(config).shape(config)
    heads = (f"K = H = {shape.num_heads}" if shape.num_key_value_heads == shape.num_heads
             else f"K = {shape.num_key_value_heads} of H = {shape.num_heads}")
    return f"{name.split('/')[-1]} (C {shape.embedding_width}, L {shape.num_layers}, {heads}, D {shape.head_dim})"


def method_rows() -> list[dict[str, str]]:
    """The methods table's rows, column header -> cell, one per method in the registry's order."""
    configs = counted_configs()
    counts = {name: parameter_counts(base_model_config(name), dict(configs.values())) for name in COUNTED_ON}
    rows = []
    for index, spec in enumerate(METHODS.values()):
        path = spec.config_class.__module__.replace(".", "/") + ".py"
        row = {
            "method": f"[`{spec.cli_name}`]({path})",
            "paper": f"{spec.paper.authors} ({spec.paper.year}), [arXiv:{spec.paper.arxiv}]({spec.paper.url})",
            "what trains": spec.trains,
            "enters through": ENTERS[spec.enters_as],
            "counted as": configs[spec.name][0],
        }
        for name in COUNTED_ON:
            row[model_column(name)] = f"{counts[name][index].trainable:,d}"
        rows.append(row)
    return rows


def methods_table() -> str:
    """The Markdown table of the methods, one row per `MethodSpec`."""
    rows = method_rows()
    lines = ["| " + " | ".join(rows[0]) + " |", "| " + " | ".join("---" for _ in rows[0]) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row.values()) + " |" for row in rows])


def params_example() -> str:
    """``softprompt params`` on bloomz-560m as a fenced block: the command and what it prints."""
    text = counts_text(PARAMS_EXAMPLE_MODEL, parameter_counts(base_model_config(PARAMS_EXAMPLE_MODEL), SEED_CONFIGS))
    return f"```\n$ softprompt params --model {PARAMS_EXAMPLE_MODEL}\n{text}\n```"


def families_table() -> str:
    """The Markdown table of the supported families, one row per `Family` record."""
    rows = ["| family | `model_type` | known offline (`softprompt params`) | positions | what it needed |",
            "| --- | --- | --- | --- | --- |"]
    for family in FAMILIES:
        names = sorted(family.known_configs)
        known = ", ".join(names) if len(names) <= 2 else f"{names[0]} ... {names[-1]} ({len(names)} models)"
        source = "from the mask" if family.positions == "attention_mask" else "`position_ids`"
        types = ", ".join(f"`{model_type}`" for model_type in family.model_types)
        rows.append(f"| {family.name} | {types} | {known} | {family.position_encoding}, {source} | {family.needed} |")
    return "\n".join(rows)


GENERATED: dict[str, Callable[[], str]] = {
    "methods table": methods_table,
    "params example": params_example,
    "families table": families_table,
}
"""Each generated block by its markers' name: between ``<!-- NAME: scripts/readme_tables.py -->`` and
``<!-- end of NAME -->``."""


def with_tables(readme: str) -> str:
    """`readme` with every generated block replaced by what the records say now.

    Raises:
        ValueError: a block's markers are missing.
    """
    for name, render in GENERATED.items():
        start, end = f"<!-- {name}: scripts/readme_tables.py -->", f"<!-- end of {name} -->"
        pattern = re.compile(re.escape(start) + r"\n(?:.*?\n)?" + re.escape(end), re.S)  # empty at first
        if not pattern.search(readme):
            raise ValueError(f"README.md: the markers {start!r} ... {end!r} are missing. Fix: put them around the "
                             f"place of the {name}.")
        block = render()
        readme = pattern.sub(lambda _: f"{start}\n{block}\n{end}", readme)
    return readme


if __name__ == "__main__":
    text = README.read_text()
    updated = with_tables(text)
    if updated != text:
        README.write_text(updated)
    print("README.md tables " + ("rewritten" if updated != text else "already current"), file=sys.stderr)
