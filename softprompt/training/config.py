"""`TrainConfig`: every setting of a training run, typed, documented and validated where it is declared.

A run's settings are nested by what they are about: the base ``model``, the ``method`` and its own configuration
(``adapter``: one method's config, e.g. `PromptTuningConfig`, `PromptEncoderConfig`, `PrefixTuningConfig`,
`AdaptionPromptConfig` or `CartridgeConfig`, PEFT's field names), then ``data``, ``optimization``, ``execution``
(where and how a step runs), ``output`` and ``distillation`` (the context-distillation recipe's own settings).
Precedence: the defaults below, then a config file, then the command-line flags.

A config file (YAML or JSON) holds the same nesting::

    method: p-tuning
    adapter: {num_virtual_tokens: 20, encoder_hidden_size: 128}
    optimization: {learning_rate: 0.03, num_epochs: 20}

or the flat keys of the flags (``learning_rate: 0.03``, ``num_virtual_tokens: 20``), as earlier config files and
``train_config.json`` files held them; every field name is unique across sections, dashes or underscores. Allowed
values come from each field's ``Literal`` type, the methods from the method registry.

The defaults reproduce the seed guides (PEFT's prompt-based-methods guide on twitter_complaints: learning rate
3e-2, batch 8, max_length 64, 8 virtual tokens for prompt tuning and 20 for p-tuning and prefix tuning) on the data
and model that ship with the package, so ``softprompt train`` with no flags runs offline.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.methods import METHODS, SoftPromptConfig, method_named
from softprompt.training.config_values import (
    ConfigError,
    check_int,
    check_strings,
    read_config_file,
)
from softprompt.training.gguf_base import is_gguf_file
from softprompt.training.sections import (
    SECTIONS,
    SEED_PROMPT_TUNING_INIT_TEXT,
    DataConfig,
    DistillationConfig,
    ExecutionConfig,
    OptimizationConfig,
    OutputConfig,
)

METHOD_NAMES: tuple[str, ...] = tuple(spec.cli_name for spec in METHODS.values())
"""The ``--method`` choices, from the method registry."""

@dataclass
class TrainConfig:
    """One training run; build it from a dict or file with `from_dict` / `from_file` (flat or nested keys)."""

    model: str | None = None
    """Base model: a hub id, a local directory or a local .gguf file (dequantized), loaded with transformers'
    ``from_pretrained``. None: the embedded tiny BLOOM (random weights, built locally, saved into
    ``output_dir/base-model`` so that ``softprompt eval/generate`` can reload it)."""

    model_sha256: str | None = None
    """SHA-256 the .gguf base file must have (hex). None: the run records the file's own, and ``softprompt
    eval/generate`` refuse the file if it has changed since."""

    method: str = "prompt-tuning"
    """The soft-prompt method, by its ``--method`` name (``prompt-tuning``, ``p-tuning``, ``prefix-tuning``,
    ``adaption-prompt``)."""

    adapter: SoftPromptConfig | dict[str, Any] | None = None
    """The method's own configuration. None, or a dict of some of its fields: the seed guides' configuration for
    the method (8 virtual tokens for prompt tuning, 20 otherwise; on the shipped default data, prompt tuning starts
    from the seed guide's TEXT init) with those fields set; resolved to the config object on construction."""

    data: DataConfig = field(default_factory=DataConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)

    def __post_init__(self) -> None:
        if self.method not in METHOD_NAMES:
            raise ConfigError(f"method={self.method!r}: expected one of {', '.join(METHOD_NAMES)}. Fix: pick one of those.")
        check_strings(self)
        if self.model_sha256 is not None and not (is_gguf_file(self.model or "")
                                                  and re.fullmatch(r"[0-9a-f]{64}", self.model_sha256)):
            raise ConfigError(f"model_sha256={self.model_sha256!r} with model={self.model!r}: expected the 64 "
                              "lowercase hex digits of a .gguf base's SHA-256. Fix: drop --model-sha256, or give "
                              "sha256sum's.")
        for name, section in SECTIONS.items():
            if isinstance(getattr(self, name), dict):
                setattr(self, name, section(**getattr(self, name)))
        self.adapter = self._resolved_adapter()
        self._check_recipe()

    def _check_recipe(self) -> None:
        """The context-distillation recipe's settings fit together (and no distillation setting goes unused)."""
        given = [f.name for f in dataclasses.fields(self.distillation)
                 if getattr(self.distillation, f.name) != f.default]
        if self.data.recipe != "context-distillation":
            if given:
                raise ConfigError(f"{given[0]}={getattr(self.distillation, given[0])!r} with recipe={self.data.recipe!r}: "
                                  "the setting belongs to the context-distillation recipe. Fix: pass --recipe "
                                  f"context-distillation, or drop --{given[0].replace('_', '-')}.")
            return
        if method_named(self.method).enters_as != "key_values" or getattr(self.adapter, "prefix_projection", False):
            raise ConfigError(f"recipe='context-distillation' with method={self.method!r}: expected a key/value cache "
                              "that the corpus's own cache can start (cartridge, or prefix-tuning without projection). "
                              "Fix: --method cartridge.")
        if self.distillation.corpus is None or self.data.dataset:
            raise ConfigError(f"recipe='context-distillation' with corpus={self.distillation.corpus!r} and dataset="
                              f"{self.data.dataset!r}: expected a corpus file and no dataset (the conversations are "
                              "made from the corpus). Fix: --corpus FILE, without --dataset.")
        if self.distillation.init_from_corpus and getattr(self.adapter, "init_text", None) is not None:
            raise ConfigError("init_text with init_from_corpus=True: two inits for one cartridge. Fix: drop "
                              "--init-text, or pass --no-init-from-corpus to start from the text.")

    def _resolved_adapter(self) -> SoftPromptConfig:
        spec = method_named(self.method)
        if isinstance(self.adapter, spec.config_class):
            return self.adapter
        if self.adapter is not None and not isinstance(self.adapter, dict):
            raise ConfigError(
                f"adapter={type(self.adapter).__name__}(...) with method={self.method!r}: expected a "
                f"{spec.config_class.__name__}. Fix: pass --method for that config, or its own config class."
            )
        given = dict(self.adapter or {})
        known = {f.name for f in dataclasses.fields(spec.config_class)}
        for key in sorted(set(given) - known):
            if _says_nothing(key, given[key]):  # e.g. an old flat file's `prefix_projection: false` for p-tuning
                del given[key]
                continue
            owners = [s.cli_name.replace("-", " ") for s in METHODS.values() if key in _field_names(s.config_class)]
            where = f"applies to {' / '.join(owners)} only" if owners else "is no method's setting"
            raise ConfigError(
                f"{key}={given[key]!r} with method={self.method!r}: the setting {where}. Fix: drop "
                f"--{key.replace('_', '-')} or use --method {' / '.join(o.replace(' ', '-') for o in owners) or '...'}."
            )
        fields: dict[str, Any] = dict(spec.train_defaults)
        if spec.default_num_virtual_tokens is not None:  # None: derived (CPT) or none (adaption prompt)
            fields["num_virtual_tokens"] = spec.default_num_virtual_tokens
        for key in ("num_virtual_tokens", *spec.train_defaults):  # None: not given, the default stands
            if given.get(key) is None:
                given.pop(key, None)
        if "prompt_tuning_init" in known and given.get("prompt_tuning_init") is None:
            given.pop("prompt_tuning_init", None)
            # PEFT's default is RANDOM; the seed guide starts from its text on its data, and a given text means TEXT.
            seed_guide = self.data.uses_default_data and self.data.resolved_label_column is not None
            if seed_guide or given.get("prompt_tuning_init_text"):
                fields["prompt_tuning_init"] = "TEXT"
                if given.get("prompt_tuning_init_text") is None:
                    fields["prompt_tuning_init_text"] = SEED_PROMPT_TUNING_INIT_TEXT
        fields.update(given)
        if "num_virtual_tokens" in given:
            check_int("num_virtual_tokens", given["num_virtual_tokens"], minimum=1)
        try:
            return spec.config_class(**fields)
        except ValueError as error:  # the method config's own message
            raise ConfigError(str(error)) from None

    # ------------------------------------------------------------------ derived values

    @property
    def uses_embedded_model(self) -> bool:
        """True when the base is the embedded tiny BLOOM (no ``model`` given)."""
        return self.model is None

    @property
    def resolved_output_dir(self) -> Path:
        """``output.output_dir``, or ``softprompt-runs/<method>`` when None."""
        return Path(self.output.output_dir) if self.output.output_dir is not None else Path("softprompt-runs") / self.method

    # ------------------------------------------------------------------ dicts and files

    def to_dict(self) -> dict[str, Any]:
        """The settings as nested JSON values (what ``train_config.json`` holds)."""
        values = dataclasses.asdict(self)
        values["adapter"] = {key: getattr(value, "value", value) for key, value in dataclasses.asdict(self.adapter).items()}
        return values

    def flat(self) -> dict[str, Any]:
        """Every leaf setting by its (unique) field name: ``{"learning_rate": 0.03, "num_virtual_tokens": 8, ...}``."""
        nested = self.to_dict()
        flat = {key: value for key, value in nested.items() if key not in SECTIONS and key != "adapter"}
        for name in (*SECTIONS, "adapter"):
            flat.update(nested[name])
        return flat

    @classmethod
    def field_names(cls) -> list[str]:
        """Every flat key a config file or the flags may set: top-level, section and method fields."""
        names = [f.name for f in dataclasses.fields(cls) if f.name not in SECTIONS and f.name != "adapter"]
        for section in SECTIONS.values():
            names += _field_names(section)
        for spec in METHODS.values():
            names += [name for name in _field_names(spec.config_class) if name not in names]
        return names

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Builds a config from nested sections, flat keys, or both; keys may use dashes or underscores.

        Raises:
            ConfigError: an unknown key (the message lists the valid ones), or an invalid value.
        """
        nested: dict[str, Any] = {name: {} for name in SECTIONS}
        nested["adapter"] = {}
        for key, value in normalize_keys(values, source).items():
            if key in SECTIONS or key == "adapter":
                if isinstance(value, dict):
                    nested[key].update(normalize_keys(value, f"{source}: {key}"))
                elif value is not None:
                    raise ConfigError(f"{source}: {key}={value!r}: expected a mapping of {key} settings.")
            else:
                section = _section_of(key)
                (nested[section] if section else nested)[key] = value
        try:
            return cls(**nested)
        except TypeError as error:  # a value of the wrong kind reaching a section's constructor
            raise ConfigError(f"{source}: {error}") from None

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """Reads a YAML or JSON config file; ``overrides`` (e.g. command-line flags, flat keys) win over its values.

        Raises:
            ConfigError: the file is missing or unreadable, not a mapping, or has unknown keys or invalid values.
        """
        values = normalize_keys(read_config_file(path), str(path))
        return cls.from_dict(merge_settings(values, overrides or {}), str(path))


def merge_settings(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` settings with `overrides` on top, both flat or nested (normalized to flat keys first)."""
    merged = flatten_settings(base)
    merged.update(flatten_settings(overrides))
    return merged


def flatten_settings(values: dict[str, Any]) -> dict[str, Any]:
    """Nested sections and an ``adapter`` mapping lifted to flat keys (field names are unique)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if (name in SECTIONS or name == "adapter") and isinstance(value, dict):
            flat.update({str(k).replace("-", "_"): v for k, v in value.items()})
        else:
            flat[name] = value
    return flat


def normalize_keys(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Maps ``learning-rate`` / ``learning_rate`` keys to field names; unknown keys raise a ConfigError."""
    known = set(TrainConfig.field_names()) | set(SECTIONS) | {"adapter"}
    normalized = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"{source}: unknown setting {key!r}. Expected one of: {', '.join(sorted(known))}.")
        normalized[name] = value
    return normalized


def _section_of(name: str) -> str | None:
    for section_name, section in SECTIONS.items():
        if name in _field_names(section):
            return section_name
    if any(name in _field_names(spec.config_class) for spec in METHODS.values()):
        return "adapter"
    return None


def _says_nothing(name: str, value: Any) -> bool:
    """Whether a method setting is None or its method's default: old flat config files hold every method's fields."""
    if value is None:
        return True
    for spec in METHODS.values():
        for item in dataclasses.fields(spec.config_class):
            if item.name == name and item.default is not dataclasses.MISSING:
                return getattr(item.default, "value", item.default) == getattr(value, "value", value)
    return False


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


