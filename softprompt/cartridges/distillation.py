"""The context-distillation loss: the student's next-token distribution against the teacher's top-k one, at every
position of a conversation.

Eyuboglu et al. (arXiv 2506.06266) train a cartridge so that the frozen model with it in front matches the same
model with the document in front. At each position of a conversation, the teacher's distribution is kept as its k
most likely next tokens (k = 20, `softprompt.cartridges.teacher`); the loss is the KL divergence from the teacher to
the student over those k tokens::

    p = softmax(teacher log-probabilities of the k tokens)      (the teacher, renormalized over its top k)
    q = softmax(student logits of the same k tokens)            (the student, over the same k tokens)
    loss = sum_j p_j (log p_j - log q_j)

Its gradient is that of the cross-entropy of q against p (the teacher's entropy is a constant); it is zero exactly
when the student's k logits match the teacher's up to a shift, so a student holding the teacher's own document
cache scores 0. Both distributions live on the k tokens, so the student needs only the k rows of the LM head at
each position, ``[N, k]`` logits instead of ``[N, V]`` (`rows_of_head`): for SmolLM2 (V = 49,152) that is 20 rows
instead of 49,152. What it gives up against the paper's full-vocabulary student: mass the student puts on tokens
outside the teacher's top k is not penalized, only the shares among the k (the teacher's top 20 hold most of its
mass at almost every position).

Shapes: B batch, T tokens, N positions, k kept tokens, C hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from softprompt.cartridges.teacher import TopKTargets
from softprompt.model import SoftPromptModel
from softprompt.routes import prefix_route_hidden_states


class _RowsOfHead(torch.autograd.Function):
    """``logits[n, j] = hidden[n] . head[ids[n, j]]``, block by block; the backward pass gathers the rows again
    rather than keeping the ``[N, k, C]`` gathered rows alive (the head is frozen: no gradient for it)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, head: torch.Tensor, ids: torch.Tensor, block: int) -> torch.Tensor:
        ctx.save_for_backward(head, ids)
        ctx.block = block
        logits = hidden.new_empty(ids.shape)
        for start in range(0, ids.shape[0], block):
            part = slice(start, start + block)
            logits[part] = torch.bmm(head[ids[part]], hidden[part, :, None]).squeeze(-1)  # [n, k, C] @ [n, C, 1]
        return logits

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        head, ids = ctx.saved_tensors
        grad_hidden = grad.new_empty(ids.shape[0], head.shape[1])
        for start in range(0, ids.shape[0], ctx.block):
            part = slice(start, start + ctx.block)
            grad_hidden[part] = torch.bmm(grad[part, None, :], head[ids[part]]).squeeze(1)  # [n, 1, k] @ [n, k, C]
        return grad_hidden, None, None, None


def rows_of_head(hidden: torch.Tensor, head: torch.Tensor, ids: torch.Tensor, softcap: float | None = None,
                 block: int = 1024) -> torch.Tensor:
    """The student's logits of k tokens per position, from those k rows of the (frozen) LM head only.

    Args:
        hidden: ``[N, C]`` final hidden states.
        head: ``[V, C]`` the LM head's weight (frozen).
        ids: ``[N, k]`` the tokens to score at each position.
        softcap: the family's final-logit soft-capping (Gemma 2), or None.
        block: positions per gathered block (``[block, k, C]`` at a time).

    Returns:
        ``[N, k]`` logits, in fp32 (fp64 for a float64 model).
    """
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = _RowsOfHead.apply(hidden.to(dtype), head.detach().to(dtype), ids, block)
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def topk_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """``[N]`` the KL divergence from the teacher to the student over each position's k tokens (module docstring)."""
    teacher = torch.log_softmax(teacher_logprobs.to(student_logits.dtype), dim=-1)
    student = torch.log_softmax(student_logits, dim=-1)
    return (teacher.exp() * (teacher - student)).sum(dim=-1)


@dataclass
class TopKDistillationLoss:
    """The training step's loss for context distillation (`softprompt.training.prepared.LossFunction`): each row
    of the batch is one conversation (``batch["conversation"]`` names its rows of the teacher targets), every one
    of its positions scored against the teacher.

    Args:
        targets: the teacher's top-k distributions of every conversation.
    """

    targets: TopKTargets

    def __call__(self, model: SoftPromptModel, batch: dict[str, Any], **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (the summed KL over the batch's positions, ``[B]`` each row's positions). ``options`` (the label
        loss's implementation and layout) do not apply: key/value adapters take the prefix route, and the head is
        the k rows `rows_of_head` gathers."""
        return summed_distillation_loss(model, batch["input_ids"], batch["attention_mask"], batch["task"],
                                        self.targets, batch["conversation"])


def summed_distillation_loss(
    model: SoftPromptModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    adapter_names: Sequence[str | None],
    targets: TopKTargets,
    conversations: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The summed top-k KL of a left-padded batch of conversations, and each row's scored positions.

    Args:
        model: the student: the frozen base with its adapters.
        input_ids: ``[B, T]`` each row one whole conversation, left-padded.
        attention_mask: ``[B, T]``.
        adapter_names: each row's adapter.
        targets: the teacher's top-k distributions.
        conversations: each row's conversation index in `targets`.

    Returns:
        (the scalar sum over every real position, ``[B]`` real positions per row).

    Raises:
        ValueError: a row's length differs from its conversation's in `targets` (data and targets out of step).
    """
    counts = attention_mask.sum(dim=1)  # [B]
    expected = targets.offsets[1:] - targets.offsets[:-1]
    wrong = [row for row, r in enumerate(conversations) if int(counts[row]) != int(expected[r])]
    if wrong:
        raise ValueError(
            f"Row {wrong[0]} has {int(counts[wrong[0]])} tokens but conversation {conversations[wrong[0]]} has "
            f"{int(expected[conversations[wrong[0]]])} teacher positions: the batch and the teacher targets come "
            "from different data. Fix: recompute the teacher targets for these conversations."
        )
    frozen = model.frozen
    layout, entries = model.layout_and_entries(input_ids.shape[0], adapter_names, None)
    hidden, _ = prefix_route_hidden_states(frozen, layout, entries, input_ids, attention_mask)  # [B, T, C]
    ids, logprobs = targets.of(conversations)  # each [N, k], in the same row-major order as the real positions
    device = hidden.device
    logits = rows_of_head(hidden[attention_mask.bool()], frozen.head_weight, ids.to(device), frozen.logit_softcap)
    return topk_kl(logits, logprobs.to(device)).sum(), counts
