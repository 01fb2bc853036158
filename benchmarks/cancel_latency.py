"""Cancel latency of a running task, on SQLite and PostgreSQL.

    python benchmarks/cancel_latency.py                       # both backends, 30 runs each
    python benchmarks/cancel_latency.py --backends sqlite --runs 50
    python benchmarks/cancel_latency.py --pg postgresql://postgres@127.0.0.1:5432

One worker process with the default settings (lease 30 s, heartbeat 1 s). Each run
leaves the worker idle for ``--idle`` s (default 1.5: longer than a heartbeat, so its last
renewal before the task is an idle one, after which it looks again only lease/3 later),
schedules ``spin`` (a task that polls ``ctx.cancelled`` every 5 ms), waits until it runs
and a random 0-1 s more (the request lands anywhere in the heartbeat), then calls
``cancel()`` and measures, from cancel() returning:

  seen   until the task sees ``ctx.cancelled`` (it writes time.time() to a file);
  final  until the task's row is final (``cancelled``; polled every 5 ms).

Prints p50 / p95 / max per backend (ms). Each backend gets a new database (PostgreSQL:
``createdb`` on the ``--pg`` server, dropped with ``dropdb`` at the end; SQLite: a file in
a temporary directory). The client tools must be on PATH for PostgreSQL.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
# Worker processes (started by lilota's supervisor) find this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)

from lilota import Lilota, TaskStatus  # noqa: E402
from lilota.context import TaskContext  # noqa: E402

# The tasks; the worker processes import this file to find them.
app = Lilota(number_of_workers=0)


@app.register("spin")
def spin(data: dict[str, str], ctx: TaskContext) -> str:
    """Mark that it runs, then poll for cancellation; write when it saw it."""
    Path(data["started"]).touch()
    deadline = time.monotonic() + 60
    while not ctx.cancelled:
        if time.monotonic() > deadline:
            return "never cancelled"
        time.sleep(0.005)
    Path(data["seen"]).write_text(repr(time.time()))
    return "stopped"


def _wait(condition: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.005)


def measure(db_url: str, runs: int, scratch: Path, idle: float) -> tuple[list[float], list[float]]:
    """``runs`` cancellations on ``db_url``: the seen and final latencies (seconds)."""
    seen: list[float] = []
    final: list[float] = []
    with Lilota(db_url, number_of_workers=1, registry=app.registry) as lilota:
        for run in range(runs):
            started, saw = scratch / f"started-{run}", scratch / f"seen-{run}"
            time.sleep(idle)
            task_id = lilota.schedule("spin", {"started": str(started), "seen": str(saw)})
            _wait(started.exists, "the task to start")
            time.sleep(random.uniform(0.0, 1.0))
            assert lilota.cancel(task_id) is TaskStatus.RUNNING
            asked = time.time()

            def is_final(task_id: int = task_id) -> bool:
                task = lilota.get_task_by_id(task_id)
                return task is not None and task.is_final

            _wait(is_final, "the row to be final")
            final.append(time.time() - asked)
            task = lilota.get_task_by_id(task_id)
            assert task is not None and task.status is TaskStatus.CANCELLED, task
            _wait(saw.exists, "the seen mark")
            seen.append(float(saw.read_text()) - asked)
    return seen, final


@contextmanager
def sqlite_database() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="lilota-cancel-") as directory:
        yield f"sqlite:///{directory}/bench.db"


@contextmanager
def postgres_database(server: str) -> Iterator[str]:
    parts = urlsplit(server)
    host, port = parts.hostname or "127.0.0.1", str(parts.port or 5432)
    user = parts.username or "postgres"
    name = f"lilota_cancel_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    client = ["-h", host, "-p", port, "-U", user]
    subprocess.run(["createdb", *client, name], check=True)
    try:
        yield f"postgresql+psycopg://{user}@{host}:{port}/{name}"
    finally:
        subprocess.run(["dropdb", *client, "--if-exists", "--force", name], check=True)


def _percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"{statistics.median(ordered) * 1000:7.0f} {p95 * 1000:7.0f} {ordered[-1] * 1000:7.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--idle", type=float, default=1.5, help="idle seconds before a task")
    args = parser.parse_args()
    databases = {"sqlite": sqlite_database, "postgres": lambda: postgres_database(args.pg)}
    print(f"cancel latency, {args.runs} runs, ms: p50 / p95 / max")
    for backend in args.backends.split(","):
        with databases[backend]() as db_url, tempfile.TemporaryDirectory() as scratch:
            seen, final = measure(db_url, args.runs, Path(scratch), args.idle)
        print(f"{backend:8}  seen  {_percentiles(seen)}")
        print(f"{backend:8}  final {_percentiles(final)}")


if __name__ == "__main__":
    main()
