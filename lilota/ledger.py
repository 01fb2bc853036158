"""What a worker process holds, and the thread that keeps holding it.

:class:`Ledger` is the one record of the tasks a worker process holds, under one lock:
claimed but not started (queued), running (in either lane), ended but not yet recorded
(unrecorded outcomes), and the ids someone asked to cancel. The sync lane, the async lane
and the lease keeper all read and write it; none of them reaches into another.

:class:`LeaseKeeper` is a thread that renews the leases of ``ledger.held_ids()`` (so a
long, CPU-bound task cannot let them lapse), takes back tasks of dead workers, tells
running tasks of cancellation requests, and enforces timeouts and cancellation for both
lanes: a task it cannot stop any other way ends the whole process, through the
``end_process`` callback, for the supervisor to replace it.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING

from lilota import execution
from lilota.errors import DatabaseError, DatabaseReplaced, WorkerExit
from lilota.models import TaskError

if TYPE_CHECKING:
    from lilota.hooks import Attempt
    from lilota.models import Claim, Outcome
    from lilota.registry import TaskDefinition
    from lilota.store import TaskStore

log = logging.getLogger(__name__)

# After a failed lease renewal the keeper tries again this soon (instead of a heartbeat or
# lease/3 later): when the database is back, the leases that ran out meanwhile are renewed
# before another worker may take them.
RENEW_RETRY = 0.5

# How often the keeper wakes to look at deadlines; renewals have their own interval.
KEEPER_TICK = 0.1
# How often a worker looks for pending tasks that no live worker runs (a grouped read of
# the pending rows), to log them: a task scheduled under a name nobody registered (a typo,
# a worker not deployed) would otherwise wait for ever without a sign.
UNSERVED_EVERY = 300.0
# While it runs tasks, a worker also looks this often whether one was asked to cancel (a
# read of its own running rows, between renewals): a task sees cancel() within about this
# plus its own polling, not a heartbeat. Idle workers do not look (they hold nothing).
CANCEL_LOOK = 0.25


@dataclass(eq=False)
class Running:
    """A task one of the lanes runs now."""

    claim: Claim
    definition: TaskDefinition
    # "sync" (the main thread: cannot be interrupted, only the process can end) or
    # "async" (the event loop, which cancels its own tasks first: the keeper waits one
    # more grace period before it ends the process).
    lane: str
    started: float = field(default_factory=time.monotonic)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    cancel_seen_at: float | None = None  # when the keeper passed a cancellation on
    forced_at: float | None = None  # async lane: when the loop cancelled it after the grace
    timed_out: bool = False  # async lane: the loop cancelled it at its timeout
    # Its observers' view (lilota.execution.begin): told of the end by whoever ends it.
    attempt: Attempt | None = None


class Ledger:
    """The tasks one worker process holds; every method is thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queued: collections.deque[Claim] = collections.deque()
        self._running: dict[int, Running] = {}
        self._unrecorded: list[Outcome] = []
        self._cancel_requested: set[int] = set()
        # Set when a task starts: the keeper then renews (and so learns of cancellation
        # requests) within a heartbeat, not at the next idle renewal, lease/3 away.
        self._started = threading.Event()

    # -------------------------------------------------------------- claimed, not started

    def queue(self, claims: Iterable[Claim]) -> None:
        with self._lock:
            self._queued.extend(claims)

    def next_queued(self) -> Claim | None:
        with self._lock:
            return self._queued.popleft() if self._queued else None

    def has_queued(self) -> bool:
        with self._lock:
            return bool(self._queued)

    def take_queued(self) -> list[Claim]:
        """The claims not started, to give back (their cancellation requests go too)."""
        with self._lock:
            claims = list(self._queued)
            self._queued.clear()
            self._cancel_requested.difference_update(c.id for c in claims)
        return claims

    # -------------------------------------------------------------- running

    def start(self, claim: Claim, definition: TaskDefinition, lane: str) -> Running | None:
        """Mark ``claim`` running; None (and not running) if its cancellation was
        requested before it started."""
        with self._lock:
            if claim.id in self._cancel_requested:
                self._cancel_requested.discard(claim.id)  # this claim ends cancelled
                return None
            running = Running(claim=claim, definition=definition, lane=lane)
            self._running[claim.id] = running
        self._started.set()
        return running

    def end(self, running: Running, outcome: Outcome | None) -> bool:
        """``running`` ended with ``outcome`` (to be recorded). False if it had already
        been ended (by the keeper, which is then ending the process)."""
        with self._lock:
            if self._running.get(running.claim.id) is not running:
                return False
            del self._running[running.claim.id]
            if outcome is not None:
                self._unrecorded.append(outcome)
            return True

    def running(self, lane: str | None = None) -> list[Running]:
        with self._lock:
            return [r for r in self._running.values() if lane is None or r.lane == lane]

    def running_ids(self) -> set[int]:
        with self._lock:
            return set(self._running)

    # -------------------------------------------------------------- outcomes

    def record(self, outcome: Outcome) -> None:
        with self._lock:
            self._unrecorded.append(outcome)

    def take_unrecorded(self) -> list[Outcome]:
        with self._lock:
            outcomes, self._unrecorded = self._unrecorded, []
        return outcomes

    def put_back(self, outcomes: list[Outcome]) -> None:
        """Outcomes that could not be recorded: kept, first in line for the next try."""
        if outcomes:
            with self._lock:
                self._unrecorded[:0] = outcomes

    @property
    def unrecorded(self) -> list[Outcome]:
        with self._lock:
            return list(self._unrecorded)

    # -------------------------------------------------------------- the keeper's view

    def held_ids(self) -> set[int]:
        """Ids of the tasks held: queued, running, or ended but not yet recorded."""
        with self._lock:
            held = {c.id for c in self._queued} | {o.id for o in self._unrecorded}
            return held | set(self._running)

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._running or self._queued or self._unrecorded)

    def take_started(self) -> bool:
        """Whether a task started since the last call."""
        started = self._started.is_set()
        if started:
            self._started.clear()
        return started

    def note_cancel_requested(self, ids: Iterable[int]) -> list[Running]:
        """Tell the running ones; remember the queued ones, which then never start (only
        until their claim ends: a task retried later and claimed again runs). Returns the
        running ones newly told."""
        now = time.monotonic()
        told: list[Running] = []
        ids = set(ids)
        with self._lock:
            queued = {c.id for c in self._queued}
            self._cancel_requested.update(i for i in ids if i in queued)
            for task_id in ids:
                running = self._running.get(task_id)
                if running is not None and not running.cancel_event.is_set():
                    running.cancel_seen_at = now
                    running.cancel_event.set()
                    told.append(running)
        return told

    def take_all(self) -> tuple[list[Outcome], list[Claim], list[Claim]]:
        """For a process about to end: unrecorded outcomes, queued and running claims."""
        with self._lock:
            outcomes, self._unrecorded = self._unrecorded, []
            queued = list(self._queued)
            self._queued.clear()
            running = [r.claim for r in self._running.values()]
            self._running.clear()
        return outcomes, queued, running


def idle_wait(store: TaskStore, names: Iterable[str], idle_poll: float) -> float:
    """How long a lane with nothing to do waits for a wake-up: until the next task of
    ``names`` is due, at most ``idle_poll``; 1 s when the database cannot say."""
    try:
        next_run = store.next_run_at(names)
    except DatabaseError:
        return 1.0
    if next_run is None:
        return idle_poll
    wait = (next_run - store.clock()).total_seconds()
    return min(max(wait, 0.001), idle_poll)


class LeaseKeeper:
    """Renews leases, notices cancellations and dead workers, enforces limits."""

    def __init__(
        self,
        store: TaskStore,
        ledger: Ledger,
        *,
        worker_id: str,
        lease: timedelta,
        heartbeat: timedelta,
        cancel_grace: timedelta,
        end_process: Callable[[WorkerExit], None],
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.worker_id = worker_id
        self.lease = lease
        self.heartbeat = heartbeat.total_seconds()
        self.grace = cancel_grace
        self._end_process = end_process
        self._on_cancel = on_cancel
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._recover_after = 0.0  # monotonic: no recovery before (see _database_trouble)
        self._unserved_logged: dict[str, int] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lilota-lease-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        lease = self.lease.total_seconds()
        # Looking for expired leases is one indexed read (a write only when there are
        # some): every lease/6 keeps recovery within 1.2 leases of a worker's death.
        recover_every = max(self.heartbeat, lease / 6)
        next_renew = 0.0
        next_recover = time.monotonic() + recover_every
        # The first look after one lease: every worker that is starting too has announced.
        next_unserved = time.monotonic() + lease
        next_look = 0.0
        wait = KEEPER_TICK
        while not self._stop.wait(wait):
            now = time.monotonic()
            if self.ledger.take_started():  # busy now: renew at the busy pace from here on
                next_renew = min(next_renew, now + self.heartbeat)
            if now >= next_renew:
                interval = self.heartbeat if self.ledger.busy else max(self.heartbeat, lease / 3)
                if not self.renew():
                    # Leases run out while the database is away: try again soon.
                    interval = min(interval, RENEW_RETRY)
                next_renew = time.monotonic() + interval
                next_look = now + CANCEL_LOOK  # the renewal told what a look would
            elif self.ledger.busy and now >= next_look:
                next_look = now + CANCEL_LOOK
                self.look_for_cancels()
            if now >= next_recover:
                next_recover = now + recover_every
                self.recover()
            if now >= next_unserved:
                next_unserved = now + UNSERVED_EVERY
                self.warn_unserved()
            self.enforce_limits()
            # Wake for the next renewal or look on time, not up to a tick late: they pass
            # cancellation requests on.
            due = min(next_renew, next_look) if self.ledger.busy else next_renew
            wait = min(KEEPER_TICK, max(0.0, due - time.monotonic()))

    def _database_trouble(self, lasted: float = 0.0) -> None:
        # While this process could not reach the database, neither could the others
        # (probably): every lease may have run out without its holder being at fault.
        # Give the holders one lease to renew before taking their tasks away, so that a
        # task that finished during an outage is recorded by its worker, not run again,
        # and one still running is not run a second time at once. After an outage that
        # ``lasted`` (a statement hung through it), add as long again: a connection that
        # hung through a partition resumes only at TCP's next retransmission, which can
        # come that much later after the network is back.
        until = time.monotonic() + self.lease.total_seconds() + lasted
        self._recover_after = max(self._recover_after, until)

    def _hung(self, began: float, what: str) -> None:
        """A call that took longer than a heartbeat (a few ms normally) hung: packets to
        the database vanished (a partition, a dead switch) rather than being refused,
        which raises nothing, or the database was too busy to answer anyone. Treated as
        the outage it was."""
        took = time.monotonic() - began
        if took > self.heartbeat:
            log.warning("%s took %.1f s: the database did not answer meanwhile", what, took)
            self._database_trouble(took)

    def recover(self) -> None:
        """Take back the tasks of workers whose leases expired."""
        if time.monotonic() < self._recover_after:
            return
        began = time.monotonic()
        try:  # leases that expired before now, even if the call hangs (see _hung)
            self.store.recover_expired(before=self.store.clock())
        except DatabaseError as e:
            log.warning("could not look for lost tasks: %s", e)
            self._database_trouble()
            return
        self._hung(began, "looking for lost tasks")

    def warn_unserved(self) -> None:
        """Log the pending tasks no live worker runs (each name again only when its count
        changed)."""
        try:
            unserved = self.store.unserved(execution.LIVE_WITHIN)
        except DatabaseError as e:
            log.debug("could not look for pending tasks no worker runs: %s", e)
            return
        for name, count in sorted(unserved.items()):
            if self._unserved_logged.get(name) != count:
                log.warning(
                    "%d pending task%s named %r: no live worker registered %r; they wait "
                    "until a worker that registers it starts (or cancel them)",
                    count,
                    "" if count == 1 else "s",
                    name,
                    name,
                )
        self._unserved_logged = unserved

    def look_for_cancels(self) -> None:
        """Tell the running tasks someone asked to cancel (a read; renewals tell them too)."""
        held = self.ledger.held_ids()
        if not held:
            return
        began = time.monotonic()
        try:
            asked = self.store.cancel_requested_among(self.worker_id, held)
        except DatabaseError as e:
            log.debug("could not look for cancellation requests: %s", e)
            self._database_trouble()
            return
        # A look that hung through a partition is an outage, as a renewal that hung is.
        self._hung(began, "looking for cancellation requests")
        self._tell_cancelled(asked)

    def renew(self) -> bool:
        """Renew the leases of what the ledger holds; False if the database could not
        be reached. A SQLite file deleted or replaced under this process ends it first."""
        try:
            self.store.check_file()
        except DatabaseReplaced as e:
            log.critical(
                "%s; ending this worker (tasks it ran on the old file are lost with it) so that "
                "its supervisor starts one on the file now at that path",
                e,
            )
            self._end_process(WorkerExit.DATABASE_REPLACED)
            return False
        held = self.ledger.held_ids()
        began = time.monotonic()
        try:
            report = self.store.renew_leases(self.worker_id, self.lease, task_ids=held)
        except DatabaseError as e:
            log.warning("could not renew leases: %s", e)
            self._database_trouble()
            return False
        self._hung(began, "renewing leases")
        self._check_still_held(held - report.held)
        self._tell_cancelled(report.cancel_requested)
        return True

    def _tell_cancelled(self, asked: Iterable[int]) -> None:
        if asked:
            for running in self.ledger.note_cancel_requested(asked):
                log.info("task %d: cancellation requested", running.claim.id)
            if self._on_cancel is not None:
                self._on_cancel()

    def _check_still_held(self, not_renewed: set[int]) -> None:
        """A task this process runs whose lease another worker took over (this process
        stalled, or could not reach the database, for longer than the lease) now runs
        there too: end this process, so that no task runs twice at once for long.

        ``not_renewed``: tasks held before the renewal that are no longer held. Those
        that ended meanwhile were recorded (or will be refused, fenced)."""
        lost = not_renewed & self.ledger.running_ids()
        if lost:
            log.error(
                "lost the lease of task(s) %s: another worker took them over; replacing this "
                "process so that they do not run twice at once",
                ", ".join(str(i) for i in sorted(lost)),
            )
            self._end_process(WorkerExit.LEASE_LOST)

    def enforce_limits(self) -> None:
        """End the process for a task past its timeout, or past its grace after a
        cancellation, that its lane could not stop. The async lane stops its own tasks
        first, so it is given one more grace period."""
        now = time.monotonic()
        grace = self.grace.total_seconds()
        for running in self.ledger.running():
            slack = grace if running.lane == "async" else 0.0
            timeout = running.definition.timeout
            if timeout is not None and now - running.started > timeout.total_seconds() + slack:
                outcome = execution.timed_out(
                    running.claim,
                    running.definition,
                    self.store.clock(),
                    ignored_cancel=running.lane == "async",
                )
                self._end(running, outcome, WorkerExit.TASK_TIMEOUT)
                return
            seen = running.cancel_seen_at
            if seen is not None and now - seen > grace + slack:
                outcome = execution.did_not_stop(running.claim, timedelta(seconds=grace + slack))
                self._end(running, outcome, WorkerExit.CANCEL_FORCED)
                return

    def _end(self, running: Running, outcome: Outcome, code: WorkerExit) -> None:
        if not self.ledger.end(running, outcome):
            return  # it ended by itself meanwhile (and its outcome is kept)
        log.error("%s; replacing the worker process", TaskError.from_json(outcome.exception))
        if running.attempt is not None:  # its after_task hooks run before the process ends
            execution.end(running.attempt, outcome, self.store.clock())
        self._end_process(code)


__all__ = ["RENEW_RETRY", "LeaseKeeper", "Ledger", "Running", "idle_wait"]
