"""Every public call with bad arguments, on SQLite and on PostgreSQL alike.

One table: each row is a call, the LilotaError subclass it must raise (exactly that
class), and a pattern of the message, which names the argument. Every row runs on both
backends and must leave the task table as it was. A public method with arguments that has
no row fails ``test_every_public_call_with_arguments_has_a_row``: add rows with the API.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from lilota import execution
from lilota.context import TaskContext
from lilota.core import Lilota
from lilota.errors import (
    ConfigurationError,
    InvalidArgument,
    InvalidArgumentType,
    InvalidInput,
    LilotaError,
    RegistrationError,
    SerializationError,
    TaskNotFound,
    TaskNotRegistered,
    TaskNotRetryable,
)
from lilota.legacy import TaskBase
from lilota.models import TaskProgress
from lilota.runner import TaskRunner
from lilota.schedules import crontab, every
from lilota.stores import DatabaseTaskStore
from lilota.testing import run_pending
from lilota.worker import LilotaWorker

INT32 = "an int from -2147483648 to 2147483647"
MAX_ATTEMPTS = "an int from 1 to 2147483647"
NOT_AN_ID = r"task_id must be an int, got"
NEAR_9999 = datetime(9999, 12, 31, 23, 0, tzinfo=timezone(timedelta(hours=-5)))


@dataclass
class AddInput:
    a: int
    b: int


def add(data: AddInput) -> int:
    return data.a + data.b


async def _async_hook(task: object) -> None:
    pass


class Echo(TaskBase):
    def run(self) -> None:
        self.set_output(self.task_info.id, self.task_info.input)


@dataclass
class Env:
    """What the calls of the table act on, all on the test's database."""

    lilota: Lilota
    ctx: TaskContext
    runner: TaskRunner
    legacy: DatabaseTaskStore
    progress: TaskProgress
    url: str
    first_id: int  # a pending task


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)],
)
def db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """One database per backend for the whole table: every row must leave it unchanged,
    so the rows can share it (a database per row would cost a minute on PostgreSQL)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('bad-arguments') / 'lilota.db'}"
        return
    postgres = request.getfixturevalue("lilota_postgres")
    url = postgres.create_database()
    try:
        yield url
    finally:
        postgres.drop_database(url)


@pytest.fixture(scope="module")
def env(db_url: str) -> Iterator[Env]:
    lilota_db_url = db_url
    lilota = Lilota(lilota_db_url, number_of_workers=0)
    lilota.register("add", input_model=AddInput)(add)
    lilota.start()
    first_id = lilota.schedule("add", AddInput(a=1, b=2))
    store = lilota.store
    ctx = TaskContext(
        task_id=first_id,
        name="add",
        attempt=1,
        max_attempts=1,
        progress=TaskProgress(first_id, lambda _: None),
        logger=logging.LoggerAdapter(logging.getLogger("test"), {}),
        _schedule=execution.scheduler(store, lilota.registry),
    )
    legacy = DatabaseTaskStore(store)
    runner = TaskRunner(legacy, number_of_workers=1)
    runner.register("echo", Echo)
    progress = TaskProgress(first_id, lambda p: store.set_progress(first_id, 1, p))
    yield Env(lilota, ctx, runner, legacy, progress, lilota_db_url, first_id)
    lilota.stop()
    store.dispose()


Call = Callable[[Env], object]
ROWS: list[tuple[str, Call, type[LilotaError], str]] = []


def row(label: str, error: type[LilotaError], message: str) -> Callable[[Call], Call]:
    """Add the decorated call to the table; ``label`` starts with ``Class.method``."""

    def add_row(call: Call) -> Call:
        ROWS.append((label, call, error, message))
        return call

    return add_row


def rows(label: str, error: type[LilotaError], message: str, calls: list[Call]) -> None:
    for n, call in enumerate(calls):
        ROWS.append((f"{label} #{n}", call, error, message))


# ---------------------------------------------------------------------- Lilota.schedule

rows(
    "Lilota.schedule: priority out of the 32-bit column",
    InvalidArgument,
    f"^priority must be {INT32}, got -?2147483",
    [
        lambda e: e.lilota.schedule("add", AddInput(1, 2), priority=2**31),
        lambda e: e.lilota.schedule("add", AddInput(1, 2), priority=-(2**31) - 1),
    ],
)
rows(
    "Lilota.schedule: priority not an int",
    InvalidArgumentType,
    f"^priority must be {INT32}, got ",
    [
        lambda e: e.lilota.schedule("add", AddInput(1, 2), priority="high"),
        lambda e: e.lilota.schedule("add", AddInput(1, 2), priority=1.0),
        lambda e: e.lilota.schedule("add", AddInput(1, 2), priority=True),
    ],
)
rows(
    "Lilota.schedule: max_attempts out of range",
    InvalidArgument,
    f"^max_attempts must be {MAX_ATTEMPTS}, got ",
    [
        lambda e: e.lilota.schedule("add", AddInput(1, 2), max_attempts=2**31),
        lambda e: e.lilota.schedule("add", AddInput(1, 2), max_attempts=0),
    ],
)
rows(
    "Lilota.schedule: max_attempts not an int",
    InvalidArgumentType,
    f"^max_attempts must be {MAX_ATTEMPTS}, got '3' \\(str\\)",
    [lambda e: e.lilota.schedule("add", AddInput(1, 2), max_attempts="3")],
)
rows(
    "Lilota.schedule: delay past the year 9999 or before the year 1",
    InvalidArgument,
    "^delay .* puts the task outside the years 1-9999",
    [
        lambda e: e.lilota.schedule("add", AddInput(1, 2), delay=timedelta.max),
        lambda e: e.lilota.schedule("add", AddInput(1, 2), delay=timedelta.min),
    ],
)
rows(
    "Lilota.schedule: delay not a timedelta",
    InvalidArgumentType,
    "^delay must be a timedelta, got 5 \\(int\\)",
    [lambda e: e.lilota.schedule("add", AddInput(1, 2), delay=5)],
)
rows(
    "Lilota.schedule: run_at outside the years 1-9999 in UTC",
    InvalidArgument,
    "^run_at 9999-12-31T23:00:00-05:00 is outside the years 1-9999 in UTC",
    [lambda e: e.lilota.schedule("add", AddInput(1, 2), run_at=NEAR_9999)],
)
rows(
    "Lilota.schedule: run_at not a datetime",
    InvalidArgumentType,
    "^run_at must be a datetime, got ",
    [
        lambda e: e.lilota.schedule("add", AddInput(1, 2), run_at="tomorrow"),
        lambda e: e.lilota.schedule("add", AddInput(1, 2), run_at=NEAR_9999.date()),
    ],
)
rows(
    "Lilota.schedule: run_at and delay",
    InvalidArgument,
    "^pass run_at or delay, not both",
    [
        lambda e: e.lilota.schedule(
            "add", AddInput(1, 2), run_at=datetime(2030, 1, 1), delay=timedelta(1)
        )
    ],
)
rows(
    "Lilota.schedule: description not a str",
    InvalidArgumentType,
    "^description must be a string or None, got 123 \\(int\\)",
    [lambda e: e.lilota.schedule("add", AddInput(1, 2), description=123)],
)
rows(
    "Lilota.schedule: description with NUL",
    InvalidArgument,
    "^description contains a NUL character",
    [lambda e: e.lilota.schedule("add", AddInput(1, 2), description="a\x00b")],
)
rows(
    "Lilota.schedule: unique_key out of the VARCHAR(255) column",
    InvalidArgument,
    "^unique_key must be a string of 1-255 characters",
    [
        lambda e: e.lilota.schedule("add", AddInput(1, 2), unique_key=""),
        lambda e: e.lilota.schedule("add", AddInput(1, 2), unique_key="k" * 256),
    ],
)
rows(
    "Lilota.schedule: unique_key not a str",
    InvalidArgumentType,
    "^unique_key must be a string or None, got 5 \\(int\\)",
    [lambda e: e.lilota.schedule("add", AddInput(1, 2), unique_key=5)],
)
rows(
    "Lilota.schedule: unique_key with a lone surrogate",
    InvalidArgument,
    "^unique_key contains the lone surrogate",
    [lambda e: e.lilota.schedule("add", AddInput(1, 2), unique_key="k\ud800")],
)
rows(
    "Lilota.schedule: name not a str",
    InvalidArgumentType,
    "^name must be a task name \\(a string\\), got 5 \\(int\\)",
    [lambda e: e.lilota.schedule(5, AddInput(1, 2))],
)
rows(
    "Lilota.schedule: name not registered",
    TaskNotRegistered,
    "^no task named 'nope' is registered \\(registered: add\\)",
    [lambda e: e.lilota.schedule("nope")],
)
rows(
    "Lilota.schedule: input that does not fit the model",
    InvalidInput,
    "^input.b",
    [lambda e: e.lilota.schedule("add", {"a": 1})],
)

# ---------------------------------------------------------------------- Lilota.schedule_many

rows(
    "Lilota.schedule_many: inputs not an iterable of inputs",
    InvalidArgumentType,
    "^inputs must be an iterable of task inputs",
    [
        lambda e: e.lilota.schedule_many("add", 5),
        lambda e: e.lilota.schedule_many("add", "ab"),
        lambda e: e.lilota.schedule_many("add", {"a": 1, "b": 2}),
    ],
)
rows(
    "Lilota.schedule_many: an option out of range, even with no input",
    InvalidArgument,
    f"^priority must be {INT32}",
    [
        lambda e: e.lilota.schedule_many("add", [], priority=2**31),
        lambda e: e.lilota.schedule_many("add", [AddInput(1, 2)], priority=2**31),
    ],
)
rows(
    "Lilota.schedule_many: max_attempts out of range",
    InvalidArgument,
    f"^max_attempts must be {MAX_ATTEMPTS}",
    [lambda e: e.lilota.schedule_many("add", [AddInput(1, 2)], max_attempts=2**31)],
)
rows(
    "Lilota.schedule_many: delay past the year 9999",
    InvalidArgument,
    "^delay .* puts the task outside",
    [lambda e: e.lilota.schedule_many("add", [AddInput(1, 2)], delay=timedelta.max)],
)
rows(
    "Lilota.schedule_many: one bad input among good ones",
    InvalidInput,
    "^input.b",
    [lambda e: e.lilota.schedule_many("add", [AddInput(1, 2), {"a": 1}])],
)
rows(
    "Lilota.schedule_many: run_at not a datetime",
    InvalidArgumentType,
    "^run_at must be a datetime",
    [lambda e: e.lilota.schedule_many("add", [AddInput(1, 2)], run_at=1)],
)

# ---------------------------------------------------------------------- async and connection=

rows(
    "Lilota.aschedule: the checks of schedule",
    InvalidArgumentType,
    f"^priority must be {INT32}, got 'high'",
    [lambda e: asyncio.run(e.lilota.aschedule("add", AddInput(1, 2), priority="high"))],
)
rows(
    "Lilota.aschedule: input that does not fit the model",
    InvalidInput,
    "^input.b",
    [lambda e: asyncio.run(e.lilota.aschedule("add", {"a": 1}))],
)
rows(
    "Lilota.aschedule_many: one bad input among good ones",
    InvalidInput,
    "^input.b",
    [lambda e: asyncio.run(e.lilota.aschedule_many("add", [AddInput(1, 2), {"a": 1}]))],
)
rows(
    "Lilota.aschedule_many: inputs not an iterable of inputs",
    InvalidArgumentType,
    "^inputs must be",
    [lambda e: asyncio.run(e.lilota.aschedule_many("add", 5))],
)
rows(
    "Lilota.await_task: timeout not >= 0",
    InvalidArgument,
    "^timeout must be",
    [lambda e: asyncio.run(e.lilota.await_task(e.first_id, timeout=-1))],
)
rows(
    "Lilota.schedule: connection not a SQLAlchemy Connection or Session",
    InvalidArgumentType,
    "^connection must be a SQLAlchemy Connection or Session, got 'conn' \\(str\\)",
    [
        lambda e: e.lilota.schedule("add", AddInput(1, 2), connection="conn"),
        lambda e: e.lilota.schedule_many("add", [], connection="conn"),
        lambda e: asyncio.run(e.lilota.aschedule("add", AddInput(1, 2), connection="conn")),
    ],
)

# ---------------------------------------------------------------------- ids

_BAD_IDS: list[object] = ["1", 1.5, None, True]
for _bad in _BAD_IDS:
    rows(
        f"Lilota.get_task_by_id: {_bad!r}",
        InvalidArgumentType,
        f"^{NOT_AN_ID} ",
        [lambda e, bad=_bad: e.lilota.get_task_by_id(bad)],
    )
    rows(
        f"Lilota.cancel: {_bad!r}",
        InvalidArgumentType,
        f"^{NOT_AN_ID} ",
        [lambda e, bad=_bad: e.lilota.cancel(bad)],
    )
    rows(
        f"Lilota.retry: {_bad!r}",
        InvalidArgumentType,
        f"^{NOT_AN_ID} ",
        [lambda e, bad=_bad: e.lilota.retry(bad)],
    )
    rows(
        f"Lilota.await_task: {_bad!r}",
        InvalidArgumentType,
        f"^{NOT_AN_ID} ",
        [lambda e, bad=_bad: asyncio.run(e.lilota.await_task(bad, timeout=0))],
    )
    rows(
        f"Lilota.wait: {_bad!r}",
        InvalidArgumentType,
        f"^{NOT_AN_ID} ",
        [lambda e, bad=_bad: e.lilota.wait(bad, timeout=0)],
    )
    rows(
        f"DatabaseTaskStore.get_task_by_id: {_bad!r}",
        InvalidArgumentType,
        "^id must be an int, got ",
        [lambda e, bad=_bad: e.legacy.get_task_by_id(bad)],
    )
rows(
    "Lilota.cancel / retry / wait: an int no task can have",
    TaskNotFound,
    "^no task with id (1180591620717411303424|9223372036854775808|0|-1)$",
    [
        lambda e: e.lilota.cancel(2**70),
        lambda e: e.lilota.cancel(-1),
        lambda e: e.lilota.retry(2**63),
        lambda e: e.lilota.retry(0),
        lambda e: e.lilota.wait(2**70, timeout=0),
    ],
)
rows(
    "Lilota.retry: a pending task",
    TaskNotRetryable,
    "^task 1 is pending; only failed or cancelled tasks can be retried",
    [lambda e: e.lilota.retry(e.first_id)],
)

# ---------------------------------------------------------------------- reading, actions

rows(
    "Lilota.get_tasks: limit out of range",
    InvalidArgument,
    "^limit must be an int from 0 to 9223372036854775807, got ",
    [lambda e: e.lilota.get_tasks(limit=-1), lambda e: e.lilota.get_tasks(limit=2**63)],
)
rows(
    "Lilota.get_tasks: limit not an int",
    InvalidArgumentType,
    "^limit must be an int from 0 to 9223372036854775807, got '10' \\(str\\)",
    [lambda e: e.lilota.get_tasks(limit="10")],
)
rows(
    "Lilota.get_tasks: unknown status",
    InvalidArgument,
    "^status must be one of pending, running, completed, failed, cancelled, got 'done'",
    [lambda e: e.lilota.get_tasks(status="done")],
)
rows(
    "Lilota.get_tasks: status or name not a str",
    InvalidArgumentType,
    "^(status|name) must be .*, got 5 \\(int\\)",
    [lambda e: e.lilota.get_tasks(status=5), lambda e: e.lilota.get_tasks(name=5)],
)
rows(
    "Lilota.wait: timeout not a number",
    InvalidArgumentType,
    "^timeout must be a number of seconds or None, got 'soon' \\(str\\)",
    [lambda e: e.lilota.wait(e.first_id, timeout="soon")],
)
rows(
    "Lilota.wait: timeout not >= 0",
    InvalidArgument,
    "^timeout must be a number of seconds >= 0, got ",
    [
        lambda e: e.lilota.wait(e.first_id, timeout=-1),
        lambda e: e.lilota.wait(e.first_id, timeout=math.nan),
    ],
)
rows(
    "Lilota.cleanup: older_than not a timedelta",
    InvalidArgumentType,
    "^older_than must be a timedelta, got 5 \\(int\\)",
    [lambda e: e.lilota.cleanup(5)],
)
rows(
    "Lilota.cleanup: negative older_than",
    InvalidArgument,
    "^older_than must be a timedelta >= 0",
    [lambda e: e.lilota.cleanup(timedelta(seconds=-1))],
)
rows(
    "Lilota.stop: timeout not a number",
    InvalidArgumentType,
    "^timeout must be a number of seconds or None, got 'soon' \\(str\\)",
    [lambda e: e.lilota.stop(timeout="soon")],
)

# ---------------------------------------------------------------------- registering, making

rows(
    "Lilota.register: bad name or options",
    RegistrationError,
    "^(task name must be 1-200 characters|max_attempts must be an int from 1 to 2147483647"
    "|timeout must be a timedelta or seconds)",
    [
        lambda e: e.lilota.register("two words")(add),
        lambda e: e.lilota.register("big", max_attempts=2**31)(add),
        lambda e: e.lilota.register("slow", timeout="10s")(add),
    ],
)
rows(
    "Lilota: bad settings",
    ConfigurationError,
    "^(number_of_workers must be an int >= 0|lease must be a positive timedelta"
    "|cancel_grace must be a timedelta >= 0|script_path must be a path|db_url must be a string)",
    [
        lambda e: Lilota(5),
        lambda e: Lilota(e.url, script_path=5),
        lambda e: Lilota(e.url, number_of_workers=-1),
        lambda e: Lilota(e.url, lease=5),
        lambda e: Lilota(e.url, cancel_grace=timedelta(seconds=-1)),
    ],
)
rows(
    "Lilota: startup_timeout or registry of the wrong kind",
    ConfigurationError,
    "^(startup_timeout must be a number of seconds > 0|registry must be a lilota Registry)",
    [
        lambda e: Lilota(e.url, startup_timeout="1m"),
        lambda e: Lilota(e.url, startup_timeout=0),
        lambda e: Lilota(e.url, registry={"add": add}),
    ],
)
rows(
    "LilotaWorker: bad settings, refused when it is made",
    ConfigurationError,
    "^(lease must be a positive timedelta|async_concurrency must be an int >= 1"
    "|registry must be a lilota Registry)",
    [
        lambda e: LilotaWorker(e.url, lease="30s"),
        lambda e: LilotaWorker(e.url, async_concurrency=0),
        lambda e: LilotaWorker(e.url, registry=[add]),
    ],
)
rows(
    "LilotaWorker.register: bad name",
    RegistrationError,
    "^task name must be 1-200 characters",
    [lambda e: LilotaWorker(e.url).register("two words")(add)],
)

for _hook in ("worker_init", "before_task", "after_task", "on_failure"):
    rows(
        f"Lilota.{_hook}: not a function",
        InvalidArgumentType,
        f"^a {_hook} hook must be a function; got str 'print'",
        [lambda e, hook=_hook: getattr(e.lilota, hook)("print")],
    )
    rows(
        f"LilotaWorker.{_hook}: not a plain function",
        InvalidArgumentType,
        f"^a {_hook} hook must be a (function; got NoneType None|plain function, not async def)",
        [
            lambda e, hook=_hook: getattr(LilotaWorker(e.url), hook)(None),
            lambda e, hook=_hook: getattr(LilotaWorker(e.url), hook)(_async_hook),
        ],
    )
rows(
    "Lilota: a bad log level, or both of its names",
    ConfigurationError,
    "^(log_level must be a logging level: a number >= 0 or a name such as 'INFO'"
    "|give log_level or logging_level \\(its earlier name\\), not both)",
    [
        lambda e: Lilota(e.url, log_level="LOUD"),
        lambda e: Lilota(e.url, log_level=-1),
        lambda e: Lilota(e.url, log_level="info", logging_level="debug"),
    ],
)

# ---------------------------------------------------------------------- inside a task

rows(
    "TaskContext.schedule: priority not an int",
    InvalidArgumentType,
    f"^priority must be {INT32}, got 'high' \\(str\\)",
    [lambda e: e.ctx.schedule("add", {"a": 1, "b": 2}, priority="high")],
)
rows(
    "TaskContext.schedule: out of range",
    InvalidArgument,
    f"^(priority must be {INT32}|delay .* puts the task outside"
    "|unique_key must be a string of 1-255)",
    [
        lambda e: e.ctx.schedule("add", {"a": 1, "b": 2}, priority=2**31),
        lambda e: e.ctx.schedule("add", {"a": 1, "b": 2}, delay=timedelta.max),
        lambda e: e.ctx.schedule("add", {"a": 1, "b": 2}, unique_key="k" * 256),
    ],
)
rows(
    "TaskContext.queue: name not a str",
    InvalidArgumentType,
    "^name must be a task name \\(a string\\), got 5",
    [lambda e: e.ctx.queue(5, a=1)],
)
rows(
    "TaskProgress.set: not an int",
    InvalidArgumentType,
    "^progress must be an int from 0 to 100, got '50' \\(str\\)",
    [lambda e: e.progress.set("50")],
)
rows(
    "TaskProgress.set: out of 0..100",
    InvalidArgument,
    "^progress must be from 0 to 100, got 150",
    [lambda e: e.progress.set(150)],
)

# ---------------------------------------------------------------------- the TaskRunner API

rows(
    "TaskRunner.add: name or description not a str",
    InvalidArgumentType,
    "^(name must be a task name \\(a string\\)|description must be a string or None)",
    [
        lambda e: e.runner.add(5, "d", {}),
        lambda e: e.runner.add("echo", 123, {"x": 1}),
    ],
)
rows(
    "TaskRunner.add: name not registered",
    TaskNotRegistered,
    "^no task named 'nope' is registered with this TaskRunner",
    [lambda e: e.runner.add("nope")],
)
rows(
    "TaskRunner.add: input that cannot be stored",
    SerializationError,
    "^input",
    [lambda e: e.runner.add("echo", "d", {"x": object()})],
)
rows(
    "TaskRunner.register: not a TaskBase class",
    RegistrationError,
    "^task 'other': ",
    [lambda e: e.runner.register("other", object)],
)
rows(
    "TaskRunner.stop: timeout not a number",
    InvalidArgumentType,
    "^timeout must be a number of seconds or None",
    [lambda e: e.runner.stop(timeout="soon")],
)
rows(
    "TaskRunner: bad number of workers",
    ConfigurationError,
    "^number_of_workers must be an int >= 1, got 0",
    [lambda e: TaskRunner(e.legacy, number_of_workers=0)],
)

rows(
    "DatabaseTaskStore: a database its workers cannot share",
    ConfigurationError,
    "^an in-memory SQLite database cannot be shared with worker processes",
    [lambda e: DatabaseTaskStore("sqlite://")],
)

# ---------------------------------------------------------------------- schedules, testing

rows(
    "every: not a timedelta",
    InvalidArgumentType,
    "^every\\(\\) takes a timedelta",
    [lambda e: every("5m")],
)
rows(
    "every / crontab: bad values",
    InvalidArgument,
    "^(every\\(\\) needs an interval of at least 1 ms|crontab\\(\\) takes five fields)",
    [lambda e: every(timedelta(0)), lambda e: crontab("every minute")],
)
rows(
    "run_pending: limit out of range",
    InvalidArgument,
    "^limit must be an int >= 0, got -1",
    [lambda e: run_pending(e.lilota, limit=-1)],
)
rows(
    "run_pending: limit not an int",
    InvalidArgumentType,
    "^limit must be an int >= 0, got '2' \\(str\\)",
    [lambda e: run_pending(e.lilota, limit="2")],
)


def _table(env: Env) -> list[dict[str, Any]]:
    return [t.to_json() for t in env.lilota.store.list_tasks(limit=10**6)]


@pytest.mark.parametrize(
    ("label", "call", "error", "message"), ROWS, ids=[label for label, *_ in ROWS]
)
def test_a_bad_argument_gets_its_error_and_writes_nothing(
    env: Env, label: str, call: Call, error: type[LilotaError], message: str
) -> None:
    before = _table(env)
    with pytest.raises(LilotaError, match=message) as raised:
        call(env)
    assert type(raised.value) is error, f"{label}: {type(raised.value).__name__}: {raised.value}"
    assert _table(env) == before


def test_an_id_no_task_can_have_reads_as_missing(env: Env) -> None:
    for missing in (0, -1, 2**63, -(2**63) - 1, 2**70):
        assert env.lilota.get_task_by_id(missing) is None
        assert env.legacy.get_task_by_id(missing) is None
        assert env.lilota.store.get(missing) is None


def test_the_argument_errors_keep_the_builtin_exceptions_they_were() -> None:
    assert issubclass(InvalidArgument, ValueError)
    assert issubclass(InvalidArgumentType, ValueError) and issubclass(
        InvalidArgumentType, TypeError
    )
    assert issubclass(InvalidInput, InvalidArgument)
    assert issubclass(TaskNotRetryable, ValueError)


# Public methods with arguments that the table leaves out, and why.
NOT_IN_TABLE = {
    "LilotaWorker.start": "blocks: makes the calling process a worker",
    "TaskRunner.start": "takes no argument",
    "TaskContext.for_claim": "made by the worker, not by users",
}
CLASSES = [Lilota, LilotaWorker, TaskContext, TaskProgress, TaskRunner, DatabaseTaskStore]


def test_every_public_call_with_arguments_has_a_row() -> None:
    covered = {label.split(":")[0].split(" #")[0] for label, *_ in ROWS}
    missing = []
    for cls in CLASSES:
        for name, member in inspect.getmembers(cls, callable):
            if name.startswith("_") or isinstance(inspect.getattr_static(cls, name), type):
                continue
            params = list(inspect.signature(member).parameters)[1:]  # self/cls
            qualified = f"{cls.__name__}.{name}"
            if params and qualified not in covered and qualified not in NOT_IN_TABLE:
                missing.append(qualified)
    for cls in CLASSES:
        init = [p for p in inspect.signature(cls.__init__).parameters][1:]
        if init and cls.__name__ not in covered and cls not in (TaskContext, TaskProgress):
            missing.append(cls.__name__)
    assert missing == [], f"public calls with arguments but no row in the table: {missing}"
