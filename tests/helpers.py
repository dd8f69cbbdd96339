"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

# The tiny model's embedding matrix has rows past the tokenizer's vocabulary, like BLOOM's (250880 rows for
# 250680 ids), so that SAMPLE_VOCAB init can be checked to avoid them.
UNUSED_EMBEDDING_ROWS = 24


def left_padded_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and labels (-100 on padding) for `texts`, left-padded to the longest."""
    encoded = [tokenizer(text)["input_ids"] for text in texts]
    length = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(texts), length), tokenizer.pad_token_id)
    attention_mask = torch.zeros(len(texts), length, dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, length - len(ids) :] = torch.tensor(ids)
        attention_mask[row, length - len(ids) :] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def count_attention_calls(model) -> list[int]:
    """Counts calls of each layer's attention module of a SoftPromptModel's base, one entry per layer (a
    checkpointed layer's recomputation in the backward pass calls it again)."""
    calls = []
    for block in model.base_model.get_decoder().h:
        calls.append(0)
        index = len(calls) - 1

        def hook(module, inputs, output, index=index):
            calls[index] += 1

        block.self_attention.register_forward_hook(hook)
    return calls
