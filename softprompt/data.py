"""Data in and batches out: load rows, read their columns, pad examples into batches.

- `load_rows`: a local ``.csv``/``.json``/``.jsonl``/``.parquet`` file or a Hugging Face Hub dataset name, loaded
  with ``datasets.load_dataset``.
- `collate`: pads a list of examples into ``[B, T]`` tensors, dynamically (longest in the batch) or to a fixed
  length, on the left (the default, as the seed recipes and generation want) or on the right.
- the column readers the recipes use (`softprompt.recipes`), with errors that name the column and the flag.

Every example is a dict of plain lists (``input_ids``, ``attention_mask`` and, for training, ``labels``) plus
optional non-tensor fields such as ``task`` (a string naming the adapter in multi-adapter training), which
`collate` passes through as a list.

Token ids are produced with ``add_special_tokens=False``: BLOOM's tokenizer adds no BOS/EOS by itself and the
recipes add EOS explicitly, so a tokenizer that does add special tokens cannot change the layout.

Shapes: B batch, T tokens.
"""

from __future__ import annotations

import json
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


def _diagnose_text_file(path: pathlib.Path, builder: str) -> str | None:
    """Why a CSV or JSON file could not be read, in words naming the line, or None when no cause is found here.

    ``datasets`` reports most unreadable files as "An error occurred while generating the dataset": the encoding
    and, for JSON Lines, the first malformed line are found by reading the file once more, line by line.
    """
    if builder not in ("csv", "json"):
        return None
    with path.open("rb") as file:
        start = file.read(4)
    if start[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "it is UTF-16 text (it starts with a UTF-16 byte-order mark): expected UTF-8. Fix: save it as UTF-8."
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                return (f"line {number} is not UTF-8 ({error.reason} at byte {error.start}): expected UTF-8 text. "
                        "Fix: save the file as UTF-8.")
            if builder == "json" and text.strip() and not start.lstrip().startswith(b"["):  # JSON Lines
                try:
                    record = json.loads(text)
                except (json.JSONDecodeError, RecursionError) as error:
                    return (f"line {number} is not a JSON record ({getattr(error, 'msg', 'nested too deeply')}): "
                            "expected one JSON object per line. Fix: correct or remove that line.")
                if not isinstance(record, dict):
                    return (f"line {number} holds a JSON {type(record).__name__}: expected one JSON object per line "
                            "(column name -> value). Fix: correct or remove that line.")
    return None


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
        if path.is_dir():
            raise DataError(f"Data file {str(path)!r} is a folder: expected a {path.suffix} file. Fix: pass the file's "
                            "path, or a Hub dataset name.")
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
            cause = _diagnose_text_file(path, builder)
            if cause is not None:
                raise DataError(f"Could not read {str(path)!r} as {builder}: {cause}") from None
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


def column_names(rows: Rows) -> list[str]:
    if isinstance(rows, datasets.Dataset):
        return list(rows.column_names)
    return list(rows[0].keys()) if len(rows) > 0 else []


def check_rows(rows: Rows) -> None:
    if isinstance(rows, (str, bytes)) or not isinstance(rows, (datasets.Dataset, Sequence)):
        raise DataError(
            f"rows of type {type(rows).__name__}: expected a datasets.Dataset or a list of row dicts. "
            "Fix: pass the result of load_rows(...)."
        )
    if len(rows) == 0:
        raise DataError("rows is empty: expected at least one row. Fix: pass a dataset with data.")


def column_values(rows: Rows, column: str, flag: str) -> list[Any]:
    """The values of ``column``, one per row; ``flag`` is the command-line option that names the column."""
    available = column_names(rows)
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


def text_values(rows: Rows, column: str, flag: str) -> list[str]:
    """The non-empty strings of a text or label column (an empty text teaches nothing and an empty label cannot
    be generated, so both are refused alike)."""
    values = column_values(rows, column, flag)
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise DataError(
                f"Row {index}, column {column!r}: expected text, got {value!r} ({type(value).__name__}). "
                "Fix: fill or drop rows with missing values, and map class ids to label names before training."
            )
        if not value.strip():
            raise DataError(
                f"Row {index}, column {column!r} is empty: expected a non-empty string. Fix: fill or drop the row."
            )
    return values


def check_max_length(max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= 0:
        raise DataError(f"max_length={max_length!r}: expected a positive int. Fix: pass e.g. max_length=64.")


def tokenizer_eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"The tokenizer {type(tokenizer).__name__} has no EOS token: the recipes end every target with EOS. "
            "Fix: set tokenizer.eos_token (BLOOM's is '</s>')."
        )
    return int(tokenizer.eos_token_id)


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Each text's token ids, the text read as text: no special tokens added, and a special-token string in it
    (``</s>``, ``<|im_end|>``) split into ordinary tokens, never turned into the control token it spells."""
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]]


def task_values(rows: Rows, task_column: str | None) -> list[Any] | None:
    if task_column is None:
        return None
    return column_values(rows, task_column, "--task-column")


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
        check_max_length(max_length)
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
