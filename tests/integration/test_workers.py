"""Real worker processes on every backend: exactly-once claiming, progress, stop, errors."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lilota import Lilota, TaskStatus
from lilota.errors import (
    ConfigurationError,
    InvalidInput,
    LilotaStopped,
    SerializationError,
    TaskAlreadyRegistered,
    TaskNotRegistered,
    WorkerStartupError,
)
from tests.integration.apps import tasks
from tests.integration.apps.tasks import AddInput, read_marks


@pytest.fixture
def marks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "marks"
    directory.mkdir()
    monkeypatch.setenv("LILOTA_TEST_MARKS", str(directory))
    return directory


@pytest.fixture
def make_app(lilota_db_url: str, marks: Path) -> Iterator:  # type: ignore[type-arg]
    """Builds started Lilota instances running the tasks of apps/tasks.py; stops them."""
    started: list[Lilota] = []

    def make(workers: int = 2) -> Lilota:
        lilota = Lilota(lilota_db_url, number_of_workers=workers, registry=tasks.app.registry)
        lilota.start()
        started.append(lilota)
        return lilota

    yield make
    for lilota in started:
        lilota.stop(timeout=30)


@pytest.mark.containers
def test_eight_workers_run_each_of_8000_tasks_exactly_once(make_app, marks: Path) -> None:  # type: ignore[no-untyped-def]
    lilota = make_app(workers=8)
    assert len(lilota.worker_pids) == 8
    ids = lilota.schedule_many("record", [{"n": n} for n in range(8000)])
    lilota.stop()
    runs = collections.Counter(read_marks(marks))
    assert len(runs) == 8000
    assert set(runs.values()) == {1}, [n for n, c in runs.items() if c > 1][:10]
    assert lilota.store.count_by_status()["completed"] == 8000
    assert lilota.store.unfinished(ids) == set()


@pytest.mark.containers
def test_progress_is_seen_from_another_process_while_the_task_runs(
    make_app,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    lilota = make_app(workers=1)
    task_id = lilota.schedule("stepped-progress", {"dir": str(tmp_path)})
    for step in (25, 50, 75):
        deadline = time.monotonic() + 30
        while (task := lilota.get_task_by_id(task_id)).progress_percentage != step:
            assert time.monotonic() < deadline, f"progress stuck at {task.progress_percentage}"
            time.sleep(0.01)
        assert task.status is TaskStatus.RUNNING
        assert task.pid in lilota.worker_pids and task.pid != os.getpid()
        (tmp_path / f"seen-{step}").touch()
    task = lilota.wait(task_id, timeout=30)
    assert (task.status, task.progress_percentage) == (TaskStatus.COMPLETED, 100)


@pytest.mark.containers
def test_stop_finishes_running_and_scheduled_tasks(make_app, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lilota = make_app(workers=2)
    release = tmp_path / "release"
    running = lilota.schedule("wait-for-file", {"path": str(release)})
    queued = lilota.schedule_many("add", [AddInput(a=i, b=i) for i in range(20)])
    deadline = time.monotonic() + 30
    while lilota.get_task_by_id(running).status is not TaskStatus.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.01)

    stopper = threading.Thread(target=lilota.stop)
    stopper.start()
    time.sleep(0.3)  # stop() is now waiting for the running task
    assert stopper.is_alive()
    release.touch()
    stopper.join(timeout=60)
    assert not stopper.is_alive()
    assert lilota.get_task_by_id(running).status is TaskStatus.COMPLETED
    assert all(lilota.get_task_by_id(i).status is TaskStatus.COMPLETED for i in queued)
    assert lilota.worker_pids == []
    assert lilota.store.count_by_status()["running"] == 0


def test_failing_task_is_recorded_and_the_worker_goes_on(make_app) -> None:  # type: ignore[no-untyped-def]
    lilota = make_app(workers=1)
    bad = lilota.wait(lilota.schedule("fail", {"x": 7}), timeout=30)
    good = lilota.wait(lilota.schedule("add", AddInput(a=2, b=3)), timeout=30)
    assert bad.status is TaskStatus.FAILED
    assert bad.exception is not None
    assert bad.exception.type == "ValueError"
    assert bad.exception.message == "boom 7"
    assert 'raise ValueError(f"boom' in bad.exception.traceback
    assert bad.end_date_time is not None
    assert good.status is TaskStatus.COMPLETED and good.output == {"sum": 5}
    assert bad.pid == good.pid  # the same worker process carried on


def test_progress_outside_0_to_100_fails_the_task_with_a_clear_error(make_app) -> None:  # type: ignore[no-untyped-def]
    lilota = make_app(workers=1)
    task = lilota.wait(lilota.schedule("bad-progress"), timeout=30)
    assert task.status is TaskStatus.FAILED
    assert task.exception is not None
    # An InvalidArgument, which is a ValueError (and a LilotaError).
    assert task.exception.type == "lilota.errors.InvalidArgument"
    assert "progress must be from 0 to 100, got 150" in task.exception.message


def test_bad_input_is_refused_and_nothing_is_written(make_app) -> None:  # type: ignore[no-untyped-def]
    lilota = make_app(workers=1)
    with pytest.raises(TaskNotRegistered, match="no task named 'nope'"):
        lilota.schedule("nope")
    with pytest.raises(InvalidInput, match="input"):
        lilota.schedule("add", {"a": 1})
    with pytest.raises(InvalidInput, match="input"):
        lilota.schedule("add", [1, 2])
    with pytest.raises(SerializationError, match="input"):
        lilota.schedule("record", {"n": object()})
    with pytest.raises(InvalidInput):
        lilota.schedule_many("add", [AddInput(a=1, b=2), {"a": "x"}])
    assert sum(lilota.store.count_by_status().values()) == 0
    assert lilota.get_task_by_id(1) is None


def test_configuration_errors_are_raised_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not a database URL"):
        Lilota("localhost:5432/db")
    with pytest.raises(ConfigurationError, match="is not a file"):
        Lilota(f"sqlite:///{tmp_path}/x.db", script_path=tmp_path / "missing.py")
    with pytest.raises(ConfigurationError, match="number_of_workers"):
        Lilota(f"sqlite:///{tmp_path}/x.db", number_of_workers=-1)
    lilota = Lilota(f"sqlite:///{tmp_path}/x.db")

    @lilota.register("add")
    def add(data: dict) -> None: ...

    with pytest.raises(TaskAlreadyRegistered):
        lilota.register("add")(add)


def test_script_that_cannot_start_gives_its_output(tmp_path: Path, lilota_db_url: str) -> None:
    script = tmp_path / "broken.py"
    script.write_text("from lilota import LilotaWorker\nworker = LilotaWorker(\n")
    lilota = Lilota(lilota_db_url, script_path=script, number_of_workers=1)
    with pytest.raises(WorkerStartupError, match="SyntaxError"):
        lilota.start()


def test_scheduler_without_workers_stops_at_once(lilota_db_url: str) -> None:
    lilota = Lilota(lilota_db_url)
    lilota.start()
    task_id = lilota.schedule("anything", {"x": 1})
    started = time.monotonic()
    lilota.stop()
    assert time.monotonic() - started < 5
    assert lilota.get_task_by_id(task_id).status is TaskStatus.PENDING
    with pytest.raises(LilotaStopped):
        lilota.schedule("anything")


def test_workers_end_when_the_process_that_started_them_dies(
    tmp_path: Path, lilota_db_url: str
) -> None:
    main = tmp_path / "main.py"
    main.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            sys.path.insert(0, {str(Path(__file__).parents[2])!r})
            from lilota import Lilota
            from tests.integration.apps import tasks

            lilota = Lilota({lilota_db_url!r}, number_of_workers=2, registry=tasks.app.registry)
            if __name__ == "__main__":
                lilota.start()
                print(*lilota.worker_pids, flush=True)
                time.sleep(600)
            """
        )
    )
    with subprocess.Popen([sys.executable, str(main)], stdout=subprocess.PIPE, text=True) as parent:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        parent.send_signal(signal.SIGKILL)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, "worker processes outlived their parent"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
