"""Several supervisors on one database, as on several hosts: each task runs once, and a
task whose supervisor dies is recovered by another one when its lease expires.

Every supervisor is a separate OS process (a ``Lilota`` with its own worker processes)
started from a small script; the test process only schedules and reads, through a
``Lilota`` without workers. Executions are recorded outside the task table (``record``
and ``wait-for-file`` of apps/tasks.py write to ``$LILOTA_TEST_MARKS``, a file per
worker process).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lilota import Lilota, TaskStatus
from lilota.testing import wait_for
from tests.integration.apps import tasks
from tests.integration.apps.tasks import read_marks

REPO = Path(__file__).resolve().parents[2]

SUPERVISOR_SCRIPT = f"""
import json
import os
import sys
from datetime import timedelta

sys.path.insert(0, {str(REPO)!r})

from lilota import Lilota
from tests.integration.apps import tasks

lease = os.environ.get("SUPERVISOR_LEASE_SECONDS")
lilota = Lilota(
    os.environ["SUPERVISOR_DB_URL"],
    number_of_workers=int(os.environ["SUPERVISOR_WORKERS"]),
    registry=tasks.app.registry,
    lease=timedelta(seconds=float(lease)) if lease else None,
)

if __name__ == "__main__":
    lilota.start()
    print(json.dumps({{"pid": os.getpid(), "workers": lilota.worker_pids}}), flush=True)
    sys.stdin.readline()  # the test says stop (or closes the pipe)
    lilota.stop(timeout=60)
"""


class SupervisorProcess:
    """A process running a started Lilota with its own workers on the shared database."""

    def __init__(self, script: Path, db_url: str, workers: int, lease: float | None) -> None:
        env = dict(os.environ, SUPERVISOR_DB_URL=db_url, SUPERVISOR_WORKERS=str(workers))
        if lease is not None:
            env["SUPERVISOR_LEASE_SECONDS"] = str(lease)
        self.process = subprocess.Popen(
            [sys.executable, str(script)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.pid = self.process.pid
        self.worker_pids: list[int] = []

    def wait_ready(self) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, f"supervisor {self.pid} exited before it was ready"
        info = json.loads(line)
        assert info["pid"] == self.pid
        self.worker_pids = info["workers"]

    def stop(self, timeout: float = 90) -> int:
        """Ask it to stop gracefully (drain); returns its exit code."""
        if self.process.poll() is None:
            assert self.process.stdin is not None
            try:
                self.process.stdin.write("stop\n")
                self.process.stdin.close()
            except BrokenPipeError:
                pass
        code = self.process.wait(timeout=timeout)
        self._close()
        return code

    def kill(self) -> None:
        """SIGKILL the supervisor only: like a host that vanishes (its workers notice)."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._close()

    def _close(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None and not stream.closed:
                with contextlib.suppress(BrokenPipeError):
                    stream.close()


@pytest.fixture
def marks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "marks"
    directory.mkdir()
    monkeypatch.setenv("LILOTA_TEST_MARKS", str(directory))
    return directory


@pytest.fixture
def start_supervisors(
    lilota_db_url: str, marks: Path, tmp_path: Path
) -> Iterator[Callable[..., list[SupervisorProcess]]]:
    """``start(count, workers=2, lease=None)``: that many ready supervisor processes."""
    script = tmp_path / "supervisor.py"
    script.write_text(SUPERVISOR_SCRIPT)
    started: list[SupervisorProcess] = []

    def start(
        count: int, *, workers: int = 2, lease: float | None = None
    ) -> list[SupervisorProcess]:
        group = [SupervisorProcess(script, lilota_db_url, workers, lease) for _ in range(count)]
        started.extend(group)
        for supervisor in group:  # they start in parallel
            supervisor.wait_ready()
        return group

    yield start
    for supervisor in started:
        if supervisor.process.poll() is None:
            try:
                supervisor.stop(timeout=30)
            except subprocess.TimeoutExpired:
                supervisor.kill()
        supervisor._close()


@pytest.fixture
def scheduler(lilota_db_url: str) -> Iterator[Lilota]:
    """This process's handle on the shared database: schedules and reads, runs nothing."""
    lilota = Lilota(lilota_db_url, number_of_workers=0, registry=tasks.app.registry)
    lilota.store.ensure_schema()
    yield lilota
    lilota.store.dispose()


def _wait_until_finished(lilota: Lilota, ids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    left = set(ids)
    while left:
        left = lilota.store.unfinished(left)
        assert time.monotonic() < deadline, (
            f"{len(left)} tasks still unfinished: {lilota.store.count_by_status()}"
        )
        time.sleep(0.05)


def test_three_supervisors_with_two_workers_each_run_each_of_2000_tasks_exactly_once(
    start_supervisors: Callable[..., list[SupervisorProcess]],
    scheduler: Lilota,
    marks: Path,
) -> None:
    supervisors = start_supervisors(3, workers=2)
    ids = scheduler.schedule_many("record", [{"n": n} for n in range(2000)])
    _wait_until_finished(scheduler, ids, timeout=180)
    assert [s.stop() for s in supervisors] == [0, 0, 0]

    runs = collections.Counter(read_marks(marks))
    assert len(runs) == 2000
    assert set(runs.values()) == {1}, [n for n, c in runs.items() if c > 1][:10]
    assert scheduler.store.count_by_status() == {
        "pending": 0,
        "running": 0,
        "completed": 2000,
        "failed": 0,
        "cancelled": 0,
    }
    # Who ran what: every task by a worker of one of the three supervisors, and the work
    # was shared between supervisors (not all taken by one).
    owner = {pid: i for i, s in enumerate(supervisors) for pid in s.worker_pids}
    per_supervisor = collections.Counter(
        owner[t.pid] for t in scheduler.store.get_many(ids).values()
    )  # type: ignore[index]
    assert sum(per_supervisor.values()) == 2000
    assert len(per_supervisor) >= 2, per_supervisor


def test_a_task_held_by_a_killed_supervisor_is_recovered_by_another_after_its_lease(
    start_supervisors: Callable[..., list[SupervisorProcess]],
    scheduler: Lilota,
    marks: Path,
    tmp_path: Path,
) -> None:
    [first] = start_supervisors(1, workers=2, lease=2)
    release = tmp_path / "release"
    task_id = scheduler.schedule("wait-for-file", {"path": str(release)}, max_attempts=2)
    deadline = time.monotonic() + 60
    while (task := scheduler.get_task_by_id(task_id)).status is not TaskStatus.RUNNING:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, task
        time.sleep(0.01)
    assert task.pid in first.worker_pids and task.attempts == 1
    [second] = start_supervisors(1, workers=2, lease=2)

    # The host of the first supervisor dies: its worker first (it cannot give the task
    # back), then the supervisor (its other worker ends by itself, holding nothing).
    os.kill(task.pid, signal.SIGKILL)  # type: ignore[arg-type]
    first.kill()

    # The lease runs out; the second supervisor's workers take the task back and run it.
    deadline = time.monotonic() + 60
    while (task := scheduler.get_task_by_id(task_id)).fence < 2:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, task
        time.sleep(0.02)
    assert task.status is TaskStatus.RUNNING and task.pid in second.worker_pids
    assert task.exception is not None and task.exception.type == "lilota.errors.WorkerLost"

    release.touch()
    task = wait_for(scheduler, task_id, timeout=60)
    # A recovery: the lost attempt does not count; its second claim does.
    assert (task.status, task.output) == (TaskStatus.COMPLETED, "done")
    assert (task.attempts, task.recoveries, task.fence) == (1, 1, 2)
    assert task.pid in second.worker_pids
    assert second.stop() == 0
    started = {
        int(path.stem)
        for path in marks.glob("*.txt")
        for line in path.read_text().splitlines()
        if line == f"started {release}"
    }
    assert len(started) == 2
    assert started & set(first.worker_pids) and started & set(second.worker_pids)
