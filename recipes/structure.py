"""The schema engine of recipes and calibration jobs: strict checks of plain YAML data against dataclasses.

OmegaConf builds the objects (structured configs); this check runs first, because OmegaConf converts where
a data file must be refused: ``"5"`` is not an integer, ``true`` is not a number, a key the schema lacks is
named with the closest allowed one, and ``${...}`` interpolations are refused instead of evaluated. Messages
name the path and the type of the bad value, never its content (a file may be a secret by mistake).

Example:
    >>> check_structure({"threshold": "x"}, Recipe, "<recipe>")
    Traceback (most recent call last):
    RecipeValidationError: threshold: expected number, got a string of 1 character
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Union

from litepatch.kernels.vocabulary import describe_value

from .errors import RecipeValidationError

TOP = "<recipe>"  # the path of the document itself in messages
Show = Callable[[object], str]


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is tuple:
        return "list of " + " and ".join(_type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
    if origin is dict:
        return f"mapping of name -> {_type_name(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    if tp is Any:
        return "any value"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _unknown_key(key: object, allowed: Mapping[str, Any], path: str, show: Show) -> str:
    """The message for a key that the schema does not have, shown by ``show`` (recipes: described, never quoted),
    with the allowed key it most resembles."""
    import difflib

    where = f"in {path}" if path != TOP else "at the top level"
    close = difflib.get_close_matches(key, list(allowed), n=1, cutoff=0.6) if isinstance(key, str) else []
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {where}: {show(key)}{hint}; allowed keys: {', '.join(allowed)}"


def check_structure(value: Any, tp: Any, path: str = TOP, show: Show = describe_value) -> None:
    """Strict structural check of YAML data against a schema type; raises :class:`RecipeValidationError` naming
    the path. ``show`` turns a bad value or key into text: recipes (untrusted files) describe it by type and size,
    calibration jobs (the user's own file) may quote it with ``repr``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return
        (inner,) = [a for a in args if a is not type(None)]
        check_structure(value, inner, path, show)
        return
    wrong = RecipeValidationError(f"{path}: expected {_type_name(tp)}, got {show(value)}")
    if isinstance(value, str) and "${" in value:
        raise RecipeValidationError(
            f"{path}: contains an interpolation '${{...}}'; recipes are data only, write the value itself"
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise wrong
        hints = _field_types(tp)
        for key, item in value.items():
            if key not in hints:
                raise RecipeValidationError(_unknown_key(key, hints, path, show))
            check_structure(item, hints[key], key if path == TOP else f"{path}.{key}", show)
    elif origin is list:
        if not isinstance(value, list):
            raise wrong
        (inner,) = typing.get_args(tp)
        for i, item in enumerate(value):
            check_structure(item, inner, f"{path}[{i}]", show)
    elif origin is dict:
        if not isinstance(value, Mapping):
            raise wrong
        _, inner = typing.get_args(tp)
        for key, item in value.items():
            if not isinstance(key, str):
                raise RecipeValidationError(f"{path}: keys must be strings, got {show(key)}")
            if "${" in key:
                raise RecipeValidationError(f"{path}: a key contains an interpolation '${{...}}'")
            check_structure(item, inner, f"{path}.{key}", show)
    elif origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise wrong
        inner = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(inner) != len(value):
            raise RecipeValidationError(f"{path}: expected {len(inner)} items, got {show(value)}")
        for i, (item, item_tp) in enumerate(zip(value, inner)):
            check_structure(item, item_tp, f"{path}[{i}]", show)
    elif tp is Any:
        _refuse_interpolations(value, path)
    elif tp is bool:
        if not isinstance(value, bool):
            raise wrong
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
    elif tp is str:
        if not isinstance(value, str):
            raise wrong
    else:  # pragma: no cover - the schema uses only the types above
        raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _refuse_interpolations(value: Any, path: str) -> None:
    """Free-form values (``Any``) are data too: no ``${...}`` anywhere inside them."""
    if isinstance(value, str) and "${" in value:
        raise RecipeValidationError(f"{path}: contains an interpolation '${{...}}'; write the value itself")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _refuse_interpolations(key, path)
            _refuse_interpolations(item, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _refuse_interpolations(item, f"{path}[{i}]")


def as_plain(obj: Any) -> Any:
    """Dataclass tree -> plain dicts/lists (for the strict type check of recipe objects)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: as_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: as_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_plain(v) for v in obj]
    return obj
