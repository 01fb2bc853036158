"""LilotaWorker and the worker loop: claim -> run -> record, with leases kept alive.

A worker process runs one loop in its main thread: claim runnable tasks, run them one
after the other, record each outcome, and wait for a wake-up when there is nothing to do.
A second thread, the lease keeper, renews the leases of the tasks the process holds (so
that a long, CPU-bound task cannot let them lapse), takes back tasks of dead workers,
passes cancellation requests to the running task, and ends a task that overruns its
timeout or ignores a cancellation by replacing the process.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import json
import logging
import os
import signal
import socket
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import FrameType
from typing import Any, ClassVar

from lilota import serialization
from lilota.errors import (
    ConfigurationError,
    DatabaseError,
    InvalidInput,
    LilotaError,
    SerializationError,
    TaskCancelled,
    TaskTimeout,
    require_int,
)
from lilota.models import TaskProgress, TaskStatus
from lilota.registry import Registry, TaskDefinition
from lilota.store import Claim, Outcome, TaskStore, parse_url, utcnow

log = logging.getLogger(__name__)


class WorkerExit(enum.IntEnum):
    """Exit codes of a worker process; the supervisor acts on them."""

    OK = 0
    STARTUP_FAILED = 78  # the script or the database could not be set up (EX_CONFIG)
    TASK_TIMEOUT = 79  # a task overran its timeout: replace the process at once
    CANCEL_FORCED = 80  # a running task ignored its cancellation: replace at once
    PARENT_DIED = 81  # the process that started the worker is gone
    LEASE_LOST = 82  # another worker took over the running task (this one had stalled)


# Environment of a worker process started by a supervisor.
ENV_CONTROL_FD = "LILOTA_CONTROL_FD"  # write end of a pipe: one JSON line "ready"
ENV_LIFELINE_FD = "LILOTA_LIFELINE_FD"  # read end of a pipe the parent never writes to
ENV_LEASE_SECONDS = "LILOTA_LEASE_SECONDS"
ENV_CANCEL_GRACE_SECONDS = "LILOTA_CANCEL_GRACE_SECONDS"
ENV_ASYNC_CONCURRENCY = "LILOTA_ASYNC_CONCURRENCY"
ENV_CPU_BOUND_PROCESSES = "LILOTA_CPU_BOUND_PROCESSES"

# A task batch is flushed (outcomes recorded) once this much time passed since it began,
# so a slow task in a batch of fast ones never hides the others' results. 50 ms is far
# below what a person notices and far above the cost of one commit (about 1 ms).
FLUSH_AFTER = 0.05

# Claim sizing: claim as many tasks as should take about this long by the recent average
# duration, between 1 and MAX_BATCH. Tasks of a second or more are claimed one at a time,
# so no worker holds tasks that an idle one could run; no-op tasks are claimed 100 at a
# time, one commit per 100 tasks. Above ~100 the commit is no longer the cost.
BATCH_TARGET_SECONDS = 0.02
MAX_BATCH = 100

# After a failed lease renewal the keeper tries again this soon (instead of a heartbeat or
# lease/3 later): when the database is back, the leases that ran out meanwhile are renewed
# before another worker may take them.
RENEW_RETRY = 0.5


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """Tuning of a worker. The defaults suit tasks from milliseconds to hours."""

    # How long a claim lasts without renewal. A worker that dies keeps its tasks this long
    # at most; live workers look for expired leases every max(heartbeat, lease/6), so its
    # tasks are pending again within 1.2 leases (35 s). Shorter recovers faster but a
    # stalled (swapping, paused) machine loses tasks it is still running; 30 s survives
    # long GC pauses and slow disks.
    lease: timedelta = timedelta(seconds=30)
    # How often leases are renewed (and cancellation requests noticed) while tasks run.
    # Must stay well under ``lease``: a third of it leaves two chances before expiry.
    heartbeat: timedelta = timedelta(seconds=1)
    # Longest idle wait between two looks for work when no wake-up arrives: only a
    # safety net for lost notifications, never the normal path.
    idle_poll: float = 5.0
    # Time a running task gets to end by itself after cancellation is requested (it is
    # told within a heartbeat), before its process is replaced. 10 s lets a task finish
    # the step it is in; LILOTA_CANCEL_GRACE_SECONDS or Lilota(cancel_grace=) change it.
    cancel_grace: timedelta = timedelta(seconds=10)
    # Async tasks one worker process runs at once on its event loop. 10 keeps a burst of
    # I/O-bound tasks from opening more connections to other services than a typical
    # pool allows; raise it for tasks that mostly wait (100s are fine for one loop).
    async_concurrency: int = 10
    # Processes of a worker's pool for cpu_bound tasks. 1 per worker process: with the
    # default of one worker process per core, that is already one more process per core.
    cpu_bound_processes: int = 1

    def __post_init__(self) -> None:
        if self.lease <= timedelta(seconds=0):
            raise ConfigurationError(f"lease must be positive, got {self.lease}")
        if self.heartbeat * 2 > self.lease:
            raise ConfigurationError(
                f"heartbeat ({self.heartbeat}) must be at most half the lease ({self.lease})"
            )
        if self.cancel_grace < timedelta(0):
            raise ConfigurationError(f"cancel_grace must be >= 0, got {self.cancel_grace}")
        for option in ("async_concurrency", "cpu_bound_processes"):
            require_int(getattr(self, option), option, 1, ConfigurationError)

    @classmethod
    def from_env(cls, **overrides: Any) -> WorkerSettings:
        """Settings with ``LILOTA_LEASE_SECONDS`` from the environment (set by a supervisor)."""
        values: dict[str, Any] = {}
        lease = os.environ.get(ENV_LEASE_SECONDS)
        if lease:
            seconds = float(lease)
            values["lease"] = timedelta(seconds=seconds)
            values["heartbeat"] = timedelta(seconds=min(1.0, seconds / 3))
        grace = os.environ.get(ENV_CANCEL_GRACE_SECONDS)
        if grace:
            values["cancel_grace"] = timedelta(seconds=float(grace))
        for option, variable in (
            ("async_concurrency", ENV_ASYNC_CONCURRENCY),
            ("cpu_bound_processes", ENV_CPU_BOUND_PROCESSES),
        ):
            if os.environ.get(variable):
                values[option] = int(os.environ[variable])
        values.update({k: v for k, v in overrides.items() if v is not None})
        if overrides.get("lease") is not None and overrides.get("heartbeat") is None:
            seconds = values["lease"].total_seconds()
            values["heartbeat"] = timedelta(seconds=min(1.0, seconds / 3))
        return cls(**values)


def _error_json(error: BaseException) -> str:
    kind = type(error)
    module = kind.__module__
    name = (
        kind.__qualname__ if module in ("builtins", "__main__") else f"{module}.{kind.__qualname__}"
    )
    return json.dumps(
        {
            "type": name,
            "message": str(error),
            "traceback": "".join(traceback.format_exception(kind, error, error.__traceback__)),
        }
    )


def failure_outcome(
    claim: Claim,
    definition: TaskDefinition | None,
    error: BaseException,
    now: datetime,
) -> Outcome:
    """The outcome of an attempt that raised: a retry if attempts are left, else failed."""
    max_attempts = max(claim.max_attempts, definition.retry.max_attempts if definition else 1)
    # An input that cannot be read or does not fit the model fails the same way each time.
    retriable = isinstance(error, Exception) and not isinstance(
        error, (SerializationError, InvalidInput)
    )
    if definition is not None and retriable and claim.attempt < max_attempts:
        delay = definition.retry.delay_after(claim.attempt)
        return Outcome(
            id=claim.id,
            attempt=claim.attempt,
            status=TaskStatus.PENDING.value,
            exception=_error_json(error),
            run_at=now + delay,
        )
    return Outcome(
        id=claim.id,
        attempt=claim.attempt,
        status=TaskStatus.FAILED.value,
        exception=_error_json(error),
    )


def cancelled_outcome(outcome: Outcome) -> Outcome:
    """The outcome of an attempt that was told to stop: cancelled, whether the task then
    ended early, raised, or finished its work anyway (its return value is kept), and never
    retried: whoever cancelled it does not want it run again."""
    if outcome.status == TaskStatus.CANCELLED.value:
        return outcome
    how = "returned" if outcome.status == TaskStatus.COMPLETED.value else "raised"
    if outcome.exception is not None:
        raised = json.loads(outcome.exception)
        how = f"raised {raised.get('type')}: {raised.get('message')}"
    error = TaskCancelled(f"task {outcome.id} was cancelled while it ran; it then {how}")
    return Outcome(
        id=outcome.id,
        attempt=outcome.attempt,
        status=TaskStatus.CANCELLED.value,
        output=outcome.output,
        exception=_error_json(error),
    )


def run_task(
    definition: TaskDefinition,
    claim: Claim,
    *,
    progress: TaskProgress,
    context: Any = None,
    clock: Callable[[], datetime] = utcnow,
) -> Outcome:
    """Run one claimed task in this thread and return its outcome (never raises).

    Rebuilds the input as the task's ``input_model``, calls the function, and stores the
    return value as JSON. Shared by workers and by the inline mode of ``lilota.testing``.
    """
    try:
        value = serialization.build(serialization.loads(claim.input), definition.input_model)
        kwargs = definition.call_arguments(value, progress, context)
        if definition.is_async:
            import asyncio

            result = asyncio.run(definition.func(**kwargs))
        else:
            result = definition.func(**kwargs)
        output = serialization.dumps(result, model=definition.output_model, root="output")
    except TaskCancelled as error:
        return Outcome(
            id=claim.id,
            attempt=claim.attempt,
            status=TaskStatus.CANCELLED.value,
            exception=_error_json(error),
        )
    except (Exception, SystemExit) as error:
        log.info("task %d (%s) attempt %d raised %r", claim.id, claim.name, claim.attempt, error)
        return failure_outcome(claim, definition, error, clock())
    return Outcome(
        id=claim.id, attempt=claim.attempt, status=TaskStatus.COMPLETED.value, output=output
    )


@dataclass
class _Running:
    claim: Claim
    definition: TaskDefinition
    started: float
    cancel_event: threading.Event = field(default_factory=threading.Event)
    cancel_seen_at: float | None = None


class WorkerLoop:
    """The claim -> run -> record loop of one worker process, and its lease keeper."""

    def __init__(
        self,
        store: TaskStore,
        registry: Registry,
        settings: WorkerSettings,
        *,
        worker_id: str | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.worker_id = worker_id or new_worker_id()
        # The main thread runs plain functions; async and cpu_bound tasks are the event
        # loop's (lilota.asyncworker), periodic ticks the tick thread's (lilota.schedules).
        self.names = frozenset(d.name for d in registry if not d.runs_on_loop)
        # Registered attempt limits: a claim raises a task's stored max_attempts to these
        # (a scheduler that did not know the task stored 1), in the claim's transaction.
        self._max_attempts = {
            d.name: d.retry.max_attempts for d in registry if d.name in self.names
        }
        self._async: Any = None
        if any(d.runs_on_loop for d in registry):
            from lilota.asyncworker import AsyncRunner

            self._async = AsyncRunner(self)
        self._ticks: Any = None
        periodic = {d.name: d for d in registry if d.schedule is not None}
        if periodic:
            from lilota.schedules import TickThread

            self._ticks = TickThread(
                store,
                {name: d.schedule for name, d in periodic.items()},
                max_attempts={name: d.retry.max_attempts for name, d in periodic.items()},
            )
        self._stopping = threading.Event()
        self._keeper_stop = threading.Event()
        self._lock = threading.Lock()  # guards the three fields below
        self._unrecorded: list[Outcome] = []
        self._queue: collections.deque[Claim] = collections.deque()
        self._running: _Running | None = None
        self._cancel_requested: set[int] = set()
        self._avg_duration = 1.0  # seconds; starts pessimistic: claim one at a time
        self._listener: Any = None
        self._recover_after = 0.0  # monotonic time: no recovery before (see _database_trouble)

    # --------------------------------------------------------------------- control

    def request_stop(self) -> None:
        """Finish the running task, give back claimed ones, then return from run()."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.wake()
        if self._async is not None:
            self._async.request_stop()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def abandon(self, exit_code: WorkerExit) -> None:
        """Give every held task back, record what is done, and end the process now."""
        with self._lock:
            unrecorded, self._unrecorded = self._unrecorded, []
            queued = list(self._queue)
            self._queue.clear()
            running = self._running
        on_loop: list[Claim] = []
        if self._async is not None:
            loop_outcomes, on_loop = self._async.take_all()
            unrecorded += loop_outcomes
        try:
            self.store.finish(unrecorded)
            self.store.release(queued, refund=True)
            if running is not None:
                self.store.release([running.claim], refund=False)
            self.store.release(on_loop, refund=False)
        except LilotaError as e:
            log.error("could not give back tasks before exiting (their leases will expire): %s", e)
        os._exit(exit_code)

    # --------------------------------------------------------------------- main loop

    def run(self) -> None:
        """Work until request_stop(); returns after recording and giving back everything."""
        keeper = threading.Thread(target=self._keep_leases, name="lilota-lease-keeper", daemon=True)
        keeper.start()
        if self._async is not None:
            self._async.start()
        if self._ticks is not None:
            self._ticks.start()
        self._listener = self.store.listener()
        backoff = 0.1
        try:
            while not self._stopping.is_set():
                if not self.names:  # only async/cpu_bound tasks: nothing for this thread
                    self._stopping.wait(0.5)
                    continue
                with self._lock:
                    finished, self._unrecorded = self._unrecorded, []
                try:
                    claims = self.store.claim(
                        worker_id=self.worker_id,
                        names=self.names,
                        limit=self._batch_size(),
                        lease=self.settings.lease,
                        finished=finished,
                        max_attempts=self._max_attempts,
                    )
                    backoff = 0.1
                except DatabaseError as e:
                    with self._lock:
                        self._unrecorded[:0] = finished
                    log.warning("database unavailable (%s); retrying in %.1f s", e, backoff)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                if claims:
                    self._align_max_attempts(claims)
                    self._run_batch(claims)
                else:
                    self._listener.wait(self._idle_timeout())
        finally:
            self._shutdown(keeper)

    def _align_max_attempts(self, claims: list[Claim]) -> None:
        """A scheduler that did not know the task (script mode) stored max_attempts=1;
        store the registered value so that recovery after a crash retries as promised."""
        raise_to = []
        for claim in claims:
            definition = self.registry.find(claim.name)
            if definition is not None and definition.retry.max_attempts > claim.max_attempts:
                raise_to.append((claim, definition.retry.max_attempts))
        if raise_to:
            try:
                self.store.raise_max_attempts(raise_to)
            except DatabaseError as e:
                log.warning("could not record max_attempts: %s", e)

    def _batch_size(self) -> int:
        return max(1, min(MAX_BATCH, int(BATCH_TARGET_SECONDS / max(self._avg_duration, 1e-6))))

    def _idle_timeout(self) -> float:
        try:
            next_run = self.store.next_run_at(self.names)
        except DatabaseError:
            return 1.0
        if next_run is None:
            return self.settings.idle_poll
        wait = (next_run - self.store.clock()).total_seconds()
        return min(max(wait, 0.001), self.settings.idle_poll)

    def _run_batch(self, claims: list[Claim]) -> None:
        with self._lock:
            self._queue.extend(claims)
        batch_started = time.monotonic()
        while True:
            with self._lock:
                if not self._queue or self._stopping.is_set():
                    break
                claim = self._queue.popleft()
                cancelled = claim.id in self._cancel_requested
            definition = self.registry.find(claim.name)
            if cancelled or definition is None:
                outcome = self._not_run(claim, definition)
            else:
                outcome = self._run_one(claim, definition)
            with self._lock:
                self._unrecorded.append(outcome)
                flush = bool(self._queue) and time.monotonic() - batch_started > FLUSH_AFTER
            if flush:
                with contextlib.suppress(DatabaseError):  # kept; the next claim records them
                    self._flush()
                batch_started = time.monotonic()
        with self._lock:
            left = list(self._queue)
            self._queue.clear()
        if left:  # stopping: give back what was claimed but not started
            try:
                self._flush()
                self.store.release(left, refund=True)
            except DatabaseError as e:  # their leases expire; the outcomes are kept
                log.warning("could not give back %d claimed tasks: %s", len(left), e)

    def _not_run(self, claim: Claim, definition: TaskDefinition | None) -> Outcome:
        if definition is None:  # cannot happen: claims are filtered by name
            error: BaseException = LilotaError(f"no task named {claim.name!r} in this worker")
            return failure_outcome(claim, None, error, self.store.clock())
        return Outcome(
            id=claim.id,
            attempt=claim.attempt,
            status=TaskStatus.CANCELLED.value,
            exception=_error_json(
                TaskCancelled(f"task {claim.id} was cancelled before it started")
            ),
        )

    def _run_one(self, claim: Claim, definition: TaskDefinition) -> Outcome:
        running = _Running(claim=claim, definition=definition, started=time.monotonic())
        with self._lock:
            self._running = running
        progress = TaskProgress(
            claim.id,
            lambda pct: self._write_progress(claim, pct),
            running.cancel_event,
        )
        context = self._context(claim, definition, progress, running)
        log.debug("task %d (%s) attempt %d starts", claim.id, claim.name, claim.attempt)
        outcome = run_task(
            definition, claim, progress=progress, context=context, clock=self.store.clock
        )
        if running.cancel_event.is_set():
            outcome = cancelled_outcome(outcome)
        duration = time.monotonic() - running.started
        self._avg_duration = 0.8 * self._avg_duration + 0.2 * duration
        with self._lock:
            self._running = None
        log.debug("task %d (%s) ends %s in %.3f s", claim.id, claim.name, outcome.status, duration)
        return outcome

    def _context(
        self, claim: Claim, definition: TaskDefinition, progress: TaskProgress, running: _Running
    ) -> Any:
        if definition.context_param is None:
            return None
        from lilota.context import TaskContext

        return TaskContext.for_claim(
            claim, progress=progress, store=self.store, registry=self.registry
        )

    def _write_progress(self, claim: Claim, percentage: int) -> None:
        try:
            recorded = self.store.set_progress(claim.id, claim.attempt, percentage)
        except DatabaseError as e:  # progress is for people watching: never fail the task
            log.warning("task %d: progress %d%% not recorded: %s", claim.id, percentage, e)
            return
        if not recorded:
            log.warning(
                "task %d: progress %d%% not recorded: this attempt no longer holds it",
                claim.id,
                percentage,
            )

    def _flush(self) -> None:
        with self._lock:
            finished, self._unrecorded = self._unrecorded, []
        try:
            self.store.finish(finished)
        except DatabaseError:
            with self._lock:
                self._unrecorded[:0] = finished
            raise

    def _shutdown(self, keeper: threading.Thread) -> None:
        if self._ticks is not None:
            self._ticks.stop()
        if self._async is not None:
            self._stopping.set()
            self._async.request_stop()
            self._async.join()  # its running tasks finish and are recorded
        deadline = time.monotonic() + 60
        while True:
            try:
                self._flush()
                break
            except DatabaseError as e:
                if time.monotonic() > deadline:
                    log.error("could not record %d task outcomes: %s", len(self._unrecorded), e)
                    break
                time.sleep(1.0)
        self._keeper_stop.set()
        keeper.join(timeout=5)
        if self._listener is not None:
            self._listener.close()

    # --------------------------------------------------------------------- keeper

    def _keep_leases(self) -> None:
        """Renew leases, notice cancellations and dead workers, enforce timeouts."""
        tick = 0.1
        lease = self.settings.lease.total_seconds()
        heartbeat = self.settings.heartbeat.total_seconds()
        # Looking for expired leases is one indexed read (a write only when there are
        # some): every lease/6 keeps recovery within 1.2 leases of a worker's death.
        recover_every = max(heartbeat, lease / 6)
        next_renew = 0.0
        next_recover = time.monotonic() + recover_every
        while not self._keeper_stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                busy = self._running is not None or bool(self._queue) or bool(self._unrecorded)
            busy = busy or (self._async is not None and self._async.busy)
            if now >= next_renew:
                interval = heartbeat if busy else max(heartbeat, lease / 3)
                if not self._renew():
                    # Leases run out while the database is away: try again soon.
                    interval = min(interval, RENEW_RETRY)
                next_renew = time.monotonic() + interval
            if now >= next_recover:
                next_recover = now + recover_every
                self._recover()
            self._enforce_limits()

    def _database_trouble(self) -> None:
        # While this process could not reach the database, neither could the others
        # (probably): every lease may have run out without its holder being at fault.
        # Give the holders one lease to renew before taking their tasks away, so that a
        # task that finished during an outage is recorded by its worker, not run again.
        self._recover_after = time.monotonic() + self.settings.lease.total_seconds()

    def _recover(self) -> None:
        if time.monotonic() < self._recover_after:
            return
        try:
            self.store.recover_expired()
        except DatabaseError as e:
            log.warning("could not look for lost tasks: %s", e)
            self._database_trouble()

    def _held_ids(self) -> set[int] | None:
        """Ids of the tasks this process holds: running, claimed, or ended but not yet
        recorded (None if that cannot be known: then every lease of the worker is renewed)."""
        with self._lock:
            held = {c.id for c in self._queue} | {o.id for o in self._unrecorded}
            if self._running is not None:
                held.add(self._running.claim.id)
        if self._async is not None:
            try:
                with self._async._lock:
                    held |= set(self._async._running) | {o.id for o in self._async._unrecorded}
            except AttributeError:
                return None
        return held

    def _renew(self) -> bool:
        """Renew the leases; False if the database could not be reached."""
        with self._lock:
            running = self._running
        held = self._held_ids()
        try:
            report = self.store.renew_leases(self.worker_id, self.settings.lease, task_ids=held)
        except DatabaseError as e:
            log.warning("could not renew leases: %s", e)
            self._database_trouble()
            return False
        if held is not None:
            self._check_still_held(running, held - report.held)
        if report.cancel_requested:
            if self._async is not None:
                self._async.note_cancel_requested(report.cancel_requested)
            with self._lock:
                self._cancel_requested |= report.cancel_requested
                running = self._running
            if (
                running is not None
                and running.claim.id in report.cancel_requested
                and not running.cancel_event.is_set()
            ):
                log.info("task %d: cancellation requested", running.claim.id)
                running.cancel_event.set()
                running.cancel_seen_at = time.monotonic()
        return True

    def _enforce_limits(self) -> None:
        if self._async is not None:
            stuck = self._async.enforce_limits()
            if stuck is not None:
                self._end_process(*stuck)
        with self._lock:
            running = self._running
        if running is None:
            return
        now = time.monotonic()
        timeout = running.definition.timeout
        if timeout is not None and now - running.started > timeout.total_seconds():
            error = TaskTimeout(
                f"task {running.claim.id} ({running.claim.name}) ran longer than its timeout "
                f"of {timeout.total_seconds():g} s"
            )
            log.error("%s; replacing the worker process", error)
            outcome = failure_outcome(running.claim, running.definition, error, self.store.clock())
            self._end_running(running, outcome, WorkerExit.TASK_TIMEOUT)
            return
        grace = self.settings.cancel_grace.total_seconds()
        if running.cancel_seen_at is not None and now - running.cancel_seen_at > grace:
            cancelled = TaskCancelled(
                f"task {running.claim.id} was cancelled and did not stop within {grace:g} s"
            )
            log.error("%s; replacing the worker process", cancelled)
            outcome = Outcome(
                id=running.claim.id,
                attempt=running.claim.attempt,
                status=TaskStatus.CANCELLED.value,
                exception=_error_json(cancelled),
            )
            self._end_running(running, outcome, WorkerExit.CANCEL_FORCED)

    def _check_still_held(self, running: _Running | None, not_renewed: set[int]) -> None:
        """A task this process runs whose lease another worker took over (this process
        stalled, or could not reach the database, for longer than the lease) now runs
        there too: end this process, so that no task runs twice at once for long.

        ``not_renewed``: tasks this process held before the renewal that it no longer
        holds. Those that ended meanwhile were recorded (or will be refused, fenced)."""
        if not not_renewed:
            return
        with self._lock:
            sync_lost = running is not None and self._running is running
            sync_lost = sync_lost and running is not None and running.claim.id in not_renewed
        loop_lost: set[int] = set()
        if self._async is not None:
            loop_lost = not_renewed & set(self._async.running_ids)
        if not sync_lost and not loop_lost:
            return
        log.error(
            "lost the lease of task(s) %s: another worker took them over; replacing this "
            "process so that they do not run twice at once",
            ", ".join(str(i) for i in sorted(not_renewed)),
        )
        if running is not None and sync_lost:
            self._end_running(running, None, WorkerExit.LEASE_LOST)
        else:
            self.abandon(WorkerExit.LEASE_LOST)

    def _end_running(self, running: _Running, outcome: Outcome | None, code: WorkerExit) -> None:
        """End the process for the task the main thread runs, unless it ended meanwhile."""
        with self._lock:
            if self._running is not running:
                return  # it ended by itself (and its outcome is recorded or queued)
            self._running = None
            if outcome is not None:
                self._unrecorded.append(outcome)
        self.abandon(code)

    def _end_process(self, outcome: Outcome, code: WorkerExit) -> None:
        with self._lock:
            self._running = None
            self._unrecorded.append(outcome)
        self.abandon(code)


def new_worker_id() -> str:
    """Unique per process start: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class LilotaWorker:
    """Registers task functions and, with ``start()``, makes this process a worker.

    ``start()`` blocks until SIGTERM or SIGINT (a second one ends the process at once).
    Started by a :class:`~lilota.core.Lilota` with ``script_path``, the worker also ends
    when that process ends, and tells it when it is ready.
    """

    # Every instance made in this process, and whether one was started: script mode starts
    # the script's worker itself if the script only registers tasks.
    instances: ClassVar[weakref.WeakSet[LilotaWorker]] = weakref.WeakSet()
    started_in_this_process: ClassVar[bool] = False

    def __init__(
        self,
        db_url: str | None = None,
        set_progress_manually: bool = False,
        *,
        lease: timedelta | None = None,
        registry: Registry | None = None,
        store: TaskStore | None = None,
        async_concurrency: int | None = None,
        cpu_bound_processes: int | None = None,
        cancel_grace: timedelta | None = None,
    ) -> None:
        if db_url is None:
            db_url = os.environ.get("LILOTA_DB_URL") or "sqlite:///lilota.db"
        self.db_url = db_url
        self.set_progress_manually = set_progress_manually
        self.registry = registry if registry is not None else Registry()
        self._store = store
        self._lease = lease
        self._cancel_grace = cancel_grace
        self._async_concurrency = async_concurrency
        self._cpu_bound_processes = cpu_bound_processes
        parse_url(db_url)  # a malformed URL is an error here, not in the worker loop
        self._loop: WorkerLoop | None = None
        self._signals = 0
        LilotaWorker.instances.add(self)

    def register(
        self, name: str, **options: Any
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering a task function; see :meth:`lilota.core.Lilota.register`."""
        return self.registry.register(name, **options)  # type: ignore[no-any-return]

    @property
    def store(self) -> TaskStore:
        if self._store is None:
            self._store = TaskStore(self.db_url)
        return self._store

    def start(self) -> None:
        """Run tasks in this process until told to stop. Blocks."""
        from lilota.asyncworker import in_pool_process

        if in_pool_process():
            # A cpu_bound pool process imports the worker's script again to find the task
            # functions; it runs them for its worker and must not become a worker itself.
            return
        LilotaWorker.started_in_this_process = True
        control_fd = os.environ.pop(ENV_CONTROL_FD, None)
        lifeline_fd = os.environ.pop(ENV_LIFELINE_FD, None)
        supervised = control_fd is not None
        try:
            settings = WorkerSettings.from_env(
                lease=self._lease,
                cancel_grace=self._cancel_grace,
                async_concurrency=self._async_concurrency,
                cpu_bound_processes=self._cpu_bound_processes,
            )
            store = self.store
            store.ensure_schema()
            loop = WorkerLoop(store, self.registry, settings)
            store.register_worker(loop.worker_id, self.registry.names)
        except Exception as e:
            log.error("worker could not start: %s", e)
            if supervised:
                self._report(control_fd, {"ready": False, "error": f"{type(e).__name__}: {e}"})
                raise SystemExit(WorkerExit.STARTUP_FAILED) from e
            raise
        self._loop = loop
        self._install_signal_handlers(supervised)
        if lifeline_fd is not None:
            threading.Thread(
                target=self._watch_parent,
                args=(int(lifeline_fd),),
                name="lilota-lifeline",
                daemon=True,
            ).start()
        if control_fd is not None:
            self._report(
                control_fd,
                {"ready": True, "pid": os.getpid(), "names": sorted(self.registry.names)},
            )
        log.info(
            "worker %s ready for %s",
            loop.worker_id,
            ", ".join(sorted(self.registry.names)) or "no tasks",
        )
        try:
            loop.run()
        finally:
            with contextlib.suppress(LilotaError):
                store.unregister_worker(loop.worker_id)
            log.info("worker %s stopped", loop.worker_id)

    def stop(self) -> None:
        """Ask a running ``start()`` (e.g. from another thread) to stop after the current task."""
        if self._loop is not None:
            self._loop.request_stop()

    @staticmethod
    def _report(fd: str | None, message: dict[str, Any]) -> None:
        if fd is None:
            return
        try:
            with os.fdopen(int(fd), "w") as pipe:
                pipe.write(json.dumps(message) + "\n")
        except OSError:
            pass

    def _install_signal_handlers(self, supervised: bool) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, self._on_signal)
        if supervised:
            # Ctrl-C in a terminal reaches the whole process group; the supervisor decides.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        loop = self._loop
        if loop is None:
            raise SystemExit(128 + signum)
        if self._signals == 1:
            log.info(
                "received %s: finishing the running task, then stopping",
                signal.Signals(signum).name,
            )
            loop.request_stop()
        else:
            log.warning(
                "received %s again: stopping now; running tasks go back to pending",
                signal.Signals(signum).name,
            )
            loop.abandon(WorkerExit.OK)

    def _watch_parent(self, fd: int) -> None:
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        log.warning("the process that started this worker is gone; stopping now")
        if self._loop is not None:
            self._loop.abandon(WorkerExit.PARENT_DIED)
        os._exit(WorkerExit.PARENT_DIED)


__all__ = ["LilotaWorker", "WorkerExit", "WorkerLoop", "WorkerSettings", "run_task"]
