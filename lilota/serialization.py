"""Task inputs and outputs as JSON text, and back (never pickle).

lilota keeps a task's ``input`` and ``output`` as JSON text in a TEXT column, so every
string, exact float and big int survives. The seams:

- ``dumps(value, model=None) -> str | None``: the JSON text (pure ASCII; ``None`` gives
  ``None``, stored as SQL NULL). Raises :class:`~lilota.errors.SerializationError` for a
  value it cannot store.
- ``loads(text)``: the stored values, with models as plain dicts (what ``Task.input`` and
  ``Task.output`` hold). A decode error is a ``SerializationError`` that keeps the bad input
  (it quotes the text, or names the path of the bad tag and quotes it) and says what is wrong.
- ``build(value, model)``: a loaded value rebuilt as the declared model, as the task function
  receives it. Raises :class:`~lilota.errors.InvalidInput` when the value does not fit.
- ``prepare(value, model) -> str | None``: what ``schedule()`` stores. The value is dumped,
  loaded and built here exactly as the worker will, so ``InvalidInput`` or
  ``SerializationError`` is raised before anything is written.
- ``check_model(model, role=...)``: at registration, :class:`~lilota.errors.RegistrationError`
  for a model lilota cannot store.

Every message names the path of the bad value (``input.items[2].when``, ``input['k']``; set
items show as ``{*}``), its type, and what to do instead.

The stored format never changes. ``None``, ``bool``, ``str``, ``int``, finite ``float``,
``list`` and ``dict`` with ``str`` keys are JSON as they are; any other value is stored as
``{"__lilota__": tag, "v": payload}``, one row of the type table (``_TAGGED_TYPES``) per tag.
A model is stored as the dict of its fields: a dataclass's ``init`` fields, a pydantic v2
model's ``model_dump(mode="python", by_alias=True)``, or ``as_dict()``. ``build`` rebuilds a
dataclass field by field from its type hints (nested models, Optional/Union, containers of X,
Literal, Enums, the tagged types; defaults for missing fields; ``init=False`` fields ignored),
a pydantic model with ``model_validate``, another class with ``from_dict(d)`` if it has one,
else ``Model(**d)``. An ``int`` fits a ``float`` or ``Decimal`` field, a ``bool`` never fits an
``int``, a list fits a tuple or set field and a tuple a list field. An ``Enum`` member is
stored as its value; ``build`` restores the member where the model types the position, and
elsewhere only enums equal to their value (``class C(str, Enum)``, ``IntEnum``) are accepted.
Refused: non-``str`` dict keys, nesting deeper than 200 containers, reference cycles, set
items that would come back unhashable, and any other type.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import importlib
import json
import math
import re
import sys
import types
import typing
from collections import abc
from collections.abc import Callable, Iterable
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal, InvalidOperation
from enum import Enum
from typing import Any, Literal, NamedTuple, TypeVar, Union, get_args, get_origin
from uuid import UUID

from lilota.errors import InvalidInput, RegistrationError, SerializationError

__all__ = ["MAX_DEPTH", "TAG", "build", "check_model", "dumps", "loads", "prepare"]

TAG = "__lilota__"
"""The key that marks a tagged value in the stored JSON."""

MAX_DEPTH = 200
"""The most containers (dicts, lists, models...) that may be nested inside each other."""

_BIG_INT_BITS = 2000  # below every int_max_str_digits setting (>= 640 digits)
# Entries a cache (by type or hint) holds before it is emptied: bounds memory in programs
# that make classes on the fly, far above the types a real program stores.
_CACHE_LIMIT = 4096
_ROOT = "\x00root\x00"  # replaced by the root name ("input", "output") when rendered
_NoneType = type(None)
_ENCODER = json.JSONEncoder(
    ensure_ascii=True, allow_nan=False, check_circular=False, separators=(",", ":")
)
# A high surrogate followed by a low one: written as JSON they would be read back as the
# one character the pair encodes, so strings holding one are stored tagged ("str").
_PAIR = re.compile(r"[\ud800-\udbff][\udc00-\udfff]")
_SEQUENCES = frozenset({list, abc.Sequence, abc.MutableSequence, abc.Collection, abc.Iterable})
_SETS = frozenset({set, frozenset, abc.Set, abc.MutableSet})
_MAPPINGS = frozenset({dict, abc.Mapping, abc.MutableMapping})
_Converter = Callable[[Any], Any]  # rebuilds a decoded value as one type
_EncodeFn = Callable[[Any, int, Any, bool], Any]  # (value, depth, hint, in pydantic) -> JSON


def dumps(value: Any, *, model: type | None = None, root: str = "input") -> str | None:
    """Encode ``value`` as JSON text; ``None`` gives ``None``. ``model`` says which positions
    are typed (where a plain Enum member may be stored, as ``build`` restores it); that the
    value fits it is checked by :func:`prepare`, not here. Raises ``SerializationError``."""
    if value is None:
        return None
    try:
        encoded = _encode(value, 0, None if model is dict else model, False)
    except _PathError as e:
        raise SerializationError(e.render(root)) from e.__cause__
    except RecursionError:
        raise SerializationError(
            f"{root}: nested too deeply to store (at most {MAX_DEPTH} levels)"
        ) from None
    return _ENCODER.encode(encoded)


def loads(text: str | None) -> Any:
    """Decode text written by :func:`dumps` into plain values (models as dicts); ``None``
    gives ``None``. Raises ``SerializationError`` quoting text that is not JSON, or naming
    the path of an unknown or malformed tag and what is wrong with it."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise SerializationError(f"stored value must be JSON text (str), got {_type_name(text)}")
    try:
        return _decode(json.loads(text))
    except ValueError as exc:  # not JSON (a bad tag raises _PathError)
        raise SerializationError(f"stored value is not valid JSON ({exc}): {_short(text)}") from exc
    except _PathError as e:
        raise SerializationError(e.render("stored value")) from e.__cause__
    except RecursionError:
        raise SerializationError("stored value is nested too deeply to read") from None


def build(value: Any, model: type | None, *, root: str = "input") -> Any:
    """Rebuild a :func:`loads`-decoded value as ``model`` (None or ``dict``: as it is; a
    ``value`` of None for a model class: "no fields given"). Raises ``InvalidInput`` naming
    the field path: ``input.b: missing required field``, ``input.a: expected int, got...``."""
    if model is None or model is dict:
        return value
    conv = _converter(model)
    try:
        if value is None and _model_of(model) is not None:
            try:
                return conv({})
            except _PathError as e:
                raise _PathError(
                    f"{_expected_model(model, None)}; {e.render(root)}"
                ) from e.__cause__
        return conv(value)
    except _PathError as e:
        raise InvalidInput(e.render(root)) from e.__cause__


def prepare(value: Any, model: type | None, *, root: str = "input") -> str | None:
    """Check ``value`` (a ``model``, or a dict of its fields, stored as given) fits ``model``
    and return its text, decoded and rebuilt here exactly as the worker will: an error means
    nothing should be stored (``InvalidInput``: it does not fit; ``SerializationError``)."""
    if model is dict and value is not None and not isinstance(value, dict):
        raise InvalidInput(f"{root}: expected a dict, got {_type_name(value)}")
    if model is None or model is dict:
        return dumps(value, root=root)
    if value is None:
        build(None, model, root=root)
        return None
    if _model_of(model) is not None and not isinstance(value, (model, dict)):
        raise InvalidInput(
            f"{root}: expected {_class_name(model)} (or a dict of its fields), "
            f"got {_type_name(value)}"
        )
    text = dumps(value, model=model, root=root)
    build(loads(text), model, root=root)
    return text


def check_model(model: object, *, role: str) -> None:
    """Raise ``RegistrationError`` (naming ``role`` and ``model``) unless ``model`` is None,
    ``dict``, a dataclass (whose type hints, and those of the dataclasses it names, resolve),
    a pydantic v2 model or a class with ``as_dict()`` (:class:`~lilota.models.ModelProtocol`)."""
    found = _model_of(model)
    if isinstance(found, _DataclassModel):
        _check_hints(model, set())
    if model is None or model is dict or found is not None:
        return
    if _is_pydantic(model, "pydantic.v1"):
        advice = "pydantic v1 models are not supported; use pydantic v2 (pydantic.BaseModel)"
    elif not isinstance(model, type) and _model_of(type(model)) is not None:
        advice = f"pass the class {_class_name(type(model))} itself, not an instance"
    elif get_origin(model) in _MAPPINGS:
        advice = "use dict (lilota does not check the key and value types of a plain dict)"
    else:
        advice = (
            "it must be None, dict, a dataclass, a pydantic v2 BaseModel subclass, or a "
            "class with an as_dict() method (lilota.models.ModelProtocol)"
        )
    raise RegistrationError(f"{role}={_short(model, 80)} cannot be used: {advice}")


def _check_hints(tp: Any, seen: set[int]) -> None:
    tp = _strip(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and id(tp) not in seen:
        seen.add(id(tp))
        for hint in _type_hints(tp).values():
            _check_hints(hint, seen)
    for arg in get_args(tp):
        if arg is not Ellipsis and not isinstance(arg, (str, int, bytes, bool, Enum)):
            _check_hints(arg, seen)


# --------------------------------------------------------------------------- errors


class _PathError(Exception):
    """Internal refusal; each container adds its path segment while it unwinds. ``deep``:
    the container found too deep; the containers passed on the way out reveal a cycle."""

    def __init__(self, message: str, *, deep: Any = None, details: Any = None) -> None:
        super().__init__(message)
        self.message, self.deep, self.details = message, deep is not None, details
        self.segs: list[str] = []
        self.objs: list[Any] = [deep]

    def at(self, seg: str, container: Any = None) -> _PathError:
        self.segs.append(seg)
        if self.deep:
            self.objs.append(container)
        return self

    def render(self, root: str) -> str:
        segs = self.segs[::-1]
        path = root + "".join(segs)
        if self.details:
            return "; ".join(f"{path}{rel}: {msg}" for rel, msg in self.details)
        if not self.deep:
            return f"{path}: {self.message.replace(_ROOT, root)}"
        seen: dict[int, int] = {}
        for j, obj in enumerate(self.objs[::-1]):
            i = seen.setdefault(id(obj), j)
            if i != j:
                return (
                    f"{_clip(root + ''.join(segs[:j]))}: reference cycle: this is the same "
                    f"{_type_name(obj)} object as {_clip(root + ''.join(segs[:i]))}, which "
                    "contains it; lilota cannot store a value that contains itself"
                )
        return (
            f"{_clip(path)}: nested deeper than {MAX_DEPTH} levels; flatten the value "
            f"(lilota stores at most {MAX_DEPTH} nested containers)"
        )


def _clip(path: str, limit: int = 200) -> str:
    return path if len(path) <= limit else path[:80] + " ... " + path[-(limit - 85) :]


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


# --------------------------------------------------------------------------- encoding


def _encode(v: Any, depth: int, hint: Any, in_pydantic: bool) -> Any:
    """Encode one value. ``hint`` is its declared type (None: untyped); ``in_pydantic``: it is
    inside a pydantic model, which may hold other types that pydantic can make JSON of."""
    t = type(v)
    if t is str:
        return v if v.isascii() or _PAIR.search(v) is None else _tag("str", v)
    if t is bool or v is None:
        return v
    if t is int:
        return v if v.bit_length() <= _BIG_INT_BITS else _tag("int", v)
    if t is float:
        return v if math.isfinite(v) else _tag("float", v)
    if t is dict:
        return _encode_fields(v.items(), v, depth, hint, in_pydantic)
    if t is list:
        return _encode_items(v, depth, hint, in_pydantic)
    encode = _ENCODERS.get(t) or _cache(_ENCODERS, t, _find_encoder(t))
    return encode(v, depth, hint, in_pydantic)


def _is_plain(x: Any) -> bool:
    """Whether ``x`` is stored as it is (the fast path in containers)."""
    t = type(x)
    return (
        (t is str and (x.isascii() or _PAIR.search(x) is None))
        or t is bool
        or x is None
        or (t is int and x.bit_length() <= _BIG_INT_BITS)
        or (t is float and math.isfinite(x))
    )


def _tag(tag: str, value: Any) -> dict[str, Any]:
    return {TAG: tag, "v": _TAGGED_TYPES[tag].encode(value)}


_ENCODERS: dict[type, _EncodeFn] = {}  # type -> how to encode it, past the fast path of _encode
_BASES = {str: str.__str__, int: int.__int__, float: float.__float__}


def _find_encoder(cls: type) -> _EncodeFn:
    if issubclass(cls, Enum):
        return _encode_enum
    for base, to_base in _BASES.items():
        if issubclass(cls, base):  # stored as the base type's value
            return lambda v, *walk: _encode(to_base(v), *walk)
    row = next((row for row in _TAGGED_TYPES.values() if issubclass(cls, row.types)), None)
    if row is not None:
        return _row_encoder(row.tag, row.encode, row.nests)
    if issubclass(cls, dict):
        return _encode_dict
    if issubclass(cls, list):
        return _encode_items
    model = _model_of(cls)
    return model.encode if model is not None else _encode_unsupported


def _row_encoder(tag: str, encode: Callable[..., Any], nests: bool) -> _EncodeFn:
    if nests:  # a container: its encode walks the items
        return lambda v, *walk: {TAG: tag, "v": encode(v, *walk)}
    return lambda v, *_: {TAG: tag, "v": encode(v)}


def _encode_dict(d: dict[Any, Any], depth: int, hint: Any, in_pydantic: bool) -> Any:
    return _encode_fields(d.items(), d, depth, hint, in_pydantic)


def _encode_fields(
    pairs: Iterable[tuple[Any, Any]],
    owner: Any,
    depth: int,
    hint: Any,
    in_pydantic: bool,
    cls: Any = None,
) -> Any:
    """The field walker: a dict (``cls`` None) or the fields of a model of class ``cls`` as a
    JSON object. ``owner`` is the object the path passes through (to tell a cycle)."""
    if depth >= MAX_DEPTH:
        raise _PathError("", deep=owner)
    fields = values = None
    if hint is not None and (shape := _shape(hint)) is not None:
        fields, values = (shape.fields, shape.values)
        if cls is not None:
            fields, values = shape.by_class.get(cls), None
    out: dict[str, Any] = {}
    paired = False
    for k, x in pairs:
        if type(k) is not str:
            if not isinstance(k, str):
                raise _PathError(
                    f"dict key {_short(k)} is {_type_name(k)}; only str keys can be stored as "
                    "JSON: convert the keys with str(), or store a list of (key, value) pairs"
                )
            k = str.__str__(k)
        if not paired and not k.isascii():
            paired = _PAIR.search(k) is not None
        if _is_plain(x):
            out[k] = x
            continue
        try:
            out[k] = _encode(
                x, depth + 1, fields.get(k) if fields is not None else values, in_pydantic
            )
        except _PathError as e:
            raise e.at(f"[{k!r}]" if cls is None else _attr_seg(k), owner) from e.__cause__
    return _tag("dict", out) if paired or TAG in out else out


def _encode_items(items: Any, depth: int, hint: Any, in_pydantic: bool) -> list[Any]:
    """A list's or tuple's items as a JSON array."""
    if depth >= MAX_DEPTH:
        raise _PathError("", deep=items)
    shape = _shape(hint) if hint is not None else None
    out: list[Any] = []
    append = out.append
    for i, x in enumerate(items):
        if _is_plain(x):
            append(x)
            continue
        try:
            append(_encode(x, depth + 1, shape.item(i) if shape is not None else None, in_pydantic))
        except _PathError as e:
            raise e.at(f"[{i}]", items) from e.__cause__
    return out


def _encode_set(items: Any, depth: int, hint: Any, in_pydantic: bool) -> list[Any]:
    """A set's items as a JSON array, sorted by their text (so that the text is stable)."""
    if depth >= MAX_DEPTH:
        raise _PathError("", deep=items)
    shape = _shape(hint) if hint is not None else None
    out: list[Any] = []
    for x in items:
        try:
            out.append(enc := _encode(x, depth + 1, shape.items if shape else None, in_pydantic))
            if not _hashable(enc):
                raise _PathError(
                    f"set item {_describe(x)} would be read back as a dict or list, which "
                    "cannot be a set member; store a list instead"
                )
        except _PathError as e:
            raise e.at("{*}", items) from e.__cause__
    return sorted(out, key=_ENCODER.encode)


def _hashable(enc: Any) -> bool:
    """Whether an encoded value decodes to something hashable (a set member)."""
    tag = enc.get(TAG) if type(enc) is dict else None
    if tag == "tuple" or tag == "frozenset":
        return all(_hashable(item) for item in enc["v"])
    return type(enc) is not list and (type(enc) is not dict or tag not in (None, "dict", "set"))


def _encode_enum(member: Enum, depth: int, hint: Any, in_pydantic: bool) -> Any:
    value = member.value
    if isinstance(member, type(value)) or (hint is not None and _restorable(member, hint)):
        return _encode(value, depth, None, in_pydantic)
    cls = type(member).__name__
    raise _PathError(
        f"{cls}.{member.name} is a plain Enum member: it would be stored as its value "
        f"{_short(value)} and nothing here says to turn it back into {cls}; "
        f"type the field as {cls} in the {_ROOT} model, or send {cls}.{member.name}.value"
    )


_RESTORABLE: dict[tuple[Any, Any], bool] = {}


def _restorable(member: Enum, hint: Any) -> bool:
    """Whether ``build`` at a position typed ``hint`` turns the stored value back into member."""
    try:
        return _RESTORABLE[member, hint]
    except (KeyError, TypeError):  # TypeError: an unhashable hint, not cached
        pass
    stored = _decode(json.loads(_ENCODER.encode(_encode(member.value, 0, None, False))))
    try:
        ok = _converter(hint)(stored) is member
    except Exception:
        ok = False
    try:
        return _cache(_RESTORABLE, (member, hint), ok)  # type: ignore[no-any-return]
    except TypeError:
        return ok


_ADVICE = (
    (complex, "store it as [z.real, z.imag]"),
    (abc.Mapping, "convert it with dict(...)"),
    (memoryview, "convert it with bytes(...)"),
    (abc.Iterable, "convert it with list(...)"),
    (object, "convert it to a supported type (str, int, float, bool, None, list, tuple, set, "
     "dict with str keys, datetime, date, time, timedelta, UUID, Decimal, bytes, Enum, "
     "dataclass, pydantic model), or give its class an as_dict() method"),
)  # fmt: skip


def _encode_unsupported(v: Any, depth: int, hint: Any, in_pydantic: bool) -> Any:
    try:  # inside a pydantic model: what pydantic itself would store for v
        fallback = (
            importlib.import_module("pydantic_core").to_jsonable_python(v) if in_pydantic else None
        )
    except Exception:
        fallback = None
    if fallback is not None:
        return _encode(fallback, depth, None, False)
    advice = next(text for cls, text in _ADVICE if isinstance(v, cls))
    if isinstance(v, type) or callable(v):
        advice = "functions, classes and other callables cannot be stored; store a value or a name"
    raise _PathError(f"cannot store {_type_name(v)} {_short(v)} as JSON; {advice}")


# --------------------------------------------------------------------------- decoding


def _decode(x: Any) -> Any:
    """Decode the tags in a freshly parsed JSON value (containers are changed in place)."""
    t = type(x)
    if t is dict:
        if TAG in x:
            return _decode_tag(x)
        for k, y in x.items():
            if type(y) is dict or type(y) is list:
                try:
                    x[k] = _decode(y)
                except _PathError as e:
                    raise e.at(f"[{k!r}]") from e.__cause__
    elif t is list:
        for i, y in enumerate(x):
            if type(y) is dict or type(y) is list:
                try:
                    x[i] = _decode(y)
                except _PathError as e:
                    raise e.at(f"[{i}]") from e.__cause__
    return x


def _decode_tag(x: dict[str, Any]) -> Any:
    tag = x[TAG]
    if len(x) != 2 or "v" not in x:
        raise _PathError(
            f"malformed lilota tag {_short(x)}: expected {{{TAG!r}: tag, 'v': payload}}"
        )
    try:
        payload, nests, decode = _DECODERS[tag]
    except (KeyError, TypeError):  # TypeError: a tag that is a list or a dict
        raise _PathError(
            f"unknown lilota tag {_short(tag)}; it was written by a newer lilota, or the "
            "stored text was changed by hand"
        ) from None
    v = x["v"]
    if payload is not None and type(v) is not payload:
        raise _PathError(f"the {tag!r} tag needs a {payload.__name__} payload, got {_describe(v)}")
    try:
        return decode(_decode(v)) if nests else decode(v)
    except (ValueError, TypeError, OverflowError, binascii.Error, InvalidOperation) as exc:
        raise _PathError(f"cannot decode the {tag!r} value {_short(v)}: {exc}") from exc


# --------------------------------------------------------------------------- the type table


class _TaggedType(NamedTuple):
    """A type JSON cannot hold as it is, stored as ``{TAG: tag, "v": payload}``."""

    tag: str
    types: tuple[type, ...]  # always stored so; (): only values JSON cannot hold (see _encode)
    nests: bool  # a container: encode walks it (value, depth, hint, in_pydantic); decode
    #              gets the items already decoded
    encode: Callable[..., Any]  # value -> payload
    payload: type | None  # the JSON type the payload must be (None: decode checks)
    decode: Callable[[Any], Any]  # payload -> value (ValueError & co. when it is bad)


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _from_iso(parse: Callable[[str], Any], text: str) -> Any:
    """``parse(text)``, re-reading a sub-second UTC offset (``+00:00:00.000001``), which
    CPython's fromisoformat reads as UTC."""
    value = parse(text)
    if value.tzinfo is None or len(text) < 16 or text[-7] != ".":
        return value
    h, m, s, us = int(text[-15:-13]), int(text[-12:-10]), int(text[-9:-7]), int(text[-6:])
    offset = timedelta(hours=h, minutes=m, seconds=s, microseconds=us)
    return value.replace(tzinfo=timezone(-offset if text[-16] == "-" else offset))


def _timedelta_parts(value: timedelta) -> list[int]:
    return [value.days, value.seconds, value.microseconds]


def _timedelta_of(parts: list[Any]) -> timedelta:
    ok = len(parts) == 3 and all(type(p) is int for p in parts)
    _require(ok, "expected [days, seconds, microseconds]")
    return timedelta(*parts)


def _float_text(value: float) -> str:
    return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"


def _float_of(text: str) -> float:
    _require(text in ("nan", "inf", "-inf"), "expected 'nan', 'inf' or '-inf'")
    return float(text)


def _str_pieces(value: str) -> list[str]:
    """Cut between the halves of each surrogate pair, so that no piece holds one."""
    cuts = [m.start() + 1 for m in _PAIR.finditer(value)]
    return [value[a:b] for a, b in zip([0, *cuts], [*cuts, len(value)], strict=True)]


def _str_of(pieces: list[Any]) -> str:
    _require(all(type(p) is str for p in pieces), "expected a list of strings")
    return "".join(pieces)


def _dict_payload(d: dict[str, Any]) -> Any:
    """The dict, or [key, value] pairs with encoded keys when a key holds a surrogate pair."""
    if any(not k.isascii() and _PAIR.search(k) for k in d):
        return [[_encode(k, 0, None, False), x] for k, x in d.items()]
    return d


def _dict_of(payload: Any) -> dict[str, Any]:
    if type(payload) is not dict and type(payload) is not list:
        raise _PathError(f"the 'dict' tag needs a dict payload, got {_describe(payload)}")
    d = payload if type(payload) is dict else {}  # a list: [key, value] pairs
    for pair in payload.items() if type(payload) is dict else payload:
        _require(type(pair) in (tuple, list) and len(pair) == 2, "expected [key, value] pairs")
        k = _decode(pair[0])
        _require(type(k) is str, f"expected a str key, got {_describe(k)}")
        try:
            d[k] = _decode(pair[1])
        except _PathError as e:
            raise e.at(f"[{k!r}]") from e.__cause__
    return d


def _base64(value: bytes | bytearray) -> str:
    return base64.b64encode(value).decode("ascii")


def _bytes_of(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def _int_of(text: str) -> int:
    return int(text, 16)


_datetime_of = functools.partial(_from_iso, datetime.fromisoformat)
_time_of = functools.partial(_from_iso, time.fromisoformat)

# The type table, one row per tag. Rows are ordered: the encoder takes the first row whose
# types a value is an instance of (a datetime is a date too). Notes on the payloads:
# - set, frozenset: items sorted by their JSON text, so that the text is stable;
# - datetime, time: an aware value keeps its UTC offset and comes back with a fixed-offset
#   timezone (not the original ZoneInfo); decimal: str(d), so NaN, Infinity and the
#   exponent survive (1.10 stays 1.10); bytes: a bytearray comes back as bytes;
# - float: only nan, inf and -inf; int: only ints wider than 2000 bits (hex); str: only a
#   string holding a surrogate pair as two code points, in pieces cut between the halves;
#   dict: only a dict with the key "__lilota__", or [[key, value], ...] when a key holds a
#   surrogate pair.
# fmt: off
_TAGGED_TYPES = {row.tag: row for row in (
    #           tag          types              nests  encode              payload decode
    _TaggedType("tuple",     (tuple,),          True,  _encode_items,      list,   tuple),
    _TaggedType("frozenset", (frozenset,),      True,  _encode_set,        list,   frozenset),
    _TaggedType("set",       (set,),            True,  _encode_set,        list,   set),
    _TaggedType("datetime",  (datetime,),       False, datetime.isoformat, str,    _datetime_of),
    _TaggedType("date",      (date,),           False, date.isoformat,     str,    date.fromisoformat),
    _TaggedType("time",      (time,),           False, time.isoformat,     str,    _time_of),
    _TaggedType("timedelta", (timedelta,),      False, _timedelta_parts,   list,   _timedelta_of),
    _TaggedType("uuid",      (UUID,),           False, str,                str,    UUID),
    _TaggedType("decimal",   (Decimal,),        False, str,                str,    Decimal),
    _TaggedType("bytes",     (bytes, bytearray), False, _base64,           str,    _bytes_of),
    _TaggedType("float",     (),                False, _float_text,        str,    _float_of),
    _TaggedType("int",       (),                False, hex,                str,    _int_of),
    _TaggedType("str",       (),                False, _str_pieces,        list,   _str_of),
    _TaggedType("dict",      (),                False, _dict_payload,      None,   _dict_of),
)}
# fmt: on
# The decoder's view of the table: tag -> (payload, nests, decode).
_DECODERS = {row.tag: (row.payload, row.nests, row.decode) for row in _TAGGED_TYPES.values()}


# --------------------------------------------------------------------------- models


class _Model:
    """A class stored as the dict of its fields (this base: a class with ``as_dict()``);
    ``encode`` turns an instance into JSON, ``build`` makes one from a dict."""

    def __init__(self, cls: type) -> None:
        self.cls, self.name = cls, _class_name(cls)

    def stored_fields(self) -> dict[str, Any] | None:
        """Stored key -> type hint, when the class says (for typed positions inside it)."""
        return None

    def encode(self, v: Any, depth: int, hint: Any, in_pydantic: bool) -> Any:
        if depth >= MAX_DEPTH:
            raise _PathError("", deep=v)
        d = self._call(v.as_dict, ".as_dict()")
        if not isinstance(d, dict):
            raise _PathError(
                f"{self.name}.as_dict() returned {_type_name(d)}; it must return a dict"
            )
        return _encode_fields(d.items(), d, depth, None, in_pydantic, self.cls)

    def build(self, v: Any) -> Any:
        if isinstance(v, self.cls):
            return v
        if not isinstance(v, dict) and not self.takes_any():
            raise _PathError(_expected_model(self.cls, v))
        return self.from_dict(v)

    def takes_any(self) -> bool:
        return False

    def from_dict(self, d: Any) -> Any:
        from_dict = getattr(self.cls, "from_dict", None)
        if callable(from_dict):
            return self._call(lambda: from_dict(d), ".from_dict(...)")
        return self._call(lambda: self.cls(**d), "(**...)")

    def _call(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return fn()
        except Exception as exc:
            raise _PathError(f"{self.name}{what} raised {type(exc).__name__}: {exc}") from exc


class _DataclassModel(_Model):
    """A dataclass: its ``init`` fields, rebuilt one by one from its type hints."""

    def __init__(self, cls: type) -> None:
        super().__init__(cls)
        self.names = tuple(f.name for f in dataclasses.fields(cls) if f.init)
        self.known = frozenset(f.name for f in dataclasses.fields(cls))  # init=False: ignored
        # Made when first used: a hint may name a class defined after this one.
        self.plan: list[tuple[str, _Converter, bool]] | None = None

    def stored_fields(self) -> dict[str, Any]:
        hints = _type_hints(self.cls)
        return {name: hints.get(name) for name in self.names}

    def encode(self, v: Any, depth: int, hint: Any, in_pydantic: bool) -> Any:
        pairs = [(name, getattr(v, name)) for name in self.names]
        return _encode_fields(pairs, v, depth, hint, in_pydantic, self.cls)

    def build(self, v: Any) -> Any:
        cls, plan = self.cls, self.plan
        if isinstance(v, cls) or not isinstance(v, dict):
            return super().build(v)
        kwargs: dict[str, Any] = {}
        for name, conv, required in self._make_plan() if plan is None else plan:
            if name in v:
                try:
                    kwargs[name] = conv(v[name])
                except _PathError as e:
                    raise e.at(_attr_seg(name)) from e.__cause__
            elif required:
                raise _PathError("missing required field").at(_attr_seg(name))
        unknown = [k for k in v if k not in self.known] if len(v) > len(kwargs) else None
        if unknown:
            fields = ", ".join(self.names)
            raise _PathError(f"unknown field ({self.name} has fields {fields})").at(
                _attr_seg(unknown[0])
            )
        try:
            return cls(**kwargs)
        except Exception as exc:
            raise _PathError(f"{self.name}(...) raised {type(exc).__name__}: {exc}") from exc

    def _make_plan(self) -> list[tuple[str, _Converter, bool]]:
        hints, missing = _type_hints(self.cls), dataclasses.MISSING
        self.plan = []
        for f in dataclasses.fields(self.cls):
            required = f.default is missing and f.default_factory is missing
            if f.init:
                self.plan.append((f.name, _converter(hints.get(f.name, Any)), required))
        return self.plan


class _PydanticModel(_Model):
    """A pydantic v2 model: ``model_dump`` to store it, ``model_validate`` to rebuild it."""

    def stored_fields(self) -> dict[str, Any]:
        return {
            key: info.annotation
            for name, info in self.cls.model_fields.items()  # type: ignore[attr-defined]
            for key in (name, info.alias, info.serialization_alias)
            if isinstance(key, str)
        }

    def encode(self, v: Any, depth: int, hint: Any, in_pydantic: bool) -> Any:
        if depth >= MAX_DEPTH:
            raise _PathError("", deep=v)
        dumped = self._call(lambda: v.model_dump(mode="python", by_alias=True), ".model_dump()")
        if not isinstance(dumped, dict):  # a RootModel
            return _encode(dumped, depth, None, True)
        return _encode_fields(dumped.items(), v, depth, hint, True, self.cls)

    def takes_any(self) -> bool:  # a RootModel validates any value
        return "root" in self.cls.model_fields and any(  # type: ignore[attr-defined]
            c.__name__ == "RootModel" for c in self.cls.__mro__
        )

    def from_dict(self, d: Any) -> Any:
        try:
            return self.cls.model_validate(d)  # type: ignore[attr-defined]
        except sys.modules["pydantic"].ValidationError as exc:
            errors = exc.errors(include_url=False)
            details = [(_loc(err["loc"]), _pydantic_message(err)) for err in errors]
            raise _PathError("", details=details or [("", str(exc))]) from exc


def _loc(loc: Iterable[Any]) -> str:
    return "".join(_attr_seg(p) if isinstance(p, str) else f"[{p!r}]" for p in loc)


def _pydantic_message(err: dict[str, Any]) -> str:
    kind = err.get("type")
    if kind == "missing" or kind == "extra_forbidden":
        return "missing required field" if kind == "missing" else "unknown field"
    return f"{err['msg']} (got {_describe(err.get('input'))})"


def _is_pydantic(tp: Any, module: str = "pydantic") -> bool:
    """Whether ``tp`` subclasses ``module``'s BaseModel (never imports pydantic)."""
    base = getattr(sys.modules.get(module), "BaseModel", None)
    return base is not None and isinstance(tp, type) and issubclass(tp, base)


_MODELS: dict[type, _Model | None] = {}


def _model_of(cls: Any) -> _Model | None:
    """How ``cls`` is stored as a dict of fields (cached), or None if it is not a model."""
    if not isinstance(cls, type):
        return None
    if cls in _MODELS:
        return _MODELS[cls]
    model: _Model | None = None
    if dataclasses.is_dataclass(cls):
        model = _DataclassModel(cls)
    elif _is_pydantic(cls):
        model = _PydanticModel(cls)
    elif callable(getattr(cls, "as_dict", None)):
        model = _Model(cls)
    return _cache(_MODELS, cls, model)  # type: ignore[no-any-return]


def _cache(cache: dict[Any, Any], key: Any, value: Any) -> Any:
    if len(cache) > _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


def _type_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as exc:
        raise RegistrationError(
            f"cannot resolve the type hints of {_class_name(cls)}: {exc}; lilota needs "
            "them to store and rebuild it: make every type it names importable from its "
            "module (define it at module level)"
        ) from exc


# --------------------------------------------------------------------------- type hints


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


class _Shape(NamedTuple):
    """What a type hint says about the children of a value at its position (encoding)."""

    items: Any  # the hint of every item (list[X], set[X], tuple[X, ...])
    tuple_items: tuple[Any, ...] | None  # of each item (tuple[X, Y])
    values: Any  # of every dict value
    by_class: dict[type, dict[str, Any]]  # of each field of each model the hint names
    fields: dict[str, Any] | None  # of each key of a dict: the one model's, if no dict arm

    def item(self, index: int) -> Any:
        if self.tuple_items is None:
            return self.items
        return self.tuple_items[index] if index < len(self.tuple_items) else None


_SHAPES: dict[Any, _Shape | None] = {}


def _shape(hint: Any) -> _Shape | None:
    if hint is None:
        return None
    try:
        return _SHAPES[hint]
    except KeyError:
        return _cache(_SHAPES, hint, _make_shape(hint))  # type: ignore[no-any-return]
    except TypeError:  # an unhashable hint
        return _make_shape(hint)


def _arms(tp: Any) -> list[Any]:
    tp = _strip(tp)
    if get_origin(tp) is Union or get_origin(tp) is types.UnionType:
        return [arm for arg in get_args(tp) for arm in _arms(arg)]
    return [tp]


def _make_shape(hint: Any) -> _Shape | None:
    items = tuple_items = values = None
    by_class: dict[type, dict[str, Any]] = {}
    found = dict_arm = False
    for arm in _arms(hint):  # the first arm that says something about items or values wins
        origin, args = get_origin(arm), get_args(arm)
        free = items is None and tuple_items is None
        model = _model_of(arm) if origin is None else None
        fields = model.stored_fields() if model is not None else None
        if (origin in _SEQUENCES or origin in _SETS) and args and free:
            items, found = args[0], True
        elif origin is tuple and free:
            if len(args) == 2 and args[1] is Ellipsis:
                items = args[0]
            elif args and args != ((),):
                tuple_items = args
            found = True
        elif origin in _MAPPINGS:
            dict_arm = True
            if len(args) == 2 and values is None:
                values, found = args[1], True
        elif fields is not None:
            by_class[arm], found = fields, True
    fields = next(iter(by_class.values())) if len(by_class) == 1 and not dict_arm else None
    return _Shape(items, tuple_items, values, by_class, fields) if found else None


# --------------------------------------------------------------------------- rebuilding


def _identity(v: Any) -> Any:
    return v


_CONVERTERS: dict[Any, _Converter] = {}


def _converter(tp: Any) -> _Converter:
    """The (cached) function that rebuilds a decoded value as type ``tp``."""
    try:
        return _CONVERTERS[tp]
    except KeyError:
        return _cache(_CONVERTERS, tp, _make_converter(tp))  # type: ignore[no-any-return]
    except TypeError:  # an unhashable hint
        return _make_converter(tp)


def _make_converter(tp: Any) -> _Converter:
    tp = _strip(tp)
    origin = get_origin(tp)
    if tp is Any or tp is object or isinstance(tp, TypeVar):
        return _identity
    if origin in _GENERICS:
        return _GENERICS[origin](tp, get_args(tp))
    cls = tp if origin is None else origin  # a user generic class (Model[int]): its class
    if not isinstance(cls, type):
        return _identity  # Callable, ForwardRef and other forms lilota does not check
    if cls in _SCALARS:
        return _SCALARS[cls]
    if cls in _BARE:
        return _converter(_BARE[cls])
    if issubclass(cls, Enum):
        return _enum_converter(cls)
    model = _model_of(cls)
    if model is not None:
        return model.build
    return _converter(dict[str, Any]) if typing.is_typeddict(cls) else _instance_of(cls)


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
_BARE = {list: list[Any], tuple: tuple[Any, ...], set: set[Any], frozenset: frozenset[Any]}
_BARE[dict] = dict[str, Any]


def _sequence_converter(tp: Any, args: tuple[Any, ...]) -> _Converter:
    item, name = _converter(args[0]) if args else _identity, _hint_name(tp)
    keep_tuple = get_origin(tp) is not list

    def conv(v: Any) -> Any:
        if not isinstance(v, (list, tuple)):
            raise _expect(name, v)
        if item is _identity:
            return v if type(v) is list or (keep_tuple and type(v) is tuple) else list(v)
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except _PathError as e:
                raise e.at(f"[{i}]") from e.__cause__
        return tuple(out) if keep_tuple and isinstance(v, tuple) else out

    return conv


def _tuple_converter(tp: Any, args: tuple[Any, ...]) -> _Converter:
    name, variadic = _hint_name(tp), len(args) == 2 and args[1] is Ellipsis
    if variadic or not args:  # tuple[X, ...] or tuple: as a sequence, made a tuple
        as_list = _sequence_converter(tp, args[:1])
        return lambda v: tuple(as_list(v))
    fixed = [] if args == ((),) else [_converter(a) for a in args]

    def conv(v: Any) -> Any:
        if not isinstance(v, (list, tuple)):
            raise _expect(name, v)
        if len(v) != len(fixed):
            raise _PathError(f"expected {name} ({len(fixed)} items), got {len(v)} items")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(fixed[i](x))
            except _PathError as e:
                raise e.at(f"[{i}]") from e.__cause__
        return tuple(out)

    return conv


def _set_converter(tp: Any, args: tuple[Any, ...]) -> _Converter:
    item, name = _converter(args[0]) if args else _identity, _hint_name(tp)
    make: Callable[[Any], Any] = frozenset if get_origin(tp) is frozenset else set

    def conv(v: Any) -> Any:
        if not isinstance(v, (set, frozenset, list, tuple)):
            raise _expect(name, v)
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except _PathError as e:
                raise e.at("{*}" if isinstance(v, (set, frozenset)) else f"[{i}]") from e.__cause__
        try:
            return make(out)
        except TypeError as exc:
            raise _PathError(f"expected {name}, got unhashable items: {exc}") from exc

    return conv


def _dict_converter(tp: Any, args: tuple[Any, ...]) -> _Converter:
    name = _hint_name(tp)
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
            except _PathError as e:
                raise _PathError(f"bad key: {e.message}").at(f"[{k!r}]") from e.__cause__
            try:
                out[k2] = value(x)
            except _PathError as e:
                raise e.at(f"[{k!r}]") from e.__cause__
        return out

    return conv


def _union_converter(tp: Any, args: tuple[Any, ...]) -> _Converter:
    stripped = [_strip(a) for a in args]
    hints = [a for a in stripped if a is not _NoneType]
    convs, has_none, name = [_converter(a) for a in hints], _NoneType in stripped, _hint_name(tp)
    if len(convs) == 1:
        only = convs[0]
        return (lambda v: None if v is None else only(v)) if has_none else only
    # A value is tried first against the arms it is exactly the decoded type of (an int
    # against int before float), then against the others, in declared order.
    exact = [get_origin(a) or a for a in hints]
    exact = [e if e in _SCALARS or e in _BARE else None for e in exact]
    arms = list(zip(convs, exact, strict=True))
    orders = {t: [c for c, e in arms if e is t] + [c for c, e in arms if e is not t] for t in exact}

    def conv(v: Any) -> Any:
        if v is None and has_none:
            return None
        for arm in orders.get(type(v), convs):
            try:
                return arm(v)
            except _PathError:
                pass
        raise _expect(name, v)

    return conv


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


_GENERICS: dict[Any, Callable[[Any, tuple[Any, ...]], _Converter]] = {
    **dict.fromkeys((Union, types.UnionType), _union_converter),
    **dict.fromkeys(_SEQUENCES, _sequence_converter),
    **dict.fromkeys(_SETS, _set_converter),
    **dict.fromkeys(_MAPPINGS, _dict_converter),
    tuple: _tuple_converter,
    Literal: _literal_converter,
}
