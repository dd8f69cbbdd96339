"""Where each row's adapter sits in a batch: one layout built per batch, read by every injection route.

Every row of a batch may use its own adapter, of any method and length, or none (the base model alone). An
adapter of P_a virtual tokens or prefix positions occupies the last P_a of P slots in front of its row's text, P
being the longest adapter in the batch; the P - P_a slots before them are hidden by the attention mask. Hidden
slots receive no attention and shift no position (`softprompt.positions`), so each row computes what it computes
alone.

Two routes read the layout:

- the sequence route (`SoftPromptModel.forward`, PEFT's layout): virtual tokens in the sequence, ``in_sequence``
  slots, and prefix-tuning keys and values in the cache, ``in_cache`` slots;
- the prefix route (the training loss, generation): every adapter as keys and values in the cache, ``as_prefix``
  slots (virtual tokens come first and attention is causal, so their keys and values do not depend on the text).

The layout also holds the first-token rule: a causal LM scores token t + 1 from position t, so a row's first real
token is scored only when a virtual token comes before it in its own sequence.

Shapes: B batch, P slots.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from softprompt.methods.spec import EntrySeam

IGNORE_INDEX = -100
"""The label of a position without a loss."""


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
            values: each adapter's values, shaped as `into` without the batch dimension and with P_a slots.
            into: the zero-filled batch tensor, with B at `batch_dim` and P at `slot_dim`.
            batch_dim: where B is in `into`.
            slot_dim: where P is in `into` (counted in `into`).

        Returns:
            `into`, filled.
        """
        for name, rows in self.rows.items():
            index: list[slice | torch.Tensor] = [slice(None)] * into.dim()
            index[batch_dim] = torch.tensor(rows, device=into.device)
            index[slot_dim] = slice(self.length - self.lengths[name], None)
            into[tuple(index)] = values[name].unsqueeze(batch_dim).to(into.dtype)
        return into


@dataclass
class RowLayout:
    """Every row's adapter and where it sits, for one batch."""

    names: list[str | None]
    """One adapter name per row; None for the base model alone."""
    in_sequence: Slots
    """Adapters whose virtual tokens enter the sequence (sequence route)."""
    in_cache: Slots
    """Adapters whose keys and values enter the cache (sequence route)."""
    as_prefix: Slots
    """Every adapter, as keys and values in the cache (prefix route)."""
    first_token_scored: list[bool]
    """Per row: whether its first real token is scored, i.e. whether its adapter puts virtual tokens in front of
    it. Prefix tuning and the base model add no position before the text, so nothing scores its first token."""

    @classmethod
    def of(cls, names: Sequence[str | None], lengths: Mapping[str, int], seams: Mapping[str, EntrySeam]) -> "RowLayout":
        """The layout of a batch.

        Args:
            names: one adapter name (or None) per row.
            lengths: each adapter's number of virtual tokens or prefix positions.
            seams: each adapter's entry seam, ``embeddings`` or ``key_values``.
        """
        names = list(names)

        def slots(group: set[str | None]) -> Slots:
            rows: dict[str, list[int]] = {}
            for row, name in enumerate(names):
                if name is not None and name in group:
                    rows.setdefault(name, []).append(row)
            own = {name: lengths[name] for name in rows}
            return Slots(max(own.values(), default=0), rows, own, len(names))

        present = {name for name in names if name is not None}
        embeddings = {name for name in present if seams[name] == "embeddings"}
        return cls(
            names=names,
            in_sequence=slots(embeddings),
            in_cache=slots(present - embeddings),
            as_prefix=slots(present),
            first_token_scored=[name in embeddings for name in names],
        )

    def first_token_mask(self, device: torch.device) -> torch.Tensor | None:
        """``[B]`` bool of `first_token_scored`, or None when every row scores its first token (no tensor is built:
        one built from a list makes the CPU wait for the GPU)."""
        if all(self.first_token_scored):
            return None
        return torch.tensor(self.first_token_scored, device=device)


def without_padding_columns(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drops the leading and trailing columns that are padding in every row and whose loss terms are all -100.

    A column hidden in every row is a key no real token attends to, and it moves no position (positions count
    visible slots); what it computes matters only through the label it predicts. Column j predicts
    ``labels[:, j + 1]`` (``labels[:, 0]`` is predicted by the virtual tokens, which stay), so leading columns
    ``0..k-1`` go when ``labels[:, 1..k]`` are all -100, and trailing columns ``j..`` when ``labels[:, j..]`` are.

    Args:
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]``.
        labels: ``[B, T]``.

    Returns:
        The three ``[B, T']`` tensors (views), T' <= T.
    """
    num_tokens = input_ids.shape[1]
    real = (attention_mask != 0).any(dim=0)  # [T]
    scored = (labels != IGNORE_INDEX).any(dim=0)  # [T]
    if not bool(real.any()):
        return input_ids, attention_mask, labels
    real_columns = real.nonzero().flatten()
    scored_after_first = scored[1:].nonzero().flatten() + 1
    scored_columns = scored.nonzero().flatten()
    first_scored = int(scored_after_first[0]) if len(scored_after_first) else num_tokens
    start = min(int(real_columns[0]), first_scored - 1)
    stop = max(int(real_columns[-1]), int(scored_columns[-1]) if len(scored_columns) else -1) + 1
    if start == 0 and stop == num_tokens:
        return input_ids, attention_mask, labels
    return input_ids[:, start:stop], attention_mask[:, start:stop], labels[:, start:stop]


def check_new_adapter_name(adapter_name: object, loaded: Iterable[str]) -> None:
    """Checks that `adapter_name` can name one more adapter beside the `loaded` ones.

    Raises:
        ValueError: not a non-empty string without ``.`` (it becomes a module name), or already loaded.
    """
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(
            f"adapter_name={adapter_name!r}: expected a non-empty string without '.'. Fix: e.g. 'complaints'."
        )
    loaded = sorted(loaded)
    if adapter_name in loaded:
        raise ValueError(
            f"adapter_name={adapter_name!r} is already loaded (loaded: {loaded}). Fix: pick another name."
        )
