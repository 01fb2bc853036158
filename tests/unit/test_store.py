"""The task store on every backend: claiming, fencing, leases, actions, queries."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from urllib.parse import quote

import pytest

from conftest import FakeClock
from lilota.errors import (
    ConfigurationError,
    InvalidArgumentType,
    SchemaVersionError,
    TaskAlreadyFinished,
    TaskNotFound,
)
from lilota.models import TaskStatus
from lilota.store import SCHEMA_VERSION, NewTask, Outcome, TaskStore, parse_url, schema_table

LEASE = timedelta(seconds=30)


def claim(store: TaskStore, worker: str = "w1", limit: int = 10, names=("job",)):
    return store.claim(worker_id=worker, names=names, limit=limit, lease=LEASE)


def completed(c, output=None) -> Outcome:
    return Outcome(id=c.id, fence=c.fence, status="completed", output=output)


def test_added_task_is_pending_with_its_input(store: TaskStore) -> None:
    task_id = store.add(NewTask(name="job", input='{"a": 1}', description="first"))
    task = store.get(task_id)
    assert task is not None
    assert task.status is TaskStatus.PENDING
    assert task.input == {"a": 1}
    assert task.description == "first"
    assert task.progress_percentage == 0
    assert task.attempts == 0
    assert task.created_at is not None and task.created_at.tzinfo is not None


def test_unknown_id_reads_as_none(store: TaskStore) -> None:
    assert store.get(12345) is None
    assert store.get(2**70) is None  # no task can have it: the same answer on every backend


def test_an_id_that_is_not_an_int_is_refused_rather_than_read_as_missing(store: TaskStore) -> None:
    store.add(NewTask(name="job"))
    with pytest.raises(InvalidArgumentType, match=r"task_id must be an int, got '1' \(str\)"):
        store.get("1")  # type: ignore[arg-type]


def test_claim_takes_each_task_once(store: TaskStore) -> None:
    ids = store.add_many([NewTask(name="job") for _ in range(5)])
    first = claim(store, "w1", limit=3)
    second = claim(store, "w2", limit=10)
    assert [c.id for c in first] == ids[:3]
    assert [c.id for c in second] == ids[3:]
    assert claim(store, "w3") == []
    task = store.get(ids[0])
    assert task is not None
    assert task.status is TaskStatus.RUNNING
    assert task.attempts == 1
    assert task.worker_id == "w1"
    assert task.start_date_time is not None
    assert task.lease_expires_at is not None


def test_claim_order_is_priority_then_time_then_id(store: TaskStore, clock: FakeClock) -> None:
    low = store.add(NewTask(name="job"))
    clock.advance(seconds=1)
    high = store.add(NewTask(name="job", priority=5))
    also_low = store.add(NewTask(name="job"))
    assert [c.id for c in claim(store, limit=10)] == [high, low, also_low]


def test_higher_priority_is_claimed_first(store: TaskStore) -> None:
    low = store.add(NewTask(name="job", priority=0))
    high = store.add(NewTask(name="job", priority=10))
    assert [c.id for c in claim(store, limit=1)] == [high]
    assert [c.id for c in claim(store, limit=1)] == [low]


def test_delayed_task_is_not_claimed_before_its_time(store: TaskStore, clock: FakeClock) -> None:
    task_id = store.add(NewTask(name="job", run_at=clock.now + timedelta(seconds=10)))
    assert claim(store) == []
    assert store.next_run_at(["job"]) == clock.now + timedelta(seconds=10)
    clock.advance(seconds=10)
    assert [c.id for c in claim(store)] == [task_id]


def test_claim_takes_only_the_names_asked_for(store: TaskStore) -> None:
    store.add(NewTask(name="other"))
    mine = store.add(NewTask(name="job"))
    assert [c.id for c in claim(store, names=["job"])] == [mine]
    assert claim(store, names=["job"]) == []
    assert claim(store, names=[]) == []


def test_finish_records_output_progress_and_end(store: TaskStore) -> None:
    store.add(NewTask(name="job"))
    (c,) = claim(store)
    assert store.finish([completed(c, output='{"sum": 5}')]) == 1
    task = store.get(c.id)
    assert task is not None
    assert task.status is TaskStatus.COMPLETED
    assert task.output == {"sum": 5}
    assert task.progress_percentage == 100
    assert task.end_date_time is not None
    assert task.lease_expires_at is None
    assert task.worker_id == "w1"


def test_claim_records_finished_outcomes_in_the_same_call(store: TaskStore) -> None:
    store.add_many([NewTask(name="job"), NewTask(name="job")])
    (first,) = claim(store, limit=1)
    (second,) = store.claim(
        worker_id="w1", names=["job"], limit=1, lease=LEASE, finished=[completed(first)]
    )
    task = store.get(first.id)
    assert task is not None and task.status is TaskStatus.COMPLETED
    assert second.id != first.id


def test_stale_attempt_cannot_overwrite_a_newer_one(store: TaskStore, clock: FakeClock) -> None:
    store.add(NewTask(name="job", max_attempts=3))
    (old,) = claim(store, "w1")
    clock.advance(seconds=31)
    assert store.recover_expired() == [(old.id, "pending")]
    (new,) = claim(store, "w2")
    # A recovery: the lost attempt does not count, the claim has a new fence.
    assert (new.attempt, new.fence) == (old.attempt, old.fence + 1)
    # The first worker comes back from a freeze and tries to write:
    assert store.set_progress(old.id, old.fence, 50) is False
    assert store.finish([completed(old, output='"stale"')]) == 0
    task = store.get(new.id)
    assert task is not None
    assert task.status is TaskStatus.RUNNING
    assert task.output is None
    assert store.finish([completed(new, output='"fresh"')]) == 1
    task = store.get(new.id)
    assert task is not None and task.output == "fresh"


def test_final_states_stay_final(store: TaskStore) -> None:
    store.add(NewTask(name="job"))
    (c,) = claim(store)
    store.finish([completed(c)])
    assert store.finish([Outcome(id=c.id, fence=c.fence, status="failed")]) == 0
    task = store.get(c.id)
    assert task is not None and task.status is TaskStatus.COMPLETED


def test_expired_lease_without_recoveries_left_fails_with_worker_lost(
    store: TaskStore, clock: FakeClock
) -> None:
    store.add(NewTask(name="job", max_attempts=3, max_recoveries=1))
    (first,) = claim(store, "host:0:abc")
    clock.advance(seconds=31)
    # A lost worker's task runs again (a recovery; the attempt does not count)...
    assert store.recover_expired() == [(first.id, "pending")]
    (c,) = claim(store, "host:1:abc")
    assert (c.attempt, c.fence) == (1, 2)
    clock.advance(seconds=29)
    assert store.recover_expired() == []
    clock.advance(seconds=2)
    # ...up to max_recoveries times, whatever attempts are left.
    assert store.recover_expired() == [(c.id, "failed")]
    task = store.get(c.id)
    assert task is not None
    assert task.status is TaskStatus.FAILED
    assert task.exception is not None
    assert task.exception.type == "lilota.errors.WorkerLost"
    assert "host:1:abc" in task.exception.message
    assert task.end_date_time is not None


def test_renewed_lease_does_not_expire(store: TaskStore, clock: FakeClock) -> None:
    store.add(NewTask(name="job"))
    (c,) = claim(store, "w1")
    for _ in range(5):
        clock.advance(seconds=20)
        report = store.renew_leases("w1", LEASE)
        assert report.held == {c.id}
        assert store.recover_expired() == []


def test_renewal_reports_cancellation_requests(store: TaskStore) -> None:
    store.add(NewTask(name="job"))
    (c,) = claim(store, "w1")
    assert store.cancel(c.id) is TaskStatus.RUNNING
    report = store.renew_leases("w1", LEASE)
    assert report.cancel_requested == {c.id}


def test_progress_is_written_for_the_holding_attempt(store: TaskStore) -> None:
    store.add(NewTask(name="job"))
    (c,) = claim(store)
    assert store.set_progress(c.id, c.fence, 42) is True
    task = store.get(c.id)
    assert task is not None and task.progress_percentage == 42


def test_release_gives_unstarted_tasks_back_without_using_an_attempt(store: TaskStore) -> None:
    store.add(NewTask(name="job"))
    (c,) = claim(store)
    assert store.release([c], refund=True) == 1
    task = store.get(c.id)
    assert task is not None
    assert task.status is TaskStatus.PENDING
    assert task.attempts == 0
    assert task.worker_id is None


def test_failed_attempt_with_retry_goes_back_to_pending_at_its_time(
    store: TaskStore, clock: FakeClock
) -> None:
    store.add(NewTask(name="job", max_attempts=2))
    (c,) = claim(store)
    later = clock.now + timedelta(seconds=5)
    error = json.dumps({"type": "ValueError", "message": "boom", "traceback": "tb"})
    store.finish([Outcome(id=c.id, fence=c.fence, status="pending", exception=error, run_at=later)])
    task = store.get(c.id)
    assert task is not None
    assert task.status is TaskStatus.PENDING
    assert task.exception is not None and task.exception.message == "boom"
    assert claim(store) == []
    clock.advance(seconds=5)
    (again,) = claim(store)
    assert again.attempt == 2


def test_cancel_pending_task_is_final_and_never_claimed(store: TaskStore) -> None:
    task_id = store.add(NewTask(name="job"))
    assert store.cancel(task_id) is TaskStatus.CANCELLED
    assert claim(store) == []
    task = store.get(task_id)
    assert task is not None
    assert task.status is TaskStatus.CANCELLED
    assert task.end_date_time is not None


def test_cancel_finished_or_unknown_task_is_an_error(store: TaskStore) -> None:
    task_id = store.add(NewTask(name="job"))
    store.cancel(task_id)
    with pytest.raises(TaskAlreadyFinished, match="already cancelled"):
        store.cancel(task_id)
    with pytest.raises(TaskNotFound, match="no task with id 999"):
        store.cancel(999)


def test_retry_schedules_failed_task_again(store: TaskStore) -> None:
    store.add(NewTask(name="job"))
    (c,) = claim(store)
    store.finish([Outcome(id=c.id, fence=c.fence, status="failed", exception='{"type": "E"}')])
    store.retry(c.id)
    task = store.get(c.id)
    assert task is not None
    assert task.status is TaskStatus.PENDING
    assert task.attempts == 0
    assert task.exception is None
    with pytest.raises(ValueError, match="only failed or cancelled"):
        store.retry(c.id)
    with pytest.raises(TaskNotFound):
        store.retry(424242)


def test_cleanup_deletes_only_old_finished_tasks(store: TaskStore, clock: FakeClock) -> None:
    old_done = store.add(NewTask(name="job"))
    (c,) = claim(store)
    store.finish([completed(c)])
    old_cancelled = store.add(NewTask(name="job"))
    store.cancel(old_cancelled)
    old_pending = store.add(NewTask(name="job", run_at=clock.now + timedelta(days=30)))
    clock.advance(days=8)
    recent = store.add(NewTask(name="job"))
    (r,) = claim(store)
    store.finish([completed(r)])
    assert store.cleanup(timedelta(days=7)) == 2
    assert store.get(old_done) is None
    assert store.get(old_cancelled) is None
    assert store.get(old_pending) is not None
    assert store.get(recent) is not None
    with pytest.raises(ValueError, match="older_than"):
        store.cleanup(-timedelta(days=1))


def test_cleanup_older_than_any_date_deletes_nothing(store: TaskStore, clock: FakeClock) -> None:
    store.cancel(store.add(NewTask(name="job")))
    clock.advance(days=1)
    assert store.cleanup(timedelta.max) == 0  # before the year 1: nothing ended then
    assert store.cleanup(timedelta(0)) == 1


def test_unique_key_returns_the_active_task(store: TaskStore) -> None:
    first = store.add(NewTask(name="job", unique_key="report-7"))
    assert store.add(NewTask(name="job", unique_key="report-7")) == first
    (c,) = claim(store)
    assert store.add(NewTask(name="job", unique_key="report-7")) == first  # running
    store.finish([completed(c)])
    assert store.add(NewTask(name="job", unique_key="report-7")) != first  # finished: new one


def test_unique_key_under_concurrent_scheduling_adds_one_task(store: TaskStore) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def schedule() -> None:
        try:
            results.append(store.add(NewTask(name="job", unique_key="k")))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=schedule) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1
    assert store.count_by_status()["pending"] == 1


def test_schedule_key_creates_a_tick_once(store: TaskStore) -> None:
    first = store.add(NewTask(name="job", schedule_key="job@2026-01-01T00:00"))
    assert first > 0
    assert store.add(NewTask(name="job", schedule_key="job@2026-01-01T00:00")) == -1
    (c,) = claim(store)
    store.finish([completed(c)])
    assert store.add(NewTask(name="job", schedule_key="job@2026-01-01T00:00")) == -1


def test_add_many_returns_ids_in_input_order(store: TaskStore) -> None:
    ids = store.add_many([NewTask(name="job", input=str(i)) for i in range(50)])
    assert ids == sorted(ids)
    assert [store.get(i).input for i in ids[:3]] == [0, 1, 2]  # type: ignore[union-attr]
    assert store.add_many([]) == []


def test_queries_count_and_list(store: TaskStore) -> None:
    store.add_many([NewTask(name="a"), NewTask(name="a"), NewTask(name="b")])
    store.claim(worker_id="w", names=["b"], limit=1, lease=LEASE)
    assert store.count_by_status() == {
        "pending": 2,
        "running": 1,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert store.count_by_name()["a"]["pending"] == 2
    newest = store.list_tasks(limit=2)
    assert [t.id for t in newest] == sorted((t.id for t in newest), reverse=True)
    assert [t.name for t in store.list_tasks(status="pending", name="a")] == ["a", "a"]
    page2 = store.list_tasks(limit=2, before_id=newest[-1].id)
    assert len(page2) == 1
    with pytest.raises(ValueError):
        store.list_tasks(status="bogus")


def test_unfinished_due_only_leaves_out_future_tasks(store: TaskStore, clock: FakeClock) -> None:
    now_id = store.add(NewTask(name="job"))
    later_id = store.add(NewTask(name="job", run_at=clock.now + timedelta(hours=1)))
    assert store.unfinished([now_id, later_id]) == {now_id, later_id}
    assert store.unfinished([now_id, later_id], due_only=True) == {now_id}


def test_workers_table_tracks_heartbeats(store: TaskStore, clock: FakeClock) -> None:
    store.register_worker("w1", ["b", "a"])
    (row,) = store.workers()
    assert row["task_names"] == ["a", "b"]
    clock.advance(seconds=120)
    assert store.workers(seen_within=timedelta(seconds=60)) == []
    assert store.forget_dead_workers(timedelta(seconds=60)) == 1


def test_ensure_schema_is_idempotent_and_records_its_version(lilota_db_url: str) -> None:
    first = TaskStore(lilota_db_url)
    assert first.schema_version() is None
    first.ensure_schema()
    second = TaskStore(lilota_db_url)
    second.ensure_schema()
    assert second.schema_version() == SCHEMA_VERSION


def test_concurrent_first_starts_create_the_schema_once(lilota_db_url: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            TaskStore(lilota_db_url).ensure_schema()
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert TaskStore(lilota_db_url).schema_version() == SCHEMA_VERSION


def test_newer_schema_is_refused(lilota_db_url: str) -> None:
    store = TaskStore(lilota_db_url)
    store.ensure_schema()
    store._run(
        lambda conn: conn.execute(
            schema_table.insert().values(version=SCHEMA_VERSION + 1, applied_at=store.clock())
        )
    )
    with pytest.raises(SchemaVersionError, match="newer than this lilota"):
        TaskStore(lilota_db_url).ensure_schema()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("not a url", "is not a database URL"),
        ("", "is not a database URL"),
        ("nosuchdb://x/y", "no dialect"),
        ("sqlite:////no/such/dir/x.db", "does not exist"),
        (42, "must be a string"),
    ],
)
def test_malformed_db_url_is_refused_with_the_reason(url: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_url(url)


def test_plain_postgresql_url_means_psycopg3() -> None:
    assert parse_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert parse_url("postgresql+psycopg://u@h/db").drivername == "postgresql+psycopg"


def test_an_attempt_that_ends_after_a_cancellation_request_ends_cancelled(
    store: TaskStore,
) -> None:
    # The worker had not yet seen the request when the task returned (or raised): the
    # store ends it cancelled all the same, keeping its output; others are untouched.
    ids = store.add_many([NewTask(name="job") for _ in range(3)])
    returned, raised, other = claim(store)
    for c in (returned, raised):
        assert store.cancel(c.id) is TaskStatus.RUNNING
    error = json.dumps({"type": "ValueError", "message": "boom"})
    outcomes = [
        completed(returned, output="42"),
        Outcome(id=raised.id, fence=raised.fence, status="failed", exception=error),
        completed(other, output="7"),
    ]

    assert store.finish(outcomes) == 3

    first, second, third = (store.get(i) for i in ids)
    assert first is not None and second is not None and third is not None
    assert (first.status, first.output) == (TaskStatus.CANCELLED, 42)
    assert first.exception is not None and first.exception.type.endswith("TaskCancelled")
    assert "cancelled while it ran; it then returned" in first.exception.message
    assert second.status is TaskStatus.CANCELLED
    assert second.exception is not None and "raised ValueError: boom" in second.exception.message
    assert (third.status, third.output, third.progress_percentage) == (
        TaskStatus.COMPLETED,
        7,
        100,
    )
    assert first.end_date_time is not None and first.lease_expires_at is None


def test_postgres_sessions_end_when_left_idle_in_a_transaction_unless_the_url_says(
    lilota_postgres_url: str,
) -> None:
    # A worker cut off from the network between two statements of a transaction would
    # otherwise keep its rows locked (its tasks skipped by recovery) until it heals.
    def setting(url: str) -> str:
        store = TaskStore(url)
        try:
            with store.dialect.engine.connect() as conn:
                return str(
                    conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar()
                )
        finally:
            store.dispose()

    assert setting(lilota_postgres_url) == "10s"
    own = "-c idle_in_transaction_session_timeout=3min"
    separator = "&" if "?" in lilota_postgres_url else "?"
    assert setting(f"{lilota_postgres_url}{separator}options={quote(own)}") == "3min"
