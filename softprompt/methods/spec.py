"""What every soft-prompt method provides, so that the rest of the package chooses by data, not by type.

A method is one file in this folder that ends with a `MethodSpec`: its configuration class, how to build its
trainable module, how that module enters the frozen model (``enter``, returning a `softprompt.entries.Entry`), and
how PEFT stores it. The engine runs every method through the same routes by the kind of entry it returns; the file
also holds a plain reference of how the method enters the model, the way PEFT does it, which the engine is tested
against.

Shapes: P virtual tokens, L layers, K key/value heads, D head dim, C embedding width.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from softprompt.entries import Entry, EntryKind, EntryRequest
from softprompt.families import family_of
from softprompt.families.family import BaseModelShape

PEFT_TENSOR = "prompt_embeddings"
"""The tensor PEFT saves for a prompt-learning adapter: the module's output (or, for some methods, its table)."""


def module_output(module: nn.Module) -> torch.Tensor:
    """A method module's output: the default `MethodSpec.materialized`."""
    return module()


def output_as_prompt_embeddings(module: nn.Module, base_model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The module's output as PEFT's one ``prompt_embeddings`` tensor: the default `MethodSpec.peft_state`."""
    return {PEFT_TENSOR: materialize(module)}


@dataclass(frozen=True)
class Paper:
    """The paper a method comes from: what the README's methods table cites (`scripts/readme_tables.py`)."""

    authors: str
    """As cited: every author up to three (``Lester, Al-Rfou and Constant``), else the first and et al."""
    year: int
    """The year of its first arXiv version."""
    arxiv: str
    """Its arXiv id, e.g. ``2104.08691``."""
    title: str
    """Its title."""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"\d{4}\.\d{4,5}", self.arxiv):
            raise ValueError(f"arxiv={self.arxiv!r}: expected an arXiv id such as '2104.08691'. Fix: pass the id "
                             "alone, without 'arXiv:' or a version.")

    @property
    def url(self) -> str:
        """The paper's arXiv page."""
        return f"https://arxiv.org/abs/{self.arxiv}"


@dataclass(frozen=True)
class MethodSpec:
    """One soft-prompt method, as the registry (`softprompt.methods`) knows it."""

    name: str
    """The method's name in saved adapters and configs, e.g. ``prompt_tuning``."""
    cli_name: str
    """The ``--method`` value, e.g. ``prompt-tuning``."""
    config_class: type
    """Its configuration dataclass (PEFT's field names); every instance of a method that takes slots has
    ``num_virtual_tokens``."""
    enters_as: EntryKind
    """The kind of `softprompt.entries.Entry` its ``enter`` returns: ``virtual_tokens``, ``key_values`` or
    ``attention``."""
    build: Callable[[Any, PreTrainedModel, Any], nn.Module]
    """``build(config, base_model, tokenizer)``: the trainable module, initialized as the config says (the base's
    word embeddings and the tokenizer serve the inits that start from tokens), on the base's device."""
    empty: Callable[[Any, BaseModelShape], nn.Module]
    """``empty(config, shape)``: the module's structure alone, about to receive stored weights."""
    enter: Callable[[nn.Module, EntryRequest], Entry]
    """``enter(module, request)``: how the adapter enters the model for the rows of one call."""
    peft_type: str
    """PEFT's ``peft_type`` for it, e.g. ``PROMPT_TUNING``."""
    peft_fields: tuple[str, ...]
    """The config fields PEFT shares with it (same names and meanings)."""
    default_num_virtual_tokens: int | None
    """The seed guides' number of virtual tokens for it (8 for prompt tuning, 20 otherwise); None where there is none
    to default: CPT derives it from its context, adaption prompt takes no slot."""
    peft_module: Callable[[Any, PreTrainedModel, dict[str, torch.Tensor]], nn.Module]
    """``peft_module(config, base_model, tensors)``: a module holding what PEFT saved (names and shapes already
    checked against `peft_tensors`)."""
    paper: Paper
    """The paper it comes from (the method file's docstring teaches it)."""
    trains: str
    """What trains, in one line of Markdown: the tensors with their shapes in the package's letters (P, C, L, K, D,
    r, ...) and the config fields that set the others, as the README's methods table shows it."""
    peft_tensors: Callable[[Any, PreTrainedModel], dict[str, tuple[int, ...]]] | None = None
    """``peft_tensors(config, base_model)``: the tensors PEFT's ``adapter_model.safetensors`` holds, by name, with
    the shapes the config and base imply (names may follow the base's module paths). None: one
    ``prompt_embeddings [P, width]`` (`expected_peft_tensors`)."""
    peft_state: Callable[[nn.Module, PreTrainedModel], dict[str, torch.Tensor]] = output_as_prompt_embeddings
    """``peft_state(module, base_model)``: the tensors PEFT saves (default: the module's output as
    ``prompt_embeddings``)."""
    materialized: Callable[[nn.Module], torch.Tensor] | None = module_output
    """``materialized(module)``: the module's output, stored beside its weights in softprompt's format so that
    inference needs no encoder; None for methods whose output is not one table."""
    reference_forward: Callable[..., Any] | None = None
    """The method's plain reference forward, PEFT's way (the oracle the engine is tested against)."""
    exports: tuple[type, ...] = field(default_factory=tuple)
    """The public classes of the method (its config and enums), exported by ``softprompt``."""
    train_defaults: Mapping[str, Any] = field(default_factory=dict)
    """Settings `softprompt train` gives the method where the run gives none and PEFT's config has no default
    (adaption prompt's ``adapter_len`` and ``adapter_layers``), so that ``--method NAME`` alone runs."""
    takes_task_ids: bool = False
    """Whether every call needs each row's task id (multitask prompt tuning): a training run then gives its rows
    task ids from the data (`softprompt.training.method_data`)."""
    after_optimizer_step: Callable[[nn.Module], None] | None = None
    """``after_optimizer_step(module)``: what the method does to its trained module after each optimizer step (CPT
    projects its deltas back into their balls), or None."""

    def __post_init__(self) -> None:
        if not self.exports:
            object.__setattr__(self, "exports", (self.config_class,))

    def expected_peft_tensors(self, config: Any, base_model: PreTrainedModel) -> dict[str, tuple[int, ...]]:
        """The tensors (names and shapes) a PEFT adapter of `config` on `base_model` holds."""
        if self.peft_tensors is not None:
            return self.peft_tensors(config, base_model)
        shape = family_of(base_model.config).shape(base_model.config)
        return {PEFT_TENSOR: (config.num_virtual_tokens, self.output_width(shape))}

    def num_slots(self, config: Any) -> int:
        """Prefix or virtual-token slots its adapter takes in front of a row (0 for attention patches)."""
        return 0 if self.enters_as == "attention" else config.num_virtual_tokens

    def output_width(self, shape: BaseModelShape) -> int:
        """The width of one row of its output table: C for virtual tokens, L * 2 * K * D for key/values."""
        return shape.embedding_width if self.enters_as == "virtual_tokens" else shape.prefix_width

    def peft_shape_fields(self, shape: BaseModelShape) -> dict[str, int]:
        """What PEFT records of the base's shape: ``token_dim`` and ``num_attention_heads`` (K * D and K for a
        prefix, PEFT's rule for grouped-query models; C and H for virtual tokens) and ``num_layers``; nothing for
        an attention patch, which is not a PEFT prompt-learning method."""
        if self.enters_as == "attention":
            return {}
        if self.enters_as == "key_values":
            return {"token_dim": shape.key_value_width, "num_attention_heads": shape.num_key_value_heads,
                    "num_layers": shape.num_layers}
        return {"token_dim": shape.embedding_width, "num_attention_heads": shape.num_heads,
                "num_layers": shape.num_layers}


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


def from_prompt_embeddings(build: Callable[[Any, BaseModelShape, torch.Tensor], nn.Module]):
    """A `MethodSpec.peft_module` from a function of the one ``prompt_embeddings`` table PEFT saves."""
    return lambda config, base_model, tensors: build(config, family_of(base_model.config).shape(base_model.config),
                                                    tensors[PEFT_TENSOR])


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
    available = device_memory(device)
    if available is not None and needed > available:
        raise ValueError(
            f"num_virtual_tokens={config.num_virtual_tokens}: its [{config.num_virtual_tokens}, {width}] fp32 table "
            f"needs {needed / 2**30:,.1f} GiB, more than the {available / 2**30:,.1f} GiB of memory on {device}. "
            "Expected a few to a few hundred virtual tokens (the seed guides use 8 and 20). Fix: pass e.g. "
            "num_virtual_tokens=20 (--num-virtual-tokens 20)."
        )


def device_memory(device: torch.device) -> int | None:
    """Total memory of `device` in bytes (physical memory for the CPU), or None where it cannot be read."""
    try:
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[1]
        if device.type == "cpu":
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, RuntimeError):  # no such sysconf name, or no CUDA context
        return None
    return None
