"""The model families softprompt supports: one small file each, and this registry of them.

Adding a family is one file that defines a `Family` (plus its entry below and a test-fixture entry); nothing else in
the package changes, because everything that differs between families is a field of `Family`.
"""

from __future__ import annotations

from transformers import PretrainedConfig

from softprompt.families import bloom, gemma, gpt2, gpt_neox, llama, mistral, opt, phi3, qwen2, qwen3
from softprompt.families.family import BaseModelShape, Family

FAMILIES: tuple[Family, ...] = (
    bloom.FAMILY,
    llama.FAMILY,
    mistral.FAMILY,
    qwen2.FAMILY,
    qwen3.FAMILY,
    gemma.GEMMA2,
    gemma.GEMMA3,
    phi3.FAMILY,
    gpt2.FAMILY,
    opt.FAMILY,
    gpt_neox.FAMILY,
)

_BY_MODEL_TYPE = {model_type: family for family in FAMILIES for model_type in family.model_types}


class UnsupportedModelError(ValueError):
    """A base model of a family softprompt does not know; the message lists the supported ones."""


def supported_model_types() -> list[str]:
    """Every transformers ``model_type`` softprompt supports, sorted."""
    return sorted(_BY_MODEL_TYPE)


def family_of(config: PretrainedConfig) -> Family:
    """The family of a transformers model config.

    Raises:
        UnsupportedModelError: the config's ``model_type`` is not one softprompt supports.
    """
    return family_named(getattr(config, "model_type", None))


def family_named(model_type: str | None) -> Family:
    """The family of a transformers ``model_type``.

    Raises:
        UnsupportedModelError: `model_type` is not one softprompt supports (the message lists them).
    """
    family = _BY_MODEL_TYPE.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported: softprompt knows {', '.join(supported_model_types())}. "
            "Fix: use a model of one of those families, or add the family (one file in softprompt/families/)."
        )
    return family


def known_config(name: str) -> PretrainedConfig | None:
    """A real model's config known offline (`Family.known_configs`), with its name recorded, or None."""
    for family in FAMILIES:
        if name in family.known_configs:
            config = family.known_configs[name]()
            config._name_or_path = name
            return config
    return None


def known_model_names() -> list[str]:
    """The hub names whose config is known offline, sorted."""
    return sorted(name for family in FAMILIES for name in family.known_configs)


__all__ = [
    "BaseModelShape",
    "FAMILIES",
    "Family",
    "UnsupportedModelError",
    "family_named",
    "family_of",
    "known_config",
    "known_model_names",
    "supported_model_types",
]
