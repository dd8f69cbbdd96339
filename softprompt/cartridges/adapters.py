"""PEFT's Cartridge helpers under PEFT's names, on a `SoftPromptModel`: initialize a key/value adapter from a text's
prefill or from a cache, and compose saved cartridges into one.

They serve Cartridges and prefix tuning without projection alike (the same ``[P, L * 2 * K * D]`` layout), as in
PEFT. A cartridge can also start from a text when it is built (``CartridgeConfig(init_text=...)``,
``--init-text``); these functions do it afterwards, on an adapter that already exists, as PEFT does.

Shapes: P positions, L layers, K key/value heads, D head dim.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from softprompt.methods import method_of
from softprompt.methods.cartridge import CartridgeCache, compose, table_from_past_key_values, table_from_text
from softprompt.methods.prefix_tuning import PrefixTable
from softprompt.model import SoftPromptModel
from softprompt.pretrained import check_format, read_adapter, save_one


def load_kv_table(module: nn.Module, table: torch.Tensor) -> None:
    """Copies a ``[P, L * 2 * K * D]`` table into a key/value adapter's module (PEFT's ``load_prompt_embeddings``):
    a cartridge splits it into its frozen and trainable rows, a prefix-tuning table takes it whole.

    Raises:
        ValueError: a module that is not a cartridge or a plain prefix table (a projected prefix is an MLP's
            output, PEFT refuses it too), or a table of another shape.
    """
    if isinstance(module, CartridgeCache):
        module.load_table(table.to(module.trainable_embedding.device))
        return
    if not isinstance(module, PrefixTable):
        raise ValueError(
            f"adapter module {type(module).__name__}: expected a cartridge or prefix tuning without projection "
            "(a projected prefix is an MLP's output, which a cache cannot set). Fix: initialize a cartridge, or a "
            "PrefixTuningConfig with prefix_projection=False."
        )
    if tuple(table.shape) != tuple(module.embedding.weight.shape):
        raise ValueError(f"table has shape {tuple(table.shape)}: expected {tuple(module.embedding.weight.shape)}.")
    with torch.no_grad():
        module.embedding.weight.copy_(table.to(module.embedding.weight.device))


def _key_value_adapter(model: SoftPromptModel, adapter_name: str | None) -> tuple[str, Any]:
    name = adapter_name or model.active_adapter
    model.check_adapter_names([name])
    config = model.adapter_configs[name]
    if method_of(config).enters_as != "key_values" or getattr(config, "prefix_projection", False):
        raise ValueError(
            f"adapter {name!r} is {type(config).__name__}: expected a cartridge or prefix tuning without projection. "
            "Fix: name such an adapter (adapter_name=...)."
        )
    return name, config


@torch.no_grad()
def initialize_kv_prefix_from_text(
    model: SoftPromptModel, tokenizer: Any, *, text: str, adapter_name: str | None = None,
    use_chat_template: bool = True,
) -> torch.Tensor:
    """Sets a key/value adapter to the frozen model's own keys and values of the first P tokens of `text` (as a
    system message with the tokenizer's chat template where it has one), PEFT's function of the same name.

    Returns:
        The ``[P, L * 2 * K * D]`` table loaded.

    Raises:
        ValueError: not a cartridge or plain prefix adapter, or a text of fewer than P tokens.
    """
    name, config = _key_value_adapter(model, adapter_name)
    table = table_from_text(model.base_model, tokenizer, text, config.num_virtual_tokens, use_chat_template)
    load_kv_table(model.prompts[name], table)
    return table


@torch.no_grad()
def initialize_kv_prefix_from_past_key_values(
    model: SoftPromptModel, *, past_key_values: Any, adapter_name: str | None = None
) -> torch.Tensor:
    """Sets a key/value adapter to the first P positions of a batch-1 cache (a transformers ``Cache`` or per-layer
    ``(keys, values)`` pairs), PEFT's function of the same name.

    Returns:
        The ``[P, L * 2 * K * D]`` table loaded.
    """
    name, config = _key_value_adapter(model, adapter_name)
    table = table_from_past_key_values(past_key_values, config.num_virtual_tokens)
    load_kv_table(model.prompts[name], table)
    return table


def compose_cartridge_adapters(
    base_model: Any, adapter_paths: Sequence[str | os.PathLike[str]], *, output_path: str | os.PathLike[str],
    format: str = "softprompt",
) -> Path:
    """Writes the concatenation of saved cartridges (either format) as one adapter: PEFT's
    ``compose_cartridge_adapters`` (``num_virtual_tokens`` summed, the first cartridge's frozen count).

    Args:
        base_model: the base they were trained on (each adapter's shape is checked against it).
        adapter_paths: two or more cartridge directories, in the order their positions take in front.
        output_path: where the composed adapter goes (written atomically, file by file).
        format: ``"softprompt"`` or ``"peft"``.

    Returns:
        `output_path`.

    Raises:
        ValueError: fewer than two paths, an unknown format, or an adapter that is not a cartridge (checked
            before anything is written); `softprompt.files.AdapterFormatError` for unreadable adapters.
    """
    check_format(format)
    if isinstance(adapter_paths, (str, os.PathLike)) or len(adapter_paths) < 2:
        raise ValueError(f"adapter_paths={adapter_paths!r}: expected two or more cartridge directories. Fix: list "
                         "every cartridge to compose, in order.")
    configs, tables = [], []
    for path in adapter_paths:
        config, module = read_adapter(path, base_model)
        if not isinstance(module, CartridgeCache):
            raise ValueError(f"{path}: a {config.method} adapter: expected a cartridge. Fix: compose cartridges only.")
        configs.append(config)
        tables.append(module().detach())
    config, table = compose(configs, tables)
    model = SoftPromptModel.from_module(base_model, config, CartridgeCache(config, table.shape[1], table))
    return save_one(model, output_path, None, format)
