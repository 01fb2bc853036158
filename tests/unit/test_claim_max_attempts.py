"""A claim raises a task's stored max_attempts to the worker's registered limit."""

from __future__ import annotations

from datetime import timedelta

from lilota.store import NewTask, TaskStore

LEASE = timedelta(seconds=30)


def test_claim_raises_stored_max_attempts_to_the_given_limit(store: TaskStore) -> None:
    low, high = store.add_many(
        [NewTask(name="job", max_attempts=1), NewTask(name="job", max_attempts=5)]
    )
    other = store.add(NewTask(name="other", max_attempts=1))
    claims = store.claim(
        worker_id="w",
        names=["job", "other"],
        limit=10,
        lease=LEASE,
        max_attempts={"job": 3},
    )
    by_id = {c.id: c.max_attempts for c in claims}
    assert by_id == {low: 3, high: 5, other: 1}
    stored = {i: store.get(i) for i in (low, high, other)}
    assert {i: t.max_attempts for i, t in stored.items() if t is not None} == by_id


def test_claim_without_limits_keeps_stored_max_attempts(store: TaskStore) -> None:
    task_id = store.add(NewTask(name="job", max_attempts=2))
    (claim,) = store.claim(worker_id="w", names=["job"], limit=1, lease=LEASE)
    assert claim.max_attempts == 2
    task = store.get(task_id)
    assert task is not None and task.max_attempts == 2
