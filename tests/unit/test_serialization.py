"""lilota.serialization: models <-> JSON text, specific cases.

This module uses ``from __future__ import annotations`` on purpose: the dataclasses here
have string type hints, which ``build`` must resolve.
"""

from __future__ import annotations

import enum
import json
import math
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal, Optional
from uuid import UUID

import pytest

from lilota.errors import InvalidInput, LilotaError, RegistrationError, SerializationError
from lilota.models import TaskError
from lilota.serialization import MAX_DEPTH, build, check_model, dumps, loads, prepare

# --------------------------------------------------------------------------- models


@dataclass
class AddInput:
    a: int
    b: int


@dataclass
class AddOutput:
    sum: int


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Shade(str, enum.Enum):
    LIGHT = "light"
    DARK = "dark"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Pair(enum.Enum):
    ONE = (1, "one")


@dataclass
class Item:
    name: str
    qty: int = 1
    when: Optional[datetime] = None  # noqa: UP045  (typing.Optional on purpose)
    color: Color | None = None


@dataclass
class Order:
    id: UUID
    items: list[Item]
    note: str | None = None
    meta: dict[str, int] = field(default_factory=dict)
    tags: set[str] = field(default_factory=set)
    frozen_tags: frozenset[str] = frozenset()
    point: tuple[int, int] = (0, 0)
    history: tuple[date, ...] = ()
    kind: Literal["retail", "bulk"] = "retail"


@dataclass
class AllTypes:
    dt: datetime
    d: date
    t: time
    td: timedelta
    u: UUID
    dec: Decimal
    raw: bytes
    f: float
    big: int
    color: Color
    shade: Shade
    level: Level
    pair: Pair
    colors: list[Color]
    color_set: set[Color]
    by_name: dict[str, Color]
    maybe: Color | None
    lit: Literal[Color.RED]
    anything: Any


@dataclass(frozen=True)
class Point:
    x: int
    y: int


@dataclass
class Node:
    value: int
    children: list[Node] = field(default_factory=list)


@dataclass
class WithInitFalse:
    a: int
    double: int = field(init=False)

    def __post_init__(self) -> None:
        self.double = self.a * 2


@dataclass
class Positive:
    n: int

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError("n must be positive")


@dataclass
class Floats:
    x: float
    d: Decimal = Decimal(0)


@dataclass
class Flag:
    on: bool
    n: int = 0


@dataclass
class Defaults:
    a: int = 1
    b: list[int] = field(default_factory=list)


class Vector:
    """A ModelProtocol class without from_dict: rebuilt as Vector(**d)."""

    def __init__(self, x: float, y: float) -> None:
        self.x = x
        self.y = y

    def as_dict(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vector) and (self.x, self.y) == (other.x, other.y)


class Money:
    """A ModelProtocol class with from_dict."""

    def __init__(self, amount: Decimal, currency: str) -> None:
        self.amount = amount
        self.currency = currency

    def as_dict(self) -> dict[str, Any]:
        return {"amount": str(self.amount), "cur": self.currency}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Money:
        return cls(Decimal(data["amount"]), data["cur"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Money) and (self.amount, self.currency) == (
            other.amount,
            other.currency,
        )


class BadAsDict:
    def as_dict(self) -> Any:
        return [1, 2]


def roundtrip(value: Any, model: Any = None) -> Any:
    return build(loads(dumps(value, model=model)), model)


def same(a: Any, b: Any) -> bool:
    """Equality that treats nan == nan and checks types and float signs."""
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1, a) == math.copysign(1, b)
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        return str(a) == str(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, (datetime, time)):
        return a.isoformat() == b.isoformat()
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# --------------------------------------------------------------------------- round trips

TAGGED = [
    pytest.param(datetime(2024, 5, 17, 12, 30, 1, 123456), "datetime", id="naive-datetime"),
    pytest.param(datetime(2024, 5, 17, 12, 30, tzinfo=timezone.utc), "datetime", id="utc"),
    pytest.param(
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=5, minutes=30, seconds=7))),
        "datetime",
        id="odd-offset",
    ),
    pytest.param(date(2024, 2, 29), "date", id="date"),
    pytest.param(time(23, 59, 59, 999999), "time", id="naive-time"),
    pytest.param(time(1, 2, tzinfo=timezone(timedelta(hours=-3))), "time", id="aware-time"),
    pytest.param(timedelta(days=-3, seconds=5, microseconds=7), "timedelta", id="timedelta"),
    pytest.param(UUID("12345678-1234-5678-1234-567812345678"), "uuid", id="uuid"),
    pytest.param(Decimal("1.10"), "decimal", id="decimal"),
    pytest.param(Decimal("-0"), "decimal", id="decimal-neg-zero"),
    pytest.param(Decimal("NaN"), "decimal", id="decimal-nan"),
    pytest.param(Decimal("-Infinity"), "decimal", id="decimal-inf"),
    pytest.param(Decimal("1E+999999"), "decimal", id="decimal-huge"),
    pytest.param(b"\x00\xff binary", "bytes", id="bytes"),
    pytest.param((1, "a", (2, None)), "tuple", id="tuple"),
    pytest.param((), "tuple", id="empty-tuple"),
    pytest.param({3, 1, 2}, "set", id="set"),
    pytest.param(set(), "set", id="empty-set"),
    pytest.param(frozenset({"x", (1, 2)}), "frozenset", id="frozenset"),
    pytest.param(math.inf, "float", id="inf"),
    pytest.param(-math.inf, "float", id="-inf"),
    pytest.param(math.nan, "float", id="nan"),
    pytest.param(7**5000, "int", id="huge-int"),
    pytest.param(-(7**5000), "int", id="huge-negative-int"),
    pytest.param({"__lilota__": "datetime", "v": "x"}, "dict", id="dict-with-tag-key"),
]


@pytest.mark.parametrize(("value", "tag"), TAGGED)
def test_every_tag_round_trips_untyped(value: Any, tag: str) -> None:
    text = dumps(value)
    assert text is not None
    assert json.loads(text)["__lilota__"] == tag
    assert same(loads(text), value)
    assert same(build(loads(text), None), value)
    # also inside a plain dict and a list
    assert same(roundtrip({"k": [value]}), {"k": [value]})


@pytest.mark.parametrize(("value", "tag"), TAGGED)
def test_every_tag_round_trips_in_a_typed_any_field(value: Any, tag: str) -> None:
    @dataclass
    class Holder:
        v: Any

    assert same(roundtrip(Holder(value), Holder).v, value)


def test_json_natives_pass_through() -> None:
    value = {"s": "x", "i": -(2**100), "f": 0.1, "neg0": -0.0, "b": True, "n": None, "l": []}
    text = dumps(value)
    assert json.loads(text or "") == value
    assert same(loads(text), value)


def test_bytearray_comes_back_as_bytes() -> None:
    assert loads(dumps(bytearray(b"ab"))) == b"ab"
    assert type(loads(dumps(bytearray(b"ab")))) is bytes


def test_typed_fields_round_trip() -> None:
    value = AllTypes(
        dt=datetime(2020, 1, 1, 8, tzinfo=timezone(timedelta(hours=2))),
        d=date(1999, 12, 31),
        t=time(4, 5, 6),
        td=timedelta(hours=1),
        u=UUID(int=5),
        dec=Decimal("3.14159"),
        raw=b"abc",
        f=math.nan,
        big=2**3000,
        color=Color.GREEN,
        shade=Shade.DARK,
        level=Level.HIGH,
        pair=Pair.ONE,
        colors=[Color.RED, Color.GREEN],
        color_set={Color.RED},
        by_name={"r": Color.RED},
        maybe=None,
        lit=Color.RED,
        anything={"nested": (1, 2)},
    )
    text = dumps(value, model=AllTypes)
    stored = loads(text)
    assert stored["color"] == "green"  # enums are stored as their value
    assert stored["pair"] == (1, "one")
    rebuilt = build(stored, AllTypes)
    assert isinstance(rebuilt, AllTypes)
    for name in vars(value):
        a, b = getattr(value, name), getattr(rebuilt, name)
        assert same(a, b) if not isinstance(a, set) else a == b, name
    assert rebuilt.color is Color.GREEN
    assert rebuilt.colors[1] is Color.GREEN
    assert rebuilt.color_set == {Color.RED}
    assert rebuilt.by_name["r"] is Color.RED
    assert rebuilt.lit is Color.RED
    assert rebuilt.shade is Shade.DARK
    assert rebuilt.level is Level.HIGH
    assert rebuilt.pair is Pair.ONE
    assert prepare(value, AllTypes) == text


def test_add_input_and_output() -> None:
    text = prepare(AddInput(a=1, b=2), AddInput)
    assert text == '{"a":1,"b":2}'
    assert build(loads(text), AddInput) == AddInput(1, 2)
    assert prepare({"a": 1, "b": 2}, AddInput) == text  # a dict is stored as given
    out = loads(dumps(AddOutput(sum=3), model=AddOutput, root="output"))
    assert out == {"sum": 3}
    assert AddOutput(**out) == AddOutput(3)


def test_nested_dataclasses_with_optional_list_dict_and_defaults() -> None:
    order = Order(
        id=UUID(int=1),
        items=[Item("a"), Item("b", 2, datetime(2024, 1, 1), Color.RED)],
        meta={"x": 1},
        tags={"t1", "t2"},
        frozen_tags=frozenset({"f"}),
        point=(3, 4),
        history=(date(2024, 1, 1),),
        kind="bulk",
    )
    assert roundtrip(order, Order) == order
    assert roundtrip(order, Order).items[1].color is Color.RED
    # defaults fill missing fields
    built = build({"id": UUID(int=2), "items": [{"name": "z"}]}, Order)
    assert built == Order(id=UUID(int=2), items=[Item("z")])
    assert built.meta == {} and built.tags == set()


def test_list_and_tuple_are_interchangeable_for_sequence_fields() -> None:
    built = build({"id": UUID(int=2), "items": (), "point": [1, 2], "tags": ["a", "a"]}, Order)
    assert built.items == [] and built.point == (1, 2) and built.tags == {"a"}


def test_recursive_dataclass() -> None:
    tree = Node(1, [Node(2), Node(3, [Node(4)])])
    assert roundtrip(tree, Node) == tree


def test_frozen_dataclass_and_init_false_fields() -> None:
    assert roundtrip(Point(1, 2), Point) == Point(1, 2)
    stored = loads(dumps(WithInitFalse(3), model=WithInitFalse))
    assert stored == {"a": 3}  # init=False fields are not stored, so Model(**d) works
    assert WithInitFalse(**stored).double == 6
    assert build({"a": 3, "double": 99}, WithInitFalse).double == 6  # and ignored if present


def test_int_accepted_for_float_and_decimal_but_bool_is_not_int() -> None:
    built = build({"x": 1, "d": 2}, Floats)
    assert built.x == 1.0 and type(built.x) is float
    assert built.d == Decimal(2) and isinstance(built.d, Decimal)
    with pytest.raises(InvalidInput, match=r"^input\.n: expected int, got bool True$"):
        build({"on": True, "n": True}, Flag)
    with pytest.raises(InvalidInput, match=r"input\.on: expected bool, got int 1"):
        build({"on": 1}, Flag)
    with pytest.raises(InvalidInput, match=r"input\.x: expected float, got bool"):
        build({"x": False}, Floats)
    with pytest.raises(InvalidInput, match="too large for a float"):
        build({"x": 10**400}, Floats)


def test_untyped_enums_with_a_value_mixin_are_stored_as_their_value() -> None:
    value = {"shade": Shade.DARK, "level": Level.LOW, "shades": [Shade.LIGHT]}
    assert loads(dumps(value)) == {"shade": "dark", "level": 1, "shades": ["light"]}
    assert type(loads(dumps(value))["shade"]) is str
    # a str-mixin enum can be a dict key
    assert loads(dumps({Shade.DARK: 1})) == {"dark": 1}


def test_plain_enum_in_untyped_position_is_refused() -> None:
    with pytest.raises(
        SerializationError,
        match=r"^input\['c'\]: Color\.RED is a plain Enum member.*"
        r"type the field as Color in the input model, or send Color\.RED\.value$",
    ):
        dumps({"c": Color.RED})
    with pytest.raises(SerializationError, match=r"^output\.anything: .*in the output model"):
        dumps(
            AllTypes(**{**_all_types_kwargs(), "anything": Color.RED}),
            model=AllTypes,
            root="output",
        )
    # without a model, a dataclass's own annotations do not make a position typed
    with pytest.raises(SerializationError, match=r"^input\.color: Color\.RED"):
        dumps(Item("x", color=Color.RED))


def _all_types_kwargs() -> dict[str, Any]:
    return {
        "dt": datetime(2020, 1, 1),
        "d": date(2020, 1, 1),
        "t": time(),
        "td": timedelta(),
        "u": UUID(int=0),
        "dec": Decimal(0),
        "raw": b"",
        "f": 0.0,
        "big": 0,
        "color": Color.RED,
        "shade": Shade.LIGHT,
        "level": Level.LOW,
        "pair": Pair.ONE,
        "colors": [],
        "color_set": set(),
        "by_name": {},
        "maybe": None,
        "lit": Color.RED,
        "anything": None,
    }


def test_enum_rebuild_errors() -> None:
    with pytest.raises(InvalidInput, match=r"input\.color: expected Color \(a value of 'red', "):
        build({"name": "x", "color": "blue"}, Item)
    with pytest.raises(InvalidInput, match=r"input\.level: expected Level"):
        build({**loads(dumps(_all_types_kwargs(), model=AllTypes)), "level": True}, AllTypes)


# --------------------------------------------------------------------------- pydantic


def test_pydantic_model_round_trip() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Inner(pydantic.BaseModel):
        when: datetime
        color: Color

    class Job(pydantic.BaseModel):
        name: str = pydantic.Field(alias="jobName")
        inner: Inner
        sizes: list[int] = []
        price: Decimal = Decimal("0.10")
        maybe: Optional[Level] = None  # noqa: UP045

    job = Job(jobName="j", inner=Inner(when=datetime(2024, 1, 1), color=Color.GREEN))
    check_model(Job, role="input_model")
    text = prepare(job, Job)
    stored = loads(text)
    assert stored["jobName"] == "j"  # by alias, so model_validate and Job(**d) accept it
    assert stored["inner"] == {"when": datetime(2024, 1, 1), "color": "green"}
    rebuilt = build(stored, Job)
    assert rebuilt == job
    assert rebuilt.inner.color is Color.GREEN
    assert Job(**stored) == job
    # a dict of its fields is accepted too, and stored as given
    assert loads(prepare({"jobName": "k", "inner": {"when": "2024-01-01", "color": "red"}}, Job))[
        "inner"
    ] == {"when": "2024-01-01", "color": "red"}


def test_pydantic_model_with_as_dict_uses_model_dump() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Tagged(pydantic.BaseModel):
        n: int

        def as_dict(self) -> dict[str, Any]:
            return {"something": "else"}

    check_model(Tagged, role="output_model")
    assert loads(dumps(Tagged(n=1), model=Tagged)) == {"n": 1}
    assert roundtrip(Tagged(n=1), Tagged) == Tagged(n=1)


def test_pydantic_errors_name_the_field() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Sub(pydantic.BaseModel):
        x: int

    class Top(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        sub: Sub
        items: list[int]

    with pytest.raises(InvalidInput, match=r"input\.sub\.x: Input should be a valid integer"):
        build({"sub": {"x": "nope"}, "items": []}, Top)
    with pytest.raises(InvalidInput, match=r"input\.items: missing required field"):
        prepare({"sub": {"x": 1}}, Top)
    with pytest.raises(InvalidInput, match=r"input\.items\[1\]: Input should be"):
        prepare({"sub": {"x": 1}, "items": [1, "a"]}, Top)
    with pytest.raises(InvalidInput, match=r"input\.zzz: unknown field"):
        build({"sub": {"x": 1}, "items": [], "zzz": 1}, Top)
    with pytest.raises(
        InvalidInput, match=r"^input: expected Top \(or a dict of its fields\), got list$"
    ):
        prepare([1], Top)


def test_pydantic_any_field_is_an_untyped_position() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Loose(pydantic.BaseModel):
        typed: Color
        loose: Any = None

    assert roundtrip(Loose(typed=Color.RED), Loose).typed is Color.RED
    with pytest.raises(SerializationError, match=r"^input\.loose: Color\.RED is a plain Enum"):
        dumps(Loose(typed=Color.RED, loose=Color.RED), model=Loose)


def test_pydantic_types_lilota_lacks_fall_back_to_pydantic_json() -> None:
    pydantic = pytest.importorskip("pydantic")
    import ipaddress
    from pathlib import Path

    class Site(pydantic.BaseModel):
        url: pydantic.AnyUrl
        path: Path
        ip: ipaddress.IPv4Address

    site = Site(url="https://example.org/x", path=Path("/a/b"), ip="10.0.0.1")
    assert loads(dumps(site, model=Site)) == {
        "url": "https://example.org/x",
        "path": "/a/b",
        "ip": "10.0.0.1",
    }
    assert roundtrip(site, Site) == site
    # but not outside a pydantic model
    with pytest.raises(SerializationError, match=r"^input\['p'\]: cannot store pathlib"):
        dumps({"p": Path("/a")})


# --------------------------------------------------------------------------- ModelProtocol


def test_model_protocol_without_from_dict() -> None:
    check_model(Vector, role="input_model")
    text = prepare(Vector(1.5, 2), Vector)
    assert loads(text) == {"x": 1.5, "y": 2}
    assert build(loads(text), Vector) == Vector(1.5, 2)
    with pytest.raises(InvalidInput, match=r"^input: Vector\(\*\*\.\.\.\) raised TypeError"):
        prepare({"x": 1}, Vector)


def test_model_protocol_with_from_dict() -> None:
    check_model(Money, role="output_model")
    money = Money(Decimal("9.99"), "EUR")
    text = prepare(money, Money, root="output")
    assert loads(text) == {"amount": "9.99", "cur": "EUR"}
    assert build(loads(text), Money, root="output") == money
    with pytest.raises(InvalidInput, match=r"^output: Money\.from_dict\(\.\.\.\) raised KeyError"):
        prepare({"amount": "1"}, Money, root="output")


def test_task_error_is_a_model_protocol_dataclass() -> None:
    err = TaskError(type="ValueError", message="bad", traceback="tb")
    assert roundtrip(err, TaskError) == err


def test_as_dict_must_return_a_dict() -> None:
    with pytest.raises(
        SerializationError, match=r"^input\[0\]: BadAsDict\.as_dict\(\) returned list"
    ):
        dumps([BadAsDict()])


# --------------------------------------------------------------------------- errors


class Opaque:
    def __repr__(self) -> str:
        return "<Opaque>"


def test_unsupported_type_names_path_type_and_advice() -> None:
    value = {"items": [{"when": 1}, {"when": 2}, {"when": Opaque()}]}
    with pytest.raises(
        SerializationError,
        match=r"^input\['items'\]\[2\]\['when'\]: cannot store .*Opaque <Opaque> as JSON; "
        r"convert it to a supported type",
    ):
        dumps(value)


@dataclass
class Row:
    when: Any


@dataclass
class Table:
    items: list[Row]


def test_dataclass_paths_use_attribute_syntax() -> None:
    with pytest.raises(SerializationError, match=r"^input\.items\[2\]\.when: cannot store"):
        dumps(Table([Row(1), Row(2), Row(object())]), model=Table)


@pytest.mark.parametrize(
    ("value", "advice"),
    [
        (lambda: 1, "callables cannot be stored"),
        (print, "callables cannot be stored"),
        (int, "callables cannot be stored"),
        (1j, r"store it as \[z\.real, z\.imag\]"),
        ((i for i in range(3)), r"convert it with list\(\.\.\.\)"),
        (range(3), r"convert it with list\(\.\.\.\)"),
        (memoryview(b"x"), r"convert it with bytes\(\.\.\.\)"),
        (__import__("types").MappingProxyType({}), r"convert it with dict\(\.\.\.\)"),
    ],
)
def test_unsupported_values_get_specific_advice(value: Any, advice: str) -> None:
    with pytest.raises(SerializationError, match=r"^input\['k'\]: cannot store .*" + advice):
        dumps({"k": value})


def test_non_str_dict_keys_are_refused() -> None:
    with pytest.raises(
        SerializationError, match=r"^input\['a'\]: dict key 1 is int; only str keys"
    ):
        dumps({"a": {1: "x"}})
    with pytest.raises(SerializationError, match=r"^input: dict key \(1, 2\) is tuple"):
        dumps({(1, 2): "x"})
    with pytest.raises(SerializationError, match=r"dict key <Level\.LOW: 1> is .*Level"):
        dumps({Level.LOW: 1})


def test_set_items_that_come_back_unhashable_are_refused() -> None:
    with pytest.raises(SerializationError, match=r"^input\['s'\]\{\*\}: set item .*Point.*list"):
        dumps({"s": {Point(1, 2)}})
    with pytest.raises(SerializationError, match=r"^input\{\*\}: set item"):
        dumps(frozenset({(1, Point(1, 2))}))


def _nested_lists(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_depth_limit() -> None:
    assert loads(dumps(_nested_lists(MAX_DEPTH))) == _nested_lists(MAX_DEPTH)
    with pytest.raises(SerializationError, match=r"^input\[0\]\[0\].*: nested deeper than 200"):
        dumps(_nested_lists(MAX_DEPTH + 1))
    with pytest.raises(SerializationError, match="nested deeper than 200"):
        dumps(_nested_lists(5000))


def test_deep_tuples_round_trip_at_the_limit() -> None:
    value: Any = ()
    for _ in range(MAX_DEPTH - 1):
        value = (value,)
    assert loads(dumps(value)) == value


def test_cycles_are_refused() -> None:
    d: dict[str, Any] = {}
    d["self"] = d
    with pytest.raises(SerializationError, match=r"^input\['self'\]: reference cycle.*as input,"):
        dumps(d)
    lst: list[Any] = [1]
    lst.append({"back": lst})
    with pytest.raises(SerializationError, match=r"^input\[1\]\['back'\]: reference cycle"):
        dumps(lst)
    node = Node(1)
    node.children.append(node)
    with pytest.raises(SerializationError, match=r"^input\.children\[0\]: reference cycle"):
        dumps(node, model=Node)


def test_shared_objects_that_are_not_cycles_are_fine() -> None:
    shared = [1, 2]
    assert loads(dumps({"a": shared, "b": shared})) == {"a": [1, 2], "b": [1, 2]}


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", "stored value is not valid JSON"),
        ("", "stored value is not valid JSON"),
        ('{"__lilota__": "nope", "v": 1}', r"^stored value: unknown lilota tag 'nope'"),
        ('[{"__lilota__": "uuid", "v": "zz"}]', r"^stored value\[0\]: cannot decode the 'uuid'"),
        ('{"a": {"__lilota__": "date", "v": 5}}', r"^stored value\['a'\]: the 'date' tag needs"),
        ('{"__lilota__": "bytes", "v": "!!"}', "cannot decode the 'bytes'"),
        ('{"__lilota__": "float", "v": "1.5"}', "expected 'nan'"),
        ('{"__lilota__": "timedelta", "v": [1, 2]}', r"expected \[days, seconds"),
        ('{"__lilota__": "set", "v": [[1]]}', "cannot decode the 'set'"),
        ('{"__lilota__": "tuple"}', "malformed lilota tag"),
        ('{"__lilota__": "tuple", "v": [], "x": 1}', "malformed lilota tag"),
        ('{"__lilota__": "int", "v": "0xZZ"}', "cannot decode the 'int'"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_corrupt_text_is_refused(text: str, match: str) -> None:
    with pytest.raises(SerializationError, match=match):
        loads(text)


def test_loads_refuses_non_text() -> None:
    with pytest.raises(SerializationError, match="must be JSON text"):
        loads(b"{}")  # type: ignore[arg-type]


def test_none_is_sql_null() -> None:
    assert dumps(None) is None
    assert dumps(None, model=AddInput) is None
    assert loads(None) is None
    assert dumps([None]) == "[null]"


def test_build_errors_name_the_field() -> None:
    with pytest.raises(InvalidInput, match=r"^input\.b: missing required field$"):
        build({"a": 1}, AddInput)
    with pytest.raises(InvalidInput, match=r"^input\.a: expected int, got str 'x'$"):
        build({"a": "x", "b": 1}, AddInput)
    with pytest.raises(
        InvalidInput, match=r"^input\.c: unknown field \(AddInput has fields a, b\)$"
    ):
        build({"a": 1, "b": 2, "c": 3}, AddInput)
    with pytest.raises(InvalidInput, match=r"^input\.items\[1\]\.qty: expected int, got str"):
        build({"id": UUID(int=1), "items": [{"name": "a"}, {"name": "b", "qty": "2"}]}, Order)
    with pytest.raises(InvalidInput, match=r"^input\.meta\['k'\]: expected int, got float 1\.5"):
        build({"id": UUID(int=1), "items": [], "meta": {"k": 1.5}}, Order)
    with pytest.raises(InvalidInput, match=r"^input\.items\[0\]\.when: expected datetime, got str"):
        build({"id": UUID(int=1), "items": [{"name": "a", "when": "2024-01-01"}]}, Order)
    with pytest.raises(
        InvalidInput, match=r"^input\.point: expected tuple\[int, int\] \(2 items\)"
    ):
        build({"id": UUID(int=1), "items": [], "point": [1, 2, 3]}, Order)
    with pytest.raises(InvalidInput, match=r"^input\.kind: expected Literal\['retail', 'bulk'\]"):
        build({"id": UUID(int=1), "items": [], "kind": "other"}, Order)
    with pytest.raises(InvalidInput, match=r"^input\.items: expected list\[.*Item\], got dict"):
        build({"id": UUID(int=1), "items": {}}, Order)
    with pytest.raises(InvalidInput, match=r"^input\.id: expected UUID, got str"):
        build({"id": "12345678-1234-5678-1234-567812345678", "items": []}, Order)
    with pytest.raises(InvalidInput, match=r"^input\.items\[0\]: expected .*Item \(or a dict"):
        build({"id": UUID(int=1), "items": [5]}, Order)
    with pytest.raises(
        InvalidInput, match=r"^input: expected AddInput \(or a dict of its fields\)"
    ):
        build([1, 2], AddInput)


def test_constructor_errors_become_invalid_input() -> None:
    with pytest.raises(
        InvalidInput, match=r"^input: Positive\(\.\.\.\) raised ValueError: n must be"
    ):
        prepare({"n": 0}, Positive)
    with pytest.raises(InvalidInput, match="n must be positive") as info:
        build({"n": -1}, Positive)
    assert isinstance(info.value.__cause__, ValueError)


def test_build_with_no_model_or_dict_returns_the_value() -> None:
    value = {"a": [1, (2,)]}
    assert build(value, None) is value
    assert build(value, dict) is value


def test_build_none_means_no_fields() -> None:
    assert build(None, Defaults) == Defaults()
    with pytest.raises(
        InvalidInput, match=r"^input: expected AddInput .*got None; input\.a: missing required"
    ):
        build(None, AddInput)


# --------------------------------------------------------------------------- prepare


@pytest.mark.parametrize(
    ("value", "got"), [([1, 2], "list"), (3, "int"), ("a", "str"), (Item("x"), "Item")]
)
def test_prepare_refuses_wrong_kinds(value: Any, got: str) -> None:
    with pytest.raises(
        InvalidInput, match=rf"^input: expected AddInput \(or a dict of its fields\), got .*{got}$"
    ):
        prepare(value, AddInput)


def test_prepare_validates_before_returning() -> None:
    with pytest.raises(InvalidInput, match=r"^input\.b: missing required field$"):
        prepare({"a": 1}, AddInput)
    with pytest.raises(InvalidInput, match=r"^input\.a: expected int, got str"):
        prepare(AddInput(a="1", b=2), AddInput)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="got None"):
        prepare(None, AddInput)
    with pytest.raises(SerializationError, match=r"^input\.a: cannot store"):
        prepare(AddInput(a=object(), b=2), AddInput)  # type: ignore[arg-type]


def test_prepare_with_defaults_only_model_and_none() -> None:
    assert prepare(None, Defaults) is None
    assert build(loads(prepare(None, Defaults)), Defaults) == Defaults()


def test_prepare_without_model_or_with_dict_model() -> None:
    assert prepare([1, (2,)], None) == '[1,{"__lilota__":"tuple","v":[2]}]'
    assert prepare(None, None) is None
    assert prepare({"a": 1}, dict) == '{"a":1}'
    assert prepare(None, dict) is None
    with pytest.raises(InvalidInput, match=r"^input: expected a dict, got list$"):
        prepare([1], dict)
    with pytest.raises(SerializationError, match=r"^input\['c'\]: Color\.RED is a plain Enum"):
        prepare({"c": Color.RED}, dict)


def test_errors_are_lilota_errors_and_builtin_ones() -> None:
    with pytest.raises(LilotaError):
        dumps(object())
    with pytest.raises(TypeError):
        dumps(object())
    with pytest.raises(ValueError):
        build({}, AddInput)


# --------------------------------------------------------------------------- check_model


@pytest.mark.parametrize("model", [None, dict, AddInput, Order, Node, Vector, Money, TaskError])
def test_check_model_accepts(model: Any) -> None:
    check_model(model, role="input_model")


@pytest.mark.parametrize(
    ("model", "advice"),
    [
        (int, "must be None, dict, a dataclass, a pydantic v2 BaseModel subclass"),
        (list, "must be None, dict"),
        ("AddInput", "must be None, dict"),
        (AddInput(1, 2), "pass the class AddInput itself, not an instance"),
        (Optional[AddInput], "must be None, dict"),  # noqa: UP045
    ],
)
def test_check_model_refuses(model: Any, advice: str) -> None:
    with pytest.raises(
        RegistrationError, match=r"^output_model=.* cannot be used: (it )?" + advice
    ):
        check_model(model, role="output_model")


@pytest.mark.parametrize(
    "model",
    [dict[str, int], Mapping[str, int], MutableMapping[str, Any], dict[str, AddInput], Mapping],
)
def test_check_model_accepts_a_dict_or_mapping_of_any_parametrisation(model: Any) -> None:
    check_model(model, role="input_model")
    check_model(model, role="output_model")


def test_a_parametrised_dict_model_is_rebuilt_as_a_dict_with_its_value_types() -> None:
    text = prepare({"x": {"a": 1, "b": 2}}, dict[str, AddInput])
    assert text == dumps({"x": {"a": 1, "b": 2}})  # stored as a plain dict would be
    assert build(loads(text), dict[str, AddInput]) == {"x": AddInput(1, 2)}
    assert build({"a": 1}, Mapping[str, float]) == {"a": 1}
    assert prepare(None, dict[str, int]) is None
    assert build(None, dict[str, int]) is None
    with pytest.raises(InvalidInput, match=r"^input\['b'\]: expected int, got str"):
        prepare({"a": 1, "b": "2"}, dict[str, int])
    with pytest.raises(InvalidInput, match=r"^input: expected dict\[str, int\], got list"):
        prepare([1], dict[str, int])


def test_check_model_names_the_role_and_object() -> None:
    with pytest.raises(RegistrationError, match=r"^input_model=<class 'int'> cannot be used"):
        check_model(int, role="input_model")


def test_check_model_refuses_unresolvable_hints() -> None:
    @dataclass
    class Local:
        x: Missing  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(RegistrationError, match=r"cannot resolve the type hints of .*Local"):
        check_model(Local, role="input_model")

    @dataclass
    class Outer:
        inner: list[Local]

    with pytest.raises(RegistrationError, match=r"cannot resolve the type hints of .*Local"):
        check_model(Outer, role="input_model")


def test_check_model_refuses_pydantic_v1() -> None:
    pytest.importorskip("pydantic")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pydantic import v1

        class Old(v1.BaseModel):
            x: int

    with pytest.raises(RegistrationError, match="pydantic v1 models are not supported"):
        check_model(Old, role="input_model")


# --------------------------------------------------------------------------- text form


def test_nul_and_lone_surrogates_make_ascii_text() -> None:
    value = {"nul": "a\x00b", "lone": "\ud800x\udfff", "emoji": "\U0001f600", "\x00k": "é"}
    text = dumps(value)
    assert text is not None
    assert text.isascii()
    assert "\\u0000" in text and "\\ud800" in text
    text.encode("ascii")  # storable by any driver
    assert loads(text) == value


def test_float_text_is_exact() -> None:
    for f in (0.1, 1e308, 5e-324, -0.0, 2.0**53 + 1):
        assert loads(dumps(f)) == f
        assert math.copysign(1, loads(dumps(f))) == math.copysign(1, f)


def test_set_text_is_stable() -> None:
    assert dumps({"b", "a", "c"}) == '{"__lilota__":"set","v":["a","b","c"]}'


def test_dict_key_order_is_kept() -> None:
    assert list(loads(dumps({"z": 1, "a": 2}))) == ["z", "a"]


def test_importing_does_not_import_pydantic() -> None:
    code = "import sys, lilota.serialization; print('pydantic' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- found by hypothesis


@pytest.mark.parametrize(
    "offset",
    [
        timedelta(microseconds=1),
        -timedelta(microseconds=1),
        timedelta(seconds=1, microseconds=1),
        timedelta(hours=-5, microseconds=500000),
        timedelta(hours=23, minutes=59, seconds=59, microseconds=999999),
    ],
)
def test_sub_second_utc_offsets_survive(offset: timedelta) -> None:
    # Hypothesis found time(0, 0, tzinfo=timezone(timedelta(microseconds=1))) coming back
    # as UTC: CPython's fromisoformat reads "+00:00:00.000001" as "+00:00".
    tz = timezone(offset)
    for value in (time(0, 0, tzinfo=tz), datetime(2024, 1, 1, 0, 0, 0, 7, tzinfo=tz)):
        back = loads(dumps(value))
        assert back.utcoffset() == offset
        assert back.isoformat() == value.isoformat()
    assert (
        roundtrip(
            AllTypes(**{**_all_types_kwargs(), "dt": datetime(1, 1, 1, tzinfo=tz)}), AllTypes
        ).dt.utcoffset()
        == offset
    )


def test_zoneinfo_datetimes_keep_their_offset_not_their_zone() -> None:
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        paris = zoneinfo.ZoneInfo("Europe/Paris")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no tz database")
    value = datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=paris)  # the second 02:30
    back = loads(dumps(value))
    assert back.isoformat() == "2024-10-27T02:30:00+01:00"
    assert back.tzinfo == timezone(timedelta(hours=1))
    assert back.timestamp() == value.timestamp()
