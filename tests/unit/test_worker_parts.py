"""The parts of a worker process: the sync lane's run_once step, the ledger, the keeper.

Each part is driven here on the real store (both backends), without processes or
threads: run_once is the same step the worker loop, ``lilota worker --burst`` and
``lilota.testing``'s inline mode take.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import pytest

from lilota import execution
from lilota.errors import WorkerExit
from lilota.ledger import LeaseKeeper
from lilota.models import TaskStatus
from lilota.registry import Registry
from lilota.settings import WorkerSettings
from lilota.store import NewTask, TaskStore
from lilota.worker import WorkerLoop

LEASE = timedelta(seconds=30)


class Interrupted(BaseException):
    """Stands for KeyboardInterrupt (or pytest.fail) raised inside a task."""


def make_loop(store: TaskStore) -> WorkerLoop:
    registry = Registry()

    @registry.register("double")
    def double(data: dict[str, int]) -> int:
        return data["n"] * 2

    @registry.register("interrupt")
    def interrupt() -> None:
        raise Interrupted("stop everything")

    @registry.register("slow", timeout=timedelta(seconds=1), max_attempts=2)
    def slow() -> None:
        pass

    return WorkerLoop(store, registry, WorkerSettings())


def test_run_once_with_nothing_due_returns_nothing(store: TaskStore) -> None:
    assert make_loop(store).run_once() == []


def test_run_once_runs_a_batch_records_it_and_returns_the_outcomes(store: TaskStore) -> None:
    ids = store.add_many([NewTask(name="double", input=json.dumps({"n": n})) for n in range(3)])
    loop = make_loop(store)

    outcomes = loop.run_once(limit=10)

    assert [o.id for o in outcomes] == ids
    tasks = store.get_many(ids)
    assert [tasks[i].output for i in ids] == [0, 2, 4]
    assert loop.ledger.held_ids() == set()


def test_an_exception_escaping_a_task_is_recorded_then_raised_and_the_rest_given_back(
    store: TaskStore,
) -> None:
    first = store.add(NewTask(name="interrupt", priority=1))
    second = store.add(NewTask(name="double", input='{"n": 1}'))
    loop = make_loop(store)

    with pytest.raises(Interrupted):
        loop.run_once(limit=10, names=["interrupt", "double"])

    failed = store.get(first)
    assert failed is not None and failed.status == TaskStatus.FAILED
    assert failed.exception is not None and "stop everything" in failed.exception.message
    given_back = store.get(second)
    assert given_back is not None and given_back.status == TaskStatus.PENDING
    assert loop.ledger.held_ids() == set()


def test_a_claimed_task_cancelled_before_it_starts_is_not_run_and_a_later_claim_runs(
    store: TaskStore,
) -> None:
    task_id = store.add(NewTask(name="double", input='{"n": 1}'))
    loop = make_loop(store)
    [claim] = store.claim(worker_id=loop.worker_id, names=["double"], limit=1, lease=LEASE)
    loop.ledger.queue([claim])
    assert store.cancel(task_id) == TaskStatus.RUNNING
    assert loop.keeper.renew()  # the renewal tells the worker

    [outcome] = loop._run_claims([], None)
    loop.flush()

    assert outcome.status == "cancelled"
    task = store.get(task_id)
    assert task is not None and task.status == TaskStatus.CANCELLED and task.output is None
    store.retry(task_id)  # run it after all: the old request must not stop the new claim
    assert [o.status for o in loop.run_once()] == ["completed"]


def test_the_ledger_holds_queued_running_and_unrecorded_tasks(store: TaskStore) -> None:
    store.add_many([NewTask(name="double", input='{"n": 1}') for _ in range(3)])
    loop = make_loop(store)
    lease = timedelta(seconds=30)
    done, running, queued = store.claim(
        worker_id=loop.worker_id, names=["double"], limit=3, lease=lease
    )
    ledger = loop.ledger
    ledger.queue([queued])
    assert ledger.start(running, loop.registry.get("double"), "sync") is not None
    ledger.record(execution.completed(done, "2"))

    assert ledger.held_ids() == {done.id, running.id, queued.id}
    unrecorded, left, still_running = ledger.take_all()
    assert ([o.id for o in unrecorded], left, still_running) == ([done.id], [queued], [running])
    assert ledger.held_ids() == set() and not ledger.busy


def test_the_keeper_ends_the_process_for_a_sync_task_past_its_timeout(store: TaskStore) -> None:
    task_id = store.add(NewTask(name="slow"))
    loop = make_loop(store)
    ended: list[WorkerExit] = []
    loop.keeper._end_process = ended.append
    [claim] = store.claim(
        worker_id=loop.worker_id, names=["slow"], limit=1, lease=timedelta(seconds=30)
    )
    running = loop.ledger.start(claim, loop.registry.get("slow"), "sync")
    assert running is not None
    running.started = time.monotonic() - 2  # past the 1 s timeout

    loop.keeper.enforce_limits()

    assert ended == [WorkerExit.TASK_TIMEOUT]
    [outcome] = loop.ledger.unrecorded
    assert (outcome.id, outcome.status) == (task_id, "pending")  # a retry: attempts are left
    assert "ran longer than its timeout of 1 s" in json.loads(outcome.exception or "")["message"]
    assert loop.ledger.running() == []


def keeper_for(store: TaskStore, loop: Any, *, heartbeat: float) -> LeaseKeeper:
    """A lease keeper for ``loop``'s ledger that never ends the process."""
    return LeaseKeeper(
        store,
        loop.ledger,
        worker_id=loop.worker_id,
        lease=LEASE,
        heartbeat=timedelta(seconds=heartbeat),
        cancel_grace=timedelta(seconds=10),
        end_process=lambda code: None,
    )


def test_the_keeper_passes_a_cancellation_on_within_a_heartbeat_of_an_idle_renewal(
    store: TaskStore,
) -> None:
    # Idle, the keeper renews every lease/3 (10 s here); a task that starts after that
    # renewal must not wait for the next one to learn it was cancelled.
    task_id = store.add(NewTask(name="double", input='{"n": 1}'))
    loop = make_loop(store)
    keeper = keeper_for(store, loop, heartbeat=0.2)
    keeper.start()
    try:
        time.sleep(0.5)  # the first, idle renewal is done
        [claim] = store.claim(worker_id=loop.worker_id, names=["double"], limit=1, lease=LEASE)
        running = loop.ledger.start(claim, loop.registry.get("double"), "sync")
        assert running is not None
        assert store.cancel(task_id) == TaskStatus.RUNNING

        assert running.cancel_event.wait(timeout=3.0)
    finally:
        keeper.stop()


class HangingStore:
    """The store, whose lease renewals hang for ``hang`` seconds (a network partition:
    packets vanish, nothing fails) while ``hang`` is set; counts looks for lost tasks."""

    def __init__(self, store: TaskStore) -> None:
        self._store = store
        self.hang = 0.0
        self.looks = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def renew_leases(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(self.hang)
        return self._store.renew_leases(*args, **kwargs)

    def recover_expired(self, *args: Any, **kwargs: Any) -> Any:
        self.looks += 1
        return self._store.recover_expired(*args, **kwargs)


def test_after_a_renewal_that_hung_the_keeper_takes_no_tasks_for_a_lease_and_the_outage(
    store: TaskStore, clock: Any
) -> None:
    hanging = HangingStore(store)
    lease = timedelta(seconds=1)
    keeper = LeaseKeeper(
        hanging,  # type: ignore[arg-type]
        make_loop(store).ledger,
        worker_id="w",
        lease=lease,
        heartbeat=timedelta(seconds=0.05),
        cancel_grace=timedelta(seconds=10),
        end_process=lambda code: None,
    )

    def lost_task() -> int:
        task_id = store.add(NewTask(name="double", input='{"n": 1}', max_recoveries=0))
        store.claim(worker_id="gone", names=["double"], limit=1, lease=LEASE)
        clock.advance(seconds=31)  # its lease ran out
        return task_id

    def status(task_id: int) -> TaskStatus:
        task = store.get(task_id)
        assert task is not None
        return task.status

    first = lost_task()
    assert keeper.renew()  # answered at once: the database was there all along
    keeper.recover()
    assert status(first) is TaskStatus.FAILED  # worker lost, no recovery left

    second = lost_task()
    hanging.hang = 0.3  # longer than a heartbeat
    began = time.monotonic()
    assert keeper.renew()
    keeper.recover()  # the others may have been cut off too: not yet
    assert (status(second), hanging.looks) == (TaskStatus.RUNNING, 1)
    # the outage ended (began + 0.3), then a lease and as long again as the outage passed
    time.sleep(max(0.0, began + 0.3 + lease.total_seconds() + 0.3 + 0.2 - time.monotonic()))
    keeper.recover()
    assert status(second) is TaskStatus.FAILED


def test_a_busy_keeper_looks_for_cancellations_between_renewals(store: TaskStore) -> None:
    # Renewals 10 s apart: only the busy keeper's look (every CANCEL_LOOK) can tell the
    # task within the wait below.
    task_id = store.add(NewTask(name="double", input='{"n": 1}'))
    loop = make_loop(store)
    keeper = keeper_for(store, loop, heartbeat=10)
    [claim] = store.claim(worker_id=loop.worker_id, names=["double"], limit=1, lease=LEASE)
    running = loop.ledger.start(claim, loop.registry.get("double"), "sync")
    assert running is not None
    keeper.start()
    try:
        time.sleep(0.5)  # the first renewal is done; the next is 10 s away
        assert store.cancel(task_id) == TaskStatus.RUNNING
        assert running.cancel_event.wait(timeout=5.0)
        # An idle worker does not look: it holds nothing.
        assert store.cancel_requested_among(loop.worker_id, [task_id]) == {task_id}
        assert store.cancel_requested_among("another-worker", [task_id]) == set()
    finally:
        keeper.stop()
