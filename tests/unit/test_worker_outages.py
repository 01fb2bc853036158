"""The worker loop while the database cannot be reached: tasks keep running, their
outcomes are kept and recorded once it is back, and progress writes never fail a task."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from lilota.errors import DatabaseUnavailable
from lilota.models import TaskProgress, TaskStatus
from lilota.registry import Registry
from lilota.settings import WorkerSettings
from lilota.store import NewTask, TaskStore
from lilota.worker import WorkerLoop


class OutageStore:
    """A TaskStore whose writes fail with DatabaseUnavailable while ``down`` is true."""

    WRITES = frozenset({"claim", "finish", "set_progress", "release", "renew_leases"})

    def __init__(self, store: TaskStore) -> None:
        self._store = store
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name not in self.WRITES:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise DatabaseUnavailable("the database at test cannot be reached")
            return attr(*args, **kwargs)

        return call


def make_loop(store: TaskStore) -> tuple[WorkerLoop, OutageStore, Callable[[], None]]:
    registry = Registry()

    @registry.register("step", task_progress=TaskProgress)
    def step(data: dict, task_progress: TaskProgress) -> int:  # type: ignore[type-arg]
        task_progress.set(50)
        time.sleep(0.06)  # past FLUSH_AFTER: the loop records the batch so far
        return int(data["n"])

    outage = OutageStore(store)
    loop = WorkerLoop(outage, registry, WorkerSettings())  # type: ignore[arg-type]

    def claim_all() -> None:
        claims = store.claim(
            worker_id=loop.worker_id, names=["step"], limit=10, lease=WorkerSettings().lease
        )
        loop._run_claims(claims, None)

    return loop, outage, claim_all


def test_tasks_that_end_while_the_database_is_away_are_recorded_when_it_is_back(
    store: TaskStore,
) -> None:
    ids = store.add_many([NewTask(name="step", input=f'{{"n": {n}}}') for n in range(3)])
    loop, outage, run_claimed = make_loop(store)
    outage.down = True
    run_claimed()  # neither the progress writes nor the flushes stop the batch
    assert sorted(o.id for o in loop.ledger.unrecorded) == ids
    assert all(o.status == "completed" for o in loop.ledger.unrecorded)
    assert store.count_by_status()["running"] == 3
    outage.down = False
    loop.flush()
    tasks = store.get_many(ids)
    assert [tasks[i].status for i in ids] == [TaskStatus.COMPLETED] * 3
    assert [tasks[i].output for i in ids] == [0, 1, 2]
    assert loop.ledger.unrecorded == []
