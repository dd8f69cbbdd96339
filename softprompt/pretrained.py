"""PEFT's names for saving, loading and sharing adapters, and the one place that tells the two formats apart.

- Two formats, told apart by ``adapter_config.json`` (both formats name their config so), here only
  (`adapter_format_of`): softprompt's (``softprompt/adapter_format.py``) records ``"format": "softprompt-adapter"``,
  PEFT's (``softprompt/peft_format.py``) a ``peft_type``. Loading reads either; saving writes softprompt's unless
  ``format="peft"`` is asked for.
- PEFT's layout: the adapter named ``default`` at the top of the directory, every other adapter in a subdirectory
  of its name (loaded back with ``subfolder=<name>``).
- An adapter is named by a local directory or a hub repository id (``softprompt/hub.py``).

`softprompt.model.SoftPromptModel` delegates its saving and loading methods here; the functions take the model as
an argument, so this module never imports `softprompt.model`.
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
from softprompt.hub import DEFAULT_ADAPTER, HubOptions, adapter_directory, is_repository_id, model_card, upload_folder
from softprompt.methods import SoftPromptConfig
from softprompt.peft_format import PEFT_METHODS

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


def adapter_format_of(directory: Path) -> tuple[AdapterFormat | None, dict[str, Any]]:
    """The format of the adapter in `directory`, recognised from its ``adapter_config.json``, and that document.

    Returns:
        (``"softprompt"``, ``"peft"`` for a PEFT adapter of a method softprompt has, or None for anything else:
        another PEFT method such as LoRA, or neither format; the document).

    Raises:
        AdapterFormatError: no such directory or config (the message says what the directory holds instead), or a
            config that is not a JSON object.
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
        return "softprompt", document
    peft_type = document.get("peft_type")
    if isinstance(peft_type, str) and peft_type in PEFT_METHODS:
        return "peft", document
    return None, document


def refusal(config_path: Path, document: dict[str, Any], wanted: str | None) -> AdapterFormatError:
    """Why the adapter config `document` cannot be read as `wanted` (a format, or None for either), and the fix."""
    peft_type = document.get("peft_type")
    other_peft = "peft_type" in document and not (isinstance(peft_type, str) and peft_type in PEFT_METHODS)
    kind = f"a PEFT {peft_type} adapter" if isinstance(peft_type, str) else "a PEFT adapter of another kind"
    soft_prompts = f"softprompt trains and loads soft prompts only; PEFT's {sorted(PEFT_METHODS)}"
    if wanted == "softprompt":
        hint = ""
        if "peft_type" in document:
            hint = (f" It is {kind}, not a soft prompt ({soft_prompts})." if other_peft else
                    " It looks like a PEFT adapter: use SoftPromptModel.from_pretrained, which reads both formats.")
        return AdapterFormatError(f"{config_path}: format {document.get('format')!r}: expected {FORMAT_NAME!r}.{hint}")
    if wanted == "peft" and not other_peft:
        hint = (" It is in softprompt's own format: use SoftPromptModel.from_pretrained, which reads both formats."
                if document.get("format") == FORMAT_NAME else "")
        return AdapterFormatError(
            f"{config_path}: peft_type {peft_type!r}: expected one of {sorted(PEFT_METHODS)} (softprompt reads PEFT's "
            f"prompt-learning adapters only).{hint}"
        )
    if other_peft:
        return AdapterFormatError(
            f"{config_path}: {kind}: expected a soft-prompt adapter ({soft_prompts}). Fix: load it with peft, or "
            "pass a soft-prompt adapter."
        )
    return AdapterFormatError(
        f"{config_path}: neither softprompt's adapter format (\"format\": {FORMAT_NAME!r}) nor PEFT's (a "
        f"\"peft_type\"); found the keys {sorted(document)}. Fix: point to a directory written by save_pretrained "
        "or by PEFT."
    )


def read_adapter(
    directory: str | os.PathLike[str], base_model: PreTrainedModel, format: str | None = None,
    materialized_only: bool = False,
) -> tuple[SoftPromptConfig, nn.Module]:
    """Reads the adapter in `directory` into its config and module, in whichever format it is.

    Args:
        directory: the adapter's directory.
        base_model: the base it is loaded onto (its shape is checked).
        format: accept only this format (``softprompt`` or ``peft``); None: either.
        materialized_only: softprompt's format only: the stored output as a fixed table, without the encoder.

    Raises:
        AdapterFormatError: see `adapter_format_of`, `refusal` and the readers; `BaseModelMismatchError` for another
            base shape.
    """
    if format is not None:
        check_format(format)
    directory = Path(directory)
    found, document = adapter_format_of(directory)
    if found is None or (format is not None and found != format):
        raise refusal(directory / CONFIG_FILE, document, format)
    if found == "peft":
        return peft_format.read(directory, document, base_model)
    return adapter_format.read(directory, document, base_model, materialized_only)


def read_pretrained(
    base_model: PreTrainedModel, model_id: str | os.PathLike[str], format: str | None = None, **hub_options: Any
) -> tuple[SoftPromptConfig, nn.Module]:
    """The adapter at `model_id`, a directory or hub id in either format (or `format` only), for `base_model`.

    Args:
        base_model: the base it is loaded onto.
        model_id: a directory or a hub repository id.
        format: accept only this format; None: either.
        **hub_options: `softprompt.hub.HubOptions` fields (``revision``, ``token``, ``cache_dir``, ``subfolder``,
            ``local_files_only``).

    Raises:
        AdapterFormatError: see `softprompt.hub.adapter_directory` and `read_adapter`.
    """
    directory = adapter_directory(model_id, HubOptions(**hub_options))
    return read_adapter(directory, base_model, format)


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
    format, document = adapter_format_of(directory)
    if format is None:
        raise refusal(directory / CONFIG_FILE, document, None)
    if format == "peft":
        name, revision = document.get("base_model_name_or_path"), document.get("revision")
        return BaseModelRecord(name if isinstance(name, str) and name else None,
                               revision if isinstance(revision, str) and revision else None)
    recorded = document.get("base_model")
    name = recorded.get("name_or_path") if isinstance(recorded, dict) else None
    return BaseModelRecord(name if isinstance(name, str) and name else None, None)


def check_base_model(base_model: object) -> None:
    """Raises TypeError unless `base_model` is a transformers model."""
    if not isinstance(base_model, PreTrainedModel):
        raise TypeError(
            f"base_model={type(base_model).__name__}: expected a transformers causal LM. Fix: pass "
            "AutoModelForCausalLM.from_pretrained(name_or_path), or let AutoSoftPromptModelForCausalLM.from_pretrained"
            "(adapter) load the base model the adapter records."
        )


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
        write_model_card: write ``README.md`` (`softprompt.hub.model_card`); False keeps the repository's own card.

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
