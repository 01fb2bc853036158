"""Task definitions: which function runs for a task name, with which models and options."""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar, get_type_hints

from lilota import serialization, validation
from lilota.context import TaskContext
from lilota.errors import NoRetry, RegistrationError, TaskAlreadyRegistered, TaskNotRegistered
from lilota.hooks import Hooks
from lilota.models import DEFAULT_MAX_RECOVERIES, NewTask, TaskProgress

F = TypeVar("F", bound=Callable[..., Any])

# Longest back-off between two attempts of a failing task. Without a cap the exponential
# delay of attempt 20 would be weeks; an hour keeps a flapping dependency from being
# hammered while still retrying within a working day.
MAX_RETRY_DELAY = timedelta(hours=1)

# Attempts a task gets unless registered otherwise: 1. An exception fails the task at once
# (as lilota 1.x and the seeds do): only the task knows whether running it again is safe
# and useful, so it asks for retries (max_attempts=, retry_on=). A lost worker (killed,
# its machine gone, its lease expired) is another thing: its task runs again whatever
# this says, up to max_recoveries times (lilota.models.DEFAULT_MAX_RECOVERIES).
DEFAULT_MAX_ATTEMPTS = 1

# Longest unique_key: the width of its column (String(255) in lilota.store), checked by
# lilota.validation so that every backend refuses a longer key alike (SQLite would store
# it, PostgreSQL not).
MAX_UNIQUE_KEY = validation.MAX_UNIQUE_KEY


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how soon a task that raised is tried again.

    ``max_attempts`` counts the attempts the task ended itself (by returning or raising);
    an attempt whose worker was lost does not count (it is a recovery). Only exceptions
    that are instances of ``retry_on`` are retried, never :class:`~lilota.errors.NoRetry`.
    The n-th retry waits ``retry_delay * 2**(n-1)``, capped at one hour, with up to 25 %
    random jitter so that many failing tasks do not retry in step.
    """

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    retry_delay: timedelta = timedelta(seconds=1)
    retry_on: tuple[type[BaseException], ...] = (Exception,)

    def retries(self, error: BaseException) -> bool:
        """Whether an attempt that raised ``error`` is worth another (attempts aside)."""
        return isinstance(error, self.retry_on) and not isinstance(error, NoRetry)

    def delay_after(self, attempt: int, rand: Callable[[], float] = random.random) -> timedelta:
        """The wait before the attempt that follows failed attempt number ``attempt``."""
        base = self.retry_delay * (2 ** max(0, attempt - 1))
        base = min(base, MAX_RETRY_DELAY)
        delay: timedelta = base * (1 - 0.25 * rand())
        return delay


@dataclass(frozen=True, kw_only=True)
class TaskDefinition:
    """A registered task: its function, how to call it, and its options."""

    name: str
    func: Callable[..., Any]
    input_model: type | None = None
    output_model: type | None = None
    input_param: str | None = None  # parameter receiving the input, if any
    progress_param: str | None = None  # parameter receiving a TaskProgress, if any
    context_param: str | None = None  # parameter receiving a TaskContext, if any
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    timeout: timedelta | None = None
    is_async: bool = False
    schedule: Any = None  # a lilota.schedules.Schedule for periodic tasks
    cpu_bound: bool = False  # runs in a process pool of the worker (lilota.asynclane)
    max_recoveries: int = DEFAULT_MAX_RECOVERIES  # runs again after a lost worker

    @property
    def runs_on_loop(self) -> bool:
        """Run by the worker's event loop thread (async or cpu_bound), not its main thread."""
        return self.is_async or self.cpu_bound

    def call_arguments(self, value: Any, progress: Any, context: Any) -> dict[str, Any]:
        """Keyword arguments for one call of ``func``."""
        kwargs: dict[str, Any] = {}
        if self.input_param is not None:
            kwargs[self.input_param] = value
        if self.progress_param is not None:
            kwargs[self.progress_param] = progress
        if self.context_param is not None:
            kwargs[self.context_param] = context
        return kwargs


def _special_param(
    params: list[inspect.Parameter], hints: dict[str, Any], cls: type | None, names: tuple[str, ...]
) -> str | None:
    for p in params:
        hint = hints.get(p.name)
        if cls is not None and (hint is cls or (isinstance(hint, type) and issubclass(hint, cls))):
            return p.name
    for p in params:
        if p.name in names:
            return p.name
    return None


def _plan_call(
    name: str, func: Callable[..., Any], input_model: Any, task_progress: Any
) -> tuple[str | None, str | None, str | None]:
    """Decide which parameter gets the input, the progress handle and the context."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise RegistrationError(f"task {name!r}: cannot inspect {func!r}: {exc}") from exc
    params = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    if any(p.kind is p.POSITIONAL_ONLY for p in params):
        raise RegistrationError(f"task {name!r}: positional-only parameters are not supported")
    try:
        hints = get_type_hints(func)
    except Exception:  # unresolvable forward references: fall back to names only
        hints = {}

    progress_param = _special_param(params, hints, TaskProgress, ("task_progress", "progress"))
    context_param = _special_param(params, hints, TaskContext, ("ctx", "context"))
    if task_progress is not None and progress_param is None:
        # Registered with task_progress=TaskProgress but no parameter is typed or named for
        # it: the seed's convention is that it is the last parameter.
        candidates = [p.name for p in params if p.name != context_param]
        if not candidates:
            raise RegistrationError(
                f"task {name!r} was registered with task_progress=TaskProgress, but "
                f"{func.__name__}() takes no parameter to receive it"
            )
        progress_param = candidates[-1]

    rest = [p for p in params if p.name not in (progress_param, context_param)]
    required = [p for p in rest if p.default is p.empty]
    if len(required) > 1:
        raise RegistrationError(
            f"task {name!r}: {func.__name__}() has {len(required)} required parameters "
            f"({', '.join(p.name for p in required)}); a task takes one input (use an input "
            "model to pass several values) plus optionally a TaskProgress or TaskContext"
        )
    input_param = rest[0].name if rest else None
    if input_model is not None and input_param is None:
        raise RegistrationError(
            f"task {name!r} has input_model={getattr(input_model, '__name__', input_model)} "
            f"but {func.__name__}() takes no parameter to receive the input"
        )
    return input_param, progress_param, context_param


def _as_timedelta(value: timedelta | float | int | None, what: str) -> timedelta | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (timedelta, int, float)):
        raise RegistrationError(f"{what} must be a timedelta or seconds, got {value!r}")
    delta = value if isinstance(value, timedelta) else timedelta(seconds=value)
    if delta <= timedelta(0):
        raise RegistrationError(f"{what} must be positive, got {value!r}")
    return delta


class Registry:
    """Maps task names to :class:`TaskDefinition`. One per ``Lilota`` or ``LilotaWorker``."""

    def __init__(self) -> None:
        self._tasks: dict[str, TaskDefinition] = {}
        # worker_init, before_task, after_task, on_failure: they reach worker processes
        # with the registry (the process imports the module that registers them).
        self.hooks = Hooks()

    def register(
        self,
        name: str,
        func: Callable[..., Any] | None = None,
        *,
        input_model: type | None = None,
        output_model: type | None = None,
        task_progress: type | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        retry_delay: timedelta | float = timedelta(seconds=1),
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
        max_recoveries: int = DEFAULT_MAX_RECOVERIES,
        timeout: timedelta | float | None = None,
        schedule: Any = None,
        cpu_bound: bool = False,
    ) -> Any:
        """Register ``func`` under ``name``; used as ``@register("name", ...)`` or directly.

        Raises :class:`TaskAlreadyRegistered` for a name registered before and
        :class:`RegistrationError` for a function or model that cannot be used.
        """
        if not isinstance(name, str) or not validation.NAME_RE.match(name):
            raise RegistrationError(f"task name must be {validation.NAME_RULE}, got {name!r}")
        serialization.check_model(input_model, role="input_model")
        serialization.check_model(output_model, role="output_model")
        if task_progress is not None and task_progress is not TaskProgress:
            raise RegistrationError(f"task_progress must be TaskProgress, got {task_progress!r}")
        # The column is a 32-bit INTEGER on PostgreSQL.
        validation.check_int(
            max_attempts, "max_attempts", 1, validation.INT32_MAX, error=RegistrationError
        )
        validation.check_int(
            max_recoveries, "max_recoveries", 0, validation.INT32_MAX, error=RegistrationError
        )
        retry_kinds = _exception_types(retry_on)
        delay = _as_timedelta(retry_delay, "retry_delay")
        assert delay is not None
        timeout_delta = _as_timedelta(timeout, "timeout")
        if schedule is not None and not hasattr(schedule, "ticks_between"):
            raise RegistrationError(
                f"schedule must be every(...) or crontab(...) from lilota, got {schedule!r}"
            )
        if not isinstance(cpu_bound, bool):
            raise RegistrationError(f"cpu_bound must be True or False, got {cpu_bound!r}")

        def decorator(f: F) -> F:
            if not callable(f):
                raise RegistrationError(f"task {name!r}: {f!r} is not callable")
            if name in self._tasks:
                raise TaskAlreadyRegistered(
                    f"a task named {name!r} is already registered "
                    f"({self._tasks[name].func.__qualname__}); task names must be unique"
                )
            input_param, progress_param, context_param = _plan_call(
                name, f, input_model, task_progress
            )
            if schedule is not None and input_param is not None:
                param = inspect.signature(f).parameters[input_param]
                if param.default is param.empty:
                    raise RegistrationError(
                        f"task {name!r} is periodic (schedule={schedule!r}): its tasks get no "
                        f"input, but {f.__name__}() requires {input_param!r}; give it a default"
                    )
            if cpu_bound and ("<" in f.__qualname__ or not hasattr(f, "__module__")):
                raise RegistrationError(
                    f"task {name!r} is cpu_bound: {f.__qualname__} runs in another process, "
                    "which imports it by name; define it at module level"
                )
            self._tasks[name] = TaskDefinition(
                name=name,
                func=f,
                input_model=input_model,
                output_model=output_model,
                input_param=input_param,
                progress_param=progress_param,
                context_param=context_param,
                retry=RetryPolicy(
                    max_attempts=max_attempts, retry_delay=delay, retry_on=retry_kinds
                ),
                max_recoveries=max_recoveries,
                timeout=timeout_delta,
                is_async=inspect.iscoroutinefunction(f),
                schedule=schedule,
                cpu_bound=cpu_bound,
            )
            return f

        if func is not None:
            return decorator(func)
        return decorator

    def get(self, name: str) -> TaskDefinition:
        """The definition of ``name``; raises :class:`TaskNotRegistered` if there is none."""
        try:
            return self._tasks[name]
        except KeyError:
            known = ", ".join(sorted(self._tasks)) or "none"
            raise TaskNotRegistered(
                f"no task named {name!r} is registered (registered: {known})"
            ) from None

    def find(self, name: str) -> TaskDefinition | None:
        return self._tasks.get(name)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self._tasks)

    def floors(self, names: Iterable[str] | None = None) -> dict[str, int]:
        """The registered attempt limits by name (of ``names``, default all): a claim
        raises a task's stored max_attempts to these (a scheduler that did not know the
        task stored 1), in the claim's own transaction."""
        wanted = self._tasks if names is None else names
        return {name: effective_max_attempts(self._tasks[name]) for name in wanted}

    def __contains__(self, name: object) -> bool:
        return name in self._tasks

    def __iter__(self) -> Iterator[TaskDefinition]:
        return iter(list(self._tasks.values()))

    def __len__(self) -> int:
        return len(self._tasks)


# ---------------------------------------------------------------------- making a task


def effective_max_attempts(definition: TaskDefinition | None, stored: int = 1) -> int:
    """The attempts a task gets: the larger of ``stored`` (its row's max_attempts) and the
    value registered for it here. A scheduler that did not know the task stored 1, so a
    worker that knows it raises the limit to what was registered. Without a definition
    (the task is not registered here) ``stored`` alone counts.

    With the default ``stored=1`` this is the value a new task gets when the caller gives none.
    """
    if definition is None:
        return stored
    return max(stored, definition.retry.max_attempts)


def new_task(
    name: str,
    input: Any = None,
    *,
    registry: Registry | None = None,
    known_names: Collection[str] | None = None,
    clock: Callable[[], datetime] | None = None,
    run_at: datetime | None = None,
    delay: timedelta | None = None,
    priority: int = 0,
    unique_key: str | None = None,
    description: str | None = None,
    max_attempts: int | None = None,
    schedule_key: str | None = None,
    trace_context: str | None = None,
) -> NewTask:
    """Check the arguments of one new task and return the row to insert (nothing is written).

    The one way every caller makes a task (``Lilota.schedule``/``schedule_many``,
    ``TaskContext.schedule``, periodic ticks, the legacy ``TaskRunner.add``). The cheap
    checks come first (:func:`check_options`), then the input is serialized: with the
    input model of ``name`` when ``registry`` holds it (checked as the worker will rebuild
    it), else as plain JSON.

    ``known_names``: when given, a name not in it is refused; None accepts any name a task
    can be registered under (it is stored for workers that know it). ``clock`` gives naive
    UTC now; it is needed (and called) only for a ``delay``. ``max_attempts`` None means
    the registered value (1 for a task not registered here). ``trace_context``: the
    scheduling span's, stored with the task (:func:`lilota.tracing.scheduling`).

    Raises, in this order, writing nothing: the errors of :func:`check_options`; then
    :class:`~lilota.errors.InvalidInput` and :class:`~lilota.errors.SerializationError`
    for the input; :class:`~lilota.errors.InvalidArgument` for text no database can store
    (NUL, lone surrogates).
    """
    options = check_options(
        name,
        known_names=known_names,
        clock=clock,
        run_at=run_at,
        delay=delay,
        priority=priority,
        unique_key=unique_key,
        description=description,
        max_attempts=max_attempts,
    )
    definition = registry.find(name) if registry is not None else None
    if definition is not None:
        text = serialization.prepare(input, definition.input_model, root="input")
    else:
        text = serialization.dumps(input, root="input")
    if options["max_attempts"] is None:
        options["max_attempts"] = effective_max_attempts(definition)
    recoveries = DEFAULT_MAX_RECOVERIES if definition is None else definition.max_recoveries
    return NewTask(
        name=name,
        input=text,
        schedule_key=schedule_key,
        max_recoveries=recoveries,
        trace_context=trace_context,
        **options,
    )


def _exception_types(retry_on: object) -> tuple[type[BaseException], ...]:
    """``retry_on`` (an exception class or a tuple of them) as a tuple; RegistrationError
    naming what is not one."""
    kinds = retry_on if isinstance(retry_on, tuple) else (retry_on,)
    for kind in kinds:
        if not (isinstance(kind, type) and issubclass(kind, BaseException)):
            raise RegistrationError(
                f"retry_on must be an exception class or a tuple of them, got {retry_on!r}"
            )
    if not kinds:
        raise RegistrationError("retry_on must name at least one exception class, got ()")
    return tuple(kinds)


def check_options(
    name: object,
    *,
    known_names: Collection[str] | None = None,
    clock: Callable[[], datetime] | None = None,
    run_at: object = None,
    delay: object = None,
    priority: object = 0,
    unique_key: object = None,
    description: object = None,
    max_attempts: object = None,
) -> dict[str, Any]:
    """Check every argument of a new task but its input; return the row's values for
    them (``run_at`` naive UTC or None, ``max_attempts`` None when not given).

    Every value is checked against the PostgreSQL column that stores it (a 32-bit
    ``priority``, a ``max_attempts`` of 1..2**31-1, a ``unique_key`` of 1-255
    characters), so SQLite and PostgreSQL refuse the same calls alike. Raises
    :class:`~lilota.errors.InvalidArgumentType` for a wrong type (a name that is not a
    str, a ``run_at`` that is not a datetime, a ``priority`` that is not an int...),
    :class:`~lilota.errors.TaskNotRegistered` for a name not in ``known_names``,
    :class:`~lilota.errors.InvalidArgument` for a value out of range (a name no task can be
    registered under, ``run_at`` with ``delay``, a time past the year 9999...).
    """
    if not isinstance(name, str):
        validation.task_name(name)
    if known_names is not None and name not in known_names:
        raise TaskNotRegistered(
            f"no task named {name!r} is registered (registered: {', '.join(sorted(known_names))})"
        )
    validation.task_name(name)
    when = validation.when(run_at, delay, clock)
    int32 = validation.INT32_MIN, validation.INT32_MAX
    values: dict[str, Any] = {
        "run_at": when,
        "priority": validation.check_int(priority, "priority", *int32),
        "unique_key": validation.unique_key(unique_key),
        "description": validation.optional_str(description, "description"),
        "max_attempts": None,
    }
    if max_attempts is not None:
        values["max_attempts"] = validation.check_int(
            max_attempts, "max_attempts", 1, validation.INT32_MAX
        )
    return values
