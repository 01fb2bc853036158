"""One way to run a claimed task: prepare the call, execute it, and the outcome rules.

Every place that runs a task goes through here: the worker's sync lane, its async lane,
the ``cpu_bound`` pool processes, and ``lilota.testing``'s inline mode (through
:meth:`lilota.worker.WorkerLoop.run_once`). The steps:

1. :func:`prepare` builds what the run is handed besides its input: the
   :class:`TaskProgress` that writes to the store and the
   :class:`~lilota.context.TaskContext`.
2. :func:`execute` (a plain function; a coroutine function runs in ``asyncio.run``) or
   :func:`execute_async` (on a running event loop) rebuilds the input as the task's
   ``input_model``, calls the function and turns what happened into an
   :class:`~lilota.models.Outcome` (an input that does not fit fails the attempt like
   any error); they never raise for what the task did.
3. :func:`begin` and :func:`end` frame each attempt that starts: they tell its observers
   (:mod:`lilota.hooks`: the task log, metrics or tracing, the application's hooks) when
   it starts and how it ended, once its outcome is final (after a lane's own rules:
   timeout, cancellation). Every lane calls them; nothing else tells the observers.
4. The outcome rules are the named constructors below (:func:`completed`, :func:`failed`,
   :func:`cancelled`, ...): the only places an Outcome of a run is made, and every error
   record comes from :meth:`lilota.models.TaskError.from_exception`.
4. Observation: :func:`begin` and :func:`end` tell an attempt's observers
   (:mod:`lilota.hooks`: the task log, the run-time metrics, the application's hooks)
   wherever it runs; :func:`execute` and :func:`execute_async` run the function in its
   trace span (:func:`lilota.tracing.attempt_span`), which must be current in the thread
   (or pool process) that runs it. Both cost a check when unused.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from lilota import serialization, tracing
from lilota.context import TaskContext
from lilota.errors import (
    DatabaseError,
    InvalidInput,
    SerializationError,
    TaskCancelled,
    TaskTimeout,
    WorkerLost,
)
from lilota.hooks import Attempt, Hooks, TaskInfo, notify_ended, notify_started
from lilota.models import Claim, Outcome, TaskError, TaskProgress, TaskStatus
from lilota.registry import effective_max_attempts, new_task

if TYPE_CHECKING:
    from lilota.registry import Registry, TaskDefinition
    from lilota.store import TaskStore

log = logging.getLogger(__name__)

COMPLETED = TaskStatus.COMPLETED.value
FAILED = TaskStatus.FAILED.value
CANCELLED = TaskStatus.CANCELLED.value
PENDING = TaskStatus.PENDING.value


# ---------------------------------------------------------------------- outcome rules


def completed(claim: Claim, output: str | None) -> Outcome:
    """The attempt returned; ``output`` is its JSON text."""
    return Outcome(id=claim.id, fence=claim.fence, status=COMPLETED, output=output)


def failed(
    claim: Claim, definition: TaskDefinition | None, error: BaseException, now: datetime
) -> Outcome:
    """The attempt raised ``error``: a retry at ``now`` + the retry delay while attempts
    are left and the error is worth retrying (the task's ``retry_on``, never
    :class:`~lilota.errors.NoRetry` or an input that does not fit), else failed."""
    record = TaskError.from_exception(error).to_json()
    # An input that cannot be read or does not fit the model fails the same way each time.
    retriable = (
        definition is not None
        and isinstance(error, Exception)
        and not isinstance(error, (SerializationError, InvalidInput))
        and definition.retry.retries(error)  # its retry_on, never NoRetry
    )
    limit = effective_max_attempts(definition, claim.max_attempts)
    if definition is not None and retriable and claim.attempt < limit:
        delay = definition.retry.delay_after(claim.attempt)
        return Outcome(
            id=claim.id, fence=claim.fence, status=PENDING, exception=record, run_at=now + delay
        )
    return Outcome(id=claim.id, fence=claim.fence, status=FAILED, exception=record)


def cancelled(claim: Claim, error: BaseException, output: str | None = None) -> Outcome:
    """The attempt ended because it was cancelled (never retried)."""
    record = TaskError.from_exception(error).to_json()
    return Outcome(
        id=claim.id, fence=claim.fence, status=CANCELLED, output=output, exception=record
    )


def cancelled_before_start(claim: Claim) -> Outcome:
    """A claimed task whose cancellation was requested before it started: not run."""
    return cancelled(claim, TaskCancelled(f"task {claim.id} was cancelled before it started"))


def cancelled_while_running(outcome: Outcome) -> Outcome:
    """The outcome of an attempt that was told to stop: cancelled, whether the task then
    ended early, raised, or finished its work anyway (its return value is kept), and never
    retried: whoever cancelled it does not want it run again."""
    if outcome.status == CANCELLED:
        return outcome
    return Outcome(
        id=outcome.id,
        fence=outcome.fence,
        status=CANCELLED,
        output=outcome.output,
        exception=cancelled_record(outcome),
    )


def cancelled_record(outcome: Outcome) -> str:
    """The error record of an attempt that ended (``outcome``) after it was asked to
    cancel; the store stores it instead when it finds the request set."""
    how = "returned" if outcome.status == COMPLETED else "raised"
    if outcome.exception is not None:
        raised = json.loads(outcome.exception)
        how = f"raised {raised.get('type')}: {raised.get('message')}"
    error = TaskCancelled(f"task {outcome.id} was cancelled while it ran; it then {how}")
    return TaskError.from_exception(error).to_json()


def timed_out(
    claim: Claim,
    definition: TaskDefinition,
    now: datetime,
    *,
    ignored_cancel: bool = False,
) -> Outcome:
    """The attempt overran its timeout (``ignored_cancel``: and did not end when it was
    cancelled for it); retried like any other failure."""
    seconds = definition.timeout.total_seconds() if definition.timeout else 0.0
    message = f"task {claim.id} ({claim.name}) ran longer than its timeout of {seconds:g} s"
    if ignored_cancel:
        message += " and did not end when cancelled"
    return failed(claim, definition, TaskTimeout(message), now)


def interrupted(
    task_id: int, fence: int, message: str, *, cancel_requested: bool, retry_at: datetime | None
) -> Outcome:
    """The end of an attempt whose worker is gone (``message`` says how), decided by the
    store: cancelled if someone asked, else pending again at ``retry_at`` (a recovery,
    which the store counts apart from attempts), else failed with ``WorkerLost``."""
    if cancel_requested:
        error = TaskCancelled(f"task {task_id} was cancelled; {message}")
        record = TaskError.from_exception(error).to_json()
        return Outcome(id=task_id, fence=fence, status=CANCELLED, exception=record)
    record = TaskError.from_exception(WorkerLost(message)).to_json()
    status = PENDING if retry_at else FAILED
    return Outcome(id=task_id, fence=fence, status=status, exception=record, run_at=retry_at)


def did_not_stop(claim: Claim, grace: timedelta) -> Outcome:
    """The attempt was cancelled and did not stop within ``grace``: it is ended."""
    seconds = grace.total_seconds()
    error = TaskCancelled(f"task {claim.id} was cancelled and did not stop within {seconds:g} s")
    return cancelled(claim, error)


# ---------------------------------------------------------------------- running a task


@dataclass(frozen=True)
class Call:
    """A claimed task ready to run: its definition and what its function is handed."""

    claim: Claim
    definition: TaskDefinition
    progress: TaskProgress
    context: TaskContext | None
    clock: Callable[[], datetime]
    attempt: Attempt | None = None  # its observers' view (None in a cpu_bound pool process)

    @property
    def cancel_requested(self) -> bool:
        return self.progress.cancelled


def prepare(
    claim: Claim,
    definition: TaskDefinition,
    *,
    store: TaskStore,
    registry: Registry | None = None,
    write_progress: Callable[[int], None] | None = None,
    cancel_event: threading.Event | None = None,
    attempt: Attempt | None = None,
) -> Call:
    """Build the progress handle and the context for one run of ``claim``.

    Progress goes to ``write_progress`` (default: :func:`progress_writer` on ``store``);
    ``cancel_event`` is the flag the task's ``cancelled`` reads; ``attempt`` (from
    :func:`begin`) is told the exception the task raises.
    """
    write = write_progress if write_progress is not None else progress_writer(store, claim)
    progress = TaskProgress(claim.id, write, cancel_event or threading.Event())
    context = None
    if definition.context_param is not None:
        schedule = scheduler(store, registry)
        context = TaskContext.for_claim(claim, progress=progress, schedule=schedule)
    return Call(claim, definition, progress, context, store.clock, attempt)


def begin(
    claim: Claim, definition: TaskDefinition, *, worker_id: str, hooks: Hooks | None
) -> Attempt:
    """An attempt of ``claim`` starts in this process (worker ``worker_id``): tell its
    observers (the task log, :func:`lilota.hooks.add_observer`'s, then ``hooks``'
    ``before_task``). Returns the attempt, for :func:`prepare` and :func:`end`."""
    info = TaskInfo.for_claim(
        claim,
        max_attempts=effective_max_attempts(definition, claim.max_attempts),
        worker_id=worker_id,
    )
    attempt = Attempt(info, hooks)
    notify_started(attempt)
    return attempt


def end(attempt: Attempt, outcome: Outcome, now: datetime) -> None:
    """``attempt`` ended with ``outcome``, final as it will be recorded (``now``: the
    store's time): tell its observers (``on_failure`` and ``after_task`` hooks last).
    Never raises for what an observer does."""
    notify_ended(attempt, outcome, now)


def scheduler(store: TaskStore, registry: Registry | None) -> Callable[..., int]:
    """What ``TaskContext.schedule`` calls: make a task and store it; returns its id.

    A name ``registry`` knows has its input checked against its model; another name is
    stored as given if a live worker announced it (:func:`announced_names`), else refused
    with :class:`~lilota.errors.TaskNotRegistered`, as ``Lilota.schedule`` refuses it:
    no worker would ever run it."""

    def schedule(name: str, input: Any, **options: Any) -> int:
        known: frozenset[str] | None = None  # None: the registry knows it, or not a str
        if isinstance(name, str) and (registry is None or registry.find(name) is None):
            known = announced_names(store, name)
            if registry is not None:
                known |= registry.names
        with tracing.scheduling(name) as traced:  # a child of the attempt's span, if traced
            task = new_task(
                name,
                input,
                registry=registry,
                known_names=known,
                clock=store.clock,
                trace_context=traced.context,
                **options,
            )
            task_id = store.add(task)
            traced.scheduled([task_id])
            return task_id

    return schedule


# The names live workers announced are read from the worker table at most this often
# (per store): a task queueing many follow-ups for another worker costs one query, and a
# worker that started a moment ago is seen within this delay.
ANNOUNCED_FOR = 5.0
# A name missing from the cached names reads the table again if the cache is older than
# this: a worker started just now is found, a loop of unknown names costs one query a second.
ANNOUNCED_RECHECK = 1.0
# A worker is live if its heartbeat is at most this old. Idle workers beat every
# max(heartbeat, lease / 3), 10 s by default; this covers leases up to 30 minutes. The
# rows of workers that stopped cleanly are gone already.
LIVE_WITHIN = timedelta(minutes=10)

_announced: weakref.WeakKeyDictionary[TaskStore, tuple[float, frozenset[str]]] = (
    weakref.WeakKeyDictionary()
)
_announced_lock = threading.Lock()


def announced_names(store: TaskStore, wanted: str | None = None) -> frozenset[str]:
    """The task names live workers of ``store`` announced (``lilota_worker``), cached for
    :data:`ANNOUNCED_FOR` seconds; read again sooner when ``wanted`` is not among them."""
    now = time.monotonic()
    with _announced_lock:
        read_at, names = _announced.get(store, (-math.inf, frozenset()))
    age = now - read_at
    if age < ANNOUNCED_FOR and (wanted is None or wanted in names or age < ANNOUNCED_RECHECK):
        return names
    names = frozenset(n for w in store.workers(seen_within=LIVE_WITHIN) for n in w["task_names"])
    with _announced_lock:
        _announced[store] = (now, names)
    return names


def progress_writer(store: TaskStore, claim: Claim) -> Callable[[int], None]:
    """Write progress of ``claim`` to ``store``; never fails the task (progress is for
    people watching): a write that cannot be made is logged."""

    def write(percentage: int) -> None:
        try:
            recorded = store.set_progress(claim.id, claim.attempt, percentage)
        except DatabaseError as e:
            log.warning("task %d: progress %d%% not recorded: %s", claim.id, percentage, e)
            return
        if not recorded:
            log.warning(
                "task %d: progress %d%% not recorded: this attempt no longer holds it",
                claim.id,
                percentage,
            )

    return write


def _arguments(call: Call) -> dict[str, Any]:
    definition = call.definition
    value = serialization.build(serialization.loads(call.claim.input), definition.input_model)
    return definition.call_arguments(value, call.progress, call.context)


def _ended(call: Call, result: Any) -> Outcome:
    output = serialization.dumps(result, model=call.definition.output_model, root="output")
    return completed(call.claim, output)


def _raised(call: Call, error: BaseException) -> Outcome:
    claim = call.claim
    if call.attempt is not None:
        call.attempt.exception = error
    if isinstance(error, TaskCancelled):
        return cancelled(claim, error)
    return failed(claim, call.definition, error, call.clock())


def _finish(call: Call, outcome: Outcome) -> Outcome:
    if call.cancel_requested:  # told to stop: cancelled, however it ended
        return cancelled_while_running(outcome)
    return outcome


def execute(call: Call) -> Outcome:
    """Run ``call`` in this thread and return its outcome (never raises for what the task
    does; ``KeyboardInterrupt`` and other ``BaseException`` pass through)."""
    # The attempt's trace span (lilota.tracing), current while the function runs.
    with tracing.attempt_span(call.claim) as span:
        try:
            kwargs = _arguments(call)
            if call.definition.is_async:
                result = asyncio.run(call.definition.func(**kwargs))
            else:
                result = call.definition.func(**kwargs)
            outcome = _ended(call, result)
        except (Exception, SystemExit) as error:
            outcome = _raised(call, error)
        outcome = span.ended(_finish(call, outcome))
    return outcome


async def execute_async(call: Call) -> Outcome:
    """Await ``call`` (an ``async def`` task) on the running loop and return its outcome.
    ``asyncio.CancelledError`` (a timeout or a forced cancellation) passes through."""
    # The attempt's trace span (lilota.tracing), current while the function runs.
    with tracing.attempt_span(call.claim) as span:
        try:
            result = await call.definition.func(**_arguments(call))
            outcome = _ended(call, result)
        except (Exception, SystemExit) as error:
            outcome = _raised(call, error)
        outcome = span.ended(_finish(call, outcome))
    return outcome


__all__ = [
    "Call",
    "announced_names",
    "begin",
    "cancelled",
    "cancelled_before_start",
    "cancelled_while_running",
    "completed",
    "did_not_stop",
    "end",
    "execute",
    "execute_async",
    "failed",
    "interrupted",
    "prepare",
    "progress_writer",
    "scheduler",
    "timed_out",
]
