"""Data recipes: load rows, turn them into token ids and labels, pad them into batches.

Each recipe is one readable function:

- `load_rows`: a local ``.csv``/``.json``/``.jsonl``/``.parquet`` file or a Hugging Face Hub dataset name, loaded
  with ``datasets.load_dataset``.
- `classification_examples`: classification as generation, the seed recipe (RAFT twitter_complaints): the model
  reads ``"{text_column} : {text} Label : "`` and learns to write the label text followed by EOS.
  `classification_eval_examples` gives the same prompts without the answer, for greedy-generation accuracy
  (`label_accuracy`).
- `causal_lm_examples`: plain next-token prediction over every real token of a text column.
- `collate`: pads a list of examples into ``[B, T]`` tensors, dynamically (longest in the batch) or to a fixed
  length, on the left (the default, as the seed recipes and generation want) or on the right.

Every example is a dict of plain lists (``input_ids``, ``attention_mask`` and, for training, ``labels``) plus
optional non-tensor fields such as ``task`` (a string naming the adapter in multi-adapter training), which
`collate` passes through as a list.

Token ids are produced with ``add_special_tokens=False``: BLOOM's tokenizer adds no BOS/EOS by itself and the
recipes add EOS explicitly, so a tokenizer that does add special tokens cannot change the layout.

Shapes: B batch, T tokens.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from softprompt.loss import IGNORE_INDEX

LOCAL_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
"""File extension → the ``datasets`` builder that reads it."""

TENSOR_FIELDS = ("input_ids", "attention_mask", "labels")
"""Per-example fields `collate` pads into tensors; every other field is passed through as a list."""

Rows = datasets.Dataset | Sequence[Mapping[str, Any]]
"""What the recipes accept: a loaded dataset or any sequence of row mappings (e.g. a list of dicts)."""


class DataError(ValueError):
    """The data cannot be used as given: missing column, empty dataset, a label that cannot fit, ...

    The message names the bad value, what was expected and how to fix it.
    """


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A local data file does not exist."""


# --- Loading ----------------------------------------------------------------------------------------------------


def load_rows(
    source: str | os.PathLike[str], *, config_name: str | None = None, split: str = "train"
) -> datasets.Dataset:
    """Loads a dataset from a local file or from the Hugging Face Hub.

    A path ending in ``.csv``, ``.json``, ``.jsonl`` or ``.parquet`` is read with the matching ``datasets``
    builder; such a file holds a single split named ``"train"``, which ``split`` may slice (``"train[:100]"``).
    Anything else is passed to ``datasets.load_dataset(source, config_name, split=split)``: a Hub name such as
    ``"ought/raft"`` with ``config_name="twitter_complaints"``, or a local dataset folder.

    Args:
        source: Path of a local file, or a dataset name or folder for ``datasets.load_dataset``.
        config_name: Dataset configuration (Hub datasets only).
        split: Split to load, with the ``datasets`` slicing syntax.

    Returns:
        The rows, with at least one row.

    Raises:
        DataFileNotFoundError: ``source`` has a data-file extension but does not exist.
        DataError: ``source`` is a file with an unsupported extension, cannot be parsed, cannot be loaded from
            the Hub (e.g. offline), or holds no rows.
    """
    if not isinstance(split, str) or not split:
        raise DataError(f"split={split!r}: expected a split name such as 'train'. Fix: pass split='train'.")
    path = pathlib.Path(source)
    builder = LOCAL_FILE_BUILDERS.get(path.suffix.lower())
    if builder is not None:
        if not path.is_file():
            raise DataFileNotFoundError(
                f"Data file {str(path)!r} does not exist (resolved to {str(path.resolve())!r}). "
                "Fix: check the path, or pass a Hub dataset name instead of a file."
            )
        if config_name is not None:
            raise DataError(
                f"config_name={config_name!r} was given with the local file {str(path)!r}: configurations only "
                "exist for Hub datasets. Fix: drop config_name."
            )
        if path.stat().st_size == 0:
            raise _empty_dataset_error(source, split)
        try:
            rows = datasets.load_dataset(builder, data_files=str(path), split=split)
        except Exception as error:  # datasets raises many types for unparseable files; all mean the same here
            # A header-only CSV or an empty JSON list surfaces as this split error instead of an empty dataset.
            if "corresponds to no data" in str(error):
                raise _empty_dataset_error(source, split) from error
            raise DataError(
                f"Could not read {str(path)!r} as {builder} (split {split!r}): {error}. "
                f"Fix: check that the file is valid {builder} with one row per record and that split is 'train' "
                "(or a slice of it such as 'train[:100]')."
            ) from error
    elif path.is_file():
        supported = ", ".join(LOCAL_FILE_BUILDERS)
        raise DataError(
            f"Data file {str(path)!r} has the unsupported extension {path.suffix!r}: expected one of {supported}. "
            "Fix: convert the file (e.g. with pandas) to one of those formats."
        )
    else:
        try:
            rows = datasets.load_dataset(str(source), config_name, split=split)
        except Exception as error:  # offline, unknown name, bad config, ...: all mean "cannot load this source"
            raise DataError(
                f"Could not load the dataset {str(source)!r} (config_name={config_name!r}, split={split!r}) with "
                f"datasets.load_dataset: {type(error).__name__}: {error}. Fix: check the name, config and split "
                "and the network connection, or pass the path of a local .csv, .json, .jsonl or .parquet file "
                "(softprompt.quickstart.shipped_dataset_path('complaints') works offline)."
            ) from error
    if len(rows) == 0:
        raise _empty_dataset_error(source, split)
    return rows


def _empty_dataset_error(source: str | os.PathLike[str], split: str) -> DataError:
    return DataError(
        f"The dataset {str(source)!r} (split={split!r}) has no rows: expected at least one. "
        "Fix: pass a file or split with data."
    )


# --- Shared helpers ---------------------------------------------------------------------------------------------


def _column_names(rows: Rows) -> list[str]:
    if isinstance(rows, datasets.Dataset):
        return list(rows.column_names)
    return list(rows[0].keys()) if len(rows) > 0 else []


def _check_rows(rows: Rows) -> None:
    if isinstance(rows, (str, bytes)) or not isinstance(rows, (datasets.Dataset, Sequence)):
        raise DataError(
            f"rows of type {type(rows).__name__}: expected a datasets.Dataset or a list of row dicts. "
            "Fix: pass the result of load_rows(...)."
        )
    if len(rows) == 0:
        raise DataError("rows is empty: expected at least one row. Fix: pass a dataset with data.")


def _column_values(rows: Rows, column: str, flag: str) -> list[Any]:
    """The values of ``column``, one per row; ``flag`` is the command-line option that names the column."""
    available = _column_names(rows)
    if column not in available:
        raise DataError(
            f"Column {column!r} is not in the data; available columns: {available}. "
            f"Fix: pass the right column name ({flag} on the command line)."
        )
    if isinstance(rows, datasets.Dataset):
        return list(rows[column])
    values = []
    for index, row in enumerate(rows):
        if column not in row:
            raise DataError(
                f"Row {index} has no column {column!r} (it has {list(row.keys())}). "
                "Fix: give every row the same columns."
            )
        values.append(row[column])
    return values


def _text_values(rows: Rows, column: str, flag: str, *, allow_empty: bool) -> list[str]:
    values = _column_values(rows, column, flag)
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(
                f"Row {index}, column {column!r}: expected text, got {value!r} ({type(value).__name__}). "
                "Fix: fill or drop rows with missing values, and map class ids to label names before training."
            )
        if not allow_empty and not value.strip():
            raise DataError(
                f"Row {index}, column {column!r} is empty: expected a non-empty string. Fix: fill or drop the row."
            )
    return values


def _check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
        raise DataError(f"max_length={max_length!r}: expected a positive int. Fix: pass e.g. max_length=64.")


def _eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"The tokenizer {type(tokenizer).__name__} has no EOS token: the recipes end every target with EOS. "
            "Fix: set tokenizer.eos_token (BLOOM's is '</s>')."
        )
    return int(tokenizer.eos_token_id)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _task_values(rows: Rows, task_column: str | None) -> list[Any] | None:
    if task_column is None:
        return None
    return _column_values(rows, task_column, "--task-column")


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
        return _encode(tokenizer, [classification_prompt(text_column, text[start:].lstrip())])[0]

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
    _check_rows(rows)
    _check_max_length(max_length)
    eos_token_id = _eos_token_id(tokenizer)
    texts = _text_values(rows, text_column, "--text-column", allow_empty=True)
    labels = _text_values(rows, label_column, "--label-column", allow_empty=False)

    target_ids = [ids + [eos_token_id] for ids in _encode(tokenizer, labels)]
    empty_prompt_length = len(_encode(tokenizer, [classification_prompt(text_column, "")])[0])
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
    full_prompts = _encode(tokenizer, [classification_prompt(text_column, text) for text in texts])
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
            is not a string or a label is empty; the tokenizer has no EOS; or the longest label + EOS + the
            prompt with no text exceeds ``max_length`` (the message names the row, the label's length and
            ``max_length``).
    """
    prompt_ids, _, target_ids = _classification_parts(rows, tokenizer, text_column, label_column, max_length)
    tasks = _task_values(rows, task_column)
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
    tasks = _task_values(rows, task_column)
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
            string, the tokenizer has no EOS, or ``max_length`` is not a positive int.
    """
    _check_rows(rows)
    _check_max_length(max_length)
    eos_token_id = _eos_token_id(tokenizer)
    texts = _text_values(rows, text_column, "--text-column", allow_empty=True)
    tasks = _task_values(rows, task_column)
    examples = []
    for index, text_ids in enumerate(_encode(tokenizer, texts)):
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


# --- Padding ----------------------------------------------------------------------------------------------------


def collate(
    examples: Sequence[Mapping[str, Any]],
    *,
    pad_token_id: int,
    padding: Literal["longest", "max_length"] = "longest",
    max_length: int | None = None,
    padding_side: Literal["left", "right"] = "left",
) -> dict[str, Any]:
    """Pads examples into a batch.

    ``input_ids`` are padded with ``pad_token_id``, ``attention_mask`` with 0 and ``labels`` with -100, so padding
    is neither attended to nor scored. Other fields (``task``, ``label_text``, ``label_ids``, ...) are gathered
    into lists, one entry per example. Examples are never truncated here; the recipes already cut them.

    Args:
        examples: Dicts from a recipe; each has ``input_ids`` and may have ``attention_mask`` (ones when absent)
            and ``labels`` (all examples or none).
        pad_token_id: Id written into padded ``input_ids`` positions (``tokenizer.pad_token_id``).
        padding: ``"longest"`` pads to the longest example of the batch; ``"max_length"`` pads every batch to
            ``max_length`` (the seed recipe's fixed shape).
        max_length: Upper bound on example length, checked in both modes; required for ``"max_length"``.
        padding_side: ``"left"`` (default: generation continues after the last real token) or ``"right"``.

    Returns:
        ``input_ids [B, T]``, ``attention_mask [B, T]`` and, when the examples have labels, ``labels [B, T]``,
        all ``torch.long``; plus one list of B values per other field.

    Raises:
        DataError: ``examples`` is empty; an option is invalid; an example lacks ``input_ids``, has fields of
            different lengths, or is longer than ``max_length``; only some examples have ``labels`` or another
            field.
    """
    if len(examples) == 0:
        raise DataError("examples is empty: expected at least one example. Fix: drop empty batches.")
    if padding not in ("longest", "max_length"):
        raise DataError(f"padding={padding!r}: expected 'longest' or 'max_length'. Fix: pass one of those.")
    if padding_side not in ("left", "right"):
        raise DataError(f"padding_side={padding_side!r}: expected 'left' or 'right'. Fix: pass one of those.")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise DataError(
            f"pad_token_id={pad_token_id!r}: expected a non-negative int. Fix: pass tokenizer.pad_token_id "
            "(set tokenizer.pad_token first if it is None)."
        )
    if max_length is not None:
        _check_max_length(max_length)
    elif padding == "max_length":
        raise DataError("padding='max_length' needs max_length. Fix: pass max_length=... or padding='longest'.")

    field_names = list(examples[0].keys())
    for index, example in enumerate(examples):
        if "input_ids" not in example:
            raise DataError(
                f"Example {index} has no 'input_ids' (fields: {list(example.keys())}). "
                "Fix: build examples with a softprompt.data recipe."
            )
        if set(example.keys()) - {"attention_mask"} != set(field_names) - {"attention_mask"}:
            raise DataError(
                f"Example {index} has fields {sorted(example.keys())} but example 0 has {sorted(field_names)}: "
                "expected the same fields in every example. Fix: do not mix examples from different recipes."
            )
        length = len(example["input_ids"])
        for name in ("attention_mask", "labels"):
            if name in example and len(example[name]) != length:
                raise DataError(
                    f"Example {index}: {name} has {len(example[name])} entries but input_ids has {length}. "
                    "Fix: keep the per-token fields the same length."
                )
        if max_length is not None and length > max_length:
            raise DataError(
                f"Example {index} has {length} tokens, more than max_length={max_length}. "
                "Fix: build the examples with the same max_length, or raise max_length."
            )

    lengths = [len(example["input_ids"]) for example in examples]
    target_length = max_length if padding == "max_length" else max(lengths)
    has_labels = "labels" in examples[0]

    def pad(values: Sequence[int], fill: int) -> list[int]:
        filler = [fill] * (target_length - len(values))
        return filler + list(values) if padding_side == "left" else list(values) + filler

    batch: dict[str, Any] = {
        "input_ids": torch.tensor([pad(example["input_ids"], pad_token_id) for example in examples], dtype=torch.long),
        "attention_mask": torch.tensor(
            [pad(example.get("attention_mask", [1] * len(example["input_ids"])), 0) for example in examples],
            dtype=torch.long,
        ),
    }
    if has_labels:
        batch["labels"] = torch.tensor([pad(example["labels"], IGNORE_INDEX) for example in examples], dtype=torch.long)
    for name in field_names:
        if name not in TENSOR_FIELDS:
            batch[name] = [example[name] for example in examples]
    return batch
