"""Reading and writing Hugging Face PEFT's adapter format, without importing peft.

A PEFT prompt-learning adapter directory holds ``adapter_config.json`` (``peft_type`` PROMPT_TUNING, P_TUNING or
PREFIX_TUNING, ``task_type`` CAUSAL_LM, the method's fields, and the base's shape as ``token_dim``, ``num_layers``,
``num_attention_heads``) and ``adapter_model.safetensors`` with one fp32 tensor, ``prompt_embeddings``:

- prompt tuning: the ``[P, C]`` table;
- p-tuning: the encoder's output ``[P, C]`` (the MLP/LSTM weights are not saved);
- prefix tuning: the ``[P, L * 2 * K * D]`` table, or the projection MLP's output of that shape.

For a prefix, PEFT records ``token_dim`` = K * D and ``num_attention_heads`` = K, one layer's key/value width and
heads (the two differ from the hidden size and the query heads in grouped-query models). So PEFT adapters of
p-tuning and projected prefix tuning come back as a `MaterializedPrompt`: usable as they are, trainable only as a
plain table. Which method a PEFT type is, and which fields it shares, comes from the method registry.

Shapes: P virtual tokens, L layers, K key/value heads, D head dim, C embedding width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes
from torch import nn
from transformers import PreTrainedModel

from softprompt.adapter_format import FORMAT_NAME, config_from_dict, trained_on
from softprompt.families import family_of
from softprompt.files import (
    AdapterFormatError,
    BaseModelMismatchError,
    atomic_write_bytes,
    atomic_write_json,
    read_json,
    read_safetensors,
)
from softprompt.methods import METHODS, MethodSpec, SoftPromptConfig, materialize, method_of

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_TENSOR = "prompt_embeddings"
PEFT_METHODS: dict[str, MethodSpec] = {spec.peft_type: spec for spec in METHODS.values()}
"""Our methods by PEFT's ``peft_type``."""


def is_peft_document(document: dict[str, Any]) -> bool:
    """Whether an ``adapter_config.json`` document is PEFT's (it names a ``peft_type``)."""
    return "peft_type" in document


def read_peft_adapter(base_model: PreTrainedModel, peft_directory: str | Path) -> tuple[SoftPromptConfig, nn.Module]:
    """Reads a PEFT prompt-learning adapter directory into our config and module (fp32, on the base's device).

    Raises:
        AdapterFormatError: missing or corrupt files, an unsupported PEFT method or task, or another base shape.
    """
    directory = Path(peft_directory)
    config_path = directory / PEFT_CONFIG_FILE
    document = read_json(config_path, missing_fix=f"Fix: point to a PEFT adapter directory (it holds {PEFT_CONFIG_FILE}).")
    peft_type = document.get("peft_type")
    if peft_type not in PEFT_METHODS:
        hint = (
            " It is in softprompt's own format: use SoftPromptModel.from_pretrained, which reads both formats."
            if document.get("format") == FORMAT_NAME
            else ""
        )
        raise AdapterFormatError(
            f"{config_path}: peft_type {peft_type!r}: expected one of {sorted(PEFT_METHODS)} (softprompt reads PEFT's "
            f"prompt-learning adapters only).{hint}"
        )
    if document.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterFormatError(f"{config_path}: task_type {document.get('task_type')!r}: expected 'CAUSAL_LM'.")
    if document.get("num_transformer_submodules", 1) != 1:
        raise AdapterFormatError(
            f"{config_path}: num_transformer_submodules {document['num_transformer_submodules']}: expected 1 "
            "(a decoder-only model)."
        )
    spec = PEFT_METHODS[peft_type]
    fields = {key: document[key] for key in spec.peft_fields if document.get(key) is not None}
    config = config_from_dict(spec.name, fields, str(config_path))

    shape = family_of(base_model.config).shape(base_model.config)
    width_name, heads_name = (
        ("hidden_size", "num_heads") if spec.enters_as == "embeddings" else ("key/value width K x D", "num_key_value_heads")
    )
    recorded = {
        width_name: (document.get("token_dim"), spec.peft_token_dim(shape)),
        "num_layers": (document.get("num_layers"), shape.num_layers),
        heads_name: (document.get("num_attention_heads"), spec.peft_num_attention_heads(shape)),
    }
    mismatches = [
        f"{key} {value} (adapter) vs {actual} (base model)"
        for key, (value, actual) in recorded.items()
        if value is not None and value != actual
    ]
    if mismatches:
        raise BaseModelMismatchError(
            f"{config_path}: adapter made for another base model shape: {'; '.join(mismatches)}. "
            f"{trained_on(document.get('base_model_name_or_path'))}",
            config_path,
            mismatches,
        )

    weights_path = directory / PEFT_WEIGHTS_FILE
    tensors = read_safetensors(weights_path, record="the PEFT adapter config")
    if PEFT_TENSOR not in tensors:
        raise AdapterFormatError(f"{weights_path}: tensor {PEFT_TENSOR!r} missing; found {sorted(tensors)}.")
    table = tensors[PEFT_TENSOR].float()
    expected = (config.num_virtual_tokens, spec.output_width(shape))
    if tuple(table.shape) != expected:
        width = "C" if spec.enters_as == "embeddings" else "L * 2 * K * D"
        raise AdapterFormatError(
            f"{weights_path}: {PEFT_TENSOR} has shape {tuple(table.shape)}: expected [num_virtual_tokens, {width}] = "
            f"{expected}."
        )
    return config, spec.from_table(config, shape, table).to(base_model.get_input_embeddings().weight.device)


def peft_config_document(config: SoftPromptConfig, base_model: PreTrainedModel) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT 0.21 writes for this config (in inference mode)."""
    spec = method_of(config)
    shape = family_of(base_model.config).shape(base_model.config)
    document: dict[str, Any] = {
        "auto_mapping": None,
        "base_model_name_or_path": getattr(base_model.config, "_name_or_path", None) or None,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": spec.peft_num_attention_heads(shape),
        "num_layers": shape.num_layers,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": config.num_virtual_tokens,
        "peft_type": spec.peft_type,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": spec.peft_token_dim(shape),
    }
    for key in spec.peft_fields:
        value = getattr(config, key)
        document[key] = getattr(value, "value", value)
    if "encoder_hidden_size" in spec.peft_fields and config.encoder_hidden_size is None:
        document["encoder_hidden_size"] = spec.peft_token_dim(shape)  # PEFT's default, written out as PEFT does
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
    atomic_write_json(directory / PEFT_CONFIG_FILE, peft_config_document(config, base_model))
    return directory
