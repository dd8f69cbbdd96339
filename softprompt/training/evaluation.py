"""Evaluation: held-out loss, perplexity and label accuracy, and a few generations for people to read.

Loss and perplexity are means over labelled tokens, per adapter and overall; accuracy is the share of held-out
classification prompts whose greedily generated text is the label (`softprompt.recipes.label_accuracy`), and rank
accuracy the share whose label the model scores highest among the dataset's labels
(`softprompt.training.rank_classification`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from softprompt.data import DataError, collate
from softprompt.methods import method_of
from softprompt.model import SoftPromptModel
from softprompt.recipes import label_accuracy, merged_label_choices
from softprompt.training.base_model import cpu_threads, default_threads, load_adapters
from softprompt.training.config import TrainConfig
from softprompt.training.examples import PreparedData, prepare_data
from softprompt.training.method_data import row_task_ids
from softprompt.training.prepared import batch_task_ids
from softprompt.training.rank_classification import label_log_likelihoods, rank_labels


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """CUDA autocast to `dtype`, or nothing when `dtype` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_autocast(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``mixed_precision`` means on `device` (None on CPU or with ``no``)."""
    if device.type != "cuda" or mixed_precision == "no":
        return None
    if mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A collated batch with its tensors on `device`."""
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


@torch.no_grad()
def evaluate(
    model: SoftPromptModel,
    tokenizer: Any,
    data: PreparedData,
    batch_size: int,
    padding: str = "longest",
    max_length: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss, perplexity and (classification) accuracy on the held-out examples.

    Args:
        model: the model with every adapter named by the examples' ``task`` loaded.
        tokenizer: for pad / EOS ids and decoding generated labels.
        data: `prepare_data`'s output; ``eval`` and ``eval_prompts`` are used, and its ``loss``.
        batch_size: rows per batch.
        padding: ``longest`` or ``max_length`` (then ``max_length`` is needed).
        max_length: the recipes' ``max_length``.
        autocast_dtype: CUDA autocast dtype, or None.
        progress: show a tqdm bar.

    Returns:
        ``loss`` (mean over labelled tokens; for context distillation, over distilled positions), ``perplexity``
        (None if it overflows), ``accuracy`` and ``rank_accuracy`` (classification; None otherwise),
        ``loss_by_adapter`` and ``examples``.
    """
    was_training = model.training
    model.eval()
    device = model.base_model.get_input_embeddings().weight.device
    loss_sums = dict.fromkeys(data.adapter_names, 0.0)
    counts = dict.fromkeys(data.adapter_names, 0)
    batches = range(0, len(data.eval), batch_size)
    for start in tqdm(batches, desc="eval loss", leave=False, disable=not progress):
        rows = data.eval[start : start + batch_size]
        batch = to_device(collate(rows, pad_token_id=tokenizer.pad_token_id, padding=padding, max_length=max_length),
                           device)
        names = batch["task"]
        # One forward per adapter present, so each adapter's loss is known; a mixed batch would give only the sum.
        for name in dict.fromkeys(names):
            keep = [n == name for n in names]
            adapter_rows = {key: value[torch.tensor(keep, device=device)] if torch.is_tensor(value) else
                            [item for item, kept in zip(value, keep) if kept] for key, value in batch.items()}
            with autocast(device, autocast_dtype):
                loss, per_row = data.loss(model, adapter_rows)
            count = int(per_row.sum())
            if count:
                loss_sums[name] += float(loss)
                counts[name] += count
    total = sum(counts.values())
    loss = sum(loss_sums.values()) / total if total else float("nan")
    result: dict[str, Any] = {
        "loss": loss,
        "perplexity": math.exp(loss) if math.isfinite(loss) and loss < 700 else None,
        "accuracy": None,
        "rank_accuracy": None,
        "loss_by_adapter": {name: loss_sums[name] / counts[name] for name in counts if counts[name]},
        "examples": len(data.eval),
    }
    if data.eval_prompts:
        predictions = generate_labels(model, tokenizer, data.eval_prompts, batch_size, autocast_dtype, progress)
        gold = [row["label_text"] for row in data.eval_prompts]
        result["accuracy"] = label_accuracy(predictions, gold)
        scores = label_log_likelihoods(model, tokenizer, data.eval_prompts, data.label_choices, batch_size,
                                       autocast_dtype, progress)
        ranked = rank_labels(data.eval_prompts, data.label_choices, scores)
        result["rank_accuracy"] = label_accuracy(ranked, gold)
    model.train(was_training)
    return result


@torch.no_grad()
def generate_labels(
    model: SoftPromptModel,
    tokenizer: Any,
    prompts: Sequence[dict[str, Any]],
    batch_size: int,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> list[str]:
    """Greedy labels for classification prompts (`softprompt.recipes.classification_eval_examples`), decoded.

    Generates ``max(len(label_ids))`` new tokens from the left-padded prompts, stopping at EOS, and decodes only
    the new tokens, special tokens skipped.
    """
    device = model.base_model.get_input_embeddings().weight.device
    max_new_tokens = max(len(row["label_ids"]) for row in prompts)
    predictions: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="eval accuracy", leave=False, disable=not progress):
        rows = prompts[start : start + batch_size]
        batch = to_device(collate(rows, pad_token_id=tokenizer.pad_token_id, padding_side="left"), device)
        with autocast(device, autocast_dtype):
            output = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                adapter_names=batch["task"],
                task_ids=batch_task_ids(batch),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        predictions += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return predictions


@torch.no_grad()
def generate_texts(
    model: SoftPromptModel,
    tokenizer: Any,
    prompts: Sequence[str],
    adapter_name: str | None,
    task_id: int | None = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Generates a continuation of each prompt with one adapter (None: the base model alone).

    Args:
        prompts: the texts to continue.
        adapter_name: the loaded adapter to use.
        task_id: the task of every prompt, for a multitask adapter.
        **generate_kwargs: passed to `SoftPromptModel.generate` (``max_new_tokens``, ``do_sample``, ...).

    Returns:
        The generated text of each prompt (new tokens only, special tokens skipped).

    Raises:
        ValueError: no prompts, a prompt that is not text or encodes to no token, or bad decoding options.
    """
    device = model.base_model.get_input_embeddings().weight.device
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts={prompts!r}: expected a non-empty list of texts. Fix: pass e.g. ['Tweet text : hi Label : '].")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompts[{index}]={prompt!r}: expected a text. Fix: pass strings (--prompt TEXT).")
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    for index, ids in enumerate(encoded):
        if not ids:
            raise ValueError(
                f"prompt {index + 1} ({prompts[index]!r}) encodes to no token: expected some text to continue. Fix: "
                "pass a non-empty --prompt, e.g. --prompt 'Tweet text : my order never arrived Label : '."
            )
    batch = to_device(collate([{"input_ids": ids} for ids in encoded], pad_token_id=tokenizer.pad_token_id), device)
    generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    output = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        adapter_names=[adapter_name] * len(prompts),
        task_ids=None if task_id is None else torch.full((len(prompts),), task_id),
        **generate_kwargs,
    )
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def sample_generations(
    model: SoftPromptModel, tokenizer: Any, data: PreparedData, count: int, max_new_tokens: int = 16
) -> list[dict[str, Any]]:
    """A few held-out examples with what the model generates for them, for people to read.

    Classification: the prompt, the greedy label and the gold label. Causal LM: the first half (at most 8 tokens)
    of a held-out text, its greedy continuation and the real one.
    """
    if count == 0 or not data.eval:
        return []
    samples = []
    if data.eval_prompts:
        rows = data.eval_prompts[:count]
        predicted = generate_labels(model, tokenizer, rows, batch_size=count)
        for row, output in zip(rows, predicted):
            samples.append({"adapter": row["task"], "prompt": tokenizer.decode(row["input_ids"]), "output": output,
                            "reference": row["label_text"]})
        return samples
    for row in data.eval[:count]:
        ids = [token for token in row["input_ids"] if token != tokenizer.eos_token_id]
        cut = max(1, min(8, len(ids) // 2))
        prompt, rest = tokenizer.decode(ids[:cut]), tokenizer.decode(ids[cut:])
        output = generate_texts(model, tokenizer, [prompt], row["task"], row.get("task_id"),
                                max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.3)[0]
        samples.append({"adapter": row["task"], "prompt": prompt, "output": output, "reference": rest})
    return samples


def evaluate_adapters(
    adapters: dict[str, str | Path],
    config: TrainConfig,
    model_name: str | None = None,
    split: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluates saved adapters on a dataset: loss, perplexity and (classification) accuracy.

    Rows use the adapter of their task; with one adapter, every row uses it (or, if the adapter's name is one of
    the data's tasks, only that task's rows are evaluated).

    Args:
        adapters: adapter name -> directory.
        config: the data settings (a training run's config, with any overrides).
        model_name: the base; None: the one the adapters record.
        split: evaluate every row of this split; None: the held-out rows of ``config`` (as in training).
        progress: show tqdm bars.

    Returns:
        `evaluate`'s dict, plus ``base_model`` and ``adapters``.
    """
    model, tokenizer, base_name = load_adapters(adapters, model_name, config.execution.device)
    threads = config.execution.num_threads
    threads = threads if threads is not None else default_threads(model.base_model)
    with cpu_threads(threads):
        data = prepare_data(config, tokenizer, whole_split=split, base_model=model.base_model)
        names = list(adapters)
        multitask = [name for name in names if method_of(model.adapter_configs[name]).takes_task_ids]
        if multitask and len(names) > 1:
            raise ValueError(
                f"--adapter {multitask[0]} is a multitask adapter (its rows' tasks are task ids, not adapters) among "
                f"{names}. Fix: evaluate it alone."
            )
        if multitask:  # every row uses it, with the task id of its task, by the names the adapter records
            rows = data.eval + data.eval_prompts
            data.label_choices = {names[0]: merged_label_choices(data.label_choices, {row["task"] for row in rows})}
            for row, task_id in zip(rows, row_task_ids(model.adapter_configs[names[0]], [row["task"] for row in rows])):
                row.update(task_id=task_id, task=names[0])
        if len(names) == 1:
            only = names[0]
            if only in data.adapter_names:
                data.eval = [row for row in data.eval if row["task"] == only]
                data.eval_prompts = [row for row in data.eval_prompts if row["task"] == only]
            # The rows evaluated all use this adapter now: its candidates are the labels of their tasks.
            tasks = {row["task"] for row in data.eval_prompts}
            data.label_choices = {only: merged_label_choices(data.label_choices, tasks)}
            for row in data.eval + data.eval_prompts:
                row["task"] = only
            data.adapter_names = [only]
        else:
            missing = sorted({row["task"] for row in data.eval} - set(names))
            if missing:
                raise ValueError(
                    f"The data's tasks {missing} have no adapter among {names}. Fix: pass --adapter TASK=DIR for each "
                    "task, or evaluate one adapter at a time."
                )
            data.adapter_names = sorted({row["task"] for row in data.eval})
        if not data.eval:
            raise DataError("No evaluation rows. Fix: pass --split, or a run whose eval_fraction is above 0.")
        autocast_dtype = resolve_autocast(config.execution.mixed_precision, model.base_model.device)
        result = evaluate(model, tokenizer, data, config.optimization.eval_batch_size, config.data.padding,
                          config.data.max_length, autocast_dtype, progress=progress)
    return {**result, "base_model": base_name, "adapters": {name: str(path) for name, path in adapters.items()}}
