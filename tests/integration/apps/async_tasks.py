"""Async, cpu_bound and periodic tasks for tests/integration/test_async_periodic.py.

Tests make their own ``Lilota(db_url, registry=app.registry)`` (or ``periodic.registry``);
worker processes import this module to find the tasks. Executions are recorded with
``mark()`` from apps/tasks.py, into ``$LILOTA_TEST_MARKS``.
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta

from lilota import Lilota, TaskProgress, crontab, every
from lilota.context import TaskContext
from tests.integration.apps.tasks import mark

app = Lilota(number_of_workers=0)

# A separate registry: its workers fire the ticks of this periodic task.
periodic = Lilota(number_of_workers=0)


@app.register("async-sleep")
async def async_sleep(data: dict) -> int:
    """Records when it started and ended (time.time()) and in which process."""
    started = time.time()
    await asyncio.sleep(data["seconds"])
    mark(f"sleep {data['n']} {started!r} {time.time()!r} {os.getpid()}")
    return int(data["n"])


@app.register("async-add")
async def async_add(data: dict) -> int:
    await asyncio.sleep(0)
    return int(data["a"]) + int(data["b"])


@app.register("async-parent")
async def async_parent(data: dict, ctx: TaskContext) -> int:
    """Queues async-add with seed 004's spelling and returns the new task's id."""
    return ctx.task_manager.queue("async-add", a=data["a"], b=data["b"])


@app.register("async-record")
async def async_record(data: dict) -> None:
    mark(f"record {data['n']}")


@app.register("sync-record")
def sync_record(data: dict) -> int:
    mark(f"sync {data['n']}")
    return os.getpid()


@app.register("async-progress", task_progress=TaskProgress)
async def async_progress(task_progress: TaskProgress) -> str:
    for step in (10, 60):
        task_progress.set(step)
        await asyncio.sleep(0.01)
    return "done"


@app.register("async-too-slow", timeout=timedelta(seconds=0.5), max_attempts=1)
async def async_too_slow() -> None:
    mark("too-slow started")
    await asyncio.sleep(60)
    mark("too-slow finished")  # never: the timeout cancels it


@app.register("async-until-cancelled")
async def async_until_cancelled(ctx: TaskContext) -> None:
    mark(f"until-cancelled started {ctx.task_id}")
    while True:
        ctx.progress.raise_if_cancelled()
        await asyncio.sleep(0.05)


@app.register("async-fails", max_attempts=2, retry_delay=timedelta(milliseconds=10))
async def async_fails(data: dict, ctx: TaskContext) -> None:
    raise ValueError(f"attempt {ctx.attempt} of {data['x']}")


def _fib(n: int) -> int:
    return n if n < 2 else _fib(n - 1) + _fib(n - 2)


@app.register("cpu-fib", cpu_bound=True)
def cpu_fib(data: dict) -> list[int]:
    """Runs in the worker's process pool: returns the result and the pool process's pid."""
    return [_fib(data["n"]), os.getpid(), os.getppid()]


@app.register("cpu-async", cpu_bound=True)
async def cpu_async(data: dict, ctx: TaskContext) -> list[int]:
    """An async cpu_bound function (seed 004's heavy_calculation) that queues a task."""
    await asyncio.sleep(0)
    child = ctx.task_manager.queue("async-add", a=data["n"], b=1)
    return [_fib(data["n"]), child, os.getpid()]


@app.register("cpu-too-slow", cpu_bound=True, timeout=timedelta(seconds=0.5), max_attempts=1)
def cpu_too_slow() -> None:
    time.sleep(60)


@periodic.register("tick", schedule=every(timedelta(seconds=1)))
async def tick(ctx: TaskContext) -> None:
    mark(f"tick {ctx.task_id} {os.getpid()}")


# catch_up: its latest 03:00 tick is made whenever a worker starts (see the test).
@periodic.register("nightly", schedule=crontab(hours="3", catch_up=True))
def nightly() -> None:
    mark("nightly")


# The default: a tick more than an hour late is skipped, not run in the middle of the day.
@periodic.register("nightly-on-time", schedule=crontab(hours="3"))
def nightly_on_time() -> None:
    mark("nightly-on-time")
