"""The TaskRunner API of lilota's earlier releases (seed 003, issue 9) runs on this engine.

The seed's complete example runs as written in its own Python process; the rest drives
``TaskRunner`` with real worker processes on the in-memory store and on the database.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import lilota.models
from lilota.errors import (
    ConfigurationError,
    LilotaStopped,
    RegistrationError,
    SerializationError,
    TaskAlreadyRegistered,
    TaskNotRegistered,
)
from lilota.models import Task, TaskBase, TaskStatus
from lilota.runner import TaskRunner
from lilota.stores import DatabaseTaskStore, MemoryTaskStore, StoreManager

EXAMPLES = Path(__file__).parent / "seed_examples"
REPO = Path(__file__).resolve().parents[2]
SEED = "seed003_complete.py"
# The seed's one line that needs Python 3.12 (nested double quotes in an f-string).
FSTRING_312 = 'print(f"Result: { tasks[0].output["result"] }")'
FSTRING_310 = "print(f\"Result: { tasks[0].output['result'] }\")"


# Task classes live at module level: worker processes import them from this module.


class Add(TaskBase):
    def run(self) -> None:
        self.logger.info("adding %s", self.task_info.input)
        self.set_progress(50)
        total = self.task_info.input["a"] + self.task_info.input["b"]
        self.set_output(
            self.task_info.id, {"sum": total, "description": self.task_info.description}
        )


class Fail(TaskBase):
    def run(self) -> None:
        raise ValueError(f"cannot handle {self.task_info.input!r}")


class OutputOfAnotherTask(TaskBase):
    def run(self) -> None:
        self.set_output(self.task_info.id + 1000, {"x": 1})


class EndsItsProcess(TaskBase):
    def run(self) -> None:
        os._exit(3)


class ReportsProgressThenWaits(TaskBase):
    def run(self) -> None:
        self.set_progress(37)
        go_on = Path(self.task_info.input["go_on"])
        while not go_on.exists():
            time.sleep(0.01)


class WithoutRun(TaskBase):
    pass


class NotDerived:
    def run(self) -> None:
        pass


# --------------------------------------------------------------------------- helpers


def _find_python312() -> str | None:
    """An interpreter >= 3.12 that really runs (pyenv shims of unselected versions do not)."""
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = sorted(glob.glob(os.path.join(pyenv, "versions", "3.1[2-9]*", "bin", "python")))
    candidates += [p for p in map(shutil.which, ("python3.12", "python3.13")) if p]
    for candidate in candidates:
        check = subprocess.run(
            [candidate, "-c", "import sys; assert sys.version_info >= (3, 12)"],
            capture_output=True,
            timeout=60,
        )
        if check.returncode == 0:
            return candidate
    return None


def _requirements(python: str) -> list[str]:
    """The project's dependencies (pyproject.toml, read by a Python that has tomllib)."""
    read = (
        "import json, sys, tomllib; "
        "print(json.dumps(tomllib.load(open(sys.argv[1], 'rb'))['project']['dependencies']))"
    )
    done = subprocess.run(
        [python, "-c", read, str(REPO / "pyproject.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [*json.loads(done.stdout), "psycopg[binary]"]


@pytest.fixture(scope="session")
def python312() -> str:
    """A Python >= 3.12 with lilota's dependencies: this one, or a venv kept in the temp
    directory and brought up to date with pyproject.toml."""
    if sys.version_info >= (3, 12):
        return sys.executable
    base = _find_python312()
    if base is None:
        pytest.skip(
            "no Python 3.12+ found (python3.12 on PATH or in pyenv) for the seed's f-string"
        )
    home = Path(tempfile.gettempdir()) / "lilota-legacy-py312"
    python = home / "bin" / "python"
    stamp = home / "lilota-requirements.json"
    wanted = json.dumps(_requirements(base))
    with open(Path(tempfile.gettempdir()) / "lilota-legacy-py312.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and stamp.exists() and stamp.read_text() == wanted:
            return str(python)
        steps = [[str(python), "-m", "pip", "install", "-q", *json.loads(wanted)]]
        if not python.exists():
            steps.insert(0, [base, "-m", "venv", "--clear", str(home)])
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                pytest.skip(
                    f"could not set up a Python 3.12 venv ({' '.join(step[:5])} ...): "
                    f"{done.stderr.strip()[-500:]}"
                )
        stamp.write_text(wanted)
    return str(python)


def run_example(python: str, directory: Path, code: str) -> str:
    (directory / "main.py").write_text(code)
    done = subprocess.run(
        [python, "main.py"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done.stdout


def seed_example() -> str:
    return (EXAMPLES / SEED).read_text()


def for_this_python(code: str) -> str:
    """The seed with only its Python-3.12-only f-string written the older way."""
    assert code.count(FSTRING_312) == 1
    return code.replace(FSTRING_312, FSTRING_310)


def by_id(tasks: list[Task]) -> dict[int, Task]:
    return {task.id: task for task in tasks}


@pytest.fixture(scope="module")
def store_manager() -> Iterator[Any]:
    StoreManager.register("Store", MemoryTaskStore)
    manager = StoreManager()
    manager.start()
    yield manager
    manager.shutdown()


@pytest.fixture
def memory_store(store_manager: Any) -> Any:
    return store_manager.Store()


@pytest.fixture
def runners() -> Iterator[list[TaskRunner]]:
    """Runners the test creates; stopped at the end even if the test failed."""
    made: list[TaskRunner] = []
    yield made
    for runner in made:
        runner.stop(timeout=30)


# --------------------------------------------------------------------------- the seed


def test_seed003_complete_example_prints_the_result_on_python_312(
    python312: str, tmp_path: Path
) -> None:
    assert run_example(python312, tmp_path, seed_example()) == "Result: 3\n"


def test_seed003_example_runs_on_this_python_with_only_its_fstring_changed(
    tmp_path: Path,
) -> None:
    assert run_example(sys.executable, tmp_path, for_this_python(seed_example())) == "Result: 3\n"


def test_seed003_example_moves_to_a_database_by_replacing_the_store(
    tmp_path: Path, lilota_sqlite_url: str
) -> None:
    code = for_this_python(seed_example())
    store_line = "  store = store_manager.Store()\n"
    import_line = "from lilota.stores import MemoryTaskStore, StoreManager\n"
    assert code.count(store_line) == 1 and code.count(import_line) == 1
    code = code.replace(store_line, f"  store = DatabaseTaskStore({lilota_sqlite_url!r})\n")
    code = code.replace(
        import_line, import_line.replace("StoreManager", "StoreManager, DatabaseTaskStore")
    )
    assert run_example(sys.executable, tmp_path, code) == "Result: 3\n"
    with DatabaseTaskStore(lilota_sqlite_url) as store:
        (task,) = store.get_all_tasks()
    assert task.name == "long_running_task"
    assert task.status is TaskStatus.COMPLETED
    assert task.output == {"result": 3}
    assert task.description == "This task adds two numbers"


# --------------------------------------------------------------------------- running


def test_on_the_memory_store_a_failing_task_is_recorded_and_the_runner_carries_on(
    memory_store: Any, runners: list[TaskRunner]
) -> None:
    runner = TaskRunner(memory_store, number_of_workers=1)
    runners.append(runner)
    runner.register("add", Add)
    runner.register("fail", Fail)
    runner.register("wrong_output", OutputOfAnotherTask)
    failing = runner.add("fail", "raises", {"x": 1})  # added before start(): runs after it
    runner.start()
    wrong = runner.add("wrong_output", None, None)
    added = runner.add("add", "adds", {"a": 1, "b": 2})
    runner.stop()

    tasks = by_id(memory_store.get_all_tasks())
    assert [t.id for t in memory_store.get_all_tasks()] == [failing, wrong, added]
    failed = tasks[failing]
    assert failed.status is TaskStatus.FAILED
    assert failed.exception is not None
    assert failed.exception.type == "ValueError"
    assert failed.exception.message == "cannot handle {'x': 1}"
    assert "raise ValueError" in failed.exception.traceback
    assert failed.progress_percentage == 100
    assert failed.output is None
    error = tasks[wrong].exception
    assert tasks[wrong].status is TaskStatus.FAILED
    assert error is not None
    assert error.type == "lilota.legacy.LegacyUsageError"
    assert "only set its own output" in error.message
    done = tasks[added]
    assert done.status is TaskStatus.COMPLETED
    assert done.output == {"sum": 3, "description": "adds"}
    assert done.input == {"a": 1, "b": 2}
    assert done.progress_percentage == 100
    assert done.pid is not None and done.pid != os.getpid()
    assert done.start_date_time is not None and done.end_date_time is not None
    assert memory_store.get_unfinished_tasks() == []


def test_a_task_that_ends_its_worker_process_fails_and_another_worker_runs_the_rest(
    memory_store: Any, runners: list[TaskRunner]
) -> None:
    runner = TaskRunner(memory_store, number_of_workers=1)
    runners.append(runner)
    runner.register("die", EndsItsProcess)
    runner.register("add", Add)
    runner.start()
    dying = runner.add("die", "ends its process", None)
    added = runner.add("add", "adds", {"a": 2, "b": 3})
    runner.stop()

    tasks = by_id(memory_store.get_all_tasks())
    error = tasks[dying].exception
    assert tasks[dying].status is TaskStatus.FAILED
    assert error is not None
    assert error.type == "lilota.errors.WorkerLost"
    assert "exit code 3" in error.message
    assert tasks[dying].progress_percentage == 100
    assert tasks[added].status is TaskStatus.COMPLETED
    assert tasks[added].output == {"sum": 5, "description": "adds"}


def test_progress_a_task_sets_is_in_the_store_while_it_runs_and_100_once_it_ends(
    memory_store: Any, runners: list[TaskRunner], tmp_path: Path
) -> None:
    runner = TaskRunner(memory_store, number_of_workers=1)
    runners.append(runner)
    runner.register("progress", ReportsProgressThenWaits)
    runner.start()
    go_on = tmp_path / "go-on"
    task_id = runner.add("progress", None, {"go_on": str(go_on)})
    deadline = time.monotonic() + 60
    while (task := memory_store.get_task_by_id(task_id)).progress_percentage != 37:
        assert time.monotonic() < deadline, f"progress never reached 37: {task}"
        time.sleep(0.01)
    assert task.status is TaskStatus.RUNNING
    go_on.touch()
    runner.stop()
    task = memory_store.get_task_by_id(task_id)
    assert task.status is TaskStatus.COMPLETED
    assert task.progress_percentage == 100


def test_task_log_records_reach_the_runner_process_carrying_the_task_id(
    memory_store: Any, runners: list[TaskRunner], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lilota.task")
    runner = TaskRunner(memory_store, number_of_workers=1)
    runners.append(runner)
    runner.register("add", Add)
    runner.start()
    task_id = runner.add("add", None, {"a": 1, "b": 1})
    runner.stop()

    records = [r for r in caplog.records if r.name == "lilota.task.add"]
    assert [r.getMessage() for r in records] == ["adding {'a': 1, 'b': 1}"]
    assert records[0].task_id == task_id  # type: ignore[attr-defined]
    assert records[0].process != os.getpid()


def test_logging_level_of_the_earlier_release_holds_in_the_worker_processes_too(
    memory_store: Any, runners: list[TaskRunner], caplog: pytest.LogCaptureFixture
) -> None:
    lilota_logger = logging.getLogger("lilota")
    before = lilota_logger.level
    try:
        # Without it the task's INFO record is below the default WARNING in the worker.
        runner = TaskRunner(memory_store, number_of_processes=1, logging_level="INFO")
        runners.append(runner)
        runner.register("add", Add)
        runner.start()
        runner.add("add", None, {"a": 2, "b": 3})
        runner.stop()
    finally:
        lilota_logger.setLevel(before)

    records = [r for r in caplog.records if r.name == "lilota.task.add"]
    assert [r.getMessage() for r in records] == ["adding {'a': 2, 'b': 3}"]
    assert records[0].process != os.getpid()


RUNNER_PROGRAM = """
from lilota.models import TaskBase
from lilota.runner import TaskRunner
from lilota.stores import DatabaseTaskStore


class Add(TaskBase):
    def run(self):
        self.logger.info("adding %s", self.task_info.input)
        self.set_output(self.task_info.id, {"sum": self.task_info.input["a"] + 1})


if __name__ == "__main__":
    runner = TaskRunner(DatabaseTaskStore("sqlite:///runner.db"), number_of_workers=1)
    runner.register("add", Add)
    runner.start()
    print(runner.add("add", "adds", {"a": 1}))
    runner.stop()
"""


def test_workers_of_a_runner_that_configured_no_logging_log_to_stderr(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text(RUNNER_PROGRAM)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LILOTA_LOG_LEVEL", None)
    done = subprocess.run(
        [sys.executable, "main.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    task_id = done.stdout.strip()
    assert re.search(
        r"(?m)^\S+ \S+ INFO worker-1\[\d+\] lilota.task.add: adding "
        r"\{'a': 1\}$",
        done.stderr,
    ), done.stderr
    assert re.search(
        rf"(?m)^\S+ \S+ INFO worker-1\[\d+\] lilota.tasks: task {task_id} add attempt 1/1 "
        r"completed in [\d.]+ s$",
        done.stderr,
    ), done.stderr


def test_on_a_database_store_tasks_complete_and_failures_are_recorded(
    lilota_db_url: str, runners: list[TaskRunner], request: pytest.FixtureRequest
) -> None:
    store = DatabaseTaskStore(lilota_db_url)
    request.addfinalizer(store.close)
    runner = TaskRunner(store, number_of_workers=1)
    runners.append(runner)
    runner.register("add", Add)
    runner.register("fail", Fail)
    runner.start()
    failing = runner.add("fail", "raises", {"x": 1})
    added = runner.add("add", "adds", {"a": 1, "b": 2})
    runner.stop()

    tasks = store.get_all_tasks()
    assert [t.id for t in tasks] == [failing, added]
    failed, done = tasks
    assert failed.status is TaskStatus.FAILED
    assert failed.exception is not None
    assert failed.exception.type == "ValueError"
    assert failed.exception.message == "cannot handle {'x': 1}"
    assert failed.progress_percentage == 100
    assert done.status is TaskStatus.COMPLETED
    assert done.output == {"sum": 3, "description": "adds"}
    assert done.progress_percentage == 100
    assert done.pid is not None and done.pid != os.getpid()
    assert store.get_unfinished_tasks() == []
    assert store.get_task_by_id(added) == done


# --------------------------------------------------------------------------- bad use


def test_adding_an_unregistered_task_raises_and_stores_nothing(memory_store: Any) -> None:
    runner = TaskRunner(memory_store, number_of_workers=1)
    runner.register("add", Add)
    with pytest.raises(TaskNotRegistered, match=r"'nope'.*registered: add"):
        runner.add("nope", "?", {})
    assert memory_store.get_all_tasks() == []


def test_input_that_cannot_be_stored_as_json_raises_and_stores_nothing(memory_store: Any) -> None:
    runner = TaskRunner(memory_store, number_of_workers=1)
    runner.register("add", Add)
    with pytest.raises(SerializationError, match=r"input\['a'\]"):
        runner.add("add", None, {"a": object()})
    assert memory_store.get_all_tasks() == []


def test_registering_a_taskbase_subclass_without_run_raises(memory_store: Any) -> None:
    runner = TaskRunner(memory_store, number_of_workers=1)
    with pytest.raises(RegistrationError, match="WithoutRun has no run"):
        runner.register("t", WithoutRun)
    assert runner.task_names == frozenset()


@pytest.mark.parametrize("task_class", [NotDerived, NotDerived(), Add.run, "Add"])
def test_registering_something_not_derived_from_taskbase_raises(
    memory_store: Any, task_class: Any
) -> None:
    runner = TaskRunner(memory_store, number_of_workers=1)
    with pytest.raises(RegistrationError, match="TaskBase"):
        runner.register("t", task_class)


def test_registering_a_class_defined_in_a_function_raises(memory_store: Any) -> None:
    class Local(TaskBase):
        def run(self) -> None:
            pass

    runner = TaskRunner(memory_store, number_of_workers=1)
    with pytest.raises(RegistrationError, match="module level"):
        runner.register("t", Local)


def test_registering_a_name_twice_raises(memory_store: Any) -> None:
    runner = TaskRunner(memory_store, number_of_workers=1)
    runner.register("t", Add)
    with pytest.raises(TaskAlreadyRegistered):
        runner.register("t", Fail)


def test_after_stop_adding_raises_lilota_stopped_and_registering_after_start_raises(
    memory_store: Any, runners: list[TaskRunner]
) -> None:
    runner = TaskRunner(memory_store, number_of_workers=1)
    runners.append(runner)
    runner.register("add", Add)
    runner.start()
    with pytest.raises(RegistrationError, match="before start"):
        runner.register("fail", Fail)
    runner.stop()
    with pytest.raises(LilotaStopped):
        runner.add("add", None, {"a": 1, "b": 2})
    assert memory_store.get_all_tasks() == []


@pytest.mark.parametrize(
    "store", [MemoryTaskStore(), object(), None, "sqlite://"], ids=lambda s: type(s).__name__
)
def test_a_store_the_workers_cannot_share_is_refused(store: Any) -> None:
    with pytest.raises(ConfigurationError):
        TaskRunner(store)


def test_models_offers_taskbase_and_nothing_it_does_not_have() -> None:
    assert lilota.models.TaskBase is TaskBase
    with pytest.raises(AttributeError, match="TaskInfoThatNeverExisted"):
        lilota.models.TaskInfoThatNeverExisted  # noqa: B018
