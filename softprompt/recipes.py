"""Data recipes: rows into token ids and labels, one readable function each.

- `classification_examples`: classification as generation, the seed recipe (RAFT twitter_complaints): the model
  reads ``"{text_column} : {text} Label : "`` and learns to write the label text followed by EOS.
  `classification_eval_examples` gives the same prompts without the answer, for greedy-generation accuracy
  (`label_accuracy`) and rank classification among the dataset's labels (`label_choices`).
- `causal_lm_examples`: plain next-token prediction over every real token of a text column.

Every example is a dict of plain lists (``input_ids``, ``attention_mask`` and, for training, ``labels``) plus
optional non-tensor fields such as ``task`` (a string naming the adapter in multi-adapter training), which
`softprompt.data.collate` passes through as a list. Token ids are produced with ``add_special_tokens=False``: the
recipes add EOS explicitly, so a tokenizer that adds special tokens by itself cannot change the layout.

Shapes: B batch, T tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from softprompt.data import (
    DataError,
    Rows,
    check_max_length,
    check_rows,
    encode_texts,
    tokenizer_eos_id,
    task_values,
    text_values,
)
from softprompt.loss import IGNORE_INDEX

# --- Classification as generation -------------------------------------------------------------------------------


def classification_prompt(text_column: str, text: str) -> str:
    """The prompt the classification recipe shows the model: ``"{text_column} : {text} Label : "``.

    Args:
        text_column: Name of the text column (part of the prompt, as in the seed recipe).
        text: The row's text.

    Returns:
        The prompt string; the label text follows it directly.
    """
    return f"{text_column} : {text} Label : "


def _prompt_ids(
    tokenizer: PreTrainedTokenizerBase, text_column: str, text: str, full_ids: list[int], budget: int
) -> list[int]:
    """The prompt's ids, dropping text from its start until at most ``budget`` tokens remain.

    The prompt is always re-tokenized whole, so the ids are exactly those of
    ``classification_prompt(text_column, kept_text)``; the search is over the character where the kept text starts.
    """
    if len(full_ids) <= budget:
        return full_ids

    def ids_from(start: int) -> list[int]:
        return encode_texts(tokenizer, [classification_prompt(text_column, text[start:].lstrip())])[0]

    # Invariant: keeping text[fits_from:] fits (the empty text fits, checked by the caller), text[too_long_from:]
    # does not. Token counts shrink (almost) monotonically as the start moves right, so bisection finds a cut
    # within a few characters of the longest text that fits, in ~log2(len(text)) tokenizer calls.
    too_long_from, fits_from = 0, len(text)
    fitting_ids = ids_from(fits_from)
    while fits_from - too_long_from > 1:
        middle = (too_long_from + fits_from) // 2
        candidate = ids_from(middle)
        if len(candidate) <= budget:
            fits_from, fitting_ids = middle, candidate
        else:
            too_long_from = middle
    return fitting_ids


def _classification_parts(
    rows: Rows,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    label_column: str,
    max_length: int,
) -> tuple[list[list[int]], list[str], list[list[int]]]:
    """Prompt ids, label texts and target ids (label ids + EOS) of every row, truncated to fit ``max_length``."""
    check_rows(rows)
    check_max_length(max_length)
    eos_token_id = tokenizer_eos_id(tokenizer)
    texts = text_values(rows, text_column, "--text-column")
    labels = text_values(rows, label_column, "--label-column")

    label_ids = encode_texts(tokenizer, labels)
    special = set(tokenizer.all_special_ids)
    for row, ids in enumerate(label_ids):
        if ids and set(ids) <= special:  # e.g. characters the tokenizer knows only as <unk>
            raise DataError(
                f"Row {row}: the label {labels[row]!r} encodes to special tokens only ({ids}), which decoding skips: "
                "no prediction could ever match it. Fix: use label texts the tokenizer encodes as words."
            )
    target_ids = [ids + [eos_token_id] for ids in label_ids]
    empty_prompt_length = len(encode_texts(tokenizer, [classification_prompt(text_column, "")])[0])
    # One budget for all rows, set by the longest target: a per-row budget would cut the text of rows with longer
    # labels more, and the prompt length would then leak the label.
    longest_target_index = max(range(len(target_ids)), key=lambda index: len(target_ids[index]))
    longest_target = len(target_ids[longest_target_index])
    if empty_prompt_length + longest_target > max_length:
        raise DataError(
            f"Row {longest_target_index}: the label {labels[longest_target_index]!r} takes "
            f"{longest_target - 1} tokens + 1 EOS and the prompt {classification_prompt(text_column, '')!r} takes "
            f"{empty_prompt_length} tokens even with no text, which exceeds max_length={max_length}. "
            f"Fix: raise max_length to at least {empty_prompt_length + longest_target} (more to keep some text)."
        )
    budget = max_length - longest_target
    full_prompts = encode_texts(tokenizer, [classification_prompt(text_column, text) for text in texts])
    prompt_ids = [
        _prompt_ids(tokenizer, text_column, text, full, budget) for text, full in zip(texts, full_prompts)
    ]
    return prompt_ids, labels, target_ids


def classification_examples(
    rows: Rows,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_column: str,
    label_column: str,
    max_length: int,
    task_column: str | None = None,
) -> list[dict[str, Any]]:
    """Training examples for classification as generation (the seed recipe, RAFT twitter_complaints).

    Per row, with ``prompt = f"{text_column} : {text} Label : "`` and the label text as target::

        input_ids      = prompt_ids + label_ids + [eos]
        labels         = [-100] * len(prompt_ids) + label_ids + [eos]
        attention_mask = [1] * len(input_ids)

    so the loss is taken only on the label and the EOS that ends it. PEFT's documentation version of this recipe
    forgets to append the label ids to the input ids and puts them at the first text positions instead; here the
    model sees the prompt and learns to continue it with the label, which is what generation does at test time.

    Prompt and label are tokenized separately with ``add_special_tokens=False`` (BLOOM's tokenizer adds none).
    Texts too long for ``max_length`` lose tokens from the start of the text: the ``"{text_column} : "`` head,
    the ``" Label : "`` cue, the label and EOS are always kept. The room left for the prompt is the same for every
    row (``max_length`` minus the longest label + EOS among ``rows``), so the prompts match
    `classification_eval_examples` and their length says nothing about the label.

    Args:
        rows: The data, e.g. from `load_rows`.
        tokenizer: The model's tokenizer; must have an EOS token.
        text_column: Column holding the text (also written into the prompt).
        label_column: Column holding the label text, e.g. ``"complaint"``.
        max_length: Most tokens per example (prompt + label + EOS).
        task_column: Optional column naming each row's task; copied to ``example["task"]``.

    Returns:
        One dict per row with ``input_ids``, ``attention_mask``, ``labels`` (lists of ints, at most
        ``max_length`` long) and, with ``task_column``, ``task``.

    Raises:
        DataError: ``rows`` is empty; a column is missing (the message lists the available ones); a text or label
            is not a string or is empty; the tokenizer has no EOS; or the longest label + EOS + the
            prompt with no text exceeds ``max_length`` (the message names the row, the label's length and
            ``max_length``).
    """
    prompt_ids, _, target_ids = _classification_parts(rows, tokenizer, text_column, label_column, max_length)
    tasks = task_values(rows, task_column)
    examples = []
    for index, (prompt, target) in enumerate(zip(prompt_ids, target_ids)):
        input_ids = prompt + target
        example: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": [1] * len(input_ids),
            "labels": [IGNORE_INDEX] * len(prompt) + target,
        }
        if tasks is not None:
            example["task"] = tasks[index]
        examples.append(example)
    return examples


def classification_eval_examples(
    rows: Rows,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_column: str,
    label_column: str,
    max_length: int,
    task_column: str | None = None,
) -> list[dict[str, Any]]:
    """Evaluation examples for classification as generation: the prompt alone and the gold answer.

    The prompt ids equal the prompt part of `classification_examples` for the same rows (same truncation), and
    there is room after them for the longest label + EOS within ``max_length``. Generate greedily from the
    left-padded prompts with ``max_new_tokens = max(len(example["label_ids"]) for example in examples)``, decode
    the new tokens with ``skip_special_tokens=True`` and score with `label_accuracy` against ``label_text``.

    Args:
        rows: The data, e.g. from `load_rows`.
        tokenizer: The model's tokenizer; must have an EOS token.
        text_column: Column holding the text.
        label_column: Column holding the gold label text.
        max_length: Most tokens of prompt + label + EOS, as for `classification_examples`.
        task_column: Optional column naming each row's task; copied to ``example["task"]``.

    Returns:
        One dict per row with ``input_ids`` and ``attention_mask`` (the prompt), ``label_text`` (the gold label
        string), ``label_ids`` (its token ids followed by EOS) and, with ``task_column``, ``task``. There is no
        ``labels`` field, so `collate` returns no ``labels`` tensor for these.

    Raises:
        DataError: As `classification_examples`.
    """
    prompt_ids, label_texts, target_ids = _classification_parts(
        rows, tokenizer, text_column, label_column, max_length
    )
    tasks = task_values(rows, task_column)
    examples = []
    for index, (prompt, label_text, target) in enumerate(zip(prompt_ids, label_texts, target_ids)):
        example: dict[str, Any] = {
            "input_ids": prompt,
            "attention_mask": [1] * len(prompt),
            "label_text": label_text,
            "label_ids": target,
        }
        if tasks is not None:
            example["task"] = tasks[index]
        examples.append(example)
    return examples


def label_accuracy(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of generated labels equal to the gold labels, ignoring surrounding whitespace.

    Args:
        predictions: Decoded generations (special tokens skipped), one per example.
        references: Gold label texts (``example["label_text"]``), in the same order.

    Returns:
        Accuracy in [0, 1].

    Raises:
        DataError: The two sequences differ in length or are empty.
    """
    if len(predictions) != len(references):
        raise DataError(
            f"{len(predictions)} predictions for {len(references)} references: expected one prediction per "
            "reference. Fix: decode one generation per evaluation example."
        )
    if not references:
        raise DataError("No references: expected at least one example. Fix: evaluate on a non-empty dataset.")
    correct = sum(prediction.strip() == reference.strip() for prediction, reference in zip(predictions, references))
    return correct / len(references)


def label_choices(prompts: Sequence[dict[str, Any]]) -> dict[str | None, list[tuple[str, list[int]]]]:
    """The labels a classification dataset chooses from, per task: what rank classification scores.

    Args:
        prompts: `classification_eval_examples` of every row that names the label set (training and held-out rows
            alike: a label missing from the held-out rows is still a wrong answer the model may prefer).

    Returns:
        For each ``task`` (None where the examples carry none), its distinct ``(label_text, label_ids)`` pairs, the
        ids ending with EOS as in the examples, sorted by label text so that the order is the same in every run.
    """
    choices: dict[str | None, dict[str, list[int]]] = {}
    for example in prompts:
        choices.setdefault(example.get("task"), {})[example["label_text"]] = list(example["label_ids"])
    return {task: sorted(labels.items()) for task, labels in choices.items()}


def merged_label_choices(
    choices: dict[Any, list[tuple[str, list[int]]]], tasks: Sequence[Any]
) -> list[tuple[str, list[int]]]:
    """The candidates of rows of several tasks that one adapter now answers (a multitask adapter, or one adapter
    evaluated on other tasks' rows): every label of those tasks, sorted by label text."""
    labels = dict(label for task in sorted(tasks, key=str) for label in choices.get(task, []))
    return sorted(labels.items())


# --- Causal language modelling ----------------------------------------------------------------------------------


def causal_lm_examples(
    rows: Rows,
    tokenizer: PreTrainedTokenizerBase,
    *,
    text_column: str,
    max_length: int,
    task_column: str | None = None,
) -> list[dict[str, Any]]:
    """Training examples for plain next-token prediction over a text column (the quotes/prompts recipe).

    Per row: ``input_ids = text_ids + [eos]`` cut to the first ``max_length`` tokens (a cut text loses its end
    and its EOS), ``labels = input_ids`` (the loss covers every real token; the model shifts labels itself) and
    ``attention_mask`` all ones.

    Args:
        rows: The data, e.g. from `load_rows`.
        tokenizer: The model's tokenizer; must have an EOS token.
        text_column: Column holding the text.
        max_length: Most tokens per example.
        task_column: Optional column naming each row's task; copied to ``example["task"]``.

    Returns:
        One dict per row with ``input_ids``, ``attention_mask``, ``labels`` and, with ``task_column``, ``task``.

    Raises:
        DataError: ``rows`` is empty, a column is missing (the message lists the available ones), a text is not a
            string or is empty, the tokenizer has no EOS, or ``max_length`` is not a positive int.
    """
    check_rows(rows)
    check_max_length(max_length)
    eos_token_id = tokenizer_eos_id(tokenizer)
    texts = text_values(rows, text_column, "--text-column")
    tasks = task_values(rows, task_column)
    examples = []
    for index, text_ids in enumerate(encode_texts(tokenizer, texts)):
        input_ids = (text_ids + [eos_token_id])[:max_length]
        example: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": [1] * len(input_ids),
            "labels": list(input_ids),
        }
        if tasks is not None:
            example["task"] = tasks[index]
        examples.append(example)
    return examples


