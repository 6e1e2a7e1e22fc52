"""Typed loading: YAML and ``--set key=value`` overrides into a validated ``RunConfig``.

Every key is checked against the dataclass field it names (type and range); unknown keys and
bad values raise ``ConfigError`` naming the full dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from sigma_moe.config.base import ConfigError, check
from sigma_moe.config.recipe import RunConfig


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML value to the field type `tp`, or raise naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        check(value in args, key, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin is list:
        check(isinstance(value, list), key, f"expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if tp is bool:
        check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        check(
            isinstance(value, int) and not isinstance(value, bool),
            key,
            f"expected an integer, got {value!r}",
        )
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `3e-4` (no dot) as a string; accept what float() accepts.
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        check(ok, key, f"expected a number, got {value!r}")
        # `.inf` / `.nan` are YAML numbers; no key of ours means anything with them (issue 15:
        # train.lr=.inf trained into NaN weights).
        check(math.isfinite(value), key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported field type {tp}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"unknown config key '{key}' (valid keys here: {', '.join(names)})")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for i, p in enumerate(parts[:-1]):
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(
                f"config key '{'.'.join(parts[: i + 1])}' is not a section; cannot set '{dotted}'"
            )
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`a.b=v` strings → (key, YAML-parsed value); lists like `[1, 4]` work."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} must look like key=value (e.g. train.max_steps=50)"
            )
        k, v = item.split("=", 1)
        try:
            out.append((k.strip(), yaml.safe_load(v)))
        except yaml.YAMLError as e:
            raise ConfigError(f"config key '{k}': value {v!r} is not valid YAML ({e})") from e
    return out


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `key=value` of ``overrides`` in the config mapping ``tree`` (in place)."""
    for k, v in parse_overrides(overrides):
        _set_dotted(tree, k, v)
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML recipe (or defaults), apply `--set` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            tree = yaml.safe_load(p.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if tree is None:  # an empty file would silently run the built-in defaults (300 steps)
            raise ConfigError(
                f"config file {p} is empty: give at least one key (e.g. copy configs/demo-cpu.yaml)"
            )
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
    apply_overrides(tree, overrides or [])
    return _from_dict(RunConfig, tree, "").validate()


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    return _from_dict(RunConfig, tree, "").validate()


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
