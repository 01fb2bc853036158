"""Counterexamples found by the property tests (tests/property), kept as plain tests.

Each runs on SQLite and PostgreSQL (the ``store`` fixture of the root conftest.py).
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from conftest import FakeClock
from lilota import Lilota
from lilota.models import TaskStatus
from lilota.serialization import dumps, loads
from lilota.store import Claim, NewTask, Outcome, TaskStore

LEASE = timedelta(seconds=30)


def claim_one(store: TaskStore, worker: str = "w1") -> Claim:
    (claim,) = store.claim(worker_id=worker, names=["job"], limit=1, lease=LEASE)
    return claim


# --------------------------------------------------------------- release (state machine)


def test_started_attempt_given_back_without_recoveries_left_fails_instead_of_running_again(
    store: TaskStore,
) -> None:
    # Found by test_state_machine: schedule (max_attempts=1), claim, release(refund=False),
    # claim again -> attempts 2 of max_attempts 1. Now recoveries are counted apart.
    task_id = store.add(NewTask(name="job", max_attempts=1, max_recoveries=0))
    c = claim_one(store)
    assert store.release([c], refund=False) == 1
    task = store.get(task_id)
    assert task is not None
    assert task.status is TaskStatus.FAILED
    assert task.attempts == 1 == task.max_attempts and task.recoveries == 0
    assert task.exception is not None and task.exception.type == "lilota.errors.WorkerLost"
    assert task.end_date_time is not None and task.lease_expires_at is None
    assert store.claim(worker_id="w2", names=["job"], limit=1, lease=LEASE) == []


def test_started_attempt_given_back_is_pending_and_counted_as_a_recovery(
    store: TaskStore,
) -> None:
    task_id = store.add(NewTask(name="job", max_attempts=1))
    c = claim_one(store)
    assert store.release([c], refund=False) == 1
    task = store.get(task_id)
    assert task is not None
    assert task.status is TaskStatus.PENDING
    assert (task.attempts, task.recoveries) == (0, 1)
    again = claim_one(store, "w2")
    assert (again.attempt, again.fence) == (1, 2)


def test_started_attempt_given_back_after_a_cancel_request_ends_cancelled(
    store: TaskStore,
) -> None:
    task_id = store.add(NewTask(name="job", max_attempts=3))
    c = claim_one(store)
    assert store.cancel(task_id) is TaskStatus.RUNNING
    assert store.release([c], refund=False) == 1
    task = store.get(task_id)
    assert task is not None
    assert task.status is TaskStatus.CANCELLED
    assert task.exception is not None and task.exception.type == "lilota.errors.TaskCancelled"


def test_unstarted_last_attempt_given_back_is_refunded(store: TaskStore) -> None:
    task_id = store.add(NewTask(name="job", max_attempts=1))
    c = claim_one(store)
    assert store.release([c], refund=True) == 1
    task = store.get(task_id)
    assert task is not None
    assert task.status is TaskStatus.PENDING and task.attempts == 0


def test_release_by_an_attempt_that_no_longer_holds_the_task_changes_nothing(
    store: TaskStore, clock: FakeClock
) -> None:
    task_id = store.add(NewTask(name="job", max_attempts=1, max_recoveries=0))
    old = claim_one(store)
    clock.advance(seconds=31)
    assert store.recover_expired() == [(task_id, "failed")]
    assert store.release([old], refund=False) == 0
    task = store.get(task_id)
    assert task is not None and task.status is TaskStatus.FAILED
    assert task.exception is not None and "stopped renewing" in task.exception.message


# --------------------------------------------------------------- fencing (state machine)


def test_stale_attempt_from_before_a_retry_cannot_write(store: TaskStore, clock: FakeClock) -> None:
    # retry() starts attempts from 0 again; the fence goes on (issue 14 item 1).
    task_id = store.add(NewTask(name="job", max_attempts=1, max_recoveries=0))
    stalled = claim_one(store, "w1")
    clock.advance(seconds=31)
    assert store.recover_expired() == [(task_id, "failed")]
    store.retry(task_id)
    current = claim_one(store, "w2")
    assert current.attempt == stalled.attempt == 1
    assert current.fence == stalled.fence + 1
    assert store.set_progress(task_id, stalled.fence, 50) is False
    late = Outcome(id=task_id, fence=stalled.fence, status="completed", output='"late"')
    assert store.finish([late]) == 0
    task = store.get(task_id)
    assert task is not None
    assert task.status is TaskStatus.RUNNING and task.worker_id == "w2"


def test_stale_attempt_from_before_a_recovery_cannot_write(
    store: TaskStore, clock: FakeClock
) -> None:
    # A recovery gives the lost attempt back, so the next claim is attempt 1 again.
    task_id = store.add(NewTask(name="job", max_attempts=1))
    stalled = claim_one(store, "w1")
    clock.advance(seconds=31)
    assert store.recover_expired() == [(task_id, "pending")]
    current = claim_one(store, "w2")
    assert current.attempt == stalled.attempt == 1
    assert store.set_progress(task_id, stalled.fence, 50) is False
    late = Outcome(id=task_id, fence=stalled.fence, status="completed", output='"late"')
    assert store.finish([late]) == 0
    assert store.release([stalled], refund=True) == 0
    assert store.finish([Outcome(id=task_id, fence=current.fence, status="completed")]) == 1


def test_refunded_release_does_not_let_the_earlier_claim_write(store: TaskStore) -> None:
    task_id = store.add(NewTask(name="job"))
    first = claim_one(store, "w1")
    assert store.release([first], refund=True) == 1
    second = claim_one(store, "w2")
    assert second.attempt == first.attempt and second.fence == first.fence + 1
    assert store.finish([Outcome(id=task_id, fence=first.fence, status="completed")]) == 0
    assert store.finish([Outcome(id=task_id, fence=second.fence, status="completed")]) == 1


# --------------------------------------------------------------- text (round trip)


def test_surrogate_pair_as_two_code_points_stays_two_code_points(store: TaskStore) -> None:
    # Found by test_store_roundtrip: JSON wrote "\ud83d\ude00" (two code points) exactly like
    # "\U0001f600" (one), and read both back as the one character.
    value = {"pair": "\ud83d\ude00", "\ud83d\ude00": ["x\udbff\udfffy"], "one": "\U0001f600"}
    text = dumps(value)
    assert text is not None and text.isascii()
    task_id = store.add(NewTask(name="job", input=text))
    c = claim_one(store)
    assert c.input == text
    back = loads(c.input)
    assert back == value
    assert len(back["pair"]) == 2 and len(back["one"]) == 1
    assert list(back) == list(value)
    task = store.get(task_id)
    assert task is not None and task.input == value


@pytest.mark.parametrize(
    ("argument", "text", "message"),
    [
        ("description", "a\x00b", r"^description contains a NUL character .* at index 1"),
        ("unique_key", "\x00", r"^unique_key contains a NUL character"),
        (
            "description",
            "a\ud800",
            r"^description contains the lone surrogate '\\ud800' at index 1",
        ),
        ("unique_key", "k\udfff", r"^unique_key contains the lone surrogate"),
    ],
)
def test_text_no_backend_can_store_is_refused_by_schedule_and_nothing_is_written(
    lilota_db_url: str, argument: str, text: str, message: str
) -> None:
    # Found by test_store_roundtrip: PostgreSQL refused NUL with a DatabaseError naming no
    # argument (SQLite stored it), and lone surrogates raised a bare UnicodeEncodeError.
    app = Lilota(lilota_db_url, number_of_workers=0)
    app.register("job")(lambda: None)
    app.store.ensure_schema()
    try:
        with pytest.raises(ValueError, match=message):
            app.schedule("job", **{argument: text})
        assert sum(app.store.count_by_status().values()) == 0
    finally:
        app.stop()
        app.store.dispose()


def test_new_task_refuses_nul_in_its_input_text() -> None:
    with pytest.raises(ValueError, match=r"^input contains a NUL character"):
        NewTask(name="job", input=json.dumps("x")[:-1] + '\x00"')


def test_a_retry_of_a_task_cancelled_while_it_ran_ends_cancelled_with_its_progress(
    store: TaskStore, clock: FakeClock
) -> None:
    # Found by the state machine (claim, progress, cancel, the attempt raises with attempts
    # left): the retry reset progress to 0 before the store turned it into cancelled.
    task_id = store.add(NewTask(name="job", max_attempts=3))
    claim = claim_one(store)
    assert store.set_progress(task_id, claim.fence, 40)
    assert store.cancel(task_id) == TaskStatus.RUNNING
    retry = Outcome(id=task_id, fence=claim.fence, status="pending", run_at=clock.now + LEASE)

    assert store.finish([retry]) == 1

    task = store.get(task_id)
    assert task is not None
    assert (task.status, task.progress_percentage) == (TaskStatus.CANCELLED, 40)
