"""Where each row's adapter sits in a batch: one layout per call, built by the model and read by every route.

Every row of a batch may use its own adapter, of any method and length, or none (the base model alone). An
adapter of P_a virtual tokens or prefix slots occupies the last P_a of P slots in front of its row's text, P being
the longest adapter in the batch; the P - P_a slots before them are hidden by the attention mask. Hidden slots
receive no attention and shift no position (`softprompt.positions`), so each row computes what it computes alone.
Adapters that enter inside attention take no slot (``patched``).

Shapes: B batch, P slots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from softprompt.entries import EntryKind
from softprompt.loss import IGNORE_INDEX


@dataclass
class Slots:
    """The slots of one group of adapters: an adapter of P_a takes the last P_a of its rows' P slots."""

    length: int
    """P, the longest adapter of the group (0 when no row has one)."""
    rows: dict[str, list[int]]
    """Each adapter of the group and its rows, in the batch's order."""
    lengths: dict[str, int]
    """Each adapter's own length P_a."""
    batch_size: int
    """B."""

    @property
    def uniform(self) -> bool:
        """True when every row has the same adapter: its values broadcast over the batch, no placement needed."""
        return len(self.rows) == 1 and len(next(iter(self.rows.values()))) == self.batch_size

    def mask(self, device: torch.device, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """``[B, P]``: 1 on each row's own slots, 0 on hidden ones."""
        if self.uniform:
            return torch.ones(self.batch_size, self.length, dtype=dtype, device=device)
        mask = torch.zeros(self.batch_size, self.length, dtype=dtype, device=device)
        for name, rows in self.rows.items():
            # A device index built from a list makes the CPU wait for the GPU: only in mixed batches.
            mask[torch.tensor(rows, device=device), self.length - self.lengths[name] :] = 1
        return mask

    def place(self, values: Mapping[str, torch.Tensor], into: torch.Tensor, batch_dim: int, slot_dim: int) -> torch.Tensor:
        """Writes each adapter's values into its rows' last P_a slots of `into` (zeros elsewhere stay).

        Args:
            values: each adapter's values, shaped as `into` but with its R rows at `batch_dim` (or 1, broadcast to
                them) and P_a slots at `slot_dim`.
            into: the zero-filled batch tensor, with B at `batch_dim` and P at `slot_dim`.
            batch_dim: where B is in `into`.
            slot_dim: where P is in `into`.

        Returns:
            `into`, filled.
        """
        for name, rows in self.rows.items():
            index: list[slice | torch.Tensor] = [slice(None)] * into.dim()
            index[batch_dim] = torch.tensor(rows, device=into.device)
            index[slot_dim] = slice(self.length - self.lengths[name], None)
            into[tuple(index)] = values[name].to(into.dtype)
        return into


@dataclass
class RowLayout:
    """Every row's adapter and where it sits, for one batch."""

    names: list[str | None]
    """One adapter name per row; None for the base model alone."""
    in_sequence: Slots
    """Adapters whose virtual tokens enter the sequence (the sequence layout, `SoftPromptModel.forward`)."""
    in_cache: Slots
    """Adapters whose keys and values enter the cache (the sequence layout)."""
    as_prefix: Slots
    """Every slot-taking adapter as keys and values in the cache (the prefix layout: virtual tokens run once)."""
    patched: dict[str, list[int]]
    """Adapters that enter inside attention, and their rows."""
    first_token_scored: list[bool]
    """Per row: whether its first real token is scored. A causal LM scores token t + 1 from position t, so a row's
    first token is scored only when its adapter puts a virtual token in front of it."""

    @classmethod
    def of(cls, names: Sequence[str | None], lengths: Mapping[str, int], kinds: Mapping[str, EntryKind]) -> "RowLayout":
        """The layout of a batch.

        Args:
            names: one adapter name (or None) per row.
            lengths: each adapter's slots (virtual tokens or prefix positions; 0 for attention patches).
            kinds: each adapter's entry kind.
        """
        names = list(names)
        rows: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            if name is not None:
                rows.setdefault(name, []).append(row)

        def slots(group: set[str]) -> Slots:
            own = {name: rows[name] for name in rows if name in group}
            return Slots(max((lengths[name] for name in own), default=0), own,
                         {name: lengths[name] for name in own}, len(names))

        virtual = {name for name in rows if kinds[name] == "virtual_tokens"}
        key_values = {name for name in rows if kinds[name] == "key_values"}
        return cls(
            names=names,
            in_sequence=slots(virtual),
            in_cache=slots(key_values),
            as_prefix=slots(virtual | key_values),
            patched={name: rows[name] for name in rows if kinds[name] == "attention"},
            first_token_scored=[name in virtual for name in names],
        )

    @property
    def adapters(self) -> list[str]:
        """The adapters present, in order of their first row."""
        return list(dict.fromkeys(name for name in self.names if name is not None))

    def rows_of(self, name: str) -> list[int]:
        """The rows that use adapter `name`."""
        return [row for row, row_name in enumerate(self.names) if row_name == name]

    def first_token_mask(self, device: torch.device) -> torch.Tensor | None:
        """``[B]`` bool of `first_token_scored`, or None when every row scores its first token (no tensor is built:
        one built from a list makes the CPU wait for the GPU)."""
        if all(self.first_token_scored):
            return None
        return torch.tensor(self.first_token_scored, device=device)

    def labelled_positions(self, labels: torch.Tensor) -> torch.Tensor:
        """``[B]`` how many positions of each row carry a loss (the first token only where it is scored)."""
        scored = labels != IGNORE_INDEX  # [B, T]
        first = scored[:, 0]
        mask = self.first_token_mask(labels.device)
        if mask is not None:
            first = first & mask
        return scored[:, 1:].sum(dim=1) + first
