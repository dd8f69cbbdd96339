"""Command-line flags made from config dataclasses: a flag is its field's name with dashes, its help the first
sentence of the field's docstring, its choices the field's ``Literal`` or enum type; a list of ints takes several
values (``--cpt-token-ids 5 6 7``), another list repeats (``--dataset a --dataset b``), a dict is a JSON object.
Every flag defaults to "not given", so that only the flags typed override a config file."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import json
import textwrap
import typing
from collections.abc import Callable
from typing import Any

from softprompt.methods import METHODS


def field_docs(cls: type) -> dict[str, str]:
    """The first sentence of each field's docstring (the string right after the field in the class body)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)):
            text = " ".join(str(following.value.value).split()).replace("``", "")
            docs[statement.target.id] = text.split(". ")[0].rstrip(".").replace("%", "%%")
    return docs


def argparse_options(hint: Any) -> dict[str, Any] | None:
    """``add_argument`` keywords for a field's type: choices from a ``Literal`` or an enum, ``append`` for lists,
    ``--x/--no-x`` for bools; None for a type that has no flag (a section, a config object)."""
    options = [arg for arg in (typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None))
                               else (hint,)) if arg is not type(None)]
    for option in options:
        if typing.get_origin(option) is typing.Literal:
            return {"choices": list(typing.get_args(option))}
        if isinstance(option, type) and issubclass(option, enum.Enum):
            return {"choices": [member.value for member in option], "type": str.upper}
    first = options[0]
    if first is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(first) is list:
        if typing.get_args(first) == (int,):  # a sequence of ids: --cpt-token-ids 5 6 7
            return {"nargs": "+", "type": int}
        return {"action": "append"}
    if first is dict or typing.get_origin(first) is dict:
        return {"type": json_object}
    if first in (int, float, str):
        return {"type": first}
    return None


def json_object(text: str) -> dict[str, Any]:
    """A flag's JSON object (``--tokenizer-kwargs '{"use_fast": true}'``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object, e.g. '{{\"use_fast\": true}}'")
    return value


def add_field_flags(
    group: argparse._ArgumentGroup, cls: type, seen: set[str], owner: Callable[[str], str] = lambda name: ""
) -> None:
    """One flag per field of `cls` not in `seen`, its help prefixed by ``owner(field name)``. Flags default to
    "not given" (SUPPRESS), so that only the flags actually typed override the config file."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for item in dataclasses.fields(cls):
        options = argparse_options(hints[item.name])
        if item.name in seen or options is None:
            continue
        seen.add(item.name)
        default = item.default if item.default_factory is dataclasses.MISSING else item.default_factory()
        if default is dataclasses.MISSING:
            default = None
        shown = "" if default in (None, [], "") else f" (default: {getattr(default, 'value', default)})"
        group.add_argument(f"--{item.name.replace('_', '-')}", dest=item.name, default=argparse.SUPPRESS,
                           help=f"{owner(item.name)}{docs.get(item.name, item.name)}{shown}", **options)


def add_method_flags(group: argparse._ArgumentGroup, seen: set[str]) -> None:
    """One flag per field of every method's config; a field two methods share gets one flag, labelled with the
    methods it applies to (none when it applies to all)."""

    def owners(name: str) -> str:
        names = [spec.cli_name for spec in METHODS.values()
                 if name in {item.name for item in dataclasses.fields(spec.config_class)}]
        return "" if len(names) == len(METHODS) else f"{' / '.join(names)}: "

    for spec in METHODS.values():
        add_field_flags(group, spec.config_class, seen, owner=owners)
    # A field two methods type with their own enums (prompt_tuning_init) takes the values of both; each config
    # checks its own.
    for action in group._actions:
        choices: list[str] = []
        for spec in METHODS.values():
            if action.dest in {item.name for item in dataclasses.fields(spec.config_class)}:
                hint = typing.get_type_hints(spec.config_class)[action.dest]
                choices += (argparse_options(hint) or {}).get("choices", [])
        if action.choices is not None and choices:
            action.choices = list(dict.fromkeys(choices))
