"""How setting values are read and checked: config files, ``Literal`` choices, lists, numbers.

Every check names the value, what was expected and the fix (the flag to pass), as every `ConfigError` does.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A configuration value (or config file) cannot be used; the message names it, what was expected and the fix."""


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a ``.yaml``/``.yml``/``.json`` file, as written.

    Raises:
        ConfigError: missing file, unsupported extension, parse error, or not a mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"Config file {str(path)!r} is a folder: expected a .yaml, .yml or .json file. Fix: pass the "
                          "file's path to --config.")
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist. Fix: check the path passed to --config.")
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(
            f"Config file {str(path)!r} has the extension {suffix!r}: expected .yaml, .yml or .json. "
            "Fix: rename it or convert it."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"Config file {str(path)!r} is not UTF-8 text ({error}). Fix: save it as UTF-8.") from None
    try:
        if suffix == ".json":
            values = json.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"Config file {str(path)!r} is nested too deeply to be a settings file. Fix: write its "
                          "settings as a flat or one-level mapping.") from None
    except Exception as error:  # yaml and json raise different types; both mean "cannot parse"
        raise ConfigError(f"Config file {str(path)!r} cannot be parsed: {error}. Fix: correct its syntax.") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(
            f"Config file {str(path)!r} holds a {type(values).__name__}: expected a mapping of field names to "
            "values, e.g. `learning_rate: 0.03`."
        )
    return values


def choices_of(section: type, name: str) -> tuple[Any, ...] | None:
    """The allowed values of a field, read from its ``Literal`` type (None when it has none)."""
    hint = typing.get_type_hints(section)[name]
    literals = [arg for arg in (typing.get_args(hint) or (hint,)) if typing.get_origin(arg) is Literal]
    if typing.get_origin(hint) is Literal:
        literals = [hint]
    return tuple(value for literal in literals for value in typing.get_args(literal)) or None


def check_literals(section: Any) -> None:
    """Checks every field of a dataclass instance whose type is a ``Literal`` against its allowed values."""
    for item in dataclasses.fields(section):
        choices = choices_of(type(section), item.name)
        value = getattr(section, item.name)
        if choices is not None and value is not None and value not in choices:
            raise ConfigError(
                f"{item.name}={value!r}: expected one of {', '.join(map(str, choices))}. Fix: pick one of those."
            )


def check_strings(section: Any) -> None:
    """Checks every field of a dataclass instance typed ``str`` or ``str | None``; a path object becomes its string.

    A config file can hold any YAML value where a name or path belongs (``output_dir: 123`` is an int), which
    would otherwise fail later as a TypeError far from the setting.

    Raises:
        ConfigError: naming the field, the value and the fix.
    """
    hints = typing.get_type_hints(type(section))
    for item in dataclasses.fields(section):
        hint = hints[item.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = typing.get_args(hint) if union else (hint,)
        if str not in options or any(option not in (str, type(None)) for option in options):
            continue
        value = getattr(section, item.name)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
            setattr(section, item.name, value)
        if value is None and type(None) in options:
            continue
        if not isinstance(value, str):
            flag = f"--{item.name.replace('_', '-')}"
            if value is None:
                fix = f"give it a value, or leave it out for the default ({item.default!r})"
            elif isinstance(value, (bool, int, float)):
                fix = f"quote it in the config file ({item.name}: '{value}'), or pass {flag} on the command line"
            else:
                fix = f"give one string (in the config file {item.name}: NAME, or {flag} NAME)"
            raise ConfigError(
                f"{item.name}={value!r} ({type(value).__name__}): expected a string"
                f"{' or nothing' if type(None) in options else ''}. Fix: {fix}."
            )


def as_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ConfigError(f"{name}={value!r}: expected a string or a list of strings.")


def check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(
            f"{name}={value!r}: expected an integer >= {minimum}. Fix: pass e.g. --{name.replace('_', '-')} "
            f"{max(minimum, 1)}."
        )


def check_float(name: str, value: Any, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (
        positive and value == 0
    ):
        kind = "a positive" if positive else "a non-negative"
        raise ConfigError(f"{name}={value!r}: expected {kind} finite number. Fix: pass e.g. --{name.replace('_', '-')} 0.03.")
