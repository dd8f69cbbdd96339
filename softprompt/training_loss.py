"""The training loss (`SoftPromptModel.compute_loss`): `forward`'s loss and gradients, for much less work.

Three savings, each exact (``tests/test_compute_loss.py`` checks them against the full-logits path):

1. The LM head runs only at labelled positions (`softprompt.loss.linear_cross_entropy`): in the classification
   recipes that is 2-4 of a row's 64 positions, and the head is nearly half of a small model's forward pass.
2. In the ``prefix`` layout, virtual tokens go in as a key/value prefix (`softprompt.routes.prefix_for_rows`):
   computed once per prompt instead of once per row, so the batch runs B * T positions instead of B * (P + T). The
   last virtual token, which predicts the first real token, comes from that pass too. It costs a second, short pass
   through every layer: worth it when the positions saved outweigh the extra kernel launches (`choose_layout`).
3. Columns that are padding in every row are dropped (`without_padding_columns`) when no scored prediction depends
   on them.

The ``sequence`` layout keeps only the first saving: virtual tokens in front of every row, as in `forward` and PEFT,
in one decoder pass.

Shapes: B batch, T tokens, P prefix slots, C embedding width, N labelled positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from softprompt.entries import Entry
from softprompt.frozen import FrozenModel
from softprompt.inputs import check_some_label
from softprompt.loss import (
    IGNORE_INDEX,
    LossImplementation,
    linear_cross_entropy,
    next_token_targets,
)
from softprompt.routes import (
    patches,
    prefix_route_hidden_states,
    sequence_inputs,
    sequence_targets,
    sequence_weights,
)
from softprompt.rows import RowLayout

VirtualTokenLayout = Literal["auto", "prefix", "sequence"]
"""How the training loss feeds virtual tokens: once per prompt as a key/value prefix, in front of every row, or
whichever `choose_layout` says saves more."""

LOSS_IMPLEMENTATIONS: tuple[str, ...] = get_args(LossImplementation)
VIRTUAL_TOKEN_LAYOUTS: tuple[str, ...] = get_args(VirtualTokenLayout)
REDUCTIONS = ("mean", "sum", "adapter_mean", "per_row")
"""``mean`` over the batch's labelled positions, ``sum``, ``adapter_mean`` (`adapter_mean_weights`), or ``per_row``:
``[B]`` each row's own sum (a label's log-likelihood, negated: rank classification)."""

OVERHEAD_FLOPS_PER_OP = {"cpu": 3e6, "cuda": 4e9}
"""What one extra op costs, in FLOPs at the device's matrix rate: its dispatch and launch time times that rate.
CPU, measured on 2 cores (``benchmarks/train_step.py --configs launch-bound``, both layouts): the prefix layout's
~3,300 extra ops per step cost ~50 ms, ~15 us each, at ~200 GFLOP/s. CUDA: an eager op's ~10 us at ~400 TFLOP/s
(bf16), which puts bloomz-560m at 16 x 64 on the sequence side, as measured on an H100 (0.99x PEFT against 0.53x)."""

OPS_PER_LAYER = 140
"""Ops the prefix layout's second pass adds per layer, forward and backward (3,300 over 24 layers, on BLOOM and
Llama, ``benchmarks/train_step.py --configs launch-bound``)."""


def check_loss_choices(implementation: str, virtual_token_layout: str, reduction: str) -> None:
    """Refuses an unknown implementation, layout or reduction, before any work (a typo must not cost a pass first).

    Raises:
        ValueError: naming the value, the choices and what each is for.
    """
    if implementation not in LOSS_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r}: expected 'torch', 'triton' or 'full'. Fix: 'torch' (CPU or "
            "GPU), 'triton' (the fused kernel, GPU), 'full' (the full-logits reference)."
        )
    if virtual_token_layout not in VIRTUAL_TOKEN_LAYOUTS:
        raise ValueError(
            f"virtual_token_layout={virtual_token_layout!r}: expected 'prefix' or 'sequence', or 'auto' to choose "
            "by cost. Fix: 'auto' (softprompt.training_loss.choose_layout), 'prefix' (fewer FLOPs) or 'sequence' "
            "(fewer kernel launches)."
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: expected one of {REDUCTIONS}. Fix: pass one of those.")


def choose_layout(batch_size: int, num_virtual: int, layer_parameters: int, device: torch.device) -> str:
    """``prefix`` when the positions it saves cost more than the second pass's launches, else ``sequence``.

    The prefix layout runs the P virtual tokens once instead of once per row, saving (B - 1) * P positions in every
    layer, forward and input-gradient backward: about 4 FLOPs per layer parameter each. It pays `OPS_PER_LAYER`
    extra ops per layer. Both sides scale with the number of layers, so it cancels.

    Args:
        batch_size: B.
        num_virtual: P, the longest virtual-token prompt of the batch (0: nothing to choose).
        layer_parameters: the parameters of one decoder layer.
        device: where the step runs (`OVERHEAD_FLOPS_PER_OP`).
    """
    if num_virtual == 0:
        return "prefix"
    saved_flops = 4 * (batch_size - 1) * num_virtual * layer_parameters
    overhead = OVERHEAD_FLOPS_PER_OP.get(device.type, OVERHEAD_FLOPS_PER_OP["cuda"])
    return "prefix" if saved_flops > OPS_PER_LAYER * overhead else "sequence"


def layout_for(frozen: FrozenModel, layout: RowLayout, device: torch.device) -> str:
    """The virtual-token layout ``"auto"`` picks for a batch of `layout` on `frozen` (`choose_layout`)."""
    return choose_layout(len(layout.names), layout.in_sequence.length, frozen.layer_parameters, device)


@dataclass
class WeightedLosses:
    """The loss of every labelled position of a batch, and its weight."""

    losses: torch.Tensor
    """``[N]`` the cross-entropy of each labelled position."""
    weights: torch.Tensor | None
    """``[N]`` each one's weight (CPT's decay, per-adapter means), or None for 1."""
    rows: torch.Tensor | None
    """``[N]`` the batch row each loss belongs to, or None where not asked for (finding them is a host sync on a
    GPU, and only ``per_row`` needs them)."""

    def total(self) -> torch.Tensor:
        """The weighted sum of the losses (a scalar)."""
        return self.weighted().sum()

    def weighted(self) -> torch.Tensor:
        """``[N]`` each loss times its weight."""
        return self.losses if self.weights is None else self.losses * self.weights

    def per_row(self, batch_size: int) -> torch.Tensor:
        """``[B]`` the weighted sum of each row's losses (0 for a row without any)."""
        if self.rows is None:
            raise RuntimeError("per_row needs each loss's row: labelled_losses(..., with_rows=True).")
        weighted = self.weighted()
        return weighted.new_zeros(batch_size).index_add(0, self.rows, weighted)


def without_padding_columns(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drops the leading and trailing columns that are padding in every row and whose loss terms are all -100.

    A column hidden in every row is a key no real token attends to, and it moves no position (positions count
    visible slots); what it computes matters only through the label it predicts. Column j predicts
    ``labels[:, j + 1]`` (``labels[:, 0]`` is predicted by the virtual tokens, which stay), so leading columns
    ``0..k-1`` go when ``labels[:, 1..k]`` are all -100, and trailing columns ``j..`` when ``labels[:, j..]`` are.

    Returns:
        The three ``[B, T']`` tensors (views), T' <= T.
    """
    num_tokens = input_ids.shape[1]
    real = (attention_mask != 0).any(dim=0)  # [T]
    scored = (labels != IGNORE_INDEX).any(dim=0)  # [T]
    real, scored = torch.stack([real, scored]).tolist()  # one host sync for every bound below
    real_columns = [column for column, is_real in enumerate(real) if is_real]
    if not real_columns:
        return input_ids, attention_mask, labels
    scored_columns = [column for column, is_scored in enumerate(scored) if is_scored]
    first_scored = next((column for column in scored_columns if column > 0), num_tokens)
    start = min(real_columns[0], first_scored - 1)
    stop = max(real_columns[-1], scored_columns[-1] if scored_columns else -1) + 1
    if start == 0 and stop == num_tokens:
        return input_ids, attention_mask, labels
    return input_ids[:, start:stop], attention_mask[:, start:stop], labels[:, start:stop]


def labelled_losses(
    frozen: FrozenModel,
    layout: RowLayout,
    entries: Mapping[str, Entry],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    implementation: LossImplementation,
    virtual_token_layout: str,
    row_weights: torch.Tensor | None = None,
    with_rows: bool = False,
) -> WeightedLosses:
    """The loss of every labelled position of a checked batch (see the module docstring).

    Args:
        frozen: the frozen base.
        layout: the batch's row layout.
        entries: each present adapter's entry.
        input_ids, attention_mask, labels: ``[B, T]`` each.
        implementation: ``torch`` or ``triton`` (`softprompt.loss.linear_cross_entropy`).
        virtual_token_layout: ``prefix`` or ``sequence`` (already chosen).
        row_weights: ``[B]`` a weight for every labelled position of each row, or None.
        with_rows: also find the batch row of each loss (`WeightedLosses.per_row`).
    """
    head, softcap = frozen.head_weight, frozen.logit_softcap
    if virtual_token_layout == "sequence":
        inputs = sequence_inputs(frozen, layout, entries, input_ids, attention_mask)
        with patches(layout, entries):
            hidden_states = frozen.decoder_pass(inputs.decoder)  # [B, P_e + T, C]
        targets = sequence_targets(labels, inputs)  # [B, P_e + T]
        selected = targets != IGNORE_INDEX
        weights = sequence_weights(inputs, labels.shape[1])
        if row_weights is not None:
            per_row = row_weights[:, None].expand_as(targets)
            weights = per_row if weights is None else weights * per_row
        losses = linear_cross_entropy(hidden_states[selected], targets[selected], head, implementation, softcap)
        rows = selected.nonzero()[:, 0] if with_rows else None
        return WeightedLosses(losses, None if weights is None else weights[selected], rows)

    # The last virtual token predicts the first real token (PEFT's layout); rows without virtual tokens score
    # nothing there. Taken before padding columns may be dropped.
    first_targets = labels[:, 0]  # [B]
    scored_first = layout.first_token_mask(labels.device)
    if scored_first is not None:
        first_targets = first_targets.masked_fill(~scored_first, IGNORE_INDEX)
    input_ids, attention_mask, labels = without_padding_columns(input_ids, attention_mask, labels)
    hidden_states, prefix = prefix_route_hidden_states(frozen, layout, entries, input_ids, attention_mask)  # [B, T, C]

    targets = next_token_targets(labels, 0)  # [B, T]
    selected = targets != IGNORE_INDEX
    scored = first_targets != IGNORE_INDEX
    rows = [prefix.last_virtual[scored], hidden_states[selected]]  # [N_first, C], [N_text, C]
    row_targets = [first_targets[scored], targets[selected]]
    row_of = [scored.nonzero()[:, 0], selected.nonzero()[:, 0]] if with_rows else None  # the batch row of each
    weights = None if row_weights is None else [row_weights[scored], row_weights[:, None].expand_as(targets)[selected]]
    for name, virtual in prefix.virtual_labels.items():
        # A virtual token's own label (CPT) is predicted by the virtual position before it, once per row.
        entry = virtual.entry
        hidden = entry.rows_of(virtual.hidden_states)[..., :-1, :]  # [R, P - 1, C]
        own = entry.rows_of(entry.targets)[..., 1:]  # [R, P - 1]
        if hidden.dim() == 2:  # one prompt for every row: repeat it for each
            count = len(layout.rows_of(name))
            hidden, own = hidden.expand(count, -1, -1), own.expand(count, -1)
        labelled = own != IGNORE_INDEX
        rows.append(hidden[labelled])
        row_targets.append(own[labelled])
        if row_of is not None:
            row_of.append(torch.tensor(layout.rows_of(name), device=own.device)[labelled.nonzero()[:, 0]])
        own_weights = torch.ones_like(own, dtype=hidden.dtype) if entry.weights is None else \
            entry.rows_of(entry.weights)[..., 1:].expand_as(own).to(hidden.dtype)
        if row_weights is not None:
            own_weights = own_weights * row_weights[layout.rows_of(name)][:, None]
        if weights is None:
            weights = [torch.ones_like(target, dtype=hidden.dtype) for target in row_targets[:-1]]
        weights.append(own_weights[labelled])
    losses = linear_cross_entropy(torch.cat(rows), torch.cat(row_targets), head, implementation, softcap)  # [N]
    return WeightedLosses(losses, None if weights is None else torch.cat(weights).to(losses.dtype),
                          None if row_of is None else torch.cat(row_of))


def labelled_counts(layout: RowLayout, entries: Mapping[str, Entry], labels: torch.Tensor) -> torch.Tensor:
    """``[B]`` each row's labelled positions: its own labels (`RowLayout.labelled_positions`) and its adapter's
    virtual-token labels (CPT's in-context labels, each predicted by the position before it)."""
    counts = layout.labelled_positions(labels)
    for name in layout.in_sequence.rows:
        entry = entries[name]
        if entry.targets is not None:
            per_row = (entry.rows_of(entry.targets)[..., 1:] != IGNORE_INDEX).sum(dim=-1)  # scalar or [R]
            rows = torch.tensor(layout.rows_of(name), device=counts.device)
            counts = counts.index_add(0, rows, per_row.to(counts.device).expand(len(rows)).to(counts.dtype))
    return counts


def adapter_mean_weights(layout: RowLayout, counts: torch.Tensor) -> torch.Tensor:
    """``[B]`` the weight that turns a batch mean's gradient into each adapter's own mean: N / n_a for the rows of
    adapter a (N labelled positions in the batch, n_a in its rows). An adapter's parameters enter only its own rows,
    so its gradient of ``sum_rows weight * loss / N`` is that of its own rows' mean."""
    weights = torch.ones(len(layout.names), dtype=torch.float32, device=counts.device)
    total = counts.sum()
    for name in layout.adapters:
        rows = torch.tensor(layout.rows_of(name), device=counts.device)
        own = counts[rows].sum()
        weights[rows] = torch.where(own > 0, total / own.clamp(min=1), torch.zeros_like(total, dtype=torch.float32))
    return weights


def reduced_loss(
    frozen: FrozenModel,
    layout: RowLayout,
    entries: Mapping[str, Entry],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    implementation: LossImplementation,
    virtual_token_layout: str,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's loss, reduced as `SoftPromptModel.compute_loss` says (``mean``, ``sum``, ``adapter_mean``,
    ``per_row``), and each row's labelled positions ``[B]`` (`labelled_counts`)."""
    counts = labelled_counts(layout, entries, labels)  # [B]
    total = counts.sum()
    if reduction != "sum":
        check_some_label(total)  # before any work: a mean over nothing has no value
    row_weights = adapter_mean_weights(layout, counts) if reduction == "adapter_mean" else None
    losses = labelled_losses(frozen, layout, entries, input_ids, attention_mask, labels, implementation,
                             virtual_token_layout, row_weights, with_rows=reduction == "per_row")
    if reduction == "sum":
        return losses.total(), counts
    if reduction == "per_row":
        return losses.per_row(len(layout.names)), counts
    if reduction == "mean":
        return losses.total() / total, counts
    # The logged value is the batch's mean; the gradient, each adapter's own mean (see `adapter_mean_weights`).
    weighted = losses.total() / total
    plain = losses.losses.sum() / total
    return plain.detach() + (weighted - weighted.detach()), counts
