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
from contextlib import contextmanager
from typing import Iterator, Literal

import torch
from torch import nn

from softprompt.loss import IGNORE_INDEX, LossImplementation
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
        Their parameters, in adapter order, for the optimizer.

    Raises:
        ValueError: a name is not loaded (the message lists the loaded ones).
    """
    names = list(dict.fromkeys(name for name in adapter_names if name is not None))
    model.check_adapter_names(names)
    for name, module in model.prompts.items():
        module.requires_grad_(name in names)
    return [parameter for name in names for parameter in model.prompts[name].parameters()]


def labelled_positions(
    model: SoftPromptModel, labels: torch.Tensor, adapter_names: Sequence[str | None]
) -> torch.Tensor:
    """How many positions of each row carry a loss, ``[B]``.

    A causal LM scores token t + 1 from position t, so a row's first real token is scored only when something
    comes before it: the last virtual token of prompt tuning and p-tuning. Prefix tuning and the base model add no
    position, so their first token is never scored.

    Args:
        labels: ``[B, T]``, -100 where no loss is wanted.
        adapter_names: one name (or None) per row.

    Raises:
        ValueError: ``adapter_names`` does not have one entry per row, or names an adapter that is not loaded.
    """
    if isinstance(adapter_names, str) or len(adapter_names) != labels.shape[0]:
        raise ValueError(
            f"adapter_names={adapter_names!r} for a batch of {labels.shape[0]} rows: expected a list with one "
            "name per row (None for the base model alone)."
        )
    first_token_scored = model.row_layout(labels.shape[0], adapter_names).first_token_scored
    scored = labels != IGNORE_INDEX  # [B, T]
    return scored[:, 1:].sum(dim=1) + (scored[:, 0] & torch.tensor(first_token_scored, device=labels.device))


def multi_adapter_loss(
    model: SoftPromptModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    adapter_names: Sequence[str | None],
    reduction: Reduction = "adapter_mean",
    implementation: LossImplementation = "torch",
    virtual_token_layout: VirtualTokenLayout = "prefix",
) -> torch.Tensor:
    """The loss of a batch whose rows use different adapters, in one forward pass.

    Args:
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]`` or None.
        labels: ``[B, T]``, -100 where no loss is wanted.
        adapter_names: one adapter name (or None) per row.
        reduction: ``"adapter_mean"``, ``"sum"`` or ``"mean"``; see the module docstring.
        implementation: passed to `SoftPromptModel.compute_loss`.
        virtual_token_layout: passed to `SoftPromptModel.compute_loss`.

    Returns:
        A scalar: the batch's mean loss (``"adapter_mean"``, ``"mean"``) or summed loss (``"sum"``).

    Raises:
        ValueError: an unknown reduction, or an adapter name that is not loaded.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {REDUCTIONS}. Fix: pass one of those.")
    counts = labelled_positions(model, labels, adapter_names)  # [B]
    total = counts.sum()

    def mean_loss() -> torch.Tensor:
        return model.compute_loss(
            input_ids, attention_mask, labels, adapter_names, implementation, virtual_token_layout
        )

    if reduction == "mean":
        return mean_loss()
    if reduction == "sum":
        return mean_loss() * total
    # The mean's gradient reaches adapter a scaled by n_a / N (its share of the labelled positions); scaling the
    # gradient that leaves its module by N / n_a undoes exactly that and leaves the other adapters alone.
    scales = {}
    for name in dict.fromkeys(n for n in adapter_names if n is not None):
        count = sum(int(c) for c, n in zip(counts.tolist(), adapter_names) if n == name)
        scales[name] = float(total) / count if count else 0.0
    with _gradient_scaled(model, scales):
        return mean_loss()


def gradient_isolation_errors(
    model: SoftPromptModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    adapter_names: Sequence[str | None],
) -> dict[str, float]:
    """Checks that each trainable adapter's gradient from the mixed batch comes only from its own rows.

    Compares, under the summed loss, each adapter's gradient from the whole batch with the sum of the gradients of
    its rows run one at a time (each row keeps its own padding, so only the other rows differ). Leaves ``.grad``
    untouched.

    Args:
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]`` or None.
        labels: ``[B, T]``.
        adapter_names: one name (or None) per row.

    Returns:
        Adapter name -> largest absolute difference over its parameters, divided by the largest absolute entry of
        its rows' gradient (a summed gradient's rounding follows the size of its largest entries). About 1e-7 in
        fp32 when the adapter is isolated.

    Raises:
        ValueError: no adapter of the batch has a trainable parameter.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    trained = {
        name: [p for p in model.prompts[name].parameters() if p.requires_grad]
        for name in dict.fromkeys(n for n in adapter_names if n is not None)
        if name in model.prompts
    }
    trained = {name: parameters for name, parameters in trained.items() if parameters}
    if not trained:
        raise ValueError(
            f"No adapter of the batch ({sorted({n for n in adapter_names if n is not None})}) has a trainable "
            "parameter. Fix: make_trainable(model, names) first."
        )
    mixed_loss = multi_adapter_loss(model, input_ids, attention_mask, labels, adapter_names, reduction="sum")
    mixed = _gradients(mixed_loss, trained)
    alone = {name: [torch.zeros_like(p) for p in parameters] for name, parameters in trained.items()}
    for row, name in enumerate(adapter_names):
        if name not in trained:
            continue
        rows = slice(row, row + 1)
        loss = multi_adapter_loss(model, input_ids[rows], attention_mask[rows], labels[rows], [name], reduction="sum")
        for total, gradient in zip(alone[name], _gradients(loss, {name: trained[name]})[name]):
            total += gradient
    errors = {}
    for name in trained:
        scale = max(float(gradient.abs().max()) for gradient in alone[name])
        difference = max(float((a - b).abs().max()) for a, b in zip(mixed[name], alone[name]))
        errors[name] = difference / scale if scale > 0 else difference
    return errors


def _gradients(loss: torch.Tensor, parameters: Mapping[str, list[nn.Parameter]]) -> dict[str, list[torch.Tensor]]:
    flat = [p for group in parameters.values() for p in group]
    gradients = torch.autograd.grad(loss, flat, allow_unused=True)
    gradients = [torch.zeros_like(p) if g is None else g for p, g in zip(flat, gradients)]
    out, start = {}, 0
    for name, group in parameters.items():
        out[name] = gradients[start : start + len(group)]
        start += len(group)
    return out


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by a constant."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return gradient * ctx.scale, None


@contextmanager
def _gradient_scaled(model: SoftPromptModel, scales: Mapping[str, float]) -> Iterator[None]:
    """While active, each named adapter's output carries its gradient scale into the autograd graph.

    The scale is recorded in the graph at forward time, so the backward pass may run later, outside this block,
    and gradient accumulation over several batches stays correct.
    """
    handles = [
        model.prompts[name].register_forward_hook(
            lambda module, inputs, output, scale=scale: _ScaleGradient.apply(output, scale)
        )
        for name, scale in scales.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = [
    "REDUCTIONS",
    "Reduction",
    "adapter_names_for_tasks",
    "gradient_isolation_errors",
    "labelled_positions",
    "make_trainable",
    "multi_adapter_loss",
]
