"""Typed task handles: what ``@lilota.register(...)`` returns, and ``TaskRef``.

The decorated name stays the plain function (called as before; a ``cpu_bound`` task's
pool still finds it by name), given a few attributes: ``schedule``, ``schedule_many``,
``aschedule``, ``aschedule_many`` and ``task_name``. For mypy it is a
:class:`TaskHandle`, generic in the function's own signature and the task's input and
output models: ``report.schedule(ReportInput(...))`` is a ``TaskRef[ReportOutput]``, an
``int`` (the task id) whose ``wait()`` gives a ``Task[ReportOutput]``, whose ``result()``
is a ``ReportOutput``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypedDict, overload

from typing_extensions import TypeVar, Unpack

from lilota import tracing, validation
from lilota.errors import RegistrationError, WorkerAlreadyStarted
from lilota.models import NewTask, Task
from lilota.registry import Registry, check_options, new_task

if TYPE_CHECKING:
    from lilota.core import Lilota

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)
In = TypeVar("In")
In_contra = TypeVar("In_contra", contravariant=True)
Out = TypeVar("Out")
Out_co = TypeVar("Out_co", covariant=True, default=Any)

log = logging.getLogger(__name__)


class ScheduleOptions(TypedDict, total=False):
    """The keyword options of ``schedule`` (see :meth:`lilota.core.Lilota.schedule`)."""

    run_at: datetime | None
    delay: timedelta | None
    priority: int
    unique_key: str | None
    description: str | None
    max_attempts: int | None
    connection: object


class ScheduleManyOptions(TypedDict, total=False):
    """The keyword options of ``schedule_many``."""

    run_at: datetime | None
    delay: timedelta | None
    priority: int
    max_attempts: int | None
    connection: object


class TaskOptions(TypedDict, total=False):
    """The keyword options of ``register`` (see :meth:`Registering.register`)."""

    max_attempts: int
    retry_delay: timedelta | float
    retry_on: type[BaseException] | tuple[type[BaseException], ...]
    max_recoveries: int
    timeout: timedelta | float | None
    schedule: Any
    cpu_bound: bool


class TaskRef(int, Generic[Out_co]):
    """The id of a scheduled task (it is that ``int``), typed by the task's output model:
    :meth:`wait` and :meth:`await_task` give a ``Task[Out]`` whose ``result()`` rebuilds it."""

    _lilota: Lilota | None
    _output_model: type | None

    def __new__(
        cls, task_id: int, lilota: Lilota | None = None, output_model: type | None = None
    ) -> TaskRef[Out_co]:
        ref = super().__new__(cls, task_id)
        ref._lilota, ref._output_model = lilota, output_model
        return ref

    def __reduce__(self) -> tuple[type[int], tuple[int]]:
        # Pickled (to another process, a cache) it is the plain id: the instance stays here.
        return int, (int(self),)

    @property
    def id(self) -> int:
        return int(self)

    def _owner(self) -> Lilota:
        if self._lilota is None:
            raise RegistrationError(f"TaskRef({int(self)}) belongs to no Lilota instance")
        return self._lilota

    def _typed(self, task: Task) -> Task[Out_co]:
        return dataclasses.replace(task, output_model=self._output_model)

    def get(self) -> Task[Out_co] | None:
        """The task as stored now (None if it is gone: rolled back, cleaned up)."""
        task = self._owner().get_task_by_id(int(self))
        return None if task is None else self._typed(task)

    def wait(self, timeout: float | None = None) -> Task[Out_co]:
        """:meth:`lilota.core.Lilota.wait` for this task, typed."""
        return self._typed(self._owner().wait(int(self), timeout))

    async def await_task(self, timeout: float | None = None) -> Task[Out_co]:
        """:meth:`lilota.core.Lilota.await_task` for this task, typed."""
        return self._typed(await self._owner().await_task(int(self), timeout))


class TaskHandle(Protocol[P, R_co, In_contra, Out]):
    """A registered task function, as mypy sees it: callable as the function itself, and
    scheduled with an input of its input model (``In``), giving ``TaskRef[Out]``."""

    task_name: str

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co: ...

    def schedule(
        self, input: In_contra = ..., /, **options: Unpack[ScheduleOptions]
    ) -> TaskRef[Out]: ...

    def schedule_many(
        self, inputs: Iterable[In_contra], /, **options: Unpack[ScheduleManyOptions]
    ) -> list[TaskRef[Out]]: ...

    async def aschedule(
        self, input: In_contra = ..., /, **options: Unpack[ScheduleOptions]
    ) -> TaskRef[Out]: ...

    async def aschedule_many(
        self, inputs: Iterable[In_contra], /, **options: Unpack[ScheduleManyOptions]
    ) -> list[TaskRef[Out]]: ...


class Decorator(Protocol[In_contra, Out]):
    """What ``register(...)`` returns: applied to a function, its :class:`TaskHandle`."""

    def __call__(self, func: Callable[P, R], /) -> TaskHandle[P, R, In_contra, Out]: ...


@dataclasses.dataclass(frozen=True)
class BoundTask:
    """A task name on a Lilota instance, with its output model: what the attributes
    :func:`bind` gives a function do."""

    lilota: Lilota
    name: str
    output_model: type | None

    def ref(self, task_id: int) -> TaskRef[Any]:
        return TaskRef(task_id, self.lilota, self.output_model)

    def schedule(self, input: Any = None, /, **options: Any) -> TaskRef[Any]:
        return self.ref(self.lilota.schedule(self.name, input, **options))

    def schedule_many(self, inputs: Iterable[Any], /, **options: Any) -> list[TaskRef[Any]]:
        return [self.ref(i) for i in self.lilota.schedule_many(self.name, inputs, **options)]

    async def aschedule(self, input: Any = None, /, **options: Any) -> TaskRef[Any]:
        return self.ref(await self.lilota.aschedule(self.name, input, **options))

    async def aschedule_many(self, inputs: Iterable[Any], /, **options: Any) -> list[TaskRef[Any]]:
        ids = await self.lilota.aschedule_many(self.name, inputs, **options)
        return [self.ref(i) for i in ids]


# The attribute of a handle that holds its BoundTask (how schedule(handle, ...) finds it).
BOUND = "__lilota_task__"


def bind(func: Any, task: BoundTask) -> Any:
    """``func`` itself, given the handle's attributes (one that takes no attributes, a
    bound method say, is wrapped in a :class:`_Wrapped` instead). A function registered
    before on another instance now schedules on this one, with a warning saying so."""
    earlier = getattr(func, BOUND, None)
    if isinstance(earlier, BoundTask) and earlier.lilota is not task.lilota:
        log.warning(
            "%r was registered on another Lilota instance too: its handle (%s.schedule) "
            "now schedules on %s; schedule through an instance to choose, "
            "lilota.schedule(%s, ...)",
            task.name,
            getattr(func, "__name__", task.name),
            task.lilota.store.safe_url,
            getattr(func, "__name__", task.name),
        )
    attributes = {
        BOUND: task,
        "task_name": task.name,
        "schedule": task.schedule,
        "schedule_many": task.schedule_many,
        "aschedule": task.aschedule,
        "aschedule_many": task.aschedule_many,
    }
    try:
        for name, value in attributes.items():
            setattr(func, name, value)
    except (AttributeError, TypeError):
        return _Wrapped(func, attributes)
    return func


class _Wrapped:
    """A handle for a callable that takes no attributes: calls go to it."""

    def __init__(self, func: Callable[..., Any], attributes: dict[str, Any]) -> None:
        self.__wrapped__ = func
        self.__dict__.update(attributes)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__wrapped__(*args, **kwargs)


def target(task: object) -> tuple[Any, BoundTask | None]:
    """The task name ``schedule`` was given (a str, or a handle's name) and the handle's
    BoundTask (None for a name)."""
    bound = None if isinstance(task, str) else getattr(task, BOUND, None)
    if isinstance(bound, BoundTask):
        return bound.name, bound
    return task, None


@dataclasses.dataclass
class Batch:
    """The new tasks of one ``schedule`` call, made by :func:`new_batch`: the caller
    stores ``tasks`` (sync or async, in its transaction or the store's) and sets ``ids``."""

    lilota: Lilota
    handle: BoundTask | None
    tasks: list[NewTask]
    ids: list[int] = dataclasses.field(default_factory=list)

    def result(self) -> list[Any]:
        """The ids, or with a handle as target their :class:`TaskRef`s."""
        if self.handle is None:
            return self.ids
        return [TaskRef(i, self.lilota, self.handle.output_model) for i in self.ids]


@contextlib.contextmanager
def new_batch(
    lilota: Lilota, target_: object, inputs: Any, *, many: bool, **options: Any
) -> Iterator[Batch]:
    """The steps of every ``schedule``, ``schedule_many``, ``aschedule`` and
    ``aschedule_many`` call but the insert: the instance open, the name (a str or a
    handle's), the checks (:func:`lilota.registry.new_task` per input; with ``many``, the
    options even for no input), the tasks made in the scheduling span of
    :func:`lilota.tracing.scheduling` (their trace context), which covers the insert the
    caller makes in the ``with`` block; then the ids remembered for ``stop()``."""
    lilota._check_open()
    name, handle = target(target_)
    known_names = lilota._known_names()
    values = validation.inputs(inputs) if many else [inputs]
    if many:  # a bad option is refused even for an empty list
        check_options(name, known_names=known_names, clock=lilota._clock, **options)
    with tracing.scheduling(name) as traced:  # a span if a trace is active (lilota[otel])
        tasks = [
            new_task(
                name,
                value,
                registry=lilota.registry,
                known_names=known_names,
                clock=lilota._clock,
                trace_context=traced.context,
                **options,
            )
            for value in values
        ]
        batch = Batch(lilota, handle, tasks)
        yield batch
        traced.scheduled(batch.ids)
    lilota._remember(batch.ids)


class Registering:
    """The ``register`` decorator of :class:`~lilota.core.Lilota` (typed overloads)."""

    registry: Registry
    _started: Callable[[], bool]  # whether the instance's workers are started (Lilota's)

    # With an input model and an output model, with one of them, with neither.
    @overload
    def register(
        self,
        name: str,
        input_model: type[In],
        output_model: type[Out],
        task_progress: type | None = None,
        **options: Unpack[TaskOptions],
    ) -> Decorator[In, Out]: ...
    @overload
    def register(
        self,
        name: str,
        input_model: type[In],
        output_model: None = None,
        task_progress: type | None = None,
        **options: Unpack[TaskOptions],
    ) -> Decorator[In, Any]: ...
    @overload
    def register(
        self,
        name: str,
        input_model: None = None,
        *,
        output_model: type[Out],
        task_progress: type | None = None,
        **options: Unpack[TaskOptions],
    ) -> Decorator[Any, Out]: ...
    @overload
    def register(
        self,
        name: str,
        input_model: None = None,
        output_model: None = None,
        task_progress: type | None = None,
        **options: Unpack[TaskOptions],
    ) -> Decorator[Any, Any]: ...

    def register(
        self,
        name: str,
        input_model: type | None = None,
        output_model: type | None = None,
        task_progress: type | None = None,
        **options: Any,
    ) -> Any:
        """Decorator: register a task function under ``name`` for this instance's workers;
        it returns the function itself, given the attributes of a :class:`TaskHandle`
        (``report.schedule(ReportInput(...))``...).

        Options: ``max_attempts`` (default 1: an exception or a timeout fails the task at
        once; give more to retry it), ``retry_on`` (an exception class or a tuple: only
        those are retried; default ``Exception``; ``raise NoRetry(...)`` fails at once),
        ``retry_delay`` (default 1 s before the first retry, doubled for each next one,
        less up to 25 % jitter, at most 1 h), ``max_recoveries`` (default 3: how many times
        the task runs again after its worker was lost, apart from attempts; 0 for a task
        that must never run twice), ``timeout`` (a timedelta or
        seconds; default none: the process running a task past it is replaced),
        ``schedule`` (``every(...)``/``crontab(...)``: a periodic task), ``cpu_bound``
        (run in a process pool of the worker, so that it blocks neither the worker's
        event loop nor its other tasks).
        Raises :class:`~lilota.errors.TaskAlreadyRegistered` for a name used before, and
        :class:`~lilota.errors.WorkerAlreadyStarted` once ``start()`` started worker
        processes (they know only the tasks registered before; register every task first).
        """
        if self._started():
            raise WorkerAlreadyStarted(
                f"cannot register task {name!r}: this instance's workers are already "
                "started; register every task before start()"
            )
        plain = self.registry.register(
            name,
            input_model=input_model,
            output_model=output_model,
            task_progress=task_progress,
            **options,
        )
        lilota: Any = self

        def decorator(func: Callable[..., Any]) -> Any:
            return bind(plain(func), BoundTask(lilota, name, output_model))

        return decorator
