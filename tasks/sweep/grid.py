"""The settings of a sweep: axes ``name=v1,v2,...`` over any field of GenerateOptions.

    from tasks.sweep.grid import parse_axis, settings, Setting
    axes = [parse_axis("top_k=1,5,40"), parse_axis("temperature=0.7,1.0")]
    for s in settings(axes, cross=False, base=GenerateOptions(seed=1, max_tokens=64)):
        print(s.label, s.options)

An axis's name must be a field of ``tasks.generate.GenerateOptions``, looked up when the axis is parsed
(``dataclasses.fields``), so every control added to GenerateOptions can be swept with no change here;
each value is converted to the field's type.  Without ``cross`` every axis is its own family (its values
each change one control of the base options); with ``cross`` the settings are the product of the axes.
Each setting's options are built with ``dataclasses.replace(base, **values)`` and so validated by
GenerateOptions itself; a bad value is an OptionError naming ``grid``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

from ..errors import OptionError
from ..generate import GenerateOptions

#: Fields that are not sampling settings: every setting decodes with the same seeds.
NOT_SWEPT = ("seed",)


@dataclass(frozen=True)
class Axis:
    name: str
    values: Tuple[Any, ...]
    texts: Tuple[str, ...]  # the values as given


@dataclass(frozen=True)
class Setting:
    """One setting: the values it changes (field -> value, in axis order) and the options it decodes with."""

    values: Tuple[Tuple[str, Any], ...]
    options: GenerateOptions
    family: str  # the axis name, or "×".join(names) for a crossed grid

    @property
    def label(self) -> str:
        return " ".join(f"{k}={_show(v)}" for k, v in self.values) or "base"

    @property
    def key(self) -> str:
        """A stable identifier (for --resume): the changed values as canonical JSON."""
        return json.dumps([[k, v] for k, v in self.values], ensure_ascii=False, sort_keys=False)

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.values)


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        return "|".join(map(str, v))
    return str(v)


def fields() -> Dict[str, Any]:
    """The sweepable fields of GenerateOptions and their types (resolved at run time)."""
    hints = typing.get_type_hints(GenerateOptions)
    return {f.name: hints.get(f.name, str) for f in dataclasses.fields(GenerateOptions) if f.name not in NOT_SWEPT}


def _convert(text: str, kind: Any, name: str):
    """``text`` as a value of type ``kind`` (int, float, bool, str, Optional[...], Tuple[str, ...])."""
    origin = typing.get_origin(kind)
    args = typing.get_args(kind)
    if origin is typing.Union:
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1:
            return _convert(text, others[0], name)
        raise ValueError(f"cannot sweep {name} (type {kind})")
    if origin in (tuple, list):
        return tuple(part for part in text.split("|"))
    t = text.strip()
    if kind is bool:
        if t.lower() in ("1", "true", "yes", "on"):
            return True
        if t.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {text!r}")
    if kind is int:
        try:
            return int(t)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if kind is float:
        try:
            value = float(t)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number, got {text!r}")
        return value
    if kind is str:
        return text
    raise ValueError(f"cannot sweep {name} (type {kind})")


def parse_axis(spec: str) -> Axis:
    """``name=v1,v2,...`` -> Axis; OptionError('grid', ...) for an unknown control, a bad or empty value."""
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise OptionError("grid", f"{spec!r}: expected NAME=V1,V2,... (e.g. top_k=1,5,40)")
    known = fields()
    if name not in known:
        if name in NOT_SWEPT:
            raise OptionError("grid", f"{spec!r}: {name} is the same for every setting (set it with --{name})")
        raise OptionError("grid", f"{spec!r}: unknown control {name!r}; the controls are: {', '.join(known)}")
    texts = [t.strip() for t in rest.split(",")]
    if not rest.strip() or any(t == "" for t in texts):
        raise OptionError("grid", f"{spec!r}: empty value (give one or more values separated by commas)")
    values = []
    for t in texts:
        try:
            values.append(_convert(t, known[name], name))
        except ValueError as e:
            raise OptionError("grid", f"{name}={t}: {e}") from None
    return Axis(name, tuple(values), tuple(texts))


def with_fixed(base: GenerateOptions, specs: Sequence[str]) -> GenerateOptions:
    """``base`` with controls fixed for every setting (``NAME=VALUE`` each, e.g. ``min_length=16``)."""
    values = {}
    for spec in specs:
        axis = parse_axis(spec)
        if len(axis.values) != 1:
            raise OptionError("set", f"{spec!r}: give one value (an axis of several values is a --grid)")
        values[axis.name] = axis.values[0]
    try:
        return dataclasses.replace(base, **values)
    except OptionError as e:
        raise OptionError("set", f"{e.option} {e.reason}") from None


def settings(axes: Sequence[Axis], cross: bool, base: GenerateOptions) -> List[Setting]:
    """The settings of the grid, each validated by GenerateOptions; duplicates (the same values) once."""
    names = [a.name for a in axes]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise OptionError("grid", f"{', '.join(dup)} is given by more than one axis: put its values in one")
    combos: List[Tuple[str, Tuple[Tuple[str, Any], ...]]] = []
    if cross and axes:
        family = "×".join(names)
        for values in itertools.product(*[a.values for a in axes]):
            combos.append((family, tuple(zip(names, values))))
    else:
        for a in axes:
            combos.extend((a.name, ((a.name, v),)) for v in a.values)
    out, seen = [], set()
    for family, values in combos:
        try:
            options = dataclasses.replace(base, **dict(values))
        except OptionError as e:
            shown = " ".join(f"{k}={_show(v)}" for k, v in values)
            raise OptionError("grid", f"{shown}: {e.option} {e.reason}") from None
        setting = Setting(values, options, family)
        if setting.key not in seen:
            seen.add(setting.key)
            out.append(setting)
    return out
