"""Retry, lease and cancellation rules without processes or sleeping (a FakeClock moves
time), on every backend where the store is involved."""

from __future__ import annotations

import json
import re
import threading
from datetime import timedelta

import pytest

from conftest import FakeClock
from lilota import Lilota, execution
from lilota.errors import (
    ConfigurationError,
    InvalidInput,
    NoRetry,
    RegistrationError,
    SerializationError,
)
from lilota.models import DEFAULT_MAX_RECOVERIES, TaskStatus
from lilota.registry import (
    DEFAULT_MAX_ATTEMPTS,
    MAX_RETRY_DELAY,
    Registry,
    RetryPolicy,
    new_task,
)
from lilota.settings import ENV_CANCEL_GRACE_SECONDS, ENV_LEASE_SECONDS, WorkerSettings
from lilota.store import Claim, NewTask, Outcome, TaskStore

LEASE = timedelta(seconds=30)


def claim_one(store: TaskStore, worker: str = "w1") -> Claim:
    (claimed,) = store.claim(worker_id=worker, names=["job"], limit=1, lease=LEASE)
    return claimed


def definition(max_attempts: int = 3, retry_delay: float = 1.0):  # type: ignore[no-untyped-def]
    registry = Registry()
    registry.register("job", lambda: None, max_attempts=max_attempts, retry_delay=retry_delay)
    return registry.get("job")


# ----------------------------------------------------------------------------- back-off


def test_backoff_doubles_per_attempt_and_jitter_only_shortens_it() -> None:
    policy = RetryPolicy(max_attempts=10, retry_delay=timedelta(seconds=2))
    assert [policy.delay_after(n, rand=lambda: 0.0).total_seconds() for n in (1, 2, 3, 4)] == [
        2,
        4,
        8,
        16,
    ]
    assert policy.delay_after(3, rand=lambda: 1.0) == timedelta(seconds=6)  # 25 % off 8 s


def test_backoff_is_capped_at_one_hour() -> None:
    policy = RetryPolicy(max_attempts=50, retry_delay=timedelta(seconds=1))
    assert policy.delay_after(40, rand=lambda: 0.0) == MAX_RETRY_DELAY


def test_an_exception_fails_a_task_at_once_unless_it_asks_for_retries(clock: FakeClock) -> None:
    registry = Registry()
    registry.register("job", lambda: None)
    assert DEFAULT_MAX_ATTEMPTS == 1
    assert registry.get("job").retry.max_attempts == 1
    claim = Claim(id=7, name="job", input=None, attempt=1, max_attempts=1, fence=1)
    outcome = execution.failed(claim, registry.get("job"), ValueError("boom"), clock.now)
    assert (outcome.status, outcome.run_at) == ("failed", None)
    lilota = Lilota("sqlite://", number_of_workers=0)
    lilota.register("thrice", max_attempts=3)(lambda: None)
    lilota.register("default")(lambda: None)
    assert lilota.store.get(lilota.schedule("default")).max_attempts == 1  # type: ignore[union-attr]
    assert lilota.store.get(lilota.schedule("thrice")).max_attempts == 3  # type: ignore[union-attr]


def test_only_the_exceptions_of_retry_on_are_retried(clock: FakeClock) -> None:
    registry = Registry()
    registry.register("job", lambda: None, max_attempts=3, retry_on=(ConnectionError, TimeoutError))
    job = registry.get("job")
    claim = Claim(id=7, name="job", input=None, attempt=1, max_attempts=3, fence=1)
    assert (
        execution.failed(claim, job, ConnectionResetError("reset"), clock.now).status == "pending"
    )
    assert execution.failed(claim, job, TimeoutError("slow"), clock.now).status == "pending"
    assert execution.failed(claim, job, KeyError("k"), clock.now).status == "failed"


def test_no_retry_fails_at_once_with_attempts_left(clock: FakeClock) -> None:
    claim = Claim(id=7, name="job", input=None, attempt=1, max_attempts=3, fence=1)
    outcome = execution.failed(claim, definition(), NoRetry("the file is gone"), clock.now)
    assert outcome.status == "failed"
    record = json.loads(outcome.exception or "")
    assert (record["type"], record["message"]) == ("lilota.errors.NoRetry", "the file is gone")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry_on": 5}, "retry_on must be an exception class or a tuple of them, got 5"),
        ({"retry_on": (ValueError, "x")}, "retry_on must be an exception class"),
        ({"retry_on": ()}, "retry_on must name at least one exception class"),
        ({"max_recoveries": -1}, "max_recoveries must be an int from 0 to 2147483647, got -1"),
        ({"max_recoveries": 1.5}, "max_recoveries must be an int from 0 to 2147483647, got 1.5"),
    ],
)
def test_bad_retry_options_are_refused_at_registration(
    options: dict[str, object], message: str
) -> None:
    registry = Registry()
    with pytest.raises(RegistrationError, match=re.escape(message)):
        registry.register("job", lambda: None, **options)
    assert registry.find("job") is None


def test_a_task_carries_its_registered_recovery_limit(store: TaskStore) -> None:
    registry = Registry()
    registry.register("once", lambda: None, max_recoveries=0)
    registry.register("default", lambda: None)
    once = store.add(new_task("once", registry=registry))
    default = store.add(new_task("default", registry=registry))
    assert store.get(once).max_recoveries == 0  # type: ignore[union-attr]
    assert store.get(default).max_recoveries == DEFAULT_MAX_RECOVERIES == 3  # type: ignore[union-attr]


# ----------------------------------------------------------------------------- failures


def test_failure_with_attempts_left_is_a_retry_after_the_backoff(clock: FakeClock) -> None:
    claim = Claim(id=7, name="job", input=None, attempt=2, max_attempts=3, fence=2)
    outcome = execution.failed(claim, definition(retry_delay=1.0), ValueError("boom"), clock.now)
    assert outcome.status == "pending"
    assert outcome.run_at is not None
    # attempt 2 failed: the second retry waits 2 s, less up to 25 % jitter
    assert clock.now + timedelta(seconds=1.5) <= outcome.run_at <= clock.now + timedelta(seconds=2)
    assert json.loads(outcome.exception or "")["message"] == "boom"


def test_failure_of_the_last_attempt_is_final(clock: FakeClock) -> None:
    claim = Claim(id=7, name="job", input=None, attempt=3, max_attempts=3, fence=3)
    outcome = execution.failed(claim, definition(), ValueError("boom"), clock.now)
    assert (outcome.status, outcome.run_at) == ("failed", None)
    assert json.loads(outcome.exception or "")["type"] == "ValueError"


@pytest.mark.parametrize(
    "error", [SerializationError("output.x: not JSON"), InvalidInput("input.a: not an int")]
)
def test_an_input_or_output_that_cannot_work_is_not_retried(
    error: Exception, clock: FakeClock
) -> None:
    claim = Claim(id=7, name="job", input=None, attempt=1, max_attempts=3, fence=1)
    assert execution.failed(claim, definition(), error, clock.now).status == "failed"


def test_retry_keeps_the_last_exception_and_counts_attempts_until_the_last_fails(
    store: TaskStore, clock: FakeClock
) -> None:
    task_id = store.add(NewTask(name="job", max_attempts=3))
    job = definition(max_attempts=3, retry_delay=10.0)
    for attempt in (1, 2, 3):
        claimed = claim_one(store)
        assert claimed.attempt == attempt
        error = ConnectionError(f"attempt {attempt} failed")
        store.finish([execution.failed(claimed, job, error, clock.now)])
        task = store.get(task_id)
        assert task is not None and task.exception is not None
        assert (task.attempts, task.exception.message) == (attempt, f"attempt {attempt} failed")
        if attempt < 3:
            assert task.status is TaskStatus.PENDING
            assert store.claim(worker_id="w1", names=["job"], limit=1, lease=LEASE) == []
            clock.advance(seconds=10 * 2 ** (attempt - 1))
    assert task.status is TaskStatus.FAILED
    assert task.exception.type == "ConnectionError"
    assert task.end_date_time is not None


# ----------------------------------------------------------------------------- cancellation


def test_a_cancelled_task_that_fails_with_attempts_left_is_not_retried(store: TaskStore) -> None:
    task_id = store.add(NewTask(name="job", max_attempts=3))
    claimed = claim_one(store)
    assert store.cancel(task_id) is TaskStatus.RUNNING
    # the worker has not heard of the cancellation yet: it records a retry
    retry = execution.failed(claimed, definition(), ValueError("boom"), store.clock())
    assert retry.status == "pending"
    store.finish([retry])
    task = store.get(task_id)
    assert task is not None
    assert task.status is TaskStatus.CANCELLED
    assert task.end_date_time is not None
    assert store.claim(worker_id="w2", names=["job"], limit=1, lease=LEASE) == []


def test_a_cancelled_task_whose_worker_was_lost_ends_cancelled(
    store: TaskStore, clock: FakeClock
) -> None:
    task_id = store.add(NewTask(name="job", max_attempts=3))
    claim_one(store)
    store.cancel(task_id)
    clock.advance(seconds=31)
    assert store.recover_expired() == [(task_id, "cancelled")]
    task = store.get(task_id)
    assert task is not None and task.exception is not None
    assert task.status is TaskStatus.CANCELLED
    assert task.exception.type == "lilota.errors.TaskCancelled"
    assert "stopped renewing its lease" in task.exception.message


@pytest.mark.parametrize(
    ("status", "output", "told"),
    [
        ("completed", '"partial"', "it then returned"),
        ("failed", None, "it then raised ValueError: boom"),
        ("pending", None, "it then raised ValueError: boom"),
    ],
)
def test_an_attempt_told_to_cancel_ends_cancelled_however_it_ended(
    status: str, output: str | None, told: str
) -> None:
    error = json.dumps({"type": "ValueError", "message": "boom", "traceback": ""})
    outcome = Outcome(
        id=3,
        fence=1,
        status=status,
        output=output,
        exception=None if status == "completed" else error,
    )
    cancelled = execution.cancelled_while_running(outcome)
    assert (cancelled.status, cancelled.output, cancelled.run_at) == ("cancelled", output, None)
    exception = json.loads(cancelled.exception or "")
    assert exception["type"] == "lilota.errors.TaskCancelled"
    assert told in exception["message"]


# ----------------------------------------------------------------------------- leases


def test_only_the_leases_a_worker_knows_it_holds_are_renewed(
    store: TaskStore, clock: FakeClock
) -> None:
    store.add_many([NewTask(name="job", max_attempts=2) for _ in range(2)])
    known = claim_one(store)
    # a claim whose answer was lost with its connection: the worker never heard of it
    phantom = claim_one(store)
    for _ in range(3):
        clock.advance(seconds=20)
        report = store.renew_leases("w1", LEASE, task_ids=[known.id])
        assert report.held == {known.id}
    assert store.recover_expired() == [(phantom.id, "pending")]
    assert claim_one(store, "w2").id == phantom.id


def test_a_look_for_lost_tasks_takes_only_the_leases_that_expired_before_it_was_sent(
    store: TaskStore, clock: FakeClock
) -> None:
    # A look that hung through a network partition reaches the database after it heals:
    # the leases of workers cut off with it ran out meanwhile, through no fault of theirs.
    store.add_many([NewTask(name="job", max_attempts=2) for _ in range(2)])
    early = claim_one(store, "w1")  # lease until t+30
    clock.advance(seconds=10)
    late = claim_one(store, "w2")  # lease until t+40
    sent = clock.now + timedelta(seconds=25)  # t+35
    clock.advance(seconds=60)  # the look arrives a minute later
    assert store.recover_expired(before=sent) == [(early.id, "pending")]
    assert store.recover_expired() == [(late.id, "pending")]


def test_many_processes_recovering_at_once_take_each_task_once(
    lilota_db_url: str, clock: FakeClock
) -> None:
    stores = [TaskStore(lilota_db_url, clock=clock) for _ in range(4)]
    try:
        stores[0].ensure_schema()
        stores[0].add_many([NewTask(name="job", max_attempts=2) for _ in range(200)])
        stores[0].claim(worker_id="dead", names=["job"], limit=200, lease=LEASE)
        clock.advance(seconds=31)
        results: list[list[tuple[int, str]]] = [[] for _ in stores]
        start = threading.Barrier(len(stores))

        def recover(i: int) -> None:
            start.wait()
            results[i] = stores[i].recover_expired()

        threads = [threading.Thread(target=recover, args=(i,)) for i in range(len(stores))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        recovered = [task_id for result in results for task_id, _ in result]
        assert len(recovered) == 200
        assert len(set(recovered)) == 200
        assert stores[0].count_by_status()["pending"] == 200
    finally:
        for store in stores:
            store.dispose()


# ----------------------------------------------------------------------------- settings


def test_cancel_grace_and_lease_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_LEASE_SECONDS, "2")
    monkeypatch.setenv(ENV_CANCEL_GRACE_SECONDS, "0.5")
    settings = WorkerSettings.from_env()
    assert settings.lease == timedelta(seconds=2)
    assert settings.heartbeat <= timedelta(seconds=2 / 3)
    assert settings.cancel_grace == timedelta(seconds=0.5)


def test_a_short_lease_given_in_code_shortens_the_heartbeat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ENV_LEASE_SECONDS, raising=False)
    settings = WorkerSettings.from_env(lease=timedelta(seconds=1))
    assert settings.heartbeat * 2 <= settings.lease


def test_defaults_of_the_worker_settings() -> None:
    settings = WorkerSettings()
    assert settings.lease == timedelta(seconds=30)
    assert settings.heartbeat == timedelta(seconds=1)
    assert settings.cancel_grace == timedelta(seconds=10)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("cancel_grace", timedelta(seconds=-1)),
        ("cancel_grace", 5),
        ("lease", timedelta(0)),
        ("lease", 30),
    ],
)
def test_bad_lease_or_cancel_grace_is_refused_at_once(option: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=option):
        Lilota("sqlite://", number_of_workers=0, **{option: value})  # type: ignore[arg-type]
