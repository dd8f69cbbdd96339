"""The frozen base a run trains on or an adapter was trained on: loading it, finding it again, and CPU threads.

A base is a hub id, a local directory or a local ``.gguf`` file (dequantized; see `softprompt.training.gguf_base`),
loaded with transformers' ``from_pretrained``, or, when none is named, the embedded tiny BLOOM (random weights,
seeded), which a run saves into its directory so that ``softprompt eval`` and ``generate`` can load it again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from softprompt.adapter_format import CONFIG_FILE as ADAPTER_CONFIG_FILE
from softprompt.files import AdapterFormatError, read_json
from softprompt.model import SoftPromptModel
from softprompt.pretrained import adapter_format_of, refusal
from softprompt.quickstart import build_tiny_bloom, build_tokenizer
from softprompt.training.config import ConfigError, TrainConfig, flatten_settings
from softprompt.training.gguf_base import check_gguf_sha256, gguf_model_options, is_gguf_file, require_gguf_support

BASE_MODEL_DIR = "base-model"
"""Where a run on the embedded tiny BLOOM saves it (and its tokenizer), for ``softprompt eval/generate``."""
CONFIG_FILE = "train_config.json"
"""A run's resolved settings, beside its adapters."""

# The embedded base: small enough to train in seconds on 2 CPU cores, and initialized with a larger weight scale
# than BLOOM's 0.02 so that its random next-token distributions are not flat, which is what lets a soft prompt
# move them (with 0.02 the eval loss does not move at all).
TINY_HIDDEN_SIZE = 64
TINY_NUM_LAYERS = 2
TINY_NUM_HEADS = 4
TINY_INITIALIZER_RANGE = 0.3
SMALL_MODEL_PARAMETERS = 5_000_000
"""Below this many base parameters, CPU runs use one thread by default (see `ExecutionConfig.num_threads`)."""


def load_base_model(
    name_or_path: str | None, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, Any]:
    """Loads a causal LM and its tokenizer (left padding, a pad token), or builds the embedded tiny BLOOM.

    Args:
        name_or_path: hub id, local directory or local ``.gguf`` file (its weights dequantized to `dtype`); None for
            the embedded tiny BLOOM (random weights, seeded).
        dtype: dtype of the base's weights.

    Returns:
        (model in eval mode, tokenizer). A local directory or GGUF file is recorded as an absolute path in the
        model's config, so adapters saved from it point back to it.

    Raises:
        ValueError: the model or tokenizer cannot be loaded, a GGUF file is missing, or the packages a GGUF file
            needs are (the message says how to fix it).
    """
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
    source, tokenizer_options, model_options = name_or_path, {}, {}
    if is_gguf_file(name_or_path):  # folder + file name: transformers' GGUF loader, every weight dequantized
        require_gguf_support(Path(name_or_path))
        source, tokenizer_options = str(Path(name_or_path).parent), {"gguf_file": Path(name_or_path).name}
        model_options = {**tokenizer_options, **gguf_model_options()}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, padding_side="left", **tokenizer_options)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **model_options)
    except Exception as error:  # OSError offline, ValueError for unknown architectures, ...: one message for all
        raise ValueError(
            f"Could not load the model {name_or_path!r}: {type(error).__name__}: {error}. Fix: check the hub id or "
            "the local directory and the network; offline, pass a local directory, or leave --model out to use the "
            "embedded tiny BLOOM."
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if Path(name_or_path).is_dir() or is_gguf_file(name_or_path):
        model.config._name_or_path = str(Path(name_or_path).resolve())
    return model.eval(), tokenizer


def with_model_sha256(config: TrainConfig) -> TrainConfig:
    """`config` with ``model_sha256`` set to its ``.gguf`` base's SHA-256 (unchanged for any other base).

    Raises:
        ValueError: the GGUF file is missing, the packages it needs are, or ``model_sha256`` was given and the
            file's differs.
    """
    if config.model is None or not is_gguf_file(config.model):
        return config
    require_gguf_support(Path(config.model))
    actual = check_gguf_sha256(Path(config.model), config.model_sha256, "the settings (--model-sha256)")
    return dataclasses.replace(config, model_sha256=actual)


def resolve_base_model(adapter_directory: str | Path) -> str:
    """The base model an adapter was trained on, as a ``--model`` value.

    Reads ``base_model.name_or_path`` from the adapter's config: a directory or ``.gguf`` file that exists is
    returned as recorded. A recorded directory that no longer exists (a moved run) is looked for as ``base-model/``
    beside the adapter or beside its parent (``adapters/<task>``).

    Raises:
        AdapterFormatError: the directory or its config is missing or corrupt, or it holds a PEFT adapter.
        ValueError: nothing usable is recorded and no ``base-model/`` is found (the fix: pass --model).
    """
    directory = Path(adapter_directory)
    config_path = directory / ADAPTER_CONFIG_FILE
    if not directory.is_dir():
        raise AdapterFormatError(
            f"{directory}: adapter directory not found. Fix: pass the directory a training run wrote "
            "(OUTPUT_DIR/adapter, or OUTPUT_DIR/adapters/TASK)."
        )
    if not config_path.is_file():
        read_json(config_path, missing_fix="Fix: pass the directory save_pretrained or softprompt train wrote.")
    format, document = adapter_format_of(directory)
    if format is None:
        raise refusal(config_path, document, None)
    if format == "peft":
        raise AdapterFormatError(
            f"{config_path}: a PEFT {document['peft_type']} adapter: the command line reads softprompt's format. Fix: "
            "in Python, SoftPromptModel.from_pretrained(base_model, directory), then "
            "model.save_pretrained(new_directory) to use it here."
        )
    base_record = document.get("base_model")
    recorded = base_record.get("name_or_path") if isinstance(base_record, dict) else None
    if recorded is not None and not isinstance(recorded, str):
        recorded = None
    if recorded and (Path(recorded).is_dir() or (is_gguf_file(recorded) and Path(recorded).is_file())):
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


def resolve_device(requested: str) -> torch.device:
    """The device a run or an inference uses: ``auto`` is CUDA (this process's ``LOCAL_RANK``) when present, else
    CPU.

    Raises:
        ConfigError: ``cuda`` was asked for and torch sees no CUDA device.
    """
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but torch sees no CUDA device. Fix: pass --device cpu (or auto).")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def load_adapters(
    adapters: dict[str, str | Path], model_name: str | None = None, device: str = "auto"
) -> tuple[SoftPromptModel, Any, str]:
    """Loads saved adapters onto their (one) frozen base for evaluation or generation.

    Args:
        adapters: adapter name -> directory written by training (``output_dir/adapter`` or ``adapters/<task>``).
        model_name: the base (hub id, directory or ``.gguf`` file); None: the one the first adapter records
            (`resolve_base_model`); a recorded ``.gguf`` file must still have the SHA-256 its run recorded.
        device: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        (model with every adapter loaded, frozen, the first one active; its tokenizer; the base's name).

    Raises:
        ValueError: no adapter given, a base that cannot be found or loaded, a recorded GGUF file that has changed
            since its run, or an adapter that does not fit the base.
    """
    if not adapters:
        raise ValueError("No adapter given. Fix: pass --adapter DIR (or --adapter name=DIR, several times).")
    items = list(adapters.items())
    base_name = model_name or resolve_base_model(items[0][1])
    if model_name is None and is_gguf_file(base_name):  # the recorded file: still the bytes the run trained on?
        run_config = run_config_for_adapter(items[0][1])
        if run_config is not None and run_config.model_sha256 is not None:
            require_gguf_support(Path(base_name))
            check_gguf_sha256(Path(base_name), run_config.model_sha256, f"the run that trained {items[0][1]}")
    base, tokenizer = load_base_model(base_name)
    base.to(resolve_device(device))
    model = SoftPromptModel.from_pretrained(base, items[0][1], adapter_name=items[0][0], format="softprompt")
    for name, directory in items[1:]:
        model.load_adapter(directory, name, format="softprompt")
    return model.eval(), tokenizer, base_name


def run_config_for_adapter(adapter_directory: str | Path) -> TrainConfig | None:
    """The `TrainConfig` of the training run that wrote an adapter (its ``train_config.json``), if found."""
    directory = Path(adapter_directory)
    for candidate in (directory.parent / CONFIG_FILE, directory.parent.parent / CONFIG_FILE):
        if candidate.is_file():
            fix = ("Fix: restore it from a copy of the run, or pass the data to evaluate on (--dataset, --text-column, "
                   "--label-column, --split).")
            try:
                values = flatten_settings(read_json(candidate, error=ConfigError))
                # The run's directory is where its settings are, wherever it was started from (a recipe reads the
                # data it made there).
                values.update(resume=False, overwrite=False, output_dir=str(candidate.parent))
                return TrainConfig.from_dict(values, str(candidate))
            except ConfigError as error:
                where = "" if str(error).startswith(str(candidate)) else f"{candidate}: "
                raise ConfigError(f"{where}{error} The run's settings there say which rows it held out. {fix}") from None
    return None


