"""Properties of lilota.serialization, checked with Hypothesis.

1. Every value that is accepted round trips: ``build(loads(dumps(v, model=M)), M)`` is
   ``v`` again (with nan == nan, datetimes compared by wall time and UTC offset, and, in
   untyped positions, enums compared with their value).
2. Every value that is refused raises SerializationError / InvalidInput whose message
   starts with the path of the offending value.
"""

import copy
import dataclasses
import enum
import itertools
import keyword
import math
import zoneinfo
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from functools import cache
from typing import Any, Literal, Optional, Union, get_args, get_origin
from uuid import UUID

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from lilota.errors import InvalidInput, SerializationError
from lilota.serialization import build, dumps, loads, prepare

SETTINGS = settings(
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Color(enum.Enum):
    """A plain Enum, with values of mixed types."""

    RED = "red"
    GREEN = "green"
    BLUE = 3


class Shade(str, enum.Enum):
    LIGHT = "light"
    DARK = "dark"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


@dataclass
class Box:
    item: Any
    other: Any = None


@dataclass(frozen=True)
class Frozen:
    x: int


# --------------------------------------------------------------------------- comparing


def same(a: Any, b: Any, *, enum_values: bool = False) -> bool:
    """Whether b is what a should come back as.

    nan equals nan, floats keep their sign, Decimals their text, datetimes and times their
    wall time and offset (an aware value comes back with a fixed-offset timezone). With
    ``enum_values`` (untyped positions) an enum member may come back as its plain value.
    """
    if isinstance(a, enum.Enum):
        if isinstance(b, enum.Enum):
            return a is b
        return enum_values and isinstance(a, type(a.value)) and same(a.value, b)
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, (bytes, bytearray)) and type(b) is bytes:
        return bytes(a) == b
    if type(a) is not type(b):
        return False
    if isinstance(a, Decimal):
        return str(a) == str(b)
    if isinstance(a, (datetime, time)):
        return a.isoformat() == b.isoformat()
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k], enum_values=enum_values) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(
            same(x, y, enum_values=enum_values) for x, y in zip(a, b, strict=True)
        )
    if isinstance(a, (set, frozenset)):
        return a == b  # set members never hold nan (see HASHABLES)
    if dataclasses.is_dataclass(a):
        return all(
            same(getattr(a, f.name), getattr(b, f.name), enum_values=enum_values)
            for f in dataclasses.fields(a)
        )
    return bool(a == b)


# --------------------------------------------------------------------------- strategies


def _tzdata_available() -> bool:
    try:
        zoneinfo.ZoneInfo("Europe/Paris")
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


FIXED_TZ = st.builds(
    timezone,
    st.timedeltas(min_value=timedelta(hours=-23, minutes=59), max_value=timedelta(hours=23)),
)
TZS = st.one_of(FIXED_TZ, st.timezones()) if _tzdata_available() else FIXED_TZ

TEXT = st.text(st.characters(exclude_categories=()), max_size=8)  # NUL, lone surrogates too
KEYS = st.one_of(TEXT, st.sampled_from(["__lilota__", "v", "a"]))
INTS = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**15000), max_value=2**15000),  # past int_max_str_digits
)
FLOATS = st.floats()  # nan and +-inf included
DATETIMES = st.one_of(st.datetimes(), st.datetimes(timezones=TZS))
TIMES = st.one_of(st.times(), st.times(timezones=FIXED_TZ))
DECIMALS = st.decimals(allow_nan=True, allow_infinity=True)  # NaN, sNaN, -0, exponents
SAFE_DECIMALS = st.decimals(allow_nan=False, allow_infinity=False)
MIXIN_ENUMS = st.one_of(st.sampled_from(Shade), st.sampled_from(Level))

HASHABLES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        INTS,
        st.floats(allow_nan=False),
        TEXT,
        st.binary(max_size=4),
        st.dates(),
        st.datetimes(),
        st.uuids(),
        SAFE_DECIMALS,
        MIXIN_ENUMS,
        st.timedeltas(),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(tuple), st.frozensets(inner, max_size=3)
    ),
    max_leaves=6,
)


def _untyped(with_enums: bool) -> SearchStrategy[Any]:
    leaves = [
        st.none(),
        st.booleans(),
        INTS,
        FLOATS,
        TEXT,
        st.binary(max_size=6),
        DATETIMES,
        st.dates(),
        TIMES,
        st.timedeltas(),
        st.uuids(),
        DECIMALS,
    ]
    if with_enums:
        leaves.append(MIXIN_ENUMS)
    return st.recursive(
        st.one_of(*leaves),
        lambda inner: st.one_of(
            st.lists(inner, max_size=4),
            st.lists(inner, max_size=4).map(tuple),
            st.dictionaries(KEYS, inner, max_size=4),
            st.sets(HASHABLES, max_size=4),
            st.frozensets(HASHABLES, max_size=4),
        ),
        max_leaves=15,
    )


UNTYPED = _untyped(with_enums=True)
UNTYPED_NO_ENUMS = _untyped(with_enums=False)  # for Any fields of typed models

# (annotation, strategy for its values)
Spec = tuple[Any, SearchStrategy[Any]]

LEAF_SPECS: list[Spec] = [
    (int, INTS),
    (float, FLOATS),
    (str, TEXT),
    (bool, st.booleans()),
    (bytes, st.binary(max_size=6)),
    (datetime, DATETIMES),
    (date, st.dates()),
    (time, TIMES),
    (timedelta, st.timedeltas()),
    (UUID, st.uuids()),
    (Decimal, DECIMALS),
    (Color, st.sampled_from(Color)),
    (Shade, st.sampled_from(Shade)),
    (Level, st.sampled_from(Level)),
    (Literal["a", "b", 1], st.sampled_from(["a", "b", 1])),
    (Literal[Color.RED, Shade.DARK], st.sampled_from([Color.RED, Shade.DARK])),
    (Any, UNTYPED_NO_ENUMS),
    (dict[str, Any], st.dictionaries(KEYS, UNTYPED_NO_ENUMS, max_size=3)),
    (Union[int, str], st.one_of(INTS, TEXT)),  # noqa: UP007
    (Union[str, list[int]], st.one_of(TEXT, st.lists(INTS, max_size=3))),  # noqa: UP007
    (Union[datetime, date], st.one_of(DATETIMES, st.dates())),  # noqa: UP007
    (Frozen, st.builds(Frozen, INTS)),
]

HASHABLE_SPECS: list[Spec] = [
    (int, INTS),
    (str, TEXT),
    (bytes, st.binary(max_size=4)),
    (date, st.dates()),
    (UUID, st.uuids()),
    (Color, st.sampled_from(Color)),
    (Shade, st.sampled_from(Shade)),
    (tuple[int, str], st.tuples(INTS, TEXT)),
]

try:
    from pydantic import BaseModel as _PydanticBase
except ImportError:  # pydantic is optional; its tests are skipped without it
    _PydanticBase = None


def _shadows_base_model(name: str) -> bool:
    """A pydantic field with this name (``mro``, ``json``, ``copy``...) shadows a BaseModel
    attribute: pydantic warns, and with warnings as errors the example fails before lilota
    runs."""
    return _PydanticBase is not None and hasattr(_PydanticBase, name)


FIELD_NAMES = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True).filter(
    lambda s: not keyword.iskeyword(s) and s != "self" and not _shadows_base_model(s)
)
_counter = itertools.count()


@st.composite
def dataclass_specs(draw: st.DrawFn, depth: int) -> Spec:
    """A fresh dataclass (nested, optional, defaulted fields) and a strategy for instances."""
    names = draw(st.lists(FIELD_NAMES, max_size=5, unique=True))
    fields: list[Any] = []
    required: dict[str, SearchStrategy[Any]] = {}
    optional: dict[str, SearchStrategy[Any]] = {}
    for name in names:
        tp, values = draw(type_specs(depth + 1))
        if draw(st.booleans()):
            default = draw(values)
            fields.append(
                (name, tp, dataclasses.field(default_factory=lambda d=default: copy.deepcopy(d)))
            )
            optional[name] = values
        else:
            fields.append((name, tp))
            required[name] = values
    cls = dataclasses.make_dataclass(
        f"Gen{next(_counter)}", fields, kw_only=True, frozen=draw(st.booleans())
    )
    return cls, st.fixed_dictionaries(required, optional=optional).map(lambda kw: cls(**kw))


@cache
def type_specs(depth: int) -> SearchStrategy[Spec]:
    """(annotation, values) pairs, nested up to 3 levels."""
    leaves = st.sampled_from(LEAF_SPECS)
    if depth >= 3:
        return leaves
    inner = st.deferred(lambda: type_specs(depth + 1))
    hashable = st.sampled_from(HASHABLE_SPECS)
    return st.one_of(
        leaves,
        inner.map(lambda s: (Optional[s[0]], st.one_of(st.none(), s[1]))),  # noqa: UP045
        inner.map(lambda s: (list[s[0]], st.lists(s[1], max_size=3))),
        inner.map(lambda s: (tuple[s[0], ...], st.lists(s[1], max_size=3).map(tuple))),
        st.tuples(inner, inner).map(
            lambda ab: (tuple[ab[0][0], ab[1][0]], st.tuples(ab[0][1], ab[1][1]))
        ),
        inner.map(lambda s: (dict[str, s[0]], st.dictionaries(KEYS, s[1], max_size=3))),
        hashable.map(lambda s: (set[s[0]], st.sets(s[1], max_size=3))),
        hashable.map(lambda s: (frozenset[s[0]], st.frozensets(s[1], max_size=3))),
        dataclass_specs(depth),
    )


@st.composite
def models_and_values(draw: st.DrawFn) -> tuple[type, Any]:
    cls, values = draw(dataclass_specs(0))
    return cls, draw(values)


# --------------------------------------------------------------------------- property 1


@SETTINGS
@given(UNTYPED)
def test_untyped_values_round_trip(value: Any) -> None:
    text = dumps(value)
    assert text is None or text.isascii()
    assert same(value, build(loads(text), None), enum_values=True)
    assert same(value, loads(prepare(value, None)), enum_values=True)


@SETTINGS
@given(st.dictionaries(KEYS, UNTYPED, max_size=4))
def test_untyped_dicts_round_trip_through_a_dict_model(value: dict[str, Any]) -> None:
    text = prepare(value, dict)
    assert same(value, build(loads(text), dict), enum_values=True)


@SETTINGS
@given(models_and_values())
def test_dataclasses_round_trip(model_and_value: tuple[type, Any]) -> None:
    model, value = model_and_value
    text = dumps(value, model=model)
    assert text is not None and text.isascii()
    rebuilt = build(loads(text), model)
    assert type(rebuilt) is model
    assert same(value, rebuilt)
    # schedule() checks and stores the same text
    assert prepare(value, model) == text
    # a dict of the fields is accepted too, stored as given, and rebuilds the same
    fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    assert same(value, build(loads(prepare(fields, model)), model))


def _pydantic_specs() -> list[Spec]:
    return [
        (int, INTS),
        (float, FLOATS),
        (bool, st.booleans()),
        (str, TEXT),
        (bytes, st.binary(max_size=6)),
        (datetime, st.one_of(st.datetimes(), st.datetimes(timezones=FIXED_TZ))),
        (date, st.dates()),
        (UUID, st.uuids()),
        (Decimal, SAFE_DECIMALS),
        (Color, st.sampled_from(Color)),
        (Shade, st.sampled_from(Shade)),
        (list[int], st.lists(INTS, max_size=3)),
        (Optional[str], st.one_of(st.none(), TEXT)),  # noqa: UP045
        (dict[str, date], st.dictionaries(KEYS, st.dates(), max_size=3)),
        (tuple[int, ...], st.lists(INTS, max_size=3).map(tuple)),
        (Optional[Color], st.one_of(st.none(), st.sampled_from(Color))),  # noqa: UP045
    ]


@st.composite
def pydantic_models_and_values(draw: st.DrawFn, depth: int = 0) -> tuple[type, Any]:
    pydantic = pytest.importorskip("pydantic")
    names = draw(
        st.lists(FIELD_NAMES.filter(lambda s: not s.startswith("model")), max_size=4, unique=True)
    )
    fields: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for name in names:
        if depth < 2 and draw(st.integers(0, 5)) == 0:
            sub_model, sub_value = draw(pydantic_models_and_values(depth + 1))
            fields[name] = (sub_model, ...)
            values[name] = sub_value
            continue
        tp, strategy = draw(st.sampled_from(_pydantic_specs()))
        fields[name] = (tp, ...)
        values[name] = draw(strategy)
    model = pydantic.create_model(f"PGen{next(_counter)}", **fields)
    return model, model(**values)


@SETTINGS
@given(pydantic_models_and_values())
def test_pydantic_models_round_trip(model_and_value: tuple[type, Any]) -> None:
    model, value = model_and_value
    text = prepare(value, model)
    rebuilt = build(loads(text), model)
    assert type(rebuilt) is model
    assert same(value.model_dump(), rebuilt.model_dump())


# --------------------------------------------------------------------------- property 2


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque>"


BAD_LEAVES: list[tuple[str, Any, str]] = [
    # (name, bad value, what follows its path in the message)
    ("object", Opaque(), ": cannot store"),
    ("function", len, ": cannot store"),
    ("complex", 1j, ": cannot store"),
    ("plain enum", Color.GREEN, ": Color.GREEN is a plain Enum member"),
    ("int key", {1: "x"}, ": dict key 1 is int"),
    ("dataclass in set", {Frozen(1)}, "{*}: set item"),
    ("list in frozenset", frozenset({(1, Frozen(2))}), "{*}: set item"),
]


@st.composite
def refused_values(draw: st.DrawFn) -> tuple[Any, str]:
    """A value with one bad leaf somewhere, and the start its error message must have."""
    _, value, after = draw(st.sampled_from(BAD_LEAVES))
    segs: list[str] = []
    benign = st.lists(UNTYPED, max_size=2)
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["dict", "list", "tuple", "dataclass"]))
        if kind == "dict":
            key = draw(KEYS)
            before = draw(st.dictionaries(KEYS, UNTYPED, max_size=2))
            later = draw(st.dictionaries(KEYS, UNTYPED, max_size=2))
            before.pop(key, None)
            value = {
                **before,
                key: value,
                **{k: v for k, v in later.items() if k not in before and k != key},
            }
            segs.append(f"[{key!r}]")
        elif kind in ("list", "tuple"):
            before, later = draw(benign), draw(benign)
            seq = [*before, value, *later]
            value = seq if kind == "list" else tuple(seq)
            segs.append(f"[{len(before)}]")
        else:
            value = Box(item=value, other=draw(UNTYPED))
            segs.append(".item")
    return value, "input" + "".join(reversed(segs)) + after


@SETTINGS
@given(refused_values())
def test_refused_values_name_their_path(value_and_start: tuple[Any, str]) -> None:
    value, start = value_and_start
    with pytest.raises(SerializationError) as info:
        dumps(value)
    assert str(info.value).startswith(start)
    with pytest.raises(SerializationError) as info:
        prepare(value, None)
    assert str(info.value).startswith(start)


WRONG = {"w1": b"x", "w2": "s", "w3": 1}  # fits no annotation generated here except Any


def _mentions_any(tp: Any) -> bool:
    return tp is Any or any(_mentions_any(a) for a in get_args(tp) if a is not Ellipsis)


def _targets(cls: type, prefix: str) -> list[tuple[list[str], str]]:
    """(field names from the top, path) of fields whose annotation refuses WRONG."""
    out: list[tuple[list[str], str]] = []
    for f in dataclasses.fields(cls):
        if _mentions_any(f.type):
            continue
        out.append(([f.name], f"{prefix}.{f.name}"))
        if dataclasses.is_dataclass(f.type) and get_origin(f.type) is None:
            out.extend(
                ([f.name, *names], path) for names, path in _targets(f.type, f"{prefix}.{f.name}")
            )
    return out


def _replace(value: Any, names: list[str], new: Any) -> Any:
    if len(names) == 1:
        return dataclasses.replace(value, **{names[0]: new})
    return dataclasses.replace(
        value, **{names[0]: _replace(getattr(value, names[0]), names[1:], new)}
    )


@SETTINGS
@given(models_and_values(), st.data())
def test_wrong_typed_fields_name_their_path(
    model_and_value: tuple[type, Any], data: st.DataObject
) -> None:
    model, value = model_and_value
    targets = _targets(model, "input")
    if not targets:
        return
    names, path = data.draw(st.sampled_from(targets))
    bad = _replace(value, names, WRONG)
    with pytest.raises(InvalidInput) as info:
        prepare(bad, model)
    message = str(info.value)
    assert message.startswith(path)
    assert message[len(path)] in ":.[{"
    with pytest.raises(InvalidInput) as info:
        build(loads(dumps(bad, model=model)), model)
    assert str(info.value) == message


@SETTINGS
@given(models_and_values(), st.sampled_from([[1], "text", 5, (1, 2), Frozen(1)]))
def test_prepare_refuses_values_that_are_not_the_model(
    model_and_value: tuple[type, Any], wrong: Any
) -> None:
    model, _ = model_and_value
    with pytest.raises(InvalidInput, match=r"^input: expected Gen\d+ \(or a dict of its fields\)"):
        prepare(wrong, model)
