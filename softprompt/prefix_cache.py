"""How a prefix reaches the frozen model in a forward pass: a read-only transformers `Cache`.

transformers' attention layers ask their cache for "the past keys and values, and the current ones": each layer
calls ``cache.update(current_keys, current_values, layer)`` and attends to what it returns. `PrefixCache` answers
``cat(prefix, current)`` and stores nothing. Because it never grows, a layer recomputed by gradient checkpointing
sees exactly what it saw the first time, which makes prefixes safe under checkpointing (PEFT's growing
``DynamicCache`` is not). Generation starts an ordinary ``DynamicCache`` from the same keys and values instead,
since it must grow (`softprompt.generation`).

Shapes: B batch, T tokens, P prefix slots, L layers, K key/value heads, D head dim.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.cache_utils import Cache, CacheLayerMixin


class _ReadOnlyPrefixLayer(CacheLayerMixin):
    """One layer's prefix: `update` returns ``cat(prefix, current)`` along tokens and stores nothing."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values  # each [B, K, P, D]
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Constructed initialized: there is nothing to create lazily.
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [B, K, T, D] -> returned [B, K, P + T, D]
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
    """A read-only transformers `Cache` holding one prefix per layer.

    Args:
        keys: ``[L, B, K, P, D]`` (a broadcast view is fine: each layer's concatenation makes the only copy).
        values: same shape as `keys`.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__(layers=[_ReadOnlyPrefixLayer(k, v) for k, v in zip(keys, values)])


@contextmanager
def checkpointed_layers_read_cache(model: nn.Module) -> Iterator[None]:
    """Let gradient-checkpointed transformers layers keep a read-only cache while the forward pass runs.

    transformers' `GradientCheckpointingLayer` drops the cache under checkpointing unless the layer sets
    ``_can_checkpoint_with_cache``, the class attribute it provides for layers that only read the cache (private by
    its name, explained by the comment beside it in transformers' ``modeling_layers.py``). A `PrefixCache` is only
    read, so a recomputed layer sees the same prefix. Some model classes also drop the cache themselves before
    handing it to their layers while their own ``gradient_checkpointing`` flag is on (GPT-2); the layers checkpoint
    by their own flags, so that model-level flag is off for the call. The decisions are taken when each forward
    runs (the recomputation reuses them), so both switches only need to be set during the forward pass; they are
    restored after.
    """
    layers = [module for module in model.modules() if hasattr(module, "_can_checkpoint_with_cache")]
    previous = [module.__dict__.get("_can_checkpoint_with_cache") for module in layers]
    models = [module for module in model.modules()
              if getattr(module, "gradient_checkpointing", None) is True and module not in layers]
    for module in layers:
        module._can_checkpoint_with_cache = True
    for module in models:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module, value in zip(layers, previous):
            if value is None:
                del module._can_checkpoint_with_cache
            else:
                module._can_checkpoint_with_cache = value
        for module in models:
            module.gradient_checkpointing = True
