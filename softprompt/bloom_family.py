"""The BLOOM family's shapes, and parameter counting on the meta device (no weights loaded, nothing downloaded).

`base_model_config` resolves a model name to a transformers config: a built-in BLOOM/bloomz name works offline, a
local directory is read with ``AutoConfig.from_pretrained``, anything else is asked of the Hugging Face hub.
`parameter_counts` builds the base model and each adapter on the ``meta`` device, where tensors have shapes but no
storage, so even bloom-7b1 is counted in a second.

Shapes: L layers, H heads, C hidden, V vocab.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
from transformers import AutoConfig, AutoModelForCausalLM, BloomConfig, PretrainedConfig

from softprompt.model import SoftPromptConfig, SoftPromptModel
from softprompt.p_tuning import PromptEncoderConfig
from softprompt.prefix_tuning import PrefixTuningConfig
from softprompt.prompt_tuning import PromptTuningConfig

BLOOM_VOCAB_SIZE = 250880
"""V of every BLOOM model (rows of the embedding matrix; the tokenizer produces fewer ids)."""

# (C hidden, L layers, H heads) of each size, from the published configs.
BLOOM_SHAPES: dict[str, tuple[int, int, int]] = {
    "560m": (1024, 24, 16),
    "1b1": (1536, 24, 16),
    "1b7": (2048, 24, 16),
    "3b": (2560, 30, 32),
    "7b1": (4096, 30, 32),
}

BUILT_IN_MODELS: dict[str, tuple[int, int, int]] = {
    f"bigscience/{family}-{size}": shape
    for family in ("bloom", "bloomz")
    for size, shape in BLOOM_SHAPES.items()
}
"""Hub names whose config is known offline."""


def bloom_config(hidden_size: int, num_layers: int, num_heads: int, vocab_size: int = BLOOM_VOCAB_SIZE) -> BloomConfig:
    """A BLOOM config of the given shape with BLOOM's token ids (unk 0, bos 1, eos 2, pad 3) and tied embeddings."""
    return BloomConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        n_layer=num_layers,
        n_head=num_heads,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=True,
    )


def base_model_config(name_or_path: str) -> PretrainedConfig:
    """Resolves a model name to its config without loading weights.

    Args:
        name_or_path: a built-in name (``bigscience/bloomz-560m``, ...), a local model directory, or a hub id.

    Raises:
        ValueError: the name is neither built in, nor a local directory, nor reachable on the hub.
    """
    if name_or_path in BUILT_IN_MODELS:
        config = bloom_config(*BUILT_IN_MODELS[name_or_path])
        config._name_or_path = name_or_path
        return config
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        where = "local directory" if Path(name_or_path).exists() else "hub id"
        raise ValueError(
            f"model {name_or_path!r}: could not read its config as a {where} ({error.__class__.__name__}). "
            f"Built-in names that work offline: {sorted(BUILT_IN_MODELS)}. Fix: use one of those, a local "
            "directory holding config.json, or a hub id with network access."
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
})
"""The configurations of the seed guides (and PEFT's published counts for bloomz-560m); read-only, and
`SoftPromptModel` keeps its own copy of a config it is given."""


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


def parameter_counts(base_config: PretrainedConfig, configs: dict[str, SoftPromptConfig]) -> list[ParameterCount]:
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
