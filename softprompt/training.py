"""The training loop, and what it needs around it: the base model, the data, evaluation, metrics and the plot.

`train(config)` runs one `TrainConfig` end to end:

1. loads the frozen base (a hub id or local directory, or the embedded tiny BLOOM), builds one soft-prompt
   adapter per task (one task unless several datasets or a task column are given);
2. prepares the data with the recipes of `softprompt.data` (classification as generation when a label column is
   given, causal LM otherwise) and holds out a seeded fraction for evaluation;
3. trains with AdamW over the adapters' tensors only, a linear warmup + decay schedule, gradient accumulation and
   per-adapter clipping, under CUDA autocast (bf16/fp16) when on a GPU, the prompts staying fp32;
4. evaluates before training and after every epoch (loss, perplexity and, for classification, the accuracy of the
   greedily generated label), appends every step's and every evaluation's metrics to ``metrics.jsonl``;
5. writes a checkpoint every ``save_every`` steps and at every epoch end (`softprompt.checkpoint`), resumable
   bit for bit on CPU;
6. saves the final adapter(s), ``curves.png`` and returns a `TrainResult`.

Losses are token sums divided by the labelled-token count of the whole optimizer step (all micro-batches, all
processes), per adapter: each adapter's gradient is the mean over its own labelled tokens in the step. So the
gradient of a step does not depend on how its rows are split into micro-batches or processes:
1 process x 8 rows, 1 process x 4 rows x 2 accumulation steps and 2 processes x 4 rows compute the same update.

Several processes (``torchrun``): every process holds the frozen base and the adapters; each step, the gradients of
the adapters' tensors (and the step's loss and token counts) are summed over processes with one ``all_reduce``.
That is what DistributedDataParallel does for the trainable tensors, written out: DDP would have to wrap a module
whose ``forward`` is the one that uses the parameters, but `SoftPromptModel` calls its prompt modules inside its
own injection; the adapters are small (thousands to millions of values), so one flat all-reduce per optimizer step
(not per micro-batch, which DDP needs ``no_sync`` to avoid) costs nothing next to the frozen base's compute.
Only rank 0 evaluates, writes checkpoints, metrics, the plot and the adapters.

Nothing here prints: progress goes to tqdm bars and to the ``on_event`` callback, which the CLI prints.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from softprompt.adapter_format import CONFIG_FILE as ADAPTER_CONFIG_FILE
from softprompt.adapter_format import load_adapter_module
from softprompt.files import atomic_write_bytes
from softprompt.checkpoint import (
    Checkpoint,
    complete_checkpoint_directories,
    latest_checkpoint,
    remove_all_checkpoints,
    remove_temporary_checkpoints,
    restore_training_state,
    save_checkpoint,
)
from softprompt.data import (
    DataError,
    causal_lm_examples,
    classification_eval_examples,
    classification_examples,
    collate,
    label_accuracy,
    load_rows,
)
from softprompt.model import SoftPromptModel
from softprompt.multi_task import labelled_positions, make_trainable, multi_adapter_loss
from softprompt.train_config import (
    RESUME_FREE_FIELDS,
    RESUME_PLACEMENT_FIELDS,
    ConfigError,
    TrainConfig,
    adapter_name_for_source,
)

Event = dict[str, Any]
"""What the loop reports to ``on_event``: a dict with an ``"event"`` key (start, resumed, eval, checkpoint, done)."""

BASE_MODEL_DIR = "base-model"
"""Where a run on the embedded tiny BLOOM saves it (and its tokenizer), for ``softprompt eval/generate``."""
ADAPTER_DIR = "adapter"
"""The final adapter of a one-adapter run: ``output_dir/adapter``."""
ADAPTERS_DIR = "adapters"
"""The final adapters of a multi-adapter run: ``output_dir/adapters/<task>``."""
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
CONFIG_FILE = "train_config.json"
DEFAULT_ADAPTER_NAME = "default"

# The embedded base: small enough to train in seconds on 2 CPU cores, and initialized with a larger weight scale
# than BLOOM's 0.02 so that its random next-token distributions are not flat, which is what lets a soft prompt
# move them (with 0.02 the eval loss does not move at all).
TINY_HIDDEN_SIZE = 64
TINY_NUM_LAYERS = 2
TINY_NUM_HEADS = 4
TINY_INITIALIZER_RANGE = 0.3
SMALL_MODEL_PARAMETERS = 5_000_000
"""Below this many base parameters, CPU runs use one thread by default (see `TrainConfig.num_threads`)."""


class TrainingDivergedError(RuntimeError):
    """The loss (or gradient norm) became NaN or infinite; training stopped before touching the adapters."""


@dataclass
class TrainResult:
    """What a finished run produced."""

    output_dir: Path
    """The run's directory."""
    adapter_directories: dict[str, Path]
    """Final adapter directory of each adapter, by adapter name."""
    metrics_path: Path
    """The JSONL metrics file."""
    plot_path: Path | None
    """The loss/accuracy PNG (None where matplotlib could not draw it)."""
    base_model: str
    """What ``--model`` to pass to reload the base: a hub id or a directory."""
    initial_eval: dict[str, Any] | None
    """The metrics record of the evaluation before training (None when evaluation is off; on rank 0 only)."""
    final_eval: dict[str, Any] | None
    """The metrics record of the evaluation after the last epoch (None when evaluation is off; rank 0 only)."""
    generations: list[dict[str, Any]] = field(default_factory=list)
    """A few held-out examples: ``prompt``, ``output`` (generated), ``reference`` and ``adapter``."""
    global_step: int = 0
    """Optimizer steps done in total."""
    elapsed_seconds: float = 0.0
    """Wall time of this process's call."""
    resumed_from: Path | None = None
    """The checkpoint the run continued from, if any."""


# =============================================================================================== base model


def load_base_model(
    name_or_path: str | None, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any]:
    """Loads a causal LM and its tokenizer (left padding, a pad token), or builds the embedded tiny BLOOM.

    Args:
        name_or_path: hub id or local directory; None for the embedded tiny BLOOM (random weights, seeded).
        dtype: dtype of the base's weights.

    Returns:
        (model in eval mode, tokenizer). A local directory is recorded as an absolute path in the model's config,
        so adapters saved from it point back to it.

    Raises:
        ValueError: the model or tokenizer cannot be loaded (the message says how to fix it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from softprompt.quickstart import build_tiny_bloom, build_tokenizer

    if name_or_path is None:
        tokenizer = build_tokenizer(padding_side="left")
        model = build_tiny_bloom(
            len(tokenizer),
            hidden_size=TINY_HIDDEN_SIZE,
            n_layer=TINY_NUM_LAYERS,
            n_head=TINY_NUM_HEADS,
            seed=0,
            initializer_range=TINY_INITIALIZER_RANGE,
        )
        return model.to(dtype).eval(), tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    except Exception as error:  # OSError offline, ValueError for unknown architectures, ...: one message for all
        raise ValueError(
            f"Could not load the model {name_or_path!r}: {type(error).__name__}: {error}. Fix: check the hub id or "
            "the local directory and the network; offline, pass a local directory, or leave --model out to use the "
            "embedded tiny BLOOM."
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if Path(name_or_path).is_dir():
        model.config._name_or_path = str(Path(name_or_path).resolve())
    return model.eval(), tokenizer


def resolve_base_model(adapter_directory: str | Path) -> str:
    """The base model an adapter was trained on, as a ``--model`` value.

    Reads ``base_model.name_or_path`` from the adapter's config. A recorded directory that no longer exists (a
    moved run) is looked for as ``base-model/`` beside the adapter or beside its parent (``adapters/<task>``).

    Raises:
        ValueError: nothing usable is recorded and no ``base-model/`` is found (the fix: pass --model).
    """
    directory = Path(adapter_directory)
    config_path = directory / ADAPTER_CONFIG_FILE
    try:
        recorded = json.loads(config_path.read_text()).get("base_model", {}).get("name_or_path")
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{config_path}: cannot read the adapter config ({error}). Fix: pass the directory save_adapter wrote."
        ) from None
    if recorded and Path(recorded).is_dir():
        return recorded
    for candidate in (directory.parent / BASE_MODEL_DIR, directory.parent.parent / BASE_MODEL_DIR):
        if (candidate / "config.json").is_file():
            return str(candidate)
    # Not a directory here: a hub id ("org/name") is used as is; a path that is gone cannot be.
    if recorded and not Path(recorded).is_absolute() and not recorded.startswith(".") and recorded.count("/") <= 1:
        return recorded
    raise ValueError(
        f"{config_path}: the base model it was trained on ({recorded!r}) is not available here. Fix: pass --model "
        "with the hub id or local directory of that base."
    )


def default_threads(model: torch.nn.Module) -> int | None:
    """1 for models under `SMALL_MODEL_PARAMETERS` parameters (their matrices are too small to gain from threads,
    and idle threads spinning on a busy machine slow every step), None (torch's default) otherwise."""
    parameters = sum(parameter.numel() for parameter in model.parameters())
    return 1 if parameters < SMALL_MODEL_PARAMETERS else None


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """Sets torch's CPU thread count for the block (None: unchanged), then restores it."""
    previous = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# =============================================================================================== data


@dataclass
class PreparedData:
    """Token ids ready for `collate`; every example carries ``task``, the name of the adapter that trains on it."""

    kind: str
    """``classification`` or ``causal_lm``."""
    adapter_names: list[str]
    """One adapter per task, sorted."""
    train: list[dict[str, Any]]
    """Training examples."""
    eval: list[dict[str, Any]]
    """Held-out examples with labels (loss, perplexity)."""
    eval_prompts: list[dict[str, Any]]
    """Classification only: the held-out prompts with ``label_text`` / ``label_ids`` (accuracy)."""


def prepare_data(config: TrainConfig, tokenizer: Any, whole_split: str | None = None) -> PreparedData:
    """Loads the configured data and builds training and evaluation examples.

    Args:
        config: data fields: dataset(s), config, split, eval split or fraction, columns, max_length, seed.
        tokenizer: the base model's tokenizer.
        whole_split: evaluate on every row of this split instead (``softprompt eval --split``); no training rows.

    Raises:
        DataError: a source, column or row cannot be used (see `softprompt.data`).
    """
    from softprompt.quickstart import shipped_dataset_path

    sources = config.dataset or [str(shipped_dataset_path("complaints"))]
    text_columns = config.resolved_text_columns
    label_column = config.resolved_label_column
    several = len(sources) > 1
    kind = "classification" if label_column is not None else "causal_lm"
    train: list[dict[str, Any]] = []
    evaluation: list[dict[str, Any]] = []
    prompts: list[dict[str, Any]] = []
    for index, (source, text_column) in enumerate(zip(sources, text_columns)):
        task = adapter_name_for_source(source) if several else None

        def examples_of(split: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            rows = load_rows(source, config_name=config.dataset_config, split=split)
            return _examples(rows, tokenizer, config, text_column, label_column, task)

        if whole_split is not None:  # `softprompt eval --split`: every row is an evaluation row
            source_eval, source_prompts = examples_of(whole_split)
        elif config.eval_split is not None:
            train += examples_of(config.split)[0]
            source_eval, source_prompts = examples_of(config.eval_split)
        else:
            # Examples are built over all rows before the split so that the classification recipe's prompt budget
            # (set by the longest label) is the same for training and evaluation rows.
            examples, all_prompts = examples_of(config.split)
            held_out = _held_out_indices(len(examples), config.eval_fraction, config.seed + index, source)
            train += [example for i, example in enumerate(examples) if i not in held_out]
            source_eval = [examples[i] for i in sorted(held_out)]
            source_prompts = [all_prompts[i] for i in sorted(held_out)] if all_prompts else []
        evaluation += source_eval
        prompts += source_prompts
    names = sorted({example["task"] for example in train + evaluation})
    for name in names:
        if not isinstance(name, str) or not name or "." in name:
            raise DataError(
                f"Task value {name!r} (column {config.task_column!r}) cannot name an adapter: expected a non-empty "
                "string without '.'. Fix: clean the task column."
            )
    if whole_split is None and not train:
        raise DataError(
            f"No training rows are left after holding out eval_fraction={config.eval_fraction} of {sources}. "
            "Fix: lower --eval-fraction or use more rows."
        )
    return PreparedData(kind=kind, adapter_names=names, train=train, eval=evaluation, eval_prompts=prompts)


def _examples(
    rows: Any, tokenizer: Any, config: TrainConfig, text_column: str, label_column: str | None, task: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(loss examples, classification prompts) for one source; every example gets its ``task``."""
    if label_column is None:
        examples = causal_lm_examples(
            rows, tokenizer, text_column=text_column, max_length=config.max_length, task_column=config.task_column
        )
        prompts: list[dict[str, Any]] = []
    else:
        common = dict(text_column=text_column, label_column=label_column, max_length=config.max_length,
                      task_column=config.task_column)
        examples = classification_examples(rows, tokenizer, **common)
        prompts = classification_eval_examples(rows, tokenizer, **common)
    if config.task_column is None:  # otherwise the recipes copied each row's task already
        for example in examples + prompts:
            example["task"] = task or DEFAULT_ADAPTER_NAME
    return examples, prompts


def _held_out_indices(count: int, fraction: float, seed: int, source: str) -> set[int]:
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


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of the training examples in ``epoch``: a function of (seed, epoch) alone, so every
    process computes the same order and a resumed run continues with the same one."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


# =============================================================================================== evaluation


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
        data: `prepare_data`'s output; ``eval`` and ``eval_prompts`` are used.
        batch_size: rows per batch.
        padding: ``longest`` or ``max_length`` (then ``max_length`` is needed).
        max_length: the recipes' ``max_length``.
        autocast_dtype: CUDA autocast dtype, or None.
        progress: show a tqdm bar.

    Returns:
        ``loss`` (mean over labelled tokens), ``perplexity`` (None if it overflows), ``accuracy`` (None for causal
        LM), ``loss_by_adapter`` and ``examples``.
    """
    was_training = model.training
    model.eval()
    device = model.base_model.get_input_embeddings().weight.device
    loss_sums = dict.fromkeys(data.adapter_names, 0.0)
    counts = dict.fromkeys(data.adapter_names, 0)
    batches = range(0, len(data.eval), batch_size)
    for start in tqdm(batches, desc="eval loss", leave=False, disable=not progress):
        rows = data.eval[start : start + batch_size]
        batch = _to_device(collate(rows, pad_token_id=tokenizer.pad_token_id, padding=padding, max_length=max_length),
                           device)
        names = batch["task"]
        per_row = labelled_positions(model, batch["labels"], names)
        if int(per_row.sum()) == 0:
            continue
        # One forward per adapter present, so each adapter's loss is known; a mixed batch would give only the sum.
        for name in dict.fromkeys(names):
            keep = torch.tensor([n == name for n in names], device=device)
            with _autocast(device, autocast_dtype):
                loss = model.compute_loss(
                    batch["input_ids"][keep], batch["attention_mask"][keep], batch["labels"][keep],
                    [name] * int(keep.sum()),
                )
            count = int(per_row[keep].sum())
            if count:
                loss_sums[name] += float(loss) * count
                counts[name] += count
    total = sum(counts.values())
    loss = sum(loss_sums.values()) / total if total else float("nan")
    result: dict[str, Any] = {
        "loss": loss,
        "perplexity": math.exp(loss) if math.isfinite(loss) and loss < 700 else None,
        "accuracy": None,
        "loss_by_adapter": {name: loss_sums[name] / counts[name] for name in counts if counts[name]},
        "examples": len(data.eval),
    }
    if data.eval_prompts:
        predictions = generate_labels(model, tokenizer, data.eval_prompts, batch_size, autocast_dtype, progress)
        result["accuracy"] = label_accuracy(predictions, [row["label_text"] for row in data.eval_prompts])
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
    """Greedy labels for classification prompts (`softprompt.data.classification_eval_examples`), decoded.

    Generates ``max(len(label_ids))`` new tokens from the left-padded prompts, stopping at EOS, and decodes only
    the new tokens, special tokens skipped.
    """
    device = model.base_model.get_input_embeddings().weight.device
    max_new_tokens = max(len(row["label_ids"]) for row in prompts)
    predictions: list[str] = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="eval accuracy", leave=False, disable=not progress):
        rows = prompts[start : start + batch_size]
        batch = _to_device(collate(rows, pad_token_id=tokenizer.pad_token_id, padding_side="left"), device)
        with _autocast(device, autocast_dtype):
            output = model.generate(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                adapter_names=batch["task"],
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
    **generate_kwargs: Any,
) -> list[str]:
    """Generates a continuation of each prompt with one adapter (None: the base model alone).

    Args:
        prompts: the texts to continue.
        adapter_name: the loaded adapter to use.
        **generate_kwargs: passed to `SoftPromptModel.generate` (``max_new_tokens``, ``do_sample``, ...).

    Returns:
        The generated text of each prompt (new tokens only, special tokens skipped).
    """
    device = model.base_model.get_input_embeddings().weight.device
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    batch = _to_device(collate([{"input_ids": ids} for ids in encoded], pad_token_id=tokenizer.pad_token_id), device)
    generate_kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    output = model.generate(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        adapter_names=[adapter_name] * len(prompts),
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
        output = generate_texts(model, tokenizer, [prompt], row["task"], max_new_tokens=max_new_tokens,
                                do_sample=False, repetition_penalty=1.3)[0]
        samples.append({"adapter": row["task"], "prompt": prompt, "output": output, "reference": rest})
    return samples


# =============================================================================================== the loop


def train(config: TrainConfig, on_event: Callable[[Event], None] | None = None) -> TrainResult:
    """Runs one training run end to end (see the module docstring).

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) it joins the process group (gloo on CPU, NCCL on
    CUDA) unless one is already initialized, and leaves it at the end if it joined it.

    Args:
        config: the run's settings.
        on_event: called with progress events (dicts with an ``"event"`` key); rank 0 only.

    Returns:
        The `TrainResult` (on every rank; only rank 0's paths hold files).

    Raises:
        ConfigError: the output directory holds another run (without --resume / --overwrite), or a checkpoint
            to resume from was made with other settings.
        DataError: the data cannot be used.
        TrainingDivergedError: the loss became NaN or infinite (the last checkpoint is left as it was).
        ValueError: the base model cannot be loaded.
    """
    joined = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if config.device != "cpu" and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        joined = True
    try:
        return _Run(config, on_event).run()
    finally:
        if joined:
            dist.destroy_process_group()


class _Run:
    """One call of `train`: the state the loop shares between its steps."""

    def __init__(self, config: TrainConfig, on_event: Callable[[Event], None] | None):
        self.config = config
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.is_main = self.rank == 0
        self._on_event = on_event
        self.output_dir = config.resolved_output_dir
        self.device = _resolve_device(config.device)
        self.autocast_dtype = _resolve_autocast(config.mixed_precision, self.device)

    def emit(self, event: str, **values: Any) -> None:
        if self.is_main and self._on_event is not None:
            self._on_event({"event": event, **values})

    # ------------------------------------------------------------------ setup

    def run(self) -> TrainResult:
        started = time.perf_counter()
        config = self.config
        self._check_output_dir()
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed)
        base, self.tokenizer = load_base_model(config.model, getattr(torch, config.base_dtype))
        threads = config.num_threads if config.num_threads is not None else default_threads(base)
        with cpu_threads(threads if self.device.type == "cpu" else config.num_threads):
            return self._run(base, started)

    def _run(self, base: torch.nn.Module, started: float) -> TrainResult:
        config = self.config
        self._setup(base)
        start_epoch, start_step, global_step = 0, 0, 0
        checkpoint = self._resume_checkpoint() if config.resume else None
        if checkpoint is not None:
            start_epoch, start_step, global_step = self._restore(checkpoint)
            self.metrics.truncate(int(checkpoint.state["metrics_bytes"]))  # drop what was logged after it
            self.emit("resumed", checkpoint=str(checkpoint.directory), step=global_step, epoch=start_epoch)
        else:
            self.metrics.truncate(0)
            self._evaluate(epoch=0, step=0)

        bar = tqdm(total=self.total_steps, initial=global_step, desc=f"train {config.method}", unit="step",
                   disable=not (config.progress and self.is_main), dynamic_ncols=True)
        rows_per_micro_batch = config.batch_size * self.world_size
        accumulation = config.gradient_accumulation_steps
        self.model.train()
        for epoch in range(start_epoch, config.num_epochs):
            order = epoch_order(len(self.data.train), config.seed, epoch)
            if checkpoint is not None and epoch == start_epoch and checkpoint.state["position"]["order"] != order:
                raise ConfigError(
                    f"{checkpoint.directory}: the training data's order differs from the checkpoint's: the data "
                    "changed since it was written. Fix: resume with the same data, or start over with --overwrite."
                )
            # Global micro-batches; process r takes rows [r * batch_size, (r + 1) * batch_size) of each.
            micro_batches = [order[i : i + rows_per_micro_batch] for i in range(0, len(order), rows_per_micro_batch)]
            for step_in_epoch in range(start_step if epoch == start_epoch else 0, self.steps_per_epoch):
                step_started = time.perf_counter()
                group = micro_batches[step_in_epoch * accumulation : (step_in_epoch + 1) * accumulation]
                loss, grad_norm, tokens = self._optimizer_step(group, global_step, epoch)
                global_step += 1
                throughput = tokens / (time.perf_counter() - step_started)
                learning_rate = self.scheduler.get_last_lr()[0]
                self.metrics.append({"event": "train", "epoch": epoch + (step_in_epoch + 1) / self.steps_per_epoch,
                                     "step": global_step, "loss": loss, "lr": learning_rate, "grad_norm": grad_norm,
                                     "tokens_per_second": throughput})
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}", tok_s=f"{throughput:,.0f}")
                if step_in_epoch + 1 == self.steps_per_epoch:
                    self._evaluate(epoch=epoch + 1, step=global_step)
                    self.model.train()
                    # The position is the start of the next epoch, so it carries that epoch's order: the one a
                    # resumed run checks against.
                    next_order = epoch_order(len(self.data.train), config.seed, epoch + 1)
                    self._save(global_step, {"epoch": epoch + 1, "step_in_epoch": 0, "order": next_order})
                elif config.save_every and global_step % config.save_every == 0:
                    self._save(global_step, {"epoch": epoch, "step_in_epoch": step_in_epoch + 1, "order": order})
        bar.close()
        return self._finish(global_step, started, checkpoint)

    def _setup(self, base: torch.nn.Module) -> None:
        """Output directory, data, the model with one adapter per task, optimizer, schedule, grad scaler."""
        config, tokenizer = self.config, self.tokenizer
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.output_dir / CONFIG_FILE, (json.dumps(config.to_dict(), indent=2) + "\n").encode())
        if config.uses_embedded_model:
            base_directory = (self.output_dir / BASE_MODEL_DIR).resolve()
            if self.is_main:
                from softprompt.quickstart import save_tiny_bloom

                save_tiny_bloom(base_directory, tokenizer=tokenizer, model=base)
            base.config._name_or_path = str(base_directory)  # recorded by every adapter saved from this base
        self.base_name = base.config._name_or_path
        self.data = prepare_data(config, tokenizer)
        base.to(self.device)
        names = self.data.adapter_names
        model = SoftPromptModel(base, config.adapter_config(), tokenizer=tokenizer, adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, config.adapter_config(), tokenizer=tokenizer)
        make_trainable(model, names)
        if config.compile is not None:
            model.compile_decoder(mode=config.compile)
        self.model = model
        self.parameters = {name: [p for p in model.prompts[name].parameters() if p.requires_grad] for name in names}
        self._broadcast_parameters()

        micro_batches = math.ceil(len(self.data.train) / (config.batch_size * self.world_size))
        self.steps_per_epoch = math.ceil(micro_batches / config.gradient_accumulation_steps)
        self.total_steps = self.steps_per_epoch * config.num_epochs
        self.optimizer = torch.optim.AdamW(
            [p for group in self.parameters.values() for p in group],
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _linear_schedule(config.warmup_steps, self.total_steps)
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype is torch.float16 else None
        self.metrics = _MetricsLog(self.output_dir / METRICS_FILE, enabled=self.is_main)
        trainable, total = model.num_parameters()
        self.emit("start", output_dir=str(self.output_dir), base_model=self.base_name, device=str(self.device),
                  processes=self.world_size, method=config.method, adapters=names, recipe=self.data.kind,
                  train_examples=len(self.data.train), eval_examples=len(self.data.eval), steps=self.total_steps,
                  trainable_parameters=trainable, total_parameters=total)

    def _finish(self, global_step: int, started: float, checkpoint: Checkpoint | None) -> TrainResult:
        """Final adapters, plot, a few generations, the result."""
        config, data = self.config, self.data
        self.model.eval()
        adapter_directories = self._save_final_adapters()
        initial_eval = final_eval = plot_path = None
        generations: list[dict[str, Any]] = []
        if self.is_main:
            evaluations = [r for r in read_metrics(self.output_dir / METRICS_FILE) if r["event"] == "eval"]
            if evaluations:  # read back, so that a resumed run reports the evaluations of its earlier part too
                initial_eval, final_eval = evaluations[0], evaluations[-1]
            base = "the embedded tiny BLOOM" if config.uses_embedded_model else self.base_name
            plot_path = plot_metrics(self.output_dir / METRICS_FILE, self.output_dir / PLOT_FILE,
                                     f"{config.method} on {base}")
            generations = sample_generations(self.model, self.tokenizer, data, config.num_generations)
        self._barrier()
        result = TrainResult(
            output_dir=self.output_dir, adapter_directories=adapter_directories,
            metrics_path=self.output_dir / METRICS_FILE, plot_path=plot_path, base_model=self.base_name,
            initial_eval=initial_eval, final_eval=final_eval, generations=generations,
            global_step=global_step, elapsed_seconds=time.perf_counter() - started,
            resumed_from=checkpoint.directory if checkpoint is not None else None,
        )
        self.emit("done", result=result)
        return result

    # ------------------------------------------------------------------ one optimizer step

    def _optimizer_step(self, group: list[list[int]], global_step: int, epoch: int) -> tuple[float, float, int]:
        """Accumulates the group's micro-batches, sums over processes, clips, steps. Returns (loss, grad norm,
        tokens)."""
        config, model, data = self.config, self.model, self.data
        names = list(self.parameters)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        counts = torch.zeros(len(names), device=self.device)  # labelled tokens per adapter
        tokens = torch.zeros((), device=self.device)
        for global_rows in group:
            rows = global_rows[self.rank * config.batch_size : (self.rank + 1) * config.batch_size]
            if not rows:  # the epoch's last micro-batch can leave a process without rows
                continue
            batch = _to_device(
                collate([data.train[i] for i in rows], pad_token_id=self.tokenizer.pad_token_id,
                        padding=config.padding, max_length=config.max_length),
                self.device,
            )
            row_names = batch["task"]
            per_row = labelled_positions(model, batch["labels"], row_names)
            for index, name in enumerate(names):
                counts[index] += per_row[[n == name for n in row_names]].sum()
            tokens += batch["attention_mask"].sum()
            if int(per_row.sum()) == 0:
                continue
            with _autocast(self.device, self.autocast_dtype):
                # Each row trains the adapter of its task (batch["task"], one name per row); a one-adapter run is
                # the case where every row names the same adapter. The sum over labelled tokens is divided below,
                # once the step's token count over all micro-batches and processes is known.
                loss = multi_adapter_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                          row_names, reduction="sum", implementation=config.loss_implementation,
                                          virtual_token_layout=config.virtual_token_layout)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            loss_sum += loss.detach().float()

        flat_gradients = [p.grad if p.grad is not None else torch.zeros_like(p)
                          for parameters in self.parameters.values() for p in parameters]
        totals = torch.cat([loss_sum.view(1), tokens.view(1), counts])
        if self.world_size > 1:
            # One collective per step: every adapter gradient, the loss and the counts, summed over processes.
            flat = torch.cat([g.flatten().float() for g in flat_gradients] + [totals])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for gradient in flat_gradients:
                gradient.copy_(flat[offset : offset + gradient.numel()].view_as(gradient))
                offset += gradient.numel()
            totals = flat[offset:]
        loss_sum, tokens, counts = totals[0], totals[1], totals[2:]
        mean_loss = float(loss_sum / counts.sum().clamp(min=1))
        if not math.isfinite(mean_loss):
            self._diverged("loss", mean_loss, global_step + 1, epoch)

        offset = 0
        for parameters, count in zip(self.parameters.values(), counts.tolist()):
            for parameter, gradient in zip(parameters, flat_gradients[offset : offset + len(parameters)]):
                # Token sums become the mean over the step's labelled tokens of this adapter; an adapter without
                # rows in this step gets no update at all (no momentum, no decay), as if trained alone.
                parameter.grad = gradient.div_(count) if count else None
            offset += len(parameters)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        squared_norms = 0.0
        for parameters in self.parameters.values():
            present = [parameter for parameter in parameters if parameter.grad is not None]
            if present:  # clipped per adapter: one adapter's large gradient must not shrink another's update
                norm = torch.nn.utils.clip_grad_norm_(present, config.max_grad_norm or float("inf"))
                squared_norms += float(norm) ** 2
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed, and lowers the scale
            self.scaler.update()
        else:
            if not math.isfinite(squared_norms):
                self._diverged("gradient norm", math.sqrt(squared_norms), global_step + 1, epoch)
            self.optimizer.step()
        self.scheduler.step()
        return mean_loss, math.sqrt(squared_norms), int(tokens)

    def _diverged(self, what: str, value: float, step: int, epoch: int) -> None:
        checkpoints = complete_checkpoint_directories(self.output_dir)
        last = f"The last good checkpoint, {checkpoints[-1]}, is untouched" if checkpoints else "No checkpoint exists"
        raise TrainingDivergedError(
            f"The {what} became {value} at step {step} (epoch {epoch + 1}, learning rate "
            f"{self.scheduler.get_last_lr()[0]:.3g}): training stopped before updating the adapters. {last}. "
            "Fix: lower --learning-rate, keep --max-grad-norm on (e.g. 1.0), or use --mixed-precision no (or "
            "bf16) instead of fp16; then start over with --overwrite."
        )

    # ------------------------------------------------------------------ evaluation, checkpoints, output

    def _evaluate(self, epoch: int, step: int) -> dict[str, Any] | None:
        result = None
        if self.is_main and self.data.eval:
            result = evaluate(self.model, self.tokenizer, self.data, self.config.eval_batch_size,
                              self.config.padding, self.config.max_length, self.autocast_dtype)
            record = {"event": "eval", "epoch": epoch, "step": step,
                      **{key: value for key, value in result.items() if key != "examples"}}
            self.metrics.append(record)
            self.emit("eval", **{key: value for key, value in record.items() if key != "event"})
        self._barrier()
        return result

    def _save(self, step: int, position: dict[str, Any]) -> None:
        if self.is_main:
            directory = save_checkpoint(
                self.output_dir, step,
                save_adapters=lambda target: [self.model.save_adapter(target / name, name) for name in self.parameters],
                optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                position={**position, "global_step": step},
                extra={"metrics_bytes": self.metrics.size, "config": self.config.to_dict()},
                keep_last=self.config.keep_last,
            )
            self.emit("checkpoint", path=str(directory), step=step)
        self._barrier()

    def _save_final_adapters(self) -> dict[str, Path]:
        names = list(self.parameters)
        if len(names) == 1:
            directories = {names[0]: self.output_dir / ADAPTER_DIR}
        else:
            directories = {name: self.output_dir / ADAPTERS_DIR / name for name in names}
        if self.is_main:
            for name, directory in directories.items():
                self.model.save_adapter(directory, name)
        return directories

    def _check_output_dir(self) -> None:
        existing = complete_checkpoint_directories(self.output_dir)
        if self.config.overwrite:
            if self.is_main:  # every process takes this branch; one deletes
                remove_all_checkpoints(self.output_dir)
                for name in (ADAPTER_DIR, ADAPTERS_DIR):
                    shutil.rmtree(self.output_dir / name, ignore_errors=True)
        elif existing and not self.config.resume:
            raise ConfigError(
                f"output_dir={str(self.output_dir)!r} already holds a run ({len(existing)} checkpoint(s), newest "
                f"{existing[-1].name}). Fix: pass --resume to continue it, --overwrite to start over, or another "
                "--output-dir."
            )
        if self.is_main:
            remove_temporary_checkpoints(self.output_dir)
        self._barrier()

    def _resume_checkpoint(self) -> Checkpoint | None:
        checkpoint = latest_checkpoint(
            self.output_dir,
            on_skip=lambda path, error: self.emit("checkpoint_skipped", path=str(path), reason=str(error)),
        )
        if checkpoint is None:
            self.emit("resume_without_checkpoint", output_dir=str(self.output_dir))
            return None
        saved = checkpoint.state.get("config", {})
        current = self.config.to_dict()
        free = RESUME_FREE_FIELDS | RESUME_PLACEMENT_FIELDS | {"output_dir"}
        changed = sorted(key for key in current if key not in free and saved.get(key) != current[key])
        if changed:
            details = "; ".join(f"{key}: {saved.get(key)!r} in the checkpoint, {current[key]!r} now" for key in changed)
            raise ConfigError(
                f"{checkpoint.directory} was written with other settings ({details}). Fix: resume with the same "
                "settings (the run's train_config.json lists them), or start over with --overwrite."
            )
        return checkpoint

    def _restore(self, checkpoint: Checkpoint) -> tuple[int, int, int]:
        for name in self.parameters:
            _, module = load_adapter_module(checkpoint.adapter_directory(name), self.model.base_model)
            self.model.prompts[name].load_state_dict(module.state_dict())
        restore_training_state(checkpoint, self.optimizer, self.scheduler, self.scaler)
        position = checkpoint.state["position"]
        return int(position["epoch"]), int(position["step_in_epoch"]), checkpoint.step

    def _broadcast_parameters(self) -> None:
        """Starts every process from rank 0's adapters (they are seeded alike; this makes it certain)."""
        if self.world_size > 1:
            for parameters in self.parameters.values():
                for parameter in parameters:
                    dist.broadcast(parameter.data, src=0)

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


# =============================================================================================== helpers


def _linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: 0 -> 1 over the warmup steps, then 1 -> 0 at ``total_steps`` (transformers'
    ``get_linear_schedule_with_warmup``)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def _resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA device. Fix: pass --device cpu (or auto).")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _resolve_autocast(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or mixed_precision == "no":
        return None
    if mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mixed_precision]


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}


class _MetricsLog:
    """Appends JSON lines; knows its size so a checkpoint can record it and a resumed run can cut what followed."""

    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.size = 0

    def truncate(self, size: int) -> None:
        if not self.enabled:
            return
        with open(self.path, "ab") as file:
            file.truncate(size)
        self.size = size

    def append(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        line = (json.dumps(_finite_or_none(record)) + "\n").encode()
        with open(self.path, "ab") as file:
            file.write(line)
            file.flush()
        self.size += len(line)


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN / Infinity: such floats are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (a torn last line from a killed process is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def plot_metrics(metrics_path: str | Path, png_path: str | Path, title: str | None = None) -> Path:
    """Draws training loss per step with evaluation loss, and evaluation accuracy (or perplexity), to a PNG.

    Uses matplotlib's Agg canvas directly, so no global backend is set and no display is needed.

    Args:
        metrics_path: the run's ``metrics.jsonl``.
        png_path: where the PNG goes (written atomically).
        title: the figure's title, e.g. the method and base model.

    Returns:
        ``png_path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = read_metrics(metrics_path)
    train_records = [r for r in records if r["event"] == "train" and r.get("loss") is not None]
    eval_records = [r for r in records if r["event"] == "eval" and r.get("loss") is not None]
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    loss_axes, score_axes = figure.subplots(1, 2)
    loss_axes.plot([r["step"] for r in train_records], [r["loss"] for r in train_records], label="train loss",
                   linewidth=1, alpha=0.7)
    loss_axes.plot([r["step"] for r in eval_records], [r["loss"] for r in eval_records], "o-", label="eval loss")
    loss_axes.set_xlabel("optimizer step")
    loss_axes.set_ylabel("loss (mean over labelled tokens)")
    loss_axes.legend()
    loss_axes.grid(alpha=0.3)
    if any(r.get("accuracy") is not None for r in eval_records):
        score_axes.plot([r["epoch"] for r in eval_records], [r["accuracy"] for r in eval_records], "o-",
                        color="tab:green")
        score_axes.set_ylabel("eval accuracy (greedy label)")
        score_axes.set_ylim(-0.02, 1.02)
    else:
        score_axes.plot([r["epoch"] for r in eval_records], [r.get("perplexity") for r in eval_records], "o-",
                        color="tab:purple")
        score_axes.set_ylabel("eval perplexity")
        score_axes.set_yscale("log")
    score_axes.set_xlabel("epoch")
    score_axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(Path(png_path), buffer.getvalue())
    return Path(png_path)


# =============================================================================================== inference


def load_adapters(
    adapters: dict[str, str | Path], model_name: str | None = None, device: str = "auto"
) -> tuple[SoftPromptModel, Any, str]:
    """Loads saved adapters onto their (one) frozen base for evaluation or generation.

    Args:
        adapters: adapter name -> directory written by training (``output_dir/adapter`` or ``adapters/<task>``).
        model_name: the base (hub id or directory); None: the one the first adapter records (`resolve_base_model`).
        device: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        (model with every adapter loaded, frozen, the first one active; its tokenizer; the base's name).

    Raises:
        ValueError: no adapter given, a base that cannot be found or loaded, or an adapter that does not fit it.
    """
    if not adapters:
        raise ValueError("No adapter given. Fix: pass --adapter DIR (or --adapter name=DIR, several times).")
    items = list(adapters.items())
    base_name = model_name or resolve_base_model(items[0][1])
    base, tokenizer = load_base_model(base_name)
    base.to(_resolve_device(device))
    model = SoftPromptModel.from_adapter(base, items[0][1], adapter_name=items[0][0])
    for name, directory in items[1:]:
        model.load_adapter(directory, name)
    return model.eval(), tokenizer, base_name


def run_config_for_adapter(adapter_directory: str | Path) -> TrainConfig | None:
    """The `TrainConfig` of the training run that wrote an adapter (its ``train_config.json``), if found."""
    directory = Path(adapter_directory)
    for candidate in (directory.parent / CONFIG_FILE, directory.parent.parent / CONFIG_FILE):
        if candidate.is_file():
            values = json.loads(candidate.read_text())
            values.update(resume=False, overwrite=False)
            return TrainConfig.from_dict(values, str(candidate))
    return None


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
    model, tokenizer, base_name = load_adapters(adapters, model_name, config.device)
    threads = config.num_threads if config.num_threads is not None else default_threads(model.base_model)
    with cpu_threads(threads):
        data = prepare_data(config, tokenizer, whole_split=split)
        names = list(adapters)
        if len(names) == 1:
            only = names[0]
            if only in data.adapter_names:
                data.eval = [row for row in data.eval if row["task"] == only]
                data.eval_prompts = [row for row in data.eval_prompts if row["task"] == only]
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
        autocast_dtype = _resolve_autocast(config.mixed_precision, model.base_model.device)
        result = evaluate(model, tokenizer, data, config.eval_batch_size, config.padding, config.max_length,
                          autocast_dtype, progress=progress)
    return {**result, "base_model": base_name, "adapters": {name: str(path) for name, path in adapters.items()}}


__all__ = [
    "ADAPTERS_DIR",
    "ADAPTER_DIR",
    "BASE_MODEL_DIR",
    "METRICS_FILE",
    "PLOT_FILE",
    "PreparedData",
    "TrainResult",
    "TrainingDivergedError",
    "epoch_order",
    "evaluate",
    "evaluate_adapters",
    "generate_labels",
    "generate_texts",
    "load_adapters",
    "load_base_model",
    "plot_metrics",
    "prepare_data",
    "read_metrics",
    "resolve_base_model",
    "run_config_for_adapter",
    "sample_generations",
    "train",
]
