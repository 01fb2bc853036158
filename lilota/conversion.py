"""Typed values: the model kinds lilota stores as dicts of fields, what a type hint says
about the positions inside it, and rebuilding a decoded value as a declared type (the seams
``build`` and ``check_model``, re-exported by :mod:`lilota.serialization`, which owns the
stored format and imports this module; this one never imports it).

A model is stored as the dict of its fields: a dataclass's ``init`` fields, a pydantic v2
model's ``model_dump(mode="python", by_alias=True)``, or ``as_dict()``. A model kind says
only what to store (:meth:`_Model.stored`); the encoder encodes it. ``build`` rebuilds a
dataclass field by field from its type hints (nested models, Optional/Union, containers of X,
Literal, Enums, the tagged types; defaults for missing fields; ``init=False`` fields ignored),
a pydantic model with ``model_validate``, another class with ``from_dict(d)`` if it has one,
else ``Model(**d)``. An ``int`` fits a ``float`` or ``Decimal`` field, a ``bool`` never fits an
``int``, a list fits a tuple or set field and a tuple a list field. Where the model types an
Enum position, ``build`` restores the member from its stored value.

Errors inside are :class:`~lilota.scalars._PathError`, which gathers the path of the bad
value while it unwinds; ``build`` renders it as ``InvalidInput``.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections import abc
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any, Literal, NamedTuple, TypeVar, Union, get_args, get_origin

from lilota.errors import InvalidInput, RegistrationError
from lilota.scalars import (
    _SCALARS,
    _attr_seg,
    _cache,
    _class_name,
    _Converter,
    _describe,
    _enum_converter,
    _expect,
    _expected_model,
    _hint_name,
    _identity,
    _instance_of,
    _literal_converter,
    _NoneType,
    _PathError,
    _short,
    _strip,
    _type_name,
)

__all__ = ["build", "check_model"]

_SEQUENCES = frozenset({list, abc.Sequence, abc.MutableSequence, abc.Collection, abc.Iterable})
_SETS = frozenset({set, frozenset, abc.Set, abc.MutableSet})
_MAPPINGS = frozenset({dict, abc.Mapping, abc.MutableMapping})
_Pairs = Iterable[tuple[Any, Any]]  # a model's (stored key, value) pairs


def build(value: Any, model: type | None, *, root: str = "input") -> Any:
    """Rebuild a :func:`loads`-decoded value as ``model`` (None or ``dict``: as it is; a
    ``value`` of None for a model class: "no fields given"). A parametrised dict or Mapping
    (``dict[str, int]``) is a dict whose keys and values are rebuilt as its types; None
    stays None, as for ``dict``. Raises ``InvalidInput`` naming the field path:
    ``input.b: missing required field``, ``input.a: expected int, got...``."""
    if model is None or model is dict or (value is None and _is_mapping(model)):
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


def check_model(model: object, *, role: str) -> None:
    """Raise ``RegistrationError`` (naming ``role`` and ``model``) unless ``model`` is None,
    ``dict``, a dataclass (whose type hints, and those of the dataclasses it names, resolve),
    a pydantic v2 model, a class with ``as_dict()`` (:class:`~lilota.models.ModelProtocol`)
    or a dict/Mapping of any parametrisation (``dict[str, int]``: a dict, see :func:`build`)."""
    found = _model_of(model)
    if isinstance(found, _DataclassModel) or _is_mapping(model):
        _check_hints(model, set())
    if model is None or model is dict or found is not None or _is_mapping(model):
        return
    if _is_pydantic(model, "pydantic.v1"):
        advice = "pydantic v1 models are not supported; use pydantic v2 (pydantic.BaseModel)"
    elif not isinstance(model, type) and _model_of(type(model)) is not None:
        advice = f"pass the class {_class_name(type(model))} itself, not an instance"
    else:
        advice = (
            "it must be None, dict, a dataclass, a pydantic v2 BaseModel subclass, or a "
            "class with an as_dict() method (lilota.models.ModelProtocol)"
        )
    raise RegistrationError(f"{role}={_short(model, 80)} cannot be used: {advice}")


def _is_mapping(model: object) -> bool:
    """Whether ``model`` is dict, Mapping or MutableMapping, bare or parametrised: the earlier
    release took these as an input/output model, so they are kept as dicts."""
    origin = get_origin(model)
    return any(model is m or origin is m for m in _MAPPINGS)  # `is`: a model may be unhashable


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


# --------------------------------------------------------------------------- models


class _Model:
    """A class stored as the dict of its fields (this base: a class with ``as_dict()``);
    ``stored`` says what to store for an instance, ``build`` makes one from a dict."""

    typed = False  # the encoder passes the position's hint to the fields (stored_fields)
    calls = True  # stored() calls the class's code: the encoder checks the depth before
    pydantic = False  # its fields may hold other values that pydantic can make JSON of

    def __init__(self, cls: type) -> None:
        self.cls, self.name = cls, _class_name(cls)

    def stored_fields(self) -> dict[str, Any] | None:
        """Stored key -> type hint, when the class says (for typed positions inside it)."""
        return None

    def stored(self, v: Any) -> tuple[_Pairs | None, Any]:
        """What to store for the instance ``v``: ``(pairs, owner)``, the (key, value) pairs of
        a JSON object and the object its path passes through (to tell a cycle), or
        ``(None, value)``: store ``value`` in its place."""
        d = self._call(v.as_dict, ".as_dict()")
        if not isinstance(d, dict):
            raise _PathError(
                f"{self.name}.as_dict() returned {_type_name(d)}; it must return a dict"
            )
        return d.items(), d

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

    typed, calls = True, False  # stored() reads attributes; the depth is checked after

    def __init__(self, cls: type) -> None:
        super().__init__(cls)
        self.names = tuple(f.name for f in dataclasses.fields(cls) if f.init)
        self.known = frozenset(f.name for f in dataclasses.fields(cls))  # init=False: ignored
        # Made when first used: a hint may name a class defined after this one.
        self.plan: list[tuple[str, _Converter, bool]] | None = None

    def stored_fields(self) -> dict[str, Any]:
        hints = _type_hints(self.cls)
        return {name: hints.get(name) for name in self.names}

    def stored(self, v: Any) -> tuple[_Pairs | None, Any]:
        return [(name, getattr(v, name)) for name in self.names], v

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

    typed = pydantic = True

    def stored_fields(self) -> dict[str, Any]:
        return {
            key: info.annotation
            for name, info in self.cls.model_fields.items()  # type: ignore[attr-defined]
            for key in (name, info.alias, info.serialization_alias)
            if isinstance(key, str)
        }

    def stored(self, v: Any) -> tuple[_Pairs | None, Any]:
        dumped = self._call(lambda: v.model_dump(mode="python", by_alias=True), ".model_dump()")
        if not isinstance(dumped, dict):  # a RootModel: its root, stored in its place
            return None, dumped
        return dumped.items(), v

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


_GENERICS: dict[Any, Callable[[Any, tuple[Any, ...]], _Converter]] = {
    **dict.fromkeys((Union, types.UnionType), _union_converter),
    **dict.fromkeys(_SEQUENCES, _sequence_converter),
    **dict.fromkeys(_SETS, _set_converter),
    **dict.fromkeys(_MAPPINGS, _dict_converter),
    tuple: _tuple_converter,
    Literal: _literal_converter,
}
