"""How an adapter enters the frozen model: what a method's ``enter`` function hands the engine.

Every method file ends with an ``enter(module, request)`` function that returns one of these, computed from the
adapter's trainable module for the rows that use it. The engine (`softprompt.routes`, `softprompt.training_loss`,
`softprompt.generation`) puts each kind through the model's public seams and never asks which method made it:

- `VirtualTokens`: ``[G, P, C]`` embeddings put in front of the rows' token embeddings (prompt tuning, p-tuning,
  multitask prompt tuning, CPT). G distinct prompts serve the R rows (one, except multitask's one per task).
- `KeyValues`: ``[L, K, P, D]`` keys and values every layer attends to before the text (prefix tuning, Cartridges).
- `AttentionPatch`: a term added inside the attention layers by module hooks for the duration of one call
  (adaption prompt). It takes no slots and shifts no position.

Shapes: R rows using the adapter, G distinct prompts, P virtual tokens or prefix slots, L layers, K key/value heads,
D head dim, C embedding width.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Union

import torch
from transformers import PreTrainedModel

from softprompt.families.family import BaseModelShape, Family

EntryKind = Literal["virtual_tokens", "key_values", "attention"]
"""What an adapter's `Entry` is, declared by its method before any entry is computed (the row layout needs it)."""


@dataclass(frozen=True)
class EntryRequest:
    """What a method's ``enter`` is told about the call."""

    rows: int
    """R, the rows of the batch that use the adapter."""
    task_ids: torch.Tensor | None
    """``[R]`` each of those rows' task id (multitask prompt tuning), or None when the caller gave none."""
    base_model: PreTrainedModel
    """The frozen base (its embeddings for init-free lookups, its attention modules for patches)."""
    family: Family
    """The base's family record (where its attention projections are)."""
    shape: BaseModelShape
    """The base's dimensions."""


@dataclass
class VirtualTokens:
    """Virtual-token embeddings in front of the token embeddings of the adapter's rows."""

    embeddings: torch.Tensor
    """``[G, P, C]``: G distinct prompts."""
    group_of_row: torch.Tensor | None = None
    """``[R]`` which prompt each row uses; None when G == 1 (every row uses the one prompt)."""
    targets: torch.Tensor | None = None
    """``[G, P]`` a label for each virtual token (-100 for none), scored like the text's labels: the position before
    a virtual token predicts it (CPT's in-context label tokens). None: the virtual tokens carry no loss."""
    weights: torch.Tensor | None = None
    """``[G, P]`` the weight of each virtual token's loss term (CPT's decay over examples); None: 1."""

    def rows_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[R, ...]`` a per-prompt ``[G, ...]`` tensor (embeddings, keys, hidden states) for each row."""
        if self.group_of_row is None:
            return tensor[0]
        return tensor[self.group_of_row]


@dataclass
class KeyValues:
    """Keys and values of P prefix slots in every layer, attended to before the text."""

    keys: torch.Tensor
    """``[L, K, P, D]``."""
    values: torch.Tensor
    """``[L, K, P, D]``."""


@dataclass
class AttentionPatch:
    """A term the adapter adds inside attention, installed for one call.

    ``install(rows)`` returns a context manager that registers the hooks and removes them on exit; `rows` holds
    the batch indices ``[R']`` of the adapter's rows as the model sees them (generation repeats each row once per
    beam or returned sequence, so R' may be a multiple of R).
    """

    install: Callable[[torch.Tensor], AbstractContextManager]


Entry = Union[VirtualTokens, KeyValues, AttentionPatch]
"""Any adapter's way into the model."""
