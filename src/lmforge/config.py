"""Typed configuration: TOML files + dotted CLI overrides, validated against dataclasses.

Each stage owns a dataclass (nested dataclasses for sub-sections). `build(cls, mapping, where)`
turns a plain dict into an instance, rejecting unknown keys (naming them and the allowed
ones), wrong types and values outside a Literal's choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from lmforge.errors import ConfigError

_MISSING = dataclasses.MISSING


def load_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def parse_value(text: str) -> Any:
    """Parse a CLI override value as a TOML value (numbers, bools, lists, quoted strings), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(mapping: dict, overrides: list[str] | dict[str, Any]) -> dict:
    """Apply `a.b.c=value` (or {"a.b.c": value}) overrides to a nested dict, in place; returns it."""
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    for key, value in items:
        parts = key.split(".")
        node = mapping
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {p!r} is a value, not a section")
            node = nxt
        node[parts[-1]] = parse_value(value) if isinstance(value, str) else value
    return mapping


def override_keys(overrides: list[str] | dict[str, Any]) -> list[str]:
    """The dotted keys that `overrides` (as `apply_overrides` takes them) set, in order."""
    if isinstance(overrides, dict):
        return list(overrides)
    return [_split_override(o)[0] for o in overrides]


def _split_override(text: str) -> tuple[str, str]:
    text = text.removeprefix("--")
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    k, v = text.split("=", 1)
    return k.strip(), v.strip()


def split_cli_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Split `--a.b 3`, `--a.b=3` style dotted overrides out of argv. Returns (rest, overrides)."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "." in a.split("=", 1)[0]:
            if "=" in a:
                overrides.append(a[2:])
            else:
                if i + 1 >= len(argv):
                    raise ConfigError(f"override {a} needs a value")
                overrides.append(f"{a[2:]}={argv[i + 1]}")
                i += 1
        else:
            rest.append(a)
        i += 1
    return rest, overrides


def build(cls: type, mapping: dict | None, where: str = "") -> Any:
    """Instantiate dataclass `cls` from `mapping`, validating keys, types and choices."""
    mapping = dict(mapping or {})
    if not isinstance(mapping, dict):
        raise ConfigError(f"[{where}] must be a table, got {type(mapping).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in mapping if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown config key {_join(where, k)!r}{hint}; allowed keys in [{where or 'root'}]: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in mapping:
            kwargs[name] = _coerce(hints[name], mapping[name], _join(where, name))
    try:
        obj = cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"[{where or 'root'}]: {e}") from None
    check = getattr(obj, "validate", None)
    if callable(check):
        try:
            check()
        except ConfigError:
            raise
        except (ValueError, AssertionError) as e:
            raise ConfigError(f"[{where or 'root'}]: {e}") from None
    return obj


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key!r} must be a table/section, got {value!r}")
        return build(tp, value, key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key!r} = {value!r} is not allowed; choose one of: {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key!r}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key!r} must be a list, got {value!r}")
        (inner, *_) = get_args(tp) or (Any,)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key!r} must be a table, got {value!r}")
        args = get_args(tp)
        inner = args[1] if len(args) == 2 else Any
        return {k: _coerce(inner, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key!r} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key!r} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key!r} must be a string, got {value!r}")
    return value


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict (TOML/JSON-serialisable, None values dropped)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if getattr(obj, f.name) is not None}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items() if v is not None}
    return obj
