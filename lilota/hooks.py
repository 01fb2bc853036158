"""Hooks and observers: what runs beside each attempt of a task.

Every lane of a worker (and the inline mode of ``lilota.testing``) tells the observers of
an attempt through the same two calls of :mod:`lilota.execution`: ``begin`` when the
attempt starts (observers' :meth:`Observer.task_started`) and ``end`` once its outcome is
final (:meth:`Observer.task_ended`). The observers, in this order:

1. the task log (:mod:`lilota.logs`): one line per start and end;
2. the process-wide observers added with :func:`add_observer` (metrics, tracing);
3. the application's hooks (:class:`Hooks`, one per registry, so they reach worker
   processes as task registrations do: the process imports the module that registers
   them).

The hooks an application registers, by decorator on its ``Lilota`` or ``LilotaWorker``:

- ``worker_init()``: once in each worker process, before its first task (a database
  pool, a model loaded once, logging set up your way). If it raises, the worker does not
  start (the error is logged and, under a supervisor, reported).
- ``before_task(task: TaskInfo)``: before each attempt.
- ``on_failure(task: TaskInfo, outcome: TaskOutcome)``: after an attempt that failed
  (raised, timed out, or its pool process was lost); ``outcome.will_retry`` says whether
  it runs again, ``outcome.exception`` is what it raised.
- ``after_task(task: TaskInfo, outcome: TaskOutcome)``: after every attempt that started,
  whatever its status.

A hook or observer that raises is logged (with its traceback) and the others still run;
the task's outcome is never changed by it. Hooks are plain functions, run in the thread
that ran the task (for ``async def`` and ``cpu_bound`` tasks: the worker's event loop
thread, so keep them short; ``cpu_bound`` tasks' hooks run in the worker process, not in
the pool process). A plain function past its timeout cannot be stopped: its worker
process is replaced, and the lease keeper's thread tells the observers just before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from lilota.errors import InvalidArgument, InvalidArgumentType
from lilota.logs import TASK_LOG
from lilota.models import Claim, Outcome, TaskError, TaskStatus

if TYPE_CHECKING:
    from lilota.registry import Registry

log = logging.getLogger(__name__)

HOOK_NAMES = ("worker_init", "before_task", "after_task", "on_failure")

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, kw_only=True)
class TaskInfo:
    """The attempt a hook is told about (read-only).

    ``id``, ``name``, ``attempt`` (1 for the first run) of ``max_attempts``,
    ``recoveries`` (earlier runs whose worker was lost), ``worker_id`` (the worker
    running it); ``input`` is the task's input as stored (decoded JSON: dicts, lists,
    strings, numbers; not rebuilt as its ``input_model``).
    """

    id: int
    name: str
    attempt: int
    max_attempts: int
    recoveries: int
    worker_id: str
    input_json: str | None = field(default=None, repr=False)

    @property
    def input(self) -> Any:
        """The stored input, decoded (the raw text if it is not JSON)."""
        if self.input_json is None:
            return None
        try:
            return json.loads(self.input_json)
        except ValueError:
            return self.input_json

    @property
    def label(self) -> str:
        """``task 42 report attempt 1/3``: how the log names this attempt."""
        return f"task {self.id} {self.name} attempt {self.attempt}/{self.max_attempts}"

    def log_extra(self) -> dict[str, Any]:
        """The ``extra`` fields of every log record about this attempt."""
        return {
            "lilota_task_id": self.id,
            "lilota_task_name": self.name,
            "lilota_attempt": self.attempt,
            "lilota_worker_id": self.worker_id,
        }

    @classmethod
    def for_claim(cls, claim: Claim, *, max_attempts: int, worker_id: str) -> TaskInfo:
        return cls(
            id=claim.id,
            name=claim.name,
            attempt=claim.attempt,
            max_attempts=max_attempts,
            recoveries=claim.recoveries,
            worker_id=worker_id,
            input_json=claim.input,
        )


@dataclass(frozen=True, kw_only=True)
class TaskOutcome:
    """How an attempt ended (read-only), as it is recorded.

    ``status``: "completed", "failed" (for good), "cancelled", or "pending" (it will be
    retried at ``retry_at``, ``retry_in`` seconds later; ``will_retry`` is true). ``duration``: seconds the attempt
    ran in this worker. ``output``: the returned value as stored (decoded JSON), for a
    completed task. ``error``: the stored error record (type, message, traceback) of a
    failed, retried or cancelled attempt. ``exception``: the exception object, when it
    was raised in this process (None for a ``cpu_bound`` task's, raised in its pool
    process, and for a timeout the worker decided).
    """

    status: str
    duration: float
    output_json: str | None = field(default=None, repr=False)
    error: TaskError | None = None
    exception: BaseException | None = None
    retry_at: datetime | None = None
    retry_in: float | None = None  # seconds from the end of this attempt to ``retry_at``

    @property
    def output(self) -> Any:
        """The stored output, decoded (the raw text if it is not JSON); None if none."""
        if self.output_json is None:
            return None
        try:
            return json.loads(self.output_json)
        except ValueError:
            return self.output_json

    @property
    def will_retry(self) -> bool:
        return self.status == TaskStatus.PENDING.value

    @property
    def failed(self) -> bool:
        """The attempt failed (raised, timed out, lost), whether or not it runs again."""
        return self.status in (TaskStatus.FAILED.value, TaskStatus.PENDING.value)


class Observer(Protocol):
    """What is told about each attempt: the seam for logs, metrics, tracing and hooks.

    Both methods are called in the thread that runs the task (the event loop thread for
    ``async def`` tasks) and must return quickly; what they raise is logged and ignored.
    """

    def task_started(self, task: TaskInfo) -> None: ...

    def task_ended(self, task: TaskInfo, outcome: TaskOutcome) -> None: ...


_observers: list[Observer] = []


def add_observer(observer: Observer) -> None:
    """Tell ``observer`` of every attempt that starts and ends in this process (after
    the task log, before the application's hooks). Raises InvalidArgumentType if it
    lacks ``task_started`` or ``task_ended``."""
    for method in ("task_started", "task_ended"):
        if not callable(getattr(observer, method, None)):
            raise InvalidArgumentType(
                f"an observer needs a {method}() method; got {type(observer).__name__}"
            )
    if observer not in _observers:
        _observers.append(observer)


def remove_observer(observer: Observer) -> None:
    """Stop telling ``observer`` (nothing happens if it was not added)."""
    if observer in _observers:
        _observers.remove(observer)


class Hooks:
    """The hooks of one registry (so of one ``Lilota`` or ``LilotaWorker``); an observer."""

    def __init__(self) -> None:
        self._hooks: dict[str, list[Callable[..., Any]]] = {name: [] for name in HOOK_NAMES}
        self._initialized_in: int | None = None  # pid whose worker_init hooks ran

    def add(self, name: str, func: Callable[..., Any]) -> None:
        """Register ``func`` as a ``name`` hook (one of :data:`HOOK_NAMES`). Raises
        InvalidArgument for an unknown name, InvalidArgumentType for a ``func`` that is
        not a plain callable (an ``async def`` hook is refused: hooks are not awaited)."""
        if name not in self._hooks:
            raise InvalidArgument(
                f"unknown hook {name!r}: lilota's hooks are {', '.join(HOOK_NAMES)}"
            )
        if not callable(func):
            raise InvalidArgumentType(
                f"a {name} hook must be a function; got {type(func).__name__} {func!r}"
            )
        if asyncio.iscoroutinefunction(func):
            raise InvalidArgumentType(
                f"a {name} hook must be a plain function, not async def "
                f"({_name_of(func)}): hooks are called, not awaited"
            )
        self._hooks[name].append(func)

    def __len__(self) -> int:
        return sum(len(funcs) for funcs in self._hooks.values())

    def run_worker_init(self) -> None:
        """Run the worker_init hooks, once per process (later calls do nothing once they
        all returned). What a hook raises is raised: a worker whose set-up failed does
        not start."""
        if self._initialized_in == os.getpid():
            return
        for func in self._hooks["worker_init"]:
            func()
        self._initialized_in = os.getpid()

    def task_started(self, task: TaskInfo) -> None:
        self._call("before_task", task)

    def task_ended(self, task: TaskInfo, outcome: TaskOutcome) -> None:
        if outcome.failed:
            self._call("on_failure", task, outcome)
        self._call("after_task", task, outcome)

    def _call(self, name: str, task: TaskInfo, *args: Any) -> None:
        for func in self._hooks[name]:
            try:
                func(task, *args)
            except Exception:
                log.exception(
                    "%s: %s hook %s raised; the task's outcome stands",
                    task.label,
                    name,
                    _name_of(func),
                    extra=task.log_extra(),
                )


def _type_name(error: BaseException) -> str:
    """The type as :meth:`TaskError.from_exception` records it (without its traceback)."""
    kind = type(error)
    if kind.__module__ in ("builtins", "__main__"):
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def _name_of(func: Callable[..., Any]) -> str:
    return str(getattr(func, "__qualname__", None) or repr(func))


class HookDecorators:
    """The hook decorators of ``Lilota`` and ``LilotaWorker`` (``self.registry.hooks``)."""

    registry: Registry

    def worker_init(self, func: F) -> F:
        """Decorator: run ``func()`` once in each worker process, before its first task."""
        self.registry.hooks.add("worker_init", func)
        return func

    def before_task(self, func: F) -> F:
        """Decorator: run ``func(task: TaskInfo)`` before each attempt of a task."""
        self.registry.hooks.add("before_task", func)
        return func

    def after_task(self, func: F) -> F:
        """Decorator: run ``func(task: TaskInfo, outcome: TaskOutcome)`` after each attempt."""
        self.registry.hooks.add("after_task", func)
        return func

    def on_failure(self, func: F) -> F:
        """Decorator: run ``func(task: TaskInfo, outcome: TaskOutcome)`` after an attempt
        that failed (``outcome.will_retry``: it runs again; ``outcome.exception``)."""
        self.registry.hooks.add("on_failure", func)
        return func


# ---------------------------------------------------------------------- the seam


class Attempt:
    """One attempt as its observers see it: made by ``lilota.execution.begin``, ended by
    ``lilota.execution.end``; ``exception`` is set by the execution when the task raises."""

    __slots__ = ("exception", "hooks", "started", "task")

    def __init__(self, task: TaskInfo, hooks: Hooks | None) -> None:
        self.task = task
        self.hooks = hooks
        self.started = time.monotonic()
        self.exception: BaseException | None = None

    def observers(self) -> list[Observer]:
        found: list[Observer] = [TASK_LOG, *_observers]
        if self.hooks is not None and len(self.hooks):
            found.append(self.hooks)
        return found


def notify_started(attempt: Attempt) -> None:
    for observer in attempt.observers():
        try:
            observer.task_started(attempt.task)
        except Exception:
            log.exception("%s: an observer failed at its start", attempt.task.label)


def notify_ended(attempt: Attempt, outcome: Outcome, now: datetime) -> TaskOutcome:
    """Tell the observers how ``attempt`` ended (``outcome``, as it is recorded, at the
    store's time ``now``); returns what they were told."""
    result = outcome_of(attempt, outcome, now)
    for observer in attempt.observers():
        try:
            observer.task_ended(attempt.task, result)
        except Exception:
            log.exception("%s: an observer failed at its end", attempt.task.label)
    return result


def outcome_of(attempt: Attempt, outcome: Outcome, now: datetime) -> TaskOutcome:
    error = TaskError.from_json(outcome.exception) if outcome.exception else None
    exception = attempt.exception
    if exception is not None and (error is None or error.type != _type_name(exception)):
        exception = None  # the recorded error is another one (a timeout, a cancellation)
    retry_at = outcome.run_at if outcome.status == TaskStatus.PENDING.value else None
    return TaskOutcome(
        status=outcome.status,
        duration=time.monotonic() - attempt.started,
        output_json=outcome.output,
        error=error,
        exception=exception,
        retry_at=retry_at,
        retry_in=None if retry_at is None else max(0.0, (retry_at - now).total_seconds()),
    )


__all__ = [
    "HOOK_NAMES",
    "Attempt",
    "HookDecorators",
    "Hooks",
    "Observer",
    "TaskInfo",
    "TaskOutcome",
    "add_observer",
    "notify_ended",
    "notify_started",
    "remove_observer",
]
