"""Tests of the app fixtures, ``wait_for`` and the inline mode of ``lilota.testing``.

The inline tests use ``lilota_inline`` with the tasks of this module (``lilota_app_options``
is overridden below), on every backend of ``lilota_db_url``. The teardown of ``lilota_app``
is tested in an inner pytest session (``pytester``), as a user's suite would run it.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from importlib.metadata import entry_points
from typing import Any

import pytest

from lilota import Lilota, TaskStatus
from lilota.context import TaskContext
from lilota.errors import ConfigurationError, DatabaseUnavailable
from lilota.testing import PostgresProvider, eager, run_pending, wait_for

pytest_plugins = ["pytester"]

app = Lilota(number_of_workers=0)


@dataclass
class AddInput:
    a: int
    b: int


@dataclass
class AddOutput:
    sum: int


def notify(value: Any) -> None:
    """Called by the tasks below; tests replace it to watch them run."""


# The instance a task schedules through (set by a test): like app code that calls its
# module-level Lilota.
scheduler: Lilota | None = None


@app.register("add", input_model=AddInput, output_model=AddOutput)
def add(data: AddInput) -> AddOutput:
    notify(("add", os.getpid(), threading.get_ident()))
    return AddOutput(sum=data.a + data.b)


@app.register("fail")
def fail(data: dict) -> None:  # type: ignore[type-arg]
    raise ValueError(f"boom {data['x']}")


@app.register("steps")
def steps(ctx: TaskContext) -> str:
    for percentage in (30, 60):
        ctx.progress.set(percentage)
        notify(ctx.task_id)
    return "done"


@app.register("fan-out")
def fan_out(data: dict, ctx: TaskContext) -> list[int]:  # type: ignore[type-arg]
    return [ctx.schedule("add", AddInput(a=i, b=i)) for i in range(data["n"])]


@app.register("countdown")
def countdown(data: dict, ctx: TaskContext) -> int:  # type: ignore[type-arg]
    if data["n"] > 0:
        ctx.schedule("countdown", {"n": data["n"] - 1})
    return int(data["n"])


@app.register("forever")
def forever(ctx: TaskContext) -> None:
    ctx.schedule("forever")


@app.register("flaky", max_attempts=3, retry_delay=timedelta(hours=1))
def flaky(data: dict, ctx: TaskContext) -> int:  # type: ignore[type-arg]
    """Fails on its first ``data["failures"]`` attempts."""
    if ctx.attempt <= data["failures"]:
        raise ValueError(f"flaky attempt {ctx.attempt}")
    return ctx.attempt


@app.register("async-add")
async def async_add(data: dict) -> int:  # type: ignore[type-arg]
    await asyncio.sleep(0)
    return int(data["a"] + data["b"])


@app.register("interrupt")
def interrupt() -> None:
    raise KeyboardInterrupt


@app.register("schedules-through-instance")
def schedules_through_instance() -> None:
    assert scheduler is not None
    notify("parent starts")
    scheduler.schedule("add", AddInput(a=20, b=22))
    notify("parent ends")


@pytest.fixture
def lilota_app_options() -> dict[str, Any]:
    return {"registry": app.registry, "number_of_workers": 1}


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What the tasks passed to notify(), in order."""
    seen: list[Any] = []
    monkeypatch.setattr(f"{__name__}.notify", seen.append)
    return seen


# --------------------------------------------------------------------------------------------
# run_pending
# --------------------------------------------------------------------------------------------


def test_run_pending_runs_the_task_in_the_test_process_and_records_its_output(
    lilota_inline: Lilota, calls: list[Any]
) -> None:
    task_id = lilota_inline.schedule("add", AddInput(a=2, b=3))
    assert lilota_inline.get_task_by_id(task_id).status is TaskStatus.PENDING  # type: ignore[union-attr]

    [task] = run_pending(lilota_inline)

    assert (task.id, task.status, task.output) == (task_id, TaskStatus.COMPLETED, {"sum": 5})
    assert (task.attempts, task.progress_percentage, task.exception) == (1, 100, None)
    assert task.pid == os.getpid() and task.worker_id.startswith("inline:")  # type: ignore[union-attr]
    assert calls == [("add", os.getpid(), threading.get_ident())]
    assert lilota_inline.get_task_by_id(task_id) == task
    assert run_pending(lilota_inline) == []


def test_run_pending_records_the_exception_of_a_failing_task(lilota_inline: Lilota) -> None:
    task_id = lilota_inline.schedule("fail", {"x": 7})
    runs = run_pending(lilota_inline)
    # Every attempt the task has (retries run at once), then failed for good.
    task = runs[-1]
    assert [t.id for t in runs] == [task_id] * task.max_attempts
    assert [t.status for t in runs] == [TaskStatus.PENDING] * (task.max_attempts - 1) + [
        TaskStatus.FAILED
    ]
    assert task.attempts == task.max_attempts
    assert task.exception is not None
    assert (task.exception.type, task.exception.message) == ("ValueError", "boom 7")
    assert "raise ValueError(f\"boom {data['x']}\")" in task.exception.traceback
    assert task.end_date_time is not None and task.output is None
    assert run_pending(lilota_inline) == []


def test_progress_is_written_to_the_database_while_the_task_runs(
    lilota_inline: Lilota, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[TaskStatus, int]] = []

    def look(task_id: int) -> None:
        task = lilota_inline.get_task_by_id(task_id)
        assert task is not None
        seen.append((task.status, task.progress_percentage))

    monkeypatch.setattr(f"{__name__}.notify", look)
    lilota_inline.schedule("steps")
    [task] = run_pending(lilota_inline)
    assert seen == [(TaskStatus.RUNNING, 30), (TaskStatus.RUNNING, 60)]
    assert (task.status, task.progress_percentage, task.output) == (
        TaskStatus.COMPLETED,
        100,
        "done",
    )


def test_follow_up_tasks_are_run_too_in_order(lilota_inline: Lilota) -> None:
    parent = lilota_inline.schedule("fan-out", {"n": 3})
    runs = run_pending(lilota_inline)
    assert [t.name for t in runs] == ["fan-out", "add", "add", "add"]
    assert runs[0].id == parent and runs[0].output == [t.id for t in runs[1:]]
    assert [t.output for t in runs[1:]] == [{"sum": 0}, {"sum": 2}, {"sum": 4}]

    lilota_inline.schedule("countdown", {"n": 4})
    assert [t.output for t in run_pending(lilota_inline)] == [4, 3, 2, 1, 0]


def test_a_task_that_schedules_itself_forever_fails_the_test_after_max_runs(
    lilota_inline: Lilota,
) -> None:
    lilota_inline.schedule("forever")
    with pytest.raises(pytest.fail.Exception, match="ran 20 tasks and more are still due"):
        run_pending(lilota_inline, max_runs=20)
    counts = lilota_inline.store.count_by_status()
    assert (counts["completed"], counts["pending"], counts["running"]) == (20, 1, 0)


def test_limit_and_names_choose_what_runs(lilota_inline: Lilota) -> None:
    adds = lilota_inline.schedule_many("add", [AddInput(a=i, b=0) for i in range(3)])
    failing = lilota_inline.schedule("fail", {"x": 1})
    assert [t.id for t in run_pending(lilota_inline, names="add", limit=2)] == adds[:2]
    assert [t.id for t in run_pending(lilota_inline, names=["add"])] == adds[2:]
    assert lilota_inline.get_task_by_id(failing).status is TaskStatus.PENDING  # type: ignore[union-attr]
    with pytest.raises(ConfigurationError, match="nope not registered"):
        run_pending(lilota_inline, names=["add", "nope"])


def test_tasks_due_later_are_not_run(lilota_inline: Lilota) -> None:
    later = lilota_inline.schedule("add", AddInput(a=1, b=1), delay=timedelta(hours=1))
    assert run_pending(lilota_inline) == []
    assert lilota_inline.get_task_by_id(later).status is TaskStatus.PENDING  # type: ignore[union-attr]


def test_a_failed_attempt_with_attempts_left_is_a_retry_due_after_its_delay(
    lilota_inline: Lilota,
) -> None:
    task_id = lilota_inline.schedule("flaky", {"failures": 1})
    before = datetime.now(timezone.utc)
    [task] = run_pending(lilota_inline, retry_now=False)
    assert (task.status, task.attempts, task.max_attempts) == (TaskStatus.PENDING, 1, 3)
    assert task.exception is not None and task.exception.message == "flaky attempt 1"
    # retry_delay is one hour, less up to 25 % jitter.
    assert task.run_at is not None and task.run_at >= before + timedelta(minutes=44)
    assert run_pending(lilota_inline, retry_now=False) == []  # not due yet
    assert lilota_inline.get_task_by_id(task_id) == task


def test_retries_run_at_once_by_default(lilota_inline: Lilota) -> None:
    recovers = lilota_inline.schedule("flaky", {"failures": 1})
    runs = run_pending(lilota_inline)
    assert [(t.id, t.status, t.attempts) for t in runs] == [
        (recovers, TaskStatus.PENDING, 1),
        (recovers, TaskStatus.COMPLETED, 2),
    ]
    assert runs[-1].output == 2 and runs[-1].exception is None

    gives_up = lilota_inline.schedule("flaky", {"failures": 5})
    runs = run_pending(lilota_inline)
    assert [(t.id, t.status) for t in runs] == [
        (gives_up, TaskStatus.PENDING),
        (gives_up, TaskStatus.PENDING),
        (gives_up, TaskStatus.FAILED),
    ]
    assert runs[-1].attempts == 3
    assert runs[-1].exception is not None and runs[-1].exception.message == "flaky attempt 3"


def test_max_attempts_given_at_scheduling_is_kept(lilota_inline: Lilota) -> None:
    task_id = lilota_inline.schedule("flaky", {"failures": 5}, max_attempts=5)
    runs = run_pending(lilota_inline)
    assert len(runs) == 5 and runs[-1].status is TaskStatus.FAILED
    assert (runs[-1].id, runs[-1].attempts, runs[-1].max_attempts) == (task_id, 5, 5)


def test_async_tasks_run_inline(lilota_inline: Lilota) -> None:
    lilota_inline.schedule("async-add", {"a": 40, "b": 2})
    [task] = run_pending(lilota_inline)
    assert (task.status, task.output) == (TaskStatus.COMPLETED, 42)


def test_an_exception_that_escapes_the_task_is_recorded_then_raised(
    lilota_inline: Lilota,
) -> None:
    task_id = lilota_inline.schedule("interrupt")
    with pytest.raises(KeyboardInterrupt):
        run_pending(lilota_inline)
    task = lilota_inline.get_task_by_id(task_id)
    assert task is not None and task.status is TaskStatus.FAILED
    assert task.exception is not None and task.exception.type == "KeyboardInterrupt"


def test_run_pending_needs_the_tasks_in_this_process(lilota_db_url: str) -> None:
    without_tasks = Lilota(lilota_db_url, number_of_workers=0)
    with pytest.raises(ConfigurationError, match="registry="):
        run_pending(without_tasks)
    with pytest.raises(ConfigurationError, match="registry="), eager(without_tasks):
        pass
    without_tasks.store.dispose()


# --------------------------------------------------------------------------------------------
# eager
# --------------------------------------------------------------------------------------------


def test_eager_runs_tasks_when_they_are_scheduled(lilota_inline: Lilota) -> None:
    with eager(lilota_inline) as lilota:
        assert lilota is lilota_inline
        done = lilota_inline.schedule("add", AddInput(a=1, b=2))
        assert lilota_inline.get_task_by_id(done).output == {"sum": 3}  # type: ignore[union-attr]
        many = lilota_inline.schedule_many("add", [AddInput(a=i, b=i) for i in range(3)])
        assert [lilota_inline.get_task_by_id(i).status for i in many] == [  # type: ignore[union-attr]
            TaskStatus.COMPLETED
        ] * 3
        parent = lilota_inline.schedule("fan-out", {"n": 2})
        children = lilota_inline.get_task_by_id(parent).output  # type: ignore[union-attr]
        assert [lilota_inline.get_task_by_id(i).status for i in children] == [  # type: ignore[union-attr]
            TaskStatus.COMPLETED
        ] * 2
        failed = lilota_inline.schedule("fail", {"x": 3})  # recorded, not raised
        assert lilota_inline.get_task_by_id(failed).status is TaskStatus.FAILED  # type: ignore[union-attr]
    after = lilota_inline.schedule("add", AddInput(a=1, b=2))
    assert lilota_inline.get_task_by_id(after).status is TaskStatus.PENDING  # type: ignore[union-attr]
    assert "schedule" not in vars(lilota_inline)


def test_eager_runs_a_follow_up_scheduled_through_the_instance_after_its_parent(
    lilota_inline: Lilota, calls: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(f"{__name__}.scheduler", lilota_inline)
    with eager(lilota_inline):
        parent = lilota_inline.schedule("schedules-through-instance")
    assert [c if isinstance(c, str) else c[0] for c in calls] == [
        "parent starts",
        "parent ends",
        "add",
    ]
    assert lilota_inline.get_task_by_id(parent).status is TaskStatus.COMPLETED  # type: ignore[union-attr]
    assert lilota_inline.store.count_by_status()["completed"] == 2


# --------------------------------------------------------------------------------------------
# wait_for
# --------------------------------------------------------------------------------------------


def test_wait_for_returns_the_finished_task(lilota_inline: Lilota) -> None:
    task_id = lilota_inline.schedule("add", AddInput(a=1, b=1))
    run_pending(lilota_inline)
    task = wait_for(lilota_inline, task_id, timeout=1)
    assert (task.status, task.output) == (TaskStatus.COMPLETED, {"sum": 2})


def test_wait_for_fails_with_what_a_pending_task_is_waiting_for(lilota_inline: Lilota) -> None:
    task_id = lilota_inline.schedule("add", AddInput(a=1, b=1), delay=timedelta(hours=2))
    with pytest.raises(pytest.fail.Exception) as failure:
        wait_for(lilota_inline, task_id, timeout=0.05)
    message = str(failure.value)
    assert f"task {task_id} (add) did not finish within 0.05 s" in message
    max_attempts = lilota_inline.get_task_by_id(task_id).max_attempts  # type: ignore[union-attr]
    assert f"status pending, progress 0%, attempt 0 of {max_attempts}, exception: none" in message
    assert "it is not due before" in message
    assert "this Lilota instance runs no worker processes" in message


def test_wait_for_fails_with_status_progress_attempts_and_exception(
    lilota_inline: Lilota,
) -> None:
    task_id = lilota_inline.schedule("flaky", {"failures": 3})
    run_pending(lilota_inline, limit=1)
    # A worker that stands still in attempt 2 at 40 %, after attempt 1 failed.
    store = lilota_inline.store
    [claim] = store.claim(worker_id="stuck", names=["flaky"], limit=1, lease=timedelta(minutes=5))
    assert store.set_progress(claim.id, claim.fence, 40)

    with pytest.raises(pytest.fail.Exception) as failure:
        wait_for(lilota_inline, task_id, timeout=0.05)
    message = str(failure.value)
    assert (
        "status running, progress 40%, attempt 2 of 3, "
        "exception: ValueError: flaky attempt 1" in message
    )
    assert "(worker stuck)" in message
    assert 'raise ValueError(f"flaky attempt {ctx.attempt}")' in message  # the traceback


def test_wait_for_fails_for_an_unknown_task(lilota_inline: Lilota) -> None:
    with pytest.raises(pytest.fail.Exception, match="no task with id 999"):
        wait_for(lilota_inline, 999, timeout=0.05)


# --------------------------------------------------------------------------------------------
# lilota_app
# --------------------------------------------------------------------------------------------


def test_lilota_app_runs_the_tasks_in_worker_processes(lilota_app: Lilota) -> None:
    assert len(lilota_app.worker_pids) == 1
    task = wait_for(lilota_app, lilota_app.schedule("add", AddInput(a=20, b=22)), timeout=30)
    assert (task.status, task.output) == (TaskStatus.COMPLETED, {"sum": 42})
    assert task.pid in lilota_app.worker_pids and task.pid != os.getpid()


@pytest.mark.lilota_backends("postgres")
def test_stop_ends_the_workers_even_when_the_database_is_gone(
    lilota_app: Lilota, lilota_postgres: PostgresProvider
) -> None:
    pids = lilota_app.worker_pids
    lilota_app.schedule("add", AddInput(a=1, b=1))  # stop() would wait for it
    lilota_postgres.stop()  # skips unless the server is the throwaway local one
    try:
        with pytest.raises(DatabaseUnavailable):
            lilota_app.stop(timeout=5)
    finally:
        lilota_postgres.start()
    assert len(pids) == 1
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def _plugin_is_autoloaded() -> bool:
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        return False
    return any(ep.value == "lilota.testing" for ep in entry_points(group="pytest11"))


_INNER_APP = """
    import time

    from lilota import Lilota

    lilota = Lilota(number_of_workers=0)


    @lilota.register("hang")
    def hang() -> None:
        time.sleep(600)


    @lilota.register("add")
    def add(data: dict) -> int:
        return data["a"] + data["b"]
"""

_INNER_CONFTEST = """
    import pytest

    import innerapp


    @pytest.fixture
    def lilota_app_options():
        return {"registry": innerapp.lilota.registry, "number_of_workers": 2, "stop_timeout": 2}
"""

_INNER_TESTS = """
    import os
    import time
    from pathlib import Path

    import pytest

    from lilota.testing import wait_for

    PIDS = Path(os.environ["INNER_PIDS"])


    def test_1_fails_while_a_task_hangs(lilota_app):
        PIDS.mkdir(exist_ok=True)
        (PIDS / f"{os.getpid()}-{len(list(PIDS.iterdir()))}").write_text(
            " ".join(map(str, lilota_app.worker_pids))
        )
        task_id = lilota_app.schedule("hang")
        while lilota_app.get_task_by_id(task_id).status.value != "running":
            time.sleep(0.01)
        assert False, "this test fails with a task running"


    def test_2_the_workers_of_the_failed_test_are_gone():
        pids = [int(p) for f in PIDS.iterdir() for p in f.read_text().split()]
        assert len(pids) == 2
        for pid in pids:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            with open(f"/proc/{pid}/stat") as f:
                assert f.read().split()[2] == "Z", f"worker {pid} is still running"


    def test_3_wait_for_with_the_app(lilota_app):
        task = wait_for(lilota_app, lilota_app.schedule("add", {"a": 1, "b": 2}), timeout=30)
        assert task.output == 3


    @pytest.mark.parametrize("lilota_app_options", [{}])
    def test_4_without_options_the_fixture_says_what_to_do(lilota_app):
        pass
"""


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_lilota_app_is_stopped_at_teardown_even_when_the_test_fails(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    backend: str,
) -> None:
    for name in list(os.environ):
        if name.startswith(("LILOTA_TEST_", "PYTEST_")) or name == "CI":
            monkeypatch.delenv(name)
    if backend == "postgres":
        monkeypatch.setenv(
            "LILOTA_TEST_POSTGRES_URL", request.getfixturevalue("lilota_postgres").url
        )
    monkeypatch.setenv("INNER_PIDS", str(pytester.path / "pids"))
    pytester.makepyfile(innerapp=textwrap.dedent(_INNER_APP))
    pytester.makeconftest(textwrap.dedent(_INNER_CONFTEST))
    pytester.makepyfile(test_app=textwrap.dedent(_INNER_TESTS))
    plugin = [] if _plugin_is_autoloaded() else ["-p", "lilota.testing"]
    result = pytester.runpytest_subprocess(
        *plugin,
        "-p",
        "no:cacheprovider",
        "-W",
        "error",
        f"--lilota-backend={backend}",
        "-rA",
        timeout=120,
    )
    result.assert_outcomes(passed=2, failed=1, errors=1)
    for line in (
        f"FAILED test_app.py::test_1_fails_while_a_task_hangs[[]{backend}[]]*",
        "PASSED test_app.py::test_2_the_workers_of_the_failed_test_are_gone",
        f"PASSED test_app.py::test_3_wait_for_with_the_app[[]{backend}[]]",
        "ERROR test_app.py::test_4_without_options_the_fixture_says_what_to_do*",
    ):
        result.stdout.fnmatch_lines([line])
    assert "lilota_app has no tasks to run: override the lilota_app_options fixture" in str(
        result.stdout
    )
    assert len(list((pytester.path / "pids").iterdir())) == 1
