"""Hooks, observers and the task log, in inline mode (``lilota.testing.run_pending``, the
worker's own step in this process), and the default logging of a worker process.

Real worker processes are tested in tests/integration/test_worker_logs.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from lilota import Lilota, LilotaWorker
from lilota.context import TaskContext
from lilota.errors import ConfigurationError, InvalidArgument, InvalidArgumentType, TaskCancelled
from lilota.hooks import HOOK_NAMES, Hooks, TaskInfo, TaskOutcome, add_observer, remove_observer
from lilota.logs import ENV_LOG_LEVEL, ENV_WORKER_NAME, setup_worker_logging
from lilota.testing import run_pending


@pytest.fixture
def app(tmp_path: Path) -> Lilota:
    lilota = Lilota(f"sqlite:///{tmp_path}/hooks.db", number_of_workers=0)

    @lilota.register("ok")
    def ok(x: int, ctx: TaskContext) -> int:
        ctx.logger.info("working on %d", x)
        return x * 2

    @lilota.register("flaky", max_attempts=2, retry_delay=timedelta(seconds=5))
    def flaky(x: int) -> int:
        raise ValueError(f"boom {x}")

    @lilota.register("waits")
    async def waits(x: int) -> int:
        return x + 1

    @lilota.register("stops")
    def stops(x: int) -> int:
        raise TaskCancelled("told to stop")

    return lilota


@pytest.fixture
def seen(app: Lilota) -> list[tuple[Any, ...]]:
    """What each hook of ``app`` was told, in order."""
    calls: list[tuple[Any, ...]] = []

    @app.before_task
    def before(task: TaskInfo) -> None:
        calls.append(("before_task", task.name, task.attempt, task.input))

    @app.on_failure
    def failure(task: TaskInfo, outcome: TaskOutcome) -> None:
        calls.append(("on_failure", task.name, outcome.will_retry, outcome.exception))

    @app.after_task
    def after(task: TaskInfo, outcome: TaskOutcome) -> None:
        calls.append(("after_task", task.name, outcome.status, outcome.output))

    return calls


def test_hooks_are_told_of_each_attempt_in_order(app: Lilota, seen: list[Any]) -> None:
    app.schedule("flaky", 3)
    run_pending(app)
    assert [c[:3] for c in seen] == [
        ("before_task", "flaky", 1),
        ("on_failure", "flaky", True),
        ("after_task", "flaky", "pending"),
        ("before_task", "flaky", 2),
        ("on_failure", "flaky", False),
        ("after_task", "flaky", "failed"),
    ]
    assert seen[0][3] == 3  # the input
    raised = seen[1][3]
    assert isinstance(raised, ValueError) and str(raised) == "boom 3"


def test_after_task_gets_the_output_of_sync_and_async_tasks(app: Lilota, seen: list[Any]) -> None:
    app.schedule("ok", 4)
    app.schedule("waits", 4)
    run_pending(app)
    assert [c for c in seen if c[0] == "after_task"] == [
        ("after_task", "ok", "completed", 8),
        ("after_task", "waits", "completed", 5),
    ]


def test_a_cancelled_attempt_is_no_failure(app: Lilota, seen: list[Any]) -> None:
    app.schedule("stops", 1)
    run_pending(app)
    assert [c[:3] for c in seen] == [
        ("before_task", "stops", 1),
        ("after_task", "stops", "cancelled"),
    ]


def test_a_hook_that_raises_is_logged_and_the_outcome_stands(
    app: Lilota, caplog: pytest.LogCaptureFixture
) -> None:
    @app.before_task
    def broken(task: TaskInfo) -> None:
        raise RuntimeError("hook broke")

    @app.after_task
    def also_broken(task: TaskInfo, outcome: TaskOutcome) -> None:
        raise KeyError("no")

    task_id = app.schedule("ok", 1)
    with caplog.at_level(logging.ERROR, logger="lilota.hooks"):
        [task] = run_pending(app)
    assert task.status == "completed" and task.output == 2
    messages = [r.getMessage() for r in caplog.records if r.name == "lilota.hooks"]
    assert messages == [
        f"task {task_id} ok attempt 1/1: before_task hook "
        "test_a_hook_that_raises_is_logged_and_the_outcome_stands.<locals>.broken raised; "
        "the task's outcome stands",
        f"task {task_id} ok attempt 1/1: after_task hook "
        "test_a_hook_that_raises_is_logged_and_the_outcome_stands.<locals>.also_broken "
        "raised; the task's outcome stands",
    ]
    assert all(r.exc_info is not None for r in caplog.records if r.name == "lilota.hooks")
    assert caplog.records[0].lilota_task_id == task_id  # type: ignore[attr-defined]


def test_worker_init_runs_once_in_a_process(app: Lilota) -> None:
    inits: list[int] = []
    app.worker_init(lambda: inits.append(os.getpid()))
    app.schedule("ok", 1)
    run_pending(app)
    app.schedule("ok", 2)
    run_pending(app)
    assert inits == [os.getpid()]


def test_a_worker_init_that_raises_stops_the_worker_from_starting(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    worker = LilotaWorker(f"sqlite:///{tmp_path}/w.db")

    @worker.worker_init
    def init() -> None:
        raise OSError("no model file")

    with pytest.raises(OSError, match="no model file"):
        worker.start(burst=True)
    assert "a worker_init hook raised; this worker does not start" in caplog.text


def test_the_task_log_has_a_line_per_start_and_end_with_extra_fields(
    app: Lilota, caplog: pytest.LogCaptureFixture
) -> None:
    ok = app.schedule("ok", 1)
    flaky = app.schedule("flaky", 2)
    with caplog.at_level(logging.DEBUG, logger="lilota"):
        run_pending(app, retry_now=False)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "lilota.tasks"]
    assert [(level, " ".join(m.split()[:6])) for level, m in lines] == [
        ("DEBUG", f"task {ok} ok attempt 1/1 started"),
        ("INFO", f"task {ok} ok attempt 1/1 completed"),
        ("DEBUG", f"task {flaky} flaky attempt 1/2 started"),
        ("WARNING", f"task {flaky} flaky attempt 1/2 failed"),
    ]
    # retry_delay 5 s, less up to 25 % jitter
    assert re.search(r": ValueError: boom 2; retrying in [345]\.\d s$", lines[3][1])
    ended = [r for r in caplog.records if r.name == "lilota.tasks"][1]
    assert (ended.lilota_task_id, ended.lilota_task_name, ended.lilota_attempt) == (  # type: ignore[attr-defined]
        ok,
        "ok",
        1,
    )
    assert ended.lilota_status == "completed"  # type: ignore[attr-defined]
    # ctx.logger's records carry the same fields, for a JSON formatter to index.
    [own] = [r for r in caplog.records if r.name == "lilota.task.ok"]
    assert own.getMessage() == f"[task {ok}] working on 1"
    assert (own.lilota_task_id, own.lilota_task_name, own.lilota_attempt) == (ok, "ok", 1)  # type: ignore[attr-defined]


def test_a_final_failure_is_an_error_with_its_traceback(
    app: Lilota, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = app.schedule("flaky", 2)
    with caplog.at_level(logging.INFO, logger="lilota"):
        run_pending(app)
    [final] = [r for r in caplog.records if r.levelname == "ERROR" and r.name == "lilota.tasks"]
    assert final.getMessage().startswith(f"task {flaky} flaky attempt 2/2 failed in ")
    assert final.getMessage().endswith(": ValueError: boom 2; not retried")
    assert final.exc_info is not None and isinstance(final.exc_info[1], ValueError)


def test_an_observer_is_told_of_every_attempt_until_removed(app: Lilota) -> None:
    told: list[str] = []

    class Counter:
        def task_started(self, task: TaskInfo) -> None:
            told.append(f"start {task.name}")

        def task_ended(self, task: TaskInfo, outcome: TaskOutcome) -> None:
            told.append(f"end {task.name} {outcome.status}")

    counter = Counter()
    add_observer(counter)
    try:
        app.schedule("ok", 1)
        run_pending(app)
    finally:
        remove_observer(counter)
    app.schedule("ok", 2)
    run_pending(app)
    assert told == ["start ok", "end ok completed"]


def test_bad_hooks_and_observers_get_a_clear_error() -> None:
    hooks = Hooks()
    with pytest.raises(InvalidArgument, match=r"^unknown hook 'before': lilota's hooks are "):
        hooks.add("before", print)
    with pytest.raises(InvalidArgumentType, match=r"^a after_task hook must be a function; got"):
        hooks.add("after_task", "print")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentType, match=r"^an observer needs a task_started\(\)"):
        add_observer(object())  # type: ignore[arg-type]
    assert len(hooks) == 0
    assert HOOK_NAMES == ("worker_init", "before_task", "after_task", "on_failure")


# ---------------------------------------------------------------------- default logging


@pytest.fixture
def worker_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(ENV_LOG_LEVEL, raising=False)
    monkeypatch.setenv(ENV_WORKER_NAME, "worker-7")
    lilota_logger = logging.getLogger("lilota")
    level = lilota_logger.level
    lilota_logger.setLevel(logging.NOTSET)
    yield
    lilota_logger.setLevel(level)


@contextlib.contextmanager
def bare_root() -> Iterator[logging.Logger]:
    """The root logger without handlers, as in a fresh worker process (pytest's capture
    handlers are taken off inside the test, then put back)."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    for handler in handlers:
        root.removeHandler(handler)
    try:
        yield root
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)


def test_a_worker_process_logs_to_stderr_at_info_naming_the_worker(
    worker_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with bare_root() as root:
        handler = setup_worker_logging()
        assert handler is not None and root.handlers == [handler]
        assert logging.getLogger("lilota").level == logging.INFO
        logging.getLogger("lilota.tasks").info("task 1 ok attempt 1/1 completed in 0.001 s")
        logging.getLogger("lilota.tasks").debug("not shown")
        handler.flush()  # INFO lines are written together, up to HOLD_FOR later
    err = capsys.readouterr().err
    assert err.endswith(
        f" INFO worker-7[{os.getpid()}] lilota.tasks: task 1 ok attempt 1/1 completed in 0.001 s\n"
    )
    assert "not shown" not in err


def test_a_warning_is_written_at_once_after_the_lines_held_before_it(
    worker_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    with bare_root():
        setup_worker_logging()
        tasks = logging.getLogger("lilota.tasks")
        tasks.info("task 1 ok attempt 1/1 completed in 0.001 s")
        tasks.warning("task 2 ok attempt 1/3 failed in 0.001 s: ValueError: x; retrying in 1.0 s")
        err = capsys.readouterr().err  # no flush: the warning wrote both
    lines = err.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "task 1 ok attempt 1/1 completed in 0.001 s",
        "task 2 ok attempt 1/3 failed in 0.001 s: ValueError: x; retrying in 1.0 s",
    ]


def test_the_level_comes_from_the_environment(
    worker_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_LOG_LEVEL, "debug")
    with bare_root() as root:
        setup_worker_logging()
        assert logging.getLogger("lilota").level == logging.DEBUG
        assert root.level == logging.WARNING  # other libraries' INFO stays quiet


def test_a_configured_root_logger_gets_no_second_handler(
    worker_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_LOG_LEVEL, "warning")
    with bare_root() as root:
        own = logging.NullHandler()
        root.addHandler(own)
        assert setup_worker_logging() is None
        assert root.handlers == [own]
    assert logging.getLogger("lilota").level == logging.WARNING


def test_a_bad_level_in_the_environment_is_refused_naming_it(
    worker_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_LOG_LEVEL, "LOUD")
    with bare_root() as root:
        with pytest.raises(ConfigurationError, match=r"^LILOTA_LOG_LEVEL must be a logging level"):
            setup_worker_logging()
        assert root.handlers == []


def test_lilota_log_level_goes_to_its_worker_processes(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text("")
    before = logging.getLogger("lilota").level
    try:
        lilota = Lilota(f"sqlite:///{tmp_path}/x.db", script_path=script, log_level="debug")
        _, env = lilota._worker_command()
    finally:
        logging.getLogger("lilota").setLevel(before)
    assert env[ENV_LOG_LEVEL] == str(logging.DEBUG)
