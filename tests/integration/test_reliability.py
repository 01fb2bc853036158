"""What happens when things go wrong, with real worker processes on every backend:
workers SIGKILLed at random, PostgreSQL restarted mid-run, retries, timeouts,
cancellation, a dead supervisor's tasks taken over, cleanup, SQLite under load."""

from __future__ import annotations

import collections
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from lilota import Lilota, TaskStatus
from lilota.errors import DatabaseUnavailable, TaskAlreadyFinished, TaskNotFound
from lilota.models import Task
from tests.integration.apps import reliability_tasks
from tests.integration.apps.tasks import read_marks

log = logging.getLogger(__name__)

SHORT_LEASE = timedelta(seconds=2)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def marks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "marks"
    directory.mkdir()
    monkeypatch.setenv("LILOTA_TEST_MARKS", str(directory))
    return directory


MakeApp = Callable[..., Lilota]


@pytest.fixture
def make_app(marks: Path) -> Iterator[MakeApp]:
    """Started Lilota instances running apps/reliability_tasks.py; stopped at the end."""
    started: list[Lilota] = []

    def make(db_url: str, workers: int = 1, **options: Any) -> Lilota:
        lilota = Lilota(
            db_url, number_of_workers=workers, registry=reliability_tasks.app.registry, **options
        )
        lilota.start()
        started.append(lilota)
        return lilota

    yield make
    for lilota in started:
        lilota.stop(timeout=30)


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.02)
    return result


def started(marks: Path, key: str) -> list[str]:
    """The 'started <key> <attempt>' marks: one per run of that task."""
    return [m for m in read_marks(marks) if m.startswith(f"started {key} ")]


def wait_all(lilota: Lilota, ids: list[int], timeout: float) -> dict[int, Task]:
    wait_until(lambda: not lilota.store.unfinished(ids), f"{len(ids)} tasks to end", timeout)
    return lilota.store.get_many(ids)


# ----------------------------------------------------------------------------- crashes


@pytest.mark.containers
def test_workers_killed_at_random_lose_no_task(
    lilota_db_url: str,
    make_app: MakeApp,
    marks: Path,
    record_property: Callable[[str, object], None],
) -> None:
    lilota = make_app(lilota_db_url, workers=4, lease=SHORT_LEASE)
    ids = lilota.schedule_many("square", [{"n": n, "sleep": 0.005 * (n % 7)} for n in range(1000)])
    rng = random.Random(5)
    kills = 0
    while lilota.store.unfinished(ids) and kills < 10:
        time.sleep(rng.uniform(0.2, 0.5))
        pids = lilota.worker_pids
        if pids:
            os.kill(rng.choice(pids), signal.SIGKILL)
            kills += 1
    tasks = wait_all(lilota, ids, timeout=90)

    assert kills >= 5, "the tasks ended before the workers could be killed"
    assert {t.status for t in tasks.values()} == {TaskStatus.COMPLETED}
    assert all(t.output == {"n": t.input["n"], "square": t.input["n"] ** 2} for t in tasks.values())
    counts = lilota.store.count_by_status()
    assert counts["running"] == counts["pending"] == 0
    runs = collections.Counter(read_marks(marks))
    assert {f"square {n}" for n in range(1000)} <= set(runs)
    retried = sum(1 for t in tasks.values() if t.recoveries > 0)
    assert all(t.attempts == 1 for t in tasks.values())  # lost workers are recoveries
    assert retried > 0, "no killed worker held a task"
    more_than_once = sum(1 for count in runs.values() if count > 1)
    log.warning(
        "%s: %d SIGKILLs, %d of 1000 tasks had more than one attempt, %d ran more than once",
        lilota.store.dialect,
        kills,
        retried,
        more_than_once,
    )
    record_property("sigkills", kills)
    record_property("tasks_run_more_than_once", more_than_once)
    # a task runs again only if its worker died while holding it
    assert more_than_once <= retried


def test_a_dead_supervisors_task_is_taken_over_by_another_when_its_lease_expires(
    lilota_db_url: str, make_app: MakeApp, marks: Path, tmp_path: Path
) -> None:
    scheduler = make_app(lilota_db_url, workers=0)
    first = make_app(lilota_db_url, workers=1, lease=SHORT_LEASE)
    release = tmp_path / "release"
    task_id = scheduler.schedule("blocker", {"key": "b", "path": str(release)})
    wait_until(lambda: started(marks, "b"), "the task to start")
    (pid,) = first.worker_pids
    os.kill(pid, signal.SIGKILL)  # the machine is gone: nobody gives the task back
    first.stop(timeout=5)
    assert first.worker_pids == []
    task = scheduler.get_task_by_id(task_id)
    assert task is not None and task.status is TaskStatus.RUNNING and task.pid == pid

    release.touch()
    second = make_app(lilota_db_url, workers=1, lease=SHORT_LEASE)
    done = second.wait(task_id, timeout=60)
    assert done.status is TaskStatus.COMPLETED and done.output == "released"
    # A recovery: the lost attempt does not count.
    assert (done.attempts, done.recoveries) == (1, 1)
    assert done.pid in second.worker_pids
    assert sorted(started(marks, "b")) == ["started b 1", "started b 2"]


# ----------------------------------------------------------------------------- retries


def test_a_failing_task_is_retried_with_growing_delays_until_it_succeeds(
    lilota_db_url: str, make_app: MakeApp, marks: Path
) -> None:
    lilota = make_app(lilota_db_url, workers=1)
    task = lilota.wait(lilota.schedule("flaky", {"key": "f", "succeed_on": 3}), timeout=30)
    assert task.status is TaskStatus.COMPLETED
    assert task.output == "ok on attempt 3"
    assert (task.attempts, task.max_attempts) == (3, 3)
    times = [float(m.split()[3]) for m in read_marks(marks) if m.startswith("flaky f ")]
    assert len(times) == 3
    # retry_delay 200 ms, doubled, less at most 25 % jitter
    assert times[1] - times[0] >= 0.15
    assert times[2] - times[1] >= 0.3


def test_a_task_failing_every_attempt_ends_failed_with_the_last_exception(
    lilota_db_url: str, make_app: MakeApp, marks: Path
) -> None:
    lilota = make_app(lilota_db_url, workers=1)
    task = lilota.wait(lilota.schedule("flaky", {"key": "g", "succeed_on": 99}), timeout=30)
    assert task.status is TaskStatus.FAILED
    assert task.attempts == 3
    assert task.exception is not None
    assert task.exception.type == "ConnectionError"
    assert task.exception.message == "attempt 3 failed"
    assert len([m for m in read_marks(marks) if m.startswith("flaky g ")]) == 3


# ----------------------------------------------------------------------------- timeouts


def test_a_task_past_its_timeout_fails_and_its_worker_is_replaced(
    lilota_db_url: str, make_app: MakeApp
) -> None:
    lilota = make_app(lilota_db_url, workers=1)
    before = lilota.wait(lilota.schedule("pid"), timeout=30).output
    task = lilota.wait(lilota.schedule("slow", {"key": "s", "seconds": 60}), timeout=30)
    assert task.status is TaskStatus.FAILED
    assert task.exception is not None
    assert task.exception.type == "lilota.errors.TaskTimeout"
    assert "timeout of 0.5 s" in task.exception.message
    after = lilota.wait(lilota.schedule("pid"), timeout=30)
    assert after.status is TaskStatus.COMPLETED
    assert after.output != before


def test_a_task_past_its_timeout_is_retried_when_attempts_are_left(
    lilota_db_url: str, make_app: MakeApp
) -> None:
    lilota = make_app(lilota_db_url, workers=1)
    task = lilota.wait(lilota.schedule("slow-first-time"), timeout=30)
    assert task.status is TaskStatus.COMPLETED
    assert (task.output, task.attempts) == (2, 2)


# ----------------------------------------------------------------------------- cancellation


def test_a_cancelled_pending_task_never_runs(
    lilota_db_url: str, make_app: MakeApp, marks: Path, tmp_path: Path
) -> None:
    lilota = make_app(lilota_db_url, workers=1)
    release = tmp_path / "release"
    lilota.schedule("blocker", {"key": "busy", "path": str(release)})
    wait_until(lambda: started(marks, "busy"), "the worker to be busy")
    waiting = lilota.schedule("square", {"n": 12345})
    assert lilota.cancel(waiting) is TaskStatus.CANCELLED
    release.touch()
    assert lilota.wait(lilota.schedule("square", {"n": 1}), timeout=30).output == {
        "n": 1,
        "square": 1,
    }
    task = lilota.get_task_by_id(waiting)
    assert task is not None
    assert (task.status, task.attempts, task.start_date_time) == (TaskStatus.CANCELLED, 0, None)
    assert "square 12345" not in read_marks(marks)
    with pytest.raises(TaskAlreadyFinished):
        lilota.cancel(waiting)


def test_a_running_task_sees_the_cancellation_and_ends_cancelled(
    lilota_db_url: str, make_app: MakeApp, marks: Path
) -> None:
    lilota = make_app(lilota_db_url, workers=1)
    task_id = lilota.schedule("until-cancelled", {"key": "c"})
    wait_until(lambda: started(marks, "c"), "the task to start")
    assert lilota.cancel(task_id) is TaskStatus.RUNNING
    task = lilota.wait(task_id, timeout=30)
    assert task.status is TaskStatus.CANCELLED
    assert task.output == "stopped early"
    assert task.exception is not None and task.exception.type == "lilota.errors.TaskCancelled"
    assert task.attempts == 1 and task.cancel_requested
    assert task.pid in lilota.worker_pids  # it ended by itself: the worker goes on
    with pytest.raises(TaskAlreadyFinished):
        lilota.cancel(task_id)
    with pytest.raises(TaskNotFound):
        lilota.cancel(task_id + 1000)


def test_a_task_that_returns_after_a_cancellation_request_ends_cancelled_every_time(
    lilota_db_url: str, make_app: MakeApp, marks: Path, tmp_path: Path
) -> None:
    # The task returns right after cancel(), before its worker's next renewal could tell
    # it: the request still decides how it ends, every time.
    lilota = make_app(lilota_db_url, workers=1)
    began = time.monotonic()
    for run in range(20):
        release = tmp_path / f"release-{run}"
        task_id = lilota.schedule("blocker-once", {"key": f"r{run}", "path": str(release)})
        wait_until(lambda key=f"r{run}": started(marks, key), "the task to start", timeout=10)
        assert lilota.cancel(task_id) is TaskStatus.RUNNING
        release.touch()
        task = lilota.wait(task_id, timeout=10)
        assert (task.status, task.output) == (TaskStatus.CANCELLED, "released"), run
        assert task.exception is not None and "cancelled while it ran" in task.exception.message
    log.info("20 cancelled runs in %.1f s", time.monotonic() - began)


def test_a_running_task_ignoring_cancellation_is_ended_after_the_grace_period(
    lilota_db_url: str, make_app: MakeApp, marks: Path
) -> None:
    lilota = make_app(lilota_db_url, workers=1, cancel_grace=timedelta(milliseconds=500))
    task_id = lilota.schedule("ignores-cancel", {"key": "i"})
    wait_until(lambda: started(marks, "i"), "the task to start")
    (pid,) = lilota.worker_pids
    assert lilota.cancel(task_id) is TaskStatus.RUNNING
    task = lilota.wait(task_id, timeout=30)
    assert task.status is TaskStatus.CANCELLED
    assert task.exception is not None
    assert task.exception.type == "lilota.errors.TaskCancelled"
    assert "did not stop within 0.5 s" in task.exception.message
    later = lilota.wait(lilota.schedule("pid"), timeout=30)
    assert later.status is TaskStatus.COMPLETED and later.output != pid


# ----------------------------------------------------------------------------- retention


def test_cleanup_deletes_only_finished_tasks_older_than_asked(
    lilota_db_url: str, make_app: MakeApp, marks: Path, tmp_path: Path
) -> None:
    lilota = make_app(lilota_db_url, workers=1)
    done = [lilota.schedule("square", {"n": n}) for n in range(3)]
    failed = lilota.schedule("flaky", {"key": "x", "succeed_on": 99})
    for task_id in [*done, failed]:
        lilota.wait(task_id, timeout=30)
    cancelled = lilota.schedule("square", {"n": 9}, delay=timedelta(hours=1))
    lilota.cancel(cancelled)
    pending = lilota.schedule("square", {"n": 10}, delay=timedelta(hours=1))
    release = tmp_path / "release"
    running = lilota.schedule("blocker", {"key": "r", "path": str(release)})
    wait_until(lambda: started(marks, "r"), "the task to start")

    assert lilota.cleanup(older_than=timedelta(hours=1)) == 0
    assert lilota.cleanup(older_than=timedelta(0)) == 5
    assert lilota.store.get_many([*done, failed, cancelled]) == {}
    left = lilota.store.get_many([pending, running])
    assert left[pending].status is TaskStatus.PENDING
    assert left[running].status is TaskStatus.RUNNING
    release.touch()
    assert lilota.wait(running, timeout=30).status is TaskStatus.COMPLETED
    with pytest.raises(ValueError, match="older_than"):
        lilota.cleanup(older_than=timedelta(seconds=-1))


# ----------------------------------------------------------------------------- SQLite


SCHEDULER = textwrap.dedent(
    """
    import json, sys
    from lilota import Lilota

    url, first = sys.argv[1], int(sys.argv[2])
    lilota = Lilota(url, number_of_workers=0)
    ids = []
    for n in range(first, first + 100):
        ids.append(lilota.schedule("square", {"n": n}))
        if n % 10 == 0:
            lilota.get_tasks(limit=5)
            lilota.store.count_by_status()
    ids += lilota.schedule_many("square", [{"n": n} for n in range(first + 100, first + 200)])
    ids += lilota.schedule_many("chain", [{"n": n} for n in range(first + 200, first + 300)])
    print(json.dumps(ids))
    """
)


def test_sqlite_with_many_processes_scheduling_and_working_at_once(
    lilota_sqlite_url: str, make_app: MakeApp, marks: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    lilota = make_app(lilota_sqlite_url, workers=4)
    schedulers = [
        subprocess.Popen(
            [sys.executable, "-c", SCHEDULER, lilota_sqlite_url, str(k * 1000)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(4)
    ]
    ids: list[int] = []
    for process in schedulers:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert "locked" not in err
        ids += json.loads(out)
    assert len(ids) == len(set(ids)) == 1200
    tasks = wait_all(lilota, ids, timeout=90)
    assert {t.status for t in tasks.values()} == {TaskStatus.COMPLETED}
    chained = [t.output for t in tasks.values() if t.name == "chain"]
    follow_ups = wait_all(lilota, chained, timeout=60)
    assert {t.status for t in follow_ups.values()} == {TaskStatus.COMPLETED}
    numbers = {k * 1000 + i for k in range(4) for i in range(300)}
    runs = collections.Counter(read_marks(marks))
    assert runs == collections.Counter(f"square {n}" for n in numbers)  # each ran exactly once
    assert lilota.store.count_by_status()["completed"] == 1600
    assert "locked" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- PostgreSQL


@pytest.fixture
def postgres_control(lilota_postgres: Any) -> Iterator[Any]:
    if not lilota_postgres.can_control:
        pytest.skip("needs the throwaway local PostgreSQL cluster to stop and start it")
    yield lilota_postgres
    if not lilota_postgres.is_running():
        lilota_postgres.start()


def test_postgres_restart_in_the_middle_of_a_run_loses_nothing(
    lilota_postgres_url: str,
    postgres_control: Any,
    make_app: MakeApp,
    marks: Path,
    tmp_path: Path,
) -> None:
    lilota = make_app(lilota_postgres_url, workers=3, lease=SHORT_LEASE)
    release = tmp_path / "release"
    held = lilota.schedule("blocker-once", {"key": "h", "path": str(release)})
    wait_until(lambda: started(marks, "h"), "the task to start")
    ids = lilota.schedule_many("square", [{"n": n, "sleep": 0.01} for n in range(600)])
    wait_until(lambda: lilota.store.count_by_status()["completed"] >= 50, "some progress")
    pids = sorted(lilota.worker_pids)

    postgres_control.stop()
    try:
        with pytest.raises(DatabaseUnavailable):
            lilota.schedule("square", {"n": -1})
        release.touch()  # the held task finishes while the database is away...
        time.sleep(SHORT_LEASE.total_seconds() * 1.5)  # ...for longer than a lease
    finally:
        postgres_control.start()

    tasks = wait_all(lilota, [*ids, held], timeout=90)
    assert {t.status for t in tasks.values()} == {TaskStatus.COMPLETED}
    assert all(t.output == {"n": t.input["n"], "square": t.input["n"] ** 2} for t in ids_of(tasks))
    # ...and its outcome is recorded when it is back: it is not run a second time
    assert tasks[held].output == "released" and tasks[held].attempts == 1
    assert started(marks, "h") == ["started h 1"]
    assert sorted(lilota.worker_pids) == pids  # no worker died or was replaced
    after = lilota.wait(lilota.schedule("square", {"n": 7}), timeout=30)
    assert after.output == {"n": 7, "square": 49}
    counts = lilota.store.count_by_status()
    assert counts["running"] == counts["pending"] == 0


def ids_of(tasks: dict[int, Task]) -> list[Task]:
    return [t for t in tasks.values() if t.name == "square"]


def test_postgres_listener_reconnects_after_a_restart_and_hears_new_tasks(
    lilota_postgres_url: str, postgres_control: Any
) -> None:
    from lilota.store import NewTask, TaskStore

    store = TaskStore(lilota_postgres_url)
    store.ensure_schema()
    listener = store.listener()
    try:
        postgres_control.restart()
        # The lost connection reads as "look for work"; once reconnected it is quiet.
        assert any(not listener.wait(0.2) for _ in range(50))
        store.add(NewTask(name="job"))
        assert listener.wait(10) is True
    finally:
        listener.close()
        store.dispose()
