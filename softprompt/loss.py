"""The causal language-modelling loss, written so that only positions with a label pay for the LM head.

A causal LM predicts token s + 1 from position s. With P virtual tokens in front of the T real tokens (prompt tuning
and p-tuning), the hidden-state sequence has P + T positions and the labels are ``cat(-100 * P, labels)``, as in
PEFT; the last virtual position therefore predicts the first real token. Prefix tuning adds no positions (P = 0
here): its prefix lives in the attention cache, not in the sequence.

Shapes: B batch, T tokens, P virtual positions in the sequence, C hidden, V vocab, N labelled positions.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""The label that marks a position without a loss (the transformers and PyTorch convention)."""

LossImplementation = Literal["full", "torch", "triton"]


def next_token_targets(labels: torch.Tensor, num_virtual_positions: int) -> torch.Tensor:
    """The token each position of the (virtual + real) sequence must predict.

    Args:
        labels: ``[B, T]`` labels of the real tokens, -100 where no loss is wanted.
        num_virtual_positions: P, the virtual positions in front of the real tokens (0 for prefix tuning).

    Returns:
        ``[B, P + T]``: entry s is the label of position s + 1 of ``cat(-100 * P, labels)``, -100 at the end.
    """
    padded = F.pad(labels, (num_virtual_positions, 1), value=IGNORE_INDEX)  # [B, P + T + 1]
    return padded[:, 1:]  # [B, P + T]


def cross_entropy_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not -100, computed in fp32 like transformers.

    Args:
        logits: ``[B, S, V]``.
        targets: ``[B, S]``.
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)


def linear_cross_entropy(
    rows: torch.Tensor,
    targets: torch.Tensor,
    head_weight: torch.Tensor,
    implementation: LossImplementation = "torch",
) -> torch.Tensor:
    """Mean cross-entropy of ``rows @ head_weight.T`` against `targets`: the LM head and loss on selected rows.

    Args:
        rows: ``[N, C]`` final hidden states (after the final LayerNorm) of the N labelled positions.
        targets: ``[N]`` their target ids (none is -100).
        head_weight: ``[V, C]`` the LM head (BLOOM ties it to the input embeddings; it has no bias).
        implementation: ``"torch"`` (plain ``[N, V]`` logits, fp32 for the loss) or ``"triton"`` (the fused kernel
            in ``softprompt.kernels``, which never holds ``[N, V]`` fp32 logits; CUDA, or CPU under
            ``TRITON_INTERPRET=1``).

    Returns:
        The scalar mean loss (fp32). NaN when N = 0, like `torch.nn.functional.cross_entropy`.

    Raises:
        ValueError: an implementation other than ``"torch"`` or ``"triton"``.
    """
    if implementation == "torch":
        # logits.T = W @ rows.T rather than rows @ W.T: the same product, but with the 250880-row weight as the
        # left operand BLAS runs the skinny (N = 2-4 labels per row) product about twice as fast on CPU (MKL,
        # measured in benchmarks/); the backward keeps the fast form too.
        logits = torch.mm(head_weight, rows.t()).t()  # [N, V]
        return F.cross_entropy(logits.float(), targets)
    if implementation == "triton":
        from softprompt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

        if targets.numel() == 0:
            return (rows.sum() * float("nan")).float()
        return fused_linear_cross_entropy(rows, head_weight, targets, implementation="triton")
    raise ValueError(
        f"implementation={implementation!r}: expected 'torch' or 'triton' for the label-only loss. "
        "Fix: pass one of those ('full' is the full-logits path of SoftPromptModel.forward)."
    )


def label_only_cross_entropy(
    hidden_states: torch.Tensor,
    targets: torch.Tensor,
    head_weight: torch.Tensor,
    implementation: LossImplementation = "torch",
) -> torch.Tensor:
    """The same loss as `cross_entropy_from_logits`, applying the LM head only where a target exists.

    In soft-prompt training on classification data only the label tokens carry a loss (2 to 4 per row), so
    gathering those rows first skips almost all of the LM head, which is nearly half of a BLOOM forward pass.

    Args:
        hidden_states: ``[B, S, C]`` final hidden states (after the final LayerNorm).
        targets: ``[B, S]`` next-token targets, -100 where no loss is wanted.
        head_weight: ``[V, C]`` the LM head.
        implementation: ``"torch"`` or ``"triton"``, as in `linear_cross_entropy`.

    Returns:
        The scalar mean loss (fp32). NaN when no target is set, like `torch.nn.functional.cross_entropy`.

    Raises:
        ValueError: an implementation other than ``"torch"`` or ``"triton"``.
    """
    selected = targets != IGNORE_INDEX  # [B, S]
    return linear_cross_entropy(hidden_states[selected], targets[selected], head_weight, implementation)
