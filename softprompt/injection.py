"""The two routes by which a batch's adapters enter the frozen model, both built on one `RowLayout`.

- The sequence route (`sequence_inputs`), the layout of each method's plain reference and of PEFT: virtual tokens
  in front of the token embeddings, prefix-tuning keys and values in a read-only cache, one mask over
  prefix + virtual tokens + text. `SoftPromptModel.forward` runs it.
- The prefix route (`prefix_for_rows`): every adapter as keys and values in the cache. A prefix-tuning adapter's
  keys and values are its output, split per layer; a virtual-token adapter's are what the frozen model computes for
  its P virtual tokens at positions 0..P-1, in one batch-1 pass (they come first and attention is causal, so they
  do not depend on the text). The training loss (`softprompt.loss.training_loss`) and generation run it.

In a batch mixing adapters, each adapter's values go to the last slots of its rows and the slots before them are
hidden (`softprompt.rows`); the positions of the real tokens come from the mask (`softprompt.positions`). Both
routes ask the model only for what `PromptedModel` lists.

Shapes: B batch, T tokens, P slots, L layers, K key/value heads, D head dim, C embedding width.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel

from softprompt.families.family import BaseModelShape, Family
from softprompt.inputs import check_model_inputs
from softprompt.loss import IGNORE_INDEX, next_token_targets
from softprompt.methods import SoftPromptConfig, method_of
from softprompt.methods.prefix_tuning import split_key_values
from softprompt.positions import check_positions, position_inputs
from softprompt.prefix_cache import PrefixCache
from softprompt.rows import RowLayout, Slots
from softprompt.seams import cache_argument


class PromptedModel(Protocol):
    """What the routes need of a model: the frozen base, its family and shape, the adapters and two passes."""

    base_model: PreTrainedModel
    family: Family
    shape: BaseModelShape
    prompts: nn.ModuleDict
    adapter_configs: dict[str, SoftPromptConfig]

    def row_layout(self, batch_size: int, adapter_names: Sequence[str | None] | None) -> RowLayout: ...

    def virtual_token_pass(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def adapter_key_values(
    model: PromptedModel, adapter_name: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """An adapter as keys and values, each ``[L, K, P, D]`` (with gradients), and, for virtual tokens, the final
    hidden state of the last one ``[C]`` (it predicts the first real token); None for a prefix."""
    output = model.prompts[adapter_name]()
    if method_of(model.adapter_configs[adapter_name]).enters_as == "key_values":
        keys, values = split_key_values(output, model.shape)
        return keys.to(dtype), values.to(dtype), None
    decoder = model.base_model.get_decoder()
    # The cache must be filled, and this pass is P tokens long: nothing to gain from checkpointing it, and
    # checkpointed layers would drop the cache.
    paused = [module for module in decoder.modules() if getattr(module, "gradient_checkpointing", False) is True]
    for module in paused:
        module.gradient_checkpointing = False
    try:
        keys, values, last = model.virtual_token_pass(output.to(dtype))  # [L, K, P, D] twice, [C]
    finally:
        for module in paused:
            module.gradient_checkpointing = True
    return keys.to(dtype), values.to(dtype), last.to(dtype)


def prefix_for_rows(
    model: PromptedModel, slots: Slots, dtype: torch.dtype
) -> tuple[PrefixCache | None, torch.Tensor, torch.Tensor]:
    """Every adapter of `slots` as a key/value prefix of its rows (with gradients).

    Returns:
        (the `PrefixCache`, None when no row has an adapter; its mask ``[B, P]``; the final hidden state of each
        row's last virtual token ``[B, C]``, zeros for rows without virtual tokens).
    """
    device = model.base_model.get_input_embeddings().weight.device
    batch_size = slots.batch_size
    mask = slots.mask(device)
    last_virtual = torch.zeros(batch_size, model.shape.embedding_width, dtype=dtype, device=device)
    if slots.length == 0:
        return None, mask, last_virtual
    key_values = {name: adapter_key_values(model, name, dtype) for name in slots.rows}
    if slots.uniform:
        # One adapter for the whole batch: broadcast views, no [L, B, K, P, D] copy, no row index tensors.
        keys, values, last = next(iter(key_values.values()))
        if last is not None:
            last_virtual = last.expand(batch_size, -1)
        return PrefixCache(keys, values, batch_size=batch_size), mask, last_virtual
    for name, (_, _, last) in key_values.items():
        if last is not None:
            rows = torch.tensor(slots.rows[name], device=device)
            last_virtual = last_virtual.index_copy(0, rows, last.expand(len(rows), -1))
    shape = model.shape
    slot_shape = (shape.num_layers, batch_size, shape.num_key_value_heads, slots.length, shape.head_dim)
    keys = slots.place({name: kv[0] for name, kv in key_values.items()},
                       torch.zeros(slot_shape, dtype=dtype, device=device), batch_dim=1, slot_dim=3)
    values = slots.place({name: kv[1] for name, kv in key_values.items()},
                         torch.zeros(slot_shape, dtype=dtype, device=device), batch_dim=1, slot_dim=3)
    return PrefixCache(keys, values), mask, last_virtual  # each [L, B, K, P, D]


def sequence_inputs(
    model: PromptedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    adapter_names: Sequence[str | None] | None,
) -> tuple[dict[str, Any], int]:
    """The base model's keyword arguments with every row's adapter in place (the sequence route).

    Returns:
        (kwargs: ``inputs_embeds [B, P_e + T, C]``, ``attention_mask [B, P_k + P_e + T]``, the prefix cache and the
        positions; P_e), where P_e is the longest virtual-token prompt and P_k the longest prefix of the batch.

    Raises:
        ValueError: ids or a mask that the model cannot take (`softprompt.inputs.check_model_inputs`), bad adapter
            names, or inputs longer than the model can attend to.
    """
    check_model_inputs(model.base_model, input_ids, attention_mask)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batch_size, num_tokens = input_ids.shape
    layout = model.row_layout(batch_size, adapter_names)
    token_embeddings = model.base_model.get_input_embeddings()(input_ids)  # [B, T, C]
    sequence = layout.in_sequence
    if sequence.uniform:
        virtual = model.prompts[next(iter(sequence.rows))]().to(token_embeddings.dtype).expand(batch_size, -1, -1)
    else:  # [B, P_e, C], each row's virtual tokens in its last slots
        virtual = sequence.place(
            {name: model.prompts[name]() for name in sequence.rows},
            token_embeddings.new_zeros(batch_size, sequence.length, model.shape.embedding_width),
            batch_dim=0, slot_dim=1,
        )
    prefix, prefix_mask, _ = prefix_for_rows(model, layout.in_cache, token_embeddings.dtype)
    virtual_mask = sequence.mask(input_ids.device, attention_mask.dtype)
    mask = torch.cat([prefix_mask.to(attention_mask.dtype), virtual_mask, attention_mask], dim=1)  # [B, P_k + P_e + T]
    check_positions(model.family, model.base_model.config, mask)
    inputs = {
        "inputs_embeds": torch.cat([virtual, token_embeddings], dim=1),  # [B, P_e + T, C]
        "attention_mask": mask,
        **cache_argument(model.base_model, prefix),
        **position_inputs(model.family, mask, sequence.length + num_tokens),
    }
    return inputs, sequence.length


def sequence_targets(labels: torch.Tensor, attention_mask: torch.Tensor, num_virtual: int) -> torch.Tensor:
    """Next-token targets ``[B, P_e + T]`` of the sequence route; hidden virtual slots predict nothing.

    The last virtual slot predicts the first real token. In a row whose adapter has no virtual tokens (prefix
    tuning, or none) that slot is hidden padding that does not exist when the row runs alone, where nothing scores
    the first token (`RowLayout.first_token_scored`): it must not score it in a mixed batch either.

    Args:
        labels: ``[B, T]``.
        attention_mask: the route's mask ``[B, P_k + P_e + T]``.
        num_virtual: P_e.
    """
    targets = next_token_targets(labels, num_virtual)  # [B, P_e + T]
    hidden_virtual = attention_mask[:, -targets.shape[1] :] == 0  # [B, P_e + T], without the prefix's P_k
    hidden_virtual[:, num_virtual:] = False  # real-token padding keeps PEFT's targets
    return targets.masked_fill(hidden_virtual, IGNORE_INDEX)
