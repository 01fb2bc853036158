"""Async tasks, cpu_bound tasks, periodic ticks, delayed, prioritised and unique tasks,
with real worker processes on every backend."""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from lilota import Lilota, TaskStatus
from lilota.registry import Registry
from lilota.schedules import crontab
from tests.integration.apps import async_tasks
from tests.integration.apps.tasks import read_marks

ROOT = Path(__file__).parents[2]

MakeApp = Callable[..., Lilota]


@pytest.fixture
def marks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "marks"
    directory.mkdir()
    monkeypatch.setenv("LILOTA_TEST_MARKS", str(directory))
    return directory


@pytest.fixture
def make_app(lilota_db_url: str, marks: Path) -> Iterator[MakeApp]:
    """Builds Lilota instances for the tasks of apps/async_tasks.py; stops them."""
    made: list[Lilota] = []

    def make(
        workers: int = 1, registry: Registry | None = None, start: bool = True, **options: object
    ) -> Lilota:
        lilota = Lilota(
            lilota_db_url,
            number_of_workers=workers,
            registry=registry or async_tasks.app.registry,
            **options,  # type: ignore[arg-type]
        )
        if start:
            lilota.start()
        made.append(lilota)
        return lilota

    yield make
    for lilota in made:
        lilota.stop(timeout=30)


def run_in_threads(calls: list[Callable[[], object]]) -> None:
    threads = [threading.Thread(target=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    current = best = 0
    for _, step in events:  # at equal times an end (-1) sorts before a start
        current += step
        best = max(best, current)
    return best


# --------------------------------------------------------------------------- async tasks


def test_async_worker_with_concurrency_20_runs_200_sleeping_tasks_20_at_a_time(
    make_app: MakeApp, marks: Path
) -> None:
    lilota = make_app(workers=1, async_concurrency=20)
    started = time.monotonic()
    ids = lilota.schedule_many("async-sleep", [{"n": n, "seconds": 0.2} for n in range(200)])
    tasks = [lilota.wait(task_id, timeout=120) for task_id in ids]
    elapsed = time.monotonic() - started
    assert {t.status for t in tasks} == {TaskStatus.COMPLETED}
    assert [t.output for t in tasks] == list(range(200))
    runs = [line.split() for line in read_marks(marks)]
    assert sorted(int(r[1]) for r in runs) == list(range(200))  # each ran once
    assert {r[4] for r in runs} == {str(lilota.worker_pids[0])}  # all in one process
    # 20 coroutines at once, never more: the claim takes only as many as slots are free.
    assert _max_overlap([(float(r[2]), float(r[3])) for r in runs]) == 20
    assert elapsed < 20  # one at a time would take 40 s; 20 at a time takes about 2 s


def test_async_task_queues_another_whose_result_is_then_read(make_app: MakeApp) -> None:
    lilota = make_app()
    parent = lilota.wait(lilota.schedule("async-parent", {"a": 2, "b": 3}), timeout=30)
    assert parent.status is TaskStatus.COMPLETED
    child = lilota.wait(parent.output, timeout=30)
    assert (child.name, child.status, child.output) == ("async-add", TaskStatus.COMPLETED, 5)


def test_async_task_progress_and_retries_are_recorded(make_app: MakeApp) -> None:
    lilota = make_app()
    progress = lilota.wait(lilota.schedule("async-progress"), timeout=30)
    assert (progress.status, progress.progress_percentage, progress.output) == (
        TaskStatus.COMPLETED,
        100,
        "done",
    )
    failed = lilota.wait(lilota.schedule("async-fails", {"x": 1}), timeout=30)
    assert (failed.status, failed.attempts) == (TaskStatus.FAILED, 2)
    assert failed.exception is not None
    assert (failed.exception.type, failed.exception.message) == ("ValueError", "attempt 2 of 1")


def test_async_task_over_its_timeout_is_cancelled_without_replacing_the_process(
    make_app: MakeApp, marks: Path
) -> None:
    lilota = make_app()
    pids = lilota.worker_pids
    task = lilota.wait(lilota.schedule("async-too-slow"), timeout=30)
    assert task.status is TaskStatus.FAILED
    assert task.exception is not None and task.exception.type == "lilota.errors.TaskTimeout"
    assert read_marks(marks) == ["too-slow started"]
    after = lilota.wait(lilota.schedule("async-add", {"a": 1, "b": 1}), timeout=30)
    assert after.output == 2 and after.pid == pids[0] and lilota.worker_pids == pids


def test_cancelling_a_running_async_task_ends_it_cancelled(make_app: MakeApp, marks: Path) -> None:
    lilota = make_app()
    task_id = lilota.schedule("async-until-cancelled")
    deadline = time.monotonic() + 30
    while not read_marks(marks):
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.01)
    assert lilota.cancel(task_id) is TaskStatus.RUNNING
    task = lilota.wait(task_id, timeout=30)
    assert task.status is TaskStatus.CANCELLED
    other = lilota.wait(lilota.schedule("async-add", {"a": 1, "b": 2}), timeout=30)
    assert other.output == 3


def test_sync_and_async_tasks_share_a_worker_process(make_app: MakeApp) -> None:
    lilota = make_app(workers=1)
    sync = lilota.wait(lilota.schedule("sync-record", {"n": 1}), timeout=30)
    coro = lilota.wait(lilota.schedule("async-add", {"a": 1, "b": 2}), timeout=30)
    assert sync.status is coro.status is TaskStatus.COMPLETED
    assert sync.output == sync.pid == coro.pid == lilota.worker_pids[0]


# --------------------------------------------------------------------------- cpu_bound


def test_cpu_bound_task_runs_in_a_pool_process_of_the_worker(make_app: MakeApp) -> None:
    lilota = make_app()
    task = lilota.wait(lilota.schedule("cpu-fib", {"n": 20}), timeout=60)
    assert task.status is TaskStatus.COMPLETED, task.exception
    value, pid, parent = task.output
    assert value == 6765
    assert parent == task.pid == lilota.worker_pids[0] and pid != task.pid


def test_async_cpu_bound_task_queues_another_from_its_pool_process(make_app: MakeApp) -> None:
    lilota = make_app()
    task = lilota.wait(lilota.schedule("cpu-async", {"n": 10}), timeout=60)
    assert task.status is TaskStatus.COMPLETED, task.exception
    value, child_id, _pid = task.output
    assert value == 55
    assert lilota.wait(child_id, timeout=30).output == 11


def test_cpu_bound_task_over_its_timeout_has_its_pool_process_killed(make_app: MakeApp) -> None:
    lilota = make_app()
    slow = lilota.wait(lilota.schedule("cpu-too-slow"), timeout=60)
    assert slow.status is TaskStatus.FAILED
    assert slow.exception is not None and slow.exception.type == "lilota.errors.TaskTimeout"
    after = lilota.wait(lilota.schedule("cpu-fib", {"n": 10}), timeout=60)
    assert after.status is TaskStatus.COMPLETED and after.output[0] == 55


# --------------------------------------------------------------------------- periodic


def test_two_supervisors_running_an_every_second_task_for_5_s_make_one_task_per_tick(
    make_app: MakeApp, marks: Path
) -> None:
    apps = [make_app(workers=2, registry=async_tasks.periodic.registry, start=False) for _ in "ab"]
    began = time.monotonic()
    ready: list[float] = []

    def start(app: Lilota) -> None:
        app.start()
        ready.append(time.monotonic())

    run_in_threads([lambda app=app: start(app) for app in apps])
    # About 5 s in all with the start-up; ticks are made from the first worker's start
    # (which makes the tick that is due then) until the stop, ~4 s later: 4 to 6 ticks.
    time.sleep(max(0.0, min(ready) + 3.8 - time.monotonic()))
    run_in_threads([lambda app=app: app.stop(timeout=30) for app in apps])
    store = apps[0].store
    ticks = store.list_tasks(name="tick", limit=100)
    run_ats = sorted(t.run_at for t in ticks)
    print(f"{len(ticks)} ticks in {time.monotonic() - began:.2f} s")
    assert 4 <= len(ticks) <= 6, run_ats
    assert len(set(run_ats)) == len(run_ats)  # never two tasks for one tick
    assert all(r.microsecond == 0 for r in run_ats)
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(run_ats))
    ran = collections.Counter(int(m.split()[1]) for m in read_marks(marks) if m.startswith("tick"))
    assert set(ran.values()) == {1} and len(ran) >= 3  # they ran, each tick once
    assert set(ran) <= {t.id for t in ticks}
    # The crontab(hours="3") task: only the most recent 03:00 UTC tick, once.
    (nightly,) = store.list_tasks(name="nightly", limit=10)
    assert nightly.run_at.replace(tzinfo=None) == crontab(hours="3").latest(store.clock())


def test_a_nightly_task_is_not_run_when_its_worker_starts_long_after_its_tick(
    make_app: MakeApp,
) -> None:
    began = datetime.now(timezone.utc).replace(tzinfo=None)
    app = make_app(workers=1, registry=async_tasks.periodic.registry)
    deadline = time.monotonic() + 30
    while not app.get_tasks(name="tick"):  # the tick thread has made its first pass
        assert time.monotonic() < deadline, "no periodic tick was made"
        time.sleep(0.05)
    app.stop(timeout=30)
    tick = crontab(hours="3").latest(began)
    # Only a worker started between 03:00 and 04:00 UTC makes today's 03:00 tick.
    expected = [tick] if began - tick < timedelta(hours=1) else []
    on_time = app.get_tasks(name="nightly-on-time")
    assert [t.run_at.replace(tzinfo=None) for t in on_time] == expected
    (caught_up,) = app.get_tasks(name="nightly")  # catch_up=True: made however late
    assert caught_up.run_at.replace(tzinfo=None) == tick


# --------------------------------------------------------------------------- delayed, priority


@pytest.mark.parametrize("name", ["async-record", "sync-record"])
def test_delayed_task_starts_at_its_time_not_before(make_app: MakeApp, name: str) -> None:
    lilota = make_app()
    task_id = lilota.schedule(name, {"n": 1}, delay=timedelta(seconds=1.5))
    time.sleep(1.0)
    assert lilota.get_task_by_id(task_id).status is TaskStatus.PENDING  # type: ignore[union-attr]
    task = lilota.wait(task_id, timeout=30)
    assert task.status is TaskStatus.COMPLETED
    assert task.start_date_time is not None and task.start_date_time >= task.run_at
    # The idle worker waits until run_at, not until its next poll (5 s): loosely checked.
    assert task.start_date_time - task.run_at < timedelta(seconds=1)


@pytest.mark.parametrize(("name", "prefix"), [("sync-record", "sync"), ("async-record", "record")])
def test_higher_priority_tasks_are_claimed_first(
    make_app: MakeApp, marks: Path, name: str, prefix: str
) -> None:
    lilota = make_app(workers=1, start=False, async_concurrency=1)
    priorities = [0, 5, -2, 9, 3, 5, 1]
    ids = [lilota.schedule(name, {"n": p}, priority=p) for p in priorities]
    lilota.start()
    for task_id in ids:
        lilota.wait(task_id, timeout=30)
    order = [int(m.split()[1]) for m in read_marks(marks) if m.startswith(prefix)]
    assert order == sorted(priorities, reverse=True)


# --------------------------------------------------------------------------- unique


SCHEDULER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from lilota import Lilota

    url, go, keys = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    lilota = Lilota(url, number_of_workers=0)
    lilota.store.ensure_schema()
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.001)
    ids = {f"k{k}": lilota.schedule("async-record", {"n": k}, unique_key=f"k{k}")
           for k in range(keys)}
    print(json.dumps(ids), flush=True)
    """
)


def test_unique_keys_hold_under_concurrent_scheduling_from_several_processes(
    lilota_db_url: str, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", SCHEDULER, lilota_db_url, str(go), "20"],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(6)
    ]
    for process in processes:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
    go.touch()
    results = []
    for process in processes:
        out, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        results.append(json.loads(out))
    for key in results[0]:
        assert len({r[key] for r in results}) == 1, key  # every process got the same id
    lilota = Lilota(lilota_db_url, number_of_workers=0)
    tasks = lilota.store.list_tasks(name="async-record", limit=1000)
    assert len(tasks) == 20
    assert sorted(t.unique_key for t in tasks) == sorted(f"k{k}" for k in range(20))


# --------------------------------------------------------------------------- script mode

SEED_004_STYLE_SCRIPT = textwrap.dedent(
    """
    import asyncio
    import os
    import sys
    from datetime import datetime, timedelta, timezone

    from lilota import LilotaWorker, every
    from lilota.context import TaskContext

    worker = LilotaWorker(sys.argv[1] if len(sys.argv) > 1 else os.environ["DB_URL"])


    @worker.register("fetch_data")
    async def fetch_data(data: dict, ctx: TaskContext) -> int:
        await asyncio.sleep(0.01)
        return ctx.task_manager.queue("heavy_calculation", data_id=data["data_id"])


    @worker.register("heavy_calculation", cpu_bound=True)
    async def heavy_calculation(data: dict, ctx: TaskContext) -> list:
        return [sum(i * i for i in range(data["data_id"])), os.getpid()]


    @worker.register("scheduled", schedule=every(timedelta(seconds=1)))
    async def scheduled(ctx: TaskContext) -> None:
        await asyncio.sleep(0.01)


    worker.start()
    """
)


def test_script_worker_runs_async_cpu_bound_and_periodic_tasks(
    lilota_db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "seed004.py"
    script.write_text(SEED_004_STYLE_SCRIPT)
    monkeypatch.setenv("DB_URL", lilota_db_url)
    lilota = Lilota(lilota_db_url, script_path=script, number_of_workers=1)
    lilota.start()
    try:
        fetch = lilota.wait(lilota.schedule("fetch_data", {"data_id": 1000}), timeout=60)
        assert fetch.status is TaskStatus.COMPLETED, fetch.exception
        heavy = lilota.wait(fetch.output, timeout=60)
        assert heavy.status is TaskStatus.COMPLETED, heavy.exception
        total, pid = heavy.output
        assert total == sum(i * i for i in range(1000))
        assert pid != heavy.pid and heavy.pid == lilota.worker_pids[0]
        deadline = time.monotonic() + 30
        while not lilota.get_tasks(name="scheduled", status=TaskStatus.COMPLETED):
            assert time.monotonic() < deadline, "no periodic tick ran"
            time.sleep(0.05)
    finally:
        lilota.stop(timeout=30)
