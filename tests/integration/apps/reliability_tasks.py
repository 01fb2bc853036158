"""Tasks for the reliability tests (tests/integration/test_reliability.py).

Like apps/tasks.py: registered on a module-level Lilota whose registry the tests share;
every execution is recorded with ``mark()`` in ``$LILOTA_TEST_MARKS`` (one file per worker
process), so a test can count how often each task really ran.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from pathlib import Path

from lilota import Lilota
from lilota.context import TaskContext
from tests.integration.apps.tasks import mark, wait_for_file

app = Lilota(number_of_workers=0)


@app.register("square")  # default settings: the SIGKILL chaos test relies on recoveries
def square(data: dict) -> dict:  # type: ignore[type-arg]
    """Marks ``square <n>`` when it starts, sleeps ``sleep`` seconds, returns n and n²."""
    mark(f"square {data['n']}")
    time.sleep(data.get("sleep", 0))
    return {"n": data["n"], "square": data["n"] ** 2}


@app.register("chain")
def chain(data: dict, ctx: TaskContext) -> int:  # type: ignore[type-arg]
    """Schedules ``square`` for n from inside a worker; returns the new task's id."""
    return ctx.schedule("square", {"n": data["n"]})


@app.register("flaky", max_attempts=3, retry_delay=timedelta(milliseconds=200))
def flaky(data: dict, ctx: TaskContext) -> str:  # type: ignore[type-arg]
    """Raises ConnectionError before attempt ``succeed_on``; marks each attempt's time."""
    mark(f"flaky {data['key']} {ctx.attempt} {time.time()}")
    if ctx.attempt < data["succeed_on"]:
        raise ConnectionError(f"attempt {ctx.attempt} failed")
    return f"ok on attempt {ctx.attempt}"


@app.register("slow", max_attempts=1, timeout=timedelta(milliseconds=500))
def slow(data: dict) -> str:  # type: ignore[type-arg]
    mark(f"slow {data['key']}")
    time.sleep(data["seconds"])
    return "finished"


@app.register("slow-first-time", max_attempts=2, timeout=0.5, retry_delay=0.1)
def slow_first_time(ctx: TaskContext) -> int:
    """Overruns its timeout on the first attempt only."""
    if ctx.attempt == 1:
        time.sleep(60)
    return ctx.attempt


@app.register("blocker")
def blocker(data: dict, ctx: TaskContext) -> str:  # type: ignore[type-arg]
    """Marks ``started <key> <run>`` (run: attempt + recoveries, 1 for the first), then
    runs until the file ``path`` exists."""
    mark(f"started {data['key']} {ctx.attempt + ctx.recoveries}")
    wait_for_file(Path(data["path"]))
    return "released"


# The same, with one attempt: a worker that loses it can never hand it to another.
app.register("blocker-once", max_attempts=1, max_recoveries=0)(blocker)


@app.register("until-cancelled")
def until_cancelled(data: dict, ctx: TaskContext) -> str:  # type: ignore[type-arg]
    """Polls ``ctx.cancelled`` and returns early when it turns true."""
    mark(f"started {data['key']} {ctx.attempt}")
    deadline = time.monotonic() + 60
    while not ctx.cancelled:
        if time.monotonic() > deadline:
            return "never cancelled"
        time.sleep(0.01)
    return "stopped early"


@app.register("ignores-cancel", max_attempts=1)
def ignores_cancel(data: dict) -> str:  # type: ignore[type-arg]
    """Never looks at cancellation: it has to be forced."""
    mark(f"started {data['key']} 1")
    time.sleep(60)
    return "ran to the end"


@app.register("pid")
def pid() -> int:
    return os.getpid()
