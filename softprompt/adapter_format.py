"""softprompt's adapter format: one safetensors file and one small JSON file in a directory.

``adapter_config.json``::

    {
      "format": "softprompt-adapter",
      "format_version": 1,
      "library_version": "0.1.0",
      "method": "prompt_tuning" | "p_tuning" | "prefix_tuning",
      "config": {...the method's config fields...},
      "base_model": {"name_or_path": ..., "model_type": "bloom", "hidden_size": C, "num_layers": L,
                     "num_heads": H, "vocab_size": V},
      "encoder_weights": true,
      "weights": {"file": "adapter.safetensors", "bytes": ..., "sha256": ...}
    }

``adapter.safetensors`` holds, in fp32:

- ``prompt.<name>``: every tensor of the method's module state dict (the table and, for p-tuning and projected
  prefix tuning, the encoder's weights), so training resumes exactly where it stopped. PEFT drops the encoder and
  keeps only its output, so a PEFT p-tuning adapter cannot be trained further the same way.
- ``materialized``: the module's output, ``[P, C]`` virtual tokens or ``[P, L * 2 * C]`` prefix, so that inference
  needs no encoder (`load_adapter_module(..., materialized_only=True)`).

Writing is atomic per file (temporary name, then rename), the weights first and the JSON last; the JSON records the
weights file's size and SHA-256, so a truncated or replaced weights file is detected on load. Loading never
unpickles: safetensors and JSON only.

Shapes: P virtual tokens, L layers, C hidden.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn
from transformers import PreTrainedModel

from softprompt.model import BaseModelShape, SoftPromptConfig, materialize
from softprompt.p_tuning import PromptEncoderConfig, build_prompt_encoder
from softprompt.prefix_tuning import PrefixTuningConfig, build_prefix_encoder
from softprompt.prompt_tuning import PromptEmbedding, PromptTuningConfig

FORMAT_NAME = "softprompt-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
CONFIG_CLASSES: dict[str, type] = {
    "prompt_tuning": PromptTuningConfig,
    "p_tuning": PromptEncoderConfig,
    "prefix_tuning": PrefixTuningConfig,
}


class AdapterFormatError(ValueError):
    """An adapter directory that cannot be loaded: the message names the file and what is wrong."""


class MaterializedPrompt(nn.Module):
    """An adapter reduced to its output: a fixed ``[P, C]`` (virtual tokens) or ``[P, L * 2 * C]`` (prefix) table.

    What PEFT keeps of p-tuning and projected prefix tuning, and what inference needs; it stays an `nn.Embedding`
    so that it can be fine-tuned further as a plain table.

    Args:
        table: the materialized output.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.embedding = nn.Embedding(table.shape[0], table.shape[1], device=table.device)
        with torch.no_grad():
            self.embedding.weight.copy_(table.float())

    def forward(self) -> torch.Tensor:
        """Returns the stored table."""
        return self.embedding.weight


def config_to_dict(config: SoftPromptConfig) -> dict[str, Any]:
    """A JSON-ready dict of a config's fields (enums as their string values)."""
    fields = dataclasses.asdict(config)
    return {key: getattr(value, "value", value) for key, value in fields.items()}


def config_from_dict(method: str, fields: dict[str, Any], source: str) -> SoftPromptConfig:
    """Rebuilds a config; `source` names the file for error messages.

    Raises:
        AdapterFormatError: unknown method or fields, or values the config rejects.
    """
    if method not in CONFIG_CLASSES:
        raise AdapterFormatError(
            f"{source}: unknown method {method!r}: expected one of {sorted(CONFIG_CLASSES)}. "
            "Fix: the file was not written by softprompt, or by a newer version; re-save the adapter."
        )
    config_class = CONFIG_CLASSES[method]
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise AdapterFormatError(f"{source}: unknown {method} config fields {unknown}: expected only {sorted(known)}.")
    try:
        return config_class(**fields)
    except ValueError as error:
        raise AdapterFormatError(f"{source}: invalid {method} config: {error}") from None


def build_module(config: SoftPromptConfig, shape: BaseModelShape) -> nn.Module:
    """An uninitialized-from-text module of the method (its weights are about to be loaded)."""
    if isinstance(config, PromptTuningConfig):
        return PromptEmbedding(config, shape.hidden_size)
    if isinstance(config, PromptEncoderConfig):
        return build_prompt_encoder(config, shape.hidden_size)
    return build_prefix_encoder(config, shape.num_layers, shape.hidden_size)


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Writes `payload` to a temporary file beside `path`, then renames it over `path`."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file readable by its owner only; give it the mode an ordinary open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(handle, 0o666 & ~umask)
        with os.fdopen(handle, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def save_adapter(
    directory: str | Path,
    config: SoftPromptConfig,
    module: nn.Module,
    base_model: PreTrainedModel,
) -> Path:
    """Writes one adapter (see the module docstring for the layout).

    Args:
        directory: created if missing; existing adapter files are replaced atomically.
        config: the adapter's configuration.
        module: the adapter's module (any of the method modules, or a `MaterializedPrompt`).
        base_model: the frozen base, whose shape and name are recorded.

    Returns:
        The directory.
    """
    from softprompt import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    encoder_weights = not isinstance(module, MaterializedPrompt)
    tensors = {f"prompt.{key}": value.detach().float().cpu().contiguous() for key, value in module.state_dict().items()}
    tensors["materialized"] = materialize(module).cpu()
    payload = safetensors_bytes(tensors, metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})
    atomic_write_bytes(directory / WEIGHTS_FILE, payload)

    shape = BaseModelShape.of(base_model)
    document = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "method": config.method,
        "config": config_to_dict(config),
        "base_model": {
            "name_or_path": getattr(base_model.config, "_name_or_path", None) or None,
            "model_type": getattr(base_model.config, "model_type", None),
            **dataclasses.asdict(shape),
        },
        "encoder_weights": encoder_weights,
        "weights": {"file": WEIGHTS_FILE, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()},
    }
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(document, indent=2) + "\n").encode())
    return directory


def read_json(path: Path) -> dict[str, Any]:
    """Reads a JSON object from `path`, with errors that name the file."""
    if not path.is_file():
        raise AdapterFormatError(
            f"{path}: file not found. Fix: point to a directory written by save_adapter (it holds {CONFIG_FILE} "
            f"and {WEIGHTS_FILE})."
        )
    try:
        document = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFormatError(f"{path}: not valid JSON ({error}); the file is corrupt. Fix: re-save the adapter.")
    if not isinstance(document, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object, found {type(document).__name__}.")
    return document


def read_safetensors(path: Path, expected_bytes: int | None = None, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Loads a safetensors file on CPU (no unpickling), checking its recorded size and hash when given."""
    if not path.is_file():
        raise AdapterFormatError(f"{path}: file not found. Fix: copy the whole adapter directory.")
    payload = path.read_bytes()
    if expected_bytes is not None and len(payload) != expected_bytes:
        raise AdapterFormatError(
            f"{path}: {len(payload)} bytes, but the adapter config records {expected_bytes}: the file is truncated "
            "or was replaced. Fix: copy it again or re-save the adapter."
        )
    if expected_sha256 is not None and hashlib.sha256(payload).hexdigest() != expected_sha256:
        raise AdapterFormatError(
            f"{path}: SHA-256 differs from the one the adapter config records: the file is corrupt or was "
            "replaced. Fix: copy it again or re-save the adapter."
        )
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterFormatError(
            f"{path}: not a readable safetensors file ({error}); it is truncated or corrupt. Fix: copy it again."
        ) from None


def check_base_shape(recorded: dict[str, Any], base_model: PreTrainedModel, source: Path) -> None:
    """Raises AdapterFormatError if the adapter was made for a base of another shape."""
    actual = dataclasses.asdict(BaseModelShape.of(base_model))
    mismatches = [
        f"{key} {recorded.get(key)} (adapter) vs {actual[key]} (base model)"
        for key in ("hidden_size", "num_layers", "num_heads")
        if recorded.get(key) != actual[key]
    ]
    if mismatches:
        raise AdapterFormatError(
            f"{source}: adapter made for another base model shape: {'; '.join(mismatches)}. "
            f"{trained_on(recorded.get('name_or_path'))}"
        )


def trained_on(name_or_path: str | None) -> str:
    """The sentence of a shape-mismatch error that names the adapter's base and the fix."""
    if name_or_path:
        return f"It was trained on {name_or_path!r}. Fix: load it onto that base model."
    return "Its base model's name was not recorded. Fix: load it onto a base model of the adapter's shape."


def load_adapter_module(
    directory: str | Path, base_model: PreTrainedModel, materialized_only: bool = False
) -> tuple[SoftPromptConfig, nn.Module]:
    """Reads an adapter directory into its config and module (fp32, on the base model's device).

    Args:
        directory: written by `save_adapter`.
        base_model: the base it is loaded onto; its shape must match the recorded one.
        materialized_only: build a `MaterializedPrompt` from the stored output (inference without the encoder).

    Raises:
        AdapterFormatError: missing, truncated or corrupt files, unknown format or method, or another base shape.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory}: adapter directory not found. Fix: pass the directory save_adapter wrote.")
    config_path = directory / CONFIG_FILE
    document = read_json(config_path)
    if document.get("format") != FORMAT_NAME:
        hint = " It looks like a PEFT adapter: use softprompt.load_peft_adapter." if "peft_type" in document else ""
        raise AdapterFormatError(
            f"{config_path}: format {document.get('format')!r}: expected {FORMAT_NAME!r}.{hint}"
        )
    if not isinstance(document.get("format_version"), int) or document["format_version"] > FORMAT_VERSION:
        raise AdapterFormatError(
            f"{config_path}: format_version {document.get('format_version')!r}: this softprompt reads versions up to "
            f"{FORMAT_VERSION}. Fix: upgrade softprompt."
        )
    config = config_from_dict(str(document.get("method")), dict(document.get("config") or {}), str(config_path))
    check_base_shape(dict(document.get("base_model") or {}), base_model, config_path)
    weights = dict(document.get("weights") or {})
    weights_name = str(weights.get("file", WEIGHTS_FILE))
    if Path(weights_name).name != weights_name:  # the weights sit beside the config, never elsewhere
        raise AdapterFormatError(
            f"{config_path}: weights file {weights_name!r}: expected a file name in the adapter directory. Fix: "
            f"re-save the adapter (its weights are {WEIGHTS_FILE!r})."
        )
    weights_path = directory / weights_name
    tensors = read_safetensors(weights_path, weights.get("bytes"), weights.get("sha256"))
    shape = BaseModelShape.of(base_model)
    if "materialized" not in tensors:
        raise AdapterFormatError(f"{weights_path}: the tensor 'materialized' is missing.")
    if materialized_only or not document.get("encoder_weights", True):
        module: nn.Module = MaterializedPrompt(tensors["materialized"])
    else:
        module = build_module(config, shape)
    state = {key.removeprefix("prompt."): value for key, value in tensors.items() if key.startswith("prompt.")}
    if isinstance(module, MaterializedPrompt):
        state = {"embedding.weight": tensors["materialized"]}
    expected = module.state_dict()
    problems = sorted(set(expected) ^ set(state)) + [
        f"{key}: {tuple(state[key].shape)} stored vs {tuple(expected[key].shape)} expected"
        for key in set(expected) & set(state)
        if state[key].shape != expected[key].shape
    ]
    if problems:
        raise AdapterFormatError(
            f"{weights_path}: tensors do not match the {config.method} config: {problems}. "
            "Fix: the weights and the config come from different adapters; re-save the adapter."
        )
    module.load_state_dict(state)
    return config, module.to(base_model.get_input_embeddings().weight.device)
