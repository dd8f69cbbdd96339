"""The training loss (`SoftPromptModel.compute_loss`): `forward`'s loss and gradients, for much less work.

Three savings, each exact (``tests/test_compute_loss.py`` checks them against the full-logits path):

1. The LM head runs only at labelled positions (`softprompt.loss.linear_cross_entropy`): in the classification
   recipes that is 2-4 of a row's 64 positions, and the head is nearly half of a small model's forward pass.
2. Virtual tokens go in as a key/value prefix (`softprompt.injection.prefix_for_rows`): computed once per adapter
   instead of once per row, so the batch runs B * T positions instead of B * (P + T). The last virtual token,
   which predicts the first real token, comes from that pass too.
3. Columns that are padding in every row are dropped (`softprompt.rows.without_padding_columns`) when no scored
   prediction depends on them: a column hidden in every row is a key no real token attends to, and it moves no
   position.

The ``sequence`` layout keeps only the first saving: virtual tokens stay in front of every row, as in `forward`
and PEFT, in one decoder pass instead of two. It is for steps bound by kernel launches rather than arithmetic.

Shapes: B batch, T tokens, P prefix slots, C embedding width, N labelled positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import torch

from softprompt.inputs import check_labels, check_loss_implementation, check_model_inputs
from softprompt.injection import PromptedModel, prefix_for_rows, sequence_inputs, sequence_targets
from softprompt.loss import IGNORE_INDEX, LossImplementation, linear_cross_entropy, next_token_targets
from softprompt.positions import check_positions, position_inputs
from softprompt.prefix_cache import PrefixCache, checkpointed_layers_read_cache
from softprompt.rows import without_padding_columns

VirtualTokenLayout = Literal["prefix", "sequence"]
"""How the training loss feeds virtual tokens: once per adapter as a key/value prefix, or in front of every row."""


class TrainableModel(PromptedModel, Protocol):
    """A `PromptedModel` that can also run its frozen decoder after a prefix (`SoftPromptModel.decoder_pass`)."""

    def decoder_pass(
        self,
        token_embeddings: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix: PrefixCache | None,
        positions: dict[str, torch.Tensor],
    ) -> torch.Tensor: ...


def training_loss(
    model: TrainableModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    labels: torch.Tensor,
    adapter_names: Sequence[str | None] | None,
    implementation: LossImplementation,
    virtual_token_layout: VirtualTokenLayout,
) -> torch.Tensor:
    """The mean loss over the labelled positions of a batch (see the module docstring); arguments as in
    `SoftPromptModel.compute_loss`, which checks the choices; the tensors are checked here
    (`softprompt.inputs`), before any work."""
    check_model_inputs(model.base_model, input_ids, attention_mask)
    check_labels(model.base_model, labels, input_ids)
    check_loss_implementation(implementation, input_ids.device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    head = model.base_model.get_output_embeddings()
    softcap = model.family.logit_softcap(model.base_model.config)
    if virtual_token_layout == "sequence":
        inputs, num_virtual = sequence_inputs(model, input_ids, attention_mask, adapter_names)
        with checkpointed_layers_read_cache(model.base_model):
            hidden_states = model.base_model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        targets = sequence_targets(labels, inputs["attention_mask"], num_virtual)  # [B, P_e + T]
        selected = targets != IGNORE_INDEX
        return linear_cross_entropy(hidden_states[selected], targets[selected], head.weight, implementation, softcap)

    layout = model.row_layout(input_ids.shape[0], adapter_names)
    # The last virtual token predicts the first real token (PEFT's layout); rows without virtual tokens score
    # nothing there (the first-token rule). Taken before padding columns may be dropped.
    first_targets = labels[:, 0]  # [B]
    scored_first = layout.first_token_mask(labels.device)
    if scored_first is not None:
        first_targets = first_targets.masked_fill(~scored_first, IGNORE_INDEX)
    input_ids, attention_mask, labels = without_padding_columns(input_ids, attention_mask, labels)

    token_embeddings = model.base_model.get_input_embeddings()(input_ids)  # [B, T, C]
    prefix, prefix_mask, last_virtual = prefix_for_rows(model, layout.as_prefix, token_embeddings.dtype)
    mask = torch.cat([prefix_mask.to(attention_mask.dtype), attention_mask], dim=1)  # [B, P + T]
    check_positions(model.family, model.base_model.config, mask)
    with checkpointed_layers_read_cache(model.base_model):
        hidden_states = model.decoder_pass(
            token_embeddings, mask, prefix, position_inputs(model.family, mask, input_ids.shape[1])
        )  # [B, T, C]

    targets = next_token_targets(labels, 0)  # [B, T]
    selected = targets != IGNORE_INDEX
    scored = first_targets != IGNORE_INDEX
    rows = torch.cat([last_virtual[scored], hidden_states[selected]])  # [N, C]
    row_targets = torch.cat([first_targets[scored], targets[selected]])  # [N]
    return linear_cross_entropy(rows, row_targets, head.weight, implementation, softcap)
