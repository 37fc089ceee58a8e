"""Project specs: a validated :class:`FinetuneConfig` saved at ``<storage>/projects/<name>.json``.

The spec lives on the store, not in Prefect (a Variable or a Block): it sits beside the models it
produces, every run on any host that reaches the store reads the same one, it survives a lost
Prefect database, and the CLI creates and edits it without a server. The file name decides the
project's name and the store it is read from decides its ``storage``: a copied or moved store
keeps working. No Prefect import here.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, create_model, model_serializer

from fish_speech_core import storage
from fish_speech_core.storage import Store
from fishtune.flows.config import FinetuneConfig

PROJECTS = "projects"
# Not settable: the name is the spec's file name, the storage is the store that holds the spec.
FIXED = ("project", "storage")
_NAME = TypeAdapter(Annotated[str, FinetuneConfig.model_fields["project"]])


class _Unset(BaseModel):
    """Base of the overrides models: a dump holds only the fields that were given (an explicit
    ``None`` clears an optional field), so a stored or re-sent overrides never turns into a wall of
    nulls that would clear the spec's values."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    @model_serializer(mode="wrap")
    def _only_given(self, handler):
        if not isinstance(self, _Unset):  # an absent nested model's None, dropped by its parent
            return handler(self)
        return {name: value for name, value in handler(self).items() if name in self.model_fields_set}


def _drop_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # an absent field is "not overridden": the form shows it empty, not null


def _optional(model: type[BaseModel], name: str, skip: tuple[str, ...] = ()) -> type[BaseModel]:
    """``model``'s fields (same types, limits, descriptions), each optional and absent by default;
    nested models become optional models too, so one of their fields can be overridden alone."""
    fields: dict[str, Any] = {}
    for field, info in model.model_fields.items():
        if field in skip:
            continue
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = _optional(annotation, f"{annotation.__name__}Overrides")
        # The type stays as it is (max_steps: int, not int | None): None is valid only where the
        # spec's field takes it, and the form gets a plain number input rather than a type choice.
        fields[field] = (Annotated[annotation, *info.metadata] if info.metadata else annotation,
                         Field(None, title=info.title or field.replace("_", " ").title(), description=info.description,
                               json_schema_extra=_drop_default))
    return create_model(name, __base__=_Unset, __doc__=f"Fields of {model.__name__} to change; absent ones keep the spec's value.",
                        **fields)


# One run's changes to a project's spec: typed, so the Prefect UI renders a form field per setting
# and the server validates them (limits, enums, unknown fields) before the run is created.
Overrides = _optional(FinetuneConfig, "ProjectOverrides", skip=FIXED)


class ProjectError(ValueError):
    """An unknown project, a bad name, field or value, or an unreadable spec (one line for the user)."""


def problems(exc: ValidationError) -> str:
    """Every validation problem on one line, each naming its field (``normalize.loudness: ...``)."""
    parts = []
    for error in exc.errors():
        path = ".".join(str(p) for p in error["loc"])
        message = " ".join(error["msg"].removeprefix("Value error, ").split())
        if error["type"] == "extra_forbidden":
            message = "unknown field (fishtune project show NAME lists the fields)"
        parts.append(f"{path}: {message}" if path else message)
    return "; ".join(parts)


def check_name(name: str) -> str:
    """``name`` when it is a valid project name (it becomes a file name on the store)."""
    try:
        return _NAME.validate_python(name)
    except ValidationError as exc:
        raise ProjectError(f"project name {name!r}: {exc.errors()[0]['msg']} (lowercase letters, digits and dashes)") from None


def validate(values: Mapping[str, Any], where: str = "") -> FinetuneConfig:
    try:
        return FinetuneConfig.model_validate(dict(values))
    except ValidationError as exc:
        raise ProjectError(f"{where}{problems(exc)}") from None


def parse_settings(items: Iterable[str]) -> dict[str, str]:
    """``["max_steps=500", "normalize.loudness=-20"]`` -> ``{"max_steps": "500", "normalize.loudness": "-20"}``."""
    settings = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field.strip():
            raise ProjectError(f"--set {item!r}: expected FIELD=VALUE (e.g. max_steps=500)")
        settings[field.strip()] = value
    return settings


def _merge(into: dict, value: Mapping) -> dict:
    for key, item in value.items():
        into[key] = _merge(dict(into[key]), item) if isinstance(item, Mapping) and isinstance(into.get(key), dict) else item
    return into


def apply_settings(values: dict[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` (a spec as JSON) with ``settings`` applied, not yet validated.

    Keys are field paths (``max_steps``, ``normalize.loudness``); values are typed or strings
    (pydantic converts ``"500"``); an empty string clears an optional field (``base=``); a mapping
    for a nested model changes only the fields it names.
    """
    values = copy.deepcopy(dict(values))
    for path, value in settings.items():
        *parents, leaf = path.split(".")
        if (parents or [leaf])[0] in FIXED:
            raise ProjectError(f"{path}: fixed by the project (its name and the store that holds its spec)")
        target = values
        for depth, name in enumerate(parents):
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise ProjectError(f"{path}: {'.'.join(parents[:depth + 1])} has no fields to set")
        if isinstance(value, Mapping) and isinstance(target.get(leaf), dict):
            _merge(target[leaf], value)
        else:
            target[leaf] = None if value == "" else value
    return values


def with_settings(config: FinetuneConfig, settings: Mapping[str, Any]) -> FinetuneConfig:
    """``config`` with ``settings`` (see :func:`apply_settings`) applied and re-validated."""
    return validate(apply_settings(config.model_dump(mode="json"), settings))


def given(overrides: BaseModel, prefix: str = "") -> dict[str, Any]:
    """The fields given in ``overrides`` by field path (``{"normalize.loudness": -20.0}``); unset ones are absent."""
    found = {}
    for name in (n for n in type(overrides).model_fields if n in overrides.model_fields_set):  # in the spec's order
        value = getattr(overrides, name)
        if isinstance(value, BaseModel):
            found.update(given(value, f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = value
    return found


def overrides(settings: Mapping[str, Any]) -> BaseModel:
    """``settings`` (field paths as for :func:`apply_settings`) as validated :data:`Overrides`."""
    try:
        return Overrides.model_validate(apply_settings({}, settings))
    except ValidationError as exc:
        raise ProjectError(problems(exc)) from None


def resolved(config: FinetuneConfig, paths: Iterable[str]) -> dict[str, Any]:
    """The validated value of each field path in ``config`` (``{"max_steps": 5}`` for ``max_steps="5"``)."""
    values = config.model_dump(mode="json")
    found = {}
    for path in paths:
        value = values
        for name in path.split("."):
            value = value[name]
        found[path] = value
    return found


def spec_url(storage_root: str, name: str) -> str:
    return Store(storage_root).url(PROJECTS, f"{check_name(name)}.json")


def list_projects(storage_root: str) -> list[str]:
    """The names of the projects saved on the store."""
    listed = storage.list_files(Store(storage_root).url(PROJECTS))
    return sorted(rel.removesuffix(".json") for rel in listed if "/" not in rel and rel.endswith(".json"))


def load(storage_root: str, name: str) -> FinetuneConfig:
    """The saved spec of project ``name``, validated (ProjectError: unknown, unreadable or invalid)."""
    store, url = Store(storage_root), spec_url(storage_root, name)
    try:
        raw = store.read_bytes(f"{PROJECTS}/{name}.json")
    except FileNotFoundError:
        known = ", ".join(list_projects(storage_root)) or "none"
        raise ProjectError(f"no project {name!r} in {storage.redact(store.url(PROJECTS))} (projects there: {known})") from None
    try:
        values = json.loads(raw)
    except ValueError as exc:
        raise ProjectError(f"{storage.redact(url)}: not a project spec ({exc})") from None
    if not isinstance(values, dict):
        raise ProjectError(f"{storage.redact(url)}: not a project spec (a JSON object expected)")
    return validate({**values, "project": name, "storage": store.root}, where=f"{storage.redact(url)}: ")


def save(config: FinetuneConfig) -> str:
    """Write ``config`` as the spec of project ``config.project`` on ``config.storage`` (atomically); its URL."""
    store = Store(config.storage)
    body = json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True).encode() + b"\n"
    return store.write_bytes(f"{PROJECTS}/{check_name(config.project)}.json", body)


def create(storage_root: str, name: str, settings: Mapping[str, Any]) -> FinetuneConfig:
    """Validate and save a new project spec (ProjectError if it exists or a value is bad)."""
    check_name(name)
    if name in list_projects(storage_root):
        raise ProjectError(f"project {name!r} exists in {storage.redact(Store(storage_root).url(PROJECTS))}: "
                           "change it with fishtune project edit")
    config = validate(apply_settings({"project": name, "storage": Store(storage_root).root}, settings))
    save(config)
    return config


def edit(storage_root: str, name: str, settings: Mapping[str, Any]) -> FinetuneConfig:
    """Apply ``settings`` to the saved spec, re-validate and save it."""
    config = with_settings(load(storage_root, name), settings)
    save(config)
    return config
