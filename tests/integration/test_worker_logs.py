"""Worker processes' log lines and hooks, in real worker processes.

Each test writes a small application (its tasks, its hooks) into a temporary directory and
runs it for real: ``python driver.py`` (``Lilota.start()``, whose worker processes'
stderr the supervisor forwards to the driver's stderr) or ``lilota worker app:lilota``.
The assertions read that stderr, and files the hooks write.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from lilota import Lilota

REPO = Path(__file__).resolve().parents[2]
# Upper bound for anything to happen; only reached when something is broken.
PATIENCE = 90.0

APP = """
import json, os, logging
from datetime import timedelta
from lilota import Lilota, TaskContext

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIONS = json.loads(os.environ.get("APP_OPTIONS", "{}"))
if OPTIONS.get("dict_config"):  # the application configures logging at import
    import logging.config
    logging.config.dictConfig({
        "version": 1,
        "formatters": {"app": {"format": "APPCONFIG %(levelname)s %(message)s"}},
        "handlers": {"err": {"class": "logging.StreamHandler", "formatter": "app"}},
        "root": {"handlers": ["err"], "level": "INFO"},
        "loggers": {"lilota": {"level": "INFO"}},
    })

lilota = Lilota(
    "sqlite:///" + os.path.join(HERE, "tasks.db"),
    number_of_workers=OPTIONS.get("workers", 1),
    log_level=OPTIONS.get("log_level"),
)


def note(kind, **fields):
    with open(os.path.join(HERE, "hooks.jsonl"), "a") as f:
        f.write(json.dumps({"hook": kind, "pid": os.getpid(), **fields}) + "\\n")


@lilota.worker_init
def init():
    note("worker_init")
    if OPTIONS.get("init_config"):  # a worker_init hook that configures logging
        logging.basicConfig(format="INITCONFIG %(levelname)s %(message)s", level=logging.INFO)


@lilota.before_task
def before(task):
    note("before_task", id=task.id, name=task.name, attempt=task.attempt, input=task.input)
    if task.name == "ok":
        raise RuntimeError("a broken before_task hook")


@lilota.on_failure
def failure(task, outcome):
    note("on_failure", id=task.id, retry=outcome.will_retry,
         exception=type(outcome.exception).__name__, error=outcome.error.type)


@lilota.after_task
def after(task, outcome):
    note("after_task", id=task.id, status=outcome.status, output=outcome.output)


@lilota.register("ok")
def ok(x: int, ctx: TaskContext) -> int:
    ctx.logger.info("hello from the task, x=%d", x)
    return x * 2


@lilota.register("flaky", max_attempts=2, retry_delay=timedelta(seconds=0.2))
def flaky(x: int) -> int:
    raise ValueError(f"boom {x}")


@lilota.register("waits")
async def waits(x: int, ctx: TaskContext) -> int:
    ctx.logger.info("async hello, x=%d", x)
    return x + 1


@lilota.register("slow", timeout=0.5)
def slow(x: int) -> None:
    import time
    time.sleep(60)


@lilota.register("nap", timeout=0.3)
async def nap(x: int) -> None:
    import asyncio
    await asyncio.sleep(60)


@lilota.register("crunch", cpu_bound=True)
def crunch(x: int, ctx: TaskContext) -> int:
    ctx.logger.info("crunching x=%d", x)  # in the pool process: its default logging too
    raise KeyError("no such key")
"""

DRIVER = """
import sys, time
from app import lilota

if __name__ == "__main__":
    lilota.start()
    ids = [lilota.schedule(name, 5) for name in sys.argv[1:]]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tasks = [lilota.get_task_by_id(i) for i in ids]
        if all(t.status in ("completed", "failed") for t in tasks):
            break
        time.sleep(0.05)
    print(" ".join(f"{t.id}:{t.name}:{t.status}" for t in tasks))
    lilota.stop(timeout=30)
"""


def env_for(options: dict[str, object] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("LILOTA_DB_URL", "LILOTA_LOG_LEVEL", "LILOTA_WORKER_NAME"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["APP_OPTIONS"] = json.dumps(options or {})
    return env


def write_app(directory: Path) -> None:
    (directory / "app.py").write_text(textwrap.dedent(APP))
    (directory / "driver.py").write_text(textwrap.dedent(DRIVER))


def run_driver(
    directory: Path, names: list[str], options: dict[str, object] | None = None
) -> tuple[dict[str, str], str]:
    """Run the driver (Lilota.start()) scheduling ``names``; returns (name -> status of
    the task, its stderr)."""
    write_app(directory)
    done = subprocess.run(
        [sys.executable, "driver.py", *names],
        cwd=directory,
        env=env_for(options),
        capture_output=True,
        text=True,
        timeout=PATIENCE,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    statuses = {}
    for item in done.stdout.split():
        task_id, name, status = item.split(":")
        statuses[name] = status
        statuses[f"{name}.id"] = task_id
    return statuses, done.stderr


def hook_notes(directory: Path) -> list[dict[str, object]]:
    path = directory / "hooks.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def line(prefix: str, logger: str, message: str) -> str:
    """A regex for one line in the default format, from any worker."""
    return rf"(?m)^\S+ \S+ {prefix} worker-\d+\[\d+\] {re.escape(logger)}: {message}$"


def test_worker_processes_log_each_attempt_in_the_default_format(tmp_path: Path) -> None:
    statuses, err = run_driver(
        tmp_path, ["ok", "flaky", "waits", "crunch"], {"log_level": "debug", "workers": 2}
    )
    assert statuses["ok"] == "completed"  # a raising before_task hook loses nothing
    assert statuses["waits"] == "completed"
    assert statuses["flaky"] == "failed"
    assert statuses["crunch"] == "failed"
    ok, flaky = statuses["ok.id"], statuses["flaky.id"]
    waits, crunch = statuses["waits.id"], statuses["crunch.id"]

    assert re.search(line("DEBUG", "lilota.tasks", rf"task {ok} ok attempt 1/1 started"), err)
    completed = line("INFO", "lilota.tasks", rf"task {ok} ok attempt 1/1 completed in [\d.]+ s")
    assert len(re.findall(completed, err)) == 1  # once: not doubled by the supervisor
    assert re.search(
        line("INFO", "lilota.task.ok", rf"\[task {ok}\] hello from the task, x=5"), err
    )
    assert re.search(
        line(
            "ERROR",
            "lilota.hooks",
            rf"task {ok} ok attempt 1/1: before_task hook before raised; the task's outcome "
            "stands",
        ),
        err,
    )
    assert re.search(
        line(
            "WARNING",
            "lilota.tasks",
            rf"task {flaky} flaky attempt 1/2 failed in [\d.]+ s: ValueError: boom 5; "
            r"retrying in 0\.\d s",
        ),
        err,
    )
    final = line(
        "ERROR",
        "lilota.tasks",
        rf"task {flaky} flaky attempt 2/2 failed in [\d.]+ s: ValueError: boom 5; not retried",
    )
    assert re.search(final + r"\nTraceback \(most recent call last\):\n", err)
    # The async lane: async def on the event loop, cpu_bound in the pool process.
    assert re.search(line("INFO", "lilota.task.crunch", rf"\[task {crunch}\] crunching x=5"), err)
    assert re.search(line("INFO", "lilota.task.waits", rf"\[task {waits}\] async hello, x=5"), err)
    assert re.search(
        line("INFO", "lilota.tasks", rf"task {waits} waits attempt 1/1 completed in [\d.]+ s"), err
    )
    assert re.search(
        line(
            "ERROR",
            "lilota.tasks",
            rf"task {crunch} crunch attempt 1/1 failed in [\d.]+ s: KeyError: 'no such key'; "
            "not retried",
        )
        + r"\nTraceback",
        err,
    )


def test_hooks_run_in_each_worker_process_with_what_they_are_told(tmp_path: Path) -> None:
    statuses, _ = run_driver(tmp_path, ["ok", "flaky", "waits", "crunch"], {"workers": 2})
    notes = hook_notes(tmp_path)
    inits = [n for n in notes if n["hook"] == "worker_init"]
    # Once in each worker process: two workers, two distinct processes, and never in the
    # cpu_bound pool process.
    assert len(inits) == 2
    assert len({n["pid"] for n in inits}) == 2
    task_pids = {n["pid"] for n in notes if n["hook"] != "worker_init"}
    assert task_pids <= {n["pid"] for n in inits}

    flaky = int(statuses["flaky.id"])
    assert [
        (n["hook"], n.get("attempt"), n.get("retry"), n.get("status"))
        for n in notes
        if n.get("id") == flaky
    ] == [
        ("before_task", 1, None, None),
        ("on_failure", None, True, None),
        ("after_task", None, None, "pending"),
        ("before_task", 2, None, None),
        ("on_failure", None, False, None),
        ("after_task", None, None, "failed"),
    ]
    failures = {n["id"]: n for n in notes if n["hook"] == "on_failure"}
    assert failures[flaky]["exception"] == "ValueError"
    # A cpu_bound task raised in its pool process: the record, no exception object here.
    crunch = failures[int(statuses["crunch.id"])]
    assert (crunch["exception"], crunch["error"]) == ("NoneType", "KeyError")
    ended = {n["id"]: n for n in notes if n["hook"] == "after_task"}
    assert ended[int(statuses["ok.id"])]["output"] == 10
    assert ended[int(statuses["waits.id"])]["output"] == 6
    starts = [n for n in notes if n["hook"] == "before_task" and n["name"] == "ok"]
    assert [(s["attempt"], s["input"]) for s in starts] == [(1, 5)]


def test_info_is_the_default_level_of_worker_processes(tmp_path: Path) -> None:
    statuses, err = run_driver(tmp_path, ["ok"])
    assert re.search(
        line(
            "INFO",
            "lilota.tasks",
            rf"task {statuses['ok.id']} ok attempt 1/1 completed in [\d.]+ s",
        ),
        err,
    )
    assert " DEBUG " not in err


def test_logging_configured_by_the_application_is_left_alone(tmp_path: Path) -> None:
    for options, mark in (
        ({"dict_config": True}, "APPCONFIG"),
        ({"init_config": True}, "INITCONFIG"),
    ):
        (tmp_path / "tasks.db").unlink(missing_ok=True)
        statuses, err = run_driver(tmp_path, ["ok"], options)
        task = statuses["ok.id"]
        completed = f"{mark} INFO task {task} ok attempt 1/1 completed in"
        assert err.count(completed) == 1, err  # its own handler, and no second one
        assert f"{mark} INFO [task {task}] hello from the task, x=5" in err
        assert not re.search(r"worker-\d+\[\d+\]", err)  # no default-format line at all


def test_lilota_worker_command_gives_its_log_level_to_the_workers(tmp_path: Path) -> None:
    write_app(tmp_path)
    (tmp_path / "schedule.py").write_text(
        "import sys\nfrom app import lilota\nprint(lilota.schedule('ok', 5))\n"
    )
    env = env_for()
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lilota",
            "worker",
            "app:lilota",
            "--workers",
            "1",
            "--log-level",
            "debug",
        ],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    try:
        task = subprocess.run(
            [sys.executable, "schedule.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
            timeout=PATIENCE,
        ).stdout.strip()
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline and not any(
            n["hook"] == "after_task" for n in hook_notes(tmp_path)
        ):
            time.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=PATIENCE)
    assert re.search(line("DEBUG", "lilota.tasks", rf"task {task} ok attempt 1/1 started"), err)
    assert re.search(
        line("INFO", "lilota.tasks", rf"task {task} ok attempt 1/1 completed in [\d.]+ s"), err
    )


def test_a_timeout_is_logged_and_told_to_the_hooks_in_both_lanes(tmp_path: Path) -> None:
    # One run each: the sync lane's timeout ends its worker process (it is replaced).
    nap, nap_err = run_driver(tmp_path, ["nap"])
    slow, slow_err = run_driver(tmp_path, ["slow"])
    assert (nap["nap"], slow["slow"]) == ("failed", "failed")
    for name, statuses, err, seconds in (
        ("nap", nap, nap_err, "0.3"),
        ("slow", slow, slow_err, "0.5"),
    ):
        task = statuses[f"{name}.id"]
        assert re.search(
            line(
                "ERROR",
                "lilota.tasks",
                rf"task {task} {name} attempt 1/1 failed in [\d.]+ s: lilota.errors.TaskTimeout: "
                rf"task {task} \({name}\) ran longer than its timeout of {seconds} s.*; not retried",
            ),
            err,
        ), err
    ended = {n["id"]: n["status"] for n in hook_notes(tmp_path) if n["hook"] == "after_task"}
    assert ended == {int(nap["nap.id"]): "failed", int(slow["slow.id"]): "failed"}


SCRIPT = """
import os
from lilota import LilotaWorker

worker = LilotaWorker(logging_level="debug")  # the earlier release's spelling


@worker.register("ok")
def ok(x: int) -> int:
    return x


@worker.after_task
def after(task, outcome):
    with open(os.path.join(os.path.dirname(__file__), "ended"), "a") as f:
        f.write(f"{task.id} {outcome.status}\\n")


worker.start()
"""


def test_a_worker_script_keeps_the_level_its_lilota_worker_was_given(tmp_path: Path) -> None:
    (tmp_path / "script.py").write_text(SCRIPT)
    url = f"sqlite:///{tmp_path}/script.db"
    worker = subprocess.Popen(
        [sys.executable, "-m", "lilota", "worker", "script.py", "--workers", "1", "--db-url", url],
        cwd=tmp_path,
        env=env_for(),
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    ended = tmp_path / "ended"
    try:
        task = Lilota(url, number_of_workers=0).schedule("ok", 1)
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline and not ended.exists():
            time.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=PATIENCE)
    assert ended.read_text() == f"{task} completed\n"
    assert re.search(line("DEBUG", "lilota.tasks", rf"task {task} ok attempt 1/1 started"), err)
