"""LilotaWorker, and the worker loop: a worker process made of parts.

A worker process holds its tasks in one :class:`~lilota.ledger.Ledger`. Its parts use the
ledger and never each other's insides:

- the **sync lane** (this module's :class:`WorkerLoop`, in the main thread): claim
  runnable plain-function tasks, run them one after the other through
  :mod:`lilota.execution`, record their outcomes, and wait for a wake-up when there is
  nothing to do. :meth:`WorkerLoop.run_once` is one such step; the loop, ``lilota worker
  --burst``, ``lilota.testing``'s inline mode and the tests all call it;
- the **async lane** (:mod:`lilota.asynclane`): ``async def`` and ``cpu_bound`` tasks on
  an event loop thread;
- the **lease keeper** (:class:`~lilota.ledger.LeaseKeeper`): renews what the ledger
  holds, takes back tasks of dead workers, passes cancellations on, and ends the process
  for a task that overruns its timeout or ignores a cancellation;
- the **tick thread** (:mod:`lilota.schedules`) of periodic tasks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable
from datetime import timedelta
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar

from lilota import execution, metrics
from lilota.errors import DatabaseError, LilotaError, WorkerAlreadyStarted, WorkerExit
from lilota.hooks import HookDecorators
from lilota.ledger import LeaseKeeper, Ledger, idle_wait
from lilota.logs import flush_worker_log, init_worker_process
from lilota.models import Claim, Outcome
from lilota.registry import Registry
from lilota.settings import WorkerSettings, check_overrides, default_db_url, set_logging_level
from lilota.store import TaskStore, parse_url

if TYPE_CHECKING:
    from lilota.asynclane import AsyncLane
    from lilota.listeners import Listener
    from lilota.schedules import TickThread

log = logging.getLogger(__name__)

# Environment of a worker process started by a supervisor.
ENV_CONTROL_FD = "LILOTA_CONTROL_FD"  # write end of a pipe: one JSON line "ready"
ENV_LIFELINE_FD = "LILOTA_LIFELINE_FD"  # read end of a pipe the parent never writes to
# "1": start() drains what is due, then returns (`lilota worker --burst SCRIPT` sets it).
ENV_BURST = "LILOTA_BURST"

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

# While the database cannot be reached the loop waits this long, doubling up to the
# maximum: short enough to notice a restart within seconds, long enough not to spin.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0


class WorkerLoop:
    """One worker process: its ledger, its lanes, its lease keeper, its tick thread.

    ``run()`` works until :meth:`request_stop`; :meth:`run_once` is one claim -> run ->
    record step of the sync lane (for bursts, inline runs and tests).
    """

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
        self.ledger = Ledger()
        # The sync lane runs plain functions; async and cpu_bound tasks are the async
        # lane's, periodic ticks the tick thread's (lilota.schedules).
        self.names = frozenset(d.name for d in registry if not d.runs_on_loop)
        self._floors = registry.floors()
        self._stopping = threading.Event()
        self._avg_duration = 1.0  # seconds; starts pessimistic: claim one at a time
        self._listener: Listener | None = None
        self.keeper = LeaseKeeper(
            store,
            self.ledger,
            worker_id=self.worker_id,
            lease=settings.lease,
            heartbeat=settings.heartbeat,
            cancel_grace=settings.cancel_grace,
            end_process=self.abandon,
            on_cancel=self._poke_async,
        )
        self.async_lane: AsyncLane | None = None
        if any(d.runs_on_loop for d in registry):
            from lilota.asynclane import AsyncLane

            self.async_lane = AsyncLane(
                store,
                registry,
                self.ledger,
                settings,
                worker_id=self.worker_id,
                stopping=self._stopping,
                on_crash=self.request_stop,
            )
        self._ticks: TickThread | None = None
        periodic = {d.name: d for d in registry if d.schedule is not None}
        if periodic:
            from lilota.schedules import TickThread

            self._ticks = TickThread(
                store,
                {name: d.schedule for name, d in periodic.items()},
                max_attempts=registry.floors(periodic),
            )

    # --------------------------------------------------------------------- control

    def request_stop(self) -> None:
        """Finish the running tasks, give back claimed ones, then return from run()."""
        self._stopping.set()
        if self._listener is not None:
            self._listener.wake()
        self._poke_async()

    def _poke_async(self) -> None:
        if self.async_lane is not None:
            self.async_lane.poke()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def abandon(self, exit_code: WorkerExit) -> None:
        """Give every held task back, record what is done, and end the process now."""
        flush_worker_log()  # os._exit skips logging's shutdown (WARNING and up are written)
        unrecorded, queued, running = self.ledger.take_all()
        if exit_code == WorkerExit.DATABASE_REPLACED:  # their rows went with the old file
            os._exit(exit_code)
        try:
            self.store.finish(unrecorded)
            self.store.release(queued, refund=True)
            self.store.release(running, refund=False)
        except LilotaError as e:
            log.error("could not give back tasks before exiting (their leases will expire): %s", e)
        os._exit(exit_code)

    # --------------------------------------------------------------------- main loop

    def run(self) -> None:
        """Work until request_stop(); returns after recording and giving back everything."""
        self.keeper.start()
        if self.async_lane is not None:
            self.async_lane.start()
        if self._ticks is not None:
            self._ticks.start()
        self._listener = self.store.listener()
        backoff = BACKOFF_FIRST
        try:
            while not self._stopping.is_set():
                if not self.names:  # only async/cpu_bound tasks: nothing for this thread
                    self._stopping.wait(0.5)
                    continue
                try:
                    ran = self.run_once(record=False)
                    backoff = BACKOFF_FIRST
                except DatabaseError as e:
                    log.warning("database unavailable (%s); retrying in %.1f s", e, backoff)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                if not ran:
                    self._listener.wait(idle_wait(self.store, self.names, self.settings.idle_poll))
        finally:
            self._shutdown()

    def run_once(
        self,
        *,
        limit: int | None = None,
        names: Iterable[str] | None = None,
        record: bool = True,
        adjust: Callable[[Outcome], Outcome] | None = None,
    ) -> list[Outcome]:
        """One step of the sync lane: record what ended, claim up to ``limit`` due tasks
        (default: by the recent average duration) of ``names`` (default: the plain
        functions registered; ``async def`` tasks named here run in ``asyncio.run``),
        run them in this thread, and return their outcomes ([] when nothing was due).

        With ``record`` the outcomes are recorded before it returns (else the next
        claim records them); ``adjust`` may change each outcome before that. Raises
        :class:`~lilota.errors.DatabaseError` if the claim fails (nothing is lost); an
        exception that escapes a task (``KeyboardInterrupt``) is raised after the task
        is recorded as failed and the claims not started are given back.
        """
        finished = self.ledger.take_unrecorded()
        try:
            claims = self.store.claim(
                worker_id=self.worker_id,
                names=self.names if names is None else names,
                limit=limit if limit is not None else self._batch_size(),
                lease=self.settings.lease,
                finished=finished,
                max_attempts=self._floors,
            )
        except DatabaseError:
            self.ledger.put_back(finished)
            raise
        try:
            outcomes = self._run_claims(claims, adjust)
        except BaseException:
            if record:
                with contextlib.suppress(DatabaseError):
                    self.flush()
            raise
        if record and outcomes:
            self.flush()
        return outcomes

    def drain(self) -> int:
        """Run every due task this worker knows (all lanes' names, in this thread) until
        none is due, with leases kept; returns how many ran (``lilota worker --burst``)."""
        names = self.registry.names
        self.keeper.start()
        ran, backoff = 0, BACKOFF_FIRST
        try:
            while not self._stopping.is_set():
                try:
                    outcomes = self.run_once(names=names)
                except DatabaseError as e:  # the outcomes are kept: try again
                    log.warning("database unavailable (%s); retrying in %.1f s", e, backoff)
                    self._stopping.wait(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                    continue
                if not outcomes:
                    break
                ran, backoff = ran + len(outcomes), BACKOFF_FIRST
        finally:
            self._record_the_rest()
            self.keeper.stop()
        return ran

    def _batch_size(self) -> int:
        return max(1, min(MAX_BATCH, int(BATCH_TARGET_SECONDS / max(self._avg_duration, 1e-6))))

    def _run_claims(
        self, claims: list[Claim], adjust: Callable[[Outcome], Outcome] | None
    ) -> list[Outcome]:
        """Run ``claims`` one after the other; give back those not started when stopping."""
        self.ledger.queue(claims)
        outcomes: list[Outcome] = []
        batch_started = time.monotonic()
        try:
            while not self._stopping.is_set() and (claim := self.ledger.next_queued()):
                outcome = self._run_one(claim, adjust)
                if outcome is not None:
                    outcomes.append(outcome)
                # The last outcome of a batch is recorded by the next claim, in its commit.
                if self.ledger.has_queued() and time.monotonic() - batch_started > FLUSH_AFTER:
                    with contextlib.suppress(DatabaseError):  # kept; the next claim records them
                        self.flush()
                    batch_started = time.monotonic()
        finally:
            self._give_back(self.ledger.take_queued())
        return outcomes

    def _give_back(self, left: list[Claim]) -> None:
        """Stopping: give back what was claimed but not started."""
        if not left:
            return
        try:
            self.flush()
            self.store.release(left, refund=True)
        except DatabaseError as e:  # their leases expire; the outcomes are kept
            log.warning("could not give back %d claimed tasks: %s", len(left), e)

    def _run_one(
        self, claim: Claim, adjust: Callable[[Outcome], Outcome] | None = None
    ) -> Outcome | None:
        """Run ``claim`` and put its outcome in the ledger; None if the keeper ended it
        meanwhile (it is then ending the process)."""
        definition = self.registry.get(claim.name)  # claims are filtered by name
        running = self.ledger.start(claim, definition, "sync")
        if running is None:
            outcome = execution.cancelled_before_start(claim)
            self.ledger.record(outcome)
            return outcome
        running.attempt = attempt = execution.begin(
            claim, definition, worker_id=self.worker_id, hooks=self.registry.hooks
        )
        call = execution.prepare(
            claim,
            definition,
            store=self.store,
            registry=self.registry,
            cancel_event=running.cancel_event,
            attempt=attempt,
        )
        try:
            outcome = execution.execute(call)
        except BaseException as error:
            outcome = execution.failed(claim, definition, error, call.clock())
            if self.ledger.end(running, outcome):
                execution.end(attempt, outcome, call.clock())
            raise
        if adjust is not None:
            outcome = adjust(outcome)
        duration = time.monotonic() - running.started
        self._avg_duration = 0.8 * self._avg_duration + 0.2 * duration
        if not self.ledger.end(running, outcome):
            return None  # the keeper ended it (and told its observers)
        execution.end(attempt, outcome, call.clock())
        return outcome

    def flush(self) -> None:
        """Record the outcomes the ledger holds (kept there if the database is away)."""
        finished = self.ledger.take_unrecorded()
        try:
            self.store.finish(finished)
        except DatabaseError:
            self.ledger.put_back(finished)
            raise

    def _record_the_rest(self) -> None:
        """Record what the ledger still holds, trying for a minute while the database is
        away (the leases run on meanwhile: the keeper is still renewing them)."""
        deadline = time.monotonic() + 60
        while True:
            try:
                self.flush()
                return
            except DatabaseError as e:
                if time.monotonic() > deadline:
                    log.error("could not record %d outcomes: %s", len(self.ledger.unrecorded), e)
                    return
                time.sleep(1.0)

    def _shutdown(self) -> None:
        if self._ticks is not None:
            self._ticks.stop()
        if self.async_lane is not None:
            self._stopping.set()
            self.async_lane.poke()
            self.async_lane.join()  # its running tasks finish and are recorded
        self._record_the_rest()
        self.keeper.stop()
        if self._listener is not None:
            self._listener.close()


def new_worker_id() -> str:
    """Unique per process start: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


class LilotaWorker(HookDecorators):
    """Registers task functions (and hooks: ``@worker.before_task`` ..., see
    :mod:`lilota.hooks`) and, with ``start()``, makes this process a worker.

    ``start()`` blocks until SIGTERM or SIGINT (a second one ends the process at once).
    Started by a :class:`~lilota.core.Lilota` with ``script_path``, the worker also ends
    when that process ends, and tells it when it is ready.
    """

    # Every instance made in this process, and whether one was started: script mode starts
    # the script's worker itself if the script only registers tasks.
    instances: ClassVar[weakref.WeakSet[LilotaWorker]] = weakref.WeakSet()
    started_in_this_process: ClassVar[bool] = False
    # Whether start() runs on this instance: set and cleared under the lock, so a second
    # start() (from another thread, or again in the same one) is refused instead of
    # starting a second loop that stop() would not reach.
    _running: bool = False
    _start_lock: ClassVar[threading.Lock] = threading.Lock()

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
        log_level: int | str | None = None,
        logging_level: int | str | None = None,  # the earlier release's name of log_level
    ) -> None:
        set_logging_level(log_level, "log_level", earlier=logging_level)  # "lilota" logger
        if db_url is None:
            db_url = default_db_url()
        self.db_url = db_url
        check_overrides(
            lease=lease,
            cancel_grace=cancel_grace,
            async_concurrency=async_concurrency,
            cpu_bound_processes=cpu_bound_processes,
            registry=registry,
        )
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
        """Decorator registering a task function; see :meth:`lilota.core.Lilota.register`.

        Raises :class:`~lilota.errors.WorkerAlreadyStarted` while ``start()`` runs: the
        worker announced its tasks when it started, so a task registered later would
        stay pending for ever."""
        if self._running:
            raise WorkerAlreadyStarted(
                f"cannot register task {name!r}: this worker is already started; "
                "register every task before start()"
            )
        return self.registry.register(name, **options)  # type: ignore[no-any-return]

    @property
    def store(self) -> TaskStore:
        if self._store is None:
            self._store = TaskStore(self.db_url)
        return self._store

    def start(self, *, burst: bool | None = None) -> None:
        """Run tasks in this process until told to stop. Blocks.

        With ``burst`` (default: ``$LILOTA_BURST`` is "1"), run the tasks that are due now
        (and those they schedule) in this thread, then return, as RQ's burst mode: for
        cron jobs and CI.

        Raises :class:`~lilota.errors.WorkerAlreadyStarted` if this worker is running
        already (once ``start()`` has returned, it may be called again)."""
        from lilota.asynclane import in_pool_process

        if in_pool_process():
            # A cpu_bound pool process imports the worker's script again to find the task
            # functions; it runs them for its worker and must not become a worker itself.
            return
        with LilotaWorker._start_lock:
            if self._running:
                raise WorkerAlreadyStarted(
                    "this worker is already started: start() runs until stop(); "
                    "start another LilotaWorker for a second loop"
                )
            self._running = True
        try:
            self._run(burst)
        finally:
            self._running = False

    def _run(self, burst: bool | None) -> None:
        LilotaWorker.started_in_this_process = True
        if burst is None:
            burst = os.environ.get(ENV_BURST) == "1"
        control_fd = os.environ.pop(ENV_CONTROL_FD, None)
        lifeline_fd = os.environ.pop(ENV_LIFELINE_FD, None)
        supervised = control_fd is not None
        try:
            init_worker_process(self.registry.hooks)  # worker_init hooks, then logging
            metrics.observe_run_times()  # counted where PROMETHEUS_MULTIPROC_DIR is set
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
            if burst:
                ran = loop.drain()
                log.info("worker %s ran %d tasks; none is due now", loop.worker_id, ran)
            else:
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


__all__ = [
    "LilotaWorker",
    "WorkerExit",
    "WorkerLoop",
    "WorkerSettings",
]
