"""What a `SoftPromptModel`'s ``state_dict()`` holds: its adapters' tensors, never the frozen base's.

The base is a model the user loaded and keeps (``base_model.state_dict()``, ``base_model.save_pretrained``); the
adapters are all the state a `SoftPromptModel` adds. Saying so in ``state_dict`` is also the seam that makes a
plain ``transformers.Trainer`` work: for a model that is not a ``PreTrainedModel``, Trainer saves
``model.state_dict()`` as ``checkpoint-N/model.safetensors`` and loads it back with
``model.load_state_dict(state, strict=False)``, both when resuming and for ``load_best_model_at_end``. With the
base included, every checkpoint would copy the whole frozen model (and BLOOM's tied embeddings make safetensors
refuse to write it at all); with the adapters only, a checkpoint holds ``prompts.<name>.*`` (encoders included, so
p-tuning resumes exactly) next to Trainer's own optimizer, scheduler and random states.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

BASE_MODEL_PREFIX = "base_model."
"""Where the frozen base's tensors would sit in the state dict (the `SoftPromptModel.base_model` attribute)."""


def without_base_model(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Removes the frozen base's entries (``<prefix>base_model.*``) from `state`, in place, and returns it."""
    for key in [key for key in state if key.startswith(prefix + BASE_MODEL_PREFIX)]:
        del state[key]
    return state


def load_adapter_state(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False
) -> Any:
    """``nn.Module.load_state_dict`` for a state that may leave the frozen base out (what ``state_dict()`` gives).

    Base tensors that are present are loaded like any other; absent ones are not reported missing.

    Args:
        model: the `SoftPromptModel`.
        state_dict: adapter tensors (``prompts.<name>.*``), and optionally base tensors.
        strict: raise when an adapter tensor is missing or a key is unknown, as torch does.
        assign: torch's ``assign`` (take the given tensors instead of copying into the existing ones).

    Returns:
        torch's ``(missing_keys, unexpected_keys)``, without the absent base tensors.

    Raises:
        RuntimeError: with `strict`, naming the missing and unexpected keys (torch's wording).
    """
    result = nn.Module.load_state_dict(model, state_dict, strict=False, assign=assign)
    missing = [key for key in result.missing_keys if not key.startswith(BASE_MODEL_PREFIX)]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(model).__name__}: missing keys {missing}, unexpected keys "
            f"{result.unexpected_keys}. Fix: load a state dict of a model with the same adapters (same names and "
            "configs), or pass strict=False."
        )
    result.missing_keys[:] = missing
    return result
