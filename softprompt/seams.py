"""What the installed transformers calls its public seams, found by looking at signatures, never at version strings.

transformers renames its seams as it moves: 5.24 renamed the cache argument of every model forward and of
``generate`` from ``past_key_values`` to ``cache`` (the old name warns until its removal). softprompt hands its
caches to the model through `cache_argument`, so the same code runs on either side of such a rename without a
deprecation warning.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

NEW_CACHE_NAME = "cache"
OLD_CACHE_NAME = "past_key_values"


def cache_keyword(model: nn.Module) -> str:
    """The keyword under which `model`'s forward (and, with it, ``generate``) takes a `Cache`.

    Args:
        model: a transformers model or decoder (any module whose ``forward`` takes a cache).

    Returns:
        ``"cache"`` where the forward's signature names that parameter, else ``"past_key_values"``.
    """
    parameters = inspect.signature(model.forward).parameters
    return NEW_CACHE_NAME if NEW_CACHE_NAME in parameters else OLD_CACHE_NAME


def cache_argument(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for `model`, to splat into its forward or ``generate`` call (see `cache_keyword`)."""
    return {cache_keyword(model): cache}


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool | None = None) -> None:
    """Turns on transformers' gradient (activation) checkpointing of `model`'s layers, under the name the installed
    transformers gives it: ``activation_checkpointing_enable`` (5.23 and later; the old name warns there) or
    ``gradient_checkpointing_enable``.

    Args:
        model: a transformers ``PreTrainedModel``.
        use_reentrant: torch's checkpoint flavour; None leaves transformers' choice.
    """
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable(None if use_reentrant is None else {"use_reentrant": use_reentrant})  # both take the options first
