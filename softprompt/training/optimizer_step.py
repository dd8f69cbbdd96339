"""One optimizer step over several adapters: accumulate, sum over processes, normalize per adapter, clip, step.

Losses are token sums divided by the labelled-token count of the whole step (all micro-batches, all processes),
per adapter: each adapter's gradient is the mean over its own labelled tokens in the step. So the gradient of a
step does not depend on how its rows are split into micro-batches or processes: 1 process x 8 rows, 1 process x 4
rows x 2 accumulation steps and 2 processes x 4 rows compute the same update.

Several processes (``torchrun``): each step, the gradients of the adapters' tensors (and the step's loss and token
counts) are summed over processes with one ``all_reduce``. That is what DistributedDataParallel does for trainable
tensors, written out: DDP would have to wrap a module whose ``forward`` uses the parameters, but `SoftPromptModel`
calls its prompt modules inside its own routes; the adapters are small, so one flat all-reduce per step (not
per micro-batch, which DDP needs ``no_sync`` to avoid) costs nothing next to the frozen base's compute.

The base sharded (``--fsdp``), every process must run the same passes: each layer's forward and backward gather
its weights from all processes at once. So no process may leave a micro-batch out on its own: one without rows in
it (the epoch's last micro-batch can leave a process none) runs a stand-in batch (`STAND_IN`), and one whose rows
have nothing to learn runs them anyway; both add exact zeros to the gradients and nothing to the counts.

Clipping is per adapter: one adapter's large gradient must not shrink another's update. An adapter without rows in
a step gets no update at all (no momentum, no decay), as if trained alone. With fp16 autocast, a grad scaler scales
the loss and skips steps whose gradients overflowed. After the step, a method that constrains its parameters
does so (`MethodSpec.after_optimizer_step`: CPT projects its deltas back into their balls).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from softprompt.methods import method_of
from softprompt.model import SoftPromptModel
from softprompt.training.prepared import LossFunction, label_loss


STAND_IN = "stand_in"
"""The key that marks a collated micro-batch as a stand-in (True): rows run only so that this process makes the same
passes as the others (the base sharded); their loss is multiplied by 0, their tokens and positions not counted."""


class NonFiniteStep(ArithmeticError):
    """The step's loss or gradient norm is NaN or infinite; nothing was updated."""

    def __init__(self, what: str, value: float):
        super().__init__(f"{what} {value}")
        self.what = what
        self.value = value


@dataclass
class StepResult:
    """What one optimizer step measured."""

    loss: float
    """Mean loss over the step's labelled tokens (all micro-batches and processes)."""
    grad_norm: float
    """L2 norm over every adapter's gradient, before clipping."""
    tokens: int
    """Real tokens the step processed (all processes)."""
    skipped_micro_batches: int = 0
    """This process's micro-batches without a labelled position, skipped (they have no loss to learn from)."""


def optimizer_step(
    model: SoftPromptModel,
    parameters: Mapping[str, Sequence[nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    micro_batches: Sequence[dict[str, Any]],
    loss_options: dict[str, Any],
    max_grad_norm: float,
    autocast: Callable[[], Any],
    scaler: torch.amp.GradScaler | None = None,
    world_size: int = 1,
    loss_function: LossFunction = label_loss,
    sharded: bool = False,
) -> StepResult:
    """Accumulates `micro_batches`, sums over processes, normalizes and clips per adapter, steps.

    Args:
        model: the model, its adapters trainable.
        parameters: each adapter's trainable parameters (the optimizer's, in the same order on every process).
        optimizer: over those parameters.
        scheduler: stepped once.
        micro_batches: this process's collated batches of the step, on the model's device; every row names its
            adapter in ``task`` (and, for multitask prompt tuning, its task id in ``task_id``). Sharded, one per
            micro-batch of the step on every process, stand-ins (`STAND_IN`) where this process has no rows.
        loss_options: passed to `loss_function` (``implementation``, ``virtual_token_layout``).
        max_grad_norm: per-adapter clipping; 0 turns it off.
        autocast: a context-manager factory for the forward passes.
        scaler: the fp16 grad scaler, or None.
        world_size: processes summing their gradients.
        loss_function: the recipe's loss on a micro-batch, summed, and each row's scored positions
            (`softprompt.training.prepared.LossFunction`; the default: next-token loss on the labels).
        sharded: the frozen base is sharded over the processes (``--fsdp``): no micro-batch is skipped (see the
            module docstring).

    Raises:
        NonFiniteStep: the loss or the gradient norm is not finite (checked before the optimizer moves).
    """
    names = list(parameters)
    device = next(iter(next(iter(parameters.values())))).device
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    counts = torch.zeros(len(names), device=device)  # labelled tokens per adapter
    tokens = torch.zeros((), device=device)
    skipped = 0
    for batch in micro_batches:
        if batch.get(STAND_IN, False):
            with autocast():
                loss, _ = loss_function(model, batch, **loss_options)
            (loss * 0).backward()  # the passes the others make, sharded; exact zeros to the gradients
            continue
        row_names = batch["task"]
        tokens += batch["attention_mask"].sum()
        unlabelled = "labels" in batch and not bool((batch["labels"] != -100).any())
        if unlabelled and not sharded:  # nothing to learn: no forward at all
            skipped += 1
            continue
        with autocast():
            # Each row trains the adapter of its task; the sum over labelled tokens is divided below, once the
            # step's token count over all micro-batches and processes is known.
            loss, per_row = loss_function(model, batch, **loss_options)
        if unlabelled or int(per_row.sum()) == 0:  # or only first tokens that nothing before them predicts
            skipped += 1
            if sharded:
                (loss * 0).backward()  # the passes the others make, sharded; exact zeros to the gradients
            continue
        for index, name in enumerate(names):
            counts[index] += per_row[[n == name for n in row_names]].sum()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_sum += loss.detach().float()

    gradients = [p.grad if p.grad is not None else torch.zeros_like(p) for group in parameters.values() for p in group]
    totals = torch.cat([loss_sum.view(1), tokens.view(1), counts])
    if world_size > 1:
        # One collective per step: every adapter gradient, the loss and the counts, summed over processes.
        flat = torch.cat([g.flatten().float() for g in gradients] + [totals])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for gradient in gradients:
            gradient.copy_(flat[offset : offset + gradient.numel()].view_as(gradient))
            offset += gradient.numel()
        totals = flat[offset:]
    loss_sum, tokens, counts = totals[0], totals[1], totals[2:]
    mean_loss = float(loss_sum / counts.sum().clamp(min=1))
    if not math.isfinite(mean_loss):
        raise NonFiniteStep("loss", mean_loss)

    offset = 0
    for group, count in zip(parameters.values(), counts.tolist()):
        for parameter, gradient in zip(group, gradients[offset : offset + len(group)]):
            parameter.grad = gradient.div_(count) if count else None  # token sums -> this adapter's mean
        offset += len(group)
    if scaler is not None:
        scaler.unscale_(optimizer)
    squared_norms = 0.0
    for group in parameters.values():
        present = [parameter for parameter in group if parameter.grad is not None]
        if present:
            norm = torch.nn.utils.clip_grad_norm_(present, max_grad_norm or float("inf"))
            squared_norms += float(norm) ** 2
    if scaler is not None:
        scaler.step(optimizer)  # skips the step when fp16 gradients overflowed, and lowers the scale
        scaler.update()
    else:
        if not math.isfinite(squared_norms):
            raise NonFiniteStep("gradient norm", math.sqrt(squared_norms))
        optimizer.step()
    for name in parameters:  # e.g. CPT's projection back into its balls
        after_step = method_of(model.adapter_configs[name]).after_optimizer_step
        if after_step is not None:
            after_step(model.prompts[name])
    scheduler.step()
    return StepResult(loss=mean_loss, grad_norm=math.sqrt(squared_norms), tokens=int(tokens),
                      skipped_micro_batches=skipped)


def linear_schedule(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate factor: 0 -> 1 over the warmup steps, then 1 -> 0 at ``total_steps`` (transformers'
    ``get_linear_schedule_with_warmup``)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor
