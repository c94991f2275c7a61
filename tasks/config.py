"""Typed run configs: dataclass defaults, then a YAML file, then `key.sub=value` overrides.

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from tasks.errors import UserError, read_user_text


class ConfigError(UserError, ValueError):
    """A config that cannot run: an unknown key or name, a value of the wrong type."""


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass `cls` from a (nested) dict; nested dataclass fields take dicts. What
    the data gets wrong (an unknown key, a wrong type, a value `cls` refuses) is a
    ConfigError."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                          f"known under {where or 'the top level'}: {sorted(names)}")
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {where}{name} must be a mapping, got {value!r}")
            value = {**_default_dict(fields[name]), **value}
            kwargs[name] = from_dict(hint, value, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(where + name, hint, value)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:   # a __post_init__ check: a value out of range, an unknown mode
        raise ConfigError(str(err)) from None


def _default_dict(field: dataclasses.Field) -> dict:
    """A nested config field's own default as a dict: the keys a mapping leaves out keep
    the default of the field (`StreamConfig.values` stops on the margin), not the class."""
    if field.default_factory is not dataclasses.MISSING:
        default = field.default_factory()
    else:
        default = field.default
    return dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}


def _coerce(key: str, hint, value):
    """Numbers for number fields (YAML reads `5e-4`, no dot, as a string and `1` as an
    int), element by element in lists; a list or mapping field refuses anything else."""
    if value is None or isinstance(value, bool):
        return value
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        allowed = [t for t in typing.get_args(hint) if t is not type(None)]
    else:
        allowed = [hint]
    container = typing.get_origin(allowed[0]) or allowed[0]
    if len(allowed) == 1 and container in (list, dict):
        if not isinstance(value, container):
            raise ConfigError(f"config key {key} must be a "
                              f"{'list' if container is list else 'mapping'}, got {value!r}")
        item = typing.get_args(allowed[0])
        if container is list and item:
            return [_coerce(f"{key}[{i}]", item[0], v) for i, v in enumerate(value)]
        return value
    for number in (int, float):
        if allowed == [number] and not isinstance(value, number):
            try:
                as_number = number(value)
            except (TypeError, ValueError):
                raise ConfigError(f"config key {key} must be {number.__name__}, "
                                  f"got {value!r}") from None
            if number is int and isinstance(value, float) and as_number != value:
                raise ConfigError(f"config key {key} must be int, got {value!r}")
            return as_number
    return value


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def parse_yaml(text: str, where: str):
    """`text` parsed as YAML; a syntax error is a ConfigError naming `where` and the line."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where} is not valid YAML: {problem}{at}") from None


def load_yaml(path: str | Path) -> dict:
    text = read_user_text(path, "config file", "give --config an existing YAML file "
                                               "(examples in pipelines/configs/)")
    data = parse_yaml(text, f"config file {path}") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping at the top level")
    return data


def set_override(data: dict, assignment: str) -> None:
    """Apply `a.b=value` (value parsed as YAML) to a nested dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.sub=value")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part} is not a section")
    node[parts[-1]] = parse_yaml(raw, f"the value of override {assignment!r}")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, for MLflow params (an empty mapping adds nothing)."""
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v
    return flat
