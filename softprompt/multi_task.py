"""Training several soft-prompt adapters at once, one per task, in the same batches.

Every row of a batch names its task; each task maps to one adapter of a `SoftPromptModel`, and the model runs every
row with its own adapter (``adapter_names``, one name per row). An adapter's parameters enter only the rows that
name it, so its gradient comes only from those rows: training N adapters on mixed batches is training each one on
its own rows, with one forward and one backward pass per batch instead of N.

What the loss averages over decides in which sense "the same as training alone" holds:

- ``"adapter_mean"`` (the default): each adapter's gradient is the gradient of the mean loss over its own labelled
  positions, which is what a batch holding only its rows would give under the usual mean loss, whatever else the
  batch holds. The returned value is the batch's mean loss (for logging).
- ``"sum"``: the summed loss over every labelled position; each adapter's gradient is the summed gradient of its
  rows, exactly as with a batch of its own rows under a summed loss.
- ``"mean"``: the plain mean over all labelled positions of the batch (`SoftPromptModel.compute_loss`); an
  adapter's gradient is then scaled by its share of the batch's labelled positions, a share that changes from
  batch to batch.

A training step::

    names = adapter_names_for_tasks(batch["task"], task_to_adapter)
    loss = multi_adapter_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], names)
    loss.backward()
    optimizer.step()  # over make_trainable(model, task_to_adapter.values())

Gradient clipping must then be done per adapter (``clip_grad_norm_`` on each adapter's parameters): one global norm
would let one task's gradients shrink another's update.

Shapes: B batch, T tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import nn

from softprompt.loss import LossImplementation
from softprompt.model import SoftPromptModel
from softprompt.training_loss import VirtualTokenLayout

Reduction = Literal["adapter_mean", "sum", "mean"]
REDUCTIONS: tuple[str, ...] = ("adapter_mean", "sum", "mean")


def adapter_names_for_tasks(
    tasks: Sequence[str], task_to_adapter: Mapping[str, str | None] | None = None
) -> list[str | None]:
    """The adapter name of every row of a batch, from the row's task.

    Args:
        tasks: one task per row (e.g. ``batch["task"]`` from ``softprompt.data.collate``).
        task_to_adapter: task -> adapter name (None: the base model alone for that task). When None, every task
            is the name of its adapter.

    Returns:
        One adapter name (or None) per row, for ``adapter_names=``.

    Raises:
        ValueError: ``tasks`` is a single string, or a task is missing from ``task_to_adapter``.
    """
    if isinstance(tasks, str):
        raise ValueError(
            f"tasks={tasks!r}: expected one task per row (a list), got a single string. Fix: pass batch['task']."
        )
    if task_to_adapter is None:
        return list(tasks)
    unknown = sorted({task for task in tasks if task not in task_to_adapter})
    if unknown:
        raise ValueError(
            f"Task(s) {unknown} have no adapter: task_to_adapter knows {sorted(task_to_adapter)}. "
            "Fix: add them to the mapping, or drop their rows."
        )
    return [task_to_adapter[task] for task in tasks]


def make_trainable(model: SoftPromptModel, adapter_names: Iterable[str | None]) -> list[nn.Parameter]:
    """Makes the named adapters trainable together and freezes every other adapter.

    `SoftPromptModel.set_adapter` trains one adapter and freezes the rest (PEFT's rule); training several at once
    needs all of them trainable. The base model stays frozen.

    Args:
        adapter_names: the adapters to train; None entries (base-model rows) are skipped.

    Returns:
        Their trainable parameters (not CPT's frozen context embeddings), in adapter order, for the optimizer.

    Raises:
        ValueError: a name is not loaded (the message lists the loaded ones).
    """
    names = list(dict.fromkeys(name for name in adapter_names if name is not None))
    model.check_adapter_names(names)
    for name, module in model.prompts.items():
        module.requires_grad_(name in names)
    return [parameter for name in names for parameter in model.prompts[name].parameters() if parameter.requires_grad]


def labelled_positions(
    model: SoftPromptModel, labels: torch.Tensor, adapter_names: Sequence[str | None],
    task_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """How many positions of each row carry a loss, ``[B]`` (`SoftPromptModel.labelled_positions`).

    A causal LM scores token t + 1 from position t, so a row's first real token is scored only when something
    comes before it: the last virtual token of a virtual-token method. Prefix tuning and the base model add no
    position, so their first token is never scored. A CPT row also counts its context's label tokens.

    Raises:
        ValueError: ``adapter_names`` does not have one entry per row, or names an adapter that is not loaded.
    """
    return model.labelled_positions(labels, adapter_names, task_ids)


def multi_adapter_loss(
    model: SoftPromptModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    adapter_names: Sequence[str | None],
    reduction: Reduction = "adapter_mean",
    implementation: LossImplementation = "torch",
    virtual_token_layout: VirtualTokenLayout = "auto",
    task_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss of a batch whose rows use different adapters, in one forward pass
    (`SoftPromptModel.compute_loss` with a `reduction`; see the module docstring for the three); ``task_ids [B]``
    gives the rows of multitask adapters their tasks.

    Raises:
        ValueError: an unknown reduction, or an adapter name that is not loaded.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {REDUCTIONS}. Fix: pass one of those.")
    return model.compute_loss(input_ids, attention_mask, labels, adapter_names, implementation, virtual_token_layout,
                              reduction=reduction, task_ids=task_ids)


__all__ = [
    "REDUCTIONS",
    "Reduction",
    "adapter_names_for_tasks",
    "labelled_positions",
    "make_trainable",
    "multi_adapter_loss",
]
