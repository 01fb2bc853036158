"""Single values: the error that carries a bad value's path, the helpers that name values,
types and hints in messages, and the converters of one scalar value (None, bool, int, float,
Decimal, bytes, str, dates and times, UUID, Literal, Enum). The base that
:mod:`lilota.conversion` (typed values) and :mod:`lilota.serialization` (the stored format)
share; it imports neither.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from typing import Any, Literal, Union, get_args, get_origin
from uuid import UUID

# Entries a cache (by type or hint) holds before it is emptied: bounds memory in programs
# that make classes on the fly, far above the types a real program stores.
_CACHE_LIMIT = 4096
_ROOT = "\x00root\x00"  # replaced by the root name ("input", "output") when rendered
_NoneType = type(None)
_Converter = Callable[[Any], Any]  # rebuilds a decoded value as one type


# --------------------------------------------------------------------------- errors


class _PathError(Exception):
    """Internal refusal; each container adds its path segment while it unwinds. ``details``:
    (relative path, message) pairs, for an error found in several places at once."""

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message, self.details = message, details
        self.segs: list[str] = []

    def at(self, seg: str, container: Any = None) -> _PathError:
        """Prepend ``seg``, the step into ``container`` (kept only by the encoder's
        too-deep error, to tell a cycle)."""
        self.segs.append(seg)
        return self

    def render(self, root: str) -> str:
        path = root + "".join(self.segs[::-1])
        if self.details:
            return "; ".join(f"{path}{rel}: {msg}" for rel, msg in self.details)
        return f"{path}: {self.message.replace(_ROOT, root)}"


def _class_name(cls: type) -> str:
    """A class's qualified name, without the ``f.<locals>.`` of classes made in functions."""
    return cls.__qualname__.rpartition("<locals>.")[2]


def _type_name(value: Any) -> str:
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{_class_name(t)}"


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:  # e.g. an int too big for repr, or a broken __repr__
        return f"<{_type_name(value)} object>"
    return text[: limit - 3] + "..." if len(text) > limit else text


def _describe(value: Any) -> str:
    return "None" if value is None else f"{_type_name(value)} {_short(value)}"


def _attr_seg(name: Any) -> str:
    return "." + name if isinstance(name, str) and name.isidentifier() else f"[{name!r}]"


def _expect(name: str, v: Any) -> _PathError:
    return _PathError(f"expected {name}, got {_describe(v)}")


def _expected_model(cls: type, v: Any) -> str:
    return f"expected {_class_name(cls)} (or a dict of its fields), got {_describe(v)}"


def _hint_name(tp: Any) -> str:
    """A readable name for a type hint: ``int``, ``list[Point]``, ``int | None``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is _NoneType or tp is None:
        return "None"
    if origin is Union or origin is types.UnionType:
        return " | ".join(_hint_name(a) for a in args)
    if origin is Literal:
        return "Literal[" + ", ".join(_short(a) for a in args) + "]"
    if origin is not None and args:
        name = getattr(origin, "__name__", None) or str(origin)
        return f"{name}[" + ", ".join("..." if a is Ellipsis else _hint_name(a) for a in args) + "]"
    return _class_name(tp) if isinstance(tp, type) else str(tp).replace("typing.", "")


# --------------------------------------------------------------------------- caches and hints


def _cache(cache: dict[Any, Any], key: Any, value: Any) -> Any:
    if len(cache) > _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


def _strip(tp: Any) -> Any:
    """Remove Annotated and NewType layers; ``None`` becomes ``NoneType``."""
    while True:
        if tp is None:
            return _NoneType
        if get_origin(tp) is typing.Annotated:
            tp = get_args(tp)[0]
        elif getattr(tp, "__supertype__", None) is not None and not isinstance(tp, type):
            tp = tp.__supertype__
        else:
            return tp


# --------------------------------------------------------------------------- one value


def _identity(v: Any) -> Any:
    return v


def _instance_of(cls: type, name: str = "") -> _Converter:
    """A converter that accepts an instance of ``cls`` as it is, and nothing else."""
    name = name or _class_name(cls)

    def conv(v: Any) -> Any:
        if isinstance(v, cls):
            return v
        raise _expect(name, v)

    return conv


def _to_none(v: Any) -> Any:
    if v is not None:
        raise _expect("None", v)
    return None


def _to_int(v: Any) -> Any:
    if type(v) is int or (isinstance(v, int) and not isinstance(v, bool)):
        return v
    raise _expect("int", v)


def _to_float(v: Any) -> Any:
    if isinstance(v, float):
        return v
    if not isinstance(v, int) or isinstance(v, bool):
        raise _expect("float", v)
    try:
        return float(v)
    except OverflowError:
        raise _PathError(f"expected float, got an int too large for a float: {_short(v)}") from None


def _to_decimal(v: Any) -> Any:
    if isinstance(v, Decimal):
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _expect("Decimal", v)
    return Decimal(v) if isinstance(v, int) else Decimal(repr(v))


def _to_bytes(v: Any, make: type = bytes) -> Any:
    if not isinstance(v, (bytes, bytearray)):
        raise _expect(make.__name__, v)
    return v if make is bytes and isinstance(v, bytes) else make(v)


_SCALARS: dict[Any, _Converter] = {
    **{cls: _instance_of(cls) for cls in (bool, str, datetime, date, time, timedelta, UUID)},
    **{_NoneType: _to_none, int: _to_int, float: _to_float, Decimal: _to_decimal},
    **{bytes: _to_bytes, bytearray: functools.partial(_to_bytes, make=bytearray)},
}


def _same_kind(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b)
    return (isinstance(a, str) and isinstance(b, str)) or type(a) is type(b)


def _literal_converter(tp: Any, args: tuple[Any, ...]) -> _Converter:
    name = _hint_name(tp)

    def conv(v: Any) -> Any:
        for option in args:
            if v is option:
                return option
            if isinstance(option, Enum):  # its value, but not another enum's member
                value = option.value
                if not isinstance(v, Enum) and _same_kind(v, value) and v == value:
                    return option
            elif _same_kind(v, option) and v == option:
                return option
        raise _expect(name, v)

    return conv


def _enum_converter(cls: type[Enum]) -> _Converter:
    def conv(v: Any) -> Any:
        if isinstance(v, cls):
            return v
        try:
            member = cls(v)
        except (ValueError, TypeError):
            member = None
        if member is None or not _same_kind(v, member.value):
            values = ", ".join(_short(m.value, 30) for m in list(cls)[:10])
            more = ", ..." if len(cls) > 10 else ""
            raise _PathError(
                f"expected {_class_name(cls)} (a value of {values}{more}), got {_describe(v)}"
            )
        return member

    return conv
