"""Lifecycle errors: a worker started twice, a task registered after start(), and a
follow-up task queued under a name no worker can run."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import lilota
from lilota import execution
from lilota.context import TaskContext
from lilota.errors import LilotaError, TaskNotRegistered, WorkerAlreadyStarted
from lilota.models import TaskProgress
from lilota.registry import Registry
from lilota.store import TaskStore
from lilota.worker import LilotaWorker


def _context(store: TaskStore, registry: Registry) -> TaskContext:
    return TaskContext(
        task_id=1,
        name="fetch",
        attempt=1,
        max_attempts=1,
        progress=TaskProgress(1, lambda _: None),
        logger=logging.LoggerAdapter(logging.getLogger("test"), {}),
        _schedule=execution.scheduler(store, registry),
    )


@pytest.fixture
def registry() -> Registry:
    registry = Registry()
    registry.register("fetch", lambda data: None)
    return registry


def test_the_error_is_public_and_a_runtime_error() -> None:
    assert lilota.WorkerAlreadyStarted is WorkerAlreadyStarted
    assert issubclass(WorkerAlreadyStarted, LilotaError)
    assert issubclass(WorkerAlreadyStarted, RuntimeError)


def test_a_follow_up_no_live_worker_announced_is_refused_and_nothing_is_stored(
    store: TaskStore, registry: Registry
) -> None:
    ctx = _context(store, registry)
    with pytest.raises(TaskNotRegistered) as raised:
        ctx.schedule("parse", {"size": 3})
    assert str(raised.value) == "no task named 'parse' is registered (registered: fetch)"
    with pytest.raises(TaskNotRegistered, match="'parse'"):
        ctx.task_manager.queue("parse", size=3)
    assert sum(store.count_by_status().values()) == 0


def test_a_follow_up_a_live_worker_announced_is_stored_and_a_dead_ones_is_not(
    store: TaskStore, registry: Registry, clock: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.register_worker("parser-worker", ["parse"])
    ctx = _context(store, registry)
    task = store.get(ctx.schedule("parse", {"size": 3}))
    assert task is not None and task.name == "parse"

    clock.advance(seconds=execution.LIVE_WITHIN.total_seconds() + 1)  # no heartbeat since
    monkeypatch.setattr(execution, "ANNOUNCED_FOR", 0.0)  # as if the cache had expired
    with pytest.raises(TaskNotRegistered, match="registered: fetch"):
        ctx.schedule("parse", {"size": 3})


def test_the_announced_names_are_read_once_for_many_follow_ups(
    store: TaskStore, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.register_worker("parser-worker", ["parse"])
    reads = 0
    workers = store.workers

    def counting(**kwargs: Any) -> list[dict[str, Any]]:
        nonlocal reads
        reads += 1
        return workers(**kwargs)

    monkeypatch.setattr(store, "workers", counting)
    ctx = _context(store, registry)
    for size in range(20):
        ctx.schedule("parse", {"size": size})
    ctx.schedule("fetch", None)  # a name of this worker's registry reads nothing
    assert reads == 1
    assert store.count_by_status()["pending"] == 21


def test_a_worker_started_a_moment_ago_is_seen_on_a_miss(
    store: TaskStore, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _context(store, registry)
    with pytest.raises(TaskNotRegistered):
        ctx.schedule("parse", None)
    store.register_worker("parser-worker", ["parse"])
    monkeypatch.setattr(execution, "ANNOUNCED_RECHECK", 0.0)  # as if a second went by
    assert store.get(ctx.schedule("parse", None)) is not None


def _start_in_thread(worker: LilotaWorker) -> threading.Thread:
    thread = threading.Thread(target=worker.start, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while worker._loop is None or not worker._running:
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.01)
    return thread


def test_a_running_worker_refuses_a_second_start_and_a_late_register(tmp_path: Path) -> None:
    worker = LilotaWorker(f"sqlite:///{tmp_path}/w.db")
    worker.register("early")(lambda: None)
    thread = _start_in_thread(worker)
    try:
        with pytest.raises(WorkerAlreadyStarted, match="already started"):
            worker.start()
        with pytest.raises(WorkerAlreadyStarted, match=r"'late'.*register every task before"):
            worker.register("late")
        assert worker.registry.names == {"early"}
        assert [w["task_names"] for w in worker.store.workers()] == [["early"]]
    finally:
        worker.stop()
        thread.join(10)
    assert not thread.is_alive()
    # Once start() has returned, the worker may be set up and started again.
    worker.register("late")(lambda: None)
    worker.start(burst=True)


def test_a_lilota_with_started_workers_refuses_a_late_register(tmp_path: Path) -> None:
    app = lilota.Lilota(f"sqlite:///{tmp_path}/a.db", number_of_workers=0)
    app.register("early")(lambda: None)
    app._supervisor = object()  # type: ignore[assignment]  # as if start() started workers
    with pytest.raises(WorkerAlreadyStarted, match=r"'late'.*register every task before"):
        app.register("late")
    app._supervisor = None
    app.register("late")(lambda: None)
    assert app.registry.names == {"early", "late"}
