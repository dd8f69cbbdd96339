"""The README's tables that restate the package's own records, generated from them so they cannot drift.

- the supported families (from ``softprompt/families/``: name, ``model_type``, the real models known offline, how
  positions reach the model, what supporting the family took).

Run ``python scripts/readme_tables.py`` to rewrite them in README.md (between their marker comments);
``tests/test_readme.py`` checks that README.md holds exactly what this script writes.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from softprompt.families import FAMILIES

README = Path(__file__).resolve().parents[1] / "README.md"
FAMILIES_MARKERS = ("<!-- families table: scripts/readme_tables.py -->", "<!-- end of families table -->")


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


def with_tables(readme: str) -> str:
    """`readme` with every generated table replaced by what the records say now.

    Raises:
        ValueError: a table's markers are missing.
    """
    start, end = FAMILIES_MARKERS
    pattern = re.compile(re.escape(start) + r"\n.*?\n" + re.escape(end), re.S)
    if not pattern.search(readme):
        raise ValueError(f"README.md: the markers {start!r} ... {end!r} are missing.")
    return pattern.sub(lambda _: f"{start}\n{families_table()}\n{end}", readme)


if __name__ == "__main__":
    text = README.read_text()
    updated = with_tables(text)
    if updated != text:
        README.write_text(updated)
    print("README.md tables " + ("rewritten" if updated != text else "already current"), file=sys.stderr)
