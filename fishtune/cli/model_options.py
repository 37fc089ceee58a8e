"""Typer options generated from a pydantic model, so a command never retypes a config's fields.

Each field becomes ``--field-name`` with the field's description as help and its default;
an enum lists its values as choices, a bool is ``--x/--no-x``, ``X | None`` is optional, and a
nested model's fields are flattened under their own names (``normalize.loudness`` ->
``--loudness``), grouped in ``--help`` under the nested field's description. Values are
checked by the model, not by click, so every bad value is reported at once, by flag::

    OPTIONS = model_options(FinetuneConfig)

    @command_from_model(FinetuneConfig, OPTIONS)
    def finetune_command(config: FinetuneConfig) -> None: ...

A field added to the model is an option at once; a type this module cannot map is a
``TypeError`` on import (``fishtune --help`` and every CLI test fail), never a silent gap.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich.markup import escape

M = TypeVar("M", bound=BaseModel)
SCALARS = (str, int, float)


@dataclass(frozen=True)
class ModelOption:
    """One generated option: the field it fills and how typer declares it."""

    path: tuple[str, ...]  # ("normalize", "loudness")
    param: str  # the command's parameter name: the field's own name
    decl: str  # "--loudness", or "--evaluate/--no-evaluate" for a bool
    annotation: Any  # what typer parses: str, int, float, bool, an Enum, or one of them | None
    default: Any  # ... when the field is required
    help: str | None
    panel: str | None = None  # --help group of a nested model's fields

    @property
    def flag(self) -> str:
        """The name error messages use: ``--evaluate`` for ``--evaluate/--no-evaluate``."""
        return self.decl.split("/", 1)[0]


def model_options(model: type[BaseModel], names: Mapping[str, str] | None = None) -> list[ModelOption]:
    """One option per field of ``model``, in field order, nested models flattened.

    Args:
        names: field path (``"warm_start"``, ``"normalize.format"``) -> option declaration,
            where a command keeps a name other than ``--field-name``
            (``"--warm-start/--from-base"``).

    Raises:
        TypeError: a field whose type has no option form, or two fields with one name.
    """
    names = dict(names or {})
    options = list(_options(model, (), names, None))
    for kind, key in (("parameter", lambda o: o.param), ("flag", lambda o: o.flag)):
        seen: dict[str, ModelOption] = {}
        for option in options:
            other = seen.setdefault(key(option), option)
            if other is not option:
                raise TypeError(f"{model.__name__}: fields {'.'.join(other.path)} and {'.'.join(option.path)} "
                                f"share the {kind} {key(option)}; give one a name in `names`")
    unknown = set(names) - {".".join(o.path) for o in options}
    if unknown:
        raise TypeError(f"{model.__name__}: `names` for fields it does not have: {sorted(unknown)}")
    return options


def _options(model, prefix, names, panel):
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        inner, optional = _unwrap_optional(field.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel) and not optional:
            yield from _options(inner, path, names, (field.description or name).rstrip("."))
            continue
        key = ".".join(path)
        if inner is bool and not optional:
            decl = names.get(key, f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}")
        elif inner in SCALARS or isinstance(inner, type) and issubclass(inner, Enum):
            decl = names.get(key, f"--{name.replace('_', '-')}")
        else:
            raise TypeError(f"{model.__name__}.{name}: type {field.annotation!r} has no CLI option form "
                            f"(str, int, float, bool, an Enum, one of them | None, or a nested model)")
        default = ... if field.is_required() else field.get_default(call_default_factory=True)
        yield ModelOption(path, name, decl, inner | None if optional else inner, default, field.description, panel)


def _unwrap_optional(annotation) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def option_flags(options: list[ModelOption]) -> dict[str, str]:
    """Field path (``"normalize.loudness"``) -> the flag that sets it (``"--loudness"``)."""
    return {".".join(o.path): o.flag for o in options}


def validated(model: type[M], data: Mapping[str, Any], flags: Mapping[str, str]) -> M:
    """``model(**data)``; every invalid value in one :class:`typer.BadParameter`, by flag."""
    try:
        return model(**data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            path = ".".join(str(p) for p in error["loc"])
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{flags.get(path, path)}: {message}" if path else message)
        raise typer.BadParameter("; ".join(problems)) from None


def command_from_model(model: type[M], options: list[ModelOption]) -> Callable[[Callable[[M], Any]], Callable[..., Any]]:
    """Turn ``fn(config: model)`` into a typer command taking one option per field."""
    flags = option_flags(options)

    def decorate(fn: Callable[[M], Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def command(**values: Any) -> Any:
            data: dict[str, Any] = {}
            for option in options:  # nest the flat values back along the field paths
                node = data
                for part in option.path[:-1]:
                    node = node.setdefault(part, {})
                node[option.path[-1]] = values[option.param]
            return fn(validated(model, data, flags))

        # typer reads the options from the signature (and the annotations), not from the body
        command.__signature__ = inspect.Signature([
            inspect.Parameter(
                o.param, inspect.Parameter.KEYWORD_ONLY, annotation=o.annotation,
                # descriptions are plain text (the Prefect form shows them too): "fishtune[asr]" is no markup
                default=typer.Option(o.default, o.decl, help=o.help and escape(o.help), rich_help_panel=o.panel),
            )
            for o in options
        ])
        command.__annotations__ = {o.param: o.annotation for o in options}
        return command

    return decorate


__all__ = ["ModelOption", "command_from_model", "model_options", "option_flags", "validated"]
