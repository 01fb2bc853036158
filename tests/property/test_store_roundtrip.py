"""Task inputs and outputs survive a trip through the real store, on SQLite and PostgreSQL.

The path is the one a scheduled task takes: ``Lilota.schedule()`` (``serialization.prepare``
and ``TaskStore.add``), ``TaskStore.claim``, then the worker's ``execution.execute`` (``build(loads(
claim.input), input_model)``: what the task function receives) and ``TaskStore.finish`` of its
return value, read back with ``TaskStore.get``.

Properties
----------
1. Every value the library accepts reaches the task function equal to what was scheduled
   (nan == nan, -0.0 keeps its sign, aware datetimes keep their UTC offset, enums in
   untyped positions arrive as their value), the stored text is exactly the text
   ``prepare`` made (byte for byte: TEXT columns, no JSON column type that could
   normalise it), and the output read back equals the ``loads`` view of its JSON.
2. Every value refused is refused by ``schedule()`` (and ``schedule_many()``) with an
   error naming the offending field, and no row is written.
3. Text arguments stored in plain columns (``description``, ``unique_key``) round trip
   for every string both backends can store; the others are refused at ``schedule()``.

What each backend does (found by these tests)
---------------------------------------------
Inputs and outputs are JSON text made with ``ensure_ascii``: every character outside
ASCII, ``"\\x00"`` and lone surrogates included, is a ``\\uXXXX`` escape, so the stored
text is pure ASCII and both backends store and return it byte for byte (no encoding can
refuse it). A PostgreSQL ``jsonb`` column would not do: it refuses ``\\u0000`` and lone
surrogates, turns ``-0.0`` into ``0.0``, writes ``1e308`` out in 309 digits and reorders
keys (checked on PostgreSQL 15). lilota uses ``TEXT`` on both backends, so nothing is
refused or rewritten. Floats are written with ``repr`` (``1e+308``, ``5e-324``, ``-0.0``,
``1.7976931348623157e+308``) and come back bit for bit; nan and the infinities are tagged.
Ints up to 2000 bits are JSON numbers and wider ones tagged hex, so ``-(2**15000)``
survives without hitting Python's ``int_max_str_digits``.

Found and fixed: a string holding a surrogate pair as two code points (``"\\ud83d\\ude00"``)
was written exactly like the one character it encodes (``"\\U0001f600"``) and came back as
that one character, as a value and as a dict key; such strings are now tagged.

Plain text columns are different: PostgreSQL refuses NUL in any ``text`` value ("PostgreSQL
text fields cannot contain NUL (0x00) bytes") while SQLite stores it, and neither driver
can encode a lone surrogate (a bare ``UnicodeEncodeError`` escaped from ``schedule()``).
Found and fixed: ``NewTask`` refuses both with a ``ValueError`` naming the argument, so a
``description`` or ``unique_key`` behaves the same on both backends; every other string
(any plane, ``"\\uffff"``, ``"\\U0010ffff"``, line separators) round trips.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_serialization_properties import (
    KEYS,
    UNTYPED,
    WRONG,
    _replace,
    _targets,
    models_and_values,
    pydantic_models_and_values,
    refused_values,
    same,
)

from lilota import Lilota, execution
from lilota.errors import InvalidInput, SerializationError
from lilota.serialization import build, dumps, loads, prepare

LEASE = timedelta(seconds=30)

# The database is made once per test (and backend); each example uses its own task name.
DB_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[
        *settings.default.suppress_health_check,
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

_names = itertools.count()


@pytest.fixture
def app(lilota_db_url: str) -> Iterator[Lilota]:
    """A scheduling-only Lilota (no worker processes) on a fresh database."""
    lilota = Lilota(lilota_db_url, number_of_workers=0)
    lilota.start()
    yield lilota
    lilota.stop()
    lilota.store.dispose()


def _register(app: Lilota, model: type | None) -> tuple[str, list[Any]]:
    """A task that records what it receives and returns it, under a fresh name."""
    name = f"rt.{next(_names)}"
    received: list[Any] = []

    def task(value: Any) -> Any:
        received.append(value)
        return value

    app.register(name, input_model=model, output_model=model)(task)
    return name, received


def trip(app: Lilota, value: Any, model: type | None) -> tuple[Any, Any]:
    """Schedule ``value``, run it as a worker would, record its output; return
    (what the task function received, the task's ``output`` read back from the store)."""
    name, received = _register(app, model)
    store = app.store
    task_id = app.schedule(name, value)
    claims = store.claim(worker_id="roundtrip", names=[name], limit=5, lease=LEASE)
    assert [c.id for c in claims] == [task_id]
    claim = claims[0]
    text = prepare(value, model)
    assert claim.input == text  # stored byte for byte
    assert text is None or text.isascii()

    definition = app.registry.find(name)
    assert definition is not None
    call = execution.prepare(claim, definition, store=store, write_progress=lambda _: None)
    outcome = execution.execute(call)
    assert outcome.status == "completed", outcome.exception
    assert len(received) == 1

    assert store.finish([outcome]) == 1
    task = store.get(task_id)
    assert task is not None and task.status == "completed"
    assert same(loads(text), task.input)
    assert same(loads(dumps(received[0], model=model, root="output")), task.output)
    return received[0], task.output


# --------------------------------------------------------------------------- property 1

EDGE_VALUES = [
    "\x00",
    "a\x00b\x00",
    "\ud800",  # lone high surrogate
    "\udfff",  # lone low surrogate
    "\udfff\ud800",  # a reversed pair: two lone surrogates
    "\ud83d\ude00",  # a valid pair written as two code points: stays two
    "\U0001f600",
    "\uffff\U0010ffff",
    2**1999,
    2**2000,  # the first tagged width
    -(2**15000),
    1e308,
    1.7976931348623157e308,
    5e-324,
    -5e-324,
    -0.0,
    2.2250738585072014e-308,
    0.1 + 0.2,
    math.nan,
    math.inf,
    -math.inf,
]


def test_edge_values_arrive_exactly(app: Lilota) -> None:
    for value in EDGE_VALUES:
        wrapped = {"v": value, "list": [value], "key\x00\ud800": value, "\ud83d\ude00": value}
        received, output = trip(app, wrapped, None)
        assert same(wrapped, received), ascii(value)
        assert same(wrapped, output), ascii(value)
        got = received["v"]
        assert type(got) is type(value)
        if isinstance(value, str):
            assert len(got) == len(value)  # no two code points joined into one
        if isinstance(value, float) and not math.isnan(value):
            assert got.hex() == value.hex()  # bit for bit, -0.0 and subnormals included


@DB_SETTINGS
@given(value=UNTYPED)
@example(value=None)
@example(value={"": [float("nan"), -0.0, 5e-324, 1e308, 2**4000, "\x00\ud800"]})
def test_untyped_inputs_arrive_unchanged(app: Lilota, value: Any) -> None:
    received, output = trip(app, value, None)
    assert same(value, received, enum_values=True)
    assert same(value, output, enum_values=True)


@DB_SETTINGS
@given(value=st.dictionaries(KEYS, UNTYPED, max_size=4))
def test_dict_model_inputs_arrive_unchanged(app: Lilota, value: dict[str, Any]) -> None:
    received, output = trip(app, value, dict)
    assert same(value, received, enum_values=True)
    assert same(value, output, enum_values=True)


@DB_SETTINGS
@given(model_and_value=models_and_values())
def test_dataclass_inputs_arrive_unchanged(app: Lilota, model_and_value: tuple[type, Any]) -> None:
    model, value = model_and_value
    received, output = trip(app, value, model)
    assert type(received) is model
    assert same(value, received)
    # Task.output holds the plain values; the output model rebuilds the same instance.
    assert same(value, build(output, model))


@DB_SETTINGS
@given(model_and_value=models_and_values())
def test_dicts_of_dataclass_fields_arrive_as_the_dataclass(
    app: Lilota, model_and_value: tuple[type, Any]
) -> None:
    model, value = model_and_value
    fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    received, _ = trip(app, fields, model)
    assert type(received) is model
    assert same(value, received)


@DB_SETTINGS
@given(model_and_value=pydantic_models_and_values())
def test_pydantic_inputs_arrive_unchanged(app: Lilota, model_and_value: tuple[type, Any]) -> None:
    model, value = model_and_value
    received, output = trip(app, value, model)
    assert type(received) is model
    assert same(value.model_dump(), received.model_dump())
    assert same(value.model_dump(), build(output, model).model_dump())


class Bag:
    """A ModelProtocol model: ``as_dict()`` out, ``Bag(**d)`` back."""

    def __init__(self, **fields: Any) -> None:
        self.fields = fields

    def as_dict(self) -> dict[str, Any]:
        return dict(self.fields)


@DB_SETTINGS
@given(fields=st.dictionaries(KEYS, UNTYPED, max_size=4))
def test_as_dict_model_inputs_arrive_unchanged(app: Lilota, fields: dict[str, Any]) -> None:
    received, output = trip(app, Bag(**fields), Bag)
    assert type(received) is Bag
    assert same(fields, received.fields, enum_values=True)
    assert same(fields, output, enum_values=True)


# --------------------------------------------------------------------------- property 2


def assert_nothing_written(app: Lilota) -> None:
    assert sum(app.store.count_by_status().values()) == 0


@DB_SETTINGS
@given(value_and_start=refused_values())
def test_refused_inputs_are_refused_by_schedule_and_write_nothing(
    app: Lilota, value_and_start: tuple[Any, str]
) -> None:
    value, start = value_and_start
    name, received = _register(app, None)
    with pytest.raises(SerializationError) as info:
        app.schedule(name, value)
    assert str(info.value).startswith(start)
    # one bad input among good ones: schedule_many stores none of them
    with pytest.raises(SerializationError) as info:
        app.schedule_many(name, [{"ok": 1}, value, None])
    assert str(info.value).startswith(start)
    assert_nothing_written(app)
    assert received == []


@DB_SETTINGS
@given(model_and_value=models_and_values(), data=st.data())
def test_inputs_that_do_not_fit_the_model_are_refused_by_schedule_and_write_nothing(
    app: Lilota, model_and_value: tuple[type, Any], data: st.DataObject
) -> None:
    model, value = model_and_value
    targets = _targets(model, "input")
    name, _ = _register(app, model)
    if targets:
        names, path = data.draw(st.sampled_from(targets))
        bad = _replace(value, names, WRONG)
        with pytest.raises(InvalidInput) as info:
            app.schedule(name, bad)
        assert str(info.value).startswith(path)
        assert str(info.value)[len(path)] in ":.[{"
        with pytest.raises(InvalidInput):
            app.schedule_many(name, [value, bad])
    with pytest.raises(InvalidInput, match=r"^input: expected Gen\d+ \(or a dict of its fields\)"):
        app.schedule(name, [value])
    assert_nothing_written(app)


# --------------------------------------------------------------------------- property 3

# Strings both backends can store in a text column: no NUL, no lone surrogate.
STORABLE_TEXT = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), min_size=1, max_size=40
)
UNSTORABLE_TEXT = st.tuples(
    st.text(max_size=5), st.sampled_from(["\x00", "\ud800", "\udfff"]), st.text(max_size=5)
).map("".join)


@DB_SETTINGS
@given(description=STORABLE_TEXT, unique_key=STORABLE_TEXT)
@example(description="\uffff\U0010ffff\u00e9\U0001f600", unique_key="\u2028\t\r\n")
def test_description_and_unique_key_round_trip(
    app: Lilota, description: str, unique_key: str
) -> None:
    name, _ = _register(app, None)
    unique_key = name + unique_key  # keys are global: earlier examples hold theirs
    task_id = app.schedule(name, None, description=description, unique_key=unique_key)
    task = app.store.get(task_id)
    assert task is not None
    assert task.description == description
    assert task.unique_key == unique_key
    # the key finds the same task again
    assert app.schedule(name, None, unique_key=unique_key) == task_id


@DB_SETTINGS
@given(text=UNSTORABLE_TEXT, argument=st.sampled_from(["description", "unique_key"]))
@example(text="\x00", argument="description")
@example(text="\ud800", argument="unique_key")
def test_text_arguments_no_backend_can_store_are_refused_by_schedule(
    app: Lilota, text: str, argument: str
) -> None:
    name, _ = _register(app, None)
    with pytest.raises(ValueError, match=rf"^{argument} "):
        app.schedule(name, None, **{argument: text})
    assert_nothing_written(app)
