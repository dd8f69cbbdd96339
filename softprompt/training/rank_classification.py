"""Rank classification: of a dataset's labels, the one the model scores highest after the prompt.

Generated-label accuracy (`softprompt.recipes.label_accuracy`) asks the model to write the label; early in training
a pretrained model answers in its own format (SmolLM2 writes ``"\\nA:"``), so that accuracy stays 0 while the loss
falls: it measures the format before the task. Rank classification asks which of the dataset's labels the model
finds most likely, which measures the task from the first step. It is what Lester et al. (2021), "The Power of Scale
for Parameter-Efficient Prompt Tuning", report for T5 ("rank classification"), and what OpenPrompt calls a
verbalizer with the label words as candidates.

The score of a label is ``log p(label ids + EOS | prompt)``: the sum over its tokens, not the mean per token.

- The sum is the probability of the whole answer, so the chosen label is the answer the model is most likely to
  write and stop after; the EOS is scored because the recipe trains it and because it separates a label from a
  longer label it begins (``spam`` from ``spam call``).
- It is exactly what training minimizes on the gold label (the eval loss is the mean of the same terms), so the
  two metrics speak about one quantity.
- Dividing by the length favours labels with more tokens whenever a label's later tokens are nearly certain given
  its first (``no`` then ``complaint``): a bias that comes from the tokenizer, not from the task. With labels of
  equal length (the usual case: one word per class) both rules choose alike.

Cost: every held-out prompt is scored once per label of its task, forward only, with the LM head at the label's
positions only (`SoftPromptModel.compute_loss` with ``reduction="per_row"``): prompts x labels rows, in batches of
``batch_size`` rows of similar length, through each prompt's adapter (mixed adapters per batch). For two labels
that is about the work of the evaluation loss's pass, which pads batches in the data's order.

Shapes: B batch, T tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from softprompt.data import DataError, collate
from softprompt.loss import IGNORE_INDEX
from softprompt.model import SoftPromptModel
from softprompt.training.prepared import batch_task_ids

LabelChoices = Mapping[str, Sequence[tuple[str, Sequence[int]]]]
"""Each task's candidate labels: ``(label text, label ids + EOS)`` (`softprompt.recipes.label_choices`)."""


@torch.no_grad()
def label_log_likelihoods(
    model: SoftPromptModel,
    tokenizer: Any,
    prompts: Sequence[Mapping[str, Any]],
    choices: LabelChoices,
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> list[list[float]]:
    """``log p(label ids + EOS | prompt)`` of every candidate label of every prompt, with the prompt's adapter.

    Args:
        model: the model with every adapter named by the prompts' ``task`` loaded.
        tokenizer: for the pad id.
        prompts: `softprompt.recipes.classification_eval_examples` (``input_ids``, ``task``).
        choices: each task's candidates.
        batch_size: rows (prompt x candidate pairs) per pass.
        autocast_dtype: CUDA autocast dtype, or None.
        progress: show a tqdm bar.

    Returns:
        For each prompt, the log-likelihood of each of its task's candidates, in the order of ``choices[task]``.

    Raises:
        DataError: a prompt's task has no candidates.
    """
    pairs = []  # (prompt index, candidate index): one scored row each
    for index, prompt in enumerate(prompts):
        if not choices.get(prompt["task"]):
            raise DataError(
                f"Held-out prompt {index} has task {prompt['task']!r}, which has no candidate labels among "
                f"{sorted(choices)}: expected the labels of its rows. Fix: evaluate with the data its adapter was "
                "trained on, or pass --label-column."
            )
        pairs += [(index, candidate) for candidate in range(len(choices[prompt["task"]]))]
    # Rows of similar length together: a batch is as long as its longest row, so this halves the padding computed
    # on real data (SMS prompts of 7 to 87 tokens); each row's score does not depend on its batch.
    pairs.sort(key=lambda pair: len(prompts[pair[0]]["input_ids"]) + len(choices[prompts[pair[0]]["task"]][pair[1]][1]))
    device = model.base_model.get_input_embeddings().weight.device
    scores: list[list[float]] = [[0.0] * len(choices[prompt["task"]]) for prompt in prompts]
    for start in tqdm(range(0, len(pairs), batch_size), desc="eval ranks", leave=False, disable=not progress):
        rows = []
        for index, candidate in pairs[start : start + batch_size]:
            prompt_ids = list(prompts[index]["input_ids"])
            label_ids = list(choices[prompts[index]["task"]][candidate][1])
            row = {"input_ids": prompt_ids + label_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + label_ids,
                   "task": prompts[index]["task"]}
            if "task_id" in prompts[index]:  # a multitask adapter's row names its task
                row["task_id"] = prompts[index]["task_id"]
            rows.append(row)
        batch = collate(rows, pad_token_id=tokenizer.pad_token_id)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            negative = model.compute_loss(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                          batch["labels"].to(device), batch["task"], task_ids=batch_task_ids(batch),
                                          reduction="per_row")  # [B]
        for (index, candidate), value in zip(pairs[start : start + batch_size], (-negative).tolist()):
            scores[index][candidate] = value
    return scores


def rank_labels(
    prompts: Sequence[Mapping[str, Any]], choices: LabelChoices, scores: Sequence[Sequence[float]]
) -> list[str]:
    """The label text each prompt scores highest among its task's candidates (a tie goes to the first in the
    candidates' order).

    Args:
        prompts: the prompts, with ``task``.
        choices: each task's candidates.
        scores: `label_log_likelihoods` of the prompts.

    Returns:
        One label text per prompt: score it with `softprompt.recipes.label_accuracy`.
    """
    predictions = []
    for prompt, row in zip(prompts, scores):
        best = max(range(len(row)), key=lambda candidate: (row[candidate], -candidate))
        predictions.append(choices[prompt["task"]][best][0])
    return predictions
