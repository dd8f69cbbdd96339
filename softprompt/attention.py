"""Reaching a frozen model's attention layers from outside: for methods that add a term inside attention.

A method such as adaption prompt gives some layers tokens of their own, which every query of the layer attends to
in a softmax apart from the real one; the result, gated, joins the layer's attention output. softprompt computes
that term beside the layer, never inside a copy of transformers' attention code:

- `adapted_layers` finds each layer's attention submodule by the family's `AttentionAccess` (PEFT's rule: the
  modules whose name ends in its ``target_modules``, in order);
- `queries` recomputes, from the hidden states a forward hook sees, the queries the layer scores (its query
  projection, query norm and rotary positions);
- `keys_and_values` sends tokens through the layer's frozen key and value projections (and key norm), at no
  position: no rotary, no ALiBi bias;
- `attended` scores, soft-caps, normalizes, gates and projects them like the layer;
- `HooksForOneCall` registers the hooks for one call, and again while gradient checkpointing recomputes a layer in
  the backward pass (after the call has returned).

Shapes: B batch (R of its rows), T tokens, A adapter tokens, H query heads, K key/value heads, D head dim, C hidden
size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers import PreTrainedModel

from softprompt.families.family import AttentionAccess, BaseModelShape, Family


@dataclass(frozen=True)
class AdaptedLayer:
    """One decoder layer whose attention a method reaches."""

    index: int
    """The layer's index, 0 .. L - 1."""
    name: str
    """The attention submodule's path in the base model (``model.layers.3.self_attn``)."""
    attention: nn.Module
    """The attention submodule, whose forward hooks add the term."""
    layer: nn.Module
    """The decoder layer holding it (what gradient checkpointing recomputes)."""


def attention_access(family: Family, method: str) -> AttentionAccess:
    """The family's `AttentionAccess`.

    Raises:
        ValueError: the family's attention cannot be reached, naming what is missing and the fix.
    """
    if family.attention is None:
        raise ValueError(
            f"{method} works inside attention, and softprompt cannot reach {family.name}'s attention layers: "
            f"{family.attention_missing}. Fix: use a method that enters at the embeddings or the cache (prompt "
            "tuning, p-tuning, prefix tuning) on this model, or describe its attention in its family file "
            "(Family.attention, softprompt/families/family.py AttentionAccess)."
        )
    return family.attention


def adapted_layers(base_model: PreTrainedModel, family: Family, num_layers: int, method: str,
                   target_modules: str | None = None) -> list[AdaptedLayer]:
    """The top `num_layers` layers' attention submodules, PEFT's way: every module whose name ends in
    ``.<target_modules>``, in module order, the last `num_layers` of them.

    Args:
        base_model: the frozen base.
        family: its family record.
        num_layers: how many of the top layers.
        method: the method's name, for messages.
        target_modules: PEFT's field, checked against the family's attention submodule; None: the family's.

    Raises:
        ValueError: the family's attention is unreachable (`attention_access`), `target_modules` names another
            submodule, or the model has fewer such layers than `num_layers`.
    """
    access = attention_access(family, method)
    if target_modules is not None and target_modules != access.module:
        raise ValueError(
            f"target_modules={target_modules!r}: {method} adapts each layer's attention submodule, which this "
            f"{family.name} model calls {access.module!r}. Fix: leave target_modules=None, or pass {access.module!r}."
        )
    modules = dict(base_model.named_modules())
    names = [name for name in modules if name.endswith("." + access.module)]
    if num_layers > len(names):
        raise ValueError(
            f"adapter_layers={num_layers}: this {family.name} model has {len(names)} attention layers. Fix: pass "
            f"adapter_layers={len(names)} or fewer (the top layers are adapted)."
        )
    first = len(names) - num_layers
    return [AdaptedLayer(first + offset, name, modules[name], modules[name.rpartition(".")[0]])
            for offset, name in enumerate(names[first:])]


def hidden_states_of(args: tuple, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """``[B, T, C]`` the hidden states an attention module was called with (a keyword in most families, the
    first argument in GPT-2, BLOOM and GPT-NeoX)."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def queries(access: AttentionAccess, attention: nn.Module, hidden_states: torch.Tensor,
            kwargs: Mapping[str, Any], shape: BaseModelShape, rows: torch.Tensor | None = None) -> torch.Tensor:
    """The queries the layer scores for `hidden_states`, ``[R, H, T, D]``: its query projection, query norm and
    rotary positions (queries rotate at their real positions; partial rotary leaves the last dims of each head).

    Args:
        access: the family's attention access.
        attention: the layer's attention submodule.
        hidden_states: ``[R, T, C]`` what it attends from (already the adapter's rows).
        kwargs: the layer's keyword arguments to it (``position_embeddings`` for rotary families).
        shape: the base's dimensions.
        rows: ``[R]`` which batch rows `hidden_states` are, to pick their positions; None: all of them.

    Raises:
        RuntimeError: a rotary family whose layer is not given ``position_embeddings`` (another transformers).
    """
    heads, head_dim = shape.num_heads, shape.head_dim
    if access.fused is None:
        projected = getattr(attention, access.projections[0])(hidden_states)  # [R, T, H * D]
    elif access.fused_layout == "blocks":
        projected = getattr(attention, access.fused)(hidden_states)[..., : heads * head_dim]
    else:  # per head (q, k, v): [R, T, H * 3 * D]
        projected = rearrange(getattr(attention, access.fused)(hidden_states), "r t (h three d) -> r t h three d",
                              h=heads, three=3)[..., 0, :].flatten(-2)
    query = rearrange(projected, "r t (h d) -> r h t d", h=heads)  # [R, H, T, D]
    if access.query_norm is not None:
        query = getattr(attention, access.query_norm)(query)
    if access.rotary:
        if "position_embeddings" not in kwargs:
            raise RuntimeError(
                f"{type(attention).__name__} was called without position_embeddings: the rotary positions of its "
                "queries cannot be read from outside with this transformers version. Fix: use the transformers "
                "versions softprompt supports (README, Supported versions)."
            )
        cos, sin = kwargs["position_embeddings"]  # [B or 1, T, rotary dims]
        if rows is not None and cos.shape[0] > 1:
            cos, sin = cos[rows], sin[rows]
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [R or 1, 1, T, rotary dims]
        rotated, kept = query[..., : cos.shape[-1]], query[..., cos.shape[-1] :]
        query = torch.cat([rotated * cos + _rotate_half(rotated) * sin, kept], dim=-1)
    return query


def keys_and_values(access: AttentionAccess, attention: nn.Module, tokens: torch.Tensor,
                    shape: BaseModelShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of tokens of a method's own, through the layer's frozen projections (biases and key norm
    included) at no position: no rotary, no ALiBi bias.

    Args:
        tokens: ``[A, C]``.

    Returns:
        keys and values, each ``[K, A, D]``.
    """
    heads, kv_heads, head_dim = shape.num_heads, shape.num_key_value_heads, shape.head_dim
    if access.fused is None:
        keys = getattr(attention, access.projections[1])(tokens)  # [A, K * D]
        values = getattr(attention, access.projections[2])(tokens)
    elif access.fused_layout == "blocks":
        fused = getattr(attention, access.fused)(tokens)  # [A, H * D + 2 * K * D]
        keys, values = fused[..., heads * head_dim :].split(kv_heads * head_dim, dim=-1)
    else:  # per head (q, k, v)
        fused = rearrange(getattr(attention, access.fused)(tokens), "a (h three d) -> a h three d", h=heads, three=3)
        keys, values = fused[..., 1, :].flatten(-2), fused[..., 2, :].flatten(-2)
    keys = rearrange(keys, "a (k d) -> k a d", k=kv_heads)
    values = rearrange(values, "a (k d) -> k a d", k=kv_heads)
    if access.key_norm is not None:
        keys = getattr(attention, access.key_norm)(keys)
    return keys, values


def attended(access: AttentionAccess, attention: nn.Module, query: torch.Tensor, keys: torch.Tensor,
             values: torch.Tensor, gate: torch.Tensor, shape: BaseModelShape) -> torch.Tensor:
    """What the queries take from the method's tokens, gated, as it joins the layer's attention output.

    Their own softmax over the A tokens alone (no mask: every query sees all of them), in fp32 as transformers
    does, times `gate`, then the attended values through the output projection (its weight; its bias only where
    the family says so, `AttentionAccess.output_bias`).

    Args:
        query: ``[R, H, T, D]`` (`queries`).
        keys, values: ``[K, A, D]`` (`keys_and_values`); query head h reads key/value head h // (H / K).
        gate: a scalar tensor.

    Returns:
        ``[R, T, C]``.
    """
    groups = shape.num_heads // shape.num_key_value_heads
    keys = keys.to(query.dtype).repeat_interleave(groups, dim=0)  # [H, A, D]
    values = values.to(query.dtype).repeat_interleave(groups, dim=0)
    scale = getattr(attention, access.scale) if access.scale is not None else shape.head_dim**-0.5
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scale  # [R, H, T, A]
    cap = getattr(attention, access.softcap, None) if access.softcap is not None else None
    if cap is not None:
        scores = torch.tanh(scores / cap) * cap
    weights = gate.to(query.dtype) * F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = rearrange(torch.matmul(weights, values), "r h t d -> r t (h d)")  # [R, T, H * D]
    if access.output is None:
        return output
    projection = getattr(attention, access.output)
    return projection(output) if access.output_bias else F.linear(output, projection.weight)


AttentionHook = Callable[[nn.Module, tuple, dict, Any], Any]
"""A forward hook with keyword arguments: ``hook(module, args, kwargs, output) -> new output or None``."""


class _Registration:
    """One attention submodule's hook, registered at most once at a time."""

    def __init__(self, module: nn.Module, hook: AttentionHook):
        self.module, self.hook = module, hook
        self.handle: torch.utils.hooks.RemovableHandle | None = None

    @contextmanager
    def registered(self) -> Iterator[None]:
        """The hook registered for the block, unless it already is (then the block changes nothing)."""
        if self.handle is not None:
            yield
            return
        self.handle = self.module.register_forward_hook(self.hook, with_kwargs=True)
        try:
            yield
        finally:
            self.handle.remove()
            self.handle = None


class HooksForOneCall:
    """Forward hooks on attention submodules, for one call, and for its recomputations under checkpointing.

    transformers' gradient checkpointing runs a layer's forward through the layer's ``_gradient_checkpointing_func``
    (the attribute its `GradientCheckpointingLayer` documents for that) and runs it again in the backward pass,
    after the call has returned and the hooks are gone: the recomputed layer would lack the term and the
    gradients would be wrong. So, for the call, each hooked layer's checkpointing function is wrapped: the function
    it checkpoints registers that layer's hooks while it runs (a no-op during the call itself, where they are
    registered already). The recomputation replays the wrapped function, hooks included, whenever the backward
    pass comes; the layer's own checkpointing function is put back when the call returns.

    Args:
        hooks: (adapted layer, its hook) pairs.
    """

    def __init__(self, hooks: Sequence[tuple[AdaptedLayer, AttentionHook]]):
        self.registrations: dict[nn.Module, list[_Registration]] = {}
        for adapted, hook in hooks:
            self.registrations.setdefault(adapted.layer, []).append(_Registration(adapted.attention, hook))

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Every hook registered, and every hooked layer's checkpointing wrapped, for the block."""
        with ExitStack() as stack:
            for layer, registrations in self.registrations.items():
                for registration in registrations:
                    stack.enter_context(registration.registered())
                if "_gradient_checkpointing_func" in layer.__dict__:
                    stack.enter_context(_checkpointing_with(layer, registrations))
            yield


@contextmanager
def _checkpointing_with(layer: nn.Module, registrations: list[_Registration]) -> Iterator[None]:
    """`layer`'s checkpointing function, for the block, wrapped so that what it checkpoints runs with the hooks."""
    checkpoint = layer.__dict__["_gradient_checkpointing_func"]

    def with_hooks(function: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            with ExitStack() as stack:
                for registration in registrations:
                    stack.enter_context(registration.registered())
                return function(*args, **kwargs)
        return run

    layer._gradient_checkpointing_func = lambda function, *args, **kwargs: checkpoint(with_hooks(function), *args,
                                                                                        **kwargs)
    try:
        yield
    finally:
        layer._gradient_checkpointing_func = checkpoint
