"""PEFT's names for saving, loading and sharing adapters: ``save_pretrained``, ``from_pretrained``, ``load_adapter``,
``push_to_hub``.

- Two formats, told apart by ``adapter_config.json`` (both formats name their config so): softprompt's
  (``softprompt/adapter_format.py``) records ``"format": "softprompt-adapter"``, PEFT's
  (``softprompt/peft_format.py``) a ``peft_type``. Loading reads either; saving writes softprompt's unless
  ``format="peft"`` is asked for.
- PEFT's layout: the adapter named ``default`` at the top of the directory, every other adapter in a subdirectory
  of its name (loaded back with ``subfolder=<name>``).
- An adapter is named by a local directory or a hub repository id (``softprompt/hub.py``).

`softprompt.model.SoftPromptModel` delegates its saving and loading methods here; the functions take the model (or
its class) as an argument, so this module never imports `softprompt.model`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PreTrainedModel

from softprompt import adapter_format, peft_format
from softprompt.adapter_format import CONFIG_FILE, FORMAT_NAME
from softprompt.files import AdapterFormatError, atomic_write_bytes, read_json
from softprompt.hub import HubOptions, adapter_directory, is_repository_id, upload_folder
from softprompt.methods import SoftPromptConfig
from softprompt.model_card import DEFAULT_ADAPTER, model_card
from softprompt.rows import check_new_adapter_name

AdapterFormat = Literal["softprompt", "peft"]
ADAPTER_FORMATS: tuple[str, ...] = get_args(AdapterFormat)
MODEL_CARD_FILE = "README.md"
TRAINER_WEIGHTS_FILE = "model.safetensors"
"""What ``transformers.Trainer`` writes for a model that is not a `PreTrainedModel`: its ``state_dict()``, which
for a `SoftPromptModel` is its adapters' tensors (``prompts.<name>.*``), without their configs."""


def check_format(format: object) -> None:
    """Raises ValueError unless `format` is ``"softprompt"`` or ``"peft"``."""
    if format not in ADAPTER_FORMATS:
        raise ValueError(
            f"format={format!r}: expected 'softprompt' or 'peft'. Fix: 'softprompt' (keeps p-tuning and projected "
            "prefix encoders, so training can resume) or 'peft' (what peft.PeftModel.from_pretrained reads)."
        )


def _no_config_message(directory: Path) -> str:
    """Why `directory` has no ``adapter_config.json``, and what to do: an adapter saved in subdirectories, a
    Trainer checkpoint, or simply not an adapter."""
    subdirectories = sorted(path.name for path in directory.iterdir() if (path / CONFIG_FILE).is_file())
    if subdirectories:
        return (
            f"{directory}: no {CONFIG_FILE} at the top, but adapters in the subdirectories {subdirectories} (PEFT's "
            f"layout for adapters not named 'default'). Fix: pass subfolder={subdirectories[0]!r} (and "
            f"adapter_name={subdirectories[0]!r}), or that subdirectory itself."
        )
    weights = directory / TRAINER_WEIGHTS_FILE
    if weights.is_file():
        try:
            with safe_open(weights, "pt") as file:
                names = list(file.keys())
        except (SafetensorError, OSError):
            names = []
        if names and all(name.startswith("prompts.") for name in names):
            return (
                f"{directory}: a transformers.Trainer checkpoint (or trainer.save_model output) of a SoftPromptModel: "
                f"{TRAINER_WEIGHTS_FILE} holds the adapters' tensors, not their configs. Fix: resume with "
                "trainer.train(resume_from_checkpoint=...), or build the model with the same config and call "
                "model.load_state_dict(safetensors.torch.load_file(...)); save adapters with "
                "trainer.model.save_pretrained(directory)."
            )
    return (
        f"{directory / CONFIG_FILE}: file not found. Fix: point to an adapter: a directory or hub repository that "
        "save_pretrained wrote (it holds adapter_config.json and the weights)."
    )


def adapter_format_of(directory: Path) -> AdapterFormat:
    """The format of the adapter in `directory`, recognised from its ``adapter_config.json``.

    Raises:
        AdapterFormatError: no such directory or config (the message says what the directory holds instead), a
            config that is not JSON, or one of neither format.
    """
    if not directory.is_dir():
        raise AdapterFormatError(
            f"{directory}: adapter directory not found. Fix: pass the directory save_pretrained wrote."
        )
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterFormatError(_no_config_message(directory))
    document = read_json(config_path)
    if document.get("format") == FORMAT_NAME:
        return "softprompt"
    if peft_format.is_peft_document(document):
        return "peft"
    raise AdapterFormatError(
        f"{config_path}: neither softprompt's adapter format (\"format\": {FORMAT_NAME!r}) nor PEFT's (a "
        f"\"peft_type\"); found the keys {sorted(document)}. Fix: point to a directory written by save_pretrained "
        "or by PEFT."
    )


def read_adapter(
    directory: Path, base_model: PreTrainedModel, formats: tuple[str, ...] = ADAPTER_FORMATS
) -> tuple[SoftPromptConfig, nn.Module]:
    """Reads the adapter in `directory` into its config and module, in whichever of `formats` it is.

    With a single format in `formats`, that format's reader runs directly (and says so when the directory holds
    the other format).

    Raises:
        AdapterFormatError: see `adapter_format_of` and the readers; `BaseModelMismatchError` for another base shape.
    """
    format = adapter_format_of(directory) if len(formats) > 1 else formats[0]
    if format == "peft":
        return peft_format.read_peft_adapter(base_model, directory)
    return adapter_format.load_adapter_module(directory, base_model)


@dataclass(frozen=True)
class BaseModelRecord:
    """What an adapter records of the base model it was trained on."""

    name_or_path: str | None
    """The hub id or directory the base was loaded from (softprompt: ``base_model.name_or_path``, PEFT:
    ``base_model_name_or_path``); None when nothing was recorded."""
    revision: str | None
    """The base's revision, which PEFT records (``revision``); None otherwise."""


def recorded_base_model(directory: Path) -> BaseModelRecord:
    """The base model the adapter in `directory` records (either format).

    Raises:
        AdapterFormatError: as `adapter_format_of`.
    """
    format = adapter_format_of(directory)
    document = read_json(directory / CONFIG_FILE)
    if format == "peft":
        return BaseModelRecord(document.get("base_model_name_or_path") or None, document.get("revision") or None)
    return BaseModelRecord(dict(document.get("base_model") or {}).get("name_or_path") or None, None)


def _check_base_model(base_model: object) -> None:
    if not isinstance(base_model, PreTrainedModel):
        raise TypeError(
            f"base_model={type(base_model).__name__}: expected a transformers causal LM. Fix: pass "
            "AutoModelForCausalLM.from_pretrained(name_or_path), or let AutoSoftPromptModelForCausalLM.from_pretrained"
            "(adapter) load the base model the adapter records."
        )


def load_adapter(
    model: nn.Module,
    model_id: str | os.PathLike[str],
    adapter_name: str,
    is_trainable: bool = False,
    formats: tuple[str, ...] = ADAPTER_FORMATS,
    **hub_options: Any,
) -> None:
    """Adds the adapter at `model_id` (a directory or hub id, either format) to `model` as `adapter_name`.

    Args:
        model: the `SoftPromptModel` to add it to.
        model_id: a directory or a hub repository id.
        adapter_name: the name it gets; checked before anything is fetched.
        is_trainable: leave its parameters trainable; frozen otherwise, as in PEFT.
        formats: the formats accepted.
        **hub_options: `softprompt.hub.HubOptions` fields (``revision``, ``token``, ``cache_dir``, ``subfolder``,
            ``local_files_only``).

    Raises:
        ValueError: the name is taken or invalid. AdapterFormatError: see `softprompt.hub.adapter_directory` and
            `read_adapter`.
    """
    check_new_adapter_name(adapter_name, model.prompts)
    directory = adapter_directory(model_id, HubOptions(**hub_options))
    config, module = read_adapter(directory, model.base_model, formats)
    module.requires_grad_(is_trainable)
    model.add_adapter(adapter_name, config, module=module)


def from_pretrained(
    model_class: type,
    base_model: PreTrainedModel,
    model_id: str | os.PathLike[str],
    adapter_name: str = DEFAULT_ADAPTER,
    is_trainable: bool = False,
    formats: tuple[str, ...] = ADAPTER_FORMATS,
    **hub_options: Any,
) -> nn.Module:
    """A `model_class` (`SoftPromptModel`) on `base_model` whose first adapter is read from `model_id`, bit-exactly
    as it was saved; arguments as in `load_adapter`.

    Raises:
        TypeError: `base_model` is not a transformers model. ValueError, AdapterFormatError: as `load_adapter`.
    """
    _check_base_model(base_model)
    check_new_adapter_name(adapter_name, ())
    directory = adapter_directory(model_id, HubOptions(**hub_options))
    config, module = read_adapter(directory, base_model, formats)
    module.requires_grad_(is_trainable)
    return model_class.from_module(base_model, config, module, adapter_name)


def _selected(model: nn.Module, selected_adapters: object) -> list[str]:
    """The adapters to save: all of them when `selected_adapters` is None, else those names, checked."""
    if selected_adapters is None:
        return list(model.prompts)
    if isinstance(selected_adapters, str) or not selected_adapters:
        raise ValueError(
            f"selected_adapters={selected_adapters!r}: expected a non-empty list of adapter names, or None for all. "
            f"Fix: e.g. selected_adapters=[{next(iter(model.prompts))!r}]."
        )
    names = list(selected_adapters)
    model.check_adapter_names(names)
    return names


def save_one(model: nn.Module, directory: str | os.PathLike[str], adapter_name: str | None, format: str) -> Path:
    """Writes one adapter of `model` (the active one when `adapter_name` is None) in `format` at `directory` itself.

    Returns:
        The directory.

    Raises:
        ValueError: an unknown format or adapter name (checked before anything is written).
    """
    check_format(format)
    name = adapter_name or model.active_adapter
    model.check_adapter_names([name])
    writer = peft_format.save_peft_adapter if format == "peft" else adapter_format.save_adapter
    return writer(directory, model.adapter_configs[name], model.prompts[name], model.base_model)


def save_pretrained(
    model: nn.Module,
    save_directory: str | os.PathLike[str],
    selected_adapters: list[str] | None = None,
    format: str = "softprompt",
    is_main_process: bool = True,
) -> Path:
    """Writes `model`'s adapters in PEFT's layout: ``default`` at the top of `save_directory`, every other one in
    ``save_directory/<name>``.

    Args:
        model: the `SoftPromptModel`.
        save_directory: created if missing; adapter files already there are replaced atomically.
        selected_adapters: the adapters to write; None: all of them.
        format: ``"softprompt"`` (the default; keeps encoders, so training can resume) or ``"peft"``.
        is_main_process: False writes nothing (the other processes of a distributed run), as in PEFT.

    Returns:
        `save_directory`.

    Raises:
        ValueError: an unknown format, or names that are not loaded adapters (checked before anything is written).
    """
    check_format(format)
    names = _selected(model, selected_adapters)
    directory = Path(save_directory)
    if is_main_process:
        for name in names:
            save_one(model, directory if name == DEFAULT_ADAPTER else directory / name, name, format)
    return directory


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    selected_adapters: list[str] | None = None,
    format: str = "softprompt",
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    write_model_card: bool = True,
) -> Any:
    """Uploads what `save_pretrained` writes, with a model card ``README.md``, to the hub repository `repo_id`.

    The folder is written to a temporary directory first and committed in one commit (`softprompt.hub`); the
    repository is created when missing.

    Args:
        model: the `SoftPromptModel`.
        repo_id: ``owner/name`` (or ``name`` under the logged-in account).
        selected_adapters, format: as in `save_pretrained`.
        commit_message: default ``"Upload softprompt adapter"``.
        private: for a repository created here; None: the hub's default.
        token: a hub token; None: the stored login.
        revision: the branch to commit to (created when missing); None: ``main``.
        create_pr: open a pull request instead of committing to the branch.
        write_model_card: write ``README.md`` (`softprompt.model_card`); False keeps the repository's own card.

    Returns:
        huggingface_hub's ``CommitInfo``.

    Raises:
        ValueError: an invalid `repo_id`, format or adapter name (checked before anything is written or sent).
    """
    if not is_repository_id(repo_id):
        raise ValueError(
            f"repo_id={repo_id!r}: expected a hub repository id. Fix: e.g. 'your-name/bloomz-560m-complaints'."
        )
    check_format(format)
    names = _selected(model, selected_adapters)
    with tempfile.TemporaryDirectory(prefix="softprompt-push-") as staging:
        folder = save_pretrained(model, staging, names, format)
        if write_model_card:
            atomic_write_bytes(folder / MODEL_CARD_FILE, model_card(model, names, format, repo_id).encode())
        return upload_folder(
            folder,
            repo_id,
            commit_message=commit_message or "Upload softprompt adapter",
            private=private,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
