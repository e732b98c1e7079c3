"""The strict config base every component config derives from, and reading YAML into it.

Unknown keys are errors that name the key; values are checked where they are declared; `--set a.b=c` overrides
are applied to the YAML tree before validation, so they are checked the same way. Imports nothing of pocketlm.
"""
from __future__ import annotations

import reprlib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator


class ConfigError(ValueError):
    """A config that does not validate; the message names each bad field."""


class StrictModel(BaseModel):
    # a NaN or infinite float is refused by name (lr: .inf would train to NaN, and NaN passes every bound check)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info) -> Any:
        """pydantic's lax mode reads true as 1 for an int or float field (`--set train.steps=true` trained one
        step); a boolean is refused wherever the field does not hold booleans, inside lists too."""
        if _holds_bool(v) and not _admits_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("Input should be a number, not a boolean")
        return v


def _holds_bool(v: Any) -> bool:
    return isinstance(v, bool) or (isinstance(v, (list, tuple)) and any(isinstance(x, bool) for x in v))


def _admits_bool(ann: Any) -> bool:
    """Whether a field annotation takes booleans anywhere (bool, Optional[bool], a Union or Literal with one)."""
    if ann is bool or ann is Any or isinstance(ann, bool):
        return True
    return any(_admits_bool(a) for a in typing.get_args(ann))


def registered(registry, name: str) -> str:
    """`name` if `registry` has it; else a ValueError (pydantic reports it under the field) listing valid names."""
    if name not in registry:
        raise ValueError(f"unknown {registry.kind} {name!r}; valid: {', '.join(registry.names())}")
    return name


# ---------------------------------------------------------------------------------------------- loading
MAX_YAML_VALUES = 100_000  # values a document may hold once its aliases are expanded


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise ValueError(f"duplicate key {key!r} at line {key_node.start_mark.line + 1} (first given at line "
                                 f"{seen[key]}); give each key once")
            if isinstance(key, typing.Hashable):
                seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _expanded_size(tree: Any, limit: int) -> int:
    """How many values `tree` holds with every alias expanded, counted over shared nodes once each (so a
    billion-laughs document is measured without expanding it); stops counting past `limit`."""
    sizes: dict[int, int | None] = {}

    def size(x: Any) -> int:
        if id(x) in sizes:
            if sizes[id(x)] is None:  # `&a [*a]`: a value that holds itself expands without end
                raise ValueError("an alias refers to the value that holds it (it expands without end)")
            return sizes[id(x)]
        sizes[id(x)] = None
        items = list(x.keys()) + list(x.values()) if isinstance(x, dict) else x if isinstance(x, list) else ()
        n = 1
        for item in items:
            n += size(item)
            if n > limit:
                break
        sizes[id(x)] = n
        return n

    return size(tree)


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load``, every way it fails on bad text a ValueError with the reason: besides its own errors, its
    constructors raise ValueError, IndexError or TypeError (a date 2024-13-45, an empty ``!!int``, an int past
    Python's digit limit) and its composer RecursionError (text nested thousands deep). A key given twice in one
    mapping, and aliases that expand to more than `MAX_YAML_VALUES` values (billion laughs), are refused too."""
    try:
        tree = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except RecursionError:
        raise ValueError("it nests too deeply") from None
    except Exception as e:  # noqa: BLE001 - see above; none of them is a config error of ours yet
        raise ValueError(str(e) or type(e).__name__) from None
    try:
        n = _expanded_size(tree, MAX_YAML_VALUES)
    except RecursionError:
        raise ValueError("it nests too deeply") from None
    if n > MAX_YAML_VALUES:
        raise ValueError(f"its aliases expand to more than {MAX_YAML_VALUES:,} values (a YAML alias bomb)")
    return tree


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` → (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.steps=100")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty key segment")
    try:
        value = load_yaml_text(raw) if raw.strip(" \t\r\n") else None  # YAML's blanks: a lone U+00A0 is text
    except ValueError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({e})") from None
    return parts, value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    out = dict(tree)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            child = dict(child) if isinstance(child, dict) else {}
            node[p] = child
            node = child
        node[parts[-1]] = value
    return out


_SHORT = reprlib.Repr()  # how a bad value is shown: a billion-element list is not written out
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 3, 8, 8, 120, 120, 40


def format_validation_error(e: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and level)"
        lines.append(f"  {where}: {msg}" + (f" (got {_SHORT.repr(err['input'])})" if err["type"] != "extra_forbidden"
                                             and not isinstance(err.get("input"), dict) else ""))
    return "\n".join(lines)


def load_config(model: type[BaseModel], path: str | Path | None = None, overrides: list[str] | None = None):
    """Read a YAML file (or nothing, for defaults), apply `key=value` overrides, validate into `model`."""
    tree: dict = {}
    source = str(path) if path else "(defaults)"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            tree = load_yaml_text(p.read_text(encoding="utf-8")) or {}
        except ValueError as e:  # UnicodeDecodeError too
            raise ConfigError(f"{p} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(tree).__name__}")
    tree = apply_overrides(tree, overrides or [])
    try:
        return model.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None

