"""Parameter counts on the meta device: no weights loaded, nothing downloaded.

`base_model_config` resolves a model name to a transformers config: a real model whose config softprompt knows
offline (`softprompt.families`: BLOOM/bloomz, Llama-3.2-1B, Qwen2.5-0.5B, ...) works without network, a local
directory is read with ``AutoConfig.from_pretrained``, anything else is asked of the Hugging Face hub.
`parameter_counts` builds the base model and each adapter on the ``meta`` device, where tensors have shapes but no
storage, so even a 7B model is counted in a second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from softprompt.families import known_config, known_model_names
from softprompt.methods import SoftPromptConfig
from softprompt.methods.adaption_prompt import AdaptionPromptConfig
from softprompt.methods.cartridge import CartridgeConfig
from softprompt.methods.cpt import CPTConfig
from softprompt.methods.multitask_prompt_tuning import MultitaskPromptTuningConfig
from softprompt.methods.p_tuning import PromptEncoderConfig
from softprompt.methods.prefix_tuning import PrefixTuningConfig
from softprompt.methods.prompt_tuning import PromptTuningConfig
from softprompt.model import SoftPromptModel


def base_model_config(name_or_path: str) -> PretrainedConfig:
    """Resolves a model name to its config without loading weights.

    Args:
        name_or_path: a name known offline (``bigscience/bloomz-560m``, ``Qwen/Qwen3-0.6B``, ...), a local model
            directory, or a hub id.

    Raises:
        ValueError: the name is neither known offline, nor a local directory, nor reachable on the hub.
    """
    config = known_config(name_or_path)
    if config is not None:
        return config
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        where = "local directory" if Path(name_or_path).exists() else "hub id"
        raise ValueError(
            f"model {name_or_path!r}: could not read its config as a {where} ({error.__class__.__name__}). "
            f"Built-in names that work offline: {known_model_names()}. Fix: use one of those, a local directory holding "
            "config.json, or a hub id with network access."
        ) from None


def meta_base_model(config: PretrainedConfig) -> torch.nn.Module:
    """The causal LM of `config` on the meta device: shapes only, no memory, no download."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


SEED_CONFIGS: Mapping[str, SoftPromptConfig] = MappingProxyType({
    "prompt tuning, 8 tokens": PromptTuningConfig(num_virtual_tokens=8),
    "prompt tuning, 4 tokens": PromptTuningConfig(num_virtual_tokens=4),
    "p-tuning MLP, 20 tokens, h=128": PromptEncoderConfig(num_virtual_tokens=20, encoder_hidden_size=128),
    "p-tuning LSTM, 20 tokens, h=128": PromptEncoderConfig(
        num_virtual_tokens=20, encoder_hidden_size=128, encoder_reparameterization_type="LSTM"
    ),
    "prefix tuning, 20 tokens": PrefixTuningConfig(num_virtual_tokens=20),
    "prefix tuning, 20 tokens, projection": PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True),
    # LLaMA-Adapter's 10 tokens per layer, in the top 8 layers: every known model has at least 12 (gpt2).
    "adaption prompt, 10 tokens, top 8 layers": AdaptionPromptConfig(adapter_len=10, adapter_layers=8),
    "multitask, 20 tokens, 2 tasks, rank 1": MultitaskPromptTuningConfig(num_virtual_tokens=20, num_tasks=2),
    # Two labelled examples, typed as CPT types them; only the context's length, 10, changes the count.
    "CPT, 10-token context": CPTConfig(cpt_token_ids=list(range(100, 110)),
                                       cpt_tokens_type_mask=[1, 2, 2, 2, 3, 4, 5, 6, 7, 8]),
    "cartridge, 20 tokens, 1 frozen": CartridgeConfig(num_virtual_tokens=20),
})
"""The configurations of the seed guides and one of every other method, in the registry's order (PEFT's published
counts for bloomz-560m where it has them; `softprompt params` prints them, the README's methods table counts the
first of each method); read-only, and `SoftPromptModel` keeps its own copy of a config it is given."""


@dataclass(frozen=True)
class ParameterCount:
    """One row of the parameter table."""

    label: str
    """What was counted, e.g. ``prompt tuning, 8 tokens``."""
    trainable: int
    """Trainable parameters (the adapter's)."""
    total: int
    """All parameters: the frozen base (tied weights once) plus the adapter."""

    @property
    def trainable_percent(self) -> float:
        """100 * trainable / total."""
        return 100.0 * self.trainable / self.total


def parameter_counts(base_config: PretrainedConfig, configs: Mapping[str, SoftPromptConfig]) -> list[ParameterCount]:
    """Counts each adapter on the base `base_config` describes, on the meta device.

    Args:
        base_config: the base model's config (see `base_model_config`).
        configs: adapter configurations by label.

    Returns:
        One `ParameterCount` per configuration, in order.
    """
    base_model = meta_base_model(base_config)
    rows = []
    for label, config in configs.items():
        trainable, total = SoftPromptModel(base_model, config).num_parameters()
        rows.append(ParameterCount(label, trainable, total))
    return rows


def counts_text(model_name: str, rows: list[ParameterCount]) -> str:
    """What ``softprompt params`` prints: a title line, then one line per row in PEFT's wording, aligned.

    Args:
        model_name: the base model as the user named it.
        rows: the counts (`parameter_counts`).
    """
    width = max(len(row.label) for row in rows)
    lines = [f"{model_name} (counted on the meta device)"]
    lines += [f"{row.label:<{width}}  trainable params: {row.trainable:,d} || all params: {row.total:,d} "
              f"|| trainable%: {row.trainable_percent:.4f}" for row in rows]
    return "\n".join(lines)
