"""Reading and writing Hugging Face PEFT's adapter format, without importing peft.

A PEFT prompt-learning adapter directory holds ``adapter_config.json`` (``peft_type`` PROMPT_TUNING, P_TUNING or
PREFIX_TUNING, ``task_type`` CAUSAL_LM, the method's fields, and the base shape as ``token_dim``, ``num_layers``,
``num_attention_heads``) and ``adapter_model.safetensors`` with one fp32 tensor, ``prompt_embeddings``:

- prompt tuning: the ``[P, C]`` table;
- p-tuning: the encoder's output ``[P, C]`` (the MLP/LSTM weights are not saved);
- prefix tuning: the ``[P, L * 2 * C]`` table, or the projection MLP's output of that shape.

So PEFT adapters of p-tuning and projected prefix tuning come back as a `MaterializedPrompt`: usable as they are,
trainable only as a plain table.

Shapes: P virtual tokens, L layers, C hidden.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn
from transformers import PreTrainedModel

from softprompt.adapter_format import (
    AdapterFormatError,
    MaterializedPrompt,
    atomic_write_bytes,
    config_from_dict,
    read_json,
    read_safetensors,
    trained_on,
)
from softprompt.model import BaseModelShape, SoftPromptConfig, SoftPromptModel, materialize
from softprompt.p_tuning import PromptEncoderConfig
from softprompt.prefix_tuning import PrefixTable, PrefixTuningConfig
from softprompt.prompt_tuning import PromptEmbedding, PromptTuningConfig

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_TENSOR = "prompt_embeddings"
PEFT_TYPES = {"PROMPT_TUNING": "prompt_tuning", "P_TUNING": "p_tuning", "PREFIX_TUNING": "prefix_tuning"}
# The PEFT fields that each of our configs shares (same names, same meaning).
SHARED_FIELDS = {
    "prompt_tuning": ("num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path"),
    "p_tuning": (
        "num_virtual_tokens",
        "encoder_reparameterization_type",
        "encoder_hidden_size",
        "encoder_num_layers",
        "encoder_dropout",
    ),
    "prefix_tuning": ("num_virtual_tokens", "encoder_hidden_size", "prefix_projection"),
}


def load_peft_adapter(
    base_model: PreTrainedModel,
    peft_directory: str | Path,
    adapter_name: str = "default",
    is_trainable: bool = False,
) -> SoftPromptModel:
    """Builds a `SoftPromptModel` from a PEFT prompt-learning adapter directory.

    Args:
        base_model: the frozen base the adapter was trained on.
        peft_directory: holds ``adapter_config.json`` and ``adapter_model.safetensors``.
        adapter_name: the name the adapter gets.
        is_trainable: leave the loaded table trainable; frozen otherwise, as in PEFT.

    Raises:
        AdapterFormatError: missing or corrupt files, an unsupported PEFT method or task, or another base shape.
    """
    config, module = read_peft_adapter(base_model, peft_directory)
    module.requires_grad_(is_trainable)
    return SoftPromptModel._from_module(base_model, config, module, adapter_name)


def read_peft_adapter(base_model: PreTrainedModel, peft_directory: str | Path) -> tuple[SoftPromptConfig, nn.Module]:
    """Reads a PEFT adapter directory into our config and module (see `load_peft_adapter`)."""
    directory = Path(peft_directory)
    config_path = directory / PEFT_CONFIG_FILE
    document = read_json(config_path)
    peft_type = document.get("peft_type")
    if peft_type not in PEFT_TYPES:
        raise AdapterFormatError(
            f"{config_path}: peft_type {peft_type!r}: expected one of {sorted(PEFT_TYPES)} (softprompt reads PEFT's "
            "prompt-learning adapters only)."
        )
    if document.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterFormatError(f"{config_path}: task_type {document.get('task_type')!r}: expected 'CAUSAL_LM'.")
    if document.get("num_transformer_submodules", 1) != 1:
        raise AdapterFormatError(
            f"{config_path}: num_transformer_submodules {document['num_transformer_submodules']}: expected 1 "
            "(a decoder-only model)."
        )
    method = PEFT_TYPES[peft_type]
    fields = {key: document[key] for key in SHARED_FIELDS[method] if document.get(key) is not None}
    config = config_from_dict(method, fields, str(config_path))

    shape = BaseModelShape.of(base_model)
    recorded = {
        "hidden_size": document.get("token_dim"),
        "num_layers": document.get("num_layers"),
        "num_heads": document.get("num_attention_heads"),
    }
    mismatches = [
        f"{key} {value} (adapter) vs {getattr(shape, key)} (base model)"
        for key, value in recorded.items()
        if value is not None and value != getattr(shape, key)
    ]
    if mismatches:
        raise AdapterFormatError(
            f"{config_path}: adapter made for another base model shape: {'; '.join(mismatches)}. "
            f"{trained_on(document.get('base_model_name_or_path'))}"
        )

    weights_path = directory / PEFT_WEIGHTS_FILE
    tensors = read_safetensors(weights_path)
    if PEFT_TENSOR not in tensors:
        raise AdapterFormatError(f"{weights_path}: tensor {PEFT_TENSOR!r} missing; found {sorted(tensors)}.")
    table = tensors[PEFT_TENSOR].float()
    width = shape.hidden_size if method != "prefix_tuning" else shape.num_layers * 2 * shape.hidden_size
    if tuple(table.shape) != (config.num_virtual_tokens, width):
        raise AdapterFormatError(
            f"{weights_path}: {PEFT_TENSOR} has shape {tuple(table.shape)}: expected "
            f"[num_virtual_tokens, {'L * 2 * C' if method == 'prefix_tuning' else 'C'}] = "
            f"{(config.num_virtual_tokens, width)}."
        )
    module: nn.Module
    if isinstance(config, PromptTuningConfig):
        module = PromptEmbedding(config, shape.hidden_size, init_embeddings=table)
    elif isinstance(config, PrefixTuningConfig) and not config.prefix_projection:
        module = PrefixTable(config, shape.num_layers, shape.hidden_size)
        with torch.no_grad():
            module.embedding.weight.copy_(table)
    else:
        module = MaterializedPrompt(table)
    return config, module.to(base_model.get_input_embeddings().weight.device)


def peft_config_document(config: SoftPromptConfig, base_model: PreTrainedModel) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT 0.21 writes for this config (in inference mode)."""
    shape = BaseModelShape.of(base_model)
    peft_type = {value: key for key, value in PEFT_TYPES.items()}[config.method]
    document: dict[str, Any] = {
        "auto_mapping": None,
        "base_model_name_or_path": getattr(base_model.config, "_name_or_path", None) or None,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": shape.num_heads,
        "num_layers": shape.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": config.num_virtual_tokens,
        "peft_type": peft_type,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": shape.hidden_size,
    }
    for key in SHARED_FIELDS[config.method]:
        value = getattr(config, key)
        document[key] = getattr(value, "value", value)
    if isinstance(config, (PromptEncoderConfig, PrefixTuningConfig)) and config.encoder_hidden_size is None:
        document["encoder_hidden_size"] = shape.hidden_size  # PEFT's default, written out as PEFT does
    return dict(sorted(document.items()))


def save_peft_adapter(
    directory: str | Path, config: SoftPromptConfig, module: nn.Module, base_model: PreTrainedModel
) -> Path:
    """Writes a PEFT adapter directory that ``peft.PeftModel.from_pretrained`` loads (files written atomically).

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = safetensors_bytes({PEFT_TENSOR: materialize(module).cpu()}, metadata={"format": "pt"})
    atomic_write_bytes(directory / PEFT_WEIGHTS_FILE, payload)
    document = peft_config_document(config, base_model)
    atomic_write_bytes(directory / PEFT_CONFIG_FILE, (json.dumps(document, indent=2) + "\n").encode())
    return directory
