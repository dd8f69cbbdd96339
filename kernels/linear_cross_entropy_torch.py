"""The fused linear + cross-entropy loss in plain PyTorch: the chunked twins of the Triton launchers, and the naive
full-logits reference the tests compare every implementation against.

`chunked_forward` and `chunked_backward` walk the vocabulary one ``[N, chunk]`` logits block at a time, with the
online log-sum-exp that `fused_linear_cross_entropy.py` explains; they keep float64 inputs in float64 and compute
anything else in float32 (`accumulation_dtype`). Shapes: N rows, C hidden, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loss is computed in for inputs of `dtype`: float64 stays float64, anything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunked_forward(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, vocab_chunk_size: int
) -> tuple[Tensor, Tensor]:
    """``(lse, target_logit)``, ``[N]`` each in the accumulation dtype, one ``[N, chunk]`` logits block at a time."""
    n_rows = hidden.shape[0]
    dtype = accumulation_dtype(hidden.dtype)
    hidden_wide = hidden.to(dtype)  # [N, C]
    running_max = torch.full((n_rows,), float("-inf"), dtype=dtype, device=hidden.device)
    running_sumexp = torch.zeros(n_rows, dtype=dtype, device=hidden.device)
    target_logit = torch.zeros(n_rows, dtype=dtype, device=hidden.device)
    for v0 in range(0, weight.shape[0], vocab_chunk_size):
        logits = hidden_wide @ weight[v0 : v0 + vocab_chunk_size].to(dtype).T  # [N, chunk]
        chunk = logits.shape[1]
        new_max = torch.maximum(running_max, logits.amax(dim=1))  # finite from the first chunk on
        running_sumexp = running_sumexp * torch.exp(running_max - new_max) + torch.exp(
            logits - new_max[:, None]
        ).sum(dim=1)
        running_max = new_max
        local = targets - v0  # [N]
        in_chunk = (local >= 0) & (local < chunk)
        picked = logits.gather(1, local.clamp(0, chunk - 1)[:, None]).squeeze(1)  # [N]
        target_logit = target_logit + torch.where(in_chunk, picked, 0.0)
    return running_max + torch.log(running_sumexp), target_logit


def chunked_backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    row_scale: Tensor,
    *,
    compute_grad_hidden: bool,
    compute_grad_weight: bool,
    vocab_chunk_size: int,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients chunk by chunk from the saved ``lse``; same contract as the Triton backward launcher."""
    dtype = accumulation_dtype(hidden.dtype)
    hidden_wide = hidden.to(dtype)  # [N, C]
    grad_hidden = torch.zeros_like(hidden_wide) if compute_grad_hidden else None
    grad_weight = torch.empty_like(weight) if compute_grad_weight else None
    if compute_grad_hidden or compute_grad_weight:
        for v0 in range(0, weight.shape[0], vocab_chunk_size):
            weight_wide = weight[v0 : v0 + vocab_chunk_size].to(dtype)  # [chunk, C]
            chunk = weight_wide.shape[0]
            dlogits = torch.exp(hidden_wide @ weight_wide.T - lse[:, None])  # [N, chunk] softmax
            local = targets - v0  # [N]
            in_chunk = (local >= 0) & (local < chunk)
            # Subtract the one-hot with a scatter rather than boolean indexing: no host sync on GPUs.
            dlogits.scatter_add_(1, local.clamp(0, chunk - 1)[:, None], -in_chunk.to(dtype)[:, None])
            dlogits *= row_scale[:, None]
            if grad_hidden is not None:
                grad_hidden += dlogits @ weight_wide
            if grad_weight is not None:
                grad_weight[v0 : v0 + chunk] = dlogits.T @ hidden_wide  # [chunk, C]
    return (grad_hidden.to(hidden.dtype) if grad_hidden is not None else None), grad_weight


def reference_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """The naive formula with full ``[N, V]`` logits (fp32, fp64 for fp64 inputs), for tests: NaN when every row is
    ignored.

    Args:
        hidden: ``[N, C]``.
        weight: ``[V, C]``.
        targets: ``[N]`` int64.
        ignore_index: the target value that marks an ignored row.

    Returns:
        ``F.cross_entropy(hidden.float() @ weight.float().T, targets, ignore_index=ignore_index)`` (``.double()``
        for fp64 inputs).
    """
    dtype = accumulation_dtype(hidden.dtype)
    return F.cross_entropy(hidden.to(dtype) @ weight.to(dtype).T, targets, ignore_index=ignore_index)
