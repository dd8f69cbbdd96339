"""The causal language-modelling loss, written so that only positions with a label pay for the LM head.

A causal LM predicts token s + 1 from position s. With P virtual tokens in front of the T real tokens (prompt tuning
and p-tuning in the sequence layout), the hidden-state sequence has P + T positions and the labels are
``cat(-100 * P, labels)``, as in PEFT; the last virtual position therefore predicts the first real token. A prefix
adds no positions (P = 0 here): it lives in the attention cache, not in the sequence.

The head and the loss run only on the N labelled rows (`linear_cross_entropy`), by one of two implementations,
chosen by the caller:

- ``"torch"``: on CPU, with fp32 rows and a frozen head (the soft-prompt case), `HeadAsAttentionCrossEntropy`,
  which reads the head once; anywhere else (GPU, fp16/bf16/fp64, a trainable head, soft-capped logits) plain
  ``[N, V]`` logits and `torch.nn.functional.cross_entropy` in fp32 (fp64 for a float64 model, `widened`). The two
  compute the same loss and gradients.
- ``"triton"``: the fused linear + cross-entropy kernel of ``softprompt.kernels`` (CUDA, or CPU under
  ``TRITON_INTERPRET=1``), which never holds ``[N, V]`` fp32 logits.

A family whose model soft-caps its final logits (Gemma 2: ``logits = cap * tanh(logits / cap)``) has the same cap
applied here, on the plain-logits path.

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


def widened(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in the dtype losses are computed in: fp32 for fp32 / fp16 / bf16, fp64 kept as fp64.

    transformers computes its loss on ``logits.float()``, which narrows a float64 model's logits to float32; a
    gradient check or an exactness study of a float64 model needs float64 to stay float64.
    """
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def cross_entropy_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean cross-entropy over positions whose target is not -100, in fp32 like transformers (fp64 for a float64
    model, `widened`).

    Args:
        logits: ``[B, P + T, V]``.
        targets: ``[B, P + T]``.
        weights: ``[B, P + T]`` each position's weight, or None; weighted terms are still averaged over the number
            of labelled positions (PEFT's CPT loss), not over the weights' sum.
    """
    if weights is None:
        return F.cross_entropy(widened(logits.flatten(0, 1)), targets.flatten(), ignore_index=IGNORE_INDEX)
    losses = F.cross_entropy(widened(logits.flatten(0, 1)), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none")  # [B * (P + T)], 0 where ignored
    return (losses * weights.flatten().to(losses.dtype)).sum() / (targets != IGNORE_INDEX).sum()


def linear_cross_entropy(
    rows: torch.Tensor,
    targets: torch.Tensor,
    head_weight: torch.Tensor,
    implementation: LossImplementation = "torch",
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``rows @ head_weight.T`` against `targets`, row by row: the LM head and loss on selected
    rows only.

    Args:
        rows: ``[N, C]`` final hidden states (after the final norm) of the N labelled positions.
        targets: ``[N]`` their target ids (none is -100).
        head_weight: ``[V, C]`` the LM head (no bias in any supported family).
        implementation: ``"torch"`` or ``"triton"``; see the module docstring.
        softcap: the family's final logit soft-capping value, or None.

    Returns:
        ``[N]`` the row losses (fp32; fp64 for a float64 model).

    Raises:
        ValueError: an implementation other than ``"torch"`` or ``"triton"``, or ``"triton"`` with a soft-cap.
    """
    if implementation == "torch":
        if softcap is None and _one_pass_head_applies(rows, head_weight):
            return HeadAsAttentionCrossEntropy.apply(rows, targets, head_weight)  # [N]
        # logits.T = W @ rows.T rather than rows @ W.T: the same product, but with the large weight as the left
        # operand CPU BLAS runs the skinny (N = 2-4 labels per row) product faster (benchmarks/head_product.py);
        # the backward keeps that form too.
        logits = widened(torch.mm(head_weight, rows.t()).t())  # [N, V]
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, targets, reduction="none")  # [N]
    if implementation == "triton":
        if softcap is not None:
            raise ValueError(
                f"implementation='triton' with final logit soft-capping ({softcap}): the fused kernel computes plain "
                "logits. Fix: implementation='torch' for this model."
            )
        from softprompt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

        return fused_linear_cross_entropy(rows, head_weight, targets, implementation="triton", reduction="none")
    raise ValueError(
        f"implementation={implementation!r}: expected 'torch' or 'triton' for the label-only loss. "
        "Fix: pass one of those ('full' is the full-logits path of SoftPromptModel.forward)."
    )


def _one_pass_head_applies(rows: torch.Tensor, head_weight: torch.Tensor) -> bool:
    """`HeadAsAttentionCrossEntropy` needs torch's CPU flash-attention kernel, fp32, and a frozen head."""
    return (
        rows.device.type == "cpu"
        and rows.dtype == head_weight.dtype == torch.float32
        and not head_weight.requires_grad
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


class HeadAsAttentionCrossEntropy(torch.autograd.Function):
    """Row cross-entropies ``[N]`` of ``rows @ W.T`` for a frozen head ``W [V, C]``, in one pass over W (CPU, fp32).

    The loss of row n is ``lse_n - rows_n . W[t_n]`` with ``lse_n = log sum_v exp(rows_n . W_v)``, and its
    gradient is ``sum_v softmax_v W_v - W[t_n]``: the mean of the head's rows under the row's own softmax, minus
    the target's row. Both unknowns are what attention computes when the query is the row and the keys and the
    values are both W: the attention output ``softmax(q K^T) V`` is that mean, and a flash-attention kernel keeps
    the log-sum-exp of the scores. torch's CPU flash-attention kernel walks W block by block with an online
    softmax, so a head like bloomz-560m's (250880 x 1024, 1 GB in fp32) is read once, where logits-then-backward
    reads it twice (``benchmarks/results/profile_cpu_*`` shows the head's share of a step).

    Shapes: N rows, C hidden, V vocab.
    """

    @staticmethod
    def forward(ctx, rows: torch.Tensor, targets: torch.Tensor, head_weight: torch.Tensor) -> torch.Tensor:
        if rows.shape[0] == 0:  # the flash-attention kernel takes no empty query
            ctx.save_for_backward(torch.zeros_like(rows))
            return rows.new_zeros(0)
        expected_row, lse = _softmax_weighted_head_rows(rows, head_weight, torch.get_num_threads())
        target_rows = head_weight[targets]  # [N, C]
        ctx.save_for_backward(expected_row - target_rows)  # [N, C]: d row loss / d row
        return lse - (rows * target_rows).sum(dim=1)  # [N]

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (row_gradient,) = ctx.saved_tensors
        return grad_output[:, None] * row_gradient, None, None


def _softmax_weighted_head_rows(
    rows: torch.Tensor, head_weight: torch.Tensor, num_splits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(rows @ W.T) @ W`` ``[N, C]`` and ``logsumexp(rows @ W.T)`` ``[N]``, by CPU flash attention.

    The kernel spreads work over batch entries and heads only, and here there is one query block: the vocabulary
    is cut into `num_splits` equal slices, one batch entry each, so that every thread gets one (one query block
    would otherwise run on one core). The slices' results merge like the kernel's own blocks:
    weights ``exp(lse_slice - lse)``. In the shape comments, ``splits`` is `num_splits` (one more slice when
    `num_splits` does not divide V).
    """
    flash_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    vocab, channels = head_weight.shape
    num_splits = max(1, min(num_splits, vocab))
    in_slices = vocab - vocab % num_splits
    # keys [splits, 1, V / splits, C]: one batch entry per slice, one head, keys = values = that slice of the head.
    keys = head_weight[:in_slices].reshape(num_splits, 1, in_slices // num_splits, channels)
    outputs, lses = flash_attention(rows.expand(num_splits, 1, -1, -1), keys, keys, scale=1.0)[:2]  # [splits, 1, N, C]
    outputs, lses = [outputs[:, 0]], [lses[:, 0]]  # [splits, N, C], [splits, N]
    if in_slices < vocab:  # the V % splits rows left over, as one more slice
        rest = head_weight[in_slices:][None, None]  # [1, 1, V % splits, C]
        output, lse = flash_attention(rows[None, None], rest, rest, scale=1.0)[:2]
        outputs.append(output[:, 0])
        lses.append(lse[:, 0])
    outputs, lses = torch.cat(outputs), torch.cat(lses)  # [splits, N, C], [splits, N]
    lse = torch.logsumexp(lses, dim=0)  # [N]
    weights = torch.exp(lses - lse)  # [splits, N]: each slice's share of the softmax mass
    return (weights[..., None] * outputs).sum(dim=0), lse
