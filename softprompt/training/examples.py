"""A run's examples: the configured data, built by the recipes into token ids, split into training and held-out
rows, and the shuffled order of each epoch.

Every example carries ``task``: the name of the adapter that trains on it (one adapter per dataset, or per value of
the task column, or ``default``).
"""

from __future__ import annotations

from typing import Any

import torch

from softprompt.data import DataError, load_rows
from softprompt.inputs import ADAPTER_NAME_RULE, is_adapter_name
from softprompt.quickstart import shipped_dataset_path
from softprompt.recipes import (
    causal_lm_examples,
    classification_eval_examples,
    classification_examples,
    label_choices,
)
from softprompt.training.config import TrainConfig
from softprompt.training.context_distillation import context_distillation_data
from softprompt.training.prepared import DEFAULT_ADAPTER_NAME, PreparedData, held_out_indices
from softprompt.training.sections import adapter_name_for_source

__all__ = ["DEFAULT_ADAPTER_NAME", "PreparedData", "epoch_order", "prepare_data"]


def prepare_data(config: TrainConfig, tokenizer: Any, whole_split: str | None = None,
                 base_model: Any | None = None) -> PreparedData:
    """Loads the configured data and builds training and evaluation examples.

    Args:
        config: data fields: dataset(s), config, split, eval split or fraction, columns, max_length, seed.
        tokenizer: the base model's tokenizer.
        whole_split: evaluate on every row of this split instead (``softprompt eval --split``); no training rows.
        base_model: the frozen base, on the run's device: the context-distillation recipe makes its data with it
            (`softprompt.training.context_distillation.context_distillation_data`).

    Raises:
        DataError: a source, column or row cannot be used (see `softprompt.data`).
    """
    if config.data.recipe == "context-distillation":
        return context_distillation_data(config, tokenizer, base_model, whole_split)
    sources = config.data.dataset or [str(shipped_dataset_path("complaints"))]
    text_columns = config.data.resolved_text_columns
    label_column = config.data.resolved_label_column
    several = len(sources) > 1
    kind = "classification" if label_column is not None else "causal_lm"
    train: list[dict[str, Any]] = []
    evaluation: list[dict[str, Any]] = []
    prompts: list[dict[str, Any]] = []
    labelled_prompts: list[dict[str, Any]] = []  # every row's prompt and label: where the label set comes from
    for index, (source, text_column) in enumerate(zip(sources, text_columns)):
        task = adapter_name_for_source(source) if several else None

        def examples_of(split: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            rows = load_rows(source, config_name=config.data.dataset_config, split=split)
            return _examples(rows, tokenizer, config, text_column, label_column, task)

        if whole_split is not None:  # `softprompt eval --split`: every row is an evaluation row
            source_eval, source_prompts = examples_of(whole_split)
            labelled_prompts += source_prompts
        elif config.data.eval_split is not None:
            source_train, train_prompts = examples_of(config.data.split)
            train += source_train
            source_eval, source_prompts = examples_of(config.data.eval_split)
            labelled_prompts += train_prompts + source_prompts
        else:
            # Examples are built over all rows before the split so that the classification recipe's prompt budget
            # (set by the longest label) is the same for training and evaluation rows.
            examples, all_prompts = examples_of(config.data.split)
            held_out = held_out_indices(len(examples), config.data.eval_fraction, config.optimization.seed + index, source)
            train += [example for i, example in enumerate(examples) if i not in held_out]
            source_eval = [examples[i] for i in sorted(held_out)]
            source_prompts = [all_prompts[i] for i in sorted(held_out)] if all_prompts else []
            labelled_prompts += all_prompts
        evaluation += source_eval
        prompts += source_prompts
    names = sorted({example["task"] for example in train + evaluation})
    for name in names:
        if not is_adapter_name(name):
            raise DataError(
                f"Task value {name!r} (column {config.data.task_column!r}) cannot name an adapter: expected "
                f"{ADAPTER_NAME_RULE}. Fix: clean the task column."
            )
    if whole_split is None and not train:
        raise DataError(
            f"No training rows are left after holding out eval_fraction={config.data.eval_fraction} of {sources}. "
            "Fix: lower --eval-fraction or use more rows."
        )
    return PreparedData(kind=kind, adapter_names=names, train=train, eval=evaluation, eval_prompts=prompts,
                        label_choices=label_choices(labelled_prompts))


def _examples(
    rows: Any, tokenizer: Any, config: TrainConfig, text_column: str, label_column: str | None, task: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(loss examples, classification prompts) for one source; every example gets its ``task``."""
    if label_column is None:
        examples = causal_lm_examples(
            rows, tokenizer, text_column=text_column, max_length=config.data.max_length, task_column=config.data.task_column
        )
        prompts: list[dict[str, Any]] = []
    else:
        common = dict(text_column=text_column, label_column=label_column, max_length=config.data.max_length,
                      task_column=config.data.task_column)
        examples = classification_examples(rows, tokenizer, **common)
        prompts = classification_eval_examples(rows, tokenizer, **common)
    if config.data.task_column is None:  # otherwise the recipes copied each row's task already
        for example in examples + prompts:
            example["task"] = task or DEFAULT_ADAPTER_NAME
    return examples, prompts


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of the training examples in ``epoch``: a function of (seed, epoch) alone, so every
    process computes the same order and a resumed run continues with the same one."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()
