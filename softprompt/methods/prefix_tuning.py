"""Prefix tuning: trainable keys and values in front of every attention layer.

Li and Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (ACL 2021).

The method in one sentence: keep the language model frozen and give every transformer layer P extra key and value
vectors, which every real token attends to as if P earlier tokens had produced them. Unlike prompt tuning, nothing
is added to the input: the prefix enters each layer's attention directly, so it passes through no layer's
computation.

The prefix is one trainable row of L * 2 * K * D numbers per position (`PrefixTable`), or, the paper's
reparameterization, a ``[P, K * D]`` table through Linear -> Tanh -> Linear (`ProjectedPrefix`). A row is laid out as
PEFT lays it out, so weights move between the two libraries (`split_key_values`): for each layer l in order, the
keys of layer l, then its values, each head-major ``(K, D)``. K is the layer's key/value heads, fewer than its query
heads in grouped-query families; PEFT sizes the projected table by K * D as well.

How it enters the model (`reference_forward`, PEFT's way, written out):

1. every layer's keys and values ``[B, K, P, D]`` go into a transformers ``DynamicCache``, handed to the model as
   the cache of P tokens it has already seen;
2. the attention mask gets P ones in front; the labels are unchanged (the prefix adds no position to the sequence);
3. the real tokens take positions P, P + 1, ... (`softprompt.positions`).

On the real path, `enter` hands the engine the split keys and values (`softprompt.entries.KeyValues`); the engine
puts them into a read-only cache (``softprompt/prefix_cache.py``), which stores nothing and so stays the same when
gradient checkpointing recomputes a layer.

Shapes: B batch, T tokens, P virtual tokens, L layers, K key/value heads, D head dim, h ``encoder_hidden_size``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from softprompt.entries import EntryRequest, KeyValues
from softprompt.families import family_of
from softprompt.families.family import BaseModelShape
from softprompt.methods.spec import (
    MaterializedPrompt,
    MethodSpec,
    Paper,
    check_fits_in_memory,
    check_positive_int,
    from_prompt_embeddings,
)
from softprompt.positions import position_inputs
from softprompt.seams import cache_argument


@dataclass
class PrefixTuningConfig:
    """Configuration of prefix tuning; a PEFT user switches by changing the import."""

    num_virtual_tokens: int = None  # type: ignore[assignment]
    """P, the number of prefix positions every layer gets. Required."""

    encoder_hidden_size: int | None = None
    """h, the width of the projection MLP (``prefix_projection=True``); None means K * D, one layer's key width
    (PEFT's default: the hidden size C for models without grouped-query attention)."""

    prefix_projection: bool = False
    """Train a ``[P, K * D]`` table through a two-layer MLP instead of the ``[P, L * 2 * K * D]`` table directly."""

    method: ClassVar[str] = "prefix_tuning"

    def __post_init__(self) -> None:
        check_positive_int("num_virtual_tokens", self.num_virtual_tokens, "PrefixTuningConfig(num_virtual_tokens=20)")
        check_positive_int(
            "encoder_hidden_size", self.encoder_hidden_size, "encoder_hidden_size=512 (None means the model's width)",
            allow_none=True,
        )
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"prefix_projection={self.prefix_projection!r}: expected True or False.")


class PrefixTable(nn.Module):
    """The direct parameterization: one trainable row of L * 2 * K * D numbers per prefix position.

    Args:
        config: the prefix-tuning configuration.
        shape: the base model's dimensions.
    """

    def __init__(self, config: PrefixTuningConfig, shape: BaseModelShape):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.num_virtual_tokens, shape.prefix_width)

    def forward(self) -> torch.Tensor:
        """Returns the flat prefix, ``[P, L * 2 * K * D]`` (see `split_key_values` for the layout)."""
        return self.embedding.weight


class ProjectedPrefix(nn.Module):
    """The reparameterization: a ``[P, K * D]`` table -> Linear(K * D, h) -> Tanh -> Linear(h, L * 2 * K * D).

    Args:
        config: the prefix-tuning configuration.
        shape: the base model's dimensions.
    """

    def __init__(self, config: PrefixTuningConfig, shape: BaseModelShape):
        super().__init__()
        self.config = config
        width = shape.key_value_width  # PEFT's token_dim: K * D (C when every head has its own keys)
        encoder_hidden_size = config.encoder_hidden_size or width
        self.embedding = nn.Embedding(config.num_virtual_tokens, width)
        self.transform = nn.Sequential(
            nn.Linear(width, encoder_hidden_size),
            nn.Tanh(),
            nn.Linear(encoder_hidden_size, shape.prefix_width),
        )

    def forward(self) -> torch.Tensor:
        """Returns the flat prefix, ``[P, L * 2 * K * D]`` (see `split_key_values` for the layout)."""
        return self.transform(self.embedding.weight)


def split_key_values(flat_prefix: torch.Tensor, shape: BaseModelShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Splits the flat prefix into every layer's keys and values.

    Args:
        flat_prefix: ``[P, L * 2 * K * D]``; within a row: layer-major, then keys before values, then head-major.
        shape: the base model's dimensions (L, K).

    Returns:
        keys and values, each ``[L, K, P, D]``.
    """
    key_values = rearrange(
        flat_prefix, "p (l kv k d) -> kv l k p d", l=shape.num_layers, kv=2, k=shape.num_key_value_heads
    )
    return key_values[0], key_values[1]


def merge_key_values(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_key_values`: keys and values ``[L, K, P, D]`` -> the flat ``[P, L * 2 * K * D]``."""
    key_values = torch.stack([keys, values])  # [2, L, K, P, D]
    return rearrange(key_values, "kv l k p d -> p (l kv k d)")


def empty(config: PrefixTuningConfig, shape: BaseModelShape) -> PrefixTable | ProjectedPrefix:
    """The module ``config.prefix_projection`` names (PyTorch's default initialization: N(0, 1) tables, as PEFT)."""
    return ProjectedPrefix(config, shape) if config.prefix_projection else PrefixTable(config, shape)


def build(
    config: PrefixTuningConfig, base_model: PreTrainedModel, tokenizer: Any | None = None
) -> PrefixTable | ProjectedPrefix:
    """The module, on the base's device; it needs no other initialization."""
    shape = family_of(base_model.config).shape(base_model.config)
    device = base_model.get_input_embeddings().weight.device
    check_fits_in_memory(config, shape.prefix_width, device)
    with torch.device(device):
        return empty(config, shape)


def from_table(
    config: PrefixTuningConfig, shape: BaseModelShape, table: torch.Tensor
) -> PrefixTable | MaterializedPrompt:
    """A stored ``[P, L * 2 * K * D]`` prefix as a module: a `PrefixTable` (the whole of a plain prefix adapter), or
    a fixed table for a projected one, whose MLP the table does not hold."""
    if config.prefix_projection:
        return MaterializedPrompt(table)
    module = PrefixTable(config, shape)
    with torch.no_grad():
        module.embedding.weight.copy_(table.float())
    return module


def enter(module: nn.Module, request: EntryRequest) -> KeyValues:
    """The flat prefix, split into every layer's keys and values ``[L, K, P, D]``."""
    return KeyValues(*split_key_values(module(), request.shape))


def reference_forward(
    base_model: PreTrainedModel,
    flat_prefix: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> CausalLMOutputWithPast:
    """The prefix as the cache of P tokens the model has already seen, as PEFT hands it over; the plain reference
    the engine is tested against.

    Args:
        base_model: the frozen transformers causal LM.
        flat_prefix: ``[P, L * 2 * K * D]``, the method module's output.
        input_ids: ``[B, T]``.
        attention_mask: ``[B, T]``.
        labels: ``[B, T]`` (-100 where no loss is wanted) or None.

    Returns:
        The base model's output: ``.logits [B, T, V]`` and ``.loss``.
    """
    batch_size, num_tokens = input_ids.shape
    family = family_of(base_model.config)
    keys, values = split_key_values(flat_prefix, family.shape(base_model.config))  # each [L, K, P, D]
    dtype = base_model.get_input_embeddings().weight.dtype
    cache = DynamicCache(config=base_model.config)
    for layer in range(keys.shape[0]):
        cache.update(
            keys[layer].to(dtype).expand(batch_size, -1, -1, -1),  # [B, K, P, D]
            values[layer].to(dtype).expand(batch_size, -1, -1, -1),
            layer,
        )
    mask = torch.cat([attention_mask.new_ones(batch_size, keys.shape[2]), attention_mask], dim=1)  # [B, P + T]
    return base_model(
        input_ids=input_ids,
        attention_mask=mask,
        labels=labels,
        **cache_argument(base_model, cache),
        **position_inputs(family, mask, num_tokens),
    )


METHOD = MethodSpec(
    name="prefix_tuning",
    cli_name="prefix-tuning",
    config_class=PrefixTuningConfig,
    enters_as="key_values",
    build=build,
    empty=empty,
    enter=enter,
    peft_type="PREFIX_TUNING",
    peft_fields=("num_virtual_tokens", "encoder_hidden_size", "prefix_projection"),
    default_num_virtual_tokens=20,
    peft_module=from_prompt_embeddings(from_table),
    paper=Paper("Li and Liang", 2021, "2101.00190", "Prefix-Tuning: Optimizing Continuous Prompts for Generation"),
    trains="a `[P, L·2·K·D]` table of keys and values; with `prefix_projection`, a `[P, K·D]` table through "
           "`K·D -> h -> L·2·K·D` (Tanh between; h = `encoder_hidden_size`)",
    reference_forward=reference_forward,
)
