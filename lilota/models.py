"""The public data types: a task record, its status, its progress handle, model protocol."""

from __future__ import annotations

import dataclasses
import json
import threading
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any, Generic, Protocol, runtime_checkable

from typing_extensions import TypeVar

from lilota.conversion import build
from lilota.errors import (
    InvalidArgument,
    InvalidArgumentType,
    TaskCancelled,
    TaskFailed,
    TaskNotFinished,
)

# What a task returns, rebuilt as its output model by Task.result() (Any: unknown).
Out = TypeVar("Out", covariant=True, default=Any)


class TaskStatus(str, Enum):
    """Where a task is in its life. ``completed``, ``failed`` and ``cancelled`` are final."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES

    def __str__(self) -> str:
        return self.value


FINAL_STATUSES = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED})


@runtime_checkable
class ModelProtocol(Protocol):
    """Any object with ``as_dict()`` can be a task's input or output.

    To be rebuilt as a task's ``input_model``, the class must also accept the dict back,
    either as keyword arguments (``Model(**d)``) or through a ``from_dict`` classmethod.
    """

    def as_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True, kw_only=True)
class TaskError:
    """What a failed task raised: the exception's type, message and formatted traceback."""

    type: str
    message: str
    traceback: str = ""

    def __str__(self) -> str:
        return f"{self.type}: {self.message}" if self.message else self.type

    def as_dict(self) -> dict[str, str]:
        return {"type": self.type, "message": self.message, "traceback": self.traceback}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskError:
        return cls(
            type=str(data.get("type", "")),
            message=str(data.get("message", "")),
            traceback=str(data.get("traceback", "")),
        )

    @classmethod
    def from_exception(cls, error: BaseException) -> TaskError:
        """The record of ``error``: every error record lilota stores is built here.

        ``type`` is the qualified class name (bare for builtins and ``__main__``), so a
        reader can tell ``ValueError`` from ``myapp.errors.ValueError``."""
        kind = type(error)
        module = kind.__module__
        name = kind.__qualname__
        if module not in ("builtins", "__main__"):
            name = f"{module}.{name}"
        message = str(error)
        if error.__traceback__ is None and error.__context__ is None and error.__cause__ is None:
            # Never raised (a record made to be stored): what format_exception would print,
            # without its cost (it runs for every attempt a store may end cancelled).
            trace = f"{name}: {message}\n" if message else f"{name}\n"
        else:
            trace = "".join(traceback.format_exception(kind, error, error.__traceback__))
        return cls(type=name, message=message, traceback=trace)

    @classmethod
    def from_json(cls, text: str | None) -> TaskError:
        """The record stored as ``text`` (an empty one for None or unreadable text)."""
        try:
            data = json.loads(text) if text else {}
        except ValueError:
            data = {"message": text}
        return cls.from_dict(data if isinstance(data, dict) else {"message": text})

    def to_json(self) -> str:
        """The text stored in a task's ``exception`` column."""
        return json.dumps(self.as_dict())


def _aware(value: datetime | None) -> datetime | None:
    """The store keeps naive UTC; users get aware UTC datetimes."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=timezone.utc)


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(frozen=True, kw_only=True)
class Task(Generic[Out]):
    """One row of the task table, as read at one moment (it does not update itself).

    ``input`` and ``output`` are the stored JSON decoded back to Python values: a task
    with an output model has a dict ``output``, so ``AddOutput(**task.output)`` rebuilds
    it; :meth:`result` does that for a task read through a typed handle
    (``Task[AddOutput]``, whose ``output_model`` is set). Times are timezone-aware UTC
    datetimes.
    """

    id: int
    name: str
    status: TaskStatus
    pid: int | None = None
    progress_percentage: int = 0
    start_date_time: datetime | None = None
    end_date_time: datetime | None = None
    input: Any = None
    output: Any = None
    exception: TaskError | None = None
    description: str | None = None
    attempts: int = 0
    max_attempts: int = 1
    priority: int = 0
    created_at: datetime = dataclasses.field(default_factory=_utc_now)
    run_at: datetime | None = None
    lease_expires_at: datetime | None = None
    worker_id: str | None = None
    unique_key: str | None = None
    cancel_requested: bool = False
    recoveries: int = 0
    max_recoveries: int = 3
    fence: int = 0
    legacy_id: str | None = None
    # The model result() rebuilds the output as (a typed handle's); None: as stored.
    output_model: type | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def is_final(self) -> bool:
        return self.status.is_final

    @property
    def duration(self) -> timedelta | None:
        if self.start_date_time is None or self.end_date_time is None:
            return None
        return self.end_date_time - self.start_date_time

    @property
    def error(self) -> TaskError | None:
        """The earlier release's name of :attr:`exception` (read-only, the same object)."""
        return self.exception

    def result(self) -> Out:
        """The output of a completed task, rebuilt as ``output_model`` (without one: as
        stored, as :attr:`output`). Raises :class:`~lilota.errors.TaskFailed` for a failed
        task (carrying the type, message and traceback of what it raised),
        :class:`~lilota.errors.TaskCancelled` for a cancelled one and
        :class:`~lilota.errors.TaskNotFinished` for a pending or running one."""
        if self.status is TaskStatus.COMPLETED:
            rebuilt: Out = build(self.output, self.output_model, root="output")
            return rebuilt
        if self.status is TaskStatus.FAILED:
            error = self.exception or TaskError(type="", message="")
            raise TaskFailed(self.id, self.name, error.type, error.message, error.traceback)
        if self.status is TaskStatus.CANCELLED:
            raise TaskCancelled(f"task {self.id} ({self.name}) was cancelled")
        raise TaskNotFinished(f"task {self.id} ({self.name}) is still {self.status}")

    @classmethod
    def from_row(cls, row: Mapping[Any, Any], decode: Callable[[str | None], Any]) -> Task:
        """Build a task from a row mapping; ``decode`` turns stored JSON text into values.

        Columns this release does not know (added by a later version) are ignored.
        """
        exception = decode(row.get("exception"))
        return cls(
            id=int(row["id"]),
            name=row["name"],
            status=TaskStatus(row["status"]),
            pid=row.get("pid"),
            progress_percentage=int(row.get("progress_percentage") or 0),
            start_date_time=_aware(row.get("start_date_time")),
            end_date_time=_aware(row.get("end_date_time")),
            input=decode(row.get("input")),
            output=decode(row.get("output")),
            exception=TaskError.from_dict(exception) if isinstance(exception, dict) else None,
            description=row.get("description"),
            attempts=int(row.get("attempts") or 0),
            max_attempts=int(row.get("max_attempts") or 1),
            priority=int(row.get("priority") or 0),
            created_at=_aware(row.get("created_at")) or _utc_now(),
            run_at=_aware(row.get("run_at")),
            lease_expires_at=_aware(row.get("lease_expires_at")),
            worker_id=row.get("worker_id"),
            unique_key=row.get("unique_key"),
            cancel_requested=bool(row.get("cancel_requested")),
            recoveries=int(row.get("recoveries") or 0),
            max_recoveries=int(row.get("max_recoveries") or 0),
            fence=int(row.get("fence") or 0),
            legacy_id=row.get("legacy_id"),
        )

    def to_json(self) -> dict[str, Any]:
        """The task as a dict for ``json.dumps``: what ``lilota show --json`` prints and the
        dashboard's API builds on.

        Times are ISO 8601 strings in UTC (a naive time is taken as UTC), the duration is
        in seconds, the exception is ``{"type", "message", "traceback"}``. ``input`` and
        ``output`` are the decoded values as they are: values JSON has no type for (a
        datetime in an input, say) need the encoder's fallback, such as ``default=str``.
        """

        def iso(value: datetime | None) -> str | None:
            aware = _aware(value)
            return None if aware is None else aware.isoformat()

        duration = self.duration
        return {
            "id": self.id,
            "name": self.name,
            "status": self.status.value,
            "progress": self.progress_percentage,
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "priority": self.priority,
            "description": self.description,
            "unique_key": self.unique_key,
            "created_at": iso(self.created_at),
            "run_at": iso(self.run_at),
            "started_at": iso(self.start_date_time),
            "ended_at": iso(self.end_date_time),
            "duration_seconds": None if duration is None else duration.total_seconds(),
            "input": self.input,
            "output": self.output,
            "exception": None if self.exception is None else self.exception.as_dict(),
            "worker_id": self.worker_id,
            "pid": self.pid,
            "lease_expires_at": iso(self.lease_expires_at),
            "cancel_requested": self.cancel_requested,
            "recoveries": self.recoveries,
            "max_recoveries": self.max_recoveries,
            "legacy_id": self.legacy_id,
        }


def check_percentage(percentage: object) -> int:
    """Return ``percentage`` if it is an int in 0..100, else raise an
    :class:`~lilota.errors.InvalidArgumentType` (not an int) or
    :class:`~lilota.errors.InvalidArgument` (out of range), both ``ValueError``s."""
    if isinstance(percentage, bool) or not isinstance(percentage, int):
        raise InvalidArgumentType(
            f"progress must be an int from 0 to 100, got {percentage!r} "
            f"({type(percentage).__name__})"
        )
    if not 0 <= percentage <= 100:
        raise InvalidArgument(f"progress must be from 0 to 100, got {percentage}")
    return percentage


class TaskProgress:
    """Handed to a task function registered with ``task_progress=TaskProgress``.

    ``set(n)`` records the task's progress (an int 0..100) in the database at once, where
    any process can read it. ``cancelled`` turns true when someone asked to cancel the
    task; a task that checks it can end early (``raise_if_cancelled()`` does that).
    """

    def __init__(
        self,
        task_id: int,
        write: Callable[[int], None],
        cancel_event: threading.Event | None = None,
    ) -> None:
        self.task_id = task_id
        self._write = write
        self._cancel_event = cancel_event or threading.Event()
        self._value: int | None = None

    @property
    def value(self) -> int | None:
        """The last percentage set through this handle (None before the first ``set``)."""
        return self._value

    def set(self, percentage: int) -> None:
        """Record ``percentage`` (int, 0..100). Raises
        :class:`~lilota.errors.InvalidArgument` (a ``ValueError``) for anything else."""
        percentage = check_percentage(percentage)
        if percentage != self._value:
            self._write(percentage)
            self._value = percentage

    @property
    def cancelled(self) -> bool:
        """True once cancellation of this task was requested."""
        return self._cancel_event.is_set()

    def raise_if_cancelled(self) -> None:
        """Raise :class:`~lilota.errors.TaskCancelled` if cancellation was requested."""
        if self.cancelled:
            raise TaskCancelled(f"task {self.task_id} was cancelled")


def __getattr__(name: str) -> Any:
    """``TaskBase`` of the earlier TaskRunner API lives in :mod:`lilota.legacy`, and
    ``TaskContext`` (here in the earlier release) in :mod:`lilota.context`, which imports
    this module: both are looked up only when asked for."""
    if name == "TaskBase":
        from lilota import legacy

        return legacy.TaskBase
    if name == "TaskContext":
        from lilota import context

        return context.TaskContext
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Type checkers take a constant named TYPE_CHECKING as true: they see the real types.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from lilota.context import TaskContext as TaskContext
    from lilota.legacy import TaskBase as TaskBase


# The records the store and the workers exchange: here, so that worker types load without
# the store (and SQLAlchemy).

_PENDING = TaskStatus.PENDING.value

# A task whose worker is lost (killed, its machine gone, its lease expired) runs again up
# to this many times, then fails with WorkerLost; apart from max_attempts, which counts
# the attempts the task itself ended (by raising).
DEFAULT_MAX_RECOVERIES = 3


@dataclass(frozen=True, kw_only=True)
class NewTask:
    """A row to insert. ``input`` is JSON text made by :mod:`lilota.serialization`;
    ``trace_context`` the scheduling span's W3C context as JSON (:mod:`lilota.tracing`)."""

    name: str
    input: str | None = None
    run_at: datetime | None = None
    priority: int = 0
    max_attempts: int = 1
    description: str | None = None
    unique_key: str | None = None
    schedule_key: str | None = None
    max_recoveries: int = DEFAULT_MAX_RECOVERIES
    trace_context: str | None = None

    def __post_init__(self) -> None:
        # Before anything is written, so that schedule() refuses these alike on every
        # backend: PostgreSQL refuses NUL in text columns (SQLite stores it), and no
        # driver can encode a lone surrogate (a raw UnicodeEncodeError otherwise).
        for field in ("name", "input", "description", "unique_key", "schedule_key"):
            _check_text(field, getattr(self, field))

    def to_row(self, now: datetime) -> dict[str, Any]:
        """The column values of this task as a new pending row, created at ``now`` (naive
        UTC), due at ``run_at`` or at once."""
        return {
            "name": self.name,
            "status": _PENDING,
            "input": self.input,
            "run_at": to_naive_utc(self.run_at) if self.run_at else now,
            "priority": self.priority,
            "max_attempts": self.max_attempts,
            "max_recoveries": self.max_recoveries,
            "description": self.description,
            "unique_key": self.unique_key,
            "schedule_key": self.schedule_key,
            "created_at": now,
            "attempts": 0,
            "progress_percentage": 0,
            "cancel_requested": False,
            "trace_context": self.trace_context,
        }


def utcnow() -> datetime:
    """Naive UTC now: the store's clock unless another one is injected."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def to_naive_utc(value: datetime) -> datetime:
    """Aware datetimes are converted to UTC; naive ones are taken as UTC already (the
    store's times are naive UTC)."""
    if value.tzinfo is None:
        return value
    return value.astimezone(timezone.utc).replace(tzinfo=None)


def _check_text(field: str, value: object) -> None:
    """Raise InvalidArgument naming ``field`` if ``value`` cannot be stored in a text column."""
    if not isinstance(value, str) or (value.isascii() and "\x00" not in value):
        return
    nul = value.find("\x00")
    if nul >= 0:
        raise InvalidArgument(
            f"{field} contains a NUL character ('\\x00') at index {nul}: PostgreSQL cannot "
            "store it in a text column, so lilota refuses it on every database"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgument(
            f"{field} contains the lone surrogate {value[e.start]!r} at index {e.start}: "
            "it is not valid Unicode text and no database can store it"
        ) from None


@dataclass(frozen=True, kw_only=True)
class Claim:
    """A task a worker holds. ``attempt`` counts its runs (1 for the first); ``fence``
    counts every claim of the task ever made and never goes back (not even when it is
    retried), and fences every later write of this worker."""

    id: int
    name: str
    input: str | None
    attempt: int
    max_attempts: int
    fence: int
    recoveries: int = 0  # runs before this one whose worker was lost
    trace_context: str | None = None  # the scheduling span's, as NewTask.trace_context


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """The end of one attempt, recorded by :meth:`TaskStore.finish`.

    ``status`` is completed, failed, cancelled, or pending (a retry at ``run_at``).
    """

    id: int
    fence: int
    status: str
    output: str | None = None
    exception: str | None = None
    run_at: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class LeaseReport:
    """What a lease renewal learned: tasks still held, and those someone asked to cancel."""

    held: frozenset[int]
    cancel_requested: frozenset[int]
