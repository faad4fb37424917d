"""Typed configuration machinery: dataclasses are the schema; YAML and ``key=value`` override
them, checked key by key (the training config and the study's file both load through it).

Loading order: dataclass defaults <- YAML file <- command-line ``key=value`` overrides with dotted
keys (``op.name=lapsum op.params.alpha=5 run.output_dir=/tmp/x``). Unknown keys are rejected with
the closest valid one and the list of valid ones; values are converted to the field's type
(``"1e-2"`` -> 0.01, ``"[1,2]"`` -> [1, 2], ``"true"`` -> True).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "apply_overrides",
    "build",
    "dump_yaml",
    "load_schema",
    "parse_overrides",
    "to_dict",
    "valid_keys",
    "yaml_load",
]


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and the value."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that keeps dates as text: ``2024-13-01`` must reach the day check as a string
    (PyYAML's timestamp resolver would raise a bare ValueError), and days are strings anyway."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (a SafeLoader subclass)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, e.g. ``run.seed``; dict fields end in ``.<name>``."""
    keys: list[str] = []
    for name, tp in _hints(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            keys += valid_keys(tp, key + ".")
        elif typing.get_origin(tp) is dict:
            keys.append(key + ".<name>")
        else:
            keys.append(key)
    return keys


def _unknown(key: str, cls: type, prefix: str) -> ConfigError:
    names = list(_hints(cls))
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, names, n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    return ConfigError(
        f"unknown config key {key!r}{hint}; valid keys: {', '.join(valid_keys(cls, prefix))}"
    )


def _convert(key: str, value: Any, tp: Any) -> Any:
    """``value`` (from YAML or a command line) as type ``tp``; ConfigError naming key and value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        # str last: "0.5" must become a float before it could stay a string.
        for arm in sorted(typing.get_args(tp), key=lambda a: a is str):
            try:
                return _convert(key, value, arm)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: cannot use {value!r} ({' / '.join(errors)})")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            if value.strip().startswith("["):
                try:
                    value = yaml_load(value)
                except yaml.YAMLError as e:
                    raise ConfigError(f"{key}: {value!r} is not a YAML list: {e}") from e
            else:
                value = [value]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_convert(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _convert(f"{key}.{k}", v, val_tp) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-2" as a string: accept it as a number here
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, _dt.date):  # YAML turns 2024-01-13 into a date
            return value.isoformat()
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a schema bug, not a user error


def _build(cls: type, data: dict[str, Any] | None, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown(key, cls, prefix)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _convert(key, value, tp)
    return cls(**kwargs)


def build(cls: type, data: dict[str, Any] | None) -> Any:
    """An instance of schema dataclass ``cls`` from a nested mapping (YAML); unknown keys raise
    ConfigError naming the closest valid key."""
    return _build(cls, data, "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON-safe) of a config."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """``["a.b=1", ...]`` -> ``[("a.b", "1"), ...]``; a malformed item raises ConfigError."""
    out = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {arg!r} is not of the form key=value (e.g. run.seed=1)")
        out.append((key.strip(), value))
    return out


def _parse_value(text: str) -> Any:
    """Command-line value -> Python via YAML (so lists/bools/numbers work); raw text on failure."""
    try:
        return yaml_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: Any, overrides: list[tuple[str, str]]) -> Any:
    """Set dotted keys on a copy of schema dataclass ``cfg``; unknown keys raise ConfigError with
    the valid ones."""
    root = type(cfg)
    data = to_dict(cfg)
    for key, text in overrides:
        parts = key.split(".")
        cls: type = root
        node = data
        prefix = ""
        for i, part in enumerate(parts):
            hints = _hints(cls)
            if part not in hints:
                raise _unknown(prefix + part, cls, prefix)
            tp = hints[part]
            last = i == len(parts) - 1
            if dataclasses.is_dataclass(tp):
                if last:
                    raise ConfigError(
                        f"{key!r} is a section; set one of its keys: "
                        f"{', '.join(valid_keys(tp, key + '.'))}"
                    )
                node, cls, prefix = node[part], tp, prefix + part + "."
                continue
            if typing.get_origin(tp) is dict and not last:
                if i != len(parts) - 2:
                    raise ConfigError(f"{key!r}: {prefix + part} holds one level of names")
                node[part] = dict(node[part] or {})
                node[part][parts[-1]] = _parse_value(text)
                break
            if not last:
                raise ConfigError(f"{key!r}: {prefix + part} is a value, not a section")
            node[part] = _parse_value(text)
    return build(root, data)


def load_schema(cls: type, path: str | Path | None, overrides: list[str] | None = None) -> Any:
    """Defaults of schema dataclass ``cls`` <- YAML file ``path`` <- ``key=value`` overrides,
    typed and checked key by key; values are not validated beyond their types."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = yaml_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from e
    try:
        cfg = build(cls, data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    return apply_overrides(cfg, parse_overrides(overrides or []))

