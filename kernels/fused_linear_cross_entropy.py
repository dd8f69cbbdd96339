"""Fused linear + cross-entropy: ``mean_n CE(hidden @ weight.T, targets)`` without the ``[N, V]`` logits.

What it computes: for N rows of final hidden states ``hidden [N, C]`` (C hidden), the tied LM head
``weight [V, C]`` (V vocab, 250880 for BLOOM) and ``targets [N]`` (int64 class ids, ``ignore_index`` where no loss
is wanted), the loss is the mean over non-ignored rows n of ``lse_n - logit[n, targets[n]]``, where
``logit = hidden @ weight.T`` and ``lse_n = log(sum_v exp(logit[n, v]))``, in fp32 for fp32 / fp16 / bf16 inputs
and in fp64 for fp64 ones (the pure-torch paths; the Triton kernels take no fp64), so a float64 model's loss keeps
float64's precision for gradient checks and exactness studies.
The gradients are ``d logit = (softmax(logit) - onehot(targets)) / num_valid_rows``, ``grad_hidden = d logit @ weight``
and ``grad_weight = d logit.T @ hidden``.

How: the vocabulary is walked in chunks and ``lse`` is kept as a running maximum ``m`` and a running sum of
``exp(logit - m)``, rescaled whenever ``m`` grows, so that one pass over V gives the normalizer: the online
softmax normalizer of Milakov & Gimelshein (2018), "Online normalizer calculation for softmax",
arXiv:1805.02867. Partial ``(m, sum)`` pairs of different vocabulary chunks merge the same way, which lets the
Triton forward split V across programs. The backward pass recomputes each chunk's logits from the saved ``lse``
and accumulates ``grad_hidden`` (and ``grad_weight``) chunk by chunk. The largest temporary is one chunk,
``[N, chunk]`` logits, instead of ``[N, V]`` fp32 (24 rows x 250880 x 4 bytes = 24 MB for BLOOM, and much more
for its backward through ``F.cross_entropy``).

Two implementations of the same math, picked explicitly by the caller of `fused_linear_cross_entropy`:
``"triton"`` (CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was imported) and
``"torch"`` (chunked, any device). `reference_linear_cross_entropy` is the naive full-logits formula the tests
compare both against. This file holds the checks, the autograd function and the entry points; the kernels and
their launchers are in ``linear_cross_entropy_triton.py``, the pure-torch twins and the reference in
``linear_cross_entropy_torch.py``.

Shapes: N rows, C hidden, V vocab.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from softprompt.kernels.linear_cross_entropy_torch import (
    accumulation_dtype,
    chunked_backward,
    chunked_forward,
    reference_linear_cross_entropy,
)
from softprompt.kernels.linear_cross_entropy_triton import (
    check_kernel_inputs,
    triton_fused_linear_cross_entropy_backward,
    triton_fused_linear_cross_entropy_forward,
    triton_unavailable_reason,
)

__all__ = [
    "LinearCrossEntropyFunction",
    "accumulation_dtype",
    "fused_linear_cross_entropy",
    "reference_linear_cross_entropy",
    "torch_fused_linear_cross_entropy",
    "triton_unavailable_reason",
]


def _validate_inputs(
    hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, vocab_chunk_size: int, reduction: str = "mean"
) -> None:
    """Shape, dtype and value checks shared by both implementations (one host sync for the target range)."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction={reduction!r}: expected 'mean' or 'none' (the row losses).")
    if hidden.dim() != 2:
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)}: expected [N, C] (N rows, C hidden). "
            "Fix: gather the labelled rows first, e.g. hidden_states[targets != -100]."
        )
    if weight.dim() != 2:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: expected [V, C] (the LM head, V vocab, C hidden).")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [N, C] = {tuple(hidden.shape)} and weight [V, C] = {tuple(weight.shape)} disagree on C "
            f"({hidden.shape[1]} vs {weight.shape[1]}). Fix: pass the LM head weight as [V, C] "
            "(transpose it if you hold [C, V])."
        )
    if not (hidden.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"hidden and weight must be floating point; got {hidden.dtype} and {weight.dtype}.")
    if targets.dtype != torch.int64 or targets.shape != (hidden.shape[0],):
        raise ValueError(
            f"targets has dtype {targets.dtype} and shape {tuple(targets.shape)}: expected int64 of shape "
            f"[N] = [{hidden.shape[0]}], one class id per hidden row. Fix: targets.long().reshape(-1)."
        )
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"hidden, weight and targets are on {hidden.device}, {weight.device} and {targets.device}: "
            "expected one device. Fix: move them with .to(device)."
        )
    if not isinstance(vocab_chunk_size, int) or vocab_chunk_size < 1:
        raise ValueError(f"vocab_chunk_size={vocab_chunk_size!r}: expected a positive int (e.g. 4096).")
    vocab = weight.shape[0]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))  # [N]
    if bool(bad.any()):
        value = int(targets[bad][0])
        raise ValueError(
            f"targets holds class id {value}: expected ids in [0, {vocab}) (V = weight.shape[0] = {vocab}) "
            f"or ignore_index={ignore_index}. Fix: check the tokenizer matches the LM head, or mask the "
            f"position with {ignore_index}."
        )


def _mean_over_valid(lse: Tensor, target_logit: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean row loss over valid rows (0.0 when none is valid) and the valid-row count as a tensor (no sync)."""
    num_valid = valid.sum()
    row_loss = torch.where(valid, lse - target_logit, 0.0)  # [N]
    return row_loss.sum() / num_valid.clamp(min=1), num_valid


def _row_scale(grad_output: Tensor, valid: Tensor, num_valid: Tensor) -> Tensor:
    """``[N]`` d loss / d row loss in grad_output's accumulation dtype: grad_output / num_valid on valid rows, 0 on
    ignored ones."""
    dtype = accumulation_dtype(grad_output.dtype)
    return valid.to(dtype) * (grad_output.to(dtype) / num_valid.clamp(min=1))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of ``hidden @ weight.T`` (see the module docstring), through the Triton launchers or their
    pure-torch twins: both compute per-row ``(lse, target logit)`` forward and the gradients from ``lse`` backward,
    so only the two functions differ. ``reduction`` ``"mean"`` gives the mean over valid rows, ``"none"`` the
    ``[N]`` row losses (0 on ignored rows)."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, vocab_chunk_size: int,
        implementation: str, reduction: str = "mean",
    ):
        forward_terms, _ = _IMPLEMENTATIONS[implementation]
        lse, target_logit = forward_terms(hidden, weight, targets, vocab_chunk_size=vocab_chunk_size)
        valid = targets != ignore_index  # [N]
        loss, num_valid = _mean_over_valid(lse, target_logit, valid)
        ctx.save_for_backward(hidden, weight, targets, lse, valid, num_valid)
        ctx.vocab_chunk_size, ctx.implementation, ctx.reduction = vocab_chunk_size, implementation, reduction
        if reduction == "none":
            return torch.where(valid, lse - target_logit, 0.0)  # [N]
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        hidden, weight, targets, lse, valid, num_valid = ctx.saved_tensors
        _, gradients = _IMPLEMENTATIONS[ctx.implementation]
        if ctx.reduction == "none":  # d loss / d row loss is the incoming gradient of each row
            dtype = accumulation_dtype(grad_output.dtype)
            row_scale = valid.to(dtype) * grad_output.to(dtype)
        else:
            row_scale = _row_scale(grad_output, valid, num_valid)
        grad_hidden, grad_weight = gradients(
            hidden,
            weight,
            targets,
            lse,
            row_scale,
            compute_grad_hidden=ctx.needs_input_grad[0],
            compute_grad_weight=ctx.needs_input_grad[1],
            vocab_chunk_size=ctx.vocab_chunk_size,
        )
        return grad_hidden, grad_weight, None, None, None, None, None


_IMPLEMENTATIONS = {
    "triton": (triton_fused_linear_cross_entropy_forward, triton_fused_linear_cross_entropy_backward),
    "torch": (chunked_forward, chunked_backward),
}
"""implementation -> (forward terms, gradients), the two halves `LinearCrossEntropyFunction` runs."""


# ---------------------------------------------------------------------------------------------------------------
# The public entry points
# ---------------------------------------------------------------------------------------------------------------


def torch_fused_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100, vocab_chunk_size: int = 4096,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """The chunked online-log-sum-exp loss in plain PyTorch (what CPU training without Triton uses).

    Args:
        hidden: ``[N, C]`` final hidden states of the rows that carry a loss.
        weight: ``[V, C]`` LM head.
        targets: ``[N]`` int64 class ids, ``ignore_index`` where no loss is wanted.
        ignore_index: the target value that marks an ignored row.
        vocab_chunk_size: vocabulary columns per chunk; peak extra memory is about ``chunk * (N + C) * 4`` bytes.
        reduction: ``"mean"`` or ``"none"`` (the ``[N]`` row losses, 0 on ignored rows).

    Returns:
        The scalar mean loss (fp32; fp64 for fp64 inputs) over non-ignored rows; 0.0 (with zero gradients) when every
        row is ignored. With ``reduction="none"``, the row losses.

    Raises:
        ValueError: shapes, dtypes, devices or target ids are not as described above.
    """
    _validate_inputs(hidden, weight, targets, ignore_index, vocab_chunk_size, reduction)
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, vocab_chunk_size, "torch", reduction)


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    implementation: Literal["triton", "torch"],
    ignore_index: int = -100,
    vocab_chunk_size: int = 4096,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """Mean cross-entropy of ``hidden @ weight.T`` against ``targets``, never holding ``[N, V]`` fp32 logits.

    Equal (to fp32 rounding) to ``F.cross_entropy(hidden.float() @ weight.float().T, targets,
    ignore_index=ignore_index)``, except that when every row is ignored it returns 0.0 with zero gradients
    (``F.cross_entropy`` returns NaN), so that a batch without labels adds nothing to the training step.
    ``grad_hidden`` has hidden's dtype; ``grad_weight`` is computed only when ``weight.requires_grad``, in
    weight's dtype.

    Args:
        hidden: ``[N, C]`` final hidden states of the rows that carry a loss (float32, float16 or bfloat16).
        weight: ``[V, C]`` LM head (BLOOM's is tied to the input embeddings and has no bias).
        targets: ``[N]`` int64 class ids in ``[0, V)``, or ``ignore_index``.
        implementation: ``"triton"`` (the fused kernels: CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1``) or ``"torch"`` (the same chunked math in PyTorch, any device).
        ignore_index: the target value that marks an ignored row.
        vocab_chunk_size: vocabulary columns per chunk (torch) or per program (triton).
        reduction: ``"mean"`` or ``"none"`` (the ``[N]`` row losses, 0 on ignored rows).

    Returns:
        The scalar mean loss (fp32; fp64 for fp64 inputs) over non-ignored rows, or the row losses.

    Raises:
        ValueError: bad shapes, dtypes, devices, target ids or ``implementation``.
        TypeError: non-floating hidden/weight, or a dtype the Triton kernels do not take.
        RuntimeError: ``implementation="triton"`` without triton installed, or on CPU without the interpreter.
    """
    if implementation not in ("triton", "torch"):
        raise ValueError(
            f"implementation={implementation!r}: expected 'triton' or 'torch'. "
            "Fix: 'triton' on GPUs with triton installed, 'torch' anywhere."
        )
    _validate_inputs(hidden, weight, targets, ignore_index, vocab_chunk_size, reduction)
    if implementation == "triton":
        check_kernel_inputs(hidden, weight)
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, ignore_index, vocab_chunk_size, implementation,
                                            reduction)
