"""`AutoSoftPromptModelForCausalLM`: an adapter and the base model it records, in one call (PEFT's
``AutoPeftModelForCausalLM``).

The adapter (a directory or hub id, either format; `softprompt.pretrained`) records the base it was trained on:
softprompt's format as ``base_model.name_or_path``, PEFT's as ``base_model_name_or_path`` (and the base's
``revision``). That base is loaded with transformers' ``AutoModelForCausalLM.from_pretrained``, then the adapter
onto it, with its shape checked. When the record is missing, cannot be loaded, or now names a model of another
shape, the error says so and gives the fix: load the base yourself and pass it to `SoftPromptModel.from_pretrained`.
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoModelForCausalLM

from softprompt.files import AdapterFormatError, BaseModelMismatchError
from softprompt.hub import HubOptions, adapter_directory
from softprompt.model import SoftPromptModel
from softprompt.pretrained import recorded_base_model


def _pass_the_base_yourself(adapter: str, base: str = "<the base it was trained on>") -> str:
    return (
        f"Fix: load the base yourself and pass it: SoftPromptModel.from_pretrained("
        f"AutoModelForCausalLM.from_pretrained({base!r}), {adapter!r})."
    )


class AutoSoftPromptModelForCausalLM:
    """Loads an adapter together with the base model it records (`from_pretrained`); not instantiated itself."""

    def __init__(self) -> None:
        raise TypeError(
            "AutoSoftPromptModelForCausalLM is not instantiated. Fix: "
            "AutoSoftPromptModelForCausalLM.from_pretrained(adapter_directory_or_hub_id)."
        )

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike[str],
        adapter_name: str = "default",
        is_trainable: bool = False,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        subfolder: str | None = None,
        local_files_only: bool = False,
        **base_model_kwargs: Any,
    ) -> SoftPromptModel:
        """The adapter at `pretrained_model_name_or_path` on the base model it records.

        Args:
            pretrained_model_name_or_path: the adapter: a directory or hub id, softprompt's format or PEFT's.
            adapter_name: the name it gets.
            is_trainable: leave its parameters trainable; frozen otherwise, as in PEFT.
            revision: the adapter repository's revision (the base's is the one PEFT recorded, if any).
            token, cache_dir, local_files_only: for the adapter and the base alike (`softprompt.hub.HubOptions`).
            subfolder: the adapter's folder inside the directory or repository.
            **base_model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` for the base (``dtype``,
                ``device_map``, ...).

        Returns:
            A `SoftPromptModel` whose base was loaded from the adapter's record.

        Raises:
            AdapterFormatError: the adapter cannot be found or read; it records no base model; the recorded base
                cannot be loaded; `BaseModelMismatchError` when the recorded base has another shape than the
                adapter. Each message ends with the fix.
        """
        adapter = str(pretrained_model_name_or_path)
        options = HubOptions(revision, token, cache_dir, subfolder, local_files_only)
        directory = adapter_directory(pretrained_model_name_or_path, options)
        record = recorded_base_model(directory)
        if record.name_or_path is None:
            raise AdapterFormatError(
                f"{directory}: the adapter records no base model (it was saved from a model built in memory). "
                + _pass_the_base_yourself(adapter)
            )
        hub_kwargs = {"token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
        if record.revision is not None:
            hub_kwargs["revision"] = record.revision
        try:
            base_model = AutoModelForCausalLM.from_pretrained(record.name_or_path, **hub_kwargs, **base_model_kwargs)
        except Exception as error:  # OSError (not found, offline), ValueError (unknown architecture), ...: one message
            raise AdapterFormatError(
                f"{directory}: the base model the adapter records, {record.name_or_path!r}, could not be loaded "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                + _pass_the_base_yourself(adapter)
            ) from error
        try:
            return SoftPromptModel.from_pretrained(base_model, directory, adapter_name, is_trainable)
        except BaseModelMismatchError as error:
            raise BaseModelMismatchError(
                f"{error.source}: the base model the adapter records, {record.name_or_path!r}, was loaded but has "
                f"another shape than the adapter: {'; '.join(error.mismatches)}. "
                + _pass_the_base_yourself(adapter),
                error.source,
                error.mismatches,
            ) from None
