"""The task state machine of the real TaskStore, on SQLite and PostgreSQL, against a model.

A Hypothesis ``RuleBasedStateMachine`` plays several workers and a user against one
``TaskStore``: it schedules tasks (1-3 attempts, priorities, some due later), claims them
by one of three workers (batches of 1-3, each worker serving its own task names), sets
progress, completes, fails (the worker's own ``execution.failed``: a retry while attempts
are left, else failed), acknowledges cancellation, cancels, lets leases expire (a
``FakeClock`` moves past them) and recovers them, renews a worker's leases, releases
claims (refunded or not), retries failed and cancelled tasks, deletes ended tasks
(``cleanup``), and has workers whose lease was taken over write late, also after their
task was retried, recovered, refunded or deleted. After every step the whole state read from the store
must equal a small model, and these invariants must hold:

* every task is in exactly one state (its status, and the per-status counts);
* a task is held by at most one worker: a running task has exactly one ``worker_id``,
  the model's, and a lease; no other task has either. Progress and release are accepted
  only from the claim that holds the task; an outcome only from the task's latest claim
  (its ``fence``, which never goes back, not even on ``retry()``) while the task has not
  ended (so a stale claim, superseded by a newer one, is always rejected; a claim whose
  lease was taken back may still record how it ended while no newer claim was made);
* completed, failed and cancelled are final, except for an explicit ``retry()``;
* ``attempts <= max_attempts`` always (``attempts`` counts the attempts started since
  the task was scheduled or last retried, less those whose worker was lost: a lost worker
  is a recovery, counted in ``recoveries <= max_recoveries``; ``retry()`` sets both to 0);
* no task disappears but by ``cleanup``, and no id is ever given twice (in the whole
  database, across examples);
* progress is within 0..100, and 100 when completed.

Each test (one per backend) has its own database; the examples inside it share it, and
each example uses its own task names and worker ids, so it sees only its own tasks.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from conftest import FakeClock
from lilota import execution
from lilota.errors import TaskAlreadyFinished
from lilota.registry import RetryPolicy, TaskDefinition
from lilota.store import Claim, NewTask, Outcome, TaskStore

LEASE = timedelta(seconds=30)
PENDING, RUNNING, COMPLETED, FAILED, CANCELLED = (
    "pending",
    "running",
    "completed",
    "failed",
    "cancelled",
)
FINAL = (COMPLETED, FAILED, CANCELLED)
# Worker i serves these of the example's task names.
WORKER_NAMES = [("a", "b"), ("a",), ("b",)]
# For execution.failed: max_attempts=1 here, so the claim's own limit counts.
DEFINITION = TaskDefinition(
    name="any",
    func=lambda: None,
    retry=RetryPolicy(max_attempts=1, retry_delay=timedelta(seconds=1)),
)

# (name, max_attempts, priority, delay in seconds, max_recoveries) of a task to schedule
TASKS = st.tuples(
    st.sampled_from(["a", "b"]),
    st.integers(1, 3),
    st.integers(0, 2),
    st.sampled_from([0, 0, 5]),
    st.integers(0, 2),
)

MACHINE_SETTINGS = settings(
    deadline=None,
    stateful_step_count=25,
    suppress_health_check=[*settings.default.suppress_health_check, HealthCheck.too_slow],
)


@dataclass
class ModelTask:
    id: int
    name: str
    priority: int
    max_attempts: int
    run_at: datetime
    max_recoveries: int = 3
    status: str = PENDING
    attempts: int = 0
    recoveries: int = 0
    fence: int = 0
    ended_at: datetime | None = None
    worker: str | None = None
    lease_until: datetime | None = None
    progress: int = 0
    cancel_requested: bool = False
    generation: int = 0  # how many times retry() brought it back


@dataclass
class LiveClaim:
    """A claim whose worker still thinks it holds the task (it has not written its end)."""

    claim: Claim
    worker: str
    generation: int


class TaskStoreMachine(RuleBasedStateMachine):
    def __init__(self, store: TaskStore, clock: FakeClock, prefix: str, ids: set[int]) -> None:
        super().__init__()
        self.ids_given = ids  # every id the store gave, in every example
        self.store = store
        self.clock = clock
        self.names = {short: f"{prefix}.{short}" for short in ("a", "b")}
        self.workers = [f"{prefix}.w{i}" for i in range(len(WORKER_NAMES))]
        self.tasks: dict[int, ModelTask] = {}
        self.live: list[LiveClaim] = []

    # ------------------------------------------------------------------ model helpers

    def is_current(self, live: LiveClaim) -> bool:
        """Whether this claim is the task's latest (the only one allowed to write)."""
        task = self.tasks.get(live.claim.id)
        return task is not None and live.claim.fence == task.fence

    def to_pending(self, task: ModelTask, run_at: datetime) -> None:
        task.status, task.worker, task.lease_until = PENDING, None, None
        task.run_at = run_at

    def to_final(self, task: ModelTask, status: str) -> None:
        # Who ran a finished task stays visible: the worker is kept.
        task.status, task.lease_until, task.ended_at = status, None, self.clock.now

    def recovered(self, task: ModelTask, run_at: datetime) -> None:
        """Its worker was lost: pending again, the attempt given back, a recovery counted."""
        self.to_pending(task, run_at)
        task.attempts -= 1
        task.recoveries += 1
        task.progress = 0

    def holds(self, live: LiveClaim) -> bool:
        """Whether the claim's attempt is the one running the task now."""
        return self.is_current(live) and self.tasks[live.claim.id].status == RUNNING

    def pick(self, data: st.DataObject, *, holding: bool | None = None) -> LiveClaim:
        pool = [c for c in self.live if holding is None or self.holds(c) == holding]
        live = data.draw(st.sampled_from(pool), label="claim")
        self.live.remove(live)
        return live

    def outcome(self, live: LiveClaim, status: str, **kwargs: Any) -> Outcome:
        return Outcome(id=live.claim.id, fence=live.claim.fence, status=status, **kwargs)

    def writable(self, live: LiveClaim) -> bool:
        """Whether the store records this claim's outcome: it is the latest attempt and the
        task is not final (a late outcome of an attempt whose lease was taken back, with
        no newer attempt started, still counts: the attempt did run)."""
        task = self.tasks.get(live.claim.id)
        status = "deleted" if task is None else task.status
        ok = self.is_current(live) and status in (PENDING, RUNNING)
        event(f"outcome of a {'current' if self.is_current(live) else 'stale'} claim, {status}")
        return ok

    # ------------------------------------------------------------------ rules

    @initialize(tasks=st.lists(TASKS, min_size=1, max_size=4))
    def schedule_some(self, tasks: list[tuple[str, int, int, int, int]]) -> None:
        for spec in tasks:
            self.schedule(*spec)

    @rule(spec=TASKS)
    def schedule_one(self, spec: tuple[str, int, int, int, int]) -> None:
        self.schedule(*spec)

    def schedule(
        self, name: str, max_attempts: int, priority: int, delay: int, max_recoveries: int
    ) -> None:
        run_at = self.clock.now + timedelta(seconds=delay)
        task_id = self.store.add(
            NewTask(
                name=self.names[name],
                input=json.dumps({"n": len(self.tasks)}),
                max_attempts=max_attempts,
                priority=priority,
                run_at=run_at if delay else None,
                max_recoveries=max_recoveries,
            )
        )
        assert task_id not in self.ids_given, f"id {task_id} given twice"
        self.ids_given.add(task_id)
        self.tasks[task_id] = ModelTask(
            id=task_id,
            name=self.names[name],
            priority=priority,
            max_attempts=max_attempts,
            run_at=run_at,
            max_recoveries=max_recoveries,
        )

    @rule(by=st.tuples(st.integers(0, len(WORKER_NAMES) - 1), st.integers(1, 3)))
    def claim(self, by: tuple[int, int]) -> None:
        """A worker claims up to ``limit`` due tasks of its names."""
        worker, limit = by
        worker_id = self.workers[worker]
        names = {self.names[short] for short in WORKER_NAMES[worker]}
        now = self.clock.now
        due = sorted(
            (
                t
                for t in self.tasks.values()
                if t.status == PENDING and t.name in names and t.run_at <= now
            ),
            key=lambda t: (-t.priority, t.run_at, t.id),
        )
        claims = self.store.claim(worker_id=worker_id, names=names, limit=limit, lease=LEASE)
        assert [c.id for c in claims] == [t.id for t in due[:limit]]
        event(f"claimed {len(claims)}")
        for c in claims:
            task = self.tasks[c.id]
            task.status, task.worker, task.lease_until = RUNNING, worker_id, now + LEASE
            task.attempts += 1
            task.fence += 1
            task.progress = 0
            assert (c.name, c.attempt, c.max_attempts, c.fence) == (
                task.name,
                task.attempts,
                task.max_attempts,
                task.fence,
            )
            assert json.loads(c.input or "null") is not None
            self.live.append(LiveClaim(c, worker_id, task.generation))

    @precondition(lambda self: self.live)
    @rule(data=st.data(), percentage=st.integers(0, 100))
    def set_progress(self, data: st.DataObject, percentage: int) -> None:
        live = data.draw(st.sampled_from(self.live), label="claim")
        task = self.tasks.get(live.claim.id)
        expected = self.holds(live)
        got = self.store.set_progress(live.claim.id, live.claim.fence, percentage)
        assert got is expected
        if expected and task is not None:
            task.progress = percentage

    @precondition(lambda self: self.live)
    @rule(data=st.data(), how=st.sampled_from([COMPLETED, FAILED, CANCELLED]))
    def finish(self, data: st.DataObject, how: str) -> None:
        """The worker records how its attempt ended: the task returned, raised (the
        worker's own execution.failed: a retry while attempts are left), or saw the
        cancellation request and stopped."""
        live = self.pick(data)
        task = self.tasks.get(live.claim.id)
        expected = self.writable(live)
        if how == FAILED:
            out = execution.failed(live.claim, DEFINITION, RuntimeError("boom"), self.clock.now)
            retry = live.claim.attempt < live.claim.max_attempts
            assert out.status == (PENDING if retry else FAILED)
        else:
            out = self.outcome(live, how, output=json.dumps({"done": live.claim.id}))
        assert self.store.finish([out]) == int(expected)
        if not expected or task is None:
            return
        if task.cancel_requested:
            # Asked to cancel: it ends cancelled however the attempt ended (returned,
            # raised, or a retry), whether or not the worker saw the request; progress
            # stays where the attempt left it.
            self.to_final(task, CANCELLED)
        elif out.status == COMPLETED:
            self.to_final(task, COMPLETED)
            task.progress = 100
        elif out.status != PENDING:
            self.to_final(task, out.status)
        else:
            assert out.run_at is not None and out.run_at > self.clock.now
            self.to_pending(task, out.run_at)
            task.progress = 0

    @precondition(lambda self: self.tasks)
    @rule(data=st.data(), action=st.sampled_from(["cancel", "retry"]))
    def user(self, data: st.DataObject, action: str) -> None:
        """Someone cancels or retries one of the tasks, in whatever state it is."""
        task = self.tasks[data.draw(st.sampled_from(sorted(self.tasks)), label="task")]
        if action == "cancel":
            self.cancel(task)
        else:
            self.retry(task)

    def cancel(self, task: ModelTask) -> None:
        if task.status in FINAL:
            with pytest.raises(TaskAlreadyFinished):
                self.store.cancel(task.id)
            return
        got = self.store.cancel(task.id)
        task.cancel_requested = True
        if task.status == PENDING:
            assert got == CANCELLED
            self.to_final(task, CANCELLED)
        else:
            assert got == RUNNING

    def renew(self, worker: int) -> None:
        """The worker keeps its leases (even one that expired but was not recovered yet)."""
        worker_id = self.workers[worker]
        held = [t for t in self.tasks.values() if t.status == RUNNING and t.worker == worker_id]
        report = self.store.renew_leases(worker_id, LEASE)
        assert report.held == {t.id for t in held}
        assert report.cancel_requested == {t.id for t in held if t.cancel_requested}
        for task in held:
            task.lease_until = self.clock.now + LEASE

    @rule(seconds=st.sampled_from([1, 10, 20]))
    def time_passes(self, seconds: int) -> None:
        """Time passes; every worker renews its leases; nothing expires."""
        self.clock.advance(seconds=seconds)
        for worker in range(len(WORKER_NAMES)):
            self.renew(worker)
        self.recover_expired()

    @rule(data=st.data(), back_in_time=st.booleans())
    def worker_stalls(self, data: st.DataObject, back_in_time: bool) -> None:
        """One worker stops renewing for longer than the lease while the others keep
        theirs. If it is back in time, it renews its expired leases before anyone
        recovers them and keeps its tasks; otherwise they are recovered, and it does not
        know: its claims stay live, and it may write late."""
        busy = sorted({self.workers.index(c.worker) for c in self.live if self.holds(c)})
        worker = data.draw(st.sampled_from(busy or range(len(WORKER_NAMES))), label="worker")
        self.clock.advance(seconds=LEASE.total_seconds() + 1)
        for other in range(len(WORKER_NAMES)):
            if other != worker or back_in_time:
                self.renew(other)
        self.recover_expired()

    def recover_expired(self) -> None:
        now = self.clock.now
        expected: dict[int, str] = {}
        for task in self.tasks.values():
            if task.status != RUNNING or task.lease_until is None or task.lease_until >= now:
                continue
            if task.cancel_requested:
                expected[task.id] = CANCELLED
                self.to_final(task, CANCELLED)
            elif task.recoveries < task.max_recoveries:
                expected[task.id] = PENDING
                self.recovered(task, now)
            else:
                expected[task.id] = FAILED
                self.to_final(task, FAILED)
        got = {i: s for i, s in self.store.recover_expired() if i in self.tasks}
        for status in got.values():
            event(f"recovered to {status}")
        assert got == expected
        # The workers that held them do not know yet: their claims stay live (stale).

    @precondition(lambda self: self.live)
    @rule(data=st.data(), refund=st.booleans())
    def release(self, data: st.DataObject, refund: bool) -> None:
        """A stopping worker gives a claim back: unstarted (refund) or interrupted."""
        live = self.pick(data)
        task = self.tasks.get(live.claim.id)
        expected = self.holds(live)
        assert self.store.release([live.claim], refund=refund) == int(expected)
        if not expected or task is None:
            return
        if refund:
            task.attempts -= 1
            task.progress = 0
            self.to_pending(task, task.run_at)
        # An interrupted attempt is a recovery, as if its worker was lost (recover_expired).
        elif task.cancel_requested:
            self.to_final(task, CANCELLED)
        elif task.recoveries < task.max_recoveries:
            self.recovered(task, task.run_at)
        else:
            event("release without a recovery left")
            self.to_final(task, FAILED)

    def retry(self, task: ModelTask) -> None:
        if task.status not in (FAILED, CANCELLED):
            with pytest.raises(ValueError, match="only failed or cancelled"):
                self.store.retry(task.id)
            return
        self.store.retry(task.id)
        self.to_pending(task, self.clock.now)
        task.attempts, task.recoveries, task.progress, task.cancel_requested = 0, 0, 0, False
        task.generation += 1
        task.ended_at = None
        # The workers of the earlier run may still be live (stalled): their claims stay,
        # and late_write checks that the fence refuses them.

    @rule(seconds=st.sampled_from([0, 5]))
    def cleanup(self, seconds: int) -> None:
        """Someone deletes the tasks that ended more than ``seconds`` ago."""
        cutoff = self.clock.now - timedelta(seconds=seconds)
        gone = {t.id for t in self.tasks.values() if t.ended_at is not None and t.ended_at < cutoff}
        deleted = self.store.cleanup(timedelta(seconds=seconds))
        assert deleted >= len(gone)  # other examples' ended tasks may go too
        for task_id in gone:
            event("a task deleted")
            del self.tasks[task_id]

    @precondition(lambda self: any(not self.holds(c) for c in self.live))
    @rule(data=st.data(), percentage=st.integers(0, 100))
    def late_write(self, data: st.DataObject, percentage: int) -> None:
        """A worker whose lease was taken back (it stalled) writes progress, then its
        outcome: progress is refused; the outcome is refused when a newer attempt exists
        or the task ended, and recorded while no newer attempt started."""
        live = self.pick(data, holding=False)
        task = self.tasks.get(live.claim.id)
        expected = self.writable(live)
        assert self.store.set_progress(live.claim.id, live.claim.fence, percentage) is False
        out = self.outcome(live, COMPLETED, output=json.dumps("late"))
        assert self.store.finish([out]) == int(expected)
        if expected and task is not None:
            self.to_final(task, COMPLETED)
            task.progress = 100

    # ------------------------------------------------------------------ invariants

    @invariant()
    def store_matches_model(self) -> None:
        stored = self.store.get_many(self.tasks)
        assert set(stored) == set(self.tasks), "a task disappeared"
        for task_id, model in self.tasks.items():
            task = stored[task_id]
            where = f"task {task_id}: {task} vs model {model}"
            # exactly one state, the model's; final ones only left through retry()
            assert task.status == model.status, where
            assert task.attempts == model.attempts, where
            assert 0 <= task.attempts <= task.max_attempts == model.max_attempts, where
            assert (task.fence, task.recoveries) == (model.fence, model.recoveries), where
            assert 0 <= task.recoveries <= task.max_recoveries == model.max_recoveries, where
            assert 0 <= task.progress_percentage <= 100, where
            assert task.progress_percentage == model.progress, where
            if task.status == COMPLETED:
                assert task.progress_percentage == 100, where
            assert task.cancel_requested == model.cancel_requested, where
            if task.status == RUNNING:  # held by exactly one worker, under a lease
                assert task.worker_id is not None and task.worker_id == model.worker, where
                assert task.lease_expires_at is not None, where
                assert task.lease_expires_at.replace(tzinfo=None) == model.lease_until, where
            else:
                assert task.lease_expires_at is None, where
            if task.status == PENDING:
                assert task.worker_id is None, where
                assert task.run_at is not None, where
                assert task.run_at.replace(tzinfo=None) == model.run_at, where
            assert (task.end_date_time is not None) == (task.status in FINAL), where

    @invariant()
    def counts_match_model(self) -> None:
        for name in self.names.values():
            counts = self.store.count_by_status(name=name)
            mine = [t for t in self.tasks.values() if t.name == name]
            assert sum(counts.values()) == len(mine)
            for status, count in counts.items():
                assert count == sum(1 for t in mine if t.status == status), (name, status)

    @invariant()
    def at_most_one_worker_may_write(self) -> None:
        """Of the claims workers still act on, at most one per task is its latest attempt."""
        held: dict[int, int] = {}
        for live in self.live:
            if self.is_current(live):
                held[live.claim.id] = held.get(live.claim.id, 0) + 1
        assert all(n == 1 for n in held.values()), held


def test_task_store_state_machine(lilota_db_url: str) -> None:
    clock = FakeClock()
    store = TaskStore(lilota_db_url, clock=clock)
    store.ensure_schema()
    examples = itertools.count()
    ids: set[int] = set()
    try:
        run_state_machine_as_test(
            lambda: TaskStoreMachine(store, clock, f"sm{next(examples)}", ids),
            settings=MACHINE_SETTINGS,
        )
    finally:
        store.dispose()
