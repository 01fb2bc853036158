"""new_task(): the one step that checks a new task's arguments and makes its row."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest

from lilota import execution
from lilota.context import TaskContext
from lilota.errors import (
    InvalidArgument,
    InvalidArgumentType,
    InvalidInput,
    SerializationError,
    TaskNotRegistered,
)
from lilota.models import TaskProgress
from lilota.registry import Registry, effective_max_attempts, new_task
from lilota.store import TaskStore

NOW = datetime(2030, 1, 2, 3, 4, 5)


@dataclass
class AddInput:
    a: int
    b: int


@pytest.fixture
def registry() -> Registry:
    registry = Registry()
    registry.register("add", lambda data: None, input_model=AddInput, max_attempts=4)
    return registry


def test_a_registered_task_gets_its_input_checked_and_its_registered_max_attempts(
    registry: Registry,
) -> None:
    task = new_task("add", AddInput(a=1, b=2), registry=registry)
    assert json.loads(task.input or "") == {"a": 1, "b": 2}
    assert task.max_attempts == 4
    with pytest.raises(InvalidInput, match=r"^input\.b"):
        new_task("add", {"a": 1}, registry=registry)


def test_a_name_not_registered_here_is_stored_as_plain_json_with_one_attempt(
    registry: Registry,
) -> None:
    task = new_task("elsewhere", {"x": [1, 2]}, registry=registry)
    assert task.name == "elsewhere"
    assert json.loads(task.input or "") == {"x": [1, 2]}
    assert task.max_attempts == 1


def test_known_names_refuse_an_unknown_name_and_none_accepts_any() -> None:
    with pytest.raises(
        TaskNotRegistered, match=r"no task named 'c' is registered \(registered: a, b\)"
    ):
        new_task("c", known_names=frozenset({"b", "a"}))
    assert new_task("c", known_names=None).name == "c"


def test_a_name_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(InvalidArgumentType, match=r"name must be a task name \(a string\), got 5"):
        new_task(5)  # type: ignore[arg-type]


def test_a_name_no_task_can_be_registered_under_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="name must be 1-200 characters"):
        new_task("two words")
    with pytest.raises(InvalidArgument, match="name must be 1-200 characters"):
        new_task("n" * 201)


def test_cheap_checks_come_before_the_input_is_serialized() -> None:
    unstorable = object()
    with pytest.raises(SerializationError):
        new_task("job", unstorable)
    with pytest.raises(ValueError, match="priority must be an int"):
        new_task("job", unstorable, priority="high")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pass run_at or delay, not both"):
        new_task("job", unstorable, run_at=NOW, delay=timedelta(1))


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"run_at": "tomorrow"}, InvalidArgumentType, "run_at must be a datetime"),
        ({"delay": 5}, InvalidArgumentType, "delay must be a timedelta"),
        ({"priority": True}, InvalidArgumentType, "priority must be an int"),
        ({"priority": 2**31}, InvalidArgument, "priority must be an int from -2147483648 to"),
        ({"unique_key": ""}, InvalidArgument, "unique_key must be a string of 1-255 characters"),
        ({"unique_key": "k" * 256}, InvalidArgument, "unique_key must be a string of 1-255"),
        ({"description": 5}, InvalidArgumentType, "description must be a string or None, got 5"),
        ({"max_attempts": 0}, InvalidArgument, "max_attempts must be an int from 1 to 2147483647"),
        ({"max_attempts": 2**31}, InvalidArgument, "max_attempts must be an int from 1 to"),
    ],
)
def test_bad_arguments_are_refused(
    options: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        new_task("job", **options)  # type: ignore[arg-type]


def test_a_delay_counts_from_the_clock_given() -> None:
    task = new_task("job", clock=lambda: NOW, delay=timedelta(minutes=5))
    assert task.run_at == NOW + timedelta(minutes=5)


def test_the_row_carries_every_option() -> None:
    task = new_task(
        "job",
        run_at=NOW,
        priority=3,
        unique_key="k",
        description="d",
        max_attempts=2,
        schedule_key="job@tick",
    )
    assert (task.run_at, task.priority, task.unique_key, task.description) == (NOW, 3, "k", "d")
    assert (task.max_attempts, task.schedule_key, task.input) == (2, "job@tick", None)


def test_effective_max_attempts_is_the_larger_of_stored_and_registered(
    registry: Registry,
) -> None:
    definition = registry.get("add")
    assert effective_max_attempts(definition) == 4
    assert effective_max_attempts(definition, stored=2) == 4
    assert effective_max_attempts(definition, stored=7) == 7
    assert effective_max_attempts(None, stored=2) == 2
    assert effective_max_attempts(None) == 1


def _context(store: TaskStore, registry: Registry) -> TaskContext:
    return TaskContext(
        task_id=1,
        name="parent",
        attempt=1,
        max_attempts=1,
        progress=TaskProgress(1, lambda _: None),
        logger=logging.LoggerAdapter(logging.getLogger("test"), {}),
        _schedule=execution.scheduler(store, registry),
    )


def test_task_context_stores_a_name_it_does_not_know_and_checks_one_it_knows(
    store: TaskStore, registry: Registry, clock: Any
) -> None:
    store.register_worker("other-worker", ["elsewhere"])  # a live worker that runs it
    ctx = _context(store, registry)
    other = store.get(ctx.schedule("elsewhere", {"x": 1}, delay=timedelta(seconds=30)))
    assert other is not None
    assert (other.name, other.input, other.max_attempts) == ("elsewhere", {"x": 1}, 1)
    assert other.run_at is not None
    assert other.run_at.replace(tzinfo=None) == clock.now + timedelta(seconds=30)
    with pytest.raises(InvalidInput):
        ctx.schedule("add", {"a": 1})
    known = store.get(ctx.queue("add", a=1, b=2))
    assert known is not None
    assert (known.input, known.max_attempts) == ({"a": 1, "b": 2}, 4)


def test_task_context_refuses_the_arguments_lilota_schedule_refuses(
    store: TaskStore, registry: Registry
) -> None:
    ctx = _context(store, registry)
    with pytest.raises(ValueError, match="pass run_at or delay, not both"):
        ctx.schedule("add", {"a": 1, "b": 2}, run_at=NOW, delay=timedelta(seconds=1))
    with pytest.raises(InvalidArgumentType, match=r"name must be a task name \(a string\)"):
        ctx.schedule(["add"], None)  # type: ignore[arg-type]
    assert sum(store.count_by_status().values()) == 0
