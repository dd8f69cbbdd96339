"""softprompt's adapter format: one safetensors file and one small JSON file in a directory.

``adapter_config.json``::

    {
      "format": "softprompt-adapter",
      "format_version": 1,
      "library_version": "0.1.0",
      "method": "prompt_tuning" | "p_tuning" | "prefix_tuning" | "adaption_prompt" | "multitask_prompt_tuning" |
                "cpt",
      "config": {...the method's config fields...},
      "base_model": {"name_or_path": ..., "model_type": "llama", "hidden_size": ..., "num_layers": L,
                     "num_heads": H, "num_key_value_heads": K, "head_dim": D, "embedding_width": C,
                     "vocab_size": V},
      "encoder_weights": true,
      "weights": {"file": "adapter.safetensors", "bytes": ..., "sha256": ...}
    }

``adapter.safetensors`` holds, in fp32:

- ``prompt.<name>``: every tensor of the method module's state dict (the table and, for p-tuning and projected
  prefix tuning, the encoder's weights; multitask prompt tuning's shared prompt and task matrices; CPT's frozen
  context embeddings and its delta), so training resumes exactly where it stopped. PEFT drops the encoder and
  keeps only its output (and CPT's sum), so a PEFT p-tuning adapter cannot be trained further the same way.
- ``materialized``: the module's output, ``[P, C]`` virtual tokens or ``[P, L * 2 * K * D]`` prefix, so that
  inference needs no encoder (`read(..., materialized_only=True)`); absent for methods whose output is not one
  table (`MethodSpec.materialized`: adaption prompt, whose tokens and gates are its weights).

Files written by softprompt before it knew other families record only ``hidden_size``, ``num_layers`` and
``num_heads`` of their (BLOOM) base; the other dimensions follow from those as they do for BLOOM.

Writing is atomic per file (``softprompt/files.py``), the weights first and the JSON last; the JSON records the
weights file's size and SHA-256, and loading requires both, so a truncated or replaced weights file is detected. Loading never
unpickles: safetensors and JSON only.

Shapes: P virtual tokens, L layers, H heads, K key/value heads, D head dim, C embedding width, V vocab.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn
from transformers import PreTrainedModel

from softprompt.families import family_of
from softprompt.families.family import BaseModelShape
from softprompt.files import (
    AdapterFormatError,
    BaseModelMismatchError,
    atomic_write_bytes,
    atomic_write_json,
    read_safetensors,
    sha256_of,
)
from softprompt.methods import METHODS, MaterializedPrompt, SoftPromptConfig, method_of
from softprompt.methods.multitask_prompt_tuning import SOURCE_INITS
from softprompt.version import __version__

FORMAT_NAME = "softprompt-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
SHAPE_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_key_value_heads", "head_dim", "embedding_width")
"""The recorded base dimensions an adapter must match, in the order a mismatch is reported."""


def config_to_dict(config: SoftPromptConfig) -> dict[str, Any]:
    """A JSON-ready dict of a config's fields (enums as their string values)."""
    fields = dataclasses.asdict(config)
    return {key: getattr(value, "value", value) for key, value in fields.items()}


def config_from_dict(method: str, fields: dict[str, Any], source: str) -> SoftPromptConfig:
    """Rebuilds a config; `source` names the file for error messages.

    Raises:
        AdapterFormatError: unknown method or fields, or values the config rejects.
    """
    if method not in METHODS:
        raise AdapterFormatError(
            f"{source}: unknown method {method!r}: expected one of {sorted(METHODS)}. "
            "Fix: the file was not written by softprompt, or by a newer version; re-save the adapter."
        )
    config_class = METHODS[method].config_class
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise AdapterFormatError(f"{source}: unknown {method} config fields {unknown}: expected only {sorted(known)}.")
    init = str(fields.get("prompt_tuning_init", "RANDOM")).upper()
    if "prompt_tuning_init" in known:
        # PEFT's files, and softprompt's before it refused the pair, may record an init text (or a multitask source
        # file) that their init ignored; the stored tensors are what counts, so such values are dropped, not refused.
        ignored = {"prompt_tuning_init_text", "tokenizer_kwargs"} if init != "TEXT" else set()
        if init not in SOURCE_INITS:
            ignored.add("prompt_tuning_init_state_dict_path")
        fields = {key: value for key, value in fields.items() if key not in ignored}
    try:
        return config_class(**fields)
    except (TypeError, ValueError) as error:
        raise AdapterFormatError(f"{source}: invalid {method} config: {error}") from None


def base_model_record(base_model: PreTrainedModel) -> dict[str, Any]:
    """What an adapter records of its base: its name and type and the dimensions the adapter depends on."""
    shape = family_of(base_model.config).shape(base_model.config)
    return {
        "name_or_path": getattr(base_model.config, "_name_or_path", None) or None,
        "model_type": getattr(base_model.config, "model_type", None),
        **dataclasses.asdict(shape),
    }


def save_adapter(directory: str | Path, config: SoftPromptConfig, module: nn.Module, base_model: PreTrainedModel) -> Path:
    """Writes one adapter (see the module docstring for the layout).

    Args:
        directory: created if missing; existing adapter files are replaced atomically.
        config: the adapter's configuration.
        module: the adapter's module (any method's module, or a `MaterializedPrompt`).
        base_model: the frozen base, whose shape and name are recorded.

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"prompt.{key}": value.detach().float().cpu().contiguous() for key, value in module.state_dict().items()}
    spec = method_of(config)
    if isinstance(module, MaterializedPrompt) or spec.materialized is not None:
        with torch.no_grad():
            output = module() if isinstance(module, MaterializedPrompt) else spec.materialized(module)
        tensors["materialized"] = output.detach().to(torch.float32, copy=True).cpu()
    # One metadata entry: safetensors writes several in an order that changes from one save to the next, and the
    # same adapter must give the same bytes (hub uploads, hashes). The format version is in the JSON.
    payload = safetensors_bytes(tensors, metadata={"format": FORMAT_NAME})
    atomic_write_bytes(directory / WEIGHTS_FILE, payload)
    atomic_write_json(directory / CONFIG_FILE, {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "method": config.method,
        "config": config_to_dict(config),
        "base_model": base_model_record(base_model),
        "encoder_weights": not isinstance(module, MaterializedPrompt),
        "weights": {"file": WEIGHTS_FILE, "bytes": len(payload), "sha256": sha256_of(payload)},
    })
    return directory


def recorded_shape(recorded: dict[str, Any]) -> dict[str, Any]:
    """The recorded base dimensions, completed for files that predate the other families (BLOOM: K = H,
    D = hidden / H, C = hidden)."""
    shape = {key: recorded.get(key) for key in SHAPE_FIELDS}
    hidden, heads = shape["hidden_size"], shape["num_heads"]
    if shape["num_key_value_heads"] is None:
        shape["num_key_value_heads"] = heads
    if shape["head_dim"] is None and isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        shape["head_dim"] = hidden // heads
    if shape["embedding_width"] is None:
        shape["embedding_width"] = hidden
    return shape


def check_base_shape(recorded: dict[str, Any], base_model: PreTrainedModel, source: Path) -> BaseModelShape:
    """The base's shape, if the adapter was made for a base of that shape.

    Raises:
        BaseModelMismatchError: naming every dimension that differs.
    """
    shape = family_of(base_model.config).shape(base_model.config)
    actual = dataclasses.asdict(shape)
    expected = recorded_shape(recorded)
    mismatches = [
        f"{key} {expected[key]} (adapter) vs {actual[key]} (base model)"
        for key in SHAPE_FIELDS
        if expected[key] != actual[key]
    ]
    if mismatches:
        raise BaseModelMismatchError(
            f"{source}: adapter made for another base model shape: {'; '.join(mismatches)}. "
            f"{trained_on(recorded.get('name_or_path'))}",
            source,
            mismatches,
        )
    return shape


def trained_on(name_or_path: str | None) -> str:
    """The sentence of a shape-mismatch error that names the adapter's base and the fix."""
    if name_or_path:
        return f"It was trained on {name_or_path!r}. Fix: load it onto that base model."
    return "Its base model's name was not recorded. Fix: load it onto a base model of the adapter's shape."


_JSON_KINDS = {str: "string", dict: "object", bool: "true or false"}


def check_format_version(
    version: Any, newest: int, source: Path, error: type[Exception] = AdapterFormatError,
    fix: str = "Fix: re-save it with softprompt.",
) -> None:
    """Refuses a format version that is not an integer from 1 to `newest`.

    Args:
        version: the recorded version.
        newest: the newest version this softprompt reads.
        source: the file, for the message.
        error: the exception class to raise.
        fix: the message's last sentence for a version that is not a newer one.

    Raises:
        error: naming the file, the version found and the fix (upgrade for a newer one, `fix` otherwise).
    """
    if isinstance(version, int) and not isinstance(version, bool) and version > newest:
        raise error(
            f"{source}: format_version {version}: this softprompt reads versions up to {newest}. Fix: upgrade "
            "softprompt."
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise error(
            f"{source}: format_version {version!r}: expected an integer from 1 to {newest}. The file was edited or "
            f"not written by softprompt. {fix}"
        )


def weights_record(record: dict[str, Any], config_path: Path) -> tuple[str, int, str]:
    """The weights file's name, size and SHA-256 as the adapter config records them, all three required.

    Raises:
        AdapterFormatError: a name that leaves the adapter directory, or a size or hash that is missing or malformed
            (without them a truncated or replaced weights file would go unnoticed).
    """
    name = record.get("file", WEIGHTS_FILE)
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        # The weights sit beside the config, never elsewhere.
        raise AdapterFormatError(
            f"{config_path}: weights file {name!r}: expected a file name in the adapter directory. Fix: re-save the "
            f"adapter (its weights are {WEIGHTS_FILE!r})."
        )
    size, digest = record.get("bytes"), record.get("sha256")
    size_ok = isinstance(size, int) and not isinstance(size, bool) and size >= 0
    digest_ok = isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    if not (size_ok and digest_ok):
        raise AdapterFormatError(
            f"{config_path}: the weights record {record!r} lacks a valid size ('bytes', an integer) and SHA-256 "
            "('sha256', 64 hex digits): expected both, so that a truncated or replaced weights file is detected. Fix: "
            "re-save the adapter with SoftPromptModel.save_adapter, which records them."
        )
    return name, size, digest


def read(
    directory: Path, document: dict[str, Any], base_model: PreTrainedModel, materialized_only: bool = False
) -> tuple[SoftPromptConfig, nn.Module]:
    """Reads an adapter in softprompt's format into its config and module (fp32, on the base model's device).

    Args:
        directory: written by `save_adapter`.
        document: its ``adapter_config.json``, already read and recognised as this format
            (`softprompt.pretrained.adapter_format_of`).
        base_model: the base it is loaded onto; its shape must match the recorded one.
        materialized_only: build a `MaterializedPrompt` from the stored output (inference without the encoder).

    Raises:
        AdapterFormatError: missing, truncated or corrupt files; an unknown version or method; a field of the wrong
            kind; a weights record without its size and SHA-256; non-finite or non-float tensors; stored shapes that
            do not fit the config; or another base shape.
    """
    config_path = directory / CONFIG_FILE
    check_format_version(document.get("format_version"), FORMAT_VERSION, config_path, AdapterFormatError)
    for key, kind in (("method", str), ("config", dict), ("base_model", dict), ("weights", dict),
                      ("encoder_weights", bool)):
        if not isinstance(document.get(key), kind):
            raise AdapterFormatError(
                f"{config_path}: {key} is {document.get(key)!r}: expected a JSON {_JSON_KINDS[kind]}. The file was "
                "edited or not written by softprompt. Fix: re-save the adapter (SoftPromptModel.save_pretrained)."
            )
    config = config_from_dict(document["method"], dict(document["config"]), str(config_path))
    spec = method_of(config)
    shape = check_base_shape(document["base_model"], base_model, config_path)
    weights_name, weights_bytes, weights_sha256 = weights_record(document["weights"], config_path)
    weights_path = directory / weights_name
    if materialized_only and spec.materialized is None:
        raise AdapterFormatError(
            f"{config_path}: materialized_only=True, but {config.method} adapters have no single output table to "
            "load in place of their weights. Fix: load it without materialized_only."
        )
    width = spec.output_width(shape)
    if document["encoder_weights"]:
        with torch.device("meta"):  # the shapes only: a config asking for a huge table allocates nothing
            expected = {f"prompt.{key}": tuple(value.shape) for key, value in spec.empty(config, shape).state_dict()
                        .items()}
        if spec.materialized is not None:
            expected["materialized"] = (config.num_virtual_tokens, width)
    elif spec.materialized is None:
        raise AdapterFormatError(
            f"{config_path}: encoder_weights is false, but {config.method} adapters are always saved with their "
            "weights. The file was edited or not written by softprompt. Fix: re-save the adapter."
        )
    else:  # saved from a MaterializedPrompt: its table and its output, the same [P, width]
        expected = {"prompt.embedding.weight": (config.num_virtual_tokens, width),
                    "materialized": (config.num_virtual_tokens, width)}
    tensors = read_safetensors(weights_path, weights_bytes, weights_sha256, expected_shapes=expected,
                               shape_meanings={"materialized": "[num_virtual_tokens, width]"})
    if materialized_only or not document["encoder_weights"]:
        module: nn.Module = MaterializedPrompt(tensors["materialized"])
    else:
        module = spec.empty(config, shape)
        module.load_state_dict({key.removeprefix("prompt."): value for key, value in tensors.items()
                                if key.startswith("prompt.")})
    return config, module.to(base_model.get_input_embeddings().weight.device)
