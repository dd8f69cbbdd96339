"""The frozen base sharded across processes with PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``), for
bases that do not fit one device (``softprompt train --fsdp`` under ``torchrun``).

What is sharded, and when it is whole (N processes):

- Every decoder layer is its own FSDP group: each process keeps 1/N of its weights; the layer is gathered
  (all-gather) just before its forward, freed just after, and gathered again for its backward, where the next
  layer is gathered while the current one works.
- The rest of the base (the input embeddings, the LM head, the final norm, learned positions: whatever is not in
  a layer) is one more group, the root, on the `SoftPromptModel` itself: sharded like the layers, but gathered for
  the whole of each call of the model (a training micro-batch's forward and backward, an evaluation batch, a
  ``generate`` call; FSDP frees a root at the end of a backward, so after a call without one it stays gathered
  until the next step's backward ends, which leaves the peak unchanged). It cannot be gathered around a module
  call as the layers are: the label-only loss multiplies the head's weight directly
  (`softprompt.frozen.FrozenModel.head_weight`, `softprompt.loss`), never through the head module, and a tied head
  is the input embedding's own tensor. Held whole for the call, the head is a plain tensor to the loss (the
  one-pass CPU head, the plain-logits head and the fused kernel alike), and a tied head is gathered once for both
  of its uses. It costs one embedding matrix per process (two when the head is untied).
- The adapters are not sharded: every process holds them whole (they are small), FSDP ignores them, and
  `softprompt.training.optimizer_step` sums their gradients over processes as without ``--fsdp``. So the
  optimizer, the checkpoints and the adapter files are exactly those of a run without it.

A gather briefly holds a group twice (FSDP's all-gather buffer, then the weights copied out of it), so a process's
peak is about ``base / N + max(2 x root, root + 3 x layer)`` (measured: ``benchmarks/fsdp_memory.py``).

The model's calls are FSDP forward methods: `SoftPromptModel.forward`, ``summed_loss``, ``compute_loss`` and
``generate`` gather the root; call the model through them (a pass run on ``model.frozen`` directly gathers only the
layers). A loss that runs the frozen passes itself (context distillation's, which needs the hidden states and a few
rows of the head, not the model's logits) runs as one such call too: `as_model_call` gives the training loop the
recipe's loss as one. Every process must make the same calls in the same order, since each gather is a collective:
evaluation and the final generations run on every process, and so does every micro-batch of a step
(`softprompt.training.optimizer_step`: a process without rows in one runs a stand-in that adds zeros). Generation
goes through transformers' own ``generate`` on the sharded layers, which gather per layer at every step;
``fully_shard`` marks the base's modules as FSDP-managed, which makes ``generate`` keep every process stepping until
all are done (``synced_gpus``), so processes whose rows stop at different lengths do not wait on each other forever.

Mixed precision is FSDP2's policy: on a GPU with bf16 (or fp16) autocast, the weights are gathered in that dtype
(halving the traffic, whatever ``--base-dtype`` keeps the shards in), and reductions are fp32. The adapters stay
fp32, and their gradients are summed in fp32 by the step.

Forward hooks that methods install on attention modules run inside the layer's forward, where its weights are
whole; a method that read a layer's weights outside a call would find them sharded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from transformers.modeling_layers import GradientCheckpointingLayer

from softprompt.model import SoftPromptModel

MODEL_CALL = "model_call"
"""The method a sharded model gets for `as_model_call`: ``model.model_call(function, *args)`` is
``function(model, *args)`` as one call of the model."""

FORWARD_METHODS = ("summed_loss", "compute_loss", "generate", MODEL_CALL)
"""`SoftPromptModel` methods that gather the root group for their duration (``forward`` does by default)."""


def decoder_layers(base_model: nn.Module, num_layers: int) -> list[nn.Module]:
    """The base's decoder layers: transformers' `GradientCheckpointingLayer` modules, one per layer in every
    supported family.

    Raises:
        ValueError: their number is not `num_layers` (a model whose layers transformers builds otherwise).
    """
    layers = [module for module in base_model.modules() if isinstance(module, GradientCheckpointingLayer)]
    if len(layers) != num_layers:
        raise ValueError(
            f"{type(base_model).__name__}: found {len(layers)} transformers decoder layers "
            f"(GradientCheckpointingLayer modules) where the config has {num_layers}; --fsdp shards layer by layer. "
            "Fix: train this model without --fsdp, or with a transformers version whose layers are such modules."
        )
    return layers


def process_mesh(device: torch.device) -> DeviceMesh:
    """A one-dimensional mesh over every process of the initialized process group, on `device`'s type (each
    process's own GPU under ``torchrun``: `softprompt.training.base_model.resolve_device` selected it)."""
    return init_device_mesh(device.type, (dist.get_world_size(),))


def shard_frozen_base(model: SoftPromptModel, mesh: DeviceMesh, param_dtype: torch.dtype | None = None) -> None:
    """Shards `model`'s frozen base over `mesh` in place, its adapters left whole (see the module docstring).

    Each layer's weights move to the mesh's device as it is sharded, so a base held on the CPU never needs to fit
    the device whole: only its shards and one layer at a time reach it. Call it once the adapters are built
    (their inits may read the base) and before the model's first call.

    Args:
        model: the model; its adapters stay outside FSDP, its base must not be sharded yet.
        mesh: the processes to shard over (`process_mesh`).
        param_dtype: the dtype the weights are gathered and computed in (bf16 with GPU autocast), or None for
            the dtype they are stored in.

    Raises:
        ValueError: the base's decoder layers cannot be found (`decoder_layers`).
    """
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model.base_model, model.shape.num_layers):
        fully_shard(layer, mesh=mesh, mp_policy=policy)  # gathered for its forward and backward, freed after each
    # The root: whatever the layers leave (embeddings, head, norms), kept whole from the start of a call to the end
    # of its backward (FSDP's default for a root); the adapters are not FSDP's.
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=set(model.prompts.parameters()))
    # Inside its forward hook, FSDP keeps a group's all-gather buffer until the next group's gather has begun (so
    # that the two overlap): for the root, a second copy of the embeddings and head beside the first layer's two.
    # Gathered just before the hook, outside FSDP's forward, the root's buffer is freed as soon as it is copied out.
    model.register_forward_pre_hook(lambda module, args: module.unshard(), prepend=True)
    setattr(model, MODEL_CALL, functools.partial(_model_call, model))  # an instance method, for FSDP to wrap
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(model, name)
        setattr(model, name, _gathered_first(model, getattr(model, name)))


def as_model_call(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` (``function(model, *args, **kwargs)``, e.g. a recipe's loss) as one call of a sharded model.

    Without it, a function that runs the model's frozen passes itself, not through the model's methods, finds the
    root group sharded (a DTensor embedding fails on the plain token ids) or, after a call that left it gathered,
    runs outside FSDP's forward; as one call, the root is gathered for it, and FSDP's forward and backward hooks
    run around it as around the model's own methods. A function that calls those methods nests in the call.
    """

    @functools.wraps(function)
    def model_call(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return getattr(model, MODEL_CALL)(function, *args, **kwargs)

    return model_call


def _model_call(model: nn.Module, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`MODEL_CALL`'s body: ``function(model, *args, **kwargs)``."""
    return function(model, *args, **kwargs)


def _gathered_first(model: nn.Module, method: Callable[..., Any]) -> Callable[..., Any]:
    """`method`, after gathering `model`'s root group (``FSDPModule.unshard``; a no-op when it is gathered)."""

    @functools.wraps(method)
    def gathered_first(*args: Any, **kwargs: Any) -> Any:
        model.unshard()
        return method(*args, **kwargs)

    return gathered_first
