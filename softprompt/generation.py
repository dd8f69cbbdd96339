"""Generation: every row's adapter as a key/value prefix, then transformers' own ``generate``.

Every adapter that takes slots enters as keys and values (`softprompt.routes.prefix_for_rows`): they go into an
ordinary ``DynamicCache`` (it must grow as tokens are generated) with the mask over prefix + text; transformers
builds each step's positions from that mask, which gives every row the positions it has alone
(`softprompt.positions`). Attention patches stay installed for the whole call. Every decoding option of
transformers keeps working (greedy, sampling, beams, repetition penalty, ...), and only real token ids come back.

Shapes: B batch, T tokens, P prefix slots, L layers, K key/value heads, D head dim, C embedding width, V vocab.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.utils import ModelOutput

from softprompt.entries import Entry
from softprompt.frozen import FrozenModel
from softprompt.inputs import check_generate_options
from softprompt.positions import check_positions
from softprompt.routes import patches, prefix_for_rows
from softprompt.rows import RowLayout
from softprompt.seams import cache_argument


@torch.no_grad()
def generate(
    frozen: FrozenModel,
    layout: RowLayout,
    entries: Mapping[str, Entry],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    **generate_kwargs: Any,
) -> torch.Tensor | ModelOutput:
    """`SoftPromptModel.generate` on checked inputs (see there for the arguments)."""
    base = frozen.base_model
    check_generate_options(generate_kwargs)
    prefix = prefix_for_rows(frozen, layout.as_prefix, entries, frozen.dtype)
    mask = torch.cat([prefix.mask.to(attention_mask.dtype), attention_mask], dim=1)  # [B, P + T]
    generation_config = generate_kwargs.get("generation_config", base.generation_config)
    new_tokens = generate_kwargs.get("max_new_tokens", generation_config.max_new_tokens)
    if new_tokens is None:  # transformers' other limit: max_length counts the input too
        new_tokens = max(0, generate_kwargs.get("max_length", generation_config.max_length) - input_ids.shape[1])
    check_positions(frozen.family, base.config, mask, new_tokens=new_tokens)
    # generate() repeats every row of the inputs this many times (beams / return sequences) but cannot know how to
    # repeat a cache it is handed, so the cache is repeated the same way here.
    num_beams = generate_kwargs.get("num_beams", generation_config.num_beams) or 1
    num_sequences = generate_kwargs.get("num_return_sequences", generation_config.num_return_sequences) or 1
    repeats = max(num_beams, num_sequences)
    cache = DynamicCache(config=base.config)
    if prefix.keys is not None:
        for layer, (keys, values) in enumerate(zip(prefix.keys, prefix.values)):  # each [B, K, P, D]
            cache.update(keys.repeat_interleave(repeats, dim=0), values.repeat_interleave(repeats, dim=0), layer)
    with cpu_head_with_weight_on_the_left(base), patches(layout, entries, repeats):
        return base.generate(input_ids=input_ids, attention_mask=mask, **cache_argument(base, cache), **generate_kwargs)


class HeadWithWeightOnTheLeft(nn.Module):
    """An LM head computed as ``(W @ h.T).T``, block by block: the same product as ``h @ W.T``, a faster form on CPU.

    At each decoding step the head multiplies B rows by the ``[V, C]`` weight. CPU BLAS runs that skinny product
    faster with the big weight as the left operand. Its result, ``[V, B]``, is the transpose of the logits: returned
    as a transposed view, it makes every later step of decoding slow (transformers copies the last position's logits
    to fp32, keeping the strides, and takes the argmax along the strided axis). So the vocabulary is done in blocks
    of `block_rows` rows of W, each block's small ``[block_rows, B]`` result transposed into a contiguous ``[B, V]``
    output while it is still in cache (``benchmarks/head_product.py`` measures the forms and the block size). It
    shares the weight; nothing is copied.
    """

    def __init__(self, head: nn.Linear, block_rows: int = 2048):
        super().__init__()
        self.head = head
        self.block_rows = block_rows

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.head.weight  # [V, C]
        rows = hidden_states.reshape(-1, hidden_states.shape[-1])  # [B * T, C]
        logits = rows.new_empty(rows.shape[0], weight.shape[0])  # [B * T, V]
        for start in range(0, weight.shape[0], self.block_rows):
            block = slice(start, start + self.block_rows)
            logits[:, block] = torch.mm(weight[block], rows.t()).t()  # [B * T, block_rows]
        if self.head.bias is not None:
            logits += self.head.bias
        return logits.reshape(*hidden_states.shape[:-1], weight.shape[0])  # [B, T, V]


@contextmanager
def cpu_head_with_weight_on_the_left(base_model: PreTrainedModel) -> Iterator[None]:
    """While generating on CPU, the base model's head is `HeadWithWeightOnTheLeft` (through transformers' public
    ``set_output_embeddings``); the original head is put back afterwards, whatever happens."""
    head = base_model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.weight.device.type != "cpu":
        yield
        return
    base_model.set_output_embeddings(HeadWithWeightOnTheLeft(head))
    try:
        yield
    finally:
        base_model.set_output_embeddings(head)
