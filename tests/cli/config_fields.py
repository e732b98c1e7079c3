"""The config models as data: every level and leaf field with its dotted path and a way to place a value there in
a YAML tree, for tests that generate their cases from the pydantic models themselves (a field added later is
covered without editing a test). Used by test_bad_input.py and test_config_properties.py.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo


def bare(ann: Any) -> Any:
    """``Optional[X]`` → X (other annotations as they are)."""
    if typing.get_origin(ann) is typing.Union:
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def optional(f: FieldInfo) -> bool:
    return typing.get_origin(f.annotation) is typing.Union and type(None) in typing.get_args(f.annotation)


def kind(f: FieldInfo) -> Any:
    """int, float, bool, str, Literal, list or tuple: what the field holds, Optional removed."""
    ann = bare(f.annotation)
    return typing.get_origin(ann) or ann


def submodel(ann: Any) -> tuple[type[BaseModel] | None, bool]:
    """(the sub-model of a field annotation, whether it is a list of them), or (None, False) for a leaf."""
    ann = bare(ann)
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann, False
    if typing.get_origin(ann) is list:
        (arg,) = typing.get_args(ann)
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg, True
    return None, False


def required(model: type[BaseModel]) -> dict:
    """The model's required fields, each with the first value that passes (so only the value under test fails)."""
    out = {}
    for name, f in model.model_fields.items():
        if f.is_required():
            ann = bare(f.annotation)
            out[name] = typing.get_args(ann)[0] if typing.get_origin(ann) is Literal else "x"
    return out


def bounds(f: FieldInfo) -> dict[str, float]:
    """The field's numeric bounds: any of ge, gt, le, lt."""
    out = {}
    for m in f.metadata:
        for key, cls in (("ge", at.Ge), ("gt", at.Gt), ("le", at.Le), ("lt", at.Lt)):
            if isinstance(m, cls):
                out[key] = getattr(m, key)
    return out


def pattern(f: FieldInfo) -> str | None:
    return next((m.pattern for m in f.metadata if getattr(m, "pattern", None)), None)


@dataclass(frozen=True)
class Level:
    path: str  # "" at the top, "eval.rouge.0" for the items of a list
    model: type[BaseModel]
    wrap: Callable[[dict], dict]  # wrap(mapping) → the config tree with that mapping at this level


@dataclass(frozen=True)
class Leaf:
    path: str  # "eval.rouge.0.limit"
    name: str
    field: FieldInfo
    model: type[BaseModel]  # the model that declares it
    level: Level

    def tree(self, value: Any) -> dict:
        """The smallest config tree holding ``value`` at this field (required neighbours filled)."""
        return self.level.wrap({**required(self.model), self.name: value})


def walk(model: type[BaseModel], skip: frozenset[str] = frozenset(), path: str = "",
         wrap: Callable[[dict], dict] = lambda d: d) -> Iterator[Level | Leaf]:
    """Every level (sub-model) and leaf field below ``model``, depth first; ``skip`` leaves out top-level fields."""
    level = Level(path, model, wrap)
    yield level
    where = f"{path}." if path else ""
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        sub, in_list = submodel(f.annotation)
        if sub is None:
            yield Leaf(f"{where}{name}", name, f, model, level)
            continue

        def inner(d: dict, name: str = name, in_list: bool = in_list) -> dict:
            return wrap({**required(model), name: [d] if in_list else d})
        yield from walk(sub, frozenset(), f"{where}{name}" + (".0" if in_list else ""), inner)
