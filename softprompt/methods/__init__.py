"""The soft-prompt methods: one file each, and this registry, which everything that must choose a method reads.

Adding a method is one file in this folder ending with a `MethodSpec`, and one entry in `METHODS` below: the model,
both adapter formats, the training config, the command line and the package's exports find it here.
"""

from __future__ import annotations

from typing import Any, Union

from softprompt.methods import (
    adaption_prompt,
    cartridge,
    cpt,
    multitask_prompt_tuning,
    p_tuning,
    prefix_tuning,
    prompt_tuning,
)
from softprompt.methods.spec import MaterializedPrompt, MethodSpec, materialize

METHODS: dict[str, MethodSpec] = {
    spec.name: spec for spec in (prompt_tuning.METHOD, p_tuning.METHOD, prefix_tuning.METHOD, adaption_prompt.METHOD,
                                 multitask_prompt_tuning.METHOD, cpt.METHOD, cartridge.METHOD)
}
"""Every method by its name (``prompt_tuning``, ``p_tuning``, ``prefix_tuning``, ``adaption_prompt``,
``multitask_prompt_tuning``, ``cpt``, ``cartridge``)."""

PUBLIC_CLASSES: dict[str, type] = {cls.__name__: cls for spec in METHODS.values() for cls in spec.exports}
"""Every method's public classes (its config and enums) by name: what ``softprompt`` exports for them."""

SoftPromptConfig = Union[tuple(spec.config_class for spec in METHODS.values())]  # type: ignore[valid-type]
"""Any method's configuration."""

# The configs and enums under their own names here too (``from softprompt.methods import PromptTuningConfig``).
globals().update(PUBLIC_CLASSES)


def method_of(config: Any) -> MethodSpec:
    """The method a configuration object belongs to.

    Raises:
        ValueError: `config` is not an instance of any method's configuration class.
    """
    for spec in METHODS.values():
        if type(config) is spec.config_class:
            return spec
    names = ", ".join(spec.config_class.__name__ for spec in METHODS.values())
    raise ValueError(
        f"config of type {type(config).__name__}: expected {names}. "
        "Fix: build one of those (from softprompt import PromptTuningConfig, ...)."
    )


def method_named(name: str) -> MethodSpec:
    """The method of a name, in either spelling (``prompt_tuning`` or the ``--method`` value ``prompt-tuning``).

    Raises:
        ValueError: no method has that name.
    """
    for spec in METHODS.values():
        if name in (spec.name, spec.cli_name):
            return spec
    raise ValueError(
        f"method {name!r}: expected one of {', '.join(spec.cli_name for spec in METHODS.values())}. "
        "Fix: pick one of those."
    )


__all__ = [
    "METHODS",
    "PUBLIC_CLASSES",
    "MaterializedPrompt",
    "MethodSpec",
    "SoftPromptConfig",
    "materialize",
    "method_named",
    "method_of",
    *PUBLIC_CLASSES,
]
