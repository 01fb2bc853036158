"""Task inputs and outputs as JSON text, and back (never pickle).

lilota keeps a task's ``input`` and ``output`` as JSON text in a TEXT column, so every
string, exact float and big int survives. The seams:

- ``dumps(value, model=None) -> str | None``: the text (pure ASCII; ``None`` gives ``None``,
  SQL NULL). A value it cannot store raises :class:`~lilota.errors.SerializationError`.
- ``loads(text)``: plain values; models come back as dicts (what ``Task.input`` and
  ``Task.output`` hold). Text that is not JSON, or holds a bad tag, raises
  ``SerializationError``, which quotes the bad input (or its path) and says what is wrong.
- ``build(value, model)``: ``loads``'s values as the model instance the task function
  receives; a value that does not fit raises :class:`~lilota.errors.InvalidInput`.
- ``prepare(value, model) -> str | None``: what ``schedule()`` stores, dumped, loaded and
  built exactly as the worker will, so it raises ``InvalidInput`` or ``SerializationError``
  before anything is written. ``check_model`` refuses, at registration, a model lilota
  cannot store (:class:`~lilota.errors.RegistrationError`).

Every error names the path of the bad value (``input.items[2].when``, ``input['k']``, set
items as ``{*}``), its type, and what to do instead.

The stored format never changes. JSON holds ``None``, ``bool``, ``str``, ``int``, finite
``float``, ``list`` and ``dict`` with ``str`` keys as they are; any other value is stored as
``{"__lilota__": tag, "v": payload}``, one row of the type table ``_SPECIALS`` per tag (its
Python types, how to encode and how to decode it). A model is stored as the dict of its
fields: a dataclass's ``init`` fields, a pydantic v2 model's ``model_dump(mode="python",
by_alias=True)``, or ``as_dict()``; ``build`` rebuilds a dataclass field by field from its
type hints, a pydantic model with ``model_validate``, another class with ``from_dict(d)`` or
else ``Model(**d)``. An ``int`` fits a ``float`` or ``Decimal`` field, a ``bool`` never fits
an ``int``, a list fits a tuple or set field and a tuple a list field. An ``Enum`` member is
stored as its value, and ``build`` restores it where the model types the position; elsewhere
only enums equal to their value (``class C(str, Enum)``, ``IntEnum``) are accepted. Refused:
non-``str`` dict keys, nesting deeper than 200, reference cycles, set items that would come
back unhashable, and any other type.
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
_Conv = Callable[[Any], Any]  # rebuilds a decoded value as one type
_Enc = Callable[[Any, int, Any, bool], Any]  # (value, depth, hint, in pydantic) -> JSON


def dumps(value: Any, *, model: type | None = None, root: str = "input") -> str | None:
    """Encode ``value`` as JSON text; ``None`` gives ``None``. ``model`` says which positions
    are typed (where a plain Enum member may be stored, as ``build`` restores it); that the
    value fits it is checked by :func:`prepare`, not here. Raises ``SerializationError``."""
    if value is None:
        return None
    try:
        encoded = _enc(value, 0, None if model is dict else model, False)
    except _Bad as e:
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
        raise SerializationError(f"stored value must be JSON text (str), got {_tname(text)}")
    try:
        return _dec(json.loads(text))
    except ValueError as exc:  # not JSON (a bad tag raises _Bad)
        raise SerializationError(f"stored value is not valid JSON ({exc}): {_short(text)}") from exc
    except _Bad as e:
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
            except _Bad as e:
                raise _Bad(f"{_expected_model(model, None)}; {e.render(root)}") from e.__cause__
        return conv(value)
    except _Bad as e:
        raise InvalidInput(e.render(root)) from e.__cause__


def prepare(value: Any, model: type | None, *, root: str = "input") -> str | None:
    """Check ``value`` (a ``model``, or a dict of its fields, stored as given) fits ``model``
    and return its text, decoded and rebuilt here exactly as the worker will: an error means
    nothing should be stored (``InvalidInput``: it does not fit; ``SerializationError``)."""
    if model is dict and value is not None and not isinstance(value, dict):
        raise InvalidInput(f"{root}: expected a dict, got {_tname(value)}")
    if model is None or model is dict:
        return dumps(value, root=root)
    if value is None:
        build(None, model, root=root)
        return None
    if _model_of(model) is not None and not isinstance(value, (model, dict)):
        raise InvalidInput(
            f"{root}: expected {_cname(model)} (or a dict of its fields), got {_tname(value)}"
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
        advice = f"pass the class {_cname(type(model))} itself, not an instance"
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


class _Bad(Exception):
    """Internal refusal; each container adds its path segment while it unwinds. ``deep``:
    the container found too deep; the containers passed on the way out reveal a cycle."""

    def __init__(self, message: str, *, deep: Any = None, details: Any = None) -> None:
        super().__init__(message)
        self.message, self.deep, self.details = message, deep is not None, details
        self.segs: list[str] = []
        self.objs: list[Any] = [deep]

    def at(self, seg: str, container: Any = None) -> _Bad:
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
                    f"{_tname(obj)} object as {_clip(root + ''.join(segs[:i]))}, which "
                    "contains it; lilota cannot store a value that contains itself"
                )
        return (
            f"{_clip(path)}: nested deeper than {MAX_DEPTH} levels; flatten the value "
            f"(lilota stores at most {MAX_DEPTH} nested containers)"
        )


def _clip(path: str, limit: int = 200) -> str:
    return path if len(path) <= limit else path[:80] + " ... " + path[-(limit - 85) :]


def _cname(cls: type) -> str:
    """A class's qualified name, without the ``f.<locals>.`` of classes made in functions."""
    return cls.__qualname__.rpartition("<locals>.")[2]


def _tname(value: Any) -> str:
    t = type(value)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{_cname(t)}"


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except Exception:  # e.g. an int too big for repr, or a broken __repr__
        return f"<{_tname(value)} object>"
    return text[: limit - 3] + "..." if len(text) > limit else text


def _describe(value: Any) -> str:
    return "None" if value is None else f"{_tname(value)} {_short(value)}"


def _attr_seg(name: Any) -> str:
    return "." + name if isinstance(name, str) and name.isidentifier() else f"[{name!r}]"


def _expect(name: str, v: Any) -> _Bad:
    return _Bad(f"expected {name}, got {_describe(v)}")


def _expected_model(cls: type, v: Any) -> str:
    return f"expected {_cname(cls)} (or a dict of its fields), got {_describe(v)}"


def _hname(tp: Any) -> str:
    """A readable name for a type hint: ``int``, ``list[Point]``, ``int | None``."""
    origin, args = get_origin(tp), get_args(tp)
    if tp is _NoneType or tp is None:
        return "None"
    if origin is Union or origin is types.UnionType:
        return " | ".join(_hname(a) for a in args)
    if origin is Literal:
        return "Literal[" + ", ".join(_short(a) for a in args) + "]"
    if origin is not None and args:
        name = getattr(origin, "__name__", None) or str(origin)
        return f"{name}[" + ", ".join("..." if a is Ellipsis else _hname(a) for a in args) + "]"
    return _cname(tp) if isinstance(tp, type) else str(tp).replace("typing.", "")


# --------------------------------------------------------------------------- encoding


def _enc(v: Any, depth: int, hint: Any, pyd: bool) -> Any:
    """Encode one value; ``hint`` is its declared type (None: untyped), ``pyd`` says it is in
    a pydantic model (which may hold other types pydantic can make JSON of)."""
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
        return _enc_fields(v.items(), v, depth, hint, pyd)
    if t is list:
        return _enc_items(v, depth, hint, pyd)
    return (_ENCODERS.get(t) or _cache(_ENCODERS, t, _find_encoder(t)))(v, depth, hint, pyd)


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
    return {TAG: tag, "v": _SPECIALS[tag].encode(value)}


_ENCODERS: dict[type, _Enc] = {}  # type -> how to encode it, past the fast path of _enc
_BASES = {str: str.__str__, int: int.__int__, float: float.__float__}


def _find_encoder(cls: type) -> _Enc:
    if issubclass(cls, Enum):
        return _enc_enum
    for base, to_base in _BASES.items():
        if issubclass(cls, base):  # stored as the base type's value
            return lambda v, depth, hint, pyd: _enc(to_base(v), depth, hint, pyd)
    row = next((row for row in _SPECIALS.values() if issubclass(cls, row.types)), None)
    if row is not None and row.nests:
        return lambda v, depth, hint, pyd: {TAG: row.tag, "v": row.encode(v, depth, hint, pyd)}
    if row is not None:
        return lambda v, depth, hint, pyd: {TAG: row.tag, "v": row.encode(v)}
    if issubclass(cls, dict):
        return lambda v, depth, hint, pyd: _enc_fields(v.items(), v, depth, hint, pyd)
    model = _model_of(cls)
    return _enc_items if issubclass(cls, list) else model.encode if model else _enc_unsupported


def _enc_fields(
    pairs: Iterable[tuple[Any, Any]], owner: Any, depth: int, hint: Any, pyd: bool, cls: Any = None
) -> Any:
    """The field walker: a dict (``cls`` None) or the fields of a model of class ``cls`` as a
    JSON object. ``owner`` is the object the path passes through (to tell a cycle)."""
    if depth >= MAX_DEPTH:
        raise _Bad("", deep=owner)
    fields = values = None
    if hint is not None and (shape := _shape(hint)) is not None:
        fields, values = (shape.fields, shape.values) if cls is None else (shape.by_class.get(cls), None)  # fmt: skip
    out: dict[str, Any] = {}
    paired = False
    for k, x in pairs:
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
            out[k] = _enc(x, depth + 1, fields.get(k) if fields is not None else values, pyd)
        except _Bad as e:
            raise e.at(f"[{k!r}]" if cls is None else _attr_seg(k), owner) from e.__cause__
    return _tag("dict", out) if paired or TAG in out else out


def _enc_items(items: Any, depth: int, hint: Any, pyd: bool, star: bool = False) -> list[Any]:
    """A list's or tuple's items as a JSON array; ``star``: a set's, sorted by their text."""
    if depth >= MAX_DEPTH:
        raise _Bad("", deep=items)
    shape = _shape(hint) if hint is not None else None
    out: list[Any] = []
    for i, x in enumerate(items):
        if _is_plain(x):
            out.append(x)
            continue
        try:
            item_hint = None if shape is None else shape.items if star else shape.item(i)
            out.append(enc := _enc(x, depth + 1, item_hint, pyd))
            if star and not _hashable(enc):
                raise _Bad(
                    f"set item {_describe(x)} would be read back as a dict or list, which "
                    "cannot be a set member; store a list instead"
                )
        except _Bad as e:
            raise e.at("{*}" if star else f"[{i}]", items) from e.__cause__
    return sorted(out, key=_ENCODER.encode) if star else out


def _hashable(enc: Any) -> bool:
    """Whether an encoded value decodes to something hashable (a set member)."""
    tag = enc.get(TAG) if type(enc) is dict else None
    if tag == "tuple" or tag == "frozenset":
        return all(_hashable(item) for item in enc["v"])
    return type(enc) is not list and (type(enc) is not dict or tag not in (None, "dict", "set"))


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
    try:
        return _RESTORABLE[member, hint]
    except (KeyError, TypeError):  # TypeError: an unhashable hint, not cached
        pass
    stored = _dec(json.loads(_ENCODER.encode(_enc(member.value, 0, None, False))))
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


def _enc_unsupported(v: Any, depth: int, hint: Any, pyd: bool) -> Any:
    try:  # inside a pydantic model: what pydantic itself would store for v
        fallback = importlib.import_module("pydantic_core").to_jsonable_python(v) if pyd else None
    except Exception:
        fallback = None
    if fallback is not None:
        return _enc(fallback, depth, None, False)
    advice = next(text for cls, text in _ADVICE if isinstance(v, cls))
    if isinstance(v, type) or callable(v):
        advice = "functions, classes and other callables cannot be stored; store a value or a name"
    raise _Bad(f"cannot store {_tname(v)} {_short(v)} as JSON; {advice}")


# --------------------------------------------------------------------------- decoding


def _dec(x: Any) -> Any:
    """Decode the tags in a freshly parsed JSON value (containers are changed in place)."""
    t = type(x)
    if t is dict and TAG in x:
        return _dec_tag(x)
    if t is dict:
        for k, y in x.items():
            if type(y) is dict or type(y) is list:
                try:
                    x[k] = _dec(y)
                except _Bad as e:
                    raise e.at(f"[{k!r}]") from e.__cause__
    elif t is list:
        for i, y in enumerate(x):
            if type(y) is dict or type(y) is list:
                try:
                    x[i] = _dec(y)
                except _Bad as e:
                    raise e.at(f"[{i}]") from e.__cause__
    return x


def _dec_tag(x: dict[str, Any]) -> Any:
    tag = x[TAG]
    if len(x) != 2 or "v" not in x:
        raise _Bad(f"malformed lilota tag {_short(x)}: expected {{{TAG!r}: tag, 'v': payload}}")
    row = _SPECIALS.get(tag) if type(tag) is str else None
    if row is None:
        raise _Bad(
            f"unknown lilota tag {_short(tag)}; it was written by a newer lilota, or the "
            "stored text was changed by hand"
        )
    v, (_, _, nests, _, payload, decode) = x["v"], row
    if payload is not None and type(v) is not payload:
        raise _Bad(f"the {tag!r} tag needs a {payload.__name__} payload, got {_describe(v)}")
    try:
        return decode(_dec(v) if nests else v)
    except (ValueError, TypeError, OverflowError, binascii.Error, InvalidOperation) as exc:
        raise _Bad(f"cannot decode the {tag!r} value {_short(v)}: {exc}") from exc


# --------------------------------------------------------------------------- the type table


class _Special(NamedTuple):
    """A type JSON cannot hold as it is, stored as ``{TAG: tag, "v": payload}``."""

    tag: str
    types: tuple[type, ...]  # always stored so; (): only values JSON cannot hold (see _enc)
    nests: bool  # a container: encode takes (value, depth, hint, pyd), decode decoded items
    encode: Callable[..., Any]  # value -> payload
    payload: type | None  # the JSON type the payload must be (None: decode checks)
    decode: Callable[[Any], Any]  # payload -> value (ValueError & co. when it is bad)


def _checked(value: Any, ok: bool, what: str) -> Any:
    if not ok:
        raise ValueError(what)
    return value


def _from_iso(parse: Callable[[str], Any], text: str) -> Any:
    """``parse(text)``, re-reading a sub-second UTC offset (``+00:00:00.000001``), which
    CPython's fromisoformat reads as UTC."""
    value = parse(text)
    if value.tzinfo is None or len(text) < 16 or text[-7] != ".":
        return value
    h, m, s, us = int(text[-15:-13]), int(text[-12:-10]), int(text[-9:-7]), int(text[-6:])
    offset = timedelta(hours=h, minutes=m, seconds=s, microseconds=us)
    return value.replace(tzinfo=timezone(-offset if text[-16] == "-" else offset))


def _str_pieces(value: str) -> list[str]:
    """Cut between the halves of each surrogate pair, so that no piece holds one."""
    cuts = [m.start() + 1 for m in _PAIR.finditer(value)]
    return [value[a:b] for a, b in zip([0, *cuts], [*cuts, len(value)], strict=True)]


def _dict_payload(d: dict[str, Any]) -> Any:
    """The dict, or [key, value] pairs with encoded keys when a key holds a surrogate pair."""
    if any(not k.isascii() and _PAIR.search(k) for k in d):
        return [[_enc(k, 0, None, False), x] for k, x in d.items()]
    return d


def _dec_dict(payload: Any) -> dict[str, Any]:
    if type(payload) is not dict and type(payload) is not list:
        raise _Bad(f"the 'dict' tag needs a dict payload, got {_describe(payload)}")
    d = payload if type(payload) is dict else {}  # a list: [key, value] pairs
    for pair in payload.items() if type(payload) is dict else payload:
        _checked(0, type(pair) in (tuple, list) and len(pair) == 2, "expected [key, value] pairs")
        k = _dec(pair[0])
        _checked(k, type(k) is str, f"expected a str key, got {_describe(k)}")
        try:
            d[k] = _dec(pair[1])
        except _Bad as e:
            raise e.at(f"[{k!r}]") from e.__cause__
    return d


# Ordered: the encoder takes the first row whose types a value is an instance of.
# fmt: off
_SPECIALS = {row.tag: row for row in (
    _Special("tuple", (tuple,), True, _enc_items, list, tuple),
    _Special("frozenset", (frozenset,), True, functools.partial(_enc_items, star=True), list, frozenset),
    _Special("set", (set,), True, functools.partial(_enc_items, star=True), list, set),
    _Special("datetime", (datetime,), False, datetime.isoformat, str, functools.partial(_from_iso, datetime.fromisoformat)),
    _Special("date", (date,), False, date.isoformat, str, date.fromisoformat),
    _Special("time", (time,), False, time.isoformat, str, functools.partial(_from_iso, time.fromisoformat)),
    _Special("timedelta", (timedelta,), False, lambda v: [v.days, v.seconds, v.microseconds], list,
             lambda p: timedelta(*_checked(p, len(p) == 3 and all(type(x) is int for x in p), "expected [days, seconds, microseconds]"))),
    _Special("uuid", (UUID,), False, str, str, UUID),
    _Special("decimal", (Decimal,), False, str, str, Decimal),
    _Special("bytes", (bytes, bytearray), False, lambda v: base64.b64encode(v).decode("ascii"), str, lambda s: base64.b64decode(s, validate=True)),
    _Special("float", (), False, lambda v: "nan" if math.isnan(v) else "inf" if v > 0 else "-inf", str,
             lambda s: float(_checked(s, s in ("nan", "inf", "-inf"), "expected 'nan', 'inf' or '-inf'"))),
    _Special("int", (), False, hex, str, lambda s: int(s, 16)),
    _Special("str", (), False, _str_pieces, list, lambda p: "".join(_checked(p, all(type(x) is str for x in p), "expected a list of strings"))),
    _Special("dict", (), False, _dict_payload, None, _dec_dict),
)}
# fmt: on


# --------------------------------------------------------------------------- models


class _Model:
    """A class stored as the dict of its fields (this base: a class with ``as_dict()``);
    ``encode`` turns an instance into JSON, ``build`` makes one from a dict."""

    def __init__(self, cls: type) -> None:
        self.cls, self.name = cls, _cname(cls)

    def stored_fields(self) -> dict[str, Any] | None:
        """Stored key -> type hint, when the class says (for typed positions inside it)."""
        return None

    def encode(self, v: Any, depth: int, hint: Any, pyd: bool) -> Any:
        if depth >= MAX_DEPTH:
            raise _Bad("", deep=v)
        d = self._call(v.as_dict, ".as_dict()")
        if not isinstance(d, dict):
            raise _Bad(f"{self.name}.as_dict() returned {_tname(d)}; it must return a dict")
        return _enc_fields(d.items(), d, depth, None, pyd, self.cls)

    def build(self, v: Any) -> Any:
        if isinstance(v, self.cls):
            return v
        if not isinstance(v, dict) and not self.takes_any():
            raise _Bad(_expected_model(self.cls, v))
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
            raise _Bad(f"{self.name}{what} raised {type(exc).__name__}: {exc}") from exc


class _DataclassModel(_Model):
    """A dataclass: its ``init`` fields, rebuilt one by one from its type hints."""

    def __init__(self, cls: type) -> None:
        super().__init__(cls)
        self.names = tuple(f.name for f in dataclasses.fields(cls) if f.init)
        self.known = frozenset(f.name for f in dataclasses.fields(cls))  # init=False: ignored
        # Made when first used: a hint may name a class defined after this one.
        self.plan: list[tuple[str, _Conv, bool]] | None = None

    def stored_fields(self) -> dict[str, Any]:
        hints = _type_hints(self.cls)
        return {name: hints.get(name) for name in self.names}

    def encode(self, v: Any, depth: int, hint: Any, pyd: bool) -> Any:
        pairs = [(name, getattr(v, name)) for name in self.names]
        return _enc_fields(pairs, v, depth, hint, pyd, self.cls)

    def build(self, v: Any) -> Any:
        if isinstance(v, self.cls) or not isinstance(v, dict):
            return super().build(v)
        kwargs: dict[str, Any] = {}
        for name, conv, required in self._make_plan() if self.plan is None else self.plan:
            if name in v:
                try:
                    kwargs[name] = conv(v[name])
                except _Bad as e:
                    raise e.at(_attr_seg(name)) from e.__cause__
            elif required:
                raise _Bad("missing required field").at(_attr_seg(name))
        unknown = [k for k in v if k not in self.known] if len(v) > len(kwargs) else None
        if unknown:
            fields = ", ".join(self.names)
            raise _Bad(f"unknown field ({self.name} has fields {fields})").at(_attr_seg(unknown[0]))
        try:
            return self.cls(**kwargs)
        except Exception as exc:
            raise _Bad(f"{self.name}(...) raised {type(exc).__name__}: {exc}") from exc

    def _make_plan(self) -> list[tuple[str, _Conv, bool]]:
        hints, missing = _type_hints(self.cls), dataclasses.MISSING
        self.plan = [
            (f.name, _converter(hints.get(f.name, Any)), f.default is f.default_factory is missing)
            for f in dataclasses.fields(self.cls)
            if f.init
        ]
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

    def encode(self, v: Any, depth: int, hint: Any, pyd: bool) -> Any:
        if depth >= MAX_DEPTH:
            raise _Bad("", deep=v)
        dumped = self._call(lambda: v.model_dump(mode="python", by_alias=True), ".model_dump()")
        if not isinstance(dumped, dict):  # a RootModel
            return _enc(dumped, depth, None, True)
        return _enc_fields(dumped.items(), v, depth, hint, True, self.cls)

    def takes_any(self) -> bool:  # a RootModel validates any value
        return "root" in self.cls.model_fields and any(  # type: ignore[attr-defined]
            c.__name__ == "RootModel" for c in self.cls.__mro__
        )

    def from_dict(self, d: Any) -> Any:
        try:
            return self.cls.model_validate(d)  # type: ignore[attr-defined]
        except sys.modules["pydantic"].ValidationError as exc:
            details = [(_loc(err["loc"]), _pydantic_message(err)) for err in exc.errors(include_url=False)]  # fmt: skip
            raise _Bad("", details=details or [("", str(exc))]) from exc


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
            f"cannot resolve the type hints of {_cname(cls)}: {exc}; lilota needs "
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
    for arm in _arms(hint):
        origin, args = get_origin(arm), get_args(arm)
        free = items is None and tuple_items is None
        if origin in _SEQUENCES or origin in _SETS:
            items, found = (args[0], True) if args and free else (items, found)
        elif origin is tuple and free:
            variadic = len(args) == 2 and args[1] is Ellipsis
            items = args[0] if variadic else None
            tuple_items = args if not variadic and args and args != ((),) else None
            found = True
        elif origin in _MAPPINGS:
            dict_arm = True
            values, found = (
                (args[1], True) if len(args) == 2 and values is None else (values, found)
            )
        elif (model := _model_of(arm)) is not None and (
            fields := model.stored_fields()
        ) is not None:
            by_class[arm], found = fields, True
    fields = next(iter(by_class.values())) if len(by_class) == 1 and not dict_arm else None
    return _Shape(items, tuple_items, values, by_class, fields) if found else None


# --------------------------------------------------------------------------- rebuilding


def _identity(v: Any) -> Any:
    return v


_CONVERTERS: dict[Any, _Conv] = {}


def _converter(tp: Any) -> _Conv:
    """The (cached) function that rebuilds a decoded value as type ``tp``."""
    try:
        return _CONVERTERS[tp]
    except KeyError:
        return _cache(_CONVERTERS, tp, _make_converter(tp))  # type: ignore[no-any-return]
    except TypeError:  # an unhashable hint
        return _make_converter(tp)


def _make_converter(tp: Any) -> _Conv:
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


def _instance_of(cls: type, name: str = "") -> _Conv:
    """A converter that accepts an instance of ``cls`` as it is, and nothing else."""
    name = name or _cname(cls)

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
        raise _Bad(f"expected float, got an int too large for a float: {_short(v)}") from None


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


_SCALARS: dict[Any, _Conv] = {
    **{cls: _instance_of(cls) for cls in (bool, str, datetime, date, time, timedelta, UUID)},
    **{_NoneType: _to_none, int: _to_int, float: _to_float, Decimal: _to_decimal},
    **{bytes: _to_bytes, bytearray: functools.partial(_to_bytes, make=bytearray)},
}
_BARE = {list: list[Any], tuple: tuple[Any, ...], set: set[Any], frozenset: frozenset[Any], dict: dict[str, Any]}  # fmt: skip


def _sequence_converter(tp: Any, args: tuple[Any, ...]) -> _Conv:
    item, name = _converter(args[0]) if args else _identity, _hname(tp)
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
            except _Bad as e:
                raise e.at(f"[{i}]") from e.__cause__
        return tuple(out) if keep_tuple and isinstance(v, tuple) else out

    return conv


def _tuple_converter(tp: Any, args: tuple[Any, ...]) -> _Conv:
    name, variadic = _hname(tp), len(args) == 2 and args[1] is Ellipsis
    if variadic or not args:  # tuple[X, ...] or tuple: as a sequence, made a tuple
        as_list = _sequence_converter(tp, args[:1])
        return lambda v: tuple(as_list(v))
    fixed = [] if args == ((),) else [_converter(a) for a in args]

    def conv(v: Any) -> Any:
        if not isinstance(v, (list, tuple)):
            raise _expect(name, v)
        if len(v) != len(fixed):
            raise _Bad(f"expected {name} ({len(fixed)} items), got {len(v)} items")
        out = []
        for i, x in enumerate(v):
            try:
                out.append(fixed[i](x))
            except _Bad as e:
                raise e.at(f"[{i}]") from e.__cause__
        return tuple(out)

    return conv


def _set_converter(tp: Any, args: tuple[Any, ...]) -> _Conv:
    item, name = _converter(args[0]) if args else _identity, _hname(tp)
    make: Callable[[Any], Any] = frozenset if get_origin(tp) is frozenset else set

    def conv(v: Any) -> Any:
        if not isinstance(v, (set, frozenset, list, tuple)):
            raise _expect(name, v)
        out = []
        for i, x in enumerate(v):
            try:
                out.append(item(x))
            except _Bad as e:
                raise e.at("{*}" if isinstance(v, (set, frozenset)) else f"[{i}]") from e.__cause__
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


def _union_converter(tp: Any, args: tuple[Any, ...]) -> _Conv:
    stripped = [_strip(a) for a in args]
    hints = [a for a in stripped if a is not _NoneType]
    convs, has_none, name = [_converter(a) for a in hints], _NoneType in stripped, _hname(tp)
    if len(convs) == 1:
        only = convs[0]
        return (lambda v: None if v is None else only(v)) if has_none else only
    # A value is tried first against the arms it is exactly the decoded type of (an int
    # against int before float), then against the others, in declared order.
    exact = [get_origin(a) or a for a in hints]
    arms = [(c, e if e in _SCALARS or e in _BARE else None) for c, e in zip(convs, exact, strict=True)]  # fmt: skip
    orders = {t: [c for c, e in arms if e is t] + [c for c, e in arms if e is not t] for t in exact}

    def conv(v: Any) -> Any:
        if v is None and has_none:
            return None
        for arm in orders.get(type(v), convs):
            try:
                return arm(v)
            except _Bad:
                pass
        raise _expect(name, v)

    return conv


def _same_kind(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b)
    return (isinstance(a, str) and isinstance(b, str)) or type(a) is type(b)


def _literal_converter(tp: Any, args: tuple[Any, ...]) -> _Conv:
    name = _hname(tp)

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


def _enum_converter(cls: type[Enum]) -> _Conv:
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
            raise _Bad(f"expected {_cname(cls)} (a value of {values}{more}), got {_describe(v)}")
        return member

    return conv


_GENERICS: dict[Any, Callable[[Any, tuple[Any, ...]], _Conv]] = {
    **dict.fromkeys((Union, types.UnionType), _union_converter),
    **dict.fromkeys(_SEQUENCES, _sequence_converter),
    **dict.fromkeys(_SETS, _set_converter),
    **dict.fromkeys(_MAPPINGS, _dict_converter),
    tuple: _tuple_converter,
    Literal: _literal_converter,
}
