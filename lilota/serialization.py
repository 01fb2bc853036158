"""Task inputs and outputs as JSON text, and back: never pickle.

lilota stores a task's ``input`` and ``output`` as JSON *text* in a TEXT column (on
SQLite and PostgreSQL alike), so every string, exact float and big int survives.
:func:`dumps` turns a value into that text, :func:`loads` turns the text back into plain
Python values, :func:`build` rebuilds those values as the task's declared model, and
:func:`prepare` is what ``schedule()`` calls: it checks the value fits the model and
returns the text, raising before anything is written. :func:`check_model` is called when
a task is registered.

Encoding
--------

================================  ==============================================================
Python value                      stored as
================================  ==============================================================
``None`` (the whole value)        SQL NULL (``dumps`` returns ``None``)
``None``, ``bool``, ``str``       JSON natives; any unicode, including ``"\\x00"`` and lone
                                  surrogates: the text is pure ASCII (``\\uXXXX`` escapes)
``str`` with a surrogate pair     ``{"__lilota__": "str", "v": [pieces]}``, cut between the
as two code points                halves: JSON cannot tell ``"\\ud83d\\ude00"`` (two code
                                  points) from ``"\\U0001f600"`` (one); a dict with such a key
                                  is stored as ``{"__lilota__": "dict", "v": [[key, value]]}``
``int``                           JSON number; ints wider than 2000 bits as
                                  ``{"__lilota__": "int", "v": "<hex>"}``
finite ``float``                  JSON number (exact: ``repr`` round trips)
``nan``, ``inf``, ``-inf``        ``{"__lilota__": "float", "v": "nan" | "inf" | "-inf"}``
``dict`` with ``str`` keys        JSON object; a dict that itself has the key ``"__lilota__"``
                                  is stored as ``{"__lilota__": "dict", "v": {...}}``
``list``                          JSON array
``tuple``                         ``{"__lilota__": "tuple", "v": [items]}``
``set`` / ``frozenset``           ``{"__lilota__": "set" | "frozenset", "v": [items]}``
                                  (items sorted by their JSON text, so the text is stable)
``datetime``                      ``{"__lilota__": "datetime", "v": isoformat()}``: naive stays
                                  naive; aware keeps its UTC offset (it comes back with a
                                  fixed-offset ``timezone``, not the original ``ZoneInfo``)
``date`` / ``time``               ``{"__lilota__": "date" | "time", "v": isoformat()}``
``timedelta``                     ``{"__lilota__": "timedelta", "v": [days, seconds, micros]}``
``UUID``                          ``{"__lilota__": "uuid", "v": "hex-with-dashes"}``
``Decimal``                       ``{"__lilota__": "decimal", "v": str(d)}`` (NaN and
                                  Infinity included; exponent kept: ``1.10`` stays ``1.10``)
``bytes`` / ``bytearray``         ``{"__lilota__": "bytes", "v": base64}`` (back as ``bytes``)
``Enum`` member                   its value, encoded by these rules (see below)
dataclass instance                dict of its ``init`` fields, recursively
pydantic v2 model instance        ``model_dump(mode="python", by_alias=True)``, encoded
object with ``as_dict()``         ``as_dict()``, encoded
anything else                     refused: :class:`~lilota.errors.SerializationError`
================================  ==============================================================

``loads`` gives the decoded values: models come back as plain dicts (that is what
``Task.input`` / ``Task.output`` hold, so ``AddOutput(**task.output)`` works); ``build``
rebuilds them as the declared model.

Enums are stored as their value. Where the declared model types the position (a dataclass
field annotated with the Enum, or a pydantic field), ``build`` restores the member. In an
untyped position (no model, a ``dict`` model, ``dict[str, Any]``, ``Any``) only enums that
equal their value are accepted (``class C(str, Enum)``, ``IntEnum``, ``StrEnum``) and they
come back as the plain value; a plain ``Enum`` there is refused.

Refused: dict keys that are not ``str``; nesting deeper than 200 containers; reference
cycles; set items that would come back unhashable (dataclasses, dicts, lists); any other
type. Every error message names the path of the offending value, such as
``input.items[2].when`` or ``input['key']`` (set items show as ``{*}``), its type, and
what to do instead.

Rebuilding (``build``) is strict but sane: dataclasses are rebuilt field by field from
``typing.get_type_hints`` (nested dataclasses, ``Optional``/``Union``, ``list[X]``,
``tuple[X, ...]``, ``set[X]``, ``frozenset[X]``, ``dict[str, X]``, ``Literal``, Enums,
datetime/date/time/timedelta/UUID/Decimal/bytes, defaults for missing fields); an ``int``
is accepted for a ``float`` (converted) or ``Decimal`` field, but ``bool`` is never an
``int``; a list is accepted for a tuple or set field and a tuple for a list field; ``init=False``
fields are not stored and are ignored when present. Pydantic models are rebuilt with
``model_validate``; other ``as_dict`` classes with ``from_dict(d)`` when they have it,
else ``Model(**d)``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import importlib
import json
import math
import re
import sys
import types
import typing
from collections import abc
from collections.abc import Callable
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal, InvalidOperation
from enum import Enum
from typing import Any, Literal, TypeVar, Union, get_args, get_origin
from uuid import UUID

from lilota.errors import InvalidInput, RegistrationError, SerializationError

__all__ = ["MAX_DEPTH", "TAG", "build", "check_model", "dumps", "loads", "prepare"]

TAG = "__lilota__"
"""The key that marks a tagged value in the stored JSON."""

MAX_DEPTH = 200
"""The most containers (dicts, lists, models...) that may be nested inside each other."""

_BIG_INT_BITS = 2000  # below every int_max_str_digits setting (>= 640 digits)
_NoneType = type(None)
_ROOT = "\x00root\x00"  # replaced by the root name ("input", "output") when rendered
_ENCODER = json.JSONEncoder(
    ensure_ascii=True, allow_nan=False, check_circular=False, separators=(",", ":")
)
_CACHE_LIMIT = 4096
# A high surrogate followed by a low one: written as JSON they would be read back as the
# one character the pair encodes, so strings holding one are stored tagged (see _str_tag).
_PAIR = re.compile(r"[\ud800-\udbff][\udc00-\udfff]")

_Conv = Callable[[Any], Any]


# --------------------------------------------------------------------------- errors


class _Bad(Exception):
    """Internal refusal. Each container adds its path segment while it unwinds."""

    def __init__(
        self,
        message: str,
        *,
        deep: Any = None,
        details: list[tuple[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.deep = deep is not None
        self.details = details
        self.segs: list[str] = []
        self.objs: list[Any] = [deep] if deep is not None else []

    def at(self, seg: str, container: Any = None) -> _Bad:
        self.segs.append(seg)
        if self.deep:
            self.objs.append(container)
        return self

    def render(self, root: str) -> str:
        segs = self.segs[::-1]
        if self.deep:
            objs = self.objs[::-1]
            seen: dict[int, int] = {}
            for j, obj in enumerate(objs):
                i = seen.get(id(obj))
                if i is not None:
                    here = root + "".join(segs[:j])
                    first = root + "".join(segs[:i])
                    return (
                        f"{_clip(here)}: reference cycle: this is the same "
                        f"{_tname(obj)} object as {_clip(first)}, which contains it; "
                        "lilota cannot store a value that contains itself"
                    )
                seen[id(obj)] = j
            return (
                f"{_clip(root + ''.join(segs))}: nested deeper than {MAX_DEPTH} levels; "
                f"flatten the value (lilota stores at most {MAX_DEPTH} nested containers)"
            )
        path = root + "".join(segs)
        if self.details:
            return "; ".join(
                f"{path}{rel}: {msg.replace(_ROOT, root)}" for rel, msg in self.details
            )
        return f"{path}: {self.message.replace(_ROOT, root)}"


def _clip(path: str, limit: int = 200) -> str:
    if len(path) <= limit:
        return path
    return path[:80] + " ... " + path[-(limit - 85) :]


def _cname(cls: type) -> str:
    """A class's qualified name, without the ``f.<locals>.`` of classes made in functions."""
    return cls.__qualname__.rpartition("<locals>.")[2]


def _tname(value: Any) -> str:
    t = type(value)
    if t.__module__ == "builtins":
        return t.__qualname__
    return f"{t.__module__}.{_cname(t)}"


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:  # e.g. an int too big for repr, or a broken __repr__
        return f"<{_tname(value)} object>"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def _describe(value: Any) -> str:
    return "None" if value is None else f"{_tname(value)} {_short(value)}"


def _attr_seg(name: Any) -> str:
    if isinstance(name, str) and name.isidentifier():
        return "." + name
    return f"[{name!r}]"


def _hname(tp: Any) -> str:
    """A readable name for a type hint: ``int``, ``list[Point]``, ``int | None``."""
    if tp is _NoneType or tp is None:
        return "None"
    origin = get_origin(tp)
    args = get_args(tp)
    if origin is Union or origin is types.UnionType:
        return " | ".join(_hname(a) for a in args)
    if origin is Literal:
        return "Literal[" + ", ".join(_short(a) for a in args) + "]"
    if origin is not None and args:
        name = getattr(origin, "__name__", None) or str(origin)
        return f"{name}[" + ", ".join("..." if a is Ellipsis else _hname(a) for a in args) + "]"
    if isinstance(tp, type):
        return _cname(tp)
    return str(tp).replace("typing.", "")


# --------------------------------------------------------------------------- model kinds


_pydantic_base: Any = None


def _pydantic_basemodel() -> Any:
    """pydantic.BaseModel if pydantic was imported by someone, else None (never imports it)."""
    global _pydantic_base
    if _pydantic_base is None:
        module = sys.modules.get("pydantic")
        if module is None:
            return None
        _pydantic_base = getattr(module, "BaseModel", None)
    return _pydantic_base


def _is_pydantic_class(tp: Any) -> bool:
    base = _pydantic_basemodel()
    return base is not None and isinstance(tp, type) and issubclass(tp, base)


def _is_pydantic_v1_class(tp: Any) -> bool:
    module = sys.modules.get("pydantic.v1")
    base = getattr(module, "BaseModel", None) if module is not None else None
    return base is not None and isinstance(tp, type) and issubclass(tp, base)


def _is_dataclass_class(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_model_class(tp: Any) -> bool:
    """A class whose instances are stored as a dict of fields: dataclass, pydantic, as_dict."""
    return isinstance(tp, type) and (
        _is_dataclass_class(tp) or _is_pydantic_class(tp) or callable(getattr(tp, "as_dict", None))
    )


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as exc:
        raise RegistrationError(
            f"cannot resolve the type hints of {_cname(cls)}: {exc}; lilota needs "
            "them to store and rebuild it: make every type it names importable from its "
            "module (define it at module level)"
        ) from exc


def _strip(tp: Any) -> Any:
    """Remove Annotated and NewType layers; ``None`` becomes ``NoneType``."""
    while True:
        if tp is None:
            return _NoneType
        if get_origin(tp) is typing.Annotated:
            tp = get_args(tp)[0]
            continue
        supertype = getattr(tp, "__supertype__", None)
        if supertype is not None and not isinstance(tp, type):
            tp = supertype
            continue
        return tp


# --------------------------------------------------------------------------- shapes (encoding)


class _Shape:
    """What a type hint says about the children of a value at its position."""

    __slots__ = ("by_class", "fields", "items", "tuple_items", "values")

    def __init__(self) -> None:
        self.items: Any = None
        self.tuple_items: tuple[Any, ...] | None = None
        self.values: Any = None
        self.fields: dict[str, Any] | None = None
        self.by_class: dict[type, dict[str, Any]] = {}

    def item(self, index: int) -> Any:
        if self.tuple_items is not None:
            return self.tuple_items[index] if index < len(self.tuple_items) else None
        return self.items

    def key(self, key: str) -> Any:
        if self.fields is not None:
            return self.fields.get(key)
        return self.values


_SEQUENCE_ORIGINS: frozenset[Any] = frozenset(
    {list, abc.Sequence, abc.MutableSequence, abc.Collection, abc.Iterable}
)
_SET_ORIGINS: frozenset[Any] = frozenset({set, frozenset, abc.Set, abc.MutableSet})
_MAPPING_ORIGINS: frozenset[Any] = frozenset({dict, abc.Mapping, abc.MutableMapping})

_SHAPES: dict[Any, _Shape | None] = {}


def _arms(tp: Any) -> list[Any]:
    tp = _strip(tp)
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        out: list[Any] = []
        for arm in get_args(tp):
            out.extend(_arms(arm))
        return out
    return [tp]


def _model_fields(cls: type) -> dict[str, Any]:
    """Stored key -> type hint, for a dataclass or pydantic class."""
    if _is_dataclass_class(cls):
        hints = _type_hints(cls)
        return {f.name: hints.get(f.name) for f in dataclasses.fields(cls) if f.init}
    out: dict[str, Any] = {}
    for name, info in cls.model_fields.items():  # type: ignore[attr-defined]
        annotation = info.annotation
        for key in (name, info.alias, info.serialization_alias):
            if isinstance(key, str):
                out[key] = annotation
    return out


def _shape(hint: Any) -> _Shape | None:
    try:
        return _SHAPES[hint]
    except KeyError:
        pass
    except TypeError:
        return _make_shape(hint)
    shape = _make_shape(hint)
    if len(_SHAPES) > _CACHE_LIMIT:
        _SHAPES.clear()
    _SHAPES[hint] = shape
    return shape


def _make_shape(hint: Any) -> _Shape | None:
    shape = _Shape()
    found = False
    dict_fields: list[dict[str, Any]] = []
    dict_arm = False
    for arm in _arms(hint):
        origin = get_origin(arm)
        args = get_args(arm)
        if origin in _SEQUENCE_ORIGINS or origin in _SET_ORIGINS:
            if args and shape.items is None and shape.tuple_items is None:
                shape.items = args[0]
                found = True
        elif origin is tuple:
            if shape.items is None and shape.tuple_items is None:
                if len(args) == 2 and args[1] is Ellipsis:
                    shape.items = args[0]
                elif args and args != ((),):
                    shape.tuple_items = args
                found = True
        elif origin in _MAPPING_ORIGINS:
            dict_arm = True
            if len(args) == 2 and shape.values is None:
                shape.values = args[1]
                found = True
        elif _is_dataclass_class(arm) or _is_pydantic_class(arm):
            fields = _model_fields(arm)
            shape.by_class[arm] = fields
            dict_fields.append(fields)
            found = True
    if len(dict_fields) == 1 and not dict_arm:
        shape.fields = dict_fields[0]
    return shape if found else None


# --------------------------------------------------------------------------- encoding


def _str_tag(value: str) -> dict[str, Any]:
    """A string holding surrogate pairs as two code points, cut between each pair's halves
    (no piece holds a pair, so each comes back from JSON as it was)."""
    pieces = []
    start = 0
    for match in _PAIR.finditer(value):
        pieces.append(value[start : match.start() + 1])
        start = match.start() + 1
    pieces.append(value[start:])
    return {TAG: "str", "v": pieces}


def _float_tag(value: float) -> dict[str, Any]:
    text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return {TAG: "float", "v": text}


def _hashable_encoded(enc: Any) -> bool:
    """Whether an encoded value decodes to something hashable (a set member)."""
    t = type(enc)
    if t is list:
        return False
    if t is dict:
        tag = enc.get(TAG)
        if tag == "tuple" or tag == "frozenset":
            return all(_hashable_encoded(item) for item in enc["v"])
        return tag is not None and tag != "dict" and tag != "set"
    return True


def _enc(v: Any, depth: int, hint: Any, pyd: bool) -> Any:
    """Encode one value. ``hint`` is the declared type here (None: untyped)."""
    t = type(v)
    if t is str:
        return v if v.isascii() or _PAIR.search(v) is None else _str_tag(v)
    if t is bool or v is None:
        return v
    if t is int:
        return v if v.bit_length() <= _BIG_INT_BITS else {TAG: "int", "v": hex(v)}
    if t is float:
        return v if math.isfinite(v) else _float_tag(v)
    if t is dict:
        if depth >= MAX_DEPTH:
            raise _Bad("", deep=v)
        return _enc_dict(v, depth, hint, pyd, False)
    if t is list:
        if depth >= MAX_DEPTH:
            raise _Bad("", deep=v)
        return _enc_items(v, depth, hint, pyd)
    return _enc_other(v, depth, hint, pyd)


def _is_plain(x: Any) -> bool:
    t = type(x)
    return (
        (t is str and (x.isascii() or _PAIR.search(x) is None))
        or t is bool
        or x is None
        or (t is int and x.bit_length() <= _BIG_INT_BITS)
        or (t is float and math.isfinite(x))
    )


def _enc_dict(d: Any, depth: int, hint: Any, pyd: bool, attrs: bool) -> dict[str, Any]:
    shape = _shape(hint) if hint is not None else None
    out: dict[str, Any] = {}
    paired = False
    for k, x in d.items():
        if type(k) is not str:
            if not isinstance(k, str):
                raise _Bad(
                    f"dict key {_short(k)} is {_tname(k)}; only str keys can be stored as "
                    "JSON: convert the keys with str(), or store a list of (key, value) pairs"
                )
            k = str.__str__(k)
        if not paired and not k.isascii():
            paired = _PAIR.search(k) is not None
        if _is_plain(x):
            out[k] = x
            continue
        try:
            out[k] = _enc(x, depth + 1, shape.key(k) if shape is not None else None, pyd)
        except _Bad as e:
            raise e.at(_attr_seg(k) if attrs else f"[{k!r}]", d) from e.__cause__
    if paired:  # a key holding a surrogate pair: [key, value] pairs, keys encoded (_PAIR)
        return {TAG: "dict", "v": [[_enc(k, 0, None, False), x] for k, x in out.items()]}
    if TAG in out:
        return {TAG: "dict", "v": out}
    return out


def _enc_items(seq: Any, depth: int, hint: Any, pyd: bool) -> list[Any]:
    shape = _shape(hint) if hint is not None else None
    out: list[Any] = []
    append = out.append
    for i, x in enumerate(seq):
        if _is_plain(x):
            append(x)
            continue
        try:
            append(_enc(x, depth + 1, shape.item(i) if shape is not None else None, pyd))
        except _Bad as e:
            raise e.at(f"[{i}]", seq) from e.__cause__
    return out


def _enc_set(items: Any, depth: int, hint: Any, pyd: bool) -> list[Any]:
    shape = _shape(hint) if hint is not None else None
    item_hint = shape.items if shape is not None else None
    out: list[Any] = []
    for x in items:
        try:
            enc = _enc(x, depth + 1, item_hint, pyd)
            if not _hashable_encoded(enc):
                raise _Bad(
                    f"set item {_describe(x)} would be read back as a dict or list, which "
                    "cannot be a set member; store a list instead"
                )
        except _Bad as e:
            raise e.at("{*}", items) from e.__cause__
        out.append(enc)
    out.sort(key=_ENCODER.encode)
    return out


def _enc_other(v: Any, depth: int, hint: Any, pyd: bool) -> Any:
    if isinstance(v, Enum):
        return _enc_enum(v, depth, hint, pyd)
    if isinstance(v, str):
        return _enc(str.__str__(v), depth, hint, pyd)
    if isinstance(v, int):
        return _enc(int.__int__(v), depth, hint, pyd)
    if isinstance(v, float):
        return _enc(float.__float__(v), depth, hint, pyd)
    if isinstance(v, datetime):
        return {TAG: "datetime", "v": datetime.isoformat(v)}
    if isinstance(v, date):
        return {TAG: "date", "v": date.isoformat(v)}
    if isinstance(v, time):
        return {TAG: "time", "v": time.isoformat(v)}
    if isinstance(v, timedelta):
        return {TAG: "timedelta", "v": [v.days, v.seconds, v.microseconds]}
    if isinstance(v, UUID):
        return {TAG: "uuid", "v": str(v)}
    if isinstance(v, Decimal):
        return {TAG: "decimal", "v": str(v)}
    if isinstance(v, (bytes, bytearray)):
        return {TAG: "bytes", "v": base64.b64encode(v).decode("ascii")}
    t = type(v)
    is_dataclass = getattr(t, "__dataclass_fields__", None) is not None
    is_container = (
        isinstance(v, (dict, list, tuple, set, frozenset))
        or is_dataclass
        or callable(getattr(t, "as_dict", None))
        or _is_pydantic_class(t)
    )
    if not is_container:
        if pyd:
            fallback = _pydantic_jsonable(v)
            if fallback is not None:
                return _enc(fallback, depth, None, False)
        raise _unsupported(v)
    if depth >= MAX_DEPTH:
        raise _Bad("", deep=v)
    if isinstance(v, dict):
        return _enc_dict(v, depth, hint, pyd, False)
    if isinstance(v, list):
        return _enc_items(v, depth, hint, pyd)
    if isinstance(v, tuple):
        return {TAG: "tuple", "v": _enc_items(v, depth, hint, pyd)}
    if isinstance(v, frozenset):
        return {TAG: "frozenset", "v": _enc_set(v, depth, hint, pyd)}
    if isinstance(v, set):
        return {TAG: "set", "v": _enc_set(v, depth, hint, pyd)}
    if is_dataclass:
        return _enc_dataclass(v, depth, hint, pyd)
    if _is_pydantic_class(t):
        return _enc_pydantic(v, depth, hint)
    return _enc_as_dict(v, depth, pyd)


def _fields_for(hint: Any, cls: type) -> dict[str, Any] | None:
    if hint is None:
        return None
    shape = _shape(hint)
    return shape.by_class.get(cls) if shape is not None else None


_DC_NAMES: dict[type, tuple[str, ...]] = {}


def _dataclass_names(cls: type) -> tuple[str, ...]:
    names = _DC_NAMES.get(cls)
    if names is None:
        names = tuple(f.name for f in dataclasses.fields(cls) if f.init)
        if len(_DC_NAMES) > _CACHE_LIMIT:
            _DC_NAMES.clear()
        _DC_NAMES[cls] = names
    return names


def _enc_dataclass(v: Any, depth: int, hint: Any, pyd: bool) -> dict[str, Any]:
    cls = type(v)
    fields = _fields_for(hint, cls)
    out: dict[str, Any] = {}
    for name in _dataclass_names(cls):
        x = getattr(v, name)
        if _is_plain(x):
            out[name] = x
            continue
        try:
            out[name] = _enc(x, depth + 1, fields.get(name) if fields else None, pyd)
        except _Bad as e:
            raise e.at(_attr_seg(name), v) from e.__cause__
    if TAG in out:
        return {TAG: "dict", "v": out}
    return out


def _enc_pydantic(v: Any, depth: int, hint: Any) -> Any:
    try:
        dumped = v.model_dump(mode="python", by_alias=True)
    except Exception as exc:
        raise _Bad(f"{_cname(type(v))}.model_dump() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(dumped, dict):  # a RootModel
        return _enc(dumped, depth, None, True)
    fields = _fields_for(hint, type(v))
    out: dict[str, Any] = {}
    for k, x in dumped.items():
        if _is_plain(x):
            out[k] = x
            continue
        try:
            out[k] = _enc(x, depth + 1, fields.get(k) if fields else None, True)
        except _Bad as e:
            raise e.at(_attr_seg(k), v) from e.__cause__
    if TAG in out:
        return {TAG: "dict", "v": out}
    return out


def _enc_as_dict(v: Any, depth: int, pyd: bool) -> Any:
    name = _cname(type(v))
    try:
        d = v.as_dict()
    except Exception as exc:
        raise _Bad(f"{name}.as_dict() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(d, dict):
        raise _Bad(f"{name}.as_dict() returned {_tname(d)}; it must return a dict")
    return _enc_dict(d, depth, None, pyd, True)


def _enc_enum(member: Enum, depth: int, hint: Any, pyd: bool) -> Any:
    value = member.value
    if isinstance(member, type(value)) or (hint is not None and _restorable(member, hint)):
        return _enc(value, depth, None, pyd)
    cls = type(member).__name__
    raise _Bad(
        f"{cls}.{member.name} is a plain Enum member: it would be stored as its value "
        f"{_short(value)} and nothing here says to turn it back into {cls}; "
        f"type the field as {cls} in the {_ROOT} model, or send {cls}.{member.name}.value"
    )


_RESTORABLE: dict[tuple[Any, Any], bool] = {}


def _restorable(member: Enum, hint: Any) -> bool:
    """Whether ``build`` at a position typed ``hint`` turns the stored value back into member."""
    key = (member, hint)
    try:
        return _RESTORABLE[key]
    except KeyError:
        cache = True
    except TypeError:
        cache = False
    stored = _dec(json.loads(_ENCODER.encode(_enc(member.value, 0, None, False))))
    try:
        ok = _converter(hint)(stored) is member
    except Exception:
        ok = False
    if cache:
        if len(_RESTORABLE) > _CACHE_LIMIT:
            _RESTORABLE.clear()
        _RESTORABLE[key] = ok
    return ok


def _pydantic_jsonable(v: Any) -> Any:
    """Inside a pydantic model: what pydantic itself would store for v (None if nothing)."""
    try:
        core = importlib.import_module("pydantic_core")
        return core.to_jsonable_python(v)
    except Exception:
        return None


def _unsupported(v: Any) -> _Bad:
    if isinstance(v, type) or callable(v):
        advice = "functions, classes and other callables cannot be stored; store a value or a name"
    elif isinstance(v, complex):
        advice = "store it as [z.real, z.imag]"
    elif isinstance(v, abc.Mapping):
        advice = "convert it with dict(...)"
    elif isinstance(v, memoryview):
        advice = "convert it with bytes(...)"
    elif isinstance(v, abc.Iterable):
        advice = "convert it with list(...)"
    else:
        advice = (
            "convert it to a supported type (str, int, float, bool, None, list, tuple, set, "
            "dict with str keys, datetime, date, time, timedelta, UUID, Decimal, bytes, Enum, "
            "dataclass, pydantic model), or give its class an as_dict() method"
        )
    return _Bad(f"cannot store {_tname(v)} {_short(v)} as JSON; {advice}")


# --------------------------------------------------------------------------- decoding


def _dec(x: Any) -> Any:
    """Decode tags in a freshly parsed JSON value (containers are changed in place)."""
    t = type(x)
    if t is dict:
        if TAG in x:
            return _dec_tag(x)
        for k, y in x.items():
            ty = type(y)
            if ty is dict or ty is list:
                try:
                    x[k] = _dec(y)
                except _Bad as e:
                    raise e.at(f"[{k!r}]") from e.__cause__
        return x
    if t is list:
        for i, y in enumerate(x):
            ty = type(y)
            if ty is dict or ty is list:
                try:
                    x[i] = _dec(y)
                except _Bad as e:
                    raise e.at(f"[{i}]") from e.__cause__
        return x
    return x


def _payload(value: Any, kind: type, tag: str) -> Any:
    if type(value) is not kind:
        raise _Bad(f"the {tag!r} tag needs a {kind.__name__} payload, got {_describe(value)}")
    return value


_T = TypeVar("_T", datetime, time)


def _fix_offset(value: _T, text: str) -> _T:
    """Re-read a sub-second UTC offset (``+00:00:00.000001``): CPython's fromisoformat
    reads an offset under one second as UTC."""
    if value.tzinfo is None or len(text) < 16 or text[-7] != ".":
        return value
    sign = -1 if text[-16] == "-" else 1
    offset = timedelta(
        hours=int(text[-15:-13]),
        minutes=int(text[-12:-10]),
        seconds=int(text[-9:-7]),
        microseconds=int(text[-6:]),
    )
    return value.replace(tzinfo=timezone(sign * offset))


def _dec_pairs(pairs: list[Any]) -> dict[str, Any]:
    """A dict stored as [key, value] pairs (its keys hold surrogate pairs)."""
    d: dict[str, Any] = {}
    for pair in pairs:
        if type(pair) is not list or len(pair) != 2:
            raise ValueError("expected [key, value] pairs")
        k = _dec(pair[0])
        if type(k) is not str:
            raise ValueError(f"expected a str key, got {_describe(k)}")
        try:
            d[k] = _dec(pair[1])
        except _Bad as e:
            raise e.at(f"[{k!r}]") from e.__cause__
    return d


def _dec_tag(x: dict[str, Any]) -> Any:
    tag = x[TAG]
    if len(x) != 2 or "v" not in x:
        raise _Bad(f"malformed lilota tag {_short(x)}: expected {{{TAG!r}: tag, 'v': payload}}")
    v = x["v"]
    try:
        if tag == "dict":
            if type(v) is list:
                return _dec_pairs(v)
            d = _payload(v, dict, tag)
            for k, y in d.items():
                try:
                    d[k] = _dec(y)
                except _Bad as e:
                    raise e.at(f"[{k!r}]") from e.__cause__
            return d
        if tag in ("tuple", "set", "frozenset"):
            items = _dec(_payload(v, list, tag))
            if tag == "tuple":
                return tuple(items)
            return set(items) if tag == "set" else frozenset(items)
        if tag == "datetime":
            return _fix_offset(datetime.fromisoformat(_payload(v, str, tag)), v)
        if tag == "date":
            return date.fromisoformat(_payload(v, str, tag))
        if tag == "time":
            return _fix_offset(time.fromisoformat(_payload(v, str, tag)), v)
        if tag == "timedelta":
            parts = _payload(v, list, tag)
            if len(parts) != 3 or any(type(p) is not int for p in parts):
                raise ValueError("expected [days, seconds, microseconds]")
            return timedelta(days=parts[0], seconds=parts[1], microseconds=parts[2])
        if tag == "uuid":
            return UUID(_payload(v, str, tag))
        if tag == "decimal":
            return Decimal(_payload(v, str, tag))
        if tag == "bytes":
            return base64.b64decode(_payload(v, str, tag), validate=True)
        if tag == "float":
            text = _payload(v, str, tag)
            if text not in ("nan", "inf", "-inf"):
                raise ValueError("expected 'nan', 'inf' or '-inf'")
            return float(text)
        if tag == "int":
            return int(_payload(v, str, tag), 16)
        if tag == "str":
            pieces = _payload(v, list, tag)
            if any(type(p) is not str for p in pieces):
                raise ValueError("expected a list of strings")
            return "".join(pieces)
    except (ValueError, TypeError, OverflowError, binascii.Error, InvalidOperation) as exc:
        raise _Bad(f"cannot decode the {tag!r} value {_short(v)}: {exc}") from exc
    raise _Bad(
        f"unknown lilota tag {_short(tag)}; it was written by a newer lilota, or the "
        "stored text was changed by hand"
    )


# --------------------------------------------------------------------------- rebuilding


_CONVERTERS: dict[Any, _Conv] = {}


def _identity(v: Any) -> Any:
    return v


def _converter(tp: Any) -> _Conv:
    """The (cached) function that rebuilds a decoded value as type ``tp``."""
    try:
        return _CONVERTERS[tp]
    except KeyError:
        pass
    except TypeError:
        return _make_converter(tp)
    conv = _make_converter(tp)
    if len(_CONVERTERS) > _CACHE_LIMIT:
        _CONVERTERS.clear()
    _CONVERTERS[tp] = conv
    return conv


def _expect(name: str, v: Any) -> _Bad:
    return _Bad(f"expected {name}, got {_describe(v)}")


def _conv_none(v: Any) -> Any:
    if v is not None:
        raise _expect("None", v)
    return None


def _conv_int(v: Any) -> Any:
    if type(v) is int or (isinstance(v, int) and not isinstance(v, bool)):
        return v
    raise _expect("int", v)


def _conv_float(v: Any) -> Any:
    if type(v) is float:
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        try:
            return float(v)
        except OverflowError:
            raise _Bad(f"expected float, got an int too large for a float: {_short(v)}") from None
    if isinstance(v, float):
        return v
    raise _expect("float", v)


def _conv_bool(v: Any) -> Any:
    if isinstance(v, bool):
        return v
    raise _expect("bool", v)


def _conv_str(v: Any) -> Any:
    if isinstance(v, str):
        return v
    raise _expect("str", v)


def _conv_bytes(v: Any) -> Any:
    if isinstance(v, bytes):
        return v
    if isinstance(v, bytearray):
        return bytes(v)
    raise _expect("bytes", v)


def _conv_bytearray(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return bytearray(v)
    raise _expect("bytearray", v)


def _conv_decimal(v: Any) -> Any:
    if isinstance(v, Decimal):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return Decimal(v)
    if isinstance(v, float):
        return Decimal(repr(v))
    raise _expect("Decimal", v)


def _instance_converter(cls: type) -> _Conv:
    name = _cname(cls)

    def conv(v: Any) -> Any:
        if isinstance(v, cls):
            return v
        raise _expect(name, v)

    return conv


_SCALARS: dict[Any, _Conv] = {
    int: _conv_int,
    float: _conv_float,
    bool: _conv_bool,
    str: _conv_str,
    bytes: _conv_bytes,
    bytearray: _conv_bytearray,
    Decimal: _conv_decimal,
    datetime: _instance_converter(datetime),
    date: _instance_converter(date),
    time: _instance_converter(time),
    timedelta: _instance_converter(timedelta),
    UUID: _instance_converter(UUID),
}

_BARE_CONTAINERS: dict[Any, Any] = {
    list: list[Any],
    tuple: tuple[Any, ...],
    set: set[Any],
    frozenset: frozenset[Any],
    dict: dict[str, Any],
}


def _make_converter(tp: Any) -> _Conv:
    tp = _strip(tp)
    if tp is Any or tp is object or isinstance(tp, TypeVar):
        return _identity
    if tp is _NoneType:
        return _conv_none
    origin = get_origin(tp)
    if origin is Union or origin is types.UnionType:
        return _union_converter(tp)
    if origin is Literal:
        return _literal_converter(tp)
    if origin is not None:
        args = get_args(tp)
        if origin in _SEQUENCE_ORIGINS:
            return _sequence_converter(tp, args, keep_tuple=origin is not list)
        if origin is tuple:
            return _tuple_converter(tp, args)
        if origin in _SET_ORIGINS:
            return _set_converter(tp, args, frozen=origin is frozenset)
        if origin in _MAPPING_ORIGINS:
            return _dict_converter(tp, args)
        if not isinstance(origin, type):
            return _identity
        tp = origin  # a user generic class: MyModel[int]
    if not isinstance(tp, type):
        return _identity  # Callable, ForwardRef and other forms lilota does not check
    scalar = _SCALARS.get(tp)
    if scalar is not None:
        return scalar
    bare = _BARE_CONTAINERS.get(tp)
    if bare is not None:
        return _converter(bare)
    if issubclass(tp, Enum):
        return _enum_converter(tp)
    if dataclasses.is_dataclass(tp):
        return _dataclass_converter(tp)
    if _is_pydantic_class(tp):
        return _pydantic_converter(tp)
    if callable(getattr(tp, "as_dict", None)):
        return _protocol_converter(tp)
    if typing.is_typeddict(tp):
        return _converter(dict[str, Any])
    return _instance_converter(tp)


def _exact_type(tp: Any) -> Any:
    """The decoded Python type that matches ``tp`` exactly (for picking a Union arm)."""
    origin = get_origin(tp) or tp
    if origin in _SCALARS or origin in _BARE_CONTAINERS or origin is _NoneType:
        return origin
    return None


def _union_converter(tp: Any) -> _Conv:
    args = [_strip(a) for a in get_args(tp)]
    has_none = _NoneType in args
    arms = [(_converter(a), _exact_type(a)) for a in args if a is not _NoneType]
    if len(arms) == 1 and not has_none:
        return arms[0][0]
    if len(arms) == 1:
        only = arms[0][0]

        def optional(v: Any) -> Any:
            return None if v is None else only(v)

        return optional
    name = _hname(tp)

    def conv(v: Any) -> Any:
        if v is None and has_none:
            return None
        t = type(v)
        for arm, exact in arms:  # first the arms that v already is, exactly
            if exact is t:
                try:
                    return arm(v)
                except _Bad:
                    pass
        for arm, exact in arms:  # then the others, in declared order
            if exact is not t:
                try:
                    return arm(v)
                except _Bad:
                    pass
        raise _expect(name, v)

    return conv


def _same_kind(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b)
    if isinstance(a, str) and isinstance(b, str):
        return True
    return type(a) is type(b)


def _literal_converter(tp: Any) -> _Conv:
    options = get_args(tp)
    name = _hname(tp)

    def conv(v: Any) -> Any:
        for option in options:
            if v is option:
                return option
            if isinstance(option, Enum):
                value = option.value
                if not isinstance(v, Enum) and _same_kind(v, value) and v == value:
                    return option
            elif _same_kind(v, option) and v == option:
                return option
        raise _expect(name, v)

    return conv


def _enum_converter(cls: type[Enum]) -> _Conv:
    name = _cname(cls)

    def conv(v: Any) -> Any:
        if isinstance(v, cls):
            return v
        try:
            member = cls(v)
        except (ValueError, TypeError):
            member = None
        if member is None or not _same_kind(v, member.value):
            values = ", ".join(_short(m.value, 30) for m in list(cls)[:10])
            raise _Bad(
                f"expected {name} (a value of {values}{', ...' if len(cls) > 10 else ''}), "
                f"got {_describe(v)}"
            )
        return member

    return conv


def _sequence_converter(tp: Any, args: tuple[Any, ...], *, keep_tuple: bool) -> _Conv:
    item = _converter(args[0]) if args else _identity
    name = _hname(tp)

    def conv(v: Any) -> Any:
        if not isinstance(v, (list, tuple)):
            raise _expect(name, v)
        if item is _identity:
            return v if type(v) is list or (keep_tuple and type(v) is tuple) else list(v)
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except _Bad as e:
                raise e.at(f"[{i}]") from e.__cause__
        return tuple(out) if keep_tuple and isinstance(v, tuple) else out

    return conv


def _tuple_converter(tp: Any, args: tuple[Any, ...]) -> _Conv:
    name = _hname(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        item = _converter(args[0])
        fixed: list[_Conv] | None = None
    elif not args:
        item, fixed = _identity, None
    else:
        item = _identity
        fixed = [] if args == ((),) else [_converter(a) for a in args]

    def conv(v: Any) -> Any:
        if not isinstance(v, (list, tuple)):
            raise _expect(name, v)
        if fixed is not None and len(v) != len(fixed):
            raise _Bad(f"expected {name} ({len(fixed)} items), got {len(v)} items")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(fixed[i](x) if fixed is not None else item(x))
            except _Bad as e:
                raise e.at(f"[{i}]") from e.__cause__
        return tuple(out)

    return conv


def _set_converter(tp: Any, args: tuple[Any, ...], *, frozen: bool) -> _Conv:
    item = _converter(args[0]) if args else _identity
    name = _hname(tp)
    make: Callable[[Any], Any] = frozenset if frozen else set

    def conv(v: Any) -> Any:
        if not isinstance(v, (set, frozenset, list, tuple)):
            raise _expect(name, v)
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except _Bad as e:
                raise e.at("{*}" if isinstance(v, (set, frozenset)) else f"[{i}]") from (
                    e.__cause__
                )
        try:
            return make(out)
        except TypeError as exc:
            raise _Bad(f"expected {name}, got unhashable items: {exc}") from exc

    return conv


def _dict_converter(tp: Any, args: tuple[Any, ...]) -> _Conv:
    name = _hname(tp)
    key = _converter(args[0]) if len(args) == 2 and args[0] is not str else _identity
    value = _converter(args[1]) if len(args) == 2 else _identity

    def conv(v: Any) -> Any:
        if not isinstance(v, dict):
            raise _expect(name, v)
        if key is _identity and value is _identity:
            return v
        out = {}
        for k, x in v.items():
            try:
                k2 = key(k)
            except _Bad as e:
                raise _Bad(f"bad key: {e.message}").at(f"[{k!r}]") from e.__cause__
            try:
                out[k2] = value(x)
            except _Bad as e:
                raise e.at(f"[{k!r}]") from e.__cause__
        return out

    return conv


def _expected_model(cls: type, v: Any) -> str:
    return f"expected {_cname(cls)} (or a dict of its fields), got {_describe(v)}"


def _dataclass_converter(cls: type) -> _Conv:
    plan: tuple[frozenset[str], list[tuple[str, _Conv, bool]]] | None = None

    def make_plan() -> tuple[frozenset[str], list[tuple[str, _Conv, bool]]]:
        hints = _type_hints(cls)
        all_fields = dataclasses.fields(cls)
        names = frozenset(f.name for f in all_fields)
        fields = [
            (
                f.name,
                _converter(hints.get(f.name, Any)),
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in all_fields
            if f.init
        ]
        return names, fields

    def conv(v: Any) -> Any:
        nonlocal plan
        if isinstance(v, cls):
            return v
        if not isinstance(v, dict):
            raise _Bad(_expected_model(cls, v))
        if plan is None:
            plan = make_plan()
        names, fields = plan
        kwargs: dict[str, Any] = {}
        for name, field_conv, required in fields:
            if name in v:
                try:
                    kwargs[name] = field_conv(v[name])
                except _Bad as e:
                    raise e.at(_attr_seg(name)) from e.__cause__
            elif required:
                raise _Bad("missing required field").at(_attr_seg(name))
        if len(v) > len(kwargs):
            for k in v:
                if k not in names:
                    known = ", ".join(name for name, _, _ in fields)
                    raise _Bad(f"unknown field ({_cname(cls)} has fields {known})").at(_attr_seg(k))
        try:
            return cls(**kwargs)
        except Exception as exc:
            raise _Bad(f"{_cname(cls)}(...) raised {type(exc).__name__}: {exc}") from exc

    return conv


def _pydantic_details(exc: Any) -> list[tuple[str, str]]:
    details: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        rel = "".join(_attr_seg(p) if isinstance(p, str) else f"[{p!r}]" for p in err["loc"])
        kind = err.get("type")
        if kind == "missing":
            msg = "missing required field"
        elif kind == "extra_forbidden":
            msg = "unknown field"
        else:
            msg = f"{err['msg']} (got {_describe(err.get('input'))})"
        details.append((rel, msg))
    return details or [("", str(exc))]


def _pydantic_converter(cls: type) -> _Conv:
    def conv(v: Any) -> Any:
        if isinstance(v, cls):
            return v
        if not isinstance(v, dict) and not _is_root_model(cls):
            raise _Bad(_expected_model(cls, v))
        error_type = sys.modules["pydantic"].ValidationError
        try:
            return cls.model_validate(v)  # type: ignore[attr-defined]
        except error_type as exc:
            raise _Bad("", details=_pydantic_details(exc)) from exc

    return conv


def _is_root_model(cls: type) -> bool:
    return "root" in getattr(cls, "model_fields", {}) and any(
        c.__name__ == "RootModel" for c in cls.__mro__
    )


def _protocol_converter(cls: type) -> _Conv:
    from_dict = getattr(cls, "from_dict", None)
    how = f"{_cname(cls)}.from_dict(...)" if callable(from_dict) else f"{_cname(cls)}(**...)"

    def conv(v: Any) -> Any:
        if isinstance(v, cls):
            return v
        if not isinstance(v, dict):
            raise _Bad(_expected_model(cls, v))
        try:
            if callable(from_dict):
                return from_dict(v)
            return cls(**v)
        except Exception as exc:
            raise _Bad(f"{how} raised {type(exc).__name__}: {exc}") from exc

    return conv


# --------------------------------------------------------------------------- public API


def check_model(model: object, *, role: str) -> None:
    """Refuse, at registration, a model lilota cannot store.

    Accepted: ``None``, ``dict``, a dataclass type, a pydantic v2 ``BaseModel`` subclass,
    or a class with an ``as_dict`` method (:class:`~lilota.models.ModelProtocol`). For a
    dataclass, its type hints (and those of dataclasses it names) must resolve. Anything
    else raises :class:`~lilota.errors.RegistrationError` naming ``role`` (``"input_model"``
    or ``"output_model"``) and the object.
    """
    if model is None or model is dict:
        return
    if isinstance(model, type):
        if dataclasses.is_dataclass(model):
            _check_hints(model, set())
            return
        if _is_pydantic_class(model) or callable(getattr(model, "as_dict", None)):
            return
    if _is_pydantic_v1_class(model):
        advice = "pydantic v1 models are not supported; use pydantic v2 (pydantic.BaseModel)"
    elif not isinstance(model, type) and _is_model_class(type(model)):
        advice = f"pass the class {_cname(type(model))} itself, not an instance"
    elif get_origin(model) in _MAPPING_ORIGINS:
        advice = "use dict (lilota does not check the key and value types of a plain dict)"
    else:
        advice = (
            "it must be None, dict, a dataclass, a pydantic v2 BaseModel subclass, or a "
            "class with an as_dict() method (lilota.models.ModelProtocol)"
        )
    raise RegistrationError(f"{role}={_short(model, 80)} cannot be used: {advice}")


def _check_hints(tp: Any, seen: set[int]) -> None:
    """Resolve the hints of a dataclass and of the dataclasses it names (RegistrationError)."""
    for arm in _walk_hint(tp):
        if _is_dataclass_class(arm) and id(arm) not in seen:
            seen.add(id(arm))
            for hint in _type_hints(arm).values():
                _check_hints(hint, seen)


def _walk_hint(tp: Any) -> list[Any]:
    tp = _strip(tp)
    out = [tp]
    for arg in get_args(tp):
        if arg is not Ellipsis and not isinstance(arg, (str, int, bytes, bool, Enum)):
            out.extend(_walk_hint(arg))
    return out


def dumps(value: Any, *, model: type | None = None, root: str = "input") -> str | None:
    """Encode ``value`` as JSON text (pure ASCII); ``None`` gives ``None`` (SQL NULL).

    ``model`` is the declared model (or None): it tells which positions are typed, where a
    plain Enum member may be stored as its value because :func:`build` will restore it.
    ``dumps`` does not check that ``value`` fits ``model``: :func:`prepare` does.

    Raises :class:`~lilota.errors.SerializationError` naming the path of the offending
    value (``input.items[2].when``), its type and what to do instead.
    """
    if value is None:
        return None
    hint = None if model is None or model is dict else model
    try:
        encoded = _enc(value, 0, hint, False)
    except _Bad as e:
        raise SerializationError(e.render(root)) from e.__cause__
    except RecursionError:
        raise SerializationError(
            f"{root}: nested too deeply to store (at most {MAX_DEPTH} levels)"
        ) from None
    return _ENCODER.encode(encoded)


def loads(text: str | None) -> Any:
    """Decode JSON text written by :func:`dumps` into plain Python values.

    Tagged values (datetime, tuple, set, Decimal...) are decoded; models come back as
    dicts. ``None`` gives ``None``. Text that is not valid JSON, or holds an unknown or
    malformed tag, raises :class:`~lilota.errors.SerializationError`.
    """
    if text is None:
        return None
    if not isinstance(text, str):
        raise SerializationError(f"stored value must be JSON text (str), got {_tname(text)}")
    try:
        raw = json.loads(text)
    except RecursionError:
        raise SerializationError("stored value is nested too deeply to read") from None
    except ValueError as exc:
        raise SerializationError(f"stored value is not valid JSON ({exc}): {_short(text)}") from exc
    try:
        return _dec(raw)
    except _Bad as e:
        raise SerializationError(e.render("stored value")) from e.__cause__
    except RecursionError:
        raise SerializationError("stored value is nested too deeply to read") from None


def build(value: Any, model: type | None, *, root: str = "input") -> Any:
    """Rebuild a :func:`loads`-decoded value as ``model``: what the task function receives.

    ``model`` None or ``dict``: ``value`` unchanged. A dataclass is rebuilt field by field
    from its type hints; a pydantic model with ``model_validate``; another ``as_dict``
    class with ``from_dict(d)`` if it has one, else ``model(**d)``. ``value`` None with a
    model class means "no fields given" (defaults only).

    Raises :class:`~lilota.errors.InvalidInput` naming the field path, e.g.
    ``input.b: missing required field`` or ``input.a: expected int, got str 'x'``.
    """
    if model is None or model is dict:
        return value
    conv = _converter(model)
    if value is None and _is_model_class(model):
        try:
            return conv({})
        except _Bad as e:
            raise InvalidInput(
                f"{root}: {_expected_model(model, None)}; {e.render(root)}"
            ) from e.__cause__
    try:
        return conv(value)
    except _Bad as e:
        raise InvalidInput(e.render(root)) from e.__cause__


def prepare(value: Any, model: type | None, *, root: str = "input") -> str | None:
    """Check ``value`` fits ``model`` and return its JSON text (what ``schedule()`` stores).

    ``value`` may be an instance of ``model`` or a dict that :func:`build` can turn into
    ``model`` (the dict is stored as given). The text is decoded and rebuilt here, exactly
    as the worker will, so an error means nothing should be stored: raises
    :class:`~lilota.errors.InvalidInput` when the value does not fit and
    :class:`~lilota.errors.SerializationError` when it cannot be stored.
    """
    if model is None:
        return dumps(value, root=root)
    if model is dict:
        if value is not None and not isinstance(value, dict):
            raise InvalidInput(f"{root}: expected a dict, got {_tname(value)}")
        return dumps(value, root=root)
    if value is None:
        build(None, model, root=root)
        return None
    if _is_model_class(model) and not isinstance(value, (model, dict)):
        raise InvalidInput(
            f"{root}: expected {_cname(model)} (or a dict of its fields), got {_tname(value)}"
        )
    text = dumps(value, model=model, root=root)
    build(loads(text), model, root=root)
    return text
