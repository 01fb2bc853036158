"""Task inputs and outputs as JSON text, and back (never pickle): the stored format.

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

``build``, ``check_model`` and the model kinds live in :mod:`lilota.conversion` (typed
values), the path error and the message helpers in :mod:`lilota.scalars` (single values);
this module owns the format: the type table, the encoder and the decoder.
Every message names the path of the bad value (``input.items[2].when``, ``input['k']``; set
items show as ``{*}``), its type, and what to do instead.

The stored format never changes. ``None``, ``bool``, ``str``, ``int``, finite ``float``,
``list`` and ``dict`` with ``str`` keys are JSON as they are; any other value is stored as
``{"__lilota__": tag, "v": payload}``, one row of the type table (``_TAGGED_TYPES``) per tag.
A model is stored as the dict of its fields (see :mod:`lilota.conversion`). An ``Enum``
member is stored as its value; ``build`` restores the member where the model types the
position, and elsewhere only enums equal to their value (``class C(str, Enum)``,
``IntEnum``) are accepted. Refused: non-``str`` dict keys, nesting deeper than 200
containers, reference cycles, set items that would come back unhashable, and any other type.
"""

from __future__ import annotations

import base64
import binascii
import functools
import importlib
import json
import math
import re
from collections import abc
from collections.abc import Callable, Iterable
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal, InvalidOperation
from enum import Enum
from typing import Any, NamedTuple
from uuid import UUID

from lilota.conversion import _converter, _Model, _model_of, _shape, build, check_model
from lilota.errors import InvalidInput, SerializationError
from lilota.scalars import (
    _ROOT,
    _attr_seg,
    _cache,
    _class_name,
    _describe,
    _PathError,
    _short,
    _type_name,
)

__all__ = ["MAX_DEPTH", "TAG", "build", "check_model", "dumps", "loads", "prepare"]

TAG = "__lilota__"
"""The key that marks a tagged value in the stored JSON."""

MAX_DEPTH = 200
"""The most containers (dicts, lists, models...) that may be nested inside each other."""

_BIG_INT_BITS = 2000  # below every int_max_str_digits setting (>= 640 digits)
_ENCODER = json.JSONEncoder(
    ensure_ascii=True, allow_nan=False, check_circular=False, separators=(",", ":")
)
# A high surrogate followed by a low one: written as JSON they would be read back as the
# one character the pair encodes, so strings holding one are stored tagged ("str").
_PAIR = re.compile(r"[\ud800-\udbff][\udc00-\udfff]")
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


class _TooDeep(_PathError):
    """Nesting past ``MAX_DEPTH``, found at ``container``: the containers passed on the way
    out are kept, and one met twice reveals a reference cycle."""

    def __init__(self, container: Any) -> None:
        super().__init__("")
        self.objs: list[Any] = [container]

    def at(self, seg: str, container: Any = None) -> _PathError:
        self.segs.append(seg)
        self.objs.append(container)
        return self

    def render(self, root: str) -> str:
        segs = self.segs[::-1]
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
            f"{_clip(root + ''.join(segs))}: nested deeper than {MAX_DEPTH} levels; flatten "
            f"the value (lilota stores at most {MAX_DEPTH} nested containers)"
        )


def _clip(path: str, limit: int = 200) -> str:
    return path if len(path) <= limit else path[:80] + " ... " + path[-(limit - 85) :]


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
    return _model_encoder(model) if model is not None else _encode_unsupported


def _row_encoder(tag: str, encode: Callable[..., Any], nests: bool) -> _EncodeFn:
    if nests:  # a container: its encode walks the items
        return lambda v, *walk: {TAG: tag, "v": encode(v, *walk)}
    return lambda v, *_: {TAG: tag, "v": encode(v)}


def _model_encoder(model: _Model) -> _EncodeFn:
    """How an instance of a model kind is stored: the fields it names, as a JSON object (or,
    for a pydantic RootModel, its root in its place)."""
    cls, typed, pydantic, stored = model.cls, model.typed, model.pydantic, model.stored
    calls = model.calls

    def encode(v: Any, depth: int, hint: Any, in_pydantic: bool) -> Any:
        if calls and depth >= MAX_DEPTH:  # else _encode_fields checks it, after stored()
            raise _TooDeep(v)
        pairs, owner = stored(v)
        if pairs is None:
            return _encode(owner, depth, None, True)
        hint = hint if typed else None
        return _encode_fields(pairs, owner, depth, hint, in_pydantic or pydantic, cls)

    return encode


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
        raise _TooDeep(owner)
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
        raise _TooDeep(items)
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
        raise _TooDeep(items)
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
