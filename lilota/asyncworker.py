"""The event loop of a worker process: ``async def`` tasks many at once, and ``cpu_bound``
tasks in a process pool.

A worker process whose registry has async or ``cpu_bound`` tasks runs this next to its
main thread (which keeps running plain functions one at a time). One thread runs an
asyncio event loop that claims such tasks only while it has free slots: up to
``async_concurrency`` coroutines at once (default 10) and ``cpu_bound_processes`` tasks
in a ``ProcessPoolExecutor`` using spawn (default 1). Claims, outcomes and progress go to
the database from helper threads, so the loop never waits for the database, except for
``ctx.schedule()``, a single short insert.

Leases are the worker's: its lease keeper renews every task the worker id holds, this
loop's included, and passes cancellation requests here. Timeouts cancel the coroutine
(``Task.cancel()``) at the deadline; a cancellation request lets the task stop by itself
during the grace period, then cancels it. A ``cpu_bound`` task that overruns or ignores
its cancellation has its pool process killed. A coroutine that blocks the loop cannot be
cancelled: if it has not ended one grace period after its deadline, the lease keeper
replaces the whole process, as it does for a plain function.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from lilota import serialization
from lilota.errors import DatabaseError, LilotaError, TaskCancelled, TaskTimeout, WorkerLost
from lilota.models import TaskProgress, TaskStatus
from lilota.registry import TaskDefinition
from lilota.store import Claim, Outcome, TaskStore
from lilota.worker import (
    WorkerExit,
    _error_json,
    cancelled_outcome,
    failure_outcome,
    run_task,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from lilota.worker import WorkerLoop

log = logging.getLogger(__name__)

T = TypeVar("T")

# Set in a worker process before it starts its process pool: the pid of the worker. A
# pool process (spawned, it imports the worker's main script again) sees it and knows
# it must not become a worker itself: LilotaWorker.start() returns at once there.
ENV_POOL_PARENT = "LILOTA_POOL_PARENT"

# How often the loop looks at its tasks for cancellation deadlines.
WATCH_INTERVAL = 0.1
# How often a cpu_bound task in a pool process looks at the database for a cancellation
# request (when it reads ``cancelled``): one small read a second at most.
POOL_CANCEL_CHECK_INTERVAL = 1.0


def in_pool_process() -> bool:
    """True while a process of a worker's ``cpu_bound`` pool imports the worker's main
    module (multiprocessing's spawn marks that phase with ``_inheriting``)."""
    return os.environ.get(ENV_POOL_PARENT) == str(os.getppid()) and bool(
        getattr(multiprocessing.current_process(), "_inheriting", False)
    )


@dataclass(eq=False)
class _LoopTask:
    claim: Claim
    definition: TaskDefinition
    started: float
    cancel_event: threading.Event
    cancel_seen_at: float | None = None  # when the keeper saw a cancellation request
    forced_at: float | None = None  # when this loop cancelled it after the grace
    timed_out: bool = False
    task: asyncio.Task[None] | None = None
    timer: asyncio.TimerHandle | None = None


class AsyncRunner:
    """Runs the async and ``cpu_bound`` tasks of one worker process on an event loop."""

    def __init__(self, owner: WorkerLoop) -> None:
        self.owner = owner
        self.store = owner.store
        self.settings = owner.settings
        on_loop = [d for d in owner.registry if d.runs_on_loop]
        self.async_names = frozenset(d.name for d in on_loop if not d.cpu_bound)
        self.cpu_names = frozenset(d.name for d in on_loop if d.cpu_bound)
        self._lock = threading.Lock()  # guards _running and _unrecorded
        self._running: dict[int, _LoopTask] = {}
        self._unrecorded: list[Outcome] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._listen_thread: threading.Thread | None = None
        self._listener: Any = None
        self._db = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lilota-loop-db")
        # One thread: the progress of a task is written in the order it was set.
        self._progress = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lilota-progress")
        self._pool: ProcessPoolExecutor | None = None

    # ------------------------------------------------------------------ control (any thread)

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="lilota-event-loop", daemon=True
        )
        self._thread.start()
        ready.wait(10)
        self._listen_thread = threading.Thread(
            target=self._listen, name="lilota-loop-listener", daemon=True
        )
        self._listen_thread.start()

    def poke(self) -> None:
        """Make the loop look at its state again (from any thread)."""
        loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(wakeup.set)

    def request_stop(self) -> None:
        """Stop claiming; running tasks finish, then the loop ends."""
        self.poke()

    def join(self, timeout: float | None = None) -> None:
        """Wait until the running tasks have finished and their outcomes are recorded."""
        if self._thread is not None:
            self._thread.join(timeout)
        self._closed.set()
        if self._listener is not None:
            self._listener.wake()
        if self._listen_thread is not None:
            self._listen_thread.join(timeout=5)

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._running)

    @property
    def running_ids(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._running)

    def take_all(self) -> tuple[list[Outcome], list[Claim]]:
        """For a process about to end: the unrecorded outcomes and the running claims."""
        with self._lock:
            outcomes, self._unrecorded = self._unrecorded, []
            claims = [t.claim for t in self._running.values()]
            self._running.clear()
        return outcomes, claims

    def note_cancel_requested(self, ids: frozenset[int]) -> None:
        """Called by the lease keeper with the ids someone asked to cancel."""
        now = time.monotonic()
        with self._lock:
            tasks = [t for i, t in self._running.items() if i in ids]
        for task in tasks:
            if not task.cancel_event.is_set():
                log.info("task %d: cancellation requested", task.claim.id)
                task.cancel_seen_at = now
                task.cancel_event.set()

    def enforce_limits(self) -> tuple[Outcome, WorkerExit] | None:
        """Called by the lease keeper: a task the loop could not end (it blocks the loop,
        or ignores being cancelled) one grace period past its deadline means the
        process must be replaced. Returns that task's outcome and the exit code."""
        grace = self.settings.cancel_grace.total_seconds()
        now = time.monotonic()
        with self._lock:
            tasks = list(self._running.values())
        for task in tasks:
            timeout = task.definition.timeout
            if timeout is not None and now - task.started > timeout.total_seconds() + grace:
                error: LilotaError = TaskTimeout(
                    f"task {task.claim.id} ({task.claim.name}) ran longer than its timeout "
                    f"of {timeout.total_seconds():g} s and did not end when cancelled"
                )
                log.error("%s; replacing the worker process", error)
                self._forget(task)
                return (
                    failure_outcome(task.claim, task.definition, error, self.store.clock()),
                    WorkerExit.TASK_TIMEOUT,
                )
            seen = task.cancel_seen_at
            if seen is not None and now - seen > 2 * grace:
                error = TaskCancelled(
                    f"task {task.claim.id} was cancelled and did not stop within {2 * grace:g} s"
                )
                log.error("%s; replacing the worker process", error)
                self._forget(task)
                return _cancelled(task.claim, error), WorkerExit.CANCEL_FORCED
        return None

    def _forget(self, task: _LoopTask) -> None:
        with self._lock:
            self._running.pop(task.claim.id, None)

    # ------------------------------------------------------------------ the loop thread

    def _thread_main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        crashed = False
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException:
            crashed = True
            log.exception("the event loop of this worker failed; the worker stops")
        finally:
            ready.set()
            self._final_flush(crashed)
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._db.shutdown(wait=True)
            self._progress.shutdown(wait=True)
            if self._pool is not None:  # idle now: its processes exit at once
                self._pool.shutdown(wait=True, cancel_futures=True)
            if crashed:
                self.owner.request_stop()

    async def _serve(self, ready: threading.Event) -> None:
        self._wakeup = asyncio.Event()
        ready.set()
        watcher = asyncio.ensure_future(self._watch())
        limit_async = self.settings.async_concurrency if self.async_names else 0
        limit_cpu = self.settings.cpu_bound_processes if self.cpu_names else 0
        backoff = 0.1
        try:
            while True:
                self._wakeup.clear()
                stopping = self.owner.stopping
                with self._lock:
                    finished, self._unrecorded = self._unrecorded, []
                    busy_cpu = sum(1 for t in self._running.values() if t.definition.cpu_bound)
                    busy_async = len(self._running) - busy_cpu
                if stopping and busy_async + busy_cpu == 0 and not finished:
                    return
                want_async = 0 if stopping else limit_async - busy_async
                want_cpu = 0 if stopping else limit_cpu - busy_cpu
                claims: list[Claim] = []
                if want_async > 0 or want_cpu > 0 or finished:
                    try:
                        claims = await self._in_db(self._claim, finished, want_async, want_cpu)
                        backoff = 0.1
                    except DatabaseError as e:
                        with self._lock:
                            self._unrecorded[:0] = finished
                        if stopping and busy_async + busy_cpu == 0 and backoff >= 5.0:
                            return  # _final_flush tries a last time
                        log.warning("database unavailable (%s); retrying in %.1f s", e, backoff)
                        await self._wait(backoff)
                        backoff = min(backoff * 2, 5.0)
                        continue
                for claim in claims:
                    self._start(claim)
                if stopping:
                    await self._wait(None)  # until a task ends
                    continue
                names: set[str] = set()
                got_cpu = sum(1 for c in claims if c.name in self.cpu_names)
                if want_async > len(claims) - got_cpu:
                    names |= self.async_names
                if want_cpu > got_cpu:
                    names |= self.cpu_names
                if not names:
                    await self._wait(None)  # every slot is taken: until a task ends
                else:
                    await self._wait(await self._idle_timeout(names))
        finally:
            watcher.cancel()

    async def _wait(self, timeout: float | None) -> None:
        assert self._wakeup is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _in_db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    async def _idle_timeout(self, names: set[str]) -> float:
        try:
            next_run = await self._in_db(self.store.next_run_at, names)
        except DatabaseError:
            return 1.0
        if next_run is None:
            return self.settings.idle_poll
        wait = (next_run - self.store.clock()).total_seconds()
        return min(max(wait, 0.001), self.settings.idle_poll)

    def _claim(self, finished: list[Outcome], want_async: int, want_cpu: int) -> list[Claim]:
        """In a helper thread: record ``finished`` and claim as many tasks as slots are free."""
        owner = self.owner
        claims: list[Claim] = []
        if want_async > 0 or finished:
            claims = self.store.claim(
                worker_id=owner.worker_id,
                names=self.async_names,
                limit=max(want_async, 0),
                lease=self.settings.lease,
                finished=finished,
            )
            finished = []
        if want_cpu > 0:
            try:
                claims += self.store.claim(
                    worker_id=owner.worker_id,
                    names=self.cpu_names,
                    limit=want_cpu,
                    lease=self.settings.lease,
                    finished=finished,
                )
            except DatabaseError:
                if not claims and finished:
                    raise
                log.warning("could not claim cpu_bound tasks now", exc_info=True)
        if claims:
            owner._align_max_attempts(claims)
        return claims

    def _start(self, claim: Claim) -> None:
        definition = self.owner.registry.find(claim.name)
        with self.owner._lock:
            cancelled = claim.id in self.owner._cancel_requested
        if definition is None or cancelled:
            outcome = self.owner._not_run(claim, definition)
            with self._lock:
                self._unrecorded.append(outcome)
            self.poke()
            return
        task = _LoopTask(
            claim=claim,
            definition=definition,
            started=time.monotonic(),
            cancel_event=threading.Event(),
        )
        with self._lock:
            self._running[claim.id] = task
        loop = asyncio.get_running_loop()
        if definition.timeout is not None:
            task.timer = loop.call_later(definition.timeout.total_seconds(), self._time_out, task)
        task.task = loop.create_task(self._execute(task))
        log.debug("task %d (%s) attempt %d starts", claim.id, claim.name, claim.attempt)

    async def _watch(self) -> None:
        """Cancel the tasks that did not stop within the grace after a cancellation request."""
        grace = self.settings.cancel_grace.total_seconds()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            with self._lock:
                tasks = list(self._running.values())
            for task in tasks:
                seen = task.cancel_seen_at
                if seen is not None and task.forced_at is None and now - seen > grace:
                    log.warning(
                        "task %d did not stop within %g s of its cancellation; cancelling it",
                        task.claim.id,
                        grace,
                    )
                    task.forced_at = now
                    self._interrupt(task)

    def _time_out(self, task: _LoopTask) -> None:
        log.warning(
            "task %d (%s) reached its timeout; cancelling it", task.claim.id, task.claim.name
        )
        task.timed_out = True
        self._interrupt(task)

    def _interrupt(self, task: _LoopTask) -> None:
        if task.definition.cpu_bound:
            self._kill_pool()
        elif task.task is not None:
            task.task.cancel()

    def _kill_pool(self) -> None:
        """End the pool's processes (the only way to stop a function running in one); the
        tasks they ran end with BrokenProcessPool, and the next cpu_bound task gets a new
        pool. Python < 3.14 has no public API for it, hence ``_processes``."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = dict(getattr(pool, "_processes", None) or {})
        for process in processes.values():
            with contextlib.suppress(Exception):
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)

    async def _execute(self, task: _LoopTask) -> None:
        claim, definition = task.claim, task.definition
        try:
            if definition.cpu_bound:
                outcome = await self._run_in_pool(task)
            else:
                outcome = await self._run_coroutine(task)
        except asyncio.CancelledError as error:
            outcome = failure_outcome(claim, definition, error, self.store.clock())
        except BrokenProcessPool:
            lost = WorkerLost(f"task {claim.id}: the pool process running it ended")
            outcome = failure_outcome(claim, definition, lost, self.store.clock())
        if task.timed_out:
            timeout = definition.timeout.total_seconds() if definition.timeout else 0.0
            overran = TaskTimeout(
                f"task {claim.id} ({claim.name}) ran longer than its timeout of {timeout:g} s"
            )
            outcome = failure_outcome(claim, definition, overran, self.store.clock())
        elif task.forced_at is not None:
            grace = self.settings.cancel_grace.total_seconds()
            outcome = _cancelled(
                claim,
                TaskCancelled(f"task {claim.id} was cancelled and did not stop within {grace:g} s"),
            )
        if task.cancel_event.is_set():  # told to stop: cancelled, never retried
            outcome = cancelled_outcome(outcome)
        if task.timer is not None:
            task.timer.cancel()
        with self._lock:
            known = self._running.pop(claim.id, None) is not None
            if known:  # else the keeper already recorded it and is replacing the process
                self._unrecorded.append(outcome)
        log.debug(
            "task %d (%s) ends %s in %.3f s",
            claim.id,
            claim.name,
            outcome.status,
            time.monotonic() - task.started,
        )
        assert self._wakeup is not None
        self._wakeup.set()

    async def _run_coroutine(self, task: _LoopTask) -> Outcome:
        claim, definition = task.claim, task.definition
        progress = TaskProgress(
            claim.id, lambda pct: self._write_progress(claim, pct), task.cancel_event
        )
        context = None
        if definition.context_param is not None:
            from lilota.context import TaskContext

            context = TaskContext.for_claim(
                claim, progress=progress, store=self.store, registry=self.owner.registry
            )
        try:
            value = serialization.build(serialization.loads(claim.input), definition.input_model)
            kwargs = definition.call_arguments(value, progress, context)
            result = await definition.func(**kwargs)
            output = serialization.dumps(result, model=definition.output_model, root="output")
        except TaskCancelled as error:
            return _cancelled(claim, error)
        except (Exception, SystemExit) as error:
            log.info(
                "task %d (%s) attempt %d raised %r", claim.id, claim.name, claim.attempt, error
            )
            return failure_outcome(claim, definition, error, self.store.clock())
        return Outcome(
            id=claim.id, attempt=claim.attempt, status=TaskStatus.COMPLETED.value, output=output
        )

    async def _run_in_pool(self, task: _LoopTask) -> Outcome:
        if self._pool is None:
            os.environ[ENV_POOL_PARENT] = str(os.getpid())
            self._pool = ProcessPoolExecutor(
                max_workers=self.settings.cpu_bound_processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_watch_worker,
            )
        url = self.store.url.render_as_string(hide_password=False)
        future = self._pool.submit(_call_in_pool, url, task.definition, task.claim)
        return await asyncio.wrap_future(future)

    def _write_progress(self, claim: Claim, percentage: int) -> None:
        self._progress.submit(self.owner._write_progress, claim, percentage)

    def _final_flush(self, crashed: bool) -> None:
        """Record what is left; after a crash, give back the tasks that were running."""
        outcomes, claims = self.take_all() if crashed else (self._take_unrecorded(), [])
        deadline = time.monotonic() + 60
        while outcomes or claims:
            try:
                self.store.finish(outcomes)
                outcomes = []
                self.store.release(claims, refund=False)
                claims = []
            except DatabaseError as e:
                if time.monotonic() > deadline:
                    log.error("could not record %d task outcomes: %s", len(outcomes), e)
                    return
                time.sleep(1.0)

    def _take_unrecorded(self) -> list[Outcome]:
        with self._lock:
            outcomes, self._unrecorded = self._unrecorded, []
        return outcomes

    # ------------------------------------------------------------------ wake-ups

    def _listen(self) -> None:
        """Pokes the loop whenever the database says tasks may have arrived."""
        try:
            self._listener = self.store.listener()
        except LilotaError as e:
            log.warning("no wake-ups from the database (%s); polling", e)
            return
        try:
            while not self._closed.is_set():
                if self._listener.wait(self.settings.idle_poll) and not self._closed.is_set():
                    self.poke()
        finally:
            self._listener.close()


def _cancelled(claim: Claim, error: BaseException) -> Outcome:
    return Outcome(
        id=claim.id,
        attempt=claim.attempt,
        status=TaskStatus.CANCELLED.value,
        exception=_error_json(error),
    )


# ---------------------------------------------------------------------- in a pool process

_pool_store: TaskStore | None = None


def _watch_worker() -> None:
    """Pool process initializer: end this process when its worker process ends, however
    it ends (a pool process otherwise waits forever for work from a parent that is gone,
    e.g. after the worker was killed or replaced)."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="lilota-watch-worker", daemon=True).start()


class _CancelFlag(threading.Event):
    """``is_set()`` asks the database (at most once a second) whether the task running in
    this pool process was asked to cancel."""

    def __init__(self, store: TaskStore, task_id: int) -> None:
        super().__init__()
        self._store = store
        self._task_id = task_id
        self._checked = 0.0

    def is_set(self) -> bool:
        if super().is_set():
            return True
        now = time.monotonic()
        if now - self._checked >= POOL_CANCEL_CHECK_INTERVAL:
            self._checked = now
            try:
                task = self._store.get(self._task_id)
            except DatabaseError:
                return False
            if task is not None and task.cancel_requested:
                self.set()
                return True
        return False


def _call_in_pool(db_url: str, definition: TaskDefinition, claim: Claim) -> Outcome:
    """Runs one cpu_bound task in a pool process (sync or async); returns its outcome."""
    global _pool_store
    if _pool_store is None or _pool_store.url.render_as_string(hide_password=False) != db_url:
        _pool_store = TaskStore(db_url)
    store = _pool_store

    def write(percentage: int) -> None:
        if not store.set_progress(claim.id, claim.attempt, percentage):
            log.warning("task %d: progress %d%% not recorded", claim.id, percentage)

    progress = TaskProgress(claim.id, write, _CancelFlag(store, claim.id))
    context = None
    if definition.context_param is not None:
        from lilota.context import TaskContext

        context = TaskContext.for_claim(claim, progress=progress, store=store)
    return run_task(definition, claim, progress=progress, context=context, clock=store.clock)


__all__ = ["ENV_POOL_PARENT", "AsyncRunner", "in_pool_process"]
