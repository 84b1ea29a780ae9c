"""Configuration as dataclasses, loaded from YAML with ``key=value`` CLI overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from moe2edge.distill.errors import DistillError

T = TypeVar("T")


def _coerce(value: str, annotation: Any) -> Any:
    """Turn a CLI string into the field's type (bool/int/float/str/None and X | None)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing))  # from __future__ annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value.lower() in ("none", "null"):
            return None
        annotation = args[0]
    if annotation is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if annotation in (int, float, str):
        return annotation(value)
    return yaml.safe_load(value)  # lists and dicts in YAML syntax


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = ()) -> T:
    """Build dataclass ``cls`` from a YAML file (optional) and ``key=value`` overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DistillError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise DistillError(f"{path} must hold a YAML mapping of config keys")
        values.update(loaded)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in fields]
    if unknown:
        raise DistillError(f"unknown config keys {unknown} in {path}; valid keys: {sorted(fields)}")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in fields:
            raise DistillError(
                f"bad override {item!r}: use key=value with a key among {sorted(fields)}"
            )
        try:
            values[key] = _coerce(raw, fields[key].type)
        except ValueError as exc:
            raise DistillError(f"bad value for {key}: {exc}") from exc
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
