"""What every soft-prompt method provides, so that the rest of the package chooses by data, not by type.

A method is one file in this folder that ends with a `MethodSpec`: its configuration class, how to build its
trainable module, and through which seam its output enters the frozen model. Every method's module has a
``forward()`` without arguments that returns the method's output:

- ``embeddings``: ``[P, C]`` virtual-token embeddings, put in front of the input's token embeddings
  (prompt tuning, p-tuning);
- ``key_values``: a flat ``[P, L * 2 * K * D]`` prefix, split into every layer's keys and values
  (prefix tuning; see `softprompt.methods.prefix_tuning.split_key_values`).

`softprompt.model` runs either kind through one engine; the method files also hold a plain reference of how their
output enters the model, the way PEFT does it, which the engine is tested against.

Shapes: P virtual tokens, L layers, K key/value heads, D head dim, C embedding width.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from softprompt.families.family import BaseModelShape

EntrySeam = Literal["embeddings", "key_values"]


@dataclass(frozen=True)
class MethodSpec:
    """One soft-prompt method, as the registry (`softprompt.methods`) knows it."""

    name: str
    """The method's name in saved adapters and configs, e.g. ``prompt_tuning``."""
    cli_name: str
    """The ``--method`` value, e.g. ``prompt-tuning``."""
    config_class: type
    """Its configuration dataclass (PEFT's field names); every instance has ``num_virtual_tokens``."""
    enters_as: EntrySeam
    """The seam its output enters through: ``embeddings`` or ``key_values``."""
    build: Callable[[Any, BaseModelShape, nn.Module, Any], nn.Module]
    """``build(config, shape, word_embeddings, tokenizer)``: the trainable module, initialized as the config says
    (the word embeddings and tokenizer serve TEXT / SAMPLE_VOCAB init only), on the word embeddings' device."""
    empty: Callable[[Any, BaseModelShape], nn.Module]
    """``empty(config, shape)``: the module's structure alone, about to receive stored weights."""
    from_table: Callable[[Any, BaseModelShape, torch.Tensor], nn.Module]
    """``from_table(config, shape, table)``: a module whose output is the given ``[P, width]`` table, for adapters
    stored as their output only (PEFT's format)."""
    peft_type: str
    """PEFT's ``peft_type`` for it, e.g. ``PROMPT_TUNING``."""
    peft_fields: tuple[str, ...]
    """The config fields PEFT shares with it (same names and meanings)."""
    default_num_virtual_tokens: int
    """The seed guides' number of virtual tokens for it (8 for prompt tuning, 20 otherwise)."""

    def output_width(self, shape: BaseModelShape) -> int:
        """The width of one row of its output: C for embeddings, L * 2 * K * D for key/values."""
        return shape.embedding_width if self.enters_as == "embeddings" else shape.prefix_width

    def peft_token_dim(self, shape: BaseModelShape) -> int:
        """What PEFT records as ``token_dim``: the per-layer key/value width K * D for a prefix (PEFT's rule for
        grouped-query models), C for virtual tokens."""
        return shape.embedding_width if self.enters_as == "embeddings" else shape.key_value_width

    def peft_num_attention_heads(self, shape: BaseModelShape) -> int:
        """What PEFT records as ``num_attention_heads``: K for a prefix, H for virtual tokens."""
        return shape.num_heads if self.enters_as == "embeddings" else shape.num_key_value_heads


class MaterializedPrompt(nn.Module):
    """Any method reduced to its output: a fixed ``[P, C]`` or ``[P, L * 2 * K * D]`` table.

    What PEFT keeps of p-tuning and projected prefix tuning, and what inference needs. It stays an `nn.Embedding`
    so that it can be fine-tuned further as a plain table.

    Args:
        table: the output to hold, ``[P, width]``.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.embedding = nn.Embedding(table.shape[0], table.shape[1], device=table.device)
        with torch.no_grad():
            self.embedding.weight.copy_(table.float())

    def forward(self) -> torch.Tensor:
        """Returns the stored table, ``[P, width]``."""
        return self.embedding.weight


def materialize(module: nn.Module) -> torch.Tensor:
    """A method module's output, detached, fp32: ``[P, C]`` or ``[P, L * 2 * K * D]``."""
    with torch.no_grad():
        return module().detach().to(torch.float32, copy=True)  # a copy: never aliases a parameter


def check_positive_int(name: str, value: Any, example: str, allow_none: bool = False) -> None:
    """The configs' shared check of an int field, with the message every method config uses.

    Raises:
        ValueError: `value` is not an int >= 1 (bools are refused), or None where None is not allowed.
    """
    if allow_none and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        none = " or None" if allow_none else ""
        raise ValueError(f"{name}={value!r}: expected a positive int{none}. Fix: pass e.g. {example}.")


def check_fits_in_memory(config: Any, width: int, device: torch.device) -> None:
    """Refuses a method whose ``[P, width]`` output table alone exceeds the device's memory, before allocating it.

    Without this, ``num_virtual_tokens=10**9`` ends in a ``MemoryError`` (or the kernel's OOM killer) with no word
    about which setting asked for the memory.

    Args:
        config: the method's configuration (its ``num_virtual_tokens`` is P).
        width: the width of one output row (C, or L * 2 * K * D for a prefix).
        device: where the table would live.

    Raises:
        ValueError: naming P, the bytes the table needs, the memory there is, and the fix.
    """
    needed = config.num_virtual_tokens * width * 4  # fp32
    available = _device_memory(device)
    if available is not None and needed > available:
        raise ValueError(
            f"num_virtual_tokens={config.num_virtual_tokens}: its [{config.num_virtual_tokens}, {width}] fp32 table "
            f"needs {needed / 2**30:,.1f} GiB, more than the {available / 2**30:,.1f} GiB of memory on {device}. "
            "Expected a few to a few hundred virtual tokens (the seed guides use 8 and 20). Fix: pass e.g. "
            "num_virtual_tokens=20 (--num-virtual-tokens 20)."
        )


def _device_memory(device: torch.device) -> int | None:
    """Total memory of `device` in bytes (physical memory for the CPU), or None where it cannot be read."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[1]
        if device.type == "cpu":
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, RuntimeError):  # no such sysconf name, or no CUDA context
        return None
    return None
