"""What a method takes from a training run's data: multitask prompt tuning's task ids, CPT's in-context examples.

`prepare_run_data` is `prepare_data` plus each adapter's configuration for the run:

- Multitask prompt tuning trains ONE adapter, ``default``, for every task of the run, where the other methods train
  one adapter per task. A task is a value of ``--task-column``, or a dataset when there are several. Task ids are
  the tasks in sorted order (or the order of ``task_names`` when given); every example carries its ``task_id``, and
  the adapter's config records ``task_names`` (``num_tasks`` is set to their number when left at 1), so that
  ``softprompt eval`` and ``softprompt generate --task NAME`` use the same ids.
- CPT without ``cpt_token_ids`` builds its context from the run's own training examples, in the classification
  recipe's layout (``"{text_column} : {text} Label : {label}<eos>"``, the very token ids the recipe gives the
  inputs): ``context_examples`` examples, taken in data order, one label after another (round-robin, so that every
  label shows up as early as possible). Their types follow PEFT's convention: for example k, ``4k+1`` the
  ``"{text_column} :"`` template, ``4k+2`` the text, ``4k+3`` the ``" Label : "`` template, ``4k+4`` the label and
  EOS (the tokens the recipe scores). Those examples leave the training rows (their labels are scored in every
  step as context), never the held-out ones. Each adapter of a multi-task run gets its context from its own task's
  rows. A context of your own: ``cpt_token_ids`` and ``cpt_tokens_type_mask`` in a config file
  (``adapter: {cpt_token_ids: [...], cpt_tokens_type_mask: [...]}``) or as flags (``--cpt-token-ids 5 6 7``).

Nothing here changes the run's settings (``train_config.json`` keeps what was asked for): the same data and seed give
the same ids and context again on ``--resume``, and the saved adapters record them. A CPT run's evaluation loss is
the method's loss, as PEFT computes it: the held-out rows' labels and the context's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


from softprompt.data import DataError
from softprompt.loss import IGNORE_INDEX
from softprompt.methods import SoftPromptConfig, method_of
from softprompt.methods.cpt import CPTConfig
from softprompt.methods.multitask_prompt_tuning import MultitaskPromptTuningConfig, task_ids_of
from softprompt.recipes import classification_prompt, merged_label_choices
from softprompt.training.config import TrainConfig
from softprompt.training.examples import DEFAULT_ADAPTER_NAME, PreparedData, prepare_data
from softprompt.training.sections import adapter_name_for_source


def prepare_run_data(
    config: TrainConfig, tokenizer: Any, base_model: Any | None = None
) -> tuple[PreparedData, dict[str, SoftPromptConfig]]:
    """The run's examples and each adapter's configuration (see the module docstring); `base_model` is for a
    recipe that runs it (context distillation's self-study and teacher).

    Returns:
        (the prepared data, with task ids or without the context rows where the method needs that; the config of
        every adapter in ``data.adapter_names``).

    Raises:
        DataError: the data cannot serve the method (see `multitask_config`, `cpt_context`).
    """
    data = prepare_data(config, tokenizer, base_model=base_model)
    adapter = config.adapter
    if method_of(adapter).takes_task_ids:
        return data, {DEFAULT_ADAPTER_NAME: multitask_config(adapter, data)}
    if isinstance(adapter, CPTConfig) and adapter.cpt_token_ids is None:
        columns = config.data.resolved_text_columns  # one per dataset; the adapters of several are named after them
        column_of = dict(zip(map(adapter_name_for_source, config.data.dataset), columns)) if len(columns) > 1 else {}
        configs = {}
        for name in data.adapter_names:
            context, data.train = cpt_context(data, name, column_of.get(name, columns[0]),
                                              config.data.context_examples, tokenizer)
            configs[name] = dataclasses.replace(adapter, num_virtual_tokens=None, **context)
        return data, configs
    return data, dict.fromkeys(data.adapter_names, adapter)


def multitask_config(config: MultitaskPromptTuningConfig, data: PreparedData) -> MultitaskPromptTuningConfig:
    """The one multitask adapter's config for the run's tasks; every example gets its ``task_id`` and the adapter's
    name as its ``task``.

    Raises:
        DataError: ``task_names`` that miss some of the data's tasks, or ``num_tasks`` above 1 that differs from
            the number of tasks.
    """
    tasks = data.adapter_names  # every example's task, sorted
    names = config.task_names
    if names is None:
        if config.num_tasks not in (1, len(tasks)):
            raise DataError(
                f"num_tasks={config.num_tasks} with the {len(tasks)} task(s) of the data {tasks}: expected one task "
                "id per task. Fix: drop --num-tasks (it is set from the data), or pass --task-names to say which "
                "task each id is."
            )
        names = tasks
    missing = sorted(set(tasks) - set(names))
    if missing:
        raise DataError(
            f"The data's tasks {missing} are not among task_names={names}. Fix: add them to --task-names (one per "
            "task id), or drop --task-names to take the data's tasks."
        )
    config = dataclasses.replace(config, num_tasks=len(names), task_names=list(names))
    data.label_choices = {DEFAULT_ADAPTER_NAME: merged_label_choices(data.label_choices, tasks)}
    for example in data.train + data.eval + data.eval_prompts:
        example["task_id"] = names.index(example["task"])
        example["task"] = DEFAULT_ADAPTER_NAME
    data.adapter_names = [DEFAULT_ADAPTER_NAME]
    return config


def row_task_ids(config: Any, tasks: Sequence[str]) -> list[int] | None:
    """Task ids of rows named by their tasks, for a loaded adapter (None unless it is multitask): one task means
    id 0 for every row, several are looked up in ``task_names``.

    Raises:
        ValueError: a task the adapter does not know.
    """
    if not method_of(config).takes_task_ids:
        return None
    if config.num_tasks == 1:
        return [0] * len(tasks)
    return task_ids_of(config, tasks)


def cpt_context(
    data: PreparedData, adapter_name: str, text_column: str, count: int, tokenizer: Any
) -> tuple[dict[str, list[int]], list[dict[str, Any]]]:
    """CPT's context from `count` training examples of adapter `adapter_name`, and the training examples left.

    Returns:
        (``cpt_token_ids``, ``cpt_mask`` and ``cpt_tokens_type_mask``; the training rows without the context's).

    Raises:
        DataError: causal-LM data (no labels to show), or too few training rows of the adapter.
    """
    if data.kind != "classification":
        raise DataError(
            "CPT's context is labelled examples, and the data has no label column. Fix: pass --label-column, or give "
            "the context yourself (cpt_token_ids and cpt_tokens_type_mask in a --config file, or --cpt-token-ids)."
        )
    own = [index for index, example in enumerate(data.train) if example["task"] == adapter_name]
    if len(own) <= count:
        raise DataError(
            f"--context-examples {count} with {len(own)} training rows of {adapter_name!r}: the context would leave "
            "none to train on. Fix: lower --context-examples, or use more rows."
        )
    by_label: dict[tuple[int, ...], list[int]] = {}
    for index in own:
        example = data.train[index]
        by_label.setdefault(tuple(_label_ids(example)), []).append(index)
    chosen: list[int] = []
    while len(chosen) < count:  # round-robin over the labels, each in data order
        for indices in by_label.values():
            if indices and len(chosen) < count:
                chosen.append(indices.pop(0))
    token_ids: list[int] = []
    types: list[int] = []
    for k, index in enumerate(chosen):
        ids, example_types = _typed_example(data.train[index], text_column, tokenizer)
        token_ids += ids
        types += [4 * k + t for t in example_types]
    context = {"cpt_token_ids": token_ids, "cpt_mask": [1] * len(token_ids), "cpt_tokens_type_mask": types}
    return context, [example for index, example in enumerate(data.train) if index not in set(chosen)]


def _label_ids(example: dict[str, Any]) -> list[int]:
    return [label for label in example["labels"] if label != IGNORE_INDEX]


def _typed_example(example: dict[str, Any], text_column: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """An example's ids (prompt, label, EOS: the recipe's own) and their types 1-4 (see the module docstring).

    The prompt's tokens are typed by where each starts in the decoded prompt: before the end of
    ``"{text_column} :"`` the input template, from the last ``" Label :"`` on the output template, the text between.
    """
    ids = list(example["input_ids"])
    scored = [label != IGNORE_INDEX for label in example["labels"]]
    prompt = ids[: scored.index(True)]
    text = tokenizer.decode(prompt)
    head = classification_prompt(text_column, "").split(" Label :")[0].rstrip()  # "{text_column} :"
    head_end = len(head) if text.startswith(head) else 0
    tail_start = text.rfind(" Label :")
    tail_start = len(text) if tail_start < 0 else tail_start
    types = []
    for position in range(len(prompt)):
        start = len(tokenizer.decode(prompt[:position]))  # where the token starts in the decoded prompt
        types.append(1 if start < head_end else 3 if start >= tail_start else 2)
    return ids, types + [4] * (len(ids) - len(prompt))
