"""The async lane of a worker process: ``async def`` tasks many at once on an event loop,
and ``cpu_bound`` tasks in a process pool.

A worker process whose registry has async or ``cpu_bound`` tasks runs this next to its
sync lane (the main thread, which runs plain functions one at a time). One thread runs an
asyncio event loop that claims such tasks only while it has free slots: up to
``async_concurrency`` coroutines at once (default 10) and ``cpu_bound_processes`` tasks
in a ``ProcessPoolExecutor`` using spawn (default 1). Claims, outcomes and progress go to
the database from helper threads, so the loop never waits for the database, except for
``ctx.schedule()``, a single short insert.

What the lane holds is in the worker's :class:`~lilota.ledger.Ledger` (lane "async"),
whose lease keeper renews it and passes cancellation requests on. Timeouts cancel the
coroutine (``Task.cancel()``) at the deadline; a cancellation request lets the task stop
by itself during the grace period, then cancels it. A ``cpu_bound`` task that overruns or
ignores its cancellation has its pool process killed. A coroutine that blocks the loop
cannot be cancelled: one grace period past its deadline the keeper replaces the process.
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
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, TypeVar

from lilota import execution
from lilota.errors import DatabaseError, LilotaError, WorkerLost
from lilota.ledger import idle_wait
from lilota.logs import setup_worker_logging
from lilota.store import TaskStore

if TYPE_CHECKING:
    from lilota.ledger import Ledger, Running
    from lilota.listeners import Listener
    from lilota.models import Claim, Outcome
    from lilota.registry import Registry, TaskDefinition
    from lilota.settings import WorkerSettings

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


class AsyncLane:
    """Runs the async and ``cpu_bound`` tasks of one worker process on an event loop."""

    def __init__(
        self,
        store: TaskStore,
        registry: Registry,
        ledger: Ledger,
        settings: WorkerSettings,
        *,
        worker_id: str,
        stopping: threading.Event,
        on_crash: Callable[[], None],
    ) -> None:
        self.store = store
        self.registry = registry
        self.ledger = ledger
        self.settings = settings
        self.worker_id = worker_id
        self._stopping = stopping
        self._on_crash = on_crash
        on_loop = [d for d in registry if d.runs_on_loop]
        self.async_names = frozenset(d.name for d in on_loop if not d.cpu_bound)
        self.cpu_names = frozenset(d.name for d in on_loop if d.cpu_bound)
        self._floors = registry.floors(d.name for d in on_loop)
        self._tasks: dict[int, asyncio.Task[None]] = {}  # loop thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._listen_thread: threading.Thread | None = None
        self._listener: Listener | None = None
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
        """Make the loop look at its state again (from any thread): after a stop request,
        a cancellation request, or a wake-up from the database."""
        loop, wakeup = self._loop, self._wakeup
        if loop is not None and wakeup is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(wakeup.set)

    def join(self, timeout: float | None = None) -> None:
        """Wait until the running tasks have finished and their outcomes are recorded."""
        if self._thread is not None:
            self._thread.join(timeout)
        self._closed.set()
        if self._listener is not None:
            self._listener.wake()
        if self._listen_thread is not None:
            self._listen_thread.join(timeout=5)

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
                self._on_crash()

    def _slots(self) -> tuple[int, int]:
        """Free (async, cpu_bound) slots."""
        running = self.ledger.running("async")
        busy_cpu = sum(1 for r in running if r.definition.cpu_bound)
        limit_async = self.settings.async_concurrency if self.async_names else 0
        limit_cpu = self.settings.cpu_bound_processes if self.cpu_names else 0
        return limit_async - (len(running) - busy_cpu), limit_cpu - busy_cpu

    async def _serve(self, ready: threading.Event) -> None:
        self._wakeup = asyncio.Event()
        ready.set()
        watcher = asyncio.ensure_future(self._watch())
        backoff = 0.1
        try:
            while True:
                self._wakeup.clear()
                stopping = self._stopping.is_set()
                finished = self.ledger.take_unrecorded()
                idle = not self._tasks
                if stopping and idle and not finished:
                    return
                want_async, want_cpu = (0, 0) if stopping else self._slots()
                if want_async <= 0 and want_cpu <= 0 and not finished:
                    await self._wait(None)  # every slot is taken: until a task ends
                    continue
                try:
                    claims = await self._in_db(self._claim, finished, want_async, want_cpu)
                    backoff = 0.1
                except DatabaseError as e:
                    self.ledger.put_back(finished)
                    if stopping and idle and backoff >= 5.0:
                        return  # _final_flush tries a last time
                    log.warning("database unavailable (%s); retrying in %.1f s", e, backoff)
                    await self._wait(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                for claim in claims:
                    self._start(claim)
                await self._wait(await self._idle_timeout(stopping, claims, want_async, want_cpu))
        finally:
            watcher.cancel()

    async def _wait(self, timeout: float | None) -> None:
        assert self._wakeup is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _in_db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db, fn, *args)

    async def _idle_timeout(
        self, stopping: bool, claims: list[Claim], want_async: int, want_cpu: int
    ) -> float | None:
        """How long to wait for a wake-up: None (until a task ends) when stopping or when
        every slot is taken; else until the next due task, at most ``idle_poll``."""
        if stopping:  # until a task ends; at once when none runs (to end the loop)
            return None if self._tasks else 0.0
        names: set[str] = set()
        got_cpu = sum(1 for c in claims if c.name in self.cpu_names)
        if want_async > len(claims) - got_cpu:
            names |= self.async_names
        if want_cpu > got_cpu:
            names |= self.cpu_names
        if not names:
            return None
        return await self._in_db(idle_wait, self.store, names, self.settings.idle_poll)

    def _claim(self, finished: list[Outcome], want_async: int, want_cpu: int) -> list[Claim]:
        """In a helper thread: record ``finished`` and claim as many tasks as slots are free."""
        claims: list[Claim] = []
        if want_async > 0 or finished:
            claims = self._claim_names(self.async_names, max(want_async, 0), finished)
            finished = []
        if want_cpu > 0:
            try:
                claims += self._claim_names(self.cpu_names, want_cpu, finished)
            except DatabaseError:
                if not claims and finished:
                    raise
                log.warning("could not claim cpu_bound tasks now", exc_info=True)
        return claims

    def _claim_names(
        self, names: frozenset[str], limit: int, finished: list[Outcome]
    ) -> list[Claim]:
        return self.store.claim(
            worker_id=self.worker_id,
            names=names,
            limit=limit,
            lease=self.settings.lease,
            finished=finished,
            max_attempts=self._floors,
        )

    def _start(self, claim: Claim) -> None:
        definition = self.registry.get(claim.name)  # claims are filtered by name
        running = self.ledger.start(claim, definition, "async")
        if running is None:  # cancelled before it started
            self.ledger.record(execution.cancelled_before_start(claim))
            self.poke()
            return
        loop = asyncio.get_running_loop()
        self._tasks[claim.id] = task = loop.create_task(self._execute(running))
        if running.definition.timeout is not None:
            timer = loop.call_later(
                running.definition.timeout.total_seconds(), self._time_out, running
            )
            task.add_done_callback(lambda _: timer.cancel())

    async def _watch(self) -> None:
        """Cancel the tasks that did not stop within the grace after a cancellation request."""
        grace = self.settings.cancel_grace.total_seconds()
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            for running in self.ledger.running("async"):
                seen = running.cancel_seen_at
                if seen is not None and running.forced_at is None and now - seen > grace:
                    log.warning(
                        "task %d did not stop within %g s of its cancellation; cancelling it",
                        running.claim.id,
                        grace,
                    )
                    running.forced_at = now
                    self._interrupt(running)

    def _time_out(self, running: Running) -> None:
        claim = running.claim
        log.warning("task %d (%s) reached its timeout; cancelling it", claim.id, claim.name)
        running.timed_out = True
        self._interrupt(running)

    def _interrupt(self, running: Running) -> None:
        if running.definition.cpu_bound:
            self._kill_pool()
        elif (task := self._tasks.get(running.claim.id)) is not None:
            task.cancel()

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

    async def _execute(self, running: Running) -> None:
        claim, definition = running.claim, running.definition
        now = self.store.clock
        running.attempt = attempt = execution.begin(
            claim, definition, worker_id=self.worker_id, hooks=self.registry.hooks
        )
        try:
            if definition.cpu_bound:
                outcome = await self._run_in_pool(running)
            else:
                call = execution.prepare(
                    claim,
                    definition,
                    store=self.store,
                    registry=self.registry,
                    write_progress=lambda pct: self._write_progress(claim, pct),
                    cancel_event=running.cancel_event,
                    attempt=attempt,
                )
                outcome = await execution.execute_async(call)
        except asyncio.CancelledError as error:
            outcome = execution.failed(claim, definition, error, now())
        except BrokenProcessPool:
            lost = WorkerLost(f"task {claim.id}: the pool process running it ended")
            outcome = execution.failed(claim, definition, lost, now())
        except Exception as error:  # e.g. a cpu_bound task that cannot be pickled
            attempt.exception = error
            outcome = execution.failed(claim, definition, error, now())
        if running.timed_out:
            outcome = execution.timed_out(claim, definition, now())
        elif running.forced_at is not None:
            outcome = execution.did_not_stop(claim, self.settings.cancel_grace)
        if running.cancel_event.is_set():  # told to stop: cancelled, never retried
            outcome = execution.cancelled_while_running(outcome)
        self._tasks.pop(claim.id, None)
        if self.ledger.end(running, outcome):  # else the keeper ended it, and the process
            execution.end(attempt, outcome, now())
        assert self._wakeup is not None
        self._wakeup.set()

    async def _run_in_pool(self, running: Running) -> Outcome:
        if self._pool is None:
            os.environ[ENV_POOL_PARENT] = str(os.getpid())
            self._pool = ProcessPoolExecutor(
                max_workers=self.settings.cpu_bound_processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_pool_process_init,
                initargs=(logging.getLogger("lilota").level,),
            )
        url = self.store.url.render_as_string(hide_password=False)
        future = self._pool.submit(_call_in_pool, url, running.definition, running.claim)
        return await asyncio.wrap_future(future)

    def _write_progress(self, claim: Claim, percentage: int) -> None:
        self._progress.submit(execution.progress_writer(self.store, claim), percentage)

    def _final_flush(self, crashed: bool) -> None:
        """Record what is left; after a crash, give back the tasks that were running."""
        outcomes = self.ledger.take_unrecorded()
        claims: list[Claim] = []
        for running in self.ledger.running("async") if crashed else []:
            if self.ledger.end(running, None):
                claims.append(running.claim)
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


# ---------------------------------------------------------------------- in a pool process

_pool_store: TaskStore | None = None


def _pool_process_init(log_level: int) -> None:
    """Pool process initializer: the worker's default logging (as in the worker process:
    :func:`lilota.logs.setup_worker_logging`, at the worker's level), then
    :func:`_watch_worker`. ``worker_init`` hooks run in the worker process only."""
    if log_level != logging.NOTSET:
        logging.getLogger("lilota").setLevel(log_level)
    setup_worker_logging()
    _watch_worker()


def _watch_worker() -> None:
    """End this pool process when its worker process ends, however it ends (a pool
    process otherwise waits forever for work from a parent that is gone, e.g. after the
    worker was killed or replaced)."""
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
    call = execution.prepare(
        claim, definition, store=store, cancel_event=_CancelFlag(store, claim.id)
    )
    return execution.execute(call)


__all__ = ["ENV_POOL_PARENT", "AsyncLane", "in_pool_process"]
