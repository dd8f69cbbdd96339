"""Prefix tuning: trainable keys and values in front of every attention layer.

Li and Liang, "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (ACL 2021).

The method in one sentence: keep the language model frozen and give every transformer layer P extra key and value
vectors per head, which every real token can attend to as if P earlier tokens had produced them. Unlike prompt
tuning, nothing is added to the input: the prefix enters each layer's attention directly, so it does not pass
through the embedding LayerNorm or any layer's computation.

This file holds:
- `PrefixTuningConfig`: PEFT's field names and defaults.
- `PrefixTable`: the direct parameterization, one ``[P, L * 2 * C]`` table.
- `ProjectedPrefix`: the paper's reparameterization, ``[P, C]`` table -> Linear(C, h) -> Tanh -> Linear(h, L * 2 * C).
- `split_key_values`: how one row of ``L * 2 * C`` numbers is laid out (PEFT's layout, so weights move between the
  two libraries): for each layer l in order, the keys of layer l then the values of layer l, each head-major
  ``(H, D)``.
- `PrefixCache`: how the prefix reaches the frozen model. transformers' attention layers ask their `Cache` for
  "past keys and values + the current ones"; this cache answers ``cat(prefix, current)`` and stores nothing. Because
  it never grows, a layer recomputed by gradient checkpointing sees exactly what it saw the first time, which is what
  makes prefix tuning safe under checkpointing (PEFT's growing cache is not).

Shapes: B batch, T tokens, P virtual tokens, L layers, H heads, D head dim (C = H * D hidden), h
``encoder_hidden_size``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from einops import rearrange
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class PrefixTuningConfig:
    """Configuration of prefix tuning; a PEFT user switches by changing the import."""

    num_virtual_tokens: int = None  # type: ignore[assignment]
    """P, the number of prefix positions every layer gets. Required."""

    encoder_hidden_size: int | None = None
    """h, the width of the projection MLP (``prefix_projection=True``); None means the hidden size C (PEFT)."""

    prefix_projection: bool = False
    """Train a ``[P, C]`` table through a two-layer MLP instead of the ``[P, L * 2 * C]`` table directly."""

    method: ClassVar[str] = "prefix_tuning"

    def __post_init__(self) -> None:
        if (
            not isinstance(self.num_virtual_tokens, int)
            or isinstance(self.num_virtual_tokens, bool)
            or self.num_virtual_tokens <= 0
        ):
            raise ValueError(
                f"num_virtual_tokens={self.num_virtual_tokens!r}: expected a positive int. "
                "Fix: pass e.g. PrefixTuningConfig(num_virtual_tokens=20)."
            )
        if self.encoder_hidden_size is not None and (
            not isinstance(self.encoder_hidden_size, int)
            or isinstance(self.encoder_hidden_size, bool)
            or self.encoder_hidden_size <= 0
        ):
            raise ValueError(
                f"encoder_hidden_size={self.encoder_hidden_size!r}: expected a positive int or None (None means the "
                "model's hidden size). Fix: pass e.g. encoder_hidden_size=512."
            )
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(
                f"prefix_projection={self.prefix_projection!r}: expected True or False."
            )


class PrefixTable(nn.Module):
    """The direct parameterization: one trainable row of ``L * 2 * C`` numbers per prefix position.

    Args:
        config: the prefix-tuning configuration.
        num_layers: L, the base model's number of transformer layers.
        hidden_size: C, the base model's hidden size.
    """

    def __init__(self, config: PrefixTuningConfig, num_layers: int, hidden_size: int):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.num_virtual_tokens, num_layers * 2 * hidden_size)

    def forward(self) -> torch.Tensor:
        """Returns the flat prefix, ``[P, L * 2 * C]`` (see `split_key_values` for the layout)."""
        return self.embedding.weight


class ProjectedPrefix(nn.Module):
    """The reparameterization: a ``[P, C]`` table -> Linear(C, h) -> Tanh -> Linear(h, L * 2 * C).

    Args:
        config: the prefix-tuning configuration.
        num_layers: L, the base model's number of transformer layers.
        hidden_size: C, the base model's hidden size.
    """

    def __init__(self, config: PrefixTuningConfig, num_layers: int, hidden_size: int):
        super().__init__()
        self.config = config
        encoder_hidden_size = config.encoder_hidden_size or hidden_size
        self.embedding = nn.Embedding(config.num_virtual_tokens, hidden_size)
        self.transform = nn.Sequential(
            nn.Linear(hidden_size, encoder_hidden_size),
            nn.Tanh(),
            nn.Linear(encoder_hidden_size, num_layers * 2 * hidden_size),
        )

    def forward(self) -> torch.Tensor:
        """Returns the flat prefix, ``[P, L * 2 * C]`` (see `split_key_values` for the layout)."""
        return self.transform(self.embedding.weight)


def build_prefix_encoder(config: PrefixTuningConfig, num_layers: int, hidden_size: int) -> PrefixTable | ProjectedPrefix:
    """The module that `config.prefix_projection` names."""
    if config.prefix_projection:
        return ProjectedPrefix(config, num_layers, hidden_size)
    return PrefixTable(config, num_layers, hidden_size)


def split_key_values(flat_prefix: torch.Tensor, num_layers: int, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the flat prefix into per-layer keys and values.

    Args:
        flat_prefix: ``[P, L * 2 * H * D]``; within a row: layer-major, then keys before values, then head-major.
        num_layers: L.
        num_heads: H.

    Returns:
        keys and values, each ``[L, H, P, D]``.
    """
    key_values = rearrange(flat_prefix, "p (l kv h d) -> kv l h p d", l=num_layers, kv=2, h=num_heads)
    return key_values[0], key_values[1]


def merge_key_values(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_key_values`: keys and values ``[L, H, P, D]`` -> flat ``[P, L * 2 * H * D]``."""
    key_values = torch.stack([keys, values])  # [2, L, H, P, D]
    return rearrange(key_values, "kv l h p d -> p (l kv h d)")


class _ReadOnlyPrefixLayer(CacheLayerMixin):
    """One layer's prefix: `update` returns ``cat(prefix, current)`` along tokens and stores nothing."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values  # each [B, H, P, D]
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Constructed initialized: there is nothing to create lazily.
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [B, H, T, D] -> returned [B, H, P + T, D]
        keys = torch.cat([self.keys.to(key_states.dtype), key_states], dim=-2)
        values = torch.cat([self.values.to(value_states.dtype), value_states], dim=-2)
        return keys, values

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        # (key/value length the attention mask must cover, offset of the first key): prefix + current tokens.
        # transformers passes the query length; releases before 5.2 passed the query's cache positions instead.
        query_length = query if isinstance(query, int) else query.shape[-1]
        return self.keys.shape[-2] + query_length, 0

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]

    def get_max_length(self) -> int:
        return -1  # no maximum: the cache never grows

    def get_max_cache_shape(self) -> int:
        return -1  # the name releases before 5.2 gave `get_max_length`

    def reset(self) -> None:
        raise RuntimeError("A PrefixCache is read-only: it holds a trainable prefix, not generated states.")


class PrefixCache(Cache):
    """A read-only transformers `Cache` holding one prefix per layer; used for the forward (training) pass.

    Generation uses an ordinary `DynamicCache` started from the same keys and values instead, since it must grow.

    Args:
        keys: ``[L, B, H, P, D]`` (or ``[L, H, P, D]``, shared by the whole batch, with `batch_size`).
        values: same shape as `keys`.
        batch_size: B, to broadcast an unbatched prefix over the batch.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, batch_size: int | None = None):
        if keys.dim() == 4:
            if batch_size is None:
                raise ValueError("An unbatched prefix [L, H, P, D] needs batch_size.")
            # expand is a view: the [B, H, P, D] copies are made only by the concatenation inside each layer.
            keys = keys.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)  # [L, B, H, P, D]
            values = values.unsqueeze(1).expand(-1, batch_size, -1, -1, -1)
        super().__init__(layers=[_ReadOnlyPrefixLayer(k, v) for k, v in zip(keys, values)])


@contextmanager
def checkpointed_layers_read_cache(model: nn.Module) -> Iterator[None]:
    """Let gradient-checkpointed transformers layers keep a read-only cache while the forward pass runs.

    transformers' `GradientCheckpointingLayer` drops the cache under checkpointing unless the layer sets
    ``_can_checkpoint_with_cache``, the class attribute it provides for layers that only read the cache (private by
    its name, explained by the comment beside it in transformers' ``modeling_layers.py``). A `PrefixCache`
    is only read, so a recomputed layer sees the same prefix. The decision is taken when each layer's forward runs
    (the recomputation reuses it), so the switch only needs to be on during the forward pass; it is restored after.
    """
    layers = [module for module in model.modules() if hasattr(module, "_can_checkpoint_with_cache")]
    previous = [module.__dict__.get("_can_checkpoint_with_cache") for module in layers]
    for module in layers:
        module._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for module, value in zip(layers, previous):
            if value is None:
                del module._can_checkpoint_with_cache
            else:
                module._can_checkpoint_with_cache = value
