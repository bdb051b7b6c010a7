"""Build frozen config dataclasses from plain data (YAML, JSON, dicts) and back.

Every config of ``genq_core`` is a frozen dataclass of ints, floats, strings, bools, tuples,
``Literal`` choices, ``Path`` s, optional values and nested config dataclasses. :func:`from_dict`
builds such a tree and says exactly where input is wrong (``filters.order[1]: expected str, got
int 3``); range checks stay in each dataclass's ``__post_init__``, whose errors get the dotted path
of the dataclass prefixed. :func:`to_dict` is the JSON-ready inverse.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

__all__ = ["from_dict", "load_config", "to_dict"]

T = TypeVar("T")

_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build the dataclass ``cls`` (and the dataclasses nested in it) from plain data.

    Args:
        cls: a dataclass type whose field annotations are resolvable with
            ``typing.get_type_hints``.
        data: field name -> value; lists are accepted for tuples, strings for ``Path`` and
            ints for floats. Fields left out take their defaults.
        where: dotted path of ``data`` inside a larger config, used in error messages.

    Raises:
        ValueError: an unknown key (with the known keys listed), a missing required key, a
            value of the wrong type, or a value the dataclass itself rejects; the message starts
            with the dotted path of the offending key.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} is not a dataclass type")
    if not isinstance(data, Mapping):
        raise ValueError(f"{where or cls.__name__}: expected a mapping, got {_describe(data)}")

    # 1. keys: known, none missing
    fields = [f for f in dataclasses.fields(cls) if f.init]
    known = [f.name for f in fields]
    unknown = [key for key in data if key not in known]
    if unknown:
        keys = ", ".join(repr(_join(where, str(key))) for key in unknown)
        raise ValueError(f"unknown key {keys}; known keys of {cls.__name__}: {', '.join(known)}")
    missing = [
        f.name
        for f in fields
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        keys = ", ".join(repr(_join(where, name)) for name in missing)
        raise ValueError(f"missing required key {keys}")

    # 2. values: converted to each field's annotated type
    hints = _type_hints(cls)
    values = {
        name: _convert(value, hints[name], _join(where, name)) for name, value in data.items()
    }

    # 3. the dataclass's own checks, prefixed with where it sits
    try:
        return cls(**values)
    except ValueError as err:
        raise ValueError(f"{where}: {err}" if where else str(err)) from err


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as JSON-ready data: tuples become lists, ``Path`` s strings.

    ``from_dict(type(obj), to_dict(obj)) == obj`` for every config of ``genq_core``.
    """
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"expected a dataclass instance, got {type(obj).__name__}")
    result = _plain(obj, type(obj).__name__)
    assert isinstance(result, dict)
    return result


def load_config(cls: type[T], path: str | Path) -> T:
    """Read a ``.yaml``/``.yml`` or ``.json`` file into the dataclass ``cls``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unknown file type, a parse error, or a bad config (see :func:`from_dict`);
            the message names the file.
    """
    file = Path(path)
    if file.suffix.lower() not in _CONFIG_SUFFIXES:
        raise ValueError(
            f"{file}: unknown config file type {file.suffix!r}; use {', '.join(_CONFIG_SUFFIXES)}"
        )
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if file.suffix.lower() == ".json" else yaml.load(text, _Loader)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise ValueError(f"{file}: cannot parse: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{file}: the top level must be a mapping, got {_describe(data)}")
    try:
        return from_dict(cls, data)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from err


def _convert(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against, and converted to, the type ``hint``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(value, args, where)
    if value is None:
        raise ValueError(f"{where}: must not be null")
    if origin is Literal:
        for option in args:
            if type(value) is type(option) and value == option:
                return value
        choices = ", ".join(repr(a) for a in args)
        raise ValueError(f"{where}: must be one of {choices}, got {value!r}")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        return from_dict(hint, value, where)
    if origin is tuple or hint is tuple:
        return _convert_tuple(value, args, where)
    if origin is list:
        return list(_convert_tuple(value, (args[0], ...), where))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a mapping, got {_describe(value)}")
        key_hint, value_hint = args or (str, Any)
        return {
            _convert(k, key_hint, f"{where}.{k}"): _convert(v, value_hint, f"{where}.{k}")
            for k, v in value.items()
        }
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, str | Path):
            return Path(value)
    else:
        raise TypeError(f"{where}: configio does not support the annotation {hint!r}")
    raise ValueError(f"{where}: expected {_type_name(hint)}, got {_describe(value)}")


def _convert_union(value: Any, options: tuple[Any, ...], where: str) -> Any:
    if value is None and type(None) in options:
        return None
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            return _convert(value, option, where)
        except ValueError as err:
            errors.append(err)
    if len(errors) == 1:
        raise errors[0]
    names = " or ".join(_type_name(o) for o in options)
    raise ValueError(f"{where}: expected {names}, got {_describe(value)}")


def _convert_tuple(value: Any, args: tuple[Any, ...], where: str) -> tuple[Any, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"{where}: expected a list, got {_describe(value)}")
    if not args:
        hints = [Any] * len(value)  # a bare ``tuple``
    elif len(args) == 2 and args[1] is Ellipsis:
        hints = [args[0]] * len(value)
    else:
        hints = list(args)
    if len(hints) != len(value):
        raise ValueError(f"{where}: expected a list of {len(hints)} items, got {len(value)}")
    return tuple(
        _convert(v, h, f"{where}[{i}]") for i, (v, h) in enumerate(zip(value, hints, strict=True))
    )


def _plain(value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name), f"{where}.{f.name}")
            for f in dataclasses.fields(value)
        }
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{where}: {type(value).__name__} is not plain data")


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as err:
        raise TypeError(f"cannot resolve the field types of {cls.__name__}: {err}") from err


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    if typing.get_origin(hint) in (tuple, list):
        return "a list"
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return "a mapping"
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    return getattr(hint, "__name__", str(hint))


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)
