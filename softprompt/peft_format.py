"""Reading and writing Hugging Face PEFT's adapter format, without importing peft.

A PEFT prompt-learning adapter directory holds ``adapter_config.json`` (``peft_type``, ``task_type`` CAUSAL_LM, the
method's fields, and the base's shape as ``token_dim``, ``num_layers``, ``num_attention_heads``) and
``adapter_model.safetensors``. Which tensors that holds, and how a module is made from them, is each method's
(`MethodSpec.peft_tensors`, ``peft_state``, ``peft_module``); for the first three it is one fp32 tensor,
``prompt_embeddings``:

- prompt tuning: the ``[P, C]`` table;
- p-tuning: the encoder's output ``[P, C]`` (the MLP/LSTM weights are not saved);
- prefix tuning: the ``[P, L * 2 * K * D]`` table, or the projection MLP's output of that shape.

For a prefix, PEFT records ``token_dim`` = K * D and ``num_attention_heads`` = K, one layer's key/value width and
heads (the two differ from the hidden size and the query heads in grouped-query models). So PEFT adapters of
p-tuning and projected prefix tuning come back as a `MaterializedPrompt`: usable as they are, trainable only as a
plain table.

Shapes: P virtual tokens, L layers, K key/value heads, D head dim, C embedding width.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import save as safetensors_bytes
from torch import nn
from transformers import PreTrainedModel

from softprompt.adapter_format import config_from_dict, trained_on
from softprompt.families import family_of
from softprompt.files import (
    AdapterFormatError,
    BaseModelMismatchError,
    atomic_write_bytes,
    atomic_write_json,
    read_safetensors,
)
from softprompt.methods import METHODS, MethodSpec, SoftPromptConfig, method_of

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_METHODS: dict[str, MethodSpec] = {spec.peft_type: spec for spec in METHODS.values()}
"""Our methods by PEFT's ``peft_type``."""


def read(directory: Path, document: dict[str, Any], base_model: PreTrainedModel) -> tuple[SoftPromptConfig, nn.Module]:
    """Reads a PEFT adapter directory into our config and module (fp32, on the base's device).

    Args:
        directory: the adapter directory.
        document: its ``adapter_config.json``, already read and recognised as PEFT's with a known ``peft_type``
            (`softprompt.pretrained.adapter_format_of`).
        base_model: the base it is loaded onto.

    Raises:
        AdapterFormatError: missing or corrupt files, an unsupported task, tensors of other names or shapes than
            the config implies, or another base shape (`BaseModelMismatchError`).
    """
    config_path = directory / PEFT_CONFIG_FILE
    if document.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterFormatError(f"{config_path}: task_type {document.get('task_type')!r}: expected 'CAUSAL_LM'.")
    if document.get("num_transformer_submodules", 1) != 1:
        raise AdapterFormatError(
            f"{config_path}: num_transformer_submodules {document['num_transformer_submodules']}: expected 1 "
            "(a decoder-only model)."
        )
    spec = PEFT_METHODS[document["peft_type"]]
    fields = {key: document[key] for key in spec.peft_fields if document.get(key) is not None}
    config = config_from_dict(spec.name, fields, str(config_path))

    shape = family_of(base_model.config).shape(base_model.config)
    if spec.enters_as == "key_values":
        # A flat [P, L * 2 * K * D] table fits any base whose product agrees; only the recorded shape tells them apart.
        absent = [key for key in spec.peft_shape_fields(shape) if not _is_count(document.get(key))]
        if absent:
            raise AdapterFormatError(
                f"{config_path}: {', '.join(absent)} missing or not a positive integer: a {spec.peft_type} table is "
                f"one [num_virtual_tokens, L * 2 * K * D] row per slot, which fits any base whose product agrees, so "
                "without them the base it was made for is unknown. Fix: add the fields PEFT writes (token_dim = K * "
                "D, num_layers, num_attention_heads = K of the base it was trained on)."
            )
    names = {"token_dim": "hidden_size" if spec.enters_as == "virtual_tokens" else "key/value width K x D",
             "num_attention_heads": "num_heads" if spec.enters_as == "virtual_tokens" else "num_key_value_heads",
             "num_layers": "num_layers"}
    mismatches = [
        f"{names[key]} {document.get(key)} (adapter) vs {actual} (base model)"
        for key, actual in spec.peft_shape_fields(shape).items()
        if document.get(key) is not None and document.get(key) != actual
    ]
    if mismatches:
        raise BaseModelMismatchError(
            f"{config_path}: adapter made for another base model shape: {'; '.join(mismatches)}. "
            f"{trained_on(document.get('base_model_name_or_path'))}",
            config_path,
            mismatches,
        )

    weights_path = directory / PEFT_WEIGHTS_FILE
    expected = spec.expected_peft_tensors(config, base_model)
    width = "C" if spec.enters_as == "virtual_tokens" else "L * 2 * K * D"
    tensors = read_safetensors(weights_path, record="the PEFT adapter config", expected_shapes=expected,
                               shape_meanings={name: f"[num_virtual_tokens, {width}]" for name in expected})
    tables = {name: tensors[name].float() for name in expected}
    return config, spec.peft_module(config, base_model, tables).to(base_model.get_input_embeddings().weight.device)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def peft_config_document(config: SoftPromptConfig, base_model: PreTrainedModel) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT 0.21 writes for this config (in inference mode)."""
    spec = method_of(config)
    shape = family_of(base_model.config).shape(base_model.config)
    document: dict[str, Any] = {
        "auto_mapping": None,
        "base_model_name_or_path": getattr(base_model.config, "_name_or_path", None) or None,
        "inference_mode": True,
        "peft_type": spec.peft_type,
        "revision": None,
        "task_type": "CAUSAL_LM",
        **spec.peft_shape_fields(shape),
    }
    if spec.enters_as != "attention":  # PEFT's prompt-learning fields (its AdaptionPromptConfig has none of them)
        document.update(modules_to_save=None, num_transformer_submodules=1,
                        num_virtual_tokens=config.num_virtual_tokens)
    for key in spec.peft_fields:
        value = getattr(config, key)
        document[key] = getattr(value, "value", value)
    if "encoder_hidden_size" in spec.peft_fields and config.encoder_hidden_size is None:
        document["encoder_hidden_size"] = spec.peft_shape_fields(shape)["token_dim"]  # PEFT's default, written out
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
    state = {name: tensor.detach().float().cpu().contiguous()
             for name, tensor in method_of(config).peft_state(module, base_model).items()}
    payload = safetensors_bytes(state, metadata={"format": "pt"})
    atomic_write_bytes(directory / PEFT_WEIGHTS_FILE, payload)
    atomic_write_json(directory / PEFT_CONFIG_FILE, peft_config_document(config, base_model))
    return directory
