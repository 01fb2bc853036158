"""The ``lilota`` command, run for real (``python -m lilota``) in subprocesses.

Every test that reads or writes tasks runs on each backend of ``lilota_db_url``. Tasks
are put into the state a test needs through the store (claim/finish as a worker would),
so only the worker tests start worker processes.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from lilota import serialization
from lilota.models import TaskStatus
from lilota.store import NewTask, Outcome, TaskStore, utcnow

REPO = Path(__file__).resolve().parents[2]
WORKER_ID = "test-cli-worker"
# Upper bound for anything to happen; only reached when something is broken.
PATIENCE = 60.0


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LILOTA_DB_URL", None)
    # Tables are parsed below: give rich a fixed width whatever terminal (or pytest-xdist
    # worker) the suite runs in.
    env["COLUMNS"] = "200"
    env.pop("LINES", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


def start_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "lilota", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=cli_env(env),
        cwd=cwd,
    )


def run_many(
    commands: Sequence[Sequence[str]],
    *,
    env: dict[str, str] | None = None,
    envs: Sequence[dict[str, str]] | None = None,
    cwd: Path | None = None,
) -> list[subprocess.CompletedProcess[str]]:
    """Run several commands at once (each its own process, with ``env`` or its entry of
    ``envs``) and wait for all."""
    envs = envs or [env or {}] * len(commands)
    procs = [(list(c), start_cli(*c, env=e, cwd=cwd)) for c, e in zip(commands, envs, strict=True)]
    results = []
    for args, proc in procs:
        out, err = proc.communicate(timeout=PATIENCE)
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_many([args], env=env)[0]


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The failure is exactly one ``lilota: error:`` line on stderr, and no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, (result.args, result.returncode, result.stderr)
    assert len(lines) == 1, (result.args, result.stderr)
    assert lines[0].startswith("lilota: error: "), (result.args, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


class Tasks:
    """Puts tasks into given states the way a worker would (claim, then finish)."""

    def __init__(self, db_url: str, clock: Callable[[], datetime] = utcnow) -> None:
        self.store = TaskStore(db_url, clock=clock)
        self.store.ensure_schema()

    def add(self, name: str, value: object = None) -> int:
        return self.store.add(NewTask(name=name, input=serialization.dumps(value, root="input")))

    def start(self, name: str, value: object = None) -> int:
        task_id = self.add(name, value)
        claims = self.store.claim(
            worker_id=WORKER_ID, names=[name], limit=1, lease=timedelta(minutes=10)
        )
        assert [c.id for c in claims] == [task_id]
        return task_id

    def end(self, name: str, value: object, status: str, **outcome: Any) -> int:
        task_id = self.start(name, value)
        self.store.finish([Outcome(id=task_id, fence=1, status=status, **outcome)])
        return task_id

    def complete(self, name: str, value: object, output: object) -> int:
        return self.end(name, value, "completed", output=serialization.dumps(output, root="output"))

    def fail(self, name: str, value: object, message: str) -> int:
        error = {
            "type": "ValueError",
            "message": message,
            "traceback": f'Traceback (most recent call last):\n  File "job.py", line 7, in job\n'
            f"ValueError: {message}\n",
        }
        return self.end(name, value, "failed", exception=json.dumps(error))

    def cancel(self, name: str, value: object = None) -> int:
        task_id = self.add(name, value)
        assert self.store.cancel(task_id) is TaskStatus.CANCELLED
        return task_id

    def status(self, task_id: int) -> str:
        task = self.store.get(task_id)
        assert task is not None
        return task.status.value


@pytest.fixture
def tasks(lilota_db_url: str) -> Iterator[Tasks]:
    helper = Tasks(lilota_db_url)
    yield helper
    helper.store.dispose()


def parse_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# ---------------------------------------------------------------------- reading


def test_migrate_creates_the_tables_that_tasks_then_lists(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    before = run_cli("--db-url", url, "tasks")
    assert "lilota migrate" in assert_one_line_error(before)
    assert not (tmp_path / "new.db").exists()  # reading never creates a database

    created = run_cli("--db-url", url, "migrate")
    assert created.returncode == 0, created.stderr
    assert "created" in created.stdout and "schema version 3" in created.stdout
    again, listed = run_many([["--db-url", url, "migrate"], ["tasks", "--db-url", url, "--json"]])
    assert again.returncode == 0 and "up to date: schema version 3" in again.stdout
    assert parse_json(listed) == []


def test_tasks_json_lists_newest_first_and_filters(lilota_db_url: str, tasks: Tasks) -> None:
    done = tasks.complete("resize", {"w": 10}, {"ok": True})
    failed = tasks.fail("resize", {"w": -1}, "negative width")
    waiting = tasks.add("email", {"to": "a@example.com"})
    everything, only_failed, only_email, newest, two_statuses, table = run_many(
        [
            ["--db-url", lilota_db_url, "tasks", "--json"],
            ["--db-url", lilota_db_url, "tasks", "--json", "--status", "failed"],
            ["--db-url", lilota_db_url, "tasks", "--json", "--name", "email"],
            ["--db-url", lilota_db_url, "tasks", "--json", "--limit", "1"],
            ["--db-url", lilota_db_url, "tasks", "--json", "--status", "pending,completed"],
            ["--db-url", lilota_db_url, "tasks"],
        ]
    )
    rows = parse_json(everything)
    assert isinstance(rows, list)
    assert [r["id"] for r in rows] == [waiting, failed, done]
    assert [r["status"] for r in rows] == ["pending", "failed", "completed"]
    assert rows[0]["input"] == {"to": "a@example.com"}
    assert rows[2]["output"] == {"ok": True}
    assert datetime.fromisoformat(rows[2]["ended_at"]).utcoffset() == timedelta(0)
    assert rows[2]["duration_seconds"] >= 0
    assert [r["id"] for r in parse_json(only_failed)] == [failed]
    assert [r["id"] for r in parse_json(only_email)] == [waiting]
    assert [r["id"] for r in parse_json(newest)] == [waiting]
    assert [r["id"] for r in parse_json(two_statuses)] == [waiting, done]

    assert table.returncode == 0, table.stderr
    cells = {
        row[0]: row[1:]
        for line in table.stdout.splitlines()
        if len(row := [c.strip() for c in line.split("│")[1:-1]]) == 9
    }
    assert cells[str(done)][:4] == ["resize", "completed", "100%", "1/1"]
    assert cells[str(failed)][:4] == ["resize", "failed", "0%", "1/1"]
    assert cells[str(waiting)][:4] == ["email", "pending", "0%", "0/1"]


def test_show_gives_input_output_exception_and_times(lilota_db_url: str, tasks: Tasks) -> None:
    done = tasks.complete("add", {"a": 1, "b": 2}, {"sum": 3})
    failed = tasks.fail("add", {"a": "x"}, "not a number: 'x'")
    shown_done, shown_failed, human = run_many(
        [
            ["--db-url", lilota_db_url, "show", str(done), "--json"],
            ["--db-url", lilota_db_url, "show", str(failed), "--json"],
            ["--db-url", lilota_db_url, "show", str(failed)],
        ]
    )
    task = parse_json(shown_done)
    assert isinstance(task, dict)
    assert (task["id"], task["name"], task["status"]) == (done, "add", "completed")
    assert (task["input"], task["output"], task["exception"]) == (
        {"a": 1, "b": 2},
        {"sum": 3},
        None,
    )
    assert (task["attempts"], task["max_attempts"]) == (1, 1)
    created = datetime.fromisoformat(task["created_at"])
    started = datetime.fromisoformat(task["started_at"])
    ended = datetime.fromisoformat(task["ended_at"])
    assert created <= started <= ended
    assert task["duration_seconds"] == (ended - started).total_seconds()

    task = parse_json(shown_failed)
    assert isinstance(task, dict)
    assert task["status"] == "failed" and task["output"] is None
    assert task["exception"]["type"] == "ValueError"
    assert task["exception"]["message"] == "not a number: 'x'"
    assert 'File "job.py", line 7' in task["exception"]["traceback"]

    assert human.returncode == 0, human.stderr
    assert "failed" in human.stdout
    assert "ValueError: not a number: 'x'" in human.stdout
    assert 'File "job.py", line 7, in job' in human.stdout  # the traceback in full


def test_stats_json_counts_rates_and_live_workers(lilota_db_url: str, tasks: Tasks) -> None:
    tasks.complete("a", None, 1)
    tasks.complete("a", None, 2)
    tasks.fail("b", None, "boom")
    tasks.cancel("b")
    tasks.add("a")
    tasks.store.register_worker("host:1:abc", ["a", "b"])
    result, human = run_many(
        [["stats", "--db-url", lilota_db_url, "--json"], ["stats", "--db-url", lilota_db_url]]
    )
    stats = parse_json(result)
    assert isinstance(stats, dict)
    assert stats["by_status"] == {
        "pending": 1,
        "running": 0,
        "completed": 2,
        "failed": 1,
        "cancelled": 1,
    }
    assert stats["total"] == 5
    assert stats["by_name"]["a"]["completed"] == 2 and stats["by_name"]["a"]["pending"] == 1
    assert stats["by_name"]["b"]["failed"] == 1 and stats["by_name"]["b"]["cancelled"] == 1
    for window, minutes in (("5m", 5), ("15m", 15), ("60m", 60)):
        assert stats["finished"][window]["count"] == 4
        assert stats["finished"][window]["per_minute"] == round(4 / minutes, 2)
    assert [(w["id"], w["task_names"]) for w in stats["workers"]] == [("host:1:abc", ["a", "b"])]
    assert human.returncode == 0, human.stderr
    assert "Tasks by name" in human.stdout and "Live workers" in human.stdout


# ---------------------------------------------------------------------- watch, actions


def test_watch_exit_status_says_how_the_task_ended(lilota_db_url: str, tasks: Tasks) -> None:
    completed = tasks.complete("w", None, "fine")
    failed = tasks.fail("w", None, "broken")
    cancelled = tasks.cancel("w")
    results = run_many(
        [["--db-url", lilota_db_url, "watch", str(i)] for i in (completed, failed, cancelled)]
    )
    assert [r.returncode for r in results] == [0, 3, 4], [r.stderr for r in results]
    assert "completed" in results[0].stdout
    assert "failed" in results[1].stdout and "ValueError: broken" in results[1].stdout
    assert "cancelled" in results[2].stdout


def test_watch_follows_a_running_task_until_it_completes(lilota_db_url: str, tasks: Tasks) -> None:
    task_id = tasks.start("long", None)
    tasks.store.set_progress(task_id, 1, 40)
    watcher = start_cli("--db-url", lilota_db_url, "watch", str(task_id))
    assert watcher.stdout is not None
    first = watcher.stdout.readline()  # not a terminal: one line per change
    assert first.strip() == f"task {task_id} (long): running 40%"
    tasks.store.finish([Outcome(id=task_id, fence=1, status="completed", output="3")])
    rest, err = watcher.communicate(timeout=PATIENCE)
    assert watcher.returncode == 0, err
    assert rest.strip().splitlines()[-1].startswith(f"task {task_id} (long) completed after")


def test_cancel_and_retry(lilota_db_url: str, tasks: Tasks) -> None:
    pending = tasks.add("job", {"n": 1})
    running = tasks.start("slow", None)
    completed = tasks.complete("quick", None, None)
    url = ["--db-url", lilota_db_url]
    cancel_pending, cancel_running, cancel_completed, retry_completed = run_many(
        [
            [*url, "cancel", str(pending)],
            [*url, "cancel", str(running)],
            [*url, "cancel", str(completed)],
            [*url, "retry", str(completed)],
        ]
    )
    assert cancel_pending.returncode == 0 and "cancelled" in cancel_pending.stdout
    assert tasks.status(pending) == "cancelled"
    assert cancel_running.returncode == 0 and "asked it to stop" in cancel_running.stdout
    running_task = tasks.store.get(running)
    assert running_task is not None and running_task.cancel_requested
    assert "completed" in assert_one_line_error(cancel_completed)
    assert "only failed or cancelled" in assert_one_line_error(retry_completed)
    assert tasks.status(completed) == "completed"

    retried = run_cli(*url, "retry", str(pending))
    assert retried.returncode == 0 and "scheduled again" in retried.stdout
    again = tasks.store.get(pending)
    assert again is not None
    assert (again.status.value, again.attempts, again.input) == ("pending", 0, {"n": 1})


def test_cleanup_deletes_finished_tasks_older_than_the_duration(lilota_db_url: str) -> None:
    ten_days_ago = utcnow() - timedelta(days=10)
    old = Tasks(lilota_db_url, clock=lambda: ten_days_ago)
    old_done = old.complete("job", None, 1)
    old_failed = old.fail("job", None, "x")
    old_pending = old.add("other")  # never deleted, however old
    old.store.dispose()
    now = Tasks(lilota_db_url)
    recent = now.complete("job", None, 2)
    result, bad = run_many(
        [
            ["--db-url", lilota_db_url, "cleanup", "--older-than", "1w"],
            ["--db-url", lilota_db_url, "cleanup", "--older-than", "7 days"],
        ]
    )
    assert result.returncode == 0, result.stderr
    assert "deleted 2 finished tasks that ended more than 1 week ago" in result.stdout
    assert now.store.get(old_done) is None and now.store.get(old_failed) is None
    assert now.status(old_pending) == "pending" and now.status(recent) == "completed"
    assert "invalid duration '7 days'" in assert_one_line_error(bad, code=2)
    now.store.dispose()


# ---------------------------------------------------------------------- errors


def test_every_error_is_one_line_without_traceback(tmp_path: Path, lilota_sqlite_url: str) -> None:
    Tasks(lilota_sqlite_url).store.dispose()
    url = ["--db-url", lilota_sqlite_url]
    cases: list[tuple[list[str], int, str]] = [
        ([*url, "cleanup", "--older-than", "7x"], 2, "invalid duration '7x'"),
        ([*url, "cleanup"], 2, "--older-than"),
        ([*url, "tasks", "--status", "done"], 2, "unknown status 'done'"),
        ([*url, "tasks", "--limit", "0"], 2, "--limit"),
        ([*url, "show", "abc"], 2, "invalid task id 'abc'"),
        ([*url, "show", "999"], 1, "no task with id 999"),
        ([*url, "watch", "999"], 1, "no task with id 999"),
        ([*url, "cancel", "999"], 1, "no task with id 999"),
        ([*url, "retry", "999"], 1, "no task with id 999"),
        (["--db-url", "not a url", "tasks"], 1, "not a database URL"),
        (["--db-url", "postgresql://postgres@127.0.0.1:1/none", "stats"], 1, "cannot be reached"),
        (["--db-url", f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}", "tasks"], 1, "does not exist"),
        (["tasks"], 1, "no SQLite database at"),  # the default sqlite:///lilota.db in cwd
        (["nonsense"], 2, "invalid choice: 'nonsense'"),
        ([], 2, "required: COMMAND"),
    ]
    empty = tmp_path / "empty"
    empty.mkdir()
    results = run_many([args for args, _, _ in cases], cwd=empty)
    for (args, code, expected), result in zip(cases, results, strict=True):
        line = assert_one_line_error(result, code)
        assert expected in line, (args, line)
    assert list(empty.iterdir()) == []  # no database was created by reading


def test_db_url_option_wins_over_the_environment(lilota_sqlite_url: str) -> None:
    lilota_db_url = lilota_sqlite_url
    tasks = Tasks(lilota_db_url)
    task_id = tasks.add("env")
    tasks.store.dispose()
    from_env, from_option, bad_env = run_many(
        [["tasks", "--json"], ["tasks", "--json", "--db-url", lilota_db_url], ["tasks"]],
        envs=[
            {"LILOTA_DB_URL": lilota_db_url},
            {"LILOTA_DB_URL": "nonsense"},
            {"LILOTA_DB_URL": "nonsense"},
        ],
    )
    assert [t["id"] for t in parse_json(from_env)] == [task_id]
    assert [t["id"] for t in parse_json(from_option)] == [task_id]
    assert "'nonsense' is not a database URL" in assert_one_line_error(bad_env)


# ---------------------------------------------------------------------- worker


GATE_SCRIPT = """
import os, pathlib, time
from lilota import LilotaWorker, TaskProgress

worker = LilotaWorker(os.environ["LILOTA_DB_URL"])

@worker.register("gate", task_progress=TaskProgress)
def gate(data, progress):
    progress.set(10)
    gate = pathlib.Path(data["gate"])
    while not gate.exists():
        time.sleep(0.02)
    return {"opened": data["gate"]}

if __name__ == "__main__":
    worker.start()
"""


class Worker:
    """A running ``lilota worker`` whose stderr lines can be waited for."""

    def __init__(self, *args: str, cwd: Path | None = None) -> None:
        self.proc = start_cli("worker", *args, "--workers", "1", cwd=cwd)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        with self.proc.stderr:
            for line in self.proc.stderr:
                self.lines.put(line)
        self.lines.put("")

    def wait_for(self, text: str) -> str:
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=deadline - time.monotonic())
            except queue.Empty:
                break
            self.seen.append(line)
            if not line:
                break
            if text in line:
                return line
        pytest.fail(f"never printed {text!r}; stderr was:\n{''.join(self.seen)}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=PATIENCE)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.reader.join(PATIENCE)


@pytest.fixture
def workers() -> Iterator[Callable[..., Worker]]:
    """Starts ``lilota worker`` processes; kills and reaps any left at the end."""
    started: list[Worker] = []

    def start(*args: str, cwd: Path | None = None) -> Worker:
        worker = Worker(*args, cwd=cwd)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.close()


@pytest.fixture
def gate_script(tmp_path: Path) -> Path:
    path = tmp_path / "gate_tasks.py"
    path.write_text(GATE_SCRIPT)
    return path


def wait_until_running(tasks: Tasks, task_id: int) -> None:
    deadline = time.monotonic() + PATIENCE
    while tasks.status(task_id) == "pending" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert tasks.status(task_id) == "running"


def test_worker_script_finishes_the_running_task_on_sigterm_then_exits_0(
    lilota_db_url: str,
    tasks: Tasks,
    gate_script: Path,
    tmp_path: Path,
    workers: Callable[..., Worker],
) -> None:
    worker = workers(str(gate_script), "--db-url", lilota_db_url)
    worker.wait_for("worker processes running")
    gate = tmp_path / "gate"
    task_id = tasks.add("gate", {"gate": str(gate)})
    wait_until_running(tasks, task_id)

    worker.signal(signal.SIGTERM)
    worker.wait_for("received SIGTERM: finishing the running tasks")
    gate.touch()
    assert worker.wait() == 0
    task = tasks.store.get(task_id)
    assert task is not None
    assert (task.status.value, task.output) == ("completed", {"opened": str(gate)})


def test_worker_second_signal_stops_at_once_and_gives_the_task_back(
    lilota_db_url: str,
    tasks: Tasks,
    gate_script: Path,
    tmp_path: Path,
    workers: Callable[..., Worker],
) -> None:
    worker = workers(str(gate_script), "--db-url", lilota_db_url)
    worker.wait_for("worker processes running")
    task_id = tasks.add("gate", {"gate": str(tmp_path / "never")})
    wait_until_running(tasks, task_id)

    worker.signal(signal.SIGTERM)
    worker.wait_for("received SIGTERM: finishing")
    worker.signal(signal.SIGINT)
    assert worker.wait() == 128 + signal.SIGINT
    assert tasks.status(task_id) == "pending"  # given back, not left running until its lease ends


def test_worker_runs_the_tasks_of_a_module_instance_on_the_given_database(
    lilota_db_url: str, tasks: Tasks, tmp_path: Path, workers: Callable[..., Worker]
) -> None:
    (tmp_path / "cli_app_module.py").write_text(
        textwrap.dedent(
            f"""
            from lilota import Lilota

            app = Lilota({f"sqlite:///{tmp_path / 'not-this-one.db'}"!r})

            @app.register("double")
            def double(data):
                return {{"twice": data["n"] * 2}}
            """
        )
    )
    worker = workers("cli_app_module", "--db-url", lilota_db_url, cwd=tmp_path)
    worker.wait_for("running cli_app_module:app")
    task_id = tasks.add("double", {"n": 21})
    deadline = time.monotonic() + PATIENCE
    while tasks.status(task_id) != "completed" and time.monotonic() < deadline:
        time.sleep(0.02)
    worker.signal(signal.SIGTERM)
    assert worker.wait() == 0
    task = tasks.store.get(task_id)
    assert task is not None
    assert (task.status.value, task.output) == ("completed", {"twice": 42})
    assert not (tmp_path / "not-this-one.db").exists()


def test_worker_that_cannot_load_its_tasks_exits_with_one_line(
    tmp_path: Path, lilota_sqlite_url: str
) -> None:
    (tmp_path / "broken.py").write_text("def broken(:\n    pass\n")
    (tmp_path / "two.py").write_text("from lilota import Lilota\na = Lilota()\nb = Lilota()\n")
    url = ["--db-url", lilota_sqlite_url]
    cases: list[tuple[list[str], str]] = [
        (
            ["worker", "broken.py", *url],
            "cannot load broken.py: invalid syntax (broken.py, line 1)",
        ),
        (["worker", "missing.py", *url], "cannot load missing.py: no such file"),
        (["worker", "no_such_module_xyz", *url], "cannot import no_such_module_xyz"),
        (["worker", "two", *url], "several Lilota instances; name one: two:a, two:b"),
        (["worker", "two:nothing", *url], "module two has no attribute 'nothing'"),
        (["worker", "broken.py", "--workers", "0", *url], "--workers"),
    ]
    results = run_many([args for args, _ in cases], cwd=tmp_path)
    for (args, expected), result in zip(cases, results, strict=True):
        line = assert_one_line_error(result, 2 if "--workers" in expected else 1)
        assert expected in line, (args, line)


def test_worker_script_failing_at_import_ends_with_its_exception_in_one_line(
    tmp_path: Path, lilota_sqlite_url: str
) -> None:
    (tmp_path / "imports_missing.py").write_text("import no_such_module_for_lilota_cli\n")
    result = run_many(
        [["worker", "imports_missing.py", "--workers", "1", "--db-url", lilota_sqlite_url]],
        cwd=tmp_path,
    )[0]
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("lilota: error: cannot start workers for imports_missing.py")
    assert "No module named 'no_such_module_for_lilota_cli'" in last


def test_tasks_table_keeps_the_name_in_a_narrow_terminal(lilota_db_url: str) -> None:
    from lilota import Lilota

    scheduler = Lilota(lilota_db_url, number_of_workers=0)
    scheduler.schedule("resize-thumbnail", {"path": "a.png"})
    for columns in ("80", "100"):
        done = run_cli("--db-url", lilota_db_url, "tasks", env={"COLUMNS": columns})
        assert done.returncode == 0, done.stderr
        assert "resize-thumbnail" in done.stdout, done.stdout


BURST_MODULE = """
from lilota import Lilota
from lilota.context import TaskContext

app = Lilota("sqlite:///never-this-one.db")

@app.register("double")
def double(data):
    return {"twice": data["n"] * 2}

@app.register("adouble")
async def adouble(data):
    return {"twice": data["n"] * 2}

@app.register("fan-out")
def fan_out(data, ctx: TaskContext):
    return [ctx.schedule("double", {"n": i}) for i in range(data["n"])]
"""

BURST_SCRIPT = """
from lilota.worker import LilotaWorker

worker = LilotaWorker()

@worker.register("double")
def double(data):
    return {"twice": data["n"] * 2}

if __name__ == "__main__":
    worker.start()
"""


def test_worker_burst_runs_what_is_due_and_what_it_schedules_then_exits_0(
    lilota_db_url: str, tasks: Tasks, tmp_path: Path
) -> None:
    (tmp_path / "burst_module.py").write_text(BURST_MODULE)
    later = tasks.store.add(
        NewTask(name="double", input='{"n": 1}', run_at=utcnow() + timedelta(hours=1))
    )
    ids = [
        tasks.add("double", {"n": 1}),
        tasks.add("adouble", {"n": 2}),
        tasks.add("fan-out", {"n": 3}),
    ]

    result = run_many(
        [["worker", "--burst", "burst_module", "--db-url", lilota_db_url]], cwd=tmp_path
    )[0]

    assert result.returncode == 0, result.stderr
    assert "ran 6 tasks; none is due now" in result.stderr
    got = tasks.store.get_many(ids)
    assert [got[i].output for i in ids[:2]] == [{"twice": 2}, {"twice": 4}]
    children = got[ids[2]].output
    assert [t.output for t in tasks.store.get_many(children).values()] == [
        {"twice": 0},
        {"twice": 2},
        {"twice": 4},
    ]
    assert tasks.status(later) == "pending"  # not due: left for later
    assert not (tmp_path / "never-this-one.db").exists()


def test_worker_burst_runs_a_script_whose_worker_calls_start(
    lilota_db_url: str, tasks: Tasks, tmp_path: Path
) -> None:
    script = tmp_path / "burst_script.py"
    script.write_text(BURST_SCRIPT)
    ids = [tasks.add("double", {"n": n}) for n in range(3)]

    result = run_cli("--db-url", lilota_db_url, "worker", "--burst", str(script))

    assert result.returncode == 0, result.stderr
    assert [t.output for t in tasks.store.get_many(ids).values()] == [
        {"twice": 0},
        {"twice": 2},
        {"twice": 4},
    ]
