"""The one rule for positions, the same in training and in generation, and the limits a family puts on them.

The rule: every row computes what it computes alone and unpadded. A row whose adapter brings P virtual tokens or
prefix slots gives its real tokens positions P, P + 1, ..., whatever its left padding, the hidden slots that align
it with longer adapters in the batch, or the other rows' adapters. Positions therefore count the visible slots of a
row: ``cumsum(attention_mask) - 1`` over prefix + virtual tokens + text.

Families differ in how a position reaches the model (`Family.positions`): BLOOM derives its ALiBi positions from
the mask itself, by this very rule; every other family takes ``position_ids`` and defaults, without them, to
``arange(T)`` + the cache length, which ignores padding. So softprompt passes them. transformers' ``generate``
builds positions from the mask the same way, so a prefix handed to it with the mask over prefix + text continues by
the same rule.

On unpadded and right-padded batches the rule gives PEFT's positions; on left-padded rows PEFT's training and
generation disagree with each other (README, "Where PEFT differs"), softprompt's equal the row alone.

Shapes: B batch, S slots (prefix + virtual tokens + text) the mask covers.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from softprompt.families.family import Family


def position_ids(attention_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Each slot's position among its row's visible slots, for the last `length` slots.

    Args:
        attention_mask: ``[B, S]``, 1 on visible slots.
        length: how many of the last slots the model computes (the ones after a cache).

    Returns:
        ``[B, length]`` positions; hidden slots get 0 (nothing attends to them, so their value never matters).
    """
    positions = attention_mask.long().cumsum(dim=1) - 1  # [B, S]
    return positions.clamp(min=0)[:, attention_mask.shape[1] - length :]


def position_inputs(family: Family, attention_mask: torch.Tensor, length: int) -> dict[str, torch.Tensor]:
    """The keyword arguments that give a model of `family` the rule's positions: ``{"position_ids": ...}``, or
    nothing for families that derive them from the mask (`position_ids` for the arguments)."""
    if family.positions == "attention_mask":
        return {}
    return {"position_ids": position_ids(attention_mask, length)}


def check_positions(family: Family, config: PretrainedConfig, attention_mask: torch.Tensor, new_tokens: int = 0) -> None:
    """Raises if the slots of a batch (plus `new_tokens` to generate) exceed what the family can attend to.

    Two limits: a sliding window, which would hide the prefix or virtual tokens from tokens far enough after them
    (and left padding sits between the two, so the batch would hide it sooner than the row alone); and a learned
    position table, which every row's prompt + text must fit.

    Args:
        family: the base model's family.
        config: the base model's config.
        attention_mask: ``[B, S]`` over prefix + virtual tokens + text.
        new_tokens: tokens ``generate`` will add.

    Raises:
        ValueError: naming the limit, the length that exceeds it and the fix.
    """
    span = attention_mask.shape[1] + new_tokens
    window = family.sliding_window(config)
    if window is not None and span > window:
        raise ValueError(
            f"{span} positions (soft prompt + padded text{' + new tokens' if new_tokens else ''}) exceed the "
            f"sliding attention window of {window} positions of this {family.name} model: its sliding layers would "
            "hide the soft prompt from the later tokens, which softprompt refuses rather than let the prompt fade "
            "unseen. Fix: shorten the inputs (max_length), generate fewer tokens, or use fewer virtual tokens."
        )
    table = family.max_positions(config)
    if table is not None:
        longest = int(attention_mask.sum(dim=1).max()) + new_tokens
        if longest > table:
            raise ValueError(
                f"A row needs {longest} positions (soft prompt + text{' + new tokens' if new_tokens else ''}), more "
                f"than the {table} learned positions of this {family.name} model. Fix: shorten the inputs "
                "(max_length), generate fewer tokens, or use fewer virtual tokens."
            )
