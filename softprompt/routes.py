"""The two routes by which a batch's adapters enter the frozen model, both built on one `RowLayout`.

- The sequence route (`sequence_inputs`), the layout of each method's plain reference and of PEFT: virtual tokens
  in front of the token embeddings, prefix keys and values in a read-only cache, one mask over prefix + virtual
  tokens + text. `SoftPromptModel.forward` runs it; the training loss runs it when that is cheaper.
- The prefix route (`prefix_for_rows`): every slot-taking adapter as keys and values in the cache. Key/value
  adapters give theirs directly; virtual tokens give theirs from one pass over each adapter's G prompts
  (`FrozenModel.virtual_token_pass`, which says why that is exact). The training loss and generation run it.

Adapters that enter inside attention take no slot in either route: `patches` installs them around the call. In a
batch mixing adapters, each adapter's values go to the last slots of its rows and the slots before them are hidden
(`softprompt.rows`); the positions of the real tokens come from the mask (`softprompt.positions`).

Shapes: B batch, T tokens, P slots, G prompts of one adapter, R its rows, L layers, K key/value heads, D head dim,
C embedding width.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from softprompt.entries import AttentionPatch, Entry, KeyValues, VirtualTokens
from softprompt.frozen import DecoderInputs, FrozenModel
from softprompt.loss import IGNORE_INDEX, cross_entropy_from_logits, next_token_targets
from softprompt.positions import check_positions, position_inputs
from softprompt.prefix_cache import PrefixCache
from softprompt.rows import RowLayout, Slots


@dataclass
class VirtualLabels:
    """The loss terms an adapter's virtual tokens carry themselves (CPT's in-context labels), per prompt."""

    hidden_states: torch.Tensor
    """``[G, P, C]`` the final hidden states of its prompts' virtual positions."""
    entry: VirtualTokens
    """The entry, with its ``targets`` and ``weights`` and the rows' prompts."""


@dataclass
class Prefix:
    """What the prefix route gives a decoder call."""

    keys: torch.Tensor | None
    """``[L, B, K, P, D]`` every row's keys (a broadcast view when every row shares one prefix), or None when no
    row has a slot-taking adapter."""
    values: torch.Tensor | None
    """``[L, B, K, P, D]`` their values."""
    mask: torch.Tensor
    """``[B, P]`` 1 on each row's own slots."""
    last_virtual: torch.Tensor
    """``[B, C]`` the final hidden state of each row's last virtual token (it predicts the first real token); zeros
    for rows without virtual tokens."""
    virtual_labels: dict[str, VirtualLabels] = field(default_factory=dict)
    """Adapters whose virtual tokens carry labels, by name."""

    def cache(self) -> PrefixCache | None:
        """The keys and values as the read-only cache a forward pass attends to (None without a prefix)."""
        return None if self.keys is None else PrefixCache(self.keys, self.values)


def prefix_for_rows(
    frozen: FrozenModel, slots: Slots, entries: Mapping[str, Entry], dtype: torch.dtype
) -> Prefix:
    """Every adapter of `slots` as a key/value prefix of its rows (with gradients)."""
    device = frozen.device
    batch_size = slots.batch_size
    last_virtual = torch.zeros(batch_size, frozen.shape.embedding_width, dtype=dtype, device=device)
    mask = slots.mask(device)
    if slots.length == 0:
        return Prefix(None, None, mask, last_virtual)
    key_values: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # each [L, R or 1, K, P_a, D]
    last: dict[str, torch.Tensor] = {}  # each [R or 1, C]
    virtual_labels = {}
    for name in slots.rows:
        entry = entries[name]
        if isinstance(entry, KeyValues):
            key_values[name] = entry.keys.to(dtype).unsqueeze(1), entry.values.to(dtype).unsqueeze(1)
            continue
        keys, values, hidden = frozen.virtual_token_pass(entry.embeddings.to(dtype))  # [L, G, K, P, D] x2, [G, P, C]
        if entry.targets is not None:
            virtual_labels[name] = VirtualLabels(hidden, entry)
        if entry.group_of_row is not None:  # each row its own prompt
            rows = entry.group_of_row
            keys, values, hidden = keys[:, rows], values[:, rows], hidden[rows]
        key_values[name] = keys, values
        last[name] = hidden[:, -1]
    if slots.uniform:
        # One adapter for the whole batch: broadcast views, no [L, B, K, P, D] copy, no row index tensors.
        name = next(iter(slots.rows))
        keys, values = key_values[name]  # [L, 1 or B, K, P, D]
        if name in last:
            last_virtual = last[name].expand(batch_size, -1)
        return Prefix(keys.expand(-1, batch_size, -1, -1, -1), values.expand(-1, batch_size, -1, -1, -1), mask,
                      last_virtual, virtual_labels)
    for name, hidden in last.items():
        rows = torch.tensor(slots.rows[name], device=device)
        last_virtual = last_virtual.index_copy(0, rows, hidden.expand(len(rows), -1))
    shape = frozen.shape
    slot_shape = (shape.num_layers, batch_size, shape.num_key_value_heads, slots.length, shape.head_dim)
    keys = slots.place({name: kv[0] for name, kv in key_values.items()},
                       torch.zeros(slot_shape, dtype=dtype, device=device), batch_dim=1, slot_dim=3)
    values = slots.place({name: kv[1] for name, kv in key_values.items()},
                         torch.zeros(slot_shape, dtype=dtype, device=device), batch_dim=1, slot_dim=3)
    return Prefix(keys, values, mask, last_virtual, virtual_labels)


def prefix_route_hidden_states(
    frozen: FrozenModel,
    layout: RowLayout,
    entries: Mapping[str, Entry],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> tuple[torch.Tensor, Prefix]:
    """The prefix route through the frozen decoder: every adapter as keys and values, attention patches installed.

    Returns:
        The final hidden states of the text ``[B, T, C]`` (position t predicts token t + 1), and the `Prefix`
        (its ``last_virtual`` predicts each row's first token).

    Raises:
        ValueError: inputs longer than the model can attend to (`softprompt.positions.check_positions`).
    """
    token_embeddings = frozen.embed(input_ids)  # [B, T, C]
    prefix = prefix_for_rows(frozen, layout.as_prefix, entries, token_embeddings.dtype)
    mask = torch.cat([prefix.mask.to(attention_mask.dtype), attention_mask], dim=1)  # [B, P + T]
    check_positions(frozen.family, frozen.base_model.config, mask)
    with patches(layout, entries):
        hidden_states = frozen.decoder_pass(DecoderInputs(
            token_embeddings, mask, prefix.cache(), position_inputs(frozen.family, mask, input_ids.shape[1])
        ))  # [B, T, C]
    return hidden_states, prefix


@dataclass
class SequenceInputs:
    """What the sequence route gives a decoder call."""

    decoder: DecoderInputs
    """Embeddings ``[B, P_e + T, C]``, the mask ``[B, P_k + P_e + T]``, the prefix cache and the positions."""
    num_virtual: int
    """P_e, the longest virtual-token prompt of the batch (the virtual positions in front of the text)."""
    virtual_targets: torch.Tensor | None
    """``[B, P_e]`` the virtual tokens' own labels (CPT), -100 elsewhere; None when no adapter has any."""
    virtual_weights: torch.Tensor | None
    """``[B, P_e]`` their loss weights, 1 elsewhere; None when no adapter weighs its labels."""


def sequence_inputs(
    frozen: FrozenModel,
    layout: RowLayout,
    entries: Mapping[str, Entry],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> SequenceInputs:
    """The frozen model's inputs with every row's adapter in place (the sequence route).

    Raises:
        ValueError: inputs longer than the model can attend to (`softprompt.positions.check_positions`).
    """
    batch_size, num_tokens = input_ids.shape
    token_embeddings = frozen.embed(input_ids)  # [B, T, C]
    sequence = layout.in_sequence
    virtual_entries = {name: entries[name] for name in sequence.rows}
    if sequence.uniform and next(iter(virtual_entries.values())).group_of_row is None:
        virtual = next(iter(virtual_entries.values())).embeddings.to(token_embeddings.dtype)
        virtual = virtual.expand(batch_size, -1, -1)  # [B, P_e, C]
    else:  # [B, P_e, C], each row's virtual tokens in its last slots
        virtual = sequence.place(
            {name: entry.rows_of(entry.embeddings) if entry.group_of_row is not None else entry.embeddings
             for name, entry in virtual_entries.items()},
            token_embeddings.new_zeros(batch_size, sequence.length, frozen.shape.embedding_width),
            batch_dim=0, slot_dim=1,
        )
    prefix = prefix_for_rows(frozen, layout.in_cache, entries, token_embeddings.dtype)
    virtual_mask = sequence.mask(input_ids.device, attention_mask.dtype)
    mask = torch.cat([prefix.mask.to(attention_mask.dtype), virtual_mask, attention_mask], dim=1)  # [B, P_k+P_e+T]
    check_positions(frozen.family, frozen.base_model.config, mask)
    targets, weights = virtual_token_labels(sequence, virtual_entries, batch_size, input_ids.device)
    return SequenceInputs(
        decoder=DecoderInputs(
            embeddings=torch.cat([virtual, token_embeddings], dim=1),  # [B, P_e + T, C]
            attention_mask=mask,
            cache=prefix.cache(),
            positions=position_inputs(frozen.family, mask, sequence.length + num_tokens),
        ),
        num_virtual=sequence.length,
        virtual_targets=targets,
        virtual_weights=weights,
    )


def virtual_token_labels(
    sequence: Slots, entries: Mapping[str, VirtualTokens], batch_size: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``[B, P_e]`` the virtual tokens' own labels (-100 where none) and ``[B, P_e]`` their weights (1 where none) of
    the sequence route, each adapter's in its rows' slots; None for each when no adapter has any. Adapters without
    labels (prompt tuning beside CPT in a mixed batch) fill their slots with -100 and 1."""
    if all(entry.targets is None for entry in entries.values()):
        return None, None

    def per_slot(field: str, fill: float, dtype: torch.dtype) -> torch.Tensor:
        values = {}
        for name, entry in entries.items():
            own = getattr(entry, field)  # [G, P_a] per prompt, or None
            if own is None:
                own = torch.full((1, sequence.lengths[name]), fill, dtype=dtype, device=device)  # broadcast to its rows
            elif entry.group_of_row is not None:
                own = entry.rows_of(own)  # [R, P_a]
            values[name] = own
        return sequence.place(values, torch.full((batch_size, sequence.length), fill, dtype=dtype, device=device),
                              batch_dim=0, slot_dim=1)

    targets = per_slot("targets", IGNORE_INDEX, torch.long)
    if all(entry.weights is None for entry in entries.values()):
        return targets, None
    return targets, per_slot("weights", 1.0, torch.float32)


def sequence_targets(labels: torch.Tensor, inputs: SequenceInputs) -> torch.Tensor:
    """Next-token targets ``[B, P_e + T]`` of the sequence route; hidden virtual slots predict nothing.

    The position before each label predicts it: the last virtual slot predicts the first real token, and a virtual
    token's own label (CPT) is predicted by the slot before it. In a row whose adapter has no virtual tokens
    (prefix tuning, or none) the virtual slots are hidden padding that does not exist when the row runs alone, where
    nothing scores its first token (`RowLayout.first_token_scored`): they must not score anything in a mixed batch
    either.
    """
    num_virtual = inputs.num_virtual
    if inputs.virtual_targets is None:
        targets = next_token_targets(labels, num_virtual)  # [B, P_e + T]
    else:
        targets = next_token_targets(torch.cat([inputs.virtual_targets, labels], dim=1), 0)
    mask = inputs.decoder.attention_mask
    hidden_virtual = mask[:, -targets.shape[1] :] == 0  # [B, P_e + T], without the prefix's P_k
    hidden_virtual[:, num_virtual:] = False  # real-token padding keeps PEFT's targets
    return targets.masked_fill(hidden_virtual, IGNORE_INDEX)


def sequence_weights(inputs: SequenceInputs, num_tokens: int) -> torch.Tensor | None:
    """``[B, P_e + T]`` the loss weight of each next-token target of the sequence route, or None (all 1)."""
    if inputs.virtual_weights is None:
        return None
    # Target s is the label of slot s + 1: the weights move one slot left with the labels.
    ones = inputs.virtual_weights.new_ones(inputs.virtual_weights.shape[0], num_tokens + 1)
    return torch.cat([inputs.virtual_weights, ones], dim=1)[:, 1:]


def full_logits(
    frozen: FrozenModel,
    layout: RowLayout,
    entries: Mapping[str, Entry],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`SoftPromptModel.forward`: the sequence route through the whole model, PEFT's layout.

    Returns:
        (the mean loss over the labelled positions, virtual tokens' own labels included, or None without labels;
        the logits ``[B, T, V]`` of the real positions).
    """
    inputs = sequence_inputs(frozen, layout, entries, input_ids, attention_mask)
    with patches(layout, entries):
        logits = frozen.logits(inputs.decoder)  # [B, P_e + T, V]
    loss = None
    if labels is not None:
        loss = cross_entropy_from_logits(logits, sequence_targets(labels, inputs),
                                         sequence_weights(inputs, labels.shape[1]))
    return loss, logits[:, inputs.num_virtual:]


@contextmanager
def patches(layout: RowLayout, entries: Mapping[str, Entry], repeats: int = 1) -> Iterator[None]:
    """Installs every attention patch of the batch on its rows for the block (each row repeated `repeats` times
    in a row, as generation repeats them for beams and returned sequences)."""
    with ExitStack() as stack:
        for name, rows in layout.patched.items():
            entry = entries[name]
            assert isinstance(entry, AttentionPatch)
            # Row r becomes rows r * repeats ... r * repeats + repeats - 1 (`torch.repeat_interleave`'s order).
            index = torch.tensor(rows).repeat_interleave(repeats) * repeats + torch.arange(repeats).repeat(len(rows))
            stack.enter_context(entry.install(index))
        yield
