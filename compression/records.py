"""Typed records from untrusted mappings: TOML configs and their environment overrides.

Both daemons load frozen dataclasses from TOML, and both must name the exact key and
value that is wrong. This module does that once, from the dataclass annotations:
``from_mapping(AgentConfig, toml_dict, "agent.toml")``. It is pure (no file I/O).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class RecordError(ValueError):
    """A configuration value is missing, unknown or of the wrong type; the message names the key."""


def from_mapping(cls: type[T], data: Mapping[str, Any], where: str) -> T:
    """Build dataclass ``cls`` from ``data``, checking every key and type against the annotations.

    Missing keys take the dataclass default; unknown keys are errors (a typo must not be
    silently ignored). ``where`` prefixes every error message, e.g. ``"agent.toml: broker.port"``.
    """
    if not isinstance(data, Mapping):
        raise RecordError(f"{where}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise RecordError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise RecordError(f"{where}: {exc}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return from_mapping(tp, value, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except RecordError as exc:
                errors.append(str(exc))
        raise RecordError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is Literal:
        if value not in args:
            raise RecordError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise RecordError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise RecordError(f"{key}: expected a table, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        if not isinstance(value, bool):
            raise RecordError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if not isinstance(value, int) or isinstance(value, bool):
            raise RecordError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise RecordError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecordError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise RecordError(f"{key}: unsupported config type {tp}")


def env_overrides(data: dict[str, Any], prefix: str, environ: Mapping[str, str]) -> dict[str, Any]:
    """Overlay ``PREFIX__SECTION__KEY=value`` environment variables onto ``data`` (a copy).

    ``FEDGE_AGENT__BROKER__PORT=1884`` sets ``data["broker"]["port"] = "1884"``; the string is
    converted by :func:`from_mapping` according to the field's type.
    """
    out: dict[str, Any] = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    marker = prefix + "__"
    for name, value in environ.items():
        if not name.startswith(marker):
            continue
        path = [p.lower() for p in name[len(marker) :].split("__") if p]
        if not path:
            continue
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return out
