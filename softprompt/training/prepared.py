"""What a data recipe hands the training loop: the examples, the loss a step calls on them, and the recipe's own
steps around the run (`PreparedData`).

The default recipes (classification as generation, causal LM) score labels with `label_loss`. A recipe whose loss
is not next-token cross-entropy on labels brings its own: context distillation's scores the student against the
teacher's top-k distributions, whose rows the batch names (``softprompt/training/context_distillation.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from softprompt.data import DataError

DEFAULT_ADAPTER_NAME = "default"
"""The adapter of a run with one task."""

LossFunction = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""``loss(model, batch, **options) -> (summed loss, [B] scored positions per row)``, where ``batch`` is a collated
batch on the model's device (every row names its adapter in ``task``) and ``options`` are
`SoftPromptModel.summed_loss`'s ``implementation`` and ``virtual_token_layout``."""


def batch_task_ids(batch: dict[str, Any]) -> torch.Tensor | None:
    """``[B]`` each row of a collated batch's task id (multitask prompt tuning's examples carry one), or None."""
    return torch.as_tensor(batch["task_id"]) if "task_id" in batch else None


def label_loss(model: Any, batch: dict[str, Any], **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token loss of the batch's labels, summed, and each row's labelled positions
    (`SoftPromptModel.summed_loss`): the loss of the default recipes."""
    return model.summed_loss(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["task"],
                             task_ids=batch_task_ids(batch), **options)


@dataclass
class PreparedData:
    """Token ids ready for `collate`; every example carries ``task``, the name of the adapter that trains on it."""

    kind: str
    """``classification``, ``causal_lm`` or ``context_distillation``."""
    adapter_names: list[str]
    """One adapter per task, sorted."""
    train: list[dict[str, Any]]
    """Training examples."""
    eval: list[dict[str, Any]]
    """Held-out examples with labels (loss, perplexity)."""
    eval_prompts: list[dict[str, Any]]
    """Classification only: the held-out prompts with ``label_text`` / ``label_ids`` (accuracy)."""
    label_choices: dict[str, list[tuple[str, list[int]]]] = field(default_factory=dict)
    """Classification only: each task's labels ``(text, ids + EOS)``, from its training and held-out rows: the
    candidates of rank classification (`softprompt.recipes.label_choices`)."""
    loss: LossFunction = label_loss
    """What a training step and the evaluation compute on a batch of these examples."""
    initialize: Callable[[Any], None] = lambda model: None
    """The recipe's init of the freshly built adapters, ``initialize(model)`` (a cartridge from the corpus), before a
    checkpoint is restored over them; by default nothing (the adapters' own init)."""
    write: Callable[[Path], None] = lambda output_dir: None
    """Writes the data the recipe made into the run directory, ``write(output_dir)``, once the run writes; by
    default nothing."""


def held_out_indices(count: int, fraction: float, seed: int, source: str) -> set[int]:
    """The indices of the `fraction` of `count` rows held out for evaluation, drawn by `seed`.

    Raises:
        DataError: holding them out would leave no training row.
    """
    if fraction == 0:
        return set()
    size = max(1, round(count * fraction))
    if size >= count:
        raise DataError(
            f"{source}: holding out eval_fraction={fraction} of {count} rows leaves no training rows. "
            "Fix: lower --eval-fraction, pass --eval-split, or use more rows."
        )
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    return set(order[:size])
